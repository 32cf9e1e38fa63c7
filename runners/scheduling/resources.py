"""What each trial asks Ray for: CPUs, and a GPU share no smaller than its memory needs, or a gang of workers.

Ray packs fractional GPU shares onto whole GPUs, so a share of 1/4 means four such trials on one GPU;
taking the share from the memory estimate means Ray never packs more trials onto a GPU than it holds.
A trial declared with gpus W >= 2, or one too big for one GPU under 'auto', runs as a gang of W workers
(runners.scheduling.gang), each with resources.cpus and one GPU (or CPUs alone on a cluster without GPUs).
"""

from __future__ import annotations

import math

from models import estimate_memory_bytes
from sweeps.expand import PlannedTrial
from sweeps.trial import Resources, Runtime

SHARES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # shares that tile a GPU exactly
HEADROOM = 1.25  # allocator fragmentation, CUDA context and compile workspaces beyond the estimate


def micro_batch_seqs(planned: PlannedTrial, runtime: Runtime) -> int:
    seqs = planned.trial.train.batch_size // planned.trial.model.seq_len
    return min(seqs, runtime.micro_batch_size or seqs)


def gpus_needed(planned: PlannedTrial, runtime: Runtime, gpu_memory_bytes: int) -> float:
    """GPUs of memory the trial's estimate takes on one process, with headroom."""
    return HEADROOM * estimate_memory_bytes(planned.trial.model, micro_batch_seqs(planned, runtime)) / gpu_memory_bytes


def gpu_share(planned: PlannedTrial, runtime: Runtime, declared: float | str, gpu_memory_bytes: int) -> float:
    """The smallest tiling share that holds the trial's memory estimate, and at least what was declared."""
    need = gpus_needed(planned, runtime, gpu_memory_bytes)
    if need > 1.0:
        raise ValueError(f"trial {planned.trial_id} needs about {need:.1f} GPUs of memory; set resources.gpus "
                         "'auto' (a gang), lower runtime.micro_batch_size or the model size")
    floor = 0.0 if declared == "auto" else float(declared)
    if floor >= 1.0:
        return float(math.ceil(floor))
    return next(s for s in SHARES if s >= max(need, floor))


def gang_size(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None) -> int:
    """Workers the trial runs as: the declared W, or under 'auto' on GPUs 1 while one GPU holds the trial, else
    the fewest GPUs (a power of two) whose FSDP shards hold it. The shard rule divides the whole estimate by
    W although activations do not shard: HEADROOM is what covers that, so prefer micro-batches that keep
    activations small (runtime.micro_batch_size) for such trials."""
    if resources.gpus != "auto" or not gpu_memory_bytes:
        return resources.workers
    need = gpus_needed(planned, runtime, gpu_memory_bytes)
    return 1 if need <= 1.0 else 2 ** math.ceil(math.log2(need))


def ray_options(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None) -> dict:
    """Keyword arguments for `.options()` of the trial's Ray task. A gang's task holds nothing itself (its
    workers do, through Ray Train); it is retried only when its own process died."""
    if gang_size(planned, resources, runtime, gpu_memory_bytes) > 1:
        return {"num_cpus": 0, "num_gpus": 0, "max_retries": runtime.max_retries, "retry_exceptions": False}
    gpus = 0.0
    if gpu_memory_bytes:  # the cluster has GPUs: every trial takes a share
        gpus = gpu_share(planned, runtime, resources.gpus, gpu_memory_bytes)
    elif resources.gpus not in ("auto", 0, 0.0):
        gpus = float(resources.gpus)  # declared against a cluster we could not measure; Ray will hold it to that
    return {"num_cpus": resources.cpus, "num_gpus": gpus, "max_retries": runtime.max_retries, "retry_exceptions": True}

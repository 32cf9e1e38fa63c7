"""What each trial asks Ray for: CPUs, and a GPU share no smaller than its memory needs.

Ray packs fractional GPU shares onto whole GPUs, so a share of 1/4 means four such trials on one GPU;
taking the share from the memory estimate means Ray never packs more trials onto a GPU than it holds.
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


def gpu_share(planned: PlannedTrial, runtime: Runtime, declared: float | str, gpu_memory_bytes: int) -> float:
    """The smallest tiling share that holds the trial's memory estimate, and at least what was declared."""
    need = HEADROOM * estimate_memory_bytes(planned.trial.model, micro_batch_seqs(planned, runtime)) / gpu_memory_bytes
    if need > 1.0:
        raise ValueError(f"trial {planned.trial_id} needs about {need:.1f} GPUs of memory; "
                         "lower runtime.micro_batch_size or the model size")
    floor = 0.0 if declared == "auto" else float(declared)
    if floor >= 1.0:
        return float(math.ceil(floor))
    return next(s for s in SHARES if s >= max(need, floor))


def ray_options(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None) -> dict:
    """Keyword arguments for `.options()` of the trial's Ray task."""
    gpus = 0.0
    if gpu_memory_bytes:  # the cluster has GPUs: every trial takes a share
        gpus = gpu_share(planned, runtime, resources.gpus, gpu_memory_bytes)
    elif resources.gpus not in ("auto", 0, 0.0):
        gpus = float(resources.gpus)  # declared against a cluster we could not measure; Ray will hold it to that
    return {"num_cpus": resources.cpus, "num_gpus": gpus, "max_retries": runtime.max_retries, "retry_exceptions": True}

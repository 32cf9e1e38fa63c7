"""What each Ray task asks for (CPUs, and a GPU share no smaller than its memory needs, or a gang of workers),
and how many trials one task trains together as a pack.

Ray packs fractional GPU shares onto whole GPUs, so a share of 1/4 means four such tasks on one GPU;
taking the share from the memory estimate means Ray never packs more tasks onto a GPU than it holds.
A pack (sweeps/packs.py: trials of one model shape, data and schedule, differing in lr, seed or optimiser
knobs) is one task that trains its members as one stacked model, so its kernels do the work of all of them:
it asks for its members' memory together.
A trial declared with gpus W >= 2, or under 'auto' one too big for one GPU or too slow on one for
resources.max_hours, runs as a gang of W workers (runners.scheduling.gang), each with resources.cpus and one
GPU (or CPUs alone on a cluster without GPUs); a gang is never packed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypeVar

from models import estimate_memory_bytes
from sweeps.errors import SpecError
from sweeps.expand import PlannedTrial
from sweeps.packs import group_packs
from sweeps.trial import Resources, Runtime, expert_shards

SHARES = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)  # shares that tile a GPU exactly
HEADROOM = 1.25  # allocator fragmentation, CUDA context and compile workspaces beyond the estimate
# Training FLOPs of one micro-batch (forward and backward, all members) past which packing more members gains
# nothing: a dense step of 110M parameters on 64 x 1,024 tokens (4e13) runs at 50% MFU on an H200, where the
# 7M model's 5e12 runs at 33% (runners/bench/step.py in results/benchmarks.jsonl).
TARGET_STEP_FLOPS = 4e13
# A gang of W GPUs trains at W x this x one GPU's rate: the gradient all-reduce (DDP) or the shards' gathers and
# reduce-scatters (FSDP) that the backward pass does not hide. Assumed, not measured here (no gang of this repo has
# been timed against one GPU yet): data parallelism within one NVLink node loses about a tenth at these sizes.
GANG_EFFICIENCY = 0.9
T = TypeVar("T")


def micro_batch_seqs(planned: PlannedTrial, runtime: Runtime) -> int:
    seqs = planned.trial.train.batch_size // planned.trial.model.seq_len
    return min(seqs, runtime.micro_batch_size or seqs)


def member_bytes(planned: PlannedTrial, runtime: Runtime) -> float:
    """GPU memory one trial (or one member of a pack) needs on one process, headroom included."""
    return HEADROOM * estimate_memory_bytes(planned.trial.model, micro_batch_seqs(planned, runtime))


def gpu_share(planned: PlannedTrial, runtime: Runtime, declared: float | str, gpu_memory_bytes: int,
              members: int = 1) -> float:
    """The smallest tiling share that holds the memory estimate of `members` such trials trained together, and at
    least what was declared (a floor per task)."""
    need = members * member_bytes(planned, runtime) / gpu_memory_bytes
    if need > 1.0:
        what = f"trial {planned.trial_id}" if members == 1 else f"a pack of {members} like trial {planned.trial_id}"
        raise ValueError(f"{what} needs about {need:.1f} GPUs of memory; set resources.gpus 'auto' (a gang), "
                         "lower runtime.micro_batch_size or the model size")
    floor = 0.0 if declared == "auto" else float(declared)
    if floor >= 1.0:
        return float(math.ceil(floor))
    return next(s for s in SHARES if s >= max(need, floor))


def estimated_hours(planned: PlannedTrial, workers: int, resources: Resources, peak_flops: float) -> float:
    """Wall hours of the trial on `workers` whole GPUs of this bf16 peak: its exact training FLOPs (branches
    included) over W x peak x resources.assumed_mfu, x GANG_EFFICIENCY for a gang. A trial on a share of a GPU
    takes longer while it takes turns with the others there."""
    rate = workers * peak_flops * resources.assumed_mfu * (GANG_EFFICIENCY if workers > 1 else 1.0)
    return planned.compute_exact / rate / 3600


def gang_size(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None,
              peak_flops: float | None = None) -> int:
    """Workers the trial runs as: the declared W, or under 'auto' the fewest GPUs, a power of two, that hold
    it (with GPU memory known) and, with resources.max_hours and a GPU peak known, train it within that by
    `estimated_hours`; never more than resources.max_gpus (time_target_warning says who misses the target for
    it; memory beyond it is an error). 1 while one GPU does both: the trial then takes a share (gpu_share).
    The memory rule divides the whole estimate by W (FSDP shards) although activations do not shard: HEADROOM
    is what covers that, so prefer micro-batches that keep activations small (runtime.micro_batch_size)."""
    workers = resources.workers if resources.gpus != "auto" else _auto_workers(planned, resources, runtime,
                                                                               gpu_memory_bytes, peak_flops)
    try:  # W is decided here, so here it must split the experts (runtime.expert_parallel)
        expert_shards(planned.trial.model.moe, runtime, workers)
    except ValueError as e:
        raise SpecError(f"trial {planned.trial_id}, a gang of {workers} (resources.gpus {resources.gpus}): {e}") from None
    return workers


def _auto_workers(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None,
                  peak_flops: float | None) -> int:
    workers = 1
    if gpu_memory_bytes:
        need = member_bytes(planned, runtime) / gpu_memory_bytes
        workers = 1 if need <= 1.0 else 2 ** math.ceil(math.log2(need))
    cap = resources.max_gpus
    if cap is not None and workers > cap:
        raise SpecError(f"trial {planned.trial_id} needs {workers} GPUs of memory, more than resources.max_gpus "
                        f"{cap}; raise it, lower runtime.micro_batch_size or the model size")
    if resources.max_hours and peak_flops:
        while (estimated_hours(planned, workers, resources, peak_flops) > resources.max_hours
               and (cap is None or workers < cap)):
            workers *= 2
    return workers


def time_target_warning(planned: Sequence[PlannedTrial], resources: Resources, runtime: Runtime,
                       gpu_memory_bytes: int | None, peak_flops: float | None) -> str | None:
    """One line naming the trials that even resources.max_gpus GPUs cannot train within resources.max_hours,
    with their estimates (they run on max_gpus all the same); None when every trial meets the target."""
    if resources.gpus != "auto" or not resources.max_hours or not peak_flops:
        return None
    misses = []
    for p in planned:
        hours = estimated_hours(p, gang_size(p, resources, runtime, gpu_memory_bytes, peak_flops), resources, peak_flops)
        if hours > resources.max_hours:
            misses.append(f"{p.trial_id[:8]} {hours:.1f} h")
    if not misses:
        return None
    more = f" and {len(misses) - 8} more" if len(misses) > 8 else ""
    return (f"resources.max_hours {resources.max_hours:g}: {len(misses)} trial(s) take longer even on max_gpus "
            f"{resources.max_gpus} and run on {resources.max_gpus} GPUs: {', '.join(misses[:8])}{more} (at "
            f"{resources.assumed_mfu:g} MFU of {peak_flops / 1e12:.3g} TFLOP/s)")


def ray_options(planned: PlannedTrial, resources: Resources, runtime: Runtime, gpu_memory_bytes: int | None,
                members: int = 1, peak_flops: float | None = None) -> dict:
    """Keyword arguments for `.options()` of the Ray task of the trial, or of a pack of `members` like it. A
    gang's task holds nothing itself (its workers do, through Ray Train); it is retried only when its own
    process died."""
    if gang_size(planned, resources, runtime, gpu_memory_bytes, peak_flops) > 1:
        return {"num_cpus": 0, "num_gpus": 0, "max_retries": runtime.max_retries, "retry_exceptions": False}
    gpus = 0.0
    if gpu_memory_bytes:  # the cluster has GPUs: every task takes a share
        gpus = gpu_share(planned, runtime, resources.gpus, gpu_memory_bytes, members)
    elif resources.gpus not in ("auto", 0, 0.0):
        gpus = float(resources.gpus)  # declared against a cluster we could not measure; Ray will hold it to that
    return {"num_cpus": resources.cpus, "num_gpus": gpus, "max_retries": runtime.max_retries, "retry_exceptions": True}


def pack_capacity(planned: PlannedTrial, runtime: Runtime, gpu_memory_bytes: int | None) -> int:
    """How many trials like this one a pack takes: runtime.max_pack at most, no more than one GPU holds, and no
    more than TARGET_STEP_FLOPS of work per micro-batch (at least one, however large the trial). MoE trials with
    noisy routing go alone: a pack cannot draw each member's own router noise (models/packed.py)."""
    moe = planned.trial.model.moe
    if runtime.pack == "off" or (moe is not None and moe.noise_std > 0):
        return 1
    work = planned.flops.train_exact * micro_batch_seqs(planned, runtime) * planned.trial.model.seq_len
    capacity = min(runtime.max_pack, int(TARGET_STEP_FLOPS // work))
    if gpu_memory_bytes:
        capacity = min(capacity, int(gpu_memory_bytes // member_bytes(planned, runtime)))
    return max(1, capacity)


def packs(items: Sequence[T], planned: Callable[[T], PlannedTrial], runtime: Runtime,
          gpu_memory_bytes: int | None) -> list[list[T]]:
    """The items (trials, or what carries them) as packs, in first-seen order; with runtime.pack 'off', one each."""
    if runtime.pack == "off":
        return [[item] for item in items]
    groups = group_packs(items, key=lambda item: planned(item).trial, max_pack=max(1, len(items)))
    return [group[i:i + size] for group in groups
            for size in [pack_capacity(planned(group[0]), runtime, gpu_memory_bytes)]
            for i in range(0, len(group), size)]


def tasks(items: Sequence[T], planned: Callable[[T], PlannedTrial], resources: Resources, runtime: Runtime,
          gpu_memory_bytes: int | None, peak_flops: float | None = None) -> list[list[T]]:
    """The items as the Ray tasks that train them: each gang alone (a gang is never packed), then the
    single-process trials in packs."""
    gang = [gang_size(planned(item), resources, runtime, gpu_memory_bytes, peak_flops) > 1 for item in items]
    return ([[item] for item, g in zip(items, gang) if g]
            + packs([item for item, g in zip(items, gang) if not g], planned, runtime, gpu_memory_bytes))

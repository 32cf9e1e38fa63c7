"""What runs inside a Ray worker for one trial: open its data, train, and keep MLflow up to date.

The job carries the MLflow run ids the driver made, so a retried trial logs into the same runs and
its training resumes from the checkpoint in its own folder. In a gang (runners.scheduling.gang) every rank
runs this; rank 0 alone sets the statuses and logs, with tags for the group (world size, parallelism, each
rank's process and node).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from runners.tracking import names
from runners.tracking.runs import MlflowSink, client, set_status
from sweeps.trial import Runtime, TrialConfig


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs, as plain data (it crosses process and node boundaries)."""

    trial_json: str
    runtime_json: str
    run_id: str
    branch_run_ids: dict[int, str]  # branch end (tokens) -> run id
    tracking_uri: str
    workdir: str
    cache_dir: str | None
    cpus: float = 1.0


# Set, Ray leaves CUDA_VISIBLE_DEVICES as the node had it, and each trial selects the GPU Ray gave it: a
# worker kept for several trials (runners.scheduling.sweep.reuses_workers) can then move between GPUs.
NOSET_CUDA = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def cuda_index(gpu_id: str | int, visible: str | None) -> int:
    """torch's index of the GPU Ray assigned: its place in CUDA_VISIBLE_DEVICES when that is set, else the id."""
    if not visible:
        return int(gpu_id)
    return [v.strip() for v in visible.split(",")].index(str(gpu_id))


def select_gpu() -> None:
    """Make the GPU Ray assigned this trial torch's current device (when workers see every GPU)."""
    import ray
    import torch

    ids = ray.get_gpu_ids() if ray.is_initialized() else []
    if ids and os.environ.get(NOSET_CUDA) == "1" and torch.cuda.is_available():
        torch.cuda.set_device(cuda_index(ids[0], os.environ.get("CUDA_VISIBLE_DEVICES")))


def release_gpu() -> None:
    """Hand back what the trial left behind, for the next trial in this worker: cached blocks, compiled code."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    if "torch._dynamo" in sys.modules:  # only a compiled trial imported it
        torch._dynamo.reset()


def _quiet_mlflow_retries() -> None:
    """Fail fast on an unreachable server: the sink keeps the points and retries on its own schedule."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def where() -> dict[str, str]:
    """Which host, process, Ray node and GPUs this attempt runs on (tags, so the UI shows it)."""
    import ray
    import torch

    ctx = ray.get_runtime_context() if ray.is_initialized() else None
    gpus = ",".join(map(str, ray.get_gpu_ids())) if ctx else ""
    tags = {names.TAG_WORKER: f"{socket.gethostname()}:{os.getpid()}",
            names.TAG_NODE: ctx.get_node_id() if ctx else "", names.TAG_GPUS: gpus}
    if torch.cuda.is_available():  # the GPU torch trains on, as Ray names GPUs: equal to TAG_GPUS when placed right
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        index = torch.cuda.current_device()
        tags[names.TAG_CUDA] = visible.split(",")[index].strip() if visible else str(index)
    return tags


class NullSink:
    """What the ranks other than 0 log into: nothing (rank 0 logs the group's numbers)."""

    def log(self, metrics, tokens: int) -> None:
        pass

    def flush(self, timeout_s: float = 0.0) -> bool:
        return True

    def close(self) -> bool:
        return True


def group_tags(placed: list[dict[str, str]], runtime: Runtime) -> dict[str, str]:
    """Where a trial's ranks run (`placed`: each rank's `where()`, in rank order), as tags: rank 0's own, and the group's."""
    tags = placed[0] | {names.TAG_WORLD: str(len(placed)),
                        names.TAG_PARALLEL: runtime.parallel if len(placed) > 1 else "none"}
    if len(placed) > 1:
        tags[names.TAG_RANK_WORKERS] = ",".join(p[names.TAG_WORKER] for p in placed)
        tags[names.TAG_RANK_NODES] = ",".join(p[names.TAG_NODE] for p in placed)
    return tags


def run_job(job: TrialJob, on_eval=None) -> dict:
    """Train one trial to the end (resuming if its folder holds a checkpoint); returns its TrialResult as a dict.
    In a gang, every rank calls this; rank 0's `on_eval` alone is asked (the group follows its answer)."""
    import torch

    from runners.data.store import prepare_data
    from runners.training import parallel
    from runners.training.train import run_trial

    _quiet_mlflow_retries()
    group = parallel.current()
    if group.world == 1:
        select_gpu()  # a gang's ranks were given theirs by Ray Train
    torch.set_num_threads(max(1, int(job.cpus)))
    trial = TrialConfig.model_validate_json(job.trial_json)
    runtime = Runtime.model_validate_json(job.runtime_json)
    mlflow = client(job.tracking_uri)
    placed = group.gather(where())
    if group.main:
        set_status(mlflow, job.run_id, names.RUNNING, **group_tags(placed, runtime))

    data = prepare_data(trial.data, Path(job.cache_dir) if job.cache_dir else None)
    if data.content_hash != trial.data.content_hash:
        raise RuntimeError(f"data on this node hashes to {data.content_hash}, the plan had {trial.data.content_hash}: "
                           "every node must see the same corpus")

    def sink_of(run_id: str):
        return MlflowSink(run_id, job.tracking_uri) if group.main else NullSink()

    sink = sink_of(job.run_id)
    branch_sinks = {d: sink_of(run_id) for d, run_id in job.branch_run_ids.items()}
    try:
        result = run_trial(trial, runtime, Path(job.workdir), sink, data=data,
                           branch_sinks=branch_sinks.__getitem__, on_eval=on_eval if group.main else None)
    finally:
        for s in [sink, *branch_sinks.values()]:
            s.close()
        release_gpu()
    if not group.main:
        return dataclasses.asdict(result)

    finished = {b.tokens for b in result.branches}
    for end, run_id in job.branch_run_ids.items():
        # A branch that never ran (its trial diverged or was pruned first) shares its trial's fate.
        set_status(mlflow, run_id, names.FINISHED if end in finished else result.status)
    extra = {names.TAG_REPEATS_DATA: str(result.repeats_data).lower(), names.TAG_NUMERICS: result.numerics}
    if result.diverged_at_tokens is not None:
        extra[names.TAG_DIVERGED_STEP] = str(result.diverged_at_tokens)
    if result.error:
        extra[names.TAG_ERROR] = result.error
    set_status(mlflow, job.run_id, result.status, **extra)
    return dataclasses.asdict(result)

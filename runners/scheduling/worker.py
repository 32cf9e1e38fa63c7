"""What runs inside a Ray worker for one trial, or for a pack of trials: open the data, train, and keep MLflow
up to date.

The job carries the MLflow runs the driver planned (RunRequests); the worker opens them when it starts the trial
(runners.tracking.runs.open_run: created then, so a run's start time is when its training starts and not when it
was queued; found again by a retried, resumed or re-run trial, which logs into the same runs), and its training
resumes from the checkpoint in its own folder. A pack opens its members' runs when the pack starts, and each
member then does as a lone trial. In a gang (runners.scheduling.gang) every rank runs run_job; rank 0 alone opens
the runs, sets the statuses and logs, with tags for the group (world size, parallelism, each rank's process and
node). A run ends (MLflow's end time) when its trial's result is recorded, after its last metric is sent.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow.tracking import MlflowClient

from runners.tracking import names
from runners.tracking.interrupts import deferred_interrupts
from runners.tracking.runs import MlflowSink, RunRequest, client, open_run, set_status
from sweeps.trial import Runtime, TrialConfig, expert_shards


@dataclass(frozen=True)
class TrialJob:
    """Everything a worker needs, as plain data (it crosses process and node boundaries)."""

    trial_json: str
    runtime_json: str
    run: RunRequest
    branch_runs: dict[int, RunRequest]  # branch end (tokens) -> its run
    tracking_uri: str
    workdir: str
    cache_dir: str | None
    cpus: float = 1.0


@dataclass(frozen=True)
class Opened:
    """A job's runs, opened: the trial's run id and its branches' ({branch end: run id})."""

    run_id: str
    branch_run_ids: dict[int, str]


def open_runs(mlflow: MlflowClient, run: RunRequest, branches: dict[int, RunRequest]) -> tuple[str, dict[int, str]]:
    """Open a trial's run and its branches' runs, each nested under the trial's: (run id, {branch end: run id})."""
    run_id = open_run(mlflow, run)
    return run_id, {end: open_run(mlflow, b, parent_run_id=run_id) for end, b in branches.items()}


def _open(mlflow: MlflowClient, job: TrialJob) -> Opened:
    return Opened(*open_runs(mlflow, job.run, job.branch_runs))


@dataclass(frozen=True)
class PackJob:
    """Several trials that train together as one stacked model (sweeps/packs.py), each with its own runs and
    folder; they share the runtime, tracking URI, cache and CPUs (taken from the first)."""

    members: tuple[TrialJob, ...]


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


def group_tags(placed: list[dict[str, str]], runtime: Runtime, trial: TrialConfig) -> dict[str, str]:
    """Where a trial's ranks run (`placed`: each rank's `where()`, in rank order), as tags: rank 0's own, and the
    group's, with how it shares the model."""
    sharded = expert_shards(trial.model.moe, runtime, len(placed)) > 1
    tags = placed[0] | {names.TAG_WORLD: str(len(placed)),
                        names.TAG_PARALLEL: runtime.parallel if len(placed) > 1 else "none",
                        names.TAG_EXPERT_PARALLEL: str(sharded).lower()}
    if len(placed) > 1:
        tags[names.TAG_RANK_WORKERS] = ",".join(p[names.TAG_WORKER] for p in placed)
        tags[names.TAG_RANK_NODES] = ",".join(p[names.TAG_NODE] for p in placed)
    return tags


@deferred_interrupts()  # Ray's cancel is taken between steps, never inside a store call
def run_job(job: TrialJob, on_eval=None) -> dict:
    """Train one trial to the end (resuming if its folder holds a checkpoint); returns its TrialResult as a dict.
    In a gang, every rank calls this; rank 0's `on_eval` alone is asked (the group follows its answer)."""
    from runners.training import parallel
    from runners.training.train import run_trial

    runtime, mlflow = _start(job)
    group = parallel.current()
    trial = TrialConfig.model_validate_json(job.trial_json)
    placed = group.gather(where())
    opened = _open(mlflow, job) if group.main else None  # the trial's runs start now
    if opened:
        set_status(mlflow, opened.run_id, names.RUNNING, **group_tags(placed, runtime, trial))
    data = _open_data(trial, job.cache_dir)
    sink, branch_sinks = _sinks(job, opened)
    try:
        result = run_trial(trial, runtime, Path(job.workdir), sink, data=data,
                           branch_sinks=branch_sinks.__getitem__, on_eval=on_eval if group.main else None)
    finally:
        _close([sink, *branch_sinks.values()])
    if opened:
        _record(mlflow, opened, result)
    return dataclasses.asdict(result)


@deferred_interrupts()
def run_pack_job(job: PackJob, on_eval: Callable[[str], Callable[[int, float], bool] | None]) -> list[dict]:
    """Train a pack's members together as one stacked model (runners.training.pack), each resuming from its own
    folder and logging into its own runs, as run_job does for one; returns each member's TrialResult as a dict.
    `on_eval(trial_id)` gives that member's pruning callback."""
    from runners.training.pack import Member, run_pack

    runtime, mlflow = _start(job.members[0])
    trials = [TrialConfig.model_validate_json(m.trial_json) for m in job.members]
    here = group_tags([where()], runtime, trials[0]) | {names.TAG_PACK: " ".join(t.trial_id for t in trials)}  # one process
    runs = [_open(mlflow, m) for m in job.members]  # every member's runs start with the pack
    for r in runs:
        set_status(mlflow, r.run_id, names.RUNNING, **here)
    data = _open_data(trials[0], job.members[0].cache_dir)  # one corpus: it is part of the pack key
    opened = [_sinks(m, r) for m, r in zip(job.members, runs)]
    members = [Member(trial=t, workdir=Path(m.workdir), sink=sink, branch_sinks=branch_sinks.__getitem__,
                      on_eval=on_eval(t.trial_id))
               for t, m, (sink, branch_sinks) in zip(trials, job.members, opened)]
    try:
        results = run_pack(members, runtime, data=data)
    finally:
        _close([s for sink, branch_sinks in opened for s in [sink, *branch_sinks.values()]])
    for r, result in zip(runs, results):
        _record(mlflow, r, result)
    return [dataclasses.asdict(r) for r in results]


def _start(job: TrialJob) -> tuple[Runtime, MlflowClient]:
    """This process, ready for the job: the GPU Ray gave it, its CPU threads, the runtime and a tracking client."""
    import torch

    from runners.training import parallel

    _quiet_mlflow_retries()
    if parallel.current().world == 1:
        select_gpu()  # a gang's ranks were given theirs by Ray Train
    torch.set_num_threads(max(1, int(job.cpus)))
    return Runtime.model_validate_json(job.runtime_json), client(job.tracking_uri)


def _open_data(trial: TrialConfig, cache_dir: str | None):
    from runners.data.store import prepare_data

    data = prepare_data(trial.data, Path(cache_dir) if cache_dir else None)
    if data.content_hash != trial.data.content_hash:
        raise RuntimeError(f"data on this node hashes to {data.content_hash}, the plan had {trial.data.content_hash}: "
                           "every node must see the same corpus")
    return data


def _sinks(job: TrialJob, opened: Opened | None) -> tuple[MlflowSink | NullSink, dict[int, MlflowSink | NullSink]]:
    """The trial's run's sink and one per WSD branch run (NullSinks on a gang's ranks other than 0, which open
    no runs)."""
    if opened is None:
        return NullSink(), {d: NullSink() for d in job.branch_runs}
    return (MlflowSink(opened.run_id, job.tracking_uri),
            {d: MlflowSink(run_id, job.tracking_uri) for d, run_id in opened.branch_run_ids.items()})


def _close(sinks: list[MlflowSink | NullSink]) -> None:
    """Send what the sinks hold, and hand back what training left in this worker."""
    for s in sinks:
        s.close()
    release_gpu()


def _record(mlflow: MlflowClient, opened: Opened, result) -> None:
    """The trial's and its branches' final status and tags in MLflow; the runs end now (their sinks are closed)."""
    finished = {b.tokens for b in result.branches}
    for end, run_id in opened.branch_run_ids.items():
        # A branch that never ran (its trial diverged or was pruned first) shares its trial's fate.
        set_status(mlflow, run_id, names.FINISHED if end in finished else result.status)
    extra = {names.TAG_REPEATS_DATA: str(result.repeats_data).lower(), names.TAG_NUMERICS: result.numerics}
    if result.diverged_at_tokens is not None:
        extra[names.TAG_DIVERGED_STEP] = str(result.diverged_at_tokens)
    if result.error:
        extra[names.TAG_ERROR] = result.error
    set_status(mlflow, opened.run_id, result.status, **extra)

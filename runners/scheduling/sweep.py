"""Running a sweep on Ray: one Ray task per trial or pack of trials, MLflow as the record of what is done.

Why Ray core tasks and not Ray Tune: a trial here is one function that checkpoints itself into its
own folder and logs into its own MLflow run, so what Tune adds (experiment state, trial actors,
restore) would be a second record of progress next to MLflow's, and its restore resumes from the
checkpoint it last recorded, one behind what is on disk. Tasks give what is needed: resource-based
placement and packing (fractional GPUs), retries of a task whose worker died or raised, and
cancellation. A trial that spans several workers is one such task that starts a Ray Train gang
(runners.scheduling.gang, which says why Ray Train there).

Trials that differ only in lr, seed or optimiser knobs are packed (runtime.pack 'auto'; sweeps/packs.py,
resources.tasks): one task trains them as one stacked model. Every member keeps its own MLflow run (planned
here and opened when the pack starts, as a lone trial's when it starts), checkpoint folder and status; a member
already done is left out of its pack.
A gang is never packed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import ray

from runners.tracking import names
from runners.tracking.interrupts import check_interrupt, deferred_interrupts
from runners.tracking.labels import branch_run_name, trial_run_name
from runners.scheduling.progress import Board, SweepProgress
from runners.scheduling.gang import Gang, run_gang
from runners.scheduling import resources
from runners.scheduling.resources import gang_size, ray_options
from runners.scheduling.search import GridSource, Pruning, SearchSource, pruning_callback
from runners.tracking.runs import RunRequest, SweepRuns, find_run, flatten, open_run, set_status
from runners.scheduling.worker import NOSET_CUDA, PackJob, TrialJob, open_runs, run_job, run_pack_job
from runners.training.step import peak_of
from sweeps.errors import SpecError
from sweeps.expand import PlannedTrial
from sweeps.spec import SweepSpec
from sweeps.trial import Resources


@dataclass
class SweepOutcome:
    statuses: dict[str, str] = field(default_factory=dict)  # trial id -> status
    errors: dict[str, str] = field(default_factory=dict)    # trial id -> one-line error
    skipped: int = 0                                        # already done in MLflow
    interrupted: bool = False


def trial_params(p: PlannedTrial) -> dict[str, str]:
    """The run's params: the resolved trial config plus the counts a fit needs."""
    return flatten("", p.trial.model_dump(mode="json")) | {
        names.PARAM_TRIAL_ID: p.trial_id,
        names.PARAM_N_TOTAL: str(p.params.total), names.PARAM_N_NONEMBED: str(p.params.nonembed),
        names.PARAM_N_ACTIVE: str(p.params.active), names.PARAM_N_EMBED: str(p.params.embed),
        names.PARAM_E: str(p.trial.model.n_experts), names.PARAM_D: str(p.D),
        names.PARAM_FLOPS_6N: f"{p.flops_6N:.6g}", names.PARAM_FLOPS_EXACT: f"{p.flops_exact:.6g}",
        names.PARAM_FLOPS_PER_TOKEN_EXACT: f"{p.flops.train_exact:.6g}",
        names.PARAM_DATA_HASH: p.trial.data.content_hash,
    }


def branch_id(trial_id: str, end: int) -> str:
    return f"{trial_id}-b{end}"


def requests(runs: SweepRuns, p: PlannedTrial) -> tuple[RunRequest, dict[int, RunRequest]]:
    """The trial's run and its branches' runs as the worker will open them when it starts the trial (nothing is
    written now: a run's start time is when its trial starts, not when the sweep queues it)."""
    params = trial_params(p)
    run = runs.request(p.trial_id, params, run_name=trial_run_name(p))
    branches = {
        end: runs.request(branch_id(p.trial_id, end), params | {names.PARAM_D: str(end)}, role=names.ROLE_BRANCH,
                          tags={names.TAG_PARENT_TRIAL: p.trial_id}, run_name=branch_run_name(p, end))
        for end in p.trial.train.schedule.branches
    }
    return run, branches


def register(runs: SweepRuns, p: PlannedTrial) -> tuple[str, dict[int, str]]:
    """Open (create, or find) the trial's run and its branches' runs now: (run id, {branch end: run id})."""
    run, branches = requests(runs, p)
    return open_runs(runs.client, run, branches)


def trial_job(spec: SweepSpec, runs: SweepRuns, p: PlannedTrial, cache_dir: Path | None) -> TrialJob:
    """What a worker needs to train `p`, with the runs it opens when it starts (nothing is written to MLflow now)."""
    run, branches = requests(runs, p)
    return TrialJob(
        trial_json=p.trial.model_dump_json(), runtime_json=spec.runtime.model_dump_json(), run=run,
        branch_runs=branches, tracking_uri=runs.uri,
        workdir=str((spec.checkpoint_dir / spec.name / p.trial_id).resolve()),
        cache_dir=str(cache_dir) if cache_dir else None, cpus=spec.resources.cpus,
    )


def connect(address: str | None) -> bool:
    """Join the cluster at `address` (or RAY_ADDRESS), else start a local Ray on loopback. True if we started it."""
    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        _init(address=address or None)
        return False
    os.environ.setdefault(NOSET_CUDA, "1")  # inherited by the Ray we start: workers may be kept across trials
    _init(include_dashboard=False, _node_ip_address="127.0.0.1")
    return True


def _init(**options) -> None:
    """ray.init, quiet unless asked (runners.cli sets SCALING_RAY_LOG_LEVEL), keeping the driver's SIGTERM
    handler: Ray's own aborts the driver, leaving its trials running and the Ray it started behind."""
    term = signal.getsignal(signal.SIGTERM)
    level = logging.getLevelName(os.environ.get("SCALING_RAY_LOG_LEVEL", "INFO"))
    ray.init(log_to_driver=False, logging_level=level, **options)
    if callable(term) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, term)


def reuses_workers(cluster_has_gpus: bool) -> bool:
    """Whether a worker may run trial after trial (no new process, imports or CUDA context each time).

    Safe on CPU. On GPUs only where Ray leaves CUDA_VISIBLE_DEVICES alone (NOSET_CUDA, set for the local Ray
    and to be set on every node of a cluster and in the driver): a worker kept for the next trial may be
    given another GPU, which it can switch to only if it sees them all (runners.scheduling.worker.select_gpu).
    Elsewhere each GPU trial gets a fresh worker, as Ray does by default."""
    return not cluster_has_gpus or os.environ.get(NOSET_CUDA) == "1"


def gpu_memory_bytes(declared_gb: float | None) -> int | None:
    """Memory of one of the cluster's GPUs (None without GPUs): declared, or asked of a GPU worker."""
    if not ray.cluster_resources().get("GPU"):
        return None
    if declared_gb:
        return int(declared_gb * 2**30)

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return ray.get(probe.remote(), timeout=300)


def gpu_peak_flops(resources: Resources) -> float | None:
    """One cluster GPU's dense bf16 peak in FLOP/s, where the time target needs it (gpus 'auto' with max_hours):
    declared (peak_tflops), or from the name a GPU worker reports. Call only on a cluster with GPUs."""
    if resources.gpus != "auto" or not resources.max_hours:
        return None
    if resources.peak_tflops:
        return resources.peak_tflops * 1e12

    @ray.remote(num_gpus=1, num_cpus=0)
    def probe() -> str:
        import torch

        return torch.cuda.get_device_name(0)

    name = ray.get(probe.remote(), timeout=300)
    peak = peak_of(name)
    if peak is None:
        raise SpecError(f"resources.max_hours: no bf16 peak known for the cluster's GPU {name!r} "
                        "(runners.training.step.PEAK_BF16_FLOPS); set resources.peak_tflops")
    return peak


def run_trials(spec: SweepSpec, source: GridSource | SearchSource, runs: SweepRuns, *,
               cache_dir: Path | None) -> SweepOutcome:
    """Run every trial the source offers that is not done yet; returns what happened to each. Ctrl-C cancels cleanly."""
    outcome = SweepOutcome()
    existing = runs.runs(names.ROLE_TRIAL)
    gpu_mem = gpu_memory_bytes(spec.resources.gpu_memory_gb)
    peak = gpu_peak_flops(spec.resources) if gpu_mem and spec.runtime.device != "cpu" else None
    warned = False
    board = Board.options(num_cpus=0).remote()
    reuse = reuses_workers(gpu_mem is not None)
    task = ray.remote(max_calls=0 if reuse else 1)(_run_on_ray)
    refs: dict = {}
    jobs: dict[str, TrialJob] = {}  # trial id -> its job: the runs the worker opens when it starts
    progress = SweepProgress(total=source.total)

    def job(p: PlannedTrial) -> TrialJob:
        jobs[p.trial_id] = trial_job(spec, runs, p, cache_dir)
        return jobs[p.trial_id]

    def submit() -> None:
        """Offer every trial the source has now, in packs; one already done in MLflow is told back at once."""
        nonlocal warned
        while offered := source.take():
            todo = []
            for p, pruning in offered:
                run = existing.get(p.trial_id)
                status = run.data.tags.get(names.TAG_STATUS) if run else None
                if status in names.DONE:
                    outcome.skipped += 1
                    outcome.statuses[p.trial_id] = status
                    progress.finished(p.trial_id, status, skipped=True)
                    source.done(p, status, run.data.metrics.get(names.VAL_LOSS))
                else:
                    todo.append((p, pruning))
            warning = None if warned else resources.time_target_warning(
                [p for p, _ in todo], spec.resources, spec.runtime, gpu_mem, peak)
            if warning:  # once a sweep: a grid's trials are all offered at once, a search's first of each scale
                progress.console.print(f"[yellow]warning[/]: {warning}")
                warned = True
            tasks = []  # (members with their pruning, Ray options, the gang or None)
            for pack in resources.tasks(todo, lambda item: item[0], spec.resources, spec.runtime, gpu_mem, peak):
                first = pack[0][0]
                workers = gang_size(first, spec.resources, spec.runtime, gpu_mem, peak)
                gang = Gang(workers, use_gpu=gpu_mem is not None and spec.runtime.device != "cpu",
                            max_failures=spec.runtime.max_retries) if workers > 1 else None
                tasks.append((pack, ray_options(first, spec.resources, spec.runtime, gpu_mem, members=len(pack),
                                                peak_flops=peak), gang))
            warm = [options for _, options, gang in tasks if gang is None]  # a gang's workers are Ray Train's
            if warm and not refs and reuse:
                warm_workers(warm, runs.uri)
            for pack, options, gang in tasks:
                members = [p for p, _ in pack]
                packed = [job(p) for p in members]
                name = f"trial-{members[0].trial_id}" + (f"-pack{len(members)}" if len(members) > 1 else "")
                one = packed[0] if len(packed) == 1 else PackJob(tuple(packed))
                pruning = {p.trial_id: pr for p, pr in pack if pr is not None}
                refs[task.options(name=name, **options).remote(one, board, {p.trial_id: p.D for p in members},
                                                               pruning, gang)] = members
                for p in members:
                    progress.submitted(p.trial_id, p.compute_exact)

    try:
        with deferred_interrupts(), progress:
            submit()
            pending = list(refs)
            while pending:
                check_interrupt()  # Ctrl-C, taken between polls (runners.tracking.interrupts says why)
                ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                progress.update(ray.get(board.snapshot.remote()))
                for ref in ready:
                    members = refs[ref]
                    try:
                        ended = [(r["status"], r["final_val_loss"]) for r in ray.get(ref)]
                    except Exception as e:  # retries are spent (a RayError, or what the task raised): record and go on
                        ended = [(names.FAILED, None)] * len(members)
                        for p in members:
                            outcome.errors[p.trial_id] = _one_line(e)
                            _mark(runs, jobs[p.trial_id], names.FAILED, **{names.TAG_ERROR: outcome.errors[p.trial_id]})
                    for p, (status, loss) in zip(members, ended):
                        outcome.statuses[p.trial_id] = status
                        progress.finished(p.trial_id, status)
                        source.done(p, status, loss)
                n_before = len(refs)
                submit()
                pending += list(refs)[n_before:]
    except KeyboardInterrupt:
        outcome.interrupted = True
        with deferred_interrupts():  # a second Ctrl-C waits until the trials are marked killed
            _stop(refs, board, jobs, runs, outcome)
    return outcome


def warm_workers(tasks: list[dict], tracking_uri: str) -> list:
    """Start the workers the first trials will run in, and import torch, the trainer and MLflow's store in
    them while the driver registers those trials, so that each trial starts training seconds sooner.

    `tasks` holds each first task's Ray options. One warm-up per task that can run at once, with the first
    task's CPUs and a sliver of a GPU when it takes a share (Ray keeps workers that held a GPU for GPU tasks);
    the tasks then take these workers, since they are kept (reuses_workers). Fire and forget (the refs are
    returned for tests): a warm-up that fails costs nothing."""
    options = tasks[0]
    cpus, gpus = options["num_cpus"], options["num_gpus"]
    room = ray.cluster_resources()
    at_once = room.get("CPU", 1) // cpus if cpus else len(tasks)
    if gpus:
        at_once = min(at_once, room.get("GPU", 0) // gpus)
    warm = ray.remote(max_calls=0)(_warm).options(num_cpus=cpus, num_gpus=min(gpus, 1e-4), name="warm-worker")
    return [warm.remote(tracking_uri) for _ in range(int(min(len(tasks), at_once)))]


def _warm(tracking_uri: str) -> int:
    import runners.training.train  # noqa: F401  (torch and the model code)
    from runners.tracking.runs import client

    client(tracking_uri).search_experiments(max_results=1)  # opens the store (for sqlite: its engine)
    return os.getpid()


def _run_on_ray(job: TrialJob | PackJob, board, tokens_total: dict[str, int], pruning: dict[str, Pruning],
                gang: Gang | None) -> list[dict]:
    """The task: a trial, a pack of them, or a gang's trial, reporting progress to the board and each evaluation
    to its study."""

    def on_eval(trial_id: str):
        board.started.remote(trial_id)
        should_prune = pruning_callback(pruning[trial_id]) if trial_id in pruning else None

        def report(tokens: int, val_loss: float) -> bool:
            board.evaluated.remote(trial_id, tokens / tokens_total[trial_id])
            return should_prune(tokens, val_loss) if should_prune else False

        return report

    if isinstance(job, PackJob):
        return run_pack_job(job, on_eval)
    report = on_eval(Path(job.workdir).name)
    return [run_gang(job, gang, on_eval=report) if gang else run_job(job, on_eval=report)]


def _stop(refs: dict, board, jobs: dict[str, TrialJob], runs: SweepRuns, outcome: SweepOutcome) -> None:
    """Cancel every trial (a running one checkpoints and stops) and mark the running ones killed."""
    running = set(ray.get(board.snapshot.remote())["running"]) - set(outcome.statuses)
    for ref in refs:
        ray.cancel(ref)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and ray.wait(list(refs), num_returns=len(refs), timeout=1.0)[1]:
        pass
    for trial_id in running:
        outcome.statuses[trial_id] = names.KILLED
        _mark(runs, jobs[trial_id], names.KILLED)


def _mark(runs: SweepRuns, job: TrialJob, status: str, **tags: str) -> None:
    """A trial that failed or was killed: its run (opened now if no attempt got as far as opening it) and the
    branch runs its worker opened and did not finish."""
    set_status(runs.client, open_run(runs.client, job.run), status, **tags)
    for branch in job.branch_runs.values():
        run_id = find_run(runs.client, branch.experiment_id, branch.role, branch.trial_id)
        if run_id and runs.client.get_run(run_id).data.tags.get(names.TAG_STATUS) not in names.DONE:
            set_status(runs.client, run_id, status)


def _one_line(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    text = f"{type(cause).__name__}: {cause}".strip().splitlines()
    return (text[-1] if text else type(cause).__name__)[:500]

"""MLflow: where the sweep's runs live, and the sink trials log their curves through.

The driver creates the experiment and the sweep's parent run before any worker starts (so workers never race
to create the store's schema or the experiment), and hands each trial a RunRequest: what its run is called,
tagged and given as params. The worker opens the run when it starts training the trial (`open_run`: found by
its trial id, created the first time), so the run's start time is the trial's own start, not the time it was
registered and then waited in Ray's queue (MLflow cannot move a run's start time once it exists: UpdateRun
takes a status, an end time and a name). Ray retries an attempt only after the previous one ended, so finding
the run by its tags gives one run per trial however often it is retried, resumed or re-run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote
from typing import TypeVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from runners.tracking import names

BATCH = 1000  # MLflow's limit of metrics per log_batch request
PARAMS_PER_REQUEST = 100
log = logging.getLogger(__name__)
T = TypeVar("T")


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a sqlite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str | None = None) -> MlflowClient:
    return MlflowClient(tracking_uri=uri or tracking_uri())


def flatten(prefix: str, value) -> dict[str, str]:
    """A nested config as MLflow params: {"model.d_model": "64", ...}."""
    if isinstance(value, Mapping):
        out: dict[str, str] = {}
        for k, v in value.items():
            out |= flatten(f"{prefix}.{k}" if prefix else str(k), v)
        return out
    return {prefix: str(value)}


class SweepRuns:
    """The experiment of one sweep and its runs, looked up by tag so re-runs find them again.

    The experiment is marked as one of training runs (MLflow 3 otherwise opens it as a GenAI traces page) and
    carries the spec's description; the parent run is RUNNING while `scaling run` runs and ends with it."""

    def __init__(self, sweep: str, uri: str | None = None, description: str | None = None):
        self.uri = uri or tracking_uri()
        self.client = client(self.uri)
        self.sweep = sweep
        experiment = self.client.get_experiment_by_name(sweep)
        self.experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(sweep)
        if not experiment or experiment.tags.get(names.EXPERIMENT_KIND) != names.KIND_TRAINING:
            self.client.set_experiment_tag(self.experiment_id, names.EXPERIMENT_KIND, names.KIND_TRAINING)
        if description and (not experiment or experiment.tags.get(names.NOTE) != description):
            self.client.set_experiment_tag(self.experiment_id, names.NOTE, description)
        self.parent_id = self._find_or_create(names.ROLE_SWEEP, sweep, run_name=f"sweep {sweep}",
                                              tags={names.NOTE: description} if description else {})

    def sweep_started(self) -> None:
        """The parent run is RUNNING again (a re-run sweep reopens it)."""
        when_available(lambda: self.client.update_run(self.parent_id, status=RunStatus.to_string(RunStatus.RUNNING)))

    def sweep_ended(self, status: str) -> None:
        """End the parent run FINISHED, FAILED or KILLED (names.FINISHED, FAILED, KILLED)."""
        mlflow_status = {names.FINISHED: RunStatus.FINISHED, names.FAILED: RunStatus.FAILED,
                         names.KILLED: RunStatus.KILLED}[status]
        when_available(lambda: self.client.set_terminated(self.parent_id, status=RunStatus.to_string(mlflow_status)))

    def log_summary(self, doc: dict) -> None:
        """The fitted law on the parent run (runners.tracking.summary), replacing an earlier export's."""
        from runners.tracking.summary import law_summary

        metrics, tags = law_summary(doc)
        now = int(time.time() * 1000)
        when_available(lambda: self.client.log_batch(
            self.parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in tags.items()]))

    def runs(self, role: str | None = None) -> dict[str, object]:
        """trial id -> Run for every trial (or branch) run of the sweep."""
        query = f"tags.`{names.TAG_SWEEP}` = '{self.sweep}'"
        if role:
            query += f" and tags.`{names.TAG_ROLE}` = '{role}'"
        found = self.client.search_runs([self.experiment_id], query, max_results=50000)
        return {r.data.tags[names.TAG_TRIAL_ID]: r for r in found if names.TAG_TRIAL_ID in r.data.tags}

    def trials_url(self, base_url: str) -> str:
        """The UI's runs page of this sweep, showing all its trial runs (see trials_filter)."""
        return runs_url(base_url, self.experiment_id, trials_filter(self.sweep))

    def _find_or_create(self, role: str, trial_id: str, run_name: str, tags: dict[str, str]) -> str:
        """The sweep's parent run (created by the driver when the sweep first runs)."""
        found = find_run(self.client, self.experiment_id, role, trial_id)
        if found:
            return found
        base = {names.TAG_ROLE: role, names.TAG_SWEEP: self.sweep, names.TAG_TRIAL_ID: trial_id,
                "mlflow.runName": run_name}
        return self.client.create_run(self.experiment_id, tags=base | tags, run_name=run_name).info.run_id

    def request(self, trial_id: str, params: dict[str, str], *, role: str = names.ROLE_TRIAL,
                tags: dict[str, str] | None = None, run_name: str | None = None) -> RunRequest:
        """What a trial's (or branch's) run will be; nothing is written until it is opened (open_run)."""
        return RunRequest(self.experiment_id, self.sweep, role, trial_id, run_name or trial_id, params, tags or {})

    def trial_run(self, trial_id: str, params: dict[str, str], *, role: str = names.ROLE_TRIAL,
                  tags: dict[str, str] | None = None, run_name: str | None = None) -> str:
        """The run of a trial (or branch), opened now: created with its params the first time (see open_run)."""
        return open_run(self.client, self.request(trial_id, params, role=role, tags=tags, run_name=run_name))


@dataclass(frozen=True)
class RunRequest:
    """A trial's (or branch's) run as the driver plans it and a worker opens it (plain data: it crosses processes)."""

    experiment_id: str
    sweep: str
    role: str  # names.ROLE_TRIAL or names.ROLE_BRANCH
    trial_id: str
    run_name: str
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def find_run(mlflow_client: MlflowClient, experiment_id: str, role: str, trial_id: str) -> str | None:
    query = f"tags.`{names.TAG_ROLE}` = '{role}' and tags.`{names.TAG_TRIAL_ID}` = '{trial_id}'"
    found = mlflow_client.search_runs([experiment_id], query, max_results=1)
    return found[0].info.run_id if found else None


def open_run(mlflow_client: MlflowClient, request: RunRequest, parent_run_id: str | None = None) -> str:
    """The requested run, found by its trial id, or created now, so its start time is now: the worker calls this
    when it starts training the trial (a resumed or retried trial finds its run again). Params not yet logged are
    logged; nothing logged before is logged again. `parent_run_id` nests the run under another in the UI (a WSD
    branch under its trial). Safe to repeat, so a busy store is tried again.

    Trial runs are not nested under the sweep's parent run: a sweep is an experiment of its own, so nesting would
    add nothing but hide every trial inside the parent's collapsed row (MLflow 3 opens nested runs collapsed, and
    its charts show only the rows in view), while a researcher browsing a sweep wants its trials side by side."""
    return when_available(lambda: _open_run(mlflow_client, request, parent_run_id))


def _open_run(mlflow_client: MlflowClient, request: RunRequest, parent_run_id: str | None) -> str:
    run_id = find_run(mlflow_client, request.experiment_id, request.role, request.trial_id)
    if run_id is None:
        tags = {names.TAG_ROLE: request.role, names.TAG_SWEEP: request.sweep, names.TAG_TRIAL_ID: request.trial_id,
                names.TAG_STATUS: names.RUNNING, "mlflow.runName": request.run_name} | request.tags
        if parent_run_id:
            tags[names.PARENT_RUN] = parent_run_id
        run_id = mlflow_client.create_run(request.experiment_id, start_time=int(time.time() * 1000), tags=tags,
                                          run_name=request.run_name).info.run_id
    logged = mlflow_client.get_run(run_id).data.params
    todo = [Param(k, v[:6000]) for k, v in request.params.items() if k not in logged]
    for i in range(0, len(todo), PARAMS_PER_REQUEST):
        mlflow_client.log_batch(run_id, params=todo[i:i + PARAMS_PER_REQUEST])
    return run_id


def trials_filter(sweep: str) -> str:
    """The search filter of a sweep's trial runs, as the UI's search box and MlflowClient.search_runs read it.
    It leaves out the sweep's parent run and the WSD branch runs (nested under their trials)."""
    return f"tags.`{names.TAG_SWEEP}` = '{sweep}' and tags.`{names.TAG_ROLE}` = '{names.ROLE_TRIAL}'"


def runs_url(base_url: str, experiment_id: str, search_filter: str) -> str:
    """The MLflow UI's runs page of an experiment, filtered (the UI reads `searchFilter` from the page's URL)."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs?searchFilter={quote(search_filter, safe='')}"


def runs_url_base(host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where `scaling ui` serves the UI."""
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def ui_base_url(uri: str) -> str:
    """Where the UI of store `uri` is: the tracking server itself, else where `scaling ui` serves it by default."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else runs_url_base()


def sweep_links(mlflow_client: MlflowClient, base_url: str) -> list[tuple[str, str]]:
    """(sweep, its trials_url) for every sweep in the store, by name."""
    experiments = {e.experiment_id: e for e in mlflow_client.search_experiments(max_results=1000)}
    if not experiments:
        return []
    parents = mlflow_client.search_runs(list(experiments), f"tags.`{names.TAG_ROLE}` = '{names.ROLE_SWEEP}'",
                                        max_results=1000)
    sweeps = {r.data.tags[names.TAG_SWEEP]: r.info.experiment_id for r in parents if names.TAG_SWEEP in r.data.tags}
    return [(s, runs_url(base_url, e, trials_filter(s))) for s, e in sorted(sweeps.items())]


def set_status(mlflow_client: MlflowClient, run_id: str, status: str, **tags: str) -> None:
    """Our status tag, plus MLflow's own run status so the UI shows the same thing.

    A busy store is tried again (see `when_available`): a lost status would show a finished trial as
    unfinished, or stop a Ctrl-C from marking the trials it killed."""
    when_available(lambda: _set_status(mlflow_client, run_id, status, **tags))


def _set_status(mlflow_client: MlflowClient, run_id: str, status: str, **tags: str) -> None:
    mlflow_client.log_batch(run_id, tags=[RunTag(names.TAG_STATUS, status)] + [RunTag(k, str(v)) for k, v in tags.items()])
    mlflow_status = {
        names.PENDING: RunStatus.SCHEDULED, names.RUNNING: RunStatus.RUNNING, names.FINISHED: RunStatus.FINISHED,
        names.DIVERGED: RunStatus.FINISHED, names.PRUNED: RunStatus.FINISHED, names.FAILED: RunStatus.FAILED,
        names.KILLED: RunStatus.KILLED,
    }[status]
    if status in (names.PENDING, names.RUNNING):
        mlflow_client.update_run(run_id, status=RunStatus.to_string(mlflow_status))
    else:
        mlflow_client.set_terminated(run_id, status=RunStatus.to_string(mlflow_status))


class _LockedSqliteInOneLine(logging.Filter):
    """MLflow logs each locked-sqlite error with its traceback before raising it; the error still reaches
    the caller (and when_available says in one line that it waits), so the traceback is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "database is locked" not in record.getMessage()


logging.getLogger("mlflow.store.db.utils").addFilter(_LockedSqliteInOneLine())


# A tracking server whose database connections are all taken answers 400 with SQLAlchemy's pool timeout.
BUSY_SERVER = "QueuePool limit"


def when_available(write: Callable[[], T], patience_s: float = 300.0) -> T:
    """`write()`, tried again while the store answers that it is busy: a sqlite file locked by other
    writers past MLflow's 20 s busy timeout (every trial of a sweep writes to it), or a server under load
    (TEMPORARILY_UNAVAILABLE, or its database connection pool exhausted)."""
    deadline = time.monotonic() + patience_s
    delay = 1.0
    while True:
        try:
            return write()
        except MlflowException as e:
            busy = e.error_code == "TEMPORARILY_UNAVAILABLE" or BUSY_SERVER in e.message
            if not busy or time.monotonic() > deadline:
                raise
            log.warning("tracking store busy (%s); trying again in %.0f s", e.message.partition("\n")[0], delay)
        time.sleep(delay)
        delay = min(delay * 2, 15.0)


class MlflowSink:
    """A trial's metrics, buffered and sent in batches from a background thread.

    Training never waits on the tracking server: if it is unreachable, points stay in the buffer
    and go out when it answers again. On a resumed trial, points at or before the last step already
    in MLflow for a metric are dropped, so every point is stored once.
    """

    def __init__(self, run_id: str, uri: str, *, every_s: float = 5.0):
        self.run_id = run_id
        self.client = client(uri)
        self.every_s = every_s
        self._buffer: list[Metric] = []
        self._lock = threading.Lock()
        self._sent_through = when_available(self._last_steps)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"mlflow-sink-{run_id[:8]}")
        self._thread.start()

    def _last_steps(self) -> dict[str, int]:
        keys = self.client.get_run(self.run_id).data.metrics
        return {k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys}

    def log(self, metrics: Mapping[str, float], tokens: int) -> None:
        now = int(time.time() * 1000)
        fresh = [Metric(k, float(v), now, int(tokens)) for k, v in metrics.items()
                 if v is not None and tokens > self._sent_through.get(k, -1)]
        with self._lock:
            self._buffer += fresh

    def _send(self) -> bool:
        """Send what is buffered; keep it on failure. True when the buffer is empty."""
        with self._lock:
            pending, self._buffer = self._buffer, []
        while pending:
            chunk = pending[:BATCH]
            try:
                self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
            except Exception:
                with self._lock:
                    self._buffer = pending + self._buffer
                return False
            for m in chunk:
                self._sent_through[m.key] = max(self._sent_through.get(m.key, -1), m.step)
            pending = pending[BATCH:]
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._send()

    def flush(self, timeout_s: float = 600.0) -> bool:
        """Send everything now, retrying until `timeout_s`; True when nothing is left behind."""
        deadline = time.monotonic() + timeout_s
        delay = 0.5
        while not self._send():
            if time.monotonic() > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 15.0)
        return True

    def close(self, timeout_s: float = 600.0) -> bool:
        self._stop.set()
        self._thread.join()
        return self.flush(timeout_s)

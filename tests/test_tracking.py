"""MLflow tracking with real stores: batched sinks, one run per trial, nothing lost or doubled."""

from __future__ import annotations

import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from runners.tracking import names
from runners.tracking.runs import MlflowSink, SweepRuns, client, set_status
from tests.conftest import free_port, start_mlflow_server, stop, wait_until_up


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, key))


def test_runs_are_found_again_not_duplicated(sqlite_uri):
    runs = SweepRuns("s", sqlite_uri)
    first = runs.trial_run("abc", {"x": "1"})
    again = SweepRuns("s", sqlite_uri)
    assert again.parent_id == runs.parent_id
    assert again.trial_run("abc", {"x": "1"}) == first
    assert list(again.runs(names.ROLE_TRIAL)) == ["abc"]
    set_status(again.client, first, names.FINISHED)
    assert again.runs()["abc"].data.tags[names.TAG_STATUS] == names.FINISHED
    assert again.client.get_run(first).info.status == "FINISHED"


def test_writes_wait_out_a_store_locked_past_mlflows_busy_timeout(sqlite_uri, capfd, caplog):
    """Another writer holds the sqlite file for 25 s (MLflow itself gives up after 20 s): a trial's status
    and a new trial's registration, both started meanwhile, still land, and the wait shows as one line each
    time, not as MLflow's traceback."""
    runs = SweepRuns("s", sqlite_uri)
    run_id = runs.trial_run("abc", {})
    holder = sqlite3.connect(sqlite_uri.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(25.0, holder.rollback).start()
    started = time.monotonic()
    with ThreadPoolExecutor() as pool:
        status = pool.submit(set_status, runs.client, run_id, names.KILLED)
        new = pool.submit(runs.trial_run, "new", {"x": "1"})
        status.result()
        new.result()
    assert time.monotonic() - started > 25.0
    found = runs.runs()
    assert found["abc"].data.tags[names.TAG_STATUS] == names.KILLED
    assert found["new"].data.params == {"x": "1"}
    holder.close()
    waits = [r.getMessage() for r in caplog.records if r.name == "runners.tracking.runs"]
    assert len(waits) >= 2 and all(w.startswith("tracking store busy ((sqlite3.OperationalError) database is locked)")
                                   for w in waits)
    assert "database is locked" not in capfd.readouterr().err  # MLflow's own log of it, with its traceback


def test_resumed_sink_stores_each_point_once(sqlite_uri):
    run_id = SweepRuns("s", sqlite_uri).trial_run("t", {})
    sink = MlflowSink(run_id, sqlite_uri, every_s=60)
    for tokens in range(0, 100, 10):
        sink.log({"val/loss": tokens / 100}, tokens)
    assert sink.close()
    # A retried worker replays from its checkpoint at 50 tokens: 50..90 come again, then new points.
    resumed = MlflowSink(run_id, sqlite_uri, every_s=60)
    for tokens in range(50, 150, 10):
        resumed.log({"val/loss": tokens / 100}, tokens)
    assert resumed.close()
    assert history(sqlite_uri, run_id, "val/loss") == [(t, t / 100) for t in range(0, 150, 10)]


@pytest.mark.slow
def test_sink_survives_a_server_outage(tmp_path):
    """Points logged while the server is down reach it once it is up; training never waits."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = tmp_path / "mlflow.db"
    server = start_mlflow_server(store, port)
    wait_until_up(url)
    run_id = SweepRuns("outage", url).trial_run("t", {})
    sink = MlflowSink(run_id, url, every_s=0.2)
    sink.log({"train/loss": 1.0}, 1)
    assert sink.flush(timeout_s=30)
    stop(server)
    for tokens in range(2, 302):
        sink.log({"train/loss": 1.0 / tokens}, tokens)  # returns at once though nothing answers
    server = start_mlflow_server(store, port)
    try:
        wait_until_up(url)
        assert sink.close(timeout_s=120)
        steps = [s for s, _ in history(url, run_id, "train/loss")]
        assert steps == list(range(1, 302))
    finally:
        stop(server)


@pytest.mark.slow
def test_eight_ray_trials_log_16000_points_to_a_server(mlflow_server, local_ray):
    ray = local_ray
    runs = SweepRuns("concurrent", mlflow_server)
    run_ids = [runs.trial_run(f"t{i}", {}) for i in range(8)]

    @ray.remote(num_cpus=0.25)
    def trial(run_id: str) -> None:
        sink = MlflowSink(run_id, mlflow_server, every_s=0.5)
        for step in range(2000):
            sink.log({"train/loss": 1.0 / (step + 1)}, step)
        assert sink.close(timeout_s=300)

    ray.get([trial.remote(r) for r in run_ids])
    counts = [len(history(mlflow_server, r, "train/loss")) for r in run_ids]
    assert counts == [2000] * 8


def test_points_carry_unique_tokens_and_epochs_of_capped_and_whole_split_trials(sqlite_uri, tmp_path):
    """Two planned trials registered as a sweep registers them, one capped at 16,384 unique tokens and one on
    the whole split (which it logged as 0.5 epochs at 20,480 tokens): the points say how much each repeated."""
    from runners.scheduling.sweep import register
    from runners.tracking.collect import collect_points
    from sweeps.expand import expand
    from sweeps.spec import load_spec
    from tests.helpers import tiny_spec

    spec = load_spec(tiny_spec(tmp_path, grid={"sizes": [3000], "tokens": [40_960]}))
    capped_spec = spec.model_copy(update={"data": spec.data.model_copy(update={"unique_tokens": [16_384]})})
    runs = SweepRuns("s", sqlite_uri)
    for planned, epochs in ((expand(capped_spec, vocab_size=257, content_hash="c")[0], 40_960 / 16_384),
                            (expand(spec, vocab_size=257, content_hash="c")[0], 2.0)):
        run_id, _ = register(runs, planned)
        sink = MlflowSink(run_id, sqlite_uri)
        sink.log({names.EPOCHS: epochs / 2}, 20_480)
        sink.log({names.VAL_LOSS: 2.0, names.VAL_BPB: 3.0, names.EPOCHS: epochs}, 40_960)
        assert sink.close()
        set_status(runs.client, run_id, names.FINISHED)
    points = collect_points(runs, spec.fit).set_index("trial_id")
    capped = expand(capped_spec, vocab_size=257, content_hash="c")[0].trial_id
    assert points.loc[capped, "unique_tokens"] == 16_384 and points.loc[capped, "epochs"] == 2.5
    whole = points.drop(index=capped)
    assert whole["unique_tokens"].item() == 20_480 and whole["epochs"].item() == 2.0

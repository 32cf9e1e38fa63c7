"""Ray across nodes and faults survived, with real Ray and real MLflow: packing and spread on a simulated
two-node cluster, a SIGKILLed worker, a SIGKILLed driver, Ctrl-C, and a trial that keeps failing."""

from __future__ import annotations

import os
import re
import signal
from collections import defaultdict

import pandas as pd
import pytest

from runners.tracking import names
from runners.cli import main
from runners.tracking.runs import SweepRuns
from runners.scheduling.worker import NOSET_CUDA
from tests.helpers import metric_steps, start_driver, tiny_spec, trial_runs, wait_for

pytestmark = pytest.mark.slow

LONG = {"sizes": [3000, 12000], "tokens": [200_000, 300_000]}  # trials of several seconds each


def every_point_once(runs: SweepRuns, run_id: str) -> list[int]:
    steps = metric_steps(runs, run_id, names.TRAIN_LOSS)
    assert len(steps) == len(set(steps)), "a point was logged twice"
    return steps


def running_with_checkpoint(sweep: str, uri: str, ckpt_root) -> object | None:
    for trial_id, run in trial_runs(sweep, uri).items():
        folder = ckpt_root / sweep / trial_id
        if run.data.tags.get(names.TAG_STATUS) == names.RUNNING and folder.is_dir() and any(folder.iterdir()):
            return run
    return None


def test_two_nodes_pack_by_share_and_spread(tmp_path, sqlite_uri, monkeypatch):
    """Two nodes with one (declared) GPU each, trials at half a GPU: at most two on a GPU at once, both nodes used.
    The cluster sets CUDA_VISIBLE_DEVICES per task (no NOSET_CUDA), so every GPU trial gets a fresh worker."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test brings its own cluster
    monkeypatch.delenv(NOSET_CUDA, raising=False)  # a local Ray started by an earlier test set it in this process
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 3, "num_gpus": 1})
    cluster.add_node(num_cpus=3, num_gpus=1)
    try:
        spec = tiny_spec(tmp_path, name="twonode", grid={"sizes": [3000, 6000], "tokens": [40_000, 60_000, 80_000, 100_000]},
                         resources={"cpus": 0.5, "gpus": 0.5, "gpu_memory_gb": 1})
        assert main(["run", str(spec), "--address", cluster.address, "--no-fit"]) == 0
        runs = SweepRuns("twonode", sqlite_uri)
        trials = runs.runs(names.ROLE_TRIAL)
        assert len(trials) == 8 and {r.data.tags[names.TAG_STATUS] for r in trials.values()} == {names.FINISHED}
        assert len({r.data.tags[names.TAG_NODE] for r in trials.values()}) == 2
        assert len({r.data.tags[names.TAG_WORKER] for r in trials.values()}) == 8
        # When each trial held its GPU: first to last logged point. Never more than 1/share trials on one GPU.
        spans = defaultdict(list)
        for r in trials.values():
            stamps = [m.timestamp for m in runs.client.get_metric_history(r.info.run_id, names.TRAIN_LOSS)]
            assert r.data.tags[names.TAG_GPUS] != ""
            spans[(r.data.tags[names.TAG_NODE], r.data.tags[names.TAG_GPUS])].append((min(stamps), max(stamps)))
        for gpu, intervals in spans.items():
            for start, _ in intervals:
                assert sum(s <= start <= e for s, e in intervals) <= 2, f"more than two trials at once on {gpu}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_sigkilled_worker_resumes_into_the_same_run(tmp_path, sqlite_uri):
    spec = tiny_spec(tmp_path, name="killworker", grid=LONG)
    driver = start_driver(spec, sqlite_uri, "--no-fit")
    try:
        victim = wait_for(lambda: running_with_checkpoint("killworker", sqlite_uri, tmp_path / "ckpt"), 300)
        pid = int(victim.data.tags[names.TAG_WORKER].rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        out, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, out
    runs = SweepRuns("killworker", sqlite_uri)
    trials = runs.runs(names.ROLE_TRIAL)
    assert len(trials) == 4 and {r.data.tags[names.TAG_STATUS] for r in trials.values()} == {names.FINISHED}
    resumed = trials[victim.data.tags[names.TAG_TRIAL_ID]]
    assert resumed.info.run_id == victim.info.run_id  # one run, not two
    assert resumed.data.tags[names.TAG_WORKER] != victim.data.tags[names.TAG_WORKER]  # a new process finished it
    steps = every_point_once(runs, resumed.info.run_id)
    assert steps[-1] == int(resumed.data.params[names.PARAM_D])  # the curve goes on to the end


def test_sigkilled_driver_rerun_trains_only_what_is_left(tmp_path, sqlite_uri):
    spec = tiny_spec(tmp_path, name="killdriver", grid=LONG)
    driver = start_driver(spec, sqlite_uri, "--no-fit")

    def one_done_one_running():
        statuses = [r.data.tags.get(names.TAG_STATUS) for r in trial_runs("killdriver", sqlite_uri).values()]
        return names.FINISHED in statuses and running_with_checkpoint("killdriver", sqlite_uri, tmp_path / "ckpt")

    try:
        wait_for(one_done_one_running, 300)
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
        driver.wait(timeout=60)
    finally:
        driver.kill()
    finished_before = {t: r.info.run_id for t, r in trial_runs("killdriver", sqlite_uri).items()
                       if r.data.tags[names.TAG_STATUS] == names.FINISHED}
    assert len(finished_before) < 4
    runs = SweepRuns("killdriver", sqlite_uri)
    steps_before = {t: metric_steps(runs, run_id, names.TRAIN_LOSS) for t, run_id in finished_before.items()}

    rerun = start_driver(spec, sqlite_uri)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    skipped = re.search(r"(\d+) already done", out)
    assert skipped and int(skipped.group(1)) >= len(finished_before)
    trials = runs.runs(names.ROLE_TRIAL)
    assert len(trials) == 4 and {r.data.tags[names.TAG_STATUS] for r in trials.values()} == {names.FINISHED}
    for t, steps in steps_before.items():
        assert metric_steps(runs, trials[t].info.run_id, names.TRAIN_LOSS) == steps  # not trained again
    for r in trials.values():
        every_point_once(runs, r.info.run_id)
    points = pd.read_csv(tmp_path / "results" / "killdriver" / "points.csv")
    assert not points.duplicated(["trial_id", "tokens"]).any() and points.final.sum() == 4


def test_ctrl_c_marks_running_trials_killed_and_rerun_finishes(tmp_path, sqlite_uri):
    spec = tiny_spec(tmp_path, name="ctrlc", grid=LONG)
    driver = start_driver(spec, sqlite_uri, "--no-fit")
    try:
        wait_for(lambda: running_with_checkpoint("ctrlc", sqlite_uri, tmp_path / "ckpt"), 300)
        driver.send_signal(signal.SIGINT)
        out, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 130, out
    statuses = [r.data.tags.get(names.TAG_STATUS) for r in trial_runs("ctrlc", sqlite_uri).values()]
    assert names.KILLED in statuses and names.RUNNING not in statuses
    rerun = start_driver(spec, sqlite_uri, "--no-fit")
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert {r.data.tags[names.TAG_STATUS] for r in trial_runs("ctrlc", sqlite_uri).values()} == {names.FINISHED}


def test_a_trial_that_keeps_failing_is_recorded_and_the_sweep_goes_on(tmp_path, sqlite_uri, local_ray):
    spec = tiny_spec(tmp_path, name="failing", runtime={"max_retries": 1, "checkpoint_every_s": 0.5})
    plan = tmp_path / "plan.csv"
    main(["plan", str(spec), "--format", "csv", "--out", str(plan)])
    doomed = pd.read_csv(plan).trial_id.iloc[0]
    blocker = tmp_path / "ckpt" / "failing" / doomed
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the trial's checkpoint folder must go")
    assert main(["run", str(spec), "--no-fit"]) == 1
    trials = trial_runs("failing", sqlite_uri)
    assert trials[doomed].data.tags[names.TAG_STATUS] == names.FAILED
    assert trials[doomed].data.tags[names.TAG_ERROR]
    assert {r.data.tags[names.TAG_STATUS] for t, r in trials.items() if t != doomed} == {names.FINISHED}

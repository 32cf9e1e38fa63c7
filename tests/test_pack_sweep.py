"""Packs end to end, real Ray and MLflow on the CPU: a packed sweep gives every member the numbers of its unpacked
twin, in its own MLflow runs; a re-run packs only what is not done, and a diverging member stops alone; a killed pack
resumes every member to the uninterrupted numbers."""

from __future__ import annotations

import os
import signal

import pandas as pd
import pytest

from runners.cli import main
from runners.tracking import names
from runners.tracking.collect import collect_points
from runners.tracking.runs import SweepRuns
from sweeps.spec import FitSpec
from tests.helpers import metric_steps, start_driver, tiny_spec, wait_for

pytestmark = pytest.mark.slow

# One model size and D, 2 lrs x 2 seeds: one pack of 4 (or 4 tasks, pack off). Long enough (about 200 steps a
# member) for a kill to land mid-run; WSD with a decay branch, so each member forks a branch run of its own.
GRID = {"sizes": [3000], "tokens": [100_000]}
TRAIN = {"lr": [3e-3, 1e-2], "seeds": [0, 1], "branches_per_run": 1}
REL = 1e-5


def sweep(tmp_path, name: str, **overrides):
    return tiny_spec(tmp_path, name=name, grid=GRID, train=TRAIN | overrides.pop("train", {}), **overrides)


def points(name: str, uri: str) -> pd.DataFrame:
    return collect_points(SweepRuns(name, uri), FitSpec()).set_index(["trial_id", "tokens"]).sort_index()


def statuses(runs: SweepRuns, role: str = names.ROLE_TRIAL) -> dict[str, str]:
    return {t: r.data.tags[names.TAG_STATUS] for t, r in runs.runs(role).items()}


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory):
    """The reference: the same four trials, one Ray task each (runtime.pack off), never interrupted."""
    import ray

    tmp = tmp_path_factory.mktemp("unpacked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
        assert main(["run", str(sweep(tmp, "unpacked", runtime={"pack": "off"})), "--no-fit"]) == 0
    runs = SweepRuns("unpacked", uri)
    assert set(statuses(runs).values()) == {names.FINISHED}
    assert not any(names.TAG_PACK in r.data.tags for r in runs.runs(names.ROLE_TRIAL).values())
    return runs, points("unpacked", uri)


def sorted_by_plan(runs: dict) -> list[str]:
    """Trial ids in the order the grid lists them (lr, then seed), as a pack holds its members."""
    return [t for t, _ in sorted(runs.items(), key=lambda tr: (float(tr[1].data.params["train.lr"]),
                                                                int(tr[1].data.params["train.seed"])))]


def assert_same_points(packed: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert list(packed.index) == list(reference.index)  # the same trials and branches, evaluated at the same tokens
    assert (packed.final == reference.final).all()
    for column in ("loss", "bpb"):
        assert packed[column].to_numpy() == pytest.approx(reference[column].to_numpy(), rel=REL)


def test_packed_members_equal_unpacked_twins_and_a_rerun_packs_only_whats_left(tmp_path, sqlite_uri, local_ray, unpacked,
                                                                             capsys):
    reference_runs, reference = unpacked
    spec = sweep(tmp_path, "packed")
    assert main(["run", str(spec), "--no-fit"]) == 0
    runs = SweepRuns("packed", sqlite_uri)
    trials, branches = runs.runs(names.ROLE_TRIAL), runs.runs(names.ROLE_BRANCH)
    assert len(trials) == 4 and set(statuses(runs).values()) == {names.FINISHED}
    assert len(branches) == 4 and set(statuses(runs, names.ROLE_BRANCH).values()) == {names.FINISHED}
    assert {r.data.tags[names.TAG_PACK] for r in trials.values()} == {" ".join(sorted_by_plan(trials))}  # one pack
    assert {(r.data.tags[names.TAG_WORLD], r.data.tags[names.TAG_PARALLEL]) for r in trials.values()} == {("1", "none")}
    twins = reference_runs.runs(names.ROLE_TRIAL)
    for trial_id, run in trials.items():  # each member its own run, with its twin's metric names
        assert set(run.data.metrics) == set(twins[trial_id].data.metrics)
        assert run.info.run_id != twins[trial_id].info.run_id
    assert_same_points(points("packed", sqlite_uri), reference)

    # A wider lr axis, one lr of it far too large: the four done are not trained again; the four new ones train as
    # one pack, in which the two with the huge lr diverge and stop while the other two finish.
    before = {t: metric_steps(runs, r.info.run_id, names.TRAIN_LOSS) for t, r in trials.items()}
    capsys.readouterr()
    wider = sweep(tmp_path, "packed", train={"lr": [3e-3, 1e-2, 2e-2, 1e4]})
    assert main(["run", str(wider), "--no-fit"]) == 0
    assert "(4 already done, not trained again)" in capsys.readouterr().out
    after = runs.runs(names.ROLE_TRIAL)
    assert {t: metric_steps(runs, after[t].info.run_id, names.TRAIN_LOSS) for t in before} == before
    new = {t: r for t, r in after.items() if t not in before}
    assert {r.data.tags[names.TAG_PACK] for r in new.values()} == {" ".join(sorted_by_plan(new))}
    fate = {t: (float(r.data.params["train.lr"]), r.data.tags[names.TAG_STATUS]) for t, r in new.items()}
    assert sorted(fate.values()) == [(2e-2, names.FINISHED)] * 2 + [(1e4, names.DIVERGED)] * 2
    for t, (lr, _) in fate.items():
        if lr == 1e4:
            assert 0 < int(new[t].data.tags[names.TAG_DIVERGED_STEP]) < 100_000
    branch_fate = {r.data.tags[names.TAG_PARENT_TRIAL]: r.data.tags[names.TAG_STATUS]
                   for r in runs.runs(names.ROLE_BRANCH).values() if r.data.tags[names.TAG_PARENT_TRIAL] in new}
    assert branch_fate == {t: status for t, (_, status) in fate.items()}  # a branch shares its diverged trial's fate


def test_a_killed_pack_resumes_every_member_to_the_uninterrupted_numbers(tmp_path, sqlite_uri, local_ray, unpacked):
    _, reference = unpacked
    spec = sweep(tmp_path, "killpack")
    # A driver of its own (so the test can watch and kill), on the test's Ray (no second Ray to start).
    driver = start_driver(spec, sqlite_uri, "--no-fit", "--address", local_ray.get_runtime_context().gcs_address)

    def pack_running_with_checkpoints():
        runs = SweepRuns("killpack", sqlite_uri).runs(names.ROLE_TRIAL)
        folders = [tmp_path / "ckpt" / "killpack" / t for t in runs]
        running = [r for r in runs.values() if r.data.tags.get(names.TAG_STATUS) == names.RUNNING]
        if len(running) == 4 and all(f.is_dir() and any(f.iterdir()) for f in folders):
            return running[0]
        return None

    try:
        victim = wait_for(pack_running_with_checkpoints, 300, every_s=0.2)
        os.kill(int(victim.data.tags[names.TAG_WORKER].rsplit(":", 1)[1]), signal.SIGKILL)
        out, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 0, out
    runs = SweepRuns("killpack", sqlite_uri)
    trials = runs.runs(names.ROLE_TRIAL)
    assert set(statuses(runs).values()) == {names.FINISHED} and len(trials) == 4
    workers = {r.data.tags[names.TAG_WORKER] for r in trials.values()}
    assert len(workers) == 1 and workers != {victim.data.tags[names.TAG_WORKER]}  # a new process finished the pack
    for r in trials.values():
        steps = metric_steps(runs, r.info.run_id, names.TRAIN_LOSS)
        assert len(steps) == len(set(steps)), "a point was logged twice"
    assert_same_points(points("killpack", sqlite_uri), reference)

"""Optuna search per scale on real Ray and MLflow: trials run as Ray tasks, workers report to the
study's sqlite storage, a re-run continues the study, and the law file gets its hparams section."""

from __future__ import annotations

import optuna
import pytest

from runners.tracking import names
from runners.cli import main
from runners.pipeline import plan
from runners.scheduling.search import GridSource, Pruning, pruning_callback, storage_url
from sweeps.spec import load_spec
from tests.helpers import tiny_spec, trial_runs

pytestmark = pytest.mark.slow


def search_spec(tmp_path, trials: int):
    return tiny_spec(tmp_path, name="search", grid={"sizes": [3000], "tokens": [30_000]},
                     train={"lr": 3e-3}, search={"trials": trials, "lr": [1e-3, 3e-2], "parallel": 2, "pruner": "median"})


def studies(spec_path):
    spec = load_spec(spec_path)
    url = storage_url(spec)
    return [optuna.load_study(study_name=s.study_name, storage=url) for s in optuna.get_all_study_summaries(url)]


def test_search_runs_on_ray_and_a_rerun_continues_the_study(tmp_path, sqlite_uri, local_ray):
    spec = search_spec(tmp_path, trials=4)
    assert main(["run", str(spec), "--no-fit"]) == 0
    (study,) = studies(spec)
    trials = study.get_trials()
    assert len(trials) == 4 and {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert all(t.intermediate_values for t in trials)  # the workers reported their validation losses
    runs = trial_runs("search", sqlite_uri)
    assert sorted(float(r.data.params["train.lr"]) for r in runs.values()) == sorted(t.params["lr"] for t in trials)
    pack = {t.number: runs[t.user_attrs["trial_id"]].data.tags[names.TAG_PACK].split() for t in trials}
    ids = {t.number: t.user_attrs["trial_id"] for t in trials}
    assert pack[0] == pack[1] == [ids[0], ids[1]] and pack[2] == pack[3] == [ids[2], ids[3]]  # asked at once: a pack
    for t in trials:  # Optuna's value is the trial's final validation loss in MLflow
        run = runs[t.user_attrs["trial_id"]]
        if t.state.name == "COMPLETE":
            assert run.data.tags[names.TAG_STATUS] == names.FINISHED
            assert t.value == pytest.approx(run.data.metrics[names.VAL_LOSS])
        else:
            assert run.data.tags[names.TAG_STATUS] == names.PRUNED

    assert main(["run", str(spec), "--no-fit"]) == 0  # nothing left to ask
    assert len(studies(spec)[0].get_trials()) == 4 and len(trial_runs("search", sqlite_uri)) == 4

    more = search_spec(tmp_path, trials=6)  # a bigger budget continues the same study
    assert main(["run", str(more)]) == 0
    assert len(studies(more)[0].get_trials()) == 6 and len(trial_runs("search", sqlite_uri)) == 6


@pytest.mark.parametrize("pruner", ["median", "none"])
def test_the_worker_prunes_with_the_specs_pruner_and_not_before_its_first_tokens(tmp_path, pruner):
    """A loaded study forgets its pruner (Optuna's default is a median one): the worker must build the spec's."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(3):  # three finished trials with low losses: what a median pruner needs to start
        done = study.ask()
        for tokens in (100, 500):
            done.report(1.0, step=tokens)
        study.tell(done, 1.0)
    asked = study.ask()
    should_stop = pruning_callback(Pruning(storage, "s", asked._trial_id, pruner, prune_from_tokens=250))
    assert not should_stop(100, 9.0)  # worse than every other trial, but before 250 tokens
    assert should_stop(500, 9.0) == (pruner == "median")


def test_a_grid_offers_its_largest_trials_first(tmp_path):
    """Longest first keeps every GPU busy to the end of a sweep (Ray starts same-shaped tasks in submission order)."""
    spec = load_spec(tiny_spec(tmp_path, grid={"sizes": [2000, 8000, 4000], "tokens": [20_000, 60_000]}))
    offered = [p.compute_exact for p, _ in GridSource(plan(spec)).take()]
    assert len(set(offered)) > 2 and offered == sorted(offered, reverse=True)

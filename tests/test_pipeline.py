"""End to end on one machine, real Ray and MLflow: plan, run, re-run (trains nothing), export, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from mlflow import MlflowClient

from runners.tracking import names
from runners.cli import main
from runners.tracking.runs import SweepRuns
from sweeps.spec import load_spec
from tests.conftest import free_port, stop, wait_until_up
from tests.helpers import metric_steps, tiny_spec
from tests.test_ui import check_sweep_in_mlflow

PLAN_COLUMNS = {"trial_id", "family", "N_total", "N_nonembed", "N_active", "D", "flops_6N", "flops_exact"}


def test_plan_csv_has_one_row_per_trial(tmp_path):
    spec = tiny_spec(tmp_path, train={"lr": [1e-3, 3e-3]})
    out = tmp_path / "plan.csv"
    assert main(["plan", str(spec), "--format", "csv", "--out", str(out)]) == 0
    plan = pd.read_csv(out)
    assert PLAN_COLUMNS <= set(plan.columns)
    assert len(plan) == 2 * 2 * 2  # sizes x tokens x lr
    assert plan.trial_id.is_unique
    assert (plan.N_active == plan.N_nonembed).all() and (plan.N_total > plan.N_nonembed).all()
    assert (plan.flops_exact > plan.flops_6N).all()  # attention and head on top of 6N
    assert (plan.flops_6N == 6 * plan.N_active * plan.D).all()


def test_plan_shows_unique_tokens_and_epochs(tmp_path):
    out = tmp_path / "plan.csv"
    main(["plan", str(tiny_spec(tmp_path, data={"unique_tokens": [16_384, 65_536]})), "--format", "csv", "--out", str(out)])
    plan = pd.read_csv(out)
    assert len(plan) == 2 * 2 * 2 and set(plan.unique_tokens) == {16_384, 65_536}
    assert (plan.epochs == plan.D / plan.unique_tokens).all()
    assert main(["plan", str(tiny_spec(tmp_path, data={"unique_tokens": [16_384]}))]) == 0


def test_plan_ids_are_stable_and_content_addressed(tmp_path):
    first = tmp_path / "a.csv"
    main(["plan", str(tiny_spec(tmp_path)), "--format", "csv", "--out", str(first)])
    again = tmp_path / "b.csv"
    main(["plan", str(tiny_spec(tmp_path, name="renamed")), "--format", "csv", "--out", str(again)])
    assert list(pd.read_csv(first).trial_id) == list(pd.read_csv(again).trial_id)
    other = tmp_path / "c.csv"
    main(["plan", str(tiny_spec(tmp_path, train={"lr": 1e-3})), "--format", "csv", "--out", str(other)])
    assert not set(pd.read_csv(first).trial_id) & set(pd.read_csv(other).trial_id)


def test_spec_typo_is_one_line_and_exit_2(tmp_path):
    spec = tiny_spec(tmp_path)
    spec.write_text(spec.read_text().replace("batch_size:", "batch_sise:"))
    done = subprocess.run([sys.executable, "-m", "runners.cli", "plan", str(spec)], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "unknown key 'train.batch_sise'; did you mean 'batch_size'?" in done.stderr


@pytest.mark.slow
def test_run_twice_trains_once_and_exports_the_same_law(tmp_path, sqlite_uri, local_ray):
    spec = tiny_spec(tmp_path, name="e2e", grid={"sizes": [3000, 6000, 12000], "tokens": [20_000, 60_000]},
                     train={"branches_per_run": 2}, description="end to end")  # 3 sizes (a loss law needs 3), 3 final points a trial
    assert main(["run", str(spec)]) == 0
    runs = SweepRuns("e2e", sqlite_uri)
    trials = runs.runs(names.ROLE_TRIAL)
    assert len(trials) == 6 and {r.data.tags[names.TAG_STATUS] for r in trials.values()} == {names.FINISHED}
    assert {r.data.tags[names.TAG_NUMERICS] for r in trials.values()} == {"fp32, eager"}  # what CPU trials ran with
    results = tmp_path / "results" / "e2e"
    law = json.loads((results / "law.json").read_text())
    points = pd.read_csv(results / "points.csv")
    branches = runs.runs(names.ROLE_BRANCH)
    assert len(branches) == 12 and {r.data.tags[names.TAG_PARENT_TRIAL] for r in branches.values()} == set(trials)
    assert points.final.sum() == 18 and set(points.trial_id) == set(trials) | set(branches)
    assert points.unique_tokens.nunique() == 1 and (points.epochs == points.D / points.unique_tokens).all()
    assert {"A", "B", "E", "alpha", "beta"} <= set(law["params"])
    assert list(results.glob("*.png"))
    assert load_spec(results / "spec.yaml") == load_spec(spec)  # the folder says what produced it

    ui_lists_the_sweep(sqlite_uri, runs.parent_id, n_runs=1 + 6 + 12)

    steps_before = {t: metric_steps(runs, r.info.run_id, names.TRAIN_LOSS) for t, r in trials.items()}
    assert main(["run", str(spec)]) == 0
    trials_after = SweepRuns("e2e", sqlite_uri).runs(names.ROLE_TRIAL)
    assert {t: metric_steps(runs, r.info.run_id, names.TRAIN_LOSS) for t, r in trials_after.items()} == steps_before
    assert json.loads((results / "law.json").read_text())["params"] == law["params"]


@pytest.mark.slow
def test_cuda_asked_on_a_cluster_without_gpus_is_one_line_exit_2(tmp_path, sqlite_uri, local_ray, capsys):
    spec = tiny_spec(tmp_path, name="nocuda", runtime={"device": "cuda"})
    assert main(["run", str(spec)]) == 2
    assert "runtime.device: 'cuda' but the Ray cluster has no GPUs" in capsys.readouterr().err
    runs = SweepRuns("nocuda", sqlite_uri)
    assert runs.client.get_run(runs.parent_id).info.status == "FAILED"  # the sweep's run ends with it


@pytest.mark.slow
def test_a_gpu_share_on_a_machine_without_gpus_is_one_line_exit_2_not_a_wait(tmp_path, sqlite_uri):
    # its own process: the Ray a sweep starts itself can never gain a GPU (a cluster it joins might)
    spec = tiny_spec(tmp_path, name="nogpu", resources={"cpus": 1, "gpus": 0.25})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"MLFLOW_TRACKING_URI": sqlite_uri}
    done = subprocess.run([sys.executable, "-m", "runners.cli", "run", str(spec)], env=env, capture_output=True,
                          text=True, timeout=180)  # before the check, Ray waited for a GPU forever
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: resources.gpus: 0.25 of a GPU a trial, but this machine has no GPU")
    assert "Traceback" not in done.stderr and not SweepRuns("nogpu", sqlite_uri).runs(names.ROLE_TRIAL)


def test_unique_tokens_beyond_the_training_split_is_one_line_exit_2_before_any_trial(tmp_path, sqlite_uri, capsys):
    spec = tiny_spec(tmp_path, name="toomuch", data={"unique_tokens": [16_384, 10**8]})
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err  # MLflow's own INFO lines about creating the store come first
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: data.unique_tokens: 100000000 is not between one sequence (32) and the training split")
    assert "Traceback" not in err and not SweepRuns("toomuch", sqlite_uri).runs(names.ROLE_TRIAL)


def test_export_before_any_trial_trained_is_one_line_exit_2(tmp_path, sqlite_uri, capsys):
    spec = tiny_spec(tmp_path, name="untrained")
    assert main(["export", str(spec)]) == 2
    assert "sweep untrained: no trial has logged a validation loss yet" in capsys.readouterr().err
    assert not (tmp_path / "results" / "untrained").exists()


def test_lr_and_batch_auto_take_the_law_at_each_trials_scale(tmp_path):
    """`auto` reads the hparams law at each trial's own N and C (under the spec's conventions)."""
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"schema_version": 1, "laws": {}, "hparams": {
        "lr_vs_C": {"k": 0.3118, "a": -0.125}, "batch_vs_C": {"k": 0.292, "b": 0.3271}}}))
    spec = tiny_spec(tmp_path, train={"lr": "auto", "batch_size": "auto"}, hparams_law=str(law))
    out = tmp_path / "plan.csv"
    assert main(["plan", str(spec), "--format", "csv", "--out", str(out)]) == 0
    plan = pd.read_csv(out)
    assert plan.lr.nunique() == len(plan)  # every trial its own scale, its own lr
    for _, row in plan.iterrows():
        C = row.flops_6N  # fit.flops 6N: C = 6 N_active D, D before rounding to whole batches
        assert row.lr == pytest.approx(0.3118 * C**-0.125, rel=0.02)
        assert row.batch_size % 32 == 0 and row.batch_size == pytest.approx(0.292 * C**0.3271, rel=0.5)


def ui_lists_the_sweep(uri: str, parent_id: str, n_runs: int) -> None:
    """`scaling ui` serves the store on loopback: the sweep's experiment, every run, the results artifacts."""
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "runners.cli", "ui", "--uri", uri, "--port", str(port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url)
        client = MlflowClient(url)
        (experiment,) = [e for e in client.search_experiments() if e.name == "e2e"]
        assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == n_runs
        files = {f.path for f in client.list_artifacts(parent_id, names.ARTIFACT_DIR)}
        assert {f"{names.ARTIFACT_DIR}/{f}" for f in ("law.json", "points.csv", "loss_vs_C.png")} <= files
        check_sweep_in_mlflow(client, "e2e", "end to end", "FINISHED")
    finally:
        stop(ui)


def test_plan_warns_when_auto_rests_on_an_unresolved_law(tmp_path, capsys):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"schema_version": 1, "laws": {}, "hparams": {
        "cells": [{"C": 1e8}, {"C": 3e8}], "lr_vs_C": {"k": 1e-5, "a": 0.3, "ci": {"k": [1e-7, 1e-2], "a": [-0.2, 0.7]}}}}))
    spec = tiny_spec(tmp_path, train={"lr": "auto"}, hparams_law=str(law))
    assert main(["plan", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "warning" in out and "includes 0" in out and "beyond the searched cells" in out

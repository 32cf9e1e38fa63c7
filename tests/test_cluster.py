"""The cluster path (issue 20): a sweep submitted as a Ray job keeps nothing inside the job's working directory,
and `scaling pull` brings its results home from MLflow."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from runners.cli import main
from runners.job import JOB_ENV, lost_with_job
from runners.tracking.results import publish
from runners.tracking.runs import SweepRuns
from sweeps.spec import load_spec
from tests.helpers import tiny_spec

SERVER = "http://127.0.0.1:5000"


def test_job_refuses_what_would_land_in_its_working_directory(tmp_path):
    job_dir = tmp_path / "_ray_pkg_abc"
    job_dir.mkdir()
    outside = tiny_spec(tmp_path)  # checkpoint_dir and results_dir absolute, outside job_dir
    assert lost_with_job(load_spec(outside), SERVER, job_dir) == []

    lost = lost_with_job(load_spec(outside), None, job_dir)
    assert lost == ["MLFLOW_TRACKING_URI is unset (the store would be ./mlflow.db)"]
    for uri in (f"sqlite:///{tmp_path / 'mlflow.db'}", "postgresql://u@127.0.0.1/db"):  # artifacts would go to ./mlruns
        assert lost_with_job(load_spec(outside), uri, job_dir) == [
            f"MLFLOW_TRACKING_URI {uri!r} is opened by the job itself (its artifacts: ./mlruns)"]

    inside = tiny_spec(tmp_path, name="inside", checkpoint_dir=".scaling/checkpoints",
                       results_dir=str(job_dir / "results"), search={"trials": 2, "lr": [1e-3, 1e-2],
                                                                     "storage": "sqlite:///optuna.db"})
    assert lost_with_job(load_spec(inside), SERVER, job_dir) == [
        "checkpoint_dir '.scaling/checkpoints' is inside it", f"results_dir '{job_dir / 'results'}' is inside it",
        "search.storage 'sqlite:///optuna.db' is inside it"]


def test_run_as_a_job_with_the_defaults_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    spec = tiny_spec(tmp_path, checkpoint_dir=".scaling/checkpoints")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv(JOB_ENV, "{}")  # what Ray's job supervisor sets for the entrypoint
    for command in ("run", "export"):
        assert main([command, str(spec)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "MLFLOW_TRACKING_URI is unset" in err and "checkpoint_dir" in err
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / ".scaling").exists()  # refused before writing


def published(tmp_path: Path, spec: Path, uri: str) -> Path:
    """A results folder as the export writes it (spec, points, law, a plot), logged on the sweep's parent run."""
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "spec.yaml").write_text(spec.read_text())
    (folder / "points.csv").write_text("trial_id,N,D,loss\na,3000,20000,3.1\n")
    (folder / "law.json").write_text('{"law": "chinchilla"}')
    (folder / "isoflop.png").write_bytes(bytes(range(256)) * 4)
    publish(SweepRuns(load_spec(spec).name, uri), folder)
    return folder


def test_pull_brings_the_parent_runs_results_home_or_says_in_one_line_why_not(tmp_path, sqlite_uri, monkeypatch,
                                                                             capsys):
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts for a sqlite store: ./mlruns
    spec = tiny_spec(tmp_path, name="pulled")
    results = tmp_path / "results" / "pulled"
    assert main(["pull", str(spec)]) == 2
    err = capsys.readouterr().err  # after MLflow's own lines creating the empty store
    assert "Traceback" not in err and err.splitlines()[-1].startswith("error: sweep 'pulled' is not in the tracking store")
    SweepRuns("pulled", sqlite_uri)  # the experiment and parent run, as `scaling run` makes them before training
    assert main(["pull", str(spec)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: sweep 'pulled' has no results in")
    assert not results.exists()

    folder = published(tmp_path, spec, sqlite_uri)
    results.mkdir(parents=True)
    (results / "law.json").write_text("stale")
    assert main(["pull", str(spec)]) == 0
    names = ["isoflop.png", "law.json", "points.csv", "spec.yaml"]
    assert sorted(p.name for p in results.iterdir()) == names
    assert filecmp.cmpfiles(folder, results, names, shallow=False) == (names, [], [])
    assert "4 files into" in capsys.readouterr().out

    elsewhere = tmp_path / "elsewhere"
    assert main(["pull", str(spec), "--out", str(elsewhere)]) == 0
    assert filecmp.cmpfiles(folder, elsewhere, names, shallow=False) == (names, [], [])

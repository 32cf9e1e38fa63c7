"""The cluster path (issue 20): a sweep submitted as a Ray job keeps nothing inside the job's working directory,
and `scaling pull` brings its results home from MLflow."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from runners.cli import main
from runners.job import JOB_ENV, lost_with_job
from runners.tracking.results import publish
from runners.tracking.runs import SweepRuns
from sweeps.spec import load_spec
from tests.conftest import free_port
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


@dataclass(frozen=True)
class Head:
    dashboard: str        # the address `ray job submit` takes
    env: dict[str, str]   # the submitter's environment: its own HOME, holding the head's token
    temp_dir: Path


@pytest.fixture
def ray_head():
    """`ray start --head` on loopback with token authentication on, as on any machine that holds a Ray token
    (~/.ray/auth_token, written by `ray.init()` or `ray get-auth-token --generate`), in a HOME and temp dir of its
    own. Its processes share the process group `ray start` leads, and only they are stopped at the end (`ray stop`
    would stop every Ray on the machine)."""
    root = Path(tempfile.mkdtemp(prefix="rayhead", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
    env |= {"HOME": str(root / "home"), "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}  # ray and scaling of this venv
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    port, dashboard = free_port(), free_port()
    ports = {flag: free_port() for flag in ("--ray-client-server-port", "--dashboard-agent-listen-port",
                                            "--dashboard-agent-grpc-port", "--runtime-env-agent-port")}
    start = subprocess.Popen(
        ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
         "--temp-dir", str(root / "ray"), "--port", str(port), "--dashboard-port", str(dashboard), "--num-cpus", "2",
         "--disable-usage-stats", *(str(x) for kv in ports.items() for x in kv)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = start.communicate(timeout=300)
        assert start.returncode == 0, out
        yield Head(f"http://127.0.0.1:{dashboard}", env, root / "ray")
    finally:
        stop_group(start.pid)
        shutil.rmtree(root, ignore_errors=True)


def stop_group(pgid: int, grace_s: float = 5.0) -> None:
    """SIGTERM to every process of the group, SIGKILL to what is left after `grace_s`."""
    deadline = time.monotonic() + grace_s
    try:
        os.killpg(pgid, signal.SIGTERM)
        while time.monotonic() < deadline:
            time.sleep(0.5)
            os.killpg(pgid, 0)  # raises once the group is empty
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def submit(head: Head, job_dir: Path, spec: str, env_vars: dict[str, str], **client_env: str):
    """The README's recipe: `ray job submit ... -- scaling run SPEC`, waiting for the job's end."""
    return subprocess.run(
        ["ray", "job", "submit", "--address", head.dashboard, "--working-dir", str(job_dir),
         "--runtime-env-json", json.dumps({"env_vars": env_vars}), "--", "scaling", "run", spec],
        env=head.env | client_env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_readme_cluster_recipe_runs_a_submitted_sweep_and_pull_brings_it_home(tmp_path, ray_head, mlflow_server,
                                                                                monkeypatch, capsys):
    spec = tiny_spec(tmp_path, name="submitted", grid={"tokens": [20_000]})  # 2 trials; checkpoints, results absolute
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    shutil.copy(spec, job_dir)
    server = {"MLFLOW_TRACKING_URI": mlflow_server}

    refused = submit(ray_head, job_dir, spec.name, server)  # no RAY_AUTH_MODE: the head wants its token
    assert refused.returncode != 0 and "AuthenticationError" in refused.stdout + refused.stderr

    lost = submit(ray_head, job_dir, spec.name, {}, RAY_AUTH_MODE="token")  # no tracking server for the job
    assert lost.returncode != 0
    assert "error: running as a Ray job in" in lost.stdout and "MLFLOW_TRACKING_URI is unset" in lost.stdout

    done = submit(ray_head, job_dir, spec.name, server, RAY_AUTH_MODE="token")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    copies = [p for p in ray_head.temp_dir.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
    assert copies and all(sorted(p.name for p in c.iterdir()) == [spec.name] for c in copies)  # nothing left inside
    assert len(list((tmp_path / "ckpt" / "submitted").iterdir())) == 2

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    pulled = tmp_path / "pulled"
    assert main(["pull", str(spec), "--out", str(pulled)]) == 0
    written = tmp_path / "results" / "submitted"  # by the job, on this machine (the head's)
    names = sorted(p.name for p in written.iterdir())
    assert {"spec.yaml", "points.csv", "law.json"} <= set(names)
    assert filecmp.cmpfiles(written, pulled, names, shallow=False) == (names, [], [])
    points = pd.read_csv(pulled / "points.csv")
    assert points.trial_id.nunique() == 2 and points.final.sum() == 2

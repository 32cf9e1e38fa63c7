"""The cluster's tracking path as users run it (issue 20): an `mlflow server` backed by PostgreSQL, many trials
logging into it over HTTP at once, every point stored once."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runners.tracking.runs import MlflowSink, SweepRuns
from tests.conftest import free_port, stop, wait_until_up

TRIALS, POINTS = 64, 2000


def postgres_bin() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture
def postgres():
    """A PostgreSQL server on 127.0.0.1 in a fresh data directory: yields the URL of an empty database.
    Run as the `postgres` system user when the tests run as root (postgres refuses root)."""
    bin_dir = postgres_bin()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("PostgreSQL is not installed (initdb, pg_ctl); on Debian: apt-get install -y postgresql")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))
    if as_user:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()

    def pg(*cmd: str) -> None:
        subprocess.run(as_user + [str(bin_dir / cmd[0]), *cmd[1:]], check=True, capture_output=True, timeout=120)

    pg("initdb", "-D", str(data), "-U", "scaling", "--auth=trust", "-E", "UTF8", "--no-sync")
    pg("pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
       f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=200", "start")
    try:
        import psycopg  # SQLAlchemy's driver for postgresql:// URLs

        with psycopg.connect(host="127.0.0.1", port=port, user="scaling", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE mlflow")  # autocommit: CREATE DATABASE runs outside a transaction
        yield f"postgresql://scaling@127.0.0.1:{port}/mlflow"
    finally:
        pg("pg_ctl", "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres_mlflow_server(postgres, tmp_path):
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres,
         "--default-artifact-root", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s=180)
        yield url
    finally:
        stop(proc)


@pytest.mark.slow
def test_64_trials_log_2000_points_each_over_http_into_postgres_each_point_once(postgres_mlflow_server):
    url = postgres_mlflow_server
    runs = SweepRuns("pg-concurrent", url)
    run_ids = [runs.trial_run(f"t{i}", {}) for i in range(TRIALS)]

    def trial(i: int) -> bool:
        """As a trial logs: through its own sink, into its own run; values tell the trials apart."""
        sink = MlflowSink(run_ids[i], url, every_s=2.0)
        for step in range(POINTS):
            sink.log({"train/loss": i + 1.0 / (step + 1)}, step)
        return sink.close(timeout_s=300)

    with ThreadPoolExecutor(TRIALS) as pool:
        assert all(pool.map(trial, range(TRIALS)))

    for i, run_id in enumerate(run_ids):
        steps, values = np.array(sorted((m.step, m.value) for m in runs.client.get_metric_history(run_id, "train/loss"))).T
        assert steps.tolist() == list(range(POINTS)), f"trial {i}"  # each step once: none lost, none twice
        np.testing.assert_allclose(values, i + 1.0 / (steps + 1), rtol=1e-12, err_msg=f"trial {i}")  # its own points

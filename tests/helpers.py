"""Tiny specs and MLflow queries shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from runners.tracking import names
from runners.tracking.runs import SweepRuns


def tiny_spec(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    """A sweep that trains in seconds on one CPU core: 2 sizes x 2 token budgets of a ~10k-parameter model."""
    spec = {
        "name": name,
        "data": {"source": "stdlib", "max_bytes": 400_000, "val_tokens": 4096, "val_fraction": 0.1},
        "model": {"seq_len": 32},
        "grid": {"sizes": [3000, 12000], "tokens": [20_000, 60_000]},
        "train": {"batch_size": 512, "lr": 3e-3, "eval_points": 4,
                  "schedule": {"kind": "wsd", "warmup": 0.05, "min_lr_ratio": 0.0}},
        "fit": {"bootstrap": 20},
        "runtime": {"checkpoint_every_s": 0.5, "max_retries": 2},
        "checkpoint_dir": str(tmp_path / "ckpt"),
        "results_dir": str(tmp_path / "results"),
    }
    for key, value in overrides.items():
        spec[key] = spec.get(key, {}) | value if isinstance(value, dict) else value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def metric_steps(runs: SweepRuns, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in runs.client.get_metric_history(run_id, key))


def trial_runs(sweep: str, uri: str) -> dict:
    return SweepRuns(sweep, uri).runs(names.ROLE_TRIAL)


def wait_for(predicate, timeout_s: float = 300.0, every_s: float = 0.5):
    """Poll until `predicate()` is truthy; return its value (fails the test on timeout)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every_s)
    raise TimeoutError(f"condition not met in {timeout_s} s")


def start_driver(spec: Path, uri: str, *extra: str):
    """`scaling run SPEC` in its own process group (so a test can kill it and the Ray it started), with SIGINT
    as a terminal gives it: tests run as a background job of a script inherit SIGINT ignored, and Python keeps
    an ignored SIGINT ignored, so Ctrl-C (a SIGINT from the test) would never reach the driver."""
    import os
    import signal
    import subprocess
    import sys

    from runners.tracking.runs import client

    client(uri).search_experiments()  # create the store here: a test polling it while the driver migrates it would race
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.Popen([sys.executable, "-m", "runners.cli", "run", str(spec), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

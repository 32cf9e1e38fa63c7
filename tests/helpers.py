"""Tiny specs and MLflow queries shared by the end-to-end tests."""

from __future__ import annotations

from pathlib import Path

import yaml

from runners import names
from runners.tracking import SweepRuns


def tiny_spec(tmp_path: Path, name: str = "tiny", **overrides) -> Path:
    """A sweep that trains in seconds on one CPU core: 2 sizes x 2 token budgets of a ~10k-parameter model."""
    spec = {
        "name": name,
        "data": {"source": "stdlib", "max_bytes": 400_000, "val_tokens": 4096},
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

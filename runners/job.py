"""A sweep submitted as a Ray job (`ray job submit --working-dir . -- scaling run SPEC`): what it must not write
where it runs.

Ray runs a job's entrypoint in its own copy of the working directory (`<temp-dir>/session_*/runtime_resources/
working_dir_files/_ray_pkg_*/`, or the head's directory without `--working-dir`), which goes with the Ray
session. Everything a sweep writes by default is relative to it: the sqlite store `./mlflow.db`, MLflow's
artifacts `./mlruns` (where a store opened by the job itself, sqlite or any database, puts the points, law and
plots), `.scaling/checkpoints` and `results/`. The job refuses to start with any of them there, in one line
saying what to set, rather than guessing a place that outlives it: only the user knows which paths every node
shares, and a sweep whose results vanish after hours of training is worse than one that never started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from sqlalchemy.engine import make_url

from sweeps.errors import SpecError
from sweeps.spec import SweepSpec

# Set by Ray's job supervisor for the entrypoint's process (and inherited by what it starts), nowhere else.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SERVER_SCHEMES = ("http://", "https://", "databricks")  # stores whose artifacts the server keeps, not the job


def in_ray_job(environ: Mapping[str, str] = os.environ) -> bool:
    return JOB_ENV in environ


def lost_with_job(spec: SweepSpec, tracking_uri: str | None, cwd: Path) -> list[str]:
    """What this sweep would write under `cwd` (the job's working directory): one phrase each, empty if nothing."""
    lost = []
    if not tracking_uri:
        lost.append("MLFLOW_TRACKING_URI is unset (the store would be ./mlflow.db)")
    elif not tracking_uri.startswith(SERVER_SCHEMES):
        lost.append(f"MLFLOW_TRACKING_URI {tracking_uri!r} is opened by the job itself (its artifacts: ./mlruns)")
    for field in ("checkpoint_dir", "results_dir"):
        path = getattr(spec, field)
        if _under(path, cwd):
            lost.append(f"{field} {str(path)!r} is inside it")
    storage = spec.search.storage if spec.search else None
    if storage and storage.startswith("sqlite") and _under(Path(make_url(storage).database or "."), cwd):
        lost.append(f"search.storage {storage!r} is inside it")
    return lost


def refuse_if_lost(spec: SweepSpec) -> None:
    """Inside a Ray job, stop with one line when the sweep would write where the job's copy is deleted."""
    if not in_ray_job():
        return
    cwd = Path.cwd()
    lost = lost_with_job(spec, os.environ.get("MLFLOW_TRACKING_URI"), cwd)
    if lost:
        raise SpecError(
            f"running as a Ray job in {cwd}, Ray's copy of the working directory, deleted with the job: "
            + "; ".join(lost) + ". Set MLFLOW_TRACKING_URI to a tracking server every node reaches (ray job submit "
            "--runtime-env-json '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://HOST:5000\"}}') and the spec's "
            "checkpoint_dir and results_dir to absolute paths outside it (checkpoints: one every node reaches)")


def _under(path: Path, cwd: Path) -> bool:
    return (cwd / path).resolve().is_relative_to(cwd.resolve())

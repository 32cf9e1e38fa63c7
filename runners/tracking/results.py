"""A sweep's results (spec, points, law, plots) as artifacts of its parent run: logged by the export wherever
the sweep ran (a cluster's job included), pulled onto the user's machine by `scaling pull`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mlflow.artifacts import download_artifacts

from runners.tracking import names
from runners.tracking.runs import SweepRuns, client


class NotInStore(Exception):
    """The sweep, or its results, are not in the tracking store (a message for the user, one line)."""


def publish(runs: SweepRuns, folder: Path) -> None:
    """The export's folder, as the parent run's `results/` artifacts."""
    runs.client.log_artifacts(runs.parent_id, str(folder), names.ARTIFACT_DIR)


def pull(sweep: str, uri: str, out: Path) -> list[Path]:
    """The sweep's published results into `out` (files there of the same name are replaced); the files written.
    Reads the store only: a sweep that is not there is not created."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(sweep)
    if experiment is None:
        raise NotInStore(f"sweep {sweep!r} is not in the tracking store {uri}; set MLFLOW_TRACKING_URI to the "
                         "store it ran with")
    query = f"tags.`{names.TAG_ROLE}` = '{names.ROLE_SWEEP}' and tags.`{names.TAG_TRIAL_ID}` = '{sweep}'"
    parents = mlflow_client.search_runs([experiment.experiment_id], query, max_results=1)
    if not parents or not mlflow_client.list_artifacts(parents[0].info.run_id, names.ARTIFACT_DIR):
        raise NotInStore(f"sweep {sweep!r} has no results in {uri} yet: they are logged when `scaling run` "
                         "finishes, or by `scaling export SPEC` run against the same store")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:  # a pull cut short leaves `out` as it was
        got = Path(download_artifacts(run_id=parents[0].info.run_id, artifact_path=names.ARTIFACT_DIR,
                                      dst_path=scratch, tracking_uri=uri))
        files = [p.relative_to(got) for p in sorted(got.rglob("*")) if p.is_file()]
        shutil.copytree(got, out, dirs_exist_ok=True)
    return [out / f for f in files]

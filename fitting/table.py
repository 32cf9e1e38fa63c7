"""Load and check a points table (fitting/points.py), choose its conventions, and pick the rows a fit uses."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fitting.errors import FitInputError
from fitting.points import REQUIRED

N_COLUMNS = {"active": "N_active", "nonembed": "N_nonembed", "total": "N_total"}
C_COLUMNS = {"6N": "C_6N", "exact": "C_exact"}
LEFT_OUT_STATUSES = ("diverged", "pruned", "failed", "killed", "running", "pending")


def load_points(path: str | Path) -> pd.DataFrame:
    """A points table from .csv or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise FitInputError(f"--points {path}: no such file")
    if path.suffix == ".csv":
        return pd.read_csv(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    raise FitInputError(f"--points {path}: use a .csv or .parquet file")


def check(points: pd.DataFrame, columns: tuple[str, ...] = REQUIRED) -> pd.DataFrame:
    """The table if `columns` exist, are numeric, finite and positive; else FitInputError naming the column and
    the row as the file counts it (the table keeps the index it was read with, however it was filtered)."""
    missing = [c for c in columns if c not in points.columns]
    if missing:
        raise FitInputError(f"points table has no column {missing[0]!r}; it needs {', '.join(columns)}")
    for c in columns:
        values = pd.to_numeric(points[c], errors="coerce")
        if values.isna().any():
            label = values.index[values.isna().to_numpy()][0]
            raise FitInputError(f"column {c!r} has a missing or non-numeric value ({points[c].loc[label]}) in "
                                f"{_row(points, label)}; drop or fix that row")
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            label = values.index[bad.to_numpy()][0]
            raise FitInputError(f"column {c!r} must be finite and positive; {_row(points, label)} has "
                                f"{float(values.loc[label]):g}")
    return points


def _row(points: pd.DataFrame, label) -> str:
    """A row as the user finds it in the file: data row k (the header is line 1 of a CSV, so line k + 1)."""
    if isinstance(label, (int, np.integer)):
        return f"data row {int(label) + 1} (line {int(label) + 2} of a CSV)"
    return f"row {label}"


def with_conventions(points: pd.DataFrame, *, params: str | None = None, flops: str | None = None) -> pd.DataFrame:
    """The table with N and C switched to another convention, from its N_* and C_* columns."""
    out = points.copy()
    for flag, choice, columns, target in (("--params", params, N_COLUMNS, "N"), ("--flops", flops, C_COLUMNS, "C")):
        if choice is None:
            continue
        if choice not in columns:
            raise FitInputError(f"{flag} {choice!r} is not one of {', '.join(columns)}")
        if columns[choice] not in out.columns:
            raise FitInputError(f"{flag} {choice} needs a {columns[choice]!r} column, which the points table lacks")
        out[target] = out[columns[choice]]
    return out


def parametric_rows(points: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int]]:
    """The rows a parametric fit uses (finished and final where the table says so) and counts of those left out."""
    keep = pd.Series(True, index=points.index)
    left_out: dict[str, int] = {}
    if "status" in points.columns:
        status = points["status"].fillna("finished").astype(str)
        for s in LEFT_OUT_STATUSES:
            hit = keep & (status == s)
            if hit.any():
                left_out[s] = int(hit.sum())
            keep &= ~hit
    if "final" in points.columns:
        final = is_final(points)
        if (keep & ~final).any():
            left_out["not final"] = int((keep & ~final).sum())
        keep &= final
    return points[keep], left_out


def is_final(points: pd.DataFrame) -> pd.Series:
    """The `final` column as booleans, whether it was read as bools, 0/1 or the strings True/False."""
    return points["final"].map(lambda v: str(v).lower() in ("true", "1", "1.0"))


def groups(points: pd.DataFrame, resample: str) -> np.ndarray:
    """Integer group of each row for the bootstrap: one per point, or one per whole trial (a WSD branch counts
    as part of the trial it forked from)."""
    if resample == "points":
        return np.arange(len(points))
    if resample != "trials":
        raise FitInputError(f"--resample {resample!r} is not one of points, trials")
    if "trial_id" not in points.columns:
        raise FitInputError("--resample trials needs a 'trial_id' column; use --resample points")
    trial = points["trial_id"].astype(str)
    if "parent_trial_id" in points.columns:
        parent = points["parent_trial_id"].fillna("").astype(str)
        trial = parent.where(parent != "", trial)
    return pd.factorize(trial)[0]


def data_hash(points: pd.DataFrame, columns: tuple[str, ...]) -> str:
    """sha256 of the columns a fit read, row order included: the same table gives the same hash."""
    present = [c for c in columns if c in points.columns]
    return hashlib.sha256(points[present].to_csv(index=False).encode()).hexdigest()[:16]


def flops_per_param_token(points: pd.DataFrame) -> float:
    """k in C = k N D: the median of C/(N D) where the table has C, else 6 (the 6N convention)."""
    if "C" not in points.columns or points["C"].isna().all():
        return 6.0
    ratio = points["C"] / (points["N"] * points["D"])
    return float(ratio[np.isfinite(ratio) & (ratio > 0)].median())

"""Approach 1, the envelope: over every training curve, the lowest loss reached at each compute (curves
interpolated linearly in log C), the run that reaches it giving N_opt(C) and D_opt(C); then
N_opt = k_N C^a and D_opt = k_D C^b by least squares in log space.

Only compute values that at least two curves reach count (where a single run is the only one there,
it is the envelope by default, not by being better), and only where the lowest curve is neither the
smallest nor the largest model (there the true optimum may lie beyond the sizes tried).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fitting.bootstrap import intervals, replicate_weights
from fitting.errors import FitInputError
from fitting.table import check, data_hash

UNUSABLE = ("diverged", "failed")  # a diverged curve's tail is not a training curve


def _curves(points: pd.DataFrame) -> list[dict]:
    key = "trial_id" if "trial_id" in points.columns else "N"
    out = []
    for _, block in points.sort_values("C").groupby(key, sort=False):
        if len(block) >= 2:
            out.append({"log_c": np.log(block["C"].to_numpy(float)), "loss": block["loss"].to_numpy(float),
                        "log_d": np.log(block["D"].to_numpy(float)), "N": float(block["N"].iloc[0])})
    return out


def envelope(curves: list[dict], grid_size: int, min_curves: int = 2) -> pd.DataFrame:
    """Per grid compute: lowest interpolated loss, the N of the curve reaching it, and that curve's D there."""
    lo = min(c["log_c"][0] for c in curves)
    hi = max(c["log_c"][-1] for c in curves)
    grid = np.linspace(lo, hi, grid_size)
    losses = np.full((len(curves), grid_size), np.inf)
    log_d = np.zeros((len(curves), grid_size))
    for i, c in enumerate(curves):
        inside = (grid >= c["log_c"][0]) & (grid <= c["log_c"][-1])
        losses[i, inside] = np.interp(grid[inside], c["log_c"], c["loss"])
        log_d[i, inside] = np.interp(grid[inside], c["log_c"], c["log_d"])
    covered = np.isfinite(losses).sum(0) >= min_curves
    best = np.argmin(losses, axis=0)
    cols = np.arange(grid_size)
    sizes = np.array([c["N"] for c in curves])
    best_n = sizes[best]
    # where the smallest or largest model is lowest, the optimum may lie beyond it: censored, not counted
    interior = (best_n > sizes.min()) & (best_n < sizes.max())
    table = pd.DataFrame({"C": np.exp(grid), "loss": losses[best, cols], "N": best_n, "D": np.exp(log_d[best, cols])})
    return table[covered & interior].reset_index(drop=True)


def _frontier(table: pd.DataFrame) -> dict:
    a, log_kn = np.polyfit(np.log(table["C"]), np.log(table["N"]), 1)
    b, log_kd = np.polyfit(np.log(table["C"]), np.log(table["D"]), 1)
    return {"a": float(a), "b": float(b), "k_N": float(np.exp(log_kn)), "k_D": float(np.exp(log_kd))}


def fit_envelope(points: pd.DataFrame, *, bootstrap: int = 0, seed: int = 0, resample: str = "trials",
                 grid_size: int = 200) -> dict:
    check(points, ("N", "D", "loss", "C"))
    left_out = {}
    rows = points
    if "status" in points.columns:
        bad = points["status"].isin(UNUSABLE)
        left_out = {s: int(n) for s, n in points.loc[bad, "status"].value_counts().items()}
        rows = points[~bad]
    curves = _curves(rows)
    sizes = len({c["N"] for c in curves})
    if sizes < 4:
        raise FitInputError(f"envelope needs training curves (2 or more points each) of at least 4 model sizes; "
                            f"the table has {len(curves)} curves of {sizes} sizes")
    table = envelope(curves, grid_size)
    if table["N"].nunique() < 2:
        raise FitInputError("envelope: fewer than 2 model sizes between the smallest and largest are ever lowest; "
                            "it needs more sizes whose curves cross")
    params = _frontier(table)
    step = max(1, len(table) // 50)
    section = {
        "law": "envelope", "params": params, "ci": {k: None for k in params},
        "frontier": table.iloc[::step].to_dict("list"),
        "method": {"name": "envelope", "objective": "least squares of log N_opt and log D_opt on log C",
                   "options": {"grid_size": grid_size, "resample": resample, "seed": seed,
                               "curves_by": "trial_id" if "trial_id" in rows.columns else "N"}},
        "n_points": len(rows), "n_curves": len(curves), "left_out": left_out,
        "data_hash": data_hash(rows, ("N", "D", "C", "loss", "trial_id")),
        "diagnostics": {"grid_points": len(table), "sizes_on_envelope": int(table["N"].nunique())},
    }
    if bootstrap:
        section["bootstrap"] = _bootstrap(curves, grid_size, bootstrap, seed, resample)
        section["ci"] = intervals({k: np.array(v) for k, v in section["bootstrap"]["samples"].items()},
                                 estimates=section["params"])
    return section


def _bootstrap(curves: list[dict], grid_size: int, replicates: int, seed: int, resample: str) -> dict:
    """Redraw whole curves whatever `resample` says: a curve is a trial, and single points would break it."""
    if resample not in ("points", "trials"):
        raise FitInputError(f"--resample {resample!r} is not one of points, trials")
    counts = replicate_weights(np.arange(len(curves)), replicates, seed).astype(int)
    samples: dict[str, list[float]] = {"a": [], "b": [], "k_N": [], "k_D": []}
    converged = 0
    for r in range(replicates):
        drawn = [c for c, n in zip(curves, counts[r]) for _ in range(n)]
        if len({c["N"] for c in drawn}) < 4:
            continue
        table = envelope(drawn, grid_size)
        if len(table) < 2 or table["N"].nunique() < 2:
            continue
        converged += 1
        for k, v in _frontier(table).items():
            samples[k].append(v)
    return {"replicates": replicates, "converged": converged, "resample": "trials", "samples": samples}

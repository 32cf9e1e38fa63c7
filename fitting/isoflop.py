"""Approach 2, IsoFLOP profiles: per compute budget a quadratic in log N through the final losses, its
minimum N_opt (with a delta-method interval), then N_opt = k_N C^a and D_opt = k_D C^b across budgets.

The quadratic is fitted with a soft-L1 loss (scipy least_squares), so one bad run does not move the
minimum. A budget whose lowest loss is at its smallest or largest N, whose fitted minimum lies outside
the N it sampled, or whose quadratic opens downwards, has no trustworthy optimum: it is flagged and
left out of the a, b fit, never silently used.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from fitting.bootstrap import intervals, replicate_weights
from fitting.errors import FitInputError
from fitting.table import check, data_hash, flops_per_param_token, groups, parametric_rows

MIN_SIZES, MIN_BUDGETS = 3, 2


def budgets_of(points: pd.DataFrame) -> pd.Series:
    """The budget each row belongs to: the `budget` column where the table has one, else C to 2 decimals in log10."""
    if "budget" in points.columns and points["budget"].notna().all():
        return points["budget"].astype(float)
    return 10 ** np.round(np.log10(points["C"].astype(float)), 2)


def quadratic_minimum(log_n: np.ndarray, loss: np.ndarray) -> dict:
    """Robust quadratic loss(log N) and its minimum; 'flag' says why the minimum is not to be used (or None)."""
    centre = log_n.mean()
    x = log_n - centre
    start = np.polyfit(x, loss, 2)[::-1]
    spread = np.median(np.abs(loss - np.polyval(start[::-1], x)))
    fit = least_squares(lambda c: c[0] + c[1] * x + c[2] * x ** 2 - loss, start, loss="soft_l1",
                        f_scale=max(1.4826 * spread, 1e-6))
    c0, c1, c2 = fit.x
    out = {"coefficients": [float(c0), float(c1), float(c2)], "log_N_centre": float(centre),
           "N_opt": None, "N_opt_ci": None, "loss_opt": None, "flag": None}
    if not c2 > 0:
        out["flag"] = "quadratic opens downwards: no minimum"
        return out
    x_opt = -c1 / (2 * c2)
    with np.errstate(over="ignore"):  # a nearly flat profile puts its minimum (and interval) at infinity: its answer
        out.update(N_opt=float(np.exp(centre + x_opt)), loss_opt=float(c0 + c1 * x_opt + c2 * x_opt ** 2))
    dof = len(x) - 3
    if dof > 0:
        # delta method: var(x_opt) = grad' Cov(c1, c2) grad, Cov from the Jacobian at the solution
        resid_var = float(np.sum(fit.fun ** 2) / dof)
        cov = np.linalg.pinv(fit.jac.T @ fit.jac) * resid_var
        grad = np.array([0.0, -1 / (2 * c2), c1 / (2 * c2 ** 2)])
        half = 1.96 * float(np.sqrt(max(grad @ cov @ grad, 0.0)))
        with np.errstate(over="ignore"):
            out["N_opt_ci"] = [float(np.exp(centre + x_opt - half)), float(np.exp(centre + x_opt + half))]
    if np.argmin(loss) in (np.argmin(log_n), np.argmax(log_n)):
        out["flag"] = "lowest loss at the edge of the N grid"
    elif not x.min() <= x_opt <= x.max():
        out["flag"] = "fitted minimum outside the N grid"
    return out


def _frontier(budget_c: np.ndarray, n_opt: np.ndarray, k: float) -> dict:
    a, log_kn = np.polyfit(np.log(budget_c), np.log(n_opt), 1)
    b, log_kd = np.polyfit(np.log(budget_c), np.log(budget_c / (k * n_opt)), 1)
    return {"a": float(a), "b": float(b), "k_N": float(np.exp(log_kn)), "k_D": float(np.exp(log_kd))}


def _profiles(rows: pd.DataFrame, budget: pd.Series) -> list[dict]:
    out = []
    for value, block in rows.groupby(budget, sort=True):
        if block["N"].nunique() < MIN_SIZES:
            continue
        fit = quadratic_minimum(np.log(block["N"].to_numpy(float)), block["loss"].to_numpy(float))
        out.append({"budget": float(value), "C": float(block["C"].median()), "n_points": len(block),
                    "sizes": int(block["N"].nunique()), **fit})
    return out


def profile_rows(points: pd.DataFrame, final_only: bool = True) -> tuple[pd.DataFrame, dict[str, int]]:
    """The points on the budgets' profiles, and counts of those left out."""
    rows, left_out = parametric_rows(points) if final_only else (points, {})
    if "parent_trial_id" in rows.columns:
        # a WSD branch ends before its trial's budget: its final point is not on that budget's profile
        branch = rows["parent_trial_id"].fillna("").astype(str) != ""
        if branch.any():
            left_out = {**left_out, "branch": int(branch.sum())}
        rows = rows[~branch]
    return rows, left_out


def fit_isoflop(points: pd.DataFrame, *, bootstrap: int = 0, seed: int = 0, resample: str = "points",
                final_only: bool = True) -> dict:
    rows, left_out = profile_rows(points, final_only)
    check(rows)
    notes = []
    if "C" not in rows.columns or rows["C"].isna().any():
        rows = rows.assign(C=6.0 * rows["N"] * rows["D"])
        notes.append("the table has no C: C = 6 N D")
    check(rows, ("C",))
    budget = budgets_of(rows)
    k = flops_per_param_token(rows)
    profiles = _profiles(rows, budget)
    usable = [p for p in profiles if p["flag"] is None]
    if len(profiles) < MIN_BUDGETS:
        raise FitInputError(f"isoflop needs at least {MIN_BUDGETS} budgets with {MIN_SIZES} or more model sizes each; "
                            f"the table has {len(profiles)}")
    if len(usable) < MIN_BUDGETS:
        flags = "; ".join(f"C={p['C']:.3g}: {p['flag']}" for p in profiles if p["flag"])
        raise FitInputError(f"isoflop needs {MIN_BUDGETS} budgets with an interior minimum, has {len(usable)} ({flags})")
    params = _frontier(np.array([p["C"] for p in usable]), np.array([p["N_opt"] for p in usable]), k)
    section = {
        "law": "isoflop", "params": params, "ci": {key: None for key in params},
        "budgets": profiles,
        "method": {"name": "isoflop-quadratic", "objective": "soft-L1 quadratic of loss in log N per budget",
                   "options": {"resample": resample, "seed": seed, "final_only": final_only}},
        "n_points": len(rows), "left_out": left_out, "data_hash": data_hash(rows, ("N", "D", "C", "loss")),
        "flops_per_param_token": k, "notes": notes,
        "diagnostics": {"budgets": len(profiles), "budgets_used": len(usable),
                        "budgets_flagged": len(profiles) - len(usable)},
    }
    if bootstrap:
        section["bootstrap"] = _bootstrap(rows, budget, k, bootstrap, seed, resample)
        section["ci"] = intervals({key: np.array(v) for key, v in section["bootstrap"]["samples"].items()},
                                 estimates=section["params"])
    return section


def _bootstrap(rows: pd.DataFrame, budget: pd.Series, k: float, replicates: int, seed: int, resample: str) -> dict:
    """Redraw points (or trials) within each budget, refit every profile and the frontier; a replicate converges
    when at least two budgets still give an interior minimum."""
    per_budget = {value: replicate_weights(groups(block, resample), replicates, seed + i)
                  for i, (value, block) in enumerate(rows.groupby(budget, sort=True))}
    samples: dict[str, list[float]] = {"a": [], "b": [], "k_N": [], "k_D": []}
    converged = 0
    for r in range(replicates):
        drawn = pd.concat([block.loc[block.index.repeat(per_budget[value][r].astype(int))]
                           for value, block in rows.groupby(budget, sort=True)])
        usable = [p for p in _profiles(drawn, budgets_of(drawn)) if p["flag"] is None]
        if len(usable) < MIN_BUDGETS:
            continue
        converged += 1
        for key, value in _frontier(np.array([p["C"] for p in usable]), np.array([p["N_opt"] for p in usable]), k).items():
            samples[key].append(value)
    return {"replicates": replicates, "converged": converged, "resample": resample, "samples": samples}

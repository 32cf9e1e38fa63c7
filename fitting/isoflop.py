"""Approach 2, IsoFLOP profiles: per compute budget a quadratic in log N through the final losses, its
minimum N_opt (with a delta-method interval), then N_opt = k_N C^a and D_opt = k_D C^b across budgets.

The quadratic is fitted with a soft-L1 loss (scipy least_squares), so one bad run does not move the
minimum. A budget whose lowest loss is at its smallest or largest N, whose fitted minimum lies outside
the N it sampled, or whose quadratic opens downwards, has no trustworthy optimum: it is flagged and
left out of the a, b fit, never silently used.

Beside it, without the parabola's shape: the minimum of the Akima interpolant through each profile (Porian et al.
2024), and the frontier fitted on those minima (section["akima"]). A profile in log N is asymmetric (steeper on
the small side), so a parabola's vertex moves with where the sizes sit around the optimum (Czech et al. 2026
argue this biases Llama 3's exponent). Two checks of that: the parabola's a minus Akima's a over paired bootstrap
replicates, and per budget how far each minimum moves when the smallest or the largest size is left out
(window_shift_*, in decades of N).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.interpolate import Akima1DInterpolator
from scipy.optimize import least_squares

from fitting.bootstrap import intervals, replicate_weights
from fitting.errors import FitInputError
from fitting.table import check, data_hash, flops_per_param_token, groups, parametric_rows

MIN_SIZES, MIN_BUDGETS = 3, 2
AKIMA_GRID = 2001  # points the interpolant is evaluated on between the smallest and largest N


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


def akima_minimum(log_n: np.ndarray, loss: np.ndarray) -> dict:
    """Minimum of the Akima interpolant through loss(log N) (repeated sizes averaged); flagged at the grid's edge."""
    profile = pd.Series(loss).groupby(np.asarray(log_n)).mean()
    x, y = profile.index.to_numpy(float), profile.to_numpy(float)
    grid = np.linspace(x[0], x[-1], AKIMA_GRID)
    values = Akima1DInterpolator(x, y)(grid)
    i = int(np.argmin(values))
    return {"N_opt": float(np.exp(grid[i])), "loss_opt": float(values[i]),
            "flag": "lowest loss at the edge of the N grid" if np.argmin(y) in (0, len(y) - 1) else None}


def window_shift(log_n: np.ndarray, loss: np.ndarray, minimum) -> float | None:
    """Largest move of a profile's minimum, in decades of N, when its smallest or its largest size is left out
    (None below 5 sizes, or when a window has no usable minimum)."""
    sizes = np.unique(log_n)
    if len(sizes) < 5:
        return None
    full = minimum(log_n, loss)
    moved = []
    for drop in (sizes[0], sizes[-1]):
        keep = log_n != drop
        window = minimum(log_n[keep], loss[keep])
        if full["flag"] or window["flag"] or window["N_opt"] is None:
            return None
        moved.append(abs(np.log10(window["N_opt"] / full["N_opt"])))
    return float(max(moved))


def _frontier(budget_c: np.ndarray, n_opt: np.ndarray, k: float) -> dict:
    a, log_kn = np.polyfit(np.log(budget_c), np.log(n_opt), 1)
    b, log_kd = np.polyfit(np.log(budget_c), np.log(budget_c / (k * n_opt)), 1)
    return {"a": float(a), "b": float(b), "k_N": float(np.exp(log_kn)), "k_D": float(np.exp(log_kd))}


def _profiles(rows: pd.DataFrame, budget: pd.Series, with_windows: bool = False) -> list[dict]:
    out = []
    for value, block in rows.groupby(budget, sort=True):
        if block["N"].nunique() < MIN_SIZES:
            continue
        log_n, loss = np.log(block["N"].to_numpy(float)), block["loss"].to_numpy(float)
        fit, akima = quadratic_minimum(log_n, loss), akima_minimum(log_n, loss)
        out.append({"budget": float(value), "C": float(block["C"].median()), "n_points": len(block),
                    "sizes": int(block["N"].nunique()), **fit, "akima_N_opt": akima["N_opt"],
                    "akima_loss_opt": akima["loss_opt"], "akima_flag": akima["flag"]} | (
                   {"window_shift_quadratic": window_shift(log_n, loss, quadratic_minimum),
                    "window_shift_akima": window_shift(log_n, loss, akima_minimum)} if with_windows else {}))
    return out


def _akima_frontier(profiles: list[dict], k: float) -> dict | None:
    usable = [p for p in profiles if p["akima_flag"] is None]
    if len(usable) < MIN_BUDGETS:
        return None
    return _frontier(np.array([p["C"] for p in usable]), np.array([p["akima_N_opt"] for p in usable]), k)


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
    profiles = _profiles(rows, budget, with_windows=True)
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
    akima = _akima_frontier(profiles, k)
    section["akima"] = ({"params": akima, "ci": {key: None for key in akima},
                         "budgets_used": sum(p["akima_flag"] is None for p in profiles),
                         "method": "minimum of the Akima interpolant of loss in log N per budget (Porian et al. 2024)"}
                        if akima else {"not_fitted": f"fewer than {MIN_BUDGETS} budgets with an interior Akima minimum"})
    if bootstrap:
        section["bootstrap"], akima_samples = _bootstrap(rows, budget, k, bootstrap, seed, resample)
        section["ci"] = intervals({key: np.array(v) for key, v in section["bootstrap"]["samples"].items()},
                                 estimates=section["params"])
        if akima:
            paired = np.array(akima_samples["a_parabola_minus_akima"])
            section["akima"]["ci"] = intervals({key: np.array(akima_samples[key]) for key in akima}, estimates=akima)
            section["akima"]["a_parabola_minus_akima"] = params["a"] - akima["a"]
            section["akima"]["a_parabola_minus_akima_ci"] = intervals(
                {"d": paired}, estimates={"d": section["akima"]["a_parabola_minus_akima"]})["d"]
    return section


def _bootstrap(rows: pd.DataFrame, budget: pd.Series, k: float, replicates: int, seed: int,
               resample: str) -> tuple[dict, dict]:
    """Redraw points (or trials) within each budget, refit every profile and the frontier; a replicate converges
    when at least two budgets still give an interior minimum. Also the Akima frontier of each replicate, and
    the parabola's a minus Akima's a where both converge (paired: the same redrawn points)."""
    per_budget = {value: replicate_weights(groups(block, resample), replicates, seed + i)
                  for i, (value, block) in enumerate(rows.groupby(budget, sort=True))}
    samples: dict[str, list[float]] = {"a": [], "b": [], "k_N": [], "k_D": []}
    akima_samples: dict[str, list[float]] = {"a": [], "b": [], "k_N": [], "k_D": [], "a_parabola_minus_akima": []}
    converged = 0
    for r in range(replicates):
        drawn = pd.concat([block.loc[block.index.repeat(per_budget[value][r].astype(int))]
                           for value, block in rows.groupby(budget, sort=True)])
        profiles = _profiles(drawn, budgets_of(drawn))
        usable = [p for p in profiles if p["flag"] is None]
        akima = _akima_frontier(profiles, k)
        for key, value in (akima or {}).items():
            akima_samples[key].append(value)
        if len(usable) < MIN_BUDGETS:
            continue
        converged += 1
        parabola = _frontier(np.array([p["C"] for p in usable]), np.array([p["N_opt"] for p in usable]), k)
        for key, value in parabola.items():
            samples[key].append(value)
        if akima:
            akima_samples["a_parabola_minus_akima"].append(parabola["a"] - akima["a"])
    return {"replicates": replicates, "converged": converged, "resample": resample, "samples": samples}, akima_samples

"""Compute multipliers: how much more compute a baseline needs to reach a variant's loss (an architecture change
judged at scale: "search small, predict large").

Two forms:
- at each budget C, from two loss laws (two law files, or two expert counts of one joint moe fit): the variant's
  compute-optimal loss L_v(C), the baseline's least compute C_b reaching it, multiplier C_b / C (> 1: the variant
  is better). Interval: replicate i of the variant paired with replicate i of the baseline. In one joint fit both
  come from the same resample, so their correlation is kept; two files were fitted on independent data, so
  pairing by index pairs independent draws, which is what the difference of two independent estimates needs.
- budget-invariant (as in Marin's speedup reports): on each family's compute frontier (the lowest final loss per
  budget), L(C) = L_inf + A_v (C / C_0)^-alpha with L_inf and alpha shared, speedup (A_base / A_variant)^(1/alpha).
  Its interval is the delta method on log speedup with the parameter covariance scaled by the fit's own residual
  variance, so lack of fit (families whose exponents differ, a frontier that is not a power law) widens it, with a
  t quantile for the few degrees of freedom.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats
from scipy.optimize import least_squares

from fitting import laws
from fitting.bootstrap import interval
from fitting.errors import FitInputError
from fitting.isoflop import budgets_of, profile_rows
from fitting.lawfile import Law
from fitting.table import check

LEVEL = 0.95


def multipliers(base: Law, variant: Law, computes, *, E_base: float = 1, E_variant: float = 1,
                total_per_active: float | None = None) -> list[dict]:
    """Per compute: the variant's loss, the baseline's compute to reach it, and the multiplier with its interval.
    With total_per_active (an MoE's non-embedding parameters over its active ones): also total_params_ratio, the
    variant's total parameters at its optimum over the baseline's compute-optimal parameters for the same loss
    (> 1: the variant holds more weights in memory for that loss, whatever it saves in compute)."""
    b, v = base.chinchilla_coefficients(E_base), variant.chinchilla_coefficients(E_variant)
    if b is None or v is None:
        raise FitInputError("a compute multiplier needs a chinchilla or moe law in both law files; fit --law chinchilla")
    (b_point, b_reps), (v_point, v_reps) = b, v
    n = min(len(b_reps["E"]), len(v_reps["E"])) if b_reps and v_reps else 0
    rows = []
    for C in np.asarray(computes, float):
        point = {key: float(value[0]) for key, value in _optima(C, b_point, base.k, v_point, variant.k).items()}
        spread = (_optima(C, {k: x[:n] for k, x in b_reps.items()}, base.k, {k: x[:n] for k, x in v_reps.items()},
                          variant.k) if n else None)
        row = {"compute": float(C), "variant_loss": point["variant_loss"], "baseline_compute": point["baseline_compute"],
               "multiplier": point["multiplier"], "multiplier_ci": interval(spread["multiplier"], estimate=point["multiplier"]) if n else None,
               "replicates_paired": n,
               "note": None if np.isfinite(point["multiplier"]) else "the baseline never reaches the variant's loss "
                                                                    "(below its irreducible loss): not identified"}
        if total_per_active is not None:
            row |= {"total_per_active": float(total_per_active),
                    "total_params_ratio": total_per_active * point["active_params_ratio"],
                    "total_params_ratio_ci": (interval(total_per_active * spread["active_params_ratio"],
                                                       estimate=total_per_active * point["active_params_ratio"])
                                              if n else None)}
        rows.append(row)
    return rows


def _optima(C: float, base: dict, k_base: float, variant: dict, k_variant: float) -> dict[str, np.ndarray]:
    """The variant's optimum at C against the baseline's optimum reaching the same loss: the compute multiplier and
    the ratio of their (active) N_opt; arrays over the replicates when the coefficients are (NaN: unreachable)."""
    v = laws.optimal_allocation(C, **variant, flops_per_param_token=k_variant)
    loss = np.atleast_1d(v["loss"])  # an array: compute_for_loss gives NaN where the baseline cannot reach it
    needed = laws.compute_for_loss(loss, **base, flops_per_param_token=k_base)
    b = laws.optimal_allocation(needed, **base, flops_per_param_token=k_base)
    return {"variant_loss": loss, "baseline_compute": needed, "multiplier": needed / C,
            "active_params_ratio": np.atleast_1d(v["N_opt"]) / b["N_opt"]}


def frontier(points: pd.DataFrame) -> pd.DataFrame:
    """The compute frontier of one family: per budget (or distinct C) the lowest final loss, kept only where it is
    below every smaller budget's (a grid sweep's C are all distinct; its frontier is their lower envelope)."""
    rows, _ = profile_rows(points)
    check(rows, ("N", "D", "loss", "C"))
    best = rows.loc[rows.groupby(budgets_of(rows))["loss"].idxmin()].sort_values("C")
    loss = best["loss"].to_numpy(float)
    lower = loss < np.r_[np.inf, np.minimum.accumulate(loss)[:-1]]
    return pd.DataFrame({"C": best["C"].to_numpy(float)[lower], "loss": loss[lower]})


def shared_exponent_speedup(frontiers: dict[str, pd.DataFrame], baseline: str) -> dict:
    """Fit L = L_inf + A_v (C/C_0)^-alpha over every family's frontier, L_inf and alpha shared; each variant's
    speedup over `baseline` with its interval (see the module docstring)."""
    names = [baseline] + [n for n in frontiers if n != baseline]
    if baseline not in frontiers or len(names) < 2:
        raise FitInputError(f"the shared-exponent speedup needs the baseline {baseline!r} and at least one other family")
    which = np.concatenate([np.full(len(frontiers[n]), i) for i, n in enumerate(names)])
    C = np.concatenate([frontiers[n]["C"].to_numpy(float) for n in names])
    loss = np.concatenate([frontiers[n]["loss"].to_numpy(float) for n in names])
    dof = len(loss) - (2 + len(names))
    short = [n for n in names if len(frontiers[n]) < 2]
    if short or dof < 1:
        raise FitInputError(f"the shared-exponent speedup needs 2+ budgets per family and more budgets than "
                            f"{2 + len(names)} in all; {', '.join(short) or 'the families'} have too few")
    x = np.log(C / np.exp(np.log(C).mean()))  # C_0: the geometric mean budget, so the A_v are of order one

    def residuals(p):  # p = (L_inf, alpha, log A_0, log A_1, ...)
        return p[0] + np.exp(p[2 + which] - p[1] * x) - loss

    start = np.r_[0.8 * loss.min(), 0.3, np.log(np.maximum(0.2 * loss.min(), 1e-3)) * np.ones(len(names))]
    fit = least_squares(residuals, start, bounds=([0.0, 1e-3] + [-np.inf] * len(names), [loss.min()] + [np.inf] * (1 + len(names))))
    p = fit.x
    resid_var = float(np.sum(fit.fun ** 2) / dof)
    cov = np.linalg.pinv(fit.jac.T @ fit.jac) * resid_var
    t = float(stats.t.ppf(0.5 + LEVEL / 2, dof))
    at_bound = not 1e-3 * loss.min() < p[0] < (1 - 1e-3) * loss.min()
    out = {"baseline": baseline, "L_inf": float(p[0]), "alpha": float(p[1]), "C_0": float(np.exp(np.log(C).mean())),
           "L_inf_identified": not at_bound,
           "note": ("L_inf ran to the edge of its range (0 or the lowest loss): these budgets do not identify it, and "
                    "the speedup holds only for this fit's exponent" if at_bound else None),
           "A": {n: float(np.exp(p[2 + i])) for i, n in enumerate(names)}, "dof": dof,
           "rms_residual": float(np.sqrt(resid_var)), "speedup": {}, "speedup_ci": {},
           "method": "L = L_inf + A_v (C/C_0)^-alpha, L_inf and alpha shared; speedup = (A_base/A_v)^(1/alpha); "
                     f"{LEVEL:.0%} interval: delta method on log speedup, covariance scaled by the residual variance "
                     f"(lack of fit widens it), t quantile with {dof} dof"}
    for i, n in enumerate(names[1:], start=1):
        log_speedup = (p[2] - p[2 + i]) / p[1]
        grad = np.zeros_like(p)
        grad[1], grad[2], grad[2 + i] = -log_speedup / p[1], 1 / p[1], -1 / p[1]
        half = t * float(np.sqrt(max(grad @ cov @ grad, 0.0)))
        out["speedup"][n] = float(np.exp(log_speedup))
        out["speedup_ci"][n] = [float(np.exp(log_speedup - half)), float(np.exp(log_speedup + half))]
    return out


def family_frontiers(points: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One frontier per expert count (E1 dense, E8, ...) of a sweep's points table."""
    experts = points["E"] if "E" in points.columns else pd.Series(1, index=points.index)
    return {f"E{int(e)}": frontier(points[experts == e]) for e in sorted(experts.dropna().unique())}


def total_per_active(points: pd.DataFrame) -> float | None:
    """An MoE family's non-embedding parameters (every expert) over its active ones, the median over its rows;
    None where the table does not carry both."""
    if not {"N_nonembed", "N_active"} <= set(points.columns) or points.empty:
        return None
    return float((points["N_nonembed"].astype(float) / points["N_active"].astype(float)).median())


def export_section(doc: dict, points: pd.DataFrame, computes) -> dict | None:
    """law.json's `compare` section for a sweep of several expert counts: each E > 1 against dense, per budget
    from the joint moe law, and budget-invariant from the frontiers; None for a sweep of one family."""
    if "E" not in points.columns or points["E"].nunique() < 2 or "moe" not in doc["laws"]:
        return None
    law = Law(doc)
    section: dict = {"baseline": "E1", "variants": {}}
    for e in sorted(points["E"].unique()):
        if e != 1:
            section["variants"][f"E{int(e)}"] = multipliers(law, law, computes, E_base=1, E_variant=float(e),
                                                            total_per_active=total_per_active(points[points["E"] == e]))
    try:
        section["shared_exponent"] = shared_exponent_speedup(family_frontiers(points), "E1")
    except FitInputError as e:
        section["shared_exponent"] = {"not_fitted": str(e)}
    return section

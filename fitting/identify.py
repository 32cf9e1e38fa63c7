"""What a parametric fit's points can tell and what they cannot: refused fits, coefficients the data do not
identify, and the range the law was fitted over (so a prediction can say how far beyond it it goes).

A coefficient is not identified when the points cannot pin it down: an offset (E, sigma) that ran to its lower
bound 0 or whose bootstrap interval reaches it (the losses show no floor), gamma when every point has the same expert count, and the exponents of a
law that fits worse than a constant (r2 < 0). Its law-file section lists it in `not_identified` with the
reason and gives it no interval; printers show the reason, not the number (the number stays in `params`
because the law's formula needs it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fitting.errors import FitInputError

OFFSETS = ("E", "sigma")
EXPONENTS = ("alpha", "beta", "gamma", "alpha_N", "alpha_D")
AT_BOUND = 1e-6  # an offset below this fraction of the smallest loss has run to its bound 0
COLLINEAR = 1e-3  # (log N, log D) whose smaller singular value is below this fraction of the larger lie on a line
MIN_DISTINCT = 3


def require_separable(points: pd.DataFrame, law: str) -> None:
    """A loss surface in N and D needs several N, several D, and points that are not all on one line
    D = c N^k (one IsoFLOP budget without branches, or one tokens-per-parameter ratio): else refuse it."""
    n, d = points["N"].nunique(), points["D"].nunique()
    if n < MIN_DISTINCT or d < MIN_DISTINCT:
        raise FitInputError(f"the {law} law needs at least {MIN_DISTINCT} model sizes and {MIN_DISTINCT} token counts; "
                            f"these points have {n} and {d} (a single size or token count cannot give an exponent)")
    logs = np.log(points[["N", "D"]].to_numpy(float))
    singular = np.linalg.svd(logs - logs.mean(0), compute_uv=False)
    if singular[-1] < COLLINEAR * singular[0]:
        raise FitInputError(f"the {law} law cannot separate N from D: in these points D is a fixed power of N (one "
                            f"IsoFLOP budget, or one tokens-per-parameter ratio); add budgets or token counts")


def require_spread(points: pd.DataFrame, column: str, law: str) -> None:
    """A power law in one variable needs several values of it."""
    if points[column].nunique() < MIN_DISTINCT:
        raise FitInputError(f"the {law} law in {column} needs at least {MIN_DISTINCT} distinct {column}; these points "
                            f"have {points[column].nunique()}")


def not_identified(params: dict, ci: dict, points: pd.DataFrame, r2: float) -> dict[str, str]:
    """{coefficient: why the points do not identify it} for a fitted parametric law (ci: its bootstrap intervals)."""
    out: dict[str, str] = {}
    floor = float(points["loss"].min())
    for k in OFFSETS:
        if k in params and params[k] < AT_BOUND * floor:
            out[k] = f"at its lower bound 0 (fitted {params[k]:.2g}): these losses show no floor"
        elif k in params and ci.get(k) and ci[k][0] < AT_BOUND * floor:
            out[k] = "its bootstrap interval reaches the lower bound 0: these losses show no floor"
    if "gamma" in params and "E" in points.columns and points["E"].nunique() == 1:
        out["gamma"] = f"every point has E = {float(points['E'].iloc[0]):g} experts; gamma needs several"
        if float(points["E"].iloc[0]) != 1:
            out["A"] = "A E^-gamma is one number when E does not vary"
    if np.isfinite(r2) and r2 < 0:
        for k in EXPONENTS:
            if k in params:
                out.setdefault(k, f"the law fits worse than a constant (r2 = {r2:.2f})")
    return out


def derived_not_identified(missing: dict[str, str], derived: dict) -> dict[str, str]:
    """The derived figures (a, b, efficiency gains) that rest on a coefficient not identified."""
    out = {}
    for k in derived:
        needs = ("gamma", "alpha") if k.startswith("efficiency_gain") else ("alpha", "beta")
        why = next((f"{n} is not identified" for n in needs if n in missing), None)
        if why:
            out[k] = why
    return out


def data_range(points: pd.DataFrame) -> dict:
    """[min, max] of N, D and C over the fitted points, the expert counts, and how many budgets they span."""
    out = {c: [float(points[c].min()), float(points[c].max())] for c in ("N", "D", "C")
           if c in points.columns and points[c].notna().all()}
    if "E" in points.columns:
        out["E"] = sorted(float(e) for e in points["E"].unique())
    if "budget" in points.columns and points["budget"].notna().any():
        out["budgets"] = int(points["budget"].dropna().nunique())
    return out

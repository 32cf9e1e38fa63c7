"""The optimum of one scale's hyperparameter sweep.

A quadratic in the log of each swept knob (log lr, log batch size, or both) is fitted on the lowest-loss
runs and its vertex is the optimum: it falls between grid values, where the raw argmin cannot. When the
quadratic has no minimum inside the swept range, the argmin stands in and the reason is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAR_OPTIMAL = 0.0025  # runs within 0.25% of a scale's best loss are near-optimal (DeepSeek LLM 2024)
CI_PERCENTILES = (2.5, 97.5)


@dataclass(frozen=True)
class Optimum:
    x: np.ndarray  # the optimum: one log value per swept knob
    loss: float  # the quadratic's minimum, or the best observed loss when the argmin stands in
    flag: str | None  # why the argmin stands in, if it does


def near_optimal(loss: np.ndarray) -> np.ndarray:
    """Mask of the runs within NEAR_OPTIMAL of the best loss."""
    return loss <= loss.min() * (1 + NEAR_OPTIMAL)


def percentile_interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of bootstrap replicates, ignoring the ones that failed (NaN); None without any."""
    if np.size(values) == 0:
        return None
    lo, hi = np.nanpercentile(np.asarray(values, float), CI_PERCENTILES)
    return [float(lo), float(hi)]


def _design(u: np.ndarray, cross: bool) -> np.ndarray:
    """Columns of a quadratic in the k coordinates of u (n, k): 1, u_i, u_i^2, and u_i u_j (i < j) if `cross`."""
    k = u.shape[1]
    pairs = [(i, j) for i in range(k) for j in range(i, k) if cross or i == j]
    return np.column_stack([np.ones(len(u))] + [u[:, i] for i in range(k)] + [u[:, i] * u[:, j] for i, j in pairs])


def _gradient_and_hessian(coef: np.ndarray, k: int, cross: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gradient at u = 0 and Hessian of the quadratic whose coefficients `_design` laid out."""
    hessian = np.zeros((k, k))
    pairs = [(i, j) for i in range(k) for j in range(i, k) if cross or i == j]
    for c, (i, j) in zip(coef[1 + k:], pairs):
        hessian[i, j] += c
        hessian[j, i] += c  # doubles the diagonal: d2/du2 of c u^2 is 2c
    return coef[1:1 + k], hessian


def _fit_rows(loss: np.ndarray, n_coef: int) -> np.ndarray:
    """Indices of the runs the quadratic is fitted on: the lowest-loss ones, at least twice the coefficients and
    half the runs. A loss threshold follows a contour of the bowl, so it keeps runs on every side of the optimum."""
    m = min(len(loss), max(2 * n_coef, -(-len(loss) // 2)))
    return np.argsort(loss, kind="stable")[:m]


def _varied(x: np.ndarray) -> bool:
    """A quadratic in each coordinate needs three distinct values of it."""
    return all(len(np.unique(x[:, i])) >= 3 for i in range(x.shape[1]))


def _vertex(x: np.ndarray, loss: np.ndarray, cross: bool) -> tuple[np.ndarray, float] | str:
    """The quadratic's minimum (point, loss) in x's coordinates, or why there is none."""
    k = x.shape[1]
    center, scale = x.mean(axis=0), x.std(axis=0)
    u = (x - center) / scale  # standardized, so the design is well conditioned whatever the units
    design = _design(u, cross)
    coef, _, rank, _ = np.linalg.lstsq(design, loss, rcond=None)
    if rank < design.shape[1]:
        return "degenerate"
    gradient, hessian = _gradient_and_hessian(coef, k, cross)
    if np.linalg.eigvalsh(hessian).min() <= 0:
        return "not_convex"
    u_opt = np.linalg.solve(hessian, -gradient)
    return center + scale * u_opt, float((_design(u_opt[None], cross) @ coef)[0])


def quadratic_optimum(x: np.ndarray, loss: np.ndarray) -> Optimum:
    """Optimum of runs at log knob values x (n, k) with losses (n,): the vertex of a quadratic fitted on the
    lowest-loss runs; for two knobs without an interaction term when the runs cannot pin one down (a
    one-knob-at-a-time cross). Falls back to the argmin, flagged: too_few_values, degenerate, not_convex,
    outside_grid (the minimum lies beyond the swept values: widen the sweep)."""
    x = np.asarray(x, float).reshape(len(loss), -1)
    loss = np.asarray(loss, float)
    k = x.shape[1]
    best = int(np.argmin(loss))
    rows = _fit_rows(loss, 1 + k + k * (k + 1) // 2)
    if not _varied(x[rows]):
        rows = np.arange(len(loss))
    if not _varied(x):
        return Optimum(x[best].copy(), float(loss[best]), "too_few_values")
    found = _vertex(x[rows], loss[rows], cross=True)
    if found == "degenerate" and k > 1:
        found = _vertex(x[rows], loss[rows], cross=False)
    if isinstance(found, str):
        return Optimum(x[best].copy(), float(loss[best]), found)
    point, value = found
    if np.any(point < x.min(axis=0)) or np.any(point > x.max(axis=0)):
        return Optimum(x[best].copy(), float(loss[best]), "outside_grid")
    return Optimum(point, value, None)

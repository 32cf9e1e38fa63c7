"""Approach 3: the parametric laws (chinchilla, kaplan, moe, power) fitted as the careful replications do.

Objective: Huber loss (delta 1e-3 by default) on the residuals of log L, the prediction written as a
log-sum-exp of the law's terms, summed over points; minimised by L-BFGS from every start of a grid, the
best converged start kept. All starts (and all bootstrap replicates) run as one batch: each start is an
independent problem, so the gradient of the summed objective is every start's own gradient, and the
L-BFGS below keeps a separate history, step and convergence test per start. That turns thousands of
scipy calls (minutes) into one vectorised run (seconds).
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from fitting import laws
from fitting.bootstrap import INTERVAL_METHOD, interval, intervals, replicate_weights
from fitting.errors import FitInputError
from fitting.identify import data_range, derived_not_identified, not_identified, require_separable, require_spread
from fitting.table import check, data_hash, flops_per_param_token, groups, parametric_rows

torch_dtype = torch.float64


# ---- each law in log space: x holds the raw variables the optimiser moves ---------------------------------

def _chinchilla_log(x, logs):
    e, a, b, alpha, beta = (v[:, None] for v in x.unbind(-1))
    return torch.logaddexp(torch.logaddexp(a - alpha * logs["N"], b - beta * logs["D"]), e)


def _moe_log(x, logs):
    s, a, b, alpha, beta, gamma = (v[:, None] for v in x.unbind(-1))
    return torch.logaddexp(torch.logaddexp(a - alpha * logs["N"] - gamma * logs["E"], b - beta * logs["D"]), s)


def _kaplan_log(x, logs):
    # x = (log N_c, log D_c, alpha_N/alpha_D, alpha_D): the ratio keeps the inner exponent well scaled
    nc, dc, ratio, alpha_d = (v[:, None] for v in x.unbind(-1))
    return alpha_d * torch.logaddexp(ratio * (nc - logs["N"]), dc - logs["D"])


def _power_log(x, logs):
    e, a, alpha = (v[:, None] for v in x.unbind(-1))
    return torch.logaddexp(a - alpha * logs["x"], e)


def _power_no_offset_log(x, logs):
    a, alpha = (v[:, None] for v in x.unbind(-1))
    return (a - alpha * logs["x"]).expand(-1, logs["x"].shape[0])


@dataclass(frozen=True)
class Form:
    """A law as the optimiser sees it: log prediction, default start grid, and raw variables -> coefficients."""

    log_predict: object
    grid: dict[str, tuple[float, ...]]
    coefficients: object  # np.ndarray [S, k] -> dict[name, np.ndarray [S]]
    inputs: tuple[str, ...]


def _steps(lo: float, hi: float, step: float) -> tuple[float, ...]:
    return tuple(np.round(np.arange(lo, hi + step / 2, step), 10))


EXPONENTS, LOG_OFFSET, LOG_SCALE = _steps(0, 2, 0.5), _steps(-1, 1, 0.5), _steps(0, 25, 5)

FORMS = {
    "chinchilla": Form(
        _chinchilla_log, {"e": LOG_OFFSET, "a": LOG_SCALE, "b": LOG_SCALE, "alpha": EXPONENTS, "beta": EXPONENTS},
        lambda x: {"E": np.exp(x[:, 0]), "A": np.exp(x[:, 1]), "B": np.exp(x[:, 2]), "alpha": x[:, 3], "beta": x[:, 4]},
        ("N", "D")),
    "moe": Form(
        _moe_log, {"s": LOG_OFFSET, "a": LOG_SCALE, "b": LOG_SCALE, "alpha": EXPONENTS, "beta": EXPONENTS,
                   "gamma": (0.0, 0.5)},
        lambda x: {"sigma": np.exp(x[:, 0]), "A": np.exp(x[:, 1]), "B": np.exp(x[:, 2]), "alpha": x[:, 3],
                   "beta": x[:, 4], "gamma": x[:, 5]},
        ("N", "D", "E")),
    "kaplan": Form(
        _kaplan_log, {"log_N_c": (10.0, 20.0, 30.0, 40.0), "log_D_c": (10.0, 20.0, 30.0, 40.0),
                      "ratio": (0.5, 1.0, 2.0), "alpha_D": (0.05, 0.1, 0.3, 0.5)},
        lambda x: {"N_c": np.exp(x[:, 0]), "D_c": np.exp(x[:, 1]), "alpha_N": x[:, 2] * x[:, 3], "alpha_D": x[:, 3]},
        ("N", "D")),
    "power": Form(
        _power_log, {"e": LOG_OFFSET, "a": LOG_SCALE, "alpha": EXPONENTS},
        lambda x: {"E": np.exp(x[:, 0]), "A": np.exp(x[:, 1]), "alpha": x[:, 2]}, ("x",)),
    "power_no_offset": Form(
        _power_no_offset_log, {"a": LOG_SCALE, "alpha": EXPONENTS},
        lambda x: {"E": np.zeros(len(x)), "A": np.exp(x[:, 0]), "alpha": x[:, 1]}, ("x",)),
}

# Fewest points each law needs: one more than its coefficients, so there is a residual to judge the fit.
MIN_POINTS = {"chinchilla": 6, "moe": 7, "kaplan": 5, "power": 4, "power_no_offset": 3}


def grid_starts(grid: dict[str, tuple[float, ...]]) -> np.ndarray:
    return np.array(list(itertools.product(*grid.values())), float)


# ---- batched L-BFGS ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Batch:
    x: np.ndarray          # [S, k] final variables
    objective: np.ndarray  # [S]
    converged: np.ndarray  # [S] bool
    iterations: int


@contextmanager
def one_thread():
    """Run torch on one thread: these tensors are small, and on a busy machine a second intra-op thread
    spinning for a core made the same fit 20x slower (measured: 4 s or 85 s at random, 1 thread 6 s always)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def lbfgs(objective, x0: np.ndarray, *, max_iter: int = 1000, history: int = 10, gtol: float = 1e-5,
          ftol: float = 1e-9) -> Batch:
    """Minimise objective(x [s, k], rows [s]) -> [s] for every row of x0 independently, all in one batch
    (`rows` says which starts x holds, for objectives with per-start data such as bootstrap weights).

    Backtracking (Armijo) line search; a pair enters a start's history only when its curvature s.y > 0.
    A start has converged when its largest gradient component is below gtol, or its objective fell by
    less than ftol of itself in the last step (relative, because a Huber sum's scale depends on delta and
    the number of points); it then leaves the batch, so the work shrinks with the starts still moving.
    """
    with one_thread():
        return _lbfgs(objective, x0, max_iter=max_iter, history=history, gtol=gtol, ftol=ftol)


def _lbfgs(objective, x0: np.ndarray, *, max_iter: int, history: int, gtol: float, ftol: float) -> Batch:
    """The loop of lbfgs, on whatever threads torch has."""
    x_out = torch.tensor(x0, dtype=torch_dtype)
    S, k = x_out.shape
    f_out = torch.full((S,), float("inf"), dtype=torch_dtype)
    converged = torch.zeros(S, dtype=torch.bool)

    def value_and_grad(z, rows):
        z = z.detach().requires_grad_(True)
        f = objective(z, rows)
        (g,) = torch.autograd.grad(f.sum(), z)
        return f.detach(), g

    rows = torch.arange(S)
    x = x_out.clone()
    f, g = value_and_grad(x, rows)
    f_out[:] = f
    keep = torch.isfinite(f) & torch.isfinite(g).all(-1)
    rows, x, f, g = rows[keep], x[keep], f[keep], g[keep]
    s_hist = torch.zeros(history, len(rows), k, dtype=torch_dtype)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history, len(rows), dtype=torch_dtype)
    it = 0
    for it in range(1, max_iter + 1):
        if len(rows) == 0:
            break
        # two-loop recursion, newest pair first; empty slots have rho = 0 and change nothing
        q = g.clone()
        alphas = []
        for i in range(history):
            a_i = rho[i] * (s_hist[i] * q).sum(-1)
            q -= a_i[:, None] * y_hist[i]
            alphas.append(a_i)
        sy, yy = (s_hist[0] * y_hist[0]).sum(-1), (y_hist[0] ** 2).sum(-1)
        gamma = torch.where(rho[0] > 0, sy / yy.clamp_min(1e-300), 1.0 / g.abs().sum(-1).clamp_min(1.0))
        r = gamma[:, None] * q
        for i in reversed(range(history)):
            b_i = rho[i] * (y_hist[i] * r).sum(-1)
            r += s_hist[i] * (alphas[i] - b_i)[:, None]
        d = -r
        not_descent = ~((d * g).sum(-1) < 0)
        d[not_descent] = -g[not_descent] / g[not_descent].abs().sum(-1, keepdim=True).clamp_min(1.0)
        rho[:, not_descent] = 0.0
        slope = (d * g).sum(-1)

        step = torch.ones(len(rows), dtype=torch_dtype)
        pending = torch.ones(len(rows), dtype=torch.bool)
        x_new, f_new, g_new = x.clone(), f.clone(), g.clone()
        for _ in range(40):
            idx = pending.nonzero().squeeze(-1)
            if len(idx) == 0:
                break
            trial = x[idx] + step[idx, None] * d[idx]
            ft, gt = value_and_grad(trial, rows[idx])
            ok = torch.isfinite(ft) & (ft <= f[idx] + 1e-4 * step[idx] * slope[idx])
            x_new[idx[ok]], f_new[idx[ok]], g_new[idx[ok]] = trial[ok], ft[ok], gt[ok]
            pending[idx[ok]] = False
            # next step: the minimum of the quadratic through f(0), f'(0) and f(step), kept in [0.1, 0.5] x step
            bad, t = idx[~ok], step[idx[~ok]]
            curve = (ft[~ok] - f[bad] - slope[bad] * t) / t ** 2
            guess = torch.where(torch.isfinite(curve) & (curve > 0), -slope[bad] / (2 * curve), 0.5 * t)
            step[bad] = torch.minimum(torch.maximum(guess, 0.1 * t), 0.5 * t)
        stalled = pending  # no step decreased the objective: as far as this start gets
        s, y = x_new - x, g_new - g
        sy = (s * y).sum(-1)
        s_hist, y_hist, rho = s_hist.roll(1, 0), y_hist.roll(1, 0), rho.roll(1, 0)
        s_hist[0], y_hist[0] = s, y
        rho[0] = torch.where(~stalled & (sy > 1e-300), 1.0 / sy.clamp_min(1e-300), torch.zeros_like(sy))
        small_drop = (f - f_new) <= ftol * torch.maximum(f.abs(), f_new.abs()).clamp_min(1e-300)
        x, f, g = x_new, f_new, g_new
        flat = g.abs().amax(-1) <= gtol
        done = (~stalled & small_drop) | flat
        converged[rows[done]] = True
        x_out[rows], f_out[rows] = x, f
        go = ~(done | stalled)
        rows, x, f, g = rows[go], x[go], f[go], g[go]
        s_hist, y_hist, rho = s_hist[:, go], y_hist[:, go], rho[:, go]
    return Batch(x_out.numpy(), f_out.numpy(), converged.numpy(), it)


# ---- the fit -----------------------------------------------------------------------------------------------

def huber_objective(form: Form, logs: dict[str, torch.Tensor], log_loss: torch.Tensor, delta: float,
                    weights: torch.Tensor | None):
    """Sum over points of Huber(log prediction - log L); weights [S, n] are bootstrap counts per start."""
    def objective(x, rows):
        h = torch.nn.functional.huber_loss(form.log_predict(x, logs), log_loss.expand(len(x), -1),
                                           reduction="none", delta=delta)
        return (h if weights is None else h * weights[rows]).sum(-1)
    return objective


def _logs(points: pd.DataFrame, form: Form, x: str) -> dict[str, torch.Tensor]:
    column = {"x": x}
    return {k: torch.tensor(np.log(points[column.get(k, k)].to_numpy(float)), dtype=torch_dtype)
            for k in form.inputs}


def _distinct_optima(batch: Batch, most: int) -> np.ndarray:
    """The best converged end points that differ from each other (by more than 1e-3 in some variable)."""
    picked: list[np.ndarray] = []
    for i in np.argsort(np.where(batch.converged, batch.objective, np.inf)):
        if len(picked) == most or not (batch.converged[i] and np.isfinite(batch.objective[i])):
            break
        if all(np.abs(batch.x[i] - p).max() > 1e-3 for p in picked):
            picked.append(batch.x[i])
    return np.array(picked) if picked else batch.x[[int(np.nanargmin(batch.objective))]]


def _best(batch: Batch, starts_per_problem: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per problem (consecutive blocks of starts): the lowest objective among converged starts (any when none)."""
    f = np.where(np.isfinite(batch.objective), batch.objective, np.inf).reshape(-1, starts_per_problem)
    conv = batch.converged.reshape(-1, starts_per_problem)
    pick = np.argmin(np.where(conv, f, np.inf), axis=1)
    pick = np.where(conv.any(1), pick, np.argmin(f, axis=1))
    rows = np.arange(len(pick)) * starts_per_problem + pick
    return batch.x[rows], batch.objective[rows], conv.any(1)


# Every start of the grid runs until its objective moves by less than SEARCH_FTOL of itself (at most
# SEARCH_ITER iterations: the few that wander further, typically E -> 0, count as not converged); the best
# POLISHED distinct end points then run on to POLISH_FTOL (the winner is exact, the search is affordable).
SEARCH_FTOL, SEARCH_ITER, POLISH_FTOL, POLISH_GTOL, POLISHED = 1e-6, 300, 1e-12, 1e-10, 5
BOOTSTRAP_STARTS = 3


def fit_parametric(points: pd.DataFrame, law: str = "chinchilla", *, delta: float = 1e-3, bootstrap: int = 0,
                   resample: str = "points", seed: int = 0, x: str = "N", offset: bool = True,
                   grid: dict[str, tuple[float, ...]] | None = None, final_only: bool = True,
                   holdout_above: float | None = None) -> dict:
    """Fit one parametric law to a points table; returns its law-file section (params, ci, diagnostics, ...)."""
    name = law if law != "power" or offset else "power_no_offset"
    if name not in FORMS:
        raise FitInputError(f"--law {law!r} is not a parametric law ({', '.join(laws.PARAMS)})")
    if not delta > 0:
        raise FitInputError(f"--huber-delta {delta!r} must be positive")
    form = FORMS[name]
    columns = tuple(x if c == "x" else c for c in form.inputs) + ("loss",)
    if law == "power" and x not in ("N", "D", "C"):
        raise FitInputError(f"--x {x!r} is not one of N, D, C")
    if "E" in form.inputs and "E" not in points.columns:
        raise FitInputError("the moe law needs an 'E' column (experts; 1 for dense)")
    used, left_out = parametric_rows(points) if final_only else (points, {})
    check(used, columns)
    held = None
    if holdout_above is not None:
        held, used = split_holdout(used, holdout_above)
    if law == "power":
        require_spread(used, x, law)
    else:
        require_separable(used, law)
    if len(used) < MIN_POINTS[name]:
        raise FitInputError(f"law {law} needs at least {MIN_POINTS[name]} points, the table has {len(used)} usable"
                            + (f" (left out: {_describe(left_out)})" if left_out else ""))
    logs = _logs(used, form, x)
    log_loss = torch.tensor(np.log(used["loss"].to_numpy(float)), dtype=torch_dtype)
    unknown = set(grid or {}) - set(form.grid)
    if unknown:
        raise FitInputError(f"grid variable {sorted(unknown)[0]!r} is not one of the {law} law's {', '.join(form.grid)}")
    grid = {**form.grid, **(grid or {})}
    starts = grid_starts(grid)
    objective = huber_objective(form, logs, log_loss, delta, None)
    full = lbfgs(objective, starts, ftol=SEARCH_FTOL, max_iter=SEARCH_ITER)
    optima = _distinct_optima(full, POLISHED)
    polished = lbfgs(objective, optima, ftol=POLISH_FTOL, gtol=POLISH_GTOL)
    best_x, best_f, _ = _best(polished, len(optima))
    params = {k: float(v[0]) for k, v in form.coefficients(best_x).items()}
    residuals = form.log_predict(torch.tensor(best_x, dtype=torch_dtype), logs)[0].detach().numpy() - log_loss.numpy()
    section = {
        "law": law,
        "params": params,
        "ci": {k: None for k in params},
        "method": {"name": "huber-log-lbfgs", "objective": "sum of Huber(log prediction - log loss)",
                   "options": {"huber_delta": delta, "grid": {k: list(v) for k, v in grid.items()},
                               "resample": resample, "seed": seed, "final_only": final_only,
                               "holdout_above": holdout_above}},
        "n_points": len(used),
        "left_out": left_out,
        "data_hash": data_hash(used, columns),
        "diagnostics": {"objective": float(best_f[0]), "rmse_log": float(np.sqrt(np.mean(residuals ** 2))),
                        "r2": _r2(np.log(used["loss"].to_numpy(float)), residuals),
                        "starts": len(starts), "starts_converged": int(full.converged.sum()),
                        "iterations": full.iterations + polished.iterations},
    }
    section["data_range"] = data_range(used)
    if law == "power":
        section["method"]["options"].update(x=x, offset=offset)
    if law in ("chinchilla", "moe"):
        section["flops_per_param_token"] = flops_per_param_token(used)
    if bootstrap:
        section["bootstrap"] = _bootstrap(form, logs, log_loss, delta, full, groups(used, resample), bootstrap, seed)
        section["ci"] = intervals({k: np.array(v) for k, v in section["bootstrap"]["samples"].items()},
                                 estimates=section["params"])
        section["bootstrap"]["interval"] = INTERVAL_METHOD
    section["not_identified"] = not_identified(params, section["ci"], used, section["diagnostics"]["r2"])
    if name == "power_no_offset":  # E is fixed at 0 there, not fitted
        section["not_identified"].pop("E", None)
    if law in ("chinchilla", "moe"):
        experts = np.unique(used["E"].to_numpy(float)) if law == "moe" else np.array([])
        section["derived"], section["derived_ci"] = _derived(section, experts[experts > 1])
        section["not_identified"] |= derived_not_identified(section["not_identified"], section["derived"])
    for k in section["not_identified"]:  # no interval for a number the data do not pin down
        section.get("derived_ci" if k in section.get("derived", {}) else "ci", {})[k] = None
    if held is not None:
        section["extrapolation"] = extrapolation(section, held, holdout_above, used)
    return section


def split_holdout(points: pd.DataFrame, above: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(held out, fitted): the points with C above `above`, and the rest."""
    check(points, ("C",))
    held, used = points[points["C"] > above], points[points["C"] <= above]
    if held.empty:
        raise FitInputError(f"--holdout-above {above:g} leaves no point above it; the largest C is {used['C'].max():.3g}")
    return held, used


def _derived(section: dict, experts: np.ndarray) -> tuple[dict, dict]:
    """a = beta/(alpha+beta) and b = alpha/(alpha+beta) (N_opt ~ C^a, D_opt ~ C^b); for moe also the efficiency
    gain at each expert count E > 1: dense compute / MoE compute for the same loss, each compute-optimal.
    Under this law only A changes with E (A E^-gamma), and the optimal loss above sigma scales as
    A^(beta/(alpha+beta)) C^(-alpha beta/(alpha+beta)), so the gain is E^(gamma/alpha) at every loss."""
    def figures(p):
        alpha, beta = np.asarray(p["alpha"], float), np.asarray(p["beta"], float)
        out = {"a": beta / (alpha + beta), "b": alpha / (alpha + beta)}
        for e in experts:
            out[f"efficiency_gain_E{e:g}"] = e ** (np.asarray(p["gamma"], float) / alpha)
        return out
    point = {k: float(v) for k, v in figures(section["params"]).items()}
    samples = section.get("bootstrap", {}).get("samples")
    return point, (intervals(figures(samples), estimates=point) if samples else {k: None for k in point})


def extrapolation(section: dict, held: pd.DataFrame, above: float, fitted: pd.DataFrame) -> dict:
    """Each held-out point's actual loss against the law's prediction and its bootstrap interval, the error
    summaries (relative error = predicted / actual - 1), and how far beyond its data the law extrapolated:
    factor = largest held-out C / largest fitted C (the compute points reached, not the budget of their trial:
    a trial's intermediate and branch points sit at a fraction of its budget)."""
    E = held["E"].to_numpy(float) if "E" in held.columns and section["law"] == "moe" else 1.0
    U = held["unique_tokens"].to_numpy(float) if section["law"] == "data_constrained" else None
    N, D = held["N"].to_numpy(float), held["D"].to_numpy(float)
    predicted = laws.surface_loss(section["law"], section["params"], N, D, E, U)
    samples = section.get("bootstrap", {}).get("samples")
    spread = (laws.surface_loss(section["law"], {k: np.asarray(v)[:, None] for k, v in samples.items()}, N, D, E, U)
              if samples else None)
    rows = []
    for i, actual in enumerate(held["loss"].to_numpy(float)):
        band = interval(spread[:, i], estimate=predicted[i]) if spread is not None else None
        rows.append({"N": float(N[i]), "D": float(D[i]), "C": float(held["C"].iloc[i]), "loss": float(actual),
                     "predicted": float(predicted[i]), "interval": band,
                     "relative_error": float(predicted[i] / actual - 1),
                     "covered": None if band is None else bool(band[0] <= actual <= band[1])})
    errors = np.array([r["relative_error"] for r in rows])
    fitted_max, held_out_max = float(fitted["C"].max()), float(held["C"].max())
    return {"holdout_above": float(above), "n_held_out": len(rows),
            "mean_abs_relative_error": float(np.abs(errors).mean()), "max_abs_relative_error": float(np.abs(errors).max()),
            "rms_relative_error": float(np.sqrt(np.mean(errors ** 2))), "mean_relative_error": float(errors.mean()),
            "fitted_max_C": fitted_max, "held_out_max_C": held_out_max, "factor": held_out_max / fitted_max,
            "points": rows}


def _bootstrap(form: Form, logs, log_loss, delta: float, full: Batch, row_groups: np.ndarray,
               replicates: int, seed: int) -> dict:
    """Refit on resampled points (or trials), each replicate started from the full fit's best distinct optima."""
    starts = _distinct_optima(full, BOOTSTRAP_STARTS)
    weights = torch.tensor(replicate_weights(row_groups, replicates, seed), dtype=torch_dtype)
    per_start = weights.repeat_interleave(len(starts), 0)
    batch = lbfgs(huber_objective(form, logs, log_loss, delta, per_start), np.tile(starts, (replicates, 1)))
    x, _, converged = _best(batch, len(starts))
    samples = form.coefficients(x[converged])
    return {"replicates": replicates, "converged": int(converged.sum()), "resample": "points" if
            row_groups.max() + 1 == len(row_groups) else "trials",
            "samples": {k: [float(v) for v in vs] for k, vs in samples.items()}}


def _r2(log_loss: np.ndarray, residuals: np.ndarray) -> float:
    total = np.sum((log_loss - log_loss.mean()) ** 2)
    return float(1 - np.sum(residuals ** 2) / total) if total > 0 else float("nan")


def _describe(left_out: dict[str, int]) -> str:
    return ", ".join(f"{n} {why}" for why, n in left_out.items())

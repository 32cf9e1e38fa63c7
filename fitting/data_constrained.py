"""The data-constrained law (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models"):
L = E + A / N'^alpha + B / D'^beta, where D' is the effective data of D tokens drawn from U unique ones and
N' the effective parameters of N beyond U_N, the compute-optimal size for U tokens (fitting/laws.py).

Fitted as the parametric laws are (fitting/parametric.py: Huber loss on log L, batched L-BFGS from several
starts, bootstrap as replicate weights), in one of two ways:
- joint: all seven coefficients at once, started from a chinchilla fit crossed with a grid of R_D*, R_N*;
- two-stage (the paper's): the chinchilla coefficients on the single-epoch points (D <= U, where D' = D and,
  for these, N' = N up to the compute-optimal size), then R_D* and R_N* on all points with those fixed. Its
  bootstrap pairs each stage-1 replicate with an independent resample of all points for stage 2 (stage 1
  saw a subset of the same points, so the intervals err wide).
The paper's values on its data: R_D* about 15.4, R_N* about 5.3.

`optimal_under_data` is the compute-optimal allocation when only U unique tokens exist.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from fitting import laws
from fitting.bootstrap import intervals, replicate_weights
from fitting.errors import FitInputError
from fitting.identify import not_identified
from fitting.parametric import (MIN_POINTS, POLISH_FTOL, POLISH_GTOL, SEARCH_FTOL, SEARCH_ITER, Form,
                                _best, _bootstrap, _distinct_optima, _r2, extrapolation, fit_parametric,
                                huber_objective, lbfgs, split_holdout, torch_dtype)
from fitting.table import check, data_hash, flops_per_param_token, groups, parametric_rows

FITS = ("joint", "two-stage")
R_STARTS = (2.0, 8.0, 32.0)  # starts of R_D* and R_N*, crossed: the paper's 15.4 and 5.3 lie inside
R_VISIBLE = 10.0  # an R* above this many times the points' largest repetition leaves under 5% trace in them
COLUMNS = ("N", "D", "unique_tokens", "loss")


def _log_effective(log_unique, log_total, log_r_star):
    """log of laws.effective, differentiable in log R*."""
    log_unique = torch.minimum(log_unique, log_total)
    repeats = torch.expm1(log_total - log_unique)
    r_star = torch.exp(log_r_star)
    return log_unique + torch.log1p(-r_star * torch.expm1(-repeats / r_star))


def _log_predict(x, logs):
    """x = (log E, log A, log B, alpha, beta, log R_D*, log R_N*) per start; logs of N, D, U per point."""
    e, a, b, alpha, beta, log_rd, log_rn = (v[:, None] for v in x.unbind(-1))
    log_d = _log_effective(logs["U"], logs["D"], log_rd)
    al, be = alpha.clamp_min(1e-3), beta.clamp_min(1e-3)  # G's exponent 1/(alpha+beta): keep it finite mid-search
    log_g = (torch.log(al) + a - torch.log(be) - b) / (al + be)
    log_u_n = torch.minimum(logs["N"], (1 + be / al) * log_g + be / al * logs["U"])
    log_n = _log_effective(log_u_n, logs["N"], log_rn)
    return torch.logaddexp(torch.logaddexp(a - alpha * log_n, b - beta * log_d), e)


def _coefficients(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"E": np.exp(x[:, 0]), "A": np.exp(x[:, 1]), "B": np.exp(x[:, 2]), "alpha": x[:, 3], "beta": x[:, 4],
            "R_D_star": np.exp(x[:, 5]), "R_N_star": np.exp(x[:, 6])}


JOINT = Form(_log_predict, {}, _coefficients, ("N", "D", "U"))


def _stage2_objective(logs, log_loss, delta: float, base: torch.Tensor, weights: torch.Tensor | None, starts: int):
    """Huber objective of (log R_D*, log R_N*) with the chinchilla coefficients fixed: base [problems, 5] (and
    weights [problems, points]), start `row` solving problem row // starts."""
    def objective(x, rows):
        problem = rows // starts
        full = torch.cat([base[problem], x], -1)
        h = torch.nn.functional.huber_loss(_log_predict(full, logs), log_loss.expand(len(x), -1),
                                           reduction="none", delta=delta)
        return (h if weights is None else h * weights[problem]).sum(-1)
    return objective


def _stage2(logs, log_loss, delta: float, base: np.ndarray, weights: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Best (log R_D*, log R_N*) per row of base (and of weights, when given) from the R_STARTS grid."""
    starts = np.log(np.array([(rd, rn) for rd in R_STARTS for rn in R_STARTS]))
    objective = _stage2_objective(logs, log_loss, delta, torch.tensor(base, dtype=torch_dtype),
                                  None if weights is None else torch.tensor(weights, dtype=torch_dtype), len(starts))
    batch = lbfgs(objective, np.tile(starts, (len(base), 1)), ftol=POLISH_FTOL, gtol=POLISH_GTOL)
    x, _, converged = _best(batch, len(starts))
    return x, converged


def _base_start(section: dict) -> np.ndarray:
    p = section["params"]
    return np.array([np.log(p["E"]), np.log(p["A"]), np.log(p["B"]), p["alpha"], p["beta"]])


def _single_epoch(points: pd.DataFrame) -> pd.DataFrame:
    return points[points["D"] <= points["unique_tokens"]]


def _unrepeated(single: pd.DataFrame, delta: float, grid: dict | None) -> pd.DataFrame:
    """The points where the law is plain chinchilla (D' = D, N' = N), for the two-stage fit's first stage: single
    epoch, and N at most U_N. U_N needs the law, so a chinchilla fit on the single-epoch points decides it."""
    need = MIN_POINTS["chinchilla"]
    if len(single) < need:
        raise FitInputError(f"--fit-stages two-stage fits its base law on single-epoch points (D <= unique_tokens) "
                            f"and needs {need}; this table has {len(single)}: use --fit-stages joint")
    first = fit_parametric(single, "chinchilla", delta=delta, final_only=False, grid=grid)["params"]
    u_n = laws.optimal_params_for_data(single["unique_tokens"].to_numpy(float),
                                       **{k: first[k] for k in ("A", "B", "alpha", "beta")})
    within = single[single["N"].to_numpy(float) <= u_n]
    return within if len(within) >= need else single


def fit_data_constrained(points: pd.DataFrame, *, fit: str = "joint", delta: float = 1e-3, bootstrap: int = 0,
                         resample: str = "points", seed: int = 0, final_only: bool = True,
                         grid: dict[str, tuple[float, ...]] | None = None, holdout_above: float | None = None) -> dict:
    """Fit the data-constrained law to a points table with N, D, unique_tokens and loss; its law-file section.
    grid: starts of the chinchilla fit the joint fit starts from (the base law of the two-stage fit).
    holdout_above: fit on the points with C at most this and report how it predicts the rest (the section's
    extrapolation, as fitting.parametric's)."""
    if fit not in FITS:
        raise FitInputError(f"--fit-stages {fit!r} is not one of {', '.join(FITS)}")
    used, left_out = parametric_rows(points) if final_only else (points, {})
    if "unique_tokens" not in used.columns:
        raise FitInputError("the data_constrained law needs a 'unique_tokens' column (distinct training tokens of "
                            "each point's trial); sweeps with data.unique_tokens, or re-exported ones, have it")
    check(used, COLUMNS)
    held = None
    if holdout_above is not None:
        held, used = split_holdout(used, holdout_above)
    if len(used) < MIN_POINTS["chinchilla"] + 2:
        raise FitInputError(f"law data_constrained needs at least {MIN_POINTS['chinchilla'] + 2} points, the table "
                            f"has {len(used)} usable")
    single = _single_epoch(used)
    if fit == "two-stage":
        base_rows = _unrepeated(single, delta, grid)
    else:
        base_rows = single if len(single) >= MIN_POINTS["chinchilla"] else used
    logs = {k: torch.tensor(np.log(used[c].to_numpy(float)), dtype=torch_dtype)
            for k, c in (("N", "N"), ("D", "D"), ("U", "unique_tokens"))}
    log_loss = torch.tensor(np.log(used["loss"].to_numpy(float)), dtype=torch_dtype)
    base = fit_parametric(base_rows, "chinchilla", delta=delta, final_only=False, grid=grid,
                          bootstrap=bootstrap if fit == "two-stage" else 0, resample=resample, seed=seed)
    row_groups = groups(used, resample)
    if fit == "joint":
        starts = np.array([np.r_[_base_start(base), np.log(rd), np.log(rn)] for rd in R_STARTS for rn in R_STARTS])
        objective = huber_objective(JOINT, logs, log_loss, delta, None)
        search = lbfgs(objective, starts, ftol=SEARCH_FTOL, max_iter=SEARCH_ITER)
        optima = _distinct_optima(search, 3)
        polished = lbfgs(objective, optima, ftol=POLISH_FTOL, gtol=POLISH_GTOL)
        best_x, best_f, _ = _best(polished, len(optima))
        boot = _bootstrap(JOINT, logs, log_loss, delta, search, row_groups, bootstrap, seed) if bootstrap else None
    else:
        r, _ = _stage2(logs, log_loss, delta, _base_start(base)[None], None)
        best_x = np.c_[_base_start(base)[None], r]
        best_f = huber_objective(JOINT, logs, log_loss, delta, None)(torch.tensor(best_x), None).numpy()
        boot = _two_stage_bootstrap(base, logs, log_loss, delta, row_groups, bootstrap, seed) if bootstrap else None
    params = {k: float(v[0]) for k, v in _coefficients(best_x).items()}
    residuals = _log_predict(torch.tensor(best_x, dtype=torch_dtype), logs)[0].numpy() - log_loss.numpy()
    section = {
        "law": "data_constrained",
        "params": params,
        "ci": {k: None for k in params},
        "method": {"name": "huber-log-lbfgs", "objective": "sum of Huber(log prediction - log loss)",
                   "reference": "Muennighoff et al. 2023, Scaling Data-Constrained Language Models",
                   "options": {"fit": fit, "huber_delta": delta, "R_starts": list(R_STARTS), "resample": resample,
                               "seed": seed, "final_only": final_only, "holdout_above": holdout_above}},
        "n_points": len(used),
        "n_single_epoch": len(single),
        "n_base": len(base_rows),  # points of the chinchilla fit it started from (two-stage: its first stage)
        "left_out": left_out,
        "data_hash": data_hash(used, COLUMNS),
        "diagnostics": {"objective": float(best_f[0]), "rmse_log": float(np.sqrt(np.mean(residuals ** 2))),
                        "r2": _r2(log_loss.numpy(), residuals), "max_epochs": float((used["D"] / used["unique_tokens"]).max())},
        "flops_per_param_token": flops_per_param_token(used),
    }
    if boot is not None:
        section["bootstrap"] = boot
        section["ci"] = intervals({k: np.array(v) for k, v in boot["samples"].items()}, estimates=params)
    section["not_identified"] = _not_identified(used, params, section["ci"], section["diagnostics"]["r2"])
    for name in section["not_identified"]:
        section["ci"][name] = None  # the replicates only echo their start or the bound: no interval to give
    if held is not None:
        section["extrapolation"] = extrapolation(section, held, holdout_above, used)
    return section


def _not_identified(points: pd.DataFrame, params: dict, ci: dict, r2: float) -> dict[str, str]:
    """What the points cannot determine, and why: the offset and exponents as for every parametric law
    (fitting/identify.py), and the R*, which the law only reads off repeated data (R_D*) and models larger than
    compute-optimal for their unique tokens (R_N*), and only up to a few times the most repetition the points
    reach: beyond R_VISIBLE times that, (1 - exp(-R / R*)) R* differs from R by under 5% and no point can tell."""
    out = not_identified(params, ci, points, r2)
    u_n = laws.optimal_params_for_data(points["unique_tokens"].to_numpy(float), **{k: params[k] for k in ("A", "B", "alpha", "beta")})
    excess = {"R_D_star": float((points["D"] / points["unique_tokens"] - 1).max()),
              "R_N_star": float((points["N"].to_numpy(float) / u_n - 1).max())}
    what = {"R_D_star": ("no point repeats its data (D > unique_tokens): the law cannot tell what repetition costs",
                         "epochs past the first"),
            "R_N_star": ("no point has more parameters than compute-optimal for its unique tokens: the law cannot "
                         "tell what excess parameters are worth", "excess parameters over compute-optimal")}
    for k, (none, unit) in what.items():
        if excess[k] <= 0:
            out[k] = none
        elif params[k] > R_VISIBLE * excess[k]:
            out[k] = (f"fitted {params[k]:.3g}, beyond {R_VISIBLE:g}x the most {unit} the points reach "
                      f"({excess[k]:.3g}): they show no decay, only that it is slower than that")
    return out


def _two_stage_bootstrap(base: dict, logs, log_loss, delta: float, row_groups: np.ndarray, replicates: int,
                         seed: int) -> dict:
    """Stage 2 refitted on each stage-1 replicate, each with its own resample of all points."""
    samples = {k: np.asarray(v, float) for k, v in base["bootstrap"]["samples"].items()}
    with np.errstate(divide="ignore"):  # a replicate whose E ran to 0 gives -inf, and L-BFGS drops it
        base_x = np.c_[np.log(samples["E"]), np.log(samples["A"]), np.log(samples["B"]), samples["alpha"], samples["beta"]]
    weights = replicate_weights(row_groups, replicates, seed + 1)[: len(base_x)]
    r, converged = _stage2(logs, log_loss, delta, base_x, weights)
    x = np.c_[base_x, r][converged]
    return {"replicates": replicates, "converged": int(converged.sum()), "resample": base["bootstrap"]["resample"],
            "samples": {k: [float(v) for v in vs] for k, vs in _coefficients(x).items()}}


def optimal_under_data(params: dict, C, U, *, flops_per_param_token: float = 6.0) -> dict:
    """The compute-optimal N, D (= C / (k N)) and loss at compute C when only U unique tokens exist, epochs
    D / U, and loss_lost: that loss minus the law's optimum with unlimited data (D' = D). params may hold
    arrays (one entry per bootstrap replicate): the minimum is searched on a grid of log N (4 decades either
    side of the unlimited optimum, 2000 steps a decade) and refined by the parabola through its neighbours."""
    p = {k: np.atleast_1d(np.asarray(params[k], float))[:, None] for k in laws.PARAMS["data_constrained"]}
    base = {k: p[k] for k in laws.PARAMS["chinchilla"]}
    unlimited = laws.optimal_allocation(C, **base, flops_per_param_token=flops_per_param_token)
    log_n = np.log(unlimited["N_opt"]) + np.linspace(-4, 4, 16001) * np.log(10)

    def loss_at(log_n):
        N = np.exp(log_n)
        return laws.data_constrained(N, C / (flops_per_param_token * N), U, **p)

    losses = loss_at(log_n)
    i = np.clip(np.nanargmin(np.where(np.isfinite(losses), losses, np.inf), axis=1), 1, log_n.shape[1] - 2)
    rows = np.arange(len(i))
    y0, y1, y2 = losses[rows, i - 1], losses[rows, i], losses[rows, i + 1]
    step = log_n[rows, i + 1] - log_n[rows, i]
    curve = y0 - 2 * y1 + y2
    shift = np.where(curve > 0, 0.5 * (y0 - y2) / np.where(curve > 0, curve, 1.0), 0.0)
    best = log_n[rows, i] + np.clip(shift, -1, 1) * step
    N = np.exp(best)
    D = C / (flops_per_param_token * N)
    loss = loss_at(best[:, None])[:, 0]
    out = {"N_opt": N, "D_opt": D, "loss": loss, "tokens_per_param": D / N, "epochs": D / U,
           "loss_lost": loss - unlimited["loss"][:, 0]}
    return out if np.ndim(params["E"]) else {k: float(v[0]) for k, v in out.items()}

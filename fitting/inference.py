"""The inference-aware optimum (Sardana et al. 2024, "Beyond Chinchilla-Optimal"): the model that reaches a loss
L with the least training plus inference FLOPs, for T tokens of inference over its lifetime.

On a chinchilla law L = E + A/N^alpha + B/D^beta, the models that reach L form the curve
N(D) = (A / (L - E - B/D^beta))^(1/alpha); along it the lifetime cost is k N D (training) + (k/3) N T
(inference: a forward pass is a third of forward + backward; k = 6 gives the paper's 6 N D + 2 N T, an exact k
gives the exact forward). Its minimum over D is where d log N / d log D = -D / (D + T/3), one root found by brentq.
The Chinchilla-optimal model for the same L is the training-only optimum (fitting/laws.py); `saving` is the
fraction of lifetime FLOPs the inference-aware model saves against it.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import brentq

from fitting import laws

KEYS = ("N_opt", "D_opt", "tokens_per_param", "training_flops", "inference_flops", "total_flops",
        "chinchilla_N", "chinchilla_D", "chinchilla_total_flops", "saving")
LOG_D_SPAN = 80.0  # natural-log decades searched above the least D that can reach L: far beyond any real T


def params_for_loss(L: float, D, *, E, A, B, alpha, beta):
    """The N that reaches loss L after D tokens (NaN where D alone cannot get below L)."""
    gap = L - E - B / np.power(D, beta)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, np.power(A / gap, 1.0 / alpha), np.nan)


def inference_optimal(L: float, T: float, *, E, A, B, alpha, beta, flops_per_param_token: float = 6.0) -> dict:
    """N, D, FLOPs of the lifetime-optimal model for loss L and T inference tokens, beside the Chinchilla-optimal
    model for L; every value NaN when the law cannot reach L (L at or below E)."""
    coef = dict(E=E, A=A, B=B, alpha=alpha, beta=beta)
    if not (np.isfinite(L) and L > E and all(np.isfinite(v) and v > 0 for v in (A, B, alpha, beta))):
        return {k: float("nan") for k in KEYS}
    k, per_token = flops_per_param_token, flops_per_param_token / 3.0
    u_min = np.log(B / (L - E)) / beta  # log D below which no N reaches L

    def slope_gap(u):  # d log N / d log D + D / (D + T/3): negative left of the optimum, positive right of it
        tail = B * np.exp(-beta * u)
        return -(beta * tail) / (alpha * (L - E - tail)) + 1.0 / (1.0 + per_token * T / (k * np.exp(u)))

    u = brentq(slope_gap, u_min + 1e-9, u_min + LOG_D_SPAN, xtol=1e-12, rtol=1e-12)
    D = float(np.exp(u))
    N = float(params_for_loss(L, D, **coef))
    C_chin = laws.compute_for_loss(L, **coef, flops_per_param_token=k)
    chin = laws.optimal_allocation(C_chin, **coef, flops_per_param_token=k)
    train, infer = k * N * D, per_token * N * T
    chin_total = C_chin + per_token * float(chin["N_opt"]) * T
    return {"N_opt": N, "D_opt": D, "tokens_per_param": D / N, "training_flops": train, "inference_flops": infer,
            "total_flops": train + infer, "chinchilla_N": float(chin["N_opt"]), "chinchilla_D": float(chin["D_opt"]),
            "chinchilla_total_flops": chin_total, "saving": 1.0 - (train + infer) / chin_total}


def inference_optimal_replicates(L: float, T: float, replicates: dict, flops_per_param_token: float = 6.0) -> dict:
    """inference_optimal for each bootstrap replicate's coefficients (arrays), as arrays per key."""
    n = len(np.asarray(replicates["alpha"]))
    rows = [inference_optimal(L, T, **{c: float(np.asarray(v)[i]) for c, v in replicates.items()},
                              flops_per_param_token=flops_per_param_token) for i in range(n)]
    return {key: np.array([r[key] for r in rows]) for key in KEYS}

"""The law forms, as pure numpy functions of named coefficients, and what follows from them in closed form.

Loss is in nats per token; N, D, C and E as in fitting/points.py. Compute-optimal allocation assumes
C = k N D with k FLOPs per parameter per token (6 under the 6N convention; the law file records k).
"""

from __future__ import annotations

import numpy as np

from fitting.errors import FitInputError

# Coefficients each law has, in the order the fitters use.
PARAMS = {
    "chinchilla": ("E", "A", "B", "alpha", "beta"),
    "kaplan": ("N_c", "D_c", "alpha_N", "alpha_D"),
    "moe": ("sigma", "A", "B", "alpha", "beta", "gamma"),
    "power": ("E", "A", "alpha"),
    "data_constrained": ("E", "A", "B", "alpha", "beta", "R_D_star", "R_N_star"),
}


def chinchilla(N, D, *, E, A, B, alpha, beta):
    """L = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022)."""
    return E + A / np.power(N, alpha) + B / np.power(D, beta)


def kaplan(N, D, *, N_c, D_c, alpha_N, alpha_D):
    """L = [(N_c / N)^(alpha_N / alpha_D) + D_c / D]^alpha_D (Kaplan et al. 2020)."""
    return np.power(np.power(N_c / np.asarray(N, float), alpha_N / alpha_D) + D_c / np.asarray(D, float), alpha_D)


def moe(N, D, E_experts=1, *, sigma, A, B, alpha, beta, gamma):
    """L = A / (N^alpha E^gamma) + B / D^beta + sigma (Wang et al. 2024); E = 1 is dense."""
    return A / (np.power(N, alpha) * np.power(E_experts, gamma)) + B / np.power(D, beta) + sigma


def power(x, *, E=0.0, A, alpha):
    """L = E + A x^-alpha, x being N, D or C; E = 0 is the law without an offset."""
    return E + A / np.power(x, alpha)


def effective(unique, total, r_star):
    """Muennighoff et al. 2023 eq. 5: U + U R* (1 - exp(-R / R*)), R = total / U - 1 the repetitions past the
    first pass (none when total <= U, which is then all unique): repeated tokens (or excess parameters) are worth less and less, and
    never more than R* times U."""
    total = np.asarray(total, float)
    unique = np.minimum(np.asarray(unique, float), total)  # fewer than U: all of them unique, D' = D
    return unique + unique * r_star * -np.expm1(-(total / unique - 1.0) / r_star)


def optimal_params_for_data(U, *, A, B, alpha, beta):
    """U_N: the compute-optimal N of the chinchilla law for D_opt = U tokens (Muennighoff et al. 2023, 3.2):
    from D_opt = (C/k)^b / G and N_opt = G (C/k)^a, N_opt = G^(1 + beta/alpha) U^(beta/alpha)."""
    alpha, beta = np.asarray(alpha, float), np.asarray(beta, float)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    return G ** (1.0 + beta / alpha) * np.asarray(U, float) ** (beta / alpha)


def data_constrained(N, D, U, *, E, A, B, alpha, beta, R_D_star, R_N_star):
    """L = E + A / N'^alpha + B / D'^beta with D' = effective(U, D, R_D*) and N' = effective(U_N, N, R_N*),
    U_N = min(optimal_params_for_data(U), N) (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models")."""
    u_n = np.minimum(optimal_params_for_data(U, A=A, B=B, alpha=alpha, beta=beta), np.asarray(N, float))
    return chinchilla(effective(u_n, N, R_N_star), effective(U, D, R_D_star), E=E, A=A, B=B, alpha=alpha, beta=beta)


def as_dense(law: str, params: dict, E_experts: float = 1.0) -> dict:
    """chinchilla coefficients of a chinchilla or moe law at a fixed number of experts."""
    if law == "chinchilla":
        return {k: params[k] for k in PARAMS["chinchilla"]}
    if law == "moe":
        return {"E": params["sigma"], "A": params["A"] * E_experts ** -params["gamma"], "B": params["B"],
                "alpha": params["alpha"], "beta": params["beta"]}
    raise FitInputError(f"law {law!r} has no loss surface in N and D; use a chinchilla or moe law")


def optimal_allocation(C, *, E, A, B, alpha, beta, flops_per_param_token: float = 6.0) -> dict:
    """Closed-form minimum of E + A/N^alpha + B/D^beta subject to C = k N D (Hoffmann et al. eq. 4).

    N_opt = G (C/k)^a, D_opt = (C/k)^b / G with G = (alpha A / (beta B))^(1/(alpha+beta)),
    a = beta/(alpha+beta), b = alpha/(alpha+beta).
    """
    C = np.asarray(C, float)
    alpha, beta = np.asarray(alpha, float), np.asarray(beta, float)  # numpy powers: NaN, not complex, for a negative base
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    per = C / flops_per_param_token
    n_opt, d_opt = G * per ** a, per ** b / G
    return {"N_opt": n_opt, "D_opt": d_opt, "loss": chinchilla(n_opt, d_opt, E=E, A=A, B=B, alpha=alpha, beta=beta),
            "tokens_per_param": d_opt / n_opt, "a": a, "b": b}


def compute_for_loss(L, *, E, A, B, alpha, beta, flops_per_param_token: float = 6.0):
    """The least compute whose optimal allocation reaches loss L.

    Along the optimal path L - E = (A G^-alpha + B G^beta) (C/k)^-(alpha beta/(alpha+beta)), so C inverts in closed form.
    Scalars give a float (an unreachable L raises); arrays (bootstrap replicates) give NaN where L is not above E.
    """
    if np.ndim(L) == 0 and np.ndim(E) == 0 and not L > E:
        raise FitInputError(f"loss {L:g} is not above the law's irreducible loss E = {E:.4g}; ask for a larger loss")
    alpha, beta = np.asarray(alpha, float), np.asarray(beta, float)
    G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
    scale = A * G ** -alpha + B * G ** beta
    gap = np.asarray(L - E, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        C = flops_per_param_token * np.where(gap > 0, scale / gap, np.nan) ** ((alpha + beta) / (alpha * beta))
    return float(C) if np.ndim(C) == 0 else C


SURFACES = ("moe", "chinchilla", "kaplan")  # laws that give L(N, D[, E]); a law file's loss uses the first it has


def surface_loss(law: str, params: dict, N, D, E_experts=1.0, U=None):
    """L(N, D, E) of a chinchilla, kaplan or moe law, or L(N, D, U) of a data_constrained one (U: unique tokens);
    params may hold arrays (one entry per bootstrap replicate)."""
    N, D, E_experts = (np.asarray(v, float) for v in (N, D, E_experts))
    if law == "moe":
        return moe(N, D, E_experts, **{k: params[k] for k in PARAMS["moe"]})
    if law == "data_constrained":
        if U is None:
            raise FitInputError("the data_constrained law needs the unique tokens U of each point")
        return data_constrained(N, D, np.asarray(U, float), **{k: params[k] for k in PARAMS["data_constrained"]})
    if np.any(E_experts != 1):
        raise FitInputError(f"the {law} law has no experts term; give E = 1 or fit --law moe")
    if law == "chinchilla":
        return chinchilla(N, D, **{k: params[k] for k in PARAMS["chinchilla"]})
    if law == "kaplan":
        return kaplan(N, D, **{k: params[k] for k in PARAMS["kaplan"]})
    raise FitInputError(f"law {law!r} gives no loss at (N, D); use one of {', '.join(SURFACES)}")

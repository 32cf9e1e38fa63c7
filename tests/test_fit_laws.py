"""Law forms and closed forms against published figures and independent numerical references."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from fitting import laws
from fitting.errors import FitInputError

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def test_hoffmann_closed_form_at_chinchilla_compute():
    # Hoffmann et al. (2022), approach 3 with the rounded coefficients: N_opt ~ 3.2e10 at 5.76e23 FLOPs
    opt = laws.optimal_allocation(5.76e23, **HOFFMANN)
    assert opt["N_opt"] == pytest.approx(3.2e10, rel=0.02)
    assert 6 * opt["N_opt"] * opt["D_opt"] == pytest.approx(5.76e23)
    assert opt["a"] == pytest.approx(0.28 / 0.62) and opt["b"] == pytest.approx(0.34 / 0.62)


def test_closed_form_is_the_numerical_minimum_on_the_compute_line():
    C = 1e21
    loss_at = lambda log_n: laws.chinchilla(np.exp(log_n), C / (6 * np.exp(log_n)), **HOFFMANN)
    best = minimize_scalar(loss_at, bounds=(np.log(1e6), np.log(1e13)), method="bounded", options={"xatol": 1e-10})
    opt = laws.optimal_allocation(C, **HOFFMANN)
    assert opt["N_opt"] == pytest.approx(np.exp(best.x), rel=1e-4)
    assert opt["loss"] == pytest.approx(best.fun, rel=1e-9)


def test_compute_for_loss_inverts_the_optimal_loss():
    for C in (1e18, 5.76e23, 1e26):
        loss = float(laws.optimal_allocation(C, **HOFFMANN)["loss"])
        assert laws.compute_for_loss(loss, **HOFFMANN) == pytest.approx(C, rel=1e-9)
    with pytest.raises(FitInputError, match="irreducible"):
        laws.compute_for_loss(1.5, **HOFFMANN)


def test_kaplan_and_moe_forms():
    # Kaplan et al. (2020) coefficients; at D -> infinity L = (N_c / N)^alpha_N
    k = dict(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095)
    assert laws.kaplan(1e9, 1e40, **k) == pytest.approx((8.8e13 / 1e9) ** 0.076, rel=1e-9)
    m = dict(sigma=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28, gamma=0.1)
    dense = laws.as_dense("moe", m, 8)
    assert laws.moe(1e9, 1e11, 8, **m) == pytest.approx(laws.chinchilla(1e9, 1e11, **dense))
    assert laws.moe(1e9, 1e11, 1, **m) == pytest.approx(laws.chinchilla(1e9, 1e11, E=1.7, A=400.0, B=410.0,
                                                                           alpha=0.34, beta=0.28))


def test_surface_loss_refuses_experts_for_a_dense_law():
    with pytest.raises(FitInputError, match="no experts term"):
        laws.surface_loss("chinchilla", HOFFMANN, 1e9, 1e11, 8)

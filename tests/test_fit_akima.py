"""Approach 2 without the parabola's shape (fitting/isoflop.py): Akima minima of asymmetric IsoFLOP profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, laws
from fitting.isoflop import akima_minimum, quadratic_minimum

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
TRUE_A = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
BUDGETS = np.logspace(18, 21, 4)


def drifting_grid(noise=0.0005, seed=0) -> pd.DataFrame:
    """11 sizes a budget over 3 decades whose centre drifts from 0.8 decades below the optimum to 0.8 above
    as the budget grows: the profile is asymmetric, so a parabola's vertex drifts with the window."""
    rng, rows = np.random.default_rng(seed), []
    for C, centre in zip(BUDGETS, np.linspace(-0.8, 0.8, len(BUDGETS))):
        n_opt = laws.optimal_allocation(C, **HOFFMANN)["N_opt"]
        for N in n_opt * np.logspace(centre - 1.5, centre + 1.5, 11):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "C": C, "budget": C,
                         "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_akima_finds_the_minimum_of_an_asymmetric_profile_where_the_parabola_misses():
    C = 1e20
    n_opt = laws.optimal_allocation(C, **HOFFMANN)["N_opt"]
    N = n_opt * np.logspace(-1.5, 1.5, 9)
    loss = laws.chinchilla(N, C / (6 * N), **HOFFMANN)
    akima, parabola = (abs(np.log(f(np.log(N), loss)["N_opt"] / n_opt)) for f in (akima_minimum, quadratic_minimum))
    assert akima < 0.02 and parabola > 2 * akima


def test_the_akima_frontier_recovers_the_exponent_the_drifting_parabola_biases():
    section = fit_law(drifting_grid(), "isoflop", bootstrap=20)
    parabola_a, akima = section["params"]["a"], section["akima"]
    assert akima["params"]["a"] == pytest.approx(TRUE_A, abs=0.01)
    assert abs(akima["params"]["a"] - TRUE_A) < abs(parabola_a - TRUE_A) / 4
    low, high = akima["ci"]["a"]
    assert low <= TRUE_A <= high
    assert akima["a_parabola_minus_akima"] == pytest.approx(parabola_a - akima["params"]["a"])
    for budget in section["budgets"]:
        n_opt = laws.optimal_allocation(budget["C"], **HOFFMANN)["N_opt"]
        assert abs(np.log(budget["akima_N_opt"] / n_opt)) < 0.05
        assert budget["window_shift_akima"] < budget["window_shift_quadratic"]  # the window moves the parabola more

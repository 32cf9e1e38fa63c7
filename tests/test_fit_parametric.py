"""Approach 3: recover known coefficients from data generated with them plus 1% noise."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, laws
from fitting.errors import FitInputError
from fitting.parametric import fit_parametric

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
ONE_START = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}  # far from the truth


def chinchilla_points(seed: int, sizes: int = 10, tokens: int = 25, noise: float = 0.01) -> pd.DataFrame:
    """A realistic grid (N 1e7..1e11, D 1e9..1e13) with multiplicative noise."""
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(7, 11, sizes), tokens)
    D = np.tile(np.logspace(9, 13, tokens), sizes)
    loss = laws.chinchilla(N, D, **HOFFMANN) * (1 + noise * rng.standard_normal(N.size))
    return pd.DataFrame({"N": N, "D": D, "loss": loss, "C": 6 * N * D})


def test_default_fit_recovers_chinchilla_within_3_percent_in_under_5_s():
    points = chinchilla_points(seed=0)
    start = time.perf_counter()
    section = fit_law(points, "chinchilla")
    seconds = time.perf_counter() - start
    for k in ("E", "alpha", "beta"):
        assert section["params"][k] == pytest.approx(HOFFMANN[k], rel=0.03), k
    d = section["diagnostics"]
    assert d["starts"] == 4500 and d["starts_converged"] > 4000
    assert d["rmse_log"] == pytest.approx(0.01, rel=0.15) and d["r2"] > 0.99
    assert section["n_points"] == 250
    assert seconds < 5 * 3  # goal 5 s on an idle machine; the shared test machine is busier (see runners.bench.fit)


def test_bootstrap_intervals_cover_the_truth_in_85_of_100_repeats():
    covered = {k: 0 for k in ("E", "alpha", "beta")}
    converged = 0
    for seed in range(100):
        section = fit_parametric(chinchilla_points(seed, sizes=8, tokens=10), grid=ONE_START, bootstrap=100, seed=seed)
        converged += section["bootstrap"]["converged"]
        for k in covered:
            low, high = section["ci"][k]
            covered[k] += low <= HOFFMANN[k] <= high
    assert all(n >= 85 for n in covered.values()), covered
    assert converged >= 0.95 * 100 * 100


def test_moe_law_recovers_gamma():
    truth = dict(sigma=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, gamma=0.1)
    rng = np.random.default_rng(1)
    N, D, E = (g.ravel() for g in np.meshgrid(np.logspace(7, 11, 8), np.logspace(9, 13, 8), [1, 4, 16, 64]))
    loss = laws.moe(N, D, E, **truth) * (1 + 0.01 * rng.standard_normal(N.size))
    grid = {"s": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,), "gamma": (0.0,)}
    section = fit_law(pd.DataFrame({"N": N, "D": D, "E": E, "loss": loss}), "moe", grid=grid, bootstrap=50)
    for k in ("sigma", "alpha", "beta"):
        assert section["params"][k] == pytest.approx(truth[k], rel=0.03), k
    assert section["params"]["gamma"] == pytest.approx(0.1, abs=0.01)
    low, high = section["ci"]["gamma"]
    assert low <= 0.1 <= high
    assert section["derived"]["efficiency_gain_E16"] == pytest.approx(16 ** (0.1 / 0.34), rel=0.1)


def test_kaplan_and_power_recover_their_exponents():
    rng = np.random.default_rng(2)
    truth = dict(N_c=8.8e13, D_c=5.4e13, alpha_N=0.076, alpha_D=0.095)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(6, 10, 10), np.logspace(8, 12, 10)))
    loss = laws.kaplan(N, D, **truth) * (1 + 0.005 * rng.standard_normal(N.size))
    kaplan = fit_law(pd.DataFrame({"N": N, "D": D, "loss": loss}), "kaplan")["params"]
    assert kaplan["alpha_N"] == pytest.approx(0.076, rel=0.05) and kaplan["alpha_D"] == pytest.approx(0.095, rel=0.05)

    x = np.logspace(6, 11, 40)
    power = 2.0 + 50 * x ** -0.3 * (1 + 0.002 * rng.standard_normal(x.size))
    with_offset = fit_law(pd.DataFrame({"N": x, "D": x, "loss": power}), "power", x="N")["params"]
    assert with_offset["alpha"] == pytest.approx(0.3, rel=0.05) and with_offset["E"] == pytest.approx(2.0, rel=0.02)
    bare = fit_law(pd.DataFrame({"N": x, "D": x, "C": x, "loss": 50 * x ** -0.3}), "power", x="C", offset=False)
    assert bare["params"]["alpha"] == pytest.approx(0.3, rel=1e-4) and bare["params"]["E"] == 0


def test_holdout_above_reports_each_held_out_point():
    section = fit_law(chinchilla_points(seed=3, sizes=8, tokens=10), "chinchilla", grid=ONE_START, bootstrap=50,
                      holdout_above=1e22)
    x = section["extrapolation"]
    assert x["n_held_out"] == len(section["extrapolation"]["points"]) > 0
    assert section["n_points"] + x["n_held_out"] == 80
    assert all(p["C"] > 1e22 and p["interval"] is not None for p in x["points"])
    assert x["mean_abs_relative_error"] < 0.03


def test_only_finished_final_points_are_fitted():
    points = chinchilla_points(seed=4, sizes=6, tokens=6)
    points["final"] = True
    points["status"] = "finished"
    points.loc[:4, "status"] = "diverged"
    points.loc[5:9, "final"] = False
    section = fit_law(points, "chinchilla", grid=ONE_START)
    assert section["n_points"] == 36 - 10 and section["left_out"] == {"diverged": 5, "not final": 5}


@pytest.mark.parametrize("change, message", [
    (lambda p: p.drop(columns="loss"), "no column 'loss'"),
    (lambda p: p.assign(N=p.N.where(p.index != 3)), "column 'N' has a missing or non-numeric value (nan) in data row 4 (line 5 of a CSV)"),
    (lambda p: p.assign(D=p.D.where(p.index != 2, -1.0)), "column 'D' must be finite and positive; data row 3 (line 4 of a CSV) has -1"),
    (lambda p: p.assign(loss=p.loss.where(p.index != 0, 0.0)), "column 'loss' must be finite and positive; data row 1 (line 2 of a CSV) has 0"),
    (lambda p: p.iloc[::2].head(5), "law chinchilla needs at least 6 points, the table has 5"),
])
def test_bad_input_is_one_line_naming_the_problem(change, message):
    with pytest.raises(FitInputError) as error:
        fit_law(change(chinchilla_points(seed=0, sizes=3, tokens=3)), "chinchilla", grid=ONE_START)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_unknown_law_and_moe_without_experts():
    points = chinchilla_points(seed=0, sizes=3, tokens=3)
    with pytest.raises(FitInputError, match="is not one of"):
        fit_law(points, "chinchila")
    with pytest.raises(FitInputError, match="needs an 'E' column"):
        fit_law(points, "moe")

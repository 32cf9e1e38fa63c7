"""The data-constrained law: recover known coefficients (R_D*, R_N* included) from data generated with them
plus noise, joint and two-stage; bootstrap coverage; the optimum under a unique-data budget."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from fitting import fit_law, laws
from fitting.data_constrained import optimal_under_data
from fitting.errors import FitInputError
from fitting.lawfile import Law, conventions, document
from runners.bench.fit import MUENNIGHOFF, data_constrained_coverage, repeated_points

TRUTH = MUENNIGHOFF
ONE_START = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}  # far from the truth


@pytest.mark.parametrize("fit", ["joint", "two-stage"])
def test_fit_recovers_the_coefficients_and_both_r_stars(fit):
    section = fit_law(repeated_points(seed=0), "data_constrained", fit=fit, grid=ONE_START)
    p = section["params"]
    for k in ("E", "alpha", "beta"):
        assert p[k] == pytest.approx(TRUTH[k], rel=0.05), k
    assert p["R_D_star"] == pytest.approx(15.4, rel=0.15) and p["R_N_star"] == pytest.approx(5.3, rel=0.2)
    assert section["not_identified"] == {} and section["diagnostics"]["rmse_log"] == pytest.approx(0.005, rel=0.25)
    assert section["method"]["options"]["fit"] == fit


def test_bootstrap_intervals_cover_the_truth_over_repeats():
    """5 noisy data sets (fixed seeds), 30 replicates each: intervals too narrow would miss in several.
    runners/bench/fit.py --coverage counts it over more repeats (20 of 20 for each, 100 replicates)."""
    covered = data_constrained_coverage(repeats=5, replicates=30)
    assert all(n >= 4 for n in covered.values()), covered


def test_r_stars_without_the_data_that_shows_them_are_not_identified():
    points = repeated_points(seed=1)
    plain = points[points["D"] <= points["unique_tokens"]]  # nothing repeated
    section = fit_law(plain.assign(unique_tokens=1e13), "data_constrained", grid=ONE_START, bootstrap=5)
    assert set(section["not_identified"]) == {"R_D_star", "R_N_star"}
    assert section["ci"]["R_D_star"] is None and section["ci"]["alpha"] is not None
    with pytest.raises(FitInputError, match="needs a 'unique_tokens' column"):
        fit_law(points.drop(columns="unique_tokens"), "data_constrained")
    with pytest.raises(FitInputError, match="two-stage fits its base law on single-epoch points"):
        fit_law(points[points["D"] > points["unique_tokens"]], "data_constrained", fit="two-stage")


def test_an_r_star_far_beyond_the_repetition_in_the_points_is_not_identified():
    """Excess parameters that keep their full worth (R_N* = 1e6, 5,000 times the most excess the grid has):
    the points bound R_N* from below only, so it gets no number; R_D*, which they show, keeps its own."""
    points = repeated_points(seed=2)
    truth = {**TRUTH, "R_N_star": 1e6}
    rng = np.random.default_rng(2)
    points["loss"] = laws.data_constrained(points["N"], points["D"], points["unique_tokens"], **truth) * (
        1 + 0.005 * rng.standard_normal(len(points)))
    section = fit_law(points, "data_constrained", grid=ONE_START, bootstrap=5)
    assert set(section["not_identified"]) == {"R_N_star"}, section["not_identified"]
    assert "show no decay" in section["not_identified"]["R_N_star"] and section["ci"]["R_N_star"] is None
    assert section["params"]["R_D_star"] == pytest.approx(15.4, rel=0.2)
    floorless = points.assign(loss=points["loss"] - TRUTH["E"])  # no irreducible loss: E runs to its bound
    assert "E" in fit_law(floorless, "data_constrained", grid=ONE_START)["not_identified"]


def test_optimum_under_a_data_budget_matches_a_direct_minimisation():
    C, k = 1e21, 6.0
    unlimited = laws.optimal_allocation(C, **{n: TRUTH[n] for n in laws.PARAMS["chinchilla"]})
    for U in (1e9, 1e10):
        got = optimal_under_data(TRUTH, C, U)
        direct = minimize_scalar(lambda log_n: laws.data_constrained(np.exp(log_n), C / (k * np.exp(log_n)), U, **TRUTH),
                                 bounds=(np.log(1e6), np.log(1e13)), method="bounded", options={"xatol": 1e-8})
        assert got["N_opt"] == pytest.approx(np.exp(direct.x), rel=1e-3) and got["loss"] == pytest.approx(direct.fun, rel=1e-9)
        assert got["epochs"] == pytest.approx(got["D_opt"] / U) and got["D_opt"] * got["N_opt"] * k == pytest.approx(C)
        assert got["loss_lost"] == pytest.approx(direct.fun - unlimited["loss"], rel=1e-6) and got["loss_lost"] > 0
    plenty = optimal_under_data(TRUTH, C, 1e16)  # far more unique tokens than the optimum trains on
    assert plenty["N_opt"] == pytest.approx(unlimited["N_opt"], rel=1e-3) and plenty["loss_lost"] == pytest.approx(0, abs=1e-9)


def test_the_backtest_scores_the_largest_computes_and_widens_the_optimum_under_a_data_budget():
    """Fitted below C = 1e20 and scored on the points above it: on data drawn from the law itself (0.5% noise) the
    held-out error is at the noise level, where a chinchilla law of the same points, blind to repetition, misses
    by more; the optimum under a unique-token budget then widens its loss interval by that error."""
    points = repeated_points(seed=3)
    section = fit_law(points, "data_constrained", grid=ONE_START, bootstrap=20, holdout_above=1e20)
    x = section["extrapolation"]
    assert x["n_held_out"] == (points["C"] > 1e20).sum() > 5 and x["fitted_max_C"] <= 1e20 < x["held_out_max_C"]
    assert 0.001 < x["rms_relative_error"] < 0.015, x["rms_relative_error"]
    blind = fit_law(points, "chinchilla", holdout_above=1e20)["extrapolation"]
    assert blind["rms_relative_error"] > 2 * x["rms_relative_error"], blind["rms_relative_error"]
    law = Law(document({"data_constrained": section}, conventions=conventions(params="active", flops="6N"), meta={}))
    opt = law.optimal(1e21, unique_tokens=1e9)
    boot, total = opt["loss_ci"], opt["loss_ci_total"]
    assert total[0] < boot[0] <= opt["loss"] <= boot[1] < total[1]
    assert opt["systematic_rel"] >= x["rms_relative_error"] and "backtest" in opt["loss_ci_total_method"]

"""Approaches 1 and 2: recover the known allocation exponent a = beta/(alpha+beta) of a chinchilla law."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, laws
from fitting.errors import FitInputError
from fitting.isoflop import quadratic_minimum

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
A_TRUE = 0.28 / 0.62


def isoflop_points(budgets=(1e18, 1e19, 1e20, 1e21), span=1.0, centre=1.0, seed=0) -> pd.DataFrame:
    """7 model sizes per budget around the true optimum (times `centre`), 0.3% noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = laws.optimal_allocation(C, **HOFFMANN)["N_opt"] * centre
        for i, N in enumerate(n_opt * np.logspace(-span, span, 7)):
            D = C / (6 * N)
            rows.append({"trial_id": f"{C:g}-{i}", "N": N, "D": D, "C": C, "budget": C,
                         "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + 0.003 * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_isoflop_recovers_a_and_b_with_intervals():
    section = fit_law(isoflop_points(), "isoflop", bootstrap=100)
    assert section["params"]["a"] == pytest.approx(A_TRUE, rel=0.03)
    assert section["params"]["b"] == pytest.approx(1 - A_TRUE, rel=0.03)
    low, high = section["ci"]["a"]
    assert low < section["params"]["a"] < high
    assert section["bootstrap"]["converged"] == 100
    for budget in section["budgets"]:
        truth = laws.optimal_allocation(budget["C"], **HOFFMANN)["N_opt"]
        assert budget["flag"] is None and budget["N_opt"] == pytest.approx(truth, rel=0.15)


def test_isoflop_flags_a_budget_whose_minimum_is_at_the_edge():
    shifted = isoflop_points(budgets=(1e21,), span=0.5, centre=10.0)  # every size above the optimum
    section = fit_law(pd.concat([isoflop_points(), shifted.assign(C=2e21, budget=2e21)]), "isoflop")
    flagged = [b for b in section["budgets"] if b["flag"]]
    assert [b["budget"] for b in flagged] == [2e21] and "edge" in flagged[0]["flag"]
    assert section["diagnostics"]["budgets_used"] == 4
    assert section["params"]["a"] == pytest.approx(A_TRUE, rel=0.03)


def test_quadratic_minimum_is_robust_to_one_outlier():
    log_n = np.linspace(-2, 2, 9)
    loss = 3.0 + 0.1 * (log_n - 0.4) ** 2
    loss[1] += 0.3
    assert np.log(quadratic_minimum(log_n, loss)["N_opt"]) == pytest.approx(0.4, abs=0.05)


def test_isoflop_leaves_out_branches_which_end_before_the_budget():
    points = isoflop_points().assign(parent_trial_id="")
    branches = points.assign(D=points.D / 3, C=points.C / 3, parent_trial_id=points.trial_id, loss=points.loss + 0.1)
    section = fit_law(pd.concat([points, branches], ignore_index=True), "isoflop")
    assert section["left_out"] == {"branch": 28} and section["n_points"] == 28
    assert section["params"] == fit_law(points, "isoflop")["params"]


def test_isoflop_without_c_computes_6nd_and_says_so():
    section = fit_law(isoflop_points().drop(columns=["C"]), "isoflop")
    assert section["notes"] == ["the table has no C: C = 6 N D"]


def test_isoflop_needs_two_budgets_of_three_sizes():
    with pytest.raises(FitInputError, match="at least 2 budgets with 3 or more model sizes each; the table has 1"):
        fit_law(isoflop_points(budgets=(1e19,)), "isoflop")


def curves(sizes=16, seed=0) -> pd.DataFrame:
    """Training curves of every size along D (C = 6ND): an envelope of known shape. 0.1% noise: evaluations of
    one run on a fixed validation set scatter far less than separate runs do."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, N in enumerate(np.logspace(7, 10, sizes)):
        for j, D in enumerate(np.logspace(8, 12.5, 40)):
            rows.append({"trial_id": f"t{i}", "N": N, "D": D, "C": 6 * N * D, "final": j == 39, "status": "finished",
                         "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + 0.001 * rng.standard_normal())})
    return pd.DataFrame(rows)


def test_envelope_recovers_a_and_b():
    section = fit_law(curves(), "envelope", bootstrap=50)
    assert section["params"]["a"] == pytest.approx(A_TRUE, rel=0.03)
    assert section["params"]["b"] == pytest.approx(1 - A_TRUE, rel=0.03)
    assert section["n_curves"] == 16 and section["bootstrap"]["converged"] == 50
    low, high = section["ci"]["a"]
    assert low <= A_TRUE <= high


def test_envelope_leaves_out_diverged_curves_and_needs_two_sizes():
    points = curves(sizes=5)
    points.loc[points.trial_id == "t0", "status"] = "diverged"
    with pytest.raises(FitInputError, match="at least 4 model sizes; the table has 3 curves of 3 sizes"):
        fit_law(points[points.trial_id != "t1"], "envelope")
    assert fit_law(curves(sizes=5).assign(status="finished"), "envelope")["left_out"] == {}
    assert fit_law(points, "envelope")["left_out"] == {"diverged": 40}
    with pytest.raises(FitInputError, match="no column 'C'"):
        fit_law(points.drop(columns="C"), "envelope")

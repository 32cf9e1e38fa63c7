"""Points-table handling: conventions, bootstrap groups, final rows, and a law file of frontiers only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting import FitInputError, fit_law, lawfile
from fitting.table import groups, load_points, parametric_rows, with_conventions


def test_conventions_switch_n_and_c_from_their_columns():
    points = pd.DataFrame({"N": [1.0], "D": [2.0], "loss": [3.0], "C": [9.0], "N_total": [5.0], "N_nonembed": [4.0],
                           "C_6N": [60.0], "C_exact": [70.0]})
    switched = with_conventions(points, params="total", flops="exact")
    assert switched.loc[0, "N"] == 5.0 and switched.loc[0, "C"] == 70.0 and points.loc[0, "N"] == 1.0
    assert with_conventions(points, params="nonembed", flops="6N").loc[0, ["N", "C"]].tolist() == [4.0, 60.0]
    with pytest.raises(FitInputError, match="--params active needs a 'N_active' column"):
        with_conventions(points, params="active")


def test_bootstrap_groups_put_a_branch_with_its_trial():
    points = pd.DataFrame({"trial_id": ["a", "b", "a-1", "c"], "parent_trial_id": ["", "", "a", None]})
    assert groups(points, "trials").tolist() == [0, 1, 0, 2]
    assert groups(points, "points").tolist() == [0, 1, 2, 3]
    with pytest.raises(FitInputError, match="needs a 'trial_id' column"):
        groups(points.drop(columns="trial_id"), "trials")


def test_final_rows_read_from_csv_strings(tmp_path):
    path = tmp_path / "p.csv"
    pd.DataFrame({"N": [1, 2, 3], "D": [1, 2, 3], "loss": [1, 2, 3], "final": [True, False, True],
                  "status": ["finished", "finished", "pruned"]}).to_csv(path, index=False)
    rows, left_out = parametric_rows(load_points(path))
    assert rows.N.tolist() == [1] and left_out == {"pruned": 1, "not final": 1}
    with pytest.raises(FitInputError, match="use a .csv or .parquet file"):
        load_points(path.rename(tmp_path / "p.txt"))


def test_resampling_whole_trials_in_a_parametric_fit():
    rng = np.random.default_rng(0)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 4), np.logspace(9, 12, 4)))
    loss = (1.69 + 406.4 / N ** 0.34 + 410.7 / D ** 0.28) * (1 + 0.005 * rng.standard_normal(N.size))
    points = pd.DataFrame({"N": N, "D": D, "loss": loss, "trial_id": [f"t{i // 2}" for i in range(N.size)]})
    grid = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}
    section = fit_law(points, "chinchilla", grid=grid, bootstrap=20, resample="trials")
    assert section["bootstrap"]["resample"] == "trials" and section["bootstrap"]["converged"] >= 18


def test_a_law_file_of_isoflop_alone_still_gives_the_allocation():
    section = {"law": "isoflop", "params": {"a": 0.5, "b": 0.5, "k_N": 0.1, "k_D": 1.0 / 0.6}, "ci": {},
               "bootstrap": {"samples": {"a": [0.49, 0.5, 0.51], "b": [0.51, 0.5, 0.49], "k_N": [0.1] * 3,
                                         "k_D": [1 / 0.6] * 3}}}
    doc = lawfile.document({"isoflop": section}, conventions=lawfile.conventions(params=None, flops=None), meta={})
    opt = lawfile.Law(doc).optimal(1e20)
    assert opt["N_opt"] == pytest.approx(1e9) and opt["D_opt"] == pytest.approx(1e10 / 0.6) and opt["loss"] is None
    assert opt["N_opt_ci"][0] < 1e9 < opt["N_opt_ci"][1]
    with pytest.raises(FitInputError, match="no chinchilla or moe law"):
        lawfile.Law(doc).compute_for_loss(2.0)

"""export_laws on a sweep-shaped points table: every law it supports, files, plots, failures reported."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import yaml
from rich.console import Console

from fitting import laws, load_law, plots
from fitting.export import export_laws

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def sweep_points(budgets=(1e18, 1e19, 1e20, 1e21), seed=0) -> pd.DataFrame:
    """IsoFLOP trials (7 sizes a budget), each a curve of 6 evaluations whose last is final; one diverged trial."""
    rng = np.random.default_rng(seed)
    rows = []
    for C in budgets:
        n_opt = laws.optimal_allocation(C, **HOFFMANN)["N_opt"]
        for i, N in enumerate(n_opt * np.logspace(-1, 1, 7)):
            d_final = C / (6 * N)
            for j, D in enumerate(d_final * np.logspace(-1.5, 0, 6)):
                rows.append({"trial_id": f"{C:g}-{i}", "N": N, "D": D, "C": 6 * N * D, "budget": C, "E": 1,
                             "final": j == 5, "status": "finished", "lr": 1e-3, "batch_size": 4096,
                             "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + 0.003 * rng.standard_normal())})
    points = pd.DataFrame(rows)
    points.loc[points.trial_id == f"{budgets[0]:g}-0", "status"] = "diverged"
    return points


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    summary = export_laws(sweep_points(), out, meta={"sweep": "synthetic", "N": "active", "C": "6N"}, bootstrap=30)
    return out, summary


def test_export_fits_every_supported_law_and_writes_the_files(exported):
    out, summary = exported
    doc = json.loads((out / "law.json").read_text())
    assert set(doc["laws"]) == {"chinchilla", "envelope", "isoflop"} and doc["law"] == "chinchilla"
    assert {"A", "B", "E", "alpha", "beta"} == set(doc["params"])
    assert doc["conventions"]["N"] == "active non-embedding parameters" and doc["conventions"]["C"] == "6 N D"
    assert doc["meta"]["sweep"] == "synthetic" and "hparams" not in doc
    for law in ("chinchilla", "isoflop", "envelope"):
        assert doc["laws"][law]["params"]["a" if law != "chinchilla" else "alpha"] > 0
    assert doc["laws"]["isoflop"]["params"]["a"] == pytest.approx(0.28 / 0.62, rel=0.05)
    assert summary.left_out == {"diverged": 6, "not final": 135}
    names = {p.name for p in summary.paths}
    assert {"law.json", "law.csv", "law.yaml", "loss_vs_C.png", "isoflop.png", "fit_residuals.png",
            "optimal_allocation.png", "law_vs_points.png"} <= names
    assert all(p.stat().st_size > 0 for p in summary.paths)
    table = pd.read_csv(out / "law.csv")
    assert set(table.law) == {"chinchilla", "envelope", "isoflop"} and table.value.notna().all()
    assert yaml.safe_load((out / "law.yaml").read_text())["laws"]["chinchilla"]["params"] == doc["params"]


def test_export_checks_extrapolation_to_the_largest_budget(exported):
    out, _ = exported
    x = json.loads((out / "law.json").read_text())["laws"]["chinchilla"]["extrapolation"]
    assert x["n_held_out"] == 7 and all(p["C"] == pytest.approx(1e21) for p in x["points"])
    assert x["mean_abs_relative_error"] < 0.02 and x["rms_relative_error"] < 0.02
    assert x["factor"] == pytest.approx(10, rel=0.01) and x["held_out_max_C"] == pytest.approx(1e21, rel=0.01)


def test_summary_prints_coefficients_allocation_and_left_out_points(exported):
    _, summary = exported
    buffer = io.StringIO()
    summary.print(Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "chinchilla" in text and "alpha" in text and "tokens/param" in text
    assert "6 diverged, 135 not final" in text and "extrapolation" in text


def test_a_law_the_table_cannot_support_is_reported_not_raised(tmp_path):
    points = sweep_points(budgets=(1e19,))  # one budget: no isoflop frontier, and N, D on one line D = C / 6N
    summary = export_laws(points, tmp_path, meta={}, bootstrap=0)
    assert "isoflop" in summary.failed and "at least 2 budgets" in summary.failed["isoflop"]
    assert "cannot separate N from D" in summary.failed["chinchilla"] and "chinchilla" not in summary.doc["laws"]
    assert "envelope" in summary.doc["laws"]  # what the curves do support is still fitted
    law = load_law(tmp_path / "law.json")
    assert law.doc["failed"] == summary.failed


def test_dense_and_moe_together_give_the_moe_law_and_its_efficiency_gain(tmp_path, capsys):
    truth = dict(sigma=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, gamma=0.1)
    rng = np.random.default_rng(1)
    N, D, E = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 5), np.logspace(9, 12, 5), [1, 8]))
    loss = laws.moe(N, D, E, **truth) * (1 + 0.005 * rng.standard_normal(N.size))
    points = pd.DataFrame({"N": N, "D": D, "E": E, "C": 6 * N * D, "loss": loss})
    summary = export_laws(points, tmp_path, meta={}, bootstrap=20)
    doc = summary.doc
    assert doc["law"] == "moe" and doc["laws"]["chinchilla"]["n_points"] == 25  # chinchilla on the dense rows
    assert doc["laws"]["moe"]["params"]["gamma"] == pytest.approx(0.1, abs=0.01)
    gain = doc["laws"]["moe"]["derived"]["efficiency_gain_E8"]
    assert gain == pytest.approx(8 ** (0.1 / 0.34), rel=0.1)
    law = load_law(tmp_path / "law.json")
    assert law.optimal(1e21, E=1)["law"] == "moe"  # the joint law, not the dense-only one, gives the optimum
    assert doc["laws"]["moe"]["extrapolation"]["n_held_out"] > 0  # and it is the law backtested for loss_ci_total
    assert law.optimal(1e21, E=1)["loss_ci_total"] is not None
    dense_loss = law.optimal(1e21, E=1)["loss"]
    assert law.compute_for_loss(dense_loss, E=8) == pytest.approx(1e21 / gain, rel=1e-6)
    assert (tmp_path / "dense_vs_moe.png").stat().st_size > 0
    # the compare section: E8 needs 8^(gamma/alpha) less compute than dense at every budget, inside its interval
    truth_multiplier = 8 ** (truth["gamma"] / truth["alpha"])
    for row in doc["compare"]["variants"]["E8"]:
        low, high = row["multiplier_ci"]
        assert low <= truth_multiplier <= high and row["multiplier"] == pytest.approx(truth_multiplier, rel=0.1)
    shared = doc["compare"]["shared_exponent"]  # on a grid's lower envelope, not an IsoFLOP frontier: only sane
    assert shared["speedup_ci"]["E8"][0] <= shared["speedup"]["E8"] <= shared["speedup_ci"]["E8"][1]
    assert (tmp_path / "family_speedup.png").stat().st_size > 0
    from runners.cli import main  # the same joint law through `scaling compare --E-a 1 --E-b 8`

    row = doc["compare"]["variants"]["E8"][0]
    assert main(["compare", str(tmp_path / "law.json"), "--E-a", "1", "--E-b", "8", "--compute", str(row["compute"])]) == 0
    assert f"multiplier {row['multiplier']:.4g}" in capsys.readouterr().out


def test_loss_laws_take_each_cells_best_run_when_hyperparameters_vary(tmp_path):
    """Three learning rates per trial, two of them off the optimum by a known penalty: the loss law must be
    the one at the best lr, not one biased up by averaging over the search."""
    base = sweep_points()
    detuned = [base.assign(lr=lr, loss=base.loss * (1 + penalty), trial_id=base.trial_id + f"-lr{lr}")
               for lr, penalty in ((3e-4, 0.02), (3e-3, 0.05))]
    points = pd.concat([base, *detuned], ignore_index=True)
    summary = export_laws(points, tmp_path, meta={}, bootstrap=0)
    fitted = summary.doc["laws"]["chinchilla"]["params"]
    assert fitted["alpha"] == pytest.approx(HOFFMANN["alpha"], rel=0.1)
    assert fitted["E"] == pytest.approx(HOFFMANN["E"], rel=0.05)


def test_a_search_at_two_sizes_is_not_fitted_as_a_loss_law(tmp_path):
    points = sweep_points()
    two_sizes = points[points.N.isin(sorted(points.N.unique())[:2])]
    summary = export_laws(two_sizes, tmp_path, meta={}, bootstrap=0)
    assert "chinchilla" in summary.failed and "at least 3 model sizes" in summary.failed["chinchilla"]


def test_a_surface_where_bigger_models_do_worse_is_reported_not_used(tmp_path):
    """Loss that rises with N at fixed D (as when the largest budget's models were over-stepped) fits a negative
    alpha: the export must refuse it as a law, and still write the files and plots of what it could fit."""
    points = sweep_points()
    points["loss"] = HOFFMANN["E"] + 0.01 * points.N ** 0.1 + HOFFMANN["B"] / points.D ** HOFFMANN["beta"]
    summary = export_laws(points, tmp_path, meta={}, bootstrap=0)
    assert "not a scaling law" in summary.failed["chinchilla"] and "alpha = -" in summary.failed["chinchilla"]
    assert "chinchilla" not in summary.doc["laws"] and "envelope" in summary.doc["laws"]
    assert (tmp_path / "loss_vs_C.png").stat().st_size > 0


def test_the_closed_form_allocation_is_nan_not_complex_for_a_negative_exponent():
    out = laws.optimal_allocation(1e20, E=3.4, A=5e-21, B=558.0, alpha=-3.05, beta=0.43)
    assert all(np.isnan(out[k]) for k in ("N_opt", "D_opt", "loss"))


def test_a_plot_that_cannot_be_drawn_is_reported_and_the_law_files_stay(tmp_path):
    points = sweep_points()
    summary = export_laws(points, tmp_path, meta={}, bootstrap=0)
    doc = summary.doc
    doc["laws"]["chinchilla"]["params"]["A"] = float("inf")  # a law file from elsewhere, with a coefficient run off
    (tmp_path / "again").mkdir()
    paths, failed = plots.plot_all(doc, points, tmp_path / "again")
    assert "plot fit_residuals.png" in failed and (tmp_path / "law.json").exists()
    assert any(p.name == "isoflop.png" for p in paths)


def test_repeated_data_adds_the_data_constrained_law_and_its_effective_data_plot(tmp_path):
    from runners.bench.fit import MUENNIGHOFF, repeated_points

    points = repeated_points(seed=4, sizes=4).drop(columns="C").assign(E=1, final=True, status="finished")
    summary = export_laws(points, tmp_path, meta={}, bootstrap=10)
    doc = json.loads((tmp_path / "law.json").read_text())
    assert {"chinchilla", "data_constrained"} <= set(doc["laws"]) and doc["law"] == "chinchilla"
    section = doc["laws"]["data_constrained"]
    assert section["params"]["R_D_star"] == pytest.approx(MUENNIGHOFF["R_D_star"], rel=0.2)
    assert section["ci"]["R_D_star"][0] < section["params"]["R_D_star"] < section["ci"]["R_D_star"][1]
    assert "effective_data.png" in {p.name for p in summary.paths}
    console = Console(file=io.StringIO(), width=200)
    summary.print(console)
    assert "data_constrained" in console.file.getvalue() and "R_N_star" in console.file.getvalue()

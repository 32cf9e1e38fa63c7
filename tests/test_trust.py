"""Numbers with their trust (issue 23): estimates inside their intervals, coefficients the data do not
identify said so, laws that cannot give an answer refusing it, extrapolation measured and warned about."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, laws, lawfile, load_law, report
from fitting.errors import FitInputError
from fitting.export import law_rows
from runners.cli import main

ROOT = Path(__file__).resolve().parent.parent
TRUTH = dict(A=406.4, B=410.7, alpha=0.34, beta=0.28)
FEW_STARTS = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.3, 0.6), "beta": (0.3,)}
MOE_STARTS = {"s": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.3,), "beta": (0.3,), "gamma": (0.0, 0.5)}


def grid_points(E_floor: float, seed: int = 0, noise: float = 0.005) -> pd.DataFrame:
    """5 sizes x 5 token counts of a chinchilla law with floor E_floor, 0.5% noise, dense (E = 1)."""
    rng = np.random.default_rng(seed)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 9, 5), np.logspace(9, 11, 5)))
    loss = laws.chinchilla(N, D, E=E_floor, **TRUTH) * (1 + noise * rng.standard_normal(N.size))
    return pd.DataFrame({"N": N, "D": D, "C": 6 * N * D, "E": 1, "loss": loss})


def inside(section: dict) -> None:
    for group, cis in (("params", "ci"), ("derived", "derived_ci")):
        for k, v in section.get(group, {}).items():
            ci = section[cis][k]
            assert ci is None or ci[0] <= v <= ci[1], (k, v, ci)


@pytest.fixture(scope="module")
def floorless(tmp_path_factory):
    """A law file fitted to points with no loss floor (E = 0): E runs to its bound."""
    out = tmp_path_factory.mktemp("trust") / "law.json"
    section = fit_law(grid_points(0.0), "chinchilla", bootstrap=20, grid=FEW_STARTS)
    lawfile.write(out, lawfile.document({"chinchilla": section}, conventions=lawfile.conventions(
        params=None, flops=None), meta={}))
    return out, section


def test_an_offset_at_its_bound_is_not_identified_and_has_no_interval(floorless, capsys):
    path, section = floorless
    assert "E" in section["not_identified"] and "lower bound" in section["not_identified"]["E"]
    assert section["ci"]["E"] is None
    assert section["params"]["alpha"] == pytest.approx(TRUTH["alpha"], rel=0.05)  # the rest is still recovered
    assert set(section["not_identified"]) == {"E"}
    inside(section)
    assert main(["predict", "--law", str(path), "--N", "1e8", "--D", "1e10"]) == 0
    out = capsys.readouterr().out
    assert "warning: chinchilla E is not identified: " in out and "lower bound 0" in out
    row = law_rows(lawfile.read(path)).set_index("coefficient").loc["E"]
    assert pd.isna(row["value"]) and "lower bound 0" in row["not_identified"]


def test_moe_on_dense_points_says_gamma_is_not_identified_and_refuses_other_expert_counts():
    section = fit_law(grid_points(1.69), "moe", bootstrap=20, grid=MOE_STARTS)
    assert "every point has E = 1 experts" in section["not_identified"]["gamma"]
    assert section["ci"]["gamma"] is None
    inside(section)
    law = lawfile.Law(lawfile.document({"moe": section}, conventions=lawfile.conventions(params=None, flops=None), meta={}))
    assert law.optimal(1e20)["N_opt"] > 0  # E = 1, which the points cover
    with pytest.raises(FitInputError, match="gamma is not identified"):
        law.optimal(1e20, E=8)
    loss, ci = float(law.loss(1e8, 1e10)), law.loss_interval(1e8, 1e10)
    assert ci[0] <= loss <= ci[1]


def test_an_exponent_of_a_law_worse_than_a_constant_is_not_identified():
    """Flat losses with two high outliers: the Huber fit follows the bulk, the squares follow the outliers,
    so the law explains less than their mean (r2 < 0)."""
    N = np.logspace(6, 8, 8)
    loss = np.full(8, 2.0) + np.array([0, 0, 0.6, 0, 0, 0, 0.9, 0]) + 0.001 * np.arange(8)
    section = fit_law(pd.DataFrame({"N": N, "D": 1e9, "loss": loss}), "power", offset=False, bootstrap=10)
    assert section["diagnostics"]["r2"] < 0
    assert "worse than a constant" in section["not_identified"]["alpha"] and section["ci"]["alpha"] is None


def test_one_isoflop_budget_cannot_separate_n_from_d():
    N = np.logspace(6, 8, 7)
    D = 5e14 / (6 * N)
    loss = laws.chinchilla(N, D, E=1.69, **TRUTH)
    with pytest.raises(FitInputError, match="cannot separate N from D"):
        fit_law(pd.DataFrame({"N": N, "D": D, "loss": loss}), "chinchilla")


def test_a_law_from_one_budget_refuses_the_optimal_allocation():
    """One budget with decay branches (shorter D at each size) does separate N from D, but says nothing about
    how the optimum moves with compute."""
    N = np.repeat(np.logspace(6, 8, 5), 3)
    D = 5e14 / (6 * N) * np.tile([0.25, 0.5, 1.0], 5)
    points = pd.DataFrame({"N": N, "D": D, "loss": laws.chinchilla(N, D, E=1.69, **TRUTH), "budget": 5e14})
    section = fit_law(points, "chinchilla", grid=FEW_STARTS)
    assert section["data_range"]["budgets"] == 1
    law = lawfile.Law(lawfile.document({"chinchilla": section}, conventions=lawfile.conventions(params=None, flops=None),
                                       meta={}))
    with pytest.raises(FitInputError, match="single compute budget"):
        law.optimal(5e16)


def test_predict_says_how_far_it_extrapolates_and_refuses_non_finite_input(floorless, capsys):
    path, section = floorless
    top_C = section["data_range"]["C"][1]
    opt = load_law(path).optimal(100 * top_C)
    assert opt["reach"]["C"] == pytest.approx(100)
    assert any("100x the largest fitted" in w for w in opt["warnings"])
    for key in ("N_opt", "D_opt", "loss", "tokens_per_param"):
        assert opt[f"{key}_ci"][0] <= opt[key] <= opt[f"{key}_ci"][1]
    near = load_law(path).optimal(top_C)
    assert not any("far extrapolation" in w for w in near["warnings"])
    for bad in ("inf", "nan", "-1"):
        assert main(["predict", "--law", str(path), "--compute", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --compute") and "positive and finite" in err and err.count("\n") == 1


def test_a_negative_column_any_law_uses_is_one_line_with_the_files_row(tmp_path, capsys):
    """C is negative in one row, as 6 N D overflowing an int64 column gives: the hparams fit names C and the
    row as the file counts it, with no numpy repr and no traceback."""
    rng = np.random.default_rng(0)
    N = np.repeat([1e6, 4e6], 6)
    lr = np.tile(np.logspace(-3.5, -1.5, 6), 2)
    points = pd.DataFrame({"N": N, "D": 2e8, "C": 6 * N * 2e8, "lr": lr, "final": True,
                           "loss": 3 + (np.log(lr) + 5) ** 2 / 20 + 0.01 * rng.random(12)})
    points.loc[4, "C"] = -6.1e18
    path = tmp_path / "points.csv"
    points.to_csv(path, index=False)
    assert main(["fit", "--points", str(path), "--law", "hparams", "--out", str(tmp_path / "law.json")]) == 2
    err = capsys.readouterr().err
    assert err == "error: column 'C' must be finite and positive; data row 5 (line 6 of a CSV) has -6.1e+18\n"


def test_results_readmes_quote_their_law_files():
    """Every marked table in results/*/README.md is what fitting.report writes from the law.json beside it."""
    checked = 0
    for readme in sorted(ROOT.glob("results/*/README.md")):
        text = readme.read_text()
        if report.MARK.search(text):
            assert report.render(text, lawfile.read(readme.parent / "law.json")) == text, readme
            checked += 1
    assert checked >= 1

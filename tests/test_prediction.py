"""Pre-registered predictions: register from a fitted law, score against a held-out budget's points."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, load_law
from fitting.export import fit_all
from fitting.lawfile import conventions, document, write
from fitting.prediction import main, register, score
from runners.cli import main as cli

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022
CONVENTIONS = conventions(params="active", flops="6N")


def loss(N, D):
    return TRUE["E"] + TRUE["A"] / N**TRUE["alpha"] + TRUE["B"] / D**TRUE["beta"]


def drifting(N, D):
    """The law above times a factor that falls 2% per e-fold of compute: every point carries the bias of its own
    scale, so a bootstrap over points cannot see it; a backtest on the largest budget can."""
    return loss(N, D) * (1 - 0.02 * np.log(6 * N * D / 1e18))


def isoflop_points(budgets, rng, noise=0.003, law=loss):
    rows = []
    for C in budgets:
        for N in np.geomspace(*np.sqrt(C / 6 / np.array([100.0, 3.0])), 7):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "C": C, "loss": law(N, D) * (1 + noise * rng.standard_normal()), "budget": C,
                         "final": True, "E": 1})
    return pd.DataFrame(rows)


FITTED, HELD_OUT = [1e18, 3e18, 1e19, 3e19], 1e21  # 33x beyond the largest fitted budget


def backtested_law(tmp_path, law) -> Path:
    """law.json as the export writes it (chinchilla with its backtest on the largest budget), from low-noise points."""
    fitted = fit_all(isoflop_points(FITTED, np.random.default_rng(0), noise=0.0005, law=law), bootstrap=40)
    assert "chinchilla" in fitted.sections and not fitted.failed
    return write(tmp_path / "law.json", document(fitted.sections, conventions=CONVENTIONS, meta={}))


def true_optimum(law, C: float) -> float:
    N = np.geomspace(1e7, 1e12, 100_001)
    return float(law(N, C / (6 * N)).min())


def test_registered_prediction_is_scored_against_the_held_out_budget(tmp_path):
    rng = np.random.default_rng(0)
    section = fit_law(isoflop_points([1e18, 3e18, 1e19, 3e19], rng), "chinchilla", bootstrap=40, seed=0)
    law = write(tmp_path / "law.json", document({"chinchilla": section}, conventions=CONVENTIONS, meta={}))
    held_out = 1e20
    prediction = register(law, held_out)
    assert prediction["predicted"]["law"] == "chinchilla"  # the pre-registration says which law made it
    assert prediction["predicted"]["loss_ci"][0] < prediction["predicted"]["loss"] < prediction["predicted"]["loss_ci"][1]

    scored = score(prediction, isoflop_points([held_out], rng, noise=0.0))
    truth_n = scored["actual_N_opt"]
    assert abs(scored["rel_error"]) < 0.01  # the law was fitted on the same form: it must extrapolate 3x
    assert scored["actual_loss"] <= scored["best_trained"]["loss"] + 1e-9
    # the true optimum of the generating law at 1e20, from its closed form
    G = (TRUE["alpha"] * TRUE["A"] / (TRUE["beta"] * TRUE["B"])) ** (1 / (TRUE["alpha"] + TRUE["beta"]))
    n_opt = G * (held_out / 6) ** (TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]))
    assert abs(np.log(truth_n / n_opt)) < 0.2


def test_cli_round_trip_and_too_few_points(tmp_path, capsys):
    rng = np.random.default_rng(1)
    section = fit_law(isoflop_points([1e18, 3e18, 1e19], rng), "chinchilla", bootstrap=0)
    law = write(tmp_path / "law.json", document({"chinchilla": section}, conventions=CONVENTIONS, meta={}))
    out = tmp_path / "prediction.json"
    assert main(["register", "--law", str(law), "--compute", "3e19", "--out", str(out)]) == 0
    predicted = json.loads(out.read_text())["predicted"]
    assert predicted["loss_ci_total"] is None and "no extrapolation backtest" in predicted["loss_ci_total_method"]
    points = tmp_path / "held.csv"
    isoflop_points([3e19], rng).to_csv(points, index=False)
    assert main(["score", "--prediction", str(out), "--points", str(points)]) == 0
    scored = json.loads(out.read_text())
    assert "actual_loss" in scored and scored["loss_interval_total_covers"] is None  # no total interval to judge
    isoflop_points([3e19], rng).head(2).to_csv(points, index=False)
    assert main(["score", "--prediction", str(out), "--points", str(points)]) == 2
    assert "at least 3 sizes" in capsys.readouterr().out


def test_the_total_interval_covers_a_bias_the_bootstrap_cannot_see(tmp_path):
    prediction = register(backtested_law(tmp_path, drifting), HELD_OUT)
    predicted, truth = prediction["predicted"], true_optimum(drifting, HELD_OUT)
    boot, total = predicted["loss_ci"], predicted["loss_ci_total"]
    assert not boot[0] <= truth <= boot[1]  # the bootstrap is confidently wrong 33x out
    assert total[0] < boot[0] and total[1] > boot[1] and total[0] <= truth <= total[1]
    assert "quadrature" in predicted["loss_ci_total_method"]

    scored = score(prediction, isoflop_points([HELD_OUT], np.random.default_rng(1), noise=0.0, law=drifting))
    assert scored["actual_loss"] == pytest.approx(truth, rel=1e-3)
    assert scored["loss_interval_covers"] is False and scored["loss_interval_total_covers"] is True


def test_on_a_well_specified_law_the_backtest_is_small_and_the_total_interval_stays_close(tmp_path, capsys):
    path = backtested_law(tmp_path, loss)
    law = load_law(path)
    x = law.laws["chinchilla"]["extrapolation"]
    assert x["rms_relative_error"] < 0.005 and abs(x["mean_relative_error"]) < 0.001
    assert x["n_held_out"] == 7 and x["holdout_above"] == pytest.approx(1e19) and x["factor"] == pytest.approx(3)
    opt = law.optimal(HELD_OUT)
    # s grows with the distance beyond the data, in units of the backtest's own distance (3x)
    assert opt["systematic_rel"] == pytest.approx(x["rms_relative_error"] * np.log(HELD_OUT / 3e19) / np.log(3))
    assert all(abs(t - b) < 0.005 * opt["loss"] for t, b in zip(opt["loss_ci_total"], opt["loss_ci"]))
    assert cli(["predict", "--law", str(path), "--compute", str(HELD_OUT)]) == 0
    low, high = opt["loss_ci_total"]
    line = next(line for line in capsys.readouterr().out.splitlines() if "loss, total" in line)
    assert f"[{low:.4g}, {high:.4g}]" in line and "quadrature" in line


def test_a_law_fitted_with_holdout_above_counts_the_distance_from_its_own_data(tmp_path):
    section = fit_law(isoflop_points(FITTED, np.random.default_rng(2)), "chinchilla", holdout_above=1.5e19)
    law = load_law(write(tmp_path / "law.json", document({"chinchilla": section}, conventions=CONVENTIONS, meta={})))
    rms = section["extrapolation"]["rms_relative_error"]
    assert law.optimal(3e19)["systematic_rel"] == pytest.approx(rms)  # the backtest's own distance: 3x from 1e19
    assert law.optimal(9e19)["systematic_rel"] == pytest.approx(2 * rms)  # 9x from 1e19
    assert law.optimal(9e19)["loss_ci_total"] is not None  # no bootstrap: the systematic term alone


def test_a_prediction_under_a_unique_token_budget_is_scored_on_that_budget_only(tmp_path):
    """Registered from a data_constrained law at (C, U); the held-out table also holds the same budget trained on
    fresh data, which a score that ignored U would take (its minimum is lower: repetition costs loss)."""
    from fitting import laws
    from runners.bench.fit import MUENNIGHOFF, repeated_points

    section = fit_law(repeated_points(seed=0), "data_constrained", bootstrap=20, seed=0,
                      grid={"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)})
    law = write(tmp_path / "law.json", document({"data_constrained": section}, conventions=CONVENTIONS, meta={}))
    C, U = 1e20, 3e9
    prediction = register(law, C, unique_tokens=U)
    assert prediction["unique_tokens"] == U and prediction["predicted"]["law"] == "data_constrained"
    N = np.geomspace(*np.sqrt(C / 6 / np.array([100.0, 3.0])), 7)
    held_out = pd.concat([pd.DataFrame({"N": N, "D": C / (6 * N), "C": C, "budget": C, "final": True, "E": 1,
                                        "unique_tokens": u, "loss": laws.data_constrained(N, C / (6 * N), u, **MUENNIGHOFF)})
                          for u in (U * 1.00002, 1e13)])  # the cap as a trial rounds it to whole sequences
    scored = score(prediction, held_out)
    true_min = min(laws.data_constrained(n, C / (6 * n), U, **MUENNIGHOFF) for n in np.geomspace(N[0], N[-1], 20_001))
    assert scored["scored_points"] == 7 and abs(scored["rel_error"]) < 0.01
    assert scored["actual_loss"] == pytest.approx(true_min, rel=2e-3)
    with pytest.raises(Exception, match="unique_tokens column"):
        score(prediction, held_out.drop(columns="unique_tokens"))

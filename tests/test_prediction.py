"""Pre-registered predictions: register from a fitted law, score against a held-out budget's points."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from fitting import fit_law
from fitting.lawfile import conventions, document, write
from fitting.prediction import main, register, score

TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022


def loss(N, D):
    return TRUE["E"] + TRUE["A"] / N**TRUE["alpha"] + TRUE["B"] / D**TRUE["beta"]


def isoflop_points(budgets, rng, noise=0.003):
    rows = []
    for C in budgets:
        for N in np.geomspace(*np.sqrt(C / 6 / np.array([100.0, 3.0])), 7):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "loss": loss(N, D) * (1 + noise * rng.standard_normal()), "budget": C,
                         "final": True, "E": 1})
    return pd.DataFrame(rows)


def test_registered_prediction_is_scored_against_the_held_out_budget(tmp_path):
    rng = np.random.default_rng(0)
    section = fit_law(isoflop_points([1e18, 3e18, 1e19, 3e19], rng), "chinchilla", bootstrap=40, seed=0)
    law = write(tmp_path / "law.json", document({"chinchilla": section}, conventions=conventions(params="active", flops="6N"), meta={}))
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
    law = write(tmp_path / "law.json", document({"chinchilla": section}, conventions=conventions(params="active", flops="6N"), meta={}))
    out = tmp_path / "prediction.json"
    assert main(["register", "--law", str(law), "--compute", "3e19", "--out", str(out)]) == 0
    points = tmp_path / "held.csv"
    isoflop_points([3e19], rng).to_csv(points, index=False)
    assert main(["score", "--prediction", str(out), "--points", str(points)]) == 0
    assert "actual_loss" in json.loads(out.read_text())
    isoflop_points([3e19], rng).head(2).to_csv(points, index=False)
    assert main(["score", "--prediction", str(out), "--points", str(points)]) == 2
    assert "at least 3 sizes" in capsys.readouterr().out

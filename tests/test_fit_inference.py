"""The inference-aware optimum (fitting/inference.py): the paper's own calculator, a fitted law, the CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting import laws, load_law, plots
from fitting.inference import inference_optimal
from runners.cli import main

# Hoffmann et al. 2022's fit, the coefficients github.com/nikhilsardana/beyond-chinchilla uses by default
PAPER = dict(E=1.69, A=406.4, B=410.7, alpha=0.336, beta=0.283)
TRUE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def test_reproduces_the_papers_worked_example():
    # README of beyond-chinchilla: `compute_optimal.py --loss 1.947 --inference_tokens 2e12` gives a model of
    # 2.418e10 parameters on 2.657e12 tokens, 70.96% of the Chinchilla model's parameters, 146.77% of its
    # tokens and 95.22% of its lifetime FLOPs
    r = inference_optimal(1.947, 2e12, **PAPER)
    assert r["N_opt"] == pytest.approx(2.418e10, rel=5e-4)
    assert r["D_opt"] == pytest.approx(2.657e12, rel=5e-4)
    assert 100 * r["N_opt"] / r["chinchilla_N"] == pytest.approx(70.96, abs=0.01)
    assert 100 * r["D_opt"] / r["chinchilla_D"] == pytest.approx(146.77, abs=0.01)
    assert 100 * (1 - r["saving"]) == pytest.approx(95.22, abs=0.01)
    assert laws.chinchilla(r["N_opt"], r["D_opt"], **PAPER) == pytest.approx(1.947, rel=1e-9)  # the same loss


def test_no_inference_is_the_chinchilla_optimum_and_more_inference_trains_smaller_models_longer():
    none = inference_optimal(2.0, 1.0, **PAPER)
    assert none["N_opt"] == pytest.approx(none["chinchilla_N"], rel=1e-4) and none["saving"] == pytest.approx(0, abs=1e-8)
    sizes = [inference_optimal(2.0, T, **PAPER) for T in (1e11, 1e12, 1e13)]
    assert sizes[0]["N_opt"] > sizes[1]["N_opt"] > sizes[2]["N_opt"]
    assert sizes[0]["tokens_per_param"] < sizes[1]["tokens_per_param"] < sizes[2]["tokens_per_param"]
    assert 0 < sizes[0]["saving"] < sizes[1]["saving"] < sizes[2]["saving"]


@pytest.fixture(scope="module")
def law_json(tmp_path_factory):
    rng = np.random.default_rng(1)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6)))
    loss = laws.chinchilla(N, D, **TRUE) * (1 + 0.003 * rng.standard_normal(N.size))
    folder = tmp_path_factory.mktemp("inference")
    pd.DataFrame({"N": N, "D": D, "loss": loss}).to_csv(folder / "points.csv", index=False)
    assert main(["fit", "--points", str(folder / "points.csv"), "--law", "chinchilla", "--out",
                 str(folder / "law.json"), "--bootstrap", "20"]) == 0
    return folder / "law.json"


def test_a_fitted_law_recovers_the_true_optimum_inside_its_intervals(law_json):
    law = load_law(law_json)
    L, T = 2.2, 1e12
    truth = inference_optimal(L, T, **TRUE)
    got = law.inference_optimal(L, T)
    for key in ("N_opt", "D_opt", "tokens_per_param", "saving"):
        low, high = got[f"{key}_ci"]
        assert low <= got[key] <= high and low <= truth[key] <= high, key
    assert got["N_opt"] == pytest.approx(truth["N_opt"], rel=0.25)
    by_compute = law.optimal(1e21, inference_tokens=T)
    assert by_compute["loss"] == pytest.approx(law.optimal(1e21)["loss"]) and by_compute["compute"] == 1e21
    assert by_compute["N_opt"] < law.optimal(1e21)["N_opt"]


def test_predict_prints_the_inference_aware_model_and_its_saving(law_json, capsys):
    assert main(["predict", "--law", str(law_json), "--loss", "2.2", "--inference-tokens", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "inference-aware optimum for loss 2.2" in out and "saving" in out and "Chinchilla N" in out
    assert main(["predict", "--law", str(law_json), "--compute", "1e21", "--inference-tokens", "1e12"]) == 0
    assert "Chinchilla-optimal loss at C = 1e+21" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--loss", "2.2", "--inference-tokens", "-1"], "--inference-tokens -1 must be positive"),
    (["--N", "1e9", "--D", "1e10", "--inference-tokens", "1e12"], "goes with --loss or --compute"),
    (["--loss", "1.0", "--inference-tokens", "1e12"], "not above the law's irreducible loss"),
])
def test_bad_inference_input_exits_2_with_one_line(args, message, law_json, capsys):
    assert main(["predict", "--law", str(law_json), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_export_plots_tokens_per_parameter_and_saving_over_inference_demand(law_json, tmp_path):
    doc = load_law(law_json).doc
    assert plots.inference_aware(doc, pd.DataFrame(), tmp_path / "none.png") is None  # no max_C: no data scale
    doc = doc | {"meta": doc["meta"] | {"max_C": 1e20}}
    assert plots.inference_aware(doc, pd.DataFrame(), tmp_path / "inference_aware.png").stat().st_size > 0

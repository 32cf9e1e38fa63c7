"""`scaling fit` / `scaling predict` through the real CLI entry point, and the law file they exchange."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from fitting import laws, load_law
from runners.cli import main

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


@pytest.fixture(scope="module")
def points_csv(tmp_path_factory):
    rng = np.random.default_rng(0)
    N, D = (g.ravel() for g in np.meshgrid(np.logspace(7, 10, 6), np.logspace(9, 12, 6)))
    loss = laws.chinchilla(N, D, **HOFFMANN) * (1 + 0.005 * rng.standard_normal(N.size))
    path = tmp_path_factory.mktemp("fit") / "points.csv"
    pd.DataFrame({"N": N, "D": D, "loss": loss}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def law_json(points_csv):
    out = points_csv.parent / "law.json"
    assert main(["fit", "--points", str(points_csv), "--law", "chinchilla", "--out", str(out), "--bootstrap", "40"]) == 0
    return out


def test_fit_writes_a_law_file_with_schema_conventions_and_intervals(law_json, points_csv):
    doc = json.loads(law_json.read_text())
    assert doc["schema_version"] == 1 and doc["law"] == "chinchilla"
    assert set(doc["params"]) == {"A", "B", "E", "alpha", "beta"}
    assert all(len(doc["ci"][k]) == 2 for k in doc["params"])
    assert doc["conventions"]["loss"].endswith("nats per token") and doc["conventions"]["flops_per_param_token"] == 6
    section = doc["laws"]["chinchilla"]
    assert section["n_points"] == 36 and section["method"]["options"]["huber_delta"] == 1e-3
    assert section["bootstrap"]["replicates"] == 40 and section["bootstrap"]["converged"] >= 38
    assert doc["meta"]["points"] == str(points_csv) and len(doc["data_hash"]) == 16
    rows = pd.read_csv(law_json.with_suffix(".csv")).set_index("coefficient")
    assert rows.loc["alpha", "value"] == doc["params"]["alpha"] and rows.loc["alpha", "low"] == doc["ci"]["alpha"][0]
    assert law_json.with_suffix(".yaml").read_text().startswith("schema_version: 1")


def test_predict_at_a_compute_prints_the_closed_form(law_json, capsys):
    assert main(["predict", "--law", str(law_json), "--compute", "1e21"]) == 0
    out = capsys.readouterr().out
    law = load_law(law_json)
    opt = law.optimal(1e21)
    assert f"{opt['N_opt']:.4g} [{opt['N_opt_ci'][0]:.4g}, {opt['N_opt_ci'][1]:.4g}]" in out
    assert opt["N_opt_ci"][0] < opt["N_opt"] < opt["N_opt_ci"][1]
    assert opt["N_opt"] == pytest.approx(laws.optimal_allocation(1e21, **law.doc["params"])["N_opt"])
    assert "tokens/param" in out
    assert "loss, total" in out and "no extrapolation backtest" in out  # one law, one fit: nothing to backtest


def test_predict_loss_at_n_d_and_compute_for_a_loss(law_json, capsys):
    assert main(["predict", "--law", str(law_json), "--N", "1e9", "--D", "2e10"]) == 0
    law = load_law(law_json)
    assert f"= {float(law.loss(1e9, 2e10)):.4g} [" in capsys.readouterr().out
    low, high = law.loss_interval(1e9, 2e10)
    assert low < float(law.loss(1e9, 2e10)) < high
    assert main(["predict", "--law", str(law_json), "--loss", "2.2"]) == 0
    C = law.compute_for_loss(2.2)
    assert f"C = {C:.4g} FLOPs" in capsys.readouterr().out
    assert law.optimal(C)["loss"] == pytest.approx(2.2)


@pytest.mark.parametrize("args, message", [
    (["fit", "--points", "missing.csv"], "--points missing.csv: no such file"),
    (["predict", "--law", "missing.json", "--compute", "1e20"], "--law missing.json: no such file"),
    (["predict", "--law", "{law}", "--compute", "-1"], "--compute -1 must be positive"),
    (["predict", "--law", "{law}", "--N", "1e9"], "--N needs --D"),
    (["predict", "--law", "{law}", "--loss", "1.0"], "not above the law's irreducible loss"),
    (["predict", "--law", "{law}", "--N", "1e9", "--D", "1e10", "--E", "8"], "no experts term"),
    (["fit", "--points", "{points}", "--params", "total"], "--params total needs a 'N_total' column"),
    (["predict", "--law", "{law}", "--compute", "1e21", "--unique-tokens", "1e9"], "--unique-tokens needs a data_constrained law"),
    (["predict", "--law", "{law}", "--N", "1e9", "--D", "1e10", "--unique-tokens", "1e9"], "--unique-tokens goes with --compute"),
    (["fit", "--points", "{points}", "--law", "data_constrained"], "needs a 'unique_tokens' column"),
])
def test_bad_input_exits_2_with_one_line(args, message, law_json, points_csv, capsys):
    args = [a.format(law=law_json, points=points_csv) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_bad_table_from_the_shell_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"N": [1e9, 2e9], "loss": [2.0, 1.9]}).to_csv(bad, index=False)
    done = subprocess.run([sys.executable, "-m", "runners.cli", "fit", "--points", str(bad)], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr == "error: points table has no column 'D'; it needs N, D, loss\n"


def test_hparams_law_from_fit_to_predict(tmp_path, capsys):
    """An lr sweep at 4 scales whose optimum is 0.5 C^-0.2: fit --law hparams, then predict gives eta_opt."""
    rows = []
    for i, (N, D) in enumerate([(1e6, 2e7), (4e6, 8e7), (1.6e7, 3.2e8), (6.4e7, 1.28e9)]):
        lr_opt = 0.5 * (6 * N * D) ** -0.2
        for j, lr in enumerate(lr_opt * np.logspace(-1, 1, 5)):
            rows.append({"trial_id": f"{i}-{j}", "N": N, "D": D, "C": 6 * N * D, "lr": lr, "batch_size": 4096,
                         "loss": 3.0 * N ** -0.05 + 0.05 * np.log(lr / lr_opt) ** 2})
    pd.DataFrame(rows).to_csv(tmp_path / "lr.csv", index=False)
    out = tmp_path / "law.json"
    assert main(["fit", "--points", str(tmp_path / "lr.csv"), "--law", "hparams", "--out", str(out),
                 "--bootstrap", "10"]) == 0
    law = load_law(out)
    assert law.hparams is not None and not law.has_loss
    capsys.readouterr()
    assert main(["predict", "--law", str(out), "--N", "1e8", "--D", "2e9"]) == 0
    eta = float(capsys.readouterr().out.split("eta_opt")[1].split()[0])
    assert eta == pytest.approx(0.5 * (6 * 1e8 * 2e9) ** -0.2, rel=1e-3)


def test_predict_from_a_file_of_hparams_laws_alone_gives_lr_at_the_compute(tmp_path, capsys):
    law = tmp_path / "law.json"
    law.write_text(json.dumps({"schema_version": 1, "laws": {}, "hparams": {"lr_vs_C": {"k": 0.3118, "a": -0.125}}}))
    assert main(["predict", "--law", str(law), "--compute", "1e20"]) == 0
    assert f"{0.3118 * 1e20 ** -0.125:.4g}" in capsys.readouterr().out


def test_fit_into_a_folder_writes_its_law_json(points_csv, tmp_path):
    assert main(["fit", "--points", str(points_csv), "--law", "power", "--x", "N", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "law.json").read_text())["law"] == "power"


def test_data_constrained_from_fit_to_predict_under_a_data_budget(tmp_path, capsys):
    from runners.bench.fit import MUENNIGHOFF, repeated_points

    from fitting import fit_law, lawfile

    one_start = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}  # `scaling fit` searches 4,500
    section = fit_law(repeated_points(seed=3, sizes=4), "data_constrained", grid=one_start, bootstrap=20)
    out = lawfile.write(tmp_path / "law.json", lawfile.document({"data_constrained": section}, meta={},
                        conventions=lawfile.conventions(params=None, flops=None)))
    law = load_law(out)
    C, U = 1e21, 1e9
    opt = law.optimal(C, unique_tokens=U)
    from fitting.data_constrained import optimal_under_data

    truth = optimal_under_data(MUENNIGHOFF, C, U)
    assert opt["N_opt_ci"][0] < opt["N_opt"] < opt["N_opt_ci"][1]
    assert opt["loss"] == pytest.approx(truth["loss"], rel=0.02) and opt["epochs"] == pytest.approx(opt["D_opt"] / U)
    assert opt["loss_lost"] > 0 and opt["loss_lost_ci"][0] <= opt["loss_lost"] <= opt["loss_lost_ci"][1]
    capsys.readouterr()
    assert main(["predict", "--law", str(out), "--compute", str(C), "--unique-tokens", str(U)]) == 0
    printed = capsys.readouterr().out
    assert f"epochs             {opt['epochs']:.4g} [" in printed and "loss lost" in printed

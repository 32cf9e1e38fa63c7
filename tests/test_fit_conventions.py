"""Convention sensitivity (fitting/conventions.py): a law true in non-embedding N, refitted under total N."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from rich.console import Console

from fitting import laws, plots
from fitting.conventions import relabel, sensitivity, table
from fitting.errors import FitInputError
from fitting.export import ExportSummary

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
VOCAB, SEQ = 4096, 256


def embedding(N):
    """Input and output embeddings of a Kaplan-aspect model (d_model = 64 layers, N = 12 layers d^2)."""
    d_model = (64 * N / 12) ** (1 / 3)
    return 2 * VOCAB * d_model


def small_sweep(budgets=np.logspace(14, 17, 4), seed=0) -> pd.DataFrame:
    """IsoFLOP trials of small models (1e5 to 1e8 non-embedding parameters), where the embeddings are a large and
    shrinking share: the law is true in N_nonembed and C = 6 N_nonembed D."""
    rng, rows = np.random.default_rng(seed), []
    for C in budgets:
        n_opt = laws.optimal_allocation(C, **HOFFMANN)["N_opt"]
        for N in n_opt * np.logspace(-1, 1, 7):
            D = C / (6 * N)
            layers = (64 * N / 12) ** (1 / 3) / 64
            rows.append({"N": N, "N_nonembed": N, "N_active": N, "N_total": N + embedding(N), "D": D, "C": C,
                         "budget": C, "E": 1, "final": True, "C_exact": 6 * (N + VOCAB * (64 * N / 12) ** (1 / 3)) * D
                         + 6 * layers * SEQ * (64 * N / 12) ** (1 / 3) * D,
                         "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + 0.002 * rng.standard_normal())})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def section():
    return sensitivity(small_sweep(), bootstrap=10)


def test_counting_embeddings_lowers_a_and_the_tokens_per_parameter(section):
    by = {(c["N"], c["C"]): c for c in section["conventions"]}
    true_a = HOFFMANN["beta"] / (HOFFMANN["alpha"] + HOFFMANN["beta"])
    for law in ("isoflop", "chinchilla"):
        assert by["nonembed", "6N"][law]["a"] == pytest.approx(true_a, abs=0.03), law  # the convention it is true in
        for flops in ("6N", "exact"):
            nonembed, total = by["nonembed", flops][law], by["total", flops][law]
            assert total["a"] < nonembed["a"] - 0.03, (law, flops)
            assert total["a_ci"][0] <= total["a"] <= total["a_ci"][1]
            assert total["tokens_per_param"] < nonembed["tokens_per_param"], (law, flops)
    assert section["isoflop_a_spread"] > 0.03 and section["chinchilla_a_spread"] > 0.03
    assert set(table(section)["law"]) == {"isoflop", "chinchilla"} and len(table(section)) == 8


def test_a_convention_the_table_cannot_give_is_reported_and_a_one_convention_table_has_no_section():
    points = small_sweep().drop(columns="C_exact")
    with pytest.raises(FitInputError, match="C_exact"):
        relabel(points, "total", "exact")
    assert relabel(points, "total", "6N")["C"].equals(6 * points["N_total"] * points["D"])
    assert sensitivity(points[["N", "D", "C", "loss", "budget"]], bootstrap=0) is None


def test_the_export_draws_and_prints_the_sensitivity(section, tmp_path):
    doc = {"conventions": {"N": "non-embedding parameters", "C": "6 N D"}, "laws": {}, "meta": {},
           "convention_sensitivity": section}
    assert plots.convention_sensitivity(doc, pd.DataFrame(), tmp_path / "conventions.png").stat().st_size > 0
    console = Console(file=io.StringIO(), width=150)
    ExportSummary(doc=doc, paths=[], failed={}, left_out={}).print(console)
    out = console.file.getvalue()
    assert "convention sensitivity" in out and f"isoflop {section['isoflop_a_spread']:.2g}" in out

"""Compute multipliers (fitting/compare.py): two families generated with a known multiplier are told apart by it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting import fit_law, laws, lawfile, load_law
from fitting.compare import frontier, multipliers, shared_exponent_speedup
from runners.cli import main

BASE = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
MULTIPLIER = 1.5
# A scaled by f moves the compute-optimal loss by the factor f^(beta/(alpha+beta)) at every C, which is the loss
# of the baseline at C f^(-1/alpha): f = 1.5^-alpha makes the variant need 1.5x less compute at every budget
VARIANT = BASE | {"A": BASE["A"] * MULTIPLIER ** -BASE["alpha"]}


def isoflop_points(law: dict, rng, budgets=np.logspace(18, 21, 4), noise=0.002) -> pd.DataFrame:
    rows = []
    for C in budgets:
        n_opt = laws.optimal_allocation(C, **law)["N_opt"]
        for N in n_opt * np.logspace(-1, 1, 7):
            D = C / (6 * N)
            rows.append({"N": N, "D": D, "C": C, "budget": C,
                         "loss": laws.chinchilla(N, D, **law) * (1 + noise * rng.standard_normal())})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def two_families(tmp_path_factory):
    folder, rng = tmp_path_factory.mktemp("compare"), np.random.default_rng(3)
    paths = {}
    for name, law in (("base", BASE), ("variant", VARIANT)):
        points = isoflop_points(law, rng)
        points.to_csv(folder / f"{name}.csv", index=False)
        section = fit_law(points, "chinchilla", bootstrap=20, seed=1)
        doc = lawfile.document({"chinchilla": section}, conventions=lawfile.conventions(params=None, flops="6N"),
                               meta={"max_C": float(points["C"].max())})
        paths[name] = lawfile.write(folder / f"{name}.json", doc)
    return folder, paths


def test_the_multiplier_of_a_variant_needing_less_compute_is_recovered_at_every_budget(two_families):
    _, paths = two_families
    rows = multipliers(load_law(paths["base"]), load_law(paths["variant"]), [1e19, 1e21, 1e23])
    for row in rows:
        low, high = row["multiplier_ci"]
        assert low <= row["multiplier"] <= high and low <= MULTIPLIER <= high, row
        assert row["multiplier"] == pytest.approx(MULTIPLIER, rel=0.15)
    # counted in total parameters (an MoE holding 4x its active weights): its N_opt over the baseline's at 1.5x C
    row = multipliers(load_law(paths["base"]), load_law(paths["variant"]), [1e21], total_per_active=4.0)[0]
    truth = 4.0 * laws.optimal_allocation(1e21, **VARIANT)["N_opt"] / laws.optimal_allocation(1.5e21, **BASE)["N_opt"]
    low, high = row["total_params_ratio_ci"]
    assert low <= truth <= high and row["total_params_ratio"] == pytest.approx(truth, rel=0.15)
    same = multipliers(load_law(paths["base"]), load_law(paths["base"]), [1e21])[0]
    assert same["multiplier"] == pytest.approx(1.0, rel=1e-9)  # a law against itself: no gain


def test_the_shared_exponent_speedup_recovers_the_multiplier(two_families):
    folder, _ = two_families
    fronts = {n: frontier(pd.read_csv(folder / f"{n}.csv")) for n in ("base", "variant")}
    shared = shared_exponent_speedup(fronts, "base")
    low, high = shared["speedup_ci"]["variant"]
    assert low <= MULTIPLIER <= high and shared["speedup"]["variant"] == pytest.approx(MULTIPLIER, rel=0.1)
    gamma = BASE["alpha"] * BASE["beta"] / (BASE["alpha"] + BASE["beta"])  # the frontier's exponent in C
    assert shared["alpha"] == pytest.approx(gamma, rel=0.25) and shared["L_inf"] == pytest.approx(BASE["E"], rel=0.05)
    assert shared["L_inf_identified"] and shared["note"] is None
    flat = {n: f.assign(loss=5 * (f["C"] / 1e18) ** -0.05) for n, f in fronts.items()}  # a pure power law: no floor
    assert not shared_exponent_speedup(flat, "base")["L_inf_identified"]


def test_the_shared_exponent_interval_covers_near_95_percent():
    gamma = BASE["alpha"] * BASE["beta"] / (BASE["alpha"] + BASE["beta"])
    C = np.logspace(18, 22, 6)
    base_curve = laws.optimal_allocation(C, **BASE)["loss"]
    variant_curve = laws.optimal_allocation(C, **VARIANT)["loss"]
    assert variant_curve == pytest.approx(laws.optimal_allocation(C * MULTIPLIER, **BASE)["loss"], rel=1e-12)
    rng, covered, repeats = np.random.default_rng(7), 0, 200
    for _ in range(repeats):
        fronts = {n: pd.DataFrame({"C": C, "loss": curve * (1 + 0.002 * rng.standard_normal(C.size))})
                  for n, curve in (("base", base_curve), ("variant", variant_curve))}
        low, high = shared_exponent_speedup(fronts, "base")["speedup_ci"]["variant"]
        covered += low <= MULTIPLIER <= high
    assert 0.88 <= covered / repeats <= 0.99, (covered, gamma)


def test_compare_cli_prints_both_forms_and_rejects_a_law_against_itself(two_families, capsys):
    folder, paths = two_families
    assert main(["compare", str(paths["base"]), str(paths["variant"]), "--compute", "1e20", "1e23",
                 "--points", str(folder / "base.csv"), str(folder / "variant.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("multiplier 1.") == 2 and "budget-invariant speedup 1." in out
    assert out.count("warning: C = 1e+23 is 100x the largest compute") == 2 and "C = 1e+20 is" not in out
    assert main(["compare", str(paths["base"]), str(paths["variant"]), "--compute", "1e20", "--total-per-active", "4"]) == 0
    assert "total parameters over the baseline's" in capsys.readouterr().out
    assert main(["compare", str(paths["base"]), "--compute", "1e20"]) == 2
    assert "--E-a and --E-b" in capsys.readouterr().err
    assert main(["compare", str(paths["base"]), str(paths["variant"]), "--compute", "-1"]) == 2
    assert "--compute -1 must be positive" in capsys.readouterr().err

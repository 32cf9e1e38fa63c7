"""Optimal lr and batch-size laws recovered from synthetic loss bowls whose optimum moves by a known law."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from fitting.errors import FitInputError
from fitting.hparams import caveats, fit_hparams, hparams_at
from fitting.optimum import quadratic_optimum

# DeepSeek LLM 2024, eq. (1): their fitted optimum learning rate and batch size (tokens) against compute.
LR_K, LR_A = 0.3118, -0.1250
BATCH_K, BATCH_B = 0.2920, 0.3271
W_LR, W_BATCH = 0.05, 0.02  # bowl curvature per (ln lr)^2 and (ln batch)^2: about 1% worse at 2x off


def chinchilla_loss(N, D):
    """Hoffmann et al. 2022 fit: the floor of each cell's bowl."""
    return 1.69 + 406.4 / N**0.34 + 410.7 / D**0.28


def bowl(cells, lr_opt, batch_opt, *, lr_steps=(-2, -1, 0, 1, 2), batch_steps=(-2, -1, 0, 1, 2), step=2.0,
         noise=1e-3, seed=0):
    """Runs on a grid of lr x batch around each (N, D) cell's optimum (the grid deliberately off-centre by
    a fraction of a step), with loss = floor + W_LR dln(lr)^2 + W_BATCH dln(batch)^2, times 1 + noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for N, D in cells:
        C = 6 * N * D
        lr_star, b_star = lr_opt(N, D, C), batch_opt(N, D, C)
        offset = rng.uniform(-0.4, 0.4, size=2)
        for i in lr_steps:
            for j in batch_steps:
                lr, batch = lr_star * step ** (i + offset[0]), b_star * step ** (j + offset[1])
                loss = (chinchilla_loss(N, D) + W_LR * np.log(lr / lr_star) ** 2
                        + W_BATCH * np.log(batch / b_star) ** 2) * (1 + noise * rng.standard_normal())
                rows.append({"N": N, "D": D, "C": C, "lr": lr, "batch_size": batch, "loss": loss})
    return pd.DataFrame(rows)


def deepseek_lr(N, D, C):
    return LR_K * C**LR_A


def deepseek_batch(N, D, C):
    return BATCH_K * C**BATCH_B


CHINCHILLA_CELLS = [(n, 20 * n) for n in (1e8, 2.5e8, 6e8, 1.5e9, 4e9)]  # D = 20 N: C spans ~1600x


def test_deepseek_laws_recovered_and_intervals_cover_truth():
    points = bowl(CHINCHILLA_CELLS, deepseek_lr, deepseek_batch, seed=1)
    # Rows a fit must leave out: a diverged run and a non-final evaluation, each with a misleading loss.
    junk = points.iloc[[0, 1]].assign(loss=[0.5, 0.5], status=["diverged", "finished"], final=[True, False])
    points = pd.concat([points.assign(status="finished", final=True), junk], ignore_index=True)
    section = fit_hparams(points, bootstrap=200)

    lr, batch = section["lr_vs_C"], section["batch_vs_C"]
    assert lr["a"] == pytest.approx(LR_A, abs=0.01)
    assert batch["b"] == pytest.approx(BATCH_B, abs=0.01)
    # k is the law at C = 1, 18 decades below the data: judge it by the law's value where the data are.
    C = 6 * 6e8 * 20 * 6e8
    assert lr["k"] * C ** lr["a"] == pytest.approx(deepseek_lr(0, 0, C), rel=0.03)
    assert batch["k"] * C ** batch["b"] == pytest.approx(deepseek_batch(0, 0, C), rel=0.03)
    for law, truth in ((lr, {"k": LR_K, "a": LR_A}), (batch, {"k": BATCH_K, "b": BATCH_B})):
        for name, value in truth.items():
            lo, hi = law["ci"][name]
            assert lo <= value <= hi, (name, lo, value, hi)
    # D = 20 N in every cell: N and D cannot be told apart, so the (N, D) laws are left out, with a reason.
    assert "move together" in section["skipped"]["lr_vs_ND"]
    assert len(section["cells"]) == 5 and all(c["n_runs"] == 25 and not c["flags"] for c in section["cells"])
    json.dumps(section)  # JSON-ready: plain floats, lists and dicts


def test_quadratic_optimum_beats_argmin_on_a_coarse_grid():
    truth = np.log([3e-3, 2e5])
    lrs, batches = np.meshgrid(np.log(3e-3) + np.log(4.0) * (np.arange(5) - 2 + 0.45),
                               np.log(2e5) + np.log(4.0) * (np.arange(4) - 2 + 0.3))
    x = np.column_stack([lrs.ravel(), batches.ravel()])
    loss = 3.0 + W_LR * (x[:, 0] - truth[0]) ** 2 + W_BATCH * (x[:, 1] - truth[1]) ** 2
    found = quadratic_optimum(x, loss)
    argmin_error = np.abs(x[np.argmin(loss)] - truth)
    assert found.flag is None
    assert np.all(np.abs(found.x - truth) < 0.1 * argmin_error)
    assert found.loss == pytest.approx(3.0, abs=1e-9)


def test_one_knob_at_a_time_sweeps_give_the_optimum_without_an_interaction_term():
    truth = np.log([3e-3, 2e5])
    steps = np.log(2.0) * (np.arange(5) - 2 + 0.3)
    x = np.vstack([np.column_stack([truth[0] + steps, np.full(5, truth[1] + 0.2)]),  # lr sweep at one batch
                   np.column_stack([np.full(5, truth[0] - 0.1), truth[1] + steps])])  # batch sweep at one lr
    loss = 3.0 + W_LR * (x[:, 0] - truth[0]) ** 2 + W_BATCH * (x[:, 1] - truth[1]) ** 2
    found = quadratic_optimum(x, loss)
    assert found.flag is None
    assert found.x == pytest.approx(truth, abs=1e-9)


def test_quadratic_without_a_minimum_falls_back_to_the_argmin_flagged():
    x = np.log([1e-4, 3e-4, 1e-3, 3e-3, 1e-2])
    still_falling = 3.0 - 0.1 * (x - x[0])  # the best lr lies beyond the sweep
    peaked = 3.0 - 0.05 * (x - x[2]) ** 2  # a ridge: concave
    assert quadratic_optimum(x, still_falling).flag in ("outside_grid", "not_convex")
    assert quadratic_optimum(x, still_falling).x == pytest.approx([x[-1]])
    assert quadratic_optimum(x, peaked).flag == "not_convex"


def nd_lr(N, D, C):
    return np.exp(2.0 - 0.30 * np.log(N) - 0.10 * np.log(D))


def nd_batch(N, D, C):
    return np.exp(-1.0 + 0.15 * np.log(N) + 0.45 * np.log(D))


ND_CELLS = [(n, d) for n in (1e8, 4e8, 1.6e9) for d in (2e9, 8e9, 3.2e10)]


def test_nd_laws_recover_known_exponents_and_take_precedence_in_hparams_at():
    points = bowl(ND_CELLS, nd_lr, nd_batch, seed=1)
    # Each run rounds its tokens to whole batches: D differs a little within a cell, which stays one cell.
    points["D"] *= 1 + 0.04 * np.random.default_rng(1).uniform(-1, 1, len(points))
    section = fit_hparams(points, bootstrap=100)
    assert len(section["cells"]) == len(ND_CELLS)
    lr, batch = section["lr_vs_ND"], section["batch_vs_ND"]
    assert [lr["c1"], lr["c2"]] == pytest.approx([-0.30, -0.10], abs=0.02)
    assert [batch["d1"], batch["d2"]] == pytest.approx([0.15, 0.45], abs=0.02)
    assert lr["ci"]["c1"][0] <= -0.30 <= lr["ci"]["c1"][1]
    N, D = 5e9, 1e11  # a new scale, beyond the cells
    at = hparams_at(section, N=N, D=D, C=6 * N * D)
    assert at["lr"] == pytest.approx(nd_lr(N, D, 0), rel=0.1)
    assert at["batch_size"] == pytest.approx(nd_batch(N, D, 0), rel=0.1)


def test_near_optimal_runs_on_a_dense_grid_recover_the_exponents():
    steps = tuple(np.arange(-8, 9))
    points = bowl(ND_CELLS, nd_lr, nd_batch, lr_steps=steps, batch_steps=(0,), step=2**0.25, noise=2e-4, seed=2)
    section = fit_hparams(points, bootstrap=50, fit_on="near_optimal")
    assert section["fitted_on"] == "near_optimal"
    assert [section["lr_vs_ND"]["c1"], section["lr_vs_ND"]["c2"]] == pytest.approx([-0.30, -0.10], abs=0.05)
    assert "batch_vs_C" in section["skipped"]  # one batch size per cell: no batch law


def test_kaplan_batch_against_loss_recovers_B_star_and_alpha_B():
    B_star, alpha_B, k, p = 2e8, 0.21, 0.02, -1.5  # Kaplan et al. 2020, table 4: B* = 2e8 tokens, alpha_B = 0.21
    cells = [(n, d) for n in (1e6, 1e7, 1e8, 1e9) for d in (1e8, 1e10)]
    points = bowl(cells, lambda N, D, C: k * chinchilla_loss(N, D) ** p,
                  lambda N, D, C: B_star / chinchilla_loss(N, D) ** (1 / alpha_B), noise=2e-4, seed=3)
    section = fit_hparams(points, bootstrap=100)
    assert section["batch_vs_L"]["alpha_B"] == pytest.approx(alpha_B, rel=0.05)
    assert section["batch_vs_L"]["B_star"] == pytest.approx(B_star, rel=0.2)
    assert section["lr_vs_L"]["p"] == pytest.approx(p, abs=0.05)
    lo, hi = section["batch_vs_L"]["ci"]["alpha_B"]
    assert lo <= alpha_B <= hi


def test_moe_vs_dense_at_equal_loss():
    loss_law = lambda N, D, C: 0.02 * chinchilla_loss(N, D) ** -1.5  # noqa: E731
    dense = bowl(ND_CELLS, loss_law, nd_batch, seed=4).assign(family="dense")
    moe = bowl(ND_CELLS, lambda N, D, C: 2 * loss_law(N, D, C), nd_batch, seed=5).assign(family="moe")
    section = fit_hparams(pd.concat([dense, moe], ignore_index=True), bootstrap=50)
    assert set(section["families"]) == {"dense", "moe"}
    ratio = section["moe_vs_dense"]["lr"]
    assert ratio["moe_over_dense"] == pytest.approx([2.0] * 3, rel=0.05)
    assert all(lo <= 2.0 <= hi for lo, hi in ratio["ci"])


def test_hparams_at_uses_the_law_at_a_new_scale_and_none_for_a_knob_without_one():
    section = {"lr_vs_C": {"k": LR_K, "a": LR_A}}
    at = hparams_at({"hparams": section}, N=1e10, D=2e11, C=1e22)
    assert at == {"lr": pytest.approx(LR_K * 1e22**LR_A), "batch_size": None}


def test_bad_tables_raise_one_line_errors():
    points = bowl(CHINCHILLA_CELLS[:2], deepseek_lr, deepseek_batch, lr_steps=(0, 1, 2), batch_steps=(0,))
    cases = [
        (points.drop(columns=["lr", "batch_size"]), "no lr or batch_size column"),
        (points[points["N"] == points["N"].iloc[0]], "found 1 of 1 cell"),
        (points.assign(lr=1e-3, batch_size=1e5), "found 0 of 2 cell"),
        (points.assign(lr=-1.0), "'lr' must be finite and positive"),
    ]
    for table, message in cases:
        with pytest.raises(FitInputError, match=message) as info:
            fit_hparams(table, bootstrap=5)
        assert "\n" not in str(info.value)


def test_bootstrap_zero_fits_the_laws_without_intervals():
    loss_law = lambda N, D, C: 0.02 * chinchilla_loss(N, D) ** -1.5  # noqa: E731
    points = pd.concat([bowl(ND_CELLS[:3], loss_law, nd_batch, seed=6).assign(family="dense"),
                        bowl(ND_CELLS[3:6], loss_law, nd_batch, seed=7).assign(family="moe")], ignore_index=True)
    with_ci, without = fit_hparams(points, bootstrap=20), fit_hparams(points, bootstrap=0)
    assert without["lr_vs_C"]["a"] == with_ci["lr_vs_C"]["a"]
    assert without["lr_vs_C"]["ci"] == {"k": None, "a": None} and without["cells"][0]["lr_ci"] is None
    assert without["moe_vs_dense"]["lr"]["ci"] == [None, None, None]
    json.dumps(without)


def test_an_lr_sweep_at_two_scales_gives_lr_at_a_third_and_no_batch_size():
    points = bowl(CHINCHILLA_CELLS[:2], deepseek_lr, deepseek_batch, lr_steps=(-2, -1, 0, 1, 2), batch_steps=(0,))
    section = fit_hparams(points, bootstrap=20)
    assert set(section["skipped"]) == {"lr_vs_ND", "batch_vs_C", "batch_vs_ND", "batch_vs_L"}
    N, D = 4e9, 8e10
    at = hparams_at(section, N=N, D=D, C=6 * N * D)
    assert at["lr"] == pytest.approx(deepseek_lr(N, D, 6 * N * D), rel=0.1)
    assert at["batch_size"] is None


def test_caveats_name_an_unresolved_slope_and_use_far_beyond_the_search():
    cells = [{"C": 1e13}, {"C": 1e14}]
    unresolved = {"cells": cells, "lr_vs_C": {"k": 1e-12, "a": 0.68, "ci": {"k": [1e-15, 8.0], "a": [-0.26, 0.89]}}}
    lines = caveats(unresolved, [2e13, 5e14])
    assert len(lines) == 2 and "includes 0" in lines[0] and "lr_vs_C slope a = +0.68" in lines[0]
    assert "5.0x beyond the searched cells" in lines[1]
    resolved = {"cells": cells, "lr_vs_C": {"k": 10.0, "a": -0.28, "ci": {"k": [0.02, 1e4], "a": [-0.54, -0.05]}},
                "batch_vs_ND": {"d0": 1.0, "d1": 0.1, "d2": 0.2, "ci": {"d0": [0, 2], "d1": [0.05, 0.2], "d2": [0.1, 0.3]}}}
    assert caveats(resolved, [2e13, 1.5e14]) == []

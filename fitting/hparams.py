"""Optimal learning rate and batch size per scale, and the laws of how they move with scale (issue 7).

Scales ("cells") group the runs of one family at one N and one D (and one IsoFLOP budget where the table
has one); a cell's optimum is fitting/optimum.py's. The laws are least squares in natural logs, fitted on
the per-cell optima by default ("optima": a quadratic's vertex falls between grid values, while the runs
of a coarse grid are stuck on them and pull exponents toward zero), or on every near-optimal run of each
cell ("near_optimal", as DeepSeek LLM 2024), in which case the loss of a cell is its best observed loss.

Intervals are 95% percentile bootstraps (None with bootstrap 0): each replicate resamples the runs inside every cell, finds the
cell optima again and refits every law, so one set of replicates gives the cell and the law intervals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from fitting.errors import FitInputError
from fitting.optimum import NEAR_OPTIMAL, Optimum, near_optimal, percentile_interval, quadratic_optimum
from fitting.table import check, parametric_rows

KNOBS = ("lr", "batch_size")
MIN_CELLS = 2  # two scales give a law (the quickstart sweeps lr at two scales and uses the law at a third)
SCALE_GAP = 0.10  # N or D values within 10% of a neighbour are one scale: D is rounded to whole batches per run
SAME = 0.01  # regressor values across cells spanning less than 1% cannot carry a law
FIT_ON = ("optima", "near_optimal")


@dataclass(frozen=True)
class Law:
    knob: str
    regressors: tuple[str, ...]  # logs of these, plus an intercept, predict the log of the knob
    names: tuple[str, ...]
    form: str
    params: Callable[[np.ndarray], tuple[float, ...]]  # (intercept, slopes...) -> the named coefficients


LAWS = {
    "lr_vs_C": Law("lr", ("C",), ("k", "a"), "lr = k * C**a", lambda b: (np.exp(b[0]), b[1])),
    "batch_vs_C": Law("batch_size", ("C",), ("k", "b"), "batch_size = k * C**b", lambda b: (np.exp(b[0]), b[1])),
    "lr_vs_ND": Law("lr", ("N", "D"), ("c0", "c1", "c2"), "ln(lr) = c0 + c1 ln(N) + c2 ln(D)", tuple),
    "batch_vs_ND": Law("batch_size", ("N", "D"), ("d0", "d1", "d2"), "ln(batch_size) = d0 + d1 ln(N) + d2 ln(D)",
                       tuple),
    "lr_vs_L": Law("lr", ("L",), ("k", "p"), "lr = k * L**p", lambda b: (np.exp(b[0]), b[1])),
    "batch_vs_L": Law("batch_size", ("L",), ("B_star", "alpha_B"), "batch_size = B_star / L**(1/alpha_B)",
                      lambda b: (np.exp(b[0]), -1 / b[1])),
}


@dataclass(frozen=True)
class Cell:
    N: float
    D: float
    C: float
    family: str | None
    budget: float | None
    knobs: tuple[str, ...]  # the knobs swept in this cell: the columns of x
    x: np.ndarray  # (runs, knobs): log values
    loss: np.ndarray


@dataclass(frozen=True)
class CellFit:
    cell: Cell
    best: Optimum
    boot: tuple[Optimum, ...]
    boot_rows: np.ndarray  # (replicates, runs): the runs each replicate drew


# --- cells -------------------------------------------------------------------------------------------------

def _scale_ids(values: pd.Series) -> np.ndarray:
    """One id per scale: sorted values closer than SCALE_GAP to their neighbour share an id."""
    logs = np.log(values.to_numpy(float))
    order = np.argsort(logs)
    ids = np.empty(len(logs), int)
    ids[order] = np.cumsum(np.r_[0, np.diff(logs[order]) > np.log1p(SCALE_GAP)])
    return ids


def _usable_runs(points: pd.DataFrame) -> pd.DataFrame:
    """Finished final rows with the knobs present; FitInputError when no knob column or no rows are left."""
    knobs = [k for k in KNOBS if k in points.columns and points[k].notna().any()]
    if not knobs:
        raise FitInputError("points table has no lr or batch_size column: the hparams laws need runs at several "
                            "learning rates or batch sizes per scale")
    runs, _ = parametric_rows(points)
    runs = check(check(runs).dropna(subset=knobs), tuple(knobs) + (("C",) if _has_C(runs) else ()))
    if runs.empty:
        raise FitInputError("points table has no finished final run with lr or batch_size: nothing to fit")
    return runs


def _has_C(runs: pd.DataFrame) -> bool:
    return "C" in runs.columns and bool(runs["C"].notna().all())


def _cells(runs: pd.DataFrame) -> list[Cell]:
    knobs = [k for k in KNOBS if k in runs.columns]
    keys = {"n": _scale_ids(runs["N"]), "d": _scale_ids(runs["D"])}
    if "family" in runs.columns:
        keys["family"] = runs["family"].fillna("").astype(str).to_numpy()
    if "budget" in runs.columns:
        keys["budget"] = runs["budget"].fillna(0.0).to_numpy(float)
    cells = []
    for key, group in runs.groupby([pd.Series(v, index=runs.index) for v in keys.values()], sort=True):
        swept = tuple(k for k in knobs if group[k].nunique() > 1)
        N, D = np.exp(np.log(group["N"]).mean()), np.exp(np.log(group["D"]).mean())
        cells.append(Cell(
            N=float(N), D=float(D), C=float(np.exp(np.log(group["C"]).mean())) if _has_C(runs) else 6.0 * N * D,
            family=dict(zip(keys, key)).get("family") or None,
            budget=float(group["budget"].iloc[0]) if "budget" in group.columns and group["budget"].notna().all()
            else None,
            knobs=swept, x=np.log(group[list(swept)].to_numpy(float)), loss=group["loss"].to_numpy(float),
        ))
    return cells


def _fit_cell(cell: Cell, bootstrap: int, rng: np.random.Generator) -> CellFit:
    n = len(cell.loss)
    if not cell.knobs:
        return CellFit(cell, Optimum(np.zeros(0), float(cell.loss.min()), "not_swept"), (), np.zeros((0, n), int))
    rows = rng.integers(0, n, size=(bootstrap, n))
    return CellFit(cell, quadratic_optimum(cell.x, cell.loss),
                   tuple(quadratic_optimum(cell.x[r], cell.loss[r]) for r in rows), rows)


def _cell_entry(fit: CellFit) -> dict:
    c = fit.cell
    entry: dict = {"N": c.N, "D": c.D, "C": c.C}
    entry |= {"family": c.family} if c.family is not None else {}
    entry |= {"budget": c.budget} if c.budget is not None else {}
    for knob, key in (("lr", "lr"), ("batch_size", "batch")):
        swept = knob in c.knobs
        j = c.knobs.index(knob) if swept else 0
        entry[f"{key}_opt"] = float(np.exp(fit.best.x[j])) if swept else None
        entry[f"{key}_ci"] = percentile_interval(np.exp([o.x[j] for o in fit.boot])) if swept else None
    return entry | {"best_loss": float(c.loss.min()), "loss_at_opt": fit.best.loss, "n_runs": len(c.loss),
                    "near_optimal": int(near_optimal(c.loss).sum()),
                    "flags": [fit.best.flag] if fit.best.flag else []}


# --- laws --------------------------------------------------------------------------------------------------

def _law_rows(fits: list[CellFit], knob: str, fit_on: str, replicate: int | None) -> dict[str, np.ndarray]:
    """The points a law of `knob` is fitted on (columns N, D, C, L, y = log knob), from the measured runs
    (replicate None) or from one bootstrap replicate. `cell` numbers the cell each point came from."""
    cols: dict[str, list] = {k: [] for k in ("N", "D", "C", "L", "y", "cell")}
    for i, f in enumerate(fits):
        if knob not in f.cell.knobs:
            continue
        j = f.cell.knobs.index(knob)
        rows = np.arange(len(f.cell.loss)) if replicate is None else f.boot_rows[replicate]
        if fit_on == "optima":
            opt = f.best if replicate is None else f.boot[replicate]
            ys, L = [opt.x[j]], opt.loss
        else:
            loss = f.cell.loss[rows]
            ys, L = f.cell.x[rows][near_optimal(loss), j], loss.min()
        for y in ys:
            for k, v in (("N", f.cell.N), ("D", f.cell.D), ("C", f.cell.C), ("L", L), ("y", y), ("cell", i)):
                cols[k].append(v)
    return {k: np.asarray(v, float) for k, v in cols.items()}


def _why_not(rows: dict[str, np.ndarray], law: Law) -> str | None:
    """Why `rows` cannot pin down `law`, or None."""
    cells = np.unique(rows["cell"]).astype(int)
    need = len(law.regressors) + 1
    if len(cells) < max(need, MIN_CELLS):
        return f"{law.knob} is swept in {len(cells)} cell(s); this law needs {max(need, MIN_CELLS)}"
    per_cell = {r: np.log([rows[r][rows["cell"] == c][0] for c in cells]) for r in law.regressors}
    for r, v in per_cell.items():
        if np.ptp(v) < np.log1p(SAME):
            return f"every cell has about the same {r}; sweep {law.knob} at other values of {r}"
    if len(law.regressors) > 1:
        centered = np.column_stack([v - v.mean() for v in per_cell.values()])
        s = np.linalg.svd(centered / centered.std(axis=0), compute_uv=False)
        if s.min() < 1e-3 * s.max():
            return (f"ln {' and ln '.join(law.regressors)} move together across cells; "
                    f"add cells that vary one at fixed others")
    return None


def _regress(rows: dict[str, np.ndarray], law: Law) -> np.ndarray:
    X = np.column_stack([np.ones(len(rows["y"]))] + [np.log(rows[r]) for r in law.regressors])
    return np.linalg.lstsq(X, rows["y"], rcond=None)[0]


def _law_entry(law: Law, point: np.ndarray, replicates: np.ndarray, n_cells: int) -> dict:
    named = np.array([law.params(b) for b in replicates], float).reshape(len(replicates), len(law.names))
    ci = {name: percentile_interval(named[:, i]) for i, name in enumerate(law.names)}
    return {name: float(v) for name, v in zip(law.names, law.params(point))} | {
        "ci": ci, "form": law.form, "cells": n_cells}


def _fit_laws(fits: list[CellFit], fit_on: str, bootstrap: int) -> tuple[dict, dict, dict[str, tuple]]:
    """(laws, skipped, betas): the fitted laws by name, why the others were left out, and each fitted law's
    log-space coefficients with their bootstrap replicates."""
    laws, skipped, betas = {}, {}, {}
    rows = {knob: [_law_rows(fits, knob, fit_on, b) for b in [None, *range(bootstrap)]] for knob in KNOBS}
    for name, law in LAWS.items():
        measured, *replicated = rows[law.knob]
        reason = _why_not(measured, law)
        if reason:
            skipped[name] = reason
            continue
        point = _regress(measured, law)
        reps = np.array([_regress(r, law) for r in replicated]).reshape(len(replicated), len(point))
        laws[name] = _law_entry(law, point, reps, len(np.unique(measured["cell"])))
        betas[name] = (point, reps)
    return laws, skipped, betas


def _section(fits: list[CellFit], fit_on: str, bootstrap: int) -> tuple[dict, dict[str, tuple]]:
    swept = [f for f in fits if f.cell.knobs]
    if len(swept) < MIN_CELLS:
        raise FitInputError(
            f"hparams fit needs lr or batch_size swept at {MIN_CELLS} or more scales (N, D); found {len(swept)} "
            f"of {len(fits)} cell(s): sweep lr or batch_size at each of {MIN_CELLS}+ model sizes or token counts")
    laws, skipped, betas = _fit_laws(fits, fit_on, bootstrap)
    section = {"fitted_on": fit_on, "bootstrap": bootstrap, "near_optimal_tolerance": NEAR_OPTIMAL,
               "cells": [_cell_entry(f) for f in fits]} | laws
    return section | ({"skipped": skipped} if skipped else {}), betas


# --- dense vs MoE ------------------------------------------------------------------------------------------

def _moe_vs_dense(dense: dict, moe: dict, betas: dict[str, dict[str, tuple]]) -> dict:
    """MoE's optimal lr and batch over dense's, from each family's law against loss, at three losses that both
    families reach (the overlap of their cells' losses at the optimum)."""
    losses = {f: [c["loss_at_opt"] for c in s["cells"]] for f, s in (("dense", dense), ("moe", moe))}
    lo, hi = max(min(v) for v in losses.values()), min(max(v) for v in losses.values())
    if lo > hi:
        return {"skipped": f"dense and moe reach no common loss (dense {min(losses['dense']):.4g}-"
                           f"{max(losses['dense']):.4g}, moe {min(losses['moe']):.4g}-{max(losses['moe']):.4g})"}
    at = np.geomspace(lo, hi, 3)

    def predict(beta: np.ndarray) -> np.ndarray:
        """The knob at each loss in `at` from log-space coefficients (..., 2) -> (..., 3)."""
        return np.exp(beta[..., :1] + beta[..., 1:2] * np.log(at))

    out: dict = {"loss": at.tolist()}
    for knob, name in (("lr", "lr_vs_L"), ("batch_size", "batch_vs_L")):
        if name not in betas["dense"] or name not in betas["moe"]:
            out.setdefault("skipped", {})[knob] = f"{name} is not fitted for both families"
            continue
        (d, d_reps), (m, m_reps) = betas["dense"][name], betas["moe"][name]
        ratios = predict(m_reps) / predict(d_reps)  # replicates of the two families are independent: pair by index
        out[knob] = {"dense": predict(d).tolist(), "moe": predict(m).tolist(),
                     "moe_over_dense": (predict(m) / predict(d)).tolist(),
                     "ci": [percentile_interval(ratios[:, i]) for i in range(len(at))]}
    return out


# --- public ------------------------------------------------------------------------------------------------

def fit_hparams(points: pd.DataFrame, *, bootstrap: int = 200, seed: int = 0, fit_on: str = "optima") -> dict:
    """The JSON-ready `hparams` section of law.json: per-cell optima and the lr and batch-size laws against C,
    (N, D) and loss, with bootstrap intervals; per family and MoE vs dense when both families are present."""
    if fit_on not in FIT_ON:
        raise FitInputError(f"fit_on {fit_on!r} is not one of {', '.join(FIT_ON)}")
    if bootstrap < 0:
        raise FitInputError(f"bootstrap {bootstrap} must be 0 (no intervals) or more (200 gives stable 95% intervals)")
    runs = _usable_runs(points)
    rng = np.random.default_rng(seed)
    fits = [_fit_cell(c, bootstrap, rng) for c in _cells(runs)]
    section, _ = _section(fits, fit_on, bootstrap)
    section["C_source"] = "column C" if _has_C(runs) else "6 N D"
    if {"dense", "moe"} <= {f.cell.family for f in fits}:
        families, betas = {}, {}
        for family in ("dense", "moe"):
            try:
                families[family], betas[family] = _section([f for f in fits if f.cell.family == family],
                                                           fit_on, bootstrap)
            except FitInputError as e:
                section.setdefault("skipped", {})[f"family {family}"] = str(e)
        section["families"] = families
        if len(families) == 2:
            section["moe_vs_dense"] = _moe_vs_dense(families["dense"], families["moe"], betas)
    return section


def caveats(section: dict, C) -> list[str]:
    """Why values `hparams_at` gives at these computes deserve doubt, a line each: a law whose slope's interval
    includes 0 (the search did not resolve which way the knob moves with scale), and computes more than 2x
    beyond the searched cells. A law fitted on two scales of a noisy search can say anything out there."""
    section = section.get("hparams", section)
    out = []
    for knob, names in (("lr", ("lr_vs_ND", "lr_vs_C")), ("batch_size", ("batch_vs_ND", "batch_vs_C"))):
        name = next((n for n in names if n in section), None)
        if name is None:
            continue
        law = section[name]
        for slope in LAWS[name].names[1:]:
            lo, hi = law.get("ci", {}).get(slope, (None, None))
            if lo is not None and lo <= 0 <= hi:
                out.append(f"{knob}: {name} slope {slope} = {law[slope]:+.3g} with 95% interval [{lo:.3g}, {hi:.3g}], "
                           f"which includes 0: the search does not resolve how {knob} moves with scale")
    searched = [cell["C"] for cell in section.get("cells", [])]
    C = np.asarray(C, float)
    if searched and C.size:
        beyond = max(C.max() / max(searched), min(searched) / C.min())
        if beyond > 2:
            out.append(f"used at C {C.min():.3g} to {C.max():.3g}, up to {beyond:.1f}x beyond the searched cells "
                       f"(C {min(searched):.3g} to {max(searched):.3g})")
    return out


def hparams_at(section: dict, *, N: float, D: float, C: float) -> dict:
    """{"lr", "batch_size"} at a scale: from the law against (N, D) where fitted, else against C; None for a
    knob with no fitted law. Takes the hparams section or a whole law file that holds one."""
    section = section.get("hparams", section)
    out: dict = {}
    for knob, by_nd, by_c in (("lr", "lr_vs_ND", "lr_vs_C"), ("batch_size", "batch_vs_ND", "batch_vs_C")):
        if by_nd in section:
            c0, c1, c2 = (section[by_nd][n] for n in LAWS[by_nd].names)
            out[knob] = float(np.exp(c0 + c1 * np.log(N) + c2 * np.log(D)))
        elif by_c in section:
            k, exponent = (section[by_c][n] for n in LAWS[by_c].names)
            out[knob] = float(k * C**exponent)
        else:
            out[knob] = None
    return out

"""Convention sensitivity: the main laws refitted under N in {non-embedding, total} x C in {6N, exact}.

At small sizes the choice alone moves the N_opt exponent a by 0.1 to 0.2: embeddings are a large and shrinking
share of a small model, so counting them flattens N_opt(C). Kaplan's a = 0.73 against Chinchilla's 0.5 is
largely this (Porian et al. 2024; Pearce and Song 2024). Under 6N, C = 6 N D with the same N the law counts
(Kaplan: non-embedding; Chinchilla: total); under exact, C is the C_exact column whatever N is.

Per convention: isoflop's a (approach 2) and chinchilla's a = beta / (alpha + beta) (approach 3), each with its
bootstrap interval, and the tokens per parameter each gives at the largest budget (its C under that convention).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fitting import fit_law, laws
from fitting.bootstrap import interval
from fitting.errors import FitInputError
from fitting.isoflop import budgets_of
from fitting.table import N_COLUMNS, flops_per_param_token, parametric_rows

GRID = (("nonembed", "6N"), ("nonembed", "exact"), ("total", "6N"), ("total", "exact"))
MAX_REPLICATES = 100  # eight refits: the intervals need not be as fine as the main law's


def relabel(points: pd.DataFrame, params: str, flops: str) -> pd.DataFrame:
    """The table with N and C under one convention (C = 6 N D with that N under 6N, C_exact under exact)."""
    column = N_COLUMNS[params]
    if column not in points.columns:
        raise FitInputError(f"the points table has no {column!r} column")
    if flops == "exact" and "C_exact" not in points.columns:
        raise FitInputError("the points table has no 'C_exact' column")
    N = points[column].astype(float)
    C = 6.0 * N * points["D"].astype(float) if flops == "6N" else points["C_exact"].astype(float)
    return points.assign(N=N, C=C)


def _isoflop(rows: pd.DataFrame, top: float, bootstrap: int, seed: int) -> dict:
    section = fit_law(rows, "isoflop", bootstrap=bootstrap, seed=seed)
    samples = section.get("bootstrap", {}).get("samples") or {}

    def tokens_per_param(q):  # D_opt / N_opt = (k_D / k_N) C^(b - a) at the largest budget
        k_n, a, k_d, b = (np.asarray(q[key], float) for key in ("k_N", "a", "k_D", "b"))
        return k_d / k_n * top ** (b - a)

    at_top = float(tokens_per_param(section["params"]))
    return {"a": section["params"]["a"], "a_ci": section["ci"]["a"], "C": top, "tokens_per_param": at_top,
            "tokens_per_param_ci": interval(tokens_per_param(samples), estimate=at_top) if samples.get("a") else None}


def _chinchilla(rows: pd.DataFrame, section: dict, top: float) -> dict:
    k = flops_per_param_token(rows)
    samples = section.get("bootstrap", {}).get("samples")

    def figures(q):
        return laws.optimal_allocation(top, **{c: np.asarray(q[c], float) for c in laws.PARAMS["chinchilla"]},
                                       flops_per_param_token=k)

    point, spread = figures(section["params"]), figures(samples) if samples else None
    return {"a": float(point["a"]), "a_ci": interval(spread["a"], estimate=float(point["a"])) if spread else None, "C": top,
            "tokens_per_param": float(point["tokens_per_param"]),
            "tokens_per_param_ci": (interval(spread["tokens_per_param"], estimate=float(point["tokens_per_param"]))
                                    if spread else None)}


def sensitivity(points: pd.DataFrame, *, bootstrap: int, seed: int = 0) -> dict | None:
    """law.json's convention_sensitivity section: per convention and law, a and tokens per parameter with their
    intervals (or why not fitted), and the spread of a across conventions; None when the table has neither
    N_nonembed nor N_total (a hand-made table of one convention)."""
    if not any(N_COLUMNS[p] in points.columns for p, _ in GRID):
        return None
    replicates = min(bootstrap, MAX_REPLICATES)
    rows, _ = parametric_rows(points)
    if "E" in rows.columns and rows["E"].nunique() > 1:
        rows = rows[rows["E"] == 1]  # the dense laws: an MoE's N is another question (active against total)
    out: dict = {"conventions": [], "replicates": replicates,
                 "note": "6N: C = 6 N D with the N of the convention; exact: the C_exact column; tokens per "
                         "parameter at the largest budget's C under each convention"}
    surfaces: dict[str, dict | Exception] = {}  # chinchilla is a law in N and D: one fit per N, whatever C counts

    def chinchilla(table: pd.DataFrame, params: str, top: float) -> dict:
        from fitting.export import fit_surface  # the export's checks: identifiable and physical, or not a law

        if params not in surfaces:
            try:
                surfaces[params] = fit_surface(table, "chinchilla", bootstrap=replicates, seed=seed)
            except Exception as e:  # kept, so the other C convention reports it without fitting again
                surfaces[params] = e
        if isinstance(surfaces[params], Exception):
            raise surfaces[params]
        return _chinchilla(table, surfaces[params], top)

    for params, flops in GRID:
        entry: dict = {"N": params, "C": flops}
        try:
            table = relabel(rows, params, flops)
        except FitInputError as e:
            out["conventions"].append(entry | {"not_fitted": str(e)})
            continue
        top = float(table.loc[budgets_of(table) == budgets_of(table).max(), "C"].median())
        planned = table[table["budget"].notna()] if "budget" in table.columns else table.iloc[:0]
        for law, fit in (("isoflop", lambda: _isoflop(planned, top, replicates, seed)),
                         ("chinchilla", lambda: chinchilla(table, params, top))):
            if law == "isoflop" and planned.empty:
                entry[law] = {"not_fitted": "no rows with a budget (not an IsoFLOP sweep)"}
                continue
            try:
                entry[law] = fit()
            except Exception as e:  # as in the export: a law these points cannot support is reported, not raised
                from fitting.export import reason

                entry[law] = {"not_fitted": reason(e)}
        out["conventions"].append(entry)
    for law in ("isoflop", "chinchilla"):
        a = [c[law]["a"] for c in out["conventions"] if "a" in c.get(law, {})]
        out[f"{law}_a_spread"] = float(max(a) - min(a)) if len(a) > 1 else None
    return out


def table(section: dict) -> pd.DataFrame:
    """One row per convention and law: a, its interval, tokens per parameter and its interval."""
    rows = []
    for c in section["conventions"]:
        for law in ("isoflop", "chinchilla"):
            fit = c.get(law, {})
            a_ci, t_ci = fit.get("a_ci") or [None, None], fit.get("tokens_per_param_ci") or [None, None]
            rows.append({"N": c["N"], "C": c["C"], "law": law, "a": fit.get("a"), "a_low": a_ci[0], "a_high": a_ci[1],
                         "tokens_per_param": fit.get("tokens_per_param"), "tpp_low": t_ci[0], "tpp_high": t_ci[1],
                         "at_C": fit.get("C"), "not_fitted": fit.get("not_fitted", c.get("not_fitted"))})
    return pd.DataFrame(rows)

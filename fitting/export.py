"""Everything a points table supports, fitted and written: law.json (+ CSV and YAML), plots, a printed summary.

A law the table cannot support is reported in `failed` with its reason; it never stops the export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from rich.table import Table

from fitting import compare, conventions as convention_sensitivity, lawfile, report
from fitting.errors import FitInputError
from fitting.isoflop import budgets_of
from fitting.table import flops_per_param_token, is_final, parametric_rows


@dataclass
class Fitted:
    sections: dict = field(default_factory=dict)
    hparams: dict | None = None
    failed: dict = field(default_factory=dict)


def _try(fitted: Fitted, name: str, fit) -> None:
    try:
        fitted.sections[name] = fit()
    except Exception as e:  # a law the data cannot support is reported, whatever went wrong inside its fitter
        fitted.failed[name] = reason(e)


def reason(e: Exception) -> str:
    return str(e).splitlines()[0] if isinstance(e, FitInputError) else f"{type(e).__name__}: {e}"


def _varies(points: pd.DataFrame, column: str) -> bool:
    return column in points.columns and points[column].dropna().nunique() > 1


def best_per_cell(points: pd.DataFrame) -> pd.DataFrame:
    """Where lr or batch size vary, each (family, E, N, D) cell keeps only its best final row: a loss law is
    about the loss at tuned hyperparameters, and an average over a search would bias it up."""
    if not (_varies(points, "lr") or _varies(points, "batch_size")) or "final" not in points.columns:
        return points
    final = is_final(points)
    keys = [c for c in ("family", "E", "N", "D") if c in points.columns]
    best = points[final].sort_values("loss").drop_duplicates(keys)
    return pd.concat([points[~final], best]).sort_index()


def _physical(law: str, params: dict) -> None:
    """A surface whose loss does not fall with N and with D, or whose coefficients ran off to infinity, is the
    optimiser's answer to points that do not separate N from D (or to mistuned trials), not a scaling law:
    report it, do not use it."""
    bad = [f"{k} = {v:.3g}" for k, v in params.items() if not np.isfinite(v)]
    bad += [f"{k} = {params[k]:.3g}" for k in ("alpha", "beta") if np.isfinite(params[k]) and not 0 < params[k] <= 2]
    if bad:
        raise FitInputError(f"the {law} fit is not a scaling law ({', '.join(bad)}; its exponents must lie in (0, 2]): "
                            f"in these points loss does not fall with both N and D; check the largest models' "
                            f"hyperparameters, or add sizes and token counts")


def _repeats_data(points: pd.DataFrame) -> bool:
    """Some final point trained on repeated data (more than one epoch of its unique tokens)."""
    if "unique_tokens" not in points.columns:
        return False
    final, _ = parametric_rows(points)
    return bool((final["D"] > final["unique_tokens"]).any())


def fit_surface(rows: pd.DataFrame, law: str, **options) -> dict:
    """A loss law in N and D (the fitter refuses points that cannot determine one), kept only if it is physical."""
    section = _fit(law, rows, options)
    _physical(law, section["params"])
    return section


def fit_all(points: pd.DataFrame, *, bootstrap: int, seed: int = 0, resample: str = "points",
            delta: float = 1e-3) -> Fitted:
    """chinchilla (dense rows), moe (when E varies), envelope (curves with C), isoflop (budgets), hparams
    (when lr or batch_size vary), data_constrained (dense rows, when some final point repeats its data),
    and the extrapolation backtest of chinchilla, moe and data_constrained on the largest budget.
    The loss laws see each cell's best run when hyperparameters vary; the hparams laws see every run."""
    fitted = Fitted()
    options = {"bootstrap": bootstrap, "seed": seed, "resample": resample}
    tuned = best_per_cell(points)
    dense = tuned[tuned["E"] == 1] if _varies(tuned, "E") else tuned

    def surface(law: str, rows: pd.DataFrame, holdout_above: float | None = None):
        backtest = {} if holdout_above is None else {"holdout_above": holdout_above}
        return fit_surface(rows, law, **options, delta=delta, **backtest)

    _try(fitted, "chinchilla", lambda: surface("chinchilla", dense))
    if _varies(points, "E"):
        _try(fitted, "moe", lambda: surface("moe", tuned))
    if "C" in points.columns and points["C"].notna().all():
        has_curves = "final" in points.columns and not is_final(points).all()
        if has_curves:
            _try(fitted, "envelope", lambda: _fit("envelope", points, options))
        for law, rows in (("chinchilla", dense), ("moe", tuned)):  # moe, when fitted, is the law optimal() uses
            if law in fitted.sections:
                _holdout_largest_budget(fitted, law, rows, partial(surface, law, rows))
    if _repeats_data(dense):
        _try(fitted, "data_constrained", lambda: surface("data_constrained", dense))
        if "data_constrained" in fitted.sections and "C" in points.columns and points["C"].notna().all():
            _holdout_largest_budget(fitted, "data_constrained", dense, partial(surface, "data_constrained", dense))
    if "budget" in points.columns and points["budget"].notna().any():
        _try(fitted, "isoflop", lambda: _fit("isoflop", tuned[tuned["budget"].notna()], options))
    if _varies(points, "lr") or _varies(points, "batch_size"):
        hp = Fitted()
        _try(hp, "hparams", lambda: _fit("hparams", points, options))
        fitted.hparams, fitted.failed = hp.sections.get("hparams"), {**fitted.failed, **hp.failed}
    return fitted


def _fit(law: str, points: pd.DataFrame, options: dict) -> dict:
    from fitting import fit_law

    return fit_law(points, law, **options)


def _holdout_largest_budget(fitted: Fitted, law: str, rows: pd.DataFrame, refit) -> None:
    """Refit `law` without the largest budget (refit(holdout_above) -> section) and record in its section how
    well it predicts that budget's points: a bootstrap cannot see a bias every point shares, this can, and
    Law.optimal widens its loss interval by it."""
    final, _ = parametric_rows(rows)
    budget = budgets_of(final)
    if budget.nunique() < 3:
        fitted.failed[f"{law} extrapolation"] = (f"the backtest needs at least 3 budgets (a law fitted on 2, checked "
                                                 f"on the largest); this sweep has {budget.nunique()}")
        return
    try:
        check = refit(float(final.loc[budget < budget.max(), "C"].max()))
    except Exception as e:  # as in _try: a backtest that cannot be fitted is reported, not raised
        fitted.failed[f"{law} extrapolation"] = reason(e)
        return
    fitted.sections[law]["extrapolation"] = check["extrapolation"]


@dataclass
class ExportSummary:
    doc: dict
    paths: list[Path]
    failed: dict[str, str]
    left_out: dict[str, int]

    def print(self, console) -> None:
        table = Table(title=f"fitted laws (N: {self.doc['conventions']['N']}; C: {self.doc['conventions']['C']})")
        for col in ("law", "coefficient", "value", "95% interval"):
            table.add_column(col, justify="right" if col != "law" else "left")
        for name, section in self.doc["laws"].items():
            values = {**section["params"], **section.get("derived", {})}
            cis = {**section["ci"], **section.get("derived_ci", {})}
            for k, v in values.items():
                ci, why = cis.get(k), section.get("not_identified", {}).get(k)
                table.add_row(name, k, "not identified" if why else f"{v:.4g}",
                              why or (f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-"))
        for name, section in (self.doc.get("hparams") or {}).items():
            if isinstance(section, dict) and "form" in section:  # the fitted hparams laws, e.g. lr = k * C**a
                for k, v in section.items():
                    if isinstance(v, float):
                        ci = (section.get("ci") or {}).get(k)
                        table.add_row(f"{name} ({section['form']})", k, f"{v:.4g}", f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "-")
        console.print(table)
        law = lawfile.Law(self.doc)
        if any(n in self.doc["laws"] for n in ("chinchilla", "moe", "isoflop", "envelope")):
            for c in _reference_computes(self.doc):
                try:
                    opt = law.optimal(c)
                except FitInputError as e:  # a law that cannot give an allocation says why, once
                    console.print(f"no optimal allocation: {e}")
                    break
                reach = opt["reach"].get("C")
                console.print(f"C = {c:.3g}: N_opt {opt['N_opt']:.3g}, D_opt {opt['D_opt']:.3g}, "
                              f"{opt['tokens_per_param']:.3g} tokens/param"
                              + (f", loss {opt['loss']:.4g}" if opt["loss"] is not None else "")
                              + (f" ({reach:.3g}x the largest fitted C)" if reach and reach > 1.01 else ""))
        for name, section in self.doc["laws"].items():
            x = section.get("extrapolation")
            if x:
                covered = sum(bool(p["covered"]) for p in x["points"])
                console.print(f"{name} extrapolation: fitted below C = {x['holdout_above']:.3g}, {x['n_held_out']} "
                              f"points above ({x['factor']:.3g}x): mean |error| {x['mean_abs_relative_error']:.2%}, "
                              f"max {x['max_abs_relative_error']:.2%}, rms {x['rms_relative_error']:.2%}, "
                              f"mean {x['mean_relative_error']:+.2%}, {covered} inside their interval")
        _print_akima(console, self.doc["laws"].get("isoflop"))
        _print_conventions(console, self.doc.get("convention_sensitivity"))
        _print_compare(console, self.doc.get("compare"))
        if self.left_out:
            console.print("points left out of the parametric fits: "
                          + ", ".join(f"{n} {why}" for why, n in self.left_out.items()))
        for name, why in self.failed.items():
            console.print(f"not fitted: {name}: {why}")
        console.print("wrote " + ", ".join(str(p) for p in self.paths))


def _interval(ci) -> str:
    return f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else ""


def _print_akima(console, section: dict | None) -> None:
    """Approach 2 twice: the parabola's a beside Akima's, and how far a window end moves each minimum."""
    if not section or "params" not in section.get("akima", {}):
        return
    akima = section["akima"]
    shifts = {kind: [b[f"window_shift_{kind}"] for b in section["budgets"] if b.get(f"window_shift_{kind}") is not None]
              for kind in ("quadratic", "akima")}
    line = (f"isoflop a: parabola {section['params']['a']:.3g}{_interval(section['ci'].get('a'))}, Akima "
            f"{akima['params']['a']:.3g}{_interval(akima['ci'].get('a'))}")
    if "a_parabola_minus_akima" in akima:
        line += f"; parabola - Akima {akima['a_parabola_minus_akima']:+.3g}{_interval(akima['a_parabola_minus_akima_ci'])}"
    if shifts["quadratic"] and shifts["akima"]:
        line += (f"; leaving out an end size moves the minimum by up to {max(shifts['quadratic']):.2g} decades "
                 f"(parabola), {max(shifts['akima']):.2g} (Akima)")
    console.print(line)


def _print_conventions(console, section: dict | None) -> None:
    if not section:
        return
    rows = convention_sensitivity.table(section)
    if rows["a"].isna().all():
        console.print("convention sensitivity: not fitted: " + "; ".join(dict.fromkeys(rows["not_fitted"].astype(str))))
        return
    table = Table(title="convention sensitivity: the N_opt exponent a and tokens per parameter at the largest budget")
    for col in ("N", "C", "law", "a", "95% interval", "tokens/param", "95% interval "):
        table.add_column(col, justify="right")
    for _, r in rows.iterrows():
        if r["a"] is None or pd.isna(r["a"]):
            table.add_row(r["N"], r["C"], r["law"], "not fitted", str(r["not_fitted"])[:60], "", "")
            continue
        table.add_row(r["N"], r["C"], r["law"], f"{r['a']:.3g}", _pair(r["a_low"], r["a_high"]),
                      f"{r['tokens_per_param']:.3g}", _pair(r["tpp_low"], r["tpp_high"]))
    console.print(table)
    spreads = [f"{law} {section[f'{law}_a_spread']:.2g}" for law in ("isoflop", "chinchilla")
               if section.get(f"{law}_a_spread") is not None]
    if spreads:
        console.print("a moves across conventions by " + ", ".join(spreads) + " (the choice of N and C alone)")


def _pair(low, high) -> str:
    return "-" if low is None or pd.isna(low) else f"[{low:.3g}, {high:.3g}]"


def _print_compare(console, section: dict | None) -> None:
    if not section:
        return
    for name, rows in section["variants"].items():
        console.print(f"{name} over {section['baseline']}, compute multiplier (joint law, paired replicates): " + ", ".join(
            f"C = {r['compute']:.3g}: {r['multiplier']:.3g}" + (f" [{r['multiplier_ci'][0]:.3g}, {r['multiplier_ci'][1]:.3g}]"
                                                               if r["multiplier_ci"] else "") for r in rows))
        if rows and "total_params_ratio" in rows[0]:
            console.print(f"{name}: total parameters over dense's for the same loss ({rows[0]['total_per_active']:.3g} "
                          f"total per active): " + ", ".join(f"C = {r['compute']:.3g}: {r['total_params_ratio']:.3g}"
                                                             f"{_interval(r['total_params_ratio_ci'])}" for r in rows))
    shared = section["shared_exponent"]
    if "not_fitted" in shared:
        console.print(f"budget-invariant speedup: not fitted: {shared['not_fitted']}")
        return
    for name, value in shared["speedup"].items():
        low, high = shared["speedup_ci"][name]
        console.print(f"{name} over {shared['baseline']}, budget-invariant speedup (shared alpha {shared['alpha']:.3g}): "
                      f"{value:.3g} [{low:.3g}, {high:.3g}]")
    if shared["note"]:
        console.print(f"  warning: {shared['note']}")


def _reference_computes(doc: dict) -> list[float]:
    """The largest compute in the data and one and two decades beyond it."""
    top = max((b["C"] for b in doc["laws"].get("isoflop", {}).get("budgets", [])), default=None)
    top = top or doc["meta"].get("max_C") or 1e18
    return [top, 10 * top, 100 * top]


def law_rows(doc: dict) -> pd.DataFrame:
    """The law file flattened: one row per law and coefficient (derived figures included); a coefficient the
    data do not identify has no value and says why in `not_identified`."""
    rows = []
    for name, section in doc["laws"].items():
        values = {**section["params"], **section.get("derived", {})}
        cis = {**section["ci"], **section.get("derived_ci", {})}
        for k, v in values.items():
            ci, why = cis.get(k) or [None, None], section.get("not_identified", {}).get(k)
            rows.append({"law": name, "coefficient": k, "value": None if why else v, "low": ci[0], "high": ci[1],
                         "n_points": section["n_points"], "not_identified": why})
    return pd.DataFrame(rows, columns=["law", "coefficient", "value", "low", "high", "n_points", "not_identified"])


def _without_samples(doc: dict) -> dict:
    """The law file without the bootstrap replicates (the YAML export is for reading)."""
    laws = {name: {k: ({**v, "samples": "see law.json"} if k == "bootstrap" else v) for k, v in s.items()}
            for name, s in doc["laws"].items()}
    return {**doc, "laws": laws}


def write_law_files(doc: dict, path: Path) -> list[Path]:
    """law.json and, beside it, the same law as CSV (one row per coefficient) and YAML (without the replicates)."""
    path = Path(path)
    paths = [lawfile.write(path, doc), path.with_suffix(".csv"), path.with_suffix(".yaml")]
    law_rows(doc).to_csv(paths[1], index=False)
    plain = json.loads(json.dumps(_without_samples(doc)))  # numpy scalars -> plain numbers for YAML
    paths[2].write_text(yaml.safe_dump(plain, sort_keys=False))
    return paths


def export_laws(points: pd.DataFrame, out_dir: Path, *, meta: dict, bootstrap: int, seed: int = 0) -> ExportSummary:
    from fitting import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fitted = fit_all(points, bootstrap=bootstrap, seed=seed)
    conventions = lawfile.conventions(params=_choice(meta.get("N"), ("active", "nonembed", "total")),
                                      flops=_choice(meta.get("C"), ("6N", "exact")),
                                      flops_per_param_token=flops_per_param_token(points))
    if "C" in points.columns and points["C"].notna().any():
        meta = {**meta, "max_C": float(points["C"].max())}
    doc = lawfile.document(fitted.sections, conventions=conventions, meta=meta, hparams=fitted.hparams,
                           failed=fitted.failed)
    if (section := compare.export_section(doc, points, _reference_computes(doc))) is not None:
        doc["compare"] = section
    sensitivity = convention_sensitivity.sensitivity(best_per_cell(points), bootstrap=bootstrap, seed=seed)
    if sensitivity is not None:
        doc["convention_sensitivity"] = sensitivity
    paths = write_law_files(doc, out_dir / "law.json")
    if sensitivity is not None:
        paths.append(out_dir / "conventions.csv")
        convention_sensitivity.table(sensitivity).to_csv(paths[-1], index=False)
    report.update(out_dir / "README.md", doc)  # the README's quoted numbers follow the law they quote
    drawn, plots_failed = plots.plot_all(doc, points, out_dir)
    _, left_out = parametric_rows(points)
    return ExportSummary(doc=doc, paths=paths + drawn, failed=fitted.failed | plots_failed, left_out=left_out)


def _choice(value, allowed: tuple[str, ...]) -> str | None:
    return value if value in allowed else None

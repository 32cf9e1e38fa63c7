"""law.json: the one place that says what a law file holds, and the Law that evaluates one.

{
  "schema_version": 1,
  "law": the main law (the first of moe, chinchilla, kaplan fitted; else the only one),
  "params", "ci": the main law's coefficients and their 95% bootstrap intervals ([low, high] or null),
  "conventions": {"N": which parameters, "C": which FLOPs, "loss": units, "flops_per_param_token": k in C = k N D},
  "data_hash": the main law's data hash, "meta": what the caller passed (sweep, corpus hash, ...),
  "laws": {name: section}, every law fitted: params, ci, method and options, n_points, left_out,
          data_hash, diagnostics, bootstrap (replicates, converged, samples), derived figures, and
          "extrapolation" (chinchilla, moe and data_constrained exported over 3+ budgets, or any law fitted with
          --holdout-above):
          the same law refitted below the largest budget and scored on it (fitting/parametric.py): holdout_above,
          n_held_out, mean_abs_relative_error, max_abs_relative_error, rms_relative_error, mean_relative_error
          (signed, predicted / actual - 1), fitted_max_C, held_out_max_C, factor (their ratio), points,
          The data_constrained section (fitting/data_constrained.py) adds n_single_epoch, n_base and
          not_identified ({coefficient: why the points cannot determine it}; its ci is then null),
          The isoflop section also has "akima" (fitting/isoflop.py): the frontier on Akima minima (params, ci,
          budgets_used, method, a_parabola_minus_akima and its paired-bootstrap interval), and per budget
          akima_N_opt, akima_loss_opt, akima_flag, window_shift_quadratic, window_shift_akima,
  "compare": when a sweep has several expert counts (fitting/compare.py): baseline "E1", "variants": {E8: [per
          compute: compute, variant_loss, baseline_compute, multiplier, multiplier_ci, replicates_paired, note]},
          "shared_exponent": the budget-invariant fit (L_inf, alpha, C_0, A per family, speedup, speedup_ci,
          dof, rms_residual, L_inf_identified, note, method) or {"not_fitted": why},
  "convention_sensitivity": when the points carry N_nonembed / N_total (fitting/conventions.py): "conventions",
          one entry per N in {nonembed, total} x C in {6N, exact}, with per law (isoflop, chinchilla) a, a_ci, C,
          tokens_per_param, tokens_per_param_ci (or not_fitted); isoflop_a_spread, chinchilla_a_spread,
          replicates, note,
  "hparams": the learning-rate and batch-size laws (fitting/hparams.py), when fitted,
  "failed": {name: why that law (or "<law> extrapolation", its backtest) could not be fitted}
}

A parametric section also holds "not_identified" ({coefficient: why the data do not pin it down; it has no
interval}) and "data_range" (N, D, C as [min, max] over the fitted points, E, budgets) (fitting/identify.py).
Intervals are bootstrap percentile intervals stretched to include the estimate (fitting/bootstrap.py).

Law.reach(N=, D=, C=) says how far a prediction goes beyond the fitted data (factor over the largest fitted
value) and warns past EXTRAPOLATION_WARN, and about coefficients the data did not identify; Law.optimal refuses
what a law cannot give (an allocation from one budget or from exponents not identified, a moe law at an expert
count it has no gamma for).

Law.optimal(C[, unique_tokens=U]) returns N_opt, D_opt, loss, tokens_per_param, each with a bootstrap interval
(<key>_ci), the law it used, `reach` and `warnings` (Law.reach), and loss_ci_total: loss_ci widened on each side
in quadrature by systematic_rel * loss, where
systematic_rel = rms_relative_error of that law's backtest x max(1, ln(C / largest C fitted) / ln(factor));
loss_ci_total_method says how, or why there is no total interval (None).
Law.optimal(C, inference_tokens=T) and Law.inference_optimal(L, T) give the inference-aware optimum instead
(fitting/inference.py): the model reaching the Chinchilla-optimal loss at C (or L) with the least training plus
inference FLOPs, its saving against the Chinchilla-optimal model, each with an interval over the replicates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from fitting import inference, laws
from fitting.bootstrap import interval
from fitting.errors import FitInputError

SCHEMA_VERSION = 1
EXTRAPOLATION_WARN = 10.0  # a prediction more than this many times beyond the largest fitted C, N or D is flagged
LOSS_UNITS = "validation cross-entropy, nats per token"


def conventions(*, params: str | None, flops: str | None, flops_per_param_token: float = 6.0) -> dict:
    return {"N": {"active": "active non-embedding parameters", "nonembed": "non-embedding parameters",
                  "total": "all parameters", None: "as given in the points table"}[params],
            "C": {"6N": "6 N D", "exact": "exact training FLOPs (attention and head included)",
                  None: "as given in the points table (C = 6 N D where it had no C)"}[flops],
            "loss": LOSS_UNITS, "flops_per_param_token": flops_per_param_token,
            "optimal_allocation": "minimum of the law subject to C = flops_per_param_token * N * D"}


def main_law(sections: dict) -> str | None:
    for name in laws.SURFACES:
        if name in sections:
            return name
    return next(iter(sections), None)


def document(sections: dict, *, conventions: dict, meta: dict, hparams: dict | None = None,
             failed: dict | None = None) -> dict:
    """The whole law file from the fitted sections."""
    main = main_law(sections)
    doc = {"schema_version": SCHEMA_VERSION, "law": main,
           "params": sections[main]["params"] if main else {}, "ci": sections[main]["ci"] if main else {},
           "conventions": conventions, "data_hash": sections[main].get("data_hash") if main else None,
           "meta": meta, "laws": sections}
    if hparams is not None:
        doc["hparams"] = hparams
    doc["failed"] = failed or {}
    return doc


def write(path: str | Path, doc: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    return path


def read(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FitInputError(f"--law {path}: no such file; write one with `scaling fit`")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FitInputError(f"--law {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        raise FitInputError(f"--law {path}: not a law file of schema version {SCHEMA_VERSION}")
    return doc


def load_law(path: str | Path) -> Law:
    return Law(read(path))


class Law:
    """A law file to evaluate: loss at (N, D, E), compute-optimal allocation, the compute for a loss."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.laws: dict = doc.get("laws", {})
        self.hparams: dict | None = doc.get("hparams")
        self.k = float(doc.get("conventions", {}).get("flops_per_param_token", 6.0))

    @property
    def has_loss(self) -> bool:
        return any(name in self.laws for name in laws.SURFACES)

    def _surface(self) -> tuple[str, dict]:
        for name in laws.SURFACES:
            if name in self.laws:
                return name, self.laws[name]
        raise FitInputError(f"the law file has no loss law ({', '.join(laws.SURFACES)}); fit one with --law chinchilla")

    @staticmethod
    def _samples(section: dict) -> dict | None:
        samples = section.get("bootstrap", {}).get("samples")
        return {k: np.asarray(v, float) for k, v in samples.items()} if samples else None

    def loss(self, N, D, E=1):
        name, section = self._surface()
        _refuse_experts(name, section, E)
        return laws.surface_loss(name, section["params"], N, D, E)

    def reach(self, *, N=None, D=None, C=None) -> tuple[dict, list[str]]:
        """How far (N, D, C) lie beyond the fitted data: {variable: value / largest fitted value} (None where the
        file does not say), and warnings: far extrapolation, and coefficients of the law the data do not identify."""
        name = next((n for n in (*laws.SURFACES, "isoflop", "envelope") if n in self.laws), None)
        section = self.laws.get(name, {})
        top = dict(section.get("data_range", {}))
        top.setdefault("C", [None, self.doc.get("meta", {}).get("max_C")])
        factors, warnings = {}, []
        for key, value in (("C", C), ("N", N), ("D", D)):
            if value is None:
                continue
            largest = (top.get(key) or [None, None])[1]
            factors[key] = None if not largest else float(value) / largest
            if factors[key] is not None and factors[key] > EXTRAPOLATION_WARN:
                warnings.append(f"{key} = {value:.3g} is {factors[key]:.3g}x the largest fitted ({largest:.3g}): far "
                                f"extrapolation; the interval covers the fit's noise, not a change of regime")
        for k, why in section.get("not_identified", {}).items():
            warnings.append(f"{name} {k} is not identified: {why}")
        return factors, warnings

    def loss_interval(self, N, D, E=1) -> list[float] | None:
        """95% interval of the predicted loss at one (N, D, E) over the bootstrap replicates."""
        name, section = self._surface()
        samples = self._samples(section)
        return (interval(laws.surface_loss(name, samples, N, D, E), estimate=float(self.loss(N, D, E)))
                if samples else None)

    def _dense_law(self, E) -> str | None:
        """The section that gives chinchilla coefficients at E experts: moe when fitted (any E), else chinchilla (E 1)."""
        return next((n for n in ("moe", "chinchilla") if n in self.laws and (n == "moe" or E == 1)), None)

    def chinchilla_coefficients(self, E) -> tuple[dict, dict | None] | None:
        """chinchilla coefficients (point and per replicate) at E experts, when the file has chinchilla or moe."""
        name = self._dense_law(E)
        if name is None:
            return None
        section = self.laws[name]
        _refuse_experts(name, section, E)
        samples = self._samples(section)
        reps = None if samples is None else laws.as_dense(name, samples, E)
        return laws.as_dense(name, section["params"], E), reps

    def optimal(self, C, E=1, *, unique_tokens: float | None = None, inference_tokens: float | None = None) -> dict:
        """N_opt, D_opt, loss and tokens per parameter at compute C, each with its interval (None without bootstrap),
        `law`: the section they come from, and loss_ci_total (see the module docstring). With inference_tokens:
        inference_optimal at the loss the Chinchilla-optimal model of training compute C reaches.

        From the closed form of the moe (or chinchilla) law; from N_opt = k_N C^a, D_opt = k_D C^b of the
        isoflop or envelope fit when the file has no parametric law (then loss is None). With unique_tokens U:
        the optimum when only U unique tokens exist, from the data_constrained section, with epochs (D_opt / U)
        and loss_lost (against unlimited data) besides."""
        if unique_tokens is not None and inference_tokens is not None:
            raise FitInputError("give --unique-tokens or --inference-tokens, not both: no law here combines them")
        if unique_tokens is not None:
            return self._optimal_under_data(C, E, unique_tokens)
        if inference_tokens is not None:
            return self.inference_optimal(self.optimal(C, E)["loss"], inference_tokens, E) | {"compute": float(C)}
        dense = self.chinchilla_coefficients(E)
        if dense is not None:
            name = self._dense_law(E)
            _refuse_allocation(name, self.laws[name])
            point, reps = dense
            out = {k: float(v) for k, v in laws.optimal_allocation(C, **point, flops_per_param_token=self.k).items()}
            spread = laws.optimal_allocation(C, **reps, flops_per_param_token=self.k) if reps else None
        else:
            name = next((n for n in ("isoflop", "envelope") if n in self.laws), None)
            if name is None:
                raise FitInputError("the law file has no law for the optimal allocation; fit chinchilla, isoflop or envelope")
            section = self.laws[name]
            out = _frontier(section["params"], C)
            samples = self._samples(section)
            spread = _frontier(samples, C) if samples else None
        keys = ("N_opt", "D_opt", "loss", "tokens_per_param")
        result = {"law": name} | {k: out.get(k) for k in keys}
        for k in keys:
            result[f"{k}_ci"] = (interval(spread[k], estimate=result[k])
                                 if spread is not None and spread.get(k) is not None else None)
        s, method = (systematic(name, self.laws[name], C) if result["loss"] is not None
                     else (None, f"the {name} law gives no loss"))
        total = None if s is None else widened(result["loss"], result["loss_ci"], s)
        factors, warnings = self.reach(N=result["N_opt"], D=result["D_opt"], C=C)
        return result | {"loss_ci_total": total, "systematic_rel": s, "loss_ci_total_method": method,
                         "reach": factors, "warnings": warnings}

    def _optimal_under_data(self, C, E, unique_tokens: float) -> dict:
        from fitting.data_constrained import optimal_under_data

        section = self.laws.get("data_constrained")
        if section is None:
            raise FitInputError("--unique-tokens needs a data_constrained law in the law file; fit one with "
                                "`scaling fit --law data_constrained` on points with a unique_tokens column")
        if E != 1:
            raise FitInputError("the data_constrained law has no experts term; give E = 1 with --unique-tokens")
        out = optimal_under_data(section["params"], C, unique_tokens, flops_per_param_token=self.k)
        samples = self._samples(section)
        spread = optimal_under_data(samples, C, unique_tokens, flops_per_param_token=self.k) if samples else None
        result = {"law": "data_constrained", "unique_tokens": float(unique_tokens)}
        for k, v in out.items():
            result[k] = v
            result[f"{k}_ci"] = interval(spread[k], estimate=v) if spread is not None else None
        s, method = systematic("data_constrained", section, C)
        total = None if s is None else widened(result["loss"], result["loss_ci"], s)
        return result | {"loss_ci_total": total, "systematic_rel": s, "not_identified": section.get("not_identified", {}),
                         "loss_ci_total_method": method}

    def inference_optimal(self, L: float, T: float, E=1) -> dict:
        """The model that reaches loss L with the least training (k N D) plus inference ((k/3) N T) FLOPs, beside
        the Chinchilla-optimal model for L (fitting/inference.py); each figure with its interval over the bootstrap
        replicates (each replicate's optimum for the same L; a replicate whose E is at or above L is left out and
        counted in replicates_unreachable)."""
        dense = self.chinchilla_coefficients(E)
        if dense is None:
            raise FitInputError("the inference-aware optimum needs a chinchilla or moe law; fit --law chinchilla")
        point, reps = dense
        out = inference.inference_optimal(L, T, **point, flops_per_param_token=self.k)
        if not np.isfinite(out["N_opt"]):
            raise FitInputError(f"loss {L:g} is not above the law's irreducible loss E = {point['E']:.4g}; "
                                f"ask for a larger loss or a smaller compute")
        spread = inference.inference_optimal_replicates(L, T, reps, self.k) if reps else None
        result = {"law": self._dense_law(E), "loss": float(L), "inference_tokens": float(T),
                  "flops_per_param_token": self.k, "inference_flops_per_param_token": self.k / 3.0}
        for key in inference.KEYS:
            result[key], result[f"{key}_ci"] = out[key], (interval(spread[key], estimate=out[key]) if spread else None)
        result["replicates_unreachable"] = int(np.isnan(spread["N_opt"]).sum()) if spread else None
        return result

    def compute_for_loss(self, L: float, E=1) -> float:
        dense = self.chinchilla_coefficients(E)
        if dense is None:
            raise FitInputError("the law file has no chinchilla or moe law to invert; fit --law chinchilla")
        _refuse_allocation(self._dense_law(E), self.laws[self._dense_law(E)])
        return laws.compute_for_loss(L, **dense[0], flops_per_param_token=self.k)


def _refuse_allocation(name: str, section: dict) -> None:
    """An optimal allocation needs both exponents identified and more than one compute budget."""
    missing = section.get("not_identified", {})
    for k in ("alpha", "beta"):
        if k in missing:
            raise FitInputError(f"the {name} law's {k} is not identified ({missing[k]}); it gives no optimal allocation")
    if section.get("data_range", {}).get("budgets") == 1:
        raise FitInputError(f"the {name} law was fitted on a single compute budget; it cannot say how the optimum "
                            f"moves with compute (sweep 3 or more budgets)")


def _refuse_experts(name: str, section: dict, E) -> None:
    """A moe law whose gamma the data did not identify speaks only for the expert counts it was fitted on."""
    seen = section.get("data_range", {}).get("E", [])
    if name == "moe" and "gamma" in section.get("not_identified", {}) and not np.isin(np.asarray(E, float), seen).all():
        raise FitInputError(f"the moe law's gamma is not identified ({section['not_identified']['gamma']}); "
                            f"it gives nothing at E = {np.unique(E)[0]:g}")


def systematic(name: str, section: dict, C: float) -> tuple[float | None, str]:
    """The relative error a bootstrap over points cannot see (a bias every point shares), from the section's
    backtest: its rms relative error at `factor` beyond its data, grown linearly in log C beyond that distance
    (never below it: the backtest is the least this law has been seen to miss by). Returns (s, how) or (None, why)."""
    x = section.get("extrapolation")
    if not x or "rms_relative_error" not in x:
        return None, (f"the {name} law has no extrapolation backtest; refit with `scaling fit --law all` "
                      f"over 3 or more budgets")
    # a section fitted with --holdout-above is itself the backtest's law: its data end below the held-out points
    own = section["method"]["options"].get("holdout_above") is not None
    top = x["fitted_max_C"] if own else x["held_out_max_C"]
    s = x["rms_relative_error"] * max(1.0, math.log(C / top) / math.log(x["factor"]))
    return s, (f"bootstrap interval widened on each side in quadrature by s * loss, s = backtest rms error "
               f"{x['rms_relative_error']:.2%} x max(1, ln(C / {top:.3g}) / ln({x['factor']:.3g}))")


def widened(loss: float, ci: list[float] | None, s: float) -> list[float]:
    """[low, high] with each side's distance from the loss added in quadrature to s * loss (no bootstrap: s * loss alone)."""
    low, high = ci or (loss, loss)
    return [loss - math.hypot(loss - low, s * loss), loss + math.hypot(high - loss, s * loss)]


def _frontier(params: dict, C) -> dict:
    k_n, a, k_d, b = (np.asarray(params[k], float) for k in ("k_N", "a", "k_D", "b"))
    n_opt, d_opt = k_n * np.power(C, a), k_d * np.power(C, b)
    out = {"N_opt": n_opt, "D_opt": d_opt, "loss": None, "tokens_per_param": d_opt / n_opt}
    return out if n_opt.ndim else {k: (None if v is None else float(v)) for k, v in out.items()}

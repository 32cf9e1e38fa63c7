"""law.json: the one place that says what a law file holds, and the Law that evaluates one.

{
  "schema_version": 1,
  "law": the main law (the first of moe, chinchilla, kaplan fitted; else the only one),
  "params", "ci": the main law's coefficients and their 95% bootstrap intervals ([low, high] or null),
  "conventions": {"N": which parameters, "C": which FLOPs, "loss": units, "flops_per_param_token": k in C = k N D},
  "data_hash": the main law's data hash, "meta": what the caller passed (sweep, corpus hash, ...),
  "laws": {name: section}, every law fitted: params, ci, method and options, n_points, left_out,
          data_hash, diagnostics, bootstrap (replicates, converged, samples), derived figures,
  "hparams": the learning-rate and batch-size laws (fitting/hparams.py), when fitted,
  "failed": {name: why that law could not be fitted}
}
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fitting import laws
from fitting.bootstrap import interval
from fitting.errors import FitInputError

SCHEMA_VERSION = 1
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
        return laws.surface_loss(name, section["params"], N, D, E)

    def loss_interval(self, N, D, E=1) -> list[float] | None:
        """95% interval of the predicted loss at one (N, D, E) over the bootstrap replicates."""
        name, section = self._surface()
        samples = self._samples(section)
        return interval(laws.surface_loss(name, samples, N, D, E)) if samples else None

    def _dense_law(self, E) -> str | None:
        """The section that gives chinchilla coefficients at E experts: moe when fitted (any E), else chinchilla (E 1)."""
        return next((n for n in ("moe", "chinchilla") if n in self.laws and (n == "moe" or E == 1)), None)

    def _dense(self, E) -> tuple[dict, list[dict] | None] | None:
        """chinchilla coefficients (point and per replicate) at E experts, when the file has chinchilla or moe."""
        name = self._dense_law(E)
        if name is None:
            return None
        section = self.laws[name]
        samples = self._samples(section)
        reps = None if samples is None else laws.as_dense(name, samples, E)
        return laws.as_dense(name, section["params"], E), reps

    def optimal(self, C, E=1) -> dict:
        """N_opt, D_opt, loss and tokens per parameter at compute C, each with its interval (None without bootstrap),
        and `law`: the section they come from.

        From the closed form of the moe (or chinchilla) law; from N_opt = k_N C^a, D_opt = k_D C^b of the
        isoflop or envelope fit when the file has no parametric law (then loss is None)."""
        dense = self._dense(E)
        if dense is not None:
            name = self._dense_law(E)
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
            result[f"{k}_ci"] = interval(spread[k]) if spread is not None and spread.get(k) is not None else None
        return result

    def compute_for_loss(self, L: float, E=1) -> float:
        dense = self._dense(E)
        if dense is None:
            raise FitInputError("the law file has no chinchilla or moe law to invert; fit --law chinchilla")
        return laws.compute_for_loss(L, **dense[0], flops_per_param_token=self.k)


def _frontier(params: dict, C) -> dict:
    k_n, a, k_d, b = (np.asarray(params[k], float) for k in ("k_N", "a", "k_D", "b"))
    n_opt, d_opt = k_n * np.power(C, a), k_d * np.power(C, b)
    out = {"N_opt": n_opt, "D_opt": d_opt, "loss": None, "tokens_per_param": d_opt / n_opt}
    return out if n_opt.ndim else {k: (None if v is None else float(v)) for k, v in out.items()}

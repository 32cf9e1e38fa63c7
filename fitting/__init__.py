"""Fitting scaling laws: points table in, law file out. fit_law fits one law; load_law reads a law file."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fitting.errors import FitInputError
from fitting.lawfile import Law, load_law

LAWS = ("chinchilla", "kaplan", "moe", "power", "data_constrained", "envelope", "isoflop", "hparams")

__all__ = ["LAWS", "FitInputError", "Law", "fit_law", "hparams_at", "load_law"]


def fit_law(points: pd.DataFrame, law: str, **options) -> dict:
    """Fit one law to a points table; returns its section of law.json (for hparams: the hparams section).

    Options: bootstrap, seed, resample ('points' | 'trials'); parametric laws also delta (Huber),
    x and offset (power), holdout_above, grid; data_constrained also fit ('joint' | 'two-stage'), delta, grid.
    A numerical failure inside a fitter is a FitInputError (one line).
    """
    try:
        return _fit_law(points, law, **options)
    except (ArithmeticError, np.linalg.LinAlgError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise FitInputError(f"the {law} fit failed numerically ({type(e).__name__}: {first}); check the table's "
                            f"values, or fit a law with fewer coefficients") from None


def _fit_law(points: pd.DataFrame, law: str, **options) -> dict:
    if law in ("chinchilla", "kaplan", "moe", "power"):
        from fitting.parametric import fit_parametric

        return fit_parametric(points, law, **options)
    if law == "data_constrained":
        from fitting.data_constrained import fit_data_constrained

        return fit_data_constrained(points, **options)
    if law == "envelope":
        from fitting.envelope import fit_envelope

        return fit_envelope(points, **options)
    if law == "isoflop":
        from fitting.isoflop import fit_isoflop

        return fit_isoflop(points, **options)
    if law == "hparams":
        from fitting.hparams import fit_hparams

        return fit_hparams(points, bootstrap=options.get("bootstrap", 0), seed=options.get("seed", 0))
    raise FitInputError(f"--law {law!r} is not one of {', '.join(LAWS)}")


def hparams_at(law: Law, *, N: float, D: float, C: float) -> dict:
    """Learning rate and batch size (tokens) the law file's hparams section gives at (N, D, C)."""
    if law.hparams is None:
        raise FitInputError("the law file has no hparams section; fit one with `scaling fit --law hparams`")
    from fitting.hparams import hparams_at as section_hparams_at

    return section_hparams_at(law.hparams, N=N, D=D, C=C)

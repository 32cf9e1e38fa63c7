"""Bootstrap resampling as weights: a replicate is a count per row (how often its group was drawn), so many
replicates fit at once in one batch and resampling whole trials is just coarser groups.

Intervals are percentile intervals of the replicates, stretched to the fit's own estimate when that falls
outside them (INTERVAL_METHOD), so a printed value always lies inside its printed interval."""

from __future__ import annotations

import numpy as np

LEVEL = 0.95
INTERVAL_METHOD = ("95% percentile interval of the bootstrap replicates, stretched to include the full fit's "
                   "estimate where it fell outside")


def replicate_weights(groups: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """[replicates, rows] counts: each replicate draws as many groups as there are, with replacement."""
    n_groups = int(groups.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(replicates, n_groups))
    per_group = np.stack([np.bincount(d, minlength=n_groups) for d in draws]) if replicates else np.zeros((0, n_groups))
    return per_group[:, groups].astype(float)


def interval(samples, level: float = LEVEL, estimate: float | None = None) -> list[float] | None:
    """Percentile interval of finite samples (None when there are none), stretched to include `estimate`."""
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    low, high = float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))
    if estimate is None or not np.isfinite(estimate):
        return [low, high]
    return [min(low, float(estimate)), max(high, float(estimate))]


def intervals(samples: dict[str, np.ndarray], level: float = LEVEL,
              estimates: dict[str, float] | None = None) -> dict[str, list[float] | None]:
    return {k: interval(v, level, (estimates or {}).get(k)) for k, v in samples.items()}

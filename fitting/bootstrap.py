"""Bootstrap resampling as weights: a replicate is a count per row (how often its group was drawn), so many
replicates fit at once in one batch and resampling whole trials is just coarser groups."""

from __future__ import annotations

import numpy as np

LEVEL = 0.95


def replicate_weights(groups: np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """[replicates, rows] counts: each replicate draws as many groups as there are, with replacement."""
    n_groups = int(groups.max()) + 1
    draws = np.random.default_rng(seed).integers(0, n_groups, size=(replicates, n_groups))
    per_group = np.stack([np.bincount(d, minlength=n_groups) for d in draws]) if replicates else np.zeros((0, n_groups))
    return per_group[:, groups].astype(float)


def interval(samples, level: float = LEVEL) -> list[float] | None:
    """Percentile interval of finite samples, or None when there are none."""
    samples = np.asarray(samples, float)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    return [float(np.percentile(samples, tail)), float(np.percentile(samples, 100 - tail))]


def intervals(samples: dict[str, np.ndarray], level: float = LEVEL) -> dict[str, list[float] | None]:
    return {k: interval(v, level) for k, v in samples.items()}

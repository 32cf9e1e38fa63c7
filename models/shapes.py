"""Shape rules: named recipes from a target N to (d_model, n_layers, n_heads, d_ff).

N is non-embedding parameters for dense models and active non-embedding parameters for MoE (what the
laws are fitted in). A rule declares a discrete set of admissible shapes; `shape_for_target` returns
the admissible shape whose N is closest to the target in log space, so the plan shows the N reached.

Rule "kaplan-aspect" (Kaplan et al. 2020 find loss flat for aspect ratios d_model/n_layers of roughly
20-200; we keep the ratio in [32, 128] and prefer 64):
- d_model: multiples of 8 below 64 (2 heads), of 32 below 512 (head_dim 32), of 64 above (head_dim 64);
- n_layers: d_model / n_layers in [32, 128]; one layer for d_model below 32;
- d_ff: 8/3 d_model (SwiGLU at the FLOPs of a 4x MLP) rounded to a multiple of 8 (d_model < 64),
  32 (< 1024) or 128, times the MoE granularity G so each expert's d_ff / G stays a multiple of it;
- choice: the smallest log error |ln(N / target)|; among shapes within 0.02 of it, the aspect ratio
  closest to 64. A target more than a factor 2 from every admissible shape is impossible.

Rule "kaplan-aspect-min4": the same, but never fewer than 4 layers: below d_model 128, where the aspect
band allows only 1 to 3, the depths are 4 to 6. Why: under about 1e6 parameters depth, not N, moves the
loss (in results/gutenberg the 2-layer models were about 2% worse than 4- and 5-layer ones of similar N,
more than the fit's own error), and a sweep whose sizes switch depth as N grows bends its law.
"""

from __future__ import annotations

import bisect
import math
from typing import Callable, Iterator

from models.accounting import count_params
from models.config import ModelConfig, MoEConfig

ASPECT_BAND = (32, 128)
PREFERRED_ASPECT = 64
MAX_D_MODEL = 16384
TIE_TOLERANCE = 0.02  # log error within which shapes count as equally close
MAX_LOG_ERROR = math.log(2)


def _kaplan_d_models() -> Iterator[tuple[int, int]]:
    """(d_model, n_heads) in increasing d_model."""
    for d in range(8, 64, 8):
        yield d, 2
    for d in range(64, 512, 32):
        yield d, d // 32
    for d in range(512, MAX_D_MODEL + 1, 64):
        yield d, d // 64


def _kaplan_d_ff(d_model: int, granularity: int) -> int:
    multiple = (8 if d_model < 64 else 32 if d_model < 1024 else 128) * granularity
    return max(multiple, round(8 / 3 * d_model / multiple) * multiple)


def _kaplan_layers(d_model: int, min_layers: int) -> range:
    lo, hi = ASPECT_BAND
    shallowest, deepest = (1, 1) if d_model < lo else (math.ceil(d_model / hi), d_model // lo)
    if deepest < min_layers:  # below the band's reach: three depths, so sizes between widths stay reachable
        deepest = min_layers + 2
    return range(max(shallowest, min_layers), deepest + 1)


def _kaplan_aspect(target_n: float, base: dict, min_layers: int = 1) -> Iterator[ModelConfig]:
    """Candidate shapes near the target: for each d_model the one or two depths that bracket it, up to
    the first d_model whose shallowest shape reaches the target."""
    granularity = base["moe"].granularity if base["moe"] else 1

    def shape(d_model: int, n_heads: int, n_layers: int) -> ModelConfig:
        # Built without validation for speed; every field satisfies ModelConfig by construction.
        return ModelConfig.model_construct(d_model=d_model, n_heads=n_heads, n_layers=n_layers,
                                           d_ff=_kaplan_d_ff(d_model, granularity), **base)

    for d_model, n_heads in _kaplan_d_models():
        depths = _kaplan_layers(d_model, min_layers)
        shallowest = shape(d_model, n_heads, depths[0])
        if _n(shallowest) >= target_n:
            yield shallowest
            return  # every wider shape is bigger still
        sizes = _LazySizes(lambda n_layers: _n(shape(d_model, n_heads, n_layers)), depths)
        i = bisect.bisect_left(sizes, target_n)
        for j in (i - 1, i):
            if 0 <= j < len(depths):
                yield shape(d_model, n_heads, depths[j])


class _LazySizes:
    """N as a function of depth, indexable for `bisect` without computing every depth."""

    def __init__(self, size_at: Callable[[int], int], depths: range):
        self.size_at, self.depths = size_at, depths

    def __len__(self) -> int:
        return len(self.depths)

    def __getitem__(self, i: int) -> int:
        return self.size_at(self.depths[i])


_RULES: dict[str, Callable[[float, dict], Iterator[ModelConfig]]] = {
    "kaplan-aspect": _kaplan_aspect,
    "kaplan-aspect-min4": lambda target_n, base: _kaplan_aspect(target_n, base, min_layers=4),
}
SHAPE_RULES: tuple[str, ...] = tuple(_RULES)


def _n(cfg: ModelConfig) -> int:
    return count_params(cfg).active  # = non-embedding for dense


def shape_for_target(target_n: float, *, rule: str, vocab_size: int, seq_len: int, family: str = "dense",
                     moe: MoEConfig | None = None, tie_embeddings: bool = False) -> ModelConfig:
    """The admissible shape of `rule` whose N is closest to `target_n` (see the module docstring)."""
    if rule not in _RULES:
        raise KeyError(f"unknown shape rule '{rule}'; known rules: {', '.join(SHAPE_RULES)}")
    if not (math.isfinite(target_n) and target_n > 0):
        raise ValueError(f"target N {target_n} must be a positive finite number")
    # Validates family, moe and the rest once, so the unvalidated candidates below are sound.
    base = ModelConfig(family=family, moe=moe, vocab_size=vocab_size, seq_len=seq_len,
                       tie_embeddings=tie_embeddings, d_model=8, n_layers=1, n_heads=2, d_ff=8 * (moe.granularity if moe else 1))
    fields = {name: getattr(base, name) for name in ("family", "moe", "vocab_size", "seq_len", "tie_embeddings", "rope_theta")}
    candidates = list(_RULES[rule](target_n, fields))
    if not candidates:
        raise ValueError(f"target N {target_n:.3g} is below the smallest shape of rule '{rule}'")
    error = {cfg: abs(math.log(_n(cfg) / target_n)) for cfg in candidates}
    best = min(error.values())
    if best > MAX_LOG_ERROR:
        closest = min(candidates, key=error.__getitem__)
        raise ValueError(f"target N {target_n:.3g} is more than 2x from every shape of rule '{rule}' "
                         f"(closest N {_n(closest):.3g}); choose a target in its range")
    near = [cfg for cfg in candidates if error[cfg] <= best + TIE_TOLERANCE]
    chosen = min(near, key=lambda c: (abs(math.log(c.d_model / c.n_layers / PREFERRED_ASPECT)), c.n_layers, error[c]))
    return ModelConfig(**chosen.model_dump())  # validated, and equal to (and hashing like) any other copy

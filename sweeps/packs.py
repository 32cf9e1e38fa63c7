"""Which trials can train together as one stacked model (a pack, issue 19).

Members of a pack share everything that sets the shape of the computation and the corpus they read: the model,
the data config, and the token budget, batch size, evaluation points and schedule shape (so every member steps,
evaluates and forks its WSD branches at the same tokens). They may differ in what only the optimiser or the
data order sees: lr, seed, init_std, weight_decay, beta1, beta2, grad_clip, spike_threshold, and
data.unique_tokens (how much of the corpus a member repeats: its own batches, the same validation set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from typing import TypeVar

from sweeps.trial import TrialConfig

T = TypeVar("T")


def pack_key(trial: TrialConfig) -> str:
    """12 hex digits of the sha256 of the shared part of a trial (canonical JSON, as trial ids are made)."""
    shared = {
        "model": trial.model.model_dump(mode="json"),
        "data": trial.data.model_dump(mode="json", exclude={"unique_tokens"}),
        "train": trial.train.model_dump(mode="json", include={"tokens", "batch_size", "eval_points", "schedule"}),
    }
    canonical = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def group_packs(trials: Sequence[T], key: Callable[[T], TrialConfig] = lambda t: t, max_pack: int = 16) -> list[list[T]]:
    """Trials grouped by pack_key of key(trial), in first-seen order, each group split into packs of at most max_pack."""
    if max_pack < 1:
        raise ValueError(f"max_pack = {max_pack}: give a whole number of at least 1")
    groups: dict[str, list[T]] = {}
    for trial in trials:
        groups.setdefault(pack_key(key(trial)), []).append(trial)
    return [group[i:i + max_pack] for group in groups.values() for i in range(0, len(group), max_pack)]

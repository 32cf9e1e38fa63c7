"""Grid expansion: a spec becomes the list of resolved trials, each with its counts, before anything runs.

The mechanics here are FLOP algebra and cross products; the choices (shape rule, learning-rate law)
come from the spec and from `models.shapes` (the recipe).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from models import count_params, flops_per_token, shape_for_target
from models.accounting import FlopCounts, ParamCounts
from models.config import ModelConfig, MoEConfig
from sweeps.errors import SpecError
from sweeps.spec import SweepSpec, TrainSpec
from sweeps.trial import DataConfig, ScheduleConfig, TrainConfig, TrialConfig

# (parameter counts, D, FLOPs per token) -> {"lr": ..., "batch_size": ...}: a fitted hparams law's values
# for 'auto'; the caller picks N and C under the conventions the law was fitted with.
HparamsAt = Callable[[ParamCounts, float, FlopCounts], dict]


@dataclass(frozen=True)
class PlannedTrial:
    """A trial with what the plan shows and the runner logs: its counts and compute."""

    trial: TrialConfig
    params: ParamCounts
    flops: FlopCounts  # per token

    @property
    def trial_id(self) -> str:
        return self.trial.trial_id

    @property
    def D(self) -> int:
        return self.trial.train.tokens

    @property
    def tokens_trained(self) -> int:
        """Tokens of the main run plus every WSD branch's decay (the branch's stable part is shared)."""
        t = self.trial.train
        return self.D + sum(b - t.schedule.fork_tokens(b, t.batch_size) for b in t.schedule.branches)

    @property
    def flops_6N(self) -> float:
        return self.flops.train_6N * self.D

    @property
    def flops_exact(self) -> float:
        return self.flops.train_exact * self.D

    @property
    def compute_exact(self) -> float:
        """What the trial really costs, branches included (exact FLOPs)."""
        return self.flops.train_exact * self.tokens_trained


def _model_configs(spec: SweepSpec) -> list[tuple[str, MoEConfig | None]]:
    out: list[tuple[str, MoEConfig | None]] = []
    for family in spec.model.family:
        out += [("dense", None)] if family == "dense" else [("moe", m) for m in spec.model.moe_configs()]
    return out


def _shape(spec: SweepSpec, target_n: float, family: str, moe: MoEConfig | None, vocab_size: int) -> ModelConfig:
    try:
        return shape_for_target(
            target_n, rule=spec.model.shape_rule, vocab_size=vocab_size, seq_len=spec.model.seq_len,
            family=family, moe=moe, tie_embeddings=spec.model.tie_embeddings,
        )
    except (ValueError, KeyError) as e:
        raise SpecError(f"model: no shape for target N {target_n:.3g} under rule '{spec.model.shape_rule}': {e}") from None


def _explicit(spec: SweepSpec, family: str, moe: MoEConfig | None, vocab_size: int) -> list[ModelConfig]:
    try:
        return [
            ModelConfig(family=family, moe=moe, vocab_size=vocab_size, seq_len=spec.model.seq_len,
                        tie_embeddings=spec.model.tie_embeddings, **s.model_dump())
            for s in spec.grid.shapes
        ]
    except ValueError as e:
        raise SpecError(f"grid.shapes: {str(e).splitlines()[-1].strip()}") from None


def _round_tokens(tokens: float, batch: int) -> int:
    """D in whole optimizer steps, at least one."""
    return max(1, round(tokens / batch)) * batch


def _model_and_tokens(spec: SweepSpec, vocab_size: int) -> list[tuple[ModelConfig, float, float | None]]:
    """(model, D before rounding, budget) for every point of the grid, per family and MoE config."""
    grid = spec.grid
    out: list[tuple[ModelConfig, float, float | None]] = []
    for family, moe in _model_configs(spec):
        if grid.isoflop is not None:
            iso = grid.isoflop
            ratios = np.geomspace(*iso.tokens_per_param, iso.sizes_per_budget)
            for budget in iso.budgets:
                seen: set[ModelConfig] = set()
                for r in ratios:
                    cfg = _shape(spec, math.sqrt(budget / (6 * r)), family, moe, vocab_size)
                    if cfg in seen:
                        continue  # two ratios snapped to one shape: train it once
                    seen.add(cfg)
                    per_token = flops_per_token(cfg)
                    out.append((cfg, budget / (per_token.train_6N if iso.flops == "6N" else per_token.train_exact), budget))
            continue
        models = [_shape(spec, n, family, moe, vocab_size) for n in grid.sizes] or _explicit(spec, family, moe, vocab_size)
        for cfg in dict.fromkeys(models):
            n_active = count_params(cfg).active
            tokens = grid.tokens or [r * n_active for r in grid.tokens_per_param]
            out += [(cfg, d, None) for d in tokens]
    return out


def _branches(schedule: ScheduleConfig, n: int, tokens: int, batch: int) -> ScheduleConfig:
    """`n` log-spaced branch lengths between an eighth of the run and just under it, in whole steps."""
    if n == 0:
        return schedule
    ends = sorted({_round_tokens(t, batch) for t in np.geomspace(tokens / 8, tokens * 0.7, n)} - {tokens})
    return schedule.model_copy(update={"branches": tuple(e for e in ends if e > batch)})


@dataclass(frozen=True)
class Cell:
    """One scale of the grid (a model and its token budget); its trials differ only in lr, batch and seed."""

    model: ModelConfig
    tokens: float  # D before rounding to whole steps
    budget: float | None
    data: DataConfig
    train: TrainSpec

    def trial(self, lr: float, batch: int, seed: int) -> PlannedTrial:
        if batch % self.model.seq_len:
            raise SpecError(f"train.batch_size {batch} is not a multiple of model.seq_len {self.model.seq_len}; "
                            f"use {max(1, round(batch / self.model.seq_len)) * self.model.seq_len}")
        t = self.train
        d = _round_tokens(self.tokens, batch)
        train = TrainConfig(
            tokens=d, batch_size=batch, lr=lr, schedule=_branches(t.schedule, t.branches_per_run, d, batch),
            beta1=t.beta1, beta2=t.beta2, weight_decay=t.weight_decay, grad_clip=t.grad_clip,
            init_std=t.init_std, seed=seed, eval_points=t.eval_points, spike_threshold=t.spike_threshold,
        )
        trial = TrialConfig(model=self.model, data=self.data, train=train, budget=self.budget)
        return PlannedTrial(trial, count_params(self.model), flops_per_token(self.model))


def _data_configs(spec: SweepSpec, content_hash: str) -> list[DataConfig]:
    """One DataConfig per unique-token budget (one without a cap when the spec sets none); each budget in
    whole sequences, so a trial sees exactly that many distinct input tokens."""
    seq = spec.model.seq_len
    budgets = [None] if spec.data.unique_tokens is None else [_round_tokens(u, seq) for u in spec.data.unique_tokens]
    return [DataConfig(**spec.data.model_dump() | {"content_hash": content_hash, "unique_tokens": u})
            for u in dict.fromkeys(budgets)]


def cells(spec: SweepSpec, *, vocab_size: int, content_hash: str) -> list[Cell]:
    """The grid's scales, in grid order, each crossed with the unique-token budgets."""
    return [Cell(cfg, tokens, budget, data, spec.train) for cfg, tokens, budget in _model_and_tokens(spec, vocab_size)
            for data in _data_configs(spec, content_hash)]


def expand(spec: SweepSpec, *, vocab_size: int, content_hash: str, hparams_at: HparamsAt | None = None) -> list[PlannedTrial]:
    """Every trial of the spec, in a stable order (grid order, then lr, batch, seed)."""
    t = spec.train
    planned: dict[str, PlannedTrial] = {}
    for cell in cells(spec, vocab_size=vocab_size, content_hash=content_hash):
        lrs, batches = t.lr, t.batch_size
        if "auto" in (lrs, batches):
            auto = hparams_at(count_params(cell.model), cell.tokens, flops_per_token(cell.model))
            lrs = [_auto(auto, "lr", "train.lr")] if lrs == "auto" else lrs
            if batches == "auto":
                seq = cell.model.seq_len
                batches = [max(1, round(_auto(auto, "batch_size", "train.batch_size") / seq)) * seq]
        for lr, batch, seed in itertools.product(lrs, batches, t.seeds):
            p = cell.trial(lr, batch, seed)
            planned.setdefault(p.trial_id, p)
    return list(planned.values())


def _auto(values: dict, knob: str, field: str) -> float:
    if values.get(knob) is None:
        raise SpecError(f"{field}: 'auto' but the hparams_law has no fitted law for {knob}; give {field} explicitly")
    return float(values[knob])

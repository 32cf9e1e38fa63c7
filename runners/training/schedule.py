"""A trial's schedule in optimizer steps: learning rate, WSD decay branches and evaluation points.

Everything here is a pure function of the trial config, so a resumed trial recomputes the same plan
and needs only its step and phase from the checkpoint.

Conventions (step s = the s-th optimizer update, 0-based; tokens seen after it = (s + 1) * batch):
- warm-up: lr * (s + 1) / warmup_steps, so the first update is small but not zero and the last
  warm-up step reaches the peak;
- a decay from step F to step E (E excluded) uses progress q = (s - F + 1) / (E - F) in (0, 1], so
  its last update runs at exactly the floor `min_lr_ratio * lr`;
- WSD: the main run decays from `fork_tokens(tokens)`, and a branch ending at B tokens decays from
  `fork_tokens(B)` -- the same rule, so a branch is the run a WSD trial of B tokens would have been
  (warm-up aside: warm-up is a fraction of the main run, and every fork must come after it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from sweeps.trial import Runtime, ScheduleConfig, TrialConfig

FIRST_EVAL_FRACTION = 0.05  # the first of the log-spaced evaluations, as a share of the run's steps


class TrialSetupError(Exception):
    """A trial that cannot start as configured; the message names the field and the fix."""


@dataclass(frozen=True)
class Branch:
    """A WSD decay branch: forks from the main run after `fork_step` steps and ends after `end_step`."""

    tokens: int  # the planned final token count (the key of its MLflow run)
    fork_step: int
    end_step: int


@dataclass(frozen=True)
class Plan:
    """The steps of one trial."""

    batch_size: int  # tokens per optimizer step, over the whole group
    seqs_per_step: int  # over the whole group
    micro_seqs: int  # sequences per forward pass of one rank
    total_steps: int
    warmup_steps: int
    decay_start: int  # first step of the main run's decay (WSD); total_steps for cosine and constant
    branches: tuple[Branch, ...]
    eval_steps: tuple[int, ...]  # main-run evaluations after this many steps; the last is total_steps
    log_every: int  # steps between train-loss points (about 200 a run at most)
    world: int = 1  # ranks sharing each step (runners.training.parallel)

    @property
    def rank_seqs(self) -> int:
        return self.seqs_per_step // self.world

    @property
    def accum_steps(self) -> int:
        return self.rank_seqs // self.micro_seqs


def decay_factor(shape: str, q: float, floor: float) -> float:
    """lr multiplier at decay progress q in [0, 1]: 1 at q = 0, `floor` at q = 1."""
    if shape == "linear":
        left = 1.0 - q
    elif shape == "1-sqrt":
        left = 1.0 - math.sqrt(q)
    elif shape == "cosine":
        left = 0.5 * (1.0 + math.cos(math.pi * q))
    else:
        raise TrialSetupError(f"schedule.decay_shape {shape!r} is unknown; use linear, 1-sqrt or cosine")
    return floor + (1.0 - floor) * left


def lr_at(cfg: ScheduleConfig, lr: float, plan: Plan, step: int, branch: Branch | None = None) -> float:
    """Learning rate of update `step` in the main run, or in `branch` once past its fork."""
    if step < plan.warmup_steps:
        return lr * (step + 1) / plan.warmup_steps
    if cfg.kind == "constant":
        return lr
    if cfg.kind == "cosine":
        q = (step - plan.warmup_steps + 1) / max(1, plan.total_steps - plan.warmup_steps)
        return lr * decay_factor("cosine", min(q, 1.0), cfg.min_lr_ratio)
    start, end = (branch.fork_step, branch.end_step) if branch else (plan.decay_start, plan.total_steps)
    if step < start:
        return lr
    q = (step - start + 1) / (end - start)
    return lr * decay_factor(cfg.decay_shape, min(q, 1.0), cfg.min_lr_ratio)


def eval_steps(total_steps: int, n: int) -> tuple[int, ...]:
    """`n` log-spaced step counts from ~5% of the run to its end (fewer when the run is too short)."""
    first = max(1.0, FIRST_EVAL_FRACTION * total_steps)
    points = np.round(np.geomspace(first, total_steps, n)).astype(int) if n > 1 else np.array([total_steps])
    return tuple(sorted(set(points.tolist()) | {total_steps}))


def _steps(tokens: int, batch: int) -> int:
    return max(1, round(tokens / batch))


def plan_trial(trial: TrialConfig, runtime: Runtime, world: int = 1) -> Plan:
    """The step plan of a trial on `world` ranks; TrialSetupError when its batch, micro-batch or branches cannot work."""
    t, seq_len = trial.train, trial.model.seq_len
    if t.batch_size % seq_len:
        raise TrialSetupError(f"train.batch_size {t.batch_size} is not a multiple of model.seq_len {seq_len}; "
                              f"use {max(1, t.batch_size // seq_len) * seq_len}")
    seqs = t.batch_size // seq_len
    if seqs % world:
        raise TrialSetupError(f"train.batch_size {t.batch_size} is {seqs} sequences, which {world} workers cannot share "
                              f"evenly; use a multiple of {world * seq_len} tokens or another resources.gpus")
    rank_seqs = seqs // world
    micro = min(rank_seqs, runtime.micro_batch_size or rank_seqs)
    if rank_seqs % micro:
        raise TrialSetupError(f"runtime.micro_batch_size {micro} does not divide the {rank_seqs} sequences of a "
                              f"{'rank' if world > 1 else 'batch'}; use a divisor of it")
    total = _steps(t.tokens, t.batch_size)
    warmup = round(t.schedule.warmup * total)
    decay_start = t.schedule.fork_tokens(t.tokens, t.batch_size) // t.batch_size if t.schedule.kind == "wsd" else total
    branches = tuple(Branch(b, t.schedule.fork_tokens(b, t.batch_size) // t.batch_size, _steps(b, t.batch_size))
                     for b in t.schedule.branches)
    for b in branches:
        if b.end_step <= b.fork_step:
            raise TrialSetupError(f"branch at {b.tokens} tokens has no decay step (batch {t.batch_size}); "
                                  "raise the branch's tokens or train.schedule.decay_fraction")
        if b.fork_step < warmup:
            raise TrialSetupError(f"branch at {b.tokens} tokens forks at step {b.fork_step}, inside the warm-up "
                                  f"({warmup} steps); lower train.schedule.warmup or drop the branch")
    return Plan(batch_size=t.batch_size, seqs_per_step=seqs, micro_seqs=micro, total_steps=total, warmup_steps=warmup,
                decay_start=decay_start, branches=branches, eval_steps=eval_steps(total, t.eval_points),
                log_every=max(1, total // 200), world=world)

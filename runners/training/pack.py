"""Train a pack: trials of one shape as one stacked model in one process (issue 19).

Each member is still a trial, with run_trial's semantics: its own batches (its seed's data order), lr
schedule, evaluations at the same tokens, metrics under the same names, WSD branches, checkpoints in its own
workdir (runners.training.checkpoint: single-process DCP checkpoints of the plain model and make_optimizer's
AdamW, so it resumes packed or alone), divergence and pruning, and result. Only the engine
differs from run_trial's: the members' parameters are stacked (models.packed) and stepped by per-member
AdamW (runners.training.packed_optim). Members that share the shape but not their progress on disk (a kill
while their checkpoints were being written, or a member that ran alone) train as separate packs, one after
the other, each from where its members are.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models import build_model
from models.packed import PackedTransformer
from runners.data.store import TokenData
from runners.training import checkpoint
from runners.training.graph import GraphedStep
from runners.training.packed_optim import PackedAdamW
from runners.training.result import TrialResult
from runners.training.schedule import TrialSetupError
from runners.training.step import Batch, accumulate_grads, evaluate, numerics, pick_device, wants_compile
from runners.training.timeline import Sink, Timeline
from runners.training.train import Trainer, check_setup
from sweeps.packs import pack_key
from sweeps.trial import Runtime, TrialConfig


@dataclass
class Member:  # one trial inside a pack
    trial: TrialConfig
    workdir: Path  # its own checkpoint folder, as for an unpacked trial
    sink: Sink  # its MLflow run's sink (runners.training.timeline.Sink protocol)
    branch_sinks: Callable[[int], Sink]
    on_eval: Callable[[int, float], bool] | None = None  # Optuna pruning: True = stop this member


def run_pack(members: list[Member], runtime: Runtime, *, data: TokenData) -> list[TrialResult]:
    """Train every member to the end (each resuming from its workdir) and return their results, in order."""
    started = time.perf_counter()
    timelines = [Timeline(m.trial, Path(m.workdir), m.sink, m.branch_sinks, m.on_eval) for m in members]
    if len({pack_key(m.trial) for m in members}) > 1:
        raise TrialSetupError("these trials differ in model, data (beyond unique_tokens), tokens, batch, eval points or schedule; "
                              "group them with sweeps.packs.group_packs")
    results = {}
    for t in timelines:
        check_setup(t.trial, runtime, data)  # one pack key: one plan, the same for every member
        t.workdir.mkdir(parents=True, exist_ok=True)
        t.result = t.done_result()
        if t.result is not None:
            results[id(t)] = t.result
    device = pick_device(runtime)
    for group in _by_progress([t for t in timelines if t.result is None]):
        engine = PackedEngine([t.trial for t in group], runtime, device)
        for t, result in zip(group, Trainer(group, engine, runtime, data, device, started=started).run()):
            results[id(t)] = result
        started = time.perf_counter()  # the next group's setup starts here
    return [results[id(t)] for t in timelines]


def _by_progress(timelines: list[Timeline]) -> list[list[Timeline]]:
    """Members grouped by the (step, phase) of their checkpoint LATEST (or none), in first-seen order."""
    groups: dict[tuple, list[Timeline]] = {}
    for t in timelines:
        progress = checkpoint.progress(t.workdir, checkpoint.LATEST)
        where = (-1, None) if progress is None else (progress["step"], progress["branch"])
        groups.setdefault(where, []).append(t)
    return list(groups.values())


class PackedEngine:
    """K members as one stacked model (models.packed) with per-member AdamW (runners.training.packed_optim)."""

    def __init__(self, trials: Sequence[TrialConfig], runtime: Runtime, device: torch.device,
                 compile_mode: str | None = None):
        self.device, self.trains = device, [t.train for t in trials]
        models = []
        for trial in trials:  # each member's initial weights as run_trial draws them
            torch.manual_seed(trial.train.seed)
            models.append(build_model(trial.model, init_std=trial.train.init_std))
        try:
            self.model = PackedTransformer.from_members(models).to(device)
        except ValueError as e:
            raise TrialSetupError(str(e)) from None
        self.model.loss_chunk, self.model.bf16_residual = runtime.loss_chunk, runtime.bf16_residual
        compiled = wants_compile(runtime, device)
        self.forward = torch.compile(self.model, mode=compile_mode) if compiled else self.model
        # SDPA attention (FlashAttention-4 takes no member axis yet)
        self.optimizer = PackedAdamW(self.model, self.trains, compile=compiled)
        graphed = runtime.cuda_graph and device.type == "cuda"
        self.graphed = GraphedStep(self._step, self.optimizer.zero_grad, device) if graphed else None
        self.numerics = (f"{numerics(runtime, device, flash4=False)}{', CUDA graph' if graphed else ''}, "
                         f"pack of {len(trials)}")

    def stack(self, batches: Sequence[Batch]) -> Batch:
        return torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches])

    def train_step(self, micro_batches: list[Batch], lrs: Sequence[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # the lrs through pinned memory: a copy that does not wait for the GPU, so the CPU can run ahead
        lr = torch.tensor(lrs, dtype=torch.float64, pin_memory=self.device.type == "cuda")
        lr = lr.to(self.device, non_blocking=True)
        if self.graphed is not None:
            return self.graphed(micro_batches, lr)
        out = self._step(micro_batches, lr)
        self.optimizer.zero_grad()
        return out

    def _step(self, micro_batches: list[Batch], lr: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward, backward, clip and update: what a CUDA graph captures (runners.training.graph)."""
        out = accumulate_grads(self.forward, micro_batches, self.device)
        self.optimizer.clip_grads()
        self.optimizer.step(lr)
        return out

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        return evaluate(self.forward, batches, self.device)

    def member(self, i: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.optimizer.member(i, self.trains[i])

    def set_member(self, i: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model.load_member(i, model.state_dict())
        self.optimizer.load_plain(i, model, optimizer)

    def freeze(self, i: int) -> None:
        self.optimizer.active[i] = False

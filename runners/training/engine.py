"""How the members of one timeline compute: the Engine the trainer drives (runners.training.train), and the
plain one, a single model (a pack's is runners.training.pack.PackedEngine)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from models import build_model
from runners.training import parallel
from runners.training.step import (Batch, accumulate_grads, apply_update, evaluate, make_optimizer, numerics,
                                   wants_compile, wants_flash4)
from sweeps.trial import Runtime, TrialConfig


class Engine(Protocol):
    """How the members of one timeline compute (a plain model, or a pack: runners.training.pack)."""

    numerics: str  # runners.training.step.numerics, as the MLflow tag shows it

    def stack(self, batches: Sequence[Batch]) -> Batch: ...  # the members' batches as one input

    # One optimizer step: forward and backward over the micro-batches, clip, update at each member's lr, clear the
    # gradients. Returns each member's mean loss [K] and the router statistics, still on the device.
    def train_step(self, micro_batches: list[Batch], lrs: Sequence[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def evaluate(self, batches: list[Batch]) -> torch.Tensor: ...  # runners.training.step.evaluate's sums

    # Member i as a plain model and make_optimizer's optimizer (what its checkpoint holds, so that it resumes
    # packed or alone), and member i taken back from such a pair.
    def member(self, i: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]: ...

    def set_member(self, i: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None: ...

    def freeze(self, i: int) -> None: ...  # member i takes no more updates


class PlainEngine:
    """One trial, one model: the model of models.model, make_optimizer's AdamW; on a group of ranks, wrapped by
    runners.training.parallel (DDP, or FSDP2 sharding it in place)."""

    def __init__(self, trial: TrialConfig, runtime: Runtime, device: torch.device, group: parallel.Group):
        self.device, self.train = device, trial.train
        torch.manual_seed(trial.train.seed)
        self.model = build_model(trial.model, init_std=trial.train.init_std).to(device)
        self.model.loss_chunk, self.model.bf16_residual = runtime.loss_chunk, runtime.bf16_residual
        flash4 = wants_flash4(runtime, device, trial.model)
        self.model.use_flash4(flash4)
        wrapped = parallel.wrap(self.model, runtime, device, group)
        self.forward = torch.compile(wrapped) if wants_compile(runtime, device) else wrapped
        self.numerics = numerics(runtime, device, flash4)
        self.optimizer = make_optimizer(self.model, trial.train, device)

    def stack(self, batches: Sequence[Batch]) -> Batch:
        (batch,) = batches
        return batch

    def train_step(self, micro_batches: list[Batch], lrs: Sequence[float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, router = accumulate_grads(self.forward, micro_batches, self.device)
        apply_update(self.model, self.optimizer, lrs[0], self.train.grad_clip)
        return loss.reshape(1), router

    def evaluate(self, batches: list[Batch]) -> torch.Tensor:
        return evaluate(self.forward, batches, self.device)

    def member(self, i: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        return self.model, self.optimizer

    def set_member(self, i: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        pass  # member() gave the engine's own model and optimizer: loaded in place

    def freeze(self, i: int) -> None:
        pass  # the only member: its timeline ends with it

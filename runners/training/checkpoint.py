"""Checkpoint files of a trial: written atomically, read back onto any device.

A checkpoint is one `torch.save`d dict: the model's and optimizer's state dicts, torch's RNG states
and whatever plain progress the trainer adds (step, phase, ...). Only torch's RNGs are saved because
the trainer draws random numbers only through torch: training batches are a function of the step
and the seed alone, so there is no data iterator or numpy state to carry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

LATEST = "checkpoint.pt"  # where the trial is now (main run or a branch)
FORK = "fork.pt"  # the main run's state at the fork of the branch being trained


def save(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a reader sees the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: Path, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint at `path` with its tensors on `device`, or None when there is none."""
    if not path.exists():
        return None
    return torch.load(path, map_location=device, weights_only=True)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer, **progress: Any) -> dict[str, Any]:
    """Everything needed to continue training exactly from here."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(), **progress}


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model, optimizer and RNGs from `state`; returns the rest (the trainer's progress)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng(state["rng"])
    return {k: v for k, v in state.items() if k not in ("model", "optimizer", "rng")}

"""Checkpoints of a trial, through torch.distributed.checkpoint (DCP), on one rank or many.

A checkpoint `name` (LATEST: where the trial is; FORK: the main run at the fork of the branch being trained)
is a DCP folder under `dcp/` with the model's and optimizer's state (`get_state_dict`: full tensors from a
single process or DDP, shards from FSDP2) and torch's RNG state, plus `<name>.json`, written by rank 0 alone
after every rank has written its part, that names the folder and holds the trainer's plain progress (step,
phase, ...). Replacing that small file is the commit: a reader sees the old checkpoint or the new one, never
a torn one. DCP reshards on load, so a trial checkpointed on N ranks resumes on M (1 included).

Only torch's RNGs are saved because the trainer draws random numbers only through torch: training batches
are a function of the step and the seed alone, so there is no data iterator or numpy state to carry.

Trials checkpointed before DCP (one `torch.save`d `checkpoint.pt`, `fork.pt`) still resume, on one process:
the old files are read when no DCP checkpoint exists, and removed by the first DCP save.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.utils._pytree import tree_map

from runners.training.parallel import Group
from runners.training.schedule import TrialSetupError

LATEST = "checkpoint"  # where the trial is now (main run or a branch)
FORK = "fork"  # the main run's state at the fork of the branch being trained
FOLDERS = "dcp"
LEGACY = {LATEST: "checkpoint.pt", FORK: "fork.pt"}  # single-process files from before DCP


def save(workdir: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         progress: dict[str, Any], group: Group) -> None:
    """Every rank writes its part of a new folder; then rank 0 points `<name>.json` at it and drops the old one."""
    save_state(workdir, name, _state(model, optimizer), progress, group)


def capture(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What `save` would write, copied to host memory now (one process: a DTensor shard stays with `save`): a
    WSD fork kept in memory, written by `save_state` only if a checkpoint inside its branch needs it."""
    return tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t,
                    _state(model, optimizer))


def restore(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model, optimizer and RNGs back to a `capture`d (or loaded) state, in place."""
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    _restore_rng(state["rng"])


def save_state(workdir: Path, name: str, state: dict[str, Any], progress: dict[str, Any], group: Group) -> None:
    """`save` of a state already taken (`capture`)."""
    folder = f"{name}-{group.gather(uuid.uuid4().hex)[0]}"  # rank 0's name, on every rank
    with _one_process(group):
        dcp.save(state, checkpoint_id=workdir / FOLDERS / folder, no_dist=group.world == 1)
    if group.main:
        pointer = workdir / f"{name}.json"
        old = json.loads(pointer.read_text())["folder"] if pointer.exists() else None
        tmp = pointer.with_name(f".{pointer.name}.tmp")
        tmp.write_text(json.dumps({"folder": folder, "progress": progress}))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, pointer)
        if old:
            shutil.rmtree(workdir / FOLDERS / old, ignore_errors=True)
        (workdir / LEGACY[name]).unlink(missing_ok=True)
    group.barrier()  # no rank reads the pointer before it is there


def load(workdir: Path, name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, group: Group,
         device: torch.device) -> dict[str, Any] | None:
    """Restore model, optimizer and RNGs from checkpoint `name`; returns the trainer's progress, or None when
    there is no such checkpoint."""
    pointer = workdir / f"{name}.json"
    if pointer.exists():
        saved = json.loads(pointer.read_text())
        state = _state(model, optimizer)
        with _one_process(group):
            dcp.load(state, checkpoint_id=workdir / FOLDERS / saved["folder"], no_dist=group.world == 1)
        restore(state, model, optimizer)
        return saved["progress"]
    legacy = workdir / LEGACY[name]
    if not legacy.exists():
        return None
    if group.world > 1:
        raise TrialSetupError(f"{legacy} was written by one process before checkpoints were sharded; resume it "
                              "with resources.gpus at most 1, then run it as a gang")
    state = torch.load(legacy, map_location=device, weights_only=True)
    model.load_state_dict(state.pop("model"))
    optimizer.load_state_dict(state.pop("optimizer"))
    rng = state.pop("rng")
    _restore_rng({"torch": rng["torch"], **({"cuda": rng["cuda"][torch.cuda.current_device()]} if "cuda" in rng else {})})
    return state


def progress(workdir: Path, name: str) -> dict[str, Any] | None:
    """The trainer's progress in checkpoint `name` without loading its tensors; None when there is none."""
    pointer = workdir / f"{name}.json"
    if pointer.exists():
        return json.loads(pointer.read_text())["progress"]
    legacy = workdir / LEGACY[name]
    if not legacy.exists():
        return None
    state = torch.load(legacy, map_location="cpu", weights_only=True)
    return {key: value for key, value in state.items() if key not in ("model", "optimizer", "rng")}


def discard(workdir: Path) -> None:
    """Remove every checkpoint of the trial (its result stands for them)."""
    shutil.rmtree(workdir / FOLDERS, ignore_errors=True)
    for name, legacy in LEGACY.items():
        (workdir / f"{name}.json").unlink(missing_ok=True)
        (workdir / legacy).unlink(missing_ok=True)


@contextlib.contextmanager
def _one_process(group: Group) -> Iterator[None]:
    """DCP warns that it assumes one process whenever there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        if group.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": model_state, "optimizer": optimizer_state, "rng": rng}


def _restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"].cpu())

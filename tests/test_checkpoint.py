"""Checkpoints: a restored model, optimizer and RNG that continue exactly; the previous checkpoint kept until
a new one is whole; checkpoints from before DCP still resume."""

from __future__ import annotations

import json

import pytest
import torch

from runners.training import checkpoint
from runners.training.parallel import Group

CPU = torch.device("cpu")


def net_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def train(net, optimizer, steps: int) -> None:
    for _ in range(steps):
        x = torch.randn(16, 4)  # draws from torch's RNG, so the RNG state must be restored too
        loss = (net(x) - x.sum(1, keepdim=True)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def continues_exactly(tmp_path, save) -> None:
    net, opt = net_and_optimizer(0)
    train(net, opt, 3)
    save(net, opt)
    train(net, opt, 4)

    other, other_opt = net_and_optimizer(1)  # different weights, fresh optimizer, moved RNG
    progress = checkpoint.load(tmp_path, checkpoint.LATEST, other, other_opt, Group(), CPU)
    assert progress == {"step": 3, "phase": "main"}
    train(other, other_opt, 4)
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_restored_training_continues_exactly(tmp_path):
    continues_exactly(tmp_path, lambda net, opt: checkpoint.save(tmp_path, checkpoint.LATEST, net, opt,
                                                                 {"step": 3, "phase": "main"}, Group()))


def test_a_checkpoint_from_before_dcp_still_resumes(tmp_path):
    def save_as_before(net, opt):
        rng = {"torch": torch.get_rng_state()}
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict(), "rng": rng, "step": 3, "phase": "main"},
                   tmp_path / "checkpoint.pt")

    continues_exactly(tmp_path, save_as_before)


def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path):
    net, opt = net_and_optimizer(0)
    checkpoint.save(tmp_path, checkpoint.LATEST, net, opt, {"step": 1}, Group())
    with pytest.raises(Exception):
        checkpoint.save(tmp_path, checkpoint.LATEST, net, opt, {"step": 2, "bad": object()}, Group())  # not JSON
    assert checkpoint.load(tmp_path, checkpoint.LATEST, net, opt, Group(), CPU) == {"step": 1}
    kept = json.loads((tmp_path / "checkpoint.json").read_text())["folder"]
    assert (tmp_path / checkpoint.FOLDERS / kept).is_dir()
    checkpoint.discard(tmp_path)
    assert not any(tmp_path.iterdir())


def test_no_checkpoint_loads_as_none(tmp_path):
    net, opt = net_and_optimizer(0)
    assert checkpoint.load(tmp_path, checkpoint.LATEST, net, opt, Group(), CPU) is None

"""Checkpoint files: atomic replacement, and a restored model, optimizer and RNG that continue exactly."""

from __future__ import annotations

import pytest
import torch

from runners.training import checkpoint


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


def test_restored_training_continues_exactly(tmp_path):
    net, opt = net_and_optimizer(0)
    train(net, opt, 3)
    checkpoint.save(checkpoint.capture(net, opt, step=3, phase="main"), tmp_path / "c.pt")
    train(net, opt, 4)

    other, other_opt = net_and_optimizer(1)  # different weights, fresh optimizer, moved RNG
    progress = checkpoint.restore(checkpoint.load(tmp_path / "c.pt", torch.device("cpu")), other, other_opt)
    assert progress == {"step": 3, "phase": "main"}
    train(other, other_opt, 4)
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_a_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save({"step": 1}, path)
    with pytest.raises(Exception):
        checkpoint.save({"step": 2, "bad": lambda: None}, path)  # cannot be pickled
    assert checkpoint.load(path, torch.device("cpu")) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_no_checkpoint_loads_as_none(tmp_path):
    assert checkpoint.load(tmp_path / "missing.pt", torch.device("cpu")) is None

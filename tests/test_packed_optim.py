"""Per-member AdamW over a pack: each member's update is torch.optim.AdamW's (make_optimizer's) run alone."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.packed import PackedTransformer
from runners.training.packed_optim import PackedAdamW
from runners.training.step import apply_update, make_optimizer
from sweeps.trial import TrainConfig

CFG = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=64, seq_len=8, tie_embeddings=False)
TRAINS = [TrainConfig(tokens=1, batch_size=8, lr=3e-2, beta1=0.9, beta2=0.95, weight_decay=0.1, grad_clip=0.05),
          TrainConfig(tokens=1, batch_size=8, lr=1e-2, beta1=0.8, beta2=0.99, weight_decay=0.0, grad_clip=None),
          TrainConfig(tokens=1, batch_size=8, lr=5e-3, beta1=0.5, beta2=0.9, weight_decay=1.0, grad_clip=10.0)]
LR_SCALE = [0.5, 1.0, 0.3, 0.8, 1.0]  # a schedule: each step's lr as a share of each member's peak


def batch(step: int, k: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (k, 2, CFG.seq_len + 1), generator=torch.Generator().manual_seed(step))


def train_alone(i: int, steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(i)
    model = build_model(CFG)
    optimizer = make_optimizer(model, TRAINS[i], torch.device("cpu"))
    for step in range(steps):
        idx = batch(step, len(TRAINS))[i]
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
        apply_update(model, optimizer, TRAINS[i].lr * LR_SCALE[step], TRAINS[i].grad_clip)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}


def packed_models() -> list:
    models = []
    for i in range(len(TRAINS)):
        torch.manual_seed(i)
        models.append(build_model(CFG))
    return models


def packed_steps(packed: PackedTransformer, optimizer: PackedAdamW, steps: range) -> None:
    peaks = torch.tensor([t.lr for t in TRAINS], dtype=torch.float64)
    for step in steps:
        idx = batch(step, len(TRAINS))
        packed(idx[..., :-1], idx[..., 1:]).loss.sum().backward()
        optimizer.clip_grads()
        optimizer.step(peaks * LR_SCALE[step])
        optimizer.zero_grad()


def test_each_member_steps_as_adamw_alone():
    packed = PackedTransformer.from_members(packed_models())
    optimizer = PackedAdamW(packed, TRAINS)
    packed_steps(packed, optimizer, range(5))
    for i in range(len(TRAINS)):
        alone = train_alone(i, 5)
        for name, tensor in alone["model"].items():
            torch.testing.assert_close(packed.member_state_dict(i)[name], tensor, rtol=1e-6, atol=1e-7, msg=f"{i} {name}")
        # the member's optimizer state in the plain format is the plain optimizer's
        ours, theirs = optimizer.member_state_dict(i, TRAINS[i]), alone["optimizer"]
        assert ours["param_groups"] == theirs["param_groups"]
        for key, entry in theirs["state"].items():
            for field, value in entry.items():
                torch.testing.assert_close(ours["state"][key][field], value, rtol=1e-5, atol=1e-6 * value.abs().max())


def test_frozen_member_keeps_parameters_and_state_and_members_resume_from_plain_state():
    packed = PackedTransformer.from_members(packed_models())
    optimizer = PackedAdamW(packed, TRAINS)
    packed_steps(packed, optimizer, range(2))
    before = packed.member_state_dict(1), optimizer.member_state_dict(1, TRAINS[1])
    optimizer.active[1] = False
    packed_steps(packed, optimizer, range(2, 4))
    after = packed.member_state_dict(1), optimizer.member_state_dict(1, TRAINS[1])
    assert all(torch.equal(before[0][name], after[0][name]) for name in before[0])
    assert all(torch.equal(before[1]["state"][k]["exp_avg"], after[1]["state"][k]["exp_avg"]) for k in before[1]["state"])
    assert not torch.equal(before[0]["head.weight"], packed.member_state_dict(0)["head.weight"])  # the others moved

    # a fresh pack loading every member's plain checkpoint continues as the uninterrupted one
    optimizer.active[1] = True
    resumed = PackedTransformer(CFG, len(TRAINS))
    resumed_optimizer = PackedAdamW(resumed, TRAINS)
    for i, train in enumerate(TRAINS):
        resumed.load_member(i, packed.member_state_dict(i))
        resumed_optimizer.load_member(i, train, optimizer.member_state_dict(i, train))
    packed_steps(packed, optimizer, range(4, 5))
    packed_steps(resumed, resumed_optimizer, range(4, 5))
    for i in range(len(TRAINS)):
        for name, tensor in packed.member_state_dict(i).items():
            assert torch.equal(resumed.member_state_dict(i)[name], tensor), (i, name)


def test_pack_size_must_match_the_configs():
    with pytest.raises(ValueError, match="2 optimiser configs for a pack of 3"):
        PackedAdamW(PackedTransformer(CFG, 3), TRAINS[:2])

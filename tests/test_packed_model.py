"""A stacked model of K members computes, for each member, the plain model's loss and gradients."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, MoEConfig, build_model
from models.packed import PackedTransformer

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=300, seq_len=16)


def members(cfg: ModelConfig, k: int = 3) -> list:
    models = []
    for seed in range(k):
        torch.manual_seed(seed)
        models.append(build_model(cfg, init_std=0.02 * (seed + 1)))
    return models


@pytest.mark.parametrize("chunk", [None, 7], ids=["full-logits", "chunked"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_each_member_gets_its_own_loss_and_gradient(chunk, tie):
    cfg = CFG.model_copy(update={"tie_embeddings": tie})
    plain = members(cfg)
    packed = PackedTransformer.from_members(plain)
    packed.loss_chunk = chunk
    idx = torch.randint(0, cfg.vocab_size, (3, 4, cfg.seq_len + 1), generator=torch.Generator().manual_seed(0))
    out = packed(idx[..., :-1], idx[..., 1:])
    out.loss.sum().backward()
    grads = {name: p.grad for name, p in packed.named_parameters()}
    for i, model in enumerate(plain):
        model.loss_chunk = chunk
        alone = model(idx[i, :, :-1], idx[i, :, 1:])
        alone.loss.backward()
        torch.testing.assert_close(out.loss[i], alone.loss, rtol=1e-6, atol=0)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max(), msg=f"member {i} {name}")


def test_members_go_in_and_out_in_the_plain_format():
    plain = members(CFG)
    packed = PackedTransformer.from_members(plain)
    for i, model in enumerate(plain):
        state = packed.member_state_dict(i)
        assert state.keys() == model.state_dict().keys()
        assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
    packed.load_member(0, plain[2].state_dict())
    assert torch.equal(packed.member_state_dict(0)["head.weight"], plain[2].head.weight)
    with pytest.raises(ValueError, match="keys differ"):
        packed.load_member(0, {"embed.weight": plain[0].embed.weight})


MOE = CFG.model_copy(update={"family": "moe", "moe": MoEConfig(n_experts=4, top_k=2, n_shared=1, every=2,
                                                                capacity_factor=1.0)})


def test_each_moe_member_gets_its_own_routing_losses_and_gradients():
    """Members route among their own experts (capacity drops included), with their own aux losses and stats."""
    plain = members(MOE)
    packed = PackedTransformer.from_members(plain)
    packed.loss_chunk = 7
    idx = torch.randint(0, MOE.vocab_size, (3, 4, MOE.seq_len + 1), generator=torch.Generator().manual_seed(1))
    out = packed(idx[..., :-1], idx[..., 1:])
    (out.loss + out.aux_loss).sum().backward()
    grads = {name: p.grad for name, p in packed.named_parameters()}
    for i, model in enumerate(plain):
        model.loss_chunk = 7
        alone = model(idx[i, :, :-1], idx[i, :, 1:])
        (alone.loss + alone.aux_loss).backward()
        torch.testing.assert_close(out.loss[i], alone.loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(out.aux_loss[i], alone.aux_loss, rtol=1e-6, atol=0)
        assert out.router.keys() == alone.router.keys() and alone.router["layer0/dropped_frac"] > 0
        for key, value in alone.router.items():
            torch.testing.assert_close(out.router[key][i], value, rtol=1e-6, atol=1e-7, msg=key)
        for name, p in model.named_parameters():
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-6 * p.grad.abs().max(), msg=f"member {i} {name}")


def test_noisy_routing_is_refused_with_one_line():
    noisy = MOE.model_copy(update={"moe": MOE.moe.model_copy(update={"noise_std": 0.1})})
    with pytest.raises(ValueError, match="noise_std 0.1: a pack cannot draw"):
        PackedTransformer(noisy, 2)

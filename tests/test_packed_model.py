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
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-8, msg=f"member {i} {name}")


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


def test_moe_packs_are_refused_with_one_line():
    moe = CFG.model_copy(update={"family": "moe", "moe": MoEConfig(n_experts=4, top_k=2)})
    with pytest.raises(ValueError, match="packs train dense models only"):
        PackedTransformer(moe, 2)

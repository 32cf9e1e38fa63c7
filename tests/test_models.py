"""The decoder: its outputs, causality, RoPE, initialisation, compile and a few training steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, MoEConfig, build_model
from models.layers import apply_rope, rope_tables

DENSE = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=48, seq_len=16)
MOE = DENSE.model_copy(update={"family": "moe", "moe": MoEConfig(n_experts=4, top_k=2, every=2)})


def batch(cfg: ModelConfig, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (n, cfg.seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_outputs(cfg):
    torch.manual_seed(0)
    idx = batch(cfg)
    out = build_model(cfg)(idx, idx)
    assert out.logits.shape == (2, cfg.seq_len, cfg.vocab_size)
    expected = F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size), idx.reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out.loss.item() == pytest.approx(math.log(cfg.vocab_size), rel=0.05)  # small init: near uniform
    if cfg.family == "dense":
        assert out.aux_loss.item() == 0.0 and out.router == {}
    else:  # MoE in layer 0 only (every 2 of 2 layers)
        assert sorted(out.router) == [f"layer0/{s}" for s in sorted(["balance_loss", "dropped_frac", "load_cv", "load_max", "z_loss"])]
        assert out.aux_loss.item() > 0
    assert build_model(cfg)(idx).loss is None


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_causal(cfg):
    model = build_model(cfg).eval()
    idx = batch(cfg, n=1)
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % cfg.vocab_size
    torch.testing.assert_close(model(idx).logits[:, :10], model(changed).logits[:, :10])
    assert not torch.allclose(model(idx).logits[:, 10:], model(changed).logits[:, 10:])


def test_rope_scores_depend_only_on_the_offset():
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        return apply_rope(q, cos[m], sin[m]) @ apply_rope(k, cos[n], sin[n])

    torch.testing.assert_close(score(5, 2), score(20, 17))
    assert not torch.allclose(score(5, 2), score(5, 3))
    torch.testing.assert_close(score(0, 0), q @ k)  # position 0 is the identity


def test_init_scales_residual_projections_with_depth():
    cfg = DENSE.model_copy(update={"d_model": 256, "d_ff": 512, "n_heads": 4, "n_layers": 8, "tie_embeddings": True})
    model = build_model(cfg, init_std=0.02)
    assert model.head.weight is model.embed.weight
    block = model.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.out.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)  # 1/sqrt(2 * 8)
    assert block.ffn.down.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert torch.all(block.attn_norm.weight == 1)


def test_compile_takes_the_whole_moe_model_and_matches_eager():
    """fullgraph=True: the grouped dispatch has no host sync or graph break. In bf16, the dtype grouped
    products are traced for; aot_eager keeps the test fast on a CPU (no C++ code generation)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    torch.manual_seed(0)
    cfg = MOE.model_copy(update={"n_layers": 1, "seq_len": 8, "moe": MOE.moe.model_copy(update={"capacity_factor": 1.0})})
    model = build_model(cfg).to(torch.bfloat16).eval()
    model.blocks[0].ffn.dispatch = "grouped"
    idx = batch(cfg)
    eager = model(idx, idx)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(idx, idx)
    torch.testing.assert_close(compiled.logits, eager.logits)
    torch.testing.assert_close(compiled.aux_loss, eager.aux_loss)
    assert compiled.router.keys() == eager.router.keys()


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
def test_a_few_steps_fit_a_repeated_batch(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = batch(cfg)
    losses = []
    for _ in range(15):
        out = model(idx[:, :-1].contiguous(), idx[:, 1:].contiguous())
        opt.zero_grad()
        (out.loss + out.aux_loss).backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cfg", [DENSE, MOE], ids=["dense", "moe"])
@pytest.mark.parametrize("bf16_residual", [False, True])
def test_residual_stream_dtype_under_autocast(cfg, bf16_residual):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.bf16_residual = bf16_residual
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append((args[0].dtype, out[0].dtype)))
    idx = batch(cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
    out.loss.backward()
    residual = torch.bfloat16 if bf16_residual else torch.float32
    assert seen == [(residual, residual)] * cfg.n_layers
    assert model.embed.weight.grad.dtype == torch.float32 and model.embed.weight.grad.abs().sum() > 0
    fp32 = build_model(cfg)
    fp32.load_state_dict(model.state_dict())
    assert out.loss.item() == pytest.approx(fp32(idx, idx).loss.item(), rel=1e-2)

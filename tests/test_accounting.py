"""Analytic counts against the built modules and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from models import ModelConfig, MoEConfig, build_model, count_params, estimate_memory_bytes, flops_per_token
from models.moe import MoE

aten = torch.ops.aten

DENSE = ModelConfig(d_model=32, n_layers=2, n_heads=4, d_ff=96, vocab_size=64, seq_len=16)
SHAPES = {
    "dense": DENSE,
    "dense-tied": DENSE.model_copy(update={"tie_embeddings": True}),
    "moe-top2": DENSE.model_copy(update={"family": "moe", "moe": MoEConfig(n_experts=4, top_k=2)}),
    "moe-fine-shared-every2": DENSE.model_copy(update={
        "family": "moe", "n_layers": 3, "moe": MoEConfig(n_experts=3, top_k=1, granularity=2, n_shared=1, every=2)}),
}


@pytest.mark.parametrize("name", SHAPES)
def test_param_counts_equal_the_built_module(name):
    cfg = SHAPES[name]
    model = build_model(cfg)
    counts = count_params(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())  # shared tied weight counted once
    assert counts.embed == model.embed.weight.numel() * (1 if cfg.tie_embeddings else 2)
    assert counts.nonembed == counts.total - counts.embed
    # Active = non-embedding minus the routed experts a token does not use, read off the module.
    unused = 0
    for block in model.blocks:
        if isinstance(block.ffn, MoE):
            per_expert = block.ffn.w_gate_up[0].numel() + block.ffn.w_down[0].numel()
            n_experts = block.ffn.w_down.shape[0]
            unused += (n_experts - cfg.moe.top_k * cfg.moe.granularity) * per_expert
    assert counts.active == counts.nonembed - unused
    assert (unused > 0) == (cfg.family == "moe")


# The CPU attention kernel has no formula in torch's registry; give it torch's own SDPA formulas.
CPU_SDPA = {
    aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad_out, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad_out, q, k, v),
}


@pytest.mark.parametrize("name", SHAPES)
def test_exact_flops_agree_with_the_flop_counter(name):
    cfg = SHAPES[name]
    model = build_model(cfg)
    batch = 3
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as forward:
        out = model(idx, idx)
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as backward:
        (out.loss + out.aux_loss).backward()
    tokens = batch * cfg.seq_len
    flops = flops_per_token(cfg)
    assert flops.forward_exact * tokens == pytest.approx(forward.get_total_flops(), rel=0.02)
    assert flops.train_exact * tokens == pytest.approx(forward.get_total_flops() + backward.get_total_flops(), rel=0.02)
    assert flops.train_6N == 6 * count_params(cfg).active


def test_attention_flops_use_the_full_sequence():
    longer = DENSE.model_copy(update={"seq_len": 2 * DENSE.seq_len})
    extra = flops_per_token(longer).forward_exact - flops_per_token(DENSE).forward_exact
    assert extra == DENSE.n_layers * 4 * DENSE.seq_len * DENSE.d_model  # scores + values, non-causal T


@pytest.mark.parametrize("name", ["dense", "moe-fine-shared-every2"])
def test_memory_estimate_covers_states_and_saved_activations(name):
    """Above 16 bytes per parameter plus every tensor autograd saves in a bf16-autocast forward."""
    cfg, seqs = SHAPES[name], 2
    model = build_model(cfg)
    params_at = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes, parameters themselves left out (they are states)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params_at:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, cfg.vocab_size, (seqs, cfg.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(idx, idx)
    out.loss.backward()
    params = count_params(cfg).total
    estimate = estimate_memory_bytes(cfg, seqs)
    assert estimate >= 16 * params + sum(saved.values())
    assert estimate < 3 * (16 * params + sum(saved.values()))  # conservative, not absurd
    assert estimate_memory_bytes(cfg, 2 * seqs) > estimate

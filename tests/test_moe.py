"""The MoE layer against plain per-token references, with hand-made routings for the losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models import MoEConfig
from models.layers import SwiGLU
from models.moe import MoE, balance_loss, experts_grouped, experts_loop, route, sort_by_expert, z_loss

D, D_FF = 16, 32


def make_moe(seed: int = 0, **options) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(D, D_FF, MoEConfig(**options))
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def reference(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: scores, top-k, optional renormalisation, weighted sum of expert outputs."""
    cfg, width = layer.cfg, layer.w_down.shape[-1]
    k = cfg.top_k * cfg.granularity
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = layer.router.weight @ x[t]
        scores = logits.softmax(-1) if cfg.gate == "softmax" else logits.sigmoid()
        weights, experts = scores.topk(k)
        if cfg.renormalize:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts):
            gate = layer.w_gate_up[e, :width] @ x[t]
            up = layer.w_gate_up[e, width:] @ x[t]
            out[t] += w * (layer.w_down[e] @ (F.silu(gate) * up))
        if layer.shared is not None:
            out[t] += layer.shared(x[t])
    return out


def tokens(n: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_one_expert_top1_equals_the_dense_ffn():
    layer = make_moe(n_experts=1, top_k=1)
    dense = SwiGLU(D, D_FF)
    with torch.no_grad():
        dense.gate_up.weight.copy_(layer.w_gate_up[0])
        dense.down.weight.copy_(layer.w_down[0])
    x = tokens()
    y, _, _ = layer(x)
    torch.testing.assert_close(y, dense(x))


@pytest.mark.parametrize("options", [
    {"n_experts": 4, "top_k": 2},
    {"n_experts": 4, "top_k": 1, "gate": "sigmoid", "renormalize": False},
    {"n_experts": 4, "top_k": 3, "gate": "sigmoid"},
    {"n_experts": 3, "top_k": 2, "granularity": 2, "n_shared": 2, "renormalize": False},
])
def test_top_k_routing_matches_a_per_token_reference(options):
    layer = make_moe(**options)
    x = tokens()
    y, _, stats = layer(x)
    torch.testing.assert_close(y, reference(layer, x))
    assert float(stats["dropped_frac"]) == 0.0  # dropless by default


def test_grouped_and_loop_dispatch_agree():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    layer = make_moe(n_experts=4, top_k=2)
    x = tokens(40)
    routing = route(F.linear(x, layer.router.weight), layer.cfg, training=False)
    rows = x[routing.order // 2]
    try:
        grouped = experts_grouped(rows, routing.counts, layer.w_gate_up, layer.w_down)
    except RuntimeError as e:  # no CPU kernel for grouped products in this build
        pytest.skip(f"torch._grouped_mm on CPU: {e}")
    torch.testing.assert_close(grouped, experts_loop(rows, routing.counts, layer.w_gate_up, layer.w_down))
    assert routing.counts.sum() == 80 and sorted(routing.counts.tolist()) != [20] * 4  # real, uneven groups


def test_capacity_drops_exactly_the_overflow_in_token_order():
    n, cf = 24, 0.5  # 2 experts, k=1: capacity ceil(0.5 * 24 / 2) = 6 tokens per expert
    layer = make_moe(n_experts=2, top_k=1, capacity_factor=cf)
    x = tokens(n)
    with torch.no_grad():  # send every token to expert 0
        layer.router.weight.zero_()
        layer.router.weight[0, 0] = 1.0
        x[:, 0] = x[:, 0].abs() + 0.1
    y, _, stats = layer(x)
    full = reference(layer, x)
    torch.testing.assert_close(y[:6], full[:6])  # the first six come first and are served
    assert torch.all(y[6:] == 0)  # the other 18 overflow expert 0 and are dropped
    assert float(stats["dropped_frac"]) == pytest.approx(18 / 24)
    assert float(stats["load_max"]) == pytest.approx(2.0)  # all load on one of two experts


def test_capacity_above_the_load_drops_nothing():
    layer = make_moe(n_experts=4, top_k=2, capacity_factor=4.0)  # capacity = every assignment
    x = tokens()
    y, _, stats = layer(x)
    torch.testing.assert_close(y, reference(layer, x))
    assert float(stats["dropped_frac"]) == 0.0


def test_balance_loss_on_a_hand_made_routing():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    routing = route(probs.log(), MoEConfig(n_experts=2, top_k=1), training=False)
    assert routing.expert.view(-1).tolist() == [0, 0, 0, 1]
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert float(balance_loss(routing)) == pytest.approx(1.15)
    uniform = route(torch.zeros(8, 4), MoEConfig(n_experts=4, top_k=1), training=False)
    assert float(balance_loss(uniform)) == pytest.approx(1.0)  # uniform P: 4 * sum_i f_i / 4 = 1 for any f


def test_z_loss_is_the_mean_squared_log_partition():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(expected)


def test_aux_loss_is_the_weighted_sum_reported_in_the_stats():
    layer = make_moe(n_experts=4, top_k=2, aux_loss_weight=0.1, z_loss_weight=0.01)
    _, aux, stats = layer(tokens())
    assert float(aux.detach()) == pytest.approx(0.1 * float(stats["balance_loss"]) + 0.01 * float(stats["z_loss"]))
    assert set(stats) == {"load_max", "load_cv", "dropped_frac", "balance_loss", "z_loss"}
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_gradients_reach_the_router_through_the_output_and_the_aux_loss():
    for weights, source in [({"aux_loss_weight": 0.0, "z_loss_weight": 0.0}, "output"), ({}, "aux")]:
        layer = make_moe(n_experts=4, top_k=2, **weights)
        y, aux, _ = layer(tokens())
        (aux if source == "aux" else y.square().sum()).backward()
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0, source


def test_noise_only_in_training():
    layer = make_moe(n_experts=8, top_k=2, noise_std=1.0)
    x = tokens()
    layer.eval()
    torch.testing.assert_close(layer(x)[0], reference(layer, x))
    layer.train()
    assert not torch.allclose(layer(x)[0], layer(x)[0])


def test_sort_by_expert_is_stable_and_counts():
    expert = torch.tensor([[2, 0], [0, 1], [2, 1]])
    order, counts = sort_by_expert(expert, 4)
    assert order.tolist() == [1, 2, 3, 5, 0, 4]
    assert counts.tolist() == [2, 2, 2, 0]

"""Parameter, FLOP and memory accounting, computed from the config alone (no module is built).

These numbers are N and C for the fits, so they are exact: tests compare them with the built module's
`numel` and with `torch.utils.flop_counter.FlopCounterMode` on a real forward + backward.

FLOP convention (`exact`): every matrix product counts 2*m*n*k. Attention scores (QK^T) and values (AV)
are counted over the full sequence, non-causal (4 * seq_len * d_model per token per layer), which is
what FlopCounterMode and the Chinchilla appendix count; the causal mask would halve that term.
Counted: QKV and output projections, scores and values, SwiGLU (dense, shared and the top_k*G active
experts), the router, the output head. Not counted: norms, RoPE, softmax, activations, the embedding
lookup (no products). Training = 3 x forward (backward is two products per forward product).
"""

from __future__ import annotations

from dataclasses import dataclass

from models.config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by convention. embed = input embedding + untied output head."""

    total: int
    embed: int
    nonembed: int
    active: int  # non-embedding parameters one token uses (= nonembed for dense)


@dataclass(frozen=True)
class FlopCounts:
    """FLOPs per token."""

    forward_exact: float
    train_exact: float
    train_6N: float


def is_moe_layer(cfg: ModelConfig, layer: int) -> bool:
    """MoE in layers 0, every, 2*every, ...: layer 0 is always MoE, so even a one-layer model has one."""
    return cfg.moe is not None and layer % cfg.moe.every == 0


def expert_width(cfg: ModelConfig) -> int:
    """Hidden size of one routed or shared expert: d_ff / G."""
    return cfg.d_ff // cfg.moe.granularity if cfg.moe else cfg.d_ff


def n_routed(cfg: ModelConfig) -> int:
    """Routed experts after granularity: E * G."""
    return cfg.moe.n_experts * cfg.moe.granularity if cfg.moe else 0


def active_experts(cfg: ModelConfig) -> int:
    """Experts one token runs through in an MoE layer: top_k * G routed + the shared ones."""
    return cfg.moe.top_k * cfg.moe.granularity + cfg.moe.n_shared if cfg.moe else 0


def _swiglu_params(d_model: int, hidden: int) -> int:
    return 3 * d_model * hidden  # gate, up, down


def count_params(cfg: ModelConfig) -> ParamCounts:
    d, attn_and_norms = cfg.d_model, 4 * cfg.d_model**2 + 2 * cfg.d_model
    total = active = d  # final norm
    for layer in range(cfg.n_layers):
        total += attn_and_norms
        active += attn_and_norms
        if is_moe_layer(cfg, layer):
            router, width = d * n_routed(cfg), expert_width(cfg)
            total += router + (n_routed(cfg) + cfg.moe.n_shared) * _swiglu_params(d, width)
            active += router + active_experts(cfg) * _swiglu_params(d, width)
        else:
            total += _swiglu_params(d, cfg.d_ff)
            active += _swiglu_params(d, cfg.d_ff)
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    return ParamCounts(total=total + embed, embed=embed, nonembed=total, active=active)


def flops_per_token(cfg: ModelConfig) -> FlopCounts:
    d = cfg.d_model
    forward = 2 * d * cfg.vocab_size  # output head
    for layer in range(cfg.n_layers):
        forward += 2 * 4 * d * d + 2 * 2 * cfg.seq_len * d  # projections; scores and values, full T
        if is_moe_layer(cfg, layer):
            forward += 2 * d * n_routed(cfg) + 2 * active_experts(cfg) * _swiglu_params(d, expert_width(cfg))
        else:
            forward += 2 * _swiglu_params(d, cfg.d_ff)
    return FlopCounts(forward_exact=float(forward), train_exact=3.0 * forward, train_6N=6.0 * count_params(cfg).active)


# Memory estimate: bytes per element of each training-state tensor.
_STATE_BYTES = 4 + 4 + 8 + 2  # fp32 param, fp32 grad, AdamW m and v, bf16 autocast copy of the weights
_ACT_BYTES = 2  # bf16 activations
_LOGIT_BYTES = 2 + 4 + 4 + 6  # bf16 logits, fp32 copy and log-softmax for the loss, their gradients


def estimate_memory_bytes(cfg: ModelConfig, micro_batch_seqs: int) -> int:
    """Training memory for one micro-batch, deliberately on the high side (it packs trials onto GPUs).

    States: 18 bytes per parameter (fp32 weights and grads, AdamW's two moments, a bf16 copy).
    Activations saved for backward, per token and layer, in bf16 elements: 20*d_model for attention and
    the two norms (fp32 norm inputs and outputs count double; Q, K, the fused QKV output, the attention
    output and the projection input) plus, per FFN the token runs through, 4*hidden (gate, up, their
    product) and 2*d_model for each routed expert's fp32 gathered copy of the token, and 8 per routed
    expert for the router's fp32 logits and probabilities. Logits: 16 bytes each (bf16, fp32 and the
    log-softmax, and their gradients). No activation checkpointing.
    """
    d, tokens = cfg.d_model, micro_batch_seqs * cfg.seq_len
    per_token = 0
    for layer in range(cfg.n_layers):
        per_token += 20 * d
        if is_moe_layer(cfg, layer):
            per_token += active_experts(cfg) * (4 * expert_width(cfg) + 2 * d) + 8 * n_routed(cfg)
        else:
            per_token += 4 * cfg.d_ff
    activations = tokens * (_ACT_BYTES * per_token + _LOGIT_BYTES * cfg.vocab_size)
    return int(_STATE_BYTES * count_params(cfg).total + activations)


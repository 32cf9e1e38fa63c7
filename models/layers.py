"""The dense building blocks of a LLaMA-style decoder: rotary embeddings, causal attention, SwiGLU, and the
dtype their products run in."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models import flash4
from models.swiglu import swiglu


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matrix products on x run in: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each [seq_len, head_dim / 2]."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension of x [B, H, T, hd] (or [B, T, H, hd] with
    cos and sin [T, 1, hd / 2])."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.type_as(x)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE, fused QKV projection, no biases."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int, rope_theta: float):
        super().__init__()
        self.n_heads = n_heads
        self.flash4 = False  # how it runs, not what it computes: FlashAttention-4 instead of SDPA (models.flash4)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rope_tables(seq_len, d_model // n_heads, rope_theta)
        self.register_buffer("cos", cos, persistent=False)  # derived from the config: not checkpointed
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads)
        if self.flash4:  # [B, T, H, hd] throughout
            q, k, v = qkv.unbind(2)
            cos, sin = self.cos[:T, None], self.sin[:T, None]
            y = flash4.causal_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
            return self.out(y.reshape(B, T, D))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:T], self.sin[:T]
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused in one projection."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))

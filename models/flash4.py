"""Causal attention through FlashAttention-4 (the `flash-attn-4` package: CuTe DSL kernels for Hopper and
Blackwell, a pure-Python wheel), as a torch custom op so that torch.compile keeps it whole.

torch's SDPA runs cuDNN's flash attention on an H100/H200; FlashAttention-3's Hopper kernels are not in it,
and FA4's Hopper path is their design in CuTe DSL. Its kernels are compiled on first use (seconds, once per
process and shape). The ops call flash_attn.cute.interface's _flash_attn_fwd and _flash_attn_bwd, as torch's
own FA4 registration does (torch.nn.attention, 2.13). Tensors are [batch, seq, heads, head_dim], the layout
the fused QKV projection writes, so no transpose is needed on either side.
"""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device, head_dim: int) -> bool:
    """flash-attn-4 installed, `device` a Hopper or Blackwell GPU (compute capability 9 or 10), and heads of a
    size its kernels take (a multiple of 8, at most 256)."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in (9, 10)
            and head_dim % 8 == 0 and 8 <= head_dim <= 256
            and importlib.util.find_spec("flash_attn") is not None
            and importlib.util.find_spec("flash_attn.cute") is not None)


@torch.library.custom_op("scaling::flash4_causal", mutates_args=())
def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_fwd

    out, lse = _flash_attn_fwd(q, k, v, causal=True, return_lse=True)[:2]
    return out, lse


@_forward.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    batch, seq, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty((batch, heads, seq), dtype=torch.float32)


@torch.library.custom_op("scaling::flash4_causal_backward", mutates_args=())
def _backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, grad_out: torch.Tensor,
              lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from flash_attn.cute.interface import _flash_attn_bwd

    dq, dk, dv = _flash_attn_bwd(q, k, v, out, grad_out.contiguous(), lse, causal=True)
    return dq, dk, dv


@_backward.register_fake
def _(q, k, v, out, grad_out, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs, *output)


def _grad(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor):
    q, k, v, out, lse = ctx.saved_tensors
    return _backward(q, k, v, out, grad_out, lse)


_forward.register_autograd(_grad, setup_context=_setup)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), causal) v for q, k, v [batch, seq, heads, head_dim] in bf16 or fp16."""
    return _forward(q, k, v)[0]

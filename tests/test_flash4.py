"""models.flash4 gives SDPA's causal attention and gradients, eager and compiled, and a model using it the
same loss (runs where there is a Hopper or Blackwell GPU with flash-attn-4: the device machine, not CI).
On CPU: the [B, T, H, hd] path the model takes for it computes what the SDPA path does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, build_model, flash4

gpu = pytest.mark.skipif(not torch.cuda.is_available() or not flash4.available(torch.device("cuda"), 64),
                         reason="FlashAttention-4 needs a Hopper or Blackwell GPU and flash-attn-4")


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The reference on [B, T, H, hd], in fp32."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


@gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_attention_and_gradients_equal_sdpas(compiled):
    torch.manual_seed(0)
    qkv = torch.randn(2, 512, 3, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(2, 512, 4, 64, device="cuda", dtype=torch.bfloat16)
    expected = sdpa(*qkv.unbind(2))
    (expected_grad,) = torch.autograd.grad(expected, qkv, grad_out.float())
    fn = torch.compile(flash4.causal_attention) if compiled else flash4.causal_attention
    out = fn(*qkv.unbind(2))  # strided views of one projection, as the model passes them
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=2e-2)


def _losses(device: str) -> tuple[float, float]:
    cfg = ModelConfig(d_model=128, n_layers=2, n_heads=2, d_ff=512, vocab_size=256, seq_len=128)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    x, y = torch.randint(0, 256, (2, 2, 128), device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        plain = model(x, y).loss.item()
        model.use_flash4(True)
        return plain, model(x, y).loss.item()


@gpu
def test_model_loss_equals_sdpas():
    plain, fa4 = _losses("cuda")
    assert fa4 == pytest.approx(plain, rel=2e-3)


def test_model_layout_for_it_matches_sdpa_path(monkeypatch):
    """The flash4 branch's [B, T, H, hd] split and RoPE, with SDPA standing in for the kernel, is the SDPA branch."""
    monkeypatch.setattr(flash4, "causal_attention", lambda q, k, v: sdpa(q, k, v).to(q.dtype))
    plain, swapped = _losses("cpu")
    assert swapped == pytest.approx(plain, rel=1e-6)

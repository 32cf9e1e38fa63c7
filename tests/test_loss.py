"""The chunked head and cross-entropy: the same loss and gradients as full logits, eager and compiled."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model

CFG = ModelConfig(d_model=32, n_layers=2, n_heads=2, d_ff=64, vocab_size=300, seq_len=16)


def loss_and_grads(model, x, y, chunk, forward=None):
    model.zero_grad()
    model.loss_chunk = chunk
    out = (model if forward is None else forward)(x, y)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.fixture
def data():
    torch.manual_seed(0)
    idx = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len + 1))
    return build_model(CFG), idx[:, :-1], idx[:, 1:]


@pytest.mark.parametrize("chunk", [7, 48, 1000], ids=["uneven", "even", "one-chunk"])
def test_chunked_loss_and_gradients_equal_full_logits(data, chunk):
    model, x, y = data
    full, expected = loss_and_grads(model, x, y, None)
    chunked, got = loss_and_grads(model, x, y, chunk)
    assert chunked.logits is None and full.logits is not None
    torch.testing.assert_close(chunked.loss, full.loss, rtol=1e-6, atol=1e-6)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_compiled_chunked_loss_matches_eager(data):
    model, x, y = data
    _, expected = loss_and_grads(model, x, y, None)
    _, got = loss_and_grads(model, x, y, 20, torch.compile(model, backend="aot_eager"))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-7, msg=name)


def test_bf16_autocast_stays_close_to_fp32(data):
    model, x, y = data
    full, _ = loss_and_grads(model, x, y, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, grads = loss_and_grads(model, x, y, 20)
    assert chunked.loss.dtype == torch.float32
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-2)
    assert all(g.dtype == torch.float32 for g in grads.values())  # parameters' gradients keep their dtype


def test_without_gradients_the_plain_path_gives_logits(data):
    model, x, y = data
    model.loss_chunk = 8
    with torch.no_grad():
        out = model(x, y)
    assert out.logits.shape == (3, CFG.seq_len, CFG.vocab_size)

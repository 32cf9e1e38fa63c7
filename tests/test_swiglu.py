"""models.swiglu's CUDA backward kernel gives autograd's gradients (runs where there is a GPU: the device
machine, not CI)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import swiglu as swiglu_module
from models.swiglu import swiglu

cuda = pytest.mark.skipif(not torch.cuda.is_available() or swiglu_module.triton is None,
                          reason="the kernel needs a CUDA GPU and Triton")


def reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.float().chunk(2, dim=-1)
    return F.silu(gate) * up


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 64, 2 * 3072), (300, 2 * 1000), (0, 2 * 256)], ids=["3d", "ragged", "empty"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_gradients_equal_autograds(dtype, shape, compiled):
    torch.manual_seed(0)
    gate_up = (2 * torch.randn(shape, device="cuda")).to(dtype).requires_grad_()
    grad_out = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda").to(dtype)
    expected_out = reference(gate_up)
    (expected,) = torch.autograd.grad(expected_out, gate_up, grad_out.float())
    fn = torch.compile(swiglu) if compiled else swiglu
    out = fn(gate_up)
    (got,) = torch.autograd.grad(out, gate_up, grad_out)
    assert got.dtype == dtype and out.dtype == dtype
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out.float(), expected_out, **tol)
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), **tol)


def test_without_gradients_it_is_the_plain_expression():
    gate_up = torch.randn(5, 8)
    torch.testing.assert_close(swiglu(gate_up), reference(gate_up))

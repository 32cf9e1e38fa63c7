"""Cross-entropy of a linear head, in chunks of tokens, with its gradients computed in the forward pass.

The plain path writes the [tokens, vocab] logits, keeps them (and their fp32 upcast) for the backward and
then writes their gradient. Here each chunk's logits are made, turned into the chunk's loss and logit
gradient, and consumed by the two gradient products at once, so the full logits never exist (the idea of
Liger's fused linear cross-entropy). On an H200 that took 20 to 30% off the peak memory of the
benchmark shapes at the same speed (runners/bench/step.py): the exp and log-sum-exp work is the same. The
backward only scales the saved gradients, so this is for training; evaluation keeps the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.layers import compute_dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        # h [..., N, d], weight [..., V, d], targets [..., N]: an optional leading axis of pack members
        # (models.packed), each with its own head and its own mean loss
        n = h.shape[-2]
        acc = torch.promote_types(weight.dtype, torch.float32)  # logits, loss and sums over chunks: fp32 at least
        loss = torch.zeros(h.shape[:-2], dtype=acc, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        vocab = torch.arange(weight.shape[-2], device=h.device)
        for start in range(0, n, chunk):
            rows, t = h[..., start:start + chunk, :], targets[..., start:start + chunk]
            logits = (rows @ weight.transpose(-1, -2)).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            loss = loss + (lse - logits.gather(-1, t[..., None]).squeeze(-1)).sum(-1)
            # d(mean loss)/d(logits) = (softmax - onehot(target)) / n, as one pointwise expression that
            # compile can fuse with the log-sum-exp's pass (a scatter of the -1s could not be, and cost one more
            # pass over the fp32 logits: 2% of a d768 step on an H200).
            grad_logits = ((torch.exp(logits - lse[..., None]) - (vocab == t[..., None]).to(acc)) / n).to(h.dtype)
            grad_h[..., start:start + chunk, :] = grad_logits @ weight
            grad_w += grad_logits.transpose(-1, -2) @ rows
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss[..., None, None]  # one factor per member (a scalar without a member axis)
        return grad_h * scale, grad_w * scale, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean cross-entropy (nats per token) of logits h @ weight.T against targets, `chunk` rows at a time.

    h [N, d], weight [V, d], targets [N] int64; or h [K, N, d], weight [K, V, d], targets [K, N] for K pack
    members, giving each member's mean loss [K]. Products run in autocast's dtype when it is on (logits and
    the log-softmax in fp32 either way), as the plain head and F.cross_entropy on upcast logits would."""
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(h.to(dtype), weight.to(dtype), targets, chunk)


def plain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of full logits [..., V] upcast to fp32."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

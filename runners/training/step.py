"""One optimizer step and one evaluation: the parts of training that touch tensors.

Kept free of schedules and bookkeeping so that the trainer and the step benchmark run the very same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from models import ModelConfig, flash4
from runners.training.schedule import TrialSetupError
from sweeps.trial import Runtime, TrainConfig

# Dense bf16 tensor-core peak, FLOP/s, by a substring of the device name. H200 has H100's compute.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), int64 [sequences, seq_len] on the device


def pick_device(runtime: Runtime) -> torch.device:
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise TrialSetupError("runtime.device: 'cuda' asked but no CUDA device here; use 'auto' or 'cpu'")
    if runtime.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def wants_compile(runtime: Runtime, device: torch.device) -> bool:
    """torch.compile on CUDA unless turned off; on CPU only when asked for (it needs a C++ compiler)."""
    return device.type == "cuda" if runtime.compile == "auto" else bool(runtime.compile)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; plain fp32 on CPU (so CPU runs are exact and deterministic)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def wants_flash4(runtime: Runtime, device: torch.device, model: ModelConfig) -> bool:
    """FlashAttention-4 when asked for, or on 'auto' where it runs (models.flash4); else torch's SDPA."""
    if runtime.attention == "sdpa":
        return False
    if flash4.available(device, model.d_model // model.n_heads):
        return True
    if runtime.attention == "flash4":
        raise TrialSetupError("runtime.attention: 'flash4' needs a Hopper or Blackwell GPU, flash-attn-4 (pip install "
                              "'scaling-harness[flash4]') and heads of a multiple of 8 up to 256; use 'auto' or 'sdpa'")
    return False


def numerics(runtime: Runtime, device: torch.device, flash4: bool) -> str:
    """How a trial computes on `device`, as its MLflow tag shows it: precision, residual stream, attention
    kernel (`flash4`: what wants_flash4 chose), compile."""
    how = "compiled" if wants_compile(runtime, device) else "eager"
    if device.type == "cuda":
        attention = "FlashAttention-4" if flash4 else "SDPA attention"
        return f"bf16 autocast, {'bf16' if runtime.bf16_residual else 'fp32'} residual stream, {attention}, {how}"
    return f"fp32, {how}"


def peak_of(name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of the GPU of this name ('NVIDIA H200'), or None when not in the table."""
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), None)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None for a CPU or a GPU not in the table."""
    return peak_of(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def decays(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay applies to: matrices only. Embeddings, norms and biases are not
    decayed, as in GPT-2/LLaMA training, since shrinking them changes the scale of the residual stream, not
    capacity. For a plain Transformer (a pack asks its plain twin: models.packed keeps the names)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return {name for name, p in model.named_parameters() if p.ndim >= 2 and id(p) not in embeddings}


def make_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (fused on CUDA), weight decay on `decays(model)` only."""
    decayed = decays(model)
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for name, p in params if name in decayed], "weight_decay": train.weight_decay},
              {"params": [p for name, p in params if name not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(train.beta1, train.beta2), fused=device.type == "cuda")


def accumulate_grads(model: nn.Module, micro_batches: Sequence[Batch], device: torch.device
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward over the micro-batches of one step, gradients averaged over them.

    Returns the step's mean cross-entropy (nats/token, without router losses; [K] for a pack of K members,
    models.packed) and its mean router statistics, both still on the device so that no step waits for the GPU.
    """
    n = len(micro_batches)
    loss_sum = torch.zeros((), device=device)
    router: dict[str, torch.Tensor] = {}
    for i, (x, y) in enumerate(micro_batches):
        # Under DDP, gradients are all-reduced once a step, after the last micro-batch.
        quiet = model.no_sync() if i < n - 1 and hasattr(model, "no_sync") else contextlib.nullcontext()
        with quiet:
            with autocast(device):
                out = model(x, y)
            # a pack's loss is one per member [K]: the gradient of their sum is each member's own
            ((out.loss + out.aux_loss) / n).sum().backward()
        loss_sum = loss_sum + out.loss.detach().float()
        for key, value in out.router.items():
            router[key] = router.get(key, 0.0) + value.detach().float() / n
    return loss_sum / n, router


def apply_update(model: nn.Module, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float | None) -> None:
    """Clip, step at `lr`, and clear the gradients for the next step."""
    if grad_clip is not None:
        clip_grad_norm(list(model.parameters()), grad_clip)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> None:
    """torch's clip_grad_norm_, also over plain tensors beside DTensors (DDP's replicas beside expert-parallel
    shards, runners.training.parallel), which torch's refuses to mix: the norm of the whole model's gradient,
    the same on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if isinstance(g, DTensor)]
    if len(sharded) in (0, len(grads)):
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    plain = [g for g in grads if not isinstance(g, DTensor)]
    norm = torch.linalg.vector_norm(torch.stack([torch.nn.utils.get_total_norm(plain),
                                                 torch.nn.utils.get_total_norm(sharded).full_tensor()]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # as clip_grad_norm_
    torch._foreach_mul_(plain + [g.to_local() for g in sharded], scale)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], device: torch.device) -> torch.Tensor:
    """[summed cross-entropy in nats, tokens] over every token of `batches`, float64 on the device (sums, so
    that a group's shares add up; their ratio is the mean loss per token): shape [2], or [2, K] for a pack
    (batches [K, sequences, seq_len]; tokens per member)."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for x, y in batches:
        tokens = y.shape[-2] * y.shape[-1]  # per member
        with autocast(device):
            total = total + model(x, y).loss.double() * tokens
        count += tokens
    model.train(was_training)
    return torch.stack([total, torch.full_like(total, float(count))])

"""AdamW for a pack: every member its own lr, betas, weight decay, gradient clip and step count.

The update is torch.optim.AdamW's (decoupled weight decay, bias corrections from each member's own step
count), written over all the stacked parameters at once, flattened side by side into one [K, P] tensor, with the
per-member values as [K, 1] tensors broadcast along it: one set of tensor ops a step, none per parameter or
member (on a GPU without torch.compile each op is a kernel: a loop over a 4-layer model's 27 parameters took
about 20 a parameter). The moments live in that flat layout ([K, P], exp_avg and exp_avg_sq give each
parameter's view of them). Which parameters decay is make_optimizer's rule (runners.training.step.decays),
applied to the plain names the stacked parameters keep, as a [P] mask. A member whose `active` entry is False
(diverged, pruned, or done) is frozen: its parameters and its optimizer state stay as they are. The flat
copies of parameters and gradients a step makes come after the backward pass has freed its activations.

Members go in and out as make_optimizer's plain torch.optim.AdamW (`member`, `load_plain`) or its state dicts
(`member_state_dict`, `load_member`), so a member's checkpoint resumes it packed or alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models import build_model
from models.packed import PackedTransformer
from runners.training.step import decays, make_optimizer
from sweeps.trial import TrainConfig

EPS = 1e-8  # torch.optim.AdamW's default, as make_optimizer uses it
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: coefficient max_norm / (norm + 1e-6)


class PackedAdamW:
    def __init__(self, model: PackedTransformer, trains: Sequence[TrainConfig], compile: bool = False):
        if len(trains) != model.k:
            raise ValueError(f"{len(trains)} optimiser configs for a pack of {model.k}")
        device = next(model.parameters()).device

        def per_member(values) -> torch.Tensor:
            return torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)

        self.model = model
        self.params = dict(model.named_parameters())  # tied weights appear once, under their first name
        with torch.device("meta"):
            decayed = decays(build_model(model.cfg))  # the plain twin's names are the pack's
        self.beta1 = per_member(t.beta1 for t in trains)
        self.beta2 = per_member(t.beta2 for t in trains)
        self.weight_decay = per_member(t.weight_decay for t in trains)
        self.grad_clip = per_member(t.grad_clip if t.grad_clip is not None else float("inf") for t in trains)
        self.step_count = torch.zeros(model.k, dtype=torch.float64, device=device)
        self.active = torch.ones(model.k, dtype=torch.bool, device=device)
        # The flat layout: parameter `name` is columns [start, start + size) of a [K, P] tensor.
        self.sizes = [p[0].numel() for p in self.params.values()]
        self.decay_mask = torch.cat([torch.full((n,), name in decayed, device=device)
                                     for name, n in zip(self.params, self.sizes)])
        dtype = next(iter(self.params.values())).dtype
        self.exp_avg_flat = torch.zeros(model.k, sum(self.sizes), dtype=dtype, device=device)
        self.exp_avg_sq_flat = torch.zeros_like(self.exp_avg_flat)
        self.exp_avg, self.exp_avg_sq = self._views(self.exp_avg_flat), self._views(self.exp_avg_sq_flat)
        if compile:  # fuses the update's dozen elementwise ops (and the clip's norms) into a few kernels
            self.clip_grads, self.step = torch.compile(self.clip_grads), torch.compile(self.step)

    def clip_grads(self) -> None:
        """Scale each member's gradients to at most its grad_clip in global 2-norm, as clip_grad_norm_ does alone."""
        grads = [p.grad for p in self.params.values()]
        # each parameter's norm, then the norm of those norms, in the grads' dtype: clip_grad_norm_'s order
        # ([K, params], each member's norms contiguous: a reduction across a strided axis rounds differently)
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads], dim=1)
        total = torch.linalg.vector_norm(norms, dim=1)
        coef = ((total + CLIP_EPS).reciprocal() * self.grad_clip.to(total.dtype)).clamp(max=1.0)  # max_norm / t is this
        torch._foreach_mul_(grads, [coef.view(-1, *[1] * (g.dim() - 1)).to(g.dtype) for g in grads])

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update at each member's lr ([K]); frozen members keep parameters and state."""
        self.step_count += self.active.double()
        steps = self.step_count.clamp(min=1)  # a member frozen before its first step: any value, masked below
        # The per-member factors [K, 1], each computed in float64 and rounded to fp32 once, as torch's scalars are.
        column = (-1, 1)
        step_size = (lr / (1 - self.beta1 ** steps)).float().view(column)
        bias2_sqrt = (1 - self.beta2 ** steps).sqrt().float().view(column)
        shrink = torch.where(self.decay_mask, (1 - lr * self.weight_decay).float().view(column), 1.0)
        one_minus_b1, b2, one_minus_b2 = (x.float().view(column) for x in (1 - self.beta1, self.beta2, 1 - self.beta2))
        params = list(self.params.values())
        p = torch.cat([q.reshape(self.model.k, -1) for q in params], dim=1)
        g = torch.cat([q.grad.reshape(self.model.k, -1) for q in params], dim=1)
        m, v, active = self.exp_avg_flat, self.exp_avg_sq_flat, self.active.view(column)
        m_new = m.lerp(g, one_minus_b1)
        # addcmul as torch's v.mul_(b2).addcmul_(g, g, value=1 - b2): its kernel rounds as this one does
        v_new = torch.addcmul(v * b2, one_minus_b2 * g, g)
        denom = (v_new.sqrt() / bias2_sqrt).add_(EPS)
        p_new = torch.where(active, p * shrink - step_size * m_new / denom, p)
        m.copy_(torch.where(active, m_new, m))
        v.copy_(torch.where(active, v_new, v))
        torch._foreach_copy_(params, list(self._views(p_new).values()))

    def _views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each parameter's [K, ...] view of a flat [K, P] tensor."""
        return {name: chunk.view(param.shape)
                for (name, param), chunk in zip(self.params.items(), flat.split(self.sizes, dim=1))}

    def zero_grad(self) -> None:
        self.model.zero_grad(set_to_none=True)

    # --- members in the plain format -------------------------------------------------------------

    def _plain(self, i: int, train: TrainConfig) -> tuple[nn.Module, torch.optim.AdamW]:
        """A plain model with member i's parameters and make_optimizer's AdamW over it (empty state)."""
        model = build_model(self.model.cfg).to(self.step_count.device)
        model.load_state_dict(self.model.member_state_dict(i))
        return model, make_optimizer(model, train, self.step_count.device)

    def member(self, i: int, train: TrainConfig) -> tuple[nn.Module, torch.optim.AdamW]:
        """Member i as a plain model and make_optimizer's AdamW over it, holding the member's optimizer state."""
        model, optimizer = self._plain(i, train)
        if self.step_count[i] > 0:
            for name, p in model.named_parameters():
                optimizer.state[p] = {"step": torch.tensor(float(self.step_count[i])),
                                      "exp_avg": self.exp_avg[name][i].clone(),
                                      "exp_avg_sq": self.exp_avg_sq[name][i].clone()}
        return model, optimizer

    def member_state_dict(self, i: int, train: TrainConfig) -> dict:
        """Member i's optimizer state as make_optimizer's AdamW over its plain model would hold it."""
        return self.member(i, train)[1].state_dict()

    def load_member(self, i: int, train: TrainConfig, state: dict) -> None:
        """Take member i's optimizer state from a plain AdamW state dict (of make_optimizer's layout)."""
        model, optimizer = self._plain(i, train)
        optimizer.load_state_dict(state)
        self.load_plain(i, model, optimizer)

    @torch.no_grad()
    def load_plain(self, i: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Take member i's optimizer state from `optimizer`, an AdamW over `model` (a plain twin of the pack's)."""
        params = dict(model.named_parameters())
        loaded = [optimizer.state.get(params[name], {}) for name in self.params]
        self.step_count[i] = float(loaded[0]["step"]) if loaded[0] else 0.0
        for name, entry in zip(self.params, loaded):
            self.exp_avg[name][i] = entry["exp_avg"] if entry else 0.0
            self.exp_avg_sq[name][i] = entry["exp_avg_sq"] if entry else 0.0

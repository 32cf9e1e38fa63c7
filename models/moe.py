"""Mixture-of-experts FFN: routing, capacity, sorted dispatch through grouped products, router statistics.

Shapes stay static and nothing waits on the host in the grouped path, so `torch.compile` takes the
layer whole. Capacity therefore changes which tokens an expert *serves* (the model), not the compute:
a dropped assignment still flows through its expert but gets combine weight 0, so it adds nothing to
the output and no gradient to the expert or the router. Tokens are served first come, first served
in token order (a stable sort by expert), as in Switch.

Expert parallelism (`MoE.shard_experts`, runtime.expert_parallel in a gang of W ranks): each rank keeps E/W of
the experts and sends every routed row to the rank holding its expert (all-to-all), and the outputs back. Routing
and capacity stay per rank, over that rank's own tokens, exactly as without it (each rank of a data-parallel gang
routes its own micro-batch), so the layer computes the same function: only where the expert products run moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from models.config import MoEConfig
from models.layers import SwiGLU, compute_dtype
from models.swiglu import swiglu

Dispatch = Literal["auto", "grouped", "loop"]
HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


@dataclass(frozen=True)
class Routing:
    """Per token (rows) and routing slot (columns): the chosen expert and its combine weight."""

    # Shapes of one layer; a pack's (models.packed) have a leading member axis [K, ...], and its members'
    # experts are distinct groups for the sort and the dispatch (member m's expert e is group m * E + e).
    expert: torch.Tensor  # [N, k] int64
    weight: torch.Tensor  # [N, k] float32, 0 where the assignment was dropped
    kept: torch.Tensor  # [N, k] bool
    probs: torch.Tensor  # [N, n_experts] float32, router probabilities summing to 1 per token
    order: torch.Tensor  # [N*k] the flattened assignments sorted stably by (member and) expert
    counts: torch.Tensor  # [n_experts] int64 assignments per expert (before capacity)


def router_scores(logits: torch.Tensor, gate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores the top-k is taken over and weights come from, probabilities summing to 1 per token)."""
    if gate == "softmax":
        probs = logits.softmax(dim=-1)
        return probs, probs
    scores = logits.sigmoid()
    return scores, scores / scores.sum(dim=-1, keepdim=True)


def capacity(n_tokens: int, k: int, n_experts: int, capacity_factor: float | None) -> int:
    """Assignments one expert serves at most: ceil(factor * tokens * k / experts); all when dropless."""
    if capacity_factor is None:
        return n_tokens * k
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def sort_by_expert(expert: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the flattened [N*k] assignments sorted stably by expert, assignments per expert)."""
    flat = expert.reshape(-1)
    counts = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    return torch.argsort(flat, stable=True), counts


def position_in_expert(sorted_expert: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """For each sorted assignment, how many assignments to the same expert come before it."""
    starts = torch.cumsum(counts, 0) - counts
    return torch.arange(sorted_expert.numel(), device=sorted_expert.device) - starts[sorted_expert]


def route(logits: torch.Tensor, cfg: MoEConfig, training: bool) -> Routing:
    """Top-(k*G) routing of fp32 router logits [N, E*G] (or [K, N, E*G], each member's tokens routed among
    its own experts), with noise, renormalisation and capacity."""
    *members, n_tokens, n_experts = logits.shape
    k = cfg.top_k * cfg.granularity
    if training and cfg.noise_std > 0:
        logits = logits + cfg.noise_std * torch.randn_like(logits)
    scores, probs = router_scores(logits, cfg.gate)
    weight, expert = scores.topk(k, dim=-1)
    if cfg.renormalize:
        weight = weight / weight.sum(dim=-1, keepdim=True)
    group = expert
    if members:
        (n_members,) = members
        group = expert + n_experts * torch.arange(n_members, device=expert.device).view(-1, 1, 1)
    order, counts = sort_by_expert(group, n_experts * math.prod(members))
    limit = capacity(n_tokens, k, n_experts, cfg.capacity_factor)
    kept_sorted = position_in_expert(group.reshape(-1)[order], counts) < limit
    kept = torch.empty_like(kept_sorted).scatter_(0, order, kept_sorted).view_as(expert)
    return Routing(expert=expert, weight=torch.where(kept, weight, 0.0), kept=kept, probs=probs, order=order,
                   counts=counts.view(*members, n_experts))


def balance_loss(routing: Routing) -> torch.Tensor:
    """Switch load-balancing loss: n_experts * sum_i f_i * P_i, f_i the share of assignments routed to
    expert i (before capacity), P_i its mean router probability. 1 when routing is uniform."""
    share = routing.counts.float() / (routing.expert.shape[-2] * routing.expert.shape[-1])  # per member
    return share.shape[-1] * torch.sum(share * routing.probs.mean(dim=-2), dim=-1)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean squared log-partition of the router logits."""
    return torch.logsumexp(logits, dim=-1).square().mean(dim=-1)


def experts_grouped(x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over rows of x sorted by expert, one grouped product per projection, no host sync."""
    offsets = torch.cumsum(counts, 0).to(torch.int32)
    gate_up = torch._grouped_mm(x, w_gate_up.transpose(-2, -1), offs=offsets)
    return torch._grouped_mm(swiglu(gate_up), w_down.transpose(-2, -1), offs=offsets)


def experts_loop(x: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The same, one expert at a time: the CPU fallback and the reference (reads counts on the host)."""
    outs = []
    for i, rows in enumerate(x.split(counts.tolist())):
        outs.append(F.linear(swiglu(F.linear(rows, w_gate_up[i])), w_down[i]))
    return torch.cat(outs)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single whose backward sends each row's gradient back to where the row came from."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, to: list[int], came: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        ctx.splits, ctx.group = (to, came), group
        out = x.new_empty(sum(came), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), came, to, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        to, came = ctx.splits
        return _AllToAll.apply(grad, came, to, ctx.group), None, None, None


@torch.compiler.disable  # split sizes are host numbers: torch.compile takes the layer up to here and on after
def experts_parallel(rows: torch.Tensor, counts: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor,
                     experts, group: dist.ProcessGroup) -> torch.Tensor:
    """`experts` over rows sorted by expert (counts [E]: all E experts) computed where the experts are: rank r
    of W holds the E/W experts from r*E/W on (w_gate_up, w_down are its own), so the rows of rank r's experts are
    one contiguous run; it gets them from every rank, and gives each rank its outputs back, in its order. Both
    exchanges are differentiable: the backward sends each row's gradient home and brings the experts the
    gradients of every rank's rows."""
    world, local = dist.get_world_size(group), w_gate_up.shape[0]
    received = torch.empty_like(counts)  # [W sources, local experts]: rows each rank sends to each of mine
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(world, local)
    sent, got = counts.view(world, local).sum(1).tolist(), received.sum(1).tolist()
    x = _AllToAll.apply(rows, sent, got, group)
    # They arrive by source rank, then by expert: sort them stably by expert (sources in rank order) to compute.
    expert = torch.arange(local, device=x.device).repeat(world).repeat_interleave(received.reshape(-1))
    order = torch.argsort(expert, stable=True)
    out = experts(x[order], received.sum(0), w_gate_up, w_down)
    out = torch.empty_like(out).index_copy_(0, order, out)
    return _AllToAll.apply(out, got, sent, group)


class MoE(nn.Module):
    """FFN replaced by E*G routed SwiGLU experts of width d_ff/G (top_k*G per token) plus shared ones."""

    def __init__(self, d_model: int, d_ff: int, cfg: MoEConfig, dispatch: Dispatch = "auto"):
        super().__init__()
        self.cfg, self.dispatch = cfg, dispatch
        n_experts, width = cfg.n_experts * cfg.granularity, d_ff // cfg.granularity
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # Expert weights stored like nn.Linear weights, [experts, out, in]; gate and up fused.
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, 2 * width, d_model))
        self.w_down = nn.Parameter(torch.empty(n_experts, d_model, width))
        # n_shared always-active experts of width d_ff/G are one SwiGLU n_shared times as wide.
        self.shared = SwiGLU(d_model, cfg.n_shared * width) if cfg.n_shared else None
        self.expert_group: dist.ProcessGroup | None = None  # set by shard_experts

    def shard_experts(self, mesh: DeviceMesh) -> None:
        """Keep this rank's E/W experts of the W ranks of `mesh`, as DTensors sharded on the expert dim (DCP
        saves the whole tensor from the shards, and reshards on load for any W, or none); every rank must hold
        the same full weights when called (the same seed). Forward then exchanges rows (experts_parallel)."""
        from torch.distributed.tensor import DTensor, Shard

        for name in ("w_gate_up", "w_down"):
            local = getattr(self, name).detach().chunk(mesh.size())[mesh.get_local_rank()].clone()
            setattr(self, name, nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False)))
        self.expert_group = mesh.get_group()

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped"
        aligned = all(s % 8 == 0 for s in self.w_down.shape[-2:])  # grouped kernels need 16-byte rows
        return HAS_GROUPED_MM and x.is_cuda and aligned and compute_dtype(x) == torch.bfloat16

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] as the rows routing sees: [N, d] (a pack's: [K, N, d], models.packed)."""
        return x.reshape(-1, x.shape[-1])

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 router logits of tokens(x)."""
        return F.linear(x.float(), self.router.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(output like x, weighted auxiliary loss, detached router statistics); x [..., d] (a pack's [K, ..., d]:
        then the loss and statistics are one per member)."""
        shape = x.shape
        x = self.tokens(x)
        with torch.autocast(x.device.type, enabled=False):  # routing in fp32: small logits differences decide
            logits = self.router_logits(x)
        routing = route(logits, self.cfg, self.training)
        order, counts, k = routing.order, routing.counts.reshape(-1), routing.expert.shape[-1]
        dtype = compute_dtype(x)
        # Cast before the k-fold gather, not after; index_select's backward is an index_add (advanced
        # indexing's would sort the indices again on CUDA).
        rows = torch.index_select(x.reshape(-1, shape[-1]).to(dtype), 0, order // k)
        # [E, out, in]; a pack's [K, E, out, in] as K * E experts; this rank's E/W when sharded
        w_gate_up, w_down = (w.to_local() if self.expert_group else w for w in (self.w_gate_up, self.w_down))
        w_gate_up, w_down = (w.reshape(-1, *w.shape[-2:]).to(dtype) for w in (w_gate_up, w_down))
        experts = experts_grouped if self._grouped(x) else experts_loop
        if self.expert_group is None:
            out = experts(rows, counts, w_gate_up, w_down)
        else:
            out = experts_parallel(rows, counts, w_gate_up, w_down, experts, self.expert_group)
        unsorted = torch.empty_like(out).index_copy_(0, order, out).view(-1, k, out.shape[-1])
        y = (unsorted * routing.weight.reshape(-1, k).to(unsorted.dtype).unsqueeze(-1)).sum(dim=1)  # not a product to count
        if self.shared is not None:
            y = y + self.shared(x).reshape(y.shape)
        balance, z = balance_loss(routing), z_loss(logits)
        aux = self.cfg.aux_loss_weight * balance + self.cfg.z_loss_weight * z
        return y.reshape(shape).to(x.dtype), aux, router_stats(routing, balance, z)


def router_stats(routing: Routing, balance: torch.Tensor, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """load_max: the busiest expert's share of assignments times the expert count (1 = balanced);
    load_cv: coefficient of variation of the shares; dropped_frac: assignments over capacity."""
    load = routing.counts.float() / (routing.expert.shape[-2] * routing.expert.shape[-1])  # per member
    stats = {
        "load_max": load.amax(dim=-1) * load.shape[-1],
        "load_cv": load.std(dim=-1, correction=0) / load.mean(dim=-1),
        "dropped_frac": 1.0 - routing.kept.float().flatten(-2).mean(dim=-1),
        "balance_loss": balance,
        "z_loss": z,
    }
    return {name: value.detach() for name, value in stats.items()}

"""One trial trained by a group of processes (torch.distributed): the model wrapped, each rank's share of a
batch, and the numbers the ranks must agree on.

Every rank reads its own contiguous slice of each global batch (rank r of W the sequences r*S/W .. (r+1)*S/W - 1
of the S the single process reads), cuts it into micro-batches, and the wrapper averages gradients over the
ranks: the step is the single process's step on the same tokens, up to the order of float sums. Losses and
evaluations are averaged over the group, so every rank sees the same curve and takes the same decisions
(divergence, pruning, forks); rank 0 alone logs.

Under runtime.expert_parallel an MoE model's experts are not data-parallel: each rank keeps E/W of them
(models.moe.MoE.shard_experts, DTensors sharded on the expert dim) and the wrapper leaves them alone; the
all-to-all brings each expert the gradient of every rank's tokens.

At world size 1 there is no process group, nothing is wrapped and no collective runs: the single-process
trainer is the same code at the same speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from models.moe import MoE
from sweeps.trial import Runtime, expert_shards


@dataclass(frozen=True)
class Group:
    """This process's place in the trial's process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where small collectives run: the GPU under NCCL

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The group's mean of `values` (elementwise); `values` itself at world size 1."""
        return self.sum(values) / self.world if self.world > 1 else values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)  # SUM: gloo has no AVG
        return values

    def from_main(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (a decision only rank 0 can take, such as the pruner's)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(value, src=0)
        return bool(value.item())

    def gather(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def current() -> Group:
    """The group this process trains in: the default process group when one is set up (Ray Train does)."""
    if dist.is_available() and dist.is_initialized():
        nccl = dist.get_backend() == "nccl"
        return Group(dist.get_rank(), dist.get_world_size(),
                     torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu"))
    return Group()


def wrap(model: nn.Module, runtime: Runtime, device: torch.device, group: Group) -> nn.Module:
    """What the trainer calls forward on: `model` itself at world size 1; else DDP around it, or FSDP2 sharding
    applied to it in place (each block a unit, then the rest), bf16 compute with fp32 reduction on CUDA; the
    experts sharded first under expert parallelism (shard_experts), and left out of either wrapper.

    MoE experts that got no tokens in a micro-batch get no gradient: DDP is told to look for them."""
    if group.world == 1:
        return model
    mesh = init_device_mesh(device.type, (group.world,))
    experts = shard_experts(model, mesh) if expert_shards(model.cfg.moe, runtime, group.world) > 1 else set()
    if runtime.parallel == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        names = [name for name, p in model.named_parameters() if p in experts]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   find_unused_parameters=model.cfg.family == "moe")
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for block in model.blocks:  # one mesh with the experts': their DTensors and FSDP's meet in clipping
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=experts)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts)
    return model


def shard_experts(model: nn.Module, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Expert parallelism over the ranks of `mesh` in every MoE layer; returns the expert parameters.

    DDP and FSDP average the gradients of the rest over the ranks (each rank's loss is the mean over its own
    tokens); an expert's gradient arrives as the sum over every rank's tokens, so it is divided by W to be
    that same average."""
    experts = set()
    for layer in model.modules():
        if isinstance(layer, MoE):
            layer.shard_experts(mesh)
            for p in (layer.w_gate_up, layer.w_down):
                p.register_hook(lambda grad: grad / mesh.size())
                experts.add(p)
    return experts


def rank_slice(seqs: int, group: Group) -> tuple[int, int]:
    """(first, count) of this rank's sequences among the `seqs` of a global batch (count divides evenly)."""
    count = seqs // group.world
    return group.rank * count, count


def val_share(batches: list, group: Group) -> list:
    """This rank's share of the validation batches: the same number of batches on every rank (FSDP needs every
    rank in every forward), made by cutting the set into a multiple of W pieces of near-equal size."""
    if group.world == 1:
        return batches
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    per_rank = -(-len(batches) // group.world)
    pieces = min(per_rank, len(x) // group.world) * group.world
    return list(zip(x.tensor_split(pieces)[group.rank::group.world], y.tensor_split(pieces)[group.rank::group.world]))

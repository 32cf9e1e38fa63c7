"""K dense decoders of one shape trained as one stacked model: a pack (issue 19).

Every parameter of models.model.Transformer gets a leading member axis [K, ...] under the same name, so a
member goes in and out as a plain Transformer state dict (`from_members`, `member_state_dict`,
`load_member`) and checkpoints keep the plain format. Linear layers are batched matrix products over the
member axis; norms, RoPE and attention fold the members into the batch (SDPA sees [K*B, H, T, hd]); the
embedding gathers from the members' tables laid end to end; the loss is each member's own mean (a [K]
vector), so the gradient of its sum is, for every member, exactly that member's gradient.

Why explicit stacked modules rather than torch.func.stack_module_state + vmap(functional_call): measured on
the CPU (fp32, eager, one thread, K 8 members of d64 x 2 layers, 8 x 64 tokens each), both give each member's
gradients exactly, and a forward and backward took 0.57 s here against 0.63 to 0.69 s under vmap, which has
no batching rule for SDPA's CPU kernel (it falls back to a loop over members) and refuses the chunked loss's
autograd.Function (models.loss: it would need setup_context and a vmap rule). bmm and folding are plain ops
that eager and torch.compile take as they are; the stacked-model probe measured this form at 3-9x one
model's tokens/s on an H200 (shared/FACTS.md).

MoE layers route each member's tokens among its own experts: one sorted dispatch through K * E experts
(`torch._grouped_mm` on the GPU), the member folded into the expert index. Noisy top-k is refused: a pack
cannot draw the router noise each member would draw alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.accounting import is_moe_layer
from models.config import ModelConfig, MoEConfig
from models.layers import apply_rope, compute_dtype, rope_tables
from models.loss import linear_cross_entropy
from models.model import ModelOutput, Transformer
from models.moe import MoE
from models.swiglu import swiglu


class PackedLinear(nn.Module):
    """K bias-free linear layers: x [K, ..., in] -> [K, ..., out]; weight [K, out, in] as nn.Linear's."""

    def __init__(self, k: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, d_out, d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, *middle, d_in = x.shape  # under autocast, bmm runs in its dtype as nn.Linear would
        return torch.bmm(x.reshape(k, -1, d_in), self.weight.transpose(1, 2)).view(k, *middle, -1)


class PackedRMSNorm(nn.Module):
    """K RMSNorms (nn.RMSNorm's eps: the dtype's machine epsilon): x [K, ..., d], weight [K, d]."""

    def __init__(self, k: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(k, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gain = self.weight.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
        return (F.rms_norm(x, (x.shape[-1],)) * gain).type_as(x)  # x's dtype, as nn.RMSNorm gives under autocast


class PackedAttention(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = PackedLinear(k, cfg.d_model, 3 * cfg.d_model)
        self.out = PackedLinear(k, cfg.d_model, cfg.d_model)
        cos, sin = rope_tables(cfg.seq_len, cfg.head_dim, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K, B, T, D = x.shape
        q, k, v = self.qkv(x).view(K * B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:T], self.sin[:T]
        y = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(K, B, T, D))


class PackedSwiGLU(nn.Module):
    def __init__(self, k: int, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = PackedLinear(k, d_model, 2 * hidden)
        self.down = PackedLinear(k, hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(swiglu(self.gate_up(x)))


class PackedMoE(MoE):
    """K MoE layers: models.moe's routing and dispatch with each member's tokens routed among its own experts
    (member m's expert e is group m * E + e of one sorted dispatch through K * E experts)."""

    def __init__(self, k: int, d_model: int, d_ff: int, cfg: MoEConfig):
        super().__init__(d_model, d_ff, cfg)
        n_experts, width = cfg.n_experts * cfg.granularity, d_ff // cfg.granularity
        self.router = PackedLinear(k, d_model, n_experts)
        self.w_gate_up = nn.Parameter(torch.empty(k, n_experts, 2 * width, d_model))
        self.w_down = nn.Parameter(torch.empty(k, n_experts, d_model, width))
        self.shared = PackedSwiGLU(k, d_model, cfg.n_shared * width) if cfg.n_shared else None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, x.shape[-1])

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x.float(), self.router.weight.float().transpose(1, 2))


class PackedBlock(nn.Module):
    def __init__(self, k: int, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.ffn_norm = PackedRMSNorm(k, cfg.d_model), PackedRMSNorm(k, cfg.d_model)
        self.attn = PackedAttention(k, cfg)
        moe = is_moe_layer(cfg, layer)
        self.ffn = PackedMoE(k, cfg.d_model, cfg.d_ff, cfg.moe) if moe else PackedSwiGLU(k, cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.ffn, PackedMoE):
            y, aux, stats = self.ffn(self.ffn_norm(x))
            return x + y, aux, stats
        return x + self.ffn(self.ffn_norm(x)), None, {}


class PackedEmbedding(nn.Module):
    """K embedding tables [K, V, d]; member k's ids index the k-th table of the tables laid end to end."""

    def __init__(self, k: int, vocab: int, d: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, vocab, d))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        k, vocab = self.weight.shape[:2]
        offsets = torch.arange(k, device=idx.device).view(k, *([1] * (idx.dim() - 1))) * vocab
        return F.embedding(idx + offsets, self.weight.flatten(0, 1))


class PackedTransformer(nn.Module):
    """K members of one ModelConfig. forward(idx [K, B, T], targets [K, B, T]): loss, aux loss and router
    statistics are each member's, [K]."""

    def __init__(self, cfg: ModelConfig, k: int):
        super().__init__()
        if cfg.moe is not None and cfg.moe.noise_std > 0:
            raise ValueError(f"model.moe.noise_std {cfg.moe.noise_std}: a pack cannot draw each member's own "
                             "router noise; set noise_std 0 or runtime.pack off")
        self.cfg, self.k = cfg, k
        self.loss_chunk: int | None = None  # as Transformer.loss_chunk and bf16_residual: how it runs
        self.bf16_residual = False
        self.embed = PackedEmbedding(k, cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(PackedBlock(k, cfg, i) for i in range(cfg.n_layers))
        self.norm = PackedRMSNorm(k, cfg.d_model)
        self.head = PackedLinear(k, cfg.d_model, cfg.vocab_size)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    @classmethod
    def from_members(cls, models: list[Transformer]) -> PackedTransformer:
        """A pack holding copies of `models` (same config), member i = models[i]."""
        packed = cls(models[0].cfg, len(models)).to(next(models[0].parameters()).device)
        for i, model in enumerate(models):
            packed.load_member(i, model.state_dict())
        return packed

    def member_state_dict(self, i: int) -> dict[str, torch.Tensor]:
        """Member i as a plain Transformer's state dict (copies)."""
        return {name: tensor[i].clone() for name, tensor in self.state_dict().items()}

    @torch.no_grad()
    def load_member(self, i: int, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        if own.keys() != state.keys():
            raise ValueError(f"not a {self.cfg.family} member of this shape: keys differ by "
                             f"{sorted(own.keys() ^ state.keys())[:4]}")
        for name, tensor in own.items():
            tensor[i].copy_(state[name])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        x = self.embed(idx)
        if self.bf16_residual:
            x = x.to(compute_dtype(x))
        aux = torch.zeros(self.k, device=idx.device)
        router: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, layer_aux, stats = block(x)
            if layer_aux is not None:
                aux = aux + layer_aux
            router |= {f"layer{i}/{name}": value for name, value in stats.items()}
        x = self.norm(x)
        K, B, T, D = x.shape
        if targets is not None and self.loss_chunk and torch.is_grad_enabled():
            loss = linear_cross_entropy(x.view(K, B * T, D), self.head.weight, targets.reshape(K, -1), self.loss_chunk)
            return ModelOutput(logits=None, loss=loss, aux_loss=aux, router=router)
        logits = self.head(x)
        loss = None
        if targets is not None:
            per_token = F.cross_entropy(logits.float().flatten(0, 2), targets.reshape(-1), reduction="none")
            loss = per_token.view(K, -1).mean(1)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, router=router)


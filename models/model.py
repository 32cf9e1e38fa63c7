"""The decoder: pre-norm blocks of attention and a dense or MoE FFN, built from a ModelConfig."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from models.accounting import is_moe_layer
from models.config import ModelConfig
from models.layers import Attention, SwiGLU, compute_dtype
from models.loss import linear_cross_entropy, plain_cross_entropy
from models.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None when a training loss was computed in chunks (loss_chunk)
    loss: torch.Tensor | None  # cross-entropy, nats per token, mean over tokens; None without targets
    aux_loss: torch.Tensor  # weighted MoE balance + z-loss over MoE layers; 0 for dense
    router: dict[str, torch.Tensor] = field(default_factory=dict)  # "layer{i}/{stat}": detached scalars


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.seq_len, cfg.rope_theta)
        self.ffn = MoE(cfg.d_model, cfg.d_ff, cfg.moe) if is_moe_layer(cfg, layer) else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        x = x + self.attn(self.attn_norm(x))
        if isinstance(self.ffn, MoE):
            y, aux, stats = self.ffn(self.ffn_norm(x))
            return x + y, aux, stats
        return x + self.ffn(self.ffn_norm(x)), None, {}


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, init_std: float = 0.02):
        super().__init__()
        self.cfg = cfg
        # How it runs, not what it computes, so not part of the config. loss_chunk: tokens per chunk of the
        # fused head and loss in training (models.loss); None: full logits. bf16_residual: the residual
        # stream in autocast's dtype, as the other activations, rather than in the parameters' fp32.
        self.loss_chunk: int | None = None
        self.bf16_residual = False
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self._init(init_std)

    def use_flash4(self, on: bool) -> None:
        """Attention through FlashAttention-4 (models.flash4) rather than SDPA; how it runs, not what."""
        for block in self.blocks:
            block.attn.flash4 = on

    @torch.no_grad()
    def _init(self, std: float) -> None:
        """normal(0, std) everywhere; projections into the residual stream scaled by 1/sqrt(2 n_layers)
        so the residual's variance does not grow with depth (GPT-2)."""
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # RMSNorm gains
            else:
                into_residual = name.endswith(("attn.out.weight", "down.weight", "w_down"))
                nn.init.normal_(p, mean=0.0, std=residual_std if into_residual else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        x = self.embed(idx)
        if self.bf16_residual:  # the residual adds and norms move half the bytes; without autocast, a no-op
            x = x.to(compute_dtype(x))
        aux = torch.zeros((), device=idx.device)
        router: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x, layer_aux, stats = block(x)
            if layer_aux is not None:
                aux = aux + layer_aux
            router |= {f"layer{i}/{name}": value for name, value in stats.items()}
        x = self.norm(x)
        if targets is not None and self.loss_chunk and torch.is_grad_enabled():
            loss = linear_cross_entropy(x.flatten(0, 1), self.head.weight, targets.reshape(-1), self.loss_chunk)
            return ModelOutput(logits=None, loss=loss, aux_loss=aux, router=router)
        logits = self.head(x)
        loss = None if targets is None else plain_cross_entropy(logits, targets)
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, router=router)


def build_model(cfg: ModelConfig, init_std: float = 0.02) -> Transformer:
    return Transformer(cfg, init_std=init_std)

"""Typed, frozen model configurations: what `models.build_model` builds and `models.accounting` counts.

A ModelConfig is part of a trial's identity (it is hashed into the trial id), so every field that
changes the network is here and nothing that only changes how it runs (device, dtype, compile).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Frozen(BaseModel):
    """Base for every config: immutable, hashable, and strict about unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class MoEConfig(Frozen):
    """Mixture-of-experts options for the FFN. Expert hidden size is ModelConfig.d_ff // granularity."""

    n_experts: int = Field(8, ge=1, description="E routed experts before granularity (E*G experts in all)")
    top_k: int = Field(2, ge=1, description="experts per token before granularity (top_k*G active)")
    granularity: int = Field(1, ge=1, description="G: fine-grained experts, each d_ff/G wide")
    n_shared: int = Field(0, ge=0, description="shared experts (always active), each d_ff/G wide")
    every: int = Field(1, ge=1, description="MoE in every k-th layer (the rest dense FFN)")
    gate: Literal["softmax", "sigmoid"] = "softmax"
    renormalize: bool = Field(True, description="renormalise the top-k gate weights to sum to 1")
    noise_std: float = Field(0.0, ge=0.0, description="noisy top-k gating: std of logit noise in training")
    capacity_factor: float | None = Field(None, gt=0.0, description="None = dropless")
    aux_loss_weight: float = Field(0.01, ge=0.0, description="Switch load-balancing loss weight")
    z_loss_weight: float = Field(0.001, ge=0.0, description="router z-loss weight")

    @model_validator(mode="after")
    def _top_k_fits(self) -> MoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k {self.top_k} > n_experts {self.n_experts}; choose top_k <= n_experts")
        return self


class ModelConfig(Frozen):
    """A LLaMA-style decoder. family 'moe' needs `moe`; 'dense' must not have it."""

    family: Literal["dense", "moe"] = "dense"
    d_model: int = Field(ge=8)
    n_layers: int = Field(ge=1)
    n_heads: int = Field(ge=1)
    d_ff: int = Field(ge=8, description="SwiGLU hidden size (per expert before granularity for MoE)")
    vocab_size: int = Field(ge=2)
    seq_len: int = Field(ge=2)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    moe: MoEConfig | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.family == "moe" and self.moe is None:
            raise ValueError("family 'moe' needs a 'moe' section")
        if self.family == "dense" and self.moe is not None:
            raise ValueError("family 'dense' takes no 'moe' section; set family: moe")
        if self.moe is not None and self.d_ff % self.moe.granularity:
            raise ValueError(f"d_ff {self.d_ff} is not divisible by granularity {self.moe.granularity}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_experts(self) -> int:
        """E as the MoE law uses it: routed experts before granularity; 1 for dense."""
        return self.moe.n_experts if self.moe else 1

"""The MoE step benchmark's dense twin has the MoE's active parameters, less the router."""

from __future__ import annotations

import pytest

from models import count_params
from models.config import ModelConfig, MoEConfig
from runners.bench.step import dense_twin


@pytest.mark.parametrize("moe", [MoEConfig(n_experts=8, top_k=2), MoEConfig(n_experts=4, top_k=1, granularity=2, n_shared=1)])
def test_dense_twin_has_the_active_parameters_of_the_moe(moe):
    cfg = ModelConfig(family="moe", d_model=64, n_layers=2, n_heads=2, d_ff=256, vocab_size=256, seq_len=32, moe=moe)
    router = cfg.n_layers * cfg.d_model * moe.n_experts * moe.granularity
    assert count_params(dense_twin(cfg)).active == count_params(cfg).active - router

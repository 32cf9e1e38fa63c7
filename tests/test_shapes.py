"""The kaplan-aspect shape rules: admissible shapes, closest N, the 4-layer floor, and their errors."""

from __future__ import annotations

import math

import pytest

from models import SHAPE_RULES, ModelConfig, MoEConfig, count_params, shape_for_target

RULE = "kaplan-aspect"
FINE_MOE = MoEConfig(n_experts=8, top_k=2, granularity=2, n_shared=1, every=2)


def shape(target: float, **kwargs) -> ModelConfig:
    return shape_for_target(target, rule=RULE, vocab_size=256, seq_len=128, **kwargs)


@pytest.mark.parametrize("family,moe", [("dense", None), ("moe", MoEConfig(n_experts=8, top_k=1)), ("moe", FINE_MOE)])
@pytest.mark.parametrize("target", [1e4, 3e4, 1e5, 1e6, 1e7, 1e8, 1e9])
def test_reaches_the_target_with_an_admissible_shape(target, family, moe):
    cfg = shape(target, family=family, moe=moe)
    n = count_params(cfg).active
    assert abs(math.log(n / target)) < (0.4 if target < 1e5 else 0.1)  # coarse only for one-layer shapes
    assert cfg.family == family and cfg.moe == moe and cfg.vocab_size == 256 and cfg.seq_len == 128
    assert cfg.d_model < 32 or 32 <= cfg.d_model / cfg.n_layers <= 128
    assert cfg.head_dim in (32, 64) or cfg.n_heads == 2
    granularity = moe.granularity if moe else 1
    assert cfg.d_ff % granularity == 0 and (cfg.d_ff // granularity) % 8 == 0
    assert abs(cfg.d_ff / (8 / 3 * cfg.d_model) - 1) < 0.35


def test_tiny_targets_give_cpu_sized_models():
    for target in (1e3, 3e3):
        cfg = shape(target)
        assert cfg.n_layers == 1 and cfg.d_model <= 16
        assert abs(math.log(count_params(cfg).nonembed / target)) < math.log(2)


def test_no_admissible_shape_is_closer_than_the_chosen_one():
    """Brute force over every admissible dense shape up to d_model 256."""
    target = 2.5e5
    chosen = count_params(shape(target)).nonembed
    best = math.inf
    for d_model in [*range(8, 64, 8), *range(64, 257, 32)]:
        n_heads = 2 if d_model < 64 else d_model // 32
        d_ff = max(8, round(8 / 3 * d_model / (8 if d_model < 64 else 32)) * (8 if d_model < 64 else 32))
        depths = [1] if d_model < 32 else range(math.ceil(d_model / 128), d_model // 32 + 1)
        for n_layers in depths:
            cfg = ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff, vocab_size=256, seq_len=128)
            best = min(best, abs(math.log(count_params(cfg).nonembed / target)))
    assert abs(math.log(chosen / target)) <= best + 0.02


def test_sizes_increase_with_the_target_and_are_distinct():
    targets = [1.2e4 * 1.5**i for i in range(5)]  # the quickstart's range
    sizes = [count_params(shape(t)).nonembed for t in targets]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)


def test_tied_embeddings_pass_through_and_do_not_change_n():
    assert shape(1e6, tie_embeddings=True).tie_embeddings
    assert count_params(shape(1e6, tie_embeddings=True)).nonembed == count_params(shape(1e6)).nonembed


@pytest.mark.parametrize("target", [1e4, 1e5, 3e5, 1e6, 3e6, 1e8])
def test_the_min4_rule_never_goes_below_four_layers_and_still_reaches_the_target(target):
    cfg = shape_for_target(target, rule="kaplan-aspect-min4", vocab_size=256, seq_len=128)
    assert cfg.n_layers >= 4 and abs(math.log(count_params(cfg).active / target)) < 0.25  # width steps of 32 at 4-6 layers
    plain = shape(target)
    if plain.n_layers >= 4:  # where the aspect band already gives 4 layers or more, the two rules agree
        assert cfg == plain


def test_errors_name_the_fix():
    assert SHAPE_RULES == ("kaplan-aspect", "kaplan-aspect-min4")
    with pytest.raises(KeyError, match="known rules: kaplan-aspect, kaplan-aspect-min4"):
        shape_for_target(1e6, rule="nope", vocab_size=256, seq_len=128)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="positive finite"):
            shape(bad)
    with pytest.raises(ValueError, match="more than 2x"):
        shape(10.0)
    with pytest.raises(ValueError, match="more than 2x"):
        shape(1e20)
    with pytest.raises(ValueError, match="needs a 'moe' section"):
        shape(1e6, family="moe")

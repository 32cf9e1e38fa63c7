"""Grouping trials into packs: members share the shape of the computation and differ only in optimiser, seed and
unique tokens."""

from __future__ import annotations

import pytest

from models.config import ModelConfig
from sweeps.packs import group_packs, pack_key
from sweeps.trial import DataConfig, ScheduleConfig, TrainConfig, TrialConfig

MODEL = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=259, seq_len=16)


def trial(model: ModelConfig = MODEL, data: DataConfig = DataConfig(), **train) -> TrialConfig:
    return TrialConfig(model=model, data=data, train=TrainConfig(**({"tokens": 4096, "batch_size": 128, "lr": 1e-2} | train)))


@pytest.mark.parametrize("change", [dict(lr=3e-2), dict(seed=1), dict(init_std=0.01), dict(weight_decay=0.0),
                                    dict(beta1=0.8), dict(beta2=0.99), dict(grad_clip=None), dict(spike_threshold=5.0)])
def test_optimiser_and_seed_do_not_split_a_pack(change):
    assert pack_key(trial(**change)) == pack_key(trial())


def test_how_much_data_a_member_repeats_does_not_split_a_pack():
    assert pack_key(trial(data=DataConfig(unique_tokens=2048))) == pack_key(trial())


@pytest.mark.parametrize("other", [
    trial(model=MODEL.model_copy(update={"d_model": 32})), trial(model=MODEL.model_copy(update={"seq_len": 32})),
    trial(data=DataConfig(max_bytes=1000)), trial(tokens=8192), trial(batch_size=256), trial(eval_points=3),
    trial(schedule=ScheduleConfig(kind="wsd")), trial(schedule=ScheduleConfig(kind="wsd", branches=(2048,))),
])
def test_shape_data_and_schedule_split_packs(other):
    assert pack_key(other) != pack_key(trial())


def test_group_packs_is_stable_and_chunked():
    a = [trial(lr=lr) for lr in (1e-3, 2e-3, 3e-3)]
    b = [trial(tokens=8192, seed=s) for s in (0, 1)]
    items = [("a0", a[0]), ("b0", b[0]), ("a1", a[1]), ("a2", a[2]), ("b1", b[1])]
    packs = group_packs(items, key=lambda item: item[1], max_pack=2)
    assert [[name for name, _ in pack] for pack in packs] == [["a0", "a1"], ["a2"], ["b0", "b1"]]
    assert group_packs(a + b, max_pack=16) == [a, b]
    with pytest.raises(ValueError, match="max_pack"):
        group_packs(a, max_pack=0)

"""Learning-rate schedules, WSD branch plans and evaluation points, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from models.config import ModelConfig
from runners.training.schedule import Branch, TrialSetupError, decay_factor, eval_steps, lr_at, plan_trial
from sweeps.trial import DataConfig, Runtime, ScheduleConfig, TrainConfig, TrialConfig

LR = 1e-3


def trial(tokens=100 * 64, batch=64, **schedule) -> TrialConfig:
    model = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=256, seq_len=16)
    train = TrainConfig(tokens=tokens, batch_size=batch, lr=LR, schedule=ScheduleConfig(**schedule))
    return TrialConfig(model=model, data=DataConfig(), train=train)


def lrs(t: TrialConfig, branch: Branch | None = None) -> list[float]:
    plan = plan_trial(t, Runtime())
    return [lr_at(t.train.schedule, LR, plan, s, branch) for s in range(plan.total_steps)]


def test_warmup_reaches_peak_and_cosine_ends_at_floor():
    lr = lrs(trial(kind="cosine", warmup=0.1, min_lr_ratio=0.1))
    assert lr[0] == pytest.approx(LR / 10) and lr[9] == pytest.approx(LR)
    assert lr[-1] == pytest.approx(0.1 * LR)
    # halfway through the cosine the lr is halfway between peak and floor
    assert lr[9 + 45] == pytest.approx(0.1 * LR + 0.9 * LR * 0.5)
    assert all(a >= b for a, b in zip(lr[9:], lr[10:]))


def test_constant_stays_at_peak_after_warmup():
    lr = lrs(trial(kind="constant", warmup=0.05))
    assert lr[4] == lr[-1] == LR


@pytest.mark.parametrize("shape, at_half", [("linear", 0.5), ("1-sqrt", 1 - math.sqrt(0.5)), ("cosine", 0.5)])
def test_wsd_is_stable_then_decays_to_floor(shape, at_half):
    lr = lrs(trial(kind="wsd", warmup=0.0, decay_fraction=0.2, decay_shape=shape, min_lr_ratio=0.0))
    assert lr[0] == lr[79] == LR  # stable through step 79: the decay takes the last 20 of 100 steps
    assert lr[89] == pytest.approx(LR * at_half)  # q = 10/20
    assert lr[99] == 0.0


def test_one_minus_sqrt_drops_faster_than_linear_early():
    assert decay_factor("1-sqrt", 0.25, 0.0) == pytest.approx(0.5)
    assert decay_factor("linear", 0.25, 0.0) == pytest.approx(0.75)
    assert decay_factor("1-sqrt", 1.0, 0.2) == pytest.approx(0.2)


def test_branch_decays_from_its_fork_like_a_run_of_its_length():
    t = trial(kind="wsd", warmup=0.05, decay_fraction=0.2, branches=(40 * 64,))
    plan = plan_trial(t, Runtime())
    (branch,) = plan.branches
    assert (branch.fork_step, branch.end_step) == (32, 40)
    branch_lr = lrs(t, branch)[:40]
    assert branch_lr[31] == LR and branch_lr[32] < LR and branch_lr[39] == pytest.approx(0.1 * LR)
    alone = lrs(trial(tokens=40 * 64, kind="wsd", warmup=5 / 40, decay_fraction=0.2))
    assert branch_lr == pytest.approx(alone)


def test_eval_steps_are_log_spaced_and_end_at_the_end():
    steps = eval_steps(1000, 5)
    assert steps[0] == 50 and steps[-1] == 1000
    ratios = [b / a for a, b in zip(steps, steps[1:])]
    assert max(ratios) / min(ratios) < 1.01
    assert eval_steps(3, 8) == (1, 2, 3) and eval_steps(10, 1) == (10,)


def test_bad_setups_name_the_field():
    with pytest.raises(TrialSetupError, match="micro_batch_size"):
        plan_trial(trial(), Runtime(micro_batch_size=3))
    with pytest.raises(TrialSetupError, match="multiple of model.seq_len"):
        plan_trial(trial(batch=40), Runtime())
    with pytest.raises(TrialSetupError, match="warm-up"):
        plan_trial(trial(kind="wsd", warmup=0.5, branches=(40 * 64,)), Runtime())
    assert plan_trial(trial(), Runtime(micro_batch_size=2)).accum_steps == 2

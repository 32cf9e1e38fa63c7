"""Packs on the sweep side, without Ray: which trials the sweep trains together, what a pack asks of a GPU, and
how `scaling plan` shows it."""

from __future__ import annotations

import pandas as pd
import pytest
from rich.console import Console

from runners import pipeline
from runners.cli import main
from runners.scheduling.resources import member_bytes, pack_capacity, packs, ray_options, tasks
from sweeps.packs import pack_key
from sweeps.spec import load_spec
from tests.helpers import tiny_spec

LR_SEED = {"lr": [1e-3, 3e-3, 1e-2], "seeds": [0, 1]}  # 6 packable trials per model size


def planned(tmp_path, **overrides):
    spec = load_spec(tiny_spec(tmp_path, grid={"sizes": [3000, 12000], "tokens": [20_000]}, train=LR_SEED, **overrides))
    return spec, pipeline.plan(spec)


def test_trials_of_one_shape_pack_up_to_max_pack_in_first_seen_order(tmp_path):
    spec, trials = planned(tmp_path, runtime={"max_pack": 4})
    grouped = packs(trials, lambda p: p, spec.runtime, None)
    assert [len(g) for g in grouped] == [4, 2, 4, 2]
    assert sorted(p.trial_id for g in grouped for p in g) == sorted(p.trial_id for p in trials)
    for g in grouped:
        assert len({pack_key(p.trial) for p in g}) == 1
        assert len({(p.trial.train.lr, p.trial.train.seed) for p in g}) == len(g)  # members differ
    order = [p.trial_id for g in grouped for p in g]
    same_size = [[p.trial_id for p in trials if p.params.active == n] for n in sorted({p.params.active for p in trials})]
    assert all(order.index(ids[0]) < order.index(ids[-1]) for ids in same_size)


def test_pack_off_is_one_task_per_trial_in_the_given_order(tmp_path):
    spec, trials = planned(tmp_path, runtime={"pack": "off"})
    assert packs(trials, lambda p: p, spec.runtime, None) == [[p] for p in trials]


def test_a_gang_is_never_packed(tmp_path):
    """Trials of gpus W >= 2 run as gangs (one process per rank): each is a task of its own, and the plan says K 1."""
    spec, trials = planned(tmp_path, resources={"cpus": 1, "gpus": 2})
    assert tasks(trials, lambda p: p, spec.resources, spec.runtime, None) == [[p] for p in trials]
    assert set(pipeline.plan_table(spec, trials).pack_size) == {1}
    spec, trials = planned(tmp_path)  # the same grid on one process each: packed
    assert tasks(trials, lambda p: p, spec.resources, spec.runtime, None) == packs(trials, lambda p: p, spec.runtime, None)


def test_moe_trials_pack_unless_their_routing_is_noisy(tmp_path):
    spec, trials = planned(tmp_path, model={"family": "moe", "moe": {"n_experts": 4, "top_k": 2}})
    assert [len(g) for g in packs(trials, lambda p: p, spec.runtime, None)] == [6, 6]
    spec, trials = planned(tmp_path, model={"family": "moe", "moe": {"n_experts": 4, "top_k": 2, "noise_std": 0.1}})
    assert {len(g) for g in packs(trials, lambda p: p, spec.runtime, None)} == {1}


def test_a_pack_is_capped_by_gpu_memory_and_asks_for_its_members_memory(tmp_path):
    spec, trials = planned(tmp_path)
    big = max(trials, key=lambda p: p.params.active)
    gpu = int(2.5 * member_bytes(big, spec.runtime))  # room for two members, not three
    assert pack_capacity(big, spec.runtime, gpu) == 2
    assert pack_capacity(big, spec.runtime, None) == spec.runtime.max_pack  # tiny work per step: only max_pack caps
    for k in (1, 2):
        share = ray_options(big, spec.resources, spec.runtime, gpu, members=k)["num_gpus"]
        assert k * member_bytes(big, spec.runtime) / gpu <= share <= 1.0
    assert ray_options(big, spec.resources, spec.runtime, gpu, members=2)["num_gpus"] > \
        ray_options(big, spec.resources, spec.runtime, gpu, members=1)["num_gpus"]
    with pytest.raises(ValueError, match="a pack of 3 .* needs about 1.2 GPUs of memory"):
        ray_options(big, spec.resources, spec.runtime, gpu, members=3)


def test_a_pack_is_capped_by_work_per_step(tmp_path, monkeypatch):
    from runners.scheduling import resources

    spec, trials = planned(tmp_path)
    work = trials[0].flops.train_exact * trials[0].trial.train.batch_size  # one micro-batch: the whole step here
    monkeypatch.setattr(resources, "TARGET_STEP_FLOPS", 3.5 * work)
    assert pack_capacity(trials[0], spec.runtime, None) == 3
    monkeypatch.setattr(resources, "TARGET_STEP_FLOPS", 0.5 * work)
    assert pack_capacity(trials[0], spec.runtime, None) == 1  # a trial too big to pack still runs, alone


def test_plan_shows_packs_in_80_columns_and_in_the_csv(tmp_path, monkeypatch):
    path = tiny_spec(tmp_path, grid={"sizes": [3000, 12000], "tokens": [20_000]}, train=LR_SEED, runtime={"max_pack": 4})
    out = tmp_path / "plan.csv"
    assert main(["plan", str(path), "--format", "csv", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert sorted(table.groupby("pack").size()) == [2, 2, 4, 4]
    assert (table.groupby("pack").pack_size.agg(["min", "max", "size"]).apply(lambda r: r["min"] == r["max"] == r["size"],
                                                                               axis=1)).all()
    assert (table.groupby("pack")[["N_active", "D", "batch_size"]].nunique() == 1).all().all()

    screen = Console(width=80, record=True)
    monkeypatch.setattr(pipeline, "console", screen)
    assert main(["plan", str(path)]) == 0
    text = screen.export_text()
    assert "12 trials in 4 Ray tasks" in text and "…" not in text  # nothing cut to fit
    assert all(len(line) <= 80 for line in text.splitlines())
    assert all(name in text for name in table.name)  # each trial named by what it is (its id is in the CSV)


def test_a_gpu_sweep_planned_without_its_gpu_is_estimated_from_the_declared_peak(tmp_path, monkeypatch):
    """resources.peak_tflops with assumed_mfu: the plan's total is GPU-hours of the exact FLOPs at that rate,
    not CPU minutes; a search's total counts every Optuna trial its rows stand for."""
    resources = {"gpus": 0.25, "peak_tflops": 1.0, "assumed_mfu": 0.5}  # 0.5e12 FLOP/s
    path = tiny_spec(tmp_path, resources=resources)
    spec = load_spec(path)
    table = pipeline.plan_table(spec, pipeline.plan(spec))
    assert table.est_seconds.sum() == pytest.approx(table.flops_exact.sum() / 0.5e12)
    screen = Console(width=200, record=True)
    monkeypatch.setattr(pipeline, "console", screen)
    assert main(["plan", str(path)]) == 0
    assert f"about {table.est_seconds.sum() / 3600:.2g} GPU-hours at 0.5 MFU of 1 TFLOP/s" in screen.export_text()

    search = tiny_spec(tmp_path, name="searched", resources=resources,
                       search={"method": "optuna", "trials": 5, "lr": [1e-3, 1e-2]})
    rows = pipeline.plan_table(load_spec(search), pipeline.plan(load_spec(search)))
    screen = Console(width=200, record=True)
    monkeypatch.setattr(pipeline, "console", screen)
    assert main(["plan", str(search)]) == 0
    assert f"{5 * rows.flops_exact.sum():.3g} FLOPs (exact)" in screen.export_text()

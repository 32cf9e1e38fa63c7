"""A pack trains each member as run_trial trains it alone: same curves, branches, resume, divergence, pruning.

fp32 on the CPU, one thread, test_train's tiny model and data; members differ in lr, seed, init_std and
weight decay, and share a WSD schedule with one decay branch.
"""

from __future__ import annotations

import json

import pytest
import torch

from runners.tracking import names
from runners.training import checkpoint
from runners.training.pack import Member, run_pack
from runners.training.schedule import TrialSetupError
from runners.training.train import run_trial
from tests.test_train import BATCH, CPU, MemorySink, data, make_trial  # noqa: F401 (a fixture)

STEPS, BRANCH = 40, 20 * BATCH
CURVES = (names.TRAIN_LOSS, names.VAL_LOSS, names.VAL_BPB, names.LR, names.FLOPS)


def member_trial(data, **train):
    trial = make_trial(data, STEPS, kind="wsd", decay_fraction=0.2, min_lr_ratio=0.0, branches=(BRANCH,))
    return trial.model_copy(update={"train": trial.train.model_copy(update=train)})


def trials(data):
    return [member_trial(data, lr=1e-2, seed=0), member_trial(data, lr=3e-3, seed=1, weight_decay=0.0),
            member_trial(data, lr=6e-3, seed=2, init_std=0.05)]


def member(trial, workdir, sink=None, on_eval=None) -> Member:
    branch_sinks = {BRANCH: MemorySink()}
    return Member(trial, workdir, sink or MemorySink(), branch_sinks.__getitem__, on_eval)


def alone(trial, workdir, data) -> tuple:
    m = member(trial, workdir)
    result = run_trial(trial, CPU, workdir, m.sink, data=data, branch_sinks=m.branch_sinks)
    return result, m


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread for the module-scoped runs too: a product split over threads rounds differently per shape."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def unpacked(data, tmp_path_factory):
    """Each member trained alone by run_trial."""
    return [alone(trial, tmp_path_factory.mktemp(f"alone{i}"), data) for i, trial in enumerate(trials(data))]


@pytest.fixture(scope="module")
def packed(data, tmp_path_factory):
    members = [member(trial, tmp_path_factory.mktemp(f"member{i}")) for i, trial in enumerate(trials(data))]
    return run_pack(members, CPU, data=data), members


def assert_same_curves(pack_member: Member, twin: Member) -> None:
    for sink, twin_sink in ((pack_member.sink, twin.sink), (pack_member.branch_sinks(BRANCH), twin.branch_sinks(BRANCH))):
        for key in CURVES:
            assert sorted(sink.points[key]) == sorted(twin_sink.points[key]), key
            assert sink.points[key] == pytest.approx(twin_sink.points[key], rel=1e-5, abs=0), key


def test_each_member_reproduces_its_unpacked_curves(packed, unpacked):
    results, members = packed
    for result, m, (twin_result, twin) in zip(results, members, unpacked):
        assert result.status == twin_result.status == names.FINISHED
        assert result.tokens == twin_result.tokens and result.numerics == "fp32, eager, pack of 3"
        assert result.final_val_loss == pytest.approx(twin_result.final_val_loss, rel=1e-5)
        assert [b.val_loss for b in result.branches] == pytest.approx([b.val_loss for b in twin_result.branches], rel=1e-5)
        assert_same_curves(m, twin)
        assert json.loads((m.workdir / "result.json").read_text())["final_val_loss"] == result.final_val_loss
    assert len({r.final_val_loss for r in results}) == 3  # the members did differ


def test_killed_pack_resumes_each_member_packed_or_alone(data, tmp_path, packed):
    reference, _ = packed
    workdirs = [tmp_path / str(i) for i in range(3)]
    first = [member(t, w, sink=MemorySink(stop_at=30 * BATCH) if i == 0 else None)
             for i, (t, w) in enumerate(zip(trials(data), workdirs))]
    with pytest.raises(KeyboardInterrupt):  # as Ray cancels a task: the pack checkpoints every member, then stops
        run_pack(first, CPU, data=data)
    assert all(checkpoint.progress(w, checkpoint.LATEST) is not None for w in workdirs)
    # member 0 goes on alone from its plain checkpoint; then the pack again: member 0 is done (its result
    # returned as it is), the other two go on as a pack
    solo, solo_member = alone(trials(data)[0], workdirs[0], data)
    again = [member(t, w) for t, w in zip(trials(data), workdirs)]
    results = run_pack(again, CPU, data=data)
    assert results[0] == solo and not again[0].sink.points
    for m in (solo_member, *again[1:]):
        assert min(m.sink.points[names.TRAIN_LOSS]) > 30 * BATCH  # from where it stopped, not from the start
    for result, expected in zip(results, reference):
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=1e-5)
        assert result.branches[0].val_loss == pytest.approx(expected.branches[0].val_loss, rel=1e-5)


def test_diverged_and_pruned_members_stop_while_the_others_go_on(data, tmp_path, unpacked):
    evaluations = []

    def prune_second(tokens: int, val_loss: float) -> bool:
        evaluations.append(tokens)
        return len(evaluations) == 2

    good, huge, pruned = trials(data)[0], member_trial(data, lr=50.0, seed=3), trials(data)[1]
    members = [member(good, tmp_path / "good"), member(huge, tmp_path / "huge"),
               member(pruned, tmp_path / "pruned", on_eval=prune_second)]
    results = run_pack(members, CPU, data=data)
    assert results[1].status == names.DIVERGED and "train loss" in results[1].error
    assert max(members[1].sink.points[names.TRAIN_LOSS]) <= results[1].diverged_at_tokens
    assert results[2].status == names.PRUNED and results[2].final_val_loss is None
    assert max(members[2].sink.points[names.TRAIN_LOSS]) == evaluations[1]
    assert [p.name for p in (tmp_path / "huge").iterdir()] == ["result.json"]  # ended: no checkpoint left
    twin_result, twin = unpacked[0]
    assert results[0].final_val_loss == pytest.approx(twin_result.final_val_loss, rel=1e-5)
    assert_same_curves(members[0], twin)


def packed_and_alone(pack_trials, runtime, data, tmp_path):
    """Train the trials as one pack, then each alone: (pack member, its result, its twin, the twin's result)."""
    pack = [member(t, tmp_path / f"member{i}") for i, t in enumerate(pack_trials)]
    results = run_pack(pack, runtime, data=data)
    for i, (trial, m, result) in enumerate(zip(pack_trials, pack, results)):
        twin = member(trial, tmp_path / f"alone{i}")
        yield m, result, twin, run_trial(trial, runtime, twin.workdir, twin.sink, data=data,
                                         branch_sinks=twin.branch_sinks)


def test_moe_members_reproduce_their_unpacked_curves_and_router_statistics(data, tmp_path):
    base = make_trial(data, 20, family="moe", kind="constant")
    moe = [base, base.model_copy(update={"train": base.train.model_copy(update={"lr": 3e-3, "seed": 1})})]
    for m, result, twin, expected in packed_and_alone(moe, CPU, data, tmp_path):
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=1e-5)
        router = [key for key in twin.sink.points if key.startswith(names.ROUTER_PREFIX)]
        assert router and sorted(m.sink.points) == sorted(twin.sink.points)
        for key in (*CURVES[:2], *router):
            assert m.sink.points[key] == pytest.approx(twin.sink.points[key], rel=1e-5, abs=1e-7), key


def test_accumulated_micro_batches_train_each_member_as_alone(data, tmp_path):
    accumulate = CPU.model_copy(update={"micro_batch_size": 4})  # two micro-batches of a step's 8 sequences
    base = make_trial(data, 12, kind="constant")
    pair = [base, base.model_copy(update={"train": base.train.model_copy(update={"lr": 3e-3, "seed": 1})})]
    for m, result, twin, expected in packed_and_alone(pair, accumulate, data, tmp_path):
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=1e-5)
        assert m.sink.points[names.TRAIN_LOSS] == pytest.approx(twin.sink.points[names.TRAIN_LOSS], rel=1e-5)


def test_members_that_repeat_different_amounts_of_data_train_each_as_alone(data, tmp_path):
    """data.unique_tokens is a member's own: one repeats 3 steps' worth of windows (4 epochs in 12 steps),
    one reads the whole split; each sees its own batches and epochs, and both the same validation set."""
    base = make_trial(data, 12, kind="constant")
    repeats = base.model_copy(update={"data": base.data.model_copy(update={"unique_tokens": 3 * BATCH}),
                                      "train": base.train.model_copy(update={"seed": 1})})
    runs = list(packed_and_alone([base, repeats], CPU, data, tmp_path))
    for m, result, twin, expected in runs:
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=1e-5)
        assert result.repeats_data == expected.repeats_data
        for key in (names.TRAIN_LOSS, names.EPOCHS):
            assert m.sink.points[key] == pytest.approx(twin.sink.points[key], rel=1e-5), key
    (_, whole, _, _), (m, repeated, _, _) = runs
    assert repeated.repeats_data and not whole.repeats_data
    assert max(m.sink.points[names.EPOCHS].values()) == pytest.approx(4.0)


def test_members_of_different_shapes_are_refused(data, tmp_path):
    other = make_trial(data, STEPS + 1)
    with pytest.raises(TrialSetupError, match="group them with sweeps.packs.group_packs"):
        run_pack([member(trials(data)[0], tmp_path / "a"), member(other, tmp_path / "b")], CPU, data=data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by runners/bench/device/run.sh test:...)")
def test_on_the_gpu_a_compiled_pack_matches_unpacked_runs_within_bf16_noise(data, tmp_path):
    """bf16 autocast, compiled: the losses of a pack and of its members alone differ only by rounding (a
    bf16 product keeps 8 bits of mantissa, 0.4%); 2% on the final and branch losses of 40 steps."""
    gpu = CPU.model_copy(update={"device": "cuda", "compile": "auto"})
    members = [member(t, tmp_path / f"pack{i}") for i, t in enumerate(trials(data)[:2])]
    results = run_pack(members, gpu, data=data)
    for i, (result, trial) in enumerate(zip(results, trials(data))):
        twin = member(trial, tmp_path / f"alone{i}")
        expected = run_trial(trial, gpu, twin.workdir, twin.sink, data=data, branch_sinks=twin.branch_sinks)
        assert result.status == expected.status == names.FINISHED and "pack of 2" in result.numerics
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=0.02)
        assert result.branches[0].val_loss == pytest.approx(expected.branches[0].val_loss, rel=0.02)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by runners/bench/device/run.sh test:...)")
@pytest.mark.parametrize("compiled, micro", [(False, None), (True, 4)])
def test_on_the_gpu_a_pack_replayed_as_a_cuda_graph_takes_the_same_steps(data, tmp_path, compiled, micro):
    """runtime.cuda_graph: the same kernels on the same inputs, so the same curves as the pack launched kernel by
    kernel (1e-4: the two runs' products may tile differently); through a WSD branch (its members restored from
    their fork checkpoints into the graph's tensors) and a member that diverges (frozen inside the graph); eager
    with whole batches, and compiled with two micro-batches a step."""
    gpu = CPU.model_copy(update={"device": "cuda", "compile": compiled, "micro_batch_size": micro})
    pack = [*trials(data)[:2], member_trial(data, lr=50.0, seed=3)]
    runs = {}
    for graphed in (False, True):
        members = [member(t, tmp_path / f"{graphed}{i}") for i, t in enumerate(pack)]
        results = run_pack(members, gpu.model_copy(update={"cuda_graph": graphed}), data=data)
        runs[graphed] = results, members
    (plain, plain_members), (graphed, graphed_members) = runs[False], runs[True]
    assert "CUDA graph" in graphed[0].numerics and "CUDA graph" not in plain[0].numerics
    assert [r.status for r in graphed] == [r.status for r in plain] == [names.FINISHED, names.FINISHED, names.DIVERGED]
    assert graphed[2].diverged_at_tokens == plain[2].diverged_at_tokens
    for result, expected, m, twin in zip(graphed[:2], plain[:2], graphed_members, plain_members):
        assert result.final_val_loss == pytest.approx(expected.final_val_loss, rel=1e-4)
        assert result.branches[0].val_loss == pytest.approx(expected.branches[0].val_loss, rel=1e-4)
        assert m.sink.points[names.TRAIN_LOSS] == pytest.approx(twin.sink.points[names.TRAIN_LOSS], rel=1e-4)

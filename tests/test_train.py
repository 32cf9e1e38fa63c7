"""Training one trial on the CPU: learning, WSD branches, resume, divergence, pruning, accumulation, MoE.

Models of ~10k parameters on byte-level text from the standard library, 16-token sequences, at most a
few hundred steps, one thread (so every run is bitwise repeatable).
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Mapping

import pytest
import torch

from models import build_model, flops_per_token
from models.config import ModelConfig, MoEConfig
from runners.tracking import names
from runners.data.store import prepare_data
from runners.training.schedule import TrialSetupError
from runners.training.step import accumulate_grads
from runners.training.train import run_trial
from sweeps.trial import DataConfig, Runtime, ScheduleConfig, TrainConfig, TrialConfig

SEQ, SEQS = 16, 8
BATCH = SEQ * SEQS  # tokens per step
DATA = DataConfig(source="stdlib", max_bytes=300_000, val_tokens=1024)
CPU = Runtime(device="cpu", checkpoint_every_s=3600)


class MemorySink:
    """Keeps every logged point; raises `stop` once asked to log at or past `stop_at` tokens."""

    def __init__(self, stop_at: int | None = None, stop: type[BaseException] = KeyboardInterrupt):
        self.points: dict[str, dict[int, float]] = defaultdict(dict)
        self.stop_at, self.stop = stop_at, stop

    def log(self, metrics: Mapping[str, float], tokens: int) -> None:
        if self.stop_at is not None and tokens >= self.stop_at:
            self.stop_at = None
            raise self.stop(f"stopped at {tokens} tokens")
        for key, value in metrics.items():
            self.points[key][tokens] = value

    def flush(self, timeout_s: float) -> bool:
        return True  # in memory: stored as soon as logged


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_data(DATA, tmp_path_factory.mktemp("tokens"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_trial(data, steps: int, lr: float = 1e-2, family: str = "dense", **schedule) -> TrialConfig:
    model = ModelConfig(family=family, d_model=16, n_layers=1, n_heads=2, d_ff=32, vocab_size=data.vocab_size,
                        seq_len=SEQ, moe=MoEConfig(n_experts=4, top_k=2) if family == "moe" else None)
    train = TrainConfig(tokens=steps * BATCH, batch_size=BATCH, lr=lr, eval_points=4,
                        schedule=ScheduleConfig(**{"warmup": 0.05, **schedule}))
    return TrialConfig(model=model, data=DATA, train=train)


def train(trial, data, workdir, runtime=CPU, sink=None, branch_sinks=None, on_eval=None):
    sink = sink or MemorySink()
    branch_sinks = branch_sinks or {b: MemorySink() for b in trial.train.schedule.branches}
    result = run_trial(trial, runtime, workdir, sink, data=data, branch_sinks=branch_sinks.__getitem__, on_eval=on_eval)
    return result, sink, branch_sinks


WSD = dict(kind="wsd", decay_fraction=0.2, min_lr_ratio=0.0, branches=(40 * BATCH, 70 * BATCH))


@pytest.fixture(scope="module")
def wsd_reference(data, tmp_path_factory):
    """An uninterrupted WSD trial of 100 steps with branches ending at 40 and 70 steps."""
    return train(make_trial(data, 100, **WSD), data, tmp_path_factory.mktemp("wsd"))


def test_tiny_dense_trial_learns_and_logs(data, tmp_path):
    result, sink, _ = train(make_trial(data, 150, kind="cosine"), data, tmp_path)
    assert result.status == names.FINISHED and result.tokens == 150 * BATCH
    assert result.final_val_loss < 0.6 * math.log(data.vocab_size)
    val = sink.points[names.VAL_LOSS]
    assert sorted(val) == [8 * BATCH, 20 * BATCH, 55 * BATCH, 150 * BATCH]  # log-spaced from 5% of 150 steps
    assert val[150 * BATCH] == result.final_val_loss < val[8 * BATCH]
    assert sink.points[names.VAL_BPB][150 * BATCH] == pytest.approx(
        result.final_val_loss / math.log(2) / data.val_bytes_per_token)
    assert result.repeats_data == (data.epochs(150 * BATCH, SEQ) > 1)
    assert result.tokens_per_s > 0 and result.mfu is None
    assert len(sink.points[names.TRAIN_LOSS]) >= 150 and names.MFU not in sink.points  # no MFU on a CPU
    per_token = flops_per_token(make_trial(data, 150).model).train_exact
    assert sink.points[names.FLOPS][150 * BATCH] == pytest.approx(150 * BATCH * per_token)


def test_wsd_branches_equal_standalone_runs_of_their_length(data, tmp_path, wsd_reference):
    result, sink, branch_sinks = wsd_reference
    assert result.status == names.FINISHED and [b.tokens for b in result.branches] == [40 * BATCH, 70 * BATCH]
    for branch in result.branches:
        steps = branch.tokens // BATCH
        # Warm-up is 5 steps in the main run; the same 5 steps make a standalone run of `steps` identical.
        alone, _, _ = train(make_trial(data, steps, kind="wsd", warmup=5 / steps, decay_fraction=0.2,
                                       min_lr_ratio=0.0), data, tmp_path / str(steps))
        assert branch.val_loss == pytest.approx(alone.final_val_loss, abs=1e-6)
        lr = branch_sinks[branch.tokens].points[names.LR]
        fork = round(0.8 * steps)
        assert sink.points[names.LR][fork * BATCH] == 1e-2  # the main run is still stable at the fork
        assert min(lr) > fork * BATCH and lr[steps * BATCH] == 0.0  # the branch logs its own decay only
        assert branch_sinks[branch.tokens].points[names.VAL_LOSS] == {branch.tokens: branch.val_loss}
    assert result.final_val_loss < min(b.val_loss for b in result.branches)


@pytest.mark.parametrize("where", ["main stable phase, Ctrl-C", "branch, Ctrl-C", "branch, crash"])
def test_resume_gives_the_uninterrupted_result(data, tmp_path, wsd_reference, where):
    reference = wsd_reference[0]
    trial = make_trial(data, 100, **WSD)
    if where.startswith("main"):  # KeyboardInterrupt: the trainer checkpoints, then re-raises
        sink, branch_sinks, runtime, stop = MemorySink(stop_at=50 * BATCH), None, CPU, KeyboardInterrupt
    elif where.endswith("Ctrl-C"):  # no checkpoint since the fork, kept in memory: the interrupt writes it
        branch_sinks = {40 * BATCH: MemorySink(), 70 * BATCH: MemorySink(stop_at=63 * BATCH)}
        sink, runtime, stop = None, CPU, KeyboardInterrupt
    else:  # any other failure: the trial resumes from its latest periodic checkpoint
        branch_sinks = {40 * BATCH: MemorySink(), 70 * BATCH: MemorySink(stop_at=63 * BATCH, stop=RuntimeError)}
        sink, runtime, stop = None, CPU.model_copy(update={"checkpoint_every_s": 1e-9}), RuntimeError
    with pytest.raises(stop):
        train(trial, data, tmp_path, runtime, sink=sink, branch_sinks=branch_sinks)
    resumed, sink, branch_sinks = train(trial, data, tmp_path, runtime)
    # It went on from where it stopped, not from the start:
    if where.startswith("main"):
        assert min(sink.points[names.TRAIN_LOSS]) > 50 * BATCH
    else:
        assert min(branch_sinks[70 * BATCH].points[names.TRAIN_LOSS]) >= 63 * BATCH
        assert min(sink.points[names.LR]) > 56 * BATCH  # the main run went on from the fork at 56 steps
    assert resumed.final_val_loss == pytest.approx(reference.final_val_loss, abs=1e-4)
    assert [b.val_loss for b in resumed.branches] == pytest.approx([b.val_loss for b in reference.branches], abs=1e-4)


def test_a_crash_after_a_resumed_branch_ends_does_not_train_that_branch_again(data, tmp_path, wsd_reference):
    trial = make_trial(data, 100, **WSD)
    with pytest.raises(KeyboardInterrupt):  # inside the branch ending at 70 steps (fork at 56): LATEST in it
        train(trial, data, tmp_path, branch_sinks={40 * BATCH: MemorySink(), 70 * BATCH: MemorySink(stop_at=63 * BATCH)})
    with pytest.raises(RuntimeError):  # resumed, the branch ends, then a crash before any periodic checkpoint
        train(trial, data, tmp_path, sink=MemorySink(stop_at=80 * BATCH, stop=RuntimeError))
    resumed, sink, branch_sinks = train(trial, data, tmp_path)
    assert not branch_sinks[70 * BATCH].points and min(sink.points[names.LR]) > 56 * BATCH
    assert resumed.final_val_loss == pytest.approx(wsd_reference[0].final_val_loss, abs=1e-4)


def test_finished_trial_returns_its_result_without_training(data, tmp_path):
    trial = make_trial(data, 10, kind="constant")
    first, _, _ = train(trial, data, tmp_path)
    again, sink, _ = train(trial, data, tmp_path)
    assert again == first and not sink.points
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # checkpoints are deleted once it ends


def test_huge_lr_diverges(data, tmp_path):
    result, sink, _ = train(make_trial(data, 100, lr=50.0, kind="constant"), data, tmp_path)
    assert result.status == names.DIVERGED and result.final_val_loss is None
    assert 0 < result.diverged_at_tokens <= 100 * BATCH and "train loss" in result.error


def test_on_eval_prunes(data, tmp_path):
    seen = []

    def prune_second(tokens: int, val_loss: float) -> bool:
        seen.append(tokens)
        return len(seen) == 2

    result, sink, _ = train(make_trial(data, 150, kind="cosine"), data, tmp_path, on_eval=prune_second)
    assert result.status == names.PRUNED and result.tokens == 20 * BATCH and result.final_val_loss is None
    assert max(sink.points[names.TRAIN_LOSS]) == 20 * BATCH


@pytest.mark.parametrize("family", ["dense", "moe"])
def test_accumulated_gradients_equal_the_full_batch_gradients(data, family):
    cfg = make_trial(data, 1, family=family).model
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = (torch.from_numpy(a) for a in data.train_batch(0, SEQS, SEQ, seed=0))
    grads = []
    for micro in (SEQS, 2):
        model.zero_grad()
        loss, _ = accumulate_grads(model, list(zip(x.split(micro), y.split(micro))), torch.device("cpu"))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    full, _ = accumulate_grads(model, [(x, y)], torch.device("cpu"))
    # MoE balance losses are per micro-batch statistics, so only dense gradients are exactly batch-invariant.
    tolerance = 1e-6 if family == "dense" else 2e-3
    assert torch.allclose(grads[0], grads[1], rtol=0.0, atol=tolerance)
    assert loss.item() == pytest.approx(full.item(), abs=1e-6)


def test_gradient_accumulation_trains_like_the_full_batch(data, tmp_path):
    trial = make_trial(data, 20, kind="cosine")
    full, _, _ = train(trial, data, tmp_path / "full")
    micro, _, _ = train(trial, data, tmp_path / "micro", CPU.model_copy(update={"micro_batch_size": 2}))
    assert micro.final_val_loss == pytest.approx(full.final_val_loss, abs=1e-5)


def test_moe_trial_trains_and_logs_router_stats(data, tmp_path):
    result, sink, _ = train(make_trial(data, 60, family="moe", kind="cosine"), data, tmp_path)
    assert result.status == names.FINISHED
    val = sink.points[names.VAL_LOSS]
    assert result.final_val_loss < val[min(val)] - 0.5
    router = [k for k in sink.points if k.startswith(names.ROUTER_PREFIX)]
    assert any(k.endswith("load_max") for k in router)
    assert all(math.isfinite(v) for k in router for v in sink.points[k].values())


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_one_is_a_setup_error(data, tmp_path):
    with pytest.raises(TrialSetupError, match="runtime.device"):
        train(make_trial(data, 10), data, tmp_path, Runtime(device="cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_flash4_where_it_cannot_run_is_a_setup_error(data, tmp_path):
    with pytest.raises(TrialSetupError, match="runtime.attention"):
        train(make_trial(data, 10), data, tmp_path, Runtime(attention="flash4"))


def test_a_trial_with_unique_tokens_repeats_them_and_logs_its_epochs(data, tmp_path):
    trial = make_trial(data, 40, kind="cosine")
    capped = trial.model_copy(update={"data": DATA.model_copy(update={"unique_tokens": 10 * BATCH})})
    result, sink, _ = train(capped, data, tmp_path)
    assert result.status == names.FINISHED and result.repeats_data
    assert sink.points[names.EPOCHS][40 * BATCH] == pytest.approx(4.0)  # D / U
    assert capped.trial_id != trial.trial_id


class SlowStoreSink(MemorySink):
    """A tracking store that takes its time: `eval_s` to store each evaluation, `flush_s` to make points durable."""

    def __init__(self, eval_s: float, flush_s: float):
        super().__init__()
        self.eval_s, self.flush_s, self.flushes = eval_s, flush_s, 0

    def log(self, metrics: Mapping[str, float], tokens: int) -> None:
        if names.VAL_LOSS in metrics:
            time.sleep(self.eval_s)
        super().log(metrics, tokens)

    def flush(self, timeout_s: float) -> bool:
        self.flushes += 1
        time.sleep(self.flush_s)
        return True


def test_the_wall_time_is_accounted_to_its_phases(data, tmp_path):
    """Evaluations and checkpoints (with the store's flush) are counted in their own phases and kept out of the
    training intervals: counted twice, `other` would go negative by their time."""
    sink = SlowStoreSink(eval_s=0.2, flush_s=0.1)
    started = time.perf_counter()
    result, _, _ = train(make_trial(data, 150, kind="cosine"), data, tmp_path, sink=sink,
                         runtime=CPU.model_copy(update={"checkpoint_every_s": 0.3}))
    wall = time.perf_counter() - started
    spent = {p: sink.points[names.time_metric(p)] for p in names.TIME_PHASES}
    assert all(list(v) == [result.tokens] for v in spent.values())  # logged once, as the trial ended
    spent = {p: v[result.tokens] for p, v in spent.items()}
    assert spent["total"] <= wall and spent["total"] > 0.9 * wall
    checkpoints = sink.flushes - 1  # the last flush stores the result, after the times are logged
    assert spent["eval"] >= 4 * 0.2 and spent["checkpoint"] >= checkpoints * 0.1 and checkpoints >= 2
    assert min(spent.values()) >= 0.0 and spent["train"] > 0 and spent["setup"] > 0
    assert spent["train"] + spent["first_interval"] < spent["total"] - spent["eval"] - spent["checkpoint"]

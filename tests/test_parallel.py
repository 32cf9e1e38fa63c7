"""A trial trained by two gloo processes (torch.multiprocessing, real process group): DDP and FSDP2 give the
single process's train and validation curves on the same global batch, to 1e-5 relative in fp32; a trial
checkpointed on two ranks resumes on one and ends where the uninterrupted run ends."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from runners.data.store import prepare_data
from runners.tracking import names
from runners.training.train import run_trial
from sweeps.trial import Runtime
from tests.conftest import free_port
from tests.test_train import BATCH, DATA, WSD, MemorySink, make_trial

RTOL = 1e-5
STEPS = 60
TRIAL_KW = dict(WSD, branches=(40 * BATCH,))


def two_layers(data):
    """test_train's tiny WSD trial with one branch, with two blocks (two FSDP units)."""
    trial = make_trial(data, STEPS, **TRIAL_KW)
    return trial.model_copy(update={"model": trial.model.model_copy(update={"n_layers": 2})})


def runtime(parallel: str = "ddp") -> Runtime:
    # Micro-batches of 2 sequences: 4 accumulated on one process, 2 on each of two ranks.
    # Checkpoints every 2 s: the ranks must agree when (a save is collective) and go on exactly.
    return Runtime(device="cpu", checkpoint_every_s=2.0, micro_batch_size=2, parallel=parallel)


JOBS = {"ddp": ("ddp", None), "fsdp": ("fsdp", None), "stopped": ("fsdp", 50 * BATCH)}  # stop: after the branch


def rank_main(rank: int, world: int, port: int, cache: str, root: str) -> None:
    """Every job of JOBS, one after the other, in one process group (one start of the ranks for all)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data = prepare_data(DATA, Path(cache))
        for job, (parallel, stop_at) in JOBS.items():
            run_job(two_layers(data), runtime(parallel), stop_at, Path(root) / job, Path(root) / f"{job}.{rank}.json", data)
    finally:
        dist.destroy_process_group()


def run_job(trial, runtime: Runtime, stop_at: int | None, workdir: Path, out: Path, data) -> None:
    """One rank's run_trial of a job: its points and final losses (None when its sink stopped it) to `out`."""
    sink, branch = MemorySink(stop_at), MemorySink()
    try:
        result = run_trial(trial, runtime, workdir, sink, data=data, branch_sinks=lambda _: branch)
        final = [result.final_val_loss, result.branches[0].val_loss]
    except KeyboardInterrupt:  # every rank's sink stops at the same point, as a cancelled gang would
        final = None
    out.write_text(json.dumps({"points": sink.points, "final": final}))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokens")
    prepare_data(DATA, folder)
    return folder


@pytest.fixture(scope="module")
def gang(data_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The jobs' folder, and rank 0's points and final losses of each job."""
    root = tmp_path_factory.mktemp("gang")
    mp.start_processes(rank_main, args=(2, free_port(), str(data_dir), str(root)), nprocs=2, start_method="spawn")
    out = {}
    for job in JOBS:
        ranked = json.loads((root / f"{job}.0.json").read_text())
        ranked["points"] = {k: {int(t): v for t, v in p.items()} for k, p in ranked["points"].items()}
        out[job] = ranked
    return root, out


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The single-process run: the reference curves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = prepare_data(DATA, data_dir)
    sink, branch = MemorySink(), MemorySink()
    result = run_trial(two_layers(data), runtime(), tmp_path_factory.mktemp("single"),
                       sink, data=data, branch_sinks=lambda _: branch)
    torch.set_num_threads(threads)
    return {"points": sink.points, "final": [result.final_val_loss, result.branches[0].val_loss]}


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_give_the_single_process_curves(gang, single, parallel):
    ranked = gang[1][parallel]
    for key in (names.TRAIN_LOSS, names.VAL_LOSS, names.LR):
        assert ranked["points"][key].keys() == single["points"][key].keys()
        for tokens, value in single["points"][key].items():
            assert ranked["points"][key][tokens] == pytest.approx(value, rel=RTOL), (key, tokens)
    assert ranked["final"] == pytest.approx(single["final"], rel=RTOL)
    assert single["final"][0] < single["points"][names.VAL_LOSS][min(single["points"][names.VAL_LOSS])]  # it learned


def test_a_two_rank_checkpoint_resumes_on_one(gang, data_dir, single):
    workdir = gang[0] / "stopped"
    assert gang[1]["stopped"]["final"] is None
    assert json.loads((workdir / "checkpoint.json").read_text())["progress"]["step"] >= 40
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    data = prepare_data(DATA, data_dir)
    sink, branch = MemorySink(), MemorySink()
    result = run_trial(two_layers(data), runtime(), workdir, sink, data=data, branch_sinks=lambda _: branch)
    torch.set_num_threads(threads)
    assert [result.final_val_loss, result.branches[0].val_loss] == pytest.approx(single["final"], rel=RTOL)
    assert min(sink.points[names.TRAIN_LOSS]) > 40 * BATCH  # it went on from the checkpoint, not from the start
    assert not (workdir / "checkpoint.json").exists()  # the result stands for it

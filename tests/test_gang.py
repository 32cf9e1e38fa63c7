"""Trials that span two workers (a Ray Train gang of gloo CPU ranks) through `scaling run`, with real Ray and
real MLflow, in one run (each start of Ray costs tens of seconds): on two nodes the ranks span both; a SIGKILLed
rank restarts the group from the trial's DCP checkpoint; the 2-worker FSDP trial ends at the 1-worker trial's
loss, no point logged twice."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from runners.scheduling.worker import NOSET_CUDA
from runners.tracking import names
from runners.tracking.runs import SweepRuns
from tests.helpers import start_driver, tiny_spec, trial_runs, wait_for
from tests.test_ray_faults import every_point_once

pytestmark = pytest.mark.slow

ONE_TRIAL = {"sizes": [3000], "tokens": [80_000]}  # 156 steps of 16 sequences: a few seconds on two ranks
GANG = {"resources": {"cpus": 1, "gpus": 2}, "runtime": {"parallel": "fsdp", "checkpoint_every_s": 0.5, "max_retries": 2}}
RTOL = 1e-5


def only_trial(sweep: str, uri: str):
    (run,) = trial_runs(sweep, uri).values()
    return run


@pytest.fixture(scope="module")
def single_loss(tmp_path_factory):
    """The trial trained by one process, as a sweep's worker trains it (no Ray): the loss the gangs must end at."""
    from runners.data.store import prepare_data
    from runners.pipeline import plan
    from runners.training.train import run_trial
    from sweeps.spec import load_spec
    from tests.test_train import MemorySink

    tmp_path = tmp_path_factory.mktemp("single")
    spec = load_spec(tiny_spec(tmp_path, name="single", grid=ONE_TRIAL))
    (planned,) = plan(spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep's workers (resources.cpus)
    result = run_trial(planned.trial, spec.runtime, tmp_path / "work", MemorySink(), data=prepare_data(spec.data, None),
                       branch_sinks=lambda _: MemorySink())
    torch.set_num_threads(threads)
    assert result.status == names.FINISHED
    return result.final_val_loss


def test_a_two_node_fsdp_gang_survives_a_killed_rank_and_ends_at_the_single_process_loss(tmp_path, sqlite_uri,
                                                                                          monkeypatch, single_loss):
    """One run proves it all: two nodes of one CPU each, so the gang of two one-CPU workers can only start with a
    rank on each; rank 1 is SIGKILLed once a checkpoint is there, the group restarts from it, and the trial ends
    in the same MLflow run at the single process's loss, every point logged once."""
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # this test brings its own cluster
    monkeypatch.delenv(NOSET_CUDA, raising=False)
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    spec = tiny_spec(tmp_path, name="gang", grid=ONE_TRIAL, **GANG)
    folder = tmp_path / "ckpt" / "gang"

    def running_with_checkpoint():
        run = next(iter(trial_runs("gang", sqlite_uri).values()), None)
        if run and names.TAG_RANK_WORKERS in run.data.tags and any(folder.glob("*/checkpoint.json")):
            return run
        return None

    driver = start_driver(spec, sqlite_uri, "--no-fit", "--address", cluster.address)
    try:
        victim = wait_for(running_with_checkpoint, 300, every_s=0.2)
        rank1 = int(victim.data.tags[names.TAG_RANK_WORKERS].split(",")[1].rsplit(":", 1)[1])
        os.kill(rank1, signal.SIGKILL)
        out, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
        ray.shutdown()
        cluster.shutdown()
    assert driver.returncode == 0, out
    run = only_trial("gang", sqlite_uri)
    tags = run.data.tags
    assert run.info.run_id == victim.info.run_id and tags[names.TAG_STATUS] == names.FINISHED
    assert tags[names.TAG_WORLD] == "2" and tags[names.TAG_PARALLEL] == "fsdp"
    assert len(set(tags[names.TAG_RANK_NODES].split(","))) == 2  # the ranks span both nodes
    assert len(set(tags[names.TAG_RANK_WORKERS].split(","))) == 2  # two processes trained it, one run holds it
    assert tags[names.TAG_RANK_WORKERS] != victim.data.tags[names.TAG_RANK_WORKERS]  # a new group finished it
    assert run.data.metrics[names.VAL_LOSS] == pytest.approx(single_loss, rel=RTOL)
    steps = every_point_once(SweepRuns("gang", sqlite_uri), run.info.run_id)
    assert steps[-1] == int(run.data.params[names.PARAM_D])  # the curve goes on to the end

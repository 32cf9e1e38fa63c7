"""A trial that spans several workers (resources.gpus: W >= 2): a gang started by Ray Train's TorchTrainer.

Why Ray Train and not placement groups with torch.distributed by hand: TorchTrainer is exactly that, done
once and tested: it reserves the W workers as one placement group (the gang starts whole or not at all,
never half-placed and waiting; PACK, so a gang fills a node before it spans two), gives each its GPU, sets
up the process group (NCCL on GPUs, gloo on CPUs) and, when a rank dies, stops the others and starts the
group again, up to FailureConfig's max_failures. The trial's own checkpoints (DCP, in its folder) make a
restarted group go on where the trial was; Ray Train's checkpoints are not used, so MLflow stays the one
record of progress, as for every other trial.

The sweep's Ray task for a gang holds no resources of its own: it only starts the trainer and waits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from runners.scheduling.worker import TrialJob, run_job


@dataclass(frozen=True)
class Gang:
    """How a trial's gang is placed."""

    workers: int
    use_gpu: bool  # one GPU per worker; else CPU workers (gloo)
    max_failures: int  # group restarts after a rank died (runtime.max_retries)


def run_gang(job: TrialJob, gang: Gang, on_eval=None) -> dict:
    """Train the trial on `gang.workers` ranks; returns rank 0's TrialResult as a dict. Raises when the group
    failed more often than max_failures (the sweep records the trial as failed). The result is the one rank 0
    wrote into the trial's folder (where every node reads and writes the trial's checkpoints)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from runners.training.timeline import RESULT

    per_worker = {"CPU": job.cpus} | ({"GPU": 1} if gang.use_gpu else {})
    trainer = TorchTrainer(
        _rank, train_loop_config={"job": job, "on_eval": on_eval},
        scaling_config=ScalingConfig(num_workers=gang.workers, use_gpu=gang.use_gpu, resources_per_worker=per_worker),
        # Ray Train's own run state, beside the trial's checkpoints (a folder every node reaches).
        run_config=RunConfig(name="ray-train", storage_path=str(Path(job.workdir).resolve()),
                             failure_config=FailureConfig(max_failures=gang.max_failures)),
    )
    trainer.fit()
    return json.loads((Path(job.workdir) / RESULT).read_text())


def _rank(config: dict) -> None:
    """One rank of the gang, in a Ray Train worker (process group set up)."""
    import ray.train.torch
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    run_job(config["job"], on_eval=config["on_eval"])

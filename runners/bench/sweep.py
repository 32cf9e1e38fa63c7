"""Sweep-level speed benchmarks on a GPU machine: the same sweep run twice, each a fresh `scaling run --no-fit`
(its own Ray, its own MLflow store and sweep name, so nothing is skipped), timed wall clock.

    python -m runners.bench.sweep multigpu SPEC --util gpu_util.csv   # one GPU, then every GPU
    python -m runners.bench.sweep packing SPEC --util gpu_util.csv    # one GPU: a trial at a time, then packed
    python -m runners.bench.sweep packing SPEC --util gpu_util.csv --mps   # packed under MPS instead

multigpu: speedup = wall time on one GPU / wall time on all of them (goal 0.95 x the GPU count).
packing: speedup = wall time with one trial per GPU (gpus: 1) / with the spec's own share (goal 3x for 16
tiny trials at 1/16); with --mps, the packed run is under NVIDIA's Multi-Process Service (a daemon this
script starts and stops), which lets kernels of different processes run on the GPU at the same time where
time-slicing runs one process's kernels at a time.
The corpus is tokenized (cached) before the first run. Two wall times per run: `speedup` over the whole
command (driver start, Ray start and MLflow store included: 20 to 40 s that no GPU count changes) and
`speedup_sweep` over the sweep's own window, from the first trial submitted to the last trial ended (the
fresh workers' start included). The busy fraction of each GPU is the mean of nvidia-smi's utilization
samples (taken by runners/bench/device/run.sh) inside each run's window: the share of time a kernel was running,
not MFU. Each run's trials are also timed from MLflow (medians): `start_s`, from a trial's registration to its
first step (queueing for a free slot included, then worker start, imports, data, model), and `train_s`,
from its first step to its end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
import yaml

from runners.bench.log import append
from runners.data.store import prepare_data
from runners.bench.sweepstats import busy_fraction, trial_runs
from sweeps.spec import load_spec

Window = tuple[float, float]  # wall-clock start and end, seconds since the epoch


@dataclass(frozen=True)
class Run:
    command: Window
    sweep: Window  # the first trial's registration to the last trial's end
    trials: dict[str, float]  # median seconds of each trial's start and training


def run_as(spec: dict, name: str, gpus: str, env: dict | None = None) -> Run:
    """Run a renamed copy of the spec on the given CUDA devices and time it."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec | {"name": name, "results_dir": str(folder / "results"),
                                           "checkpoint_dir": str(folder / "ckpt")}))
    store = f"sqlite:///{folder / 'mlflow.db'}"
    env = os.environ | (env or {}) | {"CUDA_VISIBLE_DEVICES": gpus, "MLFLOW_TRACKING_URI": store}
    start = time.time()
    subprocess.run([sys.executable, "-m", "runners.cli", "run", str(path), "--no-fit"], env=env, check=True)
    end = time.time()
    mlflow.set_tracking_uri(store)
    runs = trial_runs(name)
    trials = {"start_s": (runs.first_step - runs.start).median(), "train_s": (runs.end - runs.first_step).median()}
    return Run((start, end), (runs.start.min(), runs.end.max()), {k: round(float(v), 2) for k, v in trials.items()})


@contextlib.contextmanager
def mps_daemon(folder: Path):
    """NVIDIA MPS for the processes started inside: yields the environment that points them at the daemon."""
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(folder / "pipe"), "CUDA_MPS_LOG_DIRECTORY": str(folder / "log")}
    for d in env.values():
        Path(d).mkdir(parents=True, exist_ok=True)
    subprocess.run(["nvidia-cuda-mps-control", "-d"], env=os.environ | env, check=True)
    try:
        yield env
    finally:
        subprocess.run(["nvidia-cuda-mps-control"], input="quit\n", text=True, env=os.environ | env)


def compare(benchmark: str, base_name: str, base: Run, cand_name: str, cand: Run, util: Path, config: dict) -> None:
    """Log the speedup of the candidate over the baseline, over whole commands and over sweep windows."""
    trials = {base_name: base.trials, cand_name: cand.trials}
    for metric, window, label in (("speedup", "command", "whole command"), ("speedup_sweep", "sweep", "sweep")):
        spans = {base_name: getattr(base, window), cand_name: getattr(cand, window)}
        walls = {name: end - start for name, (start, end) in spans.items()}
        busy = {name: busy_fraction(util, span) for name, span in spans.items()}
        speedup = walls[base_name] / walls[cand_name]
        append(benchmark, metric, round(speedup, 3), "x", config | {
            "wall_s": walls, "busy": busy, "trials": trials, "window": label})
        print(f"{benchmark} {metric}: {base_name} {walls[base_name]:.1f} s, {cand_name} {walls[cand_name]:.1f} s, "
              f"speedup {speedup:.2f}; busy {busy}; trials {trials}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=["multigpu", "packing"])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--util", type=Path, required=True, help="nvidia-smi samples: timestamp, index, utilization, memory")
    parser.add_argument("--mps", action="store_true", help="packing: run the packed sweep under NVIDIA MPS")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    name = spec["name"]
    prepare_data(load_spec(args.spec).data)  # tokenized before any timing, so no run pays for it
    config = {"spec": str(args.spec), "note": "`scaling run --no-fit`, each run its own Ray and MLflow store"}
    if args.benchmark == "multigpu":
        n = torch.cuda.device_count()
        one = run_as(spec, f"{name}-1gpu", "0")
        every = run_as(spec, f"{name}-{n}gpu", ",".join(map(str, range(n))))
        compare("multigpu", "1gpu", one, f"{n}gpu", every, args.util, config | {"gpus": n, "goal": 0.95 * n})
        return
    share = spec.get("resources", {}).get("gpus", "auto")
    config |= {"share": share, "goal": 3.0, "mps": args.mps}
    alone = run_as(spec | {"resources": spec.get("resources", {}) | {"gpus": 1}}, f"{name}-alone", "0")
    packed_name = f"packed_{share}" + ("_mps" if args.mps else "")
    try:
        with mps_daemon(Path(tempfile.mkdtemp(prefix="mps-"))) if args.mps else contextlib.nullcontext({}) as mps_env:
            packed = run_as(spec, f"{name}-{packed_name}", "0", mps_env)
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"packed run failed: {e}") from None
    compare("packing", "one_at_a_time", alone, packed_name, packed, args.util, config)


if __name__ == "__main__":
    main()

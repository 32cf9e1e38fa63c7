"""Sweep-level speed benchmarks on a GPU machine: the same sweep run twice, each a fresh `scaling run --no-fit`
(its own Ray, its own MLflow store and sweep name, so nothing is skipped), timed wall clock.

    python -m runners.device.sweepbench multigpu SPEC --util gpu_util.csv   # one GPU, then every GPU
    python -m runners.device.sweepbench packing SPEC --util gpu_util.csv    # one GPU: a trial at a time, then packed

multigpu: speedup = wall time on one GPU / wall time on all of them (goal 0.95 x the GPU count).
packing: speedup = wall time with one trial per GPU (gpus: 1) / with the spec's own share (goal 3x for 16
tiny trials at 1/16). The busy fraction of each GPU is the mean of nvidia-smi's utilization samples (taken
by runners/device/run.sh) inside each run's window: the share of time a kernel was running, not MFU.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import timezone
from pathlib import Path

import pandas as pd
import torch
import yaml

from runners.benchlog import append


def run_as(spec: dict, name: str, gpus: str) -> tuple[float, float]:
    """Run a renamed copy of the spec on the given CUDA devices: (start, end) wall-clock times."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec | {"name": name, "results_dir": str(folder / "results"),
                                           "checkpoint_dir": str(folder / "ckpt")}))
    env = os.environ | {"CUDA_VISIBLE_DEVICES": gpus, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    start = time.time()
    subprocess.run([sys.executable, "-m", "runners.cli", "run", str(path), "--no-fit"], env=env, check=True)
    return start, time.time()


def busy_fraction(util_csv: Path, window: tuple[float, float]) -> dict[int, float]:
    """Mean utilisation of each GPU between two wall-clock times, as a fraction."""
    table = pd.read_csv(util_csv, header=None, names=["time", "gpu", "util", "mem"], skipinitialspace=True)
    stamps = pd.to_datetime(table.time, format="%Y/%m/%d %H:%M:%S.%f").dt.tz_localize(timezone.utc)
    table["t"] = stamps.map(lambda t: t.timestamp())
    table["util"] = table.util.str.rstrip(" %").astype(float) / 100
    inside = table[(table.t >= window[0]) & (table.t <= window[1])]
    return {int(g): round(float(u), 3) for g, u in inside.groupby("gpu").util.mean().items()}


def compare(benchmark: str, spec: dict, baseline: tuple[str, dict, str], candidate: tuple[str, dict, str],
            util: Path, config: dict) -> float:
    """Time the baseline and the candidate runs; log speedup, both wall times and busy fractions."""
    (base_name, base_spec, base_gpus), (cand_name, cand_spec, cand_gpus) = baseline, candidate
    base = run_as(base_spec, f"{spec['name']}-{base_name}", base_gpus)
    cand = run_as(cand_spec, f"{spec['name']}-{cand_name}", cand_gpus)
    walls = {base_name: base[1] - base[0], cand_name: cand[1] - cand[0]}
    busy = {base_name: busy_fraction(util, base), cand_name: busy_fraction(util, cand)}
    speedup = walls[base_name] / walls[cand_name]
    append(benchmark, "speedup", speedup, "x", config | {"wall_s": walls, "busy": busy})
    for name, wall in walls.items():
        append(benchmark, f"wall_{name}", wall, "s", config)
    print(f"{benchmark}: {base_name} {walls[base_name]:.1f} s, {cand_name} {walls[cand_name]:.1f} s, speedup {speedup:.2f}; busy {busy}")
    return speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=["multigpu", "packing"])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--util", type=Path, required=True, help="nvidia-smi samples: timestamp, index, utilization, memory")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    config = {"spec": str(args.spec), "note": "wall time of `scaling run --no-fit`, Ray start included"}
    if args.benchmark == "multigpu":
        n = torch.cuda.device_count()
        compare("multigpu", spec, ("1gpu", spec, "0"), (f"{n}gpu", spec, ",".join(map(str, range(n)))),
                args.util, config | {"gpus": n, "goal": 0.95 * n})
    else:
        share = spec.get("resources", {}).get("gpus", "auto")
        alone = spec | {"resources": spec.get("resources", {}) | {"gpus": 1}}
        compare("packing", spec, ("one_at_a_time", alone, "0"), (f"packed_{share}", spec, "0"),
                args.util, config | {"share": share, "goal": 3.0})


if __name__ == "__main__":
    main()

"""The multi-GPU benchmark: one sweep run on one GPU, then the same sweep on every GPU of the machine.

Speedup = wall time on one GPU / wall time on all of them, each a fresh `scaling run` (its own Ray,
its own sweep name so nothing is skipped). The per-GPU busy fraction is the mean of nvidia-smi's
utilization samples (taken by runners/device/run.sh) inside each run's window.

    python -m runners.device.multigpu SPEC --util gpu_util.csv
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
import yaml

from runners.benchlog import append


def run_as(spec: dict, name: str, gpus: str) -> tuple[float, float, float]:
    """Run a renamed copy of the spec on the given CUDA devices: (start, end, wall seconds)."""
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec | {"name": name, "results_dir": str(folder / "results"),
                                           "checkpoint_dir": str(folder / "ckpt")}))
    env = os.environ | {"CUDA_VISIBLE_DEVICES": gpus, "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    start = time.time()
    subprocess.run([sys.executable, "-m", "runners.cli", "run", str(path), "--no-fit"], env=env, check=True)
    end = time.time()
    return start, end, end - start


def busy_fraction(util_csv: Path, start: float, end: float) -> dict[int, float]:
    """Mean utilisation of each GPU between two wall-clock times, as a fraction."""
    table = pd.read_csv(util_csv, header=None, names=["time", "gpu", "util", "mem"], skipinitialspace=True)
    table["t"] = pd.to_datetime(table.time, format="%Y/%m/%d %H:%M:%S.%f").map(lambda t: t.replace(tzinfo=timezone.utc).timestamp())
    table["util"] = table.util.str.rstrip(" %").astype(float) / 100
    window = table[(table.t >= start) & (table.t <= end)]
    return {int(g): round(float(u), 3) for g, u in window.groupby("gpu").util.mean().items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--util", type=Path, required=True, help="nvidia-smi samples: timestamp, index, utilization, memory")
    args = parser.parse_args()
    spec = yaml.safe_load(args.spec.read_text())
    n = torch.cuda.device_count()
    s1, e1, one = run_as(spec, f"{spec['name']}-1gpu", "0")
    sn, en, all_ = run_as(spec, f"{spec['name']}-{n}gpu", ",".join(map(str, range(n))))
    config = {"spec": str(args.spec), "gpus": n, "note": "same sweep, fresh Ray and MLflow store each; wall time of `scaling run --no-fit`"}
    busy1, busy_n = busy_fraction(args.util, s1, e1), busy_fraction(args.util, sn, en)
    append("multigpu", "speedup", one / all_, "x", config | {"busy_1gpu": busy1, f"busy_{n}gpu": busy_n})
    append("multigpu", "wall_1gpu", one, "s", config)
    append("multigpu", f"wall_{n}gpu", all_, "s", config)
    print(f"{datetime.now(timezone.utc):%H:%M:%S} one GPU {one:.1f} s, {n} GPUs {all_:.1f} s: speedup {one / all_:.2f} "
          f"(goal {0.95 * n:.2f}); busy {busy1} vs {busy_n}")


if __name__ == "__main__":
    main()

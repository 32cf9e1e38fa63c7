"""Benchmark pack_sweep (issue 19): a sweep trained in packs against its unpacked twin, both in this MLflow store.

    python -m runners.bench.pack_sweep PACKED_SPEC UNPACKED_SPEC [--gpus G] [--on DEVICE --at COMMIT]

Appends `benchmark: pack_sweep` figures to results/benchmarks.jsonl: speedup_wall, the unpacked sweep's window
over the packed one's (windows as runners.bench.sweepstats: first trial start to last trial end), and, on a
device whose bf16 peak is known, mfu: the packed sweep's exact training FLOPs over its window x G GPUs x peak.
The two must be the same trials, all finished (as many, the same exact FLOPs): a window of a partial sweep, or of
another grid, compares nothing. run.sh's `pack_sweep:PACKED,UNPACKED` stage trains both, then calls this.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from runners.bench.log import LOG, append, device
from runners.bench.sweepstats import trial_runs, under_mps, window
from runners.training.step import peak_of
from sweeps.spec import load_spec


def compare(packed: pd.DataFrame, unpacked: pd.DataFrame, gpus: int, peak: float | None) -> dict[str, float]:
    """speedup_wall (and mfu with a peak) from the two sweeps' trial runs (sweepstats.trial_runs)."""
    for name, runs in (("packed", packed), ("unpacked", unpacked)):
        if runs.end.isna().any():
            raise SystemExit(f"the {name} sweep has {int(runs.end.isna().sum())} trial(s) without an end: finish it first")
    if len(packed) != len(unpacked) or not math.isclose(packed.flops.sum(), unpacked.flops.sum(), rel_tol=1e-9):
        raise SystemExit(f"not twins: {len(packed)} packed trials of {packed.flops.sum():.4g} FLOPs against "
                         f"{len(unpacked)} unpacked of {unpacked.flops.sum():.4g}")
    wall = {name: end - start for name, (start, end) in (("packed", window(packed)), ("unpacked", window(unpacked)))}
    out = {"speedup_wall": wall["unpacked"] / wall["packed"], "packed_window_s": wall["packed"],
           "unpacked_window_s": wall["unpacked"]}
    if peak:
        out["mfu"] = packed.flops.sum() / (wall["packed"] * gpus * peak)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packed", type=Path)
    parser.add_argument("unpacked", type=Path)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs the sweeps ran on (default: this machine's, or 1)")
    parser.add_argument("--on", help="device name, when not measured on this machine")
    parser.add_argument("--at", help="commit the sweeps ran at, when not this checkout's")
    parser.add_argument("--log", type=Path, default=LOG, help="the JSON-lines file to append to")
    args = parser.parse_args(argv)
    specs = {name: load_spec(path) for name, path in (("packed", args.packed), ("unpacked", args.unpacked))}
    runs = {name: trial_runs(spec.name) for name, spec in specs.items()}
    gpus = args.gpus or _gpus_here()
    on = args.on or device()
    figures = compare(runs["packed"], runs["unpacked"], gpus, peak_of(on))
    packed = specs["packed"]
    config = {"packed": str(args.packed), "unpacked": str(args.unpacked), "trials": len(runs["packed"]), "gpus": gpus,
              "share": packed.resources.gpus, "cuda_graph": packed.runtime.cuda_graph, "compile": packed.runtime.compile,
              "mps": under_mps(),
              "flops": "exact", "packed_window_s": round(figures["packed_window_s"], 1),
              "unpacked_window_s": round(figures["unpacked_window_s"], 1)}
    for metric, unit, how in (("speedup_wall", "x", "window time unpacked over packed"),
                              ("mfu", "fraction", "exact FLOPs of the packed sweep over its window x GPUs x bf16 peak")):
        if metric in figures:
            line = append("pack_sweep", metric, round(figures[metric], 4), unit, config | {"how": how}, args.log,
                          on=on, at=args.at)
            print(f"pack_sweep {metric}: {line['value']} {unit}")


def _gpus_here() -> int:
    import torch

    return max(1, torch.cuda.device_count())


if __name__ == "__main__":
    main()

"""How well a finished sweep used its GPUs, from its MLflow store and nvidia-smi samples.

    python -m runners.bench.sweepstats SPEC --util gpu_util.csv [--on DEVICE --at COMMIT]

Appends `benchmark: sweep` figures to results/benchmarks.jsonl. The window runs from the first trial's start
(a trial's MLflow run starts when a worker starts training it) to the last trial's end, so it holds neither the
driver's own start (imports, Ray, the MLflow store) nor the first Ray workers'; it is clipped to the nvidia-smi
samples' span, the device call that ran the sweep (run.sh starts them afresh each call), so a sweep resumed
over several calls is measured over the last one, not over the hours between them:
- wall_s and gpu_hours (wall x GPUs);
- gpu_busy_fraction: mean nvidia-smi utilization.gpu over the window (a kernel was running; not MFU), and
  gpu_busy_fraction_training: the same from the first training step on;
- mfu: the exact training FLOPs done inside the window (each trial's logged FLOPs so far: what it had at the
  window's end less what it had before its start) over wall x GPUs x peak; mean_trial_mfu: the mean of the
  trials' own perf/mfu (each over one whole GPU's peak), of those that ran in the window, as the shares below;
- time_share_<phase>: where the trials' time went (names.TIME_PHASES: setup, first interval, training,
  evaluations, checkpoints, other), as shares of their summed wall time, a pack counted once;
- data_prep_s: what building the token cache the sweep read took (before the window, once per machine: the
  four Gutenberg shards held a GPU call's first two minutes).
run.sh calls it after every sweep stage; --on and --at name the device and commit when it runs elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import timezone
from pathlib import Path

import mlflow
import pandas as pd

from runners.tracking import names
from runners.bench.log import append, device
from runners.data.store import META, prepare_data
from runners.training.step import peak_of
from sweeps.spec import SweepSpec, load_spec


def samples(util_csv: Path) -> pd.DataFrame:
    """nvidia-smi's samples: wall-clock time t (s), GPU index and utilisation (a fraction)."""
    table = pd.read_csv(util_csv, header=None, names=["time", "gpu", "util", "mem"], skipinitialspace=True)
    stamps = pd.to_datetime(table.time, format="%Y/%m/%d %H:%M:%S.%f").dt.tz_localize(timezone.utc)
    table["t"] = stamps.map(lambda t: t.timestamp())
    table["util"] = table.util.str.rstrip(" %").astype(float) / 100
    return table


def busy_fraction(util_csv: Path, window: tuple[float, float]) -> dict[int, float]:
    """Mean utilisation of each GPU between two wall-clock times, as a fraction."""
    table = samples(util_csv)
    inside = table[(table.t >= window[0]) & (table.t <= window[1])]
    return {int(g): round(float(u), 3) for g, u in inside.groupby("gpu").util.mean().items()}


def window(runs: pd.DataFrame) -> tuple[float, float]:
    """A sweep's window from its trial runs: the first trial's start to the last one's end (seconds)."""
    return runs.start.min(), runs.end.max()


def within_samples(runs: pd.DataFrame, util_csv: Path) -> tuple[float, float]:
    """The sweep's window clipped to the span of the nvidia-smi samples (the device call that took them). Where
    the sweep began in an earlier call, this call's part begins at the first training step logged in the span
    (so without the driver's start, the token cache and the first resumed pack's setup)."""
    t = samples(util_csv).t
    start, end = window(runs)
    if start < t.min():
        start = min((s for steps in runs.steps for s in steps if s >= t.min()), default=t.min())
    return start, min(end, t.max())


def flops_between(run_ids: pd.Series, window: tuple[float, float]) -> float:
    """Exact training FLOPs the trials did inside a window, from each one's logged FLOPs so far (steps that a
    trial resumed from a checkpoint trains again count once)."""
    client = mlflow.MlflowClient()
    done = 0.0
    for run_id in run_ids:
        history = [(m.timestamp / 1000, m.value) for m in client.get_metric_history(run_id, names.FLOPS)]
        before = max((v for t, v in history if t < window[0]), default=0.0)
        done += max(max((v for t, v in history if t <= window[1]), default=0.0) - before, 0.0)
    return done


def under_mps() -> bool:
    """Whether this process (and so the sweep it ran after, in run.sh) sees an NVIDIA MPS daemon (MPS=1)."""
    return "CUDA_MPS_PIPE_DIRECTORY" in os.environ


def _seconds(t: pd.Timestamp) -> float:
    return t.timestamp() if pd.notna(t) else float("nan")


def trial_runs(sweep: str) -> pd.DataFrame:
    """The sweep's trial runs: start and end (s), exact FLOPs, mean MFU, the times of its logged training steps
    and the first of them."""
    experiment = mlflow.get_experiment_by_name(sweep)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment named {sweep!r} in {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`{names.TAG_ROLE}` = '{names.ROLE_TRIAL}'")
    if runs.empty:
        raise SystemExit(f"sweep {sweep}: no trial runs in {mlflow.get_tracking_uri()}")
    client = mlflow.MlflowClient()
    steps = [sorted(m.timestamp / 1000 for m in client.get_metric_history(r, names.TRAIN_LOSS)) for r in runs.run_id]
    # a trial that failed before its first step has no loss, one still running no end: NaN, which min/max skip
    first_step = [s[0] if s else float("nan") for s in steps]
    phases = {p: runs.get(f"metrics.{names.time_metric(p)}", pd.Series(float("nan"), index=runs.index))
              for p in names.TIME_PHASES}
    return pd.DataFrame({
        "run_id": runs.run_id, "start": runs.start_time.map(_seconds), "end": runs.end_time.map(_seconds),
        "first_step": first_step, "steps": steps, "flops": runs[f"params.{names.PARAM_FLOPS_EXACT}"].astype(float),
        "mfu": runs.get(f"metrics.{names.MFU}", pd.Series(dtype=float)),
        "task": runs.get(f"tags.{names.TAG_PACK}", pd.Series(None, index=runs.index)).astype(object).fillna(runs.run_id),
        **phases,
    })


def time_shares(runs: pd.DataFrame) -> dict[str, float]:
    """Each phase's share of the trials' summed wall time (names.TIME_PHASES but total), a pack counted once by
    its last member to end (members share one process's time; one that diverged or was pruned logs it sooner);
    trials that logged no times are left out."""
    tasks = runs.dropna(subset=["total"]).sort_values("total").groupby("task").last()
    total = tasks.total.sum()
    return {p: float(tasks[p].sum() / total) for p in names.TIME_PHASES if p != "total"} if total > 0 else {}


def data_prep_seconds(spec: SweepSpec) -> float:
    """Seconds that splitting, reading the tokenizer and tokenizing took when the sweep's token cache was built."""
    meta = json.loads((prepare_data(spec.data).directory / META).read_text())
    return meta["split_and_tokenizer_seconds"] + meta["tokenize_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", type=Path)
    parser.add_argument("--util", type=Path, required=True, help="nvidia-smi samples: timestamp, index, utilization, memory")
    parser.add_argument("--on", help="device name, when not measured on this machine")
    parser.add_argument("--at", help="commit the sweep ran at, when not this checkout's")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    runs = trial_runs(spec.name)
    start, end = within_samples(runs, args.util)
    runs = runs[~(runs.end < start)]  # those that ran in this call (one still running has no end)
    wall = end - start
    flops = flops_between(runs.run_id, (start, end))
    busy = busy_fraction(args.util, (start, end))
    first_step = max(runs.first_step.min(), start)
    busy_training = busy_fraction(args.util, (first_step, end))
    gpus = len(busy)
    on = args.on or device()
    peak = peak_of(on)
    if peak is None:
        raise SystemExit(f"--on {on!r}: no bf16 peak known for it (runners.training.step.PEAK_BF16_FLOPS)")
    config = {"spec": str(args.spec), "trials": len(runs), "gpus": gpus, "share": spec.resources.gpus,
              "compile": spec.runtime.compile, "mps": under_mps(), "wall_s": round(wall, 1), "flops_exact": flops,
              "note": "window: first trial started to last trial ended (MLflow run times), inside the nvidia-smi samples"}
    figures = [
        ("wall_s", wall, "s", {}),
        ("gpu_hours", wall * gpus / 3600, "GPU-h", {"how": f"wall x {gpus} GPUs"}),
        ("gpu_busy_fraction", sum(busy.values()) / gpus, "fraction", {"per_gpu": busy}),
        ("gpu_busy_fraction_training", sum(busy_training.values()) / gpus, "fraction",
         {"per_gpu": busy_training, "how": f"from the first training step, {first_step - start:.1f} s into the window"}),
        ("mfu", flops / (wall * gpus * peak), "fraction", {"how": f"exact FLOPs / (wall x {gpus} x {peak:.3g})"}),
        ("mean_trial_mfu", float(runs.mfu.mean()), "fraction", {"how": "mean of the trials' perf/mfu"}),
    ] + [(f"time_share_{phase}", share, "fraction", {"how": "of the trials' summed wall time, a pack once"})
         for phase, share in time_shares(runs).items()] + [
        ("data_prep_s", data_prep_seconds(spec), "s", {"how": "building the token cache, before the window (once per machine)"})]
    for metric, value, unit, extra in figures:
        line = append("sweep", metric, round(float(value), 4), unit, config | extra, on=on, at=args.at)
        print(f"sweep {metric}: {line['value']} {unit}")


if __name__ == "__main__":
    main()

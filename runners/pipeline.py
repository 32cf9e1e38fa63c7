"""The whole job, stage by stage: plan a spec, run its trials, collect points, fit and export the law."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import ray
import yaml
from rich.console import Console
from rich.markup import escape

from fitting.errors import FitInputError
from runners.tracking import names
from runners.tracking.collect import collect_points
from runners.tracking.results import publish
from runners.tracking.labels import trial_run_name
from runners.planview import plan_view
from runners.data.store import content_hash, prepare_data, vocab_size_of
from runners.job import refuse_if_lost
from runners.scheduling.resources import (GANG_EFFICIENCY, estimated_hours, gang_size, gpu_share, pack_capacity,
                                         tasks, time_target_warning)
from runners.scheduling.search import GridSource, SearchSource
from runners.scheduling.sweep import SweepOutcome, connect, run_trials
from runners.tracking.runs import SweepRuns, ui_base_url
from sweeps.expand import Cell, HparamsAt, PlannedTrial, cells, expand
from sweeps.errors import SpecError
from sweeps.spec import SweepSpec

# Wide when printing to a file or pipe, where rich would otherwise assume 80 columns and squash the tables.
console = Console() if sys.stdout.isatty() else Console(width=200)

# Rough sustained training FLOP/s, for the plan's time estimate only: one CPU core at fp32 on tiny
# models, and an H100 at 30% MFU. The real figures are logged per trial as perf/tokens_per_s.
ASSUMED_FLOPS_PER_S = {"cpu": 1.5e10, "cuda": 0.3 * 989e12}


def _hparams_at(spec: SweepSpec) -> HparamsAt | None:
    if spec.hparams_law is None:
        return None
    from fitting import hparams_at, load_law

    law = load_law(spec.hparams_law)
    c_of = {"6N": "train_6N", "exact": "train_exact"}[spec.fit.flops]
    # N and C under the conventions this spec's fits use (its hparams law should have been fitted the same way).
    return lambda params, d, per_token: hparams_at(law, N=getattr(params, spec.fit.params), D=d,
                                                   C=getattr(per_token, c_of) * d)


def hparams_caveats(spec: SweepSpec, planned: list[PlannedTrial]) -> list[str]:
    """What `lr: auto` / `batch_size: auto` rest on, where it is shaky (fitting.hparams.caveats)."""
    if spec.hparams_law is None:
        return []
    from fitting import load_law
    from fitting.hparams import caveats

    law = load_law(spec.hparams_law)
    C = [p.flops_6N if spec.fit.flops == "6N" else p.flops_exact for p in planned]
    return caveats(law.hparams or {}, C)


def plan(spec: SweepSpec) -> list[PlannedTrial]:
    """The grid's trials; for a search sweep, one trial per scale at the middle of the searched ranges."""
    if spec.search is None:
        return expand(spec, vocab_size=vocab_size_of(spec.data), content_hash=content_hash(spec.data),
                      hparams_at=_hparams_at(spec))
    search, t = spec.search, spec.train
    lr = math.sqrt(search.lr[0] * search.lr[1]) if search.lr else t.lr[0]
    return [c.trial(lr, _search_batch(spec, c.model.seq_len), seed) for c in _cells(spec) for seed in t.seeds]


def _search_batch(spec: SweepSpec, seq_len: int) -> int:
    if spec.search.batch_size is None:
        return spec.train.batch_size[0]
    return max(1, round(math.sqrt(spec.search.batch_size[0] * spec.search.batch_size[1]) / seq_len)) * seq_len


def _cells(spec: SweepSpec) -> list[Cell]:
    return cells(spec, vocab_size=vocab_size_of(spec.data), content_hash=content_hash(spec.data))


def source(spec: SweepSpec) -> GridSource | SearchSource:
    """Where the run's trials come from: the expanded grid, or an Optuna study per scale."""
    return SearchSource(spec, _cells(spec)) if spec.search else GridSource(plan(spec))


def _device(spec: SweepSpec) -> str:
    if spec.runtime.device != "auto":
        return spec.runtime.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _plan_gpu_memory(spec: SweepSpec) -> int | None:
    """The GPU memory the plan packs and sizes gangs by: only what resources.gpu_memory_gb declares."""
    return int(spec.resources.gpu_memory_gb * 2**30) if spec.resources.gpu_memory_gb else None


def plan_peak_flops(spec: SweepSpec) -> float | None:
    """One GPU's bf16 peak for the plan's estimates and time target (gpus 'auto' with max_hours): declared
    (resources.peak_tflops: a GPU sweep planned on a laptop), else this machine's GPU's; None without either (the
    plan then estimates CPU time and sizes gangs by memory alone; the run asks its GPUs)."""
    r = spec.resources
    if r.peak_tflops:
        return r.peak_tflops * 1e12
    import torch

    if _device(spec) != "cuda" or not torch.cuda.is_available():  # a cuda spec planned where there is none
        return None
    from runners.training.step import peak_flops

    return peak_flops(torch.device("cuda", torch.cuda.current_device()))


def _plan_packs(spec: SweepSpec, planned: list[PlannedTrial], gpu_mem: int | None,
                peak: float | None) -> dict[str, tuple[int, int]]:
    """trial id -> (pack number from 1, pack size), as the run will pack the grid (its memory cap only where
    resources.gpu_memory_gb says the GPU's memory). A search row stands for its study's trials asked at once:
    a pack of search.parallel (capped) when only lr is searched, one each when batch size is. A gang is never
    packed."""
    if spec.search is None:
        grouped = tasks(planned, lambda p: p, spec.resources, spec.runtime, gpu_mem, peak)
        return {p.trial_id: (n, len(pack)) for n, pack in enumerate(grouped, 1) for p in pack}
    size = 1 if spec.search.batch_size else spec.search.parallel
    return {p.trial_id: (n, 1 if gang_size(p, spec.resources, spec.runtime, gpu_mem, peak) > 1 else
                         min(size, pack_capacity(p, spec.runtime, gpu_mem))) for n, p in enumerate(planned, 1)}


def _plan_gpus(spec: SweepSpec, p: PlannedTrial, workers: int, members: int, gpu_mem: int | None) -> float:
    """GPUs the trial's task takes: a gang's W, a declared share, the share its pack's memory takes where the GPU's
    memory is declared; NaN where the plan cannot say (a share up to one GPU, from the memory the run measures)."""
    if workers > 1:
        return float(workers)
    if spec.resources.gpus != "auto":
        return float(spec.resources.gpus)
    return gpu_share(p, spec.runtime, "auto", gpu_mem, members) if gpu_mem else math.nan


def plan_table(spec: SweepSpec, planned: list[PlannedTrial]) -> pd.DataFrame:
    """One row per trial: identity, its pack, its GPUs, counts under every convention, compute and estimated
    time (under the time target, on its GPUs at resources.assumed_mfu)."""
    rate = ASSUMED_FLOPS_PER_S[_device(spec)] * (spec.resources.cpus if _device(spec) == "cpu" else 1)
    gpu_mem, peak = _plan_gpu_memory(spec), plan_peak_flops(spec)
    in_pack = _plan_packs(spec, planned, gpu_mem, peak)
    rows = []
    for p in planned:
        m, t = p.trial.model, p.trial.train
        workers = gang_size(p, spec.resources, spec.runtime, gpu_mem, peak)
        rows.append({
            "pack": in_pack[p.trial_id][0], "pack_size": in_pack[p.trial_id][1],
            "gpus": _plan_gpus(spec, p, workers, in_pack[p.trial_id][1], gpu_mem),
            "trial_id": p.trial_id, "name": trial_run_name(p), "family": m.family, "E": m.n_experts,
            "N_total": p.params.total, "N_nonembed": p.params.nonembed, "N_active": p.params.active,
            "D": p.D, "budget": p.trial.budget, "flops_6N": p.flops_6N, "flops_exact": p.flops_exact,
            "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
            "lr": t.lr, "batch_size": t.batch_size, "seed": t.seed, "branches": " ".join(map(str, t.schedule.branches)),
            "unique_tokens": p.trial.data.unique_tokens,
            "epochs": p.D / p.trial.data.unique_tokens if p.trial.data.unique_tokens else None,
            "est_seconds": (estimated_hours(p, workers, spec.resources, peak) * 3600 if peak
                            else p.compute_exact / rate),
        })
    table = pd.DataFrame(rows)
    if not (peak or gpu_mem or (table.gpus > 1).any()):  # nothing to say beyond 'a share, by memory'
        table["gpus"] = math.nan
    if spec.search is not None:  # one row per scale, standing for that many Optuna trials
        searched = [k for k in ("lr", "batch_size") if getattr(spec.search, k)]
        table[searched] = "search"
        table["trial_id"] = "(search)"
        table["est_seconds"] *= spec.search.trials
    return table


def print_caveats(spec: SweepSpec, planned: list[PlannedTrial]) -> None:
    for line in hparams_caveats(spec, planned):
        console.print(f"[yellow]warning[/]: {spec.hparams_law}: {line}")
    missed = time_target_warning(planned, spec.resources, spec.runtime, _plan_gpu_memory(spec), plan_peak_flops(spec))
    if missed:
        console.print(f"[yellow]warning[/]: {missed}")


def print_plan(spec: SweepSpec, table: pd.DataFrame) -> None:
    """The plan at the terminal's width (runners/planview.py), packs first; `--format csv` has every column."""
    title = (f"{len(table)} trials in {table.pack.nunique()} Ray tasks" if spec.search is None
             else f"{len(table)} scales searched (trials asked together train as a pack where they share a shape)")
    console.print(plan_view(f"sweep {spec.name}: {title}", table, console.width))
    if (table.pack_size > 1).any():
        console.print("K: trials in a pack, trained as one model in one Ray task (runtime.pack, max_pack).")
    if spec.search is not None:
        console.print(f"search: {spec.search.trials} Optuna trials per row ({spec.search.sampler}, pruner "
                      f"{spec.search.pruner}); totals and estimates count them all")
    r, peak = spec.resources, plan_peak_flops(spec)
    if r.gpus == "auto" and r.max_hours:
        console.print(f"GPUs: the fewest (a power of two{f', at most {r.max_gpus}' if r.max_gpus else ''}) that hold "
                      f"a trial and train it within max_hours {r.max_hours:g}, est. time at {r.assumed_mfu:g} MFU of "
                      f"{peak / 1e12:.3g} TFLOP/s a GPU (x{GANG_EFFICIENCY:g} in a gang)" if peak else
                      "GPUs: from memory alone here: no GPU and no resources.peak_tflops for the max_hours target "
                      "(the run reads the peak from its GPUs' name)")
    duration = (f"about {table.est_seconds.sum() / 3600:.2g} GPU-hours at {r.assumed_mfu:g} MFU of "
                f"{peak / 1e12:.3g} TFLOP/s (resources.assumed_mfu)" if peak else
                f"about {table.est_seconds.sum() / 60:.1f} trial-minutes at {r.cpus:g} CPU(s) a trial, divided by "
                "how many run at once")
    trials = spec.search.trials if spec.search is not None else 1  # a search row stands for that many trials
    console.print(f"total: {trials * table.flops_6N.sum():.3g} FLOPs (6N), {trials * table.flops_exact.sum():.3g} "
                  f"FLOPs (exact); {duration}. N = active non-embedding parameters.")


def export(spec: SweepSpec, runs: SweepRuns) -> Path:
    """Points from MLflow -> results/<sweep>/ (spec.yaml, points.csv, law.json, plots), also logged on the
    sweep's run. spec.yaml is the spec as validated, every default written out, so the folder alone says what
    produced it."""
    from fitting.export import export_laws

    points = collect_points(runs, spec.fit)
    if points.empty:
        raise FitInputError(f"sweep {spec.name}: no trial has logged a validation loss yet, so there is nothing to "
                            "export; train some first (`scaling run` the spec)")
    out = spec.results_dir / spec.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False, default_flow_style=None))
    points.to_csv(out / "points.csv", index=False)
    meta = {"sweep": spec.name, "data_content_hash": content_hash(spec.data),
            "N": spec.fit.params, "C": spec.fit.flops, "loss": "validation nats per token"}
    summary = export_laws(points, out, meta=meta, bootstrap=spec.fit.bootstrap)
    publish(runs, out)
    runs.log_summary(summary.doc)
    summary.print(console)
    return out


def run(spec: SweepSpec, *, address: str | None, fit: bool = True, cache_dir: Path | None = None) -> int:
    """Plan, run what is not done yet, and export. Exit code: 0 when every trial ended in a done state.
    The sweep's parent run ends with it: FINISHED (exit 0), KILLED (interrupted) or FAILED."""
    refuse_if_lost(spec)
    trials = source(spec)
    console.print(f"sweep {spec.name}: {trials.total} trials planned")
    if isinstance(trials, GridSource):
        print_caveats(spec, trials.planned)
    runs = SweepRuns(spec.name, description=spec.description)  # the store and experiment, before any worker opens it
    runs.sweep_started()
    ended = names.FAILED
    try:
        code = _run(spec, trials, runs, address=address, fit=fit, cache_dir=cache_dir)
        ended = {0: names.FINISHED, 130: names.KILLED}.get(code, names.FAILED)
        return code
    except KeyboardInterrupt:
        ended = names.KILLED
        raise
    finally:
        runs.sweep_ended(ended)


def _run(spec: SweepSpec, trials, runs: SweepRuns, *, address: str | None, fit: bool, cache_dir: Path | None) -> int:
    data = prepare_data(spec.data, cache_dir)  # tokenize once here, so the trials find the cache and bad data fails early
    for unique in spec.data.unique_tokens or []:  # a budget beyond the split: one line now, not a failed trial each
        data.with_unique_tokens(unique, spec.model.seq_len)
    started = connect(address)
    try:
        if spec.runtime.device == "cuda" and not ray.cluster_resources().get("GPU"):
            raise SpecError("runtime.device: 'cuda' but the Ray cluster has no GPUs; use 'auto' or 'cpu'")
        # A share of a GPU (a gang of W >= 2 runs as W CPU processes instead): a cluster we joined may still add
        # GPU nodes, but the Ray started here never will, and would hold the trials waiting forever.
        gpus = spec.resources.gpus
        if started and gpus != "auto" and 0 < gpus < 2 and not ray.cluster_resources().get("GPU"):
            raise SpecError(f"resources.gpus: {gpus:g} of a GPU a trial, but this machine has no GPU; use 'auto' "
                            "(or 0) to train here on the CPU, or submit to a cluster with GPUs (RAY_ADDRESS)")
        outcome = run_trials(spec, trials, runs, cache_dir=cache_dir)
    finally:
        if started:
            ray.shutdown()
    _print_outcome(outcome)
    _print_link(runs)
    if outcome.interrupted:
        console.print("stopped: running trials were checkpointed and marked killed; run the same command to resume")
        return 130
    if fit:
        export(spec, runs)
    return 0 if not outcome.errors else 1


def _print_link(runs: SweepRuns) -> None:
    """Where the sweep's trials are in the MLflow UI: its runs page filtered to them (runners.tracking.runs)."""
    base = ui_base_url(runs.uri)
    served = "" if base == runs.uri.rstrip("/") else " (after `scaling ui`)"
    console.print(f"trials in the MLflow UI{served}: {runs.trials_url(base)}", soft_wrap=True, highlight=False)


def _print_outcome(outcome: SweepOutcome) -> None:
    counts: dict[str, int] = {}
    for s in outcome.statuses.values():
        counts[s] = counts.get(s, 0) + 1
    console.print("trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                  + (f" ({outcome.skipped} already done, not trained again)" if outcome.skipped else ""))
    for trial_id, error in outcome.errors.items():
        console.print(f"  failed {trial_id}: {escape(error)}")  # errors quote paths in [brackets]


def status(spec: SweepSpec) -> pd.DataFrame:
    """Each trial's state from MLflow: every run the sweep has, and the grid's trials not started (pending)."""
    existing = SweepRuns(spec.name).runs(names.ROLE_TRIAL)
    rows = []
    for trial_id, run in existing.items():
        p, tags = run.data.params, run.data.tags
        rows.append({"trial_id": trial_id, "N_active": int(p.get(names.PARAM_N_ACTIVE, 0)), "D": int(p.get(names.PARAM_D, 0)),
                     "lr": float(p.get("train.lr", "nan")), "status": tags.get(names.TAG_STATUS, names.PENDING),
                     "val_loss": run.data.metrics.get(names.VAL_LOSS), "error": tags.get(names.TAG_ERROR, "")})
    if spec.search is None:
        rows += [{"trial_id": p.trial_id, "N_active": p.params.active, "D": p.D, "lr": p.trial.train.lr,
                  "status": names.PENDING, "val_loss": None, "error": ""}
                 for p in plan(spec) if p.trial_id not in existing]
    return pd.DataFrame(rows)


def write_plan_csv(table: pd.DataFrame, path: Path | None) -> None:
    text = table.to_csv(index=False)
    if path is None:
        print(text, end="")
    else:
        path.write_text(text)

"""Benchmark of packs (issue 19): K small models trained as one stacked model against one alone and K processes.

    python -m runners.bench.pack [--quick] [--members 4,16,32] [--d-model 64,128,256] [--steps N]
        [--cudagraphs] [--graph] [--compile on|off] [--mps] [--no-processes] [--max-processes N] [--profile]

For each width and pack size K: tokens/s of one model alone (runners.bench.step's loop, the trainer's step),
of K members in one pack (runners.training.pack's engine: stacked model, per-member AdamW, the trainer's
update), and of K separate processes each running the single-model loop at once (started together after
their warm-up; `--mps` runs them under an MPS daemon of this benchmark's own, started and stopped here).
Every model sees 8,192-token batches (32 sequences of 256) and a 4,096-token vocabulary, compiled on CUDA
(`--cudagraphs`: mode reduce-overhead, CUDA graphs, for the forward and backward; `--graph`: the pack's whole
step as one CUDA graph, runtime.cuda_graph; `--compile off`: the pack eager). Each of the K processes compiles
its own model (from the shared inductor cache after the first); K above `--max-processes` (16, the machine's
CPU cores) is compared with that many at once, as a sweep would run those K trials in waves. Appends to
results/benchmarks.jsonl, benchmark `pack`: `tokens_per_s` (all members together), `speedup_vs_single`,
`speedup_vs_processes` (or `speedup_vs_mps`), and `mfu` (exact training FLOPs per token from
models.accounting, over the device's bf16 dense peak). On CPU, `--quick` runs a tiny shape in fp32 in
seconds, to check that the benchmark runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from models import ModelConfig, flops_per_token
from runners.bench.log import LOG, append
from runners.bench.step import Shape, gpu_time_by_kind, time_step
from runners.bench.sweep import mps_daemon
from runners.training.graph import WARMUP as GRAPH_WARMUP
from runners.training.pack import PackedEngine
from runners.training.step import peak_flops
from sweeps.trial import DataConfig, Runtime, TrainConfig, TrialConfig

LAYERS = {64: 4, 128: 4, 256: 6}  # the stacked-model probe's shapes (shared/FACTS.md)
SEQ, SEQS, VOCAB = 256, 32, 4096  # 8,192-token batches
QUICK = dict(seq=32, seqs=4, vocab=256)


def model_config(d: int, quick: bool) -> ModelConfig:
    seq, vocab = (QUICK["seq"], QUICK["vocab"]) if quick else (SEQ, VOCAB)
    return ModelConfig(d_model=d, n_layers=2 if quick else LAYERS.get(d, 4), n_heads=max(1, d // 64), d_ff=4 * d,
                       vocab_size=vocab, seq_len=seq)


def time_pack(cfg: ModelConfig, k: int, seqs: int, device: torch.device, compiled: bool, mode: str | None,
              steps: int, warmup: int, graph: bool = False, profile: bool = False) -> float:
    """Tokens/s of all K members together, through the trainer's pack engine (members differ in lr and seed;
    `graph`: runtime.cuda_graph, its warm-up steps and capture inside the untimed warm-up; `profile`: then
    prints where the GPU time of three more steps went, as runners.bench.step does)."""
    trials = [TrialConfig(model=cfg, data=DataConfig(), train=TrainConfig(tokens=1, batch_size=seqs * cfg.seq_len,
                                                                           lr=1e-4 * (1 + i), seed=i))
              for i in range(k)]
    engine = PackedEngine(trials, Runtime(compile=compiled, cuda_graph=graph), device, compile_mode=mode)
    tokens = torch.randint(0, cfg.vocab_size, (k, seqs, cfg.seq_len + 1), device=device)
    batch = [(tokens[..., :-1], tokens[..., 1:])]
    lrs = [t.train.lr for t in trials]

    def run(n: int) -> None:
        for _ in range(n):
            engine.train_step(batch, lrs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(warmup + GRAPH_WARMUP if graph else warmup)
    started = time.perf_counter()
    run(steps)
    tokens_per_s = k * steps * seqs * cfg.seq_len / (time.perf_counter() - started)
    if profile and device.type == "cuda":
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(3)
        print(f"pack d{cfg.d_model} K{k}: {gpu_time_by_kind(prof.key_averages())}", flush=True)
    return tokens_per_s


def time_processes(d: int, k: int, args: argparse.Namespace, env: dict[str, str]) -> float:
    """Tokens/s of K processes each training one model (this module's --worker), timed from the moment all
    of them have warmed up (and are told to go) to the last one's end."""
    command = [sys.executable, "-m", "runners.bench.pack", "--worker", str(d), "--steps", str(args.steps),
               *(["--quick"] if args.quick else []), *(["--cudagraphs"] if args.cudagraphs else [])]
    workers = [subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
               for _ in range(k)]
    try:
        for w in workers:
            if w.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a benchmark worker died during its warm-up (exit {w.wait()})")
        for w in workers:
            w.stdin.write("go\n")
            w.stdin.flush()
        spans = [json.loads(w.stdout.readline()) for w in workers]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    return sum(s["tokens"] for s in spans) / (max(s["end"] for s in spans) - min(s["start"] for s in spans))


def worker(d: int, args: argparse.Namespace) -> None:
    """One model's loop, waiting after its warm-up for the parent's go; prints its tokens and wall-clock span."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    cfg, seqs = model_config(d, args.quick), QUICK["seqs"] if args.quick else SEQS
    span = {}

    def wait_for_go() -> None:
        print("ready", flush=True)
        sys.stdin.readline()
        span["start"] = time.time()

    time_step(Shape(cfg, seqs), device, device.type == "cuda", args.steps, args.warmup, args.mode,
              loss_chunk=Runtime().loss_chunk, bf16_residual=Runtime().bf16_residual, before_timing=wait_for_go)
    span |= {"end": time.time(), "tokens": args.steps * seqs * cfg.seq_len}
    print(json.dumps(span), flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny shape, K 2, few steps (a check that it runs)")
    parser.add_argument("--members", default=None, help="pack sizes K, comma-separated (default 4,16,32; quick 2)")
    parser.add_argument("--d-model", default=None, help="widths, comma-separated (default 64,128,256; quick 64)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20, quick 2)")
    parser.add_argument("--cudagraphs", action="store_true", help="torch.compile mode reduce-overhead (CUDA graphs)")
    parser.add_argument("--graph", action="store_true",
                        help="the pack's whole step as one CUDA graph (runtime.cuda_graph; the processes as they are)")
    parser.add_argument("--compile", choices=["on", "off"], default="on",
                        help="torch.compile for the pack on CUDA (the single model and processes stay compiled)")
    parser.add_argument("--mps", action="store_true", help="the K processes under an MPS daemon (GPU)")
    parser.add_argument("--profile", action="store_true", help="print where a pack step's GPU time went (GPU)")
    parser.add_argument("--no-processes", action="store_true", help="skip the K-process comparison")
    parser.add_argument("--max-processes", type=int, default=16,
                        help="most processes at once: K trials above it run in waves of this many, as a sweep packed at "
                        "a GPU share of 1/this would, so they go as fast as this many (16: one per CPU core of the "
                        "H200 machine)")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # a process of the K-process comparison
    parser.add_argument("--log", type=Path, default=LOG, help="the JSON-lines file to append to")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 20)
    args.warmup = 1 if args.quick else 5
    args.mode = "reduce-overhead" if args.cudagraphs else None
    if args.worker:
        return worker(args.worker, args)
    try:
        members = [int(k) for k in (args.members or ("2" if args.quick else "4,16,32")).split(",")]
        widths = [int(d) for d in (args.d_model or ("64" if args.quick else "64,128,256")).split(",")]
    except ValueError:
        parser.error("--members and --d-model take whole numbers, comma-separated, e.g. --members 4,16")
    if min(members) < 1 or min(widths) < 8:
        parser.error("--members needs K >= 1 and --d-model widths >= 8")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if (args.mps or args.graph) and device.type != "cuda":
        parser.error("--mps and --graph need a CUDA device")
    compiled = device.type == "cuda"
    pack_compiled = compiled and args.compile == "on"
    seqs = QUICK["seqs"] if args.quick else SEQS
    peak = peak_flops(device)
    for d in widths:
        cfg = model_config(d, args.quick)
        single = time_step(Shape(cfg, seqs), device, compiled, args.steps, args.warmup, args.mode,
                           loss_chunk=Runtime().loss_chunk, bf16_residual=Runtime().bf16_residual)["tokens_per_s"]
        by_count: dict[int, float] = {}  # tokens/s of n processes at once, measured once per width
        for k in members:
            packed = time_pack(cfg, k, seqs, device, pack_compiled, args.mode, args.steps, args.warmup, args.graph,
                               args.profile)
            config = {"d_model": d, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "d_ff": cfg.d_ff,
                      "seq_len": cfg.seq_len, "vocab": cfg.vocab_size, "members": k, "batch_tokens": seqs * cfg.seq_len,
                      "compile": pack_compiled and (args.mode or True), "cuda_graph": args.graph, "steps": args.steps,
                      "dtype": "bf16 autocast" if compiled else "fp32", "flops": "exact",
                      "single_tokens_per_s": round(single, 1)}
            figures = {"tokens_per_s": (packed, "tokens/s"), "speedup_vs_single": (packed / single, "x")}
            if peak:
                figures["mfu"] = (flops_per_token(cfg).train_exact * packed / peak, "fraction of peak")
            if not args.no_processes:
                n = min(k, args.max_processes)
                if n not in by_count:
                    daemon = mps_daemon(Path(tempfile.mkdtemp(prefix="mps-"))) if args.mps else contextlib.nullcontext({})
                    with daemon as mps:
                        by_count[n] = time_processes(d, n, args, os.environ | mps)
                config |= {"processes_at_once": n, "processes_tokens_per_s": round(by_count[n], 1),
                           "processes_compile": compiled and (args.mode or True)}
                figures["speedup_vs_mps" if args.mps else "speedup_vs_processes"] = (packed / by_count[n], "x")
            for metric, (value, unit) in figures.items():
                append("pack", metric, round(value, 4), unit, config, args.log)
            print("pack", f"d{d} L{cfg.n_layers} K{k}", {m: round(v, 4) for m, (v, _) in figures.items()}, flush=True)


if __name__ == "__main__":
    main()

"""Speed benchmarks of the MoE code; each figure is appended to results/benchmarks.jsonl.

    python -m models.bench [--quick] [--compile] moe_layer|moe_step [...]

moe_layer: one MoE layer's forward + backward, grouped dispatch against the plain per-expert loop
(E = 8, top-2, d_model 512, expert hidden 1408, 65,536 tokens, bf16 on CUDA).
moe_step: a whole MoE model's training step against the dense model with the same active parameters
(every expert as wide as the dense FFN / top_k), tokens per second.
--quick shrinks both to seconds on a CPU (fp32 there; bf16 autocast on CUDA).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from models.accounting import count_params, flops_per_token
from models.config import ModelConfig, MoEConfig
from models.model import build_model
from models.moe import MoE


def _device() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.cuda.get_device_name()
    return torch.device("cpu"), "cpu"


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _seconds_per_call(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def moe_layer(quick: bool, compile: bool, device: torch.device) -> list[tuple[str, float, str, dict]]:
    d_model, hidden, n_tokens = (64, 128, 1024) if quick else (512, 1408, 65536)
    moe = MoEConfig(n_experts=8, top_k=2)
    layer = MoE(d_model, hidden, moe).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(n_tokens, d_model, device=device, requires_grad=True)
    flops = 3 * n_tokens * (2 * d_model * moe.n_experts + 2 * moe.top_k * 3 * d_model * hidden)
    timings = {}
    for dispatch in ("grouped", "loop"):
        layer.dispatch = dispatch
        run = torch.compile(layer) if compile else layer

        def step() -> None:
            with _autocast(device):
                y, aux, _ = run(x)
            (y.float().square().mean() + aux).backward()

        timings[dispatch] = _seconds_per_call(step, device, warmup=1 if quick else 5, iters=2 if quick else 20)
    config = {"n_experts": 8, "top_k": 2, "d_model": d_model, "hidden": hidden, "tokens": n_tokens,
              "dtype": "bf16" if device.type == "cuda" else "fp32", "compile": compile, "pass": "forward+backward"}
    return [
        ("tflops_grouped", flops / timings["grouped"] / 1e12, "TFLOP/s", config),
        ("tflops_loop", flops / timings["loop"] / 1e12, "TFLOP/s", config),
        ("speedup_vs_loop", timings["loop"] / timings["grouped"], "x", config),
    ]


def moe_step(quick: bool, compile: bool, device: torch.device) -> list[tuple[str, float, str, dict]]:
    moe = MoEConfig(n_experts=8, top_k=2)
    shape = (dict(d_model=32, n_layers=1, n_heads=2, d_ff=64, vocab_size=256, seq_len=32) if quick
             else dict(d_model=512, n_layers=8, n_heads=8, d_ff=1408, vocab_size=32768, seq_len=1024))
    seqs = 2 if quick else 32
    sparse = ModelConfig(family="moe", moe=moe, **shape)
    dense = ModelConfig(**shape | {"d_ff": shape["d_ff"] * moe.top_k})  # same active FFN parameters
    rates = {}
    for name, cfg in (("moe", sparse), ("dense", dense)):
        model = build_model(cfg).to(device)
        run = torch.compile(model) if compile else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        idx = torch.randint(0, cfg.vocab_size, (seqs, cfg.seq_len), device=device)

        def step() -> None:
            with _autocast(device):
                out = run(idx, idx)
            (out.loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        rates[name] = seqs * cfg.seq_len / _seconds_per_call(step, device, warmup=1 if quick else 5, iters=2 if quick else 15)
    config = {"moe": moe.model_dump(), **shape, "dense_d_ff": dense.d_ff, "batch_seqs": seqs, "compile": compile,
              "N_active_moe": count_params(sparse).active, "N_dense": count_params(dense).nonembed,
              "flops_per_token_moe": flops_per_token(sparse).train_exact,
              "flops_per_token_dense": flops_per_token(dense).train_exact,
              "dtype": "bf16" if device.type == "cuda" else "fp32"}
    return [
        ("tokens_per_s_moe", rates["moe"], "tokens/s", config),
        ("tokens_per_s_dense", rates["dense"], "tokens/s", config),
        ("throughput_vs_dense", rates["moe"] / rates["dense"], "x", config),
    ]


BENCHMARKS = {"moe_layer": moe_layer, "moe_step": moe_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m models.bench", description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile what is timed")
    parser.add_argument("--jsonl", type=Path, default=Path("results/benchmarks.jsonl"), help="file to append to")
    args = parser.parse_args(argv)
    device, device_name = _device()
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    for benchmark in args.benchmarks:
        for metric, value, unit, config in BENCHMARKS[benchmark](args.quick, args.compile, device):
            record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": device_name, "commit": _commit(), "benchmark": benchmark, "metric": metric,
                      "value": round(value, 4), "unit": unit, "config": config | {"quick": args.quick}}
            print(json.dumps(record))
            with args.jsonl.open("a") as f:
                f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()

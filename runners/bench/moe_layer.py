"""Speed of the MoE layer; each figure is appended to results/benchmarks.jsonl through runners.bench.log.

    python -m runners.bench.moe_layer [--quick] [--compile] moe_layer

moe_layer: one MoE layer's forward + backward, grouped dispatch against the plain per-expert loop
(E = 8, top-2, d_model 512, expert hidden 1408, 65,536 tokens, bf16 autocast on CUDA). The whole
model's step against dense (moe_step) is runners.bench.step's. --quick shrinks it to seconds on a CPU
(fp32 there, where grouped products run on torch's CPU fallback).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from models.config import MoEConfig
from models.moe import MoE
from runners.bench.log import LOG, append


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


def moe_layer(quick: bool, compile: bool, device: torch.device) -> list[tuple[str, float, str, dict]]:
    d_model, hidden, n_tokens = (64, 128, 1024) if quick else (512, 1408, 65536)
    moe = MoEConfig(n_experts=8, top_k=2)
    layer = MoE(d_model, hidden, moe).to(device)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(n_tokens, d_model, device=device, requires_grad=True)
    # Exact training FLOPs of the layer: router and the top-2 experts' SwiGLU, forward x 3.
    flops = 3 * n_tokens * (2 * d_model * moe.n_experts + 2 * moe.top_k * 3 * d_model * hidden)
    seconds = {}
    for dispatch in ("grouped", "loop"):
        layer.dispatch = dispatch
        run = torch.compile(layer) if compile else layer

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                y, aux, _ = run(x)
            (y.float().square().mean() + aux).backward()

        seconds[dispatch] = _seconds_per_call(step, device, warmup=1 if quick else 5, iters=2 if quick else 20)
    config = {"n_experts": 8, "top_k": 2, "d_model": d_model, "hidden": hidden, "tokens": n_tokens, "quick": quick,
              "dtype": "bf16" if device.type == "cuda" else "fp32", "compile": compile, "pass": "forward+backward"}
    return [
        ("tflops_grouped", flops / seconds["grouped"] / 1e12, "TFLOP/s", config),
        ("tflops_loop", flops / seconds["loop"] / 1e12, "TFLOP/s", config),
        ("speedup_vs_loop", seconds["loop"] / seconds["grouped"], "x", config),
    ]


BENCHMARKS = {"moe_layer": moe_layer}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runners.bench.moe_layer", description=__doc__.splitlines()[0])
    parser.add_argument("benchmarks", nargs="+", choices=sorted(BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: seconds on a CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the layer")
    parser.add_argument("--jsonl", type=Path, default=LOG, help="file to append to")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for benchmark in args.benchmarks:
        for metric, value, unit, config in BENCHMARKS[benchmark](args.quick, args.compile, device):
            print(json.dumps(append(benchmark, metric, round(value, 4), unit, config, path=args.jsonl)))


if __name__ == "__main__":
    main()

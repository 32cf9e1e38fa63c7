"""Benchmark of the full training step (forward, backward, clip, AdamW) that `run_trial` runs.

    python -m runners.bench.step [--quick] [--steps N] [--micro SEQS] [--accum K] [--loss-chunk TOKENS]
        [--residual bf16|fp32] [--attention auto|sdpa|flash4] [--head-dim H] [--d-model D ...]
        [--compile both|on|off] [--profile] dense_step moe_step

Each benchmark runs its shapes with and without torch.compile and appends tokens/s, MFU (exact
training FLOPs per token x tokens/s over the device's bf16 dense peak) and peak memory to
results/benchmarks.jsonl. Batches are fixed random tokens already on the device, so the figures are
the step's alone (the trainer's data loading is a memory-mapped gather of a few hundred KB a step).
On CPU, `--quick` times a tiny model in fp32 in a few seconds, to check that the benchmark runs.

Measured 2026-11-28 on an H100 80GB HBM3 (torch 2.11, compiled, one optimizer step per micro-batch, full
logits, compile's own SwiGLU backward): d768/12L/seq1024 batch 32: 41% MFU, 0.43M tokens/s, 22 GiB; d512/8L
batch 32: 36%, 1.16M, 10 GiB; d256/6L/seq512 batch 128: 22%, 3.7M, 8 GiB; MoE E=8 top-2 on d512/8L batch 32:
31%, 0.67M, 16 GiB. No H100 was lent since; the figures below are an H200's (the same compute peak, 1.4x the
memory bandwidth), with no two calls on the same machine: the same run moves 1 to 2 points between them.
- Then, with the fused loss in chunks of 8,192 tokens: d768 44.3% (18.0 GiB), d512 38.6% (8.0 GiB), d256
  26.0% (5.6 GiB). Where the time went (--profile): d768: matrix products 55% (cuBLAS, at about 71% of the
  989 TFLOP/s peak, where a large random product reaches 80%), Triton pointwise and reduction kernels 28%
  (SwiGLU backward alone 7.8%, at about half the copy bandwidth), attention (cuDNN flash) 13%, AdamW 3%. d256:
  Triton 46% (SwiGLU backward 11%, log-softmax 11%), products 36%, attention 14%. Bound by memory traffic
  between kernels, not launches: CUDA graphs (mode reduce-overhead) made d256 slower (25.8%). Within the
  noise: heads of 128, 4 micro-batches per optimizer step, coordinate-descent tuning of the Triton kernels;
  max-autotune's Triton GEMMs lost to cuBLAS.
- Then models/swiglu.py's backward kernel (5.2 -> 2.9 ms of a d768 step) and the loss's gradient in one pass,
  and the default batches raised to 64, 64 and 256 sequences (65K, 65K and 131K tokens, still small batches
  for these sizes), which fill the GPU better than 32 / 32 / 128 (d768 47.2 -> 49.9% with a bf16 residual).
- Then, with SDPA attention (a bf16 residual stream since 0e160d1: the residual adds and norms move half
  the bytes; results/residual_bf16 shows it gives the same losses): on one machine d768 49.8% (0.52M tokens/s,
  33.2 GiB), d512 44.0% (1.44M, 14.8 GiB), d256 32.1% (5.3M, 11.2 GiB), and with `--residual fp32` there 47.9 /
  42.1 / 29.9%; d768 50.0% and 48.6% on two more machines, 49.9% and 48.1% on two earlier ones. d768 at batch
  128 (131K tokens): 50.8%, 63.7 GiB. The loss in chunks of 16K or 32K tokens instead of 8K: no change (48.6%
  all three, one machine). MoE (batch 32): 34.4%, 0.77x its dense twin. d768's profile (fp32 residual, batch
  64): products 60%, Triton kernels 24% (norms, RoPE, residual adds, the loss's softmax; the SwiGLU kernel
  4.6%), attention 14% (cuDNN's flash backward alone 9%), AdamW 1.5%; a bf16 residual takes the Triton share
  to about 20%.
- Now, with attention on FlashAttention-4's Hopper kernels (models/flash4.py, the default where flash-attn-4 is
  installed), against SDPA on the same machine, two machines: d768 49.96 / 50.42% (0.53M tokens/s, 32.0 GiB)
  against 48.75 / 49.25%; d512 44.5 / 45.0% against 43.1 / 43.5%; d256 32.7 / 32.8% against 31.4 / 31.6%.
  On a third: MoE (batch 32) 35.8%, 0.77x its dense twin; d768 at batch 128 51.1%, 61.5 GiB (fits an 80 GB
  H100). d768's profile: products 65%, Triton kernels 19%, attention 14% (FA4's backward 7.3%, forward 4.7%),
  AdamW 1.6%. Not separated: how much of the gain is the kernel and how much the layout (FA4 takes q, k, v as
  [batch, seq, heads, head_dim], the projection's own, so nothing around it transposes). What would move it
  next: the norms and RoPE folded into the products' prologues (kernels of one's own), and larger batches
  (about +1 point at 128 sequences).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from models import ModelConfig, MoEConfig, build_model, flops_per_token
from runners.bench.log import LOG, append
from runners.training.schedule import TrialSetupError
from runners.training.step import accumulate_grads, apply_update, make_optimizer, peak_flops, wants_flash4
from sweeps.trial import Runtime, TrainConfig


@dataclass(frozen=True)
class Shape:
    model: ModelConfig
    micro_seqs: int  # sequences per step (one micro-batch: sized to fill the GPU without accumulation)


def _dense(d: int, layers: int, seq: int, vocab: int, micro: int) -> Shape:
    return Shape(ModelConfig(d_model=d, n_layers=layers, n_heads=d // 64, d_ff=4 * d, vocab_size=vocab, seq_len=seq), micro)


def _moe(d: int, layers: int, seq: int, vocab: int, micro: int) -> Shape:
    cfg = ModelConfig(family="moe", d_model=d, n_layers=layers, n_heads=d // 64, d_ff=4 * d, vocab_size=vocab,
                      seq_len=seq, moe=MoEConfig(n_experts=8, top_k=2))
    return Shape(cfg, micro)


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense model with an MoE's active parameters (less its router): one FFN as wide as the experts a
    token uses (top_k * G routed of width d_ff / G, plus the shared ones). Assumes MoE in every layer."""
    m = cfg.moe
    width = cfg.d_ff // m.granularity * (m.top_k * m.granularity + m.n_shared)
    return cfg.model_copy(update={"family": "dense", "moe": None, "d_ff": width})


# The three dense shapes (d_ff = 4 d gives its ~110M / ~34M / ~7M non-embedding parameters),
# and an E=8 top-2 MoE on the middle one.
GPU_SHAPES = {
    "dense_step": [_dense(768, 12, 1024, 32768, 64), _dense(512, 8, 1024, 16384, 64), _dense(256, 6, 512, 8192, 256)],
    "moe_step": [_moe(512, 8, 1024, 16384, 32)],
}
QUICK_SHAPES = {
    "dense_step": [_dense(64, 2, 64, 256, 8)],
    "moe_step": [_moe(64, 2, 64, 256, 8)],
}


def time_step(shape: Shape, device: torch.device, compiled: bool, steps: int, warmup: int, mode: str | None = None,
              accum: int = 1, loss_chunk: int | None = None, bf16_residual: bool = False, profile: bool = False,
              flash4: bool = False, before_timing: Callable[[], None] | None = None) -> dict[str, float]:
    """Tokens/s, MFU and peak memory of `steps` optimizer steps (each over `accum` micro-batches) after
    `warmup` untimed ones; with `profile`, also where the GPU time of three more steps went. `before_timing`
    runs between the two (runners.bench.pack: processes that start timing together)."""
    torch.manual_seed(0)
    model = build_model(shape.model).to(device)
    model.loss_chunk, model.bf16_residual = loss_chunk or None, bf16_residual
    model.use_flash4(flash4)
    forward = torch.compile(model, mode=mode) if compiled else model
    optimizer = make_optimizer(model, TrainConfig(tokens=1, batch_size=shape.model.seq_len, lr=1e-4), device)
    tokens = torch.randint(0, shape.model.vocab_size, (shape.micro_seqs, shape.model.seq_len + 1), device=device)
    batch = [(tokens[:, :-1], tokens[:, 1:])] * accum
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run(n: int) -> None:
        for _ in range(n):
            accumulate_grads(forward, batch, device)
            apply_update(model, optimizer, 1e-4, 1.0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(warmup)
    if before_timing is not None:
        before_timing()
    started = time.perf_counter()
    run(steps)
    seconds = time.perf_counter() - started
    tokens_per_s = steps * accum * shape.micro_seqs * shape.model.seq_len / seconds
    peak = peak_flops(device)
    out = {"tokens_per_s": tokens_per_s, "step_ms": 1e3 * seconds / steps}
    if peak:
        out["mfu"] = flops_per_token(shape.model).train_exact * tokens_per_s / peak
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    if profile and device.type == "cuda":  # a few more steps, not timed, under the profiler
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            run(3)
        print(gpu_time_by_kind(prof.key_averages()), flush=True)
    return out


# Kernel name fragments -> what the kernel does (first match wins), for the profile's summary.
KERNEL_KINDS = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "norm_kernel")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")),
    ("fused pointwise/reduction (Triton)", ("triton", "swiglu")),
]


def gpu_time_by_kind(events) -> str:
    """A table of GPU time by kind of kernel and the 12 longest kernels, from profiler key averages."""
    kernels = [e for e in events if e.device_time_total > 0 and e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in kernels) or 1.0
    by_kind: dict[str, float] = {}
    for e in kernels:
        name = e.key.lower()
        kind = next((k for k, parts in KERNEL_KINDS if any(p in name for p in parts)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.device_time_total
    lines = [f"  {kind:36s} {100 * t / total:5.1f}%" for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    longest = sorted(kernels, key=lambda e: -e.device_time_total)[:12]
    lines += [f"    {100 * e.device_time_total / total:5.1f}%  {e.key[:110]}" for e in longest]
    return "GPU time by kind of kernel:\n" + "\n".join(lines)


UNITS = {"tokens_per_s": "tokens/s", "mfu": "fraction of peak", "peak_memory_gb": "GiB", "step_ms": "ms"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", nargs="+", choices=sorted(GPU_SHAPES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few steps (a check that it runs)")
    parser.add_argument("--steps", type=int, help="timed steps (default 20, quick 3)")
    parser.add_argument("--micro", type=int, help="sequences per micro-batch, instead of each shape's default")
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)")
    parser.add_argument("--loss-chunk", type=int, default=Runtime().loss_chunk,
                        help="tokens per chunk of the fused head and loss (models.loss), as the trainer's default; 0: full logits")
    parser.add_argument("--residual", choices=["bf16", "fp32"], default="bf16" if Runtime().bf16_residual else "fp32",
                        help="the residual stream's dtype under autocast (Runtime.bf16_residual), as the trainer's default")
    parser.add_argument("--attention", choices=["auto", "sdpa", "flash4"], default=Runtime().attention,
                        help="the attention kernel (Runtime.attention), as the trainer's default")
    parser.add_argument("--head-dim", type=int, help="attention head size, instead of each shape's 64")
    parser.add_argument("--d-model", type=int, nargs="+", help="only the shapes of these widths")
    parser.add_argument("--profile", action="store_true", help="print where the timed steps' GPU time went")
    parser.add_argument("--compile", choices=["both", "on", "off"], default="both", help="torch.compile runs (GPU)")
    parser.add_argument("--compile-mode", help="torch.compile mode, e.g. max-autotune-no-cudagraphs (default: default)")
    parser.add_argument("--log", type=Path, default=LOG, help="the JSON-lines file to append to")
    args = parser.parse_args(argv)
    bf16_residual = args.residual == "bf16"

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    steps = args.steps or (3 if args.quick else 20)
    warmup = 2 if args.quick else 5
    compile_modes = {"both": [False, True], "on": [True], "off": [False]}[args.compile if device.type == "cuda" else "off"]
    for name in args.benchmarks:
        for shape in (QUICK_SHAPES if args.quick else GPU_SHAPES)[name]:
            if args.d_model and shape.model.d_model not in args.d_model:
                continue
            model = shape.model
            if args.head_dim:
                model = model.model_copy(update={"n_heads": model.d_model // args.head_dim})
            shape = Shape(ModelConfig.model_validate(model.model_dump()), args.micro or shape.micro_seqs)
            try:
                flash4 = wants_flash4(Runtime(attention=args.attention), device, shape.model)
            except TrialSetupError as e:
                parser.error(str(e))
            for compiled in compile_modes:
                figures = time_step(shape, device, compiled, steps, warmup, args.compile_mode, args.accum,
                                    args.loss_chunk, bf16_residual, args.profile, flash4)
                m = shape.model
                config = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "d_ff": m.d_ff,
                          "seq_len": m.seq_len, "vocab": m.vocab_size, "batch": shape.micro_seqs * args.accum,
                          "micro_batch": shape.micro_seqs, "accum": args.accum,
                          "batch_tokens": shape.micro_seqs * args.accum * m.seq_len,
                          "loss": f"fused chunks of {args.loss_chunk} tokens" if args.loss_chunk else "full logits",
                          "residual": args.residual if device.type == "cuda" else "fp32",
                          "attention": "flash4" if flash4 else "sdpa",
                          "compile": compiled and (args.compile_mode or True), "steps": steps,
                          "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
                          **({"experts": m.moe.n_experts, "top_k": m.moe.top_k} if m.moe else {})}
                for metric, value in figures.items():
                    append(name, metric, round(value, 4), UNITS[metric], config, args.log)
                print(name, f"d{m.d_model} L{m.n_layers} h{m.n_heads} seq{m.seq_len} batch{shape.micro_seqs}x{args.accum}",
                      f"loss_chunk {args.loss_chunk}", "compiled" if compiled else "eager",
                      {k: round(v, 4) for k, v in figures.items()}, flush=True)
                if m.moe is not None:  # the figure: MoE tokens/s over its dense twin's (same active N)
                    twin = time_step(Shape(dense_twin(m), shape.micro_seqs), device, compiled, steps, warmup,
                                     args.compile_mode, args.accum, args.loss_chunk, bf16_residual, flash4=flash4)
                    ratio = figures["tokens_per_s"] / twin["tokens_per_s"]
                    append(name, "throughput_vs_dense", round(ratio, 4), "x",
                                    config | {"dense_d_ff": dense_twin(m).d_ff, "dense_tokens_per_s": round(twin["tokens_per_s"])}, args.log)
                    print(name, "throughput_vs_dense", round(ratio, 3), flush=True)


if __name__ == "__main__":
    main()

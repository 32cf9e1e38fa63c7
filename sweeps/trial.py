"""One resolved trial: the contract between the spec (sweeps/) and the runners.

A TrialConfig holds every choice that changes what a trial computes, and nothing that only changes
how fast or where it runs (those are in Runtime). Its id is a hash of that content, so the same trial
in a re-run sweep, or on another machine, has the same id: it is the MLflow tag, the checkpoint
folder name and the row key of the points table.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field, field_validator, model_validator

from models.config import Frozen, ModelConfig, MoEConfig

DEFAULT_SOURCE = "stdlib"


class DataConfig(Frozen):
    """Where the text comes from and how it becomes tokens."""

    source: str = Field(
        DEFAULT_SOURCE,
        description="'stdlib' (this Python's standard library sources, on any machine), "
        "or a path or glob of .txt/.gz/.xz/.jsonl/.parquet files, comma-separated for several",
    )
    text_field: str = Field("text", description="field holding the text in JSON lines or parquet")
    separator: str | None = Field(
        None, description="split files into documents at this line (e.g. '<|endoftext|>'); None = one document a file"
    )
    tokenizer: str = Field("byte", description="'byte', 'bpe' (trained on the training split), or a tokenizer.json path")
    vocab_size: int | None = Field(None, ge=259, description="BPE vocabulary size (tokenizer 'bpe' only)")
    val_fraction: float = Field(0.02, gt=0.0, lt=0.5, description="share of documents held out, chosen by a hash of each document")
    val_tokens: int = Field(65536, ge=256, description="tokens of the fixed validation set each evaluation reads")
    max_bytes: int | None = Field(None, ge=1, description="read at most this many bytes of text (whole documents, in a fixed order)")
    content_hash: str = Field("", description="filled in by sweep expansion: hash of the source files' bytes")
    unique_tokens: int | None = Field(
        None, ge=1, description="train on the first this many tokens of the training split only, repeated in "
        "epochs (a whole number of sequences); None = the whole split. Part of the trial's identity only when set"
    )

    @model_validator(mode="after")
    def _tokenizer_options(self) -> DataConfig:
        if self.tokenizer == "bpe" and self.vocab_size is None:
            raise ValueError("tokenizer 'bpe' needs vocab_size (e.g. 8192)")
        if self.tokenizer != "bpe" and self.vocab_size is not None:
            raise ValueError("vocab_size is only for tokenizer 'bpe'")
        return self


class ScheduleConfig(Frozen):
    """Learning-rate schedule. Fractions are of the trial's total tokens."""

    kind: Literal["cosine", "constant", "wsd"] = "cosine"
    warmup: float = Field(0.02, ge=0.0, lt=1.0, description="warm-up as a fraction of the tokens")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="cosine floor / WSD end, as a fraction of lr")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="WSD: share of each run (or branch) spent decaying")
    decay_shape: Literal["linear", "1-sqrt", "cosine"] = "1-sqrt"
    branches: tuple[int, ...] = Field(
        (), description="WSD only: final token counts of decay branches; each forks from the stable phase at "
        "(1 - decay_fraction) of its count and gives one final point"
    )

    @model_validator(mode="after")
    def _branches_need_wsd(self) -> ScheduleConfig:
        if self.branches and self.kind != "wsd":
            raise ValueError("branches need schedule kind 'wsd' (cosine runs have one final point)")
        if list(self.branches) != sorted(set(self.branches)):
            raise ValueError("branches must be increasing token counts without repeats")
        return self

    def fork_tokens(self, branch: int, batch_size: int) -> int:
        """Where the branch ending at `branch` tokens leaves the stable phase: whole steps, at least one."""
        return max(batch_size, round((1 - self.decay_fraction) * branch / batch_size) * batch_size)


class TrainConfig(Frozen):
    """Optimisation choices of one trial. Batch size and token counts are in tokens."""

    tokens: int = Field(ge=1, description="D: training tokens of the main run")
    batch_size: int = Field(ge=1, description="tokens per optimizer step (a multiple of the sequence length)")
    lr: float = Field(gt=0.0)
    schedule: ScheduleConfig = ScheduleConfig()
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    beta2: float = Field(0.95, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.1, ge=0.0)
    grad_clip: float | None = Field(1.0, gt=0.0)
    init_std: float = Field(0.02, gt=0.0)
    seed: int = 0
    eval_points: int = Field(8, ge=1, description="log-spaced evaluations over the run, the last at the end")
    spike_threshold: float = Field(3.0, gt=1.0, description="diverged if train loss exceeds this times its running minimum")

    @model_validator(mode="after")
    def _branches_inside_run(self) -> TrainConfig:
        if self.schedule.branches and self.schedule.branches[-1] >= self.tokens:
            raise ValueError(f"branch at {self.schedule.branches[-1]} tokens is not shorter than the run ({self.tokens} tokens)")
        return self


class TrialConfig(Frozen):
    """Everything that decides what a trial computes; its hash is the trial id."""

    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    budget: float | None = Field(None, description="the IsoFLOP compute budget this trial belongs to, if any")

    @property
    def trial_id(self) -> str:
        return trial_id(self)


# Fields added after trials were first hashed: left out of the hash while unset, so older trials keep their ids.
UNHASHED_WHEN_UNSET = {"data": ("unique_tokens",)}


def trial_id(trial: TrialConfig) -> str:
    """12 hex digits of the sha256 of the canonical JSON of the trial (sorted keys, no whitespace)."""
    content = trial.model_dump(mode="json")
    for section, fields in UNHASHED_WHEN_UNSET.items():
        for name in fields:
            if content[section][name] is None:
                del content[section][name]
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


class Resources(Frozen):
    """What a trial asks Ray for. Not part of the trial's identity."""

    cpus: float = Field(1.0, gt=0.0)
    gpus: float | Literal["auto"] = Field("auto", description="a GPU share in [0, 1], or a whole number W >= 2: a gang of "
                                          "W workers with one GPU each (Ray Train, runtime.parallel); on a cluster without "
                                          "GPUs, or with runtime.device 'cpu', W CPU processes (gloo); 'auto' from the "
                                          "memory estimate and max_hours (a gang only when one GPU cannot hold the "
                                          "trial or train it within max_hours)")
    gpu_memory_gb: float | None = Field(None, gt=0.0, description="memory of one GPU; None = ask a GPU worker")
    max_hours: float | None = Field(None, gt=0.0, description="the time target of gpus 'auto': the wall hours one "
                                    "trial should take at most; it gets the fewest GPUs (a power of two) that hold "
                                    "its memory and train it within this, by the estimate at assumed_mfu "
                                    "(runners.scheduling.resources.estimated_hours); None = from memory alone")
    max_gpus: int | None = Field(None, ge=1, description="under gpus 'auto': the most GPUs one trial's gang takes "
                                 "(a power of two); a trial the target wants on more takes this many, with a "
                                 "warning; None = no cap")
    assumed_mfu: float = Field(0.4, gt=0.0, le=1.0, description="the time target's throughput: exact training "
                               "FLOPs/s of one GPU over its bf16 peak. Measured on an H200 (results/benchmarks.jsonl): "
                               "49-50% at 110M parameters (d768) in the trainer and the step benchmark, 45% at 34M, "
                               "33% at 7M; 0.4 leaves room for evaluations, checkpoints and compile")
    peak_tflops: float | None = Field(None, gt=0.0, description="one GPU's dense bf16 peak in TFLOP/s for the "
                                      "time target and the plan's estimates (at assumed_mfu); None = from the GPU's "
                                      "name (runners.training.step.PEAK_BF16_FLOPS)")

    @field_validator("max_gpus")
    @classmethod
    def _power_of_two(cls, value: int | None) -> int | None:
        if value is not None and value & (value - 1):
            raise ValueError(f"a gang under gpus 'auto' is a power of two; use {2 ** (value.bit_length() - 1)} "
                             f"or {2 ** value.bit_length()}")
        return value

    @model_validator(mode="after")
    def _gang_is_whole(self) -> Resources:
        if self.gpus != "auto" and self.gpus > 1 and self.gpus != int(self.gpus):
            raise ValueError(f"gpus {self.gpus}: above 1 a trial takes whole GPUs (a gang of workers); use "
                             f"{int(self.gpus)} or {int(self.gpus) + 1}")
        if self.gpus != "auto":
            for name in ("max_hours", "max_gpus"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} sizes the gangs of gpus 'auto'; with gpus {self.gpus:g} declared it "
                                     f"would do nothing: remove it or set gpus: auto")
        return self

    @property
    def workers(self) -> int:
        """Processes a trial runs as when declared (1, or the gang's W); 'auto' decides per trial."""
        return int(self.gpus) if self.gpus != "auto" and self.gpus >= 2 else 1


class Runtime(Frozen):
    """How a trial runs: device, precision, compile, checkpointing. Not part of its identity."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool | Literal["auto"] = Field("auto", description="torch.compile: on for CUDA, off on CPU by default")
    micro_batch_size: int | None = Field(None, ge=1, description="sequences per forward pass; None = whole batch (gradient accumulation below it)")
    loss_chunk: int | None = Field(8192, ge=1, description="tokens per chunk of the fused head and cross-entropy in "
                                   "training (models.loss: full logits never exist, 20-30% less memory); None = full logits")
    bf16_residual: bool = Field(True, description="the residual stream in bf16 under autocast (GPU), as the other "
                                "activations (Megatron-LM's and torchtitan's default): 4 to 7% faster on an H200, and 8 "
                                "seeds each way gave the same loss within 0.3% (results/residual_bf16); false: fp32, as "
                                "the parameters")
    attention: Literal["auto", "sdpa", "flash4"] = Field("auto", description="the attention kernel: 'flash4' is "
                                                         "FlashAttention-4 (pip extra [flash4]; Hopper or Blackwell GPUs), "
                                                         "'sdpa' torch's (cuDNN's on Hopper), 'auto' FlashAttention-4 where "
                                                         "it runs: 2 to 4% faster steps on an H200 (models/flash4.py)")
    checkpoint_every_s: float = Field(60.0, gt=0.0, description="seconds between checkpoints")
    max_retries: int = Field(2, ge=0, description="retries of a trial whose worker died or raised (for a gang: "
                             "restarts of the whole group after a rank died, each from its last checkpoint)")
    pack: Literal["auto", "off"] = Field("auto", description="'auto': single-process trials that differ only in lr, "
                                         "seed, init or optimiser knobs train together as one stacked model, one Ray "
                                         "task (a pack, sweeps/packs.py); a gang (resources.gpus >= 2, or 'auto' past "
                                         "one GPU) is never packed; 'off': one task per trial")
    cuda_graph: bool = Field(False, description="a pack's training step (forward, backward, clip, AdamW) captured "
                             "once as a CUDA graph and replayed: one launch a step instead of hundreds, for small "
                             "models whose steps the CPU's launches pace (runners/training/graph.py); CUDA only, "
                             "the same numbers as without")
    max_pack: int = Field(16, ge=1, description="most trials in one pack (also capped by GPU memory and work per kernel)")
    parallel: Literal["ddp", "fsdp"] = Field("ddp", description="how a gang (resources.gpus >= 2) shares the model: "
                                             "'ddp' a full copy per rank, gradients all-reduced; 'fsdp' parameters, "
                                             "gradients and optimizer state sharded per block (FSDP2, bf16 compute on "
                                             "GPU). Either way the global batch in tokens is train.batch_size")
    expert_parallel: bool = Field(False, description="MoE trials in a gang of W ranks: each rank holds E*G/W of "
                                  "the experts and tokens go to the rank holding theirs and back by all-to-all; "
                                  "routing, capacity and the dense parts stay data-parallel (runtime.parallel). Needs "
                                  "model.family moe, resources.gpus W >= 2 (or 'auto': its one-GPU trials keep all "
                                  "experts) and n_experts * granularity divisible by W")

    @field_validator("pack", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML reads a bare `off` as false (and `on` as true): take them as the words written."""
        return {False: "off", True: "auto"}[value] if isinstance(value, bool) else value


def expert_shards(moe: MoEConfig | None, runtime: Runtime, world: int) -> int:
    """Ranks a trial's experts (`moe`: model.moe) are sharded over on `world` ranks: W for an MoE trial of a gang under
    runtime.expert_parallel, else 1 (every rank, or the one process, holds them all). ValueError naming the
    field and the fix when W does not divide the experts."""
    if not (runtime.expert_parallel and moe is not None and world > 1):
        return 1
    experts = moe.n_experts * moe.granularity
    if experts % world:
        raise ValueError(f"runtime.expert_parallel: {experts} experts (model.moe n_experts * granularity) cannot be "
                         f"shared by {world} ranks; use a gang size (resources.gpus) that divides {experts}, or set "
                         "expert_parallel false")
    return world

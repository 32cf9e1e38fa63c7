"""What training one trial gives back to the worker: plain dataclasses that survive `dataclasses.asdict`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BranchResult:
    """The final point of one WSD decay branch."""

    tokens: int  # the branch's planned final token count
    val_loss: float  # nats per token on the fixed validation set
    val_bpb: float


@dataclass
class TrialResult:
    status: str  # names.FINISHED | names.DIVERGED | names.PRUNED
    final_val_loss: float | None  # None unless the main run finished
    tokens: int  # tokens trained in the main run (where it stopped, if it stopped early)
    branches: list[BranchResult] = field(default_factory=list)
    repeats_data: bool = False  # some training token was seen twice (more than one epoch)
    diverged_at_tokens: int | None = None
    error: str | None = None  # one line: why the trial stopped early
    tokens_per_s: float = 0.0  # training throughput of the last attempt: evaluations, checkpoints and the
    # first logged interval (torch.compile warm-up) left out
    mfu: float | None = None  # GPU only
    final_val_bpb: float | None = None
    numerics: str = ""  # runners.training.step.numerics of the last attempt

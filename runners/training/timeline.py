"""One trial's place on a training timeline: where it logs (a Sink), what it has seen, and how it ended
(result.json in its workdir). A pack puts several on one timeline (runners.training.pack); the trainer
(runners.training.train) steps them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from runners.training import checkpoint, parallel
from runners.training.result import BranchResult, TrialResult
from sweeps.trial import TrialConfig

RESULT = "result.json"
FLUSH_S = 30.0  # how long a checkpoint waits for the tracking store before going on without it


class Sink(Protocol):
    def log(self, metrics: Mapping[str, float], tokens: int) -> None: ...

    def flush(self, timeout_s: float) -> bool: ...  # True when everything logged so far is stored


def make_durable(sinks: list[Sink]) -> None:
    """Before a checkpoint or result says how far a trial got, its points up to there reach the store: a trial
    killed afterwards resumes from that checkpoint (or result) and never logs them again. With the store
    unreachable for FLUSH_S, training goes on and those points wait in the sink."""
    for sink in sinks:
        sink.flush(FLUSH_S)


@dataclasses.dataclass
class Timeline:
    """One trial on a (possibly shared) timeline: where it logs, what it has seen, and how it ended."""

    trial: TrialConfig
    workdir: Path
    sink: Sink
    branch_sinks: Callable[[int], Sink]
    on_eval: Callable[[int, float], bool] | None = None
    # Progress, saved in its checkpoints.
    branches_done: list[dict] = dataclasses.field(default_factory=list)
    loss_min: float = math.inf
    pending: list[float] = dataclasses.field(default_factory=list)  # train losses since the last logged point
    final_val: list[float] | None = None  # [loss, bpb] of the main run's latest evaluation
    result: TrialResult | None = None  # set when it has ended

    def sinks(self) -> list[Sink]:
        return [self.sink, *map(self.branch_sinks, self.trial.train.schedule.branches)]

    def done_result(self) -> TrialResult | None:
        """The result of an ended trial, from its workdir."""
        done = self.workdir / RESULT
        return _result_from_json(done.read_text()) if done.exists() else None

    def write_result(self, result: TrialResult, group: parallel.Group) -> None:
        """Mark the trial ended: its points stored, result.json written (by rank 0), its checkpoints deleted."""
        self.result = result
        make_durable(self.sinks())
        group.barrier()  # every rank is done with the checkpoints before they go
        if not group.main:
            return
        done = self.workdir / RESULT
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(tmp, done)
        checkpoint.discard(self.workdir)  # the result stands for them now; free the disk


def _result_from_json(text: str) -> TrialResult:
    fields = json.loads(text)
    fields["branches"] = [BranchResult(**b) for b in fields["branches"]]
    return TrialResult(**fields)

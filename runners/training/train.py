"""Train one trial: the main run, its WSD decay branches, evaluations, checkpoints and divergence.

The timeline is one sequence of optimizer steps. A WSD branch shares the main run's steps up to its
fork, so when the main run reaches a fork it saves its state (checkpoint FORK), trains the branch from
there to the branch's end under the branch's decay, evaluates it (a final point of its own), then
reloads the fork state and carries on. Training batches depend only on the step and the seed, so a
branch sees exactly the data of a standalone run of its length, and a resumed trial the data it
would have seen.

Checkpoint LATEST always holds where the trial is: the phase (main run or which branch), the step,
the branches finished so far, and the divergence tracker. A trial that is killed or cancelled
(KeyboardInterrupt, as Ray delivers it) starts again from there and ends with the same numbers
(bit for bit on the CPU; on the GPU up to the nondeterminism of its kernels). `result.json` marks a
trial that has ended, so a retried worker returns its result at once, and its checkpoints are deleted.

Divergence (a NaN or Inf train loss, or one over `spike_threshold` x the running minimum after the
warm-up) is checked whenever losses reach the host, at each logged point and checkpoint; it ends the
whole trial, also when it happens in a branch.

A trial may be trained by a group of processes (runners.training.parallel: Ray Train starts them, with the
process group set up): each rank trains on its share of every batch, losses and evaluations are the
group's, and rank 0 alone logs and writes the result; at world size 1 nothing of that runs.

Logged curves (step = tokens seen on that curve): train loss every `plan.log_every` steps and at
every evaluation and checkpoint, with lr, exact FLOPs to reach that point on that curve, tokens/s,
MFU (GPU) and epochs; val loss and bpb at the log-spaced evaluations of the main run (none of them
final but the last) and at each branch's end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from models import build_model, flops_per_token
from runners.tracking import names
from runners.training import checkpoint, parallel
from runners.data.store import TokenData
from runners.training.schedule import Plan, TrialSetupError, lr_at, plan_trial
from runners.training.step import (Batch, accumulate_grads, apply_update, evaluate, make_optimizer, numerics, peak_flops,
                          pick_device, wants_compile, wants_flash4)
from runners.training.result import BranchResult, TrialResult
from sweeps.trial import Runtime, TrialConfig

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


class Diverged(Exception):
    def __init__(self, tokens: int, why: str):
        super().__init__(why)
        self.tokens = tokens


class Pruned(Exception):
    pass


def run_trial(trial: TrialConfig, runtime: Runtime, workdir: Path, sink: Sink, *, data: TokenData,
              branch_sinks: Callable[[int], Sink], on_eval: Callable[[int, float], bool] | None = None) -> TrialResult:
    """Train `trial` to the end (resuming from `workdir` if it holds a checkpoint) and return what it gave."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    group = parallel.current()
    done = workdir / RESULT
    if done.exists():
        return _result_from_json(done.read_text())
    result = _Trainer(trial, runtime, workdir, sink, data, branch_sinks, on_eval, group).run()
    make_durable([sink, *map(branch_sinks, trial.train.schedule.branches)])
    group.barrier()  # every rank is done with the checkpoints before they go
    if group.main:
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(result)))
        os.replace(tmp, done)
        checkpoint.discard(workdir)  # the result stands for them now; free the disk
    return result


def _result_from_json(text: str) -> TrialResult:
    fields = json.loads(text)
    fields["branches"] = [BranchResult(**b) for b in fields["branches"]]
    return TrialResult(**fields)


class _Trainer:
    def __init__(self, trial: TrialConfig, runtime: Runtime, workdir: Path, sink: Sink, data: TokenData,
                 branch_sinks: Callable[[int], Sink], on_eval: Callable[[int, float], bool] | None,
                 group: parallel.Group):
        self.trial, self.cfg, self.workdir, self.data = trial, trial.train, workdir, data
        self.sink, self.branch_sinks, self.on_eval, self.group = sink, branch_sinks, on_eval, group
        self.plan: Plan = plan_trial(trial, runtime, group.world)
        if data.vocab_size > trial.model.vocab_size:
            raise TrialSetupError(f"model.vocab_size {trial.model.vocab_size} is smaller than the data's "
                                  f"vocabulary ({data.vocab_size}); set it to at least {data.vocab_size}")
        self.device = pick_device(runtime)
        self.checkpoint_every_s = runtime.checkpoint_every_s
        torch.manual_seed(self.cfg.seed)
        self.model = build_model(trial.model, init_std=self.cfg.init_std).to(self.device)
        self.model.loss_chunk, self.model.bf16_residual = runtime.loss_chunk, runtime.bf16_residual
        flash4 = wants_flash4(runtime, self.device, trial.model)
        self.model.use_flash4(flash4)
        wrapped = parallel.wrap(self.model, runtime, self.device, group)  # FSDP2 shards self.model in place
        self.forward = torch.compile(wrapped) if wants_compile(runtime, self.device) else wrapped
        self.numerics = numerics(runtime, self.device, flash4)
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        self.flops_per_token = flops_per_token(trial.model).train_exact
        peak = peak_flops(self.device)
        self.peak = peak * group.world if peak else None  # the group's: MFU and tokens/s are the group's
        self.val = parallel.val_share([self._to_device(x, y) for x, y in data.val_batches(
            trial.model.seq_len, trial.data.val_tokens, self.plan.micro_seqs)], group)
        # Progress, all of it saved in checkpoint LATEST.
        self.step = 0
        self.branch: int | None = None  # index into plan.branches while training that branch
        self.branches_done: list[dict] = []
        self.loss_min = math.inf
        self.pending: list[float] = []  # train losses since the last logged point
        self.final_val: list[float] | None = None  # [loss, bpb] of the main run's latest evaluation
        # This attempt only.
        self.unsynced: list[torch.Tensor] = []
        self.router: dict[str, torch.Tensor] = {}
        # Throughput of this attempt: [tokens, seconds] of its first logged interval (which holds
        # torch.compile's warm-up) and of all the later ones, the figure the result reports.
        self.first_interval: list[float] | None = None
        self.timed = [0.0, 0.0]
        self.interval_tokens = 0  # tokens trained since the last logged point
        self.clock = time.perf_counter()
        self.last_checkpoint = time.monotonic()
        self.consistent = True  # False while the optimizer is half-way through an update

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> TrialResult:
        self._resume()
        try:
            while self._advance():
                pass
        except KeyboardInterrupt:
            self._save_if_sound()
            raise
        except Diverged as d:
            return self._result(names.DIVERGED, diverged_at=d.tokens, error=str(d))
        except Pruned as p:
            return self._result(names.PRUNED, error=str(p))
        return self._result(names.FINISHED)

    def _advance(self) -> bool:
        """One step of the timeline, or one change of phase. False when the main run is done."""
        plan = self.plan
        if self.branch is None:
            due = len(self.branches_done) < len(plan.branches) and plan.branches[len(self.branches_done)]
            if due and due.fork_step == self.step:
                self._fork(len(self.branches_done))
                return True
            if self.step == plan.total_steps:
                return False
        elif self.step == plan.branches[self.branch].end_step:
            self._end_branch()
            return True

        self._train_step()
        if self.step % plan.log_every == 0 or self.step == self._end_step():
            self._flush()
        if self.branch is None and self.step in plan.eval_steps:
            self._evaluate_main()
        if self._checkpoint_due():
            self._save()
        return True

    def _checkpoint_due(self) -> bool:
        due = time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s
        if self.group.world == 1:
            return due
        # A checkpoint is collective, so the ranks take rank 0's clock; asked at logged steps only, which
        # wait for the device anyway (the losses come to the host there).
        return self.step % self.plan.log_every == 0 and self.group.from_main(due)

    def _train_step(self) -> None:
        branch = self.plan.branches[self.branch] if self.branch is not None else None
        lr = lr_at(self.cfg.schedule, self.cfg.lr, self.plan, self.step, branch)
        loss, self.router = accumulate_grads(self.forward, self._micro_batches(self.step), self.device)
        self.consistent = False
        apply_update(self.model, self.optimizer, lr, self.cfg.grad_clip)
        self.step += 1
        self.consistent = True
        self.unsynced.append(loss)

    # --- phases ---------------------------------------------------------------------------------

    def _fork(self, index: int) -> None:
        self._flush()
        self._checkpoint(checkpoint.FORK)
        self.branch = index
        self._save()

    def _end_branch(self) -> None:
        branch = self.plan.branches[self.branch]
        loss = self._validate()
        bpb = self._bpb(loss)
        self.branch_sinks(branch.tokens).log({names.VAL_LOSS: loss, names.VAL_BPB: bpb}, branch.tokens)
        done = [*self.branches_done, dataclasses.asdict(BranchResult(branch.tokens, loss, bpb))]
        self.consistent = False
        # The fork's state holds the divergence tracker too: the branch's decayed, lower losses must
        # not become the minimum that the main run's losses are held against.
        self._load(checkpoint.FORK)
        self.branches_done = done
        self.consistent = True
        self._save()

    def _evaluate_main(self) -> None:
        self._flush()
        loss = self._validate()
        tokens = self.step * self.plan.batch_size
        self.final_val = [loss, self._bpb(loss)]
        self.sink.log({names.VAL_LOSS: loss, names.VAL_BPB: self.final_val[1]}, tokens)
        prune = self.group.from_main(self.on_eval is not None and self.on_eval(tokens, loss))  # the pruner asks rank 0
        if prune and self.step < self.plan.total_steps:
            raise Pruned(f"pruned at {tokens} tokens (val loss {loss:.4f})")

    # --- evaluation and logging -----------------------------------------------------------------

    def _validate(self) -> float:
        started = time.perf_counter()
        total, count = self.group.sum(evaluate(self.forward, self.val, self.device)).tolist()
        self.clock += time.perf_counter() - started  # evaluation time is not training time
        return total / count

    def _bpb(self, loss: float) -> float:
        return loss / math.log(2) / self.data.val_bytes_per_token

    def _sync(self) -> None:
        """Bring the step losses to the host and check them for divergence."""
        if not self.unsynced:
            return
        losses = self.group.mean(torch.stack(self.unsynced)).tolist()
        first = self.step - len(losses)
        self.unsynced = []
        self.interval_tokens += len(losses) * self.plan.batch_size
        for i, loss in enumerate(losses):
            step = first + i  # the update that gave this loss
            tokens = (step + 1) * self.plan.batch_size
            if not math.isfinite(loss):
                raise Diverged(tokens, f"train loss {loss} at {tokens} tokens")
            if step >= self.plan.warmup_steps and loss > self.cfg.spike_threshold * self.loss_min:
                raise Diverged(tokens, f"train loss {loss:.4g} at {tokens} tokens is over "
                                       f"{self.cfg.spike_threshold} x its running minimum {self.loss_min:.4g}")
            self.loss_min = min(self.loss_min, loss)
            self.pending.append(loss)

    def _flush(self) -> None:
        """Log the train loss since the last point, with lr, FLOPs, throughput and epochs."""
        self._sync()
        now = time.perf_counter()
        if not self.pending:
            return
        tokens = self.step * self.plan.batch_size
        seconds = now - self.clock
        tokens_per_s = self.interval_tokens / seconds if seconds > 0 else 0.0
        if self.first_interval is None:
            self.first_interval = [self.interval_tokens, seconds]
        else:
            self.timed = [self.timed[0] + self.interval_tokens, self.timed[1] + seconds]
        self.clock, self.interval_tokens = now, 0
        branch = self.plan.branches[self.branch] if self.branch is not None else None
        metrics = {
            names.TRAIN_LOSS: float(np.mean(self.pending)),
            names.LR: lr_at(self.cfg.schedule, self.cfg.lr, self.plan, self.step - 1, branch),
            names.FLOPS: self.flops_per_token * tokens,
            names.TOKENS_PER_S: tokens_per_s,
            names.EPOCHS: self.data.epochs(tokens, self.trial.model.seq_len),
            **dict(zip([names.ROUTER_PREFIX + k for k in self.router], self._host(self.router.values()))),
        }
        if self.peak:
            metrics[names.MFU] = self.flops_per_token * tokens_per_s / self.peak
        (self.branch_sinks(branch.tokens) if branch else self.sink).log(metrics, tokens)
        self.pending = []

    def _host(self, values) -> list[float]:
        """Scalars on the device as floats (the group's means), in one transfer."""
        values = list(values)
        return self.group.mean(torch.stack(values)).tolist() if values else []

    # --- checkpoints ----------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> None:
        progress = {"step": self.step, "branch": self.branch, "branches_done": self.branches_done,
                    "loss_min": self.loss_min, "pending": self.pending, "final_val": self.final_val}
        checkpoint.save(self.workdir, name, self.model, self.optimizer, progress, self.group)

    def _save(self) -> None:
        started = time.perf_counter()
        self._sync()
        make_durable([self.sink, *map(self.branch_sinks, self.trial.train.schedule.branches)])
        self._checkpoint(checkpoint.LATEST)
        self.last_checkpoint = time.monotonic()
        self.clock += time.perf_counter() - started

    def _save_if_sound(self) -> None:
        """Checkpoint on the way out, unless interrupted mid-update or diverged (the last checkpoint stands)."""
        if self.consistent:
            try:
                self._save()
            except Diverged:
                pass

    def _load(self, name: str) -> None:
        progress = checkpoint.load(self.workdir, name, self.model, self.optimizer, self.group, self.device)
        if progress is None:
            return
        self.step, self.branch = progress["step"], progress["branch"]
        self.branches_done, self.loss_min = progress["branches_done"], progress["loss_min"]
        self.pending, self.final_val, self.unsynced = progress["pending"], progress["final_val"], []

    def _resume(self) -> None:
        self._load(checkpoint.LATEST)
        self.clock = time.perf_counter()

    # --- data -----------------------------------------------------------------------------------

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> Batch:
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _micro_batches(self, step: int) -> list[Batch]:
        """This rank's share of the step's batch (a function of step and seed alone), cut into micro-batches."""
        plan = self.plan
        first, count = parallel.rank_slice(plan.seqs_per_step, self.group)  # this rank's share of the batch
        x, y = self.data.train_batch(step * plan.seqs_per_step + first, count, self.trial.model.seq_len, self.cfg.seed)
        x, y = self._to_device(x, y)
        return list(zip(x.split(plan.micro_seqs), y.split(plan.micro_seqs)))

    def _end_step(self) -> int:
        return self.plan.branches[self.branch].end_step if self.branch is not None else self.plan.total_steps

    # --- result ---------------------------------------------------------------------------------

    def _result(self, status: str, diverged_at: int | None = None, error: str | None = None) -> TrialResult:
        main_step = self.step if self.branch is None else self.plan.branches[self.branch].fork_step
        tokens = main_step * self.plan.batch_size
        final = self.final_val if status == names.FINISHED else None
        timed_tokens, seconds = self.timed if self.timed[1] > 0 else (self.first_interval or [0.0, 0.0])
        tokens_per_s = timed_tokens / seconds if seconds > 0 else 0.0
        return TrialResult(
            status=status, final_val_loss=final[0] if final else None, final_val_bpb=final[1] if final else None,
            tokens=tokens, branches=[BranchResult(**b) for b in self.branches_done],
            repeats_data=self.data.epochs(tokens, self.trial.model.seq_len) > 1.0,
            diverged_at_tokens=diverged_at, error=error, tokens_per_s=tokens_per_s,
            mfu=self.flops_per_token * tokens_per_s / self.peak if self.peak and tokens_per_s else None,
            numerics=self.numerics,
        )

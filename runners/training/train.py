"""Train one trial: the main run, its WSD decay branches, evaluations, checkpoints and divergence.

The timeline is one sequence of optimizer steps. A WSD branch shares the main run's steps up to its
fork, so when the main run reaches a fork it keeps its state (checkpoint FORK), trains the branch from
there to the branch's end under the branch's decay, evaluates it (a final point of its own), then
takes the fork state back and carries on. On one process the fork is kept in host memory and written
to disk only when a checkpoint inside the branch needs it (a pack's short branch then costs no disk
writes); a group of ranks writes it at once. Training batches depend only on the step and the seed, so a
branch sees exactly the data of a standalone run of its length, and a resumed trial the data it
would have seen.

Checkpoint LATEST always holds where the trial is: the phase (main run or which branch), the step,
the branches finished so far, and the divergence tracker. A trial that is killed or cancelled
(KeyboardInterrupt, as Ray delivers it, taken between steps) starts again from there and ends with the same numbers
(bit for bit on the CPU; on the GPU up to the nondeterminism of its kernels). `result.json` marks a
trial that has ended, so a retried worker returns its result at once, and its checkpoints are deleted.

Divergence (a NaN or Inf train loss, or one over `spike_threshold` x the running minimum after the
warm-up) is checked whenever losses reach the host, at each logged point and checkpoint; it ends the
whole trial, also when it happens in a branch. In a pack it ends that member, which is frozen while the
others go on; so does pruning.

A trial may be trained by a group of processes (runners.training.parallel: Ray Train starts them, with the
process group set up): each rank trains on its share of every batch, losses and evaluations are the
group's, and rank 0 alone logs and writes the result; at world size 1 nothing of that runs. A pack is one
process: its members are never a gang.

Logged curves (step = tokens seen on that curve): train loss every `plan.log_every` steps and at
every evaluation and checkpoint, with lr, exact FLOPs to reach that point on that curve, tokens/s,
MFU (GPU) and epochs; val loss and bpb at the log-spaced evaluations of the main run (none of them
final but the last) and at each branch's end; as a member ends, where the attempt's wall time went
(names.TIME_PHASES: setup, the first interval, training, evaluations, checkpoints, the rest).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from models import flops_per_token
from runners.data.resident import TrainTokens
from runners.data.store import TokenData
from runners.tracking import names
from runners.tracking.interrupts import check_interrupt, deferred_interrupts
from runners.training import checkpoint, parallel
from runners.training.result import BranchResult, TrialResult
from runners.training.timeline import Sink, Timeline, make_durable
from runners.training.schedule import Plan, TrialSetupError, lr_at, plan_trial
from runners.training.engine import Engine, PlainEngine
from runners.training.step import Batch, peak_flops, pick_device
from sweeps.trial import Runtime, TrialConfig, expert_shards


def run_trial(trial: TrialConfig, runtime: Runtime, workdir: Path, sink: Sink, *, data: TokenData,
              branch_sinks: Callable[[int], Sink], on_eval: Callable[[int, float], bool] | None = None) -> TrialResult:
    """Train `trial` to the end (resuming from `workdir` if it holds a checkpoint) and return what it gave."""
    timeline = Timeline(trial, Path(workdir), sink, branch_sinks, on_eval)
    timeline.workdir.mkdir(parents=True, exist_ok=True)
    done = timeline.done_result()
    if done is not None:
        return done
    started = time.perf_counter()
    group = parallel.current()
    check_setup(trial, runtime, data, group.world)
    device = pick_device(runtime)
    engine = PlainEngine(trial, runtime, device, group)
    return Trainer([timeline], engine, runtime, data, device, group, started=started).run()[0]


def check_setup(trial: TrialConfig, runtime: Runtime, data: TokenData, world: int = 1) -> Plan:
    """The trial's plan on `world` ranks; TrialSetupError (naming the field and the fix) when it cannot start."""
    plan = plan_trial(trial, runtime, world)
    try:
        expert_shards(trial.model.moe, runtime, world)
    except ValueError as e:
        raise TrialSetupError(str(e)) from None
    if data.vocab_size > trial.model.vocab_size:
        raise TrialSetupError(f"model.vocab_size {trial.model.vocab_size} is smaller than the data's "
                              f"vocabulary ({data.vocab_size}); set it to at least {data.vocab_size}")
    return plan


class Trainer:
    """Members on one timeline of optimizer steps: they step, evaluate, fork and checkpoint together."""

    def __init__(self, members: list[Timeline], engine: Engine, runtime: Runtime, data: TokenData,
                 device: torch.device, group: parallel.Group = parallel.Group(), started: float | None = None):
        """`started`: when this attempt began (perf_counter), for its setup time; default now."""
        self.members, self.engine, self.device, self.group = members, engine, device, group
        self.started = time.perf_counter() if started is None else started
        first = members[0].trial
        self.data = data  # its validation set and bytes per token are every member's
        # Each member's training tokens: a pack's members may differ in data.unique_tokens (sweeps.packs).
        self.train_data = [data.with_unique_tokens(m.trial.data.unique_tokens, first.model.seq_len) for m in members]
        self.train_tokens = TrainTokens(data, device)  # one gather serves them all (TokenData.gather)
        self.plan: Plan = plan_trial(first, runtime, group.world)
        self.seq_len = first.model.seq_len
        self.checkpoint_every_s = runtime.checkpoint_every_s
        self.flops_per_token = flops_per_token(first.model).train_exact
        peak = peak_flops(device)
        self.peak = peak * group.world if peak else None  # the group's: MFU and tokens/s are the group's
        val = data.val_batches(self.seq_len, first.data.val_tokens, self.plan.micro_seqs)
        self.val = [engine.stack([batch] * len(members))
                    for batch in parallel.val_share([self._to_device(x, y) for x, y in val], group)]
        # Progress of the timeline, saved in each member's checkpoints.
        self.step = 0
        self.branch: int | None = None  # index into plan.branches while training that branch
        # The fork of that branch held in host memory (one process): member index -> (state, progress), and
        # whether it is on disk yet.
        self.forks: dict[int, tuple[dict, dict]] = {}
        self.forks_written = False
        self.latest_in_branch = False  # whether the members' LATEST on disk was saved inside the branch
        # This attempt only.
        self.unsynced: list[torch.Tensor] = []  # each step's losses, one per member
        self.router: dict[str, torch.Tensor] = {}
        # Throughput of this attempt: [tokens, seconds] of its first logged interval (which holds
        # torch.compile's warm-up) and of all the later ones, the figure the result reports. Tokens are
        # each member's own (a pack's members each see the batch in the same seconds).
        self.first_interval: list[float] | None = None
        self.timed = [0.0, 0.0]
        self.interval_tokens = 0  # tokens trained since the last logged point
        self.setup_s = 0.0
        self.aside_s = {"eval": 0.0, "checkpoint": 0.0}  # time taken out of the training intervals
        self.clock = time.perf_counter()
        self.last_checkpoint = time.monotonic()

    @property
    def active(self) -> list[tuple[int, Timeline]]:
        return [(i, m) for i, m in enumerate(self.members) if m.result is None]

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> list[TrialResult]:
        """Every member's result (each written to its workdir as it ends)."""
        self._resume()
        self.setup_s = time.perf_counter() - self.started
        with deferred_interrupts():
            try:
                while self._advance():
                    check_interrupt()  # Ctrl-C or Ray's cancel, taken between steps
            except KeyboardInterrupt:
                self._save()
                raise
        for i, member in self.active:
            self._log_time(member)
            member.write_result(self._result(i, names.FINISHED), self.group)
        return [member.result for member in self.members]

    def _advance(self) -> bool:
        """One step of the timeline, or one change of phase. False when the main run is done or no member is left."""
        plan = self.plan
        if not self.active:
            return False
        if self.branch is None:
            done = len(self.active[0][1].branches_done)
            due = done < len(plan.branches) and plan.branches[done]
            if due and due.fork_step == self.step:
                self._fork(done)
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
        lrs = [lr_at(m.trial.train.schedule, m.trial.train.lr, self.plan, self.step, branch) for m in self.members]
        losses, self.router = self.engine.train_step(self._micro_batches(self.step), lrs)
        self.step += 1
        self.unsynced.append(losses)

    def _end(self, i: int, status: str, diverged_at: int | None = None, error: str | None = None) -> None:
        """Member i stops here (diverged or pruned): its result is written and it takes no more updates."""
        self.engine.freeze(i)
        self._log_time(self.members[i])
        self.members[i].write_result(self._result(i, status, diverged_at, error), self.group)

    # --- phases ---------------------------------------------------------------------------------

    def _fork(self, index: int) -> None:
        # No LATEST here: a kill inside the branch before its first checkpoint resumes the main run before
        # the fork and comes back to it.
        self._flush()
        with self._aside("checkpoint"):
            for i, _ in self.active:
                if self.group.world == 1:
                    self.forks[i] = checkpoint.capture(*self.engine.member(i)), self._progress(i)
                else:
                    self._checkpoint(i, checkpoint.FORK)
        self.branch = index

    def _end_branch(self) -> None:
        branch = self.plan.branches[self.branch]
        done = {}
        with self._aside("eval"):
            losses = self._validate()
            for i, member in self.active:
                bpb = self._bpb(losses[i])
                member.branch_sinks(branch.tokens).log({names.VAL_LOSS: losses[i], names.VAL_BPB: bpb}, branch.tokens)
                done[i] = [*member.branches_done, dataclasses.asdict(BranchResult(branch.tokens, losses[i], bpb))]
        with self._aside("checkpoint"):
            for i, member in self.active:
                # The fork's state holds the divergence tracker too: the branch's decayed, lower losses must
                # not become the minimum that the main run's losses are held against.
                if i in self.forks:
                    state, progress = self.forks[i]
                    model, optimizer = self.engine.member(i)
                    checkpoint.restore(state, model, optimizer)
                    self.engine.set_member(i, model, optimizer)
                    self._take_progress(i, progress)
                else:  # on disk: a group of ranks wrote it, or this attempt resumed inside the branch
                    self._load(i, checkpoint.FORK)
                member.branches_done = done[i]
        self.forks = {}
        if self.latest_in_branch:  # it would resume into the finished branch; a LATEST from before the
            self._save()           # fork (or none) resumes the main run, which comes back through the branch

    def _evaluate_main(self) -> None:
        self._flush()
        with self._aside("eval"):
            losses = self._validate()
            tokens = self.step * self.plan.batch_size
            for i, member in self.active:
                member.final_val = [losses[i], self._bpb(losses[i])]
                member.sink.log({names.VAL_LOSS: losses[i], names.VAL_BPB: member.final_val[1]}, tokens)
                asked = member.on_eval is not None and member.on_eval(tokens, losses[i])
                if self.group.from_main(asked) and self.step < self.plan.total_steps:  # the pruner asks rank 0
                    self._end(i, names.PRUNED, error=f"pruned at {tokens} tokens (val loss {losses[i]:.4f})")

    # --- evaluation and logging -----------------------------------------------------------------

    def _validate(self) -> list[float]:
        total, count = self.group.sum(self.engine.evaluate(self.val))
        return (total / count).reshape(-1).tolist()

    @contextmanager
    def _aside(self, phase: str) -> Iterator[None]:
        """Time spent on `phase` (eval, checkpoint), counted there and kept out of the training intervals."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.aside_s[phase] += seconds
            self.clock += seconds

    def _log_time(self, member: Timeline) -> None:
        """Where this attempt's wall time went (names.TIME_PHASES), logged as the member ends."""
        first = self.first_interval[1] if self.first_interval else 0.0
        spent = {"setup": self.setup_s, "first_interval": first, "train": self.timed[1], **self.aside_s,
                 "total": time.perf_counter() - self.started}
        spent["other"] = spent["total"] - sum(v for k, v in spent.items() if k != "total")
        member.sink.log({names.time_metric(p): spent[p] for p in names.TIME_PHASES}, self._main_tokens())

    def _bpb(self, loss: float) -> float:
        return loss / math.log(2) / self.data.val_bytes_per_token

    def _sync(self) -> None:
        """Bring the step losses to the host and check each member's for divergence."""
        if not self.unsynced:
            return
        losses = self.group.mean(torch.stack(self.unsynced)).tolist()  # [steps][members], the group's means
        first = self.step - len(losses)
        self.unsynced = []
        self.interval_tokens += len(losses) * self.plan.batch_size
        for i, member in self.active:
            self._track(i, member, first, [step_losses[i] for step_losses in losses])

    def _track(self, i: int, member: Timeline, first: int, losses: list[float]) -> None:
        """Member i's losses of the steps from `first` on: pending for its next point, or its divergence."""
        cfg = member.trial.train
        for offset, loss in enumerate(losses):
            step = first + offset  # the update that gave this loss
            tokens = (step + 1) * self.plan.batch_size
            if not math.isfinite(loss):
                return self._end(i, names.DIVERGED, tokens, f"train loss {loss} at {tokens} tokens")
            if step >= self.plan.warmup_steps and loss > cfg.spike_threshold * member.loss_min:
                return self._end(i, names.DIVERGED, tokens, f"train loss {loss:.4g} at {tokens} tokens is over "
                                 f"{cfg.spike_threshold} x its running minimum {member.loss_min:.4g}")
            member.loss_min = min(member.loss_min, loss)
            member.pending.append(loss)

    def _flush(self) -> None:
        """Log each member's train loss since its last point, with lr, FLOPs, throughput and epochs."""
        self._sync()
        now = time.perf_counter()
        if not any(member.pending for _, member in self.active):
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
        router = self._router_by_member()
        for i, member in self.active:
            cfg = member.trial.train
            metrics = {
                names.TRAIN_LOSS: float(np.mean(member.pending)),
                names.LR: lr_at(cfg.schedule, cfg.lr, self.plan, self.step - 1, branch),
                names.FLOPS: self.flops_per_token * tokens,
                names.TOKENS_PER_S: tokens_per_s,
                names.EPOCHS: self.train_data[i].epochs(tokens, self.seq_len),
                **router[i],
            }
            if self.peak:
                metrics[names.MFU] = self.flops_per_token * tokens_per_s / self.peak
            (member.branch_sinks(branch.tokens) if branch else member.sink).log(metrics, tokens)
            member.pending = []

    def _router_by_member(self) -> list[dict[str, float]]:
        """Each member's router statistics (the step's, per layer) as floats, in one transfer."""
        if not self.router:
            return [{} for _ in self.members]
        values = self.group.mean(torch.stack([v.reshape(-1) for v in self.router.values()])).tolist()  # [statistics][members]
        keys = [names.ROUTER_PREFIX + k for k in self.router]
        return [dict(zip(keys, column)) for column in zip(*values)]

    # --- checkpoints ----------------------------------------------------------------------------

    def _progress(self, i: int) -> dict:
        member = self.members[i]
        return {"step": self.step, "branch": self.branch, "branches_done": member.branches_done,
                "loss_min": member.loss_min, "pending": member.pending, "final_val": member.final_val}

    def _checkpoint(self, i: int, name: str) -> None:
        checkpoint.save(self.members[i].workdir, name, *self.engine.member(i), self._progress(i), self.group)

    def _save(self) -> None:
        self._sync()  # the losses reach the host: the end of the steps' own time
        with self._aside("checkpoint"):
            for i, member in self.active:
                make_durable(member.sinks())
                if i in self.forks and not self.forks_written:  # LATEST inside the branch needs its fork on disk
                    checkpoint.save_state(member.workdir, checkpoint.FORK, *self.forks[i], self.group)
                self._checkpoint(i, checkpoint.LATEST)
            self.forks_written = bool(self.forks)
            self.latest_in_branch = self.branch is not None
        self.last_checkpoint = time.monotonic()

    def _load(self, i: int, name: str) -> None:
        """Member i from its checkpoint `name` (there is one)."""
        model, optimizer = self.engine.member(i)
        progress = checkpoint.load(self.members[i].workdir, name, model, optimizer, self.group, self.device)
        self.engine.set_member(i, model, optimizer)
        self._take_progress(i, progress)

    def _take_progress(self, i: int, progress: dict) -> None:
        """Member i's part of a checkpoint's progress; the first member's sets the timeline's step and phase."""
        member = self.members[i]
        if i != self.active[0][0] and (progress["step"], progress["branch"]) != (self.step, self.branch):
            raise ValueError(f"{member.workdir}: checkpoint at step {progress['step']}, branch {progress['branch']}, "
                             f"not the pack's step {self.step}, branch {self.branch}")
        self.step, self.branch = progress["step"], progress["branch"]
        member.branches_done, member.loss_min = progress["branches_done"], progress["loss_min"]
        member.pending, member.final_val = progress["pending"], progress["final_val"]
        self.unsynced = []

    def _resume(self) -> None:
        """Every member from its checkpoint LATEST; they must all have one (at one step and phase) or none."""
        saved = {i: checkpoint.progress(member.workdir, checkpoint.LATEST) is not None for i, member in self.active}
        if len(set(saved.values())) > 1:
            raise ValueError("some members of the pack have a checkpoint and some not; pack them by progress "
                             "(runners.training.pack.run_pack does)")
        for i, has in saved.items():
            if has:
                self._load(i, checkpoint.LATEST)
        self.latest_in_branch = self.branch is not None
        self.clock = time.perf_counter()

    # --- data -----------------------------------------------------------------------------------

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> Batch:
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x, y

    def _micro_batches(self, step: int) -> list[Batch]:
        """Each member's batch of the step (a function of step and its seed alone; on a group, this rank's share
        of it), as one input cut into micro-batches along the sequences. All members' windows are read in one
        gather (on the GPU where the tokens are resident: runners.data.resident)."""
        plan = self.plan
        first, count = parallel.rank_slice(plan.seqs_per_step, self.group)  # this rank's share of the batch
        windows = np.stack([data.train_windows(step * plan.seqs_per_step + first, count, self.seq_len,
                                               member.trial.train.seed)
                            for member, data in zip(self.members, self.train_data)])
        tokens = self.train_tokens.batch(windows, self.seq_len)  # [members, count, seq_len + 1]
        x, y = self.engine.stack([(t[:, :-1], t[:, 1:]) for t in tokens])
        return list(zip(x.split(plan.micro_seqs, dim=-2), y.split(plan.micro_seqs, dim=-2)))

    def _end_step(self) -> int:
        return self.plan.branches[self.branch].end_step if self.branch is not None else self.plan.total_steps

    # --- result ---------------------------------------------------------------------------------

    def _main_tokens(self) -> int:
        """Tokens the main run has trained (at a branch: its fork's)."""
        main_step = self.step if self.branch is None else self.plan.branches[self.branch].fork_step
        return main_step * self.plan.batch_size

    def _result(self, i: int, status: str, diverged_at: int | None = None, error: str | None = None) -> TrialResult:
        member, tokens = self.members[i], self._main_tokens()
        final = member.final_val if status == names.FINISHED else None
        timed_tokens, seconds = self.timed if self.timed[1] > 0 else (self.first_interval or [0.0, 0.0])
        tokens_per_s = timed_tokens / seconds if seconds > 0 else 0.0
        return TrialResult(
            status=status, final_val_loss=final[0] if final else None, final_val_bpb=final[1] if final else None,
            tokens=tokens, branches=[BranchResult(**b) for b in member.branches_done],
            repeats_data=self.train_data[i].epochs(tokens, self.seq_len) > 1.0,
            diverged_at_tokens=diverged_at, error=error, tokens_per_s=tokens_per_s,
            mfu=self.flops_per_token * tokens_per_s / self.peak if self.peak and tokens_per_s else None,
            numerics=self.engine.numerics,
        )

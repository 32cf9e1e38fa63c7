"""Where a sweep's trials come from: a fixed grid, or one Optuna study per scale.

Why Optuna's ask/tell feeding Ray tasks, and not Ray Tune's OptunaSearch: trials here are the same
Ray tasks as in a grid sweep, with MLflow as the record of what is done, so a search needs only
something that proposes the next (lr, batch) and hears back the loss. The study lives in an RDB
storage, so a re-run sweep continues it; the workers open the same storage to report intermediate
validation losses and ask the pruner, as Optuna's distributed mode does.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

from runners.tracking import names
from sweeps.expand import Cell, PlannedTrial
from sweeps.spec import SearchSpec, SweepSpec


@dataclass(frozen=True)
class Pruning:
    """What a worker needs to report to its Optuna trial and ask whether to stop (plain data for Ray)."""

    storage: str
    study: str
    trial_id: int  # Optuna's storage-wide trial id
    pruner: str  # search.pruner: a loaded study does not know its pruner, so the worker builds it again
    prune_from_tokens: int  # no pruning before this point of the trial (PRUNE_FROM of its tokens)


class GridSource:
    """A fixed list of trials, all offered at once, largest compute first: Ray starts tasks of one shape in the
    order they were submitted, and starting the longest first keeps the GPUs busy to the end of the sweep."""

    def __init__(self, planned: list[PlannedTrial]):
        self.planned, self.total = planned, len(planned)
        self._todo = sorted(planned, key=lambda p: p.compute_exact, reverse=True)

    def take(self) -> list[tuple[PlannedTrial, Pruning | None]]:
        out, self._todo = self._todo, []
        return [(p, None) for p in out]

    def done(self, planned: PlannedTrial, status: str, loss: float | None) -> None:
        pass


def storage_url(spec: SweepSpec) -> str:
    if spec.search.storage:
        return spec.search.storage
    path = (spec.checkpoint_dir / spec.name / "optuna.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _sampler(search: SearchSpec, seed: int):
    import optuna

    return {"tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True),
            "random": lambda: optuna.samplers.RandomSampler(seed=seed),
            "qmc": lambda: optuna.samplers.QMCSampler(seed=seed)}[search.sampler]()


# Median pruning compares validation losses at the same token count. Before about a quarter of training they
# say more about the warm-up than about the end: on an H100 (gutenberg100x_search, at 5% to 9% of 24M tokens)
# it stopped lr 6.9e-3 at batch 21,504 while 6.1e-3 at 5,376 went on to the scale's best loss.
PRUNE_FROM = 0.25


def _pruner(kind: str, prune_from_tokens: int):
    import optuna

    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=prune_from_tokens),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[kind]()


class _Study:
    """One scale's study: proposes (lr, batch), maps Optuna trials to harness trials."""

    def __init__(self, spec: SweepSpec, cell: Cell, storage: str, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec, self.cell, self.seed, self.storage = spec, cell, seed, storage
        base = cell.trial(_first(spec.train.lr), _first(spec.train.batch_size), seed)
        self.name = f"{spec.name}/N{base.params.active}-D{base.D:.3g}-s{seed}"
        self.prune_from_tokens = int(PRUNE_FROM * base.D)
        self.study = optuna.create_study(study_name=self.name, storage=storage, direction="minimize", load_if_exists=True,
                                         pruner=_pruner(spec.search.pruner, self.prune_from_tokens))
        # The sampler's seed comes from the study's name and how many trials it already has: with one seed for
        # all, every scale would try the same first points, and a continued study would propose its first
        # points again (the same trials, found done, teaching it nothing).
        history = f"{self.name}/{len(self.study.get_trials(deepcopy=False))}"
        self.study.sampler = _sampler(spec.search, int(hashlib.sha256(history.encode()).hexdigest()[:8], 16))
        self.in_flight: dict[str, int] = {}  # harness trial id -> Optuna trial number
        self._requeue_interrupted()

    def _requeue_interrupted(self) -> None:
        """Trials left RUNNING by a killed driver: close them and ask their params again, so the same
        harness trial (same id, same checkpoint, same MLflow run) resumes."""
        import optuna
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            optuna.trial.Trial(self.study, t._trial_id).set_user_attr("requeued", True)
            self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(t.params, skip_if_exists=True)

    def used(self) -> int:
        return sum(not t.user_attrs.get("requeued") for t in self.study.get_trials(deepcopy=False)
                   if t.state.name != "WAITING")

    def ask(self) -> tuple[PlannedTrial, Pruning]:
        search, seq = self.spec.search, self.cell.model.seq_len
        trial = self.study.ask()
        lr = trial.suggest_float("lr", *search.lr, log=True) if search.lr else _first(self.spec.train.lr)
        if search.batch_size:
            low, high = (max(1, round(b / seq)) for b in search.batch_size)
            batch = trial.suggest_int("batch_seqs", low, high, log=True) * seq
        else:
            batch = _first(self.spec.train.batch_size)
        planned = self.cell.trial(lr, batch, self.seed)
        trial.set_user_attr("trial_id", planned.trial_id)
        self.in_flight[planned.trial_id] = trial.number
        return planned, Pruning(self.storage, self.name, trial._trial_id, self.spec.search.pruner, self.prune_from_tokens)

    def tell(self, planned: PlannedTrial, status: str, loss: float | None) -> None:
        from optuna.trial import TrialState

        number = self.in_flight.pop(planned.trial_id)
        if status == names.FINISHED and loss is not None and math.isfinite(loss):
            self.study.tell(number, loss)
        elif status == names.PRUNED:
            self.study.tell(number, state=TrialState.PRUNED)
        else:
            self.study.tell(number, state=TrialState.FAIL)


class SearchSource:
    """One Optuna study per (scale, seed); each keeps `parallel` trials in flight until it has asked `trials`."""

    def __init__(self, spec: SweepSpec, cells: list[Cell]):
        storage = storage_url(spec)
        self.studies = [_Study(spec, c, storage, seed) for c in cells for seed in spec.train.seeds]
        self.total = len(self.studies) * spec.search.trials
        self._owner: dict[str, _Study] = {}
        self._trials, self._parallel = spec.search.trials, spec.search.parallel

    def take(self) -> list[tuple[PlannedTrial, Pruning]]:
        out = []
        for study in self.studies:
            while len(study.in_flight) < self._parallel and study.used() < self._trials:
                planned, pruning = study.ask()
                self._owner[planned.trial_id] = study
                out.append((planned, pruning))
        return out

    def done(self, planned: PlannedTrial, status: str, loss: float | None) -> None:
        self._owner.pop(planned.trial_id).tell(planned, status, loss)


def _first(axis) -> float:
    return axis[0] if isinstance(axis, list) else axis


def pruning_callback(pruning: Pruning) -> Callable[[int, float], bool]:
    """For the worker: report each validation loss to the trial's study and say whether to stop."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=pruning.study, storage=pruning.storage,
                              pruner=_pruner(pruning.pruner, pruning.prune_from_tokens))
    trial = optuna.trial.Trial(study, pruning.trial_id)

    def report(tokens: int, val_loss: float) -> bool:
        trial.report(val_loss, step=tokens)
        return trial.should_prune()

    return report

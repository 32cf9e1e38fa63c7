"""Live progress of a sweep: a small Ray actor the trials report to, and a rich progress bar over it."""

from __future__ import annotations

import ray
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from runners.tracking import names


@ray.remote
class Board:
    """Which trials have started and how far each has got (fraction of its main run)."""

    def __init__(self):
        self.fraction: dict[str, float] = {}

    def started(self, trial_id: str) -> None:
        self.fraction.setdefault(trial_id, 0.0)

    def evaluated(self, trial_id: str, fraction: float) -> None:
        self.fraction[trial_id] = min(1.0, fraction)

    def snapshot(self) -> dict:
        return {"running": list(self.fraction), "fraction": dict(self.fraction)}


class SweepProgress:
    """done / running / failed, and an ETA weighted by the compute of the trials submitted so far."""

    def __init__(self, total: int, console: Console | None = None):
        self.total = total
        self.compute: dict[str, float] = {}
        self.counts = {"done": 0, "skipped": 0, "failed": 0}
        self.finished_ids: set[str] = set()
        self.fraction: dict[str, float] = {}
        self.running: set[str] = set()
        self.console = console or Console(stderr=True, log_path=False)
        # fits in 80 columns with room for the counts: the bar gives way first, the ETA is never cut off
        self.bar = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=None), TextColumn("{task.percentage:>3.0f}%"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=False,
            expand=False,
        )
        self.task = self.bar.add_task(self._describe(), total=1.0)

    def _describe(self) -> str:
        skipped = f" ({self.counts['skipped']} before)" if self.counts["skipped"] else ""
        failed = f", {self.counts['failed']} failed" if self.counts["failed"] else ""
        return (f"{self.counts['done'] + self.counts['skipped']}/{self.total} done{skipped}, "
                f"{len(self.running)} running{failed}")

    def submitted(self, trial_id: str, compute: float) -> None:
        self.compute[trial_id] = compute
        self.bar.update(self.task, total=max(sum(self.compute.values()), 1.0))

    def update(self, snapshot: dict) -> None:
        self.fraction |= snapshot["fraction"]
        self.running = set(snapshot["running"]) - self.finished_ids
        completed = sum(c * (1.0 if t in self.finished_ids else self.fraction.get(t, 0.0)) for t, c in self.compute.items())
        self.bar.update(self.task, completed=completed, description=self._describe())

    def finished(self, trial_id: str, status: str, skipped: bool = False) -> None:
        self.finished_ids.add(trial_id)
        self.running.discard(trial_id)
        self.counts["skipped" if skipped else "failed" if status in (names.FAILED, names.KILLED) else "done"] += 1
        if not skipped:
            self.bar.console.log(f"trial {trial_id} {status}")
        self.update({"running": [], "fraction": {}})

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

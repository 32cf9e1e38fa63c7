"""The benchmark log: one JSON object a line in results/benchmarks.jsonl, the one place its fields are named.

Fields: date (UTC, ISO), device (GPU name, or "cpu: <n> cores"), commit (short hash, "+dirty" when the
tree has changes), benchmark, metric, value, unit, config (what was measured, and how).
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from pathlib import Path

LOG = Path(__file__).resolve().parents[2] / "results" / "benchmarks.jsonl"


def device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu: {os.cpu_count()} cores"


def commit() -> str:
    """SCALING_COMMIT when set (a device call names the commit its tree came from: the copy there may carry a
    stale .git), else this checkout's HEAD, marked +dirty with uncommitted changes."""
    if named := os.environ.get("SCALING_COMMIT"):
        return named
    root = LOG.parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        # the log itself does not count: its own first line would mark every later one +dirty
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{LOG.relative_to(root)}"],
                               cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty.strip() else "")


def append(benchmark: str, metric: str, value: float, unit: str, config: dict, path: Path = LOG, *,
           on: str | None = None, at: str | None = None) -> dict:
    """Append one figure to the log and return it. `on` and `at` name the device and commit of a figure
    measured elsewhere (a device call's output, logged here afterwards)."""
    line = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": on or device(), "commit": at or commit(),
            "benchmark": benchmark, "metric": metric, "value": value, "unit": unit, "config": config}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line

"""The plan as a terminal table that stays readable at any width: the columns that fit, most useful first,
each value short (a trial is named by what it is; its id is 8 characters; times in s, min or h)."""

from __future__ import annotations

import pandas as pd
from rich.table import Table


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def gpus(value: float) -> str:
    """A task's GPUs: a gang's W, a share as 1/K, or <=1 where the run sizes the share by the memory it measures."""
    if value != value:  # NaN
        return "<=1"
    if value >= 1 or not (1 / value).is_integer():
        return f"{value:g}"
    return f"1/{1 / value:.0f}"


def _g(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# (header, plan_table column, format) in the order shown; PRIORITY says which go first when space runs out
COLUMNS = (
    ("pack", "pack", str),  # trials trained together as one model, in one Ray task (sweeps/packs.py)
    ("K", "pack_size", str),
    ("trial", "name", str),
    ("id", "trial_id", lambda v: str(v)[:8]),
    ("E", "E", str),
    ("budget", "budget", _g),
    ("unique", "unique_tokens", _g),  # data-constrained sweeps: distinct tokens, and how often each trial repeats them
    ("epochs", "epochs", _g),
    ("batch", "batch_size", str),
    ("FLOPs (6N)", "flops_6N", _g),
    ("GPUs", "gpus", gpus),  # a gang's W or a share; shown where the plan knows more than 'a share by memory'
    ("est. time", "est_seconds", duration),
)
PRIORITY = ("trial", "est. time", "GPUs", "id", "K", "pack", "FLOPs (6N)", "epochs", "unique", "budget", "batch", "E")
BORDER = 3  # a column's padding and its rule


def fitting_columns(table: pd.DataFrame, width: int) -> list[tuple[str, list[str]]]:
    """(header, cells) of the columns that fit in `width`, taken in PRIORITY order, shown in COLUMNS order.
    A column that says nothing (every row the same E, no budget, no packs) is left out."""
    cells = {}
    for header, column, fmt in COLUMNS:
        if column not in table or table[column].isna().all():
            continue
        values = [fmt(v) for v in table[column]]
        if header in ("E", "budget") and len(set(values)) == 1:
            continue
        if header in ("pack", "K") and set(table["pack_size"]) == {1}:  # no trial shares its task
            continue
        cells[header] = values
    room, chosen = width - 1, set()
    for header in PRIORITY:
        if header in cells:
            need = max(len(header), *(len(v) for v in cells[header])) + BORDER
            if need <= room:
                chosen.add(header)
                room -= need
    return [(h, cells[h]) for h, _, _ in COLUMNS if h in chosen]


def plan_view(title: str, table: pd.DataFrame, width: int) -> Table:
    columns = fitting_columns(table, width)
    show = Table(title=title)
    for header, _ in columns:
        show.add_column(header, justify="left" if header == "trial" else "right", no_wrap=True)
    for row in zip(*(c for _, c in columns)):
        show.add_row(*row)
    return show

"""MLflow -> the points table (fitting/points.py): one row per validation evaluation of every trial and branch.

A row is final when it is the last evaluation of a finished trial at its full D, or the end of a WSD
branch: only those are points of a parametric fit. Intermediate points of a run are kept (the
envelope uses them) but marked final = False, because a run stopped early is not the same as a run
planned for that D (its learning rate never decayed there). unique_tokens and epochs say how much of D was
repeated data (the data_constrained law reads them).
"""

from __future__ import annotations

import pandas as pd

from fitting.points import COLUMNS
from runners.tracking import names
from runners.tracking.runs import SweepRuns
from sweeps.spec import FitSpec


def _history(runs: SweepRuns, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in runs.client.get_metric_history(run_id, key)}


def _unique_tokens(cap: str, epochs: dict[int, float]) -> float | None:
    """The distinct training tokens of a trial: its data.unique_tokens, else its whole training split as its
    logged epochs say (tokens / epochs); None for a trial that logged no epochs (nor a cap)."""
    if cap != "None":
        return float(cap)
    tokens, passes = next(((t, e) for t, e in sorted(epochs.items()) if e > 0), (None, None))
    return None if tokens is None else float(round(tokens / passes))


def collect_points(runs: SweepRuns, fit: FitSpec) -> pd.DataFrame:
    """The sweep's points, N and C under the conventions `fit` names (all conventions kept as columns)."""
    rows = []
    for trial_id, run in {**runs.runs(names.ROLE_TRIAL), **runs.runs(names.ROLE_BRANCH)}.items():
        p, tags = run.data.params, run.data.tags
        if names.PARAM_N_ACTIVE not in p:
            continue
        status = tags.get(names.TAG_STATUS, names.PENDING)
        loss, bpb = _history(runs, run.info.run_id, names.VAL_LOSS), _history(runs, run.info.run_id, names.VAL_BPB)
        unique = _unique_tokens(p.get("data.unique_tokens", "None"), _history(runs, run.info.run_id, names.EPOCHS))
        n_active, per_token = float(p[names.PARAM_N_ACTIVE]), float(p[names.PARAM_FLOPS_PER_TOKEN_EXACT])
        planned_d = int(p[names.PARAM_D])
        budget = p.get("budget", "None")
        for tokens in sorted(loss):
            rows.append({
                "trial_id": trial_id,
                "parent_trial_id": tags.get(names.TAG_PARENT_TRIAL, ""),
                "family": p["model.family"],
                "E": int(p[names.PARAM_E]),
                "N_total": int(p[names.PARAM_N_TOTAL]), "N_nonembed": int(p[names.PARAM_N_NONEMBED]),
                "N_active": int(n_active),
                "D": tokens, "tokens": tokens,
                "C_6N": 6.0 * n_active * tokens, "C_exact": per_token * tokens,
                "loss": loss[tokens], "bpb": bpb.get(tokens),
                "final": status == names.FINISHED and tokens == planned_d,
                "budget": None if budget == "None" else float(budget),
                "step": tokens // int(p["train.batch_size"]),
                "seed": int(p["train.seed"]), "lr": float(p["train.lr"]), "batch_size": int(p["train.batch_size"]),
                "status": status,
                "unique_tokens": unique, "epochs": None if unique is None else tokens / unique,
            })
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    table["N"] = table[{"active": "N_active", "nonembed": "N_nonembed", "total": "N_total"}[fit.params]]
    table["C"] = table[{"6N": "C_6N", "exact": "C_exact"}[fit.flops]]
    return table.sort_values(["trial_id", "tokens"], ignore_index=True)

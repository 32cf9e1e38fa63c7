"""The sweep's fitted law on its parent run, as metrics and tags, so MLflow's runs and experiments tables
compare sweeps side by side (the law files and plots stay the run's artifacts).

Metrics `law/<law>/<coefficient>` with `_low` and `_high` (the 95% interval), derived figures included (a:
the N_opt exponent); a coefficient the data do not identify is a tag `law/<law>/<coefficient>` saying why,
never a metric. Tags, not params, for the text: a re-exported sweep may fit other values, and MLflow's params
cannot change.
"""

from __future__ import annotations

import math

PREFIX = "law/"


def law_summary(doc: dict) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of a law file's sections: values and intervals, and what is not identified."""
    metrics: dict[str, float] = {}
    tags = {f"{PREFIX}main": doc.get("law") or "none",
            f"{PREFIX}conventions": f"N: {doc['conventions']['N']}; C: {doc['conventions']['C']}; "
                                    f"loss: {doc['conventions']['loss']}"}
    for name, section in doc.get("laws", {}).items():
        values = {**section["params"], **section.get("derived", {})}
        cis = {**section["ci"], **section.get("derived_ci", {})}
        for k, v in values.items():
            key = f"{PREFIX}{name}/{k}"
            why = section.get("not_identified", {}).get(k)
            if why:
                tags[key] = f"not identified: {why}"
                continue
            if v is None or not math.isfinite(v):
                continue
            metrics[key] = float(v)
            if cis.get(k):
                metrics[f"{key}_low"], metrics[f"{key}_high"] = (float(c) for c in cis[k])
    for name, why in doc.get("failed", {}).items():
        tags[f"{PREFIX}{name.replace(' ', '_')}"] = f"not fitted: {why}"[:5000]
    return metrics, tags

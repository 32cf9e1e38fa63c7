"""Pre-registered predictions: write down what a law says about a larger budget before training it, then score it.

    python -m fitting.prediction register --law results/S/law.json --compute 6e14 --out results/S/prediction.json
    python -m fitting.prediction score --prediction results/S/prediction.json --points results/H/points.csv

With --unique-tokens U, the prediction is the optimum when only U unique tokens exist (the law file's
data_constrained section), and `score` takes the held-out points trained on U unique tokens.

`register` records N_opt, D_opt and the loss at the optimum with their bootstrap intervals, and the loss's
total interval (bootstrap plus the law's measured extrapolation error; fitting/lawfile.py). `score`
reads the held-out budget's final points, takes their IsoFLOP minimum (the robust quadratic in log N of
approach 2) and the best size actually trained, and adds actual_loss, rel_error
and whether each interval covered what was found (loss_interval_total_covers is None without a total interval).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fitting.errors import FitInputError
from fitting.isoflop import profile_rows, quadratic_minimum
from fitting.lawfile import load_law
from fitting.table import check


def register(law_path: Path, compute: float, E: int = 1, unique_tokens: float | None = None) -> dict:
    optimal = load_law(law_path).optimal(compute, E=E, unique_tokens=unique_tokens)
    return {"registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "law": str(law_path),
            "compute": compute, "E": E, "unique_tokens": unique_tokens, "predicted": optimal}


def score(prediction: dict, points: pd.DataFrame) -> dict:
    table, _ = profile_rows(check(points))  # the main runs' final points (branches end before the budget)
    if "E" in table:
        table = table[table.E == prediction["E"]]
    if "budget" in table:
        table = table[np.isclose(table.budget.astype(float), prediction["compute"], rtol=0.01)]
    if prediction.get("unique_tokens") is not None:
        if "unique_tokens" not in table:
            raise FitInputError("the prediction is for a unique-token budget; the points need a unique_tokens column")
        # a cap is rounded to whole sequences when a trial is set up (3e6 -> 3000064): 1% tells budgets apart
        table = table[np.isclose(table.unique_tokens.astype(float), prediction["unique_tokens"], rtol=0.01)]
    if table.N.nunique() < 3:
        raise FitInputError(f"scoring needs the final points of at least 3 sizes at the held-out budget; found {table.N.nunique()}")
    profile = quadratic_minimum(np.log(table.N.to_numpy(float)), table.loss.to_numpy(float))
    best = table.loc[table.loss.idxmin()]
    inside = profile["flag"] is None
    actual = profile["loss_opt"] if inside else float(best.loss)
    predicted = prediction["predicted"]
    loss_ci, n_ci, total = predicted.get("loss_ci"), predicted.get("N_opt_ci"), predicted.get("loss_ci_total")
    return prediction | {
        "actual_loss": actual,
        "actual_loss_method": "IsoFLOP minimum (quadratic in log N)" if inside else f"best size trained ({profile['flag']})",
        "best_trained": {"N": float(best.N), "D": float(best.D), "loss": float(best.loss)},
        "actual_N_opt": profile["N_opt"] if inside else float(best.N),
        "rel_error": (predicted["loss"] - actual) / actual,
        "loss_interval_covers": bool(loss_ci and loss_ci[0] <= actual <= loss_ci[1]),
        "loss_interval_total_covers": None if total is None else bool(total[0] <= actual <= total[1]),
        "N_opt_interval_covers_best_size": bool(n_ci and n_ci[0] <= float(best.N) <= n_ci[1]),
        "scored_points": int(len(table)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fitting.prediction", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("register")
    p.add_argument("--law", type=Path, required=True)
    p.add_argument("--compute", type=float, required=True)
    p.add_argument("--E", type=int, default=1)
    p.add_argument("--unique-tokens", type=float, default=None,
                   help="the optimum when only this many unique tokens exist (a data_constrained law)")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("score")
    p.add_argument("--prediction", type=Path, required=True)
    p.add_argument("--points", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "register":
            doc, out = register(args.law, args.compute, args.E, args.unique_tokens), args.out
        else:
            doc, out = score(json.loads(args.prediction.read_text()), pd.read_csv(args.points)), args.prediction
    except FitInputError as e:
        print(f"error: {e}")
        return 2
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m fitting.bench`: time the default chinchilla fit of 250 points and a 1000-replicate bootstrap,
and append the figures to results/benchmarks.jsonl (benchmark "fit").

Goals (issue 6): under 5 s for the fit, under 60 s for the bootstrap, on the 2-core machine. The machine
is shared, so the 1-minute load average is recorded with every figure, and the fit is timed 3 times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import pandas as pd

from fitting import laws
from fitting.parametric import fit_parametric
from runners import benchlog

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def points(n_sizes: int = 10, n_tokens: int = 25, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(7, 11, n_sizes), n_tokens)
    D = np.tile(np.logspace(9, 13, n_tokens), n_sizes)
    return pd.DataFrame({"N": N, "D": D, "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + noise * rng.standard_normal(N.size))})


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fitting.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="times the fit is timed (the median is logged)")
    args = parser.parse_args(argv)
    table = points()
    config = {"points": len(table), "law": "chinchilla", "grid": "default (4500 starts)", "huber_delta": 1e-3,
              "noise": 0.01, "torch_threads": 1}
    fits = [_timed(lambda: fit_parametric(table)) for _ in range(args.repeats)]
    seconds = statistics.median(s for s, _ in fits)
    section = fits[0][1]
    recovered = {k: round(section["params"][k] / HOFFMANN[k] - 1, 4) for k in ("E", "alpha", "beta")}
    lines = [benchlog.append("fit", "approach3_seconds", round(seconds, 3), "s",
                             {**config, "runs": [round(s, 3) for s, _ in fits], "relative_error": recovered,
                              "load_avg_1m": round(os.getloadavg()[0], 2)})]
    boot_seconds, boot = _timed(lambda: fit_parametric(table, bootstrap=args.replicates))
    lines.append(benchlog.append("fit", "approach3_bootstrap_seconds", round(boot_seconds, 3), "s",
                                 {**config, "replicates": args.replicates, "converged": boot["bootstrap"]["converged"],
                                  "includes": "the fit itself", "load_avg_1m": round(os.getloadavg()[0], 2)}))
    for line in lines:
        print(f"{line['metric']}: {line['value']} {line['unit']} ({line['device']}, load {line['config']['load_avg_1m']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`python -m runners.bench.fit`: time the default chinchilla fit of 250 points and a 1000-replicate bootstrap,
and append the figures to results/benchmarks.jsonl (benchmark "fit"); `--coverage 100` also counts how
often the bootstrap intervals cover the true coefficients (chinchilla, moe and data_constrained, 100 repeats each;
`--coverage-laws` picks some).

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
from runners.bench.log import append

HOFFMANN = dict(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)


def points(n_sizes: int = 10, n_tokens: int = 25, noise: float = 0.01, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    N = np.repeat(np.logspace(7, 11, n_sizes), n_tokens)
    D = np.tile(np.logspace(9, 13, n_tokens), n_sizes)
    return pd.DataFrame({"N": N, "D": D, "loss": laws.chinchilla(N, D, **HOFFMANN) * (1 + noise * rng.standard_normal(N.size))})


MOE = dict(sigma=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28, gamma=0.1)


# Muennighoff et al. 2023's fit (their eq. 7 and Table 1, rounded)
MUENNIGHOFF = dict(E=1.87, A=521.0, B=1488.0, alpha=0.35, beta=0.35, R_D_star=15.4, R_N_star=5.3)


def repeated_points(seed: int, noise: float = 0.005, sizes: int = 5) -> pd.DataFrame:
    """The data-constrained law plus noise: sizes 1e7..1e9 at unique budgets 1e8..1e10 for 1/4 to 64 epochs (U_N is
    5e6..5e8 for these U, so many models have excess parameters), and the same sizes on fresh data (U 1e13)."""
    rng = np.random.default_rng(seed)
    N, U, epochs = (g.ravel() for g in np.meshgrid(np.logspace(7, 9, sizes), [1e8, 1e9, 1e10], [0.25, 1, 4, 16, 64]))
    fresh_N, fresh_D = (g.ravel() for g in np.meshgrid(np.logspace(7, 9, sizes), np.logspace(9, 11, 4)))
    N, D, U = np.r_[N, fresh_N], np.r_[U * epochs, fresh_D], np.r_[U, np.full(fresh_N.size, 1e13)]
    loss = laws.data_constrained(N, D, U, **MUENNIGHOFF) * (1 + noise * rng.standard_normal(N.size))
    return pd.DataFrame({"N": N, "D": D, "unique_tokens": U, "loss": loss, "C": 6 * N * D})


def data_constrained_coverage(repeats: int, replicates: int, sizes: int = 4, noise: float = 0.01) -> dict[str, int]:
    """How many of `repeats` noisy data sets have joint-fit 95% intervals that cover each true exponent and R*."""
    from fitting.data_constrained import fit_data_constrained

    covered = {k: 0 for k in ("alpha", "beta", "R_D_star", "R_N_star")}
    one_start = {"e": (0.5,), "a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}
    for seed in range(repeats):
        section = fit_data_constrained(repeated_points(seed, noise, sizes), grid=one_start, bootstrap=replicates, seed=seed)
        for k in covered:
            covered[k] += section["ci"][k][0] <= MUENNIGHOFF[k] <= section["ci"][k][1]
    return covered


def coverage(law: str, repeats: int, replicates: int) -> dict[str, int]:
    """How many of `repeats` noisy data sets (1% noise) have 95% intervals that cover each true exponent.
    One start per fit (the search is not what this measures), placed away from the truth."""
    covered = {k: 0 for k in (("E", "alpha", "beta") if law == "chinchilla" else ("sigma", "alpha", "beta", "gamma"))}
    truth = HOFFMANN if law == "chinchilla" else MOE
    grid = {"a": (5.0,), "b": (5.0,), "alpha": (0.5,), "beta": (0.5,)}
    grid.update({"e": (0.5,)} if law == "chinchilla" else {"s": (0.5,), "gamma": (0.0,)})
    for seed in range(repeats):
        rng = np.random.default_rng(seed)
        experts = [1] if law == "chinchilla" else [1, 4, 16, 64]
        N, D, E = (g.ravel() for g in np.meshgrid(np.logspace(7, 11, 8), np.logspace(9, 13, 10), experts))
        clean = laws.chinchilla(N, D, **HOFFMANN) if law == "chinchilla" else laws.moe(N, D, E, **MOE)
        table = pd.DataFrame({"N": N, "D": D, "E": E, "loss": clean * (1 + 0.01 * rng.standard_normal(N.size))})
        section = fit_parametric(table, law, grid=grid, bootstrap=replicates, seed=seed)
        for k in covered:
            covered[k] += section["ci"][k][0] <= truth[k] <= section["ci"][k][1]
    return covered


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.bench.fit", description=__doc__.splitlines()[0])
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="times the fit is timed (the median is logged)")
    parser.add_argument("--coverage", type=int, default=0, metavar="REPEATS",
                        help="also count how often the 95%% intervals cover the truth")
    parser.add_argument("--coverage-laws", nargs="+", choices=["chinchilla", "moe", "data_constrained"],
                        default=["chinchilla", "moe", "data_constrained"])
    args = parser.parse_args(argv)
    table = points()
    config = {"points": len(table), "law": "chinchilla", "grid": "default (4500 starts)", "huber_delta": 1e-3,
              "noise": 0.01, "torch_threads": 1}
    fits = [_timed(lambda: fit_parametric(table)) for _ in range(args.repeats)]
    seconds = statistics.median(s for s, _ in fits)
    section = fits[0][1]
    recovered = {k: round(section["params"][k] / HOFFMANN[k] - 1, 4) for k in ("E", "alpha", "beta")}
    lines = [append("fit", "approach3_seconds", round(seconds, 3), "s",
                             {**config, "runs": [round(s, 3) for s, _ in fits], "relative_error": recovered,
                              "load_avg_1m": round(os.getloadavg()[0], 2)})]
    boot_seconds, boot = _timed(lambda: fit_parametric(table, bootstrap=args.replicates))
    lines.append(append("fit", "approach3_bootstrap_seconds", round(boot_seconds, 3), "s",
                                 {**config, "replicates": args.replicates, "converged": boot["bootstrap"]["converged"],
                                  "includes": "the fit itself", "load_avg_1m": round(os.getloadavg()[0], 2)}))
    if args.coverage:
        for law in args.coverage_laws:
            seconds, covered = _timed(lambda: data_constrained_coverage(args.coverage, 100) if law == "data_constrained"
                                      else coverage(law, args.coverage, 100))
            for k, n in covered.items():
                lines.append(append("fit", f"{law}_ci95_covers_{k}", n, f"of {args.coverage}",
                                             {"law": law, "points": {"chinchilla": 80, "moe": 320}.get(law, 72), "noise": 0.01,
                                              "replicates": 100, "seconds": round(seconds, 1),
                                              "load_avg_1m": round(os.getloadavg()[0], 2)}))
    for line in lines:
        print(f"{line['metric']}: {line['value']} {line['unit']} ({line['device']}, load {line['config']['load_avg_1m']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Run names a person can read in the MLflow runs list: what a trial is, not its hash (the id is a tag).

    dense d160x4 N1.2M D69M lr4e-3 s0          a dense trial: width x depth, active N, tokens, lr, seed
    moe8k2 d160x4 N1.2M D69M lr4e-3 s0         an MoE trial with 8 experts, top-2
    dense d160x4 N1.2M D69M lr4e-3 s0 > D23M   a WSD decay branch of it, ending at 23M tokens
"""

from __future__ import annotations

from sweeps.expand import PlannedTrial


def short(x: float) -> str:
    """1.2M, 69M, 598k: two significant figures (three from 100 up) and an SI suffix."""
    scale, suffix = next(((s, u) for s, u in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")) if abs(x) >= s), (1, ""))
    value = x / scale
    return f"{value:.0f}{suffix}" if abs(value) >= 100 else f"{value:.2g}{suffix}"


def rate(x: float) -> str:
    """4e-3, 1.5e-4: a learning rate without the padding of Python's exponent format."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"


def trial_run_name(p: PlannedTrial) -> str:
    m, t = p.trial.model, p.trial.train
    family = f"moe{m.n_experts}k{m.moe.top_k}" if m.family == "moe" else m.family
    return f"{family} d{m.d_model}x{m.n_layers} N{short(p.params.active)} D{short(p.D)} lr{rate(t.lr)} s{t.seed}"


def branch_run_name(p: PlannedTrial, end: int) -> str:
    return f"{trial_run_name(p)} > D{short(end)}"

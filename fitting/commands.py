"""`scaling fit`, `scaling predict` and `scaling compare`: argument parsing and printing only; the work is in the fitters and Law."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from fitting import LAWS, fit_law, lawfile
from fitting.errors import FitInputError
from fitting.table import flops_per_param_token, load_points, with_conventions


FAR_BEYOND = 10.0  # computes beyond this multiple of the data's largest get a warning


def add_fit_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("fit", help="fit a scaling law to a points table (CSV or parquet with N, D, loss)")
    p.add_argument("--points", type=Path, required=True, help="points table, .csv or .parquet (columns N, D, loss, ...)")
    p.add_argument("--law", choices=LAWS + ("all",), default="chinchilla")
    p.add_argument("--out", type=Path, default=Path("law.json"), help="law file, or a folder to write law.json in")
    p.add_argument("--params", choices=["active", "nonembed", "total"], default=None,
                   help="which N (needs the N_active / N_nonembed / N_total column); default: the table's N")
    p.add_argument("--flops", choices=["6N", "exact"], default=None,
                   help="which C (needs C_6N / C_exact); default: the table's C")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap replicates for intervals (0: none)")
    p.add_argument("--resample", choices=["points", "trials"], default="points", help="what the bootstrap redraws")
    p.add_argument("--huber-delta", type=float, default=1e-3, help="Huber delta on log-loss residuals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--x", choices=["N", "D", "C"], default="N", help="the variable of --law power")
    p.add_argument("--no-offset", action="store_true", help="--law power without the constant E")
    p.add_argument("--fit-stages", choices=["joint", "two-stage"], default="joint",
                   help="--law data_constrained: all coefficients at once, or the paper's two stages (chinchilla on "
                        "single-epoch points, then R_D* and R_N*)")
    p.add_argument("--holdout-above", type=float, default=None,
                   help="fit only points with C at or below this and report the error on those above")
    p.set_defaults(func=cmd_fit)
    return p


def add_predict_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("predict", help="evaluate a law file: optimal allocation at a compute, or loss at N, D")
    p.add_argument("--law", type=Path, required=True, help="law.json from `scaling fit` or a sweep")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--compute", type=float, help="training FLOPs: N_opt, D_opt and loss there")
    what.add_argument("--N", type=float, help="parameters (with --D): the predicted loss")
    what.add_argument("--loss", type=float, help="target loss: the least compute that reaches it")
    p.add_argument("--D", type=float, help="training tokens, with --N")
    p.add_argument("--E", type=float, default=1.0, help="experts (moe law); 1 is dense")
    p.add_argument("--unique-tokens", type=float, default=None,
                   help="with --compute: the optimum when only this many unique tokens exist (data_constrained law)")
    p.add_argument("--inference-tokens", type=float, default=None,
                   help="lifetime inference tokens (with --loss or --compute): the model reaching that loss (or the "
                        "Chinchilla-optimal loss at that compute) with the least training plus inference FLOPs")
    p.set_defaults(func=cmd_predict)
    return p


def add_compare_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("compare", help="compute multiplier of a variant over a baseline: the compute the "
                                              "baseline needs to reach the variant's loss, per budget and budget-invariant")
    p.add_argument("law_a", type=Path, help="the baseline's law.json")
    p.add_argument("law_b", type=Path, nargs="?", default=None,
                   help="the variant's law.json (default: LAW_A, e.g. dense against MoE of one joint moe fit)")
    p.add_argument("--compute", type=float, nargs="+", required=True, help="training FLOPs to compare at")
    p.add_argument("--E-a", type=float, default=1.0, help="the baseline's experts (moe law); 1 is dense")
    p.add_argument("--E-b", type=float, default=1.0, help="the variant's experts (moe law)")
    p.add_argument("--total-per-active", type=float, default=None,
                   help="the variant's non-embedding parameters over its active ones (an MoE): also compare in total parameters")
    p.add_argument("--points", type=Path, nargs="+", default=None,
                   help="points tables for the budget-invariant speedup: A.csv B.csv, or one table split by --E-a/--E-b")
    p.set_defaults(func=cmd_compare)
    return p


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise FitInputError(f"{name} {value:g} must be positive and finite")


def cmd_fit(args) -> int:
    _check_positive("--bootstrap", args.bootstrap + 1)
    points = with_conventions(load_points(args.points), params=args.params, flops=args.flops)
    meta = {"points": str(args.points), "law": args.law}
    conv = lawfile.conventions(params=args.params, flops=args.flops, flops_per_param_token=flops_per_param_token(points))
    if args.law == "all":
        from fitting.export import fit_all

        fitted = fit_all(points, bootstrap=args.bootstrap, seed=args.seed, resample=args.resample, delta=args.huber_delta)
        doc = lawfile.document(fitted.sections, conventions=conv, meta=meta, hparams=fitted.hparams, failed=fitted.failed)
    elif args.law == "hparams":
        doc = lawfile.document({}, conventions=conv, meta=meta,
                               hparams=fit_law(points, "hparams", bootstrap=args.bootstrap, seed=args.seed))
    else:
        options = {"bootstrap": args.bootstrap, "seed": args.seed, "resample": args.resample}
        if args.law in ("chinchilla", "kaplan", "moe", "power"):
            options.update(delta=args.huber_delta, holdout_above=args.holdout_above)
        if args.law == "power":
            options.update(x=args.x, offset=not args.no_offset)
        if args.law == "data_constrained":
            options.update(delta=args.huber_delta, fit=args.fit_stages, holdout_above=args.holdout_above)
        doc = lawfile.document({args.law: fit_law(points, args.law, **options)}, conventions=conv, meta=meta)
    from fitting.export import write_law_files

    _print_fit(doc, write_law_files(doc, args.out / "law.json" if args.out.is_dir() else args.out))
    return 0


def _fmt(value, ci=None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}"
    return text + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")


def _coefficient(section: dict, k: str, value: float, ci) -> str:
    """`k = value [low, high]`, or `k not identified (why)` (fitting/identify.py)."""
    why = section.get("not_identified", {}).get(k)
    return f"{k} not identified ({why})" if why else f"{k} = {_fmt(value, ci)}"


def _print_fit(doc: dict, paths: list[Path]) -> None:
    for name, section in doc["laws"].items():
        coefs = ", ".join(_coefficient(section, k, v, section["ci"].get(k)) for k, v in section["params"].items())
        print(f"{name}: {coefs}  ({section['n_points']} points)")
        if section.get("derived"):
            print("  " + ", ".join(_coefficient(section, k, v, section["derived_ci"].get(k))
                                   for k, v in section["derived"].items()))
        if "extrapolation" in section:
            x = section["extrapolation"]
            print(f"  held out {x['n_held_out']} points above C = {x['holdout_above']:.3g} ({x['factor']:.3g}x): "
                  f"mean |relative error| {x['mean_abs_relative_error']:.2%}, max {x['max_abs_relative_error']:.2%}, "
                  f"rms {x['rms_relative_error']:.2%}, mean {x['mean_relative_error']:+.2%}")
    for name, why in doc.get("failed", {}).items():
        print(f"{name}: not fitted: {why}")
    if "hparams" in doc:
        print("hparams: fitted")
    print("wrote " + ", ".join(str(p) for p in paths))


def cmd_predict(args) -> int:
    law = lawfile.load_law(args.law)
    for name in ("--compute", "--N", "--D", "--E", "--loss", "--unique-tokens", "--inference-tokens"):
        _check_positive(name, getattr(args, name[2:].replace("-", "_")))
    if args.unique_tokens is not None and args.inference_tokens is not None:
        raise FitInputError("give --unique-tokens or --inference-tokens, not both: no law here combines them")
    if args.unique_tokens is not None:
        if args.compute is None:
            raise FitInputError("--unique-tokens goes with --compute: the optimum at a compute under that data budget")
        return _predict_under_data(law, args.compute, args.unique_tokens, args.E)
    if args.inference_tokens is not None:
        if args.N is not None:
            raise FitInputError("--inference-tokens goes with --loss or --compute, not --N")
        return _print_inference(law, args)
    if args.N is not None:
        if args.D is None:
            raise FitInputError("--N needs --D (training tokens)")
        if law.has_loss or law.hparams is None:  # a file of hparams laws alone still gives lr and batch size
            loss = float(law.loss(args.N, args.D, args.E))
            print(f"loss(N={args.N:.4g}, D={args.D:.4g}, E={args.E:g}) = "
                  f"{_fmt(loss, law.loss_interval(args.N, args.D, args.E))} nats/token")
            _print_reach(*law.reach(N=args.N, D=args.D))
        _print_hparams(law, args.N, args.D, law.k * args.N * args.D)
        return 0
    compute = args.compute
    if args.loss is not None:
        compute = law.compute_for_loss(args.loss, args.E)
        print(f"compute to reach loss {args.loss:g}: C = {compute:.4g} FLOPs")
    if not law.has_loss and law.hparams is not None and not law.laws:
        # a file of hparams laws alone: lr and batch size at C (the laws against C; those in N and D need --N --D)
        print(f"C = {compute:.4g} FLOPs:")
        _print_hparams(law, float("nan"), float("nan"), compute)
        return 0
    opt = law.optimal(compute, args.E)
    print(f"C = {compute:.4g} FLOPs (E = {args.E:g}; from the {opt['law']} law):")
    for key, label in (("N_opt", "N_opt"), ("D_opt", "D_opt"), ("loss", "loss (nats/token)"),
                       ("tokens_per_param", "tokens/param")):
        print(f"  {label:<18} {_fmt(opt[key], opt[key + '_ci'])}")
    if opt["loss"] is not None:  # the bootstrap sees noise only; the total adds the backtest's extrapolation error
        print(f"  {'loss, total':<18} {_fmt(opt['loss'], opt['loss_ci_total'])}  ({opt['loss_ci_total_method']})")
    _print_reach(opt["reach"], opt["warnings"])
    _print_hparams(law, opt["N_opt"], opt["D_opt"], compute)
    return 0


def _predict_under_data(law, compute: float, unique_tokens: float, E: float) -> int:
    opt = law.optimal(compute, E, unique_tokens=unique_tokens)
    print(f"C = {compute:.4g} FLOPs with {unique_tokens:.4g} unique tokens (from the data_constrained law):")
    for key, label in (("N_opt", "N_opt"), ("D_opt", "D_opt"), ("epochs", "epochs"), ("loss", "loss (nats/token)"),
                       ("loss_lost", "loss lost"), ("tokens_per_param", "tokens/param")):
        print(f"  {label:<18} {_fmt(opt[key], opt[key + '_ci'])}")
    print("  (loss lost: against the same law's optimum with unlimited unique data)")
    for name, why in opt["not_identified"].items():
        print(f"  {name} not identified: {why}")
    return 0


def cmd_compare(args) -> int:
    from fitting import compare

    for name, value in [("--compute", c) for c in args.compute] + [("--E-a", args.E_a), ("--E-b", args.E_b),
                                                                    ("--total-per-active", args.total_per_active)]:
        _check_positive(name, value)
    law_b = args.law_b or args.law_a
    if law_b == args.law_a and args.E_a == args.E_b:
        raise FitInputError("compare needs two laws, or one joint moe law with --E-a and --E-b differing")
    base, variant = lawfile.load_law(args.law_a), lawfile.load_law(law_b)
    print(f"compute multiplier of {law_b} (E = {args.E_b:g}) over {args.law_a} (E = {args.E_a:g}): the baseline's "
          f"compute to reach the variant's compute-optimal loss, over the variant's compute (> 1: the variant is better)")
    _warn_beyond_data(base, args.compute)
    if law_b != args.law_a:
        _warn_beyond_data(variant, args.compute)
    for row in compare.multipliers(base, variant, args.compute, E_base=args.E_a, E_variant=args.E_b,
                                   total_per_active=args.total_per_active):
        print(f"  C = {row['compute']:.4g}: variant loss {row['variant_loss']:.4g}, multiplier "
              f"{_fmt(row['multiplier'], row['multiplier_ci'])}" + (f" ({row['note']})" if row["note"] else ""))
        if "total_params_ratio" in row:
            print(f"    the variant's total parameters over the baseline's for that loss: "
                  f"{_fmt(row['total_params_ratio'], row['total_params_ratio_ci'])}")
    if args.points:
        fronts = _compare_frontiers(args, compare)
        shared = compare.shared_exponent_speedup(fronts, "baseline")
        print(f"budget-invariant speedup {_fmt(shared['speedup']['variant'], shared['speedup_ci']['variant'])} "
              f"(shared alpha {shared['alpha']:.3g}, L_inf {shared['L_inf']:.4g}, rms residual "
              f"{shared['rms_residual']:.2g}; {shared['method']})")
        if shared["note"]:
            print(f"  warning: {shared['note']}")
    return 0


def _compare_frontiers(args, compare) -> dict:
    tables = [load_points(p) for p in args.points]
    if len(tables) > 2:
        raise FitInputError("--points takes one table (split by --E-a and --E-b) or two (baseline, variant)")
    if len(tables) == 1:
        if "E" not in tables[0].columns:
            raise FitInputError("--points with one table needs its 'E' column to split it; give two tables")
        tables = [tables[0][tables[0]["E"] == e] for e in (args.E_a, args.E_b)]
    return {"baseline": compare.frontier(tables[0]), "variant": compare.frontier(tables[1])}


def _warn_beyond_data(law, computes) -> None:
    """Intervals from a bootstrap see only the fit's noise: say so where a compute lies far beyond the data."""
    top = law.doc.get("meta", {}).get("max_C")
    for C in computes:
        if top and C > FAR_BEYOND * top:
            print(f"  warning: C = {C:.3g} is {C / top:.3g}x the largest compute in the data ({top:.3g}); "
                  f"the intervals see the fit's noise, not a change of regime")


def _print_inference(law, args) -> int:
    opt = (law.inference_optimal(args.loss, args.inference_tokens, args.E) if args.loss is not None
           else law.optimal(args.compute, args.E, inference_tokens=args.inference_tokens))
    k = opt["flops_per_param_token"]
    source = f"loss {args.loss:g}" if args.loss is not None else f"the Chinchilla-optimal loss at C = {args.compute:.4g}"
    print(f"inference-aware optimum for {source} ({opt['loss']:.4g} nats/token) and {args.inference_tokens:.4g} "
          f"inference tokens (E = {args.E:g}; {opt['law']} law; training {k:.3g} N D + inference {k / 3:.3g} N T FLOPs):")
    _warn_beyond_data(law, [opt["training_flops"]])  # the training compute is what the law extrapolates to
    for key, label in (("N_opt", "N_opt"), ("D_opt", "D_opt"), ("tokens_per_param", "tokens/param"),
                       ("training_flops", "training FLOPs"), ("inference_flops", "inference FLOPs"),
                       ("total_flops", "total FLOPs"), ("chinchilla_N", "Chinchilla N"),
                       ("chinchilla_D", "Chinchilla D"), ("chinchilla_total_flops", "Chinchilla total"),
                       ("saving", "saving")):
        print(f"  {label:<18} {_fmt(opt[key], opt[key + '_ci'])}")
    if opt["replicates_unreachable"]:
        print(f"  ({opt['replicates_unreachable']} bootstrap replicates cannot reach this loss: left out of the intervals)")
    return 0


def _print_reach(factors: dict, warnings: list[str]) -> None:
    """How far beyond the fitted data the numbers above are, and what to doubt about them."""
    known = {k: f for k, f in factors.items() if f is not None}
    if known:
        print("  beyond the data:  " + ", ".join(f"{k} {f:.3g}x the largest fitted" for k, f in known.items()))
    for line in warnings:
        print(f"  warning: {line}")


def _print_hparams(law, N: float, D: float, C: float) -> None:
    if law.hparams is None:
        return
    from fitting import hparams_at

    hp = hparams_at(law, N=N, D=D, C=C)
    print(f"  {'B_opt (tokens)':<18} {_fmt(hp.get('batch_size'))}")
    print(f"  {'eta_opt':<18} {_fmt(hp.get('lr'))}")

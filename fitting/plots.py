"""PNG plots of a law file against its points. Each function draws one figure and returns its path (or None
when the law file lacks what it shows)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fitting import laws  # noqa: E402
from fitting.lawfile import Law  # noqa: E402
from fitting.isoflop import profile_rows  # noqa: E402
from fitting.table import parametric_rows  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_vs_compute(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """Every point's loss against C, the envelope, and the chinchilla (or moe) compute-optimal frontier."""
    if "C" not in points.columns:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    sc = ax.scatter(points["C"], points["loss"], c=np.log10(points["N"]), s=8, cmap="viridis", alpha=0.6)
    fig.colorbar(sc, ax=ax, label="log10 N")
    env = doc["laws"].get("envelope")
    if env:
        ax.plot(env["frontier"]["C"], env["frontier"]["loss"], "k-", lw=1.5, label="envelope (approach 1)")
    law = Law(doc)
    if any(n in doc["laws"] for n in ("chinchilla", "moe")):
        grid = np.logspace(np.log10(points["C"].min()), np.log10(points["C"].max()) + 1, 100)
        ax.plot(grid, [law.optimal(c)["loss"] for c in grid], "r--", label="compute-optimal frontier (approach 3)")
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel="loss (nats/token)", title="loss against compute")
    ax.legend()
    return _save(fig, path)


def isoflop_profiles(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """Per budget: final losses against N, the fitted quadratic and its minimum (crosses: flagged budgets)."""
    section = doc["laws"].get("isoflop")
    if not section:
        return None
    rows, _ = profile_rows(points)
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.cm.plasma(np.linspace(0, 0.9, len(section["budgets"])))
    for budget, color in zip(section["budgets"], colors):
        mine = rows[np.isclose(rows["budget"], budget["budget"])] if "budget" in rows else rows
        ax.scatter(mine["N"], mine["loss"], color=color, s=14)
        x = np.linspace(np.log(mine["N"].min()), np.log(mine["N"].max()), 50) - budget["log_N_centre"]
        c0, c1, c2 = budget["coefficients"]
        ax.plot(np.exp(x + budget["log_N_centre"]), c0 + c1 * x + c2 * x ** 2, color=color, label=f"C={budget['C']:.2g}")
        if budget["N_opt"] is not None:
            ax.plot(budget["N_opt"], budget["loss_opt"], "x" if budget["flag"] else "o", color=color, ms=9)
        if budget.get("akima_N_opt") is not None and budget["akima_flag"] is None:
            ax.plot(budget["akima_N_opt"], budget["akima_loss_opt"], "s", mfc="none", color=color, ms=9)
    ax.set(xscale="log", xlabel="N", ylabel="loss (nats/token)",
           title="IsoFLOP profiles (o: parabola's minimum, x: flagged, square: Akima's minimum)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _surface_rows(doc: dict, points: pd.DataFrame, *, moe_rows: bool) -> tuple[str, pd.DataFrame] | None:
    """The main loss law's name and its final points: the dense ones, and the MoE ones too when asked and the
    law is moe."""
    name = next((n for n in laws.SURFACES if n in doc["laws"]), None)
    if name is None:
        return None
    rows, _ = parametric_rows(points)
    if not (moe_rows and name == "moe") and "E" in rows.columns and rows["E"].nunique() > 1:
        rows = rows[rows["E"] == 1]
    return name, rows


def residuals(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """log(prediction / loss) of the main loss law at every point it fitted, against N and against D."""
    surface = _surface_rows(doc, points, moe_rows=True)
    if surface is None:
        return None
    name, rows = surface
    E = rows["E"].to_numpy(float) if name == "moe" else 1.0
    r = np.log(laws.surface_loss(name, doc["laws"][name]["params"], rows["N"], rows["D"], E) / rows["loss"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, col in zip(axes, ("N", "D")):
        ax.scatter(rows[col], r, s=10)
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xscale="log", xlabel=col)
    axes[0].set_ylabel(f"log(predicted / actual), {name}")
    return _save(fig, path)


def law_against_points(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """Final losses against D, one colour per N, with the fitted surface's curve for each N."""
    surface = _surface_rows(doc, points, moe_rows=False)
    if surface is None:
        return None
    name, rows = surface
    sizes = np.sort(rows["N"].unique())
    fig, ax = plt.subplots(figsize=(7, 5))
    for n, color in zip(sizes, plt.cm.viridis(np.linspace(0, 0.9, len(sizes)))):
        mine = rows[rows["N"] == n]
        ax.scatter(mine["D"], mine["loss"], color=color, s=14)
        d = np.logspace(np.log10(mine["D"].min()), np.log10(mine["D"].max()), 30)
        ax.plot(d, laws.surface_loss(name, doc["laws"][name]["params"], n, d), color=color, lw=1, label=f"N={n:.2g}")
    ax.set(xscale="log", xlabel="D (tokens)", ylabel="loss (nats/token)", title=f"{name} law against the points")
    if len(sizes) <= 12:
        ax.legend(fontsize=7)
    return _save(fig, path)


def optimal_allocation(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """N_opt and D_opt against C with 95% bands: closed form of approach 3, frontiers of approaches 1 and 2."""
    if not any(n in doc["laws"] for n in ("chinchilla", "moe", "isoflop", "envelope")) or "C" not in points.columns:
        return None
    grid = np.logspace(np.log10(points["C"].min()), np.log10(points["C"].max()) + 2, 40)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    law = Law(doc)
    if any(n in doc["laws"] for n in ("chinchilla", "moe")):
        opts = [law.optimal(c) for c in grid]
        for ax, key in zip(axes, ("N_opt", "D_opt")):
            ax.plot(grid, [o[key] for o in opts], "r-", label="approach 3")
            if opts[0][key + "_ci"]:
                ax.fill_between(grid, [o[key + "_ci"][0] for o in opts], [o[key + "_ci"][1] for o in opts],
                                color="r", alpha=0.2)
    for name, style in (("envelope", "k--"), ("isoflop", "b:")):
        section = doc["laws"].get(name)
        if section:
            p = section["params"]
            axes[0].plot(grid, p["k_N"] * grid ** p["a"], style, label=f"{name} (a={p['a']:.3f})")
            axes[1].plot(grid, p["k_D"] * grid ** p["b"], style, label=f"{name} (b={p['b']:.3f})")
    for b in doc["laws"].get("isoflop", {}).get("budgets", []):
        if b["N_opt"] is not None and b["flag"] is None:
            err = None if b["N_opt_ci"] is None else [[b["N_opt"] - b["N_opt_ci"][0]], [b["N_opt_ci"][1] - b["N_opt"]]]
            axes[0].errorbar(b["C"], b["N_opt"], yerr=err, fmt="bo", ms=4)
    for ax, key in zip(axes, ("N_opt", "D_opt")):
        ax.set(xscale="log", yscale="log", xlabel="C (FLOPs)", ylabel=key)
        ax.legend(fontsize=7)
    return _save(fig, path)


def dense_against_moe(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """The moe law's compute-optimal loss against C for each expert count in the table."""
    if "moe" not in doc["laws"] or "C" not in points.columns:
        return None
    law = Law(doc)
    grid = np.logspace(np.log10(points["C"].min()), np.log10(points["C"].max()) + 1, 50)
    fig, ax = plt.subplots(figsize=(7, 5))
    for e in np.sort(points["E"].unique()):
        mine = points[points["E"] == e]
        line, = ax.plot(grid, [law.optimal(c, E=e)["loss"] for c in grid], label=f"E={e:g}")
        ax.scatter(mine["C"], mine["loss"], s=6, color=line.get_color(), alpha=0.5)
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel="loss (nats/token)", title="dense (E=1) against MoE")
    ax.legend()
    return _save(fig, path)


def family_speedup(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """Each family's compute frontier and the shared-exponent fit through it (law.json's compare section)."""
    shared = (doc.get("compare") or {}).get("shared_exponent", {})
    if "speedup" not in shared:
        return None
    from fitting.compare import family_frontiers

    fig, ax = plt.subplots(figsize=(7, 5))
    for name, front in family_frontiers(points).items():
        line, = ax.plot(front["C"], front["loss"], "o", label=f"{name} frontier")
        grid = np.logspace(np.log10(front["C"].min()), np.log10(front["C"].max()) + 1, 50)
        speedup = shared["speedup"].get(name)
        ax.plot(grid, shared["L_inf"] + shared["A"][name] * (grid / shared["C_0"]) ** -shared["alpha"], "-",
                color=line.get_color(), label=f"{name}: shared fit" + (f", speedup {speedup:.3g}" if speedup else ""))
    ax.set(xscale="log", xlabel="C (FLOPs)", ylabel="loss (nats/token)",
           title=f"compute frontiers, L_inf and alpha shared (alpha {shared['alpha']:.3g})")
    ax.legend(fontsize=7)
    return _save(fig, path)


def convention_sensitivity(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """a and tokens per parameter under each convention (N non-embedding or total x C 6N or exact), per law."""
    section = doc.get("convention_sensitivity")
    if not section:
        return None
    from fitting.conventions import table

    rows = table(section).dropna(subset=["a"])
    if rows.empty:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    labels = [f"{n}, {c}" for n, c in dict.fromkeys(zip(rows["N"], rows["C"]))]
    for offset, (law, mine) in zip((-0.1, 0.1), rows.groupby("law", sort=True)):
        x = np.array([labels.index(f"{n}, {c}") for n, c in zip(mine["N"], mine["C"])]) + offset
        for ax, key, low, high in ((axes[0], "a", "a_low", "a_high"),
                                   (axes[1], "tokens_per_param", "tpp_low", "tpp_high")):
            value = mine[key].to_numpy(float)
            err = np.abs(np.vstack([value - mine[low].to_numpy(float), mine[high].to_numpy(float) - value]))
            ax.errorbar(x, value, yerr=np.nan_to_num(err), fmt="o", capsize=3, label=law)
    for ax, ylabel in zip(axes, ("a (N_opt = k C^a)", "tokens per parameter at the largest budget")):
        ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.set(xlabel="convention (N, C)", ylabel=ylabel)
        ax.legend(fontsize=7)
    fig.suptitle("convention sensitivity (95% bootstrap intervals)")
    return _save(fig, path)


def inference_aware(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """At the loss the law gives at the data's largest compute: the inference-aware model's tokens per parameter
    and lifetime-FLOP saving against the Chinchilla-optimal one, over inference demand (fitting/inference.py)."""
    law = Law(doc)
    if law.chinchilla_coefficients(1) is None or not doc["meta"].get("max_C"):
        return None
    C = doc["meta"]["max_C"]
    base = law.optimal(C)
    demand = base["D_opt"] * np.logspace(-2, 2, 25)  # inference tokens, from 1% to 100x the training tokens
    optima = [law.inference_optimal(base["loss"], T) for T in demand]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, key, label in ((axes[0], "tokens_per_param", "tokens per parameter"),
                           (axes[1], "saving", "lifetime FLOPs saved against Chinchilla-optimal")):
        value = np.array([o[key] for o in optima])
        ax.plot(demand / base["D_opt"], value, "-")
        cis = [o[f"{key}_ci"] for o in optima]
        if all(cis):
            ax.fill_between(demand / base["D_opt"], [c[0] for c in cis], [c[1] for c in cis], alpha=0.3, label="95% interval")
            ax.legend(fontsize=7)
        ax.set(xscale="log", yscale="log" if key == "tokens_per_param" else "linear",
               xlabel="inference tokens / Chinchilla-optimal training tokens", ylabel=label)
    fig.suptitle(f"inference-aware optimum at loss {base['loss']:.4g} (the law's optimum at C = {C:.3g}; "
                 f"Sardana et al. 2024)")
    return _save(fig, path)


def effective_data(doc: dict, points: pd.DataFrame, path: Path) -> Path | None:
    """Effective data D' against D for each unique-token budget U (data_constrained law, 95% band over its
    replicates of R_D*), D' = D for reference, and each final point's D' as its loss implies it (the law
    inverted for D' at the point's N': where that loss lies above the law's other terms)."""
    section = doc["laws"].get("data_constrained")
    if not section or "unique_tokens" not in points.columns:
        return None
    p = section["params"]
    rows, _ = parametric_rows(points)
    rows = rows[rows["E"] == 1] if "E" in rows.columns else rows
    budgets = np.sort(rows["unique_tokens"].unique())[-8:]
    samples = section.get("bootstrap", {}).get("samples", {}).get("R_D_star")
    d = np.logspace(np.log10(rows["D"].min()), np.log10(rows["D"].max()), 60)
    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(d, d, "k:", lw=1, label="D' = D (unlimited unique data)")
    for u, color in zip(budgets, plt.cm.viridis(np.linspace(0, 0.9, len(budgets)))):
        ax.plot(d, laws.effective(u, d, p["R_D_star"]), color=color, label=f"U = {u:.3g}")
        if samples and "R_D_star" not in section.get("not_identified", {}):
            band = laws.effective(u, d[None], np.asarray(samples)[:, None])
            ax.fill_between(d, *np.percentile(band, [2.5, 97.5], axis=0), color=color, alpha=0.15)
        mine = rows[rows["unique_tokens"] == u]
        u_n = np.minimum(laws.optimal_params_for_data(u, **{k: p[k] for k in ("A", "B", "alpha", "beta")}), mine["N"])
        rest = mine["loss"] - p["E"] - p["A"] / laws.effective(u_n, mine["N"], p["R_N_star"]) ** p["alpha"]
        implied = (p["B"] / rest.where(rest > 0)) ** (1 / p["beta"])
        ax.scatter(mine["D"], implied, color=color, s=14)
    ax.set(xscale="log", yscale="log", xlabel="D (training tokens)", ylabel="D' (effective tokens)",
           title=f"effective data (R_D* = {p['R_D_star']:.3g}; Muennighoff et al. 2023)")
    ax.legend(fontsize=7)
    return _save(fig, path)


PLOTS = {"loss_vs_C.png": loss_vs_compute, "isoflop.png": isoflop_profiles, "fit_residuals.png": residuals,
         "law_vs_points.png": law_against_points, "optimal_allocation.png": optimal_allocation,
         "dense_vs_moe.png": dense_against_moe, "family_speedup.png": family_speedup,
         "conventions.png": convention_sensitivity, "inference_aware.png": inference_aware,
         "effective_data.png": effective_data}


def plot_all(doc: dict, points: pd.DataFrame, out_dir: Path) -> tuple[list[Path], dict[str, str]]:
    """Every plot the law file supports, and the reason each one that could not be drawn failed: a figure
    never costs the law files, already written."""
    paths, failed = [], {}
    for name, draw in PLOTS.items():
        try:
            if (path := draw(doc, points, Path(out_dir) / name)) is not None:
                paths.append(path)
        except Exception as e:  # matplotlib's reasons are many (non-finite data, empty axes); report, go on
            plt.close("all")
            failed[f"plot {name}"] = f"{type(e).__name__}: {e}"
    return paths, failed

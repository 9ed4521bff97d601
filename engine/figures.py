"""Every figure of the report as a public function: data in, ``matplotlib.figure.Figure`` out.

For notebooks (``fig`` displays inline in Jupyter, as PNG, with no ``%matplotlib`` magic and no
pyplot) and for :mod:`moetrace.report`, which calls the same functions. No pyplot state: figures
are plain ``Figure`` objects (Agg-safe, thread-safe) that also render themselves as PNG.

    from moetrace.counting import count
    from moetrace import figures
    counts = count("trace.zarr", stats=["experts", "temporal"], by=["domain"])
    figures.usage_heatmaps(counts)            # group x expert heatmap per layer
    figures.separation(counts)                # chi-square, mean variance, entropy by layer
    figures.decisiveness(moetrace.analysis.decisiveness("trace.zarr"))

Inputs: ``counts`` is an :func:`moetrace.counting.count` Dataset; analysis results are the
Datasets / tables of :mod:`moetrace.analysis`; ``results`` is an experiment's results table
(:func:`moetrace.report.load_results`).

The figures of seed 003's analyses live beside their computation (``engine/analysis/<name>.py``)
and are found here by name from each analysis' declaration (``figures.decisiveness``,
``figures.similarity``, ...; see :data:`moetrace.analysis.ANALYSES`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib
import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics
from moetrace.plotting import Figure, group_labels, integer_axis, layer_axis, legend_right, palette

__all__ = ["Figure", "group_labels", "palette"]  # and every figure function below and of the analyses

#: Layers per usage-heatmap figure when a caller splits many layers (the report does).
LAYERS_PER_FIGURE = 16


def _groups(da: xr.DataArray, counts: xr.Dataset) -> np.ndarray:
    return metrics.flatten_groups(da, metrics.group_dims(counts))


# ------------------------------------------------------------------------------------ counts


def separation(counts: xr.Dataset) -> Figure:
    """Chi-square (red: significant), mean variance of normalized usage, and each group's entropy by layer."""
    ranking = metrics.layer_ranking(counts)
    ent = metrics.entropy(counts)
    layers = counts["layer"].values.tolist()
    h = _groups(ent["entropy"].transpose(..., "layer"), counts)
    fig = Figure(figsize=(11, 3.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(layers))
    colors = ["#c0392b" if s else "#95a5a6" for s in ranking["significant"].values]
    ax1.bar(x, np.nan_to_num(ranking["chi2"].values), color=colors)
    ax1.set_title(f"chi-square (red: p < {ranking.attrs['alpha']:g})", fontsize=9)
    ax2.plot(x, ranking["avg_variance"].values, marker="o", color="#2c3e50")
    ax2.set_title("mean variance of normalized usage", fontsize=9)
    names = group_labels(counts)
    for g, (name, color) in enumerate(zip(names, palette(len(names)))):
        ax3.plot(x, h[g], marker=".", label=name, color=color)
    max_bits = float(ent["max_entropy"])
    ax3.axhline(max_bits, ls="--", color="k", lw=1, label=f"log2(E) = {max_bits:.2f}")
    ax3.set_title("entropy of expert usage (bits)", fontsize=9)
    legend_right(ax3)
    for ax in (ax1, ax2, ax3):
        layer_axis(ax, layers)
    fig.tight_layout()
    return fig


def usage_heatmaps(counts: xr.Dataset, layers: Sequence[int] | None = None) -> Figure:
    """Small multiples: per layer (all, or the layer ids given), a group x expert heatmap of the
    percent of each group's routing (all top-k ranks) that goes to each expert; one colour scale."""
    usage = _groups(counts["experts"].sum("rank").transpose(..., "layer", "expert"), counts)  # [G, L, E]
    total = usage.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(total > 0, usage / np.where(total > 0, total, 1) * 100.0, np.nan)
    all_layers = counts["layer"].values.tolist()
    block = list(range(len(all_layers))) if layers is None else [all_layers.index(int(x)) for x in layers]
    experts = counts["expert"].values.tolist()
    groups = group_labels(counts)
    n_groups, n_experts = pct.shape[0], pct.shape[2]
    vmax = float(np.nanmax(pct)) if np.any(~np.isnan(pct)) else 1.0
    ncols = min(4, len(block))
    nrows = math.ceil(len(block) / ncols)
    panel_w = min(6.0, max(2.6, 0.09 * n_experts + 1.0))
    panel_h = min(6.0, max(1.4, 0.22 * n_groups + 0.8))
    fig = Figure(figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.4))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    image = None
    for n, (ax, i) in enumerate(zip(axes, block)):
        image = ax.imshow(pct[:, i, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"layer {all_layers[i]}", fontsize=8)
        step = max(1, math.ceil(n_experts / 16))
        ax.set_xticks(np.arange(0, n_experts, step), [str(experts[j]) for j in range(0, n_experts, step)], fontsize=6)
        if n % ncols == 0:
            gstep = max(1, math.ceil(n_groups / 24))
            ax.set_yticks(np.arange(0, n_groups, gstep), groups[::gstep], fontsize=6)
        else:
            ax.set_yticks([])
    for ax in axes[len(block):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label="% of the group's routing")
    return fig


def specialists(counts: xr.Dataset, layer: int) -> Figure:
    """Coefficient of variation of each expert's counts across groups at ``layer``: red specialists
    (above the 75th percentile), blue generalists (below the 25th)."""
    var = metrics.expert_variation(counts, layer)
    cv = var["cv"].values
    experts = var["expert"].values
    fig = Figure(figsize=(9, 2.6))
    ax = fig.subplots()
    colors = np.where(var["specialist"].values, "#c0392b", np.where(var["generalist"].values, "#2980b9", "#95a5a6"))
    ax.bar(np.arange(experts.size), np.nan_to_num(cv), color=colors)
    ax.axhline(var.attrs["q75"], ls="--", color="#c0392b", lw=1, label="75th percentile")
    ax.axhline(var.attrs["q25"], ls="--", color="#2980b9", lw=1, label="25th percentile")
    step = max(1, math.ceil(experts.size / 32))
    ax.set_xticks(np.arange(0, experts.size, step), [str(v) for v in experts[::step]], fontsize=6)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_ylabel("coefficient of variation", fontsize=8)
    ax.set_title(f"layer {layer}: red specialists, blue generalists", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def stickiness(counts: xr.Dataset) -> Figure:
    """Lag-1 top-1 stickiness per group and layer against the 1/E baseline (needs ``temporal``)."""
    ds = metrics.stickiness(counts)
    s = _groups(ds["stickiness"].transpose(..., "layer"), counts)
    baseline = float(ds["baseline"])
    layers = counts["layer"].values.tolist()
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    names = group_labels(counts)
    colors = palette(len(names))
    for g, name in enumerate(names):
        ax.plot(np.arange(len(layers)), s[g], marker=".", label=name, color=colors[g])
    ax.axhline(baseline, ls="--", color="k", lw=1, label=f"1/E = {baseline:.3g}")
    layer_axis(ax, layers)
    ax.set_ylabel("P(same top-1 at t+1)", fontsize=8)
    legend_right(ax)
    fig.tight_layout()
    return fig


def _transition_heatmaps(mats: np.ndarray, layers: Sequence, title: str, xlabel: str, ylabel: str) -> Figure:
    ncols = min(4, len(layers))
    nrows = math.ceil(len(layers) / ncols)
    fig = Figure(figsize=(3.0 * ncols + 1.0, 2.8 * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    image = None
    vmax = float(np.nanmax(mats)) if mats.size and np.any(np.isfinite(mats)) else 1.0
    for ax, i in zip(axes, range(len(layers))):
        image = ax.imshow(mats[i], cmap="magma", vmin=0.0, vmax=vmax or 1.0, interpolation="nearest")
        ax.set_title(f"layer {layers[i]}", fontsize=8)
        ax.set_xlabel(xlabel, fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        integer_axis(ax.xaxis)
        integer_axis(ax.yaxis)
        ax.tick_params(labelsize=6)
    for ax in axes[len(layers):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=title)
    return fig


def paths(counts: xr.Dataset) -> Figure:
    """Per layer, the previous-layer top-1 x this-layer top-1 transition matrix, percent of all groups'
    paths into the layer (layer index 0 has no incoming paths and is left out)."""
    p = counts["paths"].transpose(..., "layer", "prev_expert", "expert")
    gdims = metrics.group_dims(counts)
    total = (p.sum(gdims) if gdims else p).values.astype(np.float64)[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = total / total.sum(axis=(1, 2), keepdims=True) * 100.0
    return _transition_heatmaps(pct, counts["layer"].values.tolist()[1:], "% of the layer's paths",
                                "top-1 at this layer", "top-1 at previous layer")


def pairs(counts: xr.Dataset) -> Figure:
    """Per layer, the ordered (rank-0, rank-1) expert pair matrix, percent of the layer's tokens."""
    p = counts["pairs"].transpose(..., "layer", "first", "second")
    gdims = metrics.group_dims(counts)
    total = (p.sum(gdims) if gdims else p).values.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = total / total.sum(axis=(1, 2), keepdims=True) * 100.0
    return _transition_heatmaps(pct, counts["layer"].values.tolist(), "% of the layer's tokens",
                                "rank-1 expert", "rank-0 expert")


def coactivation(counts: xr.Dataset) -> Figure:
    """Per layer, OLMoE's co-activation N(E_i, E_j) / N(E_i) (row i), diagonal masked."""
    c = metrics.coactivation(counts).values.copy()
    for m in c:
        np.fill_diagonal(m, np.nan)
    return _transition_heatmaps(c, counts["layer"].values.tolist(), "N(Ei, Ej) / N(Ei)", "expert j", "expert i")


# ------------------------------------------------------------------------------------ experiment

#: Effects an experiment table can hold: column -> colour-bar label.
MEASURES = {"drop": "accuracy drop (base - ablated)", "loss_increase": "loss increase (ablated - base, nats)"}


def _ordered(names: set[str], groups: Sequence[str]) -> list[str]:
    return [g for g in groups if g in names] + sorted(names - set(groups))


def _matrix_ax(ax, matrix: pd.DataFrame, title: str, limit: float, ylabel: bool,
               sure: np.ndarray | None = None, stars: np.ndarray | None = None):
    """One targeted x evaluated heatmap. ``sure``: cells whose 95% interval excludes 0 (the others are
    drawn pale grey, not coloured: noise is not painted); ``stars``: cells significant after Holm (*)."""
    values = matrix.to_numpy(dtype=np.float64)
    shown = values if sure is None else np.where(sure, values, np.nan)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="#f2f2f2")
    image = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=-limit, vmax=limit, aspect="auto",
                      interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(np.arange(values.shape[1]), matrix.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(np.arange(values.shape[0]), matrix.index, fontsize=7)
    ax.set_xlabel("evaluated group", fontsize=8)
    if ylabel:
        ax.set_ylabel("targeted group", fontsize=8)
    if values.size <= 144:
        for (r, c), v in np.ndenumerate(values):
            if not np.isnan(v):
                faint = sure is not None and not sure[r, c]
                star = "*" if stars is not None and stars[r, c] else ""
                ax.text(c, r, f"{v:.2f}{star}", ha="center", va="center", fontsize=6,
                        color="#999999" if faint else "white" if abs(v) > 0.6 * limit else "black")
    return image


def ablation_matrix(results: pd.DataFrame, method: str, measure: str = "drop", control: str | None = None,
                    groups: Sequence[str] = ()) -> Figure:
    """Targeted x evaluated group matrix of ``measure`` (mean over seeds) for ``method``, beside its
    ``control`` method when given; one symmetric colour scale over the whole table. Where the table has
    the experiment's 95% intervals (``drop_ci_low`` / ``_ci_high``, ``loss_...``), only cells whose
    interval excludes 0 are coloured (the rest pale grey, value in grey), and a ``*`` marks a cell
    whose Holm-adjusted p-value (``..._p_holm``) is below 0.05."""
    index = _ordered(set(results["targeted_group"]), groups)
    columns = _ordered(set(results["evaluated_group"]), groups)
    values = results[measure].to_numpy(dtype=np.float64)
    peak = np.nanmax(np.abs(values)) if np.any(~np.isnan(values)) else 0.0
    limit = float(peak) if peak > 0 else 1.0
    names = [method] + ([control] if control else [])
    side = min(7.0, max(3.0, 0.45 * max(len(index), len(columns)) + 1.5))
    fig = Figure(figsize=(side * len(names) + 1.0, side))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    image = None
    prefix = measure.removesuffix("_increase")  # the experiment's interval columns: drop_ci_low, loss_ci_low

    def cells(sub: pd.DataFrame, column: str) -> np.ndarray | None:
        if column not in sub:
            return None
        numeric = sub.assign(**{column: pd.to_numeric(sub[column], errors="coerce")})  # "nan" read as text
        return numeric.pivot_table(index="targeted_group", columns="evaluated_group", values=column,
                                   aggfunc="mean", dropna=False).reindex(index=index, columns=columns).to_numpy(float)

    for ax, name in zip(axes, names):
        sub = results[results["method"] == name]
        matrix = sub.pivot_table(index="targeted_group", columns="evaluated_group", values=measure,
                                 aggfunc="mean").reindex(index=index, columns=columns)
        low, high, p_holm = (cells(sub, f"{prefix}_{c}") for c in ("ci_low", "ci_high", "p_holm"))
        sure = None if low is None or high is None else (low > 0) | (high < 0)
        stars = None if p_holm is None else np.nan_to_num(p_holm, nan=1.0) < 0.05
        image = _matrix_ax(ax, matrix, f"{name} (control)" if name == control else name, limit, ax is axes[0],
                           sure, stars)
    fig.colorbar(image, ax=list(axes), shrink=0.8, label=MEASURES.get(measure, measure))
    return fig


def dose_response(dose: pd.DataFrame, measure: str = "drop") -> Figure:
    """Dose-response of an experiment's ``dose_response.csv``: one panel per (method, mode), the
    effect on each targeted group (``measure``: "drop" or "loss_increase") against the share of
    that group's routes the ablated items cover (``target_coverage``), one colour per group.

    Targets: a dot per dose with its row's 95% paired interval (error bar). Random draws: a cross
    at the mean coverage and mean effect of the dose's draws, with the 95% t-interval of that mean
    over the draws (the interval of the plotted point, not a mean of intervals). Returns a Figure.
    """
    from scipy.stats import t as student_t

    low, high = ("drop_ci_low", "drop_ci_high") if measure == "drop" else ("loss_ci_low", "loss_ci_high")
    df = dose[dose["targeted_group"] == dose["evaluated_group"]].copy()
    df["dose"] = df["dose"].astype(str)
    panels = sorted({(m, mode) for m, mode in zip(df["method"], df["mode"])})
    groups = sorted(set(df["targeted_group"]))
    colors = palette(len(groups))
    fig = Figure(figsize=(4.0 * max(1, len(panels)) + 1.2, 3.4))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(panels)), sharey=True))
    for ax, (method, mode) in zip(axes, panels):
        sub = df[(df["method"] == method) & (df["mode"] == mode)]
        for color, group in zip(colors, groups):
            mine = sub[sub["targeted_group"] == group]
            real = mine[~mine["is_random"]].sort_values("target_coverage")
            if len(real):
                x = real["target_coverage"].to_numpy() * 100
                y = real[measure].to_numpy(dtype=np.float64)
                err = np.vstack([y - real[low].to_numpy(dtype=np.float64), real[high].to_numpy(dtype=np.float64) - y])
                # a percentile interval of a few discordant items can sit beside its estimate: clip at 0
                ax.errorbar(x, y, yerr=np.clip(np.nan_to_num(err), 0, None), color=color, marker="o", ms=4, lw=1.2, capsize=2,
                            label=f"{group}: targets")
            rand = mine[mine["is_random"]]
            if len(rand):
                stats = rand.groupby("dose").agg(x=("coverage", "mean"), y=(measure, "mean"), sd=(measure, "std"),
                                                 n=(measure, "count")).sort_values("x")
                half = np.where(stats["n"] > 1, student_t.ppf(0.975, np.maximum(stats["n"] - 1, 1))
                                * stats["sd"] / np.sqrt(stats["n"]), 0.0)
                ax.errorbar(stats["x"] * 100, stats["y"], yerr=np.nan_to_num(half), color=color, marker="x", ms=5,
                            lw=0.8, ls="--", capsize=2, alpha=0.8, label=f"{group}: random draws")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"{method} ({mode})", fontsize=9)
        ax.set_xlabel("% of the targeted group's routes ablated", fontsize=8)
    axes[0].set_ylabel(MEASURES.get(measure, measure), fontsize=8)
    legend_right(axes[-1])
    fig.tight_layout()
    return fig


def coverage(results: pd.DataFrame) -> Figure:
    """Coverage of each targeted group's own routes by its chosen targets, per method (bars), with
    the random draws' coverage of the same routes (mean, and min-max as an error bar) beside them."""
    own = results[results["targeted_group"] == results["evaluated_group"]]
    real = own[~own["method"].str.startswith("random")]
    table = real.pivot_table(index="targeted_group", columns="method", values="coverage", aggfunc="mean")
    fig = Figure(figsize=(max(4.5, 0.9 * len(table) * max(1, table.shape[1]) + 2), 3))
    ax = fig.subplots()
    colors = palette(max(1, table.shape[1]))
    width = 0.8 / max(1, 2 * table.shape[1])
    for j, method in enumerate(table.columns):
        x = np.arange(len(table)) + 2 * j * width
        ax.bar(x, table[method].to_numpy() * 100.0, width, color=colors[j], label=f"{method}: targets")
        draws = own[own["method"] == f"random:{method}"].groupby("targeted_group")["coverage"]
        if len(draws):
            stats = draws.agg(["mean", "min", "max"]).reindex(table.index) * 100.0
            ax.bar(x + width, stats["mean"], width, color=colors[j], alpha=0.35, hatch="//",
                   label=f"{method}: random draws")
            spread = np.vstack([stats["mean"] - stats["min"], stats["max"] - stats["mean"]])
            ax.errorbar(x + width, stats["mean"], yerr=np.clip(np.nan_to_num(spread), 0, None),  # rounding
                        fmt="none", ecolor="black", lw=0.8, capsize=2)
    ax.set_xticks(np.arange(len(table)) + (2 * table.shape[1] - 1) * width / 2, table.index, rotation=45,
                  ha="right", fontsize=7)
    ax.set_ylabel("% of the group's routes ablated", fontsize=8)
    legend_right(ax)
    fig.tight_layout()
    return fig


def base_accuracy(base: pd.DataFrame) -> Figure:
    """Each group's base accuracy with its 95% interval, beside the answer-blind accuracy and the
    chance level (a line); untestable groups are marked."""
    fig = Figure(figsize=(max(4.0, 0.8 * len(base) + 2.5), 3))
    ax = fig.subplots()
    x = np.arange(len(base))
    acc = base["base_accuracy"].to_numpy(dtype=np.float64)
    err = np.vstack([acc - base["base_ci_low"].to_numpy(dtype=np.float64),
                     base["base_ci_high"].to_numpy(dtype=np.float64) - acc])
    colors = ["#2c7fb8" if t else "#bdbdbd" for t in base["testable"].astype(bool)]
    ax.bar(x - 0.2, acc, 0.4, color=colors, yerr=err, capsize=2, label="base (grey: not testable)")
    blind = base["blind_accuracy"].to_numpy(dtype=np.float64)
    if np.any(~np.isnan(blind)):
        ax.bar(x + 0.2, blind, 0.4, color="#fdae61", label="answer-blind")
    for xi, c in zip(x, base["chance"].to_numpy(dtype=np.float64)):
        ax.hlines(c, xi - 0.45, xi + 0.45, color="black", lw=1, ls=":")
    ax.plot([], [], color="black", lw=1, ls=":", label="chance")
    ax.set_xticks(x, base["group"].astype(str), rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy", fontsize=8)
    legend_right(ax)
    fig.tight_layout()
    return fig


def compare_agreement(summary: dict) -> Figure:
    """Routing agreement of two traces against the layer (``moetrace.compare.summary_json``'s
    ``layers``): top-1 agreement, top-k overlap, Jaccard and, when present, the weights' rank
    correlation, over all aligned tokens."""
    from pathlib import Path

    layers = [e["layer"] for e in summary["layers"]]
    fig = Figure(figsize=(6.0, 3.4))
    ax = fig.subplots()
    measures = [m for m in ("top1_agreement", "topk_overlap", "jaccard", "weight_rank_corr")
                if m in summary["layers"][0]]
    for m in measures:
        values = [np.nan if e[m] is None else e[m] for e in summary["layers"]]
        ax.plot(layers, values, marker="o", label=m.replace("_", " "))
    ax.set_xlabel("layer")
    ax.set_ylim(-1.05 if "weight_rank_corr" in measures else -0.05, 1.05)
    ax.set_title(f"{Path(summary['a']).name} vs {Path(summary['b']).name}: {summary['tokens']:,} tokens", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _analysis_figures() -> dict:
    from moetrace.analysis import ANALYSES

    return {name: fn for a in ANALYSES for name, fn in a.figures.items()}


def __getattr__(name: str):
    """An analysis' figure by its public name (PEP 562), from :data:`moetrace.analysis.ANALYSES`."""
    if not name.startswith("_"):
        found = _analysis_figures().get(name)
        if found is not None:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_analysis_figures()))

"""Figures of the toy model: the seed's per-expert figure and the sweep's phase diagrams (PNG)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from moetrace.toy.metrics import polysemanticity


def render_features(W: torch.Tensor, path: str | Path, n_hidden_line: int | None = None, title: str = "") -> Path:
    """The seed's ``render_features`` as a PNG: one row per expert of ``W [E, F, H]``.

    Left: bar per feature of ``||W_i^(e)||``, coloured by polysemanticity (viridis, 0..1, as the
    seed's ``cmin=0, cmax=1``), a vertical line after feature ``n_hidden_line - 1`` (default H).
    Right: the ``W_e W_e^T`` heatmap (coolwarm, -1..1, the seed's ``(1 + WW^T) / 2`` scaling).
    Sized so that 10 experts x 100 features stay readable (1600 px wide, 300 px per expert).
    """
    W = W.detach().to("cpu", torch.float64)
    n_exp, n_feat, n_hid = W.shape
    poly = polysemanticity(W).numpy()
    norms = torch.linalg.vector_norm(W, dim=-1).numpy()
    wwt = torch.einsum("efh,egh->efg", W, W).numpy()
    line = n_hid if n_hidden_line is None else n_hidden_line
    fig = Figure(figsize=(16, 3.0 * n_exp + 0.8), layout="constrained", dpi=100)
    axes = fig.subplots(n_exp, 2, squeeze=False, gridspec_kw=dict(width_ratios=[2.6, 1]))
    cmap = matplotlib.colormaps["viridis"]
    x = np.arange(n_feat)
    ymax = max(float(norms.max()) * 1.1, 1e-6)
    for e in range(n_exp):
        ax = axes[e, 0]
        ax.bar(x, norms[e], width=0.9, color=cmap(np.clip(poly[e], 0, 1)))
        ax.axvline(line - 0.5, color="k", lw=0.6)
        ax.set_xlim(-0.6, n_feat - 0.4)
        ax.set_ylim(0, ymax)
        ax.set_ylabel("norm")
        ax.set_title(f"expert {e}", loc="left", fontsize=11)
        step = 5 if n_feat <= 60 else 10
        ax.set_xticks(np.arange(0, n_feat, step))
        ax.tick_params(labelsize=9)
        im = axes[e, 1].imshow(wwt[e], cmap="coolwarm", vmin=-1, vmax=1, interpolation="nearest")
        axes[e, 1].set_title(f"expert {e}: W W^T", fontsize=10)
        axes[e, 1].set_xticks([])
        axes[e, 1].set_yticks([])
    axes[-1, 0].set_xlabel("feature")
    fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap=cmap), ax=axes[:, 0], shrink=0.3,
                 aspect=30, label="polysemanticity (clipped at 1)")
    fig.colorbar(im, ax=axes[:, 1], shrink=0.3, aspect=30, label="W W^T")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    return path


PHASE_METRICS = (("features_per_dim", "features per dimension (Chaudhari et al.)"),
                 ("n_represented", "features represented (global dimensionality > 0.05)"),
                 ("mean_expert_dim", "mean dimensionality of the features experts hold"))


def phase_diagrams(table, path: str | Path) -> Path:
    """Sweep results against feature sparsity (``1 - p``, log scale) and network sparsity (``k / E``).

    table: the tidy sweep table (:func:`moetrace.toy.sweep.run_sweep`). Top row: each metric vs
    feature sparsity, one line per (E, k), coloured by k/E. Bottom row: each metric vs k/E, one
    point per model, coloured by feature sparsity. Medians over seeds.
    """
    t = table.copy()
    fig = Figure(figsize=(6 * len(PHASE_METRICS), 10), dpi=100, layout="constrained")
    axes = fig.subplots(2, len(PHASE_METRICS), squeeze=False)
    ratios = sorted(t["network_sparsity"].unique())
    net_norm = matplotlib.colors.LogNorm(vmin=max(t["network_sparsity"].min(), 1e-3), vmax=1.0)
    one_minus = 1 - t["feature_probability"]
    fs_norm = matplotlib.colors.Normalize(vmin=float(one_minus.min()), vmax=float(one_minus.max()))
    for col, (metric, label) in enumerate(PHASE_METRICS):
        ax = axes[0, col]
        grouped = t.groupby(["n_experts", "n_active_experts", "feature_probability"], as_index=False)[metric].median()
        for (E, k), g in grouped.groupby(["n_experts", "n_active_experts"]):
            g = g.sort_values("feature_probability")
            ax.plot(g["feature_probability"], g[metric], marker="o", ms=3,
                    color=matplotlib.colormaps["plasma"](net_norm(k / E)), label=f"E={E}, k={k}")
        ax.set_xscale("log")
        ax.invert_xaxis()
        ax.set_xlabel("feature probability p (sparser to the right)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.legend(fontsize=7, ncol=2)
        ax = axes[1, col]
        jitter = np.random.default_rng(0).uniform(-0.04, 0.04, len(t))
        sc = ax.scatter(t["network_sparsity"] * np.exp(jitter), t[metric], c=1 - t["feature_probability"],
                        cmap="viridis", norm=fs_norm, s=14)
        med = t.groupby("network_sparsity")[metric].median()
        ax.plot(med.index, med.values, color="k", lw=1, label="median")
        ax.set_xscale("log")
        ax.set_xticks(ratios, [str(Fraction(r).limit_denominator(64)) for r in ratios])
        ax.minorticks_off()
        ax.set_xlabel("network sparsity k / E")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.colorbar(sc, ax=axes[1, :], fraction=0.02, label="feature sparsity 1 - p")
    fig.colorbar(ScalarMappable(norm=net_norm, cmap="plasma"), ax=axes[0, :], fraction=0.02,
                 label="network sparsity k / E")
    path = Path(path)
    fig.savefig(path)
    return path


def features_per_dimension_figure(summary, path: str | Path, title: str = "") -> Path:
    """Chaudhari et al.'s figure: features per dimension against ``1 / p`` (log), one line per
    architecture with its 95% interval over seeds as a band. summary: :func:`moetrace.toy.reproduce.chaudhari_summary`."""
    fig = Figure(figsize=(9, 5.5), dpi=110, layout="constrained")
    ax = fig.subplots()
    for i, (arch, g) in enumerate(summary.groupby("architecture", sort=False)):
        g = g.sort_values("feature_probability", ascending=False)
        x = 1 / g["feature_probability"].to_numpy()
        color = matplotlib.colormaps["tab10"](i)
        ax.plot(x, g["features_per_dim"], "-o", ms=3, lw=2, color=color, label=f"{arch} (k/E = {g['network_sparsity'].iloc[0]:g})")
        ax.fill_between(x, g["features_per_dim_low"], g["features_per_dim_high"], color=color, alpha=0.2, lw=0)
    ax.axhline(1, ls="--", color="orange", lw=1)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("1 / feature probability  (dense <- -> sparse)")
    ax.set_ylabel("features per dimension  sum_e p_e ||W_e||_F^2 / m / k")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "features per dimension; bands: 95% interval over seeds", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def _phase_colour(norm: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Their colour map: white = not represented, blue = a dimension to itself, red = superposed
    (``norm`` and ``score`` clipped to [0, 1])."""
    y, x = np.clip(norm, 0, 1), np.clip(score, 0, 1)
    white = 1 - y
    return np.stack([y * x + white, white, y * (1 - x) + white], -1)


def phase_diagram_figure(phase, path: str | Path) -> Path:
    """One row per architecture, one panel per expert: the varied feature's colour (see
    :func:`_phase_colour`) over sparsity (x) and its importance (y). phase: :func:`moetrace.toy.reproduce.run_phase`."""
    archs = list(dict.fromkeys(phase["architecture"]))
    n_cols = int(phase["n_experts"].max())
    fig = Figure(figsize=(3.2 * n_cols + 1, 2.6 * len(archs)), dpi=100, layout="constrained")
    axes = fig.subplots(len(archs), n_cols, squeeze=False)
    for r, arch in enumerate(archs):
        g = phase[phase["architecture"] == arch]
        S, imp = np.sort(g["sparsity"].unique()), np.sort(g["importance"].unique())
        for e in range(n_cols):
            ax = axes[r, e]
            ge = g[g["expert"] == e]
            if ge.empty:
                ax.axis("off")
                continue
            norm = ge.pivot(index="importance", columns="sparsity", values="norm").reindex(index=imp, columns=S)
            score = ge.pivot(index="importance", columns="sparsity", values="superposition").reindex(index=imp, columns=S)
            ax.imshow(_phase_colour(norm.to_numpy(), score.to_numpy()), origin="lower", aspect="auto",
                      extent=(S[0], S[-1], imp[0], imp[-1]), interpolation="nearest")
            ax.set_title(f"{arch} (n-m-E), expert {e}", fontsize=9)
            ax.set_xlabel("feature sparsity S", fontsize=8)
            ax.set_ylabel("importance of the last feature", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("last feature per expert: white = not represented, blue = own dimension, red = superposed", fontsize=10)
    path = Path(path)
    fig.savefig(path)
    return path


def plateau_figure(features, dims_per_feature, path: str | Path, fractions, title: str = "") -> Path:
    """Elhage et al.'s figure: each represented feature's dimensionality against ``1 / p`` (log),
    with the dims-per-feature curve ``m / ||W||_F^2`` and the plateau fractions marked.
    features: rows of :func:`moetrace.toy.reproduce.run_elhage`; dims_per_feature: ``{p: value}``."""
    fig = Figure(figsize=(9, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    held = features[features["norm"] > 0.5]
    jitter = np.random.default_rng(0).uniform(-0.03, 0.03, len(held))
    ax.scatter(1 / held["feature_probability"] * np.exp(jitter), held["dimensionality"], s=5, alpha=0.4,
               label="D_i of a represented feature (norm > 0.5)")
    ps = sorted(dims_per_feature, reverse=True)
    ax.plot([1 / p for p in ps], [dims_per_feature[p] for p in ps], "k.-", lw=1, label="m / ||W||_F^2 (mean of seeds)")
    for frac in fractions:
        ax.axhline(float(frac), color="grey", lw=0.5, ls="--")
        ax.text(1.01, float(frac), str(frac), fontsize=8, va="center", transform=ax.get_yaxis_transform())
    ax.set_xscale("log")
    ax.set_xlabel("1 / feature probability (sparser to the right)")
    ax.set_ylabel("dimensionality")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    path = Path(path)
    fig.savefig(path)
    return path

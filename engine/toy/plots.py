"""Figures of the toy model: the seed's per-expert figure and the sweep's phase diagrams (PNG)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from engine.toy.metrics import polysemanticity  # noqa: E402


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
    fig, axes = plt.subplots(n_exp, 2, figsize=(16, 3.0 * n_exp + 0.8), squeeze=False, layout="constrained",
                             gridspec_kw=dict(width_ratios=[2.6, 1]), dpi=100)
    cmap = plt.get_cmap("viridis")
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
    fig.colorbar(plt.cm.ScalarMappable(norm=plt.Normalize(0, 1), cmap=cmap), ax=axes[:, 0], shrink=0.3,
                 aspect=30, label="polysemanticity (clipped at 1)")
    fig.colorbar(im, ax=axes[:, 1], shrink=0.3, aspect=30, label="W W^T")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


PHASE_METRICS = (("n_represented", "features represented"),
                 ("mean_expert_dim", "mean dimensionality of the features experts hold"),
                 ("monosemantic_fraction", "monosemantic fraction of experts' features"))


def phase_diagrams(table, path: str | Path) -> Path:
    """Sweep results against feature sparsity (``1 - p``, log scale) and network sparsity (``k / E``).

    table: the tidy sweep table (:func:`engine.toy.sweep.run_sweep`). Top row: each metric vs
    feature sparsity, one line per (E, k), coloured by k/E. Bottom row: each metric vs k/E, one
    point per model, coloured by feature sparsity. Medians over seeds.
    """
    t = table.copy()
    fig, axes = plt.subplots(2, len(PHASE_METRICS), figsize=(6 * len(PHASE_METRICS), 10), dpi=100, squeeze=False,
                             layout="constrained")
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
                    color=plt.get_cmap("plasma")(net_norm(k / E)), label=f"E={E}, k={k}")
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
    fig.colorbar(plt.cm.ScalarMappable(norm=net_norm, cmap="plasma"), ax=axes[0, :], fraction=0.02,
                 label="network sparsity k / E")
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path

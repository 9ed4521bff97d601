"""Router decisiveness (seed 003's ``router_decisive.py``): how sure the router is of its choice.

Per token and layer, the entropy of the router's full distribution over the E experts divided by
log(E) (0: all mass on one expert, 1: uniform), and the probability mass the top-k experts keep.
Read chunk by chunk from ``routing/probs`` of a store (``capture --probs``), each chunk worked on
in blocks of :data:`moetrace.analysis._common.BLOCK_ROWS` rows: memory is one chunk plus one block's
temporaries plus fixed-size histograms, whatever the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xarray as xr

from moetrace.analysis._common import (Analysis, blocks, capture_probs, group_codes, layer_positions, row_range,
                                       write_outputs)
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.models.loading import load_model
from moetrace.plotting import Figure, layer_axis, legend_right, palette
from moetrace.sections import ANALYSIS_DIR, Context, Section, html_table, img, note, open_dataset
from moetrace.store import TraceStore


QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def router_entropy(probs) -> np.ndarray:
    """Entropy of each row of a [T, E] probability array (or tensor) divided by log(E): float64 [T].

    Rows are normalized to sum to 1 first (as ``scipy.stats.entropy`` does); 0 log 0 = 0. Works on
    any leading shape [..., E] (returns [...]). E = 1 gives 0.
    """
    if hasattr(probs, "detach"):
        probs = probs.detach().float().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] < 1:
        raise MoetraceError(f"probs: expected an array [..., E] with E >= 1, got shape {p.shape}")
    n_experts = p.shape[-1]
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = p / np.where(total > 0, total, 1.0)
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = -plogp.sum(axis=-1)
    return h / np.log(n_experts) if n_experts > 1 else np.zeros_like(h)


def _hist_quantiles(hist: np.ndarray, edges: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """Quantiles [rows, Q] of histograms [rows, B] by linear interpolation inside the bin."""
    out = np.full((hist.shape[0], len(qs)), np.nan)
    for r in range(hist.shape[0]):  # layers, not tokens
        cdf = np.cumsum(hist[r])
        if cdf[-1] == 0:
            continue
        cdf = np.concatenate([[0], cdf / cdf[-1]])
        out[r] = np.interp(qs, cdf, edges)
    return out


def decisiveness(store: str | TraceStore, layers: Sequence[int] | None = None, num_tokens: int | None = None,
                 by: Sequence[str] = (), bins: int = 200) -> xr.Dataset:
    """Normalized router entropy and selected-experts mass per layer (and group) from ``routing/probs``.

    store: a path or TraceStore with ``routing/probs``; layers: layer ids (default all);
    num_tokens: the first N rows (default all); by: label names, groups are their cross product.
    The mass of a token is the share of its router distribution on the K experts it was routed to
    (``routing/experts``), which for sigmoid or group-limited routers with a selection bias
    (DeepSeek-V3's family) need not be the K largest scores.
    Returns a Dataset with dims layer, group, bin, quantile:
      ``entropy_hist`` int64 (layer, bin) counts of the normalized entropy over ``bins`` equal bins
      of [0, 1] (``bin_lo``/``bin_hi`` coords); ``mass_hist`` the same for the mass;
      ``entropy_quantile`` / ``mass_quantile`` (layer, quantile) from the histograms (bin width
      1/bins resolution); ``group_entropy_quantile`` / ``group_mass_quantile`` (group, layer,
      quantile), the same per group (NaN for an empty group); ``mean_entropy`` / ``mean_mass``
      float64 (group, layer) (NaN for an empty group); ``tokens`` int64 (group). Attrs: n_experts,
      top_k, rows.
    """
    st = store if isinstance(store, TraceStore) else TraceStore.open(store)
    if not st.has_probs:
        raise MoetraceError(f"{st.path}: no routing/probs array (capture with --probs)")
    pos = layer_positions(st.layer_ids, layers)
    names, codes_of = group_codes(st, by)
    G, L, E, K = len(names), len(pos), st.n_experts, st.top_k
    h_hist = np.zeros((G, L, bins), dtype=np.int64)  # per group; the layer's is their sum
    m_hist = np.zeros((G, L, bins), dtype=np.int64)
    h_sum = np.zeros((G, L))
    m_sum = np.zeros((G, L))
    tokens = np.zeros(G, dtype=np.int64)
    rows = row_range(st, num_tokens)
    offsets = np.arange(L) * bins
    for chunk in blocks(st.iter_chunks(["probs", "experts", *by], rows=rows)):
        p = chunk["probs"][:, pos, :].astype(np.float32)  # [n, L, E]
        h = router_entropy(p)  # [n, L]
        total = p.sum(-1)
        chosen = np.take_along_axis(p, chunk["experts"][:, pos, :].astype(np.int64), axis=-1)
        mass = chosen.sum(-1) / np.where(total > 0, total, 1.0)
        g = codes_of(chunk)
        for values, hist in ((h, h_hist), (mass, m_hist)):
            b = np.clip((values * bins).astype(np.int64), 0, bins - 1) + offsets + (g * L * bins)[:, None]
            hist += np.bincount(b.ravel(), minlength=G * L * bins).reshape(G, L, bins)
        tokens += np.bincount(g, minlength=G)
        gl = (g[:, None] * L + np.arange(L)).ravel()
        h_sum += np.bincount(gl, weights=h.ravel(), minlength=G * L).reshape(G, L)
        m_sum += np.bincount(gl, weights=mass.ravel(), minlength=G * L).reshape(G, L)
    if tokens.sum() == 0:
        raise MoetraceError(f"{st.path}: no rows to analyse")
    edges = np.linspace(0.0, 1.0, bins + 1)
    denom = np.where(tokens > 0, tokens, np.nan)[:, None]
    layer_ids = np.asarray(st.layer_ids)[pos]

    def per_group(hist: np.ndarray) -> np.ndarray:
        return _hist_quantiles(hist.reshape(G * L, bins), edges, QUANTILES).reshape(G, L, len(QUANTILES))

    return xr.Dataset(
        {"entropy_hist": (("layer", "bin"), h_hist.sum(0)), "mass_hist": (("layer", "bin"), m_hist.sum(0)),
         "entropy_quantile": (("layer", "quantile"), _hist_quantiles(h_hist.sum(0), edges, QUANTILES)),
         "mass_quantile": (("layer", "quantile"), _hist_quantiles(m_hist.sum(0), edges, QUANTILES)),
         "group_entropy_quantile": (("group", "layer", "quantile"), per_group(h_hist)),
         "group_mass_quantile": (("group", "layer", "quantile"), per_group(m_hist)),
         "mean_entropy": (("group", "layer"), h_sum / denom), "mean_mass": (("group", "layer"), m_sum / denom),
         "tokens": (("group",), tokens)},
        coords={"layer": layer_ids, "group": names, "quantile": list(QUANTILES),
                "bin_lo": ("bin", edges[:-1]), "bin_hi": ("bin", edges[1:])},
        attrs={"n_experts": E, "top_k": K, "rows": list(rows), "analysis": "decisiveness"})


def table(ds: xr.Dataset) -> "pd.DataFrame":  # noqa: F821
    """Tidy per (group, layer) table: mean entropy, mean selected-experts mass, tokens, and the group's
    entropy quantiles at that layer."""
    df = ds[["mean_entropy", "mean_mass"]].to_dataframe().reset_index()
    df["tokens"] = ds["tokens"].sel(group=df["group"].to_numpy()).to_numpy()
    if "group_entropy_quantile" not in ds:  # a result saved before per-group quantiles: the layer's
        q = ds["entropy_quantile"].to_pandas()
        q.columns = [f"entropy_q{c:g}" for c in q.columns]
        return df.merge(q.reset_index(), on="layer")
    q = ds["group_entropy_quantile"].to_dataframe().reset_index().pivot(
        index=["group", "layer"], columns="quantile", values="group_entropy_quantile")
    q.columns = [f"entropy_q{c:g}" for c in q.columns]
    return df.merge(q.reset_index(), on=["group", "layer"])


# ---------------------------------------------------------------------- figure, command, report section

#: The name of the files the command writes (``decisiveness.{csv,zarr,png,pdf}``).
OUTPUT = "decisiveness"


def figure(ds: xr.Dataset) -> Figure:
    """Histogram of the normalized router entropy per layer, and each group's mean entropy and top-k mass."""
    fig = Figure(figsize=(11, 3.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    centers = (ds["bin_lo"].values + ds["bin_hi"].values) / 2
    for layer, color in zip(ds["layer"].values, palette(ds.sizes["layer"])):
        hist = ds["entropy_hist"].sel(layer=layer).values.astype(np.float64)
        ax1.plot(centers, hist / max(1.0, hist.sum()), label=f"layer {layer}", lw=1, color=color)
    ax1.set_xlabel("router entropy / log E", fontsize=8)
    ax1.set_ylabel("share of tokens", fontsize=8)
    ax1.legend(fontsize=6)
    layers = ds["layer"].values.tolist()
    for name, ax, title in (("mean_entropy", ax2, "mean entropy / log E"),
                            ("mean_mass", ax3, f"mean top-{ds.attrs.get('top_k', 'k')} probability mass")):
        for group, color in zip(ds["group"].values, palette(ds.sizes["group"])):
            ax.plot(np.arange(len(layers)), ds[name].sel(group=group).values, marker=".", label=str(group),
                    color=color)
        ax.set_title(title, fontsize=9)
        layer_axis(ax, layers)
    legend_right(ax3)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p, model=True)
    p.add_argument("--by", default=None, help="comma-separated labels for groups (default: all labels)")
    p.add_argument("--bins", type=int, default=200, help="histogram bins over [0, 1] of entropy / log E (default 200)")


def _run(args) -> int:
    if (args.store is None) == (args.model is None):
        raise MoetraceError("decisiveness: give either a trace store or --model (with --data)")
    if args.model is not None:
        model, tokenizer = load_model(args.model)
        path = capture_probs(model, cli.batches(args, model, tokenizer)(), cli.out_dir(args) / "probs.zarr")
        st = TraceStore.open(path)
    else:
        st = cli.open_store(args)
    ds = decisiveness(st, layers=args.layers, num_tokens=args.num_tokens, by=cli.label_list(args.by, st),
                      bins=args.bins)
    cli.save(cli.out_dir(args), OUTPUT, figure(ds), table(ds), dataset=ds)
    w = ds["tokens"]  # the layer's means over all tokens: group means weighted by their tokens
    for layer in ds["layer"].values.tolist():
        h = float((ds["mean_entropy"].sel(layer=layer) * w).sum() / w.sum())
        m = float((ds["mean_mass"].sel(layer=layer) * w).sum() / w.sum())
        print(f"layer {layer}: mean router entropy / log E {h:.3f} (0: one expert, 1: uniform), "
              f"mean top-{ds.attrs['top_k']} mass {m:.3f}")
    return 0


def _suite(run) -> list[Path]:
    ds = decisiveness(run.store, layers=run.layers, by=run.store.label_names)
    return write_outputs(run.out, OUTPUT, figure(ds), table(ds), dataset=ds)


def _render(ctx: Context) -> str:
    if ctx.has(f"{ANALYSIS_DIR}/{OUTPUT}.zarr"):  # what the command wrote, else from the store's probs
        ds = open_dataset(ctx.analysis_dir / f"{OUTPUT}.zarr")
    else:
        ds = decisiveness(ctx.store, by=ctx.store.label_names)
    rows = [[int(layer), *ds["entropy_quantile"].sel(layer=layer).values.tolist(),
             float(ds["mean_mass"].sel(layer=layer).mean())] for layer in ds["layer"].values]
    return (note(f"Entropy of the router's full distribution over the {ds.attrs['n_experts']} experts divided by "
                 f"log E (0: one expert takes everything, 1: uniform), per token, from routing/probs; and the "
                 f"probability mass the top-{ds.attrs['top_k']} keep. Quantiles from {ds.sizes['bin']}-bin "
                 "histograms.")
            + img(figure(ds), "router entropy and top-k mass by layer")
            + html_table(["layer", *[f"entropy q{q:g}" for q in ds["quantile"].values], "mean top-k mass"], rows))


ANALYSIS = Analysis(
    command="decisiveness", help="router entropy / log E and top-k mass per layer (needs routing/probs)",
    example="decisiveness run/trace.zarr --layers 0 1 --num-tokens 20000 --out run/analysis",
    arguments=_arguments, run=_run, order=30,
    outputs=tuple(f"{OUTPUT}.{ext}" for ext in ("csv", "zarr", "png", "pdf")),
    figures={"decisiveness": figure},
    section=Section("decisiveness", "Router decisiveness", "Decisiveness", (f"probs|{ANALYSIS_DIR}/{OUTPUT}.zarr",),
                    _render),
    suite=_suite)

"""One self-contained HTML report of a trace store or an experiment run directory.

    write_report("demo_out", "demo_out/report.html")          # a run: trace.zarr [+ counts.zarr, results.csv]
    write_report("trace.zarr", "report.html", title="OLMoE")  # a bare trace store

The file needs nothing but itself: plots are PNGs (matplotlib, Agg) inlined as base64
``data:`` URIs, the style sheet is inline, there is no script, and a Content-Security-Policy
``<meta>`` forbids every load other than ``data:`` images, so a browser fetches nothing.
Every text put into the page goes through :func:`html.escape`.

Sections (each present when its inputs are):

- *Ablation experiment* (``results.csv``): per method, the targeted x evaluated group matrix
  of the accuracy drop (mean over seeds) beside its ``random:<method>`` control, the headline
  numbers per method (targeted drop, off-target drop, random drop, their ratios) and the table.
- *Domain separation by layer*: seed 002's chi-square test and mean variance of the normalized
  usage per layer (:func:`engine.metrics.layer_ranking`), and the Shannon entropy of each
  group's expert usage against log2(E) (:func:`engine.metrics.entropy`).
- *Expert usage*: per layer, a group x expert heatmap of the percent of the group's routing
  (all top-k ranks) that goes to each expert.
- *Specialist and generalist experts* at the layer with the largest chi-square
  (:func:`engine.metrics.expert_variation`).
- *Top paths per group*: the most frequent (layer, previous top-1 -> top-1) paths of each group.
- *Stickiness*: lag-1 top-1 stickiness per group and layer against 1/E
  (:func:`engine.metrics.stickiness`), when ``temporal`` was counted.
- *Trace store*: :meth:`engine.store.TraceStore.info` and what the counts cover.

A store without labels is one group, ``all``. Group names are the label values joined by
``/`` (``math/en``), as in the experiment's ``results.csv``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr
from matplotlib.figure import Figure

from engine import metrics
from engine.aggregate import count, load_counts
from engine.errors import MoetraceError
from engine.store import TraceStore

#: Columns ``results.csv`` must have (the experiment's interface).
RESULT_COLUMNS = ("method", "targeted_group", "evaluated_group", "base_accuracy", "ablated_accuracy")
#: Numeric columns of ``results.csv`` the report reads when present (``nan`` allowed).
NUMERIC_RESULT_COLUMNS = ("base_accuracy", "ablated_accuracy", "drop", "base_loss", "ablated_loss",
                          "loss_increase", "coverage", "n_items", "seed")
#: Statistics counted when a run directory has no ``counts.zarr`` or the source is a bare store.
REPORT_STATS = ("experts", "paths", "temporal")
#: Layers per usage-heatmap figure (more layers make several figures).
LAYERS_PER_FIGURE = 16
#: Paths listed per group.
TOP_PATHS = 10

_DPI = 90
# Only data: images and the inline style sheet may load; no script, no network.
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ddd; padding: .2em .6em; text-align: right; }
th { background: #f3f3f3; } td.t, th.t { text-align: left; }
img { max-width: 100%; display: block; margin: .6em 0; }
.note { color: #666; font-size: .9em; }
nav a { margin-right: 1em; }
"""


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _group_label(values: Sequence[str]) -> str:
    return "/".join(str(v) for v in values) if values else "all"


def load_results(results: str | Path | pd.DataFrame) -> pd.DataFrame:
    """An experiment's results table, checked; adds ``drop`` (base - ablated) when absent.

    results: a CSV path or a DataFrame with at least the columns of :data:`RESULT_COLUMNS`
    (``method``, ``targeted_group``, ``evaluated_group`` str; ``base_accuracy``,
    ``ablated_accuracy`` float); random-control rows have a ``method`` starting with
    ``random``. Group names are read as written (a group called ``NA`` stays ``NA``); the
    columns of :data:`NUMERIC_RESULT_COLUMNS` present become float64 (``nan`` / empty: NaN).
    Returns a DataFrame, one row per input row, group/method columns as str.
    """
    name = "results"
    if not isinstance(results, pd.DataFrame):
        path = Path(results)
        name = str(path)
        if not path.is_file():
            raise MoetraceError(f"{path}: no such results file")
        try:
            results = pd.read_csv(path, dtype={c: str for c in ("method", "targeted_group", "evaluated_group")},
                                  keep_default_na=False, na_values=[""])
        except (ValueError, pd.errors.ParserError) as exc:
            raise MoetraceError(f"{path}: not a readable CSV results table ({exc})") from None
    missing = [c for c in RESULT_COLUMNS if c not in results.columns]
    if missing:
        raise MoetraceError(f"{name}: expected columns {list(RESULT_COLUMNS)}, missing {missing} "
                            f"(has {list(results.columns)})")
    df = results.copy()
    for col in ("method", "targeted_group", "evaluated_group"):
        df[col] = df[col].astype(str)
    for col in NUMERIC_RESULT_COLUMNS:
        if col in df.columns:
            try:
                df[col] = df[col].astype(np.float64)  # parses "nan" / "inf", which pd.to_numeric does not
            except (ValueError, TypeError):
                raise MoetraceError(f"{name}: column {col!r} must be numeric") from None
    if "drop" not in df.columns:
        df["drop"] = df["base_accuracy"] - df["ablated_accuracy"]
    return df


def _load(source: str | Path) -> tuple[TraceStore, xr.Dataset, str, Path | None]:
    """(store, counts, where the counts came from, results.csv path or None) of a store or run dir."""
    source = Path(source)
    if not source.exists():
        raise MoetraceError(f"{source}: no such trace store or run directory")
    results_csv = None
    counts_path = None
    if (source / "trace.zarr").is_dir():
        store = TraceStore.open(source / "trace.zarr")
        if (source / "counts.zarr").exists():
            counts_path = source / "counts.zarr"
        if (source / "results.csv").is_file():
            results_csv = source / "results.csv"
    else:
        if not (source / "zarr.json").is_file():
            raise MoetraceError(f"{source}: expected a trace store or a run directory holding trace.zarr, got neither")
        store = TraceStore.open(source)
    if counts_path is not None:
        counts = load_counts(counts_path)
        origin = f"loaded from {counts_path}"
    else:
        counts = count(store, stats=list(REPORT_STATS), by=store.label_names, progress=False)
        by = ", ".join(store.label_names) or "nothing"
        origin = f"counted now from the store ({', '.join(REPORT_STATS)} by {by})"
    metrics.check_counts(counts)
    return store, counts, origin, results_csv


# ---------------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: Any, digits: int = 4) -> str:
    """A cell value as text: integers as is, floats to ``digits`` significant digits, NaN as '-'."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.{digits}g}"
    return str(value)


def _size(n: int | None) -> str:
    """Bytes as text in B / KiB / MiB / GiB / TiB ('-' when unknown)."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _table(columns: Sequence[str], rows: Sequence[Sequence[Any]], text_cols: int = 1) -> str:
    """An escaped HTML table; the first ``text_cols`` columns are left-aligned."""
    head = "".join(f'<th class="t">{_e(c)}</th>' if i < text_cols else f"<th>{_e(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = "".join(f'<td class="t">{_e(_fmt(v))}</td>' if i < text_cols else f"<td>{_e(_fmt(v))}</td>"
                        for i, v in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(fig: Figure, alt: str) -> str:
    """``<img>`` holding ``fig`` as an inline base64 PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _section(sec_id: str, heading: str, body: str) -> str:
    return f'<section id="{_e(sec_id)}"><h2>{_e(heading)}</h2>\n{body}\n</section>'


def _group_matrix(da: xr.DataArray, counts: xr.Dataset) -> np.ndarray:
    """A (group..., rest...) DataArray as [G, rest...] in :func:`engine.metrics.group_names` order."""
    return metrics.flatten_groups(da, metrics.group_dims(counts))


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


def _separation_section(counts: xr.Dataset, groups: list[str]) -> tuple[str, int | None]:
    """Chi-square / mean variance / entropy by layer; returns (html, layer id with the largest chi2)."""
    if "experts" not in counts.data_vars:
        return _section("separation", "Domain separation by layer", _note("experts were not counted.")), None
    ranking = metrics.layer_ranking(counts)
    ent = metrics.entropy(counts)
    layers = counts["layer"].values.tolist()
    chi2 = ranking["chi2"].values
    best = None if np.all(np.isnan(chi2)) else int(layers[int(np.nanargmax(chi2))])
    h = _group_matrix(ent["entropy"].transpose(..., "layer"), counts)  # [G, L]
    max_bits = float(ent["max_entropy"])

    fig = Figure(figsize=(11, 3.4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(layers))
    colors = ["#c0392b" if s else "#95a5a6" for s in ranking["significant"].values]
    ax1.bar(x, np.nan_to_num(chi2), color=colors)
    ax1.set_title(f"chi-square (red: p < {ranking.attrs['alpha']:g})", fontsize=9)
    ax2.plot(x, ranking["avg_variance"].values, marker="o", color="#2c3e50")
    ax2.set_title("mean variance of normalized usage", fontsize=9)
    for g, name in enumerate(groups):
        ax3.plot(x, h[g], marker=".", label=name)
    ax3.axhline(max_bits, ls="--", color="k", lw=1, label=f"log2(E) = {max_bits:.2f}")
    ax3.set_title("entropy of expert usage (bits)", fontsize=9)
    ax3.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    for ax in (ax1, ax2, ax3):
        ax.set_xticks(x, [str(v) for v in layers], fontsize=7)
        ax.set_xlabel("layer", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()

    rows = [[layer, ranking["chi2"].values[i], ranking["dof"].values[i], ranking["p_value"].values[i],
             ranking["avg_variance"].values[i], bool(ranking["significant"].values[i]), float(np.nanmean(h[:, i]))
             if np.any(~np.isnan(h[:, i])) else float("nan")]
            for i, layer in enumerate(layers)]
    body = (_note("Seed 002's test of independence of group and expert on each layer's group x expert count "
                  "matrix (all top-k ranks), and the Shannon entropy of each group's expert usage.")
            + _img(fig, "chi-square, mean variance and entropy by layer")
            + _table(["layer", "chi2", "dof", "p value", "mean variance", "significant", "mean entropy (bits)"], rows))
    if best is not None:
        body += _note(f"Most domain-separating layer (largest chi-square): {best}.")
    return _section("separation", "Domain separation by layer", body), best


def _usage_section(counts: xr.Dataset, groups: list[str]) -> str:
    """Small multiples: one group x expert heatmap per layer, percent of the group's routing."""
    if "experts" not in counts.data_vars:
        return _section("usage", "Expert usage per layer", _note("experts were not counted."))
    usage = _group_matrix(counts["experts"].sum("rank").transpose(..., "layer", "expert"), counts)  # [G, L, E]
    total = usage.sum(axis=2, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(total > 0, usage / np.where(total > 0, total, 1) * 100.0, np.nan)
    layers = counts["layer"].values.tolist()
    experts = counts["expert"].values.tolist()
    n_groups, n_experts = pct.shape[0], pct.shape[2]
    vmax = float(np.nanmax(pct)) if np.any(~np.isnan(pct)) else 1.0
    imgs = []
    for first in range(0, len(layers), LAYERS_PER_FIGURE):
        block = list(range(first, min(first + LAYERS_PER_FIGURE, len(layers))))
        ncols = min(4, len(block))
        nrows = math.ceil(len(block) / ncols)
        panel_w = min(6.0, max(2.6, 0.09 * n_experts + 1.0))
        panel_h = min(6.0, max(1.4, 0.22 * n_groups + 0.8))
        fig = Figure(figsize=(panel_w * ncols + 1.0, panel_h * nrows + 0.4))
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
        image = None
        for ax, i in zip(axes, block):
            image = ax.imshow(pct[:, i, :], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax,
                              interpolation="nearest")
            ax.set_title(f"layer {layers[i]}", fontsize=8)
            step = max(1, math.ceil(n_experts / 16))
            ax.set_xticks(np.arange(0, n_experts, step), [str(experts[j]) for j in range(0, n_experts, step)],
                          fontsize=6)
            if ax is axes[(block.index(i) // ncols) * ncols]:
                gstep = max(1, math.ceil(n_groups / 24))
                ax.set_yticks(np.arange(0, n_groups, gstep), groups[::gstep], fontsize=6)
            else:
                ax.set_yticks([])
        for ax in axes[len(block):]:
            ax.set_axis_off()
        fig.colorbar(image, ax=list(axes), shrink=0.8, label="% of the group's routing")
        imgs.append(_img(fig, f"expert usage heatmaps, layers {layers[block[0]]} to {layers[block[-1]]}"))
    body = (_note("Percent of each group's expert selections (all top-k ranks) that go to each expert; "
                  f"rows: groups, columns: experts (uniform: {100.0 / n_experts:.3g}%).") + "".join(imgs))
    return _section("usage", "Expert usage per layer", body)


def _specialist_section(counts: xr.Dataset, layer: int | None) -> str:
    heading = "Specialist and generalist experts"
    if layer is None:
        return _section("specialists", heading, _note("No layer has expert counts."))
    var = metrics.expert_variation(counts, layer)
    gdims = metrics.group_dims(counts)
    cv = var["cv"].values
    if np.all(np.isnan(cv)):
        return _section("specialists", heading,
                        _note(f"Layer {layer}: the coefficient of variation needs at least two groups."))
    experts = var["expert"].values
    preferred = ["/".join(str(var[f"preferred_{label}"].values[i]) for label in gdims) or "all"
                 for i in range(experts.size)]
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
    rows = []
    for role, mask in (("specialist", var["specialist"].values), ("generalist", var["generalist"].values)):
        idx = np.flatnonzero(mask)
        idx = idx[np.argsort(-cv[idx], kind="stable")]
        rows += [[role, int(experts[i]), cv[i], preferred[i], var["usage_pct"].values[i]] for i in idx]
    body = (_note(f"Layer {layer} (largest chi-square). Coefficient of variation of each expert's counts across "
                  f"groups; specialists above the 75th percentile ({var.attrs['q75']:.3g}), generalists below the "
                  f"25th ({var.attrs['q25']:.3g}). Usage: percent of the preferred group's routing at this layer "
                  "that goes to the expert.")
            + _img(fig, f"coefficient of variation per expert at layer {layer}")
            + _table(["role", "expert", "cv", "preferred group", "usage % of the group"], rows, text_cols=1))
    return _section("specialists", heading, body)


def _paths_section(counts: xr.Dataset, groups: list[str], top: int) -> str:
    heading = "Top paths per group"
    if "paths" not in counts.data_vars:
        return _section("paths", heading, _note("paths were not counted (count with --stats paths)."))
    paths = _group_matrix(counts["paths"].transpose(..., "layer", "prev_expert", "expert"), counts)  # [G, L, E, E]
    shape = paths.shape[1:]
    flat = paths.reshape(paths.shape[0], -1)
    overall = flat.sum(axis=0)
    layers = counts["layer"].values
    prev_ids, ids = counts["prev_expert"].values, counts["expert"].values
    rows = []
    for g, name in enumerate(groups):
        total = flat[g].sum()
        if total == 0:
            continue
        order = np.argsort(-flat[g], kind="stable")[:top]
        order = order[flat[g][order] > 0]
        li, pi, ei = np.unravel_index(order, shape)
        for j, item in enumerate(order):
            rows.append([name, int(layers[li[j]]), f"{prev_ids[pi[j]]} -> {ids[ei[j]]}", int(flat[g][item]),
                         100.0 * flat[g][item] / total, 100.0 * flat[g][item] / overall[item]])
    if not rows:
        return _section("paths", heading, _note("No paths were counted (a single recorded layer?)."))
    body = (_note(f"The {top} most frequent paths of each group: top-1 expert at the previous recorded layer -> "
                  "top-1 expert at this layer. Share: of the group's paths over all layers; in group: the "
                  "fraction of all groups' uses of the path that come from this group.")
            + _table(["group", "layer", "path", "count", "share %", "in group %"], rows, text_cols=3))
    return _section("paths", heading, body)


def _stickiness_section(counts: xr.Dataset, groups: list[str]) -> str:
    heading = "Stickiness"
    if "temporal" not in counts.data_vars:
        return _section("stickiness", heading, _note("temporal was not counted (count with --stats temporal)."))
    ds = metrics.stickiness(counts)
    s = _group_matrix(ds["stickiness"].transpose(..., "layer"), counts)  # [G, L]
    baseline = float(ds["baseline"])
    layers = counts["layer"].values.tolist()
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    x = np.arange(len(layers))
    for g, name in enumerate(groups):
        ax.plot(x, s[g], marker=".", label=name)
    ax.axhline(baseline, ls="--", color="k", lw=1, label=f"1/E = {baseline:.3g}")
    ax.set_xticks(x, [str(v) for v in layers], fontsize=7)
    ax.set_xlabel("layer", fontsize=8)
    ax.set_ylabel("P(same top-1 at t+1)", fontsize=8)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    mean = float(np.nanmean(s)) if np.any(~np.isnan(s)) else float("nan")
    body = (_note("Probability that the next token of the same sequence keeps the top-1 expert, per group and "
                  f"layer; mean {_fmt(mean)} against the random baseline 1/E = {baseline:.3g}.")
            + _img(fig, "stickiness by layer"))
    return _section("stickiness", heading, body)


def _store_section(info: dict, counts: xr.Dataset, origin: str, groups: list[str]) -> str:
    facts = [
        ["path", info["path"]], ["model", info["model"] or "-"], ["scoring", info["scoring"] or "-"],
        ["tokens (rows)", info["rows"]], ["routing rows", info["routing_rows"]], ["sequences", info["sequences"]],
        ["sequence metadata rows", info["sequence_metadata_rows"]],
        ["layers", f"{info['n_layers']} {info['layer_ids']}"], ["experts", info["n_experts"]],
        ["top-k", info["top_k"]], ["chunk rows", info["chunk_rows"]], ["format version", info["format_version"]],
    ]
    for label, values in info["labels"].items():
        facts.append([f"label {label}", ", ".join(f"{k}={v:,}" for k, v in values.items())])
    arrays = []
    for name, a in info["arrays"].items():
        raw, stored = a["raw_bytes"], a["stored_bytes"]
        arrays.append([name, str(tuple(a["shape"])), a["dtype"], _size(raw), _size(stored),
                       raw / stored if raw and stored else float("nan")])
    tokens = _group_matrix(counts["tokens"], counts).reshape(-1) if "tokens" in counts.data_vars else None
    filters = counts.attrs.get("filters", "{}")
    counts_facts = [["counts", origin], ["statistics", ", ".join(sorted(counts.data_vars))],
                    ["grouped by", ", ".join(metrics.group_dims(counts)) or "nothing (one group: all)"],
                    ["filters", filters if isinstance(filters, str) else json.dumps(filters)]]
    body = (_table(["fact", "value"], facts, text_cols=2)
            + "<h3>Arrays</h3>"
            + _table(["array", "shape", "dtype", "raw", "stored", "ratio"], arrays, text_cols=3)
            + "<h3>Counts</h3>" + _table(["fact", "value"], counts_facts, text_cols=2))
    if tokens is not None:
        body += _table(["group", "tokens counted"], [[g, int(t)] for g, t in zip(groups, tokens)])
    return _section("store", "Trace store", body)


# Effects an experiment table can hold: column -> colour-bar label.
MEASURES = {"drop": "accuracy drop (base - ablated)", "loss_increase": "loss increase (ablated - base, nats)"}


def _pivot(df: pd.DataFrame, method: str, index: list[str], columns: list[str], value: str = "drop") -> pd.DataFrame:
    sub = df[df["method"] == method]
    return sub.pivot_table(index="targeted_group", columns="evaluated_group", values=value,
                           aggfunc="mean").reindex(index=index, columns=columns)


def _matrix_ax(ax, matrix: pd.DataFrame, title: str, limit: float, ylabel: bool):
    values = matrix.to_numpy(dtype=np.float64)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto",
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
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v) > 0.6 * limit else "black")
    return image


def _ordered(names: set[str], groups: list[str]) -> list[str]:
    """``names`` in the counts' group order, names the counts do not have after them, sorted."""
    return [g for g in groups if g in names] + sorted(names - set(groups))


def _experiment_section(df: pd.DataFrame, groups: list[str]) -> str:
    methods = sorted({m for m in df["method"] if not m.startswith("random")})
    randoms = sorted({m for m in df["method"] if m.startswith("random")})
    # each real method with its control ("random:m"); controls of no listed method stand alone
    panels = [(m, f"random:{m}" if f"random:{m}" in randoms else None) for m in methods]
    panels += [(r, None) for r in randoms if r not in {c for _, c in panels}]
    index = _ordered(set(df["targeted_group"]), groups)
    columns = _ordered(set(df["evaluated_group"]), groups)
    if "loss_increase" not in df.columns and {"base_loss", "ablated_loss"} <= set(df.columns):
        df = df.assign(loss_increase=df["ablated_loss"] - df["base_loss"])
    measures = [m for m in MEASURES if m in df.columns and np.any(~np.isnan(df[m].to_numpy(dtype=np.float64)))]
    side = min(7.0, max(3.0, 0.45 * max(len(index), len(columns)) + 1.5))
    figs = []
    for measure in measures:
        values = df[measure].to_numpy(dtype=np.float64)
        limit = float(np.nanmax(np.abs(values))) if np.nanmax(np.abs(values)) > 0 else 1.0
        figs.append(f"<h3>{_e(MEASURES[measure])}</h3>")
        for method, control in panels:
            names = [method] + ([control] if control else [])
            fig = Figure(figsize=(side * len(names) + 1.0, side))
            axes = np.atleast_1d(fig.subplots(1, len(names)))
            image = None
            for ax, name in zip(axes, names):
                label = f"{name} (control)" if name == control else name
                image = _matrix_ax(ax, _pivot(df, name, index, columns, measure), label, limit,
                                   ylabel=ax is axes[0])
            fig.colorbar(image, ax=list(axes), shrink=0.8, label=MEASURES[measure])
            figs.append(f"<h4>{_e(method)}</h4>" + _img(fig, f"{measure} matrix of {method}"
                                                          + (f" beside {control}" if control else "")))

    # The same headline numbers the experiment prints (one definition, in engine.experiment).
    from engine.experiment import summarize

    headline = summarize({c: df[c].to_numpy() for c in ("method", "targeted_group", "evaluated_group", *measures)})
    summary = []
    for measure in measures:
        suffix, prefix = ("drop", "") if measure == "drop" else ("loss_increase", "loss_")
        for method in methods:
            h = headline[method]
            summary.append([method, MEASURES[measure].split(" (")[0], h[f"targeted_{suffix}"],
                            h[f"off_target_{suffix}"], h[f"random_{suffix}"], h[f"{prefix}selectivity"],
                            h[f"{prefix}vs_random"]])

    value_cols = [c for c in ("base_accuracy", "ablated_accuracy", "drop", "base_loss", "ablated_loss",
                              "loss_increase", "coverage", "n_items") if c in df.columns]
    agg = {c: (c, "mean") for c in value_cols}
    if "seed" in df.columns:
        agg["seeds"] = ("seed", "nunique")
    table = (df.groupby(["method", "targeted_group", "evaluated_group"], sort=True)
             .agg(**agg).reset_index())
    body = (_note("Accuracy drop (base - ablated) and, when texts were scored, loss increase (ablated - base) "
                  "of every evaluated group when the routes specialized in the targeted group are ablated, mean "
                  "over seeds, with the same number of random routes ablated as the control. One color scale "
                  "per measure.")
            + "".join(figs)
            + "<h3>Per method</h3>"
            + _note("targeted: mean over targeted groups of the effect on that group; off-target: of the mean "
                    "effect on the other groups; random: the control's effect on the targeted group.")
            + _table(["method", "measure", "targeted", "off-target", "random", "targeted / off-target",
                      "targeted / random"], summary, text_cols=2)
            + "<h3>Results</h3>"
            + _table(["method", "targeted group", "evaluated group", *[c.replace("_", " ") for c in agg]],
                     table.itertuples(index=False), text_cols=3))
    return _section("experiment", "Ablation experiment", body)


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def write_report(source: str | Path, out_html: str | Path, *, results: str | Path | pd.DataFrame | None = None,
                 title: str | None = None) -> Path:
    """Write the HTML report of a trace store or an experiment run directory; returns ``out_html``.

    source: a trace store (``TraceStore.open`` opens it), or a run directory holding
        ``trace.zarr``, optionally ``counts.zarr`` (:func:`engine.aggregate.save_counts`; else the
        store is counted for ``experts, paths, temporal`` by all its labels) and ``results.csv``.
    results: an experiment's results table (CSV path or DataFrame, see :func:`load_results`);
        overrides the run directory's ``results.csv``.
    title: the page title (default: "moetrace report: <source name>").
    Parent directories of ``out_html`` are created. Raises MoetraceError on a source that is
    neither a store nor a run directory, or on a malformed results table.
    """
    source = Path(source)
    out_html = Path(out_html)
    table = load_results(results) if results is not None else None
    store, counts, origin, results_csv = _load(source)
    if table is None and results_csv is not None:
        table = load_results(results_csv)
    info = store.info()
    groups = [_group_label(g) for g in metrics.group_names(counts)]
    title = title if title is not None else f"moetrace report: {source.resolve().name}"

    sections = []
    if table is not None:
        sections.append(("experiment", "Ablation experiment", _experiment_section(table, groups)))
    separation, best = _separation_section(counts, groups)
    sections += [
        ("separation", "Domain separation", separation),
        ("usage", "Expert usage", _usage_section(counts, groups)),
        ("specialists", "Specialists", _specialist_section(counts, best)),
        ("paths", "Top paths", _paths_section(counts, groups, TOP_PATHS)),
        ("stickiness", "Stickiness", _stickiness_section(counts, groups)),
        ("store", "Trace store", _store_section(info, counts, origin, groups)),
    ]
    nav = "".join(f'<a href="#{_e(sid)}">{_e(name)}</a>' for sid, name, _ in sections)
    summary = (f"{info['rows']:,} tokens, {info['sequences']:,} sequences, {info['n_layers']} layers, "
               f"top-{info['top_k']} of {info['n_experts']} experts, groups: {', '.join(groups)}")
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        f"<title>{_e(title)}</title>\n<style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>{_e(title)}</h1>\n<p>{_e(summary)}</p>\n<nav>{nav}</nav>\n"
        + "\n".join(body for _, _, body in sections)
        + "\n</body></html>\n"
    )
    out_html.parent.mkdir(parents=True, exist_ok=True)
    out_html.write_text(page, encoding="utf-8")
    return out_html

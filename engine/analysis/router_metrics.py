"""Router metrics (seed 003's ``router_metrics.py``): expert selection frequency, domain
specialization and expert token overlap per layer, for any number of groups and experts.

Selection frequency and domain specialization come from the functions moetrace already has
(:func:`moetrace.metrics.selection_frequency`, and :func:`moetrace.metrics.domain_specialization` with
``normalize="expert"``: the share of the expert's selections from the group, not the OLMoE paper's
per-group normalization); this module only adds the token overlap and puts the three in one table.

Normalizations:
- ``frequency`` [group, layer, expert] = N_k(E_e, g) / N_g: the fraction of the group's tokens with
  e among their top-k (sums to k over experts; uniform k/E).
- ``specialization`` [group, layer, expert] = N_k(E_e, g) / sum_g' N_k(E_e, g'): the share of
  expert e's selections that come from group g (sums to 1 over groups; uniform 1/G).
- ``overlap`` [layer, expert, other_expert] = |T_i & T_j| / |T_i | T_j| (Jaccard) with T_i the tokens
  that select expert i among their top-k, from the ``coact`` counts; the diagonal is 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics
from moetrace.analysis._common import Analysis
from moetrace.commands import _analysis_args as cli
from moetrace.plotting import Figure, integer_axis
from moetrace.sections import Context, Section, html_table, img, note


def token_overlap(counts: xr.Dataset) -> xr.DataArray:
    """Jaccard overlap of the token sets of every pair of experts per layer, from ``coact``."""
    metrics.check_counts(counts, ["coact"])
    c = counts["coact"].transpose("layer", "expert", "other_expert")
    both = c.values.astype(np.float64)
    n = np.einsum("lii->li", both)
    union = n[:, :, None] + n[:, None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
        values = np.where(union > 0, both / np.where(union > 0, union, 1), np.nan)
    return xr.DataArray(values, dims=c.dims, coords=c.coords, name="overlap")


def router_metrics(counts: xr.Dataset) -> xr.Dataset:
    """``frequency``, ``specialization`` (group, layer, expert; groups flattened to ``a/b`` names)
    and ``overlap`` (layer, expert, other_expert) from counts with ``experts``, ``tokens``, ``coact``."""
    freq = metrics.selection_frequency(counts)
    spec = metrics.domain_specialization(counts, normalize="expert")
    gdims = metrics.group_dims(counts)
    names = ["/".join(g) or "all" for g in metrics.group_names(counts)]

    def flat(da: xr.DataArray) -> np.ndarray:
        return metrics.flatten_groups(da.transpose(..., "layer", "expert"), gdims)

    out = xr.Dataset(
        {"frequency": (("group", "layer", "expert"), flat(freq["frequency"])),
         "specialization": (("group", "layer", "expert"), flat(spec["specialization"]))},
        coords={"group": names, "layer": counts["layer"].values, "expert": counts["expert"].values},
        attrs={"frequency_baseline": float(freq["baseline"]), "specialization_baseline": float(spec["baseline"]),
               "analysis": "router_metrics"})
    if "coact" in counts.data_vars:
        overlap = token_overlap(counts)
        out["overlap"] = (("layer", "expert", "other_expert"), overlap.values)
        out = out.assign_coords(other_expert=counts["other_expert"].values)
    return out


def table(ds: xr.Dataset) -> pd.DataFrame:
    """Tidy rows (group, layer, expert, frequency, specialization)."""
    return ds[["frequency", "specialization"]].to_dataframe().reset_index()


# ---------------------------------------------------------------------- figure, command, report section

#: The names of the files the command writes: the table and dataset, and one figure per layer.
OUTPUT = "router_metrics"
LAYER_FIGURE = "router_metrics_layer{layer}"


def figure(ds: xr.Dataset, layer: int) -> Figure:
    """At ``layer``: selection frequency (group x expert), domain specialization, and token overlap."""
    names = ["frequency", "specialization"] + (["overlap"] if "overlap" in ds.data_vars else [])
    fig = Figure(figsize=(4.6 * len(names) + 0.6, 3.6))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name in zip(axes, names):
        m = ds[name].sel(layer=layer)
        image = ax.imshow(m.values, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}: {name}", fontsize=9)
        ax.set_xlabel("expert", fontsize=7)
        integer_axis(ax.xaxis)
        if name == "overlap":
            integer_axis(ax.yaxis)
        if name != "overlap":
            ax.set_yticks(np.arange(ds.sizes["group"]), ds["group"].values, fontsize=6)
        ax.tick_params(labelsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p)
    p.add_argument("--by", default=None, help="comma-separated labels for groups (default: all labels)")


def _run(args) -> int:
    _, counts = cli.count_store(args, ["experts", "coact"])
    ds = cli.select_layers(router_metrics(counts), args.layers)
    out = cli.out_dir(args)
    cli.save(out, OUTPUT, None, table(ds), dataset=ds)
    for layer in ds["layer"].values.tolist():
        cli.save(out, LAYER_FIGURE.format(layer=layer), figure(ds, layer))
    for layer in ds["layer"].values.tolist():
        spec = ds["specialization"].sel(layer=layer)
        if np.all(np.isnan(spec.values)):
            continue
        g, e = np.unravel_index(int(np.nanargmax(spec.values)), spec.shape)
        print(f"layer {layer}: most specialized expert {int(ds['expert'].values[e])}, "
              f"{float(spec.values[g, e]):.1%} of its selections from {ds['group'].values[g]} "
              f"(uniform {ds.attrs['specialization_baseline']:.1%})")
    return 0


def _render(ctx: Context) -> str:
    ds = router_metrics(ctx.counts)
    layer = ctx.best_layer() if ctx.best_layer() is not None else int(ds["layer"].values[0])
    rows = []
    for l in ds["layer"].values.tolist():
        spec = ds["specialization"].sel(layer=l).values
        ov = ds["overlap"].sel(layer=l).values.copy() if "overlap" in ds else None
        if ov is not None:
            np.fill_diagonal(ov, np.nan)
        rows.append([l, float(np.nanmax(spec)) if np.any(~np.isnan(spec)) else float("nan"),
                     float(np.nanmean(ov)) if ov is not None and np.any(~np.isnan(ov)) else float("nan")])
    return (note("Expert selection frequency (fraction of a group's tokens with the expert in their top-k; "
                 f"uniform {ds.attrs['frequency_baseline']:.3g}), domain specialization (share of the expert's "
                 f"selections from the group; uniform {ds.attrs['specialization_baseline']:.3g}) and token overlap "
                 f"(Jaccard of two experts' token sets). Figure: layer {layer}.")
            + img(figure(ds, layer), f"router metrics at layer {layer}")
            + html_table(["layer", "max specialization", "mean overlap"], rows))


ANALYSIS = Analysis(
    command="router-metrics", help="selection frequency, domain specialization and token overlap of experts",
    example="router-metrics run/trace.zarr --by domain --out run/analysis",
    arguments=_arguments, run=_run, order=10,
    outputs=(f"{OUTPUT}.csv", f"{OUTPUT}.zarr", LAYER_FIGURE.format(layer="*") + ".png"),
    figures={"router_metrics": figure},
    section=Section("router-metrics", "Router metrics", "Router metrics", ("experts", "tokens", "coact"), _render))

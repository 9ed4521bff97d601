"""Languages vs domains: at which depth routing separates groups by language and at which by domain.

Per layer, the generalized Jensen-Shannon divergence between the groups' expert distributions,
weighted by the groups' shares of the selections, equals the mutual information I(E; G) between
the selected expert E and the group G (in bits). With a domain label D and a language label L
(G = (D, L)) the chain rule splits it exactly, both ways:

    I(E; D, L) = I(E; L) + I(E; D | L) = I(E; D) + I(E; L | D)

``by_lang`` = I(E; L) is the divergence between languages (domains pooled), ``by_domain`` = I(E; D)
between domains; ``domain_given_lang`` / ``lang_given_domain`` are the parts left once the other
label is known. Each is also given normalized by log2(E) (its upper bound is min(log2 E, log2 G)).
Expert selections of all top-k ranks are the distribution (``experts`` counts summed over ranks).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics
from moetrace.analysis._common import Analysis
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.plotting import Figure, layer_axis, legend_right
from moetrace.sections import Context, Section, html_table, img, note


def _mi(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) between the first axis and the last axis of joint counts [L, A, E]."""
    total = joint.sum(axis=(1, 2), keepdims=True)
    p = joint / np.where(total > 0, total, 1)
    pa = p.sum(axis=2, keepdims=True)
    pe = p.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / (pa * pe)), 0.0)
    return terms.sum(axis=(1, 2))


def jensen_shannon(counts: xr.Dataset) -> xr.Dataset:
    """Per layer, the weighted JS divergence between all groups' expert distributions (= I(E; G), bits),
    and with labels ``domain`` and ``lang`` both grouped, its split by language and by domain.

    Returns a Dataset over ``layer``: ``jsd`` (and ``by_domain``, ``by_lang``, ``domain_given_lang``,
    ``lang_given_domain`` when both labels are group dims), plus ``*_norm`` = value / log2(E).
    """
    metrics.check_counts(counts, ["experts"])
    gdims = metrics.group_dims(counts)
    if not gdims:
        raise MoetraceError("counts: the divergence between groups needs counts grouped by at least one label")
    sel = counts["experts"].sum("rank").transpose(*gdims, "layer", "expert")
    E = counts.sizes["expert"]
    flat = metrics.flatten_groups(sel, gdims).astype(np.float64)  # [G, L, E]
    data = {"jsd": _mi(flat.transpose(1, 0, 2))}
    if "domain" in gdims and "lang" in gdims:
        other = [d for d in gdims if d not in ("domain", "lang")]
        s = sel.sum(other) if other else sel
        dl = s.transpose("domain", "lang", "layer", "expert").values.astype(np.float64)  # [D, Lg, L, E]
        by_domain = _mi(dl.sum(1).transpose(1, 0, 2))
        by_lang = _mi(dl.sum(0).transpose(1, 0, 2))
        both = _mi(dl.reshape(-1, *dl.shape[2:]).transpose(1, 0, 2))
        data.update(by_domain=by_domain, by_lang=by_lang, domain_given_lang=both - by_lang,
                    lang_given_domain=both - by_domain)
    ds = xr.Dataset({k: ("layer", v) for k, v in data.items()}, coords={"layer": counts["layer"].values},
                    attrs={"n_experts": E, "groups": ", ".join(gdims), "analysis": "lang_domain"})
    for name in list(ds.data_vars):
        ds[f"{name}_norm"] = ds[name] / np.log2(E)
    return ds


def table(ds: xr.Dataset) -> pd.DataFrame:
    return ds.to_dataframe().reset_index()


# ---------------------------------------------------------------------- figure, command, report section

#: The name of the files the command writes (``lang_domain.{csv,zarr,png,pdf}``).
OUTPUT = "lang_domain"


def figure(ds: xr.Dataset) -> Figure:
    """By layer: the divergence between groups (I(E; G), bits) and its language / domain split."""
    fig = Figure(figsize=(7, 3.2))
    ax = fig.subplots()
    layers = ds["layer"].values.tolist()
    for name in ("jsd", "by_domain", "by_lang", "domain_given_lang", "lang_given_domain"):
        if name in ds.data_vars:
            ax.plot(np.arange(len(layers)), ds[name].values, marker=".", label=name,
                    ls="--" if "given" in name else "-")
    layer_axis(ax, layers)
    ax.set_ylabel("bits", fontsize=8)
    legend_right(ax)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p)
    p.add_argument("--by", default=None, help="comma-separated labels (default: all labels; the split needs "
                                              "domain and lang)")


def _run(args) -> int:
    _, counts = cli.count_store(args, ["experts"])
    ds = cli.select_layers(jensen_shannon(counts), args.layers)
    cli.save(cli.out_dir(args), OUTPUT, figure(ds), table(ds), dataset=ds)
    for layer in ds["layer"].values.tolist():
        split = (f" = language {float(ds['by_lang'].sel(layer=layer)):.4f} + domain given language "
                 f"{float(ds['domain_given_lang'].sel(layer=layer)):.4f}" if "by_lang" in ds else "")
        print(f"layer {layer}: I(expert; group) {float(ds['jsd'].sel(layer=layer)):.4f} bits{split}")
    return 0


def _render(ctx: Context) -> str:
    ds = jensen_shannon(ctx.counts)
    cols = [c for c in ("jsd", "by_domain", "by_lang", "domain_given_lang", "lang_given_domain") if c in ds]
    rows = [[int(l), *[float(ds[c].sel(layer=l)) for c in cols]] for l in ds["layer"].values]
    split = "by_lang" in ds
    return (note("Weighted Jensen-Shannon divergence between the groups' expert distributions per layer, which "
                 "equals the mutual information I(expert; group) in bits"
                 + ("; split exactly into the part explained by language I(E; lang) and by domain I(E; domain), "
                     "with what each leaves given the other." if split else
                     " (the language / domain split needs counts grouped by both domain and lang)."))
            + img(figure(ds), "divergence between groups by layer")
            + html_table(["layer", *cols], rows))


ANALYSIS = Analysis(
    command="lang-domain", help="per-layer divergence between groups, split into language and domain",
    example="lang-domain run/trace.zarr --out run/analysis",
    arguments=_arguments, run=_run, order=20,
    outputs=tuple(f"{OUTPUT}.{ext}" for ext in ("csv", "zarr", "png", "pdf")),
    figures={"lang_domain": figure},
    section=Section("lang-domain", "Languages vs domains", "Languages vs domains", ("experts", "groups"), _render))

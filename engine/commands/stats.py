"""``moetrace stats COUNTS.zarr [--json] [--layer L] [--rank R]``: seed 002's tables from a counts file.

Prints: the groups and their tokens; chi-square test and mean variance of normalized usage per
layer (most group-specific layers first by chi-square); Shannon entropy per group and layer
against log2(E); lag-1 top-1 stickiness per group and layer against 1/E (when ``temporal`` was
counted); specialist and generalist experts at one layer (``--layer``, default the layer with
the largest chi-square), each specialist with its preferred group.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import numpy as np
import pandas as pd
import xarray as xr

from moetrace import metrics
from moetrace.commands._help import add_command
from moetrace.errors import MoetraceError
from moetrace.figures import group_labels


#: Place in ``moetrace --help``'s command list (the workflow's order).
ORDER = 50


def _json_value(value):
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    return str(value)


def _per_group_layer(da: xr.DataArray, counts: xr.Dataset) -> pd.DataFrame:
    """A (group..., layer) DataArray as a group x layer table."""
    gdims = metrics.group_dims(counts)
    flat = metrics.flatten_groups(da.transpose(*gdims, "layer"), gdims)
    index = group_labels(counts)
    return pd.DataFrame(flat, index=index, columns=counts["layer"].values.tolist())


def collect(counts: xr.Dataset, layer: int | None = None, rank: int | None = None) -> dict:
    """All tables of ``moetrace stats`` as plain Python (JSON-ready) structures."""
    metrics.check_counts(counts)
    if "experts" not in counts.data_vars and "temporal" not in counts.data_vars:
        raise MoetraceError("counts: neither 'experts' nor 'temporal' was counted; count with --stats experts,temporal")
    out: dict = {
        "labels": metrics.group_dims(counts),
        "layers": counts["layer"].values.tolist(),
        "n_experts": counts.sizes["expert"],
        "top_k": int(counts.attrs.get("top_k", counts.sizes.get("rank", 0))),
    }
    if "tokens" in counts.data_vars:
        tokens = metrics.flatten_groups(counts["tokens"], metrics.group_dims(counts)).reshape(-1)
        out["tokens"] = {g: int(t) for g, t in zip(group_labels(counts), tokens)}
    if "experts" in counts.data_vars:
        ranking = metrics.layer_ranking(counts, rank=rank)
        out["layer_ranking"] = [
            {"layer": int(lid), **{v: _json_value(ranking[v].sel(layer=lid).item())
                                   for v in ("chi2", "dof", "p_value", "avg_variance", "significant")}}
            for lid in ranking["layer"].values
        ]
        out["alpha"] = float(ranking.attrs["alpha"])
        ent = metrics.entropy(counts, rank=rank)
        table = _per_group_layer(ent["entropy"], counts)
        out["entropy"] = {
            "max_bits": float(ent["max_entropy"]),
            "bits": {g: [_json_value(x) for x in row] for g, row in zip(table.index, table.to_numpy())},
        }
        chi2 = ranking["chi2"].values
        if layer is None:
            if np.all(np.isnan(chi2)):
                raise MoetraceError("counts: no layer has expert counts")
            layer = int(ranking["layer"].values[np.nanargmax(chi2)])
        var = metrics.expert_variation(counts, layer, rank=rank)
        gdims = metrics.group_dims(counts)
        preferred = ["/".join(str(var[f"preferred_{d}"].values[i]) for d in gdims) or "all"
                     for i in range(var.sizes["expert"])]
        experts = var["expert"].values
        out["experts_at_layer"] = {
            "layer": int(layer),
            "q25": _json_value(var.attrs["q25"]),
            "q75": _json_value(var.attrs["q75"]),
            "specialists": [
                {"expert": int(experts[i]), "cv": _json_value(var["cv"].values[i]), "preferred_group": preferred[i],
                 "usage_pct": _json_value(var["usage_pct"].values[i])}
                for i in np.flatnonzero(var["specialist"].values)
            ],
            "generalists": [int(e) for e in experts[var["generalist"].values]],
        }
    if "temporal" in counts.data_vars:
        sticky = metrics.stickiness(counts)
        table = _per_group_layer(sticky["stickiness"], counts)
        out["stickiness"] = {
            "baseline": float(sticky["baseline"]),
            "lag1_same": {g: [_json_value(x) for x in row] for g, row in zip(table.index, table.to_numpy())},
        }
    return out


def _fmt_apart(threshold: float | None, above: list) -> Callable[[float | None], str]:
    """A formatter with enough significant digits (4 at least) that every value of ``above`` (all
    strictly greater than ``threshold``) prints differently from the threshold, so a table that
    says ``cv > q75`` never shows a selected cv equal to q75."""
    def at(digits: int):
        return lambda x: "-" if x is None else f"{x:.{digits}g}"

    if threshold is None:
        return at(4)
    for digits in range(4, 18):
        shown = at(digits)(threshold)
        if all(at(digits)(v) != shown for v in above if v is not None):
            return at(digits)
    return at(17)


def _print_table(title: str, frame: pd.DataFrame) -> None:
    print(title)
    print(frame.to_string(float_format=lambda x: f"{x:.4g}", na_rep="-"))
    print()


def print_stats(args: argparse.Namespace) -> int:
    from moetrace.counting import load_counts

    counts = load_counts(args.counts)
    tables = collect(counts, layer=args.layer, rank=args.rank)
    if args.json:
        print(json.dumps(tables, indent=1))
        return 0
    layers = tables["layers"]
    print(f"counts      {args.counts}")
    print(f"layers      {len(layers)} {layers}")
    print(f"experts     {tables['n_experts']}, top-{tables['top_k']}"
          + ("" if args.rank is None else f" (rank {args.rank} only)"))
    if "tokens" in tables:
        print("groups      " + ", ".join(f"{g}={t:,}" for g, t in tables["tokens"].items()))
    print()
    if "layer_ranking" in tables:
        ranking = pd.DataFrame(tables["layer_ranking"]).set_index("layer").astype({"p_value": float})
        _print_table("Group x expert chi-square test of independence, by layer "
                     f"(significant: p < alpha = {tables['alpha']:g}, seed 002's level)", ranking)
        top = ranking.sort_values("chi2", ascending=False).head(5).index.tolist()
        print(f"Most group-specific layers (chi-square): {top}\n")
        ent = tables["entropy"]
        frame = pd.DataFrame(ent["bits"], index=layers).T.astype(float)
        _print_table(f"Shannon entropy of expert usage (bits; max log2(E) = {ent['max_bits']:.3f})", frame)
    if "stickiness" in tables:
        sticky = tables["stickiness"]
        frame = pd.DataFrame(sticky["lag1_same"], index=layers).T.astype(float)
        _print_table(f"Lag-1 top-1 stickiness (random baseline 1/E = {sticky['baseline']:.4f})", frame)
    if "experts_at_layer" in tables:
        ex = tables["experts_at_layer"]
        cvs = [s["cv"] for s in ex["specialists"]]
        q75 = _fmt_apart(ex["q75"], cvs)
        print(f"Experts at layer {ex['layer']} by coefficient of variation across groups "
              f"(specialists: cv > q75 = {q75(ex['q75'])}; generalists: cv < q25 = {ex['q25']:.4g})")
        if ex["specialists"]:
            table = pd.DataFrame(ex["specialists"]).set_index("expert")
            table["cv"] = [q75(v) for v in table["cv"]]
            print(table.to_string(float_format=lambda x: f"{x:.4g}"))
        else:
            print("no specialists")
        print(f"generalists: {ex['generalists']}")
    return 0


def add_parser(subparsers) -> None:
    p = add_command(subparsers, "stats", help="chi-square, entropy, stickiness and specialist tables of a counts file",
                    examples=["stats counts.zarr", "stats counts.zarr --layer 3 --rank 0 --json"])
    p.add_argument("counts", help="counts written by `moetrace count` (.zarr)")
    p.add_argument("--json", action="store_true", help="print the tables as JSON")
    p.add_argument("--layer", type=int, default=None,
                   help="layer id for the specialist/generalist table (default: the largest chi-square)")
    p.add_argument("--rank", type=int, default=None,
                   help="use only this top-k rank (default: all ranks summed, as seed 002)")
    p.set_defaults(func=run)


def run(args) -> int:
    return print_stats(args)

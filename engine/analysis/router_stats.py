"""Router statistics (seed 003's ``router_stats.py``): distributions per layer and rank of the raw
router logits, the router probabilities (softmax; sigmoid families: the sigmoid scores) and the
top-k weights the experts are actually weighted with (renormalized / scaled as the family does),
and, beside them, the renormalized top-k probabilities (the K largest probabilities divided by their
sum: seed 003's ``topk_probs / topk_probs.sum()``), which equal the weights only for families that
renormalize (``norm_topk_prob``; OLMoE does not, so its weights are the raw probabilities).

Collected with :func:`moetrace.intervene.observe_routing` while the model runs over token batches.
"Rank" sorts each token's values descending (rank 0 = the largest logit / probability; for the
weights, the router's top-k order). Streaming: per (layer, rank) running count, sum, sum of squares,
min, max, and fixed-bin histograms per layer (probabilities and weights on [0, 1] — weights of
families with a routed scaling factor s > 1 on [0, s] —, logits on [-LOGIT_RANGE, LOGIT_RANGE];
values outside land in the end bins, ``clipped`` counts them). Sigmoid-scored families with a
selection bias (DeepSeek-V3's ``e_score_correction_bias`` and the like, read per forward through the
family adapter's ``selection_bias``) also get ``selection``: the bias-corrected scores
sigmoid(logit) + bias that choose the experts, sorted per token (histogram on [-1, 2]).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr

from moetrace.analysis._common import Analysis, layer_positions, model_inputs, write_outputs
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.models.loading import load_model
from moetrace.plotting import Figure, integer_axis, palette
from moetrace.sections import ANALYSIS_DIR, Context, Section, html_table, img, note, open_dataset


LOGIT_RANGE = 20.0
QUANTITIES = ("logit", "prob", "weight", "renorm", "selection")


def router_stats(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], layers: Sequence[int] | None = None,
                 bins: int = 100) -> xr.Dataset:
    """Distributions of router logits, probabilities and top-k weights per layer and rank.

    batches: dicts with ``input_ids``, ``attention_mask``, ``real`` (see ``token_batches``).
    Returns a Dataset: for q in logit/prob/weight/renorm (and selection, see the module docstring),
    ``{q}_mean``, ``{q}_std``, ``{q}_min``, ``{q}_max`` (layer, rank; rank over E for logit/prob,
    over K for weight and renorm, NaN beyond K), ``{q}_hist`` int64
    (layer, bin) with ``{q}_lo``/``{q}_hi`` bin edges, ``clipped`` (layer, quantity); attrs scoring, tokens.
    """
    from moetrace.intervene import observe_routing, router_sites

    sites = router_sites(model)
    pos = layer_positions([s.layer_id for s in sites], layers)
    ids = [sites[p].layer_id for p in pos]
    E, K = sites[0].spec.n_experts, sites[0].spec.top_k
    scale = max(1.0, max(float(s.spec.routed_scaling) for s in sites))
    ranges = {"logit": (-LOGIT_RANGE, LOGIT_RANGE), "prob": (0.0, 1.0), "weight": (0.0, scale), "renorm": (0.0, 1.0),
              "selection": (-1.0, 2.0)}
    L = len(ids)
    width = {"logit": E, "prob": E, "weight": K, "renorm": K, "selection": E}
    acc = {q: {"n": np.zeros((L, width[q])), "s": np.zeros((L, width[q])), "ss": np.zeros((L, width[q])),
               "min": np.full((L, width[q]), np.inf), "max": np.full((L, width[q]), -np.inf),
               "hist": np.zeros((L, bins), dtype=np.int64), "clip": np.zeros(L, dtype=np.int64)} for q in QUANTITIES}
    index = {layer: i for i, layer in enumerate(ids)}
    scoring = {"value": None}
    real_rows: dict[str, torch.Tensor] = {}
    from moetrace.models import adapter_for

    adapter = adapter_for(model)
    biases: dict[int, torch.Tensor] = {}
    hooks = []
    for p in pos:
        def keep_bias(module, args, kwargs, layer=sites[p].layer_id):
            bias = adapter.selection_bias(module, args, kwargs)
            if bias is not None:
                biases[layer] = bias.detach().float()
        hooks.append(sites[p].module.register_forward_pre_hook(keep_bias, with_kwargs=True))

    def observe(event) -> None:
        i = index.get(event.layer_id)
        if i is None:
            return
        scoring["value"] = event.scoring
        real = real_rows["mask"].to(event.logits.device)
        logits = event.logits.float()[real]
        probs = torch.sort(event.probs()[real].float(), dim=-1, descending=True).values
        top = probs[:, :K]
        values = {"logit": torch.sort(logits, dim=-1, descending=True).values, "prob": probs,
                  "weight": event.weights.float()[real], "renorm": top / top.sum(-1, keepdim=True).clamp_min(1e-30)}
        if event.scoring == "sigmoid" and event.layer_id in biases:
            scores = event.probs()[real] + biases[event.layer_id].to(logits.device)
            values["selection"] = torch.sort(scores, dim=-1, descending=True).values
        for q, v in values.items():
            v = v.double().cpu().numpy()
            a = acc[q]
            a["n"][i] += v.shape[0]
            a["s"][i] += v.sum(0)
            a["ss"][i] += (v * v).sum(0)
            if v.shape[0]:
                a["min"][i] = np.minimum(a["min"][i], v.min(0))
                a["max"][i] = np.maximum(a["max"][i], v.max(0))
            lo, hi = ranges[q]
            b = np.floor((v.ravel() - lo) / (hi - lo) * bins).astype(np.int64)
            a["clip"][i] += int(((b < 0) | (b >= bins)).sum())
            a["hist"][i] += np.bincount(np.clip(b, 0, bins - 1), minlength=bins)

    n = 0
    try:
        with torch.no_grad(), observe_routing(model, observe):
            for batch in batches:
                real_rows["mask"] = torch.as_tensor(np.asarray(batch["real"], dtype=bool))
                model(**model_inputs(model, batch))
                n += int(np.asarray(batch["real"]).sum())
    finally:
        for h in hooks:
            h.remove()
    if n == 0:
        raise MoetraceError("router_stats: no tokens in the batches")
    data: dict[str, Any] = {}
    coords: dict[str, Any] = {"layer": ids, "rank": np.arange(E), "bin": np.arange(bins), "quantity": list(QUANTITIES)}
    present = [q for q in QUANTITIES if q != "selection" or acc[q]["n"].sum() > 0]
    for q in present:
        a = acc[q]
        pad = E - width[q]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = a["s"] / a["n"]
            std = np.sqrt(np.maximum(a["ss"] / a["n"] - mean ** 2, 0.0))
        for name, v in (("mean", mean), ("std", std), ("min", a["min"]), ("max", a["max"])):
            data[f"{q}_{name}"] = (("layer", "rank"), np.pad(v, ((0, 0), (0, pad)), constant_values=np.nan))
        data[f"{q}_hist"] = (("layer", "bin"), a["hist"])
        edges = np.linspace(*ranges[q], bins + 1)
        coords[f"{q}_lo"] = ("bin", edges[:-1])
        coords[f"{q}_hi"] = ("bin", edges[1:])
    coords["quantity"] = present
    data["clipped"] = (("layer", "quantity"), np.stack([acc[q]["clip"] for q in present], axis=1))
    return xr.Dataset(data, coords=coords, attrs={"scoring": scoring["value"] or "", "tokens": n, "top_k": K,
                                                  "n_experts": E, "analysis": "router_stats"})


def table(ds: xr.Dataset) -> pd.DataFrame:
    """Tidy rows (layer, rank, quantity, mean, std, min, max); weight rows only for rank < K."""
    frames = []
    for q in [q for q in QUANTITIES if f"{q}_mean" in ds]:
        df = ds[[f"{q}_{s}" for s in ("mean", "std", "min", "max")]].to_dataframe().reset_index()
        df.columns = ["layer", "rank", "mean", "std", "min", "max"]
        df.insert(2, "quantity", q)
        frames.append(df.dropna(subset=["mean"]))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------- figure, command, report section

#: The name of the files the command writes (``router_stats.{csv,zarr,png,pdf}``).
OUTPUT = "router_stats"


def figure(ds: xr.Dataset, max_ranks: int = 16) -> Figure:
    """Per layer, mean +- std of the sorted logits and probabilities by rank, and the top-k weights."""
    fig = Figure(figsize=(11, 3.4))
    axes = fig.subplots(1, 3)
    E = ds.sizes["rank"]
    colors = palette(ds.sizes["layer"])
    for ax, q, title in zip(axes, ("logit", "prob", "weight"), ("router logit", "router probability", "top-k weight")):
        for layer, color in zip(ds["layer"].values, colors):
            mean = ds[f"{q}_mean"].sel(layer=layer).values[:max_ranks]
            std = ds[f"{q}_std"].sel(layer=layer).values[:max_ranks]
            keep = ~np.isnan(mean)
            ranks = np.arange(min(E, max_ranks))[keep]
            ax.errorbar(ranks, mean[keep], yerr=std[keep], marker=".", capsize=2, lw=1, label=f"layer {layer}",
                        color=color)
        integer_axis(ax.xaxis)
        ax.set_title(f"{title} by rank", fontsize=9)
        ax.set_xlabel("rank (0 = largest)", fontsize=8)
        ax.tick_params(labelsize=7)
    if "renorm_mean" in ds:  # seed 003's renormalized top-k probabilities beside the family's weights
        for layer, color in zip(ds["layer"].values, colors):
            mean = ds["renorm_mean"].sel(layer=layer).values[:max_ranks]
            keep = ~np.isnan(mean)
            axes[2].plot(np.arange(min(E, max_ranks))[keep], mean[keep], ls="--", marker="x", lw=1, color=color,
                         label=f"layer {layer}, renormalized top-k prob.")
        axes[2].set_title("top-k weight (dashed: renormalized top-k probabilities)", fontsize=9)
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p, store=False)
    p.add_argument("--bins", type=int, default=100, help="histogram bins per quantity (default 100)")


def _run(args) -> int:
    model, tokenizer = load_model(args.model)
    ds = router_stats(model, cli.batches(args, model, tokenizer)(), layers=args.layers, bins=args.bins)
    cli.save(cli.out_dir(args), OUTPUT, figure(ds), table(ds), dataset=ds)
    for layer in ds["layer"].values.tolist():
        print(f"layer {layer}: top-1 router probability {float(ds['prob_mean'].sel(layer=layer, rank=0)):.3f}, "
              f"top-1 weight {float(ds['weight_mean'].sel(layer=layer, rank=0)):.3f}, renormalized top-1 "
              f"probability {float(ds['renorm_mean'].sel(layer=layer, rank=0)):.3f} (means over "
              f"{ds.attrs['tokens']:,} tokens)")
    return 0


def _suite(run) -> list[Path]:
    ds = router_stats(run.model, run.batches(), layers=run.layers)
    return write_outputs(run.out, OUTPUT, figure(ds), table(ds), dataset=ds)


def _render(ctx: Context) -> str:
    ds = open_dataset(ctx.analysis_dir / f"{OUTPUT}.zarr")
    renorm = "renorm_mean" in ds  # absent from results written before it was measured
    rows = [[int(l), float(ds["logit_mean"].sel(layer=l, rank=0)), float(ds["prob_mean"].sel(layer=l, rank=0)),
             float(ds["weight_mean"].sel(layer=l, rank=0)),
             float(ds["renorm_mean"].sel(layer=l, rank=0)) if renorm else float("nan")] for l in ds["layer"].values]
    return (note(f"Router logits, probabilities ({ds.attrs.get('scoring', '')}) and top-k weights sorted per token, "
                 f"mean +- std by rank over {ds.attrs.get('tokens', '?')} tokens (moetrace router-stats). Top-1 "
                 "weight: what the family weights its top expert with; renormalized: the top-k probabilities divided "
                 "by their sum (seed 003's measure), which differs from the weight where the family does not "
                 "renormalize (OLMoE).")
            + img(figure(ds), "router statistics by rank")
            + html_table(["layer", "top logit", "top probability", "top-1 weight", "top-1 renormalized"], rows))


ANALYSIS = Analysis(
    command="router-stats", help="distributions of router logits, probabilities and top-k weights by rank",
    example="router-stats --model demo --layers 0 3 --num-tokens 5000 --out run/analysis",
    arguments=_arguments, run=_run, order=40,
    outputs=tuple(f"{OUTPUT}.{ext}" for ext in ("csv", "zarr", "png", "pdf")),
    figures={"router_stats": figure},
    section=Section("router-stats", "Router statistics", "Router statistics", (f"{ANALYSIS_DIR}/{OUTPUT}.zarr",),
                    _render),
    suite=_suite)

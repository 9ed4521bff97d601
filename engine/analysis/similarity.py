"""Expert similarity (seed 003's ``sim.py``): cosine and linear CKA of expert outputs, and of weights.

For a sample of tokens, every expert of a layer (all E, not only the routed ones) is applied to the
layer's captured input rows through the model's own fused experts module
(:func:`moetrace.analysis._common.expert_outputs`). Streaming, per layer:

- mean cosine: sum over tokens of cos(out_i(t), out_j(t)), an [E, E] accumulator;
- linear CKA (Kornblith et al. 2019) in its feature form
  ``||Xc_i^T Xc_j||_F^2 / (||Xc_i^T Xc_i||_F ||Xc_j^T Xc_j||_F)`` from the running sums
  ``S = sum_t z_t z_t^T`` (z = the E outputs concatenated, length E*H) and ``sum_t z_t``:
  memory (E*H)^2 float64, constant in the number of tokens (limit it with ``experts=``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

from moetrace.analysis._common import (Analysis, LayerInputs, check_expert_ids, expert_outputs, experts_modules,
                                       model_inputs, write_outputs)
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.models.loading import load_model
from moetrace.plotting import Figure
from moetrace.sections import ANALYSIS_DIR, Context, Section, html_table, img, note, open_dataset


#: Largest CKA accumulator (bytes) expert_similarity builds; beyond it pass fewer ``experts``.
MAX_CKA_BYTES = 4 << 30


def _as_array(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise MoetraceError(f"{name}: expected a 2-D array [n_samples, n_features], got shape {a.shape}")
    return a


def linear_cka(X, Y) -> float:
    """Linear CKA of two representations of the same samples: [n, p] and [n, q] (p may differ from q).

    Columns are centered inside; computed in float64 in the feature form
    ``||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)``. NaN when either is constant.
    """
    x, y = _as_array(X, "X"), _as_array(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise MoetraceError(f"linear_cka: X and Y must have the same samples, got {x.shape[0]} and {y.shape[0]} rows")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    num = np.linalg.norm(x.T @ y) ** 2
    den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    return float(num / den) if den > 0 else float("nan")


def _cka_from_moments(S: np.ndarray, mu_sum: np.ndarray, n: int, E: int, H: int) -> np.ndarray:
    """[E, E] linear CKA from S = sum z z^T [(E*H)^2] and sum z [E*H] over n samples."""
    C = S - np.outer(mu_sum, mu_sum) / n  # centered cross-products
    C = C.reshape(E, H, E, H)
    cross = np.einsum("iajb,iajb->ij", C, C)  # ||Ci_j||_F^2
    self_norm = np.sqrt(np.diag(cross))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.outer(self_norm, self_norm)


def expert_similarity(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], layers: Sequence[int] | None = None,
                      experts: Sequence[int] | None = None) -> xr.Dataset:
    """Mean cosine similarity and linear CKA between the outputs of experts on the same tokens.

    batches: dicts with ``input_ids``, ``attention_mask`` and ``real`` (bool [B*S], the real token
    rows; see :func:`moetrace.analysis._common.token_batches`). layers: layer ids (default all MoE
    layers); experts: expert ids to compare (default all).
    Returns a Dataset (layer, expert, other_expert): ``cosine`` and ``cka`` float64, attr ``tokens``.
    """
    mods = experts_modules(model, layers)
    E_all = next(iter(mods.values()))[1]
    which = list(range(E_all)) if experts is None else check_expert_ids(experts, E_all)
    E = len(which)
    acc: dict[int, dict[str, Any]] = {layer: {} for layer in mods}
    n = 0
    with torch.no_grad(), LayerInputs(mods) as rec:
        for batch in batches:
            rec.inputs.clear()
            model(**model_inputs(model, batch))
            real = torch.as_tensor(batch["real"])
            for layer, (module, n_experts, _) in mods.items():
                hidden = rec.inputs[layer][0]
                hidden = hidden.reshape(-1, hidden.shape[-1])[real.to(hidden.device)]
                out = expert_outputs(module, hidden, n_experts, which).double()  # [E, T, H]
                H = out.shape[-1]
                a = acc[layer]
                if not a:
                    if (E * H) ** 2 * 8 > MAX_CKA_BYTES:
                        raise MoetraceError(f"experts: {E} experts x {H} features need a {(E * H) ** 2 * 8 >> 20} "
                                            f"MiB CKA accumulator (limit {MAX_CKA_BYTES >> 20} MiB); pass fewer experts")
                    a.update(cos=np.zeros((E, E)), S=np.zeros((E * H, E * H)), mu=np.zeros(E * H), H=H)
                unit = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                a["cos"] += torch.einsum("ith,jth->ij", unit, unit).cpu().numpy()
                z = out.permute(1, 0, 2).reshape(out.shape[1], E * H)  # [T, E*H]
                a["S"] += (z.T @ z).cpu().numpy()
                a["mu"] += z.sum(0).cpu().numpy()
            n += int(np.asarray(batch["real"]).sum())
    if n == 0:
        raise MoetraceError("expert_similarity: no tokens in the batches")
    layer_ids = sorted(mods)
    cos = np.stack([acc[l]["cos"] / n for l in layer_ids])
    cka = np.stack([_cka_from_moments(acc[l]["S"], acc[l]["mu"], n, E, acc[l]["H"]) for l in layer_ids])
    return xr.Dataset({"cosine": (("layer", "expert", "other_expert"), cos),
                       "cka": (("layer", "expert", "other_expert"), cka)},
                      coords={"layer": layer_ids, "expert": which, "other_expert": which},
                      attrs={"tokens": n, "analysis": "similarity"})


def weight_similarity(model: torch.nn.Module, layers: Sequence[int] | None = None) -> xr.Dataset:
    """Cosine similarity of the experts' flattened weights (every fused 3-D parameter [E, ...] of the
    experts module, concatenated per expert): Dataset (layer, expert, other_expert) ``weight_cosine``."""
    mods = experts_modules(model, layers)
    out = []
    for layer, (module, E, _) in sorted(mods.items()):
        flat = [p.detach().double().reshape(E, -1) for _, p in module.named_parameters() if p.shape[0] == E]
        if not flat:
            raise MoetraceError(f"layer {layer}: experts module {type(module).__name__} has no [E, ...] parameters")
        w = torch.cat(flat, dim=1)
        w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
        out.append((w @ w.T).numpy())
    ids = sorted(mods)
    E = out[0].shape[0]
    return xr.Dataset({"weight_cosine": (("layer", "expert", "other_expert"), np.stack(out))},
                      coords={"layer": ids, "expert": np.arange(E), "other_expert": np.arange(E)})


def cluster_order(sim: np.ndarray) -> np.ndarray:
    """Expert order by average-linkage hierarchical clustering on the distance 1 - similarity."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    sim = np.nan_to_num(np.asarray(sim, dtype=np.float64))
    if sim.shape[0] < 3:
        return np.arange(sim.shape[0])
    dist = np.clip(1.0 - (sim + sim.T) / 2, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    return leaves_list(linkage(squareform(dist, checks=False), method="average"))


# ---------------------------------------------------------------------- figure, command, report section

#: The names of the files the command writes: the table and dataset, and one figure per layer.
OUTPUT = "similarity"
LAYER_FIGURE = "similarity_layer{layer}"


def figure(ds: xr.Dataset, layer: int, variables: Sequence[str] = ("cosine", "cka", "weight_cosine")) -> Figure:
    """Expert x expert similarity heatmaps at ``layer`` (those of ``variables`` present in ``ds``), experts
    ordered by average-linkage clustering of the first one."""
    names = [v for v in variables if v in ds.data_vars]
    mats = [ds[v].sel(layer=layer).values for v in names]
    order = cluster_order(mats[0])
    experts = ds["expert"].values[order]
    fig = Figure(figsize=(4.2 * len(names) + 0.8, 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(names)))
    for ax, name, m in zip(axes, names, mats):
        image = ax.imshow(m[np.ix_(order, order)], cmap="viridis", interpolation="nearest")
        ax.set_title(f"layer {layer}: {name}", fontsize=9)
        step = max(1, math.ceil(len(experts) / 16))
        ticks = np.arange(0, len(experts), step)
        ax.set_xticks(ticks, [str(e) for e in experts[::step]], fontsize=6)
        ax.set_yticks(ticks, [str(e) for e in experts[::step]], fontsize=6)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p, store=False)
    p.add_argument("--experts", type=int, nargs="+", default=None, metavar="E",
                   help="expert ids to compare (default: all)")


def _write(out: Path, ds: xr.Dataset, save) -> list[Path]:
    written = save(out, OUTPUT, None, ds.to_dataframe().reset_index(), dataset=ds)
    for layer in ds["layer"].values.tolist():
        written += save(out, LAYER_FIGURE.format(layer=layer), figure(ds, layer))
    return written


def _run(args) -> int:
    model, tokenizer = load_model(args.model)
    ds = expert_similarity(model, cli.batches(args, model, tokenizer)(), layers=args.layers, experts=args.experts)
    w = weight_similarity(model, args.layers)
    if args.experts is not None:
        w = w.sel(expert=args.experts, other_expert=args.experts)
    _write(cli.out_dir(args), ds.merge(w), cli.save)
    return 0


def _suite(run) -> list[Path]:
    ds = expert_similarity(run.model, run.batches(), layers=run.layers).merge(weight_similarity(run.model, run.layers))
    return _write(run.out, ds, write_outputs)


def _render(ctx: Context) -> str:
    ds = open_dataset(ctx.analysis_dir / f"{OUTPUT}.zarr")
    imgs = "".join(img(figure(ds, int(l)), f"expert similarity at layer {l}") for l in ds["layer"].values)
    rows = []
    for l in ds["layer"].values.tolist():
        row = [l]
        for v in ("cosine", "cka", "weight_cosine"):
            if v in ds:
                m = ds[v].sel(layer=l).values.copy()
                np.fill_diagonal(m, np.nan)
                row.append(float(np.nanmean(m)))
            else:
                row.append(float("nan"))
        rows.append(row)
    return (note(f"Every expert applied to the same {ds.attrs.get('tokens', '?')} tokens' layer inputs: mean "
                 "cosine similarity of their outputs, linear CKA, and cosine similarity of their weights; experts "
                 "ordered by average-linkage clustering (moetrace similarity).")
            + imgs + html_table(["layer", "mean cosine", "mean CKA", "mean weight cosine"], rows))


ANALYSIS = Analysis(
    command="similarity", help="cosine and linear CKA between all experts' outputs, and of their weights",
    example="similarity --model demo --layers 1 --num-tokens 2000 --out run/analysis",
    arguments=_arguments, run=_run, order=50,
    outputs=(f"{OUTPUT}.csv", f"{OUTPUT}.zarr", LAYER_FIGURE.format(layer="*") + ".png"),
    figures={"similarity": figure},
    section=Section("similarity", "Expert similarity", "Similarity", (f"{ANALYSIS_DIR}/{OUTPUT}.zarr",), _render),
    suite=_suite)

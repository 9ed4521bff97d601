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


#: Memory (bytes) expert_similarity may use for CKA over all its layers: the feature-form accumulator
#: (E*H)^2 per layer, or, when that is larger, the expert outputs and Gram matrices E*n*(H + n).
MAX_CKA_BYTES = 4 << 30
#: What expert_similarity can measure: ``cosine`` (no accumulator beyond [E, E]) and ``cka``.
MEASURES = ("cosine", "cka")
#: Experts per block of weight_similarity's float64 dot products.
WEIGHT_BLOCK = 8


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
    """[E, E] linear CKA from S = sum z z^T [(E*H)^2] and sum z [E*H] over n samples (the feature form)."""
    C = S - np.outer(mu_sum, mu_sum) / n  # centered cross-products
    C = C.reshape(E, H, E, H)
    cross = np.einsum("iajb,iajb->ij", C, C)  # ||Ci_j||_F^2
    return _normalize(cross)


def _cka_from_samples(X: Iterable[np.ndarray]) -> np.ndarray:
    """[E, E] linear CKA of E representations [n, p_e] of the same n samples (given one at a time), in
    the Gram form ``<Kc_i, Kc_j>_F`` with ``Kc = Xc Xc^T`` (columns centered): memory E n^2 float64 and
    one representation, for when n is smaller than the features."""
    grams = []
    for x in X:
        xc = np.asarray(x, dtype=np.float64)
        xc = xc - xc.mean(axis=0)
        grams.append(xc @ xc.T)
    E = len(grams)
    cross = np.empty((E, E))
    for i in range(E):
        for j in range(i, E):
            cross[i, j] = cross[j, i] = np.vdot(grams[i], grams[j])
    return _normalize(cross)


def _normalize(cross: np.ndarray) -> np.ndarray:
    self_norm = np.sqrt(np.diag(cross))
    with np.errstate(invalid="ignore", divide="ignore"):
        return cross / np.outer(self_norm, self_norm)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / (1 << 30):.1f} GiB"


def expert_similarity(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], layers: Sequence[int] | None = None,
                      experts: Sequence[int] | None = None, measures: Sequence[str] = MEASURES,
                      max_bytes: int = MAX_CKA_BYTES) -> xr.Dataset:
    """Mean cosine similarity and linear CKA between the outputs of experts on the same tokens.

    batches: dicts with ``input_ids``, ``attention_mask`` and ``real`` (bool [B*S], the real token
    rows; see :func:`moetrace.analysis._common.token_batches`). layers: layer ids (default all MoE
    layers); experts: expert ids to compare (default all); measures: of :data:`MEASURES`.
    CKA is exact linear CKA over all the tokens, in whichever form needs less memory: the
    feature form, one (E*H)^2 accumulator per layer, or the Gram form over the n tokens,
    E*n*(H + n); ``max_bytes`` bounds the sum over the layers (pass one layer at a time, as
    ``moetrace similarity`` does, for the most room; an error names what fits). Cosine needs no
    accumulator beyond [E, E].
    Returns a Dataset (layer, expert, other_expert): ``cosine`` and/or ``cka`` float64, attrs
    ``tokens`` and ``cka_form`` ("features" or "samples").
    """
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise MoetraceError(f"measures: expected some of {', '.join(MEASURES)}, got {list(measures)}")
    mods = experts_modules(model, layers)
    E_all = next(iter(mods.values()))[1]
    which = list(range(E_all)) if experts is None else check_expert_ids(experts, E_all)
    E = len(which)
    want_cka = "cka" in measures
    acc: dict[int, dict[str, Any]] = {layer: {} for layer in mods}
    n = 0
    with torch.no_grad(), LayerInputs(mods) as rec:
        for batch in batches:
            rec.inputs.clear()
            model(**model_inputs(model, batch))
            real = torch.as_tensor(batch["real"])
            t = int(real.sum())
            for layer, (module, n_experts, _) in mods.items():
                hidden = rec.inputs[layer][0]
                hidden = hidden.reshape(-1, hidden.shape[-1])[real.to(hidden.device)]
                out = expert_outputs(module, hidden, n_experts, which).double()  # [E, T, H]
                H = out.shape[-1]
                a = acc[layer]
                if not a:
                    a.update(cos=np.zeros((E, E)), H=H)
                    if want_cka:
                        a["form"] = "features" if (E * H) ** 2 * 8 * len(mods) <= max_bytes else "samples"
                        if a["form"] == "features":
                            a.update(S=np.zeros((E * H, E * H)), mu=np.zeros(E * H))
                        else:
                            a["X"] = []
                unit = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                a["cos"] += torch.einsum("ith,jth->ij", unit, unit).cpu().numpy()
                if want_cka and a["form"] == "features":
                    z = out.permute(1, 0, 2).reshape(out.shape[1], E * H)  # [T, E*H]
                    a["S"] += (z.T @ z).cpu().numpy()
                    a["mu"] += z.sum(0).cpu().numpy()
                elif want_cka:
                    need = E * (n + t) * (H + n + t) * 8 * len(mods)
                    if need > max_bytes:
                        n_max = _max_tokens(E, H, len(mods), max_bytes)
                        raise MoetraceError(
                            f"CKA of {E} experts x {H} features: the feature form needs {_gib((E * H) ** 2 * 8)} per "
                            f"layer and the sample form over {n + t:,} tokens {_gib(need / len(mods))}, over the "
                            f"limit of {_gib(max_bytes)} for {len(mods)} layer(s); use at most {n_max:,} tokens "
                            "(--num-tokens), fewer --experts, one layer at a time, or --method cosine")
                    a["X"].append(out.float().cpu().numpy())
            n += t
    if n == 0:
        raise MoetraceError("expert_similarity: no tokens in the batches")
    layer_ids = sorted(mods)
    data = {}
    if "cosine" in measures:
        data["cosine"] = (("layer", "expert", "other_expert"), np.stack([acc[l]["cos"] / n for l in layer_ids]))
    forms = sorted({acc[l]["form"] for l in layer_ids}) if want_cka else []
    if want_cka:
        def cka(a):
            if a["form"] == "features":
                return _cka_from_moments(a["S"], a["mu"], n, E, a["H"])
            parts = a.pop("X")  # per batch [E, t, H] float32
            return _cka_from_samples(np.concatenate([p[e] for p in parts]) for e in range(E))
        data["cka"] = (("layer", "expert", "other_expert"), np.stack([cka(acc[l]) for l in layer_ids]))
    return xr.Dataset(data, coords={"layer": layer_ids, "expert": which, "other_expert": which},
                      attrs={"tokens": n, "analysis": "similarity", **({"cka_form": ",".join(forms)} if forms else {})})


def _max_tokens(E: int, H: int, layers: int, max_bytes: int) -> int:
    """Largest n with E * n * (H + n) * 8 * layers <= max_bytes."""
    c = max_bytes / (8 * E * layers)
    return max(0, int((-H + np.sqrt(H * H + 4 * c)) / 2))


def weight_similarity(model: torch.nn.Module, layers: Sequence[int] | None = None) -> xr.Dataset:
    """Similarity of the experts' weights, per layer: Dataset (layer, expert, other_expert) with

    - ``weight_cosine``: cosine of the flattened weights (every fused 3-D parameter [E, ...] of the
      experts module, concatenated per expert);
    - ``weight_cka``: linear CKA of the weights as representations of the residual stream: each
      3-D parameter with a hidden-size axis H, oriented [H, features] and concatenated per expert
      (gate/up and down projections), compared over the H residual dimensions (Gram form, E*H^2 memory).
    """
    mods = experts_modules(model, layers)
    H = _hidden_size(model)
    cosines, ckas = [], []
    for layer, (module, E, _) in sorted(mods.items()):
        params = [p.detach() for _, p in module.named_parameters() if p.ndim >= 2 and p.shape[0] == E]
        if not params:
            raise MoetraceError(f"layer {layer}: experts module {type(module).__name__} has no [E, ...] parameters")
        dots = torch.zeros(E, E, dtype=torch.float64)
        for p in params:  # float64 in blocks of experts: no float64 copy of a whole parameter
            flat = p.reshape(E, -1)
            for i in range(0, E, WEIGHT_BLOCK):
                a = flat[i:i + WEIGHT_BLOCK].double()
                for j in range(0, E, WEIGHT_BLOCK):
                    dots[i:i + WEIGHT_BLOCK, j:j + WEIGHT_BLOCK] += a @ flat[j:j + WEIGHT_BLOCK].double().T
        norms = dots.diagonal().sqrt().clamp_min(1e-30)
        cosines.append((dots / norms[:, None] / norms[None, :]).numpy())
        oriented = [p if p.shape[1] == H else p.transpose(1, 2) for p in params if p.ndim == 3 and H in p.shape[1:]]
        if not oriented:
            raise MoetraceError(f"layer {layer}: no expert weight of {type(module).__name__} has the hidden size {H} "
                                "as an axis; weight CKA needs one")
        ckas.append(_cka_from_samples(torch.cat([p[e] for p in oriented], dim=1).double().numpy()  # [H, features]
                                      for e in range(E)))
    ids = sorted(mods)
    E = cosines[0].shape[0]
    dims = ("layer", "expert", "other_expert")
    return xr.Dataset({"weight_cosine": (dims, np.stack(cosines)), "weight_cka": (dims, np.stack(ckas))},
                      coords={"layer": ids, "expert": np.arange(E), "other_expert": np.arange(E)})


def _hidden_size(model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    H = getattr(config, "hidden_size", None)
    if not isinstance(H, int):
        raise MoetraceError(f"{type(model).__name__}: its config has no hidden_size")
    return H


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


#: The variables a similarity result may hold, in the order figures and tables show them.
VARIABLES = ("cosine", "cka", "weight_cosine", "weight_cka")


def figure(ds: xr.Dataset, layer: int, variables: Sequence[str] = VARIABLES) -> Figure:
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
    p.add_argument("--method", choices=("cosine", "cka", "both"), default="both",
                   help="similarity of the experts' outputs: cosine (no memory beyond E x E), cka (exact linear CKA; "
                        "memory min((E*H)^2, E*n*(H+n)) per layer, within 4 GiB) or both (default); the weights' "
                        "cosine and CKA are always computed")


def _write(out: Path, ds: xr.Dataset, save) -> list[Path]:
    written = save(out, OUTPUT, None, ds.to_dataframe().reset_index(), dataset=ds)
    for layer in ds["layer"].values.tolist():
        written += save(out, LAYER_FIGURE.format(layer=layer), figure(ds, layer))
    return written


def by_layer(model, make_batches, layers: Sequence[int] | None = None, experts: Sequence[int] | None = None,
             measures: Sequence[str] = MEASURES) -> xr.Dataset:
    """:func:`expert_similarity` one layer at a time (``make_batches()`` gives the tokens afresh for each),
    so the CKA memory limit applies to one layer; merged with :func:`weight_similarity`."""
    ids = sorted(experts_modules(model, layers))
    ds = xr.concat([expert_similarity(model, make_batches(), layers=[layer], experts=experts, measures=measures)
                    for layer in ids], dim="layer", combine_attrs="drop_conflicts")
    w = weight_similarity(model, ids)
    if experts is not None:
        w = w.sel(expert=list(experts), other_expert=list(experts))
    return ds.merge(w)


def _run(args) -> int:
    model, tokenizer = load_model(args.model)
    measures = MEASURES if args.method == "both" else (args.method,)
    ds = by_layer(model, cli.batches(args, model, tokenizer), args.layers, args.experts, measures)
    _write(cli.out_dir(args), ds, cli.save)
    for layer in ds["layer"].values.tolist():
        means = {v: _off_diagonal_mean(ds[v].sel(layer=layer).values) for v in VARIABLES if v in ds}
        print(f"layer {layer}: mean over expert pairs: " + ", ".join(f"{v} {x:.3f}" for v, x in means.items()))
    return 0


def _suite(run) -> list[Path]:
    return _write(run.out, by_layer(run.model, run.batches, run.layers), write_outputs)


def _off_diagonal_mean(m: np.ndarray) -> float:
    """Mean of a square matrix without its diagonal (NaN for a 1 x 1 one)."""
    m = np.array(m, dtype=np.float64)
    np.fill_diagonal(m, np.nan)
    return float(np.nanmean(m)) if np.any(~np.isnan(m)) else float("nan")


def _render(ctx: Context) -> str:
    ds = open_dataset(ctx.analysis_dir / f"{OUTPUT}.zarr")
    imgs = "".join(img(figure(ds, int(l)), f"expert similarity at layer {l}") for l in ds["layer"].values)
    rows = [[l, *(_off_diagonal_mean(ds[v].sel(layer=l).values) if v in ds else float("nan") for v in VARIABLES)]
            for l in ds["layer"].values.tolist()]
    return (note(f"Every expert applied to the same {ds.attrs.get('tokens', '?')} tokens' layer inputs: mean "
                 "cosine similarity of their outputs and their linear CKA; of their weights, the cosine and the "
                 "linear CKA over the residual dimensions. Means over expert pairs (the diagonal left out); "
                 "experts ordered by average-linkage clustering (moetrace similarity).")
            + imgs + html_table(["layer", "mean cosine", "mean CKA", "mean weight cosine", "mean weight CKA"], rows))


ANALYSIS = Analysis(
    command="similarity", help="cosine and linear CKA between all experts' outputs, and of their weights",
    example="similarity --model demo --layers 1 --num-tokens 2000 --out run/analysis",
    arguments=_arguments, run=_run, order=50,
    outputs=(f"{OUTPUT}.csv", f"{OUTPUT}.zarr", LAYER_FIGURE.format(layer="*") + ".png"),
    figures={"similarity": figure},
    section=Section("similarity", "Expert similarity", "Similarity", (f"{ANALYSIS_DIR}/{OUTPUT}.zarr",), _render),
    suite=_suite)

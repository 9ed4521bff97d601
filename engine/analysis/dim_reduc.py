"""Dimensionality reduction (seed 003's ``dim_reduc.py``): a 2-D map of expert outputs.

For each real token of the sample and each of its top-k experts at a layer, the expert's output
(unweighted, from the family's experts module); the points are embedded in 2-D by UMAP
(``pip install moetrace[umap]``) or, when umap-learn is absent or ``method="pca"``, by PCA
(eigenvectors of the outputs' scatter matrix). Memory: tokens x K x H float32 for the sample plus
its table (this is the one analysis that keeps its points: the embedding needs them all at once).
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from moetrace.analysis._common import (Analysis, BLOCK_ROWS, LayerInputs, experts_modules, model_inputs, routed_outputs,
                                       write_outputs)
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.models.loading import load_model
from moetrace.plotting import Figure, palette
from moetrace.sections import ANALYSIS_DIR, Context, Section, escape, img, note


def umap_available() -> bool:
    return importlib.util.find_spec("umap") is not None


def pca_2d(X: np.ndarray, block_rows: int = BLOCK_ROWS) -> np.ndarray:
    """First two principal-component scores of the rows of X [n, H] (centered), float64 [n, 2].

    From the eigenvectors of the H x H scatter matrix, accumulated and projected ``block_rows`` rows
    at a time: beyond X itself, memory is O(H^2 + block_rows x H) and the [n, 2] result (an SVD of
    the centered X would hold float64 copies of X and its [n, H] left factor). Signs are arbitrary.
    """
    X = np.asarray(X)
    n, H = X.shape
    mean = X.mean(axis=0, dtype=np.float64)
    scatter = np.zeros((H, H))
    for a in range(0, n, block_rows):
        xc = X[a:a + block_rows].astype(np.float64) - mean
        scatter += xc.T @ xc
    top = np.linalg.eigh(scatter)[1][:, ::-1][:, :2]  # eigenvalues ascending: the last two
    out = np.zeros((n, 2))
    for a in range(0, n, block_rows):
        out[a:a + block_rows, :top.shape[1]] = (X[a:a + block_rows].astype(np.float64) - mean) @ top
    return out


def expert_points(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], layer: int) -> tuple[np.ndarray, pd.DataFrame]:
    """(outputs [P, H] float32, table of the P points: token_row, rank, expert, group, token_id)."""
    mods = experts_modules(model, [layer])
    module = mods[layer][0]
    outs, frames = [], []
    offset = 0
    with torch.no_grad(), LayerInputs(mods) as rec:
        for batch in batches:
            model(**model_inputs(model, batch))
            hidden, index = rec.inputs[layer]
            real = torch.as_tensor(np.asarray(batch["real"], dtype=bool))
            hidden = hidden.reshape(-1, hidden.shape[-1])[real.to(hidden.device)]
            index = index.reshape(-1, index.shape[-1])[real.to(index.device)]  # same rows as hidden
            T, K = index.shape
            rows = torch.arange(T).repeat_interleave(K)
            experts = index.reshape(-1).long().cpu()
            # only the routed experts' outputs, row-major (token, rank) like ``rows``
            outs.append(routed_outputs(module, hidden, index).reshape(T * K, -1).float().cpu().numpy())
            frames.append(pd.DataFrame({"token_row": rows.numpy() + offset, "rank": np.tile(np.arange(K), T),
                                        "expert": experts.numpy(), "group": np.repeat(batch["groups"], K),
                                        "token_id": np.repeat(batch["token_ids"], K)}))
            offset += T
    if not outs:
        raise MoetraceError("dim_reduc: no tokens in the batches")
    return np.concatenate(outs), pd.concat(frames, ignore_index=True)


def reduce_2d(model: torch.nn.Module, batches: Iterable[Mapping[str, Any]], layer: int, method: str = "auto",
              seed: int = 0, umap_installed: bool | None = None) -> pd.DataFrame:
    """2-D embedding of the routed experts' outputs at ``layer``: the table of :func:`expert_points`
    plus columns x, y; ``attrs["method"]`` is "umap" or "pca". method: "auto" (UMAP when installed,
    else PCA), "umap" (an error when umap-learn is not installed) or "pca". umap_installed: whether
    to treat umap-learn as installed (default: :func:`umap_available`; False forces the fallback)."""
    if method not in ("auto", "umap", "pca"):
        raise MoetraceError(f"--method: expected auto, umap or pca, got {method!r}")
    have_umap = umap_available() if umap_installed is None else bool(umap_installed)
    if method == "umap" and not have_umap:
        raise MoetraceError("--method umap: umap-learn is not installed (pip install moetrace[umap])")
    X, points = expert_points(model, batches, layer)
    use = "umap" if method == "umap" or (method == "auto" and have_umap) else "pca"
    if use == "umap":
        import warnings

        with warnings.catch_warnings():  # umap's notices about its own settings (n_jobs under a fixed seed, ...)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"umap\.")
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"sklearn\.")
            import umap

            xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(X)
    else:
        xy = pca_2d(X)
    points["x"], points["y"] = xy[:, 0], xy[:, 1]
    points.attrs["method"] = use
    points.attrs["layer"] = int(layer)
    return points


# ---------------------------------------------------------------------- figure, command, report section

#: The names of the files the command writes, one set per layer (``dim_reduc_layer1.{csv,json,png,pdf}``).
OUTPUT = "dim_reduc_layer{layer}"


def figure(points: pd.DataFrame, color_by: Sequence[str] = ("expert", "group")) -> Figure:
    """2-D map of expert outputs (:func:`moetrace.analysis.reduce_2d`), one panel per colouring."""
    fig = Figure(figsize=(5.0 * len(color_by), 4.4))
    axes = np.atleast_1d(fig.subplots(1, len(color_by)))
    method = points.attrs.get("method", "")
    for ax, col in zip(axes, color_by):
        values = points[col].astype(str)
        names = sorted(set(values), key=lambda v: (len(v), v))[:40]
        for name, color in zip(names, palette(len(names))):
            sel = (values == name).to_numpy()
            ax.scatter(points["x"].to_numpy()[sel], points["y"].to_numpy()[sel], s=3, alpha=0.6, label=name,
                       color=color)
        ax.set_title(f"{method.upper()} of expert outputs, coloured by {col}", fontsize=9)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5, markerscale=3, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _arguments(p) -> None:
    cli.add_common(p, store=False)
    p.add_argument("--method", default="auto", choices=["auto", "umap", "pca"],
                   help="auto: UMAP when umap-learn is installed, else PCA (default auto)")


def _run(args) -> int:
    model, tokenizer = load_model(args.model)
    make = cli.batches(args, model, tokenizer)
    layers = args.layers if args.layers is not None else sorted(experts_modules(model))
    out = cli.out_dir(args)
    for layer in layers:
        points = reduce_2d(model, make(), layer, method=args.method)
        cli.save(out, OUTPUT.format(layer=layer), figure(points), points, data=dict(points.attrs))
        print(f"layer {layer}: {len(points):,} routed expert outputs mapped to 2-D by {points.attrs['method'].upper()}")
    return 0


def _suite(run) -> list[Path]:
    points = reduce_2d(run.model, run.batches(), run.first_layer, method=run.method)
    return write_outputs(run.out, OUTPUT.format(layer=run.first_layer), figure(points), points,
                         data=dict(points.attrs))


def _render(ctx: Context) -> str:
    files = sorted(ctx.analysis_dir.glob(OUTPUT.format(layer="*") + ".csv"))
    body = note("2-D map of the routed experts' outputs (moetrace dim-reduc), coloured by expert and by group.")
    for path in files:
        points = pd.read_csv(path, keep_default_na=False)
        meta = path.with_suffix(".json")
        if meta.is_file():
            points.attrs.update(json.loads(meta.read_text()))
        title = (f"Layer {points.attrs['layer']} ({str(points.attrs.get('method', '')).upper()}, "
                 f"{len(points):,} routed outputs)" if "layer" in points.attrs else path.stem)
        body += f"<h3>{escape(title)}</h3>" + img(figure(points), title)
    return body


ANALYSIS = Analysis(
    command="dim-reduc", help="2-D map (UMAP, or PCA) of the routed experts' outputs, by expert and group",
    example="dim-reduc --model demo --layers 1 --num-tokens 2000 --method pca --out run/analysis",
    arguments=_arguments, run=_run, order=60,
    outputs=tuple(OUTPUT.format(layer="*") + f".{ext}" for ext in ("csv", "json", "png", "pdf")),
    figures={"embedding": figure},
    section=Section("embedding", "Expert outputs in 2-D", "2-D map",
                    (f"{ANALYSIS_DIR}/{OUTPUT.format(layer='*')}.csv",), _render),
    suite=_suite)

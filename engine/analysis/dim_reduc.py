"""Dimensionality reduction (seed 003's ``dim_reduc.py``): a 2-D map of expert outputs.

For each real token of the sample and each of its top-k experts at a layer, the expert's output
(unweighted, from the family's experts module); the points are embedded in 2-D by UMAP
(``pip install moetrace[umap]``) or, when umap-learn is absent or ``method="pca"``, by PCA
(eigenvectors of the outputs' scatter matrix). Memory: tokens x K x H float32 for the sample plus
its table (this is the one analysis that keeps its points: the embedding needs them all at once).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd
import torch

from moetrace.analysis._common import BLOCK_ROWS, LayerInputs, experts_modules, model_inputs, routed_outputs
from moetrace.errors import MoetraceError


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
        import umap

        xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(X)
    else:
        xy = pca_2d(X)
    points["x"], points["y"] = xy[:, 0], xy[:, 1]
    points.attrs["method"] = use
    points.attrs["layer"] = int(layer)
    return points

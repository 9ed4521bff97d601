"""Agreement between two traces of the same tokens: two checkpoints, two implementations, or a
model with and without an intervention.

    result = compare("a.zarr", "b.zarr", by=["domain"])
    result.layers          # xarray.Dataset over (group..., layer): agreement measures
    result.worst_tokens    # pandas.DataFrame: the tokens whose top-1 differs in most layers

Tokens are aligned by (``seq``, ``pos``): a sequence's rows are contiguous and in position order in
every store (the store's invariant), so each store is indexed once by sequence (``seq`` read chunk
by chunk: 24 bytes per sequence), the sequences both stores hold are visited in the first store's
row order in blocks of about ``block_rows`` tokens, and within a block the positions are matched by
a sorted intersection. Memory is bounded by the block and the sequence index, not by the trace.
Where both stores know a token's id (>= 0) the ids must agree; the first mismatch is an error naming
its sequence and position.

Measures, per MoE layer and group (groups from the first store's labels), means over aligned tokens:

- ``top1_agreement``: the two traces route the token to the same rank-0 expert (not measured when
  either store's rank order is unknown, :attr:`TraceStore.rank_order`: the result then says so);
- ``topk_overlap``: ``|A ∩ B| / k``, the share of the top-k experts both chose (the OLMoE paper's
  router saturation between checkpoints);
- ``jaccard``: ``|A ∩ B| / |A ∪ B|``;
- ``weight_rank_corr`` (when both stores have weights): Spearman's rho between the two traces'
  routing weights over the union of the experts either chose (an expert a trace did not choose
  has weight 0; ties get average ranks), averaged over the tokens where it is defined (the union
  has at least two experts and neither weight vector is constant).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.store import TraceStore, open_store

__all__ = ["CompareResult", "compare", "read_rows", "sequence_index"]

MEASURES = ("top1_agreement", "topk_overlap", "jaccard", "weight_rank_corr")


@dataclass
class CompareResult:
    """``layers``: Dataset over (group..., layer) with ``tokens`` (group...), the MEASURES and, with
    weights, ``weight_rank_corr_tokens`` (the tokens where the rank correlation is defined);
    ``worst_tokens``: the aligned tokens with the most layers whose top-1 differs (columns ``seq``,
    ``pos``, ``token_id``, ``layers_differing``), most first; when a rank order is unknown, the
    layers whose top-k sets differ (``layers.attrs["differing"]`` says which)."""

    layers: xr.Dataset
    worst_tokens: pd.DataFrame

    @property
    def tokens(self) -> int:
        return int(self.layers["tokens"].sum())


def sequence_index(store: TraceStore) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seq ids [S], first row [S], rows [S]) of every sequence, sorted by seq id.

    Reads ``tokens/seq`` chunk by chunk. Raises MoetraceError when a sequence's rows are not
    contiguous (a sequence id that comes back after another one).
    """
    ids, starts = [], []
    previous = None
    for chunk in store.iter_chunks(["seq"]):
        seq = chunk["seq"]
        change = np.flatnonzero(np.diff(seq)) + 1
        first = [0] if previous is None or seq[0] != previous else []
        run_starts = np.concatenate([np.asarray(first, dtype=np.int64), change])
        ids.append(seq[run_starts])
        starts.append(run_starts + chunk.start)
        previous = seq[-1]
    if not ids:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    ids_all, starts_all = np.concatenate(ids).astype(np.int64), np.concatenate(starts).astype(np.int64)
    lengths = np.diff(np.append(starts_all, len(store)))
    order = np.argsort(ids_all, kind="stable")
    ids_sorted = ids_all[order]
    repeated = np.flatnonzero(ids_sorted[1:] == ids_sorted[:-1])
    if repeated.size:
        seq = int(ids_sorted[repeated[0]])
        rows = sorted(int(s) for s in starts_all[ids_all == seq])[:2]
        raise MoetraceError(f"{store.path}: sequence {seq} is not contiguous (runs start at rows {rows}); "
                            "a trace store keeps each sequence's rows together and in position order")
    return ids_sorted, starts_all[order], lengths[order]


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), vectorized."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(total)


def read_rows(store: TraceStore, columns: list[str], starts: np.ndarray, lengths: np.ndarray) -> dict:
    """Rows of several [start, start + n) ranges, concatenated in the given order.

    Reads one covering span when it is at most four times the rows wanted (the usual case: the
    two stores hold their sequences in a similar order), else each range on its own."""
    wanted = int(lengths.sum())
    lo, hi = int(starts.min()), int((starts + lengths).max())
    if hi - lo <= 4 * wanted + store.chunk_rows:
        span = store.read(columns, lo, hi)
        idx = _ranges(starts - lo, lengths)
        return {c: v[idx] for c, v in span.items()}
    parts = [store.read(columns, int(s), int(s + n)) for s, n in zip(starts, lengths)]
    return {c: np.concatenate([p[c] for p in parts]) for c in columns}


def _spearman_rows(x: np.ndarray, y: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row's valid entries (average ranks for ties); NaN where undefined.

    x, y: float [n, m]; valid: bool [n, m]."""

    def ranks(v: np.ndarray) -> np.ndarray:
        less = ((v[:, None, :] < v[:, :, None]) & valid[:, None, :]).sum(axis=2)
        equal = ((v[:, None, :] == v[:, :, None]) & valid[:, None, :]).sum(axis=2)
        return less + (equal + 1) / 2.0

    rx, ry = ranks(x), ranks(y)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = np.where(valid, rx, 0).sum(axis=1) / count
        my = np.where(valid, ry, 0).sum(axis=1) / count
        dx, dy = np.where(valid, rx - mx[:, None], 0), np.where(valid, ry - my[:, None], 0)
        rho = (dx * dy).sum(axis=1) / np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    rho[(count < 2) | ~np.isfinite(rho)] = np.nan
    return rho


def _layer_measures(ea: np.ndarray, eb: np.ndarray, wa: np.ndarray | None, wb: np.ndarray | None) -> dict:
    """Per token [n] measures of one layer: experts ea, eb int [n, K], weights [n, K] or None."""
    k = ea.shape[1]
    in_b = (ea[:, :, None] == eb[:, None, :])                      # [n, K, K]
    inter = in_b.any(axis=2).sum(axis=1)
    out = {"top1_agreement": (ea[:, 0] == eb[:, 0]).astype(np.float64),
           "topk_overlap": inter / k,
           "jaccard": inter / (2 * k - inter)}
    if wa is not None and wb is not None:
        # the union: A's experts, then B's experts that A did not choose
        b_only = ~in_b.any(axis=1)                                  # [n, K]
        wa_on_b = np.where(in_b, wa[:, :, None], 0).sum(axis=1)     # A's weight of each B expert
        wb_on_a = np.where(in_b, wb[:, None, :], 0).sum(axis=2)     # B's weight of each A expert
        x = np.concatenate([wa, np.where(b_only, wa_on_b, 0)], axis=1).astype(np.float64)
        y = np.concatenate([wb_on_a, wb], axis=1).astype(np.float64)
        valid = np.concatenate([np.ones_like(b_only), b_only], axis=1)
        out["weight_rank_corr"] = _spearman_rows(x, y, valid)
    return out


def compare(a: str | Path | TraceStore, b: str | Path | TraceStore, *, by: Sequence[str] = (),
            block_rows: int = 1 << 16, top_tokens: int = 20) -> CompareResult:
    """Align two traces by (seq, pos) and measure their routing agreement (module docstring).

    a, b: stores with the same layer ids, experts and top-k. by: label names of ``a`` to group by.
    block_rows: tokens per block (memory); top_tokens: rows of ``worst_tokens``.
    Raises MoetraceError for different routing shapes, unknown labels, no common token, or a token
    id that differs between the two traces.
    """
    sa, sb = open_store(a), open_store(b)
    shape_a = (sa.layer_ids.tolist(), sa.n_experts, sa.top_k)
    shape_b = (sb.layer_ids.tolist(), sb.n_experts, sb.top_k)
    if shape_a != shape_b:
        raise MoetraceError(f"compare: {sa.path} routes (layer ids, experts, top_k) = {shape_a}, "
                            f"{sb.path} routes {shape_b}; expected the same")
    by = list(by)
    unknown = [x for x in by if x not in sa.label_names]
    if unknown:
        raise MoetraceError(f"by: {unknown} not among {sa.path}'s labels {sa.label_names}")
    weights = sa.has_weights and sb.has_weights
    unranked = [str(st.path) for st in (sa, sb) if st.rank_order != "ranked"]
    measures = [m for m in MEASURES if (m != "weight_rank_corr" or weights) and (m != "top1_agreement" or not unranked)]
    L = sa.n_layers
    vocab = [sa.labels[x] for x in by]
    shape = tuple(len(v) for v in vocab)
    sums = {m: np.zeros((*shape, L)) for m in measures}
    defined = np.zeros((*shape, L))
    tokens = np.zeros(shape, dtype=np.int64)

    ids_a, start_a, len_a = sequence_index(sa)
    ids_b, start_b, len_b = sequence_index(sb)
    common, ia, ib = np.intersect1d(ids_a, ids_b, assume_unique=True, return_indices=True)
    order = np.argsort(start_a[ia], kind="stable")
    ia, ib, common = ia[order], ib[order], common[order]
    cols_a = ["seq", "pos", "token_id", "experts", *(["weights"] if weights else []), *by]
    cols_b = ["pos", "token_id", "experts", *(["weights"] if weights else [])]
    worst: list[pd.DataFrame] = []

    # blocks of whole sequences, about block_rows tokens each (a longer sequence is a block alone)
    block_of = (np.cumsum(len_a[ia]) - len_a[ia]) // block_rows
    bounds = np.flatnonzero(np.diff(block_of)) + 1
    for first, last in zip(np.r_[0, bounds], np.r_[bounds, len(ia)]):
        if last <= first:
            continue
        pa, pb = ia[first:last], ib[first:last]
        ra = read_rows(sa, cols_a, start_a[pa], len_a[pa])
        rb = read_rows(sb, cols_b, start_b[pb], len_b[pb])
        # key = (sequence's place in this block, pos); both sides ascend, so intersect1d aligns them
        key_a = np.repeat(np.arange(len(pa), dtype=np.int64), len_a[pa]) << 32 | ra["pos"].astype(np.int64)
        key_b = np.repeat(np.arange(len(pb), dtype=np.int64), len_b[pb]) << 32 | rb["pos"].astype(np.int64)
        _, xa, xb = np.intersect1d(key_a, key_b, assume_unique=True, return_indices=True)
        if not xa.size:
            continue
        ta, tb = ra["token_id"][xa], rb["token_id"][xb]
        bad = np.flatnonzero((ta >= 0) & (tb >= 0) & (ta != tb))
        if bad.size:
            i = bad[0]
            raise MoetraceError(
                f"compare: sequence {int(ra['seq'][xa][i])} position {int(ra['pos'][xa][i])}: token id "
                f"{int(ta[i])} in {sa.path} but {int(tb[i])} in {sb.path}; expected the same tokens")
        group = tuple(ra[x][xa].astype(np.int64) for x in by)
        flat_group = np.ravel_multi_index(group, shape) if by else np.zeros(xa.size, dtype=np.int64)
        n_groups = int(np.prod(shape)) if by else 1
        tokens += np.bincount(flat_group, minlength=n_groups).reshape(shape)
        differing = np.zeros(xa.size, dtype=np.int64)
        for layer in range(L):
            ea, eb = ra["experts"][xa, layer].astype(np.int64), rb["experts"][xb, layer].astype(np.int64)
            wa = ra["weights"][xa, layer].astype(np.float64) if weights else None
            wb = rb["weights"][xb, layer].astype(np.float64) if weights else None
            per_token = _layer_measures(ea, eb, wa, wb)
            differing += (per_token["topk_overlap"] < 1) if unranked else (per_token["top1_agreement"] == 0)
            for m, v in per_token.items():
                if m not in measures:
                    continue
                ok = ~np.isnan(v)
                sums[m].reshape(n_groups, L)[:, layer] += np.bincount(flat_group[ok], weights=v[ok],
                                                                      minlength=n_groups)
                if m == "weight_rank_corr":
                    defined.reshape(n_groups, L)[:, layer] += np.bincount(flat_group[ok], minlength=n_groups)
        keep = np.argsort(-differing, kind="stable")[:top_tokens]
        worst.append(pd.DataFrame({"seq": ra["seq"][xa][keep], "pos": ra["pos"][xa][keep],
                                   "token_id": ta[keep], "layers_differing": differing[keep]}))
    if tokens.sum() == 0:
        raise MoetraceError(f"compare: {sa.path} and {sb.path} have no token in common (aligned by seq and pos)")

    dims = (*by, "layer")
    with np.errstate(invalid="ignore", divide="ignore"):
        data = {m: (dims, sums[m] / (defined if m == "weight_rank_corr" else tokens[..., None])) for m in measures}
    coords = {"layer": sa.layer_ids, **{x: v for x, v in zip(by, vocab)}}
    if weights:  # tokens where the rank correlation is defined: its weights when groups are pooled
        data["weight_rank_corr_tokens"] = (dims, defined.astype(np.int64))
    ds = xr.Dataset({"tokens": (tuple(by), tokens), **data}, coords=coords,
                    attrs={"a": str(sa.path), "b": str(sb.path), "sequences": int(len(common)),
                           "a_tokens": len(sa), "b_tokens": len(sb),
                           "differing": "top-k set" if unranked else "top-1",
                           "rank_order_unknown": unranked})
    table = pd.concat(worst, ignore_index=True) if worst else pd.DataFrame(
        columns=["seq", "pos", "token_id", "layers_differing"])
    table = table[table["layers_differing"] > 0]  # a token that agrees everywhere is not a disagreement
    table = table.sort_values(["layers_differing", "seq", "pos"], ascending=[False, True, True],
                              kind="stable").head(top_tokens).reset_index(drop=True)
    return CompareResult(ds, table)


def summary_json(result: CompareResult) -> dict:
    """The JSON ``moetrace compare --json`` prints: ``tokens`` and ``sequences`` aligned,
    ``unmatched_tokens`` (``{"a": n, "b": n}``: each store's tokens with no (seq, pos) in the other),
    ``layers`` (one object per layer with every measure over all groups), ``groups`` (per group and
    layer, when grouped) and ``worst_tokens`` (only tokens that differ in at least one layer)."""
    ds = result.layers
    gdims = [d for d in ds["tokens"].dims]
    weight = ds["tokens"]
    layers = []
    for i, layer in enumerate(ds["layer"].values.tolist()):
        entry = {"layer": int(layer)}
        for m in MEASURES:
            if m not in ds:
                continue
            v = ds[m].isel(layer=i)
            w = weight if m != "weight_rank_corr" else ds["weight_rank_corr_tokens"].isel(layer=i)
            total = float(w.sum())
            entry[m] = float((v.fillna(0) * w).sum() / total) if total else None
        layers.append(entry)
    unmatched = {side: int(ds.attrs[f"{side}_tokens"]) - result.tokens for side in ("a", "b")
                 if f"{side}_tokens" in ds.attrs}
    out = {"a": ds.attrs["a"], "b": ds.attrs["b"], "tokens": result.tokens, "sequences": ds.attrs["sequences"],
           "unmatched_tokens": unmatched,
           "layers": layers, "differing": ds.attrs.get("differing", "top-1"),
           "rank_order_unknown": list(ds.attrs.get("rank_order_unknown", [])),
           "worst_tokens": [{k: int(v) for k, v in row.items()} for row in result.worst_tokens.to_dict("records")]}
    if gdims:
        stacked = ds.stack(group=gdims)
        out["groups"] = [
            {**{d: str(stacked[d].values[g]) for d in gdims}, "tokens": int(stacked["tokens"].values[g]),
             "layers": [{"layer": int(layer), **{m: (None if np.isnan(x := float(stacked[m].values[li, g])) else x)
                                                 for m in MEASURES if m in ds}}
                        for li, layer in enumerate(ds["layer"].values.tolist())]}
            for g in range(stacked.sizes["group"])]
    return out

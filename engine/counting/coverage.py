"""Seed 000's "Analyze proportions to be ablated" table: how much of the routing a target set covers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr

from moetrace.counting.driver import drive, strings
from moetrace.counting.filters import Filters
from moetrace.errors import MoetraceError
from moetrace.store import TraceStore, open_store
from moetrace.kernels import counting

__all__ = ["coverage"]

_COVERAGE_TABLES = {"paths": "path_table", "experts": "expert_table", "pairs": "pair_table"}


def coverage(
    store: str | Path | TraceStore,
    targets: Any,
    by: Sequence[str] | str = (),
    kind: str = "paths",
    where: Mapping[str, Any] | None = None,
    *,
    filters: Filters | None = None,
    progress: bool = True,
    **filter_args: Any,
) -> xr.Dataset:
    """Seed 000's "Analyze proportions to be ablated" table, per group of ``by``.

    ``targets`` provides ``path_table(layer_ids, E) -> bool [L, E, E]`` ([l, prev,
    target]), ``expert_table(layer_ids, E) -> bool [L, E]`` and ``pair_table(layer_ids,
    E) -> bool [L, E, E]`` ([l, rank-0, rank-1]) (``moetrace.targets.Targets``). Per
    token (after the same filters as :func:`moetrace.counting.count`, given as a
    ``Filters`` or its fields by keyword), ``kind`` decides the possible items and
    which are targeted:

    - ``"paths"``: layers 1..L-1 (by index), targeted when (top1[l-1], top1[l]) is
      in the table at l; needs L >= 2;
    - ``"experts"``: every layer including the first (as seed 000's coverage over all
      of ``topk1_df``), targeted when the top-1 expert is in the table;
    - ``"pairs"``: every layer, targeted when (rank 0, rank 1) is in the table.

    Returns an ``xarray.Dataset`` with dims ``by`` (label strings as coordinates; no
    dims without ``by``) and variables: ``n_questions`` (distinct ``seq``),
    ``n_toks``, ``n_toks_with_any`` (>= 1 targeted item), ``n_toks_with_half``
    (targeted >= possible * 0.5), ``n_targeted``, ``n_possible`` (all int64) and
    ``prop_targeted`` = n_targeted / n_possible, ``prop_toks_with_any`` and
    ``prop_toks_with_half`` (over n_toks) (float64, NaN for an empty group). Memory
    grows with the number of sequences (for ``n_questions``), not with tokens.
    """
    st = open_store(store)
    if kind not in _COVERAGE_TABLES:
        raise MoetraceError(f"kind: expected one of {list(_COVERAGE_TABLES)}, got {kind!r}")
    filters = Filters.of(filters, by=by or None, where=where, **filter_args)
    L, K, E = st.n_layers, st.top_k, st.n_experts
    st.require_rank_order(f"coverage of {kind} (top-1 experts, paths, ordered pairs)")
    if kind == "paths" and L < 2:
        raise MoetraceError(f"kind='paths': needs at least 2 layers, {st.path} has {L}")
    if kind == "pairs" and K < 2:
        raise MoetraceError(f"kind='pairs': needs top_k >= 2, {st.path} has top_k={K}")
    table = np.asarray(getattr(targets, _COVERAGE_TABLES[kind])(st.layer_ids, E), dtype=bool)
    want = (L, E) if kind == "experts" else (L, E, E)
    if table.shape != want:
        raise MoetraceError(
            f"targets.{_COVERAGE_TABLES[kind]}: expected a bool table of shape {want}, got {table.shape}")
    sel = filters.compile(st, progress=progress)
    cov = counting.CoverageStat(sel.n_groups, L, K, E, kind=kind, table=table)
    questions = counting.DistinctSeqStat(sel.n_groups, L, K, E)
    tallies, n_questions = drive(st, sel, [cov, questions], 0, len(st), progress)
    if tallies[:, 0].sum() == 0:
        raise MoetraceError(f"{st.path}: empty selection, no row left after the filters {json.dumps(sel.attrs)}")
    dims = tuple(sel.by)
    data = {"n_questions": (dims, n_questions.reshape(sel.shape))}
    for i, name in enumerate(counting.CoverageStat.COLUMNS):
        data[name] = (dims, tallies[:, i].reshape(sel.shape))
    with np.errstate(invalid="ignore", divide="ignore"):
        data["prop_targeted"] = (dims, data["n_targeted"][1] / data["n_possible"][1])
        data["prop_toks_with_any"] = (dims, data["n_toks_with_any"][1] / data["n_toks"][1])
        data["prop_toks_with_half"] = (dims, data["n_toks_with_half"][1] / data["n_toks"][1])
    ds = xr.Dataset(data, coords={label: strings(sel.coords[label]) for label in sel.by})
    ds.attrs.update({"kind": kind, "store": str(st.path), "filters": json.dumps(sel.attrs)})
    if sel.last_shared is not None:
        ds.attrs["shared_prefix_tokens"] = int(sel.last_shared)
    return ds

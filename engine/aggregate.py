"""Stream a trace store into count tensors (xarray) with the Numba counters.

``count(store, stats, by, ...)`` reads the store chunk by chunk (the store reads and
decompresses the next chunk in a background thread while the ``nogil`` Numba kernels
of :mod:`kernels.counting` count the current one), so memory does not grow with the
number of rows. Each statistic is a small object with create / update / combine /
finalize (see ``kernels/counting.py``); this driver only turns filters and labels
into one int64 group code per row (``-1`` = row dropped), feeds chunks and wraps the
finalized tensors into an ``xarray.Dataset``.

Counts of disjoint row ranges add up exactly to the counts of the whole store
(``count_range``), which is what a distributed driver fans out over.

Dataset layout (``moetrace_counts_version`` = 1). Group dims first, one per ``by``
label, named as the label, with the label strings as coordinates; then:

==============  ==============================================  =======
variable        dims                                            dtype
==============  ==============================================  =======
``experts``     (*by, layer, rank, expert)                      int64
``paths``       (*by, layer, prev_expert, expert)               int64
``pairs``       (*by, layer, first, second)                     int64
``temporal``    (*by, layer, expert, next_expert)               int64
``coact``       (layer, expert, other_expert)                   int64
``weight_sum``  (*by, layer, expert)                            float64
``tokens``      (*by)                                           int64
``vocab``       (token_id, layer, expert)                       int64
==============  ==============================================  =======

``layer`` coordinates are the store's ``layer_ids`` (for ``paths``, the layer
transitioned into; index 0 has no incoming paths and is all zeros), ``rank`` is
0..K-1 (0 = top choice), expert dims (``expert``, ``prev_expert``, ``first``,
``second``, ``next_expert``, ``other_expert``) have the expert ids 0..E-1.
``tokens`` is always included.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xarray as xr
from engine.progress import tqdm

from engine.errors import MoetraceError
from engine.store import TraceStore
from kernels import counting

__all__ = [
    "COUNTS_VERSION",
    "STATS",
    "count",
    "count_range",
    "coverage",
    "shared_prefix",
    "save_counts",
    "load_counts",
]

COUNTS_VERSION = 1

#: Count variables: name -> (grouped, dims after the group dims).
STATS: dict[str, tuple[bool, tuple[str, ...]]] = {
    "experts": (True, ("layer", "rank", "expert")),
    "paths": (True, ("layer", "prev_expert", "expert")),
    "pairs": (True, ("layer", "first", "second")),
    "temporal": (True, ("layer", "expert", "next_expert")),
    "coact": (False, ("layer", "expert", "other_expert")),
    "weight_sum": (True, ("layer", "expert")),
    "tokens": (True, ()),
    "vocab": (False, ("token_id", "layer", "expert")),
}
_EXPERT_DIMS = ("expert", "prev_expert", "first", "second", "next_expert", "other_expert")
_TOKEN_FILTER_COLUMNS = ("seq", "pos", "token_id", "generated")


# ---------------------------------------------------------------------------- selection


def _open(store: str | Path | TraceStore) -> TraceStore:
    return store if isinstance(store, TraceStore) else TraceStore.open(store)


def shared_prefix(store: str | Path | TraceStore) -> tuple[int, np.ndarray, np.ndarray]:
    """Seed 000's ``last_shared_tok`` over the whole store, and where it cuts each sequence.

    Exactly the R code: rows sorted by (seq, pos) get a shifted index 1..n within
    their sequence; ``last_shared`` is the largest shifted index at which every
    sequence has a row with one same token (earlier indices need not match), 0 when
    there is none (R's ``max`` of nothing keeps every row). Tokens are compared by
    ``token_id``; when every ``token_id`` is -1 (unknown) and the store has
    ``tokens/text``, by text. Vectorized (a lexsort) over the seq / pos / token
    columns, which this first pass holds in memory (about 50 bytes per token while
    sorting); only the per-sequence cutoffs are kept for the counting pass.

    Returns ``(last_shared, seq_ids, cutoff_pos)``: int; int64 [S] sorted distinct
    sequence ids; int64 [S] the ``pos`` of each sequence's ``last_shared``-th token
    (rows with ``pos <= cutoff_pos`` are dropped; the int64 minimum when
    ``last_shared`` is 0, so nothing is dropped).
    """
    st = _open(store)
    if len(st) == 0:
        raise MoetraceError(f"{st.path}: empty store, no shared prefix to find")
    cols = st.read(["seq", "pos", "token_id"])
    seq, pos, tok = cols["seq"].astype(np.int64), cols["pos"].astype(np.int64), cols["token_id"].astype(np.int64)
    if (tok == -1).all():
        if not st.has_token_text:
            raise MoetraceError(
                f"tokens/token_id: skip_shared_prefix needs token ids or tokens/text, "
                f"got only -1 (unknown) in {st.path}")
        _, tok = np.unique(np.asarray(st.read(["text"])["text"]), return_inverse=True)
        tok = tok.reshape(-1).astype(np.int64)
    order = np.lexsort((pos, seq))
    s, p, t = seq[order], pos[order], tok[order]
    n = len(s)
    new_seq = np.ones(n, dtype=bool)
    new_seq[1:] = s[1:] != s[:-1]
    if n > 1 and np.any(~new_seq[1:] & (p[1:] == p[:-1])):
        i = int(np.flatnonzero(~new_seq[1:] & (p[1:] == p[:-1]))[0]) + 1
        raise MoetraceError(
            f"tokens/pos: skip_shared_prefix expected distinct (seq, pos) rows, got (seq={s[i]}, pos={p[i]}) twice")
    starts = np.flatnonzero(new_seq)
    lengths = np.diff(np.append(starts, n))
    shifted = np.arange(n) - np.repeat(starts, lengths)  # 0-based shifted index
    n_seq = len(starts)
    # Reference token at each shifted index: the first sequence's; a sequence shorter
    # than another leaves the longer one's indices with fewer than n_seq rows.
    ref = np.full(lengths.max(), np.iinfo(np.int64).min, dtype=np.int64)
    ref[: lengths[0]] = t[: lengths[0]]
    rows_at = np.bincount(shifted, minlength=len(ref))
    mismatches = np.bincount(shifted, weights=(t != ref[shifted]), minlength=len(ref))
    shared = (rows_at == n_seq) & (mismatches == 0)
    last_shared = int(np.flatnonzero(shared).max()) + 1 if shared.any() else 0
    seq_ids = s[starts]
    if last_shared:
        cutoff = p[starts + last_shared - 1]
    else:
        cutoff = np.full(n_seq, np.iinfo(np.int64).min, dtype=np.int64)
    return last_shared, seq_ids, cutoff


class _Selection:
    """Filters and ``by`` labels turned into one int64 group code per row (-1 = dropped)."""

    def __init__(self, st: TraceStore, by, where, skip_shared_prefix, generated_only, positions, groups):
        self.store = st
        labels = st.labels
        by = [by] if isinstance(by, str) else list(by or [])
        for label in by:
            if label not in labels:
                raise MoetraceError(f"by: unknown label {label!r}; expected one of {sorted(labels)}")
        if len(set(by)) != len(by):
            raise MoetraceError(f"by: expected distinct labels, got {by}")
        groups = dict(groups or {})
        where = dict(where or {})
        self.by = by
        # label -> lookup code -> coordinate index (or -1 when that value is filtered out)
        self.coords: dict[str, list[str]] = {}
        self.luts: dict[str, np.ndarray] = {}
        for label, values in groups.items():
            if label not in labels:
                raise MoetraceError(f"groups: unknown label {label!r}; expected one of {sorted(labels)}")
            self._lut(label, _values_of("groups", label, values, labels[label]))
        for label in by:
            if label not in self.luts:
                self._lut(label, labels[label])
        self.row_filters: dict[str, np.ndarray] = {}
        for column, values in where.items():
            if column in labels:
                keep = _values_of("where", column, values, labels[column])
                lut = np.isin(np.asarray(labels[column], dtype=object), np.asarray(keep, dtype=object))
                self.luts.setdefault(column, np.zeros(len(labels[column]), dtype=np.int64))
                self.luts[column] = np.where(lut, self.luts[column], -1)
            elif column in _TOKEN_FILTER_COLUMNS:
                vals = np.atleast_1d(np.asarray(values))
                if column == "generated":
                    if vals.dtype != np.bool_:
                        raise MoetraceError(f"where['generated']: expected True/False, got {values!r}")
                elif vals.dtype.kind not in "iu":
                    raise MoetraceError(f"where[{column!r}]: expected integer values, got {values!r}")
                self.row_filters[column] = vals
            else:
                raise MoetraceError(
                    f"where: unknown column {column!r}; expected a label {sorted(labels)} "
                    f"or one of {list(_TOKEN_FILTER_COLUMNS)}")
        self.generated_only = bool(generated_only)
        self.positions = None
        if positions is not None:
            try:
                a, b = (int(v) for v in positions)
            except (TypeError, ValueError):
                raise MoetraceError(f"positions: expected (start, stop) integers, got {positions!r}") from None
            if a >= b:
                raise MoetraceError(f"positions: expected start < stop, got ({a}, {b})")
            self.positions = (a, b)
        self.last_shared = None
        self.prefix = None
        if skip_shared_prefix:
            self.last_shared, seq_ids, cutoff = shared_prefix(st)
            self.prefix = (seq_ids, cutoff)
        self.shape = tuple(len(self.coords[label]) for label in by)
        self.n_groups = int(np.prod(self.shape)) if by else 1
        cols = set(self.luts) | set(self.row_filters)
        if self.generated_only:
            cols.add("generated")
        if self.positions is not None:
            cols.add("pos")
        if self.prefix is not None:
            cols |= {"seq", "pos"}
        self.columns = sorted(cols)
        self.attrs = {
            "by": list(by),
            "groups": {k: list(self.coords[k]) for k in groups},
            "where": {k: np.atleast_1d(np.asarray(v)).tolist() for k, v in where.items()},
            "skip_shared_prefix": bool(skip_shared_prefix),
            "generated_only": self.generated_only,
            "positions": list(self.positions) if self.positions else None,
        }

    def _lut(self, label: str, keep: list[str]) -> None:
        vocab = self.store.labels[label]
        index = {v: i for i, v in enumerate(keep)}
        self.coords[label] = list(keep)
        self.luts[label] = np.array([index.get(v, -1) for v in vocab], dtype=np.int64)

    def group_codes(self, cols: Mapping[str, np.ndarray]) -> np.ndarray:
        """int64 [n]: row-major index over the ``by`` coordinates, -1 for dropped rows."""
        n = len(next(iter(cols.values())))
        keep = np.ones(n, dtype=bool)
        index = {}
        for label, lut in self.luts.items():
            codes = cols[label].astype(np.int64)
            if len(codes) and codes.max() >= len(lut):
                raise MoetraceError(
                    f"tokens/{label}: code {int(codes.max())} beyond the label vocabulary ({len(lut)} values)")
            index[label] = lut[codes]
            keep &= index[label] >= 0
        group = np.zeros(n, dtype=np.int64)
        for label in self.by:  # row-major over the by dims, in the order of ``by``
            group = group * len(self.coords[label]) + np.maximum(index[label], 0)
        for column, values in self.row_filters.items():
            keep &= np.isin(cols[column], values)
        if self.generated_only:
            keep &= cols["generated"].astype(bool)
        if self.positions is not None:
            pos = cols["pos"]
            keep &= (pos >= self.positions[0]) & (pos < self.positions[1])
        if self.prefix is not None:
            seq_ids, cutoff = self.prefix
            idx = np.clip(np.searchsorted(seq_ids, cols["seq"]), 0, len(seq_ids) - 1)
            keep &= cols["pos"].astype(np.int64) > cutoff[idx]
        group[~keep] = -1
        return group


def _values_of(arg: str, label: str, values: Any, vocab: list[str]) -> list[str]:
    values = [values] if isinstance(values, str) else [str(v) for v in values]
    bad = [v for v in values if v not in vocab]
    if bad:
        raise MoetraceError(f"{arg}[{label!r}]: value {bad[0]!r} is not a {label}; expected one of {vocab}")
    if not values:
        raise MoetraceError(f"{arg}[{label!r}]: expected at least one value to keep, got none")
    return list(dict.fromkeys(values))


# ---------------------------------------------------------------------------- driver


def _drive(st: TraceStore, sel: _Selection, stats: list, start: int, stop: int, progress: bool) -> list:
    """Create -> update per chunk -> finalize each statistic over rows [start, stop)."""
    inputs = sorted({name for s in stats for name in s.inputs})
    columns = list(dict.fromkeys(["experts", *sel.columns, *inputs]))
    states = [s.create() for s in stats]

    def arrays_of(cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: cols[name] for name in ["experts", *inputs]}
        arrays["group"] = sel.group_codes(cols) if sel.columns else np.zeros(len(cols["experts"]), dtype=np.int64)
        return arrays

    if start > 0 and start < stop:
        before = arrays_of(st.read(columns, start - 1, start))
        for s, state in zip(stats, states):
            s.prime(state, before)
    step = st.chunk_rows
    n_chunks = max(0, (stop - 1) // step - start // step + 1) if stop > start else 0
    chunks = st.iter_chunks(columns, rows=(start, stop), prefetch=True)
    for chunk in tqdm(chunks, total=n_chunks, disable=not progress, unit="chunk", desc="count"):
        arrays = arrays_of(chunk.columns)
        for s, state in zip(stats, states):
            try:
                s.update(state, arrays)
            except ValueError as exc:  # ids out of range: a corrupt store
                raise MoetraceError(f"{st.path} rows [{chunk.start}, {chunk.stop}): {exc}") from None
    return [s.finalize(state) for s, state in zip(stats, states)]


def _parse_stats(stats: Sequence[str] | str, st: TraceStore, vocab_size: int | None) -> list[str]:
    names = [x.strip() for x in stats.split(",")] if isinstance(stats, str) else list(stats)
    for name in names:
        if name not in STATS:
            raise MoetraceError(f"stats: unknown statistic {name!r}; expected some of {list(STATS)}")
    if "weight_sum" in names and not st.has_weights:
        raise MoetraceError(f"stats: weight_sum needs routing/weights, which {st.path} does not have")
    if "pairs" in names and st.top_k < 2:
        raise MoetraceError(f"stats: pairs needs top_k >= 2, got top_k={st.top_k} in {st.path}")
    if "vocab" in names and (vocab_size is None or int(vocab_size) < 1):
        raise MoetraceError(f"vocab_size: the vocab statistic needs a positive vocab_size, got {vocab_size!r}")
    return list(dict.fromkeys([*names, "tokens"]))


def _strings(values: Sequence[str]) -> np.ndarray:
    """Label strings as an object array (stored by Zarr v3 as variable-length UTF-8)."""
    out = np.empty(len(values), dtype=object)
    out[:] = [str(v) for v in values]
    return out


def _coords(st: TraceStore, sel: _Selection, vocab_size: int | None) -> dict[str, np.ndarray]:
    E = st.n_experts
    coords: dict[str, Any] = {label: _strings(sel.coords[label]) for label in sel.by}
    coords["layer"] = st.layer_ids
    coords["rank"] = np.arange(st.top_k, dtype=np.int64)
    for dim in _EXPERT_DIMS:
        coords[dim] = np.arange(E, dtype=np.int64)
    if vocab_size is not None:
        coords["token_id"] = np.arange(int(vocab_size), dtype=np.int64)
    return coords


def count_range(
    store: str | Path | TraceStore,
    start: int,
    stop: int,
    stats: Sequence[str] | str = ("experts",),
    by: Sequence[str] | str = (),
    where: Mapping[str, Any] | None = None,
    *,
    skip_shared_prefix: bool = False,
    generated_only: bool = False,
    positions: tuple[int, int] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Counts of committed rows ``[start, stop)``; same arguments and result as :func:`count`.

    Disjoint ranges add up exactly: ``count_range(s, 0, m) + count_range(s, m, n)``
    equals ``count(s)`` for every variable (a ``temporal`` transition t -> t+1 belongs
    to the range holding row t+1; the row before ``start`` is read for it).
    ``skip_shared_prefix`` is always computed over the whole store. A range with no
    row left after the filters gives zero counts (``count`` raises instead).
    """
    return _count(store, start, stop, stats, by, where, skip_shared_prefix, generated_only,
                  positions, groups, vocab_size, progress, allow_empty=True)


def count(
    store: str | Path | TraceStore,
    stats: Sequence[str] | str = ("experts",),
    by: Sequence[str] | str = (),
    where: Mapping[str, Any] | None = None,
    *,
    skip_shared_prefix: bool = False,
    generated_only: bool = False,
    positions: tuple[int, int] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Count routing statistics over a whole trace store into an ``xarray.Dataset``.

    ``store``: a path or an open :class:`~engine.store.TraceStore`.
    ``stats``: names from :data:`STATS` (list or comma-separated string); ``tokens``
    is always added. ``by``: label names; groups are their cross product (one dim per
    label, label strings as coordinates). Filters (a row is counted when it passes
    all of them):

    - ``where``: ``{column: value or [values]}`` keeps rows whose ``column`` (a label,
      by its strings; or ``seq``, ``pos``, ``token_id``, ``generated``) is among the
      values; label coordinates stay complete.
    - ``skip_shared_prefix``: drop seed 000's prefix shared by every sequence (see
      :func:`shared_prefix`); the dataset gets attribute ``last_shared_pos`` (the
      number of leading tokens dropped from each sequence, R's ``last_shared_tok``).
    - ``generated_only``: keep rows with ``generated`` True.
    - ``positions``: ``(start, stop)``, keep ``start <= pos < stop``.
    - ``groups``: ``{label: [values]}`` keeps rows with those label values; for a
      ``by`` label the coordinates become exactly these values, in this order.

    ``vocab_size``: V, needed by the ``vocab`` statistic ([V, L, E] counts of token id
    x layer x expert over all ranks; rows with token_id -1 are skipped).
    ``temporal`` counts top-1 transitions between consecutive store rows of the same
    ``seq`` with ``pos`` + 1 when both rows pass the filters, grouped by the first row.
    Returns int64 counts (``weight_sum`` float64) with the dims of the module
    docstring and attributes ``moetrace_counts_version``, ``n_experts``, ``top_k``,
    ``store``, ``model``, ``rows`` ([start, stop)), ``filters`` (JSON) and one
    attribute per filter. Raises MoetraceError on an unknown label / statistic /
    group value, or when no row is left after the filters.
    """
    st = _open(store)
    return _count(st, 0, len(st), stats, by, where, skip_shared_prefix, generated_only,
                  positions, groups, vocab_size, progress, allow_empty=False)


def _count(store, start, stop, stats, by, where, skip_shared_prefix, generated_only, positions, groups,
           vocab_size, progress, allow_empty) -> xr.Dataset:
    st = _open(store)
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= len(st):
        raise MoetraceError(f"rows: expected 0 <= start <= stop <= {len(st)} (committed rows), got [{start}, {stop})")
    names = _parse_stats(stats, st, vocab_size)
    sel = _Selection(st, by, where, skip_shared_prefix, generated_only, positions, groups)
    L, K, E = st.n_layers, st.top_k, st.n_experts
    kwargs = {"vocab": {"vocab_size": vocab_size}}
    objs = [counting.make_stat(name, sel.n_groups, L, K, E, **kwargs.get(name, {})) for name in names]
    tensors = _drive(st, sel, objs, start, stop, progress)
    tokens = tensors[names.index("tokens")]
    if not allow_empty and tokens.sum() == 0:
        raise MoetraceError(
            f"{st.path}: empty selection, no row left after the filters {json.dumps(sel.attrs)} "
            f"(of {stop - start} rows)")
    coords = _coords(st, sel, vocab_size if "vocab" in names else None)
    data = {}
    for name, tensor in zip(names, tensors):
        grouped, dims = STATS[name]
        if grouped:
            tensor = tensor.reshape(sel.shape + tensor.shape[1:])
            dims = (*sel.by, *dims)
        data[name] = (dims, tensor)
    used = {dim for _, (dims, _) in data.items() for dim in dims}
    ds = xr.Dataset(data, coords={k: v for k, v in coords.items() if k in used})
    ds.attrs.update(_attrs(st, sel, names, start, stop))
    return ds


def _attrs(st: TraceStore, sel: _Selection, names: list[str], start: int, stop: int) -> dict[str, Any]:
    attrs = {
        "moetrace_counts_version": COUNTS_VERSION,
        "n_experts": st.n_experts,
        "top_k": st.top_k,
        "n_layers": st.n_layers,
        "store": str(st.path),
        "model": st.model or "",
        "stats": names,
        "rows": [start, stop],
        "filters": json.dumps(sel.attrs),
        "by": sel.attrs["by"],
        "skip_shared_prefix": int(sel.attrs["skip_shared_prefix"]),
        "generated_only": int(sel.attrs["generated_only"]),
    }
    if sel.positions is not None:
        attrs["positions"] = list(sel.positions)
    if sel.last_shared is not None:
        attrs["last_shared_pos"] = int(sel.last_shared)
    return attrs


# ---------------------------------------------------------------------------- coverage

_COVERAGE_TABLES = {"paths": "path_table", "experts": "expert_table", "pairs": "pair_table"}


def coverage(
    store: str | Path | TraceStore,
    targets: Any,
    by: Sequence[str] | str = (),
    kind: str = "paths",
    where: Mapping[str, Any] | None = None,
    *,
    skip_shared_prefix: bool = False,
    generated_only: bool = False,
    positions: tuple[int, int] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Seed 000's "Analyze proportions to be ablated" table, per group of ``by``.

    ``targets`` provides ``path_table(layer_ids, E) -> bool [L, E, E]`` ([l, prev,
    target]), ``expert_table(layer_ids, E) -> bool [L, E]`` and ``pair_table(layer_ids,
    E) -> bool [L, E, E]`` ([l, rank-0, rank-1]) (``engine.targets.Targets``). Per
    token (after the same filters as :func:`count`), ``kind`` decides the possible
    items and which are targeted:

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
    ``prop_toks_with_half`` (over n_toks) (float64, NaN for an empty group).
    """
    st = _open(store)
    if kind not in _COVERAGE_TABLES:
        raise MoetraceError(f"kind: expected one of {list(_COVERAGE_TABLES)}, got {kind!r}")
    L, K, E = st.n_layers, st.top_k, st.n_experts
    if kind == "paths" and L < 2:
        raise MoetraceError(f"kind='paths': needs at least 2 layers, {st.path} has {L}")
    if kind == "pairs" and K < 2:
        raise MoetraceError(f"kind='pairs': needs top_k >= 2, {st.path} has top_k={K}")
    table = np.asarray(getattr(targets, _COVERAGE_TABLES[kind])(st.layer_ids, E), dtype=bool)
    want = (L, E) if kind == "experts" else (L, E, E)
    if table.shape != want:
        raise MoetraceError(
            f"targets.{_COVERAGE_TABLES[kind]}: expected a bool table of shape {want}, got {table.shape}")
    sel = _Selection(st, by, where, skip_shared_prefix, generated_only, positions, groups)
    cov = counting.CoverageStat(sel.n_groups, L, K, E, kind=kind, table=table)
    questions = counting.DistinctSeqStat(sel.n_groups, L, K, E)
    tallies, n_questions = _drive(st, sel, [cov, questions], 0, len(st), progress)
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
    ds = xr.Dataset(data, coords={label: _strings(sel.coords[label]) for label in sel.by})
    ds.attrs.update({"kind": kind, "store": str(st.path), "filters": json.dumps(sel.attrs)})
    if sel.last_shared is not None:
        ds.attrs["last_shared_pos"] = int(sel.last_shared)
    return ds


# ---------------------------------------------------------------------------- files


def save_counts(ds: xr.Dataset, path: str | Path, overwrite: bool = True) -> None:
    """Write a counts Dataset to a Zarr store at ``path`` (``xarray.open_zarr`` reads it back)."""
    if ds.attrs.get("moetrace_counts_version") != COUNTS_VERSION:
        raise MoetraceError(
            f"save_counts: expected a counts Dataset (moetrace_counts_version={COUNTS_VERSION}), "
            f"got attribute {ds.attrs.get('moetrace_counts_version')!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise MoetraceError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    with warnings.catch_warnings():
        # Consolidated metadata (so a plain ``xarray.open_zarr`` opens it quietly) is
        # not yet part of the Zarr v3 spec; zarr warns about that on every write.
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        ds.to_zarr(str(path), mode="w", consolidated=True)


def load_counts(path: str | Path) -> xr.Dataset:
    """Read a counts Dataset written by :func:`save_counts` (loaded into memory).

    Raises MoetraceError when ``path`` is not a Zarr store, not a counts file, or a
    counts file of another ``moetrace_counts_version``.
    """
    path = Path(path)
    if not path.exists():
        raise MoetraceError(f"{path}: no such counts file")
    try:
        with warnings.catch_warnings():  # a file written without consolidated metadata
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated",
                                    category=RuntimeWarning)
            ds = xr.open_zarr(str(path))
    except Exception as exc:  # zarr raises several types for a non-Zarr directory
        raise MoetraceError(f"{path}: not a counts file (cannot open as Zarr: {exc})") from None
    version = ds.attrs.get("moetrace_counts_version")
    if version is None:
        raise MoetraceError(f"{path}: not a moetrace counts file (no moetrace_counts_version attribute)")
    if version != COUNTS_VERSION:
        raise MoetraceError(
            f"{path}: counts file version {version}, expected moetrace_counts_version={COUNTS_VERSION}")
    return ds.load()


def sequence_table(
    store: str | Path | TraceStore,
    by: Sequence[str] | str = (),
    *,
    skip_shared_prefix: bool = False,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """One row per sequence: its id, its ``by`` label values, how many tokens it keeps, and
    its ``sequences/*`` metadata.

    Joins token-level labels onto per-sequence metadata (what seed 000's ``base_accs``
    groups by). Returns ``seq`` int64 [S] (sorted), one str array [S] per label (the value
    of the sequence's first row), ``n_tokens`` int64 [S], the rows left after the
    shared-prefix filter when ``skip_shared_prefix`` (else all rows), and every
    ``sequences/*`` column joined on ``seq`` (MoetraceError when a sequence with tokens has
    no metadata row). Streams the seq and label columns; memory grows with the number of
    sequences, not rows.
    """
    st = _open(store)
    by = [by] if isinstance(by, str) else list(by)
    for label in by:
        if label not in st.labels:
            raise MoetraceError(f"by: unknown label {label!r}; the store has {st.label_names}")
    cutoff_seq = cutoff_pos = None
    if skip_shared_prefix:
        _, cutoff_seq, cutoff_pos = shared_prefix(st)
    seqs, firsts, kept = [], [], []
    for chunk in tqdm(st.iter_chunks(["seq", "pos", *by]), disable=not progress, desc="sequences", unit="chunk"):
        seq = chunk["seq"]
        keep = np.ones(len(seq), dtype=bool)
        if cutoff_seq is not None:
            keep = chunk["pos"] > cutoff_pos[np.searchsorted(cutoff_seq, seq)]
        uniq, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
        seqs.append(uniq)
        firsts.append(np.stack([chunk[label][first] for label in by], axis=1) if by
                      else np.zeros((len(uniq), 0), dtype=np.uint16))
        kept.append(np.bincount(inverse.reshape(-1), weights=keep, minlength=len(uniq)).astype(np.int64))
    if not seqs:
        raise MoetraceError(f"{st.path}: empty store, no sequences")
    seq = np.concatenate(seqs)
    codes = np.concatenate(firsts)
    n_kept = np.concatenate(kept)
    uniq, first, inverse = np.unique(seq, return_index=True, return_inverse=True)
    table: dict[str, np.ndarray] = {"seq": uniq}
    for i, label in enumerate(by):
        table[label] = st.decode_label(label, codes[first, i]).astype(str)
    table["n_tokens"] = np.bincount(inverse.reshape(-1), weights=n_kept, minlength=len(uniq)).astype(np.int64)
    meta = st.read_sequences()
    if meta:
        # Join the per-sequence metadata (sequences/*) on the sequence id.
        meta_seq = np.asarray(meta.pop("seq"), dtype=np.int64)
        order = np.argsort(meta_seq, kind="stable")
        pos = np.searchsorted(meta_seq[order], uniq)
        found = (pos < len(order)) & (meta_seq[order][np.minimum(pos, len(order) - 1)] == uniq)
        if not found.all():
            raise MoetraceError(
                f"{st.path}: sequence {int(uniq[~found][0])} has tokens but no row in sequences/*")
        rows = order[pos]
        for name, values in meta.items():
            if name not in table:
                table[name] = np.asarray(values)[rows]
    return table

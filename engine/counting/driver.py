"""The count driver: stream a store's chunks through the registered statistics into xarray.

Each statistic of ``moetrace.kernels.counting.STATS`` describes itself (dims, grouped,
inputs, min_top_k, extra args); this module derives from that registry the checks
on a store, the chunk columns to read, the dims and coordinates of the Dataset. It
turns the :class:`~moetrace.counting.filters.Filters` into one int64 group code per
row and feeds every statistic the same decoded chunk, so several statistics in one
call read and decode each chunk once.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numba
import numpy as np
import xarray as xr

from moetrace.counting.chunks import ChunkReader
from moetrace.counting.files import COUNTS_VERSION
from moetrace.counting.filters import Filters, Selection
from moetrace.errors import MoetraceError
from moetrace.progress import tqdm
from moetrace.store import TraceStore, open_store
from moetrace.kernels import counting

__all__ = ["count_range", "count_store", "drive", "parse_stats", "strings"]


def drive(st: TraceStore, sel: Selection, stats: list, start: int, stop: int, progress: bool,
          workers: int | None = None) -> list:
    """Create -> update per chunk -> finalize each statistic over rows [start, stop).

    ``workers`` threads (default: Numba's thread count) each take the next chunk, read it into
    their own buffers and count it into their own state with the serial kernels (no GIL
    held): one worker reads while another counts, with no hand-off between threads and
    the chunk still in cache when it is counted (bench/RESULTS.md, issue 25). The states
    are added at the end. A statistic that ``looks_back`` (``temporal``) starts each chunk
    with no carried row; the transition across each chunk seam (and from the row before
    ``start``) is counted afterwards from the rows on either side, so the totals equal a
    sequential pass exactly.
    """
    inputs = sorted({name for s in stats for name in s.inputs})
    columns = list(dict.fromkeys(["experts", *sel.columns, *inputs]))
    reader = ChunkReader(st, columns, (start, stop))
    indices = reader.indices
    n_workers = max(1, min(int(workers or numba.get_num_threads()), len(indices)))
    looking_back = any(s.looks_back for s in stats)
    no_rows = None

    def arrays_of(cols: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arrays = {name: cols[name] for name in ["experts", *inputs]}
        arrays["group"] = sel.group_codes(cols, len(cols["experts"]))
        return arrays

    def row(arrays: dict, i: int) -> dict[str, np.ndarray]:
        """Row ``i`` (0 or -1) as 1-row copies."""
        i %= len(arrays["group"])
        return {k: v[i: i + 1].copy() for k, v in arrays.items()}

    shared = {id(s): (s.create(), threading.Lock()) for s in stats if s.shared_state}
    edges: dict[int, tuple] = {}  # chunk index -> (its first row, its last row), for the seams
    if 0 < start < stop and looking_back:
        before = arrays_of(st.read(columns, start - 1, start))
        edges[indices[0] - 1] = (before, before)
    claim = threading.Lock()
    queue = iter(indices)
    stop_all = threading.Event()
    bar = tqdm(total=len(indices), disable=not progress, unit="chunk", desc="count")

    failed: list[tuple[int, BaseException]] = []

    def count_chunk(index: int, states: list, buffers: dict) -> None:
        nonlocal no_rows
        chunk = reader.load(index, buffers)
        arrays = arrays_of(chunk.columns)
        if looking_back:
            edges[index] = (row(arrays, 0), row(arrays, -1))
            no_rows = no_rows or {k: v[:0].copy() for k, v in arrays.items()}
        for s, state in zip(stats, states):
            try:
                if s.shared_state:
                    state, lock = shared[id(s)]
                    with lock:
                        s.update(state, arrays)
                    continue
                if s.looks_back:
                    s.prime(state, no_rows)  # seams are counted after all chunks
                s.update(state, arrays)
            except ValueError as exc:  # ids out of range: a corrupt store
                raise MoetraceError(f"{st.path} rows [{chunk.start}, {chunk.stop}): {exc}") from None

    def work() -> list:
        states = [None if s.shared_state else s.create(n_blocks=1) for s in stats]
        buffers = reader.buffers()
        while not stop_all.is_set():
            with claim:
                index = next(queue, None)
            if index is None:
                break
            try:
                count_chunk(index, states, buffers)
            except BaseException as exc:  # the others finish the chunk they hold, then stop
                with claim:
                    failed.append((index, exc))
                stop_all.set()
                break
            with claim:
                bar.update(1)
        return states

    try:
        if n_workers == 1:
            results = [work()]
        else:
            with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="moetrace-count") as pool:
                futures = [pool.submit(work) for _ in range(n_workers)]
                try:
                    results = [f.result() for f in futures]
                finally:  # e.g. Ctrl-C here: the workers stop after their chunk instead of finishing the store
                    stop_all.set()
    finally:
        stop_all.set()
        bar.close()
    if failed:
        # chunks are claimed in order and a worker finishes the one it holds: the first damaged chunk
        # is among the failures, so the error is the same whatever the number of workers
        raise min(failed, key=lambda f: f[0])[1]
    out = []
    for i, s in enumerate(stats):
        if s.shared_state:
            out.append(s.finalize(shared[id(s)][0]))
            continue
        total = results[0][i]
        for other in results[1:]:
            total = s.combine(total, other[i])
        if s.looks_back:
            seam = s.create(n_blocks=1)
            for index in indices:
                if index - 1 in edges:
                    s.prime(seam, edges[index - 1][1])
                    s.update(seam, edges[index][0])
            total = s.combine(total, seam)
        out.append(s.finalize(total))
    return out


def parse_stats(stats: Any, st: TraceStore, extra: Mapping[str, Any]) -> list[str]:
    """Statistic names (list or comma-separated string) checked against the registry and the store."""
    if isinstance(stats, str):
        names = [x.strip() for x in stats.split(",") if x.strip()]
    else:
        try:
            names = list(stats)
        except TypeError:
            raise MoetraceError(f"stats: expected statistic names, got {stats!r}") from None
    registry = counting.STATS
    for name in names:
        if not isinstance(name, str) or name not in registry:
            raise MoetraceError(f"stats: unknown statistic {name!r}; expected some of {list(registry)}")
        cls = registry[name]
        for column in cls.inputs:
            if column not in st.columns:
                where = "routing/" if column == "weights" else "tokens/"
                raise MoetraceError(f"stats: {name} needs {where}{column}, which {st.path} does not have")
        if cls.needs_rank_order:
            st.require_rank_order(f"statistic {name!r}")
        if st.top_k < cls.min_top_k:
            raise MoetraceError(f"stats: {name} needs top_k >= {cls.min_top_k}, got top_k={st.top_k} in {st.path}")
        for arg in cls.args:
            value = extra.get(arg)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise MoetraceError(f"{arg}: the {name} statistic needs a positive {arg}, got {value!r}")
    return list(dict.fromkeys([*names, "tokens"]))


def strings(values: Sequence[str]) -> np.ndarray:
    """Label strings as an object array (stored by Zarr v3 as variable-length UTF-8)."""
    out = np.empty(len(values), dtype=object)
    out[:] = [str(v) for v in values]
    return out


def _coords(st: TraceStore, sel: Selection, stat: counting.CountStat) -> dict[str, np.ndarray]:
    coords: dict[str, Any] = {label: strings(sel.coords[label]) for label in sel.by if stat.grouped}
    inner = stat.shape[1:] if stat.grouped else stat.shape
    for dim, size in zip(stat.dims, inner):
        coords[dim] = st.layer_ids if dim == "layer" else np.arange(size, dtype=np.int64)
    return coords


def count_store(st: TraceStore, start: int, stop: int, stats, filters: Filters, vocab_size, progress: bool,
                allow_empty: bool, prefix: tuple | None = None, workers: int | None = None) -> xr.Dataset:
    """Counts of rows ``[start, stop)`` of an open store (:func:`moetrace.counting.api.count` and
    :func:`count_range` take their arguments apart into these). ``allow_empty``: a range with no row
    left after the filters gives zero counts instead of an error. ``workers``: see :func:`drive`."""
    start, stop = int(start), int(stop)
    if not 0 <= start <= stop <= len(st):
        raise MoetraceError(f"rows: expected 0 <= start <= stop <= {len(st)} (committed rows), got [{start}, {stop})")
    extra = {"vocab_size": vocab_size}
    names = parse_stats(stats, st, extra)
    sel = filters.compile(st, progress=progress, prefix=prefix)
    L, K, E = st.n_layers, st.top_k, st.n_experts
    objs = [counting.make_stat(name, sel.n_groups, L, K, E, **{a: int(extra[a]) for a in counting.STATS[name].args})
            for name in names]
    tensors = drive(st, sel, objs, start, stop, progress, workers)
    tokens = tensors[names.index("tokens")]
    if not allow_empty and tokens.sum() == 0:
        raise MoetraceError(
            f"{st.path}: empty selection, no row left after the filters {json.dumps(sel.attrs)} "
            f"(of {stop - start} rows)")
    data, coords = {}, {}
    for name, stat, tensor in zip(names, objs, tensors):
        dims = stat.dims
        if stat.grouped:
            tensor = tensor.reshape(sel.shape + tensor.shape[1:])
            dims = (*sel.by, *dims)
        data[name] = (dims, tensor)
        coords.update(_coords(st, sel, stat))
    ds = xr.Dataset(data, coords=coords)
    ds.attrs.update(_attrs(st, sel, names, start, stop))
    return ds


def _attrs(st: TraceStore, sel: Selection, names: list[str], start: int, stop: int) -> dict[str, Any]:
    attrs = {
        "moetrace_counts_version": COUNTS_VERSION,
        "n_experts": st.n_experts,
        "top_k": st.top_k,
        "n_layers": st.n_layers,
        "store": str(st.path),
        "model": st.model or "",
        "rank_order": st.rank_order,
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
        attrs["shared_prefix_tokens"] = int(sel.last_shared)
    return attrs


def count_range(
    store: str | Path | TraceStore,
    start: int,
    stop: int,
    stats: Sequence[str] | str = ("experts",),
    by: Sequence[str] | str = (),
    where: Mapping[str, Any] | None = None,
    *,
    filters: Filters | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
    prefix: tuple | None = None,
    **filter_args: Any,
) -> xr.Dataset:
    """Counts of committed rows ``[start, stop)``; same arguments and result as :func:`moetrace.counting.api.count`.

    ``prefix``: ``shared_prefix(store)``'s result, when already computed, so that the
    ranges of one store (with ``skip_shared_prefix``) do not each stream the whole store.

    Disjoint ranges add up exactly: ``count_range(s, 0, m) + count_range(s, m, n)``
    equals ``count(s)`` for every variable (a ``temporal`` transition t -> t+1 belongs
    to the range holding row t+1; the row before ``start`` is read for it).
    ``skip_shared_prefix`` is always computed over the whole store. A range with no
    row left after the filters gives zero counts (:func:`~moetrace.counting.api.count` raises instead).
    """
    filters = Filters.of(filters, by=by or None, where=where, **filter_args)
    return count_store(open_store(store), start, stop, stats, filters, vocab_size, progress, allow_empty=True,
                  prefix=prefix)

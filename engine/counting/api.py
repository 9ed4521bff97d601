"""The counting entry point: one trace store or an archive of them, in process or on Dask.

:func:`count` sends a single store to :mod:`moetrace.counting.driver` and an archive (or any
run with a Dask ``client`` or a ``checkpoint``) to :mod:`moetrace.counting.archive`; it lives
apart from both so that neither imports the other's caller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import xarray as xr

from moetrace.counting.archive import count_archive
from moetrace.counting.driver import count_store
from moetrace.counting.filters import Filters
from moetrace.store import TraceStore, open_store


def count(
    store: str | Path | TraceStore,
    stats: Sequence[str] | str = ("experts",),
    by: Sequence[str] | str = (),
    where: Mapping[str, Any] | None = None,
    *,
    filters: Filters | None = None,
    vocab_size: int | None = None,
    progress: bool = True,
    client: Any = None,
    range_rows: int | None = None,
    checkpoint: str | Path | None = None,
    **filter_args: Any,
) -> xr.Dataset:
    """Count routing statistics over a whole trace store, or an archive of them, into an ``xarray.Dataset``.

    ``store``: a path or an open :class:`~moetrace.store.TraceStore`; or an archive: a
    directory of stores, a glob, or a list of those, local paths or fsspec URLs (see
    :mod:`moetrace.counting.archive`: the stores must share layers, experts and top-k;
    label values are merged by value; attributes ``stores`` and ``store_rows`` name the
    stores counted and their rows, ``rows`` is [0, total rows], ``shared_prefix_tokens`` one
    int per store when there are several). ``client``: a ``distributed.Client``; the
    archive is split into chunk-aligned ranges of about ``range_rows`` rows, counted on
    its workers and summed in a tree; the result equals the in-process one bit for bit.
    ``checkpoint``: a directory keeping each finished range's counts, so a rerun with
    the same arguments counts only the ranges not yet there (a directory made for another
    archive, or for stores rewritten or grown since, is refused).
    ``stats``: names from ``moetrace.kernels.counting.STATS`` (list or comma-separated string);
    ``tokens`` is always added. ``by``: label names; groups are their cross product (one
    dim per label, label strings as coordinates). Filters (a row is counted when it
    passes all of them), given as a :class:`~moetrace.counting.filters.Filters` or as its
    fields by keyword:

    - ``where``: ``{column: value or [values]}`` keeps rows whose ``column`` (a label,
      by its strings; or ``seq``, ``pos``, ``token_id``, ``generated``) is among the
      values; label coordinates stay complete.
    - ``skip_shared_prefix``: drop seed 000's prefix shared by every sequence (see
      :func:`moetrace.counting.prefix.shared_prefix`); the dataset gets attribute
      ``shared_prefix_tokens`` (the number of leading tokens dropped from each sequence,
      R's ``last_shared_tok``).
    - ``generated_only``: keep rows with ``generated`` True.
    - ``positions``: ``(start, stop)``, keep ``start <= pos < stop``.
    - ``groups``: ``{label: [values]}`` keeps rows with those label values; for a
      ``by`` label the coordinates become exactly these values, in this order.

    ``vocab_size``: V, needed by the ``vocab`` statistic ([V, L, E] counts of token id
    x layer x expert over all ranks; rows with token_id -1 are skipped).
    ``temporal`` counts top-1 transitions between consecutive store rows of the same
    ``seq`` with ``pos`` + 1 when both rows pass the filters, grouped by the first row.
    Returns int64 counts (``weight_sum`` float64), dims: the ``by`` labels first for a
    grouped statistic, then the statistic's own ``dims`` (``layer`` coordinates are the
    store's ``layer_ids``, others 0..size-1), and attributes ``moetrace_counts_version``,
    ``n_experts``, ``top_k``, ``store``, ``model``, ``rows`` ([start, stop)), ``filters``
    (JSON) and one attribute per filter. Raises MoetraceError on an unknown label /
    statistic / group value, a bad argument, or when no row is left after the filters.
    """
    filters = Filters.of(filters, by=by or None, where=where, **filter_args)
    if client is not None or checkpoint is not None or _is_archive(store):
        return count_archive(store, stats, filters, vocab_size, progress, client=client, range_rows=range_rows,
                             checkpoint=checkpoint)
    st = open_store(store)
    ds = count_store(st, 0, len(st), stats, filters, vocab_size, progress, allow_empty=False)
    ds.attrs.update({"stores": [str(st.path)], "store_rows": [len(st)]})
    return ds


def _is_archive(store: Any) -> bool:
    """Whether ``store`` names several stores (a list, a glob, a directory of stores, a URL not to a store)."""
    if isinstance(store, TraceStore):
        return False
    if not isinstance(store, (str, Path)):
        return True
    text = str(store)
    if any(ch in text for ch in "*?[") or ("://" in text and not text.startswith("file://")):
        return True
    path = Path(text[len("file://"):] if text.startswith("file://") else text)
    return path.is_dir() and not (path / "zarr.json").exists()

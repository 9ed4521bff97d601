"""The importers' shared skeleton: staged output, range checks, external partitions, n_experts.

Every importer follows the same steps, each provided here once:

1. validate the source (``check_range`` / ``check_weights`` name the file, row and column);
2. build the store in ``OUT.partial-<pid>`` (:func:`staged_store`): create it
   (``TraceStore.create``), append token batches in chunks, close it;
3. publish it by renaming to ``OUT`` only when everything succeeded.

:func:`write_store` runs steps 2-3 for an importer that can yield its rows as batches; the
sorting importers (CSV, out-of-order Parquet) use :func:`staged_store` with
:class:`PartitionWriter` directly. A new format is one module in ``engine/io`` using
these, one command module in ``engine/commands`` and its tests (``tests/io_contract.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import shutil
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from moetrace.errors import MoetraceError
from moetrace.leftovers import clean
from moetrace.store import MAX_LAYER_ID  # the largest layer index a store (and so an importer) takes

#: ``routing/experts`` is uint16 at most.
MAX_EXPERTS = 65536
#: ``tokens/token_id`` is int32; -1 means unknown.
TOKEN_ID_RANGE = (-1, int(np.iinfo(np.int32).max))
#: ``tokens/pos`` is int32.
POS_RANGE = (int(np.iinfo(np.int32).min), int(np.iinfo(np.int32).max))
#: ``tokens/seq`` is int64.
SEQ_RANGE = (int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max))
#: ``routing/weights`` is float16: larger magnitudes would become infinite.
MAX_WEIGHT = float(np.finfo(np.float16).max)


def read_ahead(items: Iterable[Any], depth: int = 2, name: str = "moetrace-read-ahead") -> Iterator[Any]:
    """``items`` in order, produced by a background thread up to ``depth`` ahead of the caller.

    For sources whose next item is mostly native work that releases the GIL (pyarrow
    decoding a Parquet row group or parsing CSV): it runs on the other core while the
    caller checks and writes the previous one. An exception in the source is raised at
    the item where it happened; a caller that stops early stops the thread.
    """
    out: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        out.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            out.put((done, None))
        except BaseException as exc:  # handed to the caller
            out.put((done, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = out.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass
        thread.join()


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: tuple = (), what: str = "an input") -> Path:
    """Return ``out`` as a Path; raise MoetraceError if it exists and ``overwrite`` is False,
    or if it is one of the ``inputs`` (replacing an input with the output would destroy it;
    ``what`` names them in the message). URLs among the inputs are never a local output."""
    out = Path(out)
    if any("://" not in str(i) and out.resolve() == Path(i).resolve() for i in inputs):
        raise MoetraceError(f"{out}: the output is also {what}; choose another output path")
    if out.exists() and not overwrite:
        raise MoetraceError(f"{out}: output already exists (pass overwrite=True / --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_store(out: str | os.PathLike, overwrite: bool = False, inputs: tuple = ()) -> Iterator[Path]:
    """Yield a temporary path ``OUT.partial-<pid>`` to build a store (or file) in; publish it as ``out``.

    On normal exit the temporary directory is renamed to ``out`` (replacing an existing
    ``out`` only when ``overwrite``); on any exception it is deleted, so nothing that looks
    like a finished store is left behind. Missing parent directories of ``out`` are
    created (and removed again on failure). ``inputs``: paths ``out`` must not be. The
    caller must close its store before leaving.
    """
    out = check_output_path(out, overwrite, inputs)
    created = out.parent
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MoetraceError(f"{out}: cannot create its directory ({exc.strerror})") from None
    clean(out.parent, out.name)  # what a killed earlier writer of this output left
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        if created is not None:
            _remove(created)
        raise
    # the old output is moved aside, not deleted, until the new one is in place: a crash leaves
    # either the old store or the new one under `out`, never a half-deleted one
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    _remove(old)
    if out.exists() or out.is_symlink():
        os.replace(out, old)
    os.replace(partial, out)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def check_range(path: Any, column: str, values: np.ndarray, lo: int, hi: int, rows: int | np.ndarray,
                what: str = "an integer", hint: str = "") -> None:
    """Raise MoetraceError naming the first value of ``values`` outside ``[lo, hi]``.

    ``values``: integer array [n] in its source dtype (compared before any cast, so
    nothing wraps); ``rows``: row number of ``values[0]`` (rows are consecutive) or an
    int array [n] of row numbers. The message is ``<path>: row <r>, column <column>:
    expected <what> in [lo, hi]<hint>, got <value>``. Vectorized: no Python row loop.
    """
    values = np.asarray(values)
    if values.size == 0:
        return
    bad = (values < lo) | (values > hi)
    if bad.any():
        i = int(np.argmax(bad))
        row = rows + i if np.isscalar(rows) else np.asarray(rows)[i]
        raise MoetraceError(
            f"{path}: row {int(row)}, column {column}: expected {what} in [{lo}, {hi}]{hint}, got {values[i].item()}")


def check_weights(path: Any, column: str, values: np.ndarray, rows: int | np.ndarray) -> None:
    """Raise MoetraceError naming the first weight that is not finite or overflows float16.

    ``values``: float array [n] (any float dtype); ``rows`` as in :func:`check_range`.
    """
    values = np.asarray(values)
    bad = ~np.isfinite(values) | (np.abs(values) > MAX_WEIGHT)
    if values.size and bad.any():
        i = int(np.argmax(bad))
        row = rows + i if np.isscalar(rows) else np.asarray(rows)[i]
        raise MoetraceError(f"{path}: row {int(row)}, column {column}: expected a finite number within "
                            f"+-{MAX_WEIGHT:g} (routing/weights is float16), got {values[i].item()}")


# External sorts (the CSV and Parquet importers): a bounded key sample picks the partition bounds.
KEY_SAMPLE_CAP = 1 << 17  # keys kept by a KeySampler at most
MAX_PARTITIONS = 512      # partition files of one external sort at most


class KeySampler:
    """A bounded systematic sample of a stream of rows: every ``stride``-th row overall, the stride
    doubling (and the sample halving) whenever more than ``KEY_SAMPLE_CAP`` rows are kept.

    ``add(*columns)`` takes one batch's columns (equal lengths); :meth:`columns` returns the kept
    rows of each column, in stream order. The same rows are kept for every column, so a key built
    from several columns later (after their ranges are known) is a sample of the real keys.
    """

    def __init__(self, cap: int = KEY_SAMPLE_CAP):
        self.cap, self.stride, self.rows = int(cap), 1, 0
        self._parts: list[tuple[np.ndarray, ...]] = []

    def add(self, *columns: np.ndarray) -> None:
        take = np.arange((-self.rows) % self.stride, len(columns[0]), self.stride)
        self._parts.append(tuple(np.asarray(c)[take] for c in columns))
        self.rows += len(columns[0])
        if sum(len(p[0]) for p in self._parts) > self.cap:
            self._parts = [tuple(c[::2] for c in self.columns())]
            self.stride *= 2

    def columns(self) -> tuple[np.ndarray, ...]:
        return tuple(np.concatenate(c) for c in zip(*self._parts))


def partition_bounds(sorted_sample: np.ndarray, n_parts: int) -> np.ndarray:
    """Sorted keys splitting ``sorted_sample`` into ``n_parts`` about equal partitions (fewer when keys repeat)."""
    if n_parts <= 1 or len(sorted_sample) == 0:
        return sorted_sample[:0]
    return np.unique(sorted_sample[(np.arange(1, n_parts) * len(sorted_sample)) // n_parts])


def n_partitions(estimated_bytes: float, memory_budget: int) -> int:
    """How many partitions keep each one's sort within ``memory_budget`` bytes (at least 1 MiB), at most MAX_PARTITIONS."""
    return int(min(MAX_PARTITIONS, max(1, math.ceil(estimated_bytes / max(1 << 20, int(memory_budget))))))


class PartitionWriter:
    """Appends Arrow tables to ``<base>-<part>.arrow`` IPC stream files, one per partition.

    The external partitioning of the importers that sort (CSV, out-of-order Parquet): rows
    are routed to partitions by key range, then each partition is sorted in memory.
    """

    def __init__(self, base: Path, n_parts: int):
        self.base, self.n_parts = base, n_parts
        self.writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def __enter__(self) -> "PartitionWriter":
        return self

    def __exit__(self, *exc) -> None:
        for writer in self.writers.values():
            writer.close()

    def write(self, part: np.ndarray, table: pa.Table) -> None:
        order = np.argsort(part, kind="stable")
        sorted_part = part[order]
        edges = np.searchsorted(sorted_part, np.arange(self.n_parts + 1))
        for p in np.unique(sorted_part):
            piece = table.take(pa.array(order[edges[p]:edges[p + 1]]))
            writer = self.writers.get(int(p))
            if writer is None:
                writer = self.writers[int(p)] = ipc.new_stream(f"{self.base}-{int(p)}.arrow", piece.schema)
            writer.write_table(piece)


def read_partition(base: Path, part: int) -> pa.Table | None:
    """Partition ``part`` written by :class:`PartitionWriter` as one table (None if empty); deletes its file."""
    path = Path(f"{base}-{part}.arrow")
    if not path.exists():
        return None
    with ipc.open_stream(path) as reader:
        table = reader.read_all()
    path.unlink()
    return table.combine_chunks()


def resolve_n_experts(max_expert: int, n_experts: int | None, source: str, top_k: int | None = None) -> int:
    """Number of experts: ``n_experts`` when given (checked against the data), else max id + 1;
    MoetraceError naming ``source`` when it is smaller than ``top_k``."""
    resolved = _resolve_n_experts(max_expert, n_experts, source)
    if top_k is not None and top_k > resolved:
        raise MoetraceError(f"{source}: top-k {top_k} exceeds the number of experts {resolved} (largest expert id "
                            f"{int(max_expert)}; pass n_experts / --n-experts if the model has more experts)")
    return resolved


def _resolve_n_experts(max_expert: int, n_experts: int | None, source: str) -> int:
    if max_expert >= MAX_EXPERTS:
        raise MoetraceError(f"{source}: expert id {int(max_expert)} is out of range "
                            f"(a store holds at most {MAX_EXPERTS} experts, ids 0..{MAX_EXPERTS - 1})")
    if n_experts is None:
        return int(max_expert) + 1
    if n_experts < 1:
        raise MoetraceError(f"n_experts: expected a positive integer, got {n_experts}")
    if max_expert >= n_experts:
        raise MoetraceError(
            f"{source}: expert id {int(max_expert)} is out of range for n_experts={n_experts} "
            f"(expected ids in 0..{n_experts - 1})"
        )
    return int(n_experts)


def write_store(out: str | os.PathLike, batches: Iterable[dict], *, overwrite: bool = False, inputs: tuple = (),
                **create) -> "TraceStore":
    """The importer skeleton: create a store in ``OUT.partial-<pid>``, append ``batches``, publish it as ``out``.

    ``create``: keyword arguments of :meth:`TraceStore.create` (``n_layers``, ``n_experts``,
    ``top_k``, ``labels``, ...); ``batches``: an iterable of ``TraceStore.append`` batches
    (consumed lazily, so a generator reading one source file at a time keeps memory
    bounded); a batch may carry ``"sequences"``, per-sequence metadata columns (``seq`` and
    more) for :meth:`TraceStore.append_sequences`. A MoetraceError (or any exception) raised
    while iterating leaves nothing at ``out``. Returns the published store opened read-only.
    """
    from moetrace.store import TraceStore

    with staged_store(out, overwrite, inputs) as partial:
        store = TraceStore.create(partial, **create)
        try:
            for batch in batches:
                sequences = batch.pop("sequences", None)
                store.append(batch)
                if sequences is not None:
                    store.append_sequences(sequences)
        finally:
            store.close()
    return TraceStore.open(out)

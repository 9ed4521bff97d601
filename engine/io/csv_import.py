"""Import seed 000's ``samples.csv`` + ``topks.csv`` into a :class:`TraceStore`.

Input format
------------
``samples.csv``: one row per token. Columns:

- ``q_ix`` (int, -> ``tokens/seq``), ``token_ix`` (int, -> ``tokens/pos``), ``token`` (the
  token text, -> ``tokens/text``; read verbatim: leading/trailing whitespace, ``" "``,
  ``"\\n"`` in quoted fields and ``""`` are kept exactly, like R's ``strip.white = F``);
- optional ``token_id`` (int, -> ``tokens/token_id``, else -1) and ``generated``
  (``true/false/1/0``, -> ``tokens/generated``, else False);
- label columns (strings that vary per token, -> ``tokens/<label>`` codes): the names
  given in ``labels``, by default those of ``domain``, ``lang``, ``language``, ``subject``
  that are present;
- every other column is per-question metadata (e.g. ``question_output_token``,
  ``answer_char``): it must be constant within a ``q_ix`` and goes to
  ``sequences/<column>`` (one row per ``q_ix``, ``sequences/seq`` = ``q_ix``). Values are
  read as text and stored as int64, float64 or bool when every value of the column
  parses as such (``TRUE``/``FALSE``/``true``/``false`` for bool), else as strings (a
  column holding an integer beyond int64 stays strings rather than lose digits).

``topks.csv``: one row per token x layer x rank: ``q_ix, token_ix, layer_ix, topk_ix,
expert`` (``topk_ix`` 1-based, ``layer_ix`` the model's 0-based layer index), optional
``weight`` (-> ``routing/weights``); other columns are ignored. The recorded layers are
the distinct ``layer_ix`` values, ``top_k`` is the largest ``topk_ix``, ``n_experts`` is the
largest expert + 1 unless given. Every token of ``samples.csv`` needs exactly one row per
(layer, rank); a missing or duplicated cell is an error naming its key.

Rows of either file may come in any order. The store is sorted by ``(q_ix, token_ix)``.

Row numbers in error messages count CSV records with the header as row 1, so they are
line numbers unless a quoted field spans several lines.

Memory and time
---------------
Bounded by ``memory_budget`` (plus the interpreter and pyarrow's read blocks), not by the
file sizes.

Files in store order (samples by ``(q_ix, token_ix)``, topks by ``(q_ix, token_ix, layer_ix,
topk_ix)``, as seed 000 writes them) stream straight into the store: ``topks.csv`` is cut at
line ends into 8 MiB blocks parsed on every core, each whole token block is checked and paired
with its ``samples.csv`` row, and appended. One read of each file (plus the key scan of
``samples.csv``); bench/bench_import.py: 0.84-0.92x of DuckDB's CSV -> Parquet time on 20.7M rows.

Anything else (rows in another order, or an error in the data) goes through external
partitioning, which also names every error's file, row and column:

1. Stream ``samples.csv``'s key columns once; keep a bounded systematic sample of the
   ``(q_ix, token_ix)`` keys, from which P partition boundaries are chosen (quantiles,
   so skewed keys still give balanced partitions). P ~ 6 x file bytes / budget.
2. Stream both files once more, routing every row to its partition's temporary Arrow
   IPC file (next to the output).
3. For each partition, in key order: load it, sort its tokens (O(n log n)), scatter its
   routing rows into a dense ``[n, L, K]`` block (O(rows)), check that every cell was
   filled exactly once, and append to the store.

Two sequential reads of ``samples.csv`` (keys, then every column), one of ``topks.csv``,
one write and read of a compact binary copy (Arrow IPC, ~25 bytes per routing row);
O(R) time for R routing rows plus O(n log n) per partition. Per-question metadata is
held in memory (one row per ``q_ix``).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from moetrace.progress import tqdm

from moetrace.errors import MoetraceError
from moetrace.io.base import (MAX_EXPERTS, MAX_LAYER_ID, POS_RANGE, TOKEN_ID_RANGE, KeySampler, PartitionWriter,
                              check_output_path, check_range, check_weights, n_partitions, partition_bounds,
                              read_partition, resolve_n_experts, staged_store)
from moetrace.store import TraceStore

SAMPLE_KEYS = ("q_ix", "token_ix", "token")
TOPK_KEYS = ("q_ix", "token_ix", "layer_ix", "topk_ix", "expert")
DEFAULT_LABELS = ("domain", "lang", "language", "subject")
DEFAULT_MEMORY_BUDGET = 512 << 20
BLOCK_SIZE = 1 << 20
DEFAULT_MAX_ROW_BYTES = 64 << 20
# Bytes of working memory per byte of topks.csv while a partition is assembled.
MEMORY_PER_CSV_BYTE = 6


def import_csv(
    samples: str | os.PathLike,
    topks: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: list[str] | None = None,
    n_experts: int | None = None,
    model: str | None = None,
    scoring: str | None = None,
    chunk_rows: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
    overwrite: bool = False,
    progress: bool = True,
) -> TraceStore:
    """Import seed 000's ``samples.csv`` and ``topks.csv`` into a new store at ``out``.

    Writes N tokens (rows of ``samples.csv``) sorted by ``(q_ix, token_ix)``:
    ``tokens/seq`` int64 [N] = q_ix, ``tokens/pos`` int32 [N] = token_ix, ``tokens/text``
    str [N], ``tokens/<label>`` uint16 [N], ``routing/experts`` [N, L, K] (uint8/uint16),
    ``routing/weights`` float16 [N, L, K] when ``topks.csv`` has ``weight``, and
    ``sequences/*`` [S] (one row per q_ix). See the module docstring for the format.

    ``labels``: label column names (default: those of ``domain, lang, language, subject``
    present). ``n_experts``: default max expert + 1. ``memory_budget``: bytes of working
    memory to stay under (sets the number of temporary partitions). ``max_row_bytes``: the
    longest CSV record accepted (a longer one, e.g. from an unclosed quote, is an error
    naming its row); memory grows to a few times the longest record. Returns the store,
    opened read-only. Raises MoetraceError naming file, row and column on bad input; no
    store is left at ``out`` then.
    """
    samples_csv = _CsvFile(Path(samples), True, max_row_bytes)
    topks_csv = _CsvFile(Path(topks), False, max_row_bytes)
    samples, topks = samples_csv.path, topks_csv.path
    check_output_path(out, overwrite, (samples, topks))  # before the scans, not after
    sample_names = _header(samples_csv)
    topk_names = _header(topks_csv)
    _require_columns(samples, sample_names, SAMPLE_KEYS)
    _require_columns(topks, topk_names, TOPK_KEYS)
    if labels is None:
        labels = [c for c in DEFAULT_LABELS if c in sample_names]
    else:
        labels = list(labels)
        _require_columns(samples, sample_names, labels, what="label column(s)")
    token_extras = [c for c in ("token_id", "generated") if c in sample_names]
    keyed = [c for c in labels if c in ("q_ix", "token_ix", *token_extras)]
    if keyed:
        raise MoetraceError(f"labels: {keyed[0]!r} is a token column of {samples.name} (-> tokens/), not a label; "
                            f"expected label columns among {[c for c in sample_names if c not in (*SAMPLE_KEYS, *token_extras)]}")
    reserved = set(SAMPLE_KEYS) | set(token_extras) | set(labels)
    seq_columns = [c for c in sample_names if c not in reserved]
    if "seq" in seq_columns:
        raise MoetraceError(f"{samples}: row 1, column seq: a per-question column named 'seq' would collide with "
                            f"sequences/seq (= q_ix); rename it, or pass it in labels / --labels")
    has_weight = "weight" in topk_names

    sample_types = {"q_ix": pa.int64(), "token_ix": pa.int64(), "token": pa.string(),
                    "token_id": pa.int64(), "generated": pa.bool_()}
    sample_types.update({c: pa.string() for c in labels + seq_columns})
    sample_types = {c: t for c, t in sample_types.items() if c in sample_names}
    topk_types = {c: pa.int64() for c in TOPK_KEYS}
    if has_weight:
        topk_types["weight"] = pa.float64()

    # Pass 1: key ranges and a bounded sample of keys (-> partition boundaries, when rows need sorting).
    keys = samples_csv.retrying(lambda: _KeySpace.scan(samples_csv, progress))

    out = Path(out)
    create = dict(labels=labels, model=model, scoring=scoring, weights=has_weight, token_text=True,
                  chunk_rows=chunk_rows)
    with staged_store(out, overwrite, (samples, topks)) as partial:
        try:  # files in store order stream straight into the store (the usual case: seed 000 writes them so)
            fast = topks_csv.retrying(lambda: _import_in_order(
                samples_csv, topks_csv, partial, sample_types, topk_types, token_extras, seq_columns, n_experts,
                create, progress))
        except _OutOfOrder:
            fast = None
            shutil.rmtree(partial, ignore_errors=True)
        if fast is not None:
            fast.close()
        else:
            _import_partitioned(samples_csv, topks_csv, partial, out, keys, sample_types, topk_types, token_extras,
                                seq_columns, n_experts, create, memory_budget, progress)
    return TraceStore.open(out)


def _import_partitioned(samples_csv: "_CsvFile", topks_csv: "_CsvFile", partial: Path, out: Path,
                        keys: "_KeySpace", sample_types: dict, topk_types: dict, token_extras: list[str],
                        seq_columns: list[str], n_experts: int | None, create: dict, memory_budget: int,
                        progress: bool) -> None:
    """Passes 2-4 of the module docstring: rows in any order, through partition files, into ``partial``."""
    samples, topks = samples_csv.path, topks_csv.path
    labels, has_weight = create["labels"], create["weights"]
    est = MEMORY_PER_CSV_BYTE * topks.stat().st_size + 4 * samples.stat().st_size
    bounds = partition_bounds(keys.sample, n_partitions(est, memory_budget))
    n_parts = len(bounds) + 1
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.parts-", dir=out.parent if out.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        # Pass 2: route samples rows to partitions.
        with PartitionWriter(tmp / "samples", n_parts) as writer:
            for row0, batch in _batches(samples_csv, sample_types, progress, "samples.csv"):
                _no_nulls(samples, batch, ["q_ix", "token_ix", *token_extras], row0)
                if "token_id" in token_extras:
                    check_range(samples, "token_id", batch.column("token_id").to_numpy(), *TOKEN_ID_RANGE, row0,
                                hint=" (tokens/token_id is int32; -1 = unknown)")
                key = keys.encode(samples, batch, row0)
                cols = {"key": key, "row": np.arange(row0, row0 + len(key), dtype=np.int64)}
                table = pa.table({**cols, **{c: batch.column(c) for c in batch.schema.names
                                             if c not in ("q_ix", "token_ix")}})
                writer.write(np.searchsorted(bounds, key, side="right"), table)
        # Pass 3: route topks rows to partitions, collecting layers, top_k, max expert.
        layer_set, max_rank, max_expert = topks_csv.retrying(lambda: _route_topks(
            topks_csv, topk_types, tmp / "topks", n_parts, bounds, keys, samples, n_experts, progress))
        if max_expert < 0:
            raise MoetraceError(f"{topks}: no data rows (expected one row per token x layer x rank)")
        L, K = len(layer_set), max_rank
        n_experts = resolve_n_experts(max_expert, n_experts, str(topks), K)
        store = TraceStore.create(partial, n_layers=L, n_experts=n_experts, top_k=K,
                                  layer_ids=layer_set.tolist(), **create)
        # Pass 4: assemble partition by partition, in key order.
        seq_tables = []
        for part in tqdm(range(n_parts), desc="assemble", unit="part", disable=not progress):
            tok = read_partition(tmp / "samples", part)
            if tok is None:
                _no_tokens_for(samples, topks, tmp / "topks", part, keys)
                continue
            tok = tok.take(pa.array(np.argsort(tok.column("key").to_numpy(), kind="stable")))
            key = tok.column("key").to_numpy()
            rows = tok.column("row").to_numpy()
            dup = np.flatnonzero(key[1:] == key[:-1])
            if len(dup):
                q, t = keys.decode(key[dup[0]])
                raise MoetraceError(
                    f"{samples}: rows {rows[dup[0]]} and {rows[dup[0] + 1]}: duplicate token "
                    f"q_ix={q}, token_ix={t} (expected one row per (q_ix, token_ix))")
            routing = _assemble_routing(samples, topks, tmp / "topks", part, key, layer_set, K,
                                        has_weight, keys)
            seq, pos = keys.decode(key)  # token_ix fits int32: checked by the scan
            store.append({**_token_columns(tok, seq, pos, token_extras, labels), **routing})
            seq_tables.append(_sequence_rows(samples, tok, seq, rows, seq_columns))
        store.flush()
        _append_sequences(samples, store, seq_tables, seq_columns)
        store.close()


class _OutOfOrder(Exception):
    """The files are not both in store order (or hold an error): the partitioned import takes over."""


def _import_in_order(samples_csv: "_CsvFile", topks_csv: "_CsvFile", partial: Path, sample_types: dict,
                     topk_types: dict, token_extras: list[str], seq_columns: list[str], n_experts: int | None,
                     create: dict, progress: bool) -> TraceStore:
    """Stream both files into a store at ``partial`` when they are in store order; else :class:`_OutOfOrder`.

    Store order: ``samples.csv`` by ``(q_ix, token_ix)``, ``topks.csv`` by ``(q_ix, token_ix, layer_ix,
    topk_ix)`` with every token's ``L x K`` rows together and the same tokens in both. topks.csv is
    parsed on every core (:func:`_parallel_batches`); each whole token block is checked, paired with
    its samples row and appended, with no partition files and no sort. The store is created at the
    first token (its layers and top-k) with a provisional expert count (256, or 65536 once an id needs
    it) and restricted to the largest id + 1 at the end. Anything unexpected, an error in the data
    included, raises :class:`_OutOfOrder`: the partitioned import then reads the files again and
    reports errors exactly as it always has.
    """
    samples, topks = samples_csv.path, topks_csv.path
    sample_rows = _SampleRows(samples, _batches(samples_csv, sample_types, False, "samples.csv"),
                              ["q_ix", "token_ix", *token_extras])
    store: TraceStore | None = None
    carry: pa.Table | None = None
    carry_row0 = 2
    last: tuple[int, int] | None = None
    max_expert = -1
    seq_tables: list[pa.Table] = []
    try:
        for row0, batch in _parallel_batches(topks_csv, topk_types, progress, "topks.csv"):
            _no_nulls(topks, batch, list(topk_types), row0)
            table = pa.Table.from_batches([batch])
            if carry is not None and carry.num_rows:
                table, row0 = pa.concat_tables([carry, table]).combine_chunks(), carry_row0
            cols = {name: table.column(name).to_numpy() for name in ("q_ix", "token_ix", "layer_ix", "topk_ix",
                                                                    "expert")}
            if store is None:
                q, t = cols["q_ix"], cols["token_ix"]
                other = np.flatnonzero((q != q[0]) | (t != t[0]))
                if not len(other):
                    carry, carry_row0 = table, row0
                    continue
                layer_ids = np.unique(cols["layer_ix"][: other[0]])
                K = int(cols["topk_ix"][: other[0]].max())
                check_range(topks, "layer_ix", layer_ids, 0, MAX_LAYER_ID, row0, what="a layer index")
                per = len(layer_ids) * K
                provisional = n_experts or (256 if int(cols["expert"].max()) < 256 else MAX_EXPERTS)
                if K < 1 or provisional < K:
                    raise _OutOfOrder()
                store = TraceStore.create(partial, n_layers=len(layer_ids), n_experts=provisional, top_k=K,
                                          layer_ids=layer_ids.tolist(), **create)
                want_layer = np.repeat(layer_ids, K)
                want_rank = np.tile(np.arange(1, K + 1), len(layer_ids))
            m = table.num_rows // per
            carry, carry_row0 = table.slice(m * per), row0 + m * per
            if m == 0:
                continue
            block = {name: values[: m * per].reshape(m, per) for name, values in cols.items()}
            if ((block["layer_ix"] != want_layer).any() or (block["topk_ix"] != want_rank).any()
                    or (block["q_ix"] != block["q_ix"][:, :1]).any() or (block["token_ix"] != block["token_ix"][:, :1]).any()):
                raise _OutOfOrder()
            q, t = block["q_ix"][:, 0], block["token_ix"][:, 0]
            check_range(topks, "token_ix", t, *POS_RANGE, row0, what="an int32 position")
            before = (q[1:] < q[:-1]) | ((q[1:] == q[:-1]) & (t[1:] <= t[:-1]))
            if before.any() or (last is not None and (q[0], t[0]) <= last):
                raise _OutOfOrder()
            last = (int(q[-1]), int(t[-1]))
            expert = block["expert"]
            check_range(topks, "expert", expert.reshape(-1), 0, provisional - 1, row0, what="an expert id")
            max_expert = max(max_expert, int(expert.max()))
            tok, tok_rows = sample_rows.take(m)
            if (tok.column("q_ix").to_numpy() != q).any() or (tok.column("token_ix").to_numpy() != t).any():
                raise _OutOfOrder()
            if "token_id" in token_extras:
                check_range(samples, "token_id", tok.column("token_id").to_numpy(), *TOKEN_ID_RANGE, tok_rows,
                            hint=" (tokens/token_id is int32; -1 = unknown)")
            batch_out = _token_columns(tok, q, t, token_extras, create["labels"])
            batch_out["experts"] = expert.reshape(m, len(layer_ids), K)
            if "weight" in topk_types:
                weight = table.column("weight").to_numpy()[: m * per]
                check_weights(topks, "weight", weight, row0)
                batch_out["weights"] = weight.astype(np.float32).reshape(m, len(layer_ids), K)
            store.append(batch_out)
            seq_tables.append(_sequence_rows(samples, tok, q, tok_rows, seq_columns))
        if store is None or (carry is not None and carry.num_rows) or sample_rows.more():
            raise _OutOfOrder()
        store.restrict_n_experts(resolve_n_experts(max_expert, n_experts, str(topks), store.top_k))
        store.flush()
        _append_sequences(samples, store, seq_tables, seq_columns)
        return store
    except _RowTooLong:
        raise  # retried with larger blocks
    except MoetraceError as exc:
        raise _OutOfOrder() from exc


def _token_columns(tok: pa.Table, seq: np.ndarray, pos: np.ndarray, token_extras: list[str],
                   labels: list[str]) -> dict[str, np.ndarray]:
    """The token columns of an append batch from samples.csv rows sorted by (q_ix, token_ix)."""
    batch = {"seq": seq, "pos": pos.astype(np.int32),
             "text": np.asarray(tok.column("token").to_numpy(zero_copy_only=False), dtype=str)}
    if "token_id" in token_extras:
        batch["token_id"] = tok.column("token_id").to_numpy()
    if "generated" in token_extras:
        batch["generated"] = tok.column("generated").to_numpy(zero_copy_only=False).astype(bool)
    for label in labels:
        batch[label] = np.asarray(tok.column(label).to_numpy(zero_copy_only=False), dtype=str)
    return batch


class _SampleRows:
    """samples.csv's rows, taken ``m`` at a time in file order (with their row numbers)."""

    def __init__(self, path: Path, batches, required: list[str]):
        self.path, self.batches, self.required = path, batches, required
        self.held: list[pa.Table] = []
        self.rows = 0
        self.row0 = 2  # row number of the first held row

    def take(self, m: int) -> tuple[pa.Table, np.ndarray]:
        while self.rows < m:
            got = next(self.batches, None)
            if got is None:
                raise _OutOfOrder()
            row0, batch = got
            _no_nulls(self.path, batch, self.required, row0)
            self.held.append(pa.Table.from_batches([batch]))
            self.rows += batch.num_rows
        table = pa.concat_tables(self.held).combine_chunks() if len(self.held) > 1 else self.held[0]
        out, rest = table.slice(0, m), table.slice(m)
        self.held, self.rows = ([rest] if rest.num_rows else []), rest.num_rows
        rows = np.arange(self.row0, self.row0 + m, dtype=np.int64)
        self.row0 += m
        return out, rows

    def more(self) -> bool:
        return self.rows > 0 or next(self.batches, None) is not None


def _route_topks(csv: "_CsvFile", topk_types: dict, base: Path, n_parts: int, bounds: np.ndarray,
                 keys: "_KeySpace", samples: Path, n_experts: int | None, progress: bool):
    """Pass 3: write topks rows to their partitions; return (layer ids, top_k, max expert).

    Starts over (deleting its partition files) when called again after a too-long record.
    """
    for old in base.parent.glob(f"{base.name}-*.arrow"):
        old.unlink()
    topks = csv.path
    layer_set = np.zeros(0, dtype=np.int64)
    max_rank, max_expert = 0, -1
    with PartitionWriter(base, n_parts) as writer:
        for row0, batch in _parallel_batches(csv, topk_types, progress, "topks.csv"):
            _no_nulls(topks, batch, list(topk_types), row0)
            layer = batch.column("layer_ix").to_numpy()
            rank = batch.column("topk_ix").to_numpy()
            expert = batch.column("expert").to_numpy()
            check_range(topks, "layer_ix", layer, 0, MAX_LAYER_ID, row0, what="a layer index")
            check_range(topks, "topk_ix", rank, 1, MAX_EXPERTS, row0, what="a 1-based rank")
            check_range(topks, "expert", expert, 0, (n_experts - 1) if n_experts is not None else MAX_EXPERTS - 1,
                        row0, what="an expert id",
                        hint=f" (n_experts={n_experts})" if n_experts is not None else "")
            layer_set = _union_small(layer_set, layer)
            max_rank = max(max_rank, int(rank.max()))
            max_expert = max(max_expert, int(expert.max()))
            key = keys.encode(topks, batch, row0, samples_path=samples)
            cols = {"key": key, "layer": layer.astype(np.int32), "rank": (rank - 1).astype(np.int32),
                    "expert": expert.astype(np.int32),
                    "row": np.arange(row0, row0 + len(key), dtype=np.int64)}
            if "weight" in topk_types:
                weight = batch.column("weight").to_numpy()
                check_weights(topks, "weight", weight, row0)
                cols["weight"] = weight.astype(np.float32)
            writer.write(np.searchsorted(bounds, key, side="right"), pa.table(cols))
    return layer_set, max_rank, max_expert


# ---------------------------------------------------------------------- reading
class _RowTooLong(MoetraceError):
    """A CSV record longer than the current block size (retried with larger blocks up to the limit)."""


class _CsvFile:
    """One input CSV file: its parse options and the block size its longest record needs.

    pyarrow parses a file in blocks and a record must fit in one block. Blocks start at
    ``BLOCK_SIZE`` (bounded memory); :meth:`retrying` doubles them, up to ``max_row_bytes``,
    when a record does not fit, so a multi-megabyte token is read, not refused.
    """

    def __init__(self, path: Path, newlines_in_values: bool, max_row_bytes: int):
        self.path = path
        self.newlines_in_values = newlines_in_values
        self.max_row_bytes = max(BLOCK_SIZE, int(max_row_bytes))
        self.block_size = BLOCK_SIZE

    def __str__(self) -> str:
        return str(self.path)

    def retrying(self, fn):
        """``fn()``, called again with doubled blocks while it raises :class:`_RowTooLong`."""
        while True:
            try:
                return fn()
            except _RowTooLong:
                if self.block_size >= self.max_row_bytes:
                    raise
                self.block_size = min(2 * self.block_size, self.max_row_bytes)

    def options(self, column_types: dict, bad_rows: list, include: list[str] | None = None) -> dict:
        # No invalid_row_handler: pyarrow decodes the row's text for it and prints an
        # "Exception ignored" traceback when that text is not UTF-8. Its error message
        # names the row instead (see _csv_error).
        return dict(
            read_options=pacsv.ReadOptions(block_size=self.block_size, use_threads=False),
            parse_options=pacsv.ParseOptions(newlines_in_values=self.newlines_in_values),
            convert_options=pacsv.ConvertOptions(
                column_types=column_types, include_columns=include or [], strings_can_be_null=False,
                quoted_strings_can_be_null=False,
                null_values=[""]),  # "nan", "NA", ... are values (refused as such), not empty cells
        )

    def open(self, column_types: dict, bad_rows: list, include: list[str] | None = None):
        """``(raw file, CSV reader)``; ``raw.tell()`` is the bytes of the file read so far."""
        raw = pa.OSFile(str(self.path))
        stream = raw
        if self.path.suffix in (".gz", ".bz2", ".lz4", ".zst", ".br"):
            stream = pa.CompressedInputStream(raw, pa.Codec.detect(str(self.path)).name)
        return raw, pacsv.open_csv(stream, **self.options(column_types, bad_rows, include))

    def too_long(self, row: int) -> _RowTooLong:
        limit = f"{self.block_size / (1 << 20):g} MiB"
        return _RowTooLong(
            f"{self.path}: row {row}: a CSV record longer than {limit} (an unclosed quote? if records really are "
            f"that long, raise max_row_bytes / --max-row-mib, now {self.max_row_bytes / (1 << 20):g} MiB)")


def _header(csv: _CsvFile) -> list[str]:
    """Column names of a CSV file (MoetraceError when missing, empty or unreadable)."""
    path = csv.path
    if not path.is_file():
        raise MoetraceError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MoetraceError(f"{path}: empty file (expected a header row and data rows)")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise MoetraceError(f"{path}: the file is UTF-16 encoded; expected UTF-8 (re-save it as UTF-8)")

    def read() -> list[str]:
        bad: list = []
        try:
            return csv.open({}, bad)[1].schema.names
        except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
            raise _csv_error(csv, exc, bad, {}, 2) from None
        except OSError as exc:
            raise _unreadable(csv, exc) from None

    names = csv.retrying(read)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MoetraceError(f"{path}: row 1: duplicate column name(s) {dup}")
    return names


def _require_columns(path: Path, names: list[str], required, what: str = "column(s)") -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise MoetraceError(f"{path}: row 1: missing {what} {missing} (expected {list(required)}, got {names})")


def _batches(csv: _CsvFile, column_types: dict, progress: bool, desc: str, include: list[str] | None = None):
    """Yield ``(first_row_number, RecordBatch)``; row numbers count the header as row 1."""
    bad: list = []
    include = include or list(column_types)
    row0 = 2
    raw = None
    try:
        raw, reader = csv.open(column_types, bad, include)
        size = csv.path.stat().st_size
        with tqdm(total=size, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
            for batch in reader:
                if batch.num_rows:
                    yield row0, batch
                row0 += batch.num_rows
                bar.update(min(raw.tell(), size) - bar.n)
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise _csv_error(csv, exc, bad, column_types, row0) from None
    except OSError as exc:  # a truncated or damaged compressed stream
        raise _unreadable(csv, exc) from None
    finally:
        if raw is not None:
            raw.close()


PARALLEL_BLOCK = 8 << 20  # bytes of CSV text each thread of _parallel_batches parses at a time


def _parallel_batches(csv: _CsvFile, column_types: dict, progress: bool, desc: str):
    """:func:`_batches` of a file whose records are lines (no newlines inside values), parsed on every core.

    pyarrow's streaming CSV reader parses on one thread. Here the file is cut at line ends
    into blocks of :data:`PARALLEL_BLOCK` bytes, parsed by a thread pool (two blocks per
    thread in flight: memory stays bounded) and yielded in order with their row numbers. A
    block that does not parse, or a file this cannot cut (compressed, values with newlines),
    goes back to :func:`_batches`, which reads from the start and skips the rows already
    yielded, so errors name their row exactly as before.
    """
    workers = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))
    if csv.newlines_in_values or csv.path.suffix in (".gz", ".bz2", ".lz4", ".zst", ".br") or workers == 1:
        yield from _batches(csv, column_types, progress, desc)
        return
    names = _header(csv)
    options = csv.options(column_types, [], list(column_types))
    read = pacsv.ReadOptions(column_names=names, use_threads=False, block_size=PARALLEL_BLOCK + (1 << 20))

    def parse(block: bytes) -> pa.Table:
        return pacsv.read_csv(pa.py_buffer(block), read_options=read, parse_options=options["parse_options"],
                              convert_options=options["convert_options"])

    with open(csv.path, "rb") as fh:
        header = len(fh.readline())

    def blocks():
        with open(csv.path, "rb") as fh:
            fh.seek(header)
            rest = b""
            while True:
                data = fh.read(PARALLEL_BLOCK)
                if not data:
                    if rest.strip():
                        yield rest
                    return
                data = rest + data
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # a record longer than a block: let the serial reader handle the file
                    raise pa.ArrowInvalid("record longer than a block")
                rest = data[cut:]
                yield data[:cut]

    row0 = 2
    size = csv.path.stat().st_size
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="moetrace-csv") as pool, \
            tqdm(total=size, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
        bar.update(header)
        pending: deque = deque()
        source = blocks()
        try:
            while True:
                while len(pending) < 2 * workers:
                    block = next(source, None)
                    if block is None:
                        break
                    pending.append((len(block), pool.submit(parse, block)))
                if not pending:
                    return
                nbytes, future = pending.popleft()
                table = future.result()
                for batch in table.to_batches():
                    if batch.num_rows:
                        yield row0, batch
                    row0 += batch.num_rows
                bar.update(nbytes)
        except (pa.ArrowInvalid, UnicodeDecodeError):
            for future in (f for _, f in pending):
                future.cancel()
    # a block did not parse: the serial reader finds the error, with its row number
    for first, batch in _batches(csv, column_types, False, desc):
        if first + batch.num_rows <= row0:
            continue
        yield max(first, row0), batch.slice(max(0, row0 - first))


def _union_small(seen: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.union1d(seen, values)`` for a few distinct values in a narrow range (layer indices): a bincount, not a sort."""
    if len(values) == 0:
        return seen
    lo, hi = int(values.min()), int(values.max())
    if hi - lo > 1 << 20:
        return np.union1d(seen, np.unique(values))
    present = np.flatnonzero(np.bincount(values - lo, minlength=hi - lo + 1)) + lo
    return np.union1d(seen, present)


def _unreadable(csv: _CsvFile, exc: OSError) -> MoetraceError:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return MoetraceError(f"{csv.path}: unreadable ({text}; a truncated or damaged compressed file?)")


def _csv_error(csv: _CsvFile, exc: Exception, bad: list, column_types: dict, row0: int) -> MoetraceError:
    """Turn a pyarrow CSV error into a one-line MoetraceError naming file, row and column.

    ``row0``: row number of the first record of the block being parsed when it failed.
    """
    path = csv.path
    if isinstance(exc, UnicodeDecodeError):  # the header's names are decoded by Python
        return MoetraceError(f"{path}: row 1: expected UTF-8 text, got invalid bytes "
                             f"({exc.reason} at byte {exc.start} of the header); re-save the file as UTF-8")
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    match = re.match(r"CSV parse error: (?:Row #(\d+): )?Expected (\d+) columns, got (\d+): (.*)", str(exc), re.S)
    if match:
        text = match.group(4) if len(match.group(4)) <= 60 else match.group(4)[:57] + "..."
        where = f"row {match.group(1)}" if match.group(1) else "a row"
        return MoetraceError(f"{path}: {where}: expected {match.group(2)} columns, got {match.group(3)} "
                             f"(truncated or malformed line {text!r})")
    if "Empty CSV file" in message:
        return MoetraceError(f"{path}: empty file (expected a header row and data rows)")
    if "straddling object" in message:
        return csv.too_long(row0)
    match = re.search(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to string: invalid UTF8", message)
    if match:
        names = _names_or_none(csv)
        column = names[int(match.group(1))] if names and int(match.group(1)) < len(names) else f"#{match.group(1)}"
        return MoetraceError(f"{path}: row {match.group(2)}, column {column}: expected UTF-8 text, got invalid "
                             f"bytes (re-save the file as UTF-8)")
    match = re.search(r"In CSV column #(\d+)", message)
    if match:
        located = _locate_bad_value(csv, int(match.group(1)), column_types)
        if located is not None:
            return located
    return MoetraceError(f"{path}: unreadable CSV: {message}")


def _names_or_none(csv: _CsvFile) -> list[str] | None:
    try:
        return csv.open({}, [])[1].schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError):
        return None


_INTEGER_TEXT = re.compile(r"\s*[+-]?\d+\s*")


def _locate_bad_value(csv: _CsvFile, index: int, column_types: dict):
    """Re-read one column as text to find the first value that does not convert."""
    bad: list = []
    try:
        names = _names_or_none(csv)
        if names is None or index >= len(names):
            return None
        name = names[index]
        target = column_types.get(name)
        if target is None:
            return None
        row0 = 2
        for batch in csv.open({name: pa.string()}, bad, [name])[1]:
            col = batch.column(0)
            try:
                pc.cast(col, target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                lo, hi = 0, len(col)  # first failing value by bisection: cast(col[:hi]) fails
                while hi - lo > 1:
                    mid = (lo + hi) // 2
                    try:
                        pc.cast(col.slice(0, mid), target)
                        lo = mid
                    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                        hi = mid
                value = col[hi - 1].as_py()
                kinds = {pa.int64(): "an integer", pa.float64(): "a number", pa.bool_(): "true/false"}
                kind = kinds.get(target, str(target))
                if target == pa.int64() and _INTEGER_TEXT.fullmatch(value):
                    kind = f"an integer in [{np.iinfo(np.int64).min}, {np.iinfo(np.int64).max}]"
                shown = repr(value if len(value) <= 60 else value[:57] + "...")
                return MoetraceError(f"{csv.path}: row {row0 + hi - 1}, column {name}: expected {kind}, got {shown}")
            row0 += batch.num_rows
    except (pa.ArrowInvalid, UnicodeDecodeError, IndexError):
        return None
    return None


def _no_nulls(path: Path, batch: pa.RecordBatch, columns: list[str], row0: int) -> None:
    for name in columns:
        col = batch.column(name)
        if col.null_count:
            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise MoetraceError(f"{path}: row {row0 + i}, column {name}: empty value, expected {col.type}")


class _KeySpace:
    """Maps ``(q_ix, token_ix)`` to one sortable int64 key ``(q - q0) * width + (t - t0)``."""

    def __init__(self, q0: int, q1: int, t0: int, t1: int, sample: np.ndarray):
        self.q0, self.q1, self.t0, self.t1 = q0, q1, t0, t1
        self.width = t1 - t0 + 1
        self.sample = sample

    @classmethod
    def scan(cls, csv: "_CsvFile", progress: bool) -> "_KeySpace":
        samples = csv.path
        types = {"q_ix": pa.int64(), "token_ix": pa.int64()}
        q0 = t0 = np.iinfo(np.int64).max
        q1 = t1 = np.iinfo(np.int64).min
        sampler = KeySampler()
        for row0, batch in _batches(csv, types, progress, "scan samples.csv"):
            _no_nulls(samples, batch, list(types), row0)
            q = batch.column("q_ix").to_numpy()
            t = batch.column("token_ix").to_numpy()
            check_range(samples, "token_ix", t, *POS_RANGE, row0, hint=" (tokens/pos is int32)")
            q0, q1 = min(q0, int(q.min())), max(q1, int(q.max()))
            t0, t1 = min(t0, int(t.min())), max(t1, int(t.max()))
            sampler.add(q, t)
        if sampler.rows == 0:
            raise MoetraceError(f"{samples}: no data rows (expected one row per token)")
        if (q1 - q0 + 1) * (t1 - t0 + 1) >= 2**62:
            raise MoetraceError(
                f"{samples}: q_ix/token_ix ranges too wide ({q0}..{q1} x {t0}..{t1}; expected (q_ix span) x "
                f"(token_ix span) < 2^62: renumber q_ix 0..n-1)")
        space = cls(q0, q1, t0, t1, np.zeros(0, np.int64))
        qs, ts = sampler.columns()
        space.sample = np.sort((qs - q0) * space.width + (ts - t0))
        return space

    def encode(self, path: Path, batch: pa.RecordBatch, row0: int, samples_path: Path | None = None) -> np.ndarray:
        q = batch.column("q_ix").to_numpy()
        t = batch.column("token_ix").to_numpy()
        if samples_path is not None:  # a topks row outside the samples' key ranges
            bad = (q < self.q0) | (q > self.q1) | (t < self.t0) | (t > self.t1)
            if bad.any():
                i = int(np.argmax(bad))
                raise MoetraceError(
                    f"{path}: row {row0 + i}, columns q_ix/token_ix: token q_ix={int(q[i])}, "
                    f"token_ix={int(t[i])} has no row in {samples_path}")
        return (q - self.q0) * self.width + (t - self.t0)

    def decode(self, key):
        """Key(s) -> (q_ix, token_ix)."""
        return key // self.width + self.q0, key % self.width + self.t0


def _no_tokens_for(samples: Path, topks: Path, base: Path, part: int, keys: _KeySpace) -> None:
    """A partition without tokens must not hold routing rows either."""
    table = read_partition(base, part)
    if table is not None and table.num_rows:
        i = int(np.argmin(table.column("row").to_numpy()))
        q, t = keys.decode(int(table.column("key")[i].as_py()))
        raise MoetraceError(
            f"{topks}: row {table.column('row')[i].as_py()}, columns q_ix/token_ix: token q_ix={q}, "
            f"token_ix={t} has no row in {samples}")


def _assemble_routing(samples: Path, topks: Path, base: Path, part: int, key: np.ndarray,
                      layer_ids: np.ndarray, K: int, has_weight: bool, keys: _KeySpace) -> dict:
    """Scatter a partition's topks rows into ``experts`` [n, L, K] (+ ``weights``)."""
    n, L = len(key), len(layer_ids)
    table = read_partition(base, part)
    if table is None:
        table = pa.table({"key": pa.array([], pa.int64()), "layer": pa.array([], pa.int32()),
                          "rank": pa.array([], pa.int32()), "expert": pa.array([], pa.int32()),
                          "row": pa.array([], pa.int64()), "weight": pa.array([], pa.float32())})
    tkey = table.column("key").to_numpy()
    rows = table.column("row").to_numpy()
    tok = np.searchsorted(key, tkey)
    unknown = (tok >= n) | (key[np.minimum(tok, n - 1)] != tkey)
    if unknown.any():
        i = int(np.argmin(np.where(unknown, rows, np.iinfo(np.int64).max)))
        q, t = keys.decode(int(tkey[i]))
        raise MoetraceError(f"{topks}: row {rows[i]}, columns q_ix/token_ix: token q_ix={q}, "
                            f"token_ix={t} has no row in {samples}")
    layer = np.searchsorted(layer_ids, table.column("layer").to_numpy())
    rank = table.column("rank").to_numpy().astype(np.int64)
    cell = (tok * L + layer) * K + rank
    counts = np.bincount(cell, minlength=n * L * K)
    if (counts > 1).any():
        c = int(np.flatnonzero(counts > 1)[0])
        dup_rows = np.sort(rows[cell == c])
        q, t = keys.decode(int(key[c // (L * K)]))
        raise MoetraceError(
            f"{topks}: rows {dup_rows[0]} and {dup_rows[1]}: duplicate key q_ix={q}, token_ix={t}, "
            f"layer_ix={layer_ids[(c // K) % L]}, topk_ix={c % K + 1}")
    if (counts == 0).any():
        c = int(np.argmin(counts))
        q, t = keys.decode(int(key[c // (L * K)]))
        raise MoetraceError(
            f"{topks}: missing row for q_ix={q}, token_ix={t}, layer_ix={layer_ids[(c // K) % L]}, "
            f"topk_ix={c % K + 1} (expected one row per token of {samples.name} x {L} layers x {K} ranks)")
    experts = np.empty(n * L * K, dtype=np.int32)
    experts[cell] = table.column("expert").to_numpy()
    out = {"experts": experts.reshape(n, L, K)}
    if has_weight:
        weights = np.empty(n * L * K, dtype=np.float32)
        weights[cell] = table.column("weight").to_numpy()  # checked when read (pass 3)
        out["weights"] = weights.reshape(n, L, K)
    return out


# ---------------------------------------------------------------------- sequences
def _sequence_rows(samples: Path, tok: pa.Table, seq: np.ndarray, rows: np.ndarray,
                   seq_columns: list[str]) -> pa.Table:
    """First row of every q_ix in a sorted partition; checks columns are constant per q_ix."""
    first = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    same_q = np.r_[False, seq[1:] == seq[:-1]]
    for name in seq_columns:
        values = tok.column(name)
        changed = np.r_[False, pc.not_equal(values.slice(1), values.slice(0, len(values) - 1))
                        .to_numpy(zero_copy_only=False)] if len(values) > 1 else np.zeros(len(values), bool)
        bad = np.flatnonzero(changed & same_q)
        if len(bad):
            i = bad[np.argmin(rows[bad])]
            raise MoetraceError(
                f"{samples}: row {rows[i]}, column {name}: value {values[i].as_py()!r} differs from "
                f"{values[i - 1].as_py()!r} elsewhere in q_ix={seq[i]} (a per-question column must be "
                f"constant within a q_ix; pass it in labels / --labels if it is a per-token label)")
    idx = pa.array(first)
    return pa.table({"seq": pa.array(seq[first]), "row": pa.array(rows[first]),
                     **{name: tok.column(name).take(idx) for name in seq_columns}})


def _append_sequences(samples: Path, store: TraceStore, tables: list[pa.Table], seq_columns: list[str]) -> None:
    if not seq_columns or not tables:
        return
    table = pa.concat_tables(tables)
    seq = table.column("seq").to_numpy()
    rows = table.column("row").to_numpy()
    # A q_ix split across two partitions appears twice: keep one, check they agree.
    again = np.flatnonzero(seq[1:] == seq[:-1]) + 1
    for name in seq_columns:
        col = table.column(name)
        for i in again:
            if col[i].as_py() != col[i - 1].as_py():
                raise MoetraceError(
                    f"{samples}: row {rows[i]}, column {name}: value {col[i].as_py()!r} differs from "
                    f"{col[i - 1].as_py()!r} elsewhere in q_ix={seq[i]} (a per-question column must be "
                    f"constant within a q_ix)")
    keep = pa.array(np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]]))
    table = table.take(keep)
    store.append_sequences({"seq": table.column("seq").to_numpy(),
                            **{name: _typed(table.column(name)) for name in seq_columns}})


_TRUE = ["TRUE", "true", "True"]
_FALSE = ["FALSE", "false", "False"]


def _typed(column: pa.ChunkedArray) -> np.ndarray:
    """Text column [S] -> int64, float64 or bool array when every value parses so, else str.

    A column of integers that do not all fit int64 stays str (float64 would round them)."""
    text = pa.chunked_array(column).combine_chunks()
    if len(text) == 0:
        return np.asarray(text.to_numpy(zero_copy_only=False), dtype=str)
    try:
        return pc.cast(text, pa.int64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    try:  # an integer beyond int64 keeps the column text: float64 would silently round it
        pc.cast(pc.filter(text, pc.match_substring_regex(text, r"^\s*[+-]?\d+\s*$")), pa.int64())
        return pc.cast(text, pa.float64()).to_numpy()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    is_true = pc.is_in(text, pa.array(_TRUE)).to_numpy(zero_copy_only=False)
    is_false = pc.is_in(text, pa.array(_FALSE)).to_numpy(zero_copy_only=False)
    if (is_true | is_false).all():
        return is_true
    return np.asarray(text.to_numpy(zero_copy_only=False), dtype=str)

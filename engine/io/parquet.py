"""The Parquet long format: one row per token x layer x rank, for DuckDB / polars users.

Columns, in this order (an interface other tools rely on: keep it exact):

=============  =========  ==========================================================
``seq``        int64      sequence id (``tokens/seq``)
``pos``        int32      position in the sequence (``tokens/pos``)
``token_id``   int32      vocabulary id, -1 if unknown
``layer``      int16      the model's layer index (``layer_ids[l]``, not ``l``; int32 only
                         when a layer id exceeds 32767)
``rank``       int16      0 = top choice (int32 only when top_k > 32768)
``expert``     int16      expert id (int32 only when n_experts > 32768)
``weight``     float32    routing weight; only when the store has weights
``<label>``    string     one column per label (``domain``, ``lang``, ...), the value
=============  =========  ==========================================================

Two optional columns follow when the store has the data: ``generated`` (bool, written
only when some token is generated) and ``token`` (string, the token text of
``tokens/text``). ``import_parquet`` treats every other string column as a label, so a
file with exactly the columns above (e.g. written by DuckDB) needs no extra flags.

Rows are token-major (tokens sorted by ``seq``, then ``pos``), then layer, then rank
(the ``L x K`` block of a token is contiguous). ``import_parquet`` reads rows in any
order: out-of-order files are sorted on disk with bounded memory. The file's
key-value metadata ``moetrace`` holds a JSON object with the
model facts (``n_experts``, ``top_k``, ``layer_ids``, ``model``, ``scoring``), the label
vocabularies in code order and the ``sequences/*`` columns, so export -> import gives
back an equal store. Without it the importer infers layers, top-k and ``n_experts``
from the rows (one extra pass over three columns).

Both directions stream in row groups / record batches of bounded size; neither
materializes the whole trace. Row numbers in error messages are 0-based.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from moetrace.progress import tqdm

from moetrace.errors import MoetraceError
from moetrace.io.base import (MAX_EXPERTS, MAX_LAYER_ID, POS_RANGE, SEQ_RANGE, TOKEN_ID_RANGE, KeySampler,
                              PartitionWriter, check_range, check_weights, n_partitions, partition_bounds,
                              read_ahead, read_partition, resolve_n_experts, staged_store)
from moetrace.kernels.blocks import first_break_in_string_blocks
from moetrace.store import RANK_ORDERS, TraceStore

META_KEY = b"moetrace"
META_FORMAT = "moetrace-long"
META_VERSION = 1
REQUIRED = ("seq", "pos", "layer", "rank", "expert")
DEFAULT_ROW_GROUP_ROWS = 1 << 20
READ_BATCH_ROWS = 1 << 18
DEFAULT_MEMORY_BUDGET = 512 << 20
# Bytes of working memory per byte of a partition's Arrow rows while it is sorted and validated
# (measured ~6 on a 2.56M-row file: int64 copies of the integer columns, the sort order, takes).
MEMORY_PER_BYTE = 6


def _small_int(largest: int, what: str) -> pa.DataType:
    """int16 when ``largest`` fits, else int32; MoetraceError beyond int32."""
    if largest <= np.iinfo(np.int16).max:
        return pa.int16()
    if largest <= np.iinfo(np.int32).max:
        return pa.int32()
    raise MoetraceError(f"{what}: {largest} does not fit the long format's int32 column")


def long_schema(store: TraceStore, generated: bool = False, metadata: dict | None = None) -> pa.Schema:
    """The Arrow schema :func:`export_parquet` writes for ``store``.

    ``layer``, ``rank`` and ``expert`` are int16 unless the store's largest layer id,
    rank (``top_k - 1``) or expert id (``n_experts - 1``) needs int32.
    """
    layer_ids = store.layer_ids
    fields = [
        pa.field("seq", pa.int64()), pa.field("pos", pa.int32()), pa.field("token_id", pa.int32()),
        pa.field("layer", _small_int(int(layer_ids.max()) if len(layer_ids) else 0, f"{store.path}: layer id")),
        pa.field("rank", _small_int(store.top_k - 1, f"{store.path}: rank")),
        pa.field("expert", _small_int(store.n_experts - 1, f"{store.path}: expert id")),
    ]
    if store.has_weights:
        fields.append(pa.field("weight", pa.float32()))
    fields += [pa.field(label, pa.string()) for label in store.label_names]
    if generated:
        fields.append(pa.field("generated", pa.bool_()))
    if store.has_token_text:
        fields.append(pa.field("token", pa.string()))
    meta = None if metadata is None else {META_KEY: json.dumps(metadata).encode()}
    return pa.schema(fields, metadata=meta)


def export_parquet(
    store: TraceStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
    compression: str = "zstd",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Write ``store`` as a long-format Parquet file (see the module docstring).

    ``N`` tokens give ``N * L * K`` rows, written chunk by chunk of the store into row
    groups of ``row_group_rows`` rows (the last may be shorter), ``compression``
    (default zstd). The file is written to ``OUT.partial-<pid>`` and renamed when
    complete. Returns the output path.
    """
    if not isinstance(store, TraceStore):
        store = TraceStore.open(store)
    out = Path(out)
    if row_group_rows < 1:
        raise MoetraceError(f"row_group_rows: expected a positive integer, got {row_group_rows}")
    L, K = store.n_layers, store.top_k
    generated = any(bool(c["generated"].any()) for c in store.iter_chunks(["generated"]))
    schema = long_schema(store, generated, _metadata(store))
    layer = np.repeat(store.layer_ids.astype(schema.field("layer").type.to_pandas_dtype()), K)
    rank = np.tile(np.arange(K, dtype=schema.field("rank").type.to_pandas_dtype()), L)
    vocab = {label: pa.array(values or [""], pa.string()) for label, values in store.labels.items()}
    columns = ["seq", "pos", "token_id", "experts", *store.label_names]
    columns += ["weights"] * store.has_weights + ["generated"] * generated + ["text"] * store.has_token_text
    with staged_store(out, overwrite, (store.path,)) as partial:
        with pq.ParquetWriter(partial, schema, compression=compression) as writer:
            pending: list[pa.Table] = []
            pending_rows = 0
            chunks = store.iter_chunks(columns)
            for chunk in tqdm(chunks, desc="export", unit="chunk", disable=not progress,
                              total=-(-len(store) // store.chunk_rows)):
                n = len(chunk)
                per = L * K
                data: dict[str, Any] = {
                    "seq": np.repeat(chunk["seq"], per),
                    "pos": np.repeat(chunk["pos"], per),
                    "token_id": np.repeat(chunk["token_id"], per),
                    "layer": np.tile(layer, n),
                    "rank": np.tile(rank, n),
                    "expert": chunk["experts"].reshape(-1).astype(schema.field("expert").type.to_pandas_dtype()),
                }
                if store.has_weights:
                    data["weight"] = chunk["weights"].reshape(-1).astype(np.float32)
                for label in store.label_names:
                    data[label] = vocab[label].take(pa.array(np.repeat(chunk[label], per)))
                if generated:
                    data["generated"] = np.repeat(chunk["generated"], per)
                if store.has_token_text:
                    text = pa.array(np.asarray(chunk["text"], dtype=object), pa.string())
                    data["token"] = text.take(pa.array(np.repeat(np.arange(n), per)))
                pending.append(pa.table(data, schema=schema))
                pending_rows += n * per
                if pending_rows >= row_group_rows:
                    table = pa.concat_tables(pending)
                    whole = pending_rows // row_group_rows * row_group_rows
                    writer.write_table(table.slice(0, whole), row_group_size=row_group_rows)
                    pending, pending_rows = [table.slice(whole)], pending_rows - whole
            if pending_rows:
                writer.write_table(pa.concat_tables(pending), row_group_size=row_group_rows)
    return out


def _metadata(store: TraceStore) -> dict:
    seqs = store.read_sequences()
    return {
        "format": META_FORMAT, "version": META_VERSION, "model": store.model, "scoring": store.scoring,
        "rank_order": store.rank_order, "n_experts": store.n_experts, "top_k": store.top_k, "layer_ids": store.layer_ids.tolist(),
        "labels": store.labels,
        "sequences": {name: {"dtype": _dtype_name(values), "values": values.tolist()}
                      for name, values in seqs.items()},
    }


def _dtype_name(values: np.ndarray) -> str:
    return "str" if values.dtype.kind in "OUT" else str(values.dtype)


def import_parquet(
    path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    n_experts: int | None = None,
    chunk_rows: int | None = None,
    batch_rows: int = READ_BATCH_ROWS,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    overwrite: bool = False,
    progress: bool = True,
) -> TraceStore:
    """Import a long-format Parquet file (see the module docstring) into a new store.

    Rows may come in any order. A file in store order (tokens by ``(seq, pos)``, a
    token's rows by layer then rank, as :func:`export_parquet` writes them) streams
    straight into the store, ``batch_rows`` rows at a time; any other order is sorted on
    disk first (temporary partitions next to ``out``, working memory about
    ``memory_budget`` bytes), so the store keeps each sequence's rows contiguous in
    increasing ``pos`` order. A duplicate row, or a token without exactly one row per
    (layer, rank), is an error naming the file row. ``n_experts``: default from the
    file's metadata, else max expert + 1. Returns the store (``N`` = rows / (L * K)
    tokens) opened read-only.
    """
    path = Path(path)
    pf = _open_parquet(path)
    schema = pf.schema_arrow
    names = schema.names
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise MoetraceError(f"{path}: duplicate column name(s) {dup} (expected each column once)")
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise MoetraceError(f"{path}: missing column(s) {missing} (expected {list(REQUIRED)} "
                            f"+ optional token_id, weight, label columns; got {names})")
    for name in (*REQUIRED, "token_id"):
        if name in names and not pa.types.is_integer(schema.field(name).type):
            raise MoetraceError(f"{path}: column {name}: expected an integer type, got {schema.field(name).type}")
    if "weight" in names and not pa.types.is_floating(schema.field("weight").type):
        raise MoetraceError(f"{path}: column weight: expected a floating-point type, got {schema.field('weight').type}")
    if "generated" in names and not pa.types.is_boolean(schema.field("generated").type):
        raise MoetraceError(f"{path}: column generated: expected bool, got {schema.field('generated').type}")
    known = {*REQUIRED, "token_id", "weight", "generated", "token"}
    labels = [n for n in names if n not in known and _is_string(schema.field(n).type)]
    other = [n for n in names if n not in known and n not in labels]
    if other:
        raise MoetraceError(f"{path}: unexpected non-string column(s) {other} (labels must be string columns)")
    if "token" in names and not _is_string(schema.field("token").type):
        raise MoetraceError(f"{path}: column token: expected strings (token text), got {schema.field('token').type}")
    if pf.metadata.num_rows == 0:
        raise MoetraceError(f"{path}: no rows (expected one row per token x layer x rank)")

    meta = _read_metadata(path, schema)
    if meta is not None:
        layer_ids = np.asarray(meta["layer_ids"], dtype=np.int64)
        top_k = int(meta["top_k"])
        max_expert = int(meta["n_experts"]) - 1
        meta_labels = meta.get("labels", {})
        vocab: Any = {label: meta_labels.get(label, []) for label in labels}
        if any(label not in meta_labels for label in labels):
            vocab = labels
    else:
        layer_ids, top_k, max_expert = _scan_shape(path, pf, batch_rows)
        vocab = labels
    n_experts = resolve_n_experts(max_expert, n_experts, str(path), top_k)
    L, K = len(layer_ids), top_k
    has_weight = "weight" in names
    with staged_store(out, overwrite, (path,)) as partial:
        create = dict(
            n_layers=L, n_experts=n_experts, top_k=K, layer_ids=layer_ids.tolist(), labels=vocab,
            model=None if meta is None else meta.get("model"), scoring=None if meta is None else meta.get("scoring"),
            rank_order="ranked" if meta is None else meta.get("rank_order", "ranked"), weights=has_weight, token_text="token" in names, chunk_rows=chunk_rows)
        store = TraceStore.create(partial, **create)
        try:  # a file in store order streams straight in; any other order is sorted on disk first
            _import_in_file_order(path, pf, store, batch_rows, layer_ids, K, labels, n_experts, progress)
        except _OutOfOrder:
            store = TraceStore.create(partial, overwrite=True, **create)
            with tempfile.TemporaryDirectory(prefix=f".{partial.name}.parts-", dir=partial.parent) as tmp:
                _import_sorted(path, pf, store, Path(tmp), batch_rows, memory_budget, layer_ids, K, labels,
                               n_experts, progress)
        store.flush()
        if meta is not None and meta.get("sequences"):
            store.append_sequences({name: _sequence_values(col) for name, col in meta["sequences"].items()})
        store.close()
    return TraceStore.open(out)


class _OutOfOrder(MoetraceError):
    """Rows not in store order: the in-order import gives up and the sorting one starts."""


def _import_in_file_order(path: Path, pf: pq.ParquetFile, store: TraceStore, batch_rows: int,
                          layer_ids: np.ndarray, K: int, labels: list[str], n_experts: int, progress: bool) -> None:
    """Append the file's token blocks in file order; raises _OutOfOrder at the first row out of store order."""
    L = len(layer_ids)
    per = L * K
    carry: pa.Table | None = None
    offset = 0  # file row number of carry's first row
    last_token: tuple[int, int] | None = None
    # the next batch is decoded (pyarrow, no GIL) on the other core while this one is checked and written
    batches = read_ahead(_iter_batches(path, pf, batch_size=max(int(batch_rows), per)))
    for batch in tqdm(batches, desc="import", unit="batch", disable=not progress,
                      total=-(-pf.metadata.num_rows // max(int(batch_rows), per))):
        table = pa.Table.from_batches([batch])
        if carry is not None and carry.num_rows:
            table = pa.concat_tables([_plain(carry), _plain(table)])
        table = table.combine_chunks()
        m = table.num_rows // per
        if m:
            last_token = _append_blocks(path, store, table.slice(0, m * per), offset, layer_ids, K, labels,
                                        n_experts, last_token)
        carry = table.slice(m * per)
        offset += m * per
    if carry is not None and carry.num_rows:
        seq, pos = carry.column("seq")[0].as_py(), carry.column("pos")[0].as_py()
        raise MoetraceError(
            f"{path}: row {offset}: token seq={seq}, pos={pos} has only {carry.num_rows} of its "
            f"{per} rows ({L} layers x {K} ranks; incomplete token block at the end of the file)")


KEY_DTYPE = np.dtype([("seq", np.int64), ("pos", np.int64)])  # sorts and searches lexicographically
ROW = "__moetrace_row"


def _import_sorted(path: Path, pf: pq.ParquetFile, store: TraceStore, tmp: Path, batch_rows: int,
                   memory_budget: int, layer_ids: np.ndarray, K: int, labels: list[str], n_experts: int,
                   progress: bool) -> None:
    """Append the file's rows sorted by ``(seq, pos, layer, rank)``, in memory bounded by ``memory_budget``.

    External partitioning (like the CSV importer's): one pass over ``seq, pos`` keeps a
    bounded systematic sample of the token keys, whose quantiles split the key space into
    P ~ MEMORY_PER_BYTE x (the rows' bytes in Arrow) / budget partitions; a second pass
    writes every row (with its file row number, for error messages) to its partition's
    Arrow IPC file in ``tmp``; then each partition is sorted in memory and appended.
    """
    L = len(layer_ids)
    per = L * K
    sampler = KeySampler()
    for batch in _iter_batches(path, pf, batch_size=batch_rows, columns=["seq", "pos"]):
        sampler.add(_token_keys(path, batch, sampler.rows))
    raw = pf.metadata.num_rows * _row_bytes(pf.schema_arrow)
    bounds = partition_bounds(np.sort(sampler.columns()[0]), n_partitions(MEMORY_PER_BYTE * raw, memory_budget))
    n_parts = len(bounds) + 1
    with PartitionWriter(tmp / "rows", n_parts) as writer:
        offset = 0
        for batch in tqdm(_iter_batches(path, pf, batch_size=batch_rows), desc="partition", unit="batch",
                          disable=not progress):
            table = _plain(pa.Table.from_batches([batch]))
            key = _token_keys(path, table, offset)
            table = table.append_column(ROW, pa.array(np.arange(offset, offset + len(key), dtype=np.int64)))
            writer.write(np.searchsorted(bounds, key, side="right"), table)
            offset += len(key)
    last: tuple[int, int] | None = None
    for part in tqdm(range(n_parts), desc="sort", unit="part", disable=not progress):
        table = read_partition(tmp / "rows", part)
        if table is None:
            continue
        rows = table.column(ROW).to_numpy()
        cols = [_ints(path, table, name, lo, hi, rows, what) for name, lo, hi, what in (
            ("seq", *SEQ_RANGE, "an int64 sequence id"), ("pos", *POS_RANGE, "an int32 position"),
            ("layer", 0, MAX_LAYER_ID, "a layer index"), ("rank", 0, K - 1, "a rank"))]
        order = np.lexsort(cols[::-1])
        table, rows = table.take(pa.array(order)), rows[order]
        seq, pos, layer, rank = (c[order] for c in cols)
        same = (seq[1:] == seq[:-1]) & (pos[1:] == pos[:-1])
        dup = same & (layer[1:] == layer[:-1]) & (rank[1:] == rank[:-1])
        if dup.any():
            i = int(np.argmax(dup))
            raise MoetraceError(f"{path}: row {rows[i + 1]}: duplicate token seq={seq[i]}, pos={pos[i]} (its row for "
                                f"layer {layer[i]}, rank {rank[i]} is also row {rows[i]}; expected each row once)")
        starts = np.flatnonzero(np.r_[True, ~same])
        counts = np.diff(np.r_[starts, len(seq)])
        if (counts != per).any():
            j = starts[int(np.argmax(counts != per))]
            raise MoetraceError(
                f"{path}: row {rows[j]}: token seq={seq[j]}, pos={pos[j]} has {counts[np.argmax(counts != per)]} "
                f"rows, expected {per} ({L} layers x {K} ranks)")
        last = _append_blocks(path, store, table.drop_columns([ROW]), rows, layer_ids, K, labels, n_experts, last)


def _row_bytes(schema: pa.Schema) -> int:
    """Bytes of one row in Arrow memory (strings counted as 20), plus the file-row column."""
    total = 8
    for field in schema:
        t = field.type.value_type if pa.types.is_dictionary(field.type) else field.type
        try:
            total += max(1, t.bit_width // 8)
        except ValueError:  # variable width
            total += 20
    return total


def _plain(table: pa.Table) -> pa.Table:
    """Dictionary-encoded columns decoded (batches of one file may carry different dictionaries)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def _ints(path: Path, table, name: str, lo: int, hi: int, rows, what: str) -> np.ndarray:
    """Integer column ``name`` as int64 [n], after null and range checks in its file dtype (nothing wraps).

    ``rows``: file row number of the first row, or of every row."""
    col = table.column(name)
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    _no_nulls(path, name, col, rows)
    values = col.to_numpy(zero_copy_only=False)
    check_range(path, name, values, lo, hi, rows, what=what)
    return values.astype(np.int64)


def _token_keys(path: Path, table, rows) -> np.ndarray:
    """``(seq, pos)`` of every row as a KEY_DTYPE array [n] (range-checked)."""
    key = np.empty(table.num_rows, KEY_DTYPE)
    key["seq"] = _ints(path, table, "seq", *SEQ_RANGE, rows, "an int64 sequence id")
    key["pos"] = _ints(path, table, "pos", *POS_RANGE, rows, "an int32 position")
    return key


def _row(rows, k: int) -> int:
    """File row number of table row ``k``: ``rows`` is the first row's number or every row's."""
    return int(rows + k) if np.isscalar(rows) else int(rows[k])


def _is_string(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _open_parquet(path: Path) -> pq.ParquetFile:
    if not path.is_file():
        raise MoetraceError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise MoetraceError(f"{path}: empty file (expected a Parquet file)")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MoetraceError(f"{path}: not a readable Parquet file (truncated or corrupt: {first})") from None


def _iter_batches(path: Path, pf: pq.ParquetFile, **kwargs):
    """``pf.iter_batches(**kwargs)`` (columns decoded on every core); a corrupt page or footer is a
    one-line MoetraceError, and so are fewer rows than the footer promises (pyarrow ends the
    iteration early, without an error, when a damaged page header says it holds no values)."""
    batches = pf.iter_batches(use_threads=True, **kwargs)
    offset = 0
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            if offset != pf.metadata.num_rows:
                raise MoetraceError(f"{path}: row {offset}: not a readable Parquet file (truncated or corrupt: "
                                    f"the footer counts {pf.metadata.num_rows} rows, the pages hold {offset})"
                                    ) from None
            return
        except (pa.ArrowException, OSError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise MoetraceError(f"{path}: row {offset}: not a readable Parquet file (truncated or corrupt: "
                                f"{first})") from None
        offset += batch.num_rows
        yield batch


def _read_metadata(path: Path, schema: pa.Schema) -> dict | None:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError:
        raise MoetraceError(f"{path}: metadata 'moetrace': expected JSON, got unreadable bytes") from None
    except RecursionError:
        raise MoetraceError(f"{path}: metadata 'moetrace': JSON nested too deeply") from None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise MoetraceError(f"{path}: metadata 'moetrace': expected format {META_FORMAT!r}")
    version = meta.get("version", 0)
    if not _is_int(version) or version > META_VERSION:
        raise MoetraceError(f"{path}: metadata 'moetrace': version {_short(version)} is not one this moetrace "
                            f"reads (up to {META_VERSION})")
    _check_metadata(path, meta)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


SEQUENCE_DTYPES = ("str", "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                   "float16", "float32", "float64")


def _check_metadata(path: Path, meta: dict) -> None:
    """MoetraceError naming the first field of the 'moetrace' metadata that is malformed."""
    def bad(field: str, expected: str, got: Any) -> MoetraceError:
        return MoetraceError(f"{path}: metadata 'moetrace': {field}: expected {expected}, got {_short(got)}")

    for field in ("n_experts", "top_k"):
        value = meta.get(field)
        if not _is_int(value) or not 1 <= value <= MAX_EXPERTS:
            raise bad(field, f"an integer in [1, {MAX_EXPERTS}]", value)
    ids = meta.get("layer_ids")
    if (not isinstance(ids, list) or not ids or not all(_is_int(x) and 0 <= x <= MAX_LAYER_ID for x in ids)
            or any(b <= a for a, b in zip(ids, ids[1:]))):
        raise bad("layer_ids", f"a non-empty increasing list of layer indices in [0, {MAX_LAYER_ID}]", ids)
    for field in ("model", "scoring"):
        if meta.get(field) is not None and not isinstance(meta[field], str):
            raise bad(field, "a string or null", meta[field])
    if meta.get("rank_order", "ranked") not in RANK_ORDERS:
        raise bad("rank_order", f"one of {', '.join(RANK_ORDERS)}", meta.get("rank_order"))
    labels = meta.get("labels", {})
    if not isinstance(labels, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) and len(set(v)) == len(v)
            for v in labels.values()):
        raise bad("labels", "an object of label name -> list of distinct strings", labels)
    sequences = meta.get("sequences") or {}
    if not isinstance(sequences, dict):
        raise bad("sequences", "an object of column name -> {dtype, values}", sequences)
    for name, column in sequences.items():
        if (not isinstance(column, dict) or column.get("dtype", "str") not in SEQUENCE_DTYPES
                or not isinstance(column.get("values"), list)):
            raise bad(f"sequences.{name}", f"{{\"dtype\": one of {list(SEQUENCE_DTYPES)}, \"values\": [...]}}",
                      column)
        try:
            _sequence_values(column)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"sequences.{name}.values", f"a flat list of {column.get('dtype', 'str')} values",
                      column["values"]) from None


def _scan_shape(path: Path, pf: pq.ParquetFile, batch_rows: int) -> tuple[np.ndarray, int, int]:
    """One pass over layer/rank/expert: (sorted layer ids, top_k, max expert)."""
    layers = np.zeros(0, dtype=np.int64)
    max_rank, max_expert, offset = -1, -1, 0
    for batch in _iter_batches(path, pf, batch_size=batch_rows, columns=["layer", "rank", "expert"]):
        cols = {}
        for name, hi, what in (("layer", MAX_LAYER_ID, "a layer index"), ("rank", MAX_EXPERTS - 1, "a rank"),
                               ("expert", MAX_EXPERTS - 1, "an expert id")):
            col = batch.column(name)
            _no_nulls(path, name, col, offset)
            values = col.to_numpy()
            check_range(path, name, values, 0, hi, offset, what=what)  # before the cast: nothing wraps
            cols[name] = values.astype(np.int64)
        layers = np.union1d(layers, np.unique(cols["layer"]))
        max_rank = max(max_rank, int(cols["rank"].max()))
        max_expert = max(max_expert, int(cols["expert"].max()))
        offset += batch.num_rows
    return layers, max_rank + 1, max_expert


def _no_nulls(path: Path, name: str, col: pa.Array, rows) -> None:
    if col.null_count:
        i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise MoetraceError(f"{path}: row {_row(rows, i)}, column {name}: expected a value, got null")


def _append_blocks(path: Path, store: TraceStore, table: pa.Table, rows, layer_ids: np.ndarray,
                   K: int, labels: list[str], n_experts: int, last_token: tuple[int, int] | None):
    """Validate ``m`` whole token blocks (``m * L * K`` rows) and append; return the last ``(seq, pos)``.

    ``rows``: file row number of the table's first row (rows in file order), or int64 [m * L * K]
    of every row's (rows sorted). Raises _OutOfOrder when the rows are not in store order.
    """
    L = len(layer_ids)
    per = L * K
    m = table.num_rows // per

    def numeric(name: str, lo: int | None = None, hi: int | None = None, what: str = "an integer") -> np.ndarray:
        """Column ``name`` as NumPy; integers range-checked in their file dtype, then int64."""
        if lo is not None:
            return _ints(path, table, name, lo, hi, rows, what)
        col = table.column(name).combine_chunks()
        _no_nulls(path, name, col, rows)
        return col.to_numpy(zero_copy_only=False)

    def fail(name: str, flat: int, expected: Any, got: Any) -> None:
        raise _OutOfOrder(
            f"{path}: row {_row(rows, flat)}, column {name}: expected {expected}, got {got} (the {per} rows "
            f"of a token, {L} layers x {K} ranks, must be contiguous and ordered by layer then rank)")

    layer = numeric("layer", 0, MAX_LAYER_ID, "a layer index").reshape(m, L, K)
    want = np.broadcast_to(layer_ids[None, :, None], layer.shape)
    if (layer != want).any():
        flat = int(np.argmax((layer != want).reshape(-1)))
        fail("layer", flat, int(want.reshape(-1)[flat]), int(layer.reshape(-1)[flat]))
    rank = numeric("rank", 0, K - 1, "a rank").reshape(m, L, K)
    want = np.broadcast_to(np.arange(K)[None, None, :], rank.shape)
    if (rank != want).any():
        flat = int(np.argmax((rank != want).reshape(-1)))
        fail("rank", flat, int(want.reshape(-1)[flat]), int(rank.reshape(-1)[flat]))
    expert = numeric("expert", 0, n_experts - 1, "an expert id")
    first = np.arange(m) * per
    batch: dict[str, Any] = {"experts": expert.reshape(m, L, K)}
    ranges = {"seq": (*SEQ_RANGE, "an int64 sequence id"), "pos": (*POS_RANGE, "an int32 position"),
              "token_id": (*TOKEN_ID_RANGE, "an int32 vocabulary id (-1 = unknown)"), "generated": (None, None)}
    per_token = ["seq", "pos"] + [c for c in ("token_id", "generated") if c in table.column_names]
    for name in per_token:
        values = numeric(name, *ranges[name]).reshape(m, per)
        diff = values != values[:, :1]
        if diff.any():
            flat = int(np.argmax(diff.reshape(-1)))
            fail(name, flat, values.reshape(-1)[flat // per * per].item(), values.reshape(-1)[flat].item())
        batch[name] = values[:, 0]
    for name in labels + ["token"] * ("token" in table.column_names):
        col = table.column(name).combine_chunks()
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        _no_nulls(path, name, col, rows)
        flat = _first_break(col, per)
        if flat >= 0:
            fail(name, flat, repr(col[flat // per * per].as_py()), repr(col[flat].as_py()))
        values = np.asarray(col.take(pa.array(first)).to_numpy(zero_copy_only=False), dtype=str)
        batch["text" if name == "token" else name] = values
    if "weight" in table.column_names:
        weight = numeric("weight")
        check_weights(path, "weight", weight, rows)
        batch["weights"] = weight.astype(np.float32).reshape(m, L, K)
    _check_token_order(path, batch["seq"], batch["pos"], rows, per, last_token)
    store.append(batch)
    return int(batch["seq"][-1]), int(batch["pos"][-1])


def _first_break(col: pa.Array, per: int) -> int:
    """The first row of a string column that differs from its token block's first row, or -1."""
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        _, offsets, data = col.buffers()
        width = np.int32 if pa.types.is_string(col.type) else np.int64
        offsets = np.frombuffer(offsets, dtype=width)[col.offset: col.offset + len(col) + 1]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
        return int(first_break_in_string_blocks(offsets, data, per))
    heads = col.take(pa.array(np.repeat(np.arange(0, len(col), per), per)[: len(col)]))
    same = pc.equal(col, heads).to_numpy(zero_copy_only=False)  # e.g. string_view: compared by Arrow
    return -1 if same.all() else int(np.argmin(same))


def _check_token_order(path: Path, seq: np.ndarray, pos: np.ndarray, rows, per: int,
                       last_token: tuple[int, int] | None) -> None:
    """_OutOfOrder unless tokens come in strictly increasing ``(seq, pos)`` order.

    ``seq``, ``pos``: int64 [m], one per token of ``per`` rows; ``rows`` as in
    :func:`_append_blocks`; ``last_token``: the previous batch's last ``(seq, pos)``.
    """
    prev_seq = np.r_[seq[:1] if last_token is None else [last_token[0]], seq[:-1]]
    prev_pos = np.r_[pos[:1] if last_token is None else [last_token[1]], pos[:-1]]
    bad = (seq < prev_seq) | ((seq == prev_seq) & (pos <= prev_pos))
    if last_token is None:
        bad[0] = False
    if bad.any():
        i = int(np.argmax(bad))
        raise _OutOfOrder(f"{path}: row {_row(rows, i * per)}: token seq={int(seq[i])}, pos={int(pos[i])} comes "
                          f"after seq={int(prev_seq[i])}, pos={int(prev_pos[i])}")


def _sequence_values(column: dict) -> np.ndarray:
    """A ``sequences`` metadata column -> array [S]; raises TypeError/ValueError/OverflowError when the
    values do not fit ``dtype`` exactly (checked by :func:`_check_metadata` before any store exists)."""
    dtype = column.get("dtype", "str")
    values = column["values"]
    if dtype == "str":
        if not all(isinstance(v, str) for v in values):
            raise TypeError("expected strings")
        return np.asarray(values, dtype=str).reshape(len(values))
    if dtype == "bool":
        if not all(isinstance(v, bool) for v in values):
            raise TypeError("expected true/false")
        return np.asarray(values, dtype=bool).reshape(len(values))
    if dtype.startswith(("int", "uint")):
        if not all(_is_int(v) for v in values):
            raise TypeError("expected integers")
        info = np.iinfo(np.dtype(dtype))
        if any(not info.min <= v <= info.max for v in values):
            raise OverflowError(f"expected values that fit {dtype}")
    elif not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise TypeError("expected numbers")
    return np.asarray(values, dtype=np.dtype(dtype)).reshape(len(values))

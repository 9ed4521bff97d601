"""The trace store: a chunked Zarr v3 group holding one row per routed token.

Layout (see ARCHITECTURE.md; other Zarr readers can read it directly)::

    <store>/zarr.json              group; attributes["moetrace"] holds the model facts,
                                   the label vocabularies and ``committed``
    tokens/seq        [N]        int64    sequence id
    tokens/pos        [N]        int32    position in the sequence
    tokens/token_id   [N]        int32    vocabulary id, -1 if unknown
    tokens/generated  [N]        bool     produced by the model, not given in the prompt
    tokens/text       [N]        str      token text (optional, e.g. from seed 000's CSV)
    tokens/<label>    [N]        uint16   code into attributes["moetrace"]["labels"][label]
    routing/experts   [N, L, K]  uint8 (uint16 when E > 256)  chosen experts, rank 0 first
    routing/weights   [N, L, K]  float16  routing weight applied (optional)
    routing/probs     [N, L, E]  float16  full router distribution (optional)
    sequences/<col>   [S]        any      per-sequence metadata, ``sequences/seq`` the id

Every array is chunked along N only, so the whole L x K block of a token stays
contiguous. Crash safety: appended rows are buffered and written as whole chunks
(``flush`` also writes the tail); after *every* array of a batch is written, the
``committed`` row count in the group attributes is raised in one atomic file write
(zarr's LocalStore writes each key to a temporary file and renames it). Readers only
ever see ``committed`` rows, and a writer that reopens a store after a crash truncates
whatever lies beyond ``committed`` and appends from there.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from engine.errors import MoetraceError

FORMAT_VERSION = 1
ATTR_KEY = "moetrace"

TOKEN_COLUMNS = ("seq", "pos", "token_id", "generated")
TOKEN_DTYPES = {"seq": np.int64, "pos": np.int32, "token_id": np.int32, "generated": np.bool_}
ROUTING_COLUMNS = ("experts", "weights", "probs")
LABEL_DTYPE = np.uint16
MAX_LABEL_VALUES = int(np.iinfo(LABEL_DTYPE).max) + 1

# Chosen by bench/bench_store.py (numbers in bench/RESULTS.md): lz4 + bitshuffle keeps
# zstd's compression ratio on routing ids at twice its decompression speed; 8 MiB chunks
# halve the per-chunk overhead of 4 MiB ones when scanning.
DEFAULT_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
# Target uncompressed size of one routing/experts chunk.
TARGET_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 8 << 20


def _codec(spec: Mapping[str, Any]) -> BloscCodec:
    return BloscCodec(cname=spec["cname"], clevel=int(spec["clevel"]), shuffle=spec["shuffle"])


def _check_meta(path, meta: Any) -> None:
    """Refuse a group whose moetrace attribute is missing or of a newer format version."""
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise MoetraceError(f"{path}: not a moetrace store (no '{ATTR_KEY}' group attribute)")
    version = meta["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise MoetraceError(
            f"{path}: store format_version {version} is newer than this moetrace reads "
            f"(up to {FORMAT_VERSION}); upgrade moetrace")


def expert_dtype(n_experts: int) -> np.dtype:
    """Storage dtype of expert ids: uint8 up to 256 experts, else uint16."""
    return np.dtype(np.uint8 if n_experts <= 256 else np.uint16)


def auto_chunk_rows(n_layers: int, top_k: int, n_experts: int) -> int:
    """Rows per chunk so that one ``routing/experts`` chunk is about 8 MiB (a power of 2)."""
    row_bytes = n_layers * top_k * expert_dtype(n_experts).itemsize
    rows = max(1024, TARGET_CHUNK_BYTES // max(1, row_bytes))
    return 1 << int(math.floor(math.log2(rows)))


@dataclass
class Chunk:
    """One block of committed rows ``[start, stop)`` read from a store.

    ``chunk[name]`` is the NumPy array of column ``name`` for those rows: ``experts``
    is ``[n, L, K]``, label columns are uint16 codes, and so on.
    """

    start: int
    stop: int
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    def __len__(self) -> int:
        return self.stop - self.start


class TraceStore:
    """A moetrace routing trace on disk. Create with :meth:`create`, open with :meth:`open`.

    Use as a context manager (or call :meth:`close`) when writing, so buffered rows are
    flushed and committed.
    """

    def __init__(self, group: zarr.Group, path: Path | str, mode: str):
        self._group = group
        self.path = path
        self.mode = mode
        self._meta: dict[str, Any] = dict(group.attrs[ATTR_KEY])
        self._buffer: list[dict[str, np.ndarray]] = []
        self._buffered_rows = 0
        self._arrays: dict[str, zarr.Array] = {}

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path: str | Path,
        *,
        n_layers: int,
        n_experts: int,
        top_k: int,
        layer_ids: Sequence[int] | None = None,
        labels: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
        model: str | None = None,
        scoring: str | None = None,
        weights: bool = False,
        probs: bool = False,
        token_text: bool = False,
        chunk_rows: int | None = None,
        shard_chunks: int | None = None,
        codec: Mapping[str, Any] | None = None,
        overwrite: bool = False,
    ) -> "TraceStore":
        """Create an empty store at ``path`` and open it for appending.

        ``labels``: either ``{"domain": ["bio", "math"], ...}`` (fixed vocabularies:
        appending another value is an error) or ``["domain", "lang"]`` (vocabularies
        grow as string values are appended). ``layer_ids``: the model's index of each
        recorded MoE layer (default ``0..n_layers-1``). ``chunk_rows``: rows per chunk
        (default: about 8 MiB of ``routing/experts``). ``shard_chunks``: store
        ``shard_chunks`` chunks per shard file (for very large stores); the writer then
        writes whole shards. ``weights``/``probs``/``token_text``: create the optional
        ``routing/weights`` [N,L,K], ``routing/probs`` [N,L,E], ``tokens/text`` arrays.
        """
        path = Path(path)
        n_layers, n_experts, top_k = (_positive_int(v, name) for v, name in (
            (n_layers, "n_layers"), (n_experts, "n_experts"), (top_k, "top_k")))
        if n_experts > 65536:
            raise MoetraceError(f"n_experts: expected at most 65536, got {n_experts}")
        if top_k > n_experts:
            raise MoetraceError(f"top_k: expected at most n_experts={n_experts}, got {top_k}")
        if layer_ids is None:
            layer_ids = list(range(n_layers))
        layer_ids = [int(x) for x in layer_ids]
        if len(layer_ids) != n_layers or len(set(layer_ids)) != n_layers or sorted(layer_ids) != layer_ids:
            raise MoetraceError(
                f"layer_ids: expected {n_layers} distinct increasing layer indices, got {layer_ids}")
        label_vocab, fixed = _parse_labels(labels)
        chunk_rows = int(chunk_rows) if chunk_rows else auto_chunk_rows(n_layers, top_k, n_experts)
        if chunk_rows < 1:
            raise MoetraceError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
        if shard_chunks is not None and int(shard_chunks) < 1:
            raise MoetraceError(f"shard_chunks: expected a positive integer, got {shard_chunks}")
        codec = dict(DEFAULT_CODEC if codec is None else codec)

        if path.exists():
            if not overwrite:
                raise MoetraceError(f"{path}: already exists (pass overwrite=True to replace it)")
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": model,
            "n_layers": n_layers,
            "layer_ids": layer_ids,
            "n_experts": n_experts,
            "top_k": top_k,
            "scoring": scoring,
            "labels": label_vocab,
            "labels_fixed": fixed,
            "committed": 0,
            "sequences_committed": 0,
            "chunk_rows": chunk_rows,
            "shard_chunks": None if shard_chunks is None else int(shard_chunks),
            "codec": codec,
        }
        compressor = _codec(codec)

        def make(name: str, inner: tuple[int, ...], dtype: Any, rows: int = chunk_rows) -> None:
            shards = None
            if shard_chunks is not None:
                shards = (rows * int(shard_chunks), *inner)
            group.create_array(name, shape=(0, *inner), chunks=(rows, *inner), shards=shards,
                               dtype=dtype, compressors=compressor, fill_value=0)

        for col in TOKEN_COLUMNS:
            make(f"tokens/{col}", (), TOKEN_DTYPES[col])
        for label in label_vocab:
            make(f"tokens/{label}", (), LABEL_DTYPE)
        if token_text:
            group.create_array("tokens/text", shape=(0,), chunks=(chunk_rows,), dtype=str)
        make("routing/experts", (n_layers, top_k), expert_dtype(n_experts))
        if weights:
            make("routing/weights", (n_layers, top_k), np.float16)
        if probs:
            # Keep probs chunks under MAX_CHUNK_BYTES with a power-of-2 divisor of chunk_rows,
            # so a probs chunk boundary is always a token-chunk boundary too.
            per_row = n_layers * n_experts * 2
            div = 1
            while chunk_rows // div > 1 and (chunk_rows // div) * per_row > MAX_CHUNK_BYTES:
                div *= 2
            make("routing/probs", (n_layers, n_experts), np.float16, rows=max(1, chunk_rows // div))
        group.require_group("sequences")
        group.attrs[ATTR_KEY] = meta
        return cls(group, path, "a")

    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "TraceStore":
        """Open an existing store; ``mode="r"`` to read, ``"a"`` to append.

        ``path`` may also be an fsspec URL (``s3://...``, ``memory://...``; read-only,
        through zarr's fsspec store; ``file://`` is a local path). Raises MoetraceError
        when ``path`` is not a moetrace store or was written by a newer format version. Opening with ``"a"`` drops rows beyond ``committed`` left
        by a crashed writer.
        """
        if mode not in ("r", "a"):
            raise MoetraceError(f"mode: expected 'r' or 'a', got {mode!r}")
        text = str(path)
        if text.startswith("file://"):
            path = text[len("file://"):]
        elif "://" in text:
            return cls._open_url(text, mode)
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise MoetraceError(f"{path}: not a moetrace store (no zarr.json: not a Zarr v3 group)")
        try:
            with open(path / "zarr.json", "rb") as fh:
                root = json.load(fh)
        except (OSError, ValueError) as exc:
            raise MoetraceError(f"{path}/zarr.json: unreadable Zarr metadata ({exc})") from None
        if root.get("node_type") != "group":
            raise MoetraceError(f"{path}: not a moetrace store (a Zarr array, not a group)")
        meta = root.get("attributes", {}).get(ATTR_KEY)
        _check_meta(path, meta)
        group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
        store = cls(group, path, mode)
        if mode == "a":
            store._recover()
        return store

    @classmethod
    def _open_url(cls, url: str, mode: str) -> "TraceStore":
        """Open a store at an fsspec URL (``s3://``, ``gs://``, ``memory://``...) read-only, through zarr."""
        if mode != "r":
            raise MoetraceError(f"{url}: a store at a URL opens read-only (mode='r'), got mode={mode!r}")
        try:
            group = zarr.open_group(url, mode="r", zarr_format=3)
        except ImportError as exc:
            raise MoetraceError(f"{url}: cannot open ({exc}; install the fsspec filesystem for this URL)") from None
        except Exception as exc:  # zarr / fsspec raise many types for a missing or foreign store
            raise MoetraceError(f"{url}: not a moetrace store (cannot open as a Zarr v3 group: {exc})") from None
        meta = group.attrs.get(ATTR_KEY)
        _check_meta(url, meta)
        return cls(group, url, mode)

    # ------------------------------------------------------------------ facts
    @property
    def n_layers(self) -> int:
        return int(self._meta["n_layers"])

    @property
    def n_experts(self) -> int:
        return int(self._meta["n_experts"])

    @property
    def top_k(self) -> int:
        return int(self._meta["top_k"])

    @property
    def layer_ids(self) -> np.ndarray:
        """Model layer index of each recorded MoE layer, int64 [L]."""
        return np.asarray(self._meta["layer_ids"], dtype=np.int64)

    @property
    def labels(self) -> dict[str, list[str]]:
        """Label name -> list of its values (a code indexes this list)."""
        return {k: list(v) for k, v in self._meta["labels"].items()}

    @property
    def label_names(self) -> list[str]:
        return list(self._meta["labels"])

    @property
    def model(self) -> str | None:
        return self._meta.get("model")

    @property
    def scoring(self) -> str | None:
        return self._meta.get("scoring")

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def has_weights(self) -> bool:
        return "routing/weights" in self._array_names()

    @property
    def has_probs(self) -> bool:
        return "routing/probs" in self._array_names()

    @property
    def has_token_text(self) -> bool:
        return "tokens/text" in self._array_names()

    @property
    def columns(self) -> list[str]:
        """Names of the per-token columns this store has (tokens/* and routing/*)."""
        return [name.split("/", 1)[1] for name in self._array_names()
                if name.startswith(("tokens/", "routing/"))]

    @property
    def n_sequences_committed(self) -> int:
        return int(self._meta.get("sequences_committed", 0))

    def __len__(self) -> int:
        """Committed rows (tokens)."""
        return int(self._meta["committed"])

    def __repr__(self) -> str:
        return (f"TraceStore({str(self.path)!r}, rows={len(self)}, layers={self.n_layers}, "
                f"experts={self.n_experts}, top_k={self.top_k}, labels={self.label_names})")

    # ------------------------------------------------------------------ writing
    def append(self, batch: Mapping[str, Any]) -> None:
        """Validate and buffer a batch of ``n`` rows; whole chunks are written at once.

        ``batch`` maps column name to array: ``seq`` int [n] and ``pos`` int [n]
        (required), ``token_id`` int [n] (default -1), ``generated`` bool [n] (default
        False), one entry per label (strings, or uint16 codes into the vocabulary),
        ``experts`` int [n, L, K], ``weights`` float [n, L, K] when the store has
        weights, ``probs`` float [n, L, E] when it has probs, ``text`` str [n] when it
        has token text. Any object with those attributes (a dataclass) works too.
        Rows become visible to readers after the next :meth:`flush`.
        """
        self._require_writable()
        rows = self._validate(batch)
        if rows is None:
            return
        self._buffer.append(rows)
        self._buffered_rows += len(rows["seq"])
        unit = self._write_unit()
        if self._buffered_rows >= unit:
            self._write_buffer(whole_units_only=True)

    def flush(self) -> None:
        """Write every buffered row and raise ``committed`` (rows become visible)."""
        self._require_writable()
        self._write_buffer(whole_units_only=False)

    def close(self) -> None:
        if self.mode == "a":
            self.flush()

    def __enter__(self) -> "TraceStore":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an exception the buffered rows are dropped: what was committed stays valid.
        if exc_type is None:
            self.close()

    def append_sequences(self, columns: Mapping[str, Any]) -> None:
        """Append per-sequence metadata rows (``sequences/*``), committed immediately.

        ``columns`` maps name -> array [s]; ``seq`` (int) is required. Columns are created
        on first use with the dtype of the first batch (strings, ints, floats or bools);
        later batches must provide the same columns.
        """
        self._require_writable()
        if "seq" not in columns:
            raise MoetraceError("sequences: expected a 'seq' column with the sequence ids")
        data = {name: np.asarray(values) for name, values in columns.items()}
        n = len(data["seq"])
        for name, values in data.items():
            if values.ndim != 1 or len(values) != n:
                raise MoetraceError(
                    f"sequences/{name}: expected a 1-D array of {n} values, got shape {values.shape}")
        seq_group = self._group["sequences"]
        existing = set(seq_group.array_keys())
        start = self.n_sequences_committed
        if existing and set(data) != existing:
            raise MoetraceError(
                f"sequences: expected columns {sorted(existing)}, got {sorted(data)}")
        for name, values in data.items():
            if name == "seq":
                values = _as_int(values, "sequences/seq").astype(np.int64)
            if values.dtype.kind in "OUT":
                values = values.astype(str)
            if name not in existing:
                dtype = str if values.dtype.kind == "U" else values.dtype
                seq_group.create_array(name, shape=(0,), chunks=(max(1024, self.chunk_rows),), dtype=dtype)
            arr = seq_group[name]
            if arr.shape[0] != start + n:
                arr.resize((start + n,))
            if n:
                arr[start:start + n] = values
        self._meta["sequences_committed"] = start + n
        self._commit()

    # ------------------------------------------------------------------ reading
    def read(self, columns: Sequence[str], start: int = 0, stop: int | None = None) -> dict[str, np.ndarray]:
        """Read committed rows ``[start, stop)`` of ``columns`` into NumPy arrays."""
        n = len(self)
        stop = n if stop is None else min(int(stop), n)
        start = max(0, int(start))
        out = {}
        for col in self._check_columns(columns):
            arr = self._array(col)
            out[col] = _host(arr[start:stop]) if stop > start else np.zeros(
                (0, *arr.shape[1:]), dtype=_numpy_dtype(arr))
        return out

    def iter_chunks(
        self,
        columns: Sequence[str] | None = None,
        rows: tuple[int, int] | None = None,
        prefetch: bool = True,
        readers: int = 2,
    ) -> Iterator[Chunk]:
        """Yield the committed rows in ``rows = (start, stop)`` as :class:`Chunk` blocks.

        Blocks follow the store's chunk grid (the first and last may be partial), so each
        read decompresses whole chunks once. With ``prefetch`` the next block is read and
        decompressed in a background thread while the caller works on the current one.
        ``columns`` defaults to every token and routing column. String columns
        (``text``) come as object arrays of str.
        """
        columns = self._check_columns(self.columns if columns is None else columns)
        n = len(self)
        start, stop = (0, n) if rows is None else (max(0, int(rows[0])), min(int(rows[1]), n))
        if start >= stop:
            return
        step = self.chunk_rows
        edges = [start]
        nxt = (start // step + 1) * step
        while nxt < stop:
            edges.append(nxt)
            nxt += step
        edges.append(stop)
        spans = list(zip(edges[:-1], edges[1:]))

        def load(span: tuple[int, int]) -> Chunk:
            a, b = span
            return Chunk(a, b, {col: _host(self._array(col)[a:b]) for col in columns})

        if not prefetch or len(spans) == 1:
            for span in spans:
                yield load(span)
            return
        # Keep `readers` blocks in flight, yielded in order. Blosc decompression releases the
        # GIL, so the readers decompress in parallel with each other and with the caller.
        with ThreadPoolExecutor(max_workers=readers, thread_name_prefix="moetrace-prefetch") as pool:
            pending = deque(pool.submit(load, span) for span in spans[:readers])
            for span in spans[readers:]:
                current = pending.popleft().result()
                pending.append(pool.submit(load, span))
                yield current
            while pending:
                yield pending.popleft().result()

    def read_sequences(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Per-sequence metadata: column name -> array [S] of committed sequence rows."""
        seq_group = self._group["sequences"]
        names = sorted(seq_group.array_keys()) if columns is None else list(columns)
        n = self.n_sequences_committed
        out = {}
        for name in names:
            if name not in seq_group:
                raise MoetraceError(
                    f"sequences/{name}: no such column in {self.path} (have {sorted(seq_group.array_keys())})")
            out[name] = _host(seq_group[name][:n])
        return out

    def decode_label(self, label: str, codes: np.ndarray) -> np.ndarray:
        """Label codes (uint16) -> array of label strings."""
        vocab = np.asarray(self.labels[label] or [""], dtype=object)
        return vocab[np.asarray(codes, dtype=np.int64)]

    def info(self) -> dict[str, Any]:
        """Summary: rows, sequences, model facts, label value counts, array sizes.

        Streams the token columns once to count sequences (runs of equal ``seq``) and
        label values; arrays report raw (uncompressed) and stored (compressed) bytes.
        """
        n = len(self)
        label_counts = {label: np.zeros(max(1, len(v)), dtype=np.int64) for label, v in self.labels.items()}
        n_seq, last_seq = 0, None
        for chunk in self.iter_chunks(["seq", *self.label_names]):
            seq = chunk["seq"]
            if len(seq):
                boundaries = int(np.count_nonzero(seq[1:] != seq[:-1])) + 1
                if last_seq is not None and seq[0] == last_seq:
                    boundaries -= 1
                n_seq += boundaries
                last_seq = seq[-1]
            for label, counts in label_counts.items():
                counts += np.bincount(chunk[label], minlength=len(counts))[:len(counts)]
        arrays = {}
        for name in self._array_names():
            arr = self._group[name]
            rows = self.n_sequences_committed if name.startswith("sequences/") else n
            item = _numpy_dtype(arr).itemsize if arr.dtype.kind != "T" else None
            inner = int(np.prod(arr.shape[1:])) if len(arr.shape) > 1 else 1
            arrays[name] = {
                "shape": [rows, *arr.shape[1:]],
                "dtype": str(_numpy_dtype(arr)),
                "chunks": list(arr.chunks),
                "raw_bytes": None if item is None else rows * inner * item,
                "stored_bytes": _dir_bytes(self.path / name),
            }
        return {
            "path": str(self.path),
            "format_version": self._meta["format_version"],
            "model": self.model,
            "scoring": self.scoring,
            "rows": n,
            "routing_rows": n * self.n_layers * self.top_k,
            "sequences": n_seq,
            "sequence_metadata_rows": self.n_sequences_committed,
            "n_layers": self.n_layers,
            "layer_ids": self.layer_ids.tolist(),
            "n_experts": self.n_experts,
            "top_k": self.top_k,
            "chunk_rows": self.chunk_rows,
            "labels": {label: dict(zip(self.labels[label], counts.tolist()))
                       for label, counts in label_counts.items()},
            "arrays": arrays,
        }

    # ------------------------------------------------------------------ internals
    def _array_names(self) -> list[str]:
        names = []
        for grp in ("tokens", "routing", "sequences"):
            if grp in self._group:
                names += [f"{grp}/{k}" for k in sorted(self._group[grp].array_keys())]
        return names

    def _array(self, column: str) -> zarr.Array:
        arr = self._arrays.get(column)
        if arr is None:
            name = f"routing/{column}" if column in ROUTING_COLUMNS else f"tokens/{column}"
            arr = self._arrays[column] = self._group[name]
        return arr

    def _check_columns(self, columns: Sequence[str]) -> list[str]:
        have = self.columns
        out = []
        for col in columns:
            col = col.split("/", 1)[1] if "/" in col else col
            if col not in have:
                raise MoetraceError(f"column {col!r}: not in store {self.path} (have {have})")
            out.append(col)
        return out

    def _require_writable(self) -> None:
        if self.mode != "a":
            raise MoetraceError(f"{self.path}: opened read-only; use TraceStore.open(path, mode='a') to append")

    def _write_unit(self) -> int:
        shard = self._meta.get("shard_chunks")
        return self.chunk_rows * (int(shard) if shard else 1)

    def _validate(self, batch: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        if not isinstance(batch, Mapping):
            batch = {k: v for k, v in vars(batch).items() if v is not None}
        known = set(self.columns)
        unknown = sorted(set(batch) - known)
        if unknown:
            raise MoetraceError(f"append: unknown column(s) {unknown}; this store has {sorted(known)}")
        for required in ("seq", "pos", "experts", *self.label_names):
            if required not in batch:
                raise MoetraceError(f"append: missing required column {required!r}")
        L, K, E = self.n_layers, self.top_k, self.n_experts
        experts = np.asarray(batch["experts"])
        if experts.ndim != 3 or experts.shape[1:] != (L, K):
            raise MoetraceError(
                f"routing/experts: expected shape (n, {L}, {K}) [tokens, layers, top_k], got {experts.shape}")
        n = experts.shape[0]
        if n == 0:
            return None
        experts = _as_int(experts, "routing/experts")
        lo, hi = int(experts.min()), int(experts.max())
        if lo < 0 or hi >= E:
            bad = int(np.argmax((experts < 0) | (experts >= E)).item() // (L * K))
            raise MoetraceError(
                f"routing/experts: expected expert ids in [0, {E}), got {hi if hi >= E else lo} (batch row {bad})")
        out: dict[str, np.ndarray] = {"experts": experts.astype(expert_dtype(E), copy=False)}

        def column(name: str, default: Any = None) -> np.ndarray:
            values = np.asarray(batch[name]) if name in batch else np.full(n, default)
            if values.shape != (n,):
                raise MoetraceError(f"tokens/{name}: expected shape ({n},) to match routing/experts, got {values.shape}")
            return values

        out["seq"] = _as_int(column("seq"), "tokens/seq").astype(np.int64, copy=False)
        out["pos"] = _as_int(column("pos"), "tokens/pos").astype(np.int32, copy=False)
        out["token_id"] = _as_int(column("token_id", -1), "tokens/token_id").astype(np.int32, copy=False)
        gen = column("generated", False)
        if gen.dtype != np.bool_:
            raise MoetraceError(f"tokens/generated: expected bool values, got dtype {gen.dtype}")
        out["generated"] = gen
        if self.has_token_text:
            out["text"] = column("text", "").astype(str)
        for name, inner in (("weights", (L, K)), ("probs", (L, E))):
            if name not in known:
                continue
            if name not in batch:
                raise MoetraceError(f"append: missing required column {name!r} (the store has routing/{name})")
            values = np.asarray(batch[name])
            if values.shape != (n, *inner):
                raise MoetraceError(f"routing/{name}: expected shape ({n}, {inner[0]}, {inner[1]}), got {values.shape}")
            if values.dtype.kind not in "fiu":
                raise MoetraceError(f"routing/{name}: expected floating-point values, got dtype {values.dtype}")
            if not np.isfinite(values).all():
                bad = int(np.argmax(~np.isfinite(values)).item() // int(np.prod(inner)))
                raise MoetraceError(f"routing/{name}: expected finite values, got NaN/inf (batch row {bad})")
            out[name] = values.astype(np.float16)
        # Labels last: an unseen value extends an open vocabulary, so only accept it
        # once everything else in the batch is known to be valid.
        for label in self.label_names:
            out[label] = self._encode_label(label, column(label))
        return out

    def _encode_label(self, label: str, values: np.ndarray) -> np.ndarray:
        vocab = self._meta["labels"][label]
        if values.dtype.kind in "iu":
            if len(values) and (values.min() < 0 or values.max() >= len(vocab)):
                raise MoetraceError(
                    f"tokens/{label}: expected codes in [0, {len(vocab)}) (vocabulary {vocab}), "
                    f"got {int(values.max()) if values.max() >= len(vocab) else int(values.min())}")
            return values.astype(LABEL_DTYPE)
        strings = values.astype(str)
        uniq, inverse = np.unique(strings, return_inverse=True)
        index = {v: i for i, v in enumerate(vocab)}
        missing = [u for u in uniq.tolist() if u not in index]
        if missing:
            if self._meta["labels_fixed"].get(label, False):
                raise MoetraceError(
                    f"tokens/{label}: value {missing[0]!r} is not in the label vocabulary {vocab}")
            if len(vocab) + len(missing) > MAX_LABEL_VALUES:
                raise MoetraceError(f"tokens/{label}: expected at most {MAX_LABEL_VALUES} distinct values")
            vocab = vocab + missing  # becomes visible with the next commit
            self._meta["labels"] = {**self._meta["labels"], label: vocab}
            index = {v: i for i, v in enumerate(vocab)}
        lookup = np.array([index[u] for u in uniq.tolist()], dtype=LABEL_DTYPE)
        return lookup[inverse.reshape(-1)]

    def _write_buffer(self, whole_units_only: bool) -> None:
        if not self._buffer:
            if not whole_units_only:
                self._commit()  # persist label vocabularies even when no rows are pending
            return
        data = {k: np.concatenate([b[k] for b in self._buffer]) for k in self._buffer[0]}
        total = len(data["seq"])
        unit = self._write_unit()
        start = len(self)
        # Align writes to the chunk/shard grid: complete the open unit first.
        first = (-start) % unit or unit
        write_n = total if not whole_units_only else (
            0 if total < first else first + (total - first) // unit * unit)
        if write_n:
            stop = start + write_n
            for col, values in data.items():
                arr = self._array(col)
                if arr.shape[0] != stop:
                    arr.resize((stop, *arr.shape[1:]))
                arr[start:stop] = values[:write_n]
            self._meta["committed"] = stop
            self._commit()
        rest = {k: v[write_n:] for k, v in data.items()}
        self._buffer = [rest] if total > write_n else []
        self._buffered_rows = total - write_n

    def _commit(self) -> None:
        # One atomic write of the group's zarr.json: rows, sequences and vocabularies together.
        self._group.attrs[ATTR_KEY] = self._meta

    def _recover(self) -> None:
        n = len(self)
        for name in self._array_names():
            if name.startswith("sequences/"):
                rows = self.n_sequences_committed
            else:
                rows = n
            arr = self._group[name]
            if arr.shape[0] > rows:
                arr.resize((rows, *arr.shape[1:]))
        for leftover in self.path.rglob("*.partial"):
            leftover.unlink(missing_ok=True)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 1:
        raise MoetraceError(f"{name}: expected a positive integer, got {value!r}")
    return int(value)


def _parse_labels(labels: Any) -> tuple[dict[str, list[str]], dict[str, bool]]:
    if labels is None:
        return {}, {}
    if isinstance(labels, Mapping):
        vocab = {}
        for name, values in labels.items():
            values = [str(v) for v in values]
            if len(set(values)) != len(values):
                raise MoetraceError(f"labels[{name!r}]: expected distinct values, got {values}")
            vocab[str(name)] = values
        fixed = {name: True for name in vocab}
    else:
        vocab = {str(name): [] for name in labels}
        fixed = {name: False for name in vocab}
    reserved = set(TOKEN_COLUMNS) | {"text"} | set(ROUTING_COLUMNS)
    for name in vocab:
        if name in reserved or not name.isidentifier():
            raise MoetraceError(f"labels: {name!r} cannot be a label name (reserved or not an identifier)")
    return vocab, fixed


def _as_int(values: np.ndarray, name: str) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values
    if values.dtype.kind == "b":
        raise MoetraceError(f"{name}: expected integers, got bool values")
    if values.dtype.kind == "f" and values.size and np.all(np.isfinite(values)) and np.all(values == np.round(values)):
        return values.astype(np.int64)
    raise MoetraceError(f"{name}: expected integers, got dtype {values.dtype}")


def _host(values: Any) -> np.ndarray:
    """A NumPy array; zarr's variable-length strings (StringDType) become object arrays of str,
    which every NumPy, pandas and pyarrow function accepts."""
    values = np.asarray(values)
    return values.astype(object) if values.dtype.kind == "T" else values


def _numpy_dtype(arr: zarr.Array) -> np.dtype:
    dtype = arr.dtype
    return dtype if isinstance(dtype, np.dtype) else np.dtype(object)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

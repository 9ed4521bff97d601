"""The trace store: a chunked Zarr v3 group holding one row per routed token.

Layout (see ARCHITECTURE.md; other Zarr readers can read it directly)::

    <store>/zarr.json              group; attributes["moetrace"] holds the model facts,
                                   the label vocabularies, ``committed`` and ``uuid``
                                   (random, new at each create)
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

Row order (the store's invariant, format_version 2): **a sequence's rows are contiguous
and in strictly increasing** ``pos`` **order**. Statistics that pair adjacent rows
(``temporal``, stickiness) are correct only under it. :meth:`TraceStore.append` enforces
it, vectorized: within a batch each ``seq`` id forms one run with increasing ``pos``;
the batch's first run continues the sequence of the store's last row (with a larger
``pos``) or starts an id never seen in this store. The ids of ended sequences are kept
in one sorted int64 array (8 bytes per sequence, 16 at most with growth slack: 80-160 MB
for 1e7 sequences), rebuilt by one chunked scan of ``tokens/seq`` when a store is
reopened to append. Stores written before (format_version 1, order never checked) open
read-only as before; reopening one to append verifies the order over all its rows first.

Chunks run along N only, so the whole L x K block of a token stays contiguous. The token
columns and ``routing/experts`` share one row grid of ``chunk_rows`` rows: the largest
power of 2 keeping the widest of them (``routing/experts``, or ``tokens/seq`` when
L x K < 8) within 8 MiB, the size bench/bench_store.py found fastest to scan (4 MiB
chunks scan about 1.5-2x slower). The narrower token columns get proportionally smaller
chunks. Wider arrays (``routing/weights``, ``routing/probs``) take ``chunk_rows / 2**j``
rows, the largest fraction within 8 MiB, so their chunk boundaries are grid boundaries
too and a block of rows read by :meth:`TraceStore.iter_chunks` is whole chunks of every
array. No chunk exceeds 8 MiB uncompressed. Every array is compressed with the store's
Blosc codec for its kind (format_version 3, :data:`DEFAULT_CODECS`): lz4 without shuffle
for ``routing/experts`` (the counters read all of it, and bitshuffle decodes slower than
they count), lz4 with byte shuffle for the token columns, lz4 + bitshuffle for the routing
weights and probabilities. ``tokens/text`` (variable-length UTF-8) uses Blosc zstd without
shuffle, which compresses token text 5.6x better than lz4 + bitshuffle at the same read
speed (bench/RESULTS.md).

Crash safety: appended rows are buffered and written as whole chunks
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
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from moetrace.errors import MoetraceError

# 2: rows obey the order invariant (module docstring), enforced by append. Version 1 stores
# (written before) open read-only as before; opening one to append checks the invariant
# over all its rows and upgrades it to 2.
# 3: as 2, with a codec per kind of array (the ``codecs`` attribute, default DEFAULT_CODECS:
# routing ids without shuffle, token columns with byte shuffle) where 1 and 2 have one
# ``codec`` for all. Every version reads the same way (each array's codec is in its own Zarr
# metadata); the number says which layout a store was written with.
FORMAT_VERSION = 3
ORDER_VERSION = 2  # the first version whose rows obey the order invariant
#: ``rank_order`` values: the K ids of a token run from its top-1 down, or their order is not known.
RANK_ORDERS = ("ranked", "unknown")


def require_rank_order(rank_order: str, where: str, what: str) -> None:
    """Refuse ``what`` (a statistic needing rank order or the top-1) on data whose rank order is unknown.

    ``rank_order`` comes from a store (:attr:`TraceStore.rank_order`) or from a counts file's
    attributes, which carry the store's value."""
    if rank_order != "ranked":
        raise MoetraceError(
            f"{where}: {what} needs each token's rank order (which expert is its top-1), but this trace "
            "records only the set of its experts (rank order unknown, e.g. Megatron's routing map without "
            "router logits); statistics over the set (experts summed over ranks, coact, weight_sum, "
            "compare's overlap) are available")
ATTR_KEY = "moetrace"

TOKEN_COLUMNS = ("seq", "pos", "token_id", "generated")
TOKEN_DTYPES = {"seq": np.int64, "pos": np.int32, "token_id": np.int32, "generated": np.bool_}
ROUTING_COLUMNS = ("experts", "weights", "probs")
LABEL_DTYPE = np.uint16
MAX_LABEL_VALUES = int(np.iinfo(LABEL_DTYPE).max) + 1
# A model's layer index; the long Parquet format writes layers as int16, widened to int32 when
# needed (engine/io/parquet.py), so ids up to int32's maximum round-trip.
MAX_LAYER_ID = int(np.iinfo(np.int32).max)

# Chosen by bench/bench_store.py (numbers in bench/RESULTS.md): lz4 + bitshuffle keeps
# zstd's compression ratio on routing ids at twice its decompression speed; 8 MiB chunks
# halve the per-chunk overhead of 4 MiB ones when scanning.
DEFAULT_CODEC = {"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}
# format_version 3: a codec per kind of array (bench/bench_counting.py, bench/RESULTS.md, issue 25).
# - routing/experts: counting reads all of it, and bitshuffle decodes it at 1.6-2.0 GB/s per core,
#   slower than the counting kernels. Without shuffle lz4 finds nothing to compress in near-random
#   ids and Blosc stores the chunk as is, which the counter maps into memory with no decoding at
#   all; +33% on disk for this array.
# - token columns (seq, pos, token_id, generated, labels): byte shuffle decodes 3-4x faster than
#   bitshuffle and compresses them as well or better (seq 194x vs 168x, pos 191x vs 25x).
# - routing/weights and routing/probs: DEFAULT_CODEC (bitshuffle suits float16).
DEFAULT_CODECS = {
    "routing/experts": {"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"},
    "tokens": {"cname": "lz4", "clevel": 5, "shuffle": "shuffle"},
    "routing": DEFAULT_CODEC,
}
# tokens/text: shuffles regroup fixed-width numbers, not text; on token text Blosc zstd
# compresses 6.8x vs 1.2x for lz4 + bitshuffle, at the same read speed (string decoding
# dominates); bench/bench_store.py --text, numbers in bench/RESULTS.md.
TEXT_CODEC = {"cname": "zstd", "clevel": 5, "shuffle": "noshuffle"}
# Uncompressed size of a routing/experts chunk (the grid's widest array), and the most
# any chunk may hold.
TARGET_CHUNK_BYTES = 8 << 20
MAX_CHUNK_BYTES = 8 << 20


def _codec(spec: Mapping[str, Any]) -> BloscCodec:
    return BloscCodec(cname=spec["cname"], clevel=int(spec["clevel"]), shuffle=spec["shuffle"])


def _check_version(path, meta: Any) -> None:
    """Refuse a group whose moetrace attribute is missing, or of a format version this code cannot read."""
    if not isinstance(meta, dict) or "format_version" not in meta:
        raise MoetraceError(f"{path}: not a moetrace store (no '{ATTR_KEY}' group attribute)")
    version = meta["format_version"]
    if not _is_int(version) or version < 1:
        raise MoetraceError(
            f"{path}/zarr.json: attribute {ATTR_KEY}.format_version: expected a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise MoetraceError(
            f"{path}: store format_version {version} is newer than this moetrace reads "
            f"(up to {FORMAT_VERSION}); upgrade moetrace")


def expert_dtype(n_experts: int) -> np.dtype:
    """Storage dtype of expert ids: uint8 up to 256 experts, else uint16."""
    return np.dtype(np.uint8 if n_experts <= 256 else np.uint16)


def grid_row_bytes(n_layers: int, top_k: int, n_experts: int) -> dict[str, int]:
    """Uncompressed bytes per row of the arrays whose chunks are ``chunk_rows`` rows."""
    widths = {f"tokens/{col}": np.dtype(dtype).itemsize for col, dtype in TOKEN_DTYPES.items()}
    widths["routing/experts"] = n_layers * top_k * expert_dtype(n_experts).itemsize
    return widths


def auto_chunk_rows(n_layers: int, top_k: int, n_experts: int) -> int:
    """Rows per chunk: the largest power of 2 that keeps the widest array on the row grid
    (``routing/experts``, or ``tokens/seq`` when L x K < 8) within TARGET_CHUNK_BYTES."""
    widest = max(grid_row_bytes(n_layers, top_k, n_experts).values())
    rows = max(1, TARGET_CHUNK_BYTES // widest)
    return 1 << int(math.floor(math.log2(rows)))


def fraction_rows(chunk_rows: int, row_bytes: int) -> int:
    """Rows per chunk of an array wider than the grid (weights, probs): ``chunk_rows / 2**j``,
    the largest that keeps its chunks within MAX_CHUNK_BYTES, so each of its chunk
    boundaries is a grid boundary too (at least 1 row)."""
    rows = chunk_rows
    while rows > 1 and rows % 2 == 0 and rows * row_bytes > MAX_CHUNK_BYTES:
        rows //= 2
    return rows


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


class _EndedIds:
    """The ids of sequences that already ended in a store being written, as one sorted
    int64 array: 8 bytes per sequence (up to 16 with the growth slack of appends), so
    80-160 MB for 1e7 sequences. Lookups are a binary search (``O(b log S)`` for a batch
    of ``b`` new ids); adding ids larger than every stored one (capture and the importers
    number sequences in increasing order) is an amortized ``O(b)`` append, any other
    batch one ``O(S)`` merge.
    """

    def __init__(self) -> None:
        self._ids = np.empty(0, dtype=np.int64)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def contains(self, ids: np.ndarray) -> np.ndarray:
        have = self._ids[:self._n]
        if not self._n:
            return np.zeros(len(ids), dtype=bool)
        at = np.minimum(np.searchsorted(have, ids), self._n - 1)
        return have[at] == ids

    def add(self, ids: np.ndarray) -> None:
        """Add distinct ids that are not in the set yet."""
        if not len(ids):
            return
        ids = np.sort(np.asarray(ids, dtype=np.int64))
        n, m = self._n, len(ids)
        if n and ids[0] < self._ids[n - 1]:
            self._ids = np.insert(self._ids[:n], np.searchsorted(self._ids[:n], ids), ids)
        else:
            if n + m > len(self._ids):
                grown = np.empty(max(2 * len(self._ids), n + m, 1024), dtype=np.int64)
                grown[:n] = self._ids[:n]
                self._ids = grown
            self._ids[n:n + m] = ids
        self._n = n + m


def prefetched(items: Sequence[Any], load: Callable[[Any], Any], readers: int, name: str) -> Iterator[Any]:
    """``load(item)`` for each item, in order, with ``readers`` loads in flight in worker threads.

    Blosc decompression releases the GIL, so the readers decompress in parallel with each other
    and with the caller. At most ``readers + 1`` results exist at once (callers reusing buffers
    rely on it).
    """
    with ThreadPoolExecutor(max_workers=readers, thread_name_prefix=name) as pool:
        pending = deque(pool.submit(load, item) for item in items[:readers])
        for item in items[readers:]:
            current = pending.popleft().result()
            pending.append(pool.submit(load, item))
            yield current
        while pending:
            yield pending.popleft().result()


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
        self._row_arrays: list[str] | None = None
        # Writer's view of the row order (committed + buffered rows): see _check_order.
        self._ended = _EndedIds()
        self._last: tuple[int, int] | None = None  # (seq, pos) of the last row

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
        tokenizer: str | None = None,
        rank_order: str = "ranked",
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
        ``tokenizer``: name or path of the tokenizer the token ids come from (:attr:`tokenizer`).
        ``rank_order``: ``"ranked"`` (a token's K ids run from its top-1 down) or ``"unknown"``
        (the source gave only the set of K experts, e.g. in expert-id order): statistics that
        need rank order or the top-1 then refuse the store (:meth:`require_rank_order`).
        ``codec``: one Blosc codec for every array, a dict of cname, clevel and shuffle; default:
        :data:`DEFAULT_CODECS`, one per kind of array.
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
        layer_ids = list(layer_ids)
        if (len(layer_ids) != n_layers or not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool)
                                                  and 0 <= x <= MAX_LAYER_ID for x in layer_ids)
                or any(b <= a for a, b in zip(layer_ids, layer_ids[1:]))):
            raise MoetraceError(
                f"layer_ids: expected {n_layers} distinct increasing layer indices in [0, {MAX_LAYER_ID}], "
                f"got {layer_ids}")
        layer_ids = [int(x) for x in layer_ids]
        if rank_order not in RANK_ORDERS:
            raise MoetraceError(f"rank_order: expected one of {', '.join(RANK_ORDERS)}, got {rank_order!r}")
        label_vocab, fixed = _parse_labels(labels)
        chunk_rows = int(chunk_rows) if chunk_rows else auto_chunk_rows(n_layers, top_k, n_experts)
        if chunk_rows < 1:
            raise MoetraceError(f"chunk_rows: expected a positive integer, got {chunk_rows}")
        widest, width = max(grid_row_bytes(n_layers, top_k, n_experts).items(), key=lambda kv: kv[1])
        if chunk_rows > 1 and chunk_rows * width > MAX_CHUNK_BYTES:
            raise MoetraceError(
                f"chunk_rows: expected at most {max(1, MAX_CHUNK_BYTES // width)} (chunks of {widest} within "
                f"{MAX_CHUNK_BYTES >> 20} MiB), got {chunk_rows}")
        if shard_chunks is not None and int(shard_chunks) < 1:
            raise MoetraceError(f"shard_chunks: expected a positive integer, got {shard_chunks}")
        if codec is not None and (not isinstance(codec, Mapping) or set(codec) != {"cname", "clevel", "shuffle"}):
            raise MoetraceError(f"codec: expected a dict of cname, clevel and shuffle, got {codec!r}")
        codecs = {kind: dict(DEFAULT_CODECS[kind] if codec is None else codec) for kind in DEFAULT_CODECS}

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
            "tokenizer": tokenizer,
            "n_layers": n_layers,
            "layer_ids": layer_ids,
            "n_experts": n_experts,
            "top_k": top_k,
            "scoring": scoring,
            "rank_order": rank_order,
            "labels": label_vocab,
            "labels_fixed": fixed,
            "committed": 0,
            "sequences_committed": 0,
            "chunk_rows": chunk_rows,
            "shard_chunks": None if shard_chunks is None else int(shard_chunks),
            "codecs": codecs,
            # new at every create (overwrite included), kept by appends: tells a rewritten store
            # from the one it replaced (engine/counting/archive.py keys checkpoints by it)
            "uuid": uuid.uuid4().hex,
            # every chunk of the per-token arrays is written, fill-valued ones too (write_empty_chunks):
            # inside the committed rows a missing chunk file is damage, not zeros (stores created before
            # this lack the key, and zarr may have skipped their all-zero chunks)
            "all_chunks_written": True,
        }
        def make(name: str, inner: tuple[int, ...], dtype: Any, rows: int = chunk_rows) -> None:
            kind = name if name in codecs else name.split("/")[0]
            shards = None
            if shard_chunks is not None:
                shards = (rows * int(shard_chunks), *inner)
            group.create_array(name, shape=(0, *inner), chunks=(rows, *inner), shards=shards,
                               dtype=dtype, compressors=_codec(codecs[kind]), fill_value=0)

        for col in TOKEN_COLUMNS:
            make(f"tokens/{col}", (), TOKEN_DTYPES[col])
        for label in label_vocab:
            make(f"tokens/{label}", (), LABEL_DTYPE)
        if token_text:
            # Variable-length UTF-8 (4-byte length + bytes per token), then TEXT_CODEC.
            shards = None if shard_chunks is None else (chunk_rows * int(shard_chunks),)
            group.create_array("tokens/text", shape=(0,), chunks=(chunk_rows,), shards=shards, dtype=str,
                               compressors=_codec(TEXT_CODEC), fill_value="")
        make("routing/experts", (n_layers, top_k), expert_dtype(n_experts))
        # Arrays wider than the grid take a power-of-2 fraction of chunk_rows (see fraction_rows).
        if weights:
            make("routing/weights", (n_layers, top_k), np.float16,
                 rows=fraction_rows(chunk_rows, n_layers * top_k * 2))
        if probs:
            make("routing/probs", (n_layers, n_experts), np.float16,
                 rows=fraction_rows(chunk_rows, n_layers * n_experts * 2))
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
        if not path.exists():
            raise MoetraceError(f"{path}: no such file or directory")
        if not (path / "zarr.json").is_file():
            if (path / "trace.zarr" / "zarr.json").is_file():
                raise MoetraceError(f"{path}: a run directory, not a trace store; its store is {path / 'trace.zarr'}")
            what = "a file" if path.is_file() else "a directory without zarr.json"
            raise MoetraceError(f"{path}: not a moetrace store ({what}: not a Zarr v3 group)")
        try:
            with open(path / "zarr.json", "rb") as fh:
                root = json.load(fh)
        except (OSError, ValueError) as exc:
            raise MoetraceError(f"{path}/zarr.json: unreadable Zarr metadata ({exc})") from None
        if not isinstance(root, dict) or root.get("node_type") != "group":
            what = "a Zarr array" if isinstance(root, dict) and root.get("node_type") == "array" else (
                f"a JSON {type(root).__name__}" if not isinstance(root, dict) else "no node_type 'group'")
            raise MoetraceError(f"{path}/zarr.json: not a moetrace store (expected a Zarr v3 group, got {what})")
        attributes = root.get("attributes", {})
        meta = attributes.get(ATTR_KEY) if isinstance(attributes, dict) else None
        if meta is None and isinstance(attributes, dict) and "moetrace_counts_version" in attributes:
            raise MoetraceError(f"{path}: a counts file (what `moetrace count` writes), not a trace store; read it "
                                f"with `moetrace stats {path}` or moetrace.load_counts")
        _check_version(path, meta)
        _check_meta(path, meta)
        try:
            group = zarr.open_group(str(path), mode="r" if mode == "r" else "r+", zarr_format=3)
        except Exception as exc:  # zarr's parser raises many types on malformed metadata
            raise MoetraceError(f"{path}: unreadable Zarr group ({_one_line(exc)})") from None
        store = cls(group, path, mode)
        store._check_arrays()
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
        _check_version(url, meta)
        _check_meta(url, meta)
        return cls(group, url, mode)  # array checks list files on disk: local stores only

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
    def tokenizer(self) -> str | None:
        """The name or path of the tokenizer the token ids came from (recorded at capture), or None:
        what later commands load to show token text (:func:`moetrace.models.loading.load_tokenizer`)."""
        return self._meta.get("tokenizer")

    @property
    def rank_order(self) -> str:
        """``"ranked"`` (rank 0 is each token's top-1) or ``"unknown"`` (an unordered set of K experts)."""
        return str(self._meta.get("rank_order", "ranked"))

    def require_rank_order(self, what: str) -> None:
        """MoetraceError naming ``what`` when this store does not know its tokens' rank order."""
        require_rank_order(self.rank_order, str(self.path), what)

    @property
    def uuid(self) -> str | None:
        """A random id set when the store was created (None for a store written before it existed)."""
        value = self._meta.get("uuid")
        return None if value is None else str(value)

    @property
    def chunk_rows(self) -> int:
        return int(self._meta["chunk_rows"])

    @property
    def has_weights(self) -> bool:
        return "routing/weights" in self._row_array_names()

    @property
    def has_probs(self) -> bool:
        return "routing/probs" in self._row_array_names()

    @property
    def has_token_text(self) -> bool:
        return "tokens/text" in self._row_array_names()

    @property
    def columns(self) -> list[str]:
        """Names of the per-token columns this store has (tokens/* and routing/*)."""
        return [name.split("/", 1)[1] for name in self._row_array_names()]

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
        validated = self._validate(batch)
        if validated is None:
            return
        rows, ended, last = validated
        self._ended.add(ended)
        self._last = last
        self._buffer.append(rows)
        self._buffered_rows += len(rows["seq"])
        unit = self._write_unit()
        if self._buffered_rows >= unit:
            self._write_buffer(whole_units_only=True)

    def restrict_n_experts(self, n_experts: int) -> None:
        """Lower ``n_experts`` to the count an importer learned at the end of its input.

        A streaming importer creates the store before it has seen every expert id (with 256,
        or 65536, experts: the id dtype it needs so far) and calls this before closing. Every
        appended id was checked against the provisional count, so ``n_experts`` must keep
        the id dtype and cover the largest id appended (the caller's guarantee).
        """
        self._require_writable()
        n_experts = _positive_int(n_experts, "n_experts")
        if n_experts > self.n_experts or expert_dtype(n_experts) != expert_dtype(self.n_experts) \
                or n_experts < self.top_k:
            raise MoetraceError(f"n_experts: cannot restrict {self.n_experts} experts to {n_experts} "
                                f"(expected top_k={self.top_k} <= n <= {self.n_experts} with the same id dtype)")
        self._meta["n_experts"] = n_experts  # written with the next commit

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

    def _check_distinct(self, experts: np.ndarray) -> None:
        """A token's top-k holds K distinct expert ids: MoetraceError naming the first batch row and
        layer that repeats one. Pairwise comparisons of the compact ids (no sorted copy)."""
        K = experts.shape[2]
        repeated = None
        for i in range(K):
            for j in range(i + 1, K):
                same = experts[:, :, i] == experts[:, :, j]
                repeated = same if repeated is None else repeated | same
        if repeated is not None and repeated.any():
            row, layer = np.unravel_index(int(np.argmax(repeated)), repeated.shape)
            raise MoetraceError(
                f"routing/experts: expected {K} distinct expert ids per token and layer, got "
                f"{experts[row, layer].tolist()} (batch row {int(row)}, layer {int(self.layer_ids[layer])})")

    @property
    def interventions(self) -> list[dict]:
        """What changed the routing while sequences were captured: ``[{"what": [...], "sequences":
        [[first, last], ...]}]``, one entry per distinct set of open ``intervene`` / ``ablate`` /
        ``steer`` / ``replay`` contexts (:func:`moetrace.intervene.active_interventions`), with the
        sequence ids captured under it as inclusive ranges; ``[]``: every sequence routed as the model does."""
        return [dict(e) for e in self._meta.get("interventions", [])]

    def note_interventions(self, what: Sequence[Mapping[str, Any]], seq: Sequence[int] | np.ndarray) -> None:
        """Record that sequences ``seq`` were captured under the routing changes ``what`` (see
        :attr:`interventions`); an empty ``what`` records nothing. Committed with the next commit."""
        self._require_writable()
        what = [dict(w) for w in what]
        ids = np.unique(np.asarray(seq, dtype=np.int64))
        if not what or not ids.size:
            return
        breaks = np.flatnonzero(np.diff(ids) != 1) + 1
        ranges = [[int(r[0]), int(r[-1])] for r in np.split(ids, breaks)]
        log = self._meta.setdefault("interventions", [])
        for entry in log:
            if entry["what"] == what:
                merged = sorted(entry["sequences"] + ranges)
                entry["sequences"] = [merged[0]]
                for lo, hi in merged[1:]:
                    if lo <= entry["sequences"][-1][1] + 1:
                        entry["sequences"][-1][1] = max(entry["sequences"][-1][1], hi)
                    else:
                        entry["sequences"].append([lo, hi])
                return
        log.append({"what": what, "sequences": ranges})

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
                values = _as_int(values, "sequences/seq")
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
            out[col] = self._read_rows(col, start, stop) if stop > start else np.zeros(
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
            return Chunk(a, b, {col: self._read_rows(col, a, b) for col in columns})

        if not prefetch or len(spans) == 1:
            for span in spans:
                yield load(span)
            return
        yield from prefetched(spans, load, readers, "moetrace-prefetch")

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
            try:
                out[name] = _host(seq_group[name][:n])
            except Exception as exc:  # a damaged chunk file
                raise MoetraceError(f"{self.path}/sequences/{name}: unreadable ({_one_line(exc)})") from None
        return out

    def decode_label(self, label: str, codes: np.ndarray) -> np.ndarray:
        """Label codes (uint16) -> array of label strings."""
        vocab = np.asarray(self.labels[label] or [""], dtype=object)
        return vocab[np.asarray(codes, dtype=np.int64)]

    def info(self) -> dict[str, Any]:
        """Summary: rows, sequences, model facts, label value counts, array sizes.

        Streams the token columns once to count sequences (distinct ``seq`` ids) and label
        values; arrays report raw (uncompressed) and stored (compressed) bytes.
        ``sequence_runs`` counts runs of equal ``seq``: equal to ``sequences`` when the rows
        obey the store's order invariant (format_version 2 enforces it). Memory: one chunk
        plus 8 bytes per run (the run ids; sorted at the end unless they always increase).
        """
        n = len(self)
        label_counts = {label: np.zeros(max(1, len(v)), dtype=np.int64) for label, v in self.labels.items()}
        n_runs, last_seq, increasing, run_ids = 0, None, True, []
        for chunk in self.iter_chunks(["seq", *self.label_names]):
            seq = chunk["seq"]
            if len(seq):
                first = np.concatenate(([last_seq is None or seq[0] != last_seq], seq[1:] != seq[:-1]))
                ids = seq[first]
                n_runs += len(ids)
                run_ids.append(ids)
                if increasing and len(ids):
                    increasing = bool((last_seq is None or ids[0] > last_seq) and np.all(ids[1:] > ids[:-1]))
                last_seq = seq[-1]
            for label, counts in label_counts.items():
                counts += np.bincount(chunk[label], minlength=len(counts))[:len(counts)]
        # Strictly increasing run ids are distinct: then counting runs is enough.
        n_seq = n_runs if increasing else len(np.unique(np.concatenate(run_ids)))
        arrays = {}
        for name in self._array_names():
            arr = self._group[name]
            rows = self.n_sequences_committed if name.startswith("sequences/") else n
            item = _numpy_dtype(arr).itemsize if arr.dtype.kind != "T" else None
            inner = int(np.prod(arr.shape[1:])) if len(arr.shape) > 1 else 1
            arrays[name] = {
                "codec": _codec_name(arr),
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
            "tokenizer": self.tokenizer,
            "scoring": self.scoring,
            "rank_order": self.rank_order,
            "rows": n,
            "routing_rows": n * self.n_layers * self.top_k,
            "sequences": n_seq,
            "sequence_runs": n_runs,
            "sequence_metadata_rows": self.n_sequences_committed,
            "interventions": self.interventions,
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
    def _expected_arrays(self) -> dict[str, tuple[tuple[np.dtype, ...], tuple[int, ...]]]:
        """Array name -> (accepted dtypes, shape after N) for every per-token array this store may have."""
        L, K, E = self.n_layers, self.top_k, self.n_experts
        spec = {f"tokens/{col}": ((np.dtype(TOKEN_DTYPES[col]),), ()) for col in TOKEN_COLUMNS}
        spec.update({f"tokens/{label}": ((np.dtype(LABEL_DTYPE),), ()) for label in self._meta["labels"]})
        spec["tokens/text"] = ((), ())  # a string array: checked by kind
        spec["routing/experts"] = ((expert_dtype(E),), (L, K))
        spec["routing/weights"] = ((np.dtype(np.float16),), (L, K))
        spec["routing/probs"] = ((np.dtype(np.float16),), (L, E))
        return spec

    def _check_arrays(self) -> None:
        """Refuse missing arrays, arrays of the wrong dtype or shape, and unknown per-token arrays."""
        spec = self._expected_arrays()
        n, n_seq, rows = len(self), self.n_sequences_committed, self.chunk_rows
        optional = {"tokens/text", "routing/weights", "routing/probs"}
        names = set()
        for grp in ("tokens", "routing", "sequences"):
            # List children on disk: zarr's group listing parses every child and would
            # report a broken array as a broken group.
            folder = self.path / grp
            if folder.is_dir():
                names.update(f"{grp}/{p.name}" for p in folder.iterdir() if (p / "zarr.json").is_file())
        for grp in ("tokens", "routing", "sequences"):
            if not (self.path / grp / "zarr.json").is_file():
                raise MoetraceError(f"{self.path}/{grp}: missing group (every moetrace store has it)")
            try:
                node = self._group[grp]
            except Exception as exc:
                raise MoetraceError(f"{self.path}/{grp}: unreadable Zarr group ({_one_line(exc)})") from None
            if not isinstance(node, zarr.Group):
                raise MoetraceError(f"{self.path}/{grp}: expected a Zarr group, got an array")
        for name in sorted(names | (set(spec) - optional)):
            where = f"{self.path}/{name}"
            if name not in names:
                raise MoetraceError(f"{where}: missing array (every moetrace store has it)")
            if not name.startswith("sequences/") and name not in spec:
                raise MoetraceError(f"{where}: unexpected array (not a column or label of this store)")
            try:
                arr = self._group[name]
                shape, chunks, dtype = tuple(arr.shape), tuple(arr.chunks), arr.dtype
            except Exception as exc:
                raise MoetraceError(f"{where}: unreadable Zarr array ({_one_line(exc)})") from None
            if not isinstance(arr, zarr.Array):
                raise MoetraceError(f"{where}: expected a Zarr array, got a group")
            if name.startswith("sequences/"):
                if len(shape) != 1 or shape[0] < n_seq:
                    raise MoetraceError(
                        f"{where}: expected shape ({n_seq} or more,) (sequences_committed), got {shape}")
                continue
            dtypes, inner = spec[name]
            if name == "tokens/text":
                ok = not isinstance(dtype, np.dtype) or dtype.kind in "TUO"
                expected = "a string dtype"
            else:
                ok = isinstance(dtype, np.dtype) and dtype in dtypes
                expected = " or ".join(str(d) for d in dtypes)
            if not ok:
                raise MoetraceError(f"{where}: expected dtype {expected}, got {dtype}")
            if len(shape) != 1 + len(inner) or shape[1:] != inner or shape[0] < n:
                dims = "".join(f", {d}" for d in inner)
                raise MoetraceError(f"{where}: expected shape (N{dims}) with N >= committed={n}, got {shape}")
            step = chunks[0] if chunks else 0
            fraction = name in ("routing/weights", "routing/probs")
            if chunks[1:] != inner or step < 1 or (rows % step if fraction else step != rows):
                raise MoetraceError(
                    f"{where}: expected chunks of {rows} rows (chunk_rows{', or a power-of-2 fraction' if fraction else ''})"
                    f" along N only, got chunks {chunks}")

    def _row_array_names(self) -> list[str]:
        """The tokens/* and routing/* arrays: fixed when the store is created, so listed once
        (listing a group costs a few ms, and ``append`` asks on every batch)."""
        if self._row_arrays is None:
            self._row_arrays = [f"{grp}/{k}" for grp in ("tokens", "routing") if grp in self._group
                                for k in sorted(self._group[grp].array_keys())]
        return list(self._row_arrays)

    def _array_names(self) -> list[str]:
        names = self._row_array_names()
        if "sequences" in self._group:  # sequences/* arrays appear with append_sequences
            names += [f"sequences/{k}" for k in sorted(self._group["sequences"].array_keys())]
        return names

    def _array(self, column: str) -> zarr.Array:
        arr = self._arrays.get(column)
        if arr is None:
            name = f"routing/{column}" if column in ROUTING_COLUMNS else f"tokens/{column}"
            arr = self._arrays[column] = self._group[name].with_config({"write_empty_chunks": True})
        return arr

    @property
    def all_chunks_written(self) -> bool:
        """Whether every chunk (shard) file of the committed rows must exist (stores created since
        moetrace wrote fill-valued chunks too): a missing one is then damage, never zeros."""
        return bool(self._meta.get("all_chunks_written", False))

    def require_chunk_files(self, arr: zarr.Array, start: int, stop: int) -> None:
        """MoetraceError when a chunk (shard) file holding rows ``[start, stop)`` of ``arr`` is missing
        from a local store whose chunks are all written (zarr would read the rows as fill values)."""
        if not self.all_chunks_written or not isinstance(self.path, Path) or stop <= start:
            return
        rows = int(arr.metadata.chunk_grid.chunk_shape[0])
        for index in range(start // rows, (stop - 1) // rows + 1):
            key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
            if not (self.path / arr.path / key).is_file():
                raise MoetraceError(
                    f"{self.path}/{arr.path}/{key}: missing chunk file of committed rows [{index * rows}, "
                    f"{min((index + 1) * rows, len(self))}) (deleted, or a committed count larger than what was "
                    "written): the store is damaged")

    def _read_rows(self, column: str, start: int, stop: int) -> np.ndarray:
        arr = self._array(column)
        self.require_chunk_files(arr, start, stop)
        try:
            return _host(arr[start:stop])
        except Exception as exc:  # a damaged chunk file: codec, size or decode errors
            raise MoetraceError(
                f"{self.path}/{arr.path}: rows [{start}, {stop}) unreadable ({_one_line(exc)})") from None

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

        out["seq"] = _as_int(column("seq"), "tokens/seq", np.int64)
        out["pos"] = _as_int(column("pos"), "tokens/pos", np.int32)
        out["token_id"] = _as_int(column("token_id", -1), "tokens/token_id", np.int32)
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
            with np.errstate(over="ignore"):  # overflow is refused just below
                out[name] = values.astype(np.float16)
            if not np.isfinite(out[name]).all():
                bad = int(np.argmax(~np.isfinite(out[name])).item() // int(np.prod(inner)))
                raise MoetraceError(
                    f"routing/{name}: expected values within float16's range (|x| <= 65504), got "
                    f"{values.reshape(n, -1)[bad][~np.isfinite(out[name].reshape(n, -1)[bad])][0]} (batch row {bad})")
        self._check_distinct(out["experts"])
        ended, last = self._check_order(out["seq"], out["pos"])
        # Labels last: an unseen value extends an open vocabulary, so only accept it
        # once everything else in the batch is known to be valid.
        vocabularies = {}
        for label in self.label_names:
            out[label], vocabularies[label] = self._encode_label(label, column(label))
        self._meta["labels"] = vocabularies  # becomes visible with the next commit
        return out, ended, last

    def _check_order(self, seq: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Enforce the store invariant on a batch (vectorized): a sequence's rows are
        contiguous and in strictly increasing ``pos`` order. Within the batch each id forms
        one run with increasing ``pos``; the first run continues the previous last row's
        sequence (with a larger ``pos``) or starts an id that never appeared before.
        Returns the ids that end with this batch and the new last ``(seq, pos)``; the
        caller records them only once the whole batch is accepted."""
        base = len(self) + self._buffered_rows

        def refuse(i: int, expected: str) -> MoetraceError:
            return MoetraceError(f"{self.path}: row {base + i} (seq {int(seq[i])}, pos {int(pos[i])}): "
                                 f"expected {expected} (a sequence's rows are contiguous, in increasing pos)")

        faults: list[tuple[int, str]] = []  # (batch row, what was expected): the first one is reported
        change = seq[1:] != seq[:-1]
        backwards = ~change & (pos[1:] <= pos[:-1])
        if backwards.any():
            i = int(np.argmax(backwards)) + 1
            faults.append((i, f"pos > {int(pos[i - 1])}, the previous row's pos in this sequence"))
        starts = np.flatnonzero(np.concatenate(([True], change)))
        ids = seq[starts]
        order = np.argsort(ids, kind="stable")
        repeated = ids[order[1:]] == ids[order[:-1]]
        if repeated.any():
            i = int(starts[order[1:][repeated]].min())
            faults.append((i, f"a new sequence id; sequence {int(seq[i])} already ended at an earlier row"))
        continues = self._last is not None and int(ids[0]) == self._last[0]
        if continues and int(pos[0]) <= self._last[1]:
            faults.append((0, f"pos > {self._last[1]}, the previous row's pos in this sequence"))
        new_ids, new_starts = (ids[1:], starts[1:]) if continues else (ids, starts)
        seen = self._ended.contains(new_ids)
        if self._last is not None:
            seen |= new_ids == self._last[0]
        if seen.any():
            i = int(new_starts[np.argmax(seen)])
            faults.append((i, f"a new sequence id; sequence {int(seq[i])} already ended at an earlier row"))
        if faults:
            raise refuse(*min(faults))
        ended = ids[:-1]
        if self._last is not None and not continues:
            ended = np.concatenate(([self._last[0]], ended))
        return ended, (int(seq[-1]), int(pos[-1]))

    def _encode_label(self, label: str, values: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """Codes of ``values`` and the label's vocabulary after them (grown when open)."""
        vocab = self._meta["labels"][label]
        if values.dtype.kind in "iu":
            if len(values) and (values.min() < 0 or values.max() >= len(vocab)):
                raise MoetraceError(
                    f"tokens/{label}: expected codes in [0, {len(vocab)}) (vocabulary {vocab}), "
                    f"got {int(values.max()) if values.max() >= len(vocab) else int(values.min())}")
            return values.astype(LABEL_DTYPE), vocab
        strings = values.astype(str)
        uniq, first, inverse = np.unique(strings, return_index=True, return_inverse=True)
        index = {v: i for i, v in enumerate(vocab)}
        # new values join in the order they first appear in the rows, so the vocabulary does not depend
        # on how the rows were split into batches
        missing = [str(uniq[i]) for i in np.argsort(first, kind="stable").tolist() if uniq[i] not in index]
        if missing:
            if self._meta.get("labels_fixed", {}).get(label, False):
                raise MoetraceError(
                    f"tokens/{label}: value {missing[0]!r} is not in the label vocabulary {vocab}")
            if len(vocab) + len(missing) > MAX_LABEL_VALUES:
                raise MoetraceError(f"tokens/{label}: expected at most {MAX_LABEL_VALUES} distinct values")
            vocab = vocab + missing
            index = {v: i for i, v in enumerate(vocab)}
        lookup = np.array([index[u] for u in uniq.tolist()], dtype=LABEL_DTYPE)
        return lookup[inverse.reshape(-1)], vocab

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
        self._rebuild_order()

    def _rebuild_order(self) -> None:
        """Rebuild the writer's order state (ended sequence ids, last row) from the committed
        rows: one chunked scan of ``tokens/seq`` (and of ``tokens/pos`` for a version 1
        store, whose order was never checked: it is verified here, then upgraded). Memory:
        the ended ids (8 bytes per sequence) plus, while scanning, each sequence's first row
        (8 bytes per sequence) and one chunk."""
        n = len(self)
        if not n:
            return
        check_pos = int(self._meta["format_version"]) < 2
        ids_parts, rows_parts = [], []
        prev: tuple[int, int] | None = None

        def refuse(row: int, s: int, expected: str) -> MoetraceError:
            return MoetraceError(
                f"{self.path}: row {row} (seq {s}): expected {expected}; this store (format_version "
                f"{self._meta['format_version']}) breaks the row order that appending needs (a sequence's rows "
                f"contiguous, in increasing pos): open it read-only, or re-import it")

        for chunk in self.iter_chunks(["seq", "pos"] if check_pos else ["seq"]):
            seq = chunk["seq"]
            change = np.concatenate(([prev is None or int(seq[0]) != prev[0]], seq[1:] != seq[:-1]))
            if check_pos:
                pos = chunk["pos"]
                prev_pos = np.concatenate(([np.iinfo(np.int64).min if prev is None else prev[1]], pos[:-1]))
                backwards = ~change & (pos <= prev_pos)
                if backwards.any():
                    i = int(np.argmax(backwards))
                    raise refuse(chunk.start + i, int(seq[i]), f"pos > {int(prev_pos[i])} (got {int(pos[i])})")
            starts = np.flatnonzero(change)
            ids_parts.append(seq[starts])
            rows_parts.append(starts + chunk.start)
            prev = (int(seq[-1]), int(chunk["pos"][-1]) if check_pos else 0)
        ids, rows = np.concatenate(ids_parts), np.concatenate(rows_parts)
        order = np.argsort(ids, kind="stable")
        repeated = ids[order[1:]] == ids[order[:-1]]
        if repeated.any():
            at = int(np.argmin(np.where(repeated, rows[order[1:]], np.iinfo(np.int64).max)))
            row = int(rows[order[1:]][at])
            raise refuse(row, int(ids[order[1:]][at]), "a new sequence id (this one already ended at an earlier row)")
        del order, rows
        self._ended.add(ids[:-1])
        self._last = (int(ids[-1]), int(self.read(["pos"], n - 1, n)["pos"][0]))
        # written with the next commit; its arrays keep their codecs, so it becomes a version 2 store
        self._meta["format_version"] = ORDER_VERSION


def _codec_name(arr: zarr.Array) -> str:
    """An array's compression in a few words: ``lz4 5 noshuffle`` (Blosc), another codec's name, or ``none``."""
    names = []
    for c in arr.compressors:
        if isinstance(c, BloscCodec):
            names.append(" ".join(str(getattr(v, "value", v)) for v in (c.cname, c.clevel, c.shuffle)))
        else:
            names.append(type(c).__name__.removesuffix("Codec").lower())
    return ", ".join(names) or "none"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _check_meta(path: Path, meta: dict) -> None:
    """Refuse a ``moetrace`` attribute whose facts are missing or of the wrong type."""

    def bad(key: str, expected: str) -> MoetraceError:
        got = repr(meta[key]) if key in meta else "nothing"
        got = got if len(got) <= 80 else got[:77] + "..."
        return MoetraceError(f"{path}/zarr.json: attribute {ATTR_KEY}.{key}: expected {expected}, got {got}")

    for key in ("n_layers", "n_experts", "top_k", "chunk_rows"):
        if not _is_int(meta.get(key)) or meta[key] < 1:
            raise bad(key, "a positive integer")
    if meta["n_experts"] > 65536:
        raise bad("n_experts", "at most 65536")
    if meta["top_k"] > meta["n_experts"]:
        raise bad("top_k", f"at most n_experts={meta['n_experts']}")
    for key in ("committed", "sequences_committed"):
        if key == "committed" or key in meta:
            if not _is_int(meta.get(key)) or not 0 <= meta[key] <= np.iinfo(np.int64).max:
                raise bad(key, "a non-negative 64-bit integer")
    ids = meta.get("layer_ids")
    if (not isinstance(ids, list) or len(ids) != meta["n_layers"]
            or not all(_is_int(x) and 0 <= x <= MAX_LAYER_ID for x in ids)
            or any(b <= a for a, b in zip(ids, ids[1:]))):
        raise bad("layer_ids", f"a list of {meta['n_layers']} increasing integers in [0, {MAX_LAYER_ID}]")
    labels = meta.get("labels")
    reserved = set(TOKEN_COLUMNS) | {"text"} | set(ROUTING_COLUMNS)
    if not isinstance(labels, dict) or not all(
            isinstance(name, str) and name.isidentifier() and name not in reserved
            and isinstance(values, list) and len(values) <= MAX_LABEL_VALUES
            and all(isinstance(v, str) for v in values) and len(set(values)) == len(values)
            for name, values in labels.items()):
        raise bad("labels", "a dict of label name -> list of distinct strings")
    fixed = meta.get("labels_fixed", {})
    if not isinstance(fixed, dict) or not all(isinstance(v, bool) for v in fixed.values()):
        raise bad("labels_fixed", "a dict of label name -> bool")
    for key in ("model", "scoring", "tokenizer"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "a string or null")
    if meta.get("rank_order", "ranked") not in RANK_ORDERS:
        raise bad("rank_order", f"one of {', '.join(RANK_ORDERS)}")
    log = meta.get("interventions", [])
    if not isinstance(log, list) or not all(
            isinstance(e, dict) and isinstance(e.get("what"), list) and isinstance(e.get("sequences"), list)
            and all(isinstance(r, list) and len(r) == 2 and all(_is_int(x) for x in r) for r in e["sequences"])
            for e in log):
        raise bad("interventions", "a list of {what: [...], sequences: [[first, last], ...]}")
    shard = meta.get("shard_chunks")
    if shard is not None and (not _is_int(shard) or shard < 1):
        raise bad("shard_chunks", "a positive integer or null")
    codecs = meta.get("codecs", {"all": meta.get("codec", DEFAULT_CODEC)})
    if not isinstance(codecs, dict):
        raise bad("codecs", "a dict of kind of array -> codec")
    for codec in codecs.values():
        if (not isinstance(codec, dict) or not isinstance(codec.get("cname"), str)
                or not _is_int(codec.get("clevel")) or not isinstance(codec.get("shuffle"), str)):
            raise bad("codecs" if "codecs" in meta else "codec", "a dict with cname (str), clevel (int) and shuffle (str)")


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


def _as_int(values: np.ndarray, name: str, dtype: Any = np.int64) -> np.ndarray:
    """``values`` as integers of ``dtype``; refuses non-integers and values that do not fit
    (a cast would wrap them silently), naming the first bad batch row."""
    dtype = np.dtype(dtype)
    if values.dtype.kind == "b":
        raise MoetraceError(f"{name}: expected integers, got bool values")
    if values.dtype.kind not in "iuf" or (values.dtype.kind == "f" and values.size and not (
            np.all(np.isfinite(values)) and np.all(values == np.round(values)))):
        raise MoetraceError(f"{name}: expected integers, got dtype {values.dtype}")
    if not values.size:
        return values.astype(dtype)
    info = np.iinfo(dtype)
    if values.dtype.kind == "f":
        # float bounds: 2**63 is exactly representable, int64's max is not
        too_big = (values < float(info.min)) | (values >= float(info.max) + 1)
    elif int(values.min()) < info.min or int(values.max()) > info.max:
        too_big = (values < info.min) | (values > info.max)  # NumPy 2 compares with any Python int
    else:
        too_big = None
    if too_big is not None and too_big.any():
        row = int(np.argmax(too_big.reshape(len(values), -1).any(axis=1)))
        bad = values.reshape(len(values), -1)[row][too_big.reshape(len(values), -1)[row]][0]
        raise MoetraceError(
            f"{name}: expected values in [{info.min}, {info.max}] ({dtype}), got {bad.item()} (batch row {row})")
    return values.astype(dtype, copy=False)


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


def open_store(store: str | Path | TraceStore) -> TraceStore:
    """A trace store to read: ``store`` itself when it is already an open :class:`TraceStore`,
    else ``TraceStore.open(store)`` (a path; ``len(store)`` is its committed rows, ``T``)."""
    return store if isinstance(store, TraceStore) else TraceStore.open(store)

"""Read a store's chunks for counting: chunk files decoded straight into a caller's buffers.

The counting hot path reads a few whole-chunk columns. For a column stored the way
:class:`~moetrace.store.TraceStore` writes it (an unsharded Zarr v3 array on a local
directory, chunked along rows only, codecs ``bytes`` (little endian) + ``blosc``), the
chunk file is read and handed to ``numcodecs.blosc.decompress`` with a preallocated
output buffer: no per-chunk zarr machinery, no allocation. A frame Blosc stored
uncompressed (its "memcpyed" flag: what lz4 without shuffle does with near-random
expert ids, format_version 3's default) is not copied at all: the file is mapped into
memory and counted in place. Any other layout (sharding, another codec, object storage,
string columns) is read through zarr, so a store stays a plain Zarr store either way.

:class:`ChunkReader` is safe to use from several threads at once, each with its own
buffers (:meth:`ChunkReader.buffers`): the count driver runs one reader per worker.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

import numpy as np
import zarr
from numcodecs import blosc
from zarr.core.metadata import ArrayV3Metadata

from moetrace.errors import MoetraceError
from moetrace.store import ROUTING_COLUMNS, Chunk, TraceStore

__all__ = ["ChunkReader"]

_HEADER = 16  # bytes of a Blosc frame header
_MEMCPYED = 0x02  # header flag: the frame holds the data uncompressed after the header


class _RawColumn:
    """One column read chunk by chunk from its files, or None when the layout is not the plain one."""

    def __init__(self, st: TraceStore, column: str):
        name = f"routing/{column}" if column in ROUTING_COLUMNS else f"tokens/{column}"
        self.dir = Path(st.path) / name
        # the array's metadata from its zarr.json: 0.2 ms, where opening the array costs 2 ms (a count call
        # on 1e8 rows takes 40 ms); zarr opens the array only for a chunk file that is missing
        with open(self.dir / "zarr.json", "rb") as fh:
            meta = ArrayV3Metadata.from_dict(json.load(fh))
        info = meta.to_dict()
        dtype = meta.dtype.to_native_dtype()
        codecs = [c if isinstance(c, dict) else c.to_dict() for c in info.get("codecs", [])]
        names = [c.get("name") for c in codecs]
        grid = info.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        self.ok = (
            info.get("zarr_format") == 3
            and names == ["bytes", "blosc"]
            and codecs[0].get("configuration", {}).get("endian", "little") in ("little", None)
            and isinstance(dtype, np.dtype) and dtype.kind in "biuf"
            and grid is not None and list(grid[1:]) == list(meta.shape[1:])
            and self.dir.is_dir()
            and sys.byteorder == "little"
        )
        self.rows = int(grid[0]) if grid else 0
        self.meta = meta
        self.dtype = dtype
        self.inner = tuple(meta.shape[1:])
        self.fill = meta.fill_value
        self.store = st

    def decode(self, index: int, out: np.ndarray) -> np.ndarray:
        """Chunk ``index`` (a whole chunk of ``rows`` rows): decoded into ``out``, or, for a frame stored
        uncompressed, a read-only view of the file mapped into memory (the same bytes with no copy)."""
        path = self.dir / self.meta.encode_chunk_key((index,) + (0,) * len(self.inner))
        try:
            fh = open(path, "rb", buffering=0)
        except FileNotFoundError:
            # a store written before moetrace wrote every chunk may lack its fill-valued ones
            arr = zarr.open_array(str(self.dir), mode="r")
            self.store.require_chunk_files(arr, index * self.rows, min((index + 1) * self.rows, len(self.store)))
            out[...] = self.fill
            return out
        except OSError as exc:
            raise MoetraceError(f"{path}: unreadable chunk ({exc.strerror or exc})") from None
        try:
            with fh:
                head = fh.read(_HEADER)
                # a Blosc frame's 16-byte header holds its flags (byte 2), its decoded size (bytes 4-7) and its
                # own length (bytes 12-15, little endian): a frame that decodes short would leave the previous
                # chunk's rows in the reused buffer, and one cut short would have the decompressor read past its end
                if len(head) < _HEADER:
                    raise ValueError(f"{len(head)} bytes, shorter than a Blosc header")
                size, length = int.from_bytes(head[4:8], "little"), int.from_bytes(head[12:16], "little")
                if size != out.nbytes:
                    raise ValueError(f"the frame decodes to {size} bytes, expected {out.nbytes}")
                file_size = os.fstat(fh.fileno()).st_size
                if length != file_size:
                    raise ValueError(_length_mismatch(length, file_size))
                if head[2] & _MEMCPYED and length == _HEADER + size:
                    # mapping costs 0.08 ms per 8 MiB chunk, reading it into the buffer 0.5 ms
                    mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                    return np.frombuffer(mapped, dtype=out.dtype, offset=_HEADER).reshape(out.shape)
                data = head + fh.read()
            if length != len(data):  # the file changed since fstat
                raise ValueError(_length_mismatch(length, len(data)))
            blosc.decompress(data, out)
            return out
        except OSError as exc:
            raise MoetraceError(f"{path}: unreadable chunk ({exc.strerror or exc})") from None
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on a damaged frame
            raise MoetraceError(f"{path}: damaged chunk ({exc})") from None


def _length_mismatch(length: int, have: int) -> str:
    why = "truncated?" if have < length else "bytes appended after it?"
    return f"the frame says it is {length} bytes long, the file has {have} ({why})"


class ChunkReader:
    """Whole chunks of ``columns`` over rows ``[start, stop)`` of a store, along its chunk grid.

    ``indices`` are the chunk indices to read; ``load(index, buffers)`` reads one into
    ``buffers`` (from :meth:`buffers`, one set per thread) and returns a
    :class:`~moetrace.store.Chunk` whose arrays are views of them (valid until those
    buffers are loaded again) or of the mapped chunk file (read-only).
    """

    def __init__(self, st: TraceStore, columns: list[str], rows: tuple[int, int]):
        self.store, self.columns = st, list(columns)
        self.start, self.stop = max(0, rows[0]), min(rows[1], len(st))
        self.step = st.chunk_rows
        self.raw: dict[str, _RawColumn] = {}
        local = isinstance(st.path, Path)  # a store at a URL is read through zarr
        for col in self.columns if local and self.start < self.stop else ():
            try:
                rc = _RawColumn(st, col)
            except Exception:  # an unexpected layout: zarr reads it
                continue
            if rc.ok and rc.rows == self.step:
                self.raw[col] = rc
        if self.start < self.stop:
            self.indices = range(self.start // self.step, (self.stop - 1) // self.step + 1)
        else:
            self.indices = range(0)

    def buffers(self) -> dict[str, np.ndarray]:
        """One set of decode buffers (a whole chunk of each column read from its files)."""
        return {col: np.empty((self.step, *rc.inner), dtype=rc.dtype) for col, rc in self.raw.items()}

    def load(self, index: int, buffers: dict[str, np.ndarray]) -> Chunk:
        a, b = max(self.start, index * self.step), min(self.stop, (index + 1) * self.step)
        cols = {}
        for col in self.columns:
            rc = self.raw.get(col)
            if rc is None:
                cols[col] = self.store.read([col], a, b)[col]
            else:
                whole = rc.decode(index, buffers[col])
                cols[col] = whole[a - index * self.step: b - index * self.step]
        return Chunk(a, b, cols)

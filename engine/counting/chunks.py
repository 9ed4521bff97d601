"""Read a store's chunks for counting: chunk files decoded straight into reused buffers.

The counting hot path reads a few whole-chunk columns in order. For a column stored the
way :class:`~moetrace.store.TraceStore` writes it (an unsharded Zarr v3 array on a local
directory, chunked along rows only, codecs ``bytes`` (little endian) + ``blosc``), the
chunk file is read and handed to ``numcodecs.blosc.decompress`` with a preallocated
output buffer: no per-chunk zarr machinery, no allocation, no copy. Any other layout
(sharding, another codec, object storage, string columns) is read through zarr, so a
store stays a plain Zarr store either way. Buffers come from a ring a little longer than
the prefetch depth, so a chunk's arrays stay valid until the caller asks for the next
chunk plus ``readers`` more; callers that keep arrays longer must copy them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator

import numpy as np
import zarr
from numcodecs import blosc

from moetrace.errors import MoetraceError
from moetrace.store import ROUTING_COLUMNS, Chunk, TraceStore, prefetched

__all__ = ["iter_count_chunks"]


class _RawColumn:
    """One column read chunk by chunk from its files, or None when the layout is not the plain one."""

    def __init__(self, st: TraceStore, column: str):
        name = f"routing/{column}" if column in ROUTING_COLUMNS else f"tokens/{column}"
        self.dir = Path(st.path) / name
        arr = zarr.open_array(str(self.dir), mode="r")
        self.arr = arr
        meta = arr.metadata
        info = meta.to_dict()
        codecs = [c if isinstance(c, dict) else c.to_dict() for c in info.get("codecs", [])]
        names = [c.get("name") for c in codecs]
        grid = info.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape")
        self.ok = (
            info.get("zarr_format") == 3
            and names == ["bytes", "blosc"]
            and codecs[0].get("configuration", {}).get("endian", "little") in ("little", None)
            and isinstance(arr.dtype, np.dtype) and arr.dtype.kind in "biuf"
            and grid is not None and list(grid[1:]) == list(arr.shape[1:])
            and self.dir.is_dir()
            and sys.byteorder == "little"
        )
        self.rows = int(grid[0]) if grid else 0
        self.meta = meta
        self.dtype = arr.dtype
        self.inner = tuple(arr.shape[1:])
        self.fill = arr.fill_value
        self.store = st

    def decode(self, index: int, out: np.ndarray) -> None:
        """Decode chunk ``index`` (a whole chunk of ``rows`` rows) into ``out``."""
        path = self.dir / self.meta.encode_chunk_key((index,) + (0,) * len(self.inner))
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            # a store written before moetrace wrote every chunk may lack its fill-valued ones
            self.store.require_chunk_files(self.arr, index * self.rows, min((index + 1) * self.rows, len(self.store)))
            out[...] = self.fill
            return
        except OSError as exc:
            raise MoetraceError(f"{path}: unreadable chunk ({exc.strerror or exc})") from None
        try:
            # a Blosc frame's 16-byte header holds its decoded size (bytes 4-7) and its own length
            # (bytes 12-15, little endian): a frame that decodes short would leave the previous chunk's
            # rows in the reused buffer, and one cut short would have the decompressor read past its end
            if len(data) < 16:
                raise ValueError(f"{len(data)} bytes, shorter than a Blosc header")
            size, length = int.from_bytes(data[4:8], "little"), int.from_bytes(data[12:16], "little")
            if length != len(data):
                raise ValueError(f"the frame says it is {length} bytes long, the file has {len(data)} (truncated?)")
            if size != out.nbytes:
                raise ValueError(f"the frame decodes to {size} bytes, expected {out.nbytes}")
            blosc.decompress(data, out)
        except Exception as exc:  # numcodecs raises RuntimeError/ValueError on a damaged frame
            raise MoetraceError(f"{path}: damaged chunk ({exc})") from None


def iter_count_chunks(st: TraceStore, columns: list[str], rows: tuple[int, int],
                      readers: int = 2) -> Iterator[Chunk]:
    """Yield :class:`~moetrace.store.Chunk` blocks of ``rows`` along the store's chunk grid.

    Arrays may be views into reused buffers (see the module docstring).
    """
    start, stop = max(0, rows[0]), min(rows[1], len(st))
    if start >= stop:
        return
    raw = {}
    local = isinstance(st.path, Path)  # a store at a URL is read through zarr
    for col in columns if local else ():
        try:
            rc = _RawColumn(st, col)
        except Exception:  # an unexpected layout: zarr reads it
            continue
        if rc.ok and rc.rows == st.chunk_rows:
            raw[col] = rc
    step = st.chunk_rows
    first, last = start // step, (stop - 1) // step
    ring = readers + 2
    buffers = {col: [np.empty((step, *rc.inner), dtype=rc.dtype) for _ in range(ring)] for col, rc in raw.items()}

    def load(index: int) -> Chunk:
        a, b = max(start, index * step), min(stop, (index + 1) * step)
        cols = {}
        for col in columns:
            rc = raw.get(col)
            if rc is None:
                cols[col] = st.read([col], a, b)[col]
            else:
                buf = buffers[col][index % ring]
                rc.decode(index, buf)
                cols[col] = buf[a - index * step: b - index * step]
        return Chunk(a, b, cols)

    indices = range(first, last + 1)
    if len(indices) == 1:
        yield load(first)
        return
    yield from prefetched(indices, load, readers, "moetrace-count-read")

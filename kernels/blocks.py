"""Numba checks of token blocks for the importers: arrays in, a row index out.

Long formats (Parquet, CSV) hold one row per token x layer x rank, so a token is a block of
``per = L x K`` consecutive rows whose per-token columns (labels, token text) must repeat
its first row's value. These find the first row that breaks that in one pass over the
bytes, where comparing Arrow strings row by row costs a gather and a comparison per row.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["first_break_in_string_blocks"]


@numba.njit(nogil=True, cache=True)
def first_break_in_string_blocks(offsets, data, per):
    """The first row whose string differs from its block's first row, or -1.

    ``offsets`` int32 / int64 [n + 1] and ``data`` uint8: an Arrow string array's value
    offsets (already shifted by the array's offset) and bytes; rows ``[b * per, (b + 1) * per)``
    form block b (a last partial block is checked too). When every row of a block has the
    head's length, the block's bytes are the head repeated: they equal themselves shifted by
    one row, compared 256 bytes at a time without a branch (vectorized).
    """
    n = offsets.shape[0] - 1
    for head in range(0, n, per):
        end = min(n, head + per)
        a0 = offsets[head]
        length = offsets[head + 1] - a0
        for r in range(head + 1, end):
            if offsets[r + 1] - offsets[r] != length:
                return r
        total = offsets[end] - a0 - length  # bytes of rows head+1 .. end-1
        for start in range(0, total, 256):
            stop = min(total, start + 256)
            diff = np.uint8(0)
            for i in range(start, stop):
                diff |= data[a0 + length + i] ^ data[a0 + i]
            if diff:
                for i in range(start, stop):
                    if data[a0 + length + i] != data[a0 + i]:
                        return head + 1 + i // length
    return -1

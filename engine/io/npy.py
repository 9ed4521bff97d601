"""``--format npy``: a directory of ``.npy`` files, each one sequence as an integer array ``[tokens, layers, top_k]``.

Rank 0 first along ``top_k``. Sequences get ids 0, 1, ... in sorted file-name order
(the request id for a labels file is the file name without ``.npy``); every token is a
prompt token (``generated`` False), token ids are unknown (-1). Files are loaded with
``np.load(allow_pickle=False)``: an object array or a non-integer dtype is an error
naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from moetrace.errors import MoetraceError
from moetrace.io.routed import Request

HELP = "SRC is a directory of .npy files, each one sequence as an int array [tokens, layers, top_k]"


def read(src: Path, top_k: int | None = None) -> Iterator[Request]:
    """One :class:`Request` per ``.npy`` file of ``src``, in sorted file-name order."""
    if not src.is_dir():
        raise MoetraceError(f"{src}: expected a directory of .npy files")
    files = sorted(p for p in src.iterdir() if p.suffix == ".npy" and p.is_file())
    if not files:
        raise MoetraceError(f"{src}: no .npy files")
    for path in files:
        try:
            experts = np.load(path, allow_pickle=False)
        except ValueError as exc:  # object arrays need pickle; also malformed headers
            raise MoetraceError(f"{path}: not a plain .npy array ({exc})") from None
        except (OSError, EOFError) as exc:
            raise MoetraceError(f"{path}: unreadable .npy file ({exc})") from None
        if not isinstance(experts, np.ndarray):
            raise MoetraceError(f"{path}: expected one .npy array, got {type(experts).__name__}")
        if top_k is not None and experts.ndim == 3 and experts.shape[2] != top_k:
            raise MoetraceError(f"{path}: top_k is {experts.shape[2]}, expected {top_k} (--top-k)")
        yield Request(where=str(path), key=path.stem, experts=experts, fields={"file": path.name})

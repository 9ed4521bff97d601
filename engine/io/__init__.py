"""Importers and exporters between trace files and a :class:`engine.store.TraceStore`.

One source format per module, all returning an open store and all passing the same
round-trip contract (``tests/io_contract.py``):

- :func:`import_csv` (``csv_import.py``): seed 000's ``samples.csv`` + ``topks.csv``.
- :func:`import_llamacpp` (``llamacpp.py``): seed 002's ``DIR/<domain>/traces/token-NNNNN.json``.
- :func:`import_parquet` / :func:`export_parquet` (``parquet.py``): the long format, one row
  per token x layer x rank, that DuckDB and polars users query directly.

Every importer streams its input, writes into ``OUT.partial-<pid>`` next to ``OUT`` and
renames it to ``OUT`` only when the whole import succeeded (see :func:`staged_store`), so a
failed or killed import never leaves a store that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from engine.errors import MoetraceError


def check_output_path(out: str | os.PathLike, overwrite: bool) -> Path:
    """Return ``out`` as a Path; raise MoetraceError if it exists and ``overwrite`` is False."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise MoetraceError(f"{out}: output already exists (pass overwrite=True / --overwrite to replace it)")
    return out


@contextlib.contextmanager
def staged_store(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path ``OUT.partial-<pid>`` to build a store (or file) in; publish it as ``out``.

    On normal exit the temporary directory is renamed to ``out`` (replacing an existing
    ``out`` only when ``overwrite``); on any exception it is deleted, so nothing that looks
    like a finished store is left behind. The caller must close its store before leaving.
    """
    out = check_output_path(out, overwrite)
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    _remove(partial)
    try:
        yield partial
    except BaseException:
        _remove(partial)
        raise
    _remove(out)
    os.replace(partial, out)


def _remove(path: Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def resolve_n_experts(max_expert: int, n_experts: int | None, source: str) -> int:
    """Number of experts: ``n_experts`` when given (checked against the data), else max id + 1."""
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


from engine.io.csv_import import import_csv  # noqa: E402
from engine.io.llamacpp import import_llamacpp  # noqa: E402
from engine.io.parquet import export_parquet, import_parquet  # noqa: E402

__all__ = ["import_csv", "import_llamacpp", "import_parquet", "export_parquet", "staged_store"]

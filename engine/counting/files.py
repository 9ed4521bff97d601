"""The counts file format: a Zarr store written by xarray, published atomically.

Format (``moetrace_counts_version`` = 1): the Dataset of :func:`moetrace.counting.count`
written with ``xarray.Dataset.to_zarr`` (consolidated metadata, so a plain
``xarray.open_zarr`` reads it), plus the group attribute ``moetrace_counts_complete``
= 1, set only after every variable is written.

Crash safety, like the trace store's importers: :func:`save_counts` writes into
``OUT.partial-<pid>`` next to ``OUT``, marks it complete, then publishes it by
renaming. With ``overwrite`` the old file is first renamed to ``OUT.old-<pid>`` and
deleted only after the new one is in place, so a kill at any moment leaves either the
old file or the new one at ``OUT`` (or, between the two renames, both beside it), never
a half-written file under the name. :func:`load_counts` refuses a file without the
completion mark (a ``.partial`` directory, or a file written by a killed older version)
with a clear error.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import xarray as xr

from moetrace.errors import MoetraceError
from moetrace.io.base import check_output_path
from moetrace.leftovers import clean

__all__ = ["COUNTS_VERSION", "COMPLETE_ATTR", "save_counts", "load_counts"]

COUNTS_VERSION = 1
#: Group attribute set (to 1) once every variable of a counts file is written.
COMPLETE_ATTR = "moetrace_counts_complete"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def save_counts(ds: xr.Dataset, path: str | Path, overwrite: bool = True) -> None:
    """Write a counts Dataset to a Zarr store at ``path`` (``xarray.open_zarr`` reads it back).

    Crash-safe (see the module docstring): ``path`` holds either its old content or the
    complete new file at every moment. Raises MoetraceError when ``ds`` is not a counts
    Dataset, or ``path`` exists and ``overwrite`` is False.
    """
    import zarr

    if ds.attrs.get("moetrace_counts_version") != COUNTS_VERSION:
        raise MoetraceError(
            f"save_counts: expected a counts Dataset (moetrace_counts_version={COUNTS_VERSION}), "
            f"got attribute {ds.attrs.get('moetrace_counts_version')!r}")
    path = Path(path)
    check_output_path(path, True, tuple(ds.attrs.get("stores", [])), what="an input store")
    if path.exists() and not overwrite:
        raise MoetraceError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    clean(path.parent, path.name)  # what a killed earlier writer of this file left
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    _remove(partial)
    out = ds.copy()
    out.attrs.pop(COMPLETE_ATTR, None)
    try:
        with warnings.catch_warnings():
            # Consolidated metadata (so a plain ``xarray.open_zarr`` opens it quietly) is
            # not yet part of the Zarr v3 spec; zarr warns about that on every write.
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            out.to_zarr(str(partial), mode="w", consolidated=True)
            group = zarr.open_group(str(partial), mode="r+")
            group.attrs[COMPLETE_ATTR] = 1
            zarr.consolidate_metadata(str(partial))
    except BaseException:
        _remove(partial)
        raise
    old = None
    if path.exists():
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(path, old)
    os.replace(partial, path)
    if old is not None:
        _remove(old)


def load_counts(path: str | Path) -> xr.Dataset:
    """Read a counts Dataset written by :func:`save_counts` (loaded into memory).

    Raises MoetraceError when ``path`` is not a Zarr store, not a counts file, a counts
    file of another ``moetrace_counts_version``, or incomplete (its writer did not finish).
    """
    path = Path(path)
    if not path.exists():
        leftovers = sorted(p.name for p in path.parent.glob(f"{path.name}.old-*")) if path.parent.exists() else []
        hint = f" ({leftovers[0]} beside it is the previous file, left by an interrupted overwrite)" if leftovers else ""
        raise MoetraceError(f"{path}: no such counts file{hint}")
    try:
        with warnings.catch_warnings():  # a file written without consolidated metadata
            warnings.filterwarnings("ignore", message="Failed to open Zarr store with consolidated",
                                    category=RuntimeWarning)
            ds = xr.open_zarr(str(path))
    except Exception as exc:  # zarr raises several types for a non-Zarr directory
        raise MoetraceError(f"{path}: not a counts file (cannot open as Zarr: {exc})") from None
    version = ds.attrs.get("moetrace_counts_version")
    if version is None:
        if "moetrace" in ds.attrs:  # the attribute every trace store carries (moetrace.store.ATTR_KEY)
            raise MoetraceError(f"{path}: a trace store, not a counts file; count it first: "
                                f"`moetrace count {path} counts.zarr --by LABELS` (or moetrace.count)")
        raise MoetraceError(f"{path}: not a moetrace counts file (no moetrace_counts_version attribute)")
    if version != COUNTS_VERSION:
        raise MoetraceError(
            f"{path}: counts file version {version}, expected moetrace_counts_version={COUNTS_VERSION}")
    if "last_shared_pos" in ds.attrs:  # its name before it said what it holds (a number of tokens)
        ds.attrs["shared_prefix_tokens"] = ds.attrs.pop("last_shared_pos")
    if ds.attrs.get(COMPLETE_ATTR) != 1:
        raise MoetraceError(
            f"{path}: incomplete counts file (no {COMPLETE_ATTR} mark: its writer was interrupted); "
            f"count again")
    ds = ds.load()
    ds.attrs.pop(COMPLETE_ATTR, None)
    return ds

"""Counting an archive: many stores, split into row ranges, in-process or on a Dask cluster.

An *archive* is a store, a directory of stores, a glob, or a list of those; each may
be a local path or an fsspec URL (``s3://``, ``gs://``, ``memory://``...; ``file://``
is read as a local path). :func:`stores_of` resolves it to the stores' paths, sorted.

Stores of one archive must share layer ids, expert count and top-k (else a
MoetraceError names the first store that differs). Label vocabularies may differ: the
``by`` coordinates of the result are the union of the stores' values (first store
first, new values in the order they appear), and every partial count is reindexed to
them by value before it is added, so a label value counts the same whatever its code
in each store.

The work is a list of chunk-aligned row ranges (:func:`plan`), each counted by
:func:`moetrace.counting.count_range` where it runs (a Dask worker reads its own
chunks straight from the store; only the count tensors travel). Partial counts are
added in a tree of tasks on a cluster, as a running sum in-process (or with a
checkpoint: the client saves each range as it comes). Counts are int64, so their sum does
not depend on the order: a cluster's result equals the in-process one bit for bit.
A float statistic that declares an ``exact_unit`` (``weight_sum``: float16 weights, all multiples
of 2**-24) is as exact: within a range it is a float64 sum, exact while a cell stays below
2**53 units (2**29 for weight_sum; a range is at most :data:`RANGE_ROUTING_ROWS` = 2**27 routing
rows, so with weights <= 1, e.g. softmax or sigmoid ones, it always does; a range that passes it
is a MoetraceError). Ranges are then added as int64 multiples of the unit, exact up to 2**63
units (2**39 = 5.5e11 per weight_sum cell), and the total is rounded to float64 once at the end:
the same value in any order. Nothing of Dask is
imported unless a ``client`` is given.

Range size: :data:`RANGE_ROUTING_ROWS` routing rows (tokens x L x K) rounded down to
whole chunks (at least one). At the measured 5-6e8 routing rows per CPU-second end to
end (bench/RESULTS.md, issue 10), that is 0.2-0.3 s of counting per task on one core,
so Dask's ~1 ms per task is under 1% and a 1e12-row archive is ~7,500 tasks.

Checkpoints (``checkpoint=DIR``): each finished range's counts are saved in DIR with
:func:`~moetrace.counting.files.save_counts` (a Zarr counts file, written beside its name
and renamed when complete; no pickle), named by a hash of its store's identity (path or
URL, committed rows, creation ``uuid``), the range and the count's arguments. A rerun
with the same arguments loads the ranges already there and counts only the others.
``DIR/archive.json`` names the archive DIR was made for; another archive (another store,
more rows, a store rewritten since) is refused (see :func:`_checkpoint_files`).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from moetrace.counting.driver import count_range, parse_stats, strings
from moetrace.counting.files import load_counts, save_counts
from moetrace.counting.filters import DERIVED_LABELS, Filters, _values
from moetrace.counting.prefix import shared_prefix
from moetrace.errors import MoetraceError
from moetrace.kernels.counting import STATS
from moetrace.leftovers import clean, describe, leftover
from moetrace.store import ATTR_KEY, TraceStore, open_store

__all__ = ["RANGE_ROUTING_ROWS", "stores_of", "plan", "count_archive"]

#: Routing rows (tokens x layers x top-k) per task; see the module docstring.
RANGE_ROUTING_ROWS = 1 << 27

_GLOB_CHARS = "*?["
#: Attribute carried through the sum: store -> its last shared prefix position.
_SHARED = "_last_shared_by_store"


def _is_url(text: str) -> bool:
    return "://" in text and not text.startswith("file://")


def _local(text: str) -> str:
    return text[len("file://"):] if text.startswith("file://") else text


def _trace_store_json(raw: bytes | None) -> bool:
    """Whether a group's ``zarr.json`` is a trace store's (it has the ``moetrace`` attribute; a counts
    file or any other Zarr group has not)."""
    try:
        return raw is not None and ATTR_KEY in json.loads(raw).get("attributes", {})
    except (ValueError, AttributeError):
        return False


def _stores_at(text: str) -> list[str]:
    """Stores named by one path, directory or glob (local or an fsspec URL).

    A directory or glob takes the complete trace stores it holds: leftovers of interrupted writes
    (``*.partial-<pid>``, ``*.old-<pid>``: :mod:`moetrace.leftovers`) and Zarr groups that are not
    trace stores (e.g. a counts file saved there) are skipped with a warning naming them. A path
    that names a store itself is taken as it is."""
    if _is_url(text):
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(text)
        except (ImportError, ValueError) as exc:
            raise MoetraceError(f"{text}: cannot open ({exc}; install the fsspec filesystem for this URL)") from None
        url = fs.unstrip_protocol

        def read_json(p: str) -> bytes | None:
            try:
                return fs.cat(f"{p.rstrip('/')}/zarr.json")
            except (FileNotFoundError, OSError):
                return None

        def children(p: str) -> list[str]:
            return [c["name"] for c in fs.ls(p, detail=True) if c["type"] == "directory"]

        def isdir(p: str) -> bool:
            return fs.isdir(p)

        matches = fs.glob(root) if any(ch in root for ch in _GLOB_CHARS) else [root]
    else:
        text = _local(text)

        def url(p: str) -> str:
            return p

        def read_json(p: str) -> bytes | None:
            try:
                return (Path(p) / "zarr.json").read_bytes()
            except OSError:
                return None

        def children(p: str) -> list[str]:
            return [str(c) for c in Path(p).iterdir() if c.is_dir()]

        def isdir(p: str) -> bool:
            return Path(p).is_dir()

        matches = globlib.glob(text) if any(ch in text for ch in _GLOB_CHARS) else [text]
    out, skipped = [], []
    explicit = len(matches) == 1 and matches[0] == (text if not _is_url(text) else root)
    for m in sorted(matches):
        raw = read_json(m)
        if raw is not None and explicit:  # named itself: taken (opening it says so when it is not a trace store)
            out.append(url(m))
            continue
        candidates = [m] if raw is not None else (sorted(children(m)) if isdir(m) else [])
        for c in candidates:
            found = read_json(c)
            if found is None:
                continue
            if leftover(Path(c.rstrip("/")).name) is not None:
                skipped.append(describe(c))
            elif not _trace_store_json(found):
                skipped.append(f"{Path(c.rstrip('/')).name} (a Zarr group, not a trace store)")
            else:
                out.append(url(c))
    if skipped:
        warnings.warn(f"{text}: skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that are not "
                      f"complete trace stores: {'; '.join(skipped)}", stacklevel=3)
    return out


def stores_of(archive: Any) -> list[str | TraceStore]:
    """The stores of an archive: a store, a directory of stores, a glob, or a list of those.

    Open :class:`TraceStore` objects are kept as they are. Raises MoetraceError when
    the archive names no store.
    """
    if isinstance(archive, TraceStore):
        return [archive]
    if isinstance(archive, (str, Path)):
        found = _stores_at(str(archive))
        if not found:
            raise MoetraceError(
                f"{archive}: no trace store there (expected a store, a directory of stores or a glob)")
        return found
    try:
        items = list(archive)
    except TypeError:
        raise MoetraceError(f"archive: expected a store, a directory, a glob or a list of them, got {archive!r}") from None
    if not items:
        raise MoetraceError("archive: expected at least one store, got an empty list")
    out: list[str | TraceStore] = []
    seen: set[str] = set()
    for item in items:
        for s in stores_of(item):
            key = _where(s)
            if key not in seen:  # one store named twice (a.zarr, ./a.zarr, its absolute path) is counted once
                seen.add(key)
                out.append(s)
    return out


def _where(store: str | TraceStore) -> str:
    """A store's location, resolved (symlinks, relative paths) when local: equal for one store however named."""
    path = store.path if isinstance(store, TraceStore) else store
    text = str(path)
    return text if _is_url(text) else os.path.realpath(_local(text))


def _check_distinct(stores: list[TraceStore]) -> None:
    """Refuse two stores with one ``uuid`` (a copy, or one store reached by two URLs): counting both
    would count its rows twice."""
    first: dict[str, TraceStore] = {}
    for st in stores:
        if st.uuid is None:
            continue
        if st.uuid in first:
            raise MoetraceError(f"{first[st.uuid].path} and {st.path} are the same store (uuid {st.uuid}; a copy, "
                                "or one store under two names): name it once")
        first[st.uuid] = st


def _check_compatible(stores: list[TraceStore]) -> None:
    first = stores[0]
    for st in stores[1:]:
        for what, a, b in (("layer ids", list(first.layer_ids), list(st.layer_ids)),
                           ("n_experts", first.n_experts, st.n_experts),
                           ("top_k", first.top_k, st.top_k)):
            if a != b:
                raise MoetraceError(
                    f"{st.path}: {what} {b} differ from {first.path}'s {a} "
                    f"(the stores of one archive must have the same layers, experts and top-k)")


def _vocab(st: TraceStore) -> dict[str, list[str]]:
    """Values of every label ``by`` and ``groups`` accept in ``st`` (stored and derived)."""
    return {**DERIVED_LABELS, **st.labels}


def _coords(stores: list[TraceStore], filters: Filters) -> dict[str, list[str]]:
    """Final ``by`` coordinates: the ``groups`` values as given, else the union of the vocabularies.

    Also checks every ``groups`` / ``where`` label value against the union of the stores'
    vocabularies: a value some store lacks is fine (that store has no such row), a value
    no store has is a MoetraceError.
    """
    for arg, mapping, vocab_of in (("groups", filters.groups, _vocab), ("where", filters.where, lambda st: st.labels)):
        for label, values in mapping.items():
            vocabs = [vocab_of(st) for st in stores]
            if not any(label in v for v in vocabs):
                continue  # not a label (a token column of where, or a typo): each store's compile says so
            union = list(dict.fromkeys(x for v in vocabs for x in v.get(label, [])))
            for value in _values(values):
                if not isinstance(value, str) or value not in union:
                    raise MoetraceError(f"{arg}[{label!r}]: value {value!r} is not a {label} in any store of the "
                                        f"archive; expected one of {union}")
    out = {}
    for label in filters.by:
        if label in filters.groups:
            out[label] = list(dict.fromkeys(_values(filters.groups[label])))
            continue
        union: dict[str, None] = {}
        for st in stores:
            vocab = _vocab(st)
            if label not in vocab:
                raise MoetraceError(f"by: unknown label {label!r} in {st.path}; expected one of {sorted(vocab)}")
            union.update(dict.fromkeys(vocab[label]))
        out[label] = list(union)
    return out


def _store_filters(st: TraceStore, filters: Filters) -> Filters | None:
    """``filters`` with the ``groups`` / ``where`` label values ``st`` lacks left out; None when no row can pass.

    A label value absent from a store's vocabulary selects no row of it, so leaving it out
    changes nothing there (:func:`_coords` has checked it exists in some store); the
    ``by`` coordinates stay the archive's (each range is reindexed to them).
    """
    vocab, changes = _vocab(st), {}
    for arg, mapping, labels in (("groups", filters.groups, vocab), ("where", filters.where, st.labels)):
        kept = dict(mapping)
        for label, values in mapping.items():
            if label in labels:
                kept[label] = [v for v in _values(values) if v in labels[label]]
                if not kept[label]:
                    return None
        changes[arg] = kept
    return dataclasses.replace(filters, **changes)


def plan(stores: list[TraceStore], range_rows: int | None = None) -> list[tuple[int, int, int]]:
    """Chunk-aligned ranges ``(store index, start, stop)`` covering every committed row.

    ``range_rows``: rows per range (rounded down to whole chunks, at least one chunk);
    default :data:`RANGE_ROUTING_ROWS` routing rows.
    """
    out = []
    for i, st in enumerate(stores):
        step = st.chunk_rows
        want = range_rows if range_rows is not None else RANGE_ROUTING_ROWS // max(1, st.n_layers * st.top_k)
        if isinstance(want, bool) or int(want) < 1:
            raise MoetraceError(f"range_rows: expected a positive number of rows, got {range_rows!r}")
        size = max(1, int(want) // step) * step
        out.extend((i, a, min(a + size, len(st))) for a in range(0, len(st), size))
    return out


def _count_task(name: str, path, start: int, stop: int, stats, filters: Filters, vocab_size, coords,
                prefix=None) -> xr.Dataset:
    """One range's counts, reindexed by value to the archive's ``by`` coordinates (runs on a worker)."""
    ds = count_range(path, start, stop, stats, filters=filters, vocab_size=vocab_size, progress=False,
                     prefix=prefix)
    if coords:
        ds = ds.reindex({k: strings(v) for k, v in coords.items()}, fill_value=0)
    for name in _exact_vars(ds):
        ds[name] = _to_units(ds[name], STATS[name].exact_unit, path, start, stop)
    if "shared_prefix_tokens" in ds.attrs:
        ds.attrs[_SHARED] = {name: ds.attrs["shared_prefix_tokens"]}
    return ds


def _exact_vars(ds: xr.Dataset) -> list[str]:
    """The variables of ``ds`` whose statistic declares an ``exact_unit`` (float sums carried as int64 units)."""
    return [name for name in ds.data_vars if name in STATS and STATS[name].exact_unit]


def _to_units(var: xr.DataArray, unit: float, path, start: int, stop: int) -> xr.DataArray:
    """A range's float64 sums as exact int64 multiples of ``unit`` (refused when they are not exact)."""
    scaled = var.values / unit
    if not (np.all(np.abs(scaled) < 2.0 ** 53) and np.array_equal(scaled, np.round(scaled))):
        raise MoetraceError(
            f"{path}: rows [{start}, {stop}): {var.name} of a range reached {float(np.abs(var.values).max()):.6g} "
            f"(expected exact multiples of {unit:g}, below 2**53 of them per cell); pass a smaller range_rows")
    out = var.copy(data=scaled.astype(np.int64))
    out.attrs["moetrace_units"] = unit
    return out


def _from_units(ds: xr.Dataset) -> xr.Dataset:
    """The final sums back in float64: the exact int64 total rounded once (so in any order the same value)."""
    for name in _exact_vars(ds):
        if ds[name].dtype.kind == "i":
            ds[name] = ds[name].copy(data=ds[name].values.astype(np.float64) * STATS[name].exact_unit)
            ds[name].attrs.pop("moetrace_units", None)
    return ds


def _add(a: xr.Dataset, b: xr.Dataset) -> xr.Dataset:
    """Sum of two partial counts over the same coordinates (attributes: ``a``'s)."""
    xr.align(a, b, join="exact")  # raises if the coordinates differ (a bug, not a user error)
    out = a.copy()
    for name in a.data_vars:
        out[name] = a[name] + b[name]
        x, y, z = a[name].values, b[name].values, out[name].values
        if z.dtype.kind == "i" and (((x ^ z) & (y ^ z)) < 0).any():  # int64 wrapped: both signs differ from the sum's
            unit = STATS[name].exact_unit if name in STATS else None
            limit = f"2**{63 + round(np.log2(unit))} (int64 units of {unit:g}, its exact sum)" if unit else "2**63"
            reached = float(np.abs(x.astype(np.float64) + y).max()) * (unit or 1)
            raise MoetraceError(f"{name}: a cell's sum passed {limit} at {reached:.6g}; it cannot be summed exactly: "
                                "count a part of the archive at a time")
    out.attrs = dict(a.attrs)
    if _SHARED in a.attrs or _SHARED in b.attrs:
        out.attrs[_SHARED] = {**a.attrs.get(_SHARED, {}), **b.attrs.get(_SHARED, {})}
    return out


def _running(total: xr.Dataset | None, part: xr.Dataset) -> xr.Dataset:
    return part if total is None else _add(total, part)


def _client_tree(client, futures: list):
    while len(futures) > 1:
        nxt = [client.submit(_add, futures[i], futures[i + 1]) for i in range(0, len(futures) - 1, 2)]
        futures = nxt + ([futures[-1]] if len(futures) % 2 else [])
    return futures[0].result()


def _identity(st: TraceStore, name: str) -> dict[str, Any]:
    """What tells this store from another one, or from itself rewritten: its path or URL, its
    committed rows and its creation ``uuid`` (for a store written before stores had one: the
    modification time of its ``routing/experts/zarr.json``, rewritten whenever rows are added)."""
    out: dict[str, Any] = {"store": name, "rows": len(st), "uuid": st.uuid}
    if st.uuid is None:
        meta = f"{str(st.path).rstrip('/')}/routing/experts/zarr.json"
        try:
            if isinstance(st.path, Path):
                out["modified"] = os.stat(meta).st_mtime_ns
            else:
                import fsspec

                fs, root = fsspec.core.url_to_fs(meta)
                info = fs.info(root)
                out["modified"] = str(next((info[k] for k in ("mtime", "LastModified", "ETag", "created")
                                            if k in info), None))
        except (OSError, ValueError):
            out["modified"] = None
    return out


def _key(identity: dict, start: int, stop: int, stats, filters: Filters, vocab_size, coords) -> str:
    spec = json.dumps([identity, start, stop, list(stats), repr(filters), vocab_size, coords], default=str)
    return hashlib.sha256(spec.encode()).hexdigest()[:24]


#: The file of a checkpoint directory naming the archive its ranges belong to.
CHECKPOINT_MANIFEST = "archive.json"


def _checkpoint_files(checkpoint, identities: list[dict], ranges, names, filters, vocab_size, coords) -> list[Path]:
    """Each range's counts file in the checkpoint directory; refuses a directory made for another archive.

    ``DIR/archive.json`` lists the identity (:func:`_identity`) of every store of the
    archive the directory was made for; a rerun on any other archive (another store, a
    store with more rows, one rewritten since) is a MoetraceError naming the first
    difference, so no range of another archive is ever added in. Each range's file name
    also hashes its store's identity and the count's arguments, so the same directory can
    hold counts of the same archive with other arguments.
    """
    ckpt = Path(checkpoint)
    if ckpt.exists() and not ckpt.is_dir():
        raise MoetraceError(f"--checkpoint {ckpt}: a file, expected a directory (new or made by an earlier count)")
    ckpt.mkdir(parents=True, exist_ok=True)
    clean(ckpt)  # ranges and manifests a killed count was writing
    manifest = ckpt / CHECKPOINT_MANIFEST
    want = {"moetrace_checkpoint": 1, "stores": identities}
    if manifest.exists():
        try:
            have = json.loads(manifest.read_text())
        except (OSError, ValueError) as exc:
            raise MoetraceError(f"{manifest}: unreadable checkpoint manifest ({exc}); use an empty --checkpoint "
                                f"directory or delete this one") from None
        if have != want:
            old = have.get("stores", []) if isinstance(have, dict) else []
            diff = next(((o, n) for o, n in zip(old, identities) if o != n), None)
            what = (f"store {diff[1]} differs from the checkpointed {diff[0]}" if diff else
                    f"{len(identities)} stores, the checkpoint has {len(old)}")
            raise MoetraceError(
                f"{ckpt}: checkpoint made for another archive ({what}); use an empty --checkpoint directory "
                f"or delete this one")
    else:
        tmp = manifest.with_name(f"{manifest.name}.partial-{os.getpid()}")
        tmp.write_text(json.dumps(want, indent=1))
        os.replace(tmp, manifest)
    return [ckpt / f"range-{_key(identities[i], a, b, names, filters, vocab_size, coords)}.zarr"
            for i, a, b in ranges]


def count_archive(archive: Any, stats, filters: Filters, vocab_size, progress: bool, *, client=None,
                  range_rows: int | None = None, checkpoint: str | Path | None = None) -> xr.Dataset:
    """Counts of every committed row of every store of ``archive`` (see the module docstring)."""
    paths = stores_of(archive)
    stores = [open_store(p) for p in paths]
    _check_distinct(stores)
    _check_compatible(stores)
    extra = {"vocab_size": vocab_size}
    names = [parse_stats(stats, st, extra) for st in stores][0]
    coords = _coords(stores, filters)
    # a label value of groups/where that a store lacks is left out there; a store none of whose rows can pass
    # is not read at all (it adds zeros)
    per_store = [_store_filters(st, filters) for st in stores]
    # a worker opens the store itself (by absolute path or URL); an open TraceStore stays in this process
    ids = [os.path.abspath(st.path) if isinstance(st.path, Path) else st.path for st in stores]
    where = stores if client is None else ids
    ranges = [r for r in plan(stores, range_rows) if per_store[r[0]] is not None]
    # skip_shared_prefix: each store's prefix is found once (a task of its own on a cluster)
    # and handed to its ranges, rather than streamed again by every range
    prefixes: list = [None] * len(stores)
    if filters.skip_shared_prefix:
        prefixes = [shared_prefix(w) if client is None else client.submit(shared_prefix, w) for w in where]
    args = [(ids[i], where[i], a, b, names, per_store[i], vocab_size, coords, prefixes[i]) for i, a, b in ranges]
    files = None
    if checkpoint is not None:
        identities = [_identity(st, name) for st, name in zip(stores, ids)]
        files = _checkpoint_files(checkpoint, identities, ranges, names, filters, vocab_size, coords)
    todo = [j for j in range(len(args)) if files is None or not files[j].exists()]
    done = set(range(len(args))) - set(todo)
    if client is not None and files is None:
        total = _client_tree(client, [client.submit(_count_task, *a) for a in args]) if args else None
    else:  # a running sum (exact, so its order does not matter); partial counts saved as they come
        total = None
        for j in range(len(args)):
            if j in done:
                total = _running(total, load_counts(files[j]))
        if client is None:
            from moetrace.progress import tqdm

            results = (_count_task(*args[j]) for j in todo)
            results = tqdm(zip(todo, results), total=len(todo), disable=not progress, unit="range", desc="count")
        else:
            from distributed import as_completed

            futures = {client.submit(_count_task, *args[j]): j for j in todo}
            results = ((futures[f], f.result()) for f in as_completed(list(futures)))
        for j, part in results:
            if files is not None:
                save_counts(part, files[j])
            total = _running(total, part)
    if total is None or int(total["tokens"].sum()) == 0:
        raise MoetraceError(
            f"{archive}: empty selection, no row left after the filters "
            f"{json.dumps(filters.attrs(_all_coords(filters, coords)))} "
            f"(of {sum(len(st) for st in stores)} rows in {len(stores)} stores)")
    total = _from_units(total)
    shared = total.attrs.pop(_SHARED, {})
    total.attrs.update(_attrs(stores))
    # the archive's filters (a range's attribute holds its store's, without the values it lacks)
    total.attrs["filters"] = json.dumps(filters.attrs(_all_coords(filters, coords)))
    if filters.skip_shared_prefix:  # one int for one store, else one per store
        values = [int(shared[name]) if name in shared else int(_result(prefixes[i])[0]) for i, name in enumerate(ids)]
        total.attrs["shared_prefix_tokens"] = values[0] if len(values) == 1 else values
    return total


def _result(value):
    """A future's result, or the value itself."""
    return value.result() if hasattr(value, "result") else value


def _all_coords(filters: Filters, coords: dict[str, list[str]]) -> dict[str, list[str]]:
    """The values kept of each ``groups`` label (``coords`` for the ``by`` ones)."""
    return {**{k: list(dict.fromkeys(_values(v))) for k, v in filters.groups.items()}, **coords}


def _attrs(stores: list[TraceStore]) -> dict[str, Any]:
    models = list(dict.fromkeys(st.model or "" for st in stores))
    return {
        "store": str(stores[0].path) if len(stores) == 1 else ",".join(str(st.path) for st in stores),
        "stores": [str(st.path) for st in stores],
        "store_rows": [len(st) for st in stores],
        "rows": [0, sum(len(st) for st in stores)],
        "model": models[0] if len(models) == 1 else ",".join(models),
        "rank_order": "ranked" if all(st.rank_order == "ranked" for st in stores) else "unknown",
    }

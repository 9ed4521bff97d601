"""Counting an archive of stores (engine/counting/archive.py): paths, globs, URLs, merge by value, checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from moetrace.counting import count, load_counts
from moetrace.counting.archive import plan, stores_of
from moetrace.errors import MoetraceError
from moetrace.store import TraceStore
from moetrace.synthetic import TraceSpec, generate_chunk

STATS = ["experts", "paths", "temporal", "weight_sum"]
SPEC = TraceSpec(n_tokens=3000, n_layers=3, n_experts=8, top_k=2, seq_len=37)


def make_store(path, start: int, n: int, rename: dict | None = None, spec: TraceSpec = SPEC, chunk_rows=256,
               overwrite: bool = False):
    """A store of synthetic rows [start, start + n) with growing label vocabularies (order of first appearance)."""
    st = TraceStore.create(path, n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k,
                           labels=["domain", "lang"], weights=True, model="synthetic", chunk_rows=chunk_rows,
                           overwrite=overwrite)
    with st:
        batch = generate_chunk(spec, start, start + n)
        if rename:
            batch["domain"] = np.array([rename.get(v, v) for v in batch["domain"]])
        st.append(batch)
    return TraceStore.open(path)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    make_store(root / "a.zarr", 0, 1000)
    make_store(root / "b.zarr", 1300, 900, rename={"dates": "history"})  # another vocabulary and order
    make_store(root / "c.zarr", 2500, 500)
    (root / "notes").mkdir()  # not a store: skipped
    return root


def reference(paths, **kw) -> xr.Dataset:
    """Each store counted alone, then added cell by cell by label value (a slow loop)."""
    parts = [count(p, progress=False, **kw) for p in paths]
    by = kw.get("by", [])
    if not by:
        out = parts[0].copy(deep=True)
        for p in parts[1:]:
            for v in out.data_vars:
                out[v] = out[v] + p[v]
        return out
    values = {lab: list(dict.fromkeys(x for p in parts for x in p[lab].values.tolist())) for lab in by}
    out = {}
    for v in parts[0].data_vars:
        grouped = by[0] in parts[0][v].dims
        if not grouped:
            out[v] = sum(p[v] for p in parts)
            continue
        arr = np.zeros((len(values[by[0]]),) + parts[0][v].shape[1:], dtype=parts[0][v].dtype)
        for p in parts:
            for i, val in enumerate(values[by[0]]):
                if val in p[by[0]].values.tolist():
                    arr[i] += p[v].sel({by[0]: val}).values
        out[v] = arr
    return out


def test_stores_of_directory_glob_list(archive):
    names = [Path(p).name for p in stores_of(archive)]
    assert names == ["a.zarr", "b.zarr", "c.zarr"]
    assert [Path(p).name for p in stores_of(str(archive / "[ab].zarr"))] == ["a.zarr", "b.zarr"]
    assert [Path(p).name for p in stores_of([archive / "c.zarr", str(archive / "a.zarr")])] == ["c.zarr", "a.zarr"]
    assert [Path(p).name for p in stores_of(f"file://{archive}")] == ["a.zarr", "b.zarr", "c.zarr"]
    with pytest.raises(MoetraceError, match="no trace store there"):
        stores_of(archive / "notes")


@pytest.mark.parametrize("by", [[], ["domain"]])
def test_archive_equals_stores_added_by_value(archive, by):
    paths = stores_of(archive)
    got = count(archive, stats=STATS, by=by, progress=False)
    want = reference(paths, stats=STATS, by=by)
    for v in ["tokens", *STATS]:
        np.testing.assert_array_equal(got[v].values, np.asarray(want[v]))
    assert got.attrs["stores"] == [str(p) for p in paths]
    assert got.attrs["store_rows"] == [1000, 900, 500]
    assert got.attrs["rows"] == [0, 2400]
    if by:
        coords = got["domain"].values.tolist()
        assert "history" in coords and "dates" in coords and len(coords) == len(set(coords))
        # b's "history" rows are counted under history only
        b = count(paths[1], stats=["experts"], by=["domain"], progress=False)
        np.testing.assert_array_equal(got["tokens"].sel(domain="history").values, b["tokens"].sel(domain="history").values)


def test_ranges_add_up_and_single_store_unchanged(archive):
    one = archive / "a.zarr"
    whole = count(one, stats=STATS, by=["domain", "lang"], progress=False)
    split = count([one], stats=STATS, by=["domain", "lang"], progress=False, range_rows=256)
    assert len(plan([TraceStore.open(one)], 256)) == 4
    xr.testing.assert_identical(whole.drop_attrs(), split.drop_attrs())
    assert split.attrs["stores"] == whole.attrs["stores"] == [str(one)]


def test_shared_prefix_is_per_store(archive):
    ds = count(archive, stats=["experts"], skip_shared_prefix=True, progress=False)
    assert isinstance(ds.attrs["shared_prefix_tokens"], list) and len(ds.attrs["shared_prefix_tokens"]) == 3


def test_incompatible_stores_refused(archive, tmp_path):
    make_store(tmp_path / "wide.zarr", 0, 100, spec=TraceSpec(n_tokens=100, n_layers=3, n_experts=16, top_k=2))
    with pytest.raises(MoetraceError, match="n_experts 16 differ"):
        count([archive / "a.zarr", tmp_path / "wide.zarr"], progress=False)
    make_store(tmp_path / "deep.zarr", 0, 100, spec=TraceSpec(n_tokens=100, n_layers=4, n_experts=8, top_k=2))
    with pytest.raises(MoetraceError, match="layer ids"):
        count([archive / "a.zarr", tmp_path / "deep.zarr"], progress=False)


def test_fsspec_memory_url(archive):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    for name in ("a.zarr", "b.zarr"):
        fs.put(str(archive / name), f"/arch/{name}", recursive=True)
    try:
        got = count("memory://arch", stats=STATS, by=["domain"], progress=False)
        want = count([archive / "a.zarr", archive / "b.zarr"], stats=STATS, by=["domain"], progress=False)
        xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())
        assert got.attrs["stores"] == ["memory:///arch/a.zarr", "memory:///arch/b.zarr"]
        one = count("memory:///arch/a.zarr", stats=STATS, progress=False)
        xr.testing.assert_identical(one.drop_attrs(), count(archive / "a.zarr", stats=STATS, progress=False).drop_attrs())
        with pytest.raises(MoetraceError, match="read-only"):
            TraceStore.open("memory:///arch/a.zarr", mode="a")
    finally:
        fs.rm("/arch", recursive=True)


def test_checkpoint_resumes(archive, tmp_path):
    ckpt = tmp_path / "ckpt"
    kw = dict(stats=STATS, by=["domain"], progress=False, range_rows=256)
    full = count(archive, **kw)
    first = count(archive, checkpoint=ckpt, **kw)
    xr.testing.assert_identical(full, first)
    files = sorted(ckpt.glob("range-*.zarr"))
    assert len(files) == 4 + 4 + 2
    # an interrupted run: some ranges never finished, one was being written
    for f in files[::3]:
        import shutil

        shutil.rmtree(f)
    (ckpt / f"{files[1].name}.partial-1").mkdir()
    kept = {f: f.stat().st_mtime_ns for f in files if f.exists()}
    again = count(archive, checkpoint=ckpt, **kw)
    xr.testing.assert_identical(full, again)
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())  # loaded, not recounted
    assert len(sorted(ckpt.glob("range-*.zarr"))) == len(files)
    # other arguments do not reuse these ranges
    other = count(archive, checkpoint=ckpt, **{**kw, "stats": ["experts"]})
    np.testing.assert_array_equal(other["experts"].values, full["experts"].values)


def test_cli_archive_glob(archive, tmp_path):
    out = tmp_path / "out.zarr"
    res = subprocess.run([sys.executable, "-m", "moetrace.cli", "count", str(archive / "*.zarr"), str(out),
                          "--stats", ",".join(STATS), "--by", "domain", "--quiet"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    got = load_counts(out)
    want = count(archive, stats=STATS, by=["domain"], progress=False)
    xr.testing.assert_identical(got.drop_attrs(), want.drop_attrs())
    assert got.attrs["stores"] == want.attrs["stores"]


def test_no_dask_without_client(archive):
    """Counting without a client never imports distributed, and runs with Dask unimportable.

    xarray itself imports the top-level ``dask`` package (for its duck-array checks) the
    first time any Dataset is built when Dask is installed, so the test compares with a
    plain ``xr.Dataset`` built beforehand: counting adds no Dask module of its own.
    """
    run = ("import sys, moetrace.counting as a, numpy as np, xarray as xr; "
           "xr.Dataset({'v': ('x', np.arange(2))}); before = {m for m in sys.modules if m.startswith('dask')}; "
           "a.count(sys.argv[1], stats=['experts'], progress=False); a.count(sys.argv[1] + '/a.zarr', progress=False); "
           "extra = {m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed')} - before; "
           "assert not extra, sorted(extra)")
    res = subprocess.run([sys.executable, "-c", run, str(archive)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    blocked = ("import sys\n"
               "sys.modules['dask'] = sys.modules['distributed'] = None  # import dask raises ImportError\n"
               "import moetrace.counting as a\n"
               "ds = a.count(sys.argv[1], stats=['experts', 'paths'], by=['domain'], progress=False)\n"
               "print(int(ds['tokens'].sum()))\n")
    res = subprocess.run([sys.executable, "-c", blocked, str(archive)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "2400"


@pytest.mark.slow
def test_checkpoint_after_a_killed_run(tmp_path):
    """`moetrace count --checkpoint` killed (SIGKILL) after a few ranges; the rerun continues and gives the same counts."""
    import signal
    import time

    for i in range(2):
        make_store(tmp_path / "arch" / f"s{i}.zarr", i * 20_000, 20_000,
                   spec=TraceSpec(n_tokens=40_000, n_layers=3, n_experts=8, top_k=2, seq_len=37))
    ckpt, out = tmp_path / "ckpt", tmp_path / "out.zarr"
    cmd = [sys.executable, "-m", "moetrace.cli", "count", str(tmp_path / "arch"), str(out), "--stats",
           "experts,temporal", "--by", "domain", "--range-rows", "256", "--checkpoint", str(ckpt), "--quiet"]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while len(list(ckpt.glob("range-*.zarr"))) < 5 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the count ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {f: f.stat().st_mtime_ns for f in ckpt.glob("range-*.zarr")}
    assert 5 <= len(done) < 158 and not out.exists()
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert all(f.stat().st_mtime_ns == t for f, t in done.items())  # kept, not recounted
    assert len(list(ckpt.glob("range-*.zarr"))) == 158
    want = count(tmp_path / "arch", stats=["experts", "temporal"], by=["domain"], progress=False)
    xr.testing.assert_identical(load_counts(out), want)


def _numpy_counts(paths, by: str, keep: dict[str, list[str]], values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """tokens [G] and experts [G, L, K, E] by ``by`` over every row whose labels are in ``keep`` (plain NumPy)."""
    tokens = np.zeros(len(values), dtype=np.int64)
    experts = np.zeros((len(values), SPEC.n_layers, SPEC.top_k, SPEC.n_experts), dtype=np.int64)
    for p in paths:
        st = TraceStore.open(p)
        cols = st.read(["experts", "domain", "lang"])
        names = {lab: np.asarray(st.labels[lab], dtype=object)[cols[lab]] for lab in ("domain", "lang")}
        ok = np.ones(len(st), dtype=bool)
        for lab, allowed in keep.items():
            ok &= np.isin(names[lab], allowed)
        for g, v in enumerate(values):
            rows = ok & (names[by] == v)
            tokens[g] += rows.sum()
            for l in range(SPEC.n_layers):
                for k in range(SPEC.top_k):
                    experts[g, l, k] += np.bincount(cols["experts"][rows, l, k], minlength=SPEC.n_experts)
    return tokens, experts


@pytest.mark.parametrize("engine_kw", ["groups", "where"])
def test_label_value_missing_from_a_store(archive, engine_kw):
    """A groups/where value that only some stores have: the others add zero rows (b has "history", not "dates")."""
    paths = stores_of(archive)
    if engine_kw == "groups":
        kw, keep, values = dict(by=["domain"], groups={"domain": ["history", "dates"]}), \
            {"domain": ["history", "dates"]}, ["history", "dates"]
        got = count(archive, stats=["experts"], progress=False, **kw)
        assert got["domain"].values.tolist() == values
    else:
        kw, keep = dict(by=["domain"], where={"domain": ["history", "math"]}), {"domain": ["history", "math"]}
        got = count(archive, stats=["experts"], progress=False, **kw)
        values = got["domain"].values.tolist()
        assert "history" in values and "dates" in values  # coordinates stay complete
    tokens, experts = _numpy_counts(paths, "domain", keep, values)
    np.testing.assert_array_equal(got["tokens"].values, tokens)
    np.testing.assert_array_equal(got["experts"].values, experts)
    assert json.loads(got.attrs["filters"])[engine_kw]["domain"] == list(kw[engine_kw]["domain"])
    # only in b: a and c are not read, and each contributes zero
    only_b = count(archive, stats=["experts"], by=["lang"], where={"domain": "history"}, progress=False)
    b = count(paths[1], stats=["experts"], by=["lang"], where={"domain": "history"}, progress=False)
    # the archive's lang coordinate is the stores' values in the order first seen, b's its own: align them
    xr.testing.assert_identical(only_b.drop_attrs().sel(lang=b["lang"].values), b.drop_attrs())
    with pytest.raises(MoetraceError, match=r"value 'physics' is not a domain in any store"):
        count(archive, stats=["experts"], where={"domain": ["physics"]}, progress=False)


def test_by_derived_label_over_archive(archive):
    got = count(archive, stats=["experts"], by=["generated"], progress=False)
    want = reference(stores_of(archive), stats=["experts"], by=["generated"])
    np.testing.assert_array_equal(got["experts"].values, np.asarray(want["experts"]))


def test_checkpoint_refuses_another_archive(tmp_path):
    """A checkpoint is tied to its stores: a store rewritten with the same shape and rows is another archive."""
    make_store(tmp_path / "arch" / "a.zarr", 0, 600)
    make_store(tmp_path / "arch" / "b.zarr", 600, 600)
    ckpt = tmp_path / "ckpt"
    kw = dict(stats=["experts", "temporal"], by=["domain"], progress=False, range_rows=256)
    count(tmp_path / "arch", checkpoint=ckpt, **kw)
    make_store(tmp_path / "arch" / "b.zarr", 1300, 600, overwrite=True)  # rewritten: other rows, same shapes and row count
    with pytest.raises(MoetraceError, match=r"checkpoint made for another archive \(store .*b\.zarr"):
        count(tmp_path / "arch", checkpoint=ckpt, **kw)
    # the same directory is refused for another set of stores too; a fresh one gives the true counts
    with pytest.raises(MoetraceError, match="1 stores, the checkpoint has 2"):
        count([tmp_path / "arch" / "a.zarr"], checkpoint=ckpt, **kw)
    assert json.loads((ckpt / "archive.json").read_text())["stores"][1]["rows"] == 600
    fresh = count(tmp_path / "arch", checkpoint=tmp_path / "ckpt2", **kw)
    xr.testing.assert_identical(fresh, count(tmp_path / "arch", **kw))
    # the range files name their store's identity: stale ones left in a directory are never read
    (tmp_path / "ckpt2" / "archive.json").unlink()
    make_store(tmp_path / "arch" / "a.zarr", 1900, 600, overwrite=True)
    again = count(tmp_path / "arch", checkpoint=tmp_path / "ckpt2", **kw)
    xr.testing.assert_identical(again, count(tmp_path / "arch", **kw))


def test_checkpoint_identity_of_a_store_without_uuid(tmp_path):
    """Stores written before stores had a uuid are told apart by their experts array's modification time."""
    from moetrace.counting.archive import _identity

    st = make_store(tmp_path / "old.zarr", 0, 300)
    import zarr

    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+")
    meta = dict(group.attrs["moetrace"])
    assert len(meta.pop("uuid")) == 32
    group.attrs["moetrace"] = meta
    first = _identity(TraceStore.open(tmp_path / "old.zarr"), "old")
    assert first["uuid"] is None and isinstance(first["modified"], int)
    st = make_store(tmp_path / "old.zarr", 0, 300, overwrite=True)
    assert _identity(st, "old")["uuid"] is not None and _identity(st, "old") != first


def test_weight_sum_exact_past_2_29(tmp_path):
    """A cell's weight_sum past 2**29 (float16 65504 x 17,408 rows): ranges add as integers of 2**-24, rounded once.

    The reference is the exact sum in Python integers (units of 2**-24), rounded to float64 once;
    float64 running sums of the ranges lose the odd 2**-24 terms once the total passes 2**29.
    """
    n = 12288  # its rows with expert 0 at rank 0 (8777) are > 2**29 / 65504 per store
    units = 0
    for i in range(2):
        st = TraceStore.create(tmp_path / "arch" / f"s{i}.zarr", n_layers=1, n_experts=4, top_k=2, weights=True,
                               chunk_rows=128)
        rows = np.arange(n)
        small = (rows % 3 == 0) & (rows % 7 != 0)  # an odd number of 2**-24 weights in most ranges
        experts = np.zeros((n, 1, 2), dtype=np.uint8)
        experts[:, 0, 1] = 1
        weights = np.zeros((n, 1, 2), dtype=np.float16)
        weights[:, 0, 0] = 65504.0
        weights[:, 0, 1] = np.where(small, np.float16(2.0 ** -24), np.float16(1.0))
        experts[small, 0, 0] = 3  # a token's two experts differ: there the huge weight goes to expert 3
        experts[small, 0, 1] = 0  # and the tiny one to expert 0, beside the other rows' huge ones
        with st:
            st.append({"seq": i * n + rows // 64, "pos": (rows % 64).astype(np.int32),
                       "token_id": np.zeros(n, dtype=np.int32), "generated": np.zeros(n, dtype=bool),
                       "experts": experts, "weights": weights})
        units += int((~small).sum()) * int(65504 * 2 ** 24) + int(small.sum())
    want = float(units) * 2.0 ** -24  # Python rounds an int to float64 correctly
    assert want > 2 ** 29
    for range_rows in (128, 384, 2048):
        got = count(tmp_path / "arch", stats=["weight_sum"], progress=False, range_rows=range_rows)
        assert got["weight_sum"].dtype == np.float64
        assert float(got["weight_sum"].sel(layer=0, expert=0)) == want, range_rows
    with pytest.raises(MoetraceError, match=r"weight_sum of a range reached .* pass a smaller range_rows"):
        count(tmp_path / "arch", stats=["weight_sum"], progress=False, range_rows=n)


@pytest.mark.slow
def test_bench_archive_build_and_time(tmp_path):
    """bench/bench_archive.py at a tiny scale: --build then --time; every provider gives the in-process counts."""
    script = Path(__file__).resolve().parent.parent / "bench" / "bench_archive.py"
    data = tmp_path / "arch"
    res = subprocess.run([sys.executable, str(script), "--build", str(data), "--stores", "2", "--rows", "4e6",
                          "--batch-tokens", "4096", "--jobs", "1"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    meta = json.loads((data / "archive.json").read_text())
    assert meta["routing_rows"] >= 4e6 and meta["stores"] == 2
    # the Parquet copy holds the same routing rows as the stores
    import duckdb

    n = duckdb.connect().execute(f"SELECT count(*) FROM read_parquet('{data}/part*/trace.parquet')").fetchall()[0][0]
    stores = stores_of(str(data / "part*" / "trace.zarr"))
    assert n == meta["routing_rows"] == sum(len(TraceStore.open(p)) for p in stores) * 128
    res = subprocess.run([sys.executable, str(script), "--time", str(data), "--range-rows", "8192",
                          "--providers", "in-process,cluster-1,duckdb"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if line.startswith("| experts")]
    assert len(rows) == 6 and all(line.endswith("| yes |") for line in rows), res.stdout

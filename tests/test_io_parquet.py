"""import-parquet / export-parquet (the long format): contract, properties, errors, DuckDB."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_contract import CHUNK, WEIRD_TOKENS, ImporterContract, RefTrace, assert_store_equals_trace, assert_stores_equal

from moetrace.cli import main
from moetrace.io import export_parquet, import_parquet
from moetrace.store import TraceStore


def make_long_trace(rng, n_tokens=None, L=None, K=None, weights=None, n_labels=None, text=None) -> RefTrace:
    """Random trace in store order: tokens sorted by (seq, pos), each (seq, pos) once."""
    N = int(rng.integers(1, 30)) if n_tokens is None else n_tokens
    L = int(rng.integers(1, 4)) if L is None else L
    K = int(rng.integers(1, 4)) if K is None else K
    weights = bool(rng.random() < 0.5) if weights is None else weights
    n_labels = int(rng.integers(0, 3)) if n_labels is None else n_labels
    text = bool(rng.random() < 0.5) if text is None else text
    E = int(rng.integers(K, K + 10))
    key = np.sort(rng.choice(10 * 4 * N, N, replace=False))  # distinct (seq, pos), sorted
    seq = (key // (4 * N) - 5).astype(np.int64)
    pos = (key % (4 * N) - N).astype(np.int32)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K).astype(np.int64)
    labels = {name: np.array([f"{name}-{v}" for v in range(4)] + [" x "])[rng.integers(0, 5, N)]
              for name in ("domain", "lang")[:n_labels]}
    return RefTrace(
        seq=seq, pos=pos, labels=labels, experts=experts,
        layer_ids=sorted(rng.choice(L + 30, L, replace=False).tolist()), n_experts=int(experts.max()) + 1,
        text=np.array([WEIRD_TOKENS[i] for i in rng.integers(0, len(WEIRD_TOKENS), N)], dtype=object) if text else None,
        weights=rng.random((N, L, K)).astype(np.float16).astype(np.float32) if weights else None)


def long_table(trace: RefTrace) -> pa.Table:
    """The long format of ``trace`` built with plain NumPy (the independent writer)."""
    N, L, K = trace.experts.shape
    per = L * K
    cols = {"seq": pa.array(np.repeat(trace.seq, per), pa.int64()),
            "pos": pa.array(np.repeat(trace.pos, per), pa.int32()),
            "token_id": pa.array(np.full(N * per, -1), pa.int32()),
            "layer": pa.array(np.tile(np.repeat(trace.layer_ids, K), N), pa.int16()),
            "rank": pa.array(np.tile(np.arange(K), N * L), pa.int16()),
            "expert": pa.array(trace.experts.reshape(-1), pa.int16())}
    if trace.weights is not None:
        cols["weight"] = pa.array(trace.weights.reshape(-1), pa.float32())
    for name, values in trace.labels.items():
        cols[name] = pa.array(np.repeat(np.asarray(values, dtype=object), per), pa.string())
    if trace.text is not None:
        cols["token"] = pa.array(np.repeat(trace.text, per), pa.string())
    return pa.table(cols)


def write_long(trace: RefTrace, path: Path, rng, row_group_size=None, shuffle=False) -> Path:
    """``trace`` as a long-format file, in store order (or rows shuffled when ``shuffle``)."""
    table = long_table(trace)
    if shuffle:
        table = table.take(pa.array(rng.permutation(table.num_rows)))
    if table.num_columns > 6 and "domain" in table.column_names and rng.random() < 0.5:
        i = table.column_names.index("domain")  # polars-style dictionary-encoded strings
        table = table.set_column(i, "domain", table.column("domain").dictionary_encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    size = int(rng.integers(1, 40)) if row_group_size is None else row_group_size
    pq.write_table(table, path, row_group_size=size, compression="zstd")
    return path


class TestParquetImporter(ImporterContract):
    command = "import-parquet"
    broken_shape = {"n_tokens": 6, "L": 2, "K": 2, "weights": True, "n_labels": 1, "text": False}
    shuffle_shape = {"n_tokens": 8, "L": 2, "K": 2}

    def make_trace(self, rng, **shape):
        return make_long_trace(rng, **shape)

    def write_source(self, trace, directory, rng, shuffle=True):
        return {"path": write_long(trace, directory / "in.parquet", rng, shuffle=shuffle), "extra": []}

    def run_import(self, source, out, **kwargs):
        return import_parquet(source["path"], out, **kwargs)

    def cli_args(self, source, out):
        return [str(source["path"]), str(out), "--chunk-rows", str(CHUNK), *source["extra"]]

    def broken_sources(self, trace, directory, rng):
        directory.mkdir(parents=True)
        table = long_table(trace)
        per = len(trace.layer_ids) * trace.experts.shape[2]

        def write(name, tbl, extra=()):
            path = directory / f"{name}.parquet"
            pq.write_table(tbl, path, row_group_size=5)
            return {"path": path, "extra": list(extra)}

        good = write("good", table)
        data = good["path"].read_bytes()
        cut = directory / "cut.parquet"
        cut.write_bytes(data[: len(data) // 2])
        yield "truncated", {"path": cut, "extra": []}, ["cut.parquet", "not a readable Parquet file"]
        empty = directory / "empty.parquet"
        empty.write_bytes(b"")
        yield "empty", {"path": empty, "extra": []}, ["empty.parquet", "empty file"]
        yield "missing column", write("nocol", table.drop_columns(["rank"])), \
            ["nocol.parquet", "missing column", "rank"]
        floaty = table.set_column(5, "expert", pa.array(table.column("expert").to_numpy().astype(np.float64)))
        yield "float experts", write("float", floaty), ["float.parquet", "column expert", "integer type"]
        drop = per + 1  # second token loses its layer-0 rank-1 row: the block shifts
        yield "incomplete", write("gap", pa.concat_tables([table.slice(0, drop), table.slice(drop + 1)])), \
            ["gap.parquet", f"row {per}: token", f"has {per - 1} rows, expected {per}"]
        yield "truncated rows", write("short", table.slice(0, table.num_rows - 1)), ["short.parquet", "incomplete"]
        yield "duplicate", write("dup", pa.concat_tables([table.slice(0, per), table])), \
            ["dup.parquet", f"row {per}", "duplicate token"]
        yield "n_experts", write("nexp", table, ["--n-experts", "1"]), ["nexp.parquet", "n_experts=1"]
        nulls = table.set_column(5, "expert", pa.array([None] + table.column("expert").to_pylist()[1:], pa.int16()))
        yield "null", write("null", nulls), ["null.parquet", "row 0, column expert"]
        yield "extra column", write("extra", table.append_column("score", pa.array(np.zeros(table.num_rows)))), \
            ["extra.parquet", "score"]
        yield "no rows", write("norows", table.slice(0, 0)), ["norows.parquet", "no rows"]
        yield "duplicate column", write("dupcol", table.append_column("seq", table.column("seq"))), \
            ["dupcol.parquet", "duplicate column", "seq"]
        swapped = table.take(pa.array(np.r_[per:2 * per, 0:per, per + 1:table.num_rows]))  # + a duplicate row
        yield "shuffled with a duplicate", write("order", swapped), \
            ["order.parquet", f"row {2 * per}: duplicate token", "also row 1;"]
        short = table.take(pa.array(np.r_[per:2 * per, 0:per - 1, 2 * per:table.num_rows]))  # token 0 loses a row
        yield "shuffled, a token short", write("short2", short), \
            ["short2.parquet", f"row {per}: token", f"has {per - 1} rows, expected {per}"]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), row_group=st.integers(1, 50), batch_rows=st.integers(1, 64))
def test_random_long_files_import_exactly(seed, row_group, batch_rows):
    rng = np.random.default_rng(seed)
    trace = make_long_trace(rng)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_long(trace, Path(tmp) / "in.parquet", rng, row_group_size=row_group)
        store = import_parquet(path, Path(tmp) / "o.zarr", batch_rows=batch_rows, progress=False, chunk_rows=CHUNK)
        assert_store_equals_trace(store, trace)
        out = Path(tmp) / "again.parquet"
        export_parquet(store, out, row_group_rows=row_group, progress=False)
        assert pq.read_table(out).select(long_table(trace).column_names).equals(long_table(trace))


def test_duckdb_written_long_format_needs_no_flags(tmp_path):
    """A file DuckDB writes (no moetrace metadata, labels as VARCHAR) imports as is."""
    rng = np.random.default_rng(9)
    trace = make_long_trace(rng, n_tokens=25, L=3, K=2, weights=True, n_labels=2, text=False)
    src = long_table(trace)
    path = tmp_path / "duck.parquet"
    con = duckdb.connect()
    con.register("src", src)
    con.execute(f"COPY (SELECT * FROM src) TO '{path}' (FORMAT parquet, ROW_GROUP_SIZE 16)")
    assert main(["import-parquet", str(path), str(tmp_path / "o.zarr"), "-q", "--chunk-rows", "64"]) == 0
    store = TraceStore.open(tmp_path / "o.zarr")
    assert_store_equals_trace(store, trace)


def test_export_streams_in_row_groups_with_zstd(tmp_path):
    rng = np.random.default_rng(2)
    trace = make_long_trace(rng, n_tokens=100, L=2, K=2, weights=False, n_labels=1, text=False)
    src = write_long(trace, tmp_path / "in.parquet", rng)
    store = import_parquet(src, tmp_path / "o.zarr", progress=False, chunk_rows=16)
    out = tmp_path / "out.parquet"
    assert main(["export-parquet", str(tmp_path / "o.zarr"), str(out), "--row-group-rows", "30", "-q"]) == 0
    meta = pq.ParquetFile(out).metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sizes == [30] * 13 + [10]
    assert meta.row_group(0).column(0).compression == "ZSTD"
    assert pq.read_schema(out).names == ["seq", "pos", "token_id", "layer", "rank", "expert", "domain"]
    back = import_parquet(out, tmp_path / "back.zarr", progress=False, chunk_rows=CHUNK)
    assert_stores_equal(store, back)
    # counts by label from DuckDB over the export equal NumPy over the reference
    got = dict(duckdb.sql(f"SELECT domain, count(*) FROM '{out}' GROUP BY ALL").fetchall())
    values, counts = np.unique(trace.labels["domain"], return_counts=True)
    assert got == {v: 4 * c for v, c in zip(values.tolist(), counts.tolist())}


def test_generated_flag_and_large_expert_ids_survive(tmp_path):
    st_path = tmp_path / "s.zarr"
    store = TraceStore.create(st_path, n_layers=1, n_experts=40000, top_k=2, labels=["domain"], chunk_rows=8)
    store.append({"seq": np.array([0, 0, 1]), "pos": np.array([0, 1, 0]), "generated": np.array([False, True, True]),
                  "token_id": np.array([5, 6, 7]), "domain": np.array(["a", "b", "a"]),
                  "experts": np.array([[[39999, 1]], [[2, 3]], [[4, 5]]])})
    store.close()
    out = tmp_path / "o.parquet"
    export_parquet(st_path, out, progress=False)
    schema = pq.read_schema(out)
    assert schema.field("expert").type == pa.int32() and schema.field("generated").type == pa.bool_()
    back = import_parquet(out, tmp_path / "b.zarr", progress=False)
    assert_stores_equal(TraceStore.open(st_path), back)


def test_failed_export_leaves_no_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    trace = make_long_trace(rng, n_tokens=40, L=1, K=1)
    store = import_parquet(write_long(trace, tmp_path / "in.parquet", rng), tmp_path / "o.zarr", progress=False,
                           chunk_rows=8)
    real = TraceStore.iter_chunks

    def failing(self, *args, **kwargs):
        for i, chunk in enumerate(real(self, *args, **kwargs)):
            if i == 2 and "experts" in chunk:
                raise OSError("disk full")
            yield chunk

    monkeypatch.setattr(TraceStore, "iter_chunks", failing)
    out = tmp_path / "out.parquet"
    try:
        export_parquet(store, out, row_group_rows=4, progress=False)
    except OSError:
        pass
    else:
        raise AssertionError("export did not fail")
    assert not out.exists() and not list(tmp_path.glob("out.parquet*"))


# ---------------------------------------------------------------------- values that do not fit
def _one_token(**override) -> pa.Table:
    cols = {"seq": pa.array([0], pa.int64()), "pos": pa.array([0], pa.int32()),
            "token_id": pa.array([5], pa.int32()), "layer": pa.array([0], pa.int16()),
            "rank": pa.array([0], pa.int16()), "expert": pa.array([1], pa.int16())}
    cols.update(override)
    return pa.table(cols)


def _cli_error(tmp_path, capsys, table: pa.Table, metadata: dict | None = None) -> str:
    path = tmp_path / "in.parquet"
    if metadata is not None:
        table = table.replace_schema_metadata({b"moetrace": json.dumps(metadata).encode()})
    pq.write_table(table, path)
    out = tmp_path / "o.zarr"
    code = main(["import-parquet", str(path), str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetrace import-parquet: error: "), err
    assert not list(tmp_path.glob("o.zarr*"))
    return lines[0]


GOOD_META = {"format": "moetrace-long", "version": 1, "n_experts": 4, "top_k": 1, "layer_ids": [0], "labels": {},
             "model": None, "scoring": None, "sequences": {}}


@pytest.mark.parametrize("override, fragments", [
    ({"seq": pa.array([2**63 + 5], pa.uint64())}, ["row 0, column seq", str(2**63 + 5)]),
    ({"token_id": pa.array([3_000_000_000], pa.int64())}, ["row 0, column token_id", "3000000000"]),
    ({"pos": pa.array([2**31], pa.int64())}, ["row 0, column pos", str(2**31)]),
    ({"layer": pa.array([2**31], pa.int64())}, ["row 0, column layer", str(2**31)]),
    ({"layer": pa.array([2**64 - 1], pa.uint64())}, ["row 0, column layer", str(2**64 - 1)]),
    ({"expert": pa.array([2**64 - 1], pa.uint64())}, ["row 0, column expert", str(2**64 - 1)]),
    ({"weight": pa.array([1e6], pa.float64())}, ["row 0, column weight", "float16"]),
])
def test_values_that_do_not_fit_are_one_line_errors(tmp_path, capsys, override, fragments):
    line = _cli_error(tmp_path, capsys, _one_token(**override))
    for fragment in fragments:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize("change, fragment", [
    ({"top_k": "2"}, "top_k"), ({"n_experts": 10**30}, "n_experts"), ({"layer_ids": [3, 1]}, "layer_ids"),
    ({"layer_ids": [10**20]}, "layer_ids"), ({"labels": []}, "labels"), ({"model": 5}, "model"),
    ({"sequences": {"seq": {"dtype": "int64", "values": [2**70]}}}, "sequences.seq"),
    ({"sequences": {"x": {"dtype": "object", "values": [1]}}}, "sequences.x"),
    ({"sequences": {"x": {"dtype": "str", "values": [[1]]}}}, "sequences.x"), ({"version": "1"}, "version"),
])
def test_malformed_metadata_is_a_one_line_error(tmp_path, capsys, change, fragment):
    line = _cli_error(tmp_path, capsys, _one_token(), {**GOOD_META, **change})
    assert f"metadata 'moetrace': {fragment}" in line, line


def test_export_widens_layer_ids_beyond_int16(tmp_path):
    """Layer 40000 was written as -25536; now the column is int32 and the value exact."""
    path = tmp_path / "s.zarr"
    store = TraceStore.create(path, n_layers=2, n_experts=4, top_k=1, layer_ids=[3, 40000], chunk_rows=8)
    store.append({"seq": np.array([0, 0]), "pos": np.array([0, 1]), "experts": np.array([[[1], [2]], [[3], [0]]])})
    store.close()
    out = tmp_path / "o.parquet"
    assert main(["export-parquet", str(path), str(out), "-q"]) == 0
    assert pq.read_schema(out).field("layer").type == pa.int32()
    got = duckdb.sql(f"SELECT layer, expert FROM '{out}' ORDER BY seq, pos, layer").fetchall()
    assert got == [(3, 1), (40000, 2), (3, 3), (40000, 0)]
    assert_stores_equal(TraceStore.open(path), import_parquet(out, tmp_path / "b.zarr", progress=False))


def test_export_into_a_new_directory(tmp_path):
    rng = np.random.default_rng(1)
    src = write_long(make_long_trace(rng, n_tokens=5), tmp_path / "in.parquet", rng)
    import_parquet(src, tmp_path / "s.zarr", progress=False)
    out = tmp_path / "new" / "dir" / "o.parquet"
    assert main(["export-parquet", str(tmp_path / "s.zarr"), str(out), "-q"]) == 0
    assert pq.read_table(out).equals(pq.read_table(src).select(pq.read_schema(out).names))


def test_shuffled_rows_sort_the_same_in_one_partition_or_many(tmp_path, monkeypatch):
    """Out-of-order rows go through the on-disk sort; many partitions (tiny budget) give the same store."""
    rng = np.random.default_rng(8)
    trace = make_long_trace(rng, n_tokens=300, L=2, K=3, n_labels=1, text=True)
    path = write_long(trace, tmp_path / "in.parquet", rng, shuffle=True)
    one = import_parquet(path, tmp_path / "one.zarr", progress=False, chunk_rows=CHUNK, batch_rows=97)
    monkeypatch.setattr("moetrace.io.parquet.MEMORY_PER_BYTE", 1 << 20)  # MAX_PARTITIONS partitions
    many = import_parquet(path, tmp_path / "many.zarr", progress=False, chunk_rows=CHUNK, batch_rows=97,
                          memory_budget=1)
    assert_store_equals_trace(one, trace)
    assert_store_equals_trace(many, trace)
    assert not list(tmp_path.glob(".*parts-*"))


@settings(max_examples=300, deadline=None)
@given(per=st.integers(1, 6), heads=st.lists(st.text(alphabet="ab\u00e9", max_size=300), max_size=6),
       change=st.none() | st.tuples(st.integers(0, 10**6), st.text(alphabet="ab\u00e9", max_size=4)),
       skip=st.integers(0, 3), large=st.booleans())
def test_first_break_in_token_blocks_equals_a_python_loop(per, heads, change, skip, large):
    """The Numba check that a string column repeats each token's first value over its L x K rows
    (kernels/blocks.py, compared 256 bytes at a time) finds the same first differing row as a
    plain loop, for Arrow string and large_string arrays that start at an offset."""
    from moetrace.io.parquet import _first_break

    values = [h for h in heads for _ in range(per)]
    if change is not None and values:
        values[change[0] % len(values)] = change[1]
    arr = pa.array(["x"] * skip + values, pa.large_string() if large else pa.string()).slice(skip)
    want = next((r for r in range(len(values)) if values[r] != values[r // per * per]), -1)
    assert _first_break(arr, per) == want

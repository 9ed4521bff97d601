"""Counting split by prompt vs generated tokens (``by=["generated"]``, ``--by generated``), against DuckDB."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from moetrace.cli import main
from moetrace.counting import count, load_counts
from moetrace.errors import MoetraceError
from moetrace.io import export_parquet
from moetrace.store import TraceStore

L, K, E = 3, 2, 6


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.zarr"
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=K, labels=["domain"], chunk_rows=16) as st:
        for s in range(9):
            n = int(rng.integers(3, 12))
            prompt = int(rng.integers(1, n))
            st.append({"seq": np.full(n, s), "pos": np.arange(n), "generated": np.arange(n) >= prompt,
                       "domain": np.full(n, ["bio", "math"][s % 2]),
                       "experts": np.stack([rng.permutation(E)[:K] for _ in range(n * L)]).reshape(n, L, K)})
    return TraceStore.open(path)


def _duckdb_counts(store, tmp_path, where=""):
    path = tmp_path / "t.parquet"
    if not path.exists():
        export_parquet(store, path, progress=False)
    g = "CASE WHEN generated THEN 'generated' ELSE 'prompt' END AS g"
    rows = duckdb.sql(f"SELECT {g}, domain, layer, rank, expert, count(*) FROM '{path}' {where} "
                      f"GROUP BY ALL").fetchall()
    tokens = duckdb.sql(f"SELECT {g}, domain, count(DISTINCT (seq, pos)) FROM '{path}' {where} "
                        f"GROUP BY ALL").fetchall()
    return rows, tokens


def test_count_by_generated_matches_duckdb(store, tmp_path):
    ds = count(store, by=["generated", "domain"], progress=False)
    assert ds["experts"].dims[:2] == ("generated", "domain")
    assert ds.coords["generated"].values.tolist() == ["prompt", "generated"]
    rows, tokens = _duckdb_counts(store, tmp_path)
    want = np.zeros((2, 2, L, K, E), np.int64)
    for g, domain, layer, rank, expert, n in rows:
        want[["prompt", "generated"].index(g), ["bio", "math"].index(domain), layer, rank, expert] = n
    got = ds["experts"].sel(domain=["bio", "math"]).values
    np.testing.assert_array_equal(got, want)
    for g, domain, n in tokens:
        assert int(ds["tokens"].sel(generated=g, domain=domain)) == n
    assert int(ds["tokens"].sum()) == len(store)


def test_groups_keep_only_generated_and_cli(store, tmp_path):
    ds = count(store, by="generated", groups={"generated": ["generated"]}, progress=False)
    assert ds.coords["generated"].values.tolist() == ["generated"]
    gen = count(store, generated_only=True, progress=False)
    np.testing.assert_array_equal(ds["experts"].values[0], gen["experts"].values)
    out = tmp_path / "c.zarr"
    assert main(["count", str(store.path), str(out), "--by", "generated", "--quiet"]) == 0
    np.testing.assert_array_equal(load_counts(out)["experts"].values,
                                  count(store, by=["generated"], progress=False)["experts"].values)
    with pytest.raises(MoetraceError, match="groups\\['generated'\\]: value 'decode' is not a generated"):
        count(store, by="generated", groups={"generated": ["decode"]}, progress=False)


def test_where_generated_still_takes_booleans(store):
    a = count(store, where={"generated": True}, progress=False)
    b = count(store, generated_only=True, progress=False)
    np.testing.assert_array_equal(a["experts"].values, b["experts"].values)

"""Shared round-trip contract that every importer's tests run (like zarr's store test base).

A test module subclasses :class:`ImporterContract` (the name does not start with
``Test``, so pytest collects only the subclasses) and provides:

- ``make_trace(rng, **shape)``: a random :class:`RefTrace`, already in the row order
  the importer must produce, respecting what the format can express;
- ``write_source(trace, directory, rng, shuffle=True)``: write it in the source format
  and return the source handle; with ``shuffle`` in a random row order (any order the
  format allows: ``shuffled_error`` says whether the importer refuses it), else in store order;
- ``run_import(source, out, **kwargs)``: call the Python importer;
- ``cli_args(source, out)``: the ``moetrace`` arguments doing the same import.

The contract then checks, independently of the importer's code: the store equals the
reference trace row for row (every token column, decoded label, token text, expert,
weight, sequence column); source -> store -> export-parquet -> import-parquet -> store
is equal row for row; DuckDB reading the exported Parquet agrees with counts computed
from the reference with NumPy; the CLI builds the same store; a failed import leaves
nothing at OUT; shuffled input gives the same store as sorted input (or, where
``shuffled_error`` is set, a one-line error saying how to sort it); every store obeys the
store invariant (a sequence's rows contiguous, ``pos`` strictly increasing).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import duckdb
import numpy as np

from moetrace.cli import main
from moetrace.io import export_parquet, import_parquet
from moetrace.store import TraceStore

# Token texts that trip naive CSV/whitespace handling.
CHUNK = 64  # rows per store chunk in tests: tiny stores write fast

WEIRD_TOKENS = [" ", "\n", "  ", "\t", " the", "end ", " a b ", "", '"', '""', ",", ", ", "\r\n", "é", "NA", "0"]


@dataclasses.dataclass
class RefTrace:
    """Reference trace, rows in store order.

    ``seq`` int64 [N], ``pos`` int32 [N], ``labels`` name -> str array [N], ``text`` str
    array [N] or None, ``experts`` int64 [N, L, K], ``weights`` float32 [N, L, K] (float16
    representable) or None, ``layer_ids`` [L], ``n_experts``, ``sequences`` name -> array [S]
    (including ``seq``) or None.
    """

    seq: np.ndarray
    pos: np.ndarray
    labels: dict
    experts: np.ndarray
    layer_ids: list
    n_experts: int
    text: np.ndarray | None = None
    weights: np.ndarray | None = None
    sequences: dict | None = None

    def __len__(self) -> int:
        return len(self.seq)


def store_rows(store: TraceStore) -> dict[str, np.ndarray]:
    """Every token/routing column of a store, labels decoded to strings."""
    data = store.read(store.columns)
    for label in store.label_names:
        data[label] = store.decode_label(label, data[label]).astype(str)
    if "text" in data:
        data["text"] = np.asarray(data["text"].tolist(), dtype=object)
    return data


def assert_store_invariant(store: TraceStore) -> None:
    """The store invariant: a sequence's rows are contiguous and in strictly increasing ``pos`` order."""
    data = store.read(["seq", "pos"])
    seq, pos = data["seq"], data["pos"]
    starts = np.flatnonzero(np.r_[True, seq[1:] != seq[:-1]])
    assert len(np.unique(seq[starts])) == len(starts), "a sequence's rows are split in several runs"
    same = seq[1:] == seq[:-1]
    assert (pos[1:][same] > pos[:-1][same]).all(), "positions not strictly increasing within a sequence"


def assert_store_equals_trace(store: TraceStore, trace: RefTrace) -> None:
    """Row-for-row equality of ``store`` with the reference ``trace`` (which obeys the store invariant)."""
    assert_store_invariant(store)
    assert len(store) == len(trace)
    assert store.layer_ids.tolist() == list(trace.layer_ids)
    assert store.n_experts == trace.n_experts
    assert store.top_k == trace.experts.shape[2]
    assert sorted(store.label_names) == sorted(trace.labels)
    data = store_rows(store)
    np.testing.assert_array_equal(data["seq"], trace.seq)
    np.testing.assert_array_equal(data["pos"], trace.pos)
    np.testing.assert_array_equal(data["experts"].astype(np.int64), trace.experts)
    for name, values in trace.labels.items():
        np.testing.assert_array_equal(data[name], np.asarray(values, dtype=str))
    if trace.text is None:
        assert not store.has_token_text
    else:
        assert data["text"].tolist() == list(trace.text)  # exact strings, whitespace included
    if trace.weights is None:
        assert not store.has_weights
    else:
        np.testing.assert_array_equal(data["weights"].astype(np.float32), trace.weights)
    if trace.sequences:
        seqs = store.read_sequences()
        assert sorted(seqs) == sorted(trace.sequences)
        for name, values in trace.sequences.items():
            if np.asarray(values).dtype.kind in "OUT":
                assert seqs[name].tolist() == [str(v) for v in values]
            else:
                np.testing.assert_array_equal(seqs[name], values)


def assert_stores_equal(a: TraceStore, b: TraceStore) -> None:
    """Row-for-row equality of two stores (labels compared as strings)."""
    assert len(a) == len(b)
    assert (a.n_layers, a.n_experts, a.top_k) == (b.n_layers, b.n_experts, b.top_k)
    assert a.layer_ids.tolist() == b.layer_ids.tolist()
    assert sorted(a.columns) == sorted(b.columns)
    assert a.labels == b.labels
    da, db = store_rows(a), store_rows(b)
    for name in da:
        np.testing.assert_array_equal(da[name], db[name], err_msg=name)
    sa, sb = a.read_sequences(), b.read_sequences()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        if name != "source":  # the file (and line) a sequence was read from: where the input put it
            assert sa[name].tolist() == sb[name].tolist(), name


class ImporterContract:
    """Base class of every importer's tests; see the module docstring."""

    #: the CLI subcommand, e.g. "import-csv"
    command: str = ""
    #: shape arguments of ``make_trace`` for the bad-input cases
    broken_shape: dict = {}
    #: shape arguments of ``make_trace`` for the shuffled-input case (several tokens)
    shuffle_shape: dict = {}
    #: None: shuffled input must import like sorted input; else fragments of the one-line error
    shuffled_error: list[str] | None = None

    def make_trace(self, rng: np.random.Generator, **shape) -> RefTrace:
        raise NotImplementedError

    def write_source(self, trace: RefTrace, directory: Path, rng: np.random.Generator, shuffle: bool = True):
        raise NotImplementedError

    def run_import(self, source, out: Path, **kwargs) -> TraceStore:
        raise NotImplementedError

    def cli_args(self, source, out: Path) -> list[str]:
        raise NotImplementedError

    def broken_sources(self, trace: RefTrace, directory: Path, rng: np.random.Generator):
        """Yield ``(name, source, expected message fragments)`` of bad inputs."""
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def build(self, tmp_path: Path, seed: int = 0, **shape):
        rng = np.random.default_rng(seed)
        trace = self.make_trace(rng, **shape)
        source = self.write_source(trace, tmp_path / "src", rng, shuffle=self.shuffled_error is None)
        return trace, source

    # ------------------------------------------------------------------ contract
    def test_import_equals_reference(self, tmp_path):
        trace, source = self.build(tmp_path)
        store = self.run_import(source, tmp_path / "out.zarr", progress=False, chunk_rows=CHUNK)
        assert_store_equals_trace(store, trace)

    def test_round_trip_through_parquet(self, tmp_path):
        trace, source = self.build(tmp_path, seed=1)
        first = self.run_import(source, tmp_path / "a.zarr", progress=False, chunk_rows=CHUNK)
        export_parquet(first, tmp_path / "a.parquet", row_group_rows=7, progress=False)
        second = import_parquet(tmp_path / "a.parquet", tmp_path / "b.zarr", batch_rows=5, progress=False,
                                chunk_rows=CHUNK)
        assert_stores_equal(first, second)
        assert_store_equals_trace(second, trace)

    def test_exported_parquet_matches_reference_in_duckdb(self, tmp_path):
        trace, source = self.build(tmp_path, seed=2)
        store = self.run_import(source, tmp_path / "a.zarr", progress=False, chunk_rows=CHUNK)
        path = tmp_path / "a.parquet"
        export_parquet(store, path, progress=False)
        N, L, K = trace.experts.shape
        got = duckdb.sql(f"SELECT layer, rank, expert, count(*) FROM '{path}' GROUP BY ALL").fetchall()
        want = {}
        layer_ids = np.asarray(trace.layer_ids)
        for (n, l, k), e in np.ndenumerate(trace.experts):
            key = (int(layer_ids[l]), k, int(e))
            want[key] = want.get(key, 0) + 1
        assert {(a, b, c): d for a, b, c, d in got} == want
        label = next(iter(trace.labels), None)
        if label is not None:
            got = dict(duckdb.sql(f"SELECT {label}, count(*) / {L * K} FROM '{path}' GROUP BY ALL").fetchall())
            values, counts = np.unique(np.asarray(trace.labels[label], dtype=str), return_counts=True)
            assert got == dict(zip(values.tolist(), counts.tolist()))
        types = dict(duckdb.sql(f"SELECT column_name, column_type FROM (DESCRIBE SELECT * FROM '{path}')").fetchall())
        assert types["seq"] == "BIGINT" and types["pos"] == "INTEGER" and types["token_id"] == "INTEGER"
        assert types["layer"] == "SMALLINT" and types["rank"] == "SMALLINT" and types["expert"] == "SMALLINT"
        assert ("weight" in types) == (trace.weights is not None)
        for name in trace.labels:
            assert types[name] == "VARCHAR"

    def test_cli_builds_the_same_store(self, tmp_path, capsys):
        trace, source = self.build(tmp_path, seed=3)
        out = tmp_path / "cli.zarr"
        assert main([self.command, *self.cli_args(source, out), "-q"]) == 0
        assert_store_equals_trace(TraceStore.open(out), trace)
        assert main([self.command, *self.cli_args(source, out), "-q"]) == 2  # exists, no --overwrite
        assert "already exists" in capsys.readouterr().err
        assert main([self.command, *self.cli_args(source, out), "-q", "--overwrite"]) == 0

    def test_bad_input_exits_2_with_one_line_and_no_store(self, tmp_path, capsys):
        rng = np.random.default_rng(4)
        trace = self.make_trace(rng, **self.broken_shape)
        cases = list(self.broken_sources(trace, tmp_path / "bad", rng))
        assert cases
        for i, (name, source, fragments) in enumerate(cases):
            out = tmp_path / f"out{i}.zarr"
            code = main([self.command, *self.cli_args(source, out), "-q"])
            err = capsys.readouterr().err
            assert code == 2, (name, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1, (name, err)
            for fragment in fragments:
                assert fragment in lines[0], (name, fragment, lines[0])
            assert not out.exists(), name
            assert not list(tmp_path.glob(f"out{i}.zarr.partial-*")), name
            assert not list(tmp_path.glob(f".out{i}.zarr.parts-*")), name

    def test_shuffled_input_gives_the_same_store_or_a_clear_error(self, tmp_path, capsys):
        rng = np.random.default_rng(5)
        trace = self.make_trace(rng, **self.shuffle_shape)
        ordered = self.write_source(trace, tmp_path / "sorted", rng, shuffle=False)
        shuffled = self.write_source(trace, tmp_path / "shuffled", rng, shuffle=True)
        first = self.run_import(ordered, tmp_path / "a.zarr", progress=False, chunk_rows=CHUNK)
        assert_store_equals_trace(first, trace)
        out = tmp_path / "b.zarr"
        code = main([self.command, *self.cli_args(shuffled, out), "-q"])
        err = capsys.readouterr().err
        if self.shuffled_error is None:
            assert code == 0, err
            assert_stores_equal(first, TraceStore.open(out))
        else:
            assert code == 2
            lines = err.strip().splitlines()
            assert len(lines) == 1, err
            for fragment in self.shuffled_error:
                assert fragment in lines[0], (fragment, lines[0])
            assert not out.exists() and not list(tmp_path.glob("b.zarr*"))

"""The trace store: round trips, chunk alignment, validation errors and crash safety."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrace.errors import MoetraceError
from moetrace.store import FORMAT_VERSION, ORDER_VERSION, TraceStore
from routes import random_topk


def make_rows(start: int, n: int, L: int, K: int, E: int, weights: bool = True) -> dict:
    """Deterministic rows [start, start+n): every value is a function of the row index."""
    r = np.arange(start, start + n, dtype=np.int64)
    layer = np.arange(L)[None, :, None]
    rank = np.arange(K)[None, None, :]
    rows = {
        "seq": r // 50,
        "pos": (r % 50).astype(np.int32),
        "token_id": (r % 997).astype(np.int32),
        "generated": (r % 50) >= 40,
        "domain": np.array(["math", "bio", "code"])[r % 3],
        "experts": (r[:, None, None] * 31 + layer * 7 + rank) % E,  # K distinct ids per token (K <= E)
    }
    if weights:
        rows["weights"] = (((r[:, None, None] + layer + rank) % 100) / 100).astype(np.float16)
    return rows


def concat(batches: list[dict]) -> dict:
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def assert_rows_equal(store: TraceStore, expected: dict, start: int = 0) -> None:
    n = len(expected["seq"])
    got = store.read(["seq", "pos", "token_id", "generated", "domain", "experts", "weights"], start, start + n)
    for key in ("seq", "pos", "token_id", "generated", "experts", "weights"):
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    np.testing.assert_array_equal(store.decode_label("domain", got["domain"]), expected["domain"])


def test_round_trip_with_partial_chunks_and_reopen(tmp_path):
    path = tmp_path / "t.zarr"
    batches = []
    with TraceStore.create(path, n_layers=3, n_experts=10, top_k=2, labels=["domain"],
                           weights=True, chunk_rows=16) as st_:
        start = 0
        for n in (5, 16, 1, 40, 7):
            batches.append(make_rows(start, n, 3, 2, 10))
            st_.append(batches[-1])
            start += n
        st_.flush()
        assert len(st_) == start
    # Reopen, append across the partial last chunk, read everything back.
    st_ = TraceStore.open(path, mode="a")
    batches.append(make_rows(start, 30, 3, 2, 10))
    st_.append(batches[-1])
    st_.close()
    reader = TraceStore.open(path)
    assert len(reader) == start + 30
    assert_rows_equal(reader, concat(batches))
    spans = [(c.start, c.stop) for c in reader.iter_chunks(["seq"], rows=(3, 70))]
    assert spans == [(3, 16), (16, 32), (32, 48), (48, 64), (64, 70)]


def test_rows_invisible_until_flush(tmp_path):
    st_ = TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=4, top_k=1, chunk_rows=8)
    st_.append({"seq": np.zeros(5), "pos": np.arange(5), "experts": np.zeros((5, 2, 1), int)})
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 0
    st_.append({"seq": np.zeros(5), "pos": np.arange(5, 10), "experts": np.ones((5, 2, 1), int)})
    # One whole chunk (8 rows) was written and committed; 2 rows still buffered.
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 8
    st_.flush()
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 10


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8),
    chunk_rows=st.sampled_from([1, 3, 8, 32]),
    shard_chunks=st.sampled_from([None, 2]),
    n_experts=st.sampled_from([3, 256, 300]),
    rows=st.tuples(st.integers(0, 200), st.integers(0, 200)),
)
def test_property_append_then_read_equals_input(tmp_path_factory, sizes, chunk_rows, shard_chunks, n_experts, rows):
    path = tmp_path_factory.mktemp("prop") / "t.zarr"
    L, K = 2, 3
    batches, start = [], 0
    with TraceStore.create(path, n_layers=L, n_experts=n_experts, top_k=K, labels=["domain"], weights=True,
                           chunk_rows=chunk_rows, shard_chunks=shard_chunks) as st_:
        for n in sizes:
            batches.append(make_rows(start, n, L, K, n_experts))
            st_.append(batches[-1])
            start += n
    reader = TraceStore.open(path)
    assert len(reader) == start
    expected_dtype = np.uint8 if n_experts <= 256 else np.uint16
    assert reader.read(["experts"])["experts"].dtype == expected_dtype
    if start:
        assert_rows_equal(reader, concat(batches))
    a, b = sorted(rows)
    pieces = list(reader.iter_chunks(["experts", "seq"], rows=(a, b)))
    got = np.concatenate([c["experts"] for c in pieces]) if pieces else np.zeros((0, L, K))
    want = concat(batches)["experts"][a:b] if start else np.zeros((0, L, K))
    np.testing.assert_array_equal(got, want)
    assert all(c.start % chunk_rows == 0 for c in pieces[1:])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.integers(1, 149), max_size=6), seed=st.integers(0, 2**16))
def test_label_vocabulary_does_not_depend_on_how_rows_are_batched(tmp_path_factory, cuts, seed):
    """Values join a label's vocabulary in the order they first appear in the rows (a batch-size choice
    in capture or an importer must not change the codes)."""
    rows = make_rows(0, 150, 1, 1, 4, weights=False)
    rows["domain"] = np.random.default_rng(seed).choice(["math", "bio", "code", "law"], size=150)
    bounds = [0, *sorted(set(cuts)), 150]
    path = tmp_path_factory.mktemp("vocab") / "t.zarr"
    with TraceStore.create(path, n_layers=1, n_experts=4, top_k=1, labels=["domain"]) as st_:
        for a, b in zip(bounds[:-1], bounds[1:]):
            st_.append({k: v[a:b] for k, v in rows.items()})
    _, first = np.unique(rows["domain"], return_index=True)
    assert TraceStore.open(path).labels["domain"] == [rows["domain"][i] for i in sorted(first)]


def test_fixed_label_vocabulary_and_codes(tmp_path):
    st_ = TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=4, top_k=1,
                            labels={"lang": ["en", "de"]}, chunk_rows=4)
    st_.append({"seq": [0, 0], "pos": [0, 1], "experts": [[[1]], [[2]]], "lang": ["de", "en"]})
    st_.append({"seq": [1], "pos": [0], "experts": [[[3]]], "lang": np.array([0], dtype=np.uint16)})
    with pytest.raises(MoetraceError, match=r"tokens/lang: value 'fr' is not in the label vocabulary"):
        st_.append({"seq": [2], "pos": [0], "experts": [[[0]]], "lang": ["fr"]})
    with pytest.raises(MoetraceError, match=r"tokens/lang: expected codes in \[0, 2\)"):
        st_.append({"seq": [2], "pos": [0], "experts": [[[0]]], "lang": np.array([5])})
    st_.close()
    reader = TraceStore.open(tmp_path / "t.zarr")
    assert reader.labels == {"lang": ["en", "de"]}
    assert reader.decode_label("lang", reader.read(["lang"])["lang"]).tolist() == ["de", "en", "en"]


@pytest.mark.parametrize("batch, message", [
    ({"experts": np.full((2, 3, 2), 8)}, r"routing/experts: expected expert ids in \[0, 8\), got 8"),
    ({"experts": np.zeros((2, 4, 2), int)}, r"routing/experts: expected shape \(n, 3, 2\)"),
    ({"experts": np.zeros((2, 3, 1), int)}, r"routing/experts: expected shape \(n, 3, 2\)"),
    ({"weights": np.full((2, 3, 2), np.nan)}, r"routing/weights: expected finite values, got NaN"),
    ({"weights": np.zeros((2, 3))}, r"routing/weights: expected shape \(2, 3, 2\)"),
    ({"pos": np.arange(3)}, r"tokens/pos: expected shape \(2,\)"),
    ({"experts": np.full((2, 3, 2), 1.5)}, r"routing/experts: expected integers"),
    ({"bogus": np.zeros(2)}, r"unknown column\(s\) \['bogus'\]"),
])
def test_append_rejects_bad_batches(tmp_path, batch, message):
    st_ = TraceStore.create(tmp_path / "t.zarr", n_layers=3, n_experts=8, top_k=2, weights=True)
    good = {"seq": np.zeros(2), "pos": np.arange(2), "experts": np.zeros((2, 3, 2), int),
            "weights": np.zeros((2, 3, 2))}
    with pytest.raises(MoetraceError, match=message):
        st_.append({**good, **batch})
    st_.close()
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 0


def test_missing_required_column(tmp_path):
    st_ = TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1, labels=["domain"])
    with pytest.raises(MoetraceError, match="missing required column 'domain'"):
        st_.append({"seq": [0], "pos": [0], "experts": [[[0]]]})


def test_open_rejects_non_stores_and_newer_versions(tmp_path):
    with pytest.raises(MoetraceError, match="not a moetrace store"):
        TraceStore.open(tmp_path)
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(MoetraceError, match="no 'moetrace' group attribute"):
        TraceStore.open(tmp_path / "plain.zarr")
    TraceStore.create(tmp_path / "new.zarr", n_layers=1, n_experts=2, top_k=1).close()
    meta_path = tmp_path / "new.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["moetrace"]["format_version"] = FORMAT_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(MoetraceError, match=f"format_version {FORMAT_VERSION + 1} is newer"):
        TraceStore.open(tmp_path / "new.zarr")


def test_store_is_plain_zarr_for_other_readers(tmp_path):
    rows = make_rows(0, 20, 2, 2, 5)
    with TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=5, top_k=2, labels=["domain"],
                           weights=True, model="tiny", scoring="softmax") as st_:
        st_.append(rows)
    group = zarr.open_group(str(tmp_path / "t.zarr"), mode="r")
    meta = group.attrs["moetrace"]
    assert meta["committed"] == 20 and meta["n_experts"] == 5 and meta["model"] == "tiny"
    assert meta["labels"]["domain"] == ["math", "bio", "code"]  # the order the values first appear in
    np.testing.assert_array_equal(group["routing/experts"][:], rows["experts"])
    assert group["routing/experts"].chunks[1:] == (2, 2)


def test_sequences_metadata(tmp_path):
    with TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1) as st_:
        st_.append_sequences({"seq": [0, 1], "answer_char": ["A", " B "], "correct": [True, False]})
        st_.append_sequences({"seq": [2], "answer_char": ["C"], "correct": [True]})
        with pytest.raises(MoetraceError, match=r"sequences: expected columns"):
            st_.append_sequences({"seq": [3]})
    seqs = TraceStore.open(tmp_path / "t.zarr").read_sequences()
    assert seqs["seq"].tolist() == [0, 1, 2]
    assert seqs["answer_char"].tolist() == ["A", " B ", "C"]
    assert seqs["correct"].tolist() == [True, False, True]


def test_info_counts_sequences_and_labels(tmp_path):
    with TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=5, top_k=2, labels=["domain"],
                           weights=True, chunk_rows=7) as st_:
        st_.append(make_rows(0, 120, 2, 2, 5))  # seq = r // 50 -> 3 sequences, one spans chunks
    info = TraceStore.open(tmp_path / "t.zarr").info()
    assert info["rows"] == 120 and info["sequences"] == 3 and info["routing_rows"] == 480
    assert info["labels"]["domain"] == {"bio": 40, "code": 40, "math": 40}
    assert info["arrays"]["routing/experts"]["raw_bytes"] == 480
    assert info["arrays"]["routing/experts"]["stored_bytes"] > 0


# ---------------------------------------------------------------------------- crash safety
CHILD = textwrap.dedent("""
    import random, sys
    sys.path.insert(0, {tests!r})
    from test_store import make_rows
    from moetrace.store import TraceStore
    st = TraceStore.open({path!r}, mode="a")
    rng = random.Random({seed})
    start = len(st)
    print("ready", flush=True)
    while True:
        n = rng.randint(1, 150)
        st.append(make_rows(start, n, 4, 2, 16))
        start += n
        if rng.random() < 0.5:
            st.flush()
            print("flushed", flush=True)
""")


def test_sigkill_during_appends_never_loses_committed_rows(tmp_path):
    """A writer killed with SIGKILL at random moments leaves a store whose committed rows are
    intact; reopening for append resumes exactly after them."""
    path = tmp_path / "crash.zarr"
    TraceStore.create(path, n_layers=4, n_experts=16, top_k=2, labels=["domain"], weights=True,
                      chunk_rows=64).close()
    rng = random.Random(1234)
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": tests_dir}  # moetrace itself is installed
    previous = 0
    grew = 0
    for trial in range(20):
        code = CHILD.format(tests=tests_dir, path=str(path), seed=trial)
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
        assert child.stdout.readline().strip() == b"ready"
        # Wait for a few commits (so each trial has something new to lose, however slow the machine),
        # then kill at a random moment of the appends and flushes that follow.
        for _ in range(rng.randint(1, 3)):
            assert child.stdout.readline().strip() == b"flushed"
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        reader = TraceStore.open(path)
        n = len(reader)
        assert n >= previous, "committed rows must never shrink"
        grew += n > previous
        if n:
            assert_rows_equal(reader, make_rows(0, n, 4, 2, 16))
        previous = n
    assert grew == 20, "every trial waited for a commit before the kill"
    # The store still accepts appends after the last kill and everything reads back.
    st_ = TraceStore.open(path, mode="a")
    assert len(st_) == previous
    st_.append(make_rows(previous, 10, 4, 2, 16))
    st_.close()
    reader = TraceStore.open(path)
    assert len(reader) == previous + 10
    assert_rows_equal(reader, make_rows(0, previous + 10, 4, 2, 16))
    assert not list(path.rglob("*.partial"))


def test_cli_info(tmp_path, capsys):
    from moetrace.cli import main

    with TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=5, top_k=2, labels=["domain"],
                           weights=True) as st_:
        st_.append(make_rows(0, 60, 2, 2, 5))
    assert main(["info", str(tmp_path / "t.zarr"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["rows"] == 60 and info["sequences"] == 2 and info["top_k"] == 2
    assert main(["info", str(tmp_path / "t.zarr")]) == 0
    assert "routing/experts" in capsys.readouterr().out
    assert main(["info", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a moetrace store" in err[0]


# ---------------------------------------------------------------------------- malformed stores
def _good_store(path: Path) -> Path:
    with TraceStore.create(path, n_layers=2, n_experts=5, top_k=2, labels=["domain"], weights=True,
                           chunk_rows=8) as st_:
        st_.append(make_rows(0, 20, 2, 2, 5))
    return path


def _edit_json(path: Path, edit) -> None:
    doc = json.loads(path.read_text())
    doc = edit(doc)
    path.write_text(json.dumps(doc))


def _set_attr(key, value):
    def edit(doc):
        if value is _DELETE:
            del doc["attributes"]["moetrace"][key]
        else:
            doc["attributes"]["moetrace"][key] = value
        return doc
    return edit


_DELETE = object()


@pytest.mark.parametrize("edit, message", [
    (lambda doc: [doc], r"zarr.json: not a moetrace store \(expected a Zarr v3 group, got a JSON list\)"),
    (lambda doc: {**doc, "attributes": [1]}, r"no 'moetrace' group attribute"),
    (_set_attr("committed", _DELETE), r"moetrace.committed: expected a non-negative 64-bit integer, got nothing"),
    (_set_attr("committed", -1), r"moetrace.committed: expected a non-negative 64-bit integer, got -1"),
    (_set_attr("committed", "20"), r"moetrace.committed: expected a non-negative 64-bit integer, got '20'"),
    (_set_attr("committed", 21), r"routing/experts: expected shape \(N, 2, 2\) with N >= committed=21"),
    (_set_attr("committed", True), r"moetrace.committed: expected a non-negative 64-bit integer, got True"),
    (_set_attr("n_experts", "5"), r"moetrace.n_experts: expected a positive integer, got '5'"),
    (_set_attr("n_experts", 300), r"routing/experts: expected dtype uint16, got uint8"),
    (_set_attr("top_k", 3), r"routing/experts: expected shape \(N, 2, 3\)"),
    (_set_attr("top_k", 9), r"moetrace.top_k: expected at most n_experts=5"),
    (_set_attr("layer_ids", [0]), r"moetrace.layer_ids: expected a list of 2 increasing integers in \[0, 2147483647\], got \[0\]"),
    (_set_attr("layer_ids", [3, 1]), r"moetrace.layer_ids: expected a list of 2 increasing integers"),
    (_set_attr("labels", ["domain"]), r"moetrace.labels: expected a dict of label name -> list of distinct strings"),
    (_set_attr("labels", {"domain": "math"}), r"moetrace.labels: expected a dict"),
    (_set_attr("labels", {"domain": [1, 2]}), r"moetrace.labels: expected a dict"),
    (_set_attr("labels", {"domain": [], "lang": []}), r"tokens/lang: missing array"),
    (_set_attr("labels", {}), r"tokens/domain: unexpected array"),
    (_set_attr("chunk_rows", 16), r"routing/experts: expected chunks of 16 rows"),
    (_set_attr("chunk_rows", 0), r"moetrace.chunk_rows: expected a positive integer, got 0"),
    (_set_attr("format_version", "1"), r"moetrace.format_version: expected a positive integer, got '1'"),
    (_set_attr("model", 3), r"moetrace.model: expected a string or null, got 3"),
    (_set_attr("codecs", None), r"moetrace.codecs: expected a dict"),
    (_set_attr("codecs", {"tokens": {"cname": "lz4"}}), r"moetrace.codecs: expected a dict with cname \(str\), clevel"),
    (_set_attr("shard_chunks", 0), r"moetrace.shard_chunks: expected a positive integer or null"),
])
def test_open_refuses_malformed_attributes_in_one_line(tmp_path, edit, message):
    path = _good_store(tmp_path / "t.zarr")
    _edit_json(path / "zarr.json", edit)
    for mode in ("r", "a"):
        with pytest.raises(MoetraceError, match=message) as info:
            TraceStore.open(path, mode=mode)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("damage, message", [
    (lambda p: __import__("shutil").rmtree(p / "tokens" / "pos"), r"tokens/pos: missing array"),
    (lambda p: __import__("shutil").rmtree(p / "routing"), r"routing: missing group"),
    (lambda p: (p / "tokens" / "seq" / "zarr.json").write_text("{"), r"tokens/seq: unreadable Zarr array"),
    (lambda p: (p / "tokens" / "seq" / "zarr.json").write_text("[]"), r"tokens/seq: unreadable Zarr array"),
    (lambda p: _edit_json(p / "tokens" / "pos" / "zarr.json", lambda d: {**d, "data_type": "int64"}),
     r"tokens/pos: expected dtype int32, got int64"),
    (lambda p: _edit_json(p / "routing" / "weights" / "zarr.json", lambda d: {**d, "shape": [20, 2]}),
     r"routing/weights: (expected shape \(N, 2, 2\)|unreadable Zarr array)"),
    (lambda p: _edit_json(p / "tokens" / "generated" / "zarr.json", lambda d: {**d, "shape": [3]}),
     r"tokens/generated: expected shape \(N\) with N >= committed=20, got \(3,\)"),
    (lambda p: _edit_json(p / "tokens" / "seq" / "zarr.json", lambda d: {**d, "node_type": "group"}),
     r"tokens/seq: unexpected array|tokens/seq: (missing|unreadable)"),
])
def test_open_refuses_missing_or_malformed_arrays(tmp_path, damage, message):
    path = _good_store(tmp_path / "t.zarr")
    damage(path)
    with pytest.raises(MoetraceError, match=message) as info:
        TraceStore.open(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_cli_info_on_a_malformed_store_is_one_line_exit_2(tmp_path):
    path = _good_store(tmp_path / "t.zarr")
    _edit_json(path / "zarr.json", _set_attr("committed", _DELETE))
    proc = subprocess.run([sys.executable, "-m", "moetrace.cli", "info", str(path)], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "committed" in lines[0] and str(path) in lines[0]


# ---------------------------------------------------------------------------- row order invariant
def _reference_first_violation(seq: list[int], pos: list[int]) -> int | None:
    """Row-by-row check of the invariant, in plain Python: a sequence's rows are contiguous and
    in strictly increasing pos. Returns the first violating row or None."""
    ended, current = set(), None
    for row, (s, p) in enumerate(zip(seq, pos)):
        if current is not None and s == current[0]:
            if p <= current[1]:
                return row
        else:
            if s in ended:
                return row
            if current is not None:
                ended.add(current[0])
        current = (s, p)
    return None


def _order_rows(seq, pos) -> dict:
    n = len(seq)
    return {"seq": np.asarray(seq, dtype=np.int64), "pos": np.asarray(pos, dtype=np.int64),
            "experts": np.zeros((n, 1, 1), dtype=np.int64)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=6),
    reopen_at=st.integers(0, 6),
)
def test_append_enforces_the_row_order_like_a_row_by_row_reference(tmp_path_factory, rows, cuts, reopen_at):
    """Random (seq, pos) streams in random batches, with a reopen in between: append accepts exactly
    the batches before the first violating row, and names that row."""
    path = tmp_path_factory.mktemp("order") / "t.zarr"
    seq, pos = [r[0] for r in rows], [r[1] for r in rows]
    first_bad = _reference_first_violation(seq, pos)
    edges = sorted({0, len(rows), *[c for c in cuts if c < len(rows)]})
    st_ = TraceStore.create(path, n_layers=1, n_experts=2, top_k=1, chunk_rows=4)
    accepted = 0
    for b, (a, z) in enumerate(zip(edges[:-1], edges[1:])):
        if b == reopen_at:
            st_.close()
            st_ = TraceStore.open(path, mode="a")
        if first_bad is not None and a <= first_bad < z:
            with pytest.raises(MoetraceError) as info:
                st_.append(_order_rows(seq[a:z], pos[a:z]))
            message = str(info.value)
            assert message.startswith(f"{path}: row {first_bad} (seq {seq[first_bad]}, pos {pos[first_bad]}): expected ")
            assert "\n" not in message
            break
        st_.append(_order_rows(seq[a:z], pos[a:z]))
        accepted = z
    st_.close()
    reader = TraceStore.open(path)
    assert len(reader) == accepted
    got = reader.read(["seq", "pos"])
    assert got["seq"].tolist() == seq[:accepted] and got["pos"].tolist() == pos[:accepted]
    assert reader.info()["sequences"] == len(set(seq[:accepted]))


def test_rejected_batch_leaves_the_writer_unchanged(tmp_path):
    path = tmp_path / "t.zarr"
    st_ = TraceStore.create(path, n_layers=1, n_experts=2, top_k=1, labels=["domain"], chunk_rows=4)
    st_.append({**_order_rows([0, 0, 1], [0, 1, 0]), "domain": ["a", "a", "b"]})
    # Sequence 0 ended at row 2; a new label value in the refused batch must not enter the vocabulary.
    with pytest.raises(MoetraceError, match=r"row 4 \(seq 0, pos 5\): expected a new sequence id; sequence 0 "
                                            r"already ended at an earlier row"):
        st_.append({**_order_rows([1, 0], [1, 5]), "domain": ["b", "new"]})
    with pytest.raises(MoetraceError, match=r"row 3 \(seq 1, pos 0\): expected pos > 0, the previous row's pos"):
        st_.append({**_order_rows([1], [0]), "domain": ["b"]})
    st_.append({**_order_rows([1, 2, 2], [1, 0, 3]), "domain": ["b", "c", "c"]})
    st_.close()
    reader = TraceStore.open(path)
    assert reader.read(["seq"])["seq"].tolist() == [0, 0, 1, 1, 2, 2]
    assert reader.labels == {"domain": ["a", "b", "c"]}
    assert reader.info()["sequences"] == reader.info()["sequence_runs"] == 3


def test_reopened_writer_remembers_every_ended_sequence(tmp_path):
    path = tmp_path / "t.zarr"
    with TraceStore.create(path, n_layers=1, n_experts=2, top_k=1, chunk_rows=3) as st_:
        st_.append(_order_rows([5, 5, 9, 2, 2, 2, 7], [0, 1, 0, 0, 1, 2, 4]))
    st_ = TraceStore.open(path, mode="a")
    for s in (5, 9, 2):
        with pytest.raises(MoetraceError, match=rf"row 7 \(seq {s}, pos 9\): expected a new sequence id"):
            st_.append(_order_rows([s], [9]))
    with pytest.raises(MoetraceError, match=r"row 7 \(seq 7, pos 4\): expected pos > 4"):
        st_.append(_order_rows([7], [4]))
    st_.append(_order_rows([7, 3, 100], [5, 0, 0]))
    st_.close()
    assert TraceStore.open(path).read(["seq"])["seq"].tolist() == [5, 5, 9, 2, 2, 2, 7, 7, 3, 100]


def test_out_of_range_integers_are_refused_not_wrapped(tmp_path):
    st_ = TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1)
    big_seq = np.array([0, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(MoetraceError, match=r"tokens/seq: expected values in \[-9223372036854775808, "
                                            r"9223372036854775807\] \(int64\), got 9223372036854775813 \(batch row 1\)"):
        st_.append({"seq": big_seq, "pos": [0, 0], "experts": np.zeros((2, 1, 1), int)})
    with pytest.raises(MoetraceError, match=r"tokens/token_id: expected values in .* \(int32\), got 3000000000"):
        st_.append({**_order_rows([0], [0]), "token_id": [3_000_000_000]})
    with pytest.raises(MoetraceError, match=r"tokens/pos: expected values in .* \(int32\), got 1e\+20"):
        st_.append({"seq": [0], "pos": [1e20], "experts": np.zeros((1, 1, 1), int)})
    st_.close()
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 0


def _as_version_1(path: Path, seq: list[int] | None = None) -> None:
    """Make a store look like one written before the order invariant (format_version 1), with
    ``seq`` written straight through zarr (which the append check would refuse)."""
    if seq is not None:
        zarr.open_array(str(path / "tokens" / "seq"), mode="r+")[: len(seq)] = np.asarray(seq)
    _edit_json(path / "zarr.json", _set_attr("format_version", 1))


def test_version_1_stores_open_read_only_and_are_checked_before_appending(tmp_path):
    ok, bad = tmp_path / "ok.zarr", tmp_path / "bad.zarr"
    for path in (ok, bad):
        with TraceStore.create(path, n_layers=1, n_experts=2, top_k=1, chunk_rows=2) as st_:
            st_.append(_order_rows([0, 0, 1, 1, 2], [0, 1, 0, 1, 0]))
    _as_version_1(ok)
    _as_version_1(bad, [0, 1, 0, 1, 2])  # batched generate() as written before: interleaved sequences
    for path, runs in ((ok, 3), (bad, 5)):
        info = TraceStore.open(path).info()
        assert info["format_version"] == 1 and info["sequences"] == 3 and info["sequence_runs"] == runs
    with pytest.raises(MoetraceError, match=r"bad.zarr: row 2 \(seq 0\): expected a new sequence id .*"
                                            r"format_version 1.* open it read-only, or re-import it"):
        TraceStore.open(bad, mode="a")
    with TraceStore.open(ok, mode="a") as st_:
        with pytest.raises(MoetraceError, match=r"row 5 \(seq 1, pos 7\): expected a new sequence id"):
            st_.append(_order_rows([1], [7]))
        st_.append(_order_rows([2, 3], [1, 0]))
    reader = TraceStore.open(ok)
    # checked for order, not rewritten: its arrays keep their codecs, so it becomes a version 2 store
    assert reader.info()["format_version"] == ORDER_VERSION and len(reader) == 7


def test_cli_info_reports_distinct_sequences_and_warns_about_interleaved_rows(tmp_path, capsys):
    from moetrace.cli import main

    path = tmp_path / "t.zarr"
    with TraceStore.create(path, n_layers=1, n_experts=2, top_k=1, chunk_rows=2) as st_:
        st_.append(_order_rows([0, 0, 1, 1, 2, 2], [0, 1, 0, 1, 0, 1]))
    _as_version_1(path, [0, 1, 2, 0, 1, 2])
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sequences   3 " in out and "not contiguous (6 runs of equal seq)" in out


# ---------------------------------------------------------------------------- chunk layout
@pytest.mark.parametrize("L, K, E, extra", [
    (1, 1, 2, {}),                                   # was 64 MiB chunks of tokens/seq
    (1, 1, 300, {"weights": True}),
    (16, 8, 64, {"weights": True, "token_text": True}),
    (58, 8, 256, {"weights": True, "probs": True}),  # DeepSeek-V3 shape
    (4, 2, 4096, {"probs": True}),
    (48, 8, 512, {"shard_chunks": 4}),
])
def test_every_chunk_is_at_most_8_MiB_and_aligned_to_one_row_grid(tmp_path, L, K, E, extra):
    TraceStore.create(tmp_path / "t.zarr", n_layers=L, n_experts=E, top_k=K, labels=["domain"], **extra).close()
    st_ = TraceStore.open(tmp_path / "t.zarr")
    rows = st_.chunk_rows
    assert rows & (rows - 1) == 0
    widest = 0
    for name, a in st_.info()["arrays"].items():
        if name.startswith("sequences/"):
            continue
        chunks = a["chunks"]
        assert chunks[1:] == a["shape"][1:], name  # along N only
        item = 4 + 4 if name == "tokens/text" else np.dtype(a["dtype"]).itemsize  # text: length + ~4 B
        nbytes = chunks[0] * int(np.prod(chunks[1:])) * item
        assert nbytes <= 8 << 20, (name, nbytes)
        if name in ("routing/weights", "routing/probs"):  # wider than the grid: a fraction of it
            assert rows % chunks[0] == 0
            assert chunks[0] == rows or chunks[0] == 1 or nbytes > 4 << 20  # the largest that fits
        else:
            assert chunks[0] == rows, name
            widest = max(widest, nbytes)
    assert widest > 4 << 20  # the grid's widest array has the largest power-of-2 chunk within 8 MiB
    if extra.get("weights") and E <= 256:  # float16 weights are twice as wide as uint8 experts
        assert st_.info()["arrays"]["routing/weights"]["chunks"][0] == rows // 2
    codecs = zarr.open_array(str(tmp_path / "t.zarr" / "routing" / "experts"), mode="r").metadata.codecs
    assert "noshuffle" in str(codecs) and "lz4" in str(codecs)  # format_version 3's codec for the ids
    arrays = st_.info()["arrays"]
    assert arrays["tokens/seq"]["codec"] == arrays["tokens/domain"]["codec"] == "lz4 5 shuffle"
    if "routing/weights" in arrays:
        assert arrays["routing/weights"]["codec"] == "lz4 5 bitshuffle"


def test_explicit_chunk_rows_over_8_MiB_are_refused(tmp_path):
    with pytest.raises(MoetraceError, match=r"chunk_rows: expected at most 65536 \(chunks of routing/experts "
                                            r"within 8 MiB\), got 131072"):
        TraceStore.create(tmp_path / "t.zarr", n_layers=16, n_experts=64, top_k=8, weights=True, chunk_rows=131072)
    with pytest.raises(MoetraceError, match=r"chunk_rows: expected at most 1048576 \(chunks of tokens/seq"):
        TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1, chunk_rows=1 << 21)
    assert not (tmp_path / "t.zarr").exists()


def test_probs_chunks_finer_than_the_row_grid_read_aligned(tmp_path):
    """routing/probs has chunks of chunk_rows / 2 here (routing/weights takes fractions the same way):
    blocks of iter_chunks still hold the same rows of every array."""
    L, K, E, n = 2, 2, 8192, 700
    rng = np.random.default_rng(3)
    probs = rng.random((n, L, E)).astype(np.float16)
    rows = {**_order_rows(np.arange(n) // 7, np.arange(n) % 7), "experts": random_topk(rng, n, L, K, E),
            "probs": probs}
    with TraceStore.create(tmp_path / "t.zarr", n_layers=L, n_experts=E, top_k=K, probs=True,
                           chunk_rows=512) as st_:
        st_.append(rows)
    st_ = TraceStore.open(tmp_path / "t.zarr")
    assert st_.info()["arrays"]["routing/probs"]["chunks"][0] == 256
    blocks = list(st_.iter_chunks(["seq", "experts", "probs"], rows=(100, 700)))
    assert [(b.start, b.stop) for b in blocks] == [(100, 512), (512, 700)]
    for b in blocks:
        np.testing.assert_array_equal(b["probs"], probs[b.start:b.stop])
        np.testing.assert_array_equal(b["experts"], rows["experts"][b.start:b.stop])
        np.testing.assert_array_equal(b["seq"], rows["seq"][b.start:b.stop])


def test_layer_ids_beyond_int16_are_refused(tmp_path):
    """export-parquet writes layers as int16: a layer id that would wrap is refused at creation."""
    for ids in ([2**31], [-1], [2**70]):
        with pytest.raises(MoetraceError, match=r"layer_ids: expected 1 distinct increasing layer indices in \[0, 2147483647\]"):
            TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=2, top_k=1, layer_ids=ids)
        assert not (tmp_path / "t.zarr").exists()


def test_append_refuses_a_repeated_expert_in_one_tokens_top_k(tmp_path):
    """The store's invariant: K distinct experts per token and layer. A batch that repeats one is
    refused whole with the batch row and the layer id, and nothing of it is written."""
    with TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=8, top_k=3, layer_ids=[3, 5]) as st_:
        st_.append({"seq": [0, 0], "pos": [0, 1], "experts": [[[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [4, 5, 6]]]})
        with pytest.raises(MoetraceError, match=r"routing/experts: expected 3 distinct expert ids per token and "
                                                r"layer, got \[6, 2, 6\] \(batch row 1, layer 5\)"):
            st_.append({"seq": [1, 1], "pos": [0, 1], "experts": [[[0, 1, 2], [3, 4, 5]], [[1, 2, 3], [6, 2, 6]]]})
    assert len(TraceStore.open(tmp_path / "t.zarr")) == 2


def test_version_2_stores_with_one_codec_still_read_count_and_append(tmp_path):
    """A store written before format_version 3 (one ``codec`` attribute, bitshuffled routing ids)
    reads, counts and appends as before, keeping its version and codecs; ``info`` says which."""
    from moetrace.cli import main
    from moetrace.counting import count
    from moetrace.store import DEFAULT_CODEC

    rng = np.random.default_rng(5)
    n = 300
    batch = {"seq": np.arange(n) // 30, "pos": np.arange(n) % 30, "experts": random_topk(rng, n, 2, 2, 64)}
    old, new = tmp_path / "v2.zarr", tmp_path / "v3.zarr"
    with TraceStore.create(old, n_layers=2, n_experts=64, top_k=2, chunk_rows=64, codec=DEFAULT_CODEC) as st_:
        st_.append(batch)

    def as_version_2(doc):
        meta = doc["attributes"]["moetrace"]
        meta["format_version"] = 2
        meta["codec"] = meta.pop("codecs")["routing"]
        return doc

    _edit_json(old / "zarr.json", as_version_2)
    with TraceStore.create(new, n_layers=2, n_experts=64, top_k=2, chunk_rows=64) as st_:
        st_.append(batch)
    for stats in (["experts", "temporal"], ["paths", "pairs"]):
        xr.testing.assert_identical(count(old, stats=stats, progress=False).drop_attrs(),
                                    count(new, stats=stats, progress=False).drop_attrs())
    with TraceStore.open(old, mode="a") as st_:
        st_.append({k: v[:30] for k, v in {**batch, "seq": batch["seq"] + 100}.items()})
    info = TraceStore.open(old).info()
    assert info["format_version"] == 2 and len(TraceStore.open(old)) == n + 30
    assert info["arrays"]["routing/experts"]["codec"] == "lz4 5 bitshuffle"
    assert TraceStore.open(new).info()["arrays"]["routing/experts"]["codec"] == "lz4 5 noshuffle"
    assert TraceStore.open(new).info()["format_version"] == FORMAT_VERSION == 3
    assert main(["info", str(old)]) == 0

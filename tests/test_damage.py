"""Damaged, odd and aliased stores and archives: exact counts or a one-line error, never a wrong count (issue 21)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from routes import random_topk

from moetrace.cli import main
from moetrace.counting import count, save_counts
from moetrace.errors import MoetraceError
from moetrace.leftovers import alive
from moetrace.store import TraceStore
from moetrace.synthetic import TraceSpec, generate_chunk

SPEC = TraceSpec(n_tokens=2000, n_layers=2, n_experts=8, top_k=2, seq_len=25)


def make_store(path, start: int = 0, n: int = 600, chunk_rows: int = 128) -> TraceStore:
    st = TraceStore.create(path, n_layers=SPEC.n_layers, n_experts=SPEC.n_experts, top_k=SPEC.top_k,
                           labels=["domain", "lang"], weights=True, chunk_rows=chunk_rows)
    with st:
        st.append(generate_chunk(SPEC, start, start + n))
    return TraceStore.open(path)


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not alive(proc.pid)
    return proc.pid


def assert_counts_equal(a: xr.Dataset, b: xr.Dataset) -> None:
    for name in ("experts", "tokens"):
        np.testing.assert_array_equal(a[name].values, b[name].values)


# --------------------------------------------------------------------------- archives
def test_leftovers_and_counts_files_in_an_archive_directory_are_not_counted(tmp_path):
    make_store(tmp_path / "a.zarr", 0, 600)
    make_store(tmp_path / "b.zarr", 600, 500)
    pid = dead_pid()
    make_store(tmp_path / f"c.zarr.partial-{pid}", 1100, 400)          # a killed import
    make_store(tmp_path / f"b.zarr.old-{pid}", 1500, 300)              # a killed overwrite's previous b.zarr
    want = count([tmp_path / "a.zarr", tmp_path / "b.zarr"], stats=["experts"], progress=False)
    save_counts(want, tmp_path / "counts.zarr")                         # saved inside the archive directory
    with pytest.warns(UserWarning, match=r"skipped 3 entries.*b\.zarr\.old-\d+ \(the previous b\.zarr.*"
                                         r"c\.zarr\.partial-\d+ \(left by process \d+, which is gone.*"
                                         r"counts\.zarr \(a Zarr group"):
        got = count(tmp_path, stats=["experts"], progress=False)
    assert_counts_equal(got, want)
    assert int(got["tokens"].sum()) == 1100
    # named itself, a leftover is what the caller asked for (e.g. to look at what a killed import wrote)
    assert int(count(tmp_path / f"c.zarr.partial-{pid}", stats=["experts"], progress=False)["tokens"].sum()) == 400


def test_one_store_named_twice_is_counted_once_and_a_copy_is_refused(tmp_path, monkeypatch):
    make_store(tmp_path / "a.zarr")
    monkeypatch.chdir(tmp_path)
    once = count("a.zarr", stats=["experts"], progress=False)
    twice = count(["a.zarr", "./a.zarr", str(tmp_path / "a.zarr")], stats=["experts"], progress=False)
    assert_counts_equal(twice, once)
    shutil.copytree(tmp_path / "a.zarr", tmp_path / "copy.zarr")
    with pytest.raises(MoetraceError, match=r"are the same store \(uuid [0-9a-f]+; a copy"):
        count(["a.zarr", "copy.zarr"], stats=["experts"], progress=False)


def test_counts_never_overwrite_the_store_they_count(tmp_path, capsys):
    st = make_store(tmp_path / "s.zarr")
    rows = len(st)
    assert main(["count", str(tmp_path / "s.zarr"), str(tmp_path / "s.zarr"), "--overwrite", "--quiet"]) == 2
    assert "the output is also an input store" in capsys.readouterr().err
    assert len(TraceStore.open(tmp_path / "s.zarr")) == rows
    ds = count(tmp_path / "s.zarr", stats=["experts"], progress=False)
    with pytest.raises(MoetraceError, match="the output is also an input store"):
        save_counts(ds, tmp_path / "s.zarr" / ".." / "s.zarr")
    assert len(TraceStore.open(tmp_path / "s.zarr")) == rows


def test_a_checkpoint_path_that_is_a_file_is_a_one_line_error(tmp_path):
    make_store(tmp_path / "s.zarr")
    (tmp_path / "ckpt").write_text("x")
    with pytest.raises(MoetraceError, match="--checkpoint .*ckpt: a file, expected a directory"):
        count(tmp_path / "s.zarr", stats=["experts"], progress=False, checkpoint=tmp_path / "ckpt")


def test_what_a_dead_writer_left_is_cleaned_by_the_next_write_of_the_same_output(tmp_path):
    from moetrace.io import import_routed

    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "0.npy", random_topk(np.random.default_rng(0), 5, 2, 2, 8))
    dead, living = dead_pid(), os.getppid()
    leftovers = [tmp_path / f"o.zarr.partial-{dead}", tmp_path / f".o.zarr.partial-{dead}.parts-x1"]
    kept = [tmp_path / f"o.zarr.partial-{living}", tmp_path / f"other.zarr.partial-{dead}"]
    for path in leftovers + kept:
        path.mkdir()
    import_routed(src, tmp_path / "o.zarr", format="npy", progress=False)
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    old = tmp_path / f"o.zarr.old-{dead}"
    old.mkdir()
    import_routed(src, tmp_path / "o.zarr", format="npy", progress=False, overwrite=True)
    assert not old.exists()  # o.zarr exists: the old copy of a finished overwrite can go


# --------------------------------------------------------------------------- damaged chunks
def _incompressible_store(path) -> TraceStore:
    """256 experts, uniform routing: Blosc stores the experts chunks raw (they do not compress)."""
    st = TraceStore.create(path, n_layers=4, n_experts=256, top_k=8, chunk_rows=512)
    n = 2048
    with st:
        st.append({"seq": np.repeat(np.arange(8), n // 8), "pos": np.tile(np.arange(n // 8), 8),
                   "experts": random_topk(np.random.default_rng(1), n, 4, 8, 256)})
    return TraceStore.open(path)


@pytest.mark.parametrize("cut", [1, 100, 4000])
def test_a_truncated_chunk_is_refused_not_read_past_its_end(tmp_path, cut):
    st = _incompressible_store(tmp_path / "s.zarr")
    chunk = tmp_path / "s.zarr" / "routing" / "experts" / "c" / "1" / "0" / "0"
    raw = chunk.read_bytes()
    assert int.from_bytes(raw[12:16], "little") >= 0.98 * 512 * 4 * 8  # stored (nearly) raw
    chunk.write_bytes(raw[:-cut])
    with pytest.raises(MoetraceError, match=r"c/1/0/0: damaged chunk \(the frame says it is \d+ bytes long, the "
                                            r"file has \d+ \(truncated\?\)\)"):
        count(st.path, stats=["experts"], progress=False)


@pytest.mark.parametrize("array", ["routing/experts/c/2/0/0", "tokens/domain/c/1", "tokens/generated/c/0"])
def test_a_deleted_chunk_is_damage_not_zeros(tmp_path, array):
    """Every chunk of the committed rows is written (fill-valued ones too: an all-prompt chunk of
    tokens/generated is all zeros), so a missing file is damage: counting and reading refuse it."""
    st = make_store(tmp_path / "s.zarr")
    path = tmp_path / "s.zarr" / array
    assert path.is_file()
    path.unlink()
    column = array.split("/")[1]
    with pytest.raises(MoetraceError, match=r"missing chunk file of committed rows \[\d+, \d+\)"):
        count(st.path, stats=["experts"], by=["domain"], progress=False, generated_only=column == "generated")
    with pytest.raises(MoetraceError, match="missing chunk file"):
        TraceStore.open(st.path).read([column])


def test_a_committed_count_raised_past_the_written_chunks_is_refused(tmp_path):
    import json

    st = make_store(tmp_path / "s.zarr", n=512)  # 4 whole chunks of 128 rows
    meta_path = tmp_path / "s.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["moetrace"]["committed"] = 1024
    meta_path.write_text(json.dumps(meta))
    for name in ("tokens/seq", "tokens/pos", "tokens/domain", "tokens/lang", "tokens/generated",
                 "tokens/token_id", "routing/experts", "routing/weights"):
        array_meta = tmp_path / "s.zarr" / name / "zarr.json"
        doc = json.loads(array_meta.read_text())
        doc["shape"][0] = 1024
        array_meta.write_text(json.dumps(doc))
    assert len(TraceStore.open(st.path)) == 1024
    with pytest.raises(MoetraceError, match=r"missing chunk file of committed rows \[512, 640\)"):
        count(st.path, stats=["experts"], progress=False)
    # the count driver's workers each take the next chunk: whichever fails first, the error names
    # the first missing chunk, so it does not depend on the number of workers
    from moetrace.counting.driver import count_store
    from moetrace.counting.filters import Filters

    for workers in (1, 3, 8):
        with pytest.raises(MoetraceError, match=r"missing chunk file of committed rows \[512, 640\)"):
            count_store(TraceStore.open(st.path), 0, 1024, ["experts"], Filters(), None, False, False,
                        workers=workers)


def test_an_archive_sum_that_would_wrap_is_refused():
    """weight_sum adds exact int64 units of 2**-24 across ranges: 2**39 per cell is the limit, and a sum
    past it must not come back wrapped (8.5e6 rows of weight 65504 would)."""
    from moetrace.counting.archive import _add
    from moetrace.kernels.counting import STATS

    near = int(2 ** 63 - 2 ** 40)
    a = xr.Dataset({"weight_sum": (("layer",), np.array([near, 5], np.int64))})
    b = xr.Dataset({"weight_sum": (("layer",), np.array([2 ** 41, 7], np.int64))})
    with pytest.raises(MoetraceError, match=r"weight_sum: a cell's sum passed 2\*\*39"):
        _add(a, b)
    ok = _add(a.copy(data={"weight_sum": np.array([1, 5])}), b)
    assert ok["weight_sum"].values.tolist() == [2 ** 41 + 1, 12] and STATS["weight_sum"].exact_unit == 2.0 ** -24


# --------------------------------------------------------------------------- one line, saying what is wrong
def test_inputs_that_raised_tracebacks_or_misleading_messages_get_one_true_line(tmp_path, capsys):
    import gzip

    from moetrace.io import import_csv, import_routed

    samples = gzip.compress(b"q_ix,token_ix,token,domain\n" + b"".join(b"0,%d,t,x\n" % i for i in range(50)))
    (tmp_path / "s.csv.gz").write_bytes(samples[:len(samples) // 2])
    (tmp_path / "k.csv").write_text("q_ix,token_ix,layer_ix,topk_ix,expert,weight\n0,0,0,1,1,nan\n0,1,0,1,2,0.5\n")
    with pytest.raises(MoetraceError, match=r"s\.csv\.gz: unreadable \(.*a truncated or damaged compressed file"):
        import_csv(tmp_path / "s.csv.gz", tmp_path / "k.csv", tmp_path / "a.zarr", progress=False)
    (tmp_path / "s.csv").write_text("q_ix,token_ix,token,domain\n0,0,a,x\n0,1,b,x\n")
    with pytest.raises(MoetraceError, match=r"k\.csv: row 2, column weight: expected a finite number .* got nan"):
        import_csv(tmp_path / "s.csv", tmp_path / "k.csv", tmp_path / "b.zarr", progress=False)

    (tmp_path / "npy").mkdir()
    np.save(tmp_path / "npy" / "0.npy", np.zeros((0, 2, 2), np.int64))
    with pytest.raises(MoetraceError, match="no requests with routing found"):
        import_routed(tmp_path / "npy", tmp_path / "c.zarr", format="npy", progress=False)

    st = TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=8, top_k=1)
    with st:
        st.append({"seq": np.zeros(3, int), "pos": np.arange(3), "token_id": np.array([5, 90, 7]),
                   "experts": np.ones((3, 1, 1), int)})
    with pytest.raises(MoetraceError, match="vocab: token id 90 is not below vocab_size 10"):
        count(tmp_path / "t.zarr", stats=["vocab"], vocab_size=10, progress=False)
    with pytest.raises(MoetraceError, match=r"by: unknown label 'domain' in .*t\.zarr"):
        count(tmp_path / "t.zarr", by=["domain"], progress=False)
    assert main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "missing.zarr: no such file or directory" in capsys.readouterr().err

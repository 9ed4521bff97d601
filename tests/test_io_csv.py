"""import-csv (seed 000's samples.csv + topks.csv): contract, properties, errors, memory, DuckDB."""

from __future__ import annotations

import csv
import os
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from io_contract import WEIRD_TOKENS, ImporterContract, RefTrace, assert_store_equals_trace

from moetrace.cli import main
from moetrace.io import import_csv

REPO = Path(__file__).resolve().parents[1]
CHUNK = 64  # small chunks keep tiny stores fast to write
ANSWERS = np.array(["A", "B", "C", "D"])
OUTPUT_TOKENS = np.array([" A", "B ", " C\n", "\tD", "A B"])


def make_csv_trace(rng, n_q=None, L=None, K=None, weights=True, labels=("domain", "lang"), texts=None,
                   sequences=True) -> RefTrace:
    """Random seed-000-like trace in store order (sorted by q_ix, token_ix)."""
    n_q = int(rng.integers(1, 5)) if n_q is None else n_q
    L = int(rng.integers(1, 4)) if L is None else L
    K = int(rng.integers(1, 4)) if K is None else K
    E = int(rng.integers(K, K + 6))
    q_ids = np.sort(rng.choice(np.arange(-3, 1000), n_q, replace=False))
    seq, pos, q_of = [], [], []
    for qi, q in enumerate(q_ids):
        n_t = int(rng.integers(1, 6))
        t = np.sort(rng.choice(60, n_t, replace=False))
        seq.append(np.full(n_t, q))
        pos.append(t)
        q_of.append(np.full(n_t, qi))
    seq, pos, q_of = np.concatenate(seq).astype(np.int64), np.concatenate(pos).astype(np.int32), np.concatenate(q_of)
    N = len(seq)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(N * L)]).reshape(N, L, K).astype(np.int64)
    layer_ids = sorted(rng.choice(L + 3, L, replace=False).tolist())
    pool = list(WEIRD_TOKENS) + (list(texts) if texts else [])
    text = np.array([pool[i] for i in rng.integers(0, len(pool), N)], dtype=object)
    label_values = {}
    for j, name in enumerate(labels):
        vocab = np.array([f"{name}{v}" for v in range(3)] + ([" spaced value "] if j == 0 else []))
        # the first label is per question (like domain), the others vary per token
        if j == 0:
            label_values[name] = vocab[rng.integers(0, len(vocab), n_q)][q_of]
        else:
            label_values[name] = vocab[rng.integers(0, len(vocab), N)]
    seqs = None
    if sequences:
        seqs = {"seq": q_ids.astype(np.int64),
                "answer_char": ANSWERS[rng.integers(0, 4, n_q)],
                "question_output_token": OUTPUT_TOKENS[rng.integers(0, len(OUTPUT_TOKENS), n_q)],
                "correct": rng.random(n_q) < 0.5,
                "n_shots": rng.integers(-2, 6, n_q).astype(np.int64)}
    w = rng.random((N, L, K)).astype(np.float16).astype(np.float32) if weights else None
    return RefTrace(seq=seq, pos=pos, labels=label_values, experts=experts, layer_ids=layer_ids,
                    n_experts=int(experts.max()) + 1, text=text, weights=w, sequences=seqs)


def write_csv_trace(trace: RefTrace, directory: Path, rng, shuffle=True) -> dict:
    """samples.csv / topks.csv of ``trace`` with rows (and sample columns) in random order."""
    directory.mkdir(parents=True, exist_ok=True)
    N, L, K = trace.experts.shape
    q_index = {}
    if trace.sequences:
        q_index = {int(q): i for i, q in enumerate(trace.sequences["seq"])}
    names = ["q_ix", "token_ix", "token", *trace.labels]
    if trace.sequences:
        names += [n for n in trace.sequences if n != "seq"]
    if shuffle:
        names = [names[i] for i in rng.permutation(len(names))]
    rows = []
    for i in range(N):
        row = {"q_ix": int(trace.seq[i]), "token_ix": int(trace.pos[i]), "token": trace.text[i]}
        row.update({n: v[i] for n, v in trace.labels.items()})
        if trace.sequences:
            qi = q_index[int(trace.seq[i])]
            for n, v in trace.sequences.items():
                if n != "seq":
                    row[n] = ("TRUE" if v[qi] else "FALSE") if v.dtype == bool else v[qi]
        rows.append(row)
    order = rng.permutation(N) if shuffle else np.arange(N)
    samples = directory / "samples.csv"
    with open(samples, "w", newline="", encoding="utf-8") as fh:
        # Python's csv module quotes a field only when it holds a character of the line
        # terminator; a bare CR in a token must be quoted to survive, so write CRLF then.
        terminator = "\r\n" if any("\r" in t for t in trace.text) else "\n"
        writer = csv.DictWriter(fh, fieldnames=names, lineterminator=terminator)
        writer.writeheader()
        writer.writerows(rows[i] for i in order)
    topks = directory / "topks.csv"
    cells = [(i, l, k) for i in range(N) for l in range(L) for k in range(K)]
    order = rng.permutation(len(cells)) if shuffle else np.arange(len(cells))
    with open(topks, "w", encoding="utf-8") as fh:
        fh.write("q_ix,token_ix,layer_ix,topk_ix,expert" + (",weight" if trace.weights is not None else "") + "\n")
        for c in order:
            i, l, k = cells[c]
            line = f"{trace.seq[i]},{trace.pos[i]},{trace.layer_ids[l]},{k + 1},{trace.experts[i, l, k]}"
            if trace.weights is not None:
                line += f",{float(trace.weights[i, l, k])!r}"
            fh.write(line + "\n")
    return {"samples": samples, "topks": topks, "extra": []}


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


class TestCsvImporter(ImporterContract):
    command = "import-csv"
    broken_shape = {"n_q": 3, "L": 2, "K": 2, "weights": False}
    shuffle_shape = {"n_q": 4, "L": 2, "K": 2}

    def make_trace(self, rng, **shape):
        return make_csv_trace(rng, **shape)

    def write_source(self, trace, directory, rng, shuffle=True):
        return write_csv_trace(trace, directory, rng, shuffle=shuffle)

    def run_import(self, source, out, **kwargs):
        return import_csv(source["samples"], source["topks"], out, **kwargs)

    def cli_args(self, source, out):
        return ["--samples", str(source["samples"]), "--topks", str(source["topks"]), str(out),
                "--chunk-rows", str(CHUNK), *source["extra"]]

    def broken_sources(self, trace, directory, rng):
        base = write_csv_trace(trace, directory / "base", rng, shuffle=False)
        topk_lines = _lines(base["topks"])

        def variant(name, samples=None, topks=None, extra=()):
            d = directory / name
            d.mkdir(parents=True)
            s, t = d / "samples.csv", d / "topks.csv"
            s.write_text(base["samples"].read_text(encoding="utf-8") if samples is None else samples, encoding="utf-8")
            t.write_text("".join(topk_lines) if topks is None else topks, encoding="utf-8")
            return {"samples": s, "topks": t, "extra": list(extra)}

        cut = "".join(topk_lines[:3]) + topk_lines[3][:3]
        yield "truncated", variant("truncated", topks=cut), ["topks.csv", "row 4", "columns"]
        bad = topk_lines[:5] + [topk_lines[5].rsplit(",", 1)[0] + ",x1\n"] + topk_lines[6:]
        yield "non-integer", variant("nonint", topks="".join(bad)), ["topks.csv", "row 6", "column expert", "x1"]
        parts = topk_lines[2].rstrip("\n").split(",")
        parts[4] = parts[4] + ".5"
        floaty = topk_lines[:2] + [",".join(parts) + "\n"] + topk_lines[3:]
        yield "float expert", variant("float", topks="".join(floaty)), ["topks.csv", "row 3", "column expert"]
        no_expert = "".join(",".join(x.rstrip("\n").split(",")[:4]) + "\n" for x in topk_lines)
        yield "missing column", variant("nocol", topks=no_expert), ["topks.csv", "missing column", "expert"]
        yield "duplicate", variant("dup", topks="".join(topk_lines + topk_lines[1:2])), ["topks.csv", "duplicate key"]
        yield "missing cell", variant("miss", topks="".join(topk_lines[:-1])), ["topks.csv", "missing row for q_ix="]
        yield "empty samples", variant("empty", samples=""), ["samples.csv", "empty file"]
        yield "header only", variant("header", topks=topk_lines[0]), ["topks.csv", "no data rows"]
        yield "n_experts", variant("nexp", extra=["--n-experts", "1"]), ["topks.csv", "column expert"]
        orphan = topk_lines + [f"{int(trace.seq.max()) + 1},0,{trace.layer_ids[0]},1,0"
                               + (",0.5" if trace.weights is not None else "") + "\n"]
        yield "orphan", variant("orphan", topks="".join(orphan)), ["topks.csv", "has no row in"]
        sample_lines = _lines(base["samples"])
        yield "duplicate token", variant("duptok", samples="".join(sample_lines + sample_lines[1:2])), \
            ["samples.csv", "duplicate token"]
        yield "bad label flag", variant("badlabel", extra=["--labels", "nope"]), ["samples.csv", "nope"]


# ---------------------------------------------------------------------- properties
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n_q=st.integers(1, 4), L=st.integers(1, 3), K=st.integers(1, 3),
       weights=st.booleans(), n_labels=st.integers(0, 3),
       texts=st.lists(st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=4), max_size=4))
def test_random_traces_import_exactly(seed, n_q, L, K, weights, n_labels, texts):
    rng = np.random.default_rng(seed)
    labels = ("domain", "lang", "subject")[:n_labels]
    trace = make_csv_trace(rng, n_q=n_q, L=L, K=K, weights=weights, labels=labels, texts=texts)
    with tempfile.TemporaryDirectory() as tmp:
        source = write_csv_trace(trace, Path(tmp) / "src", rng)
        store = import_csv(source["samples"], source["topks"], Path(tmp) / "out.zarr", labels=list(labels),
                           progress=False, memory_budget=1, chunk_rows=CHUNK)
        assert_store_equals_trace(store, trace)


def test_partitioning_does_not_change_the_store(tmp_path, monkeypatch):
    """1 partition (large budget) and many (tiny budget) give the same store."""
    rng = np.random.default_rng(7)
    trace = make_csv_trace(rng, n_q=40, L=2, K=2)
    source = write_csv_trace(trace, tmp_path / "src", rng)
    big = import_csv(source["samples"], source["topks"], tmp_path / "big.zarr", progress=False, chunk_rows=CHUNK)
    monkeypatch.setattr("moetrace.io.csv_import.MEMORY_PER_CSV_BYTE", 1 << 20)  # MAX_PARTITIONS partitions
    small = import_csv(source["samples"], source["topks"], tmp_path / "small.zarr", progress=False,
                       memory_budget=1, chunk_rows=CHUNK)
    assert_store_equals_trace(big, trace)
    assert_store_equals_trace(small, trace)


# ---------------------------------------------------------------------- exact formats
def test_whitespace_and_quoting_survive(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_bytes(
        b'q_ix,token_ix,token,domain\n'
        b'0,0, lead,bio\n'
        b'0,1,trail ,bio\n'
        b'0,2," ",bio\n'
        b'0,3,"\n",bio\n'
        b'0,4,,bio\n'
        b'0,5,"a ""q"", b",bio\n'
        b'0,6,"\r\n",bio\n'
        b'0,7,NA,bio\n')
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n" + "".join(f"0,{t},5,1,{t}\n" for t in range(8)))
    store = import_csv(samples, topks, tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    assert store.read(["text"])["text"].tolist() == [" lead", "trail ", " ", "\n", "", 'a "q", b', "\r\n", "NA"]
    assert store.layer_ids.tolist() == [5] and store.n_experts == 8 and store.top_k == 1


def test_sequence_columns_are_typed_and_labels_configurable(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_text("q_ix,token_ix,token,domain,lang,answer_char,correct,score,note\n"
                       "1,0,a,bio,en,A,TRUE,0.5,x\n1,1,b,bio,de,A,TRUE,0.5,x\n"
                       "0,0,c,law,en,B,FALSE,2,\n")
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n1,0,0,1,1\n1,1,0,1,2\n0,0,0,1,0\n")
    store = import_csv(samples, topks, tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    assert store.label_names == ["domain", "lang"]
    seqs = store.read_sequences()
    assert seqs["seq"].tolist() == [0, 1]
    assert seqs["answer_char"].tolist() == ["B", "A"]
    assert seqs["correct"].dtype == bool and seqs["correct"].tolist() == [False, True]
    assert seqs["score"].dtype == np.float64 and seqs["score"].tolist() == [2.0, 0.5]
    assert seqs["note"].tolist() == ["", "x"]
    # lang varies within q_ix 1: as a per-question column it is an error naming it
    code = main(["import-csv", "--samples", str(samples), "--topks", str(topks), str(tmp_path / "p.zarr"),
                 "--labels", "domain", "-q", "--chunk-rows", "64"])
    assert code == 2
    only_domain = import_csv(samples, topks, tmp_path / "q.zarr", labels=["domain", "lang", "note"], progress=False,
                             chunk_rows=CHUNK)
    assert only_domain.label_names == ["domain", "lang", "note"]


def test_row_numbers_in_errors_are_line_numbers(tmp_path, capsys):
    samples = tmp_path / "samples.csv"
    samples.write_text("q_ix,token_ix,token\n0,0,a\n0,1,b\n")
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,3\n0,1,0,1,seven\n")
    args = ["import-csv", "--samples", str(samples), "--topks", str(topks), str(tmp_path / "o.zarr"), "-q",
            "--chunk-rows", "64"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"{topks}: row 3, column expert: expected an integer, got 'seven'"), err
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,3\n0,1,0,1,\n")
    assert main(args) == 2
    assert "row 3, column expert: empty value" in capsys.readouterr().err
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,3\n0,1,0,0,2\n")
    assert main(args) == 2
    assert "row 3, column topk_ix: expected a 1-based rank in [1," in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()


def test_subprocess_cli_reports_one_line_and_exit_2(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_text("q_ix,token_ix,token\n0,0,a\n")
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,3\n0,0,0\n")
    proc = subprocess.run([sys.executable, "-m", "moetrace.cli", "import-csv", "--samples", str(samples),
                           "--topks", str(topks), str(tmp_path / "o.zarr"), "-q", "--chunk-rows", "64"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "topks.csv: row 3: expected 5 columns, got 3" in lines[0], proc.stderr
    assert not (tmp_path / "o.zarr").exists()
    assert not list(tmp_path.glob("o.zarr*"))


# ---------------------------------------------------------------------- DuckDB reference
def test_counts_match_duckdb_reading_the_csv(tmp_path):
    rng = np.random.default_rng(11)
    trace = make_csv_trace(rng, n_q=30, L=3, K=2, texts=["x"])
    source = write_csv_trace(trace, tmp_path / "src", rng)
    store = import_csv(source["samples"], source["topks"], tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    t = source["topks"]
    con = duckdb.connect()
    want = con.sql(f"SELECT layer_ix, expert, count(*) FROM read_csv('{t}', header=true) GROUP BY ALL").fetchall()
    experts = store.read(["experts"])["experts"]
    got = {}
    for l, layer in enumerate(store.layer_ids.tolist()):
        ids, counts = np.unique(experts[:, l, :], return_counts=True)
        got.update({(layer, int(e)): int(c) for e, c in zip(ids, counts)})
    assert got == {(a, b): c for a, b, c in want}
    s = source["samples"]
    want = dict(con.sql(f"SELECT domain, count(*) FROM read_csv('{s}', header=true, all_varchar=true, quote='\"', "
                        f"escape='\"', strict_mode=true) GROUP BY ALL").fetchall())
    domain = store.decode_label("domain", store.read(["domain"])["domain"])
    values, counts = np.unique(domain.astype(str), return_counts=True)
    assert dict(zip(values.tolist(), counts.tolist())) == want
    # every CSV routing row appears in the store, joined on its full key
    from moetrace.io import export_parquet

    export_parquet(store, tmp_path / "o.parquet", progress=False)
    joined = con.sql(f"SELECT count(*) FROM read_csv('{t}', header=true) c JOIN '{tmp_path / 'o.parquet'}' p "
                     "ON p.seq = c.q_ix AND p.pos = c.token_ix AND p.layer = c.layer_ix AND p.rank = c.topk_ix - 1 "
                     "AND p.expert = c.expert").fetchall()[0][0]
    assert joined == trace.experts.size


# ---------------------------------------------------------------------- memory bound
MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import numpy as np, pyarrow as pa, pyarrow.csv as pacsv
    from moetrace.io import import_csv
    samples, topks, warm_s, warm_t, out, budget = sys.argv[1:7]
    import_csv(warm_s, warm_t, out + ".warm", progress=False, memory_budget=int(budget), chunk_rows=4096)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    store = import_csv(samples, topks, out, progress=False, memory_budget=int(budget), chunk_rows=4096)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": len(store), "delta_bytes": (after - before) * 1024}))
""")


def _big_csv(directory: Path, n_q: int, n_t: int, L: int, K: int, seed: int = 0) -> tuple[Path, Path]:
    """A large shuffled topks.csv written with pyarrow (fast), plus its samples.csv."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    q = np.repeat(np.arange(n_q), n_t)
    t = np.tile(np.arange(n_t), n_q)
    pacsv.write_csv(pa.table({"q_ix": q, "token_ix": t, "token": np.array([" tok"] * len(q)),
                              "domain": np.array(["bio", "law"])[q % 2]}), directory / "samples.csv")
    N = len(q)
    order = rng.permutation(N * L * K)
    tok, rest = np.divmod(order, L * K)
    layer, rank = np.divmod(rest, K)
    pacsv.write_csv(pa.table({"q_ix": q[tok], "token_ix": t[tok], "layer_ix": layer, "topk_ix": rank + 1,
                              "expert": (tok * 7 + layer * 3 + rank) % 64}), directory / "topks.csv")  # K distinct
    return directory / "samples.csv", directory / "topks.csv"


def _peak_delta(tmp_path: Path, n_q: int, n_t: int, budget: int) -> tuple[int, int, int]:
    samples, topks = _big_csv(tmp_path / "big", n_q, n_t, L=16, K=8)
    warm_s, warm_t = _big_csv(tmp_path / "warm", 4, 50, L=16, K=8)
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(samples), str(topks), str(warm_s), str(warm_t),
                           str(tmp_path / "o.zarr"), str(budget)], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == n_q * n_t
    return result["delta_bytes"], topks.stat().st_size, result["rows"]


def test_memory_stays_bounded_small(tmp_path):
    """A ~35 MB topks.csv imported with a 2 MiB budget grows peak RSS by < 1/4 of the file.

    (Measured: ~0 MB; the same import in one partition, i.e. without the bound, grows it
    by ~23 MB, so this fails for an importer that holds the file in memory.)
    """
    delta, size, _ = _peak_delta(tmp_path, n_q=40, n_t=500, budget=2 << 20)
    assert size > 30e6
    assert delta < size / 4, (delta, size)


@pytest.mark.slow
def test_memory_stays_bounded_large(tmp_path):
    """A ~200 MB topks.csv with a 16 MiB budget: peak RSS grows by well under the file size."""
    delta, size, _ = _peak_delta(tmp_path, n_q=200, n_t=800, budget=16 << 20)
    assert size > 150e6
    assert delta < 64 << 20, (delta, size)


def test_token_id_and_generated_columns_become_token_columns(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_text("q_ix,token_ix,token,token_id,generated\n0,1,b,17,TRUE\n0,0,a,-1,false\n")
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n0,1,0,1,0\n")
    store = import_csv(samples, topks, tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    data = store.read(["token_id", "generated", "text"])
    assert data["token_id"].tolist() == [-1, 17]
    assert data["generated"].tolist() == [False, True]
    assert store.label_names == [] and store.read_sequences() == {}


def test_crlf_line_endings(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_bytes(b'q_ix,token_ix,token\r\n0,0,a \r\n0,1," b"\r\n0,2,"\r\n"\r\n')
    topks = tmp_path / "topks.csv"
    topks.write_bytes(b"q_ix,token_ix,layer_ix,topk_ix,expert\r\n0,0,0,1,1\r\n0,1,0,1,0\r\n0,2,0,1,2\r\n")
    store = import_csv(samples, topks, tmp_path / "o.zarr", progress=False, chunk_rows=CHUNK)
    assert store.read(["text"])["text"].tolist() == ["a ", " b", "\r\n"]
    assert store.read(["experts"])["experts"][:, 0, 0].tolist() == [1, 0, 2]


# ---------------------------------------------------------------------- values that do not fit, bad bytes
def _cli_error(tmp_path, capsys, samples: bytes, topks: bytes, *extra) -> str:
    """Run import-csv on the given bytes; assert exit 2, one line, nothing left; return the line."""
    (tmp_path / "samples.csv").write_bytes(samples)
    (tmp_path / "topks.csv").write_bytes(topks)
    out = tmp_path / "o.zarr"
    code = main(["import-csv", "--samples", str(tmp_path / "samples.csv"), "--topks", str(tmp_path / "topks.csv"),
                 str(out), "-q", "--chunk-rows", "64", *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moetrace import-csv: error: "), err
    assert not list(tmp_path.glob("o.zarr*")) and not list(tmp_path.glob(".o.zarr*"))
    return lines[0]


TOPK1 = b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n0,1,0,1,0\n"


@pytest.mark.parametrize("samples, topks, fragments", [
    (b"q_ix,token_ix,token,token_id\n0,0,a,5\n0,1,b,3000000000\n", TOPK1,
     ["samples.csv: row 3, column token_id", "3000000000"]),
    (b"q_ix,token_ix,token,token_id\n0,0,a,-2\n0,1,b,1\n", TOPK1, ["row 2, column token_id", "-1 = unknown"]),
    (b"q_ix,token_ix,token\n9223372036854775808,0,a\n", TOPK1, ["row 2, column q_ix", "9223372036854775808"]),
    (b"q_ix,token_ix,token\n0,2147483648,a\n", TOPK1, ["row 2, column token_ix", "int32"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,b\n", b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,2147483648,1,1\n",
     ["topks.csv: row 2, column layer_ix"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,b\n", b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,65536\n",
     ["topks.csv: row 2, column expert"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,b\n",
     b"q_ix,token_ix,layer_ix,topk_ix,expert,weight\n0,0,0,1,1,0.5\n0,1,0,1,0,1e6\n",
     ["topks.csv: row 3, column weight", "float16"]),
    (b"q_ix,token_ix,tok\xffen\n0,0,a\n", TOPK1, ["samples.csv: row 1", "UTF-8"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,caf\xe9\n", TOPK1, ["samples.csv: row 3, column token", "UTF-8"]),
    ("q_ix,token_ix,token\n0,0,a\n".encode("utf-16"), TOPK1, ["samples.csv", "UTF-16", "UTF-8"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,\xe6x,extra\n", TOPK1, ["samples.csv: row 3: expected 3 columns, got 4"]),
    (b"q_ix,token_ix,token\n0,0,a\n0,1,b\n", b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,0\n0,0,0,2,0\n"
     b"0,1,0,1,0\n0,1,0,2,0\n", ["topks.csv: top-k 2 exceeds the number of experts 1"]),
])
def test_values_that_do_not_fit_and_bad_bytes_are_one_line_errors(tmp_path, capsys, samples, topks, fragments):
    line = _cli_error(tmp_path, capsys, samples, topks)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_a_field_over_one_mib_imports_and_a_too_long_record_names_its_row(tmp_path, capsys):
    big = "x" * (5 << 20) + " \n y"
    samples = f'q_ix,token_ix,token\n0,0,a\n0,1,"{big}"\n0,2,c\n'.encode()
    topks = b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n0,1,0,1,0\n0,2,0,1,2\n"
    (tmp_path / "samples.csv").write_bytes(samples)
    (tmp_path / "topks.csv").write_bytes(topks)
    store = import_csv(tmp_path / "samples.csv", tmp_path / "topks.csv", tmp_path / "ok.zarr", progress=False)
    assert store.read(["text"])["text"].tolist() == ["a", big, "c"]
    line = _cli_error(tmp_path, capsys, samples, topks, "--max-row-mib", "1")
    assert "samples.csv: row 3: a CSV record longer than 1 MiB" in line and "--max-row-mib" in line, line
    # an unclosed quote swallows the rest of the file: named, not a traceback
    line = _cli_error(tmp_path, capsys, b'q_ix,token_ix,token\n0,0,"a\n' + b"0,1,b\n" * 400000, TOPK1,
                      "--max-row-mib", "1")
    assert "samples.csv: row 2: a CSV record longer than 1 MiB" in line, line


def test_per_question_integers_beyond_int64_stay_exact(tmp_path):
    samples = tmp_path / "samples.csv"
    samples.write_text("q_ix,token_ix,token,big,small\n0,0,a,123456789012345678901,1.5\n1,0,b,7,2\n")
    topks = tmp_path / "topks.csv"
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n1,0,0,1,0\n")
    seqs = import_csv(samples, topks, tmp_path / "o.zarr", progress=False).read_sequences()
    assert seqs["big"].tolist() == ["123456789012345678901", "7"]
    assert seqs["small"].dtype == np.float64 and seqs["small"].tolist() == [1.5, 2.0]


def test_progress_counts_the_bytes_read(tmp_path, monkeypatch):
    """The scan's bar ends at the file's size (it used to add 1 MiB per block: 1.05 MB of a 5 kB file)."""
    import moetrace.io.csv_import as csv_import

    seen = []

    class Recording(csv_import.tqdm("", disable=True).__class__):
        def close(self):
            seen.append((self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr(csv_import, "tqdm", lambda *a, **k: Recording(*a, **{**k, "disable": False},
                                                                      file=open(os.devnull, "w")))
    rng = np.random.default_rng(3)
    trace = make_csv_trace(rng, n_q=4, L=2, K=2)
    source = write_csv_trace(trace, tmp_path / "src", rng)
    import_csv(source["samples"], source["topks"], tmp_path / "o.zarr", chunk_rows=CHUNK)
    sizes = {"scan samples.csv": source["samples"].stat().st_size, "samples.csv": source["samples"].stat().st_size,
             "topks.csv": source["topks"].stat().st_size}
    got = {desc: (n, total) for desc, n, total in seen if desc in sizes}
    assert got == {desc: (size, size) for desc, size in sizes.items()}


def test_output_directories_are_created_and_removed_again_on_failure(tmp_path, capsys):
    samples, topks = tmp_path / "samples.csv", tmp_path / "topks.csv"
    samples.write_text("q_ix,token_ix,token\n0,0,a\n")
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n")
    args = ["import-csv", "--samples", str(samples), "--topks", str(topks), "-q"]
    assert main([*args, str(tmp_path / "new" / "dir" / "o.zarr")]) == 0
    topks.write_text("q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,x\n")
    assert main([*args, str(tmp_path / "other" / "dir" / "o.zarr")]) == 2
    assert not (tmp_path / "other").exists()
    assert main([*args, str(topks), "--overwrite"]) == 2  # would replace an input
    assert "the output is also an input" in capsys.readouterr().err
    assert topks.is_file()


@pytest.mark.parametrize("header, row, labels, fragment", [
    ("q_ix,token_ix,token,domain", "0,0,a,bio", "q_ix", "labels: 'q_ix' is a token column"),
    ("q_ix,token_ix,token,token_id", "0,0,a,3", "token_id", "labels: 'token_id' is a token column"),
    ("q_ix,token_ix,token,seq", "0,0,a,x", None, "row 1, column seq: a per-question column named 'seq'"),
])
def test_columns_that_cannot_be_labels_or_sequence_columns(tmp_path, capsys, header, row, labels, fragment):
    line = _cli_error(tmp_path, capsys, f"{header}\n{row}\n".encode(),
                      b"q_ix,token_ix,layer_ix,topk_ix,expert\n0,0,0,1,1\n", *(["--labels", labels] if labels else []))
    assert fragment in line, line


@pytest.mark.parametrize("block", [40, 97, 1 << 20])
def test_topks_parsed_in_parallel_blocks_import_the_same_and_errors_keep_their_row(tmp_path, monkeypatch, capsys,
                                                                                  block):
    """topks.csv is cut at line ends into blocks parsed on every core (40 and 97 bytes: a few rows per
    block, cut mid-record and at CRLF ends); the store equals the trace, and a bad value in a late
    block names its line as the serial reader does."""
    import moetrace.io.csv_import as csv_import

    monkeypatch.setattr(csv_import, "PARALLEL_BLOCK", block)
    rng = np.random.default_rng(11)
    trace = make_csv_trace(rng, n_q=5, L=2, K=3)
    source = write_csv_trace(trace, tmp_path / "src", rng)
    assert_store_equals_trace(import_csv(source["samples"], source["topks"], tmp_path / "o.zarr", chunk_rows=CHUNK,
                                         progress=False), trace)
    lines = source["topks"].read_text().splitlines()
    header = lines[0].split(",")
    bad = len(lines) - 3  # a late record; its line number (the header is line 1)
    fields = lines[bad].split(",")
    fields[header.index("expert")] = "seven"
    lines[bad] = ",".join(fields)
    source["topks"].write_text("\r\n".join(lines) + "\r\n")
    args = ["import-csv", "--samples", str(source["samples"]), "--topks", str(source["topks"]),
            str(tmp_path / "bad.zarr"), "-q", "--chunk-rows", str(CHUNK)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip().endswith(
        f"{source['topks']}: row {bad + 1}, column expert: expected an integer, got 'seven'")


def test_files_in_store_order_stream_without_partitions_and_learn_n_experts_at_the_end(tmp_path, monkeypatch):
    """Sorted files (as seed 000 writes them) take the streaming path: no partition files, no sort.
    The store starts with 256 experts (uint8 ids) and ends with the largest id + 1, or the given
    count; an id beyond 255 after the first batch sends the import to the partitioned path, which
    stores uint16 ids."""
    import moetrace.io.csv_import as csv_import

    rng = np.random.default_rng(12)
    trace = make_csv_trace(rng, n_q=4, L=2, K=2)
    source = write_csv_trace(trace, tmp_path / "src", rng, shuffle=False)

    def refuse(*args, **kwargs):
        raise AssertionError("sorted files went through the partitioned import")

    with monkeypatch.context() as patch:
        patch.setattr(csv_import, "_import_partitioned", refuse)
        store = import_csv(source["samples"], source["topks"], tmp_path / "a.zarr", chunk_rows=CHUNK, progress=False)
        assert_store_equals_trace(store, trace)
        assert store.n_experts == int(trace.experts.max()) + 1
        given = import_csv(source["samples"], source["topks"], tmp_path / "b.zarr", chunk_rows=CHUNK,
                           n_experts=200, progress=False)
        assert given.n_experts == 200
    # a large id in the last token: the streaming path created uint8 ids and gives way
    lines = source["topks"].read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[-1].split(",")
    fields[header.index("expert")] = "300"
    lines[-1] = ",".join(fields)
    source["topks"].write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(csv_import, "PARALLEL_BLOCK", 64)  # several batches: the first has small ids only
    store = import_csv(source["samples"], source["topks"], tmp_path / "c.zarr", chunk_rows=CHUNK, progress=False)
    assert store.n_experts == 301 and store.read(["experts"], 0, len(store))["experts"].dtype == np.uint16
    assert int(store.read(["experts"], len(store) - 1, len(store))["experts"][0, -1, -1]) == 300

"""Counting an archive of stores: in-process vs a LocalCluster of 1 and 2 workers vs DuckDB over Parquet.

Two steps, so that the timed one can run later on a quiet machine:

    .venv/bin/python bench/bench_archive.py --build DIR [--stores 4] [--rows 2e9] [--jobs 2]
    .venv/bin/python bench/bench_archive.py --time DIR [--repeats 1] [--range-rows R]
                                            [--providers in-process,cluster-1,cluster-2,duckdb]
                                            [--queries experts,experts+paths+temporal]

``--build`` writes ``--stores`` stores ``DIR/part<i>/trace.zarr`` holding together at least
``--rows`` routing rows (engine/synthetic.py's trace: 16 layers x top-8 of 64 experts, so a
token is 128 routing rows; store i holds rows [i T, (i+1) T) of one trace, T a whole number of
512-token sequences, so sequence ids are unique across the archive), and the same rows as
long-format Parquet ``DIR/part<i>/trace.parquet`` (one row per token x layer x rank: seq, pos,
token_id, layer, rank, expert, domain, lang; zstd; domain and lang dictionary-encoded). It
streams: blocks of ``--batch-tokens`` tokens are generated, appended to the store and written
as one Parquet row group, so memory stays at one block's (~560 MiB per job) whatever ``--rows``.
A part is marked done by ``DIR/part<i>/done.json`` and skipped on a rerun (an unfinished part
is rebuilt), so an interrupted build continues. ``--jobs`` parts are built at once.

``--time`` counts the archive side by side in one run (each provider in its own child
process, so its peak RSS is its own; the machine's load average is printed before and after:
on a shared machine compare the ratios, not the times):

- ``in-process``: ``count(ARCHIVE, ...)`` with ``NUMBA_NUM_THREADS=2``;
- ``cluster-1`` / ``cluster-2``: ``count(ARCHIVE, ..., client=...)`` on a LocalCluster of
  1 / 2 worker processes (1 thread, ``NUMBA_NUM_THREADS=1`` each), loopback. Peak RSS of
  the child (client and scheduler share it: LocalCluster runs its scheduler in the client's
  process) and of each worker (``client.run``). Scheduler cost per task: wall time of
  ``client.map`` over 2,000 no-op tasks / 2,000;
- ``duckdb``: SQL over the Parquet files (2 threads, ``memory_limit`` 8 GB, spilling under
  DIR): ``experts`` is ``SELECT domain, lang, layer, expert, count(*) ... GROUP BY ALL``;
  ``paths`` and ``temporal`` are rank-0 rows paired with ``lag`` over (seq, pos) by layer and
  over (seq, layer) by pos.

Each provider first counts one chunk (Numba loads its cache; on a cluster in every worker),
then the whole archive ``--repeats`` times (best time kept). Queries are grouped by
(domain, lang); ``experts+paths+temporal`` is one call. Every provider's counts must equal
the in-process ones (fingerprints: sum and sum of squares of each variable; DuckDB's of the
variables it computes); the table says so per row. Prints a markdown table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ only: the repository root on the path would make `kernels` ours, not HF's

from bench_counting import fingerprint, peak_rss  # noqa: E402

BY = ["domain", "lang"]
QUERIES = {"experts": ["experts"], "experts+paths+temporal": ["experts", "paths", "temporal"]}
PROVIDERS = ["in-process", "cluster-1", "cluster-2", "duckdb"]
SEQ_LEN = 512
LAYERS, TOP_K, EXPERTS = 16, 8, 64


# ---------------------------------------------------------------------------- build


def layout(stores: int, rows: float) -> dict:
    """Tokens per store (whole sequences) so that the archive holds at least ``rows`` routing rows."""
    per_token = LAYERS * TOP_K
    tokens = math.ceil(math.ceil(float(rows) / per_token) / stores / SEQ_LEN) * SEQ_LEN
    return {"stores": stores, "tokens_per_store": tokens, "layers": LAYERS, "top_k": TOP_K, "experts": EXPERTS,
            "seq_len": SEQ_LEN, "routing_rows": stores * tokens * per_token}


def build_part(part: Path, spec_tokens: int, start: int, n_tokens: int, batch_tokens: int) -> str:
    """Store + Parquet of rows [start, start + n_tokens) of the archive's trace (one block at a time)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moetrace.store import TraceStore
    from moetrace.synthetic import DOMAINS, LANGS, TraceSpec, generate_chunk, group_preferences

    done = part / "done.json"
    want = {"start": start, "tokens": n_tokens}
    if done.exists() and json.loads(done.read_text()) == want:
        return f"{part}: already built"
    part.mkdir(parents=True, exist_ok=True)
    done.unlink(missing_ok=True)
    spec = TraceSpec(n_tokens=spec_tokens, n_layers=LAYERS, n_experts=EXPERTS, top_k=TOP_K, seq_len=SEQ_LEN)
    prefs = group_preferences(spec)
    L, K = LAYERS, TOP_K
    lk = L * K
    labels = {"domain": list(DOMAINS), "lang": list(LANGS)}
    dict_type = pa.dictionary(pa.int8(), pa.string())
    schema = pa.schema([("seq", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("layer", pa.int16()),
                        ("rank", pa.int16()), ("expert", pa.int16()), ("domain", dict_type), ("lang", dict_type)])
    vocab = {k: pa.array(v, pa.string()) for k, v in labels.items()}
    layer = np.tile(np.repeat(np.arange(L, dtype=np.int16), K), batch_tokens)
    rank = np.tile(np.arange(K, dtype=np.int16), batch_tokens * L)
    store = TraceStore.create(part / "trace.zarr", n_layers=L, n_experts=EXPERTS, top_k=K, labels=labels,
                              model="synthetic", scoring="softmax", overwrite=True)
    with store, pq.ParquetWriter(part / "trace.parquet", schema, compression="zstd") as writer:
        for a in range(start, start + n_tokens, batch_tokens):
            b = min(start + n_tokens, a + batch_tokens)
            batch = generate_chunk(spec, a, b, prefs)
            batch.pop("weights")
            store.append(batch)
            n = b - a
            cols = {"seq": np.repeat(batch["seq"], lk), "pos": np.repeat(batch["pos"], lk),
                    "token_id": np.repeat(batch["token_id"], lk), "layer": layer[: n * lk], "rank": rank[: n * lk],
                    "expert": batch["experts"].reshape(-1).astype(np.int16)}
            for name, values in labels.items():
                codes = {v: i for i, v in enumerate(values)}
                per_token = np.array([codes[v] for v in batch[name][:: SEQ_LEN]], dtype=np.int8)
                # a label is constant over a sequence; blocks start on a sequence boundary
                code = np.repeat(np.repeat(per_token, SEQ_LEN)[:n], lk)
                cols[name] = pa.DictionaryArray.from_arrays(pa.array(code, pa.int8()), vocab[name])
            writer.write_table(pa.table(cols, schema=schema), row_group_size=n * lk)
            del batch, cols
    done.write_text(json.dumps(want))
    return f"{part}: built {n_tokens:,} tokens"


def build(data: Path, stores: int, rows: float, jobs: int, batch_tokens: int) -> dict:
    if batch_tokens % SEQ_LEN:
        raise SystemExit(f"--batch-tokens: expected a multiple of {SEQ_LEN}, got {batch_tokens}")
    meta = layout(stores, rows)
    data.mkdir(parents=True, exist_ok=True)
    old = data / "archive.json"
    if old.exists() and json.loads(old.read_text()) != meta:
        raise SystemExit(f"{data}: holds another archive ({old.read_text()}); use another directory")
    old.write_text(json.dumps(meta))
    T, total = meta["tokens_per_store"], meta["tokens_per_store"] * stores
    t = time.perf_counter()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(build_part, data / f"part{i}", total, i * T, T, batch_tokens) for i in range(stores)]
        for f in futures:
            print(f.result(), f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
    return meta


# ---------------------------------------------------------------------------- timed providers (children)


def archive_of(data: Path) -> str:
    return str(data / "part*" / "trace.zarr")


def _fp(ds) -> dict:
    import numpy as np

    out = {}
    for v in ds.data_vars:
        values = ds[v].sum("rank") if v == "experts" else ds[v]
        out[v] = fingerprint(np.asarray(values.values))
    return out


def _warm(path: str, stats) -> int:
    """Count one chunk of one store (Numba loads or compiles its kernels in this process)."""
    from moetrace.counting import count_range
    from moetrace.store import TraceStore

    st = TraceStore.open(path)
    count_range(st, 0, min(len(st), st.chunk_rows), stats=stats, by=BY, progress=False)
    return 0


def _timed(fn, repeats: int):
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = fn()
        best = min(best, time.perf_counter() - t)
    return best, res


def child_in_process(data: Path, query: str, repeats: int, range_rows) -> dict:
    from moetrace.counting import count
    from moetrace.counting.archive import stores_of

    stats = QUERIES[query]
    _warm(stores_of(archive_of(data))[0], stats)
    seconds, ds = _timed(lambda: count(archive_of(data), stats=stats, by=BY, progress=False,
                                       range_rows=range_rows), repeats)
    return {"seconds": seconds, "fp": _fp(ds), "rss": {"process": peak_rss()}}


def child_cluster(data: Path, query: str, repeats: int, range_rows, n_workers: int) -> dict:
    from distributed import Client, LocalCluster

    from moetrace.counting import count
    from moetrace.counting.archive import plan, stores_of
    from moetrace.store import TraceStore

    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    stats = QUERIES[query]
    paths = stores_of(archive_of(data))
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(_warm, paths[0], stats)
        seconds, ds = _timed(lambda: count(archive_of(data), stats=stats, by=BY, progress=False, client=client,
                                           range_rows=range_rows), repeats)
        t = time.perf_counter()
        client.gather(client.map(_noop, range(2000), pure=False))
        task_ms = (time.perf_counter() - t) / 2000 * 1e3
        workers = sorted(client.run(peak_rss).values())
    ranges = len(plan([TraceStore.open(p) for p in paths], range_rows))
    return {"seconds": seconds, "fp": _fp(ds), "task_ms": task_ms, "ranges": ranges,
            "rss": {"client+scheduler": peak_rss(), **{f"worker{i}": r for i, r in enumerate(workers)}}}


def _noop(x):
    return x


def duckdb_sql(data: Path, query: str) -> dict[str, str]:
    src = f"read_parquet('{data}/part*/trace.parquet')"
    out = {"experts": f"SELECT domain, lang, layer, expert, count(*) AS n FROM {src} GROUP BY ALL"}
    if query != "experts":
        top1 = f"(SELECT seq, pos, layer, expert, domain, lang FROM {src} WHERE rank = 0)"
        out["paths"] = (
            "SELECT domain, lang, layer, prev, expert, count(*) AS n FROM ("
            "SELECT domain, lang, layer, expert, lag(expert) OVER (PARTITION BY seq, pos ORDER BY layer) AS prev "
            f"FROM {top1}) WHERE prev IS NOT NULL GROUP BY ALL")
        out["temporal"] = (
            "SELECT domain, lang, layer, expert, nxt, count(*) AS n FROM ("
            "SELECT domain, lang, layer, expert, lead(expert) OVER w AS nxt, lead(pos) OVER w AS npos, pos "
            f"FROM {top1} WINDOW w AS (PARTITION BY seq, layer ORDER BY pos)) "
            "WHERE npos = pos + 1 GROUP BY ALL")
    return out


def child_duckdb(data: Path, query: str, repeats: int) -> dict:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    con.execute("SET memory_limit = '8GB'")
    spill = data / "duckdb.tmp"
    con.execute(f"SET temp_directory = '{spill}'")
    con.execute("SET preserve_insertion_order = false")
    sql = duckdb_sql(data, query)
    seconds, res = _timed(lambda: {k: con.execute(q).fetchnumpy() for k, q in sql.items()}, repeats)
    return {"seconds": seconds, "fp": {k: fingerprint(r["n"]) for k, r in res.items()}, "rss": {"process": peak_rss()}}


def run_child(args, provider: str, query: str) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2")
    cmd = [sys.executable, __file__, "--child", provider, "--query", query, "--time", args.time,
           "--repeats", str(args.repeats)] + (["--range-rows", str(args.range_rows)] if args.range_rows else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{provider} {query} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _child(args) -> dict:
    data = Path(args.time)
    if args.child == "in-process":
        return child_in_process(data, args.query, args.repeats, args.range_rows)
    if args.child == "duckdb":
        return child_duckdb(data, args.query, args.repeats)
    return child_cluster(data, args.query, args.repeats, args.range_rows, int(args.child.split("-")[1]))


# ---------------------------------------------------------------------------- report


def _mib(rss: dict) -> str:
    return ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items())


def table(data: Path, meta: dict, results: dict, load: tuple, argv: str) -> str:
    rows = meta["routing_rows"]
    lines = [f"Command: `{argv}`", "",
             f"Archive: {meta['stores']} stores x {meta['tokens_per_store']:,} tokens x {meta['layers']} layers x "
             f"top-{meta['top_k']} = {rows:.4g} routing rows ({data}). Load average (1 min) before / after: "
             f"{load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores.", ""]
    for q, by_provider in results.items():
        for name, r in by_provider.items():
            if "task_ms" in r:
                lines.append(f"- {q}, {name}: {r['ranges']} ranges (tasks), scheduler cost per no-op task "
                             f"{r['task_ms']:.2f} ms = {r['ranges'] * r['task_ms'] / 1e3 / r['seconds']:.2%} "
                             "of the count's wall time")
    lines += ["", "| query | provider | seconds | routing rows/s | vs in-process | peak RSS MiB per process | "
              "same counts |", "|---|---|---|---|---|---|---|"]
    for q, by_provider in results.items():
        base = by_provider.get("in-process")
        for name, r in by_provider.items():
            if base is None:
                same, ratio = "n/a", "n/a"
            else:
                same = "yes" if all(r["fp"][k] == base["fp"][k] for k in r["fp"]) else "NO"
                ratio = f"{base['seconds'] / r['seconds']:.2f}x"
            label = "duckdb (2 threads)" if name == "duckdb" else name
            lines.append(f"| {q} | {label} | {r['seconds']:.2f} | {rows / r['seconds']:.3g} | {ratio} | "
                         f"{_mib(r['rss'])} | {same} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", metavar="DIR", help="write the archive and its Parquet copy under DIR")
    p.add_argument("--stores", type=int, default=4)
    p.add_argument("--rows", type=float, default=2e9, help="routing rows in the archive, at least")
    p.add_argument("--jobs", type=int, default=2, help="parts built at once")
    p.add_argument("--batch-tokens", type=int, default=65536)
    p.add_argument("--time", metavar="DIR", help="count the archive built under DIR")
    p.add_argument("--range-rows", type=int, default=None, help="rows per task (default: the archive module's)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--queries", default=",".join(QUERIES))
    p.add_argument("--child", choices=PROVIDERS)
    p.add_argument("--query", default="experts")
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return
    if args.build:
        meta = build(Path(args.build), args.stores, args.rows, args.jobs, args.batch_tokens)
        print(f"built {meta['routing_rows']:.4g} routing rows in {meta['stores']} stores under {args.build}")
    if args.time:
        data = Path(args.time)
        meta = json.loads((data / "archive.json").read_text())
        unfinished = [i for i in range(meta["stores"]) if not (data / f"part{i}" / "done.json").exists()]
        if unfinished:
            raise SystemExit(f"{data}: parts {unfinished} not built (run --build {data} first)")
        load0 = os.getloadavg()[0]
        results = {}
        for q in args.queries.split(","):
            results[q] = {}
            for provider in args.providers.split(","):
                results[q][provider] = run_child(args, provider, q)
                print(f"{q} {provider}: {results[q][provider]['seconds']:.2f} s", file=sys.stderr, flush=True)
        argv = " ".join([".venv/bin/python", "bench/bench_archive.py", *sys.argv[1:]])
        print(table(data, meta, results, (load0, os.getloadavg()[0]), argv))
    if not (args.build or args.time):
        p.error("give --build DIR and/or --time DIR")


if __name__ == "__main__":
    main()

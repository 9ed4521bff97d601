"""Counting an archive of stores: in-process vs a LocalCluster of 1 and 2 workers vs DuckDB over Parquet.

    .venv/bin/python bench/bench_archive.py [--stores 4] [--tokens 500000] [--data bench/data/archive]
                                            [--range-rows R] [--repeats 2]

Generates (once; reused when present) ``--stores`` stores of ``--tokens`` tokens each
(bench/bench_counting.py's synthetic trace: 16 layers x top-8 of 64 experts, so a token
is 128 routing rows), each with the same trace as long-format Parquet beside it. Then,
side by side in one run (the machine is shared: compare the ratios, not the times):

- ``in-process``: ``count(ARCHIVE, ...)`` in a child process with ``NUMBA_NUM_THREADS=2``;
- ``cluster-1`` / ``cluster-2``: ``count(ARCHIVE, ..., client=...)`` on a LocalCluster of
  1 / 2 worker processes (1 thread each, ``NUMBA_NUM_THREADS=1``), loopback, after one
  warm-up count (Numba loads its cache in each worker);
- ``duckdb``: ``SELECT domain, lang, layer, expert, count(*) ... GROUP BY ALL`` over the
  Parquet files (2 threads), for the ``experts`` query only.

Queries: ``experts`` by (domain, lang), and ``experts+paths+temporal`` in one call. Every
moetrace run must give the same counts (and ``experts`` the same fingerprint as DuckDB).
Also measured: the scheduler's cost per task (``client.map`` of 2,000 no-op tasks), the
number of ranges, and peak RSS per process (``VmHWM``; workers via ``client.run``).
Prints markdown to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from bench_counting import fingerprint, generate, peak_rss  # noqa: E402

BY = ["domain", "lang"]
QUERIES = {"experts": ["experts"], "experts+paths+temporal": ["experts", "paths", "temporal"]}


def archive_of(data: Path) -> str:
    return str(data / "part*" / "trace.zarr")


def child_in_process(data: Path, query: str, repeats: int, range_rows) -> None:
    from engine.aggregate import count

    count(archive_of(data), stats=QUERIES[query], by=BY, progress=False, range_rows=range_rows)  # warm
    best, ds = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        ds = count(archive_of(data), stats=QUERIES[query], by=BY, progress=False, range_rows=range_rows)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"seconds": best, "fp": _fp(ds), "rss": peak_rss()}))


def child_duckdb(data: Path, repeats: int) -> None:
    import duckdb

    con = duckdb.connect()
    con.execute("SET threads = 2")
    query = (f"SELECT domain, lang, layer, expert, count(*) AS n FROM read_parquet('{data}/part*/trace.parquet') "
             "GROUP BY ALL")
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = con.execute(query).fetchnumpy()
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"seconds": best, "fp": {"experts": fingerprint(res["n"])}, "rss": peak_rss()}))


def _fp(ds) -> dict:
    import numpy as np

    out = {"experts": fingerprint(ds["experts"].sum("rank").values)}
    for v in ds.data_vars:
        out[v] = out.get(v) or fingerprint(np.asarray(ds[v].values))
    return out


def run_child(args, what: str, query: str = "experts") -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS="2")
    cmd = [sys.executable, __file__, "--child", what, "--query", query, "--data", args.data,
           "--repeats", str(args.repeats)] + (["--range-rows", str(args.range_rows)] if args.range_rows else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def on_cluster(args, n_workers: int) -> dict:
    from distributed import Client, LocalCluster

    from engine.aggregate import count
    from engine.counting.archive import plan, stores_of
    from engine.store import TraceStore

    os.environ["NUMBA_NUM_THREADS"] = "1"
    os.environ["OMP_NUM_THREADS"] = "1"
    out = {}
    with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        data = Path(args.data)
        for query, stats in QUERIES.items():
            count(archive_of(data), stats=stats, by=BY, progress=False, client=client, range_rows=args.range_rows)
            best, ds = float("inf"), None
            for _ in range(args.repeats):
                t = time.perf_counter()
                ds = count(archive_of(data), stats=stats, by=BY, progress=False, client=client,
                           range_rows=args.range_rows)
                best = min(best, time.perf_counter() - t)
            out[query] = {"seconds": best, "fp": _fp(ds)}
        t = time.perf_counter()
        client.gather(client.map(lambda x: x, range(2000), pure=False))
        out["task_ms"] = (time.perf_counter() - t) / 2000 * 1e3
        out["rss"] = max(client.run(peak_rss).values())
        out["ranges"] = len(plan([TraceStore.open(p) for p in stores_of(archive_of(data))], args.range_rows))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stores", type=int, default=4)
    p.add_argument("--tokens", type=int, default=500_000, help="tokens per store (128 routing rows each)")
    p.add_argument("--data", default=str(HERE / "data" / "archive"))
    p.add_argument("--range-rows", type=int, default=None, help="rows per task (default: the archive module's)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--child", choices=["in-process", "duckdb"])
    p.add_argument("--query", default="experts")
    args = p.parse_args()
    data = Path(args.data)
    if args.child == "in-process":
        return child_in_process(data, args.query, args.repeats, args.range_rows)
    if args.child == "duckdb":
        return child_duckdb(data, args.repeats)
    for i in range(args.stores):
        meta = generate(data / f"part{i}", args.tokens)
    rows = args.stores * args.tokens * meta["layers"] * meta["top_k"]
    results = {q: {"in-process": run_child(args, "in-process", q)} for q in QUERIES}
    results["experts"]["duckdb"] = run_child(args, "duckdb")
    clusters = {n: on_cluster(args, n) for n in (1, 2)}
    for q in QUERIES:
        for n, res in clusters.items():
            results[q][f"cluster-{n}"] = {**res[q], "rss": res["rss"]}
    print(f"\n{args.stores} stores x {args.tokens:,} tokens = {rows:.3g} routing rows; "
          f"{clusters[2]['ranges']} ranges (tasks); scheduler cost per task "
          f"{clusters[1]['task_ms']:.2f} ms (1 worker), {clusters[2]['task_ms']:.2f} ms (2 workers)\n")
    print("| query | provider | seconds | routing rows/s | vs in-process | peak RSS MiB (per process) | same counts |")
    print("|---|---|---|---|---|---|---|")
    for q, by_provider in results.items():
        base = by_provider["in-process"]
        for name, r in by_provider.items():
            same = all(r["fp"][k] == base["fp"][k] for k in r["fp"]) if name != "duckdb" else \
                r["fp"]["experts"] == base["fp"]["experts"]
            print(f"| {q} | {name} | {r['seconds']:.2f} | {rows / r['seconds']:.3g} | "
                  f"{base['seconds'] / r['seconds']:.2f}x | {r['rss'] / 2**20:.0f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()

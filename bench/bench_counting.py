"""Counting throughput: moetrace's Numba counters vs DuckDB, polars and pandas on the same trace.

    .venv/bin/python bench/bench_counting.py [--tokens 8000000] [--threads 2] [--data bench/data/counting]

Generates (once; reused when present with the same size) a synthetic trace with
planted specialization (engine/synthetic.py: 16 layers x top-8 of 64 experts, 8
(domain, lang) groups; 8M tokens = 1.07e9 routing rows) directly into a trace store,
chunk by chunk, and the same trace as long-format Parquet (zstd, one row per token x
layer x rank: seq int64, pos int32, token_id int32, layer int16, rank int16, expert
int16, domain string, lang string) written with pyarrow in row groups.

Then measures, side by side, each provider in its own subprocess (so its peak RSS is
its own; every engine limited to ``--threads`` threads; best of ``--repeats`` runs
with a warm page cache; peak RSS = the child's ``VmHWM``):

- ``moetrace``: ``count_range(store, stats=["experts"], by=["domain", "lang"])``;
- ``duckdb``: ``SELECT domain, lang, layer, expert, count(*) ... GROUP BY ALL`` over the Parquet;
- ``polars``: ``scan_parquet(...).group_by(domain, lang, layer, expert).len()``;
- ``pandas``: ``groupby([domain, lang, layer, expert]).size()`` on an in-memory
  1e7-row slice (the seeds' approach), extrapolated per row;
- moetrace ``paths`` and ``temporal`` throughput;
- time growth at 1e7, 1e8, 1e9 routing rows (moetrace and DuckDB).

Every provider also returns a fingerprint (sum and sum of squares of its
(domain, lang, layer, expert) counts) that must match DuckDB's. Prints markdown to
stdout. Rows = routing rows (tokens x layers x top-k) for every query.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

GROUP_COLS = ["domain", "lang", "layer", "expert"]


# ---------------------------------------------------------------------------- data


def generate(data: Path, n_tokens: int, batch_tokens: int = 65536) -> dict:
    """Write the store and the Parquet file under ``data`` (skipped when already there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from engine.store import TraceStore
    from engine.synthetic import DOMAINS, LANGS, TraceSpec, generate_chunk, group_preferences

    spec = TraceSpec(n_tokens=n_tokens, seq_len=512)
    meta_path = data / "meta.json"
    meta = {"tokens": n_tokens, "layers": spec.n_layers, "top_k": spec.top_k, "experts": spec.n_experts,
            "seq_len": spec.seq_len}
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return meta
    data.mkdir(parents=True, exist_ok=True)
    L, K = spec.n_layers, spec.top_k
    prefs = group_preferences(spec)
    schema = pa.schema([("seq", pa.int64()), ("pos", pa.int32()), ("token_id", pa.int32()), ("layer", pa.int16()),
                        ("rank", pa.int16()), ("expert", pa.int16()), ("domain", pa.string()), ("lang", pa.string())])
    store = TraceStore.create(data / "trace.zarr", n_layers=L, n_experts=spec.n_experts, top_k=K,
                              labels={"domain": list(DOMAINS), "lang": list(LANGS)}, weights=False,
                              model="synthetic", scoring="softmax", overwrite=True)
    layer = np.tile(np.repeat(np.arange(L, dtype=np.int16), K), batch_tokens)
    rank = np.tile(np.arange(K, dtype=np.int16), batch_tokens * L)
    with store, pq.ParquetWriter(data / "trace.parquet", schema, compression="zstd") as writer, \
            tqdm(total=n_tokens, unit="tok", desc="generate", file=sys.stderr) as bar:
        for a in range(0, n_tokens, batch_tokens):
            b = min(n_tokens, a + batch_tokens)
            batch = generate_chunk(spec, a, b, prefs)
            batch.pop("weights")
            store.append(batch)
            n, lk = b - a, L * K
            table = pa.table({
                "seq": np.repeat(batch["seq"], lk), "pos": np.repeat(batch["pos"], lk),
                "token_id": np.repeat(batch["token_id"], lk), "layer": layer[: n * lk], "rank": rank[: n * lk],
                "expert": batch["experts"].reshape(-1).astype(np.int16),
                "domain": pa.array(np.repeat(batch["domain"], lk), pa.string()),
                "lang": pa.array(np.repeat(batch["lang"], lk), pa.string()),
            }, schema=schema)
            writer.write_table(table, row_group_size=n * lk)
            bar.update(n)
    meta_path.write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------- providers (child side)


def fingerprint(counts: np.ndarray) -> list[int]:
    counts = np.asarray(counts, dtype=np.int64).ravel()
    return [int(counts.sum()), int((counts * counts).sum())]


def provider_moetrace(data: Path, tokens: int, stat: str, repeats: int) -> tuple[float, list[int]]:
    from engine.aggregate import count_range
    from engine.store import TraceStore

    st = TraceStore.open(data / "trace.zarr")
    best, ds = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        ds = count_range(st, 0, tokens, stats=[stat], by=["domain", "lang"], progress=False)
        best = min(best, time.perf_counter() - t)
    fp = fingerprint(ds["experts"].sum("rank").values) if stat == "experts" else [int(ds[stat].sum()), 0]
    return best, fp


def provider_duckdb(data: Path, tokens: int, meta: dict, threads: int, repeats: int) -> tuple[float, list[int]]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    where = "" if tokens >= meta["tokens"] else f"WHERE seq < {tokens // meta['seq_len']}"
    query = (f"SELECT domain, lang, layer, expert, count(*) AS n FROM read_parquet('{data / 'trace.parquet'}') "
             f"{where} GROUP BY ALL")
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = con.execute(query).fetchnumpy()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res["n"])


def provider_polars(data: Path, tokens: int, meta: dict, repeats: int) -> tuple[float, list[int]]:
    import polars as pl

    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        lf = pl.scan_parquet(data / "trace.parquet")
        if tokens < meta["tokens"]:
            lf = lf.filter(pl.col("seq") < tokens // meta["seq_len"])
        res = lf.group_by(GROUP_COLS).len().collect()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res["len"].to_numpy())


def provider_pandas(data: Path, rows: int, repeats: int) -> tuple[float, list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    batches, have = [], 0
    for batch in pq.ParquetFile(data / "trace.parquet").iter_batches(batch_size=1 << 20, columns=GROUP_COLS):
        batches.append(batch)
        have += batch.num_rows
        if have >= rows:
            break
    df = pa.Table.from_batches(batches).slice(0, rows).to_pandas()
    best, res = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        res = df.groupby(GROUP_COLS, observed=True).size()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res.to_numpy())


def child(args) -> None:
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    lk = meta["layers"] * meta["top_k"]
    tokens = min(meta["tokens"], max(meta["seq_len"], args.rows // lk // meta["seq_len"] * meta["seq_len"]))
    if args.child == "moetrace":
        seconds, fp = provider_moetrace(data, tokens, args.stat, args.repeats)
    elif args.child == "duckdb":
        seconds, fp = provider_duckdb(data, tokens, meta, args.threads, args.repeats)
    elif args.child == "polars":
        seconds, fp = provider_polars(data, tokens, meta, args.repeats)
    elif args.child == "pandas":
        seconds, fp = provider_pandas(data, args.rows, args.repeats)
        tokens = args.rows / lk
    else:
        raise SystemExit(f"unknown provider {args.child!r}")
    print(json.dumps({"seconds": seconds, "rows": int(tokens * lk), "rss": peak_rss(), "fingerprint": fp}))


def peak_rss() -> int:
    """This process's peak resident set size in bytes.

    ``VmHWM`` of /proc/self/status is reset by exec; ``ru_maxrss`` is not (on Linux a
    child starts with its parent's high-water mark), so prefer the former.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------- driver (parent side)


def run_child(args, provider: str, rows: int, stat: str = "experts") -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), POLARS_MAX_THREADS=str(args.threads),
               OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--child", provider, "--data", args.data, "--rows", str(rows),
           "--stat", stat, "--threads", str(args.threads), "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{provider} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="tokens in the synthetic trace")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs per provider (best is reported)")
    parser.add_argument("--pandas-rows", type=int, default=10_000_000, help="rows of the pandas slice")
    parser.add_argument("--data", default=str(HERE / "data" / "counting"), help="where the trace is generated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stat", default="experts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    meta = generate(Path(args.data), args.tokens)
    total = meta["tokens"] * meta["layers"] * meta["top_k"]
    print(f"Command: `.venv/bin/python bench/bench_counting.py --tokens {args.tokens} --threads {args.threads} "
          f"--repeats {args.repeats}`")
    print(f"\nTrace: {meta['tokens']:,} tokens x {meta['layers']} layers x top-{meta['top_k']} of "
          f"{meta['experts']} experts = {total:,} routing rows; {args.threads} threads per engine; "
          f"best of {args.repeats}; warm page cache.\n")
    runs = [
        ("moetrace", "experts", "count(experts, by=domain,lang) from the store", total),
        ("duckdb", "experts", "GROUP BY domain, lang, layer, expert over Parquet", total),
        ("polars", "experts", "group_by(domain, lang, layer, expert) over Parquet", total),
        ("pandas", "experts", f"groupby on an in-memory {min(args.pandas_rows, total):,}-row slice",
         min(args.pandas_rows, total)),
        ("moetrace", "paths", "count(paths, by=domain,lang) from the store", total),
        ("moetrace", "temporal", "count(temporal, by=domain,lang) from the store", total),
    ]
    results = []
    for provider, stat, what, rows in runs:
        print(f"running {provider} {stat} ...", file=sys.stderr)
        results.append((provider, stat, what, run_child(args, provider, rows, stat)))
    duck = results[1][3]
    duck_rate = duck["rows"] / duck["seconds"]
    print("| provider | statistic | query | routing rows | seconds | rows/s | vs DuckDB | peak RSS MiB | fingerprint |")
    print("|---|---|---|---|---|---|---|---|---|")
    for provider, stat, what, res in results:
        rate = res["rows"] / res["seconds"]
        if stat == "experts":
            ok = "ok" if (provider == "pandas" or res["fingerprint"] == duck["fingerprint"]) else "MISMATCH"
        else:
            ok = "-"
        print(f"| {provider} | {stat} | {what} | {res['rows']:,} | {res['seconds']:.3f} | {rate:.3g} | "
              f"{rate / duck_rate:.2f}x | {res['rss'] / 2**20:.0f} | {ok} |")
    print("\nGrowth (experts, by domain,lang):\n")
    print("| routing rows | moetrace s | moetrace rows/s | moetrace RSS MiB "
          "| DuckDB s | DuckDB rows/s | DuckDB RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for rows in (10**7, 10**8, 10**9):
        if rows > total:
            continue
        m, d = run_child(args, "moetrace", rows), run_child(args, "duckdb", rows)
        print(f"| {m['rows']:,} | {m['seconds']:.3f} | {m['rows'] / m['seconds']:.3g} | {m['rss'] / 2**20:.0f} | "
              f"{d['seconds']:.3f} | {d['rows'] / d['seconds']:.3g} | {d['rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()

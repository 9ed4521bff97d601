"""Counting throughput: moetrace's Numba counters vs DuckDB, polars and pandas on the same trace.

    .venv/bin/python bench/bench_counting.py [--tokens 8000000] [--threads 2] [--data bench/data/counting]
        [--workloads synthetic,uniform]

Two workloads, each generated once (reused when present with the same size) under ``--data``:

- ``synthetic``: a trace with planted specialization (engine/synthetic.py: 16 layers x
  top-8 of 64 experts, 8 (domain, lang) groups; 8M tokens = 1.07e9 routing rows) written
  directly into a trace store, chunk by chunk, and the same trace as long-format Parquet
  (zstd, one row per token x layer x rank: seq int64, pos int32, token_id int32, layer
  int16, rank int16, expert int16, domain string, lang string) written with pyarrow;
- ``uniform``: expert ids from a hash (near-uniform: the counters' worst case for cache
  locality), one label ``domain`` with 4 values, written to Parquet by DuckDB and imported
  with ``moetrace import-parquet`` (the store a user with a Parquet file gets).

Then measures, side by side, each provider in its own subprocess (so its peak RSS is
its own; every engine limited to ``--threads`` threads; the best of ``--repeats`` runs, or of
as many as fit in ``--min-seconds`` when more do (a short run is either hit by another
process on a shared machine or not: the best of many is the quiet machine's time),
with a warm page cache; peak RSS = the child's ``VmHWM``):

- ``moetrace``: ``count_range(store, stats=["experts"], by=LABELS)``;
- ``duckdb``: ``SELECT LABELS, layer, expert, count(*) ... GROUP BY ALL`` over the Parquet;
- ``polars``: ``scan_parquet(...).group_by(LABELS, layer, expert).len()``;
- ``pandas``: ``groupby([LABELS, layer, expert]).size()`` on an in-memory
  1e7-row slice (the seeds' approach), extrapolated per row;
- moetrace ``paths``, ``pairs``, ``temporal`` throughput, and the four in one call;
- a roofline table: one core's read rate of ``routing/experts`` as the counter reads it
  (the store's layout) and the decode rate of other Blosc settings on the same chunks,
  one core's counting rate per statistic on in-memory chunks (and of an older commit's
  kernels with ``--old-commit``), the end-to-end rate and its share of the best 2-core
  read + count pipeline;
- time growth at 1e7, 1e8, 1e9 routing rows (moetrace and DuckDB; ``synthetic`` only).

LABELS is ``domain, lang`` (synthetic) or ``domain`` (uniform). Every provider also returns
a fingerprint (sum and sum of squares of its (LABELS, layer, expert) counts) that must
match DuckDB's. Prints markdown to stdout. Rows = routing rows (tokens x layers x top-k)
for every query.
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
sys.path.insert(0, str(HERE))  # bench/ only: the repository root on the path would make `kernels` ours, not HF's

WORKLOADS = ("synthetic", "uniform")


# ---------------------------------------------------------------------------- data


def generate(data: Path, n_tokens: int, batch_tokens: int = 65536) -> dict:
    """Write the store and the Parquet file under ``data`` (skipped when already there)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from moetrace.store import FORMAT_VERSION, TraceStore
    from moetrace.synthetic import DOMAINS, LANGS, TraceSpec, generate_chunk, group_preferences

    spec = TraceSpec(n_tokens=n_tokens, seq_len=512)
    meta_path = data / "meta.json"
    meta = {"tokens": n_tokens, "layers": spec.n_layers, "top_k": spec.top_k, "experts": spec.n_experts,
            "seq_len": spec.seq_len, "labels": ["domain", "lang"], "format_version": FORMAT_VERSION}
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


def generate_uniform(data: Path, n_tokens: int, threads: int) -> dict:
    """Near-uniform ids (a hash), one label with 4 values: Parquet written by DuckDB, then imported."""
    import duckdb

    from moetrace.io.parquet import import_parquet
    from moetrace.store import FORMAT_VERSION

    L, K, E, seq_len = 16, 8, 64, 512
    meta_path = data / "meta.json"
    meta = {"tokens": n_tokens, "layers": L, "top_k": K, "experts": E, "seq_len": seq_len, "labels": ["domain"],
            "format_version": FORMAT_VERSION, "ids": "bucket-per-rank"}
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return meta
    data.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    lk = L * K
    # rank r draws from its own 8 ids, shifted by an offset per token and layer: distinct within a
    # token's layer, each id equally likely, and 6 random bits of 8 per byte (lz4 stores it as is)
    con.execute(f"""
        COPY (
          SELECT i // {lk * seq_len} AS seq, ((i // {lk}) % {seq_len})::INTEGER AS pos,
                 (hash(i // {lk}) % 50000)::INTEGER AS token_id,
                 ((i // {K}) % {L})::SMALLINT AS layer, (i % {K})::SMALLINT AS rank,
                 ((hash(i // {K}) % {E} + {E // K} * (i % {K}) + hash(i) % {E // K}) % {E})::SMALLINT AS expert,
                 ['a', 'b', 'c', 'd'][(i // {lk * seq_len}) % 4 + 1] AS domain
          FROM range({n_tokens * lk}) r(i)
        ) TO '{data / 'trace.parquet'}' (FORMAT parquet, COMPRESSION zstd)""")
    import_parquet(data / "trace.parquet", data / "trace.zarr", overwrite=True)
    meta_path.write_text(json.dumps(meta))
    return meta


# ---------------------------------------------------------------------------- providers (child side)


def fingerprint(counts: np.ndarray) -> list[int]:
    counts = np.asarray(counts, dtype=np.int64).ravel()
    return [int(counts.sum()), int((counts * counts).sum())]


def provider_moetrace(data: Path, tokens: int, stat: str, labels: list[str], repeats: int) -> tuple[float, list[int]]:
    """``stat``: one statistic or several joined by ``+`` (counted in one call)."""
    from moetrace.counting import count_range
    from moetrace.store import TraceStore

    st = TraceStore.open(data / "trace.zarr")
    stats = stat.split("+")
    count_range(st, 0, min(tokens, st.chunk_rows), stats=stats, by=labels, progress=False)  # compile
    best, ds = float("inf"), None
    for _ in rounds(repeats):
        t, c = time.perf_counter(), time.process_time()
        ds = count_range(st, 0, tokens, stats=stats, by=labels, progress=False)
        if time.perf_counter() - t < best:
            best, CPU_SECONDS[0] = time.perf_counter() - t, time.process_time() - c
    fp = fingerprint(ds["experts"].sum("rank").values) if stat == "experts" else [int(ds[stats[0]].sum()), 0]
    return best, fp


CPU_SECONDS = [0.0]  # CPU seconds (all threads) of the best moetrace run
MIN_SECONDS = [1.0]  # --min-seconds


def rounds(repeats: int):
    """Run numbers: at least ``repeats``, then more until ``MIN_SECONDS`` have passed."""
    start, i = time.perf_counter(), 0
    while i < repeats or time.perf_counter() - start < MIN_SECONDS[0]:
        yield i
        i += 1


def provider_roofline(data: Path, labels: list[str], repeats: int, old_kernels: str | None) -> dict:
    """One core's stage rates on real chunks: read (as the counter reads them) and count (in memory).

    Read: the first ``n`` chunks of ``routing/experts`` read by the count driver's chunk
    reader (a mapped file for a chunk Blosc stored as is, else a Blosc decode), one
    thread; the same decoded chunks re-encoded with other Blosc settings give their decode
    rate and size (numcodecs, Blosc on one thread). Count: each registered statistic over
    the decoded chunks (groups by ``labels`` as ``count`` makes them), Numba on one
    thread. ``old_kernels``: a kernels/counting.py of an older commit, timed on the same
    chunks side by side.
    """
    import numba
    import numcodecs
    from numcodecs import blosc

    from moetrace.counting.chunks import ChunkReader, _RawColumn
    from moetrace.counting.filters import Filters
    from moetrace.store import TraceStore
    from moetrace.kernels import counting

    numba.set_num_threads(1)
    blosc.set_nthreads(1)
    st = TraceStore.open(data / "trace.zarr")
    raw = _RawColumn(st, "experts")
    n = min(8, -(-len(st) // st.chunk_rows) - 1) or 1
    files = [(raw.dir / raw.meta.encode_chunk_key((i, 0, 0))).read_bytes() for i in range(n)]
    buf = np.empty((st.chunk_rows, *raw.inner), dtype=raw.dtype)
    rows = n * st.chunk_rows * int(np.prod(raw.inner))

    def best_of(fn) -> float:
        """Best CPU seconds of ``fn`` (one thread works: CPU time is robust to a shared machine)."""
        fn()
        out = float("inf")
        for _ in rounds(repeats):
            t = time.process_time()
            fn()
            out = min(out, time.process_time() - t)
        return out

    res = {"rows": rows, "decode": {}, "count": {}, "old_count": {}}
    reader = ChunkReader(st, ["experts"], (0, n * st.chunk_rows))
    buffers = reader.buffers()
    decoded = [np.array(reader.load(i, buffers)["experts"]) for i in range(n)]

    def read_all():
        for i in range(n):
            int(reader.load(i, buffers)["experts"].reshape(-1)[::4096].sum(dtype=np.int64))  # fault every page in

    sec = best_of(read_all)
    layout = raw.meta.to_dict()["codecs"][1]["configuration"]
    res["read_name"] = f"this store ({layout['cname']} {layout['clevel']} {layout['shuffle']}), as the counter reads it"
    res["decode"][res["read_name"]] = {"rows_s": rows / sec, "gb_s": buf.nbytes * n / sec / 1e9,
                                       "ratio": buf.nbytes * n / sum(map(len, files))}
    for name, cname, clevel, shuffle in [("lz4, bitshuffle (format_version 2)", "lz4", 5, blosc.BITSHUFFLE),
                                         ("lz4, no shuffle", "lz4", 5, blosc.NOSHUFFLE),
                                         ("lz4, byte shuffle", "lz4", 5, blosc.SHUFFLE),
                                         ("zstd 1, bitshuffle", "zstd", 1, blosc.BITSHUFFLE)]:
        codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
        enc = [codec.encode(d) for d in decoded]
        sec = best_of(lambda: [blosc.decompress(e, buf) for e in enc])
        res["decode"][name] = {"rows_s": rows / sec, "gb_s": buf.nbytes * n / sec / 1e9,
                               "ratio": buf.nbytes * n / sum(map(len, enc))}
    sel = Filters(by=tuple(labels)).compile(st)
    cols = st.read([*labels, "seq", "pos", "token_id"], 0, n * st.chunk_rows)
    chunks = []
    for i, d in enumerate(decoded):
        a, b = i * st.chunk_rows, (i + 1) * st.chunk_rows
        part = {k: v[a:b] for k, v in cols.items()}
        chunks.append({"experts": d, "group": sel.group_codes(part, b - a), **part})
    modules = {"count": counting}
    if old_kernels:
        import importlib.util
        spec = importlib.util.spec_from_file_location("old_counting", old_kernels)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        modules["old_count"] = old
    L, K, E = st.n_layers, st.top_k, st.n_experts
    for name in counting.STATS:
        if name in ("vocab", "weight_sum"):
            continue  # vocab needs a vocabulary, weight_sum weights: neither is in this trace
        for key, mod in modules.items():
            if name not in mod.STATS:
                continue
            stat = mod.make_stat(name, sel.n_groups, L, K, E, n_blocks=1)

            def run():
                state = stat.create()
                for c in chunks:
                    stat.update(state, c)
                return stat.finalize(state)
            res[key][name] = rows / best_of(run)
    return res


def provider_duckdb(data: Path, tokens: int, meta: dict, threads: int, repeats: int) -> tuple[float, list[int]]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    where = "" if tokens >= meta["tokens"] else f"WHERE seq < {tokens // meta['seq_len']}"
    query = (f"SELECT {', '.join(meta['labels'])}, layer, expert, count(*) AS n "
             f"FROM read_parquet('{data / 'trace.parquet'}') {where} GROUP BY ALL")
    best, res = float("inf"), None
    for _ in rounds(repeats):
        t = time.perf_counter()
        res = con.execute(query).fetchnumpy()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res["n"])


def provider_polars(data: Path, tokens: int, meta: dict, repeats: int) -> tuple[float, list[int]]:
    import polars as pl

    best, res = float("inf"), None
    for _ in rounds(repeats):
        t = time.perf_counter()
        lf = pl.scan_parquet(data / "trace.parquet")
        if tokens < meta["tokens"]:
            lf = lf.filter(pl.col("seq") < tokens // meta["seq_len"])
        res = lf.group_by([*meta["labels"], "layer", "expert"]).len().collect()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res["len"].to_numpy())


def provider_pandas(data: Path, rows: int, meta: dict, repeats: int) -> tuple[float, list[int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    group_cols = [*meta["labels"], "layer", "expert"]
    batches, have = [], 0
    for batch in pq.ParquetFile(data / "trace.parquet").iter_batches(batch_size=1 << 20, columns=group_cols):
        batches.append(batch)
        have += batch.num_rows
        if have >= rows:
            break
    df = pa.Table.from_batches(batches).slice(0, rows).to_pandas()
    best, res = float("inf"), None
    for _ in rounds(repeats):
        t = time.perf_counter()
        res = df.groupby(group_cols, observed=True).size()
        best = min(best, time.perf_counter() - t)
    return best, fingerprint(res.to_numpy())


def child(args) -> None:
    data = Path(args.data)
    meta = json.loads((data / "meta.json").read_text())
    lk = meta["layers"] * meta["top_k"]
    tokens = min(meta["tokens"], max(meta["seq_len"], args.rows // lk // meta["seq_len"] * meta["seq_len"]))
    if args.child == "roofline":
        print(json.dumps(provider_roofline(data, meta["labels"], args.repeats, args.old_kernels)))
        return
    if args.child == "moetrace":
        seconds, fp = provider_moetrace(data, tokens, args.stat, meta["labels"], args.repeats)
    elif args.child == "duckdb":
        seconds, fp = provider_duckdb(data, tokens, meta, args.threads, args.repeats)
    elif args.child == "polars":
        seconds, fp = provider_polars(data, tokens, meta, args.repeats)
    elif args.child == "pandas":
        seconds, fp = provider_pandas(data, args.rows, meta, args.repeats)
        tokens = args.rows / lk
    else:
        raise SystemExit(f"unknown provider {args.child!r}")
    print(json.dumps({"seconds": seconds, "rows": int(tokens * lk), "rss": peak_rss(), "fingerprint": fp,
                      "cpu_seconds": CPU_SECONDS[0]}))


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
           "--stat", stat, "--threads", str(args.threads), "--repeats", str(args.repeats),
           "--min-seconds", str(args.min_seconds)]
    if args.old_kernels:
        cmd += ["--old-kernels", args.old_kernels]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{provider} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="tokens in the synthetic trace")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--repeats", type=int, default=3, help="runs per provider (best is reported)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="each provider runs at least --repeats times and until this many seconds have passed")
    parser.add_argument("--pandas-rows", type=int, default=10_000_000, help="rows of the pandas slice")
    parser.add_argument("--data", default=str(HERE / "data" / "counting"), help="where the trace is generated")
    parser.add_argument("--old-commit", help="also time kernels/counting.py of this git commit (roofline table)")
    parser.add_argument("--skip-growth", action="store_true", help="no growth table")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: synthetic, uniform")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--old-kernels", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--stat", default="experts", help=argparse.SUPPRESS)
    args = parser.parse_args()
    MIN_SECONDS[0] = args.min_seconds
    if args.child:
        child(args)
        return

    if args.old_commit:
        import tempfile

        text = subprocess.run(["git", "show", f"{args.old_commit}:kernels/counting.py"], cwd=HERE.parent,
                              capture_output=True, text=True, check=True).stdout
        old_file = Path(tempfile.mkdtemp(prefix="moetrace-old-kernels-")) / "old_counting.py"
        old_file.write_text(text)
        args.old_kernels = str(old_file)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"--workloads: unknown {unknown}; expected some of {list(WORKLOADS)}")
    print(f"Command: `.venv/bin/python bench/bench_counting.py --tokens {args.tokens} --threads {args.threads} "
          f"--repeats {args.repeats} --min-seconds {args.min_seconds:g} --workloads {','.join(workloads)}"
          + (f" --old-commit {args.old_commit}" if args.old_commit else "")
          + (" --skip-growth" if args.skip_growth else "") + "`")
    for workload in workloads:
        run_workload(argparse.Namespace(**{**vars(args), "data": str(Path(args.data) / workload)}), workload)


def run_workload(args, workload: str) -> None:
    """Generate (or reuse) one workload's trace, then print its tables."""
    if workload == "synthetic":
        meta = generate(Path(args.data), args.tokens)
        how = "planted specialization (engine/synthetic.py), store written directly"
    else:
        meta = generate_uniform(Path(args.data), args.tokens, args.threads)
        how = "near-uniform ids from a hash, Parquet written by DuckDB and imported with `moetrace import-parquet`"
    total = meta["tokens"] * meta["layers"] * meta["top_k"]
    by = ",".join(meta["labels"])
    print(f"\n### Workload `{workload}`: {how}\n")
    print(f"Trace: {meta['tokens']:,} tokens x {meta['layers']} layers x top-{meta['top_k']} of "
          f"{meta['experts']} experts = {total:,} routing rows, by {by}; {args.threads} threads per engine; "
          f"best of {args.repeats} runs or of {args.min_seconds:g} s of runs; warm page cache.\n")
    labels = ", ".join(meta["labels"])
    runs = [
        ("moetrace", "experts", f"count(experts, by={by}) from the store", total),
        ("duckdb", "experts", f"GROUP BY {labels}, layer, expert over Parquet", total),
        ("polars", "experts", f"group_by({labels}, layer, expert) over Parquet", total),
        ("pandas", "experts", f"groupby on an in-memory {min(args.pandas_rows, total):,}-row slice",
         min(args.pandas_rows, total)),
        ("moetrace", "paths", f"count(paths, by={by}) from the store", total),
        ("moetrace", "pairs", f"count(pairs, by={by}) from the store", total),
        ("moetrace", "temporal", f"count(temporal, by={by}) from the store", total),
        ("moetrace", "experts+paths+pairs+temporal", "the four in one count call", total),
    ]
    results = []
    for provider, stat, what, rows in runs:
        print(f"running {workload} {provider} {stat} ...", file=sys.stderr)
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
    separate = sum(res["seconds"] for provider, stat, _, res in results
                   if provider == "moetrace" and stat in ("experts", "paths", "pairs", "temporal"))
    together = [res for provider, stat, _, res in results if "+" in stat][0]["seconds"]
    print(f"\nFour statistics in one call: {together:.3f} s; four separate calls: {separate:.3f} s "
          f"({separate / together:.2f}x).")
    e2e = {stat: (res["rows"] / res["seconds"], res["rows"] / res["cpu_seconds"])
           for provider, stat, _, res in results if provider == "moetrace"}
    roofline(args, e2e)
    if args.skip_growth or workload != "synthetic":
        return
    print(f"\nGrowth (experts, by {by}):\n")
    print("| routing rows | moetrace s | moetrace rows/s | moetrace RSS MiB "
          "| DuckDB s | DuckDB rows/s | DuckDB RSS MiB | vs DuckDB |")
    print("|---|---|---|---|---|---|---|---|")
    for rows in (10**7, 10**8, 10**9):
        if rows > total:
            continue
        m, d = run_child(args, "moetrace", rows), run_child(args, "duckdb", rows)
        print(f"| {m['rows']:,} | {m['seconds']:.3f} | {m['rows'] / m['seconds']:.3g} | {m['rss'] / 2**20:.0f} | "
              f"{d['seconds']:.3f} | {d['rows'] / d['seconds']:.3g} | {d['rss'] / 2**20:.0f} | "
              f"{(m['rows'] / m['seconds']) / (d['rows'] / d['seconds']):.1f}x |")


def roofline(args, e2e: dict) -> None:
    """Print the roofline table: one core's decode and count rates, end to end, and its share."""
    print("running roofline ...", file=sys.stderr)
    res = run_child(args, "roofline", 0)
    dec = res["decode"]
    print("\nRoofline (one core each stage, CPU time, real chunks of this trace; rows = routing rows):\n")
    print("| codec of routing/experts | read or decode GB/s (1 core) | rows/s | size ratio |")
    print("|---|---|---|---|")
    for name, d in dec.items():
        print(f"| {name} | {d['gb_s']:.2f} | {d['rows_s']:.3g} | {d['ratio']:.2f} |")
    decode = dec[res["read_name"]]["rows_s"]
    old = res.get("old_count") or {}
    print(f"\n| statistic | count rows/s (1 core, in memory) | {'old kernel rows/s | new/old | ' if old else ''}"
          f"end to end rows/s ({args.threads} threads, wall) | end to end rows per CPU-second | best "
          f"{args.threads}-core pipeline rows/s | share (wall) | share (CPU) | slower stage |")
    print("|---|---|" + ("---|---|" if old else "") + "---|---|---|---|---|---|")
    for name, rate in res["count"].items():
        # 2 cores each reading and counting whole chunks, perfectly balanced: each row costs
        # 1/read + 1/count core-seconds.
        best = args.threads / (1 / decode + 1 / rate)
        got = e2e.get(name)
        old_cols = f"{old[name]:.3g} | {rate / old[name]:.2f} | " if name in old else ("- | - | " if old else "")
        stage = "read" if decode < rate else "count"
        if got:
            wall, per_cpu = got
            # per CPU-second x cores: the rate with dedicated cores and no stalls
            tail = (f"{wall:.3g} | {per_cpu:.3g} | {best:.3g} | {wall / best:.0%} | "
                    f"{per_cpu * args.threads / best:.0%} | {stage}")
        else:
            tail = f"- | - | {best:.3g} | - | - | {stage}"
        print(f"| {name} | {rate:.3g} | {old_cols}{tail} |")


if __name__ == "__main__":
    main()

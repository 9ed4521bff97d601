"""Import speed: seed 000's CSV pair and the long Parquet format into a store, against DuckDB.

    .venv/bin/python bench/bench_import.py [--tokens 162000] [--threads 2] [--repeats 2] [--data bench/data/import]

Generates (once; reused when present with the same size) seed 000's ``samples.csv`` and
``topks.csv`` for a synthetic trace (``engine/synthetic.py``'s ``write_seed000_csv``: 16
layers x top-8, weights with 4 decimals; 162,000 tokens = 20.7M routing rows, about the
size of the file in issue 25), and the same trace in moetrace's long Parquet format
(``export_parquet``). Then, each in its own subprocess (peak RSS = the child's VmHWM), best
of ``--repeats``, warm page cache, every engine on ``--threads`` threads:

- ``duckdb``: ``COPY (SELECT * FROM read_csv(...)) TO ... (FORMAT parquet)`` for both CSV
  files, the reference time;
- ``import-csv``: ``moetrace.io.csv_import.import_csv`` of the two CSV files;
- ``import-parquet``: ``moetrace.io.parquet.import_parquet`` of the long Parquet file.

Prints a markdown table with each time over DuckDB's (target: <= 1.0x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # bench/ only: the repository root on the path would make `kernels` ours, not HF's

from bench_counting import peak_rss  # noqa: E402


def generate(data: Path, n_tokens: int) -> dict:
    from moetrace.io.parquet import export_parquet
    from moetrace.io.csv_import import import_csv
    from moetrace.synthetic import TraceSpec, write_seed000_csv

    meta_path = data / "meta.json"
    meta = {"tokens": n_tokens, "layers": 16, "top_k": 8}
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return meta
    shutil.rmtree(data, ignore_errors=True)
    samples, topks = write_seed000_csv(data, TraceSpec(n_tokens=n_tokens, n_layers=16, top_k=8))
    store = import_csv(samples, topks, data / "from_csv.zarr", overwrite=True, progress=False)
    export_parquet(store, data / "long.parquet", progress=False)
    shutil.rmtree(data / "from_csv.zarr")
    meta_path.write_text(json.dumps(meta))
    return meta


def child(provider: str, data: Path, threads: int) -> dict:
    out = data / f"out-{provider}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t = time.perf_counter()
    if provider == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.execute(f"SET threads = {threads}")
        for name in ("samples", "topks"):
            con.execute(f"COPY (SELECT * FROM read_csv('{data / (name + '.csv')}')) "
                        f"TO '{out / (name + '.parquet')}' (FORMAT parquet)")
    elif provider == "import-csv":
        from moetrace.io.csv_import import import_csv

        import_csv(data / "samples.csv", data / "topks.csv", out / "trace.zarr", progress=False)
    elif provider == "import-parquet":
        from moetrace.io.parquet import import_parquet

        import_parquet(data / "long.parquet", out / "trace.zarr", progress=False)
    else:
        raise SystemExit(f"unknown provider {provider!r}")
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "rss": peak_rss()}


def run_child(args, provider: str) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    best = None
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--child", provider, "--data", args.data,
                              "--threads", str(args.threads)], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{provider} failed:\n{out.stderr}")
        res = json.loads(out.stdout.strip().splitlines()[-1])
        if best is None or res["seconds"] < best["seconds"]:
            best = res
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=162_000, help="tokens in the synthetic trace")
    parser.add_argument("--threads", type=int, default=2, help="threads for every engine")
    parser.add_argument("--repeats", type=int, default=2, help="runs per provider (best is reported)")
    parser.add_argument("--data", default=str(HERE / "data" / "import"), help="where the files are generated")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    data = Path(args.data)
    if args.child:
        print(json.dumps(child(args.child, data, args.threads)))
        return
    meta = generate(data, args.tokens)
    rows = meta["tokens"] * meta["layers"] * meta["top_k"]
    sizes = {name: (data / name).stat().st_size for name in ("samples.csv", "topks.csv", "long.parquet")}
    print(f"Command: `.venv/bin/python bench/bench_import.py --tokens {args.tokens} --threads {args.threads} "
          f"--repeats {args.repeats}`\n")
    print(f"Files: samples.csv {sizes['samples.csv'] / 2**20:.0f} MiB + topks.csv {sizes['topks.csv'] / 2**20:.0f} "
          f"MiB ({rows:,} routing rows); long.parquet {sizes['long.parquet'] / 2**20:.0f} MiB. "
          f"{args.threads} threads; best of {args.repeats}.\n")
    results = {}
    for provider in ("duckdb", "import-csv", "import-parquet"):
        print(f"running {provider} ...", file=sys.stderr)
        results[provider] = run_child(args, provider)
    duck = results["duckdb"]["seconds"]
    what = {"duckdb": "DuckDB: both CSV files -> Parquet", "import-csv": "moetrace import-csv (samples + topks)",
            "import-parquet": "moetrace import-parquet (long format)"}
    print("| provider | what | seconds | routing rows/s | vs DuckDB's time | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    for provider, res in results.items():
        print(f"| {provider} | {what[provider]} | {res['seconds']:.2f} | {rows / res['seconds']:.3g} | "
              f"{res['seconds'] / duck:.2f}x | {res['rss'] / 2**20:.0f} |")


if __name__ == "__main__":
    main()

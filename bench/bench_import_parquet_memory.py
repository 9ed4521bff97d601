"""Peak memory of import-parquet on a 2.56M-row long-format file, in store order or shuffled.

Usage: python bench/bench_import_parquet_memory.py WORKDIR BUDGET_MIB SHUFFLED(0/1)
Prints one JSON line: seconds, peak RSS growth over a warm-up import (MiB), file size.
20,000 tokens (40 sequences x 500 positions) x 16 layers x top-8 of 64 experts.
"""
import json, resource, sys, time
from pathlib import Path

import numpy as np, pyarrow as pa, pyarrow.parquet as pq
from moetrace.io import import_parquet
work = Path(sys.argv[1])
work.mkdir(parents=True, exist_ok=True)
budget = int(sys.argv[2]) << 20
shuffle = sys.argv[3] == "1"
src = work / ("shuf.parquet" if shuffle else "sorted.parquet")
if not src.exists():
    rng = np.random.default_rng(0)
    n_tok, L, K = 20000, 16, 8
    per = L * K
    tok = np.repeat(np.arange(n_tok), per)
    t = pa.table({"seq": pa.array(tok // 500, pa.int64()), "pos": pa.array(tok % 500, pa.int32()),
                  "token_id": pa.array(np.full(len(tok), -1), pa.int32()),
                  "layer": pa.array(np.tile(np.repeat(np.arange(L), K), n_tok), pa.int16()),
                  "rank": pa.array(np.tile(np.arange(K), n_tok * L), pa.int16()),
                  "expert": pa.array(rng.integers(0, 64, len(tok)), pa.int16())})
    if shuffle:
        t = t.take(pa.array(rng.permutation(len(tok))))
    pq.write_table(t, src, row_group_size=1 << 18)
warm = work / "warm.parquet"
if not warm.exists():
    tb = pq.read_table(src); order = np.lexsort([tb.column(c).to_numpy() for c in ("rank", "layer", "pos", "seq")]); pq.write_table(tb.take(pa.array(order)).slice(0, 128 * 50), warm)
import shutil
for name in ("w.zarr", "o.zarr"):
    shutil.rmtree(work / name, ignore_errors=True)
import_parquet(warm, work / "w.zarr", progress=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
store = import_parquet(src, work / "o.zarr", progress=False, memory_budget=budget)
dt = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"shuffled": shuffle, "budget_mib": budget >> 20, "rows": len(store) * 128, "seconds": round(dt, 2),
                  "peak_rss_growth_mib": round((after - before) / 1024, 1), "file_mib": round(src.stat().st_size / 2**20, 1)}))

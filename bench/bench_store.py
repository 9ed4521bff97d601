"""Store write/read throughput and compression for candidate codecs and chunk sizes.

    .venv/bin/python bench/bench_store.py [--tokens 1000000] [--no-weights] [--candidates a,b]
    .venv/bin/python bench/bench_store.py --text [--tokens 1000000]   # codecs for tokens/text

Every candidate gets the same pre-generated synthetic trace (engine/synthetic.py: 16 layers,
64 experts, top-8, with weights) in one run, side by side. Measured:
- write: TraceStore.append + close (validation, encoding, compression, file writes), tokens/s
  and MB/s of raw routing data;
- read: every chunk of routing/experts decompressed in one thread (Blosc limited to one
  thread), GB/s of decompressed data, warm page cache (best of 3 passes);
- scan: iter_chunks(["experts", "domain", "lang"]) with prefetch, as the counters read it;
- ratio: raw / stored bytes of routing/experts and of the whole store.

A candidate's chunk size is that of routing/experts (routing/weights, twice as wide, gets
chunks of half as many rows: no chunk may exceed 8 MiB, engine/store.py).
``--text`` instead compares codecs for the variable-length ``tokens/text`` array on a
Zipf-distributed stream of word tokens (written and read through zarr, as the store does).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numcodecs.blosc
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from moetrace.synthetic import TraceSpec, generate_chunk, group_preferences  # noqa: E402

from moetrace.store import TraceStore  # noqa: E402

CANDIDATES = {
    "lz4-noshuffle-4MiB": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}, chunk_mib=4),
    "lz4-bitshuffle-4MiB": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}, chunk_mib=4),
    "zstd1-noshuffle-4MiB": dict(codec={"cname": "zstd", "clevel": 1, "shuffle": "noshuffle"}, chunk_mib=4),
    "zstd1-bitshuffle-4MiB": dict(codec={"cname": "zstd", "clevel": 1, "shuffle": "bitshuffle"}, chunk_mib=4),
    "lz4-noshuffle-1MiB": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}, chunk_mib=1),
    "lz4-noshuffle-8MiB": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"}, chunk_mib=8),
    "lz4-bitshuffle-8MiB": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"}, chunk_mib=8),
    "lz4c1-bitshuffle-8MiB": dict(codec={"cname": "lz4", "clevel": 1, "shuffle": "bitshuffle"}, chunk_mib=8),
    "lz4-bitshuffle-8MiB-shard8": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "bitshuffle"},
                                       chunk_mib=8, shard_chunks=8),
    "lz4-noshuffle-4MiB-shard16": dict(codec={"cname": "lz4", "clevel": 5, "shuffle": "noshuffle"},
                                       chunk_mib=4, shard_chunks=16),
}


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1_000_000)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--no-weights", action="store_true", help="stores without routing/weights")
    parser.add_argument("--text", action="store_true", help="compare codecs for tokens/text instead")
    args = parser.parse_args()
    if args.text:
        return bench_text(args.tokens)

    spec = TraceSpec(n_tokens=args.tokens)
    L, K = spec.n_layers, spec.top_k
    prefs = group_preferences(spec)
    batch_rows = 65536
    batches = []
    for a in range(0, spec.n_tokens, batch_rows):
        b = generate_chunk(spec, a, min(spec.n_tokens, a + batch_rows), prefs)
        b["experts"] = b["experts"].astype(np.uint8)
        b["weights"] = b["weights"].astype(np.float16)
        if args.no_weights:
            del b["weights"]
        batches.append(b)
    raw_routing = spec.n_tokens * L * K * 3  # experts (1 B) + weights (2 B)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="moetrace-bench-store-"))
    numcodecs.blosc.set_nthreads(1)

    rows = []
    for name in args.candidates.split(","):
        cand = CANDIDATES[name]
        path = work / f"{name}.zarr"
        chunk_rows = (cand["chunk_mib"] << 20) // (L * K)
        t0 = time.perf_counter()
        store = TraceStore.create(path, n_layers=L, n_experts=spec.n_experts, top_k=K,
                                  labels={"domain": ["math", "code", "prose", "dates"], "lang": ["en", "de"]},
                                  weights=not args.no_weights, chunk_rows=chunk_rows, codec=cand["codec"],
                                  shard_chunks=cand.get("shard_chunks"), overwrite=True)
        with store:
            for b in batches:
                store.append(b)
        write_s = time.perf_counter() - t0

        reader = TraceStore.open(path)
        arr = reader._array("experts")
        read_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            for a in range(0, len(reader), chunk_rows):
                np.asarray(arr[a:a + chunk_rows])
            read_s.append(time.perf_counter() - t0)
        scan_s = []
        for _ in range(3):
            t0 = time.perf_counter()
            for chunk in reader.iter_chunks(["experts", "domain", "lang"]):
                pass
            scan_s.append(time.perf_counter() - t0)
        experts_raw = spec.n_tokens * L * K
        experts_stored = dir_bytes(path / "routing" / "experts")
        total_stored = dir_bytes(path)
        total_raw = experts_raw * 3 + spec.n_tokens * (8 + 4 + 4 + 1 + 2 + 2)
        rows.append({
            "candidate": name,
            "chunk_rows": chunk_rows,
            "write_tok_s": spec.n_tokens / write_s,
            "write_MB_s": raw_routing / write_s / 1e6,
            "read_GB_s": experts_raw / min(read_s) / 1e9,
            "scan_GB_s": experts_raw / min(scan_s) / 1e9,
            "ratio_experts": experts_raw / experts_stored,
            "ratio_total": total_raw / total_stored,
        })
        print(f"done {name}", file=sys.stderr, flush=True)
        shutil.rmtree(path)

    print(f"Synthetic trace: {spec.n_tokens:,} tokens x {L} layers x top-{K} of {spec.n_experts} experts "
          f"({spec.n_tokens * L * K:,} routing rows), {'without' if args.no_weights else 'with float16'} weights.\n")
    print("| candidate | chunk rows | write tok/s | write MB/s | read experts GB/s (1 thread) "
          "| scan experts+labels GB/s | ratio experts | ratio store |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['candidate']} | {r['chunk_rows']:,} | {r['write_tok_s']:,.0f} | {r['write_MB_s']:.0f} "
              f"| {r['read_GB_s']:.2f} | {r['scan_GB_s']:.2f} | {r['ratio_experts']:.2f} | {r['ratio_total']:.2f} |")


def bench_text(n_tokens: int) -> None:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    rng = np.random.default_rng(0)
    words = np.array(Path(__file__).parents[1].joinpath("README.md").read_text().split())
    vocab = np.unique(words)
    ranks = np.minimum(rng.zipf(1.2, n_tokens), len(vocab)) - 1
    text = np.char.add(np.where(rng.random(n_tokens) < 0.7, " ", ""), vocab[ranks])
    raw = sum(len(t.encode()) for t in text.tolist()) + 4 * n_tokens
    candidates = {
        "zarr default (zstd level 0)": ZstdCodec(level=0),
        "blosc lz4 + bitshuffle (numeric default)": BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle"),
        "blosc lz4, no shuffle": BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"),
        "blosc zstd 5, no shuffle (tokens/text)": BloscCodec(cname="zstd", clevel=5, shuffle="noshuffle"),
    }
    numcodecs.blosc.set_nthreads(1)
    work = Path(tempfile.mkdtemp(prefix="moetrace-bench-text-"))
    print(f"{n_tokens:,} tokens of text ({len(vocab):,} distinct words of README.md, Zipf 1.2), "
          f"{raw / 2**20:.1f} MiB raw (4-byte length + UTF-8)\n")
    print("| codec | ratio | write s | read s (best of 3) |")
    print("|---|---|---|---|")
    for name, codec in candidates.items():
        arr = zarr.open_group(str(work / "t.zarr"), mode="w").create_array(
            "text", shape=(n_tokens,), chunks=(1 << 20,), dtype=str, compressors=codec)
        t0 = time.perf_counter()
        arr[:] = text
        write_s = time.perf_counter() - t0
        reads = []
        for _ in range(3):
            t0 = time.perf_counter()
            arr[:]
            reads.append(time.perf_counter() - t0)
        print(f"| {name} | {raw / arr.nbytes_stored():.2f} | {write_s:.2f} | {min(reads):.2f} |")
    shutil.rmtree(work)


if __name__ == "__main__":
    main()

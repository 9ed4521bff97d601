"""Routing throughput: HF-style eager routing vs the torch reference vs the fused Triton kernel.

    .venv/bin/python bench/bench_routing.py [--quick] [--device cuda|cpu] [--providers eager,torch_ref,...]
                                            [--T 1,64,4096,65536] [--E 8,64,128,256] [--K 2,8] [--dtype bf16]
                                            [--threads N] [--out table.md]

Every provider routes the same bf16 logits ``[T, E]`` to ``top_k = K`` experts with softmax +
renormalization and one expert mask ``[E]`` (``max(1, E // 8)`` experts masked, reroute mode),
except ``fused_unmasked``:

- ``eager``: what a transformers router does, plus the mask:
  ``logits.masked_fill(mask, -inf)`` -> ``softmax(float32)`` -> ``topk`` -> ``w / w.sum()``;
- ``torch_ref``: ``moetrace.kernels.routing.route_reference`` (stable sort, so ties go to the lower index);
- ``triton``: ``moetrace.kernels.routing.fused_route(backend="triton")`` (CUDA only);
- ``fused_unmasked``: the same Triton kernel with no intervention, i.e. a plain fused
  softmax-top-k: the cost of the intervention machinery is ``triton`` / ``fused_unmasked``.

Times are medians (``triton.testing.do_bench`` on CUDA, a perf_counter loop on the CPU).
Bandwidth = bytes the op must move at least (read logits ``T*E*itemsize``, write weights
``T*K*4``, experts ``T*K*4`` and top1 ``T*4``) / time. "vs eager" = eager time / provider time.
Prints a markdown table (and writes it to ``--out`` when given). On the CPU only ``eager`` and
``torch_ref`` run (the Triton interpreter is a debugging tool, not a benchmark).

``PROVIDERS`` and ``make_inputs`` are importable, e.g. for pytest-benchmark:
``benchmark(PROVIDERS["eager"], make_inputs(4096, 64, 8, torch.bfloat16, "cpu"))``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from moetrace.kernels.routing import fused_route, route_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(T: int, E: int, K: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Shared setup: logits [T, E] (dtype), expert_mask bool [E] with max(1, E // 8) masked, top_k K."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g).to(device=device, dtype=dtype)
    mask = (torch.randperm(E, generator=g) < max(1, E // 8)).to(device)
    return {"logits": logits, "mask": mask, "top_k": K}


def eager(inp: dict):
    """HF-style routing: masked_fill -> softmax in fp32 -> topk -> renormalize."""
    logits = inp["logits"].masked_fill(inp["mask"], float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, idx = torch.topk(probs, inp["top_k"], dim=-1)
    return w / w.sum(dim=-1, keepdim=True), idx


def torch_ref(inp: dict):
    return route_reference(inp["logits"], inp["top_k"], renormalize=True, expert_mask=inp["mask"])


def triton_masked(inp: dict):
    return fused_route(inp["logits"], inp["top_k"], renormalize=True, expert_mask=inp["mask"], backend="triton")


def fused_unmasked(inp: dict):
    return fused_route(inp["logits"], inp["top_k"], renormalize=True, backend="triton")


PROVIDERS = {"eager": eager, "torch_ref": torch_ref, "triton": triton_masked, "fused_unmasked": fused_unmasked}
GPU_ONLY = {"triton", "fused_unmasked"}


def time_ms(fn, inp: dict, device: str, min_time_s: float = 0.2) -> float:
    """Median time of one call in milliseconds."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(lambda: fn(inp), warmup=25, rep=100, return_mode="median"))
    fn(inp)
    times = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < 1000):
        t = time.perf_counter()
        fn(inp)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def min_bytes(T: int, E: int, K: int, dtype: torch.dtype) -> int:
    return T * E * dtype.itemsize + T * K * (4 + 4) + T * 4


def run(Ts, Es, Ks, dtype, device, providers) -> list[dict]:
    rows = []
    for E in Es:
        for K in Ks:
            if K > E - max(1, E // 8):
                continue
            for T in Ts:
                inp = make_inputs(T, E, K, dtype, device)
                base = None
                for name in providers:
                    ms = time_ms(PROVIDERS[name], inp, device)
                    if name == "eager":
                        base = ms
                    rows.append({"provider": name, "T": T, "E": E, "K": K, "ms": ms,
                                 "gbps": min_bytes(T, E, K, dtype) / (ms * 1e-3) / 1e9,
                                 "vs_eager": (base / ms) if base else float("nan")})
    return rows


def markdown(rows: list[dict], dtype_name: str, device_name: str) -> str:
    out = [f"Routing, softmax + renorm + 1 expert mask, {dtype_name} logits, device: {device_name}", "",
           "| provider | T | E | K | time (us) | GB/s | vs eager |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['provider']} | {r['T']:,} | {r['E']} | {r['K']} | {r['ms'] * 1e3:,.1f} | "
                   f"{r['gbps']:.2f} | {r['vs_eager']:.2f}x |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--T", type=ints, default=[1, 64, 4096, 65536], help="token counts (comma separated)")
    ap.add_argument("--E", type=ints, default=[8, 64, 128, 256], help="expert counts")
    ap.add_argument("--K", type=ints, default=[2, 8], help="top-k values")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--providers", default=None, help=f"comma separated subset of {','.join(PROVIDERS)}")
    ap.add_argument("--quick", action="store_true", help="tiny grid (T 1,64; E 8,64; K 2) to check the script")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    args = ap.parse_args(argv)
    if args.quick:
        args.T, args.E, args.K = [1, 64], [8, 64], [2]
    on_gpu = args.device.startswith("cuda")
    providers = args.providers.split(",") if args.providers else [p for p in PROVIDERS if on_gpu or p not in GPU_ONLY]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        ap.error(f"--providers: unknown {unknown}, expected a subset of {list(PROVIDERS)}")
    if not on_gpu and any(p in GPU_ONLY for p in providers):
        ap.error(f"--providers: {sorted(GPU_ONLY & set(providers))} need --device cuda")
    if "eager" in providers:  # the baseline first, so every row has its ratio
        providers = ["eager"] + [p for p in providers if p != "eager"]
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name(args.device) if on_gpu else f"cpu, {torch.get_num_threads()} threads"
    rows = run(args.T, args.E, args.K, DTYPES[args.dtype], args.device, providers)
    cmd = "Command: `.venv/bin/python bench/bench_routing.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
    text = cmd.rstrip() + "\n\n" + markdown(rows, args.dtype, device_name) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

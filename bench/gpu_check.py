"""One command for a CUDA machine: the routing kernel run natively, its bandwidth against a copy,
masking's and capture's overheads, and torch.compile under ablate; one results table.

    make gpu-check                            # python bench/gpu_check.py --out bench/gpu_check.md
    python bench/gpu_check.py --dry-run       # every step on the CPU with tiny shapes (tests/test_gpu_check.py)

Installs nothing: it uses the torch and Triton of the Python that runs it. Where moetrace is not
installed, the repository's folders are imported as the package (``engine/`` as ``moetrace``,
``kernels/`` as ``moetrace.kernels``, as setup.py maps them). A step that cannot run (a module
the machine lacks) is a row saying so; the others still run. Steps:

1. ``kernel tests``: ``tests/test_routing_kernel.py`` with Triton compiled for the GPU (no
   ``TRITON_INTERPRET``); the dry run collects the file and runs its quick reference tests.
2. ``routing``: ``bench/bench_routing.py``'s providers at T = 65536, E = 128, K = 8 in bf16 and
   fp32 (eager HF-style routing, the torch reference, the Triton kernel masked and unmasked),
   in GB/s of the bytes the op must move, beside a device-to-device copy moving as many bytes.
3. ``model``: forward time of a random-weight model of OLMoE-1B-7B's layer shape (hidden 2048,
   64 experts, top-8; 2 layers), unpatched, inside an empty ``intervene`` and inside ``capture``.
4. ``compile``: the same model compiled with torch.compile (inductor) under ``ablate``: logits
   equal to eager under the same ablation, and the time of both.

The targets (>= 80% of copy bandwidth, masking <= 10% over the unmasked kernel, >= 10x eager HF
routing, capture <= 3% of a forward) are what the table is measured against, not claims.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def import_moetrace() -> None:
    """``import moetrace`` as installed, else from the repository's folders (setup.py's mapping)."""
    if importlib.util.find_spec("moetrace") is not None:
        return
    for name, folder in (("moetrace", ROOT / "engine"), ("moetrace.kernels", ROOT / "kernels")):
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


# ------------------------------------------------------------------------------------------- steps


def kernel_tests(dry: bool) -> list[tuple]:
    for needed in ("pytest", "hypothesis"):
        if importlib.util.find_spec(needed) is None:
            raise ImportError(f"No module named {needed!r}", name=needed)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if dry:  # the CPU has only the interpreter: the quick reference tests prove the invocation
        env["TRITON_INTERPRET"] = "1"
        select = ["-k", "reference_matches_eager or worked_example_interventions"]
    else:
        select = []
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *select,
                           str(ROOT / "tests" / "test_routing_kernel.py")], capture_output=True, text=True, env=env,
                          cwd=str(ROOT))
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return [("kernel tests", "tests/test_routing_kernel.py" + (" (quick subset, interpreter)" if dry else ", native"),
             last, "all pass", "ok" if proc.returncode == 0 else "FAILED", time.perf_counter() - t0)]


def routing(dry: bool, device: str) -> list[tuple]:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_routing as br

    T, E, K = (256, 16, 4) if dry else (65536, 128, 8)
    providers = ["eager", "torch_ref"] + ([] if dry else ["triton", "fused_unmasked"])
    rows = []
    for dtype_name in ("bf16", "fp32"):
        dtype = br.DTYPES[dtype_name]
        inp = br.make_inputs(T, E, K, dtype, device)
        moved = br.min_bytes(T, E, K, dtype)
        src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = br.time_ms(lambda _: dst.copy_(src), inp, device)  # reads and writes `moved` bytes in all
        copy_gbps = moved / (copy_ms * 1e-3) / 1e9
        ms = {p: br.time_ms(br.PROVIDERS[p], inp, device) for p in providers}
        gbps = {p: moved / (ms[p] * 1e-3) / 1e9 for p in providers}
        where = f"T={T}, E={E}, K={K}, {dtype_name}"
        rows.append(("routing", f"copy of the same bytes, {where}", f"{copy_gbps:.1f} GB/s", "-", "measured", 0.0))
        for p in providers:
            rows.append(("routing", f"{p}, {where}", f"{gbps[p]:.1f} GB/s ({gbps[p] / copy_gbps:.0%} of copy; "
                         f"{ms['eager'] / ms[p]:.1f}x eager)", ">= 80% of copy" if p == "triton" else "-",
                         _verdict(gbps[p] / copy_gbps >= 0.8) if p == "triton" else "measured", 0.0))
        if "triton" in ms:
            over = ms["triton"] / ms["fused_unmasked"] - 1
            rows.append(("routing", f"masking over the unmasked kernel, {where}", f"{over:+.1%}", "<= +10%",
                         _verdict(over <= 0.10), 0.0))
            rows.append(("routing", f"Triton vs eager HF masked routing, {where}", f"{ms['eager'] / ms['triton']:.1f}x",
                         ">= 10x", _verdict(ms["eager"] / ms["triton"] >= 10), 0.0))
    return rows


def _model(dry: bool, device: str):
    import torch
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    size = (dict(hidden_size=64, intermediate_size=64, num_experts=8, num_experts_per_tok=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256) if dry else
            dict(hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
                 num_attention_heads=16, num_key_value_heads=16, vocab_size=50304))
    config = OlmoeConfig(num_hidden_layers=2, eos_token_id=None, pad_token_id=0, **size)
    dtype = torch.float32 if dry else torch.bfloat16
    model = OlmoeForCausalLM(config).to(device=device, dtype=dtype).eval()
    batch, seq = (2, 16) if dry else (8, 512)
    ids = torch.randint(3, config.vocab_size, (batch, seq), device=device)
    return model, ids


def _median_ms(fn, device: str, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def model_overhead(dry: bool, device: str) -> list[tuple]:
    import torch

    from moetrace.capture import capture
    from moetrace.intervene import intervene
    from moetrace.targets import Targets

    model, ids = _model(dry, device)
    repeats = 3 if dry else 20
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        model(ids)
        base = _median_ms(lambda: model(ids), device, repeats)
        with intervene(model, Targets()):
            model(ids)
            empty = _median_ms(lambda: model(ids), device, repeats)
        with capture(model, Path(tmp) / "t.zarr") as cap:
            cap.set_batch()
            model(ids)
            captured = []
            for _ in range(repeats):  # a new batch per forward, as a real capture does
                cap.set_batch()
                captured.append(_median_ms(lambda: model(ids), device, 1))
            cap_ms = statistics.median(captured)
    shape = f"{model.config.num_hidden_layers} layers, {model.config.num_experts} experts x {model.config.hidden_size}, " \
            f"{ids.numel():,} tokens"
    return [("model", f"unpatched forward ({shape})", f"{base:.2f} ms", "-", "measured", 0.0),
            ("model", "empty intervene", f"{empty / base - 1:+.1%}", "-", "measured", 0.0),
            ("model", "capture", f"{cap_ms / base - 1:+.1%}", "<= +3%", _verdict(cap_ms / base - 1 <= 0.03), 0.0)]


def compile_ablate(dry: bool, device: str) -> list[tuple]:
    import torch

    from moetrace.intervene import ablate, router_sites

    model, ids = _model(dry, device)
    layer = router_sites(model)[0].layer_id
    with torch.no_grad(), ablate(model, experts={layer: [0, 1]}):
        want = model(ids).logits
        eager_ms = _median_ms(lambda: model(ids), device, 3 if dry else 10)
        compiled = torch.compile(model, backend="aot_eager" if dry else "inductor")
        got = compiled(ids).logits
        compiled_ms = _median_ms(lambda: compiled(ids), device, 3 if dry else 10)
    tol = 1e-4 if dry else 5e-2
    same = bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))
    return [("compile", f"torch.compile ({'aot_eager' if dry else 'inductor'}) under ablate: logits equal eager",
             f"max abs difference {float((got.float() - want.float()).abs().max()):.2e}", f"<= {tol:g}", _verdict(same), 0.0),
            ("compile", "compiled vs eager forward under ablate", f"{compiled_ms:.2f} vs {eager_ms:.2f} ms", "-",
             "measured", 0.0)]


def _verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


STEPS = (("kernel tests", kernel_tests), ("routing", routing), ("model", model_overhead), ("compile", compile_ablate))


# ------------------------------------------------------------------------------------------- main


def run(dry: bool) -> list[tuple]:
    """Every step's rows (step, measure, value, target, verdict, seconds); a step that raises is one row."""
    import torch

    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (torch.cuda.is_available() is False); --dry-run runs on the CPU")
    rows = []
    for name, step in STEPS:
        t0 = time.perf_counter()
        try:
            got = step(dry) if step is kernel_tests else step(dry, device)
        except ImportError as exc:
            got = [(name, "not run", f"missing module: {exc.name or exc}", "-", "not run", 0.0)]
        except Exception as exc:  # noqa: BLE001 - one row per failed step; the others still run
            traceback.print_exc()
            got = [(name, "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", "-",
                    "FAILED", 0.0)]
        spent = time.perf_counter() - t0
        rows += [(*r[:5], spent if i == 0 else 0.0) for i, r in enumerate(got)]
        print(f"[gpu-check] {name}: {spent:.0f} s", file=sys.stderr, flush=True)
    return rows


def table(rows: list[tuple], header: str) -> str:
    out = [header, "", "| step | measure | value | target | verdict | s |", "|---|---|---|---|---|---|"]
    out += [f"| {s} | {m} | {v} | {t} | {d} | {sec:.0f} |" for s, m, v, t, d, sec in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU with tiny shapes")
    p.add_argument("--out", type=Path, default=None, help="also write the table here (Markdown)")
    args = p.parse_args(argv)
    import_moetrace()
    import torch

    import triton

    device = "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name()
    header = (f"GPU check on {device}: torch {torch.__version__}, triton {triton.__version__}, "
              f"{time.strftime('%Y-%m-%d')}; `python bench/gpu_check.py{' --dry-run' if args.dry_run else ''}`")
    rows = run(args.dry_run)
    text = table(rows, header)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 1 if any(r[4] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

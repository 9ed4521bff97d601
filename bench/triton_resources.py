"""Registers, shared memory, spills and implied occupancy of the routing kernels, compiled for sm_80/sm_90.

    .venv/bin/python bench/triton_resources.py [--matrix cover|full] [--arch 80,90]
        [--E 8,64,128,256,384,512] [--workers N] [--out table.md] [--deepseek-alternatives]

No GPU needed: ``moetrace.devtools.routing_compile`` records the launches the real launchers make
(constexprs, block sizes, ``num_warps``, argument specialization), compiles each with Triton's
bundled ptxas for the target and reads ``cuobjdump --dump-resource-usage``. Occupancy = resident
warps per SM / 64, from registers (65536 per SM, allocated per warp in units of 256), shared
memory (static + Triton's dynamic + 1 KiB reserved per block) and the 64-warp / 32-block limits.
"barriers" counts block-wide barriers (``bar.sync``) in the PTX: reductions across warps.
Nothing is timed.

Prints a summary per (kernel, arch, E) (the full per-launch table goes to ``--out``), and with
``--deepseek-alternatives`` the DeepSeek-V3 forward (sigmoid, bias, E = 256, 8 groups / 4,
K = 8, renormalized, no intervention) at other BLOCK_T / num_warps (``--matrix none``: only that).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moetrace.devtools import routing_compile as rc  # noqa: E402


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(","))


def _flags(spec: rc.LaunchSpec) -> str:
    c = spec.const
    on = [k.removeprefix("HAS_").lower() for k, v in c.items() if k.startswith("HAS_") and v]
    head = ("sigmoid" if c["SIGMOID"] else "softmax") + ("+renorm" if c["RENORM"] else "")
    if c.get("N_GROUP"):
        head += f",groups{c['N_GROUP']}/{c['TOPK_GROUP']}"
    return ",".join([head] + on + (["zero"] if c["ZERO_MODE"] else []))


def _row(kernel, arch, E, flags, block_t, nw, r: rc.Resources) -> str:
    occ = r.occupancy(arch)
    return (f"| {kernel} | sm_{arch} | {E} | {flags} | {block_t} | {nw} | {r.registers} | "
            f"{r.static_shared + r.dynamic_shared} | {r.barriers} | {'yes' if r.spills else 'no'} | "
            f"{occ['blocks']} x {nw} = {occ['warps']} | {occ['occupancy']:.1%} ({occ['limit']}) |")


HEADER = ("| kernel | arch | E | flags | BLOCK_T | warps | regs/thread | shared B/block | barriers | spills | "
          "blocks x warps per SM | occupancy (limit) |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def deepseek_alternatives(workers: int):
    """Both DeepSeek-V3 kernels as launched on sm_80/sm_90, then the forward on sm_90 at BLOCK_T x num_warps in 1..8."""
    d = rc.DEEPSEEK_V3
    o = rc.Options(scoring="sigmoid", renormalize=True, bias=True, n_group=d["n_group"], topk_group=d["topk_group"])
    fwd, bwd = rc.launch_specs(o, d["E"], d["K"])
    launched = [(arch, spec, {"num_warps": spec.num_warps, "BLOCK_T": spec.const["BLOCK_T"]})
                for arch in rc.ARCHS for spec in (fwd, bwd)]
    items = launched + [(90, fwd, {"num_warps": nw, "BLOCK_T": bt}) for bt in (1, 2, 4, 8) for nw in (1, 2, 4, 8)]
    res = rc.compile_many(items, workers)
    lines = [HEADER]
    for (arch, spec, kw), r in zip(items, res):
        lines.append(_row(spec.kernel, arch, d["E"], _flags(spec), kw["BLOCK_T"], kw["num_warps"], r))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--matrix", choices=("cover", "full", "none"), default="cover")
    ap.add_argument("--arch", type=_ints, default=rc.ARCHS)
    ap.add_argument("--E", type=_ints, default=rc.EXPERTS)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the per-launch table here")
    ap.add_argument("--deepseek-alternatives", action="store_true")
    a = ap.parse_args(argv)

    bad = 0
    if a.matrix != "none":
        bad = matrix_report(a)
    if a.deepseek_alternatives:
        t3 = time.perf_counter()
        print("\nDeepSeek-V3 (sigmoid, bias, E=256, 8 groups / 4, K=8, renorm, no intervention): the launches "
              "(first 4 rows), then the forward at other BLOCK_T / num_warps:\n")
        print(deepseek_alternatives(a.workers or rc.os.cpu_count() or 1))
        print(f"\n({time.perf_counter() - t3:.0f} s)")
    return 1 if bad else 0


def matrix_report(a) -> int:
    """Compile the matrix, print the per-(kernel, arch, E) summary; the number of launches with local memory."""
    t0 = time.perf_counter()
    items = rc.matrix(a.arch, a.E, a.matrix)
    t1 = time.perf_counter()
    res = rc.compile_many([(arch, spec) for arch, E, spec, o in items], a.workers)
    t2 = time.perf_counter()
    print(f"{len(items)} launches ({a.matrix} matrix): recorded in {t1 - t0:.0f} s, compiled in {t2 - t1:.0f} s "
          f"({a.workers or rc.os.cpu_count()} workers)\n")

    rows = [HEADER]
    groups = defaultdict(list)
    for (arch, E, spec, o), r in zip(items, res):
        c = spec.const
        rows.append(_row(spec.kernel, arch, E, _flags(spec), c["BLOCK_T"], spec.num_warps, r))
        groups[(spec.kernel, arch, E, c["BLOCK_T"], spec.num_warps)].append((r, _flags(spec)))
    if a.out:
        a.out.write_text("\n".join(rows) + "\n")

    print("| kernel | arch | E | BLOCK_T | warps | launches | regs/thread min-max | shared B/block max | "
          "barriers max | spills | occupancy min-max | heaviest flags |\n" + "|---" * 12 + "|")
    for (kernel, arch, E, bt, nw), rs in groups.items():
        regs = [r.registers for r, _ in rs]
        occ = [r.occupancy(arch)["occupancy"] for r, _ in rs]
        heavy = max(rs, key=lambda x: x[0].registers)[1]
        spills = sum(r.spills for r, _ in rs)
        shared = max(r.static_shared + r.dynamic_shared for r, _ in rs)
        print(f"| {kernel} | sm_{arch} | {E} | {bt} | {nw} | {len(rs)} | {min(regs)}-{max(regs)} | {shared} | "
              f"{max(r.barriers for r, _ in rs)} | {spills} | "
              f"{min(occ):.1%}-{max(occ):.1%} | {heavy} |")
    bad = sum(r.spills for r in res)
    print(f"\nlaunches with local memory (spills or stack): {bad} of {len(res)}")
    return bad


if __name__ == "__main__":
    raise SystemExit(main())

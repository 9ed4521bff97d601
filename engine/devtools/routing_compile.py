"""Compile the routing kernels for real CUDA targets without a GPU, and read their resource use.

The Triton interpreter (how the tests run the kernels on a CPU) accepts code that a real
compile can reject or that spills registers to local memory. This module compiles
``_route_kernel`` and ``_route_backward_kernel`` to a cubin for a given architecture
(``triton.compile`` with ``GPUTarget("cuda", arch, 32)``; Triton's bundled ``ptxas`` needs no
device) and reads registers, stack, local and shared memory with the bundled ``cuobjdump
--dump-resource-usage``.

Nothing here copies the launchers: ``launch_specs`` runs the real launchers
(``route_forward`` / ``route_backward``) on CPU tensors under the interpreter with a Triton
pre-run hook that records the arguments and the constexprs they pass and stops before the
kernel body runs. The signature (pointer dtypes, int widths, divisibility) comes from Triton's
own argument specializer; ``num_warps``, which the interpreter drops, comes from
``_launch_config``, the function both launchers call.

Used by ``tests/test_triton_compile.py`` and ``bench/triton_resources.py``.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import torch
import triton

from moetrace.kernels import routing

ARCHS = (80, 90)
EXPERTS = (8, 64, 128, 256, 384, 512)
DEEPSEEK_V3 = dict(E=256, K=8, scoring="sigmoid", bias=True, n_group=8, topk_group=4, renormalize=True)

# per-SM limits of sm_80 (A100) and sm_90 (H100/H200), CUDA occupancy calculator values
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
SHARED_PER_SM = {80: 164 * 1024, 90: 228 * 1024}
SHARED_RESERVED_PER_BLOCK = 1024  # the CUDA runtime's per-block reservation (sm_80 and later)
SHARED_ALLOC_UNIT = 128


class _Recorded(Exception):
    """Raised by the pre-run hook once it has the launch's arguments: the kernel body never runs."""


@dataclass(frozen=True)
class Options:
    """The user-level routing options that decide the kernels' constexprs (tensors built per E)."""

    scoring: str = "softmax"
    renormalize: bool = False
    bias: bool = False
    n_group: int | None = None
    topk_group: int | None = None
    mask_mode: str = "reroute"
    expert_mask: bool = False
    path: bool = False
    pair: bool = False
    boost: bool = False
    scale: bool = False

    def label(self) -> str:
        parts = [self.scoring + ("+renorm" if self.renormalize else "")]
        if self.n_group:
            parts.append(f"groups{self.n_group}/{self.topk_group}")
        parts += [n for n in ("bias", "boost", "scale", "path", "pair") if getattr(self, n)]
        if self.expert_mask:
            parts.append("mask")
        if self.mask_mode == "zero":
            parts.append("zero")
        return ",".join(parts)


def default_groups(E: int, K: int) -> tuple[int, int]:
    """(n_group, topk_group) for group-limited selection at E experts: DeepSeek-V3's 8/4 where it fits."""
    n_group = 8 if E % 8 == 0 and E // 8 >= 2 else E // 2
    topk_group = max(n_group // 2, -(-K // (E // n_group)))
    return n_group, topk_group


def option_space(E: int, K: int, matrix: str = "full"):
    """Every combination of options that changes a constexpr the launchers pass.

    ``matrix="full"``: the whole product (scoring x renormalize x mask_mode x bias/n_group for
    sigmoid x each optional input). ``"cover"``: for each structural choice (scoring,
    renormalize, mask_mode, n_group) only "no optional input" and "every optional input" (the
    slow suite's covering design is :func:`pairwise_options`, through ``matrix(kind="pairs")``).
    """
    n_group, topk_group = default_groups(E, K)
    optional = ["boost", "scale", "expert_mask", "path"] + (["pair"] if K >= 2 else [])
    for scoring, renorm, zero in itertools.product(("softmax", "sigmoid"), (False, True), (False, True)):
        extra = ["bias"] if scoring == "sigmoid" else []
        groups = [(None, None), (n_group, topk_group)] if scoring == "sigmoid" else [(None, None)]
        names = optional + extra
        for g, tg in groups:
            if matrix == "full":
                picks = itertools.product((False, True), repeat=len(names))
            else:
                picks = [(False,) * len(names), (True,) * len(names)]
            for pick in picks:
                yield Options(scoring=scoring, renormalize=renorm, mask_mode="zero" if zero else "reroute",
                              n_group=g, topk_group=tg, **dict(zip(names, pick)))


#: The option fields a covering design pairs up (``n_group`` stands for group-limited selection).
_FACTORS = ("scoring", "renormalize", "mask_mode", "n_group", "bias", "boost", "scale", "expert_mask", "path",
            "pair")


def pairwise_options(E: int, K: int, archs: tuple = ()) -> list:
    """A covering design of ``option_space(E, K, "full")``: every pair of values of two options that
    can occur together (scoring, renormalize, mask mode, groups, each optional input) is in at least
    one returned Options. Greedy (each step takes the first candidate that covers the most pairs not
    yet covered), so the list is the same every run: 9 Options where the full product has 640.

    ``archs``: the architecture is one more factor; returns ``(arch, Options)`` pairs, so each
    option value is compiled for every architecture without compiling every Options for each.
    """
    candidates = [(arch, o) for o in option_space(E, K, "full") for arch in (archs or (None,))]

    def pairs(candidate) -> frozenset:
        arch, o = candidate
        values = [("arch", arch)] + [(name, getattr(o, name)) for name in _FACTORS]
        return frozenset((a, b) for i, a in enumerate(values) for b in values[i + 1:])

    covers = [pairs(c) for c in candidates]
    todo = set().union(*covers)
    chosen = []
    while todo:
        best = max(range(len(candidates)), key=lambda i: len(covers[i] & todo))
        chosen.append(candidates[best])
        todo -= covers[best]
    return chosen if archs else [o for _, o in chosen]


def _inputs(o: Options, T: int, E: int, K: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(T, E, generator=g).to(dtype)
    kw = dict(renormalize=o.renormalize, scoring=o.scoring, n_group=o.n_group, topk_group=o.topk_group,
              mask_mode=o.mask_mode)
    if o.bias:
        kw["bias"] = torch.randn(E, generator=g) * 0.1
    if o.boost:
        kw["logit_boost"] = torch.zeros(E)
    if o.scale:
        kw["weight_scale"] = torch.ones(E)
    if o.expert_mask:
        m = torch.zeros(T, E, dtype=torch.bool)
        m[:, 0] = True
        kw["expert_mask"] = m
    if o.path:
        table = torch.zeros(E, E, dtype=torch.bool)
        table[:, E - 1] = True
        kw["path_table"], kw["prev_top1"] = table, torch.zeros(T, dtype=torch.int32)
    if o.pair:
        kw["pair_table"] = torch.zeros(E, E, dtype=torch.bool)
    return logits, kw


@dataclass(frozen=True)
class LaunchSpec:
    """One kernel launch as the launcher makes it: what ``triton.compile`` needs."""

    kernel: str  # "forward" or "backward"
    signature: tuple  # ((name, type), ...) incl. "constexpr"
    constexprs: tuple  # ((name, value), ...)
    attrs: tuple  # ((index, spec), ...)
    num_warps: int

    @property
    def const(self) -> dict:
        return dict(self.constexprs)


def _record(kernel_name: str, jit_kernel, call, cfg: dict) -> LaunchSpec:
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    interp = routing._interpreted(jit_kernel)
    seen = {}

    def hook(*args, **kwargs):
        seen["args"], seen["kwargs"] = args, kwargs
        raise _Recorded

    interp.add_pre_run_hook(hook)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        call()
    except _Recorded:
        pass
    finally:
        interp.pre_run_hooks.remove(hook)
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    if "args" not in seen:
        raise RuntimeError(f"{kernel_name}: the launcher returned without launching the kernel")
    names = interp.arg_names
    args, kwargs = seen["args"], seen["kwargs"]
    for k in ("BLOCK_T", "BLOCK_E", "BLOCK_K"):
        assert kwargs[k] == cfg[k], f"{kernel_name}: launched {k} = {kwargs[k]}, _launch_config says {cfg[k]}"
    sig, attrs = [], []
    for i, (name, arg) in enumerate(zip(names, args)):
        ty, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        if isinstance(arg, torch.Tensor):
            spec = "D"  # CUDA allocations are 256-byte aligned; the CPU stand-ins may not be
        sig.append((name, ty))
        if ty == "constexpr":
            kwargs = {**kwargs, name: spec}
        elif spec:
            attrs.append((i, spec))
    sig += [(name, "constexpr") for name in names[len(args):]]
    const = tuple((name, kwargs[name]) for name, ty in sig if ty == "constexpr")
    return LaunchSpec(kernel_name, tuple(sig), const, tuple(attrs), cfg["num_warps"])


def launch_specs(o: Options, E: int, K: int, T: int = 4096, dtype: torch.dtype = torch.bfloat16):
    """(forward, backward) LaunchSpec the launchers produce for these options on [T, E] logits, top K."""
    logits, kw = _inputs(o, T, E, K, dtype)
    opts = routing.route_options(logits, K, **kw)
    cfg = routing._launch_config(T, E, K)
    fwd = _record("forward", routing._route_kernel, lambda: routing.route_forward(logits, opts), cfg)
    dropped = torch.full((T,), -1, dtype=torch.int32) if fwd.const["HAS_PAIR"] else None
    state = routing.RouteState(dropped, torch.full((T,), K, dtype=torch.int32))
    experts = torch.arange(K, dtype=torch.int32).repeat(T, 1)
    grad_w = torch.ones(T, K)
    bwd = _record("backward", routing._route_backward_kernel,
                  lambda: routing.route_backward(grad_w, logits, experts, state, opts), cfg)
    return fwd, bwd


def tool(name: str) -> str | None:
    """Path of Triton's bundled ``ptxas``/``cuobjdump`` (or one on PATH), None if absent."""
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.isfile(bundled) and os.access(bundled, os.X_OK):
        return bundled
    return shutil.which(name)


@dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    stack: int  # bytes per thread
    local: int  # bytes per thread (spills live here)
    static_shared: int  # bytes per block, from the cubin
    dynamic_shared: int  # bytes per block, Triton's launch-time shared memory
    num_warps: int
    barriers: int  # block-wide barriers in the PTX (cross-warp reductions and layout changes)

    @property
    def spills(self) -> bool:
        return self.local > 0 or self.stack > 0

    def occupancy(self, arch: int) -> dict:
        """Resident warps per SM and what limits them (registers, shared memory, warps, blocks)."""
        regs_per_warp = -(-self.registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
        by_regs = (REGS_PER_SM // regs_per_warp) // self.num_warps
        shared = self.static_shared + self.dynamic_shared + SHARED_RESERVED_PER_BLOCK
        shared = -(-shared // SHARED_ALLOC_UNIT) * SHARED_ALLOC_UNIT
        by_shared = SHARED_PER_SM[arch] // shared
        by_warps = MAX_WARPS_PER_SM // self.num_warps
        blocks = min(by_regs, by_shared, by_warps, MAX_BLOCKS_PER_SM)
        limits = {"warps": by_warps, "blocks": MAX_BLOCKS_PER_SM, "registers": by_regs, "shared": by_shared}
        limit = min(limits, key=lambda k: limits[k])
        warps = blocks * self.num_warps
        return dict(blocks=blocks, warps=warps, occupancy=warps / MAX_WARPS_PER_SM, limit=limit)


def _jit(kernel):
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


_KERNELS = {"forward": routing._route_kernel, "backward": routing._route_backward_kernel}


def compile_spec(spec: LaunchSpec, arch: int, num_warps: int | None = None, options: dict | None = None,
                 **const) -> Resources:
    """Compile ``spec`` for sm_<arch> (overriding num_warps / constexprs if given) and read its resources.

    ``options``: more ``triton.compile`` options (e.g. ``maxnreg``).

    Raises whatever ``triton.compile`` raises (a CompilationError, or PTXASError when ptxas
    rejects the code). Needs a process where Triton was imported without TRITON_INTERPRET
    (``compile_many`` starts such processes).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit(_KERNELS[spec.kernel])
    parse = lambda s: [["tt.divisibility", 16]] if "D" in s else []  # noqa: E731  (BaseBackend.parse_attr)
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs={**spec.const, **const},
                    attrs={(i,): parse(s) for i, s in spec.attrs})
    nw = num_warps or spec.num_warps
    ck = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={**(options or {}), "num_warps": nw})
    usage = read_resource_usage(ck.asm["cubin"])
    barriers = len(re.findall(r"\b(?:bar|barrier)\.sync\b", ck.asm["ptx"]))
    return Resources(usage["REG"], usage["STACK"], usage["LOCAL"], usage["SHARED"], ck.metadata.shared, nw, barriers)


def read_resource_usage(cubin: bytes) -> dict:
    """``cuobjdump --dump-resource-usage`` of one cubin -> {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}."""
    exe = tool("cuobjdump")
    if exe is None:
        raise FileNotFoundError("cuobjdump: not bundled with Triton and not on PATH")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {k: int(fields[k]) for k in ("REG", "STACK", "SHARED", "LOCAL")}


def top_k_for(E: int) -> int:
    """K compiled at E experts: 8 (DeepSeek-V3, Qwen3, OLMoE), 2 at E = 8 (Mixtral)."""
    return 2 if E <= 8 else 8


def matrix(archs=ARCHS, experts=EXPERTS, kind: str = "full", T: int = 4096) -> list[tuple]:
    """[(arch, E, LaunchSpec, Options)] for every distinct launch of both kernels (deduplicated).

    Options that give the same constexprs (e.g. bias and n_group for the backward kernel)
    compile once; the first Options that produced a spec labels it. ``kind="pairs"`` (the slow
    suite's covering design): at each E, :func:`pairwise_options` with the architecture as a
    factor, plus a launch for every other block size and warp count the launcher picks for fewer
    rows (T = 1, 2, 4, ... 128: decoding), each with one of those (arch, Options) in turn.
    """
    out, seen = [], set()

    def add(E: int, o: Options, rows: int, on=archs) -> None:
        for spec in launch_specs(o, E, top_k_for(E), T=rows):
            for arch in on:
                if (arch, spec) not in seen:
                    seen.add((arch, spec))
                    out.append((arch, E, spec, o))

    for E in experts:
        K = top_k_for(E)
        if kind != "pairs":
            for o in option_space(E, K, kind):
                add(E, o, T)
            continue
        # the covering design: the architecture is a factor, each Options compiles for one
        chosen = pairwise_options(E, K, archs=tuple(archs))
        for arch, o in chosen:
            add(E, o, T, on=(arch,))
        configs = {tuple(sorted(routing._launch_config(T, E, K).items()))}
        for rows in (1 << j for j in range(8)):
            config = tuple(sorted(routing._launch_config(rows, E, K).items()))
            if config not in configs:  # each block size and warp count the launcher picks, once
                arch, o = chosen[len(configs) % len(chosen)]
                configs.add(config)
                add(E, o, rows, on=(arch,))
    return out


def _compile_one(item):
    arch, spec, *overrides = item
    return compile_spec(spec, arch, **(overrides[0] if overrides else {}))


def compile_many(items, workers: int | None = None) -> list[Resources]:
    """``compile_spec`` for each ``(arch, LaunchSpec)`` or ``(arch, LaunchSpec, {overrides})``, in order.

    Runs in ``workers`` fresh processes (default: every CPU) started without TRITON_INTERPRET:
    in a process that imported Triton under the interpreter (the test suite does), Triton's own
    library functions (``tl.max``, ``tl.sum``) are interpreter objects and a real compile fails.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    items = list(items)
    workers = max(1, min(workers or os.cpu_count() or 1, len(items)))
    old = os.environ.pop("TRITON_INTERPRET", None)
    try:  # spawned workers copy the environment when the first task is submitted
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            return list(pool.map(_compile_one, items, chunksize=1))
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old

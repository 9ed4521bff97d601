"""The routing kernels compiled for real CUDA targets (sm_80, sm_90) without a GPU.

The other kernel tests run ``_route_kernel`` / ``_route_backward_kernel`` under Triton's CPU
interpreter, which accepts code a real compile may reject. Here Triton's bundled ptxas compiles
the launches the launchers actually make (recorded from ``route_forward`` / ``route_backward``
by ``moetrace.devtools.routing_compile``, block sizes from ``_launch_config``) and ``cuobjdump`` reports
their resources: each must compile, fit on an SM and use no local memory (no register spills,
no stack).

Fast suite: a representative subset (the DeepSeek-V3 router on sm_80 and sm_90, the widest
softmax router with every intervention, the smallest with zero-mode masks; 8 launches and a
control that must spill), 125 s on a cold Triton cache and 63 s warm on the shared 2-core
machine under heavy load. ``-m slow`` (``make test-slow``): every E in ``routing_compile.EXPERTS``
in a covering design ("pairs": every pair of option values, sm_80 / sm_90 among them, and every
block size and warp count the launcher picks at that E: 154 launches in all). ``-m compile_full`` (``make
test-compile-full``, not part of any other target): every combination of options, 896 launches
per E and architecture, hours on 2 cores; see bench/RESULTS.md.
"""

import functools

import pytest
import triton

from moetrace.devtools import routing_compile as rc
from moetrace.kernels.routing import _launch_config

pytestmark = pytest.mark.skipif(
    rc.tool("ptxas") is None or rc.tool("cuobjdump") is None,
    reason="ptxas/cuobjdump: neither bundled with Triton (triton/backends/nvidia/bin) nor on PATH",
)

DSV3 = rc.DEEPSEEK_V3
DEEPSEEK = rc.Options(scoring="sigmoid", renormalize=True, bias=True, n_group=DSV3["n_group"],
                      topk_group=DSV3["topk_group"])
EVERYTHING = dict(boost=True, scale=True, expert_mask=True, path=True, pair=True)

FAST = {
    "sm90-E256-deepseek-v3": (90, 256, DEEPSEEK),
    "sm80-E256-deepseek-v3": (80, 256, DEEPSEEK),
    "sm90-E512-softmax-every-intervention": (90, 512, rc.Options(renormalize=True, **EVERYTHING)),
    "sm90-E8-softmax-zero-mode": (90, 8, rc.Options(mask_mode="zero", **EVERYTHING)),
}
SPILL_CONTROL = {"options": {"maxnreg": 32}}  # the DeepSeek-V3 forward held to 32 registers per thread


def _check(arch: int, E: int, spec: rc.LaunchSpec, r: rc.Resources, label: str) -> None:
    c = spec.const
    # the toolchain decides registers and spills, so the message names it. Known (issue 26, bench/RESULTS.md):
    # with Triton 3.9.0's bundled ptxas one sm_80 launch of the full matrix spills 4 B (E = 64, bf16,
    # sigmoid + renorm, groups 8/4, path + mask + zero, BLOCK_T = 32, num_warps = 8)
    where = (f"{spec.kernel} kernel, sm_{arch}, E = {E}, {label}, BLOCK_T = {c['BLOCK_T']}, "
             f"num_warps = {spec.num_warps}; Triton {triton.__version__}, ptxas {rc.tool('ptxas')}")
    assert not r.spills, f"{where}: {r.local} B local memory and {r.stack} B stack per thread (register spills)"
    assert r.registers <= 255, f"{where}: {r.registers} registers per thread"
    assert r.occupancy(arch)["blocks"] >= 1, f"{where}: a block does not fit on an SM: {r}"


@pytest.fixture(scope="module")
def fast():
    """{id: [(spec, Resources), ...]} for FAST, plus "spill-control": every compile in one pool of 2 processes."""
    jobs = []
    for key, (arch, E, options) in FAST.items():
        for spec in rc.launch_specs(options, E, rc.top_k_for(E)):
            jobs.append((key, (arch, spec)))
    fwd, _ = rc.launch_specs(DEEPSEEK, DSV3["E"], DSV3["K"])
    jobs.append(("spill-control", (90, fwd, SPILL_CONTROL)))
    out = {}
    for (key, item), r in zip(jobs, rc.compile_many([item for _, item in jobs], workers=2)):
        out.setdefault(key, []).append((item[1], r))
    return out


@pytest.mark.parametrize("key", FAST)
def test_launches_compile_without_spills(fast, key):
    arch, E, options = FAST[key]
    largest = _launch_config(1 << 30, E, rc.top_k_for(E))
    assert [spec.kernel for spec, _ in fast[key]] == ["forward", "backward"]
    for spec, r in fast[key]:
        # T = 4096 reaches the launcher's largest BLOCK_T
        assert spec.const["BLOCK_T"] == largest["BLOCK_T"] and spec.num_warps == largest["num_warps"]
        _check(arch, E, spec, r, options.label())


def test_the_check_sees_spills(fast):
    """The same DeepSeek-V3 forward held to 32 registers per thread spills: the check can fail."""
    [(fwd, r)] = fast["spill-control"]
    assert r.registers <= 32 and r.spills, r
    with pytest.raises(AssertionError, match="local memory"):
        _check(90, DSV3["E"], fwd, r, DEEPSEEK.label())


@functools.lru_cache(maxsize=None)
def _specs(E: int, kind: str, archs: tuple = rc.ARCHS):
    """[(arch, E, LaunchSpec, Options)]: each launch with the architecture it compiles for."""
    return rc.matrix(archs=archs, experts=(E,), kind=kind)


def _compile_and_check(items) -> None:
    results = rc.compile_many([(arch, spec) for arch, _, spec, _ in items])
    for (arch, E, spec, o), r in zip(items, results):
        _check(arch, E, spec, r, o.label())


@pytest.mark.slow
@pytest.mark.parametrize("E", rc.EXPERTS)
def test_every_launch_compiles_without_spills(E):
    """The covering design at this E: every pair of option values (the architecture one of them)
    and every block size and warp count the launcher picks (22 to 32 launches)."""
    _compile_and_check(_specs(E, "pairs"))


@pytest.mark.compile_full
@pytest.mark.parametrize("E", rc.EXPERTS)
@pytest.mark.parametrize("arch", rc.ARCHS)
def test_every_combination_compiles_without_spills(arch, E):
    """Every combination of options (make test-compile-full; hours on 2 cores)."""
    _compile_and_check(_specs(E, "full", (arch,)))


def test_the_covering_design_covers_every_pair_and_launch_configuration():
    """Each pair of values of two options (the architecture one of them) that the full matrix has is
    compiled, and so is every (BLOCK_T, num_warps) the launcher picks at an E for any number of rows."""
    def pairs(candidates):
        out = set()
        for arch, o in candidates:
            values = [("arch", arch)] + [(name, getattr(o, name)) for name in rc._FACTORS]
            out |= {(a, b) for i, a in enumerate(values) for b in values[i + 1:]}
        return out

    for E in rc.EXPERTS:
        K = rc.top_k_for(E)
        full = [(arch, o) for o in rc.option_space(E, K, "full") for arch in rc.ARCHS]
        chosen = rc.pairwise_options(E, K, archs=rc.ARCHS)
        assert len(chosen) <= 12 < len(full)
        assert pairs(chosen) == pairs(full)
        compiled = {(arch, o) for arch, _, _, o in _specs(E, "pairs")}
        assert set(chosen) <= compiled
        wanted = {(c["BLOCK_T"], c["num_warps"]) for c in (_launch_config(1 << j, E, K) for j in range(14))}
        launched = {(spec.const["BLOCK_T"], spec.num_warps) for _, _, spec, _ in _specs(E, "pairs")}
        assert wanted <= launched, (E, wanted - launched)

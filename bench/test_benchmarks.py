"""pytest-benchmark suite: the hot paths at a size that runs in about a minute.

    .venv/bin/python -m pytest bench/test_benchmarks.py --benchmark-only [--benchmark-compare]

Not part of `make test` (testpaths is tests/); the full-size numbers in bench/RESULTS.md come
from the scripts beside this file. Each group compares providers on the same data.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moetrace.counting import count
from moetrace.store import TraceStore
from moetrace.kernels.counting import STATS
from moetrace.synthetic import TraceSpec, write_store
from moetrace.kernels.routing import route_reference

SPEC = TraceSpec(n_tokens=262_144, n_layers=16, n_experts=64, top_k=8, seq_len=256, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "trace.zarr"
    write_store(path, SPEC, progress=False)
    return TraceStore.open(path)


@pytest.mark.benchmark(group="store-read")
def test_read_experts(benchmark, store):
    def read():
        for _ in store.iter_chunks(["experts"]):
            pass
    benchmark(read)
    benchmark.extra_info["routing_rows"] = len(store) * SPEC.n_layers * SPEC.top_k


@pytest.mark.benchmark(group="count")
@pytest.mark.parametrize("stat", [*STATS, "experts,paths,pairs,temporal"])
def test_count(benchmark, store, stat):
    """Every registered statistic (kernels/counting.py), and four in one call."""
    stats = stat.split(",")
    kwargs = {"vocab_size": int(store.read(["token_id"])["token_id"].max()) + 1} if "vocab" in stats else {}
    if "weight_sum" in stats and not store.has_weights:
        pytest.skip("the benchmark store has no routing/weights")
    count(store, stats=stats, by=["domain", "lang"], progress=False, **kwargs)  # compile / warm the cache
    benchmark(lambda: count(store, stats=stats, by=["domain", "lang"], progress=False, **kwargs))
    benchmark.extra_info["routing_rows"] = len(store) * SPEC.n_layers * SPEC.top_k


@pytest.mark.benchmark(group="count")
def test_numpy_bincount_reference(benchmark, store):
    """The plain NumPy way to the same experts counts, for scale."""
    L, K, E = SPEC.n_layers, SPEC.top_k, SPEC.n_experts

    def run():
        out = np.zeros(8 * L * K * E, dtype=np.int64)
        for chunk in store.iter_chunks(["experts", "domain", "lang"]):
            g = (chunk["domain"].astype(np.int64) * 2 + chunk["lang"])[:, None, None]
            idx = ((g * L + np.arange(L)[None, :, None]) * K + np.arange(K)[None, None, :]) * E + chunk["experts"]
            out += np.bincount(idx.reshape(-1), minlength=out.size)
        return out
    benchmark(run)


@pytest.mark.benchmark(group="routing-cpu")
@pytest.mark.parametrize("provider", ["eager", "torch_ref"])
def test_routing(benchmark, provider):
    torch.manual_seed(0)
    logits = torch.randn(4096, 64, dtype=torch.bfloat16)
    mask = torch.zeros(64, dtype=torch.bool)
    mask[:4] = True

    def eager():
        probs = torch.softmax(logits.float().masked_fill(mask, float("-inf")), dim=-1)
        w, e = torch.topk(probs, 8, dim=-1)
        return w / w.sum(-1, keepdim=True), e

    def reference():
        return route_reference(logits, 8, renormalize=True, expert_mask=mask)

    benchmark(eager if provider == "eager" else reference)

"""Numba counting kernels (kernels/counting.py) against slow pure-Python loops, on plain arrays."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moetrace.kernels import counting as C


def random_routing(rng, n, L, K, E, dtype=np.uint8):
    """experts [n, L, K] with distinct ids per (token, layer), like a real top-k."""
    experts = np.argsort(rng.random((n, L, E)), axis=-1)[:, :, :K]
    return experts.astype(dtype)


# One slow pure-Python reference per registered statistic: ``ref(out, r, ex, g, arrays)`` adds
# row r (``ex[l][k]`` its expert ids, ``g`` its group >= 0) into ``out``. A statistic
# registered in kernels/counting.py without an entry here fails test_every_stat_has_a_reference.


def _ref_experts(out, r, ex, g, arrays):
    for l, row in enumerate(ex):
        for k, e in enumerate(row):
            out[g, l, k, e] += 1


def _ref_paths(out, r, ex, g, arrays):
    for l in range(1, len(ex)):
        out[g, l, ex[l - 1][0], ex[l][0]] += 1


def _ref_pairs(out, r, ex, g, arrays):
    for l, row in enumerate(ex):
        out[g, l, row[0], row[1]] += 1


def _ref_coact(out, r, ex, g, arrays):
    for l, row in enumerate(ex):
        for a in row:
            for b in row:
                out[l, a, b] += 1


def _ref_weight_sum(out, r, ex, g, arrays):
    for l, row in enumerate(ex):
        for k, e in enumerate(row):
            out[g, l, e] += float(arrays["weights"][r, l, k])


def _ref_tokens(out, r, ex, g, arrays):
    out[g] += 1


def _ref_vocab(out, r, ex, g, arrays):
    t = arrays["token_id"][r]
    if t >= 0:
        for l, row in enumerate(ex):
            for e in row:
                out[t, l, e] += 1


def _ref_temporal(out, r, ex, g, arrays):
    if r == 0:
        return  # no carried row in these tests (see test_temporal_carry_and_prime_across_ranges)
    group, seq, pos = arrays["group"], arrays["seq"], arrays["pos"]
    if group[r - 1] >= 0 and seq[r - 1] == seq[r] and pos[r - 1] + 1 == pos[r]:
        for l in range(len(ex)):
            out[group[r - 1], l, int(arrays["experts"][r - 1, l, 0]), ex[l][0]] += 1


REFERENCES = {
    "experts": _ref_experts, "paths": _ref_paths, "pairs": _ref_pairs, "coact": _ref_coact,
    "temporal": _ref_temporal, "weight_sum": _ref_weight_sum, "tokens": _ref_tokens, "vocab": _ref_vocab,
}
V = 9  # vocab_size of the test arrays (token ids in [-1, 9))
EXTRA_ARGS = {"vocab_size": V}


def stat_args(name):
    """Keyword arguments a registered statistic declares (``args``), with test values."""
    return {arg: EXTRA_ARGS[arg] for arg in C.STATS[name].args}


def reference(name, arrays, G, E):
    """Slow loop over rows with the statistic's reference body."""
    experts, group = arrays["experts"], arrays["group"]
    n, L, K = experts.shape
    stat = C.make_stat(name, G, L, K, E, **stat_args(name))
    out = np.zeros(stat.shape, dtype=stat.dtype)
    for r in range(n):
        g = int(group[r])
        if g >= 0:
            REFERENCES[name](out, r, [[int(x) for x in experts[r, l]] for l in range(L)], g, arrays)
    return out


def test_every_stat_has_a_reference():
    assert set(REFERENCES) == set(C.STATS), "register a reference in REFERENCES for every statistic"
    assert set(EXTRA_ARGS) >= {a for cls in C.STATS.values() for a in cls.args}


def make_arrays(rng, n, L, K, E, G, dtype=np.uint8, filtered=0.2):
    experts = random_routing(rng, n, L, K, E, dtype)
    group = rng.integers(0, G, n).astype(np.int64)
    group[rng.random(n) < filtered] = -1
    # sequences of random lengths; positions step by 1 mostly, with some gaps
    lengths = rng.integers(1, 8, n)
    seq = np.repeat(np.arange(n), lengths)[:n].astype(np.int64)
    pos = np.zeros(n, dtype=np.int32)
    for r in range(1, n):
        pos[r] = 0 if seq[r] != seq[r - 1] else pos[r - 1] + (1 if rng.random() < 0.8 else 2)
    weights = rng.random((n, L, K)).astype(np.float16)
    token_id = rng.integers(-1, 9, n).astype(np.int32)
    return {"experts": experts, "group": group, "seq": seq, "pos": pos, "weights": weights, "token_id": token_id}


def run_stat(name, arrays, G, L, K, E, pieces=(), n_blocks=None, **kw):
    """Count with the stat object, splitting the rows at ``pieces`` (chunk boundaries)."""
    stat = C.make_stat(name, G, L, K, E, n_blocks=n_blocks, **kw)
    state = stat.create()
    n = len(arrays["group"])
    edges = [0, *sorted(set(pieces)), n]
    for a, b in zip(edges[:-1], edges[1:]):
        stat.update(state, {k: v[a:b] for k, v in arrays.items()})
    return stat.finalize(state)


ALL = list(C.STATS)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(0, 60),
    L=st.integers(1, 4),
    K=st.integers(2, 4),
    extra_e=st.integers(0, 5),
    G=st.integers(1, 4),
    n_blocks=st.integers(1, 5),
    n_pieces=st.integers(0, 4),
    wide=st.booleans(),
)
def test_every_stat_matches_loop_reference(seed, n, L, K, extra_e, G, n_blocks, n_pieces, wide):
    rng = np.random.default_rng(seed)
    E = K + extra_e
    arrays = make_arrays(rng, n, L, K, E, G, np.uint16 if wide else np.uint8)
    pieces = rng.integers(0, n + 1, n_pieces).tolist() if n else []
    for name in ALL:
        got = run_stat(name, arrays, G, L, K, E, pieces=pieces, n_blocks=n_blocks, **stat_args(name))
        want = reference(name, arrays, G, E)
        assert got.dtype == C.STATS[name].dtype, name
        if got.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_paths_layer_zero_is_empty_and_coact_ratio():
    rng = np.random.default_rng(1)
    arrays = make_arrays(rng, 200, 3, 3, 6, 2, filtered=0)
    paths = run_stat("paths", arrays, 2, 3, 3, 6)
    assert paths[:, 0].sum() == 0 and paths[:, 1:].sum() == 2 * 200
    coact = run_stat("coact", arrays, 2, 3, 3, 6)
    np.testing.assert_array_equal(coact, coact.transpose(0, 2, 1))
    experts = run_stat("experts", arrays, 2, 3, 3, 6)
    # diagonal = N(E_i): how often expert i is selected at any rank
    np.testing.assert_array_equal(np.diagonal(coact, axis1=1, axis2=2), experts.sum(axis=(0, 2)))


def test_temporal_carry_and_prime_across_ranges():
    """A transition into the first row of a chunk/range is counted exactly once."""
    rng = np.random.default_rng(2)
    G, L, K, E = 2, 3, 2, 5
    arrays = make_arrays(rng, 50, L, K, E, G, filtered=0.1)
    whole = run_stat("temporal", arrays, G, L, K, E)
    stat = C.TemporalStat(G, L, K, E)
    total = None
    for a, b in [(0, 1), (1, 17), (17, 18), (18, 50)]:
        state = stat.create()
        if a > 0:
            stat.prime(state, {k: v[a - 1:a] for k, v in arrays.items()})
        stat.update(state, {k: v[a:b] for k, v in arrays.items()})
        total = state if total is None else stat.combine(total, state)
    np.testing.assert_array_equal(stat.finalize(total), whole)
    assert whole.sum() > 0


def test_combine_adds_disjoint_ranges():
    rng = np.random.default_rng(3)
    arrays = make_arrays(rng, 80, 2, 2, 4, 3)
    for name in ["experts", "paths", "weight_sum", "tokens", "coact"]:
        stat = C.make_stat(name, 3, 2, 2, 4)
        a, b = stat.create(), stat.create()
        stat.update(a, {k: v[:30] for k, v in arrays.items()})
        stat.update(b, {k: v[30:] for k, v in arrays.items()})
        np.testing.assert_allclose(stat.finalize(stat.combine(a, b)), run_stat(name, arrays, 3, 2, 2, 4))


def test_private_histograms_do_not_share_cache_lines():
    stat = C.ExpertsStat(3, 2, 2, 5, n_blocks=4)
    buf = stat.create().buf
    assert buf.shape[0] == 4 and buf.flags.c_contiguous
    assert (buf.shape[1] * buf.itemsize) % 64 == 0 and buf.shape[1] >= stat.size


def test_coverage_counters_match_loop():
    rng = np.random.default_rng(4)
    G, L, K, E = 3, 4, 2, 5
    arrays = make_arrays(rng, 150, L, K, E, G)
    ex, group = arrays["experts"].astype(int), arrays["group"]
    tables = {"paths": rng.random((L, E, E)) < 0.3, "experts": rng.random((L, E)) < 0.3,
              "pairs": rng.random((L, E, E)) < 0.3}
    for kind, table in tables.items():
        got = run_stat_cov(kind, table, arrays, G, L, K, E)
        want = np.zeros((G, 5), dtype=np.int64)
        for r in range(len(group)):
            if group[r] < 0:
                continue
            if kind == "paths":
                hits = [table[l, ex[r, l - 1, 0], ex[r, l, 0]] for l in range(1, L)]
            elif kind == "experts":
                hits = [table[l, ex[r, l, 0]] for l in range(L)]
            else:
                hits = [table[l, ex[r, l, 0], ex[r, l, 1]] for l in range(L)]
            t, p = int(sum(hits)), len(hits)
            want[group[r]] += [1, t > 0, t >= p * 0.5, t, p]
        np.testing.assert_array_equal(got, want, err_msg=kind)


def run_stat_cov(kind, table, arrays, G, L, K, E):
    stat = C.CoverageStat(G, L, K, E, kind=kind, table=table)
    state = stat.create()
    stat.update(state, {k: arrays[k][:70] for k in ("experts", "group")})
    stat.update(state, {k: arrays[k][70:] for k in ("experts", "group")})
    return stat.finalize(state)


def test_distinct_seq_per_group():
    group = np.array([0, 0, 1, -1, 0, 1, 1, 2], dtype=np.int64)
    seq = np.array([5, 5, 5, 6, 7, 7, 5, 9], dtype=np.int64)
    stat = C.DistinctSeqStat(4, 1, 1, 2)
    state = stat.create()
    stat.update(state, {"group": group[:3], "seq": seq[:3]})
    stat.update(state, {"group": group[3:], "seq": seq[3:]})
    np.testing.assert_array_equal(stat.finalize(state), [2, 2, 1, 0])


def test_out_of_range_ids_raise_and_are_not_written():
    experts = np.array([[[0, 1]], [[7, 1]]], dtype=np.uint8)
    group = np.zeros(2, dtype=np.int64)
    stat = C.ExpertsStat(1, 1, 2, 4)
    state = stat.create()
    with pytest.raises(ValueError, match="out of range"):
        stat.update(state, {"experts": experts, "group": group})
    vocab = C.VocabStat(1, 1, 2, 4, vocab_size=3)
    with pytest.raises(ValueError, match="token id 3 is not below vocab_size 3"):
        vocab.update(vocab.create(), {"experts": experts[:1], "group": group[:1],
                                      "token_id": np.array([3], dtype=np.int32)})


def test_unknown_stat_and_bad_pairs():
    with pytest.raises(ValueError, match="unknown statistic"):
        C.make_stat("nope", 1, 1, 1, 2)
    with pytest.raises(ValueError, match="top_k >= 2"):
        C.PairsStat(1, 2, 1, 4)
    with pytest.raises(ValueError, match="table of shape"):
        C.CoverageStat(1, 2, 2, 4, kind="paths", table=np.zeros((2, 4), bool))


def test_int32_histograms_flush_before_overflow(monkeypatch):
    """With a tiny int32 limit every chunk forces flushes (and splits); counts stay exact."""
    rng = np.random.default_rng(12)
    G, L, K, E = 3, 3, 3, 5
    arrays = make_arrays(rng, 120, L, K, E, G)
    want = {name: run_stat(name, arrays, G, L, K, E, pieces=[40, 80], **stat_args(name)) for name in ALL}
    monkeypatch.setattr(C, "_INT32_LIMIT", 20)
    for name in ALL:
        got = run_stat(name, arrays, G, L, K, E, pieces=[40, 80], **stat_args(name))
        np.testing.assert_allclose(got, want[name], err_msg=name)


def test_registry_describes_every_statistic():
    """Dims, help and requirements come from the registry."""
    help_text = C.stats_help()
    for name, cls in C.STATS.items():
        assert name in help_text
        stat = C.make_stat(name, 2, 3, max(2, cls.min_top_k), 4, **stat_args(name))
        assert len(stat.shape) == len(cls.dims) + cls.grouped
    assert set(C.expert_dims()) >= {"expert", "prev_expert", "next_expert", "first", "second", "other_expert"}
    assert "coact" not in C.grouped_stats() and "experts" in C.grouped_stats()
    with pytest.raises(ValueError, match="vocab_size"):
        C.make_stat("vocab", 1, 1, 1, 2)

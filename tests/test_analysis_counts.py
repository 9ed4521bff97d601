"""moetrace.analysis on stores and counts: router metrics, languages vs domains, expert profiles,
against slow pure-Python loops over the raw rows and SciPy's entropy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.stats

from moetrace.counting import count
from moetrace.analysis import expert_profile, jensen_shannon, router_metrics, token_overlap
from moetrace.errors import MoetraceError
from moetrace.store import TraceStore

DOMAINS, LANGS = ["bio", "code", "math"], ["de", "en"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """600 rows, 3 layers, top-2 of 6 experts; routing depends on domain at layer 1 and language at layer 2."""
    path = tmp_path_factory.mktemp("s") / "t.zarr"
    rng = np.random.default_rng(0)
    n, L, E = 600, 3, 6
    d = rng.integers(0, 3, n)
    lang = rng.integers(0, 2, n)
    first = rng.integers(0, E, (n, L))
    first[:, 1] = np.where(rng.random(n) < 0.7, d * 2, first[:, 1])
    first[:, 2] = np.where(rng.random(n) < 0.7, lang * 3, first[:, 2])
    second = (first + 1 + rng.integers(0, E - 1, (n, L))) % E
    weights = rng.random((n, L, 2)).astype(np.float16)
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=2, weights=True, chunk_rows=128,
                           labels={"domain": DOMAINS, "lang": LANGS}) as st:
        st.append({"seq": np.arange(n) // 20, "pos": np.arange(n) % 20, "token_id": rng.integers(0, 25, n),
                   "domain": np.array(DOMAINS)[d], "lang": np.array(LANGS)[lang],
                   "experts": np.stack([first, second], -1), "weights": weights})
    return path


def raw(path):
    st = TraceStore.open(path)
    return st.read(["experts", "domain", "lang", "token_id", "weights", "seq", "pos"])


def test_token_overlap_is_jaccard_of_token_sets(store):
    counts = count(store, stats=["experts", "coact"], by=["domain"], progress=False)
    got = token_overlap(counts).values
    ex = raw(store)["experts"]
    for layer in range(3):
        sets = [set(np.flatnonzero((ex[:, layer, :] == e).any(1)).tolist()) for e in range(6)]
        for i, j in itertools.product(range(6), repeat=2):
            union = len(sets[i] | sets[j])
            want = len(sets[i] & sets[j]) / union if union else np.nan
            assert got[layer, i, j] == pytest.approx(want, nan_ok=True)


def test_router_metrics_reuse_the_olmoe_metrics(store):
    counts = count(store, stats=["experts", "coact"], by=["domain"], progress=False)
    ds = router_metrics(counts)
    r = raw(store)
    for gi, g in enumerate(DOMAINS):
        rows = r["experts"][r["domain"] == gi]
        for layer in range(3):
            for e in range(6):
                n_sel = (rows[:, layer, :] == e).any(1).sum()
                all_sel = (r["experts"][:, layer, :] == e).any(1).sum()
                assert ds["frequency"].values[gi, layer, e] == pytest.approx(n_sel / len(rows))
                assert ds["specialization"].values[gi, layer, e] == pytest.approx(n_sel / all_sel)
    np.testing.assert_allclose(ds["frequency"].sum("expert"), 2.0)
    assert ds.attrs["specialization_baseline"] == pytest.approx(1 / 3)


def weighted_jsd(dists: np.ndarray) -> float:
    """Generalized JSD of count rows [G, E] with weights = row totals: H(mixture) - sum w H(row), bits."""
    w = dists.sum(1) / dists.sum()
    mix = dists.sum(0) / dists.sum()
    return scipy.stats.entropy(mix, base=2) - sum(w[g] * scipy.stats.entropy(dists[g], base=2)
                                                  for g in range(len(dists)) if dists[g].sum())


def test_lang_domain_split(store):
    counts = count(store, stats=["experts"], by=["domain", "lang"], progress=False)
    ds = jensen_shannon(counts)
    r = raw(store)
    for layer in range(3):
        def dist(mask):
            return np.bincount(r["experts"][mask, layer, :].ravel(), minlength=6).astype(float)
        both = np.stack([dist((r["domain"] == d) & (r["lang"] == g)) for d in range(3) for g in range(2)])
        by_d = np.stack([dist(r["domain"] == d) for d in range(3)])
        by_l = np.stack([dist(r["lang"] == g) for g in range(2)])
        assert ds["jsd"].values[layer] == pytest.approx(weighted_jsd(both), abs=1e-12)
        assert ds["by_domain"].values[layer] == pytest.approx(weighted_jsd(by_d), abs=1e-12)
        assert ds["by_lang"].values[layer] == pytest.approx(weighted_jsd(by_l), abs=1e-12)
        assert ds["by_lang"].values[layer] + ds["domain_given_lang"].values[layer] == pytest.approx(
            ds["by_domain"].values[layer] + ds["lang_given_domain"].values[layer])
    # the planted structure: layer 1 separates domains, layer 2 languages
    assert ds["by_domain"].values[1] > 5 * ds["by_lang"].values[1]
    assert ds["by_lang"].values[2] > 5 * ds["by_domain"].values[2]
    with pytest.raises(MoetraceError, match="at least one label"):
        jensen_shannon(count(store, stats=["experts"], progress=False))


def test_expert_profile_matches_raw_rows(store):
    prof = expert_profile(store, layer=1, expert=2, top_tokens=5, contexts=3, window=2)
    r = raw(store)
    hit = r["experts"][:, 1, :] == 2
    sel = hit.any(1)
    assert prof["selected"] == sel.sum() and prof["tokens"] == 600
    assert prof["by_rank"] == hit.sum(0).tolist()
    w = np.where(hit, r["weights"][:, 1, :].astype(np.float64), 0).sum(1)
    assert prof["mean_weight"] == pytest.approx(w[sel].mean())
    code_de = prof["groups"]["code/de"]
    mask = (r["domain"] == 1) & (r["lang"] == 0)
    assert code_de["selected"] == (sel & mask).sum() and code_de["tokens"] == mask.sum()
    tokens, counts_ = np.unique(r["token_id"][sel], return_counts=True)
    best = sorted(zip(-counts_, tokens))[:5]
    assert [(t["token_id"], t["count"]) for t in prof["top_tokens"]] == [(int(t), int(-c)) for c, t in best]
    t0 = prof["top_tokens"][0]
    assert t0["share_of_token"] == pytest.approx(t0["count"] / (r["token_id"] == t0["token_id"]).sum())
    others = np.bincount(r["experts"][sel, 1, :].ravel(), minlength=6)
    others[2] = 0
    assert {c["expert"]: c["count"] for c in prof["coactivation"]} == {e: int(c) for e, c in enumerate(others) if c}
    strongest = np.lexsort((np.arange(600), -np.where(sel, w, -1)))[:3]
    assert [c["row"] for c in prof["contexts"]] == strongest.tolist()
    c = prof["contexts"][0]
    same = (r["seq"] == r["seq"][c["row"]]) & (np.abs(np.arange(600) - c["row"]) <= 2)
    assert c["tokens"] == r["token_id"][same].tolist()
    with pytest.raises(MoetraceError, match="expert id"):
        expert_profile(store, layer=1, expert=6)

"""moetrace.metrics against independent references: the seed 000 pandas oracle, pandas
reproductions of the seed 002 notebook code, SciPy, and hand-computed tiny examples.

Counts datasets are built here directly with numpy.bincount from routing arrays
(``make_counts``), independently of moetrace.counting.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import xarray as xr
from hypothesis import given, settings
from hypothesis import strategies as st

import seed000_oracle as oracle
from moetrace import metrics
from moetrace.errors import MoetraceError
from moetrace.targets import Targets


# ----------------------------------------------------------------------------------------------
# Reference Counts builder
# ----------------------------------------------------------------------------------------------


def make_counts(experts, labels, seq, pos, n_experts, layer_ids=None, weights=None, token_id=None):
    """Counts dataset (format version 1) from routing arrays, with numpy.bincount.

    experts: int [n, L, K] (rank 0 first); labels: {name: (codes int[n], values list[str])};
    seq, pos: int [n]; token_id: int [n] or None (adds ``vocab``).
    """
    experts = np.asarray(experts, dtype=np.int64)
    n, n_layers, k = experts.shape
    e = n_experts
    layer_ids = np.arange(n_layers) if layer_ids is None else np.asarray(layer_ids)
    names = list(labels)
    sizes = [len(labels[name][1]) for name in names]
    g = np.ravel_multi_index([np.asarray(labels[name][0]) for name in names], sizes) if names else np.zeros(n, np.int64)
    n_groups = int(np.prod(sizes, dtype=np.int64))
    gshape = tuple(sizes)
    gcoords = {name: np.array(labels[name][1], dtype=object) for name in names}  # as moetrace.counting
    layer = np.arange(n_layers)[None, :]

    def count(idx, length, w=None):
        return np.bincount(np.asarray(idx).ravel(), weights=None if w is None else np.asarray(w).ravel(), minlength=length)

    rank = np.arange(k)[None, None, :]
    idx = ((g[:, None, None] * n_layers + layer[:, :, None]) * k + rank) * e + experts
    experts_c = count(idx, n_groups * n_layers * k * e).reshape(gshape + (n_layers, k, e))

    top1 = experts[:, :, 0]
    paths_c = np.zeros((n_groups, n_layers, e, e), dtype=np.int64)
    if n_layers > 1:
        idx = ((g[:, None] * n_layers + layer[:, 1:]) * e + top1[:, :-1]) * e + top1[:, 1:]
        paths_c = count(idx, n_groups * n_layers * e * e)
    paths_c = np.asarray(paths_c).reshape(gshape + (n_layers, e, e))

    idx = ((g[:, None] * n_layers + layer) * e + experts[:, :, 0]) * e + experts[:, :, 1]
    pairs_c = count(idx, n_groups * n_layers * e * e).reshape(gshape + (n_layers, e, e))

    order = np.lexsort((pos, seq))
    s_seq, s_top1, s_g = np.asarray(seq)[order], top1[order], g[order]
    nxt = np.flatnonzero(s_seq[1:] == s_seq[:-1])
    idx = ((s_g[nxt, None] * n_layers + layer) * e + s_top1[nxt]) * e + s_top1[nxt + 1]
    temporal_c = count(idx, n_groups * n_layers * e * e).reshape(gshape + (n_layers, e, e))

    idx = (layer[:, :, None, None] * e + experts[:, :, :, None]) * e + experts[:, :, None, :]
    coact_c = count(idx, n_layers * e * e).reshape(n_layers, e, e)

    w = np.ones(experts.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = (g[:, None, None] * n_layers + layer[:, :, None]) * e + experts
    weight_c = count(idx, n_groups * n_layers * e, w).reshape(gshape + (n_layers, e))
    tokens_c = count(g, n_groups).reshape(gshape)

    gd = tuple(names)
    ds = xr.Dataset(
        {
            "experts": (gd + ("layer", "rank", "expert"), experts_c.astype(np.int64)),
            "paths": (gd + ("layer", "prev_expert", "expert"), paths_c.astype(np.int64)),
            "pairs": (gd + ("layer", "first", "second"), pairs_c.astype(np.int64)),
            "temporal": (gd + ("layer", "expert", "next_expert"), temporal_c.astype(np.int64)),
            "coact": (("layer", "expert", "other_expert"), coact_c.astype(np.int64)),
            "weight_sum": (gd + ("layer", "expert"), weight_c.astype(np.float64)),
            "tokens": (gd, tokens_c.astype(np.int64)),
        },
        coords={
            **gcoords,
            "layer": layer_ids,
            "rank": np.arange(k),
            **{d: np.arange(e) for d in ("expert", "prev_expert", "first", "second", "next_expert", "other_expert")},
        },
        attrs={"moetrace_counts_version": 1, "n_experts": e, "top_k": k},
    )
    if token_id is not None:
        vocab_ids, tcode = np.unique(np.asarray(token_id), return_inverse=True)
        idx = (tcode.reshape(-1)[:, None, None] * n_layers + layer[:, :, None]) * e + experts
        vocab_c = count(idx, len(vocab_ids) * n_layers * e).reshape(len(vocab_ids), n_layers, e)
        ds["vocab"] = xr.DataArray(vocab_c.astype(np.int64), dims=("token_id", "layer", "expert"),
                                   coords={"token_id": vocab_ids})
    return ds


def random_routing(rng, n, n_layers, n_experts, k, group_codes, n_groups, strength=2.0):
    """Top-k experts [n, L, K] (distinct per token and layer) with a planted per-group preference."""
    bias = rng.random((n_groups, n_layers, n_experts)) ** 4 * strength
    scores = rng.random((n, n_layers, n_experts)) + bias[group_codes]
    return np.argsort(-scores, axis=-1, kind="stable")[:, :, :k]


# ----------------------------------------------------------------------------------------------
# Seed 000: synthetic samples.csv / topks.csv, the oracle, and counts from the same data
# ----------------------------------------------------------------------------------------------

DOMAINS = ["biology", "law", "math"]
LANGS = ["de", "en"]


def seed000_frames(seed, n_questions=30, n_layers=4, n_experts=8, k=3):
    """(samples, topks) DataFrames in seed 000's CSV layout, with a 3-token shared prefix."""
    rng = np.random.default_rng(seed)
    q_domain = rng.integers(0, len(DOMAINS), n_questions)
    q_lang = rng.integers(0, len(LANGS), n_questions)
    lengths = rng.integers(2, 9, n_questions)
    rows = []
    for q in range(n_questions):
        tokens = ["<s>", "Q", ":"] + [f"t{v}" for v in rng.integers(0, 40, lengths[q])]
        out_tok = rng.choice([" A", "B", "  C ", "A", "D"])
        answer = rng.choice(["A", "B", "C", "D"])
        for t, tok in enumerate(tokens):
            rows.append((q, 10 * t + 5, tok, DOMAINS[q_domain[q]], LANGS[q_lang[q]], out_tok, answer))
    samples = pd.DataFrame(rows, columns=["q_ix", "token_ix", "token", "domain", "lang", "question_output_token", "answer_char"])
    samples = samples.sample(frac=1.0, random_state=seed).reset_index(drop=True)  # order must not matter
    group = (samples["domain"].map(DOMAINS.index) * len(LANGS) + samples["lang"].map(LANGS.index)).to_numpy()
    experts = random_routing(rng, len(samples), n_layers, n_experts, k, group, len(DOMAINS) * len(LANGS))
    n = len(samples)
    topks = pd.DataFrame({
        "q_ix": np.repeat(samples["q_ix"].to_numpy(), n_layers * k),
        "token_ix": np.repeat(samples["token_ix"].to_numpy(), n_layers * k),
        "layer_ix": np.tile(np.repeat(np.arange(n_layers), k), n),
        "topk_ix": np.tile(np.arange(1, k + 1), n * n_layers),
        "expert": experts.reshape(-1),
    })
    return samples, topks, experts


def counts_from_frames(samples, experts, n_experts, by=("domain", "lang")):
    """Counts of the rows after the largest position where every question has the same token."""
    s = samples.assign(row=np.arange(len(samples))).sort_values(["q_ix", "token_ix"])
    s["position"] = s.groupby("q_ix").cumcount() + 1
    n_q = s["q_ix"].nunique()
    shared = [p for p, grp in s.groupby("position") if len(grp) == n_q and grp["token"].nunique() == 1]
    keep = s[s["position"] > max(shared, default=0)]
    rows = keep["row"].to_numpy()
    values = {"domain": DOMAINS, "lang": LANGS}
    labels = {name: (keep[name].map(values[name].index).to_numpy(), values[name]) for name in by}
    return make_counts(experts[rows], labels, keep["q_ix"].to_numpy(), keep["position"].to_numpy(), n_experts)


ORACLE_METHODS = {
    "paths": (oracle.spec_paths, ["prev_expert", "expert"]),
    "experts": (oracle.spec_experts, ["expert"]),
    "pairs": (oracle.spec_multi_topk, ["first", "second"]),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["paths", "experts", "pairs"])
def test_specialized_matches_r_oracle(seed, method):
    samples, topks, experts = seed000_frames(seed)
    data = oracle.load(samples, topks)
    assert data["last_shared_tok"] == 3
    counts = counts_from_frames(samples, experts, 8)
    fn, item_cols = ORACLE_METHODS[method]
    n_selected = []
    for domain in DOMAINS:
        for lang in LANGS:
            for threshold in (None, 1.0, 1.5, 3.0):
                thr = metrics.SPECIALIZATION_METHODS[method][3] if threshold is None else threshold
                spec, dom_counts, group_total = fn(data, domain, lang, thr)
                sel = metrics.specialized(counts, method, {"domain": domain, "lang": lang}, threshold=threshold)
                assert sel.layer.tolist() == spec["layer_ix"].tolist()
                assert sel.items.tolist() == spec[item_cols].to_numpy().tolist()
                assert sel.n_samples.tolist() == spec["n_samples"].tolist()
                np.testing.assert_array_equal(sel.prop, spec["prop_of_samples"].to_numpy())
                row = dom_counts[(dom_counts["domain"] == domain) & (dom_counts["lang"] == lang)]
                assert sel.group_share == row["n_tok_prop"].item()
                assert sel.group_samples == group_total
                n_selected.append(len(sel))
    assert max(n_selected) > 0 and min(n_selected) < max(n_selected)


@pytest.mark.parametrize("seed", [3, 4])
def test_path_json_matches_r_export(seed, tmp_path):
    samples, topks, experts = seed000_frames(seed)
    data = oracle.load(samples, topks)
    counts = counts_from_frames(samples, experts, 8)
    spec, _, _ = oracle.spec_paths(data, "biology", "en", 1.0)
    expected = oracle.exportable_json(spec)
    sel = metrics.specialized(counts, "paths", {"domain": "biology", "lang": "en"})
    targets = Targets.from_specialized("paths", sel)
    out = tmp_path / "path_ablation_targets.json"
    targets.save_bare(out, "paths")
    assert out.read_text() == expected + "\n"
    assert Targets.load(out, kind="paths") == targets
    assert len(json.loads(expected)) > 0


def test_base_accuracy_matches_r_oracle():
    samples, topks, _ = seed000_frames(5, n_questions=40)
    data = oracle.load(samples, topks)
    expected = oracle.base_accs(data["sample_df"])
    per_q = data["sample_df"].groupby("q_ix").agg(
        domain=("domain", "first"), lang=("lang", "first"), question_output_token=("question_output_token", "first"),
        answer_char=("answer_char", "first"), n=("token", "size"))
    table = metrics.base_accuracy(
        {c: per_q[c].to_numpy() for c in ["domain", "lang", "question_output_token", "answer_char"]},
        by=["domain", "lang"], tokens=per_q["n"].to_numpy())
    got = pd.DataFrame(table)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert 0 < got["base_acc"].max() and got["base_acc"].min() < 1
    # a question with no token left after the prefix filter is not in R's table
    extra = {c: np.append(per_q[c].to_numpy(), v) for c, v in
             [("domain", "biology"), ("lang", "en"), ("question_output_token", "A"), ("answer_char", "A")]}
    again = metrics.base_accuracy(extra, by=["domain", "lang"], tokens=np.append(per_q["n"].to_numpy(), 0))
    pd.testing.assert_frame_equal(pd.DataFrame(again), expected, check_dtype=False)
    no_tokens = metrics.base_accuracy({c: per_q[c].to_numpy() for c in extra}, by=["domain"])
    assert "total_tokens" not in no_tokens and no_tokens["questions"].sum() == len(per_q)
    with pytest.raises(MoetraceError, match="column 'topic' is missing"):
        metrics.base_accuracy(extra, by=["topic"])


def test_squish_is_str_squish():
    values = np.array(["  A ", "B", "\tC\n", "a  b\t c", "", " "])
    assert metrics.squish(values).tolist() == ["A", "B", "C", "a b c", "", ""]


def test_specialized_group_subset_sums_other_labels():
    samples, topks, experts = seed000_frames(6)
    by_both = counts_from_frames(samples, experts, 8, by=("domain", "lang"))
    by_domain = counts_from_frames(samples, experts, 8, by=("domain",))
    for method in ("paths", "experts", "pairs"):
        a = metrics.specialized(by_both, method, {"domain": "math"}, threshold=1.2)
        b = metrics.specialized(by_domain, method, {"domain": "math"}, threshold=1.2)
        assert a.items.tolist() == b.items.tolist() and a.layer.tolist() == b.layer.tolist()
        assert a.group_share == b.group_share and len(a) > 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), threshold=st.floats(0.0, 4.0))
def test_specialized_rule_by_hand(seed, threshold):
    """The rule written out with plain loops over a tiny random paths tensor."""
    rng = np.random.default_rng(seed)
    paths = rng.integers(0, 4, (2, 3, 3, 3)) * (rng.random((2, 3, 3, 3)) < 0.6)
    paths[:, 0] = 0
    ds = xr.Dataset({"paths": (("domain", "layer", "prev_expert", "expert"), paths)},
                    coords={"domain": ["a", "b"], "layer": [0, 2, 5]},
                    attrs={"moetrace_counts_version": 1})
    if paths.sum() == 0:
        with pytest.raises(MoetraceError):
            metrics.specialized(ds, "paths", {"domain": "a"}, threshold=threshold)
        return
    sel = metrics.specialized(ds, "paths", {"domain": "a"}, threshold=threshold)
    share = paths[0].sum() / paths.sum()
    expected = []
    for li, layer in enumerate([0, 2, 5]):
        for p in range(3):
            for e in range(3):
                n_g, n_all = paths[0, li, p, e], paths[:, li, p, e].sum()
                if li >= 1 and n_g > 0 and n_g / n_all >= share * threshold:
                    expected.append((layer, p, e))
    assert [(l, p, e) for l, (p, e) in zip(sel.layer.tolist(), sel.items.tolist())] == expected


def test_specialized_errors():
    samples, topks, experts = seed000_frames(0)
    counts = counts_from_frames(samples, experts, 8)
    with pytest.raises(MoetraceError, match="unknown label 'topic'"):
        metrics.specialized(counts, "paths", {"topic": "x"})
    with pytest.raises(MoetraceError, match="unknown value 'chemistry'"):
        metrics.specialized(counts, "paths", {"domain": "chemistry"})
    with pytest.raises(MoetraceError, match="method"):
        metrics.specialized(counts, "layers", {"domain": "math"})
    with pytest.raises(MoetraceError, match="at least one"):
        metrics.specialized(counts, "paths", {})
    with pytest.raises(MoetraceError, match="min_layer_index"):
        metrics.specialized(counts, "paths", {"domain": "math"}, min_layer_index=9)
    old = counts.assign_attrs(moetrace_counts_version=0)
    with pytest.raises(MoetraceError, match="moetrace_counts_version 1, got 0"):
        metrics.specialized(old, "paths", {"domain": "math"})
    with pytest.raises(MoetraceError, match="'pairs' is missing"):
        metrics.specialized(counts.drop_vars("pairs"), "pairs", {"domain": "math"})


# ----------------------------------------------------------------------------------------------
# Seed 002: pandas reproductions of the notebook code
# ----------------------------------------------------------------------------------------------

SEED2_DOMAINS = ["domain-1-code", "domain-2-math", "domain-3-creative", "domain-4-factual"]
SEED2_LABELS = SEED2_DOMAINS + ["domain-5-mixed"]  # the last has no tokens: an all-zero row


def seed002_data(seed, n_tokens=60, n_layers=5, n_experts=12, k=4):
    """(long DataFrame as the notebook builds it, Counts). Domain i is one token stream.

    Expert 3 is never chosen at layer 1 and "domain-5-mixed" has no tokens, so the counts have
    an all-zero column and row that the notebook's pivot_table never creates.
    """
    rng = np.random.default_rng(seed)
    dom = np.repeat(np.arange(len(SEED2_DOMAINS)), n_tokens)
    bias = rng.random((len(SEED2_DOMAINS), n_layers, n_experts)) ** 4 * 1.5
    scores = rng.random((dom.size, n_layers, n_experts)) + bias[dom]
    scores[:, 1, 3] = -np.inf
    experts = np.argsort(-scores, axis=-1, kind="stable")[:, :, :k]
    token = np.tile(np.arange(n_tokens), len(SEED2_DOMAINS))
    n = dom.size
    df = pd.DataFrame({
        "domain": np.array(SEED2_DOMAINS)[np.repeat(dom, n_layers * k)],
        "token_id": np.repeat(token, n_layers * k),
        "layer_id": np.tile(np.repeat(np.arange(n_layers), k), n),
        "expert_id": experts.reshape(-1),
        "position": np.tile(np.arange(k), n * n_layers),
    })
    counts = make_counts(experts, {"domain": (dom, SEED2_LABELS)}, dom, token, n_experts, token_id=token % 7)
    return df, counts


def pivot(df, layer):
    sub = df[df["layer_id"] == layer]
    return sub.pivot_table(index="domain", columns="expert_id", aggfunc="size", fill_value=0)


def test_frequency_matrix_matches_pivot_table():
    df, counts = seed002_data(0)
    for layer in range(5):
        freq = metrics.frequency_matrix(counts, layer)
        expected = pivot(df, layer)
        got = freq.to_pandas()
        got = got.loc[(got != 0).any(axis=1), (got != 0).any(axis=0)]
        np.testing.assert_array_equal(got.to_numpy(), expected.to_numpy())
        assert got.columns.tolist() == expected.columns.tolist()
        pct = metrics.percentages(freq).to_pandas().loc[expected.index, expected.columns]
        np.testing.assert_allclose(pct.to_numpy(), (expected.div(expected.sum(axis=1), axis=0) * 100).to_numpy())
    top = metrics.frequency_matrix(counts, 2, rank=0)
    assert int(top.sum()) == len(df[(df.layer_id == 2) & (df.position == 0)])
    with pytest.raises(MoetraceError, match="layer"):
        metrics.frequency_matrix(counts, 17)
    with pytest.raises(MoetraceError, match="rank"):
        metrics.frequency_matrix(counts, 0, rank=9)


def test_chi_square_and_layer_ranking_match_seed_code():
    df, counts = seed002_data(1)
    ranking = metrics.layer_ranking(counts)
    chi = metrics.chi_square(counts)
    for layer in range(5):
        layer_freq = pivot(df, layer)
        chi2, p_value, dof, _ = scipy.stats.chi2_contingency(layer_freq)
        avg_variance = layer_freq.div(layer_freq.sum(axis=1), axis=0).var(axis=0).mean()
        row = ranking.sel(layer=layer)
        np.testing.assert_allclose(row["chi2"].item(), chi2, rtol=1e-12)
        np.testing.assert_allclose(row["p_value"].item(), p_value, rtol=1e-9)
        assert row["dof"].item() == dof
        np.testing.assert_allclose(row["avg_variance"].item(), avg_variance, rtol=1e-12)
        assert bool(row["significant"]) == (p_value < 0.001)
        assert chi["n_experts"].sel(layer=layer).item() == layer_freq.shape[1]
    assert chi["n_experts"].sel(layer=1).item() == 11 and chi["n_groups"].sel(layer=1).item() == 4  # pruned


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), rows=st.integers(1, 4), cols=st.integers(1, 5))
def test_chi_square_equals_scipy(seed, rows, cols):
    """Small matrices, including 2 x 2 (Yates' correction), one row/column (dof 0) and zero rows."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 6, (rows, cols)) * (rng.random((rows, cols)) < 0.8)
    ds = xr.Dataset({"experts": (("domain", "layer", "rank", "expert"), table[:, None, None, :])},
                    coords={"domain": [f"d{i}" for i in range(rows)], "layer": [7]},
                    attrs={"moetrace_counts_version": 1})
    got = metrics.chi_square(ds).sel(layer=7)
    pruned = table[table.sum(1) > 0][:, table.sum(0) > 0]
    if pruned.size == 0:
        assert np.isnan(got["chi2"].item())
        return
    ref = scipy.stats.chi2_contingency(pruned)
    np.testing.assert_allclose(got["chi2"].item(), ref.statistic, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got["p_value"].item(), ref.pvalue, rtol=1e-9)
    assert got["dof"].item() == ref.dof


def test_expert_variation_matches_seed_code():
    df, counts = seed002_data(2)
    for layer in (0, 1):
        freq_matrix = pivot(df, layer)
        freq_matrix_pct = freq_matrix.div(freq_matrix.sum(axis=1), axis=0) * 100
        expert_variance = freq_matrix.std(axis=0) / (freq_matrix.mean(axis=0) + 1e-10)
        specialists = expert_variance[expert_variance > expert_variance.quantile(0.75)].index.tolist()
        generalists = expert_variance[expert_variance < expert_variance.quantile(0.25)].index.tolist()
        got = metrics.expert_variation(counts, layer)
        cv = got["cv"].to_pandas().dropna()
        np.testing.assert_allclose(cv.to_numpy(), expert_variance.to_numpy(), rtol=1e-12)
        assert cv.index.tolist() == expert_variance.index.tolist()
        assert got["expert"].values[got["specialist"].values].tolist() == specialists
        assert got["expert"].values[got["generalist"].values].tolist() == generalists
        assert specialists and generalists
        for e in specialists:
            preferred = freq_matrix[e].idxmax()
            assert got["preferred_domain"].sel(expert=e).item() == preferred
            np.testing.assert_allclose(got["usage_pct"].sel(expert=e).item(), freq_matrix_pct.loc[preferred, e])
        assert np.isclose(got.attrs["q75"], expert_variance.quantile(0.75))


def test_expert_variation_tie_goes_to_first_sorted_group():
    experts = np.zeros((2, 1, 1, 2), dtype=np.int64)
    experts[:, 0, 0, 0] = [5, 5]  # tie for expert 0
    experts[:, 0, 0, 1] = [1, 3]
    ds = xr.Dataset({"experts": (("domain", "layer", "rank", "expert"), experts)},
                    coords={"domain": ["zeta", "alpha"], "layer": [0]}, attrs={"moetrace_counts_version": 1})
    got = metrics.expert_variation(ds, 0)
    ref = pd.DataFrame(experts[:, 0, 0, :], index=["zeta", "alpha"]).sort_index()  # pivot_table sorts
    assert got["preferred_domain"].values.tolist() == [ref[0].idxmax(), ref[1].idxmax()] == ["alpha", "alpha"]


def test_entropy_matches_scipy():
    df, counts = seed002_data(3)
    got = metrics.entropy(counts)
    for layer in range(5):
        subset = df[df["layer_id"] == layer]
        for domain in SEED2_DOMAINS:
            p = subset[subset["domain"] == domain]["expert_id"].value_counts(normalize=True)
            h = scipy.stats.entropy(p.values, base=2)
            np.testing.assert_allclose(got["entropy"].sel(domain=domain, layer=layer).item(), h, rtol=1e-12)
    assert got["max_entropy"].item() == np.log2(12)
    top1 = metrics.entropy(counts, rank=0)["entropy"].sel(domain=SEED2_DOMAINS[0], layer=0).item()
    p = df[(df.layer_id == 0) & (df.position == 0) & (df.domain == SEED2_DOMAINS[0])]["expert_id"].value_counts(normalize=True)
    np.testing.assert_allclose(top1, scipy.stats.entropy(p.values, base=2), rtol=1e-12)


def test_stickiness_matches_seed_loop():
    df, counts = seed002_data(4)
    got = metrics.stickiness(counts)
    assert got["baseline"].item() == 1 / 12
    for domain in SEED2_DOMAINS:
        for layer in range(5):
            seq_data = df[(df["domain"] == domain) & (df["layer_id"] == layer) & (df["position"] == 0)]
            expert_sequence = seq_data.sort_values("token_id")["expert_id"].values
            lag1_same = sum(expert_sequence[i] == expert_sequence[i + 1] for i in range(len(expert_sequence) - 1))
            lag1_prob = lag1_same / (len(expert_sequence) - 1)
            assert got["stickiness"].sel(domain=domain, layer=layer).item() == pytest.approx(lag1_prob, rel=1e-12)
            assert got["same"].sel(domain=domain, layer=layer).item() == lag1_same


# ----------------------------------------------------------------------------------------------
# OLMoE metrics: hand-computed examples
# ----------------------------------------------------------------------------------------------


def tiny_counts():
    """3 tokens, 1 layer, top-2 of 3 experts; domains a (tokens 0, 1) and b (token 2)."""
    experts = np.array([[[0, 1]], [[0, 2]], [[1, 0]]])
    return make_counts(experts, {"domain": (np.array([0, 0, 1]), ["a", "b"])}, np.array([0, 0, 1]),
                       np.array([0, 1, 0]), 3, token_id=np.array([7, 7, 9]))


def test_selection_frequency_and_domain_specialization_by_hand():
    ds = tiny_counts()
    freq = metrics.selection_frequency(ds)
    np.testing.assert_allclose(freq["frequency"].sel(layer=0).values, [[1.0, 0.5, 0.5], [1.0, 1.0, 0.0]])
    assert freq["baseline"].item() == pytest.approx(2 / 3)
    np.testing.assert_allclose(freq["ratio"].sel(domain="b", layer=0).values, [1.5, 1.5, 0.0])
    spec = metrics.domain_specialization(ds)
    np.testing.assert_allclose(spec["specialization"].sel(layer=0).values, [[1.0, 0.5, 0.5], [1.0, 1.0, 0.0]])
    by_expert = metrics.domain_specialization(ds, normalize="expert")
    # expert 0: a 2 of 3; expert 1: a 1 of 2; expert 2: a 1 of 1
    np.testing.assert_allclose(by_expert["specialization"].sel(layer=0).values, [[2 / 3, 0.5, 1.0], [1 / 3, 0.5, 0.0]])
    assert by_expert["baseline"].item() == 0.5
    with pytest.raises(MoetraceError, match="normalize"):
        metrics.domain_specialization(ds, normalize="token")


def test_vocabulary_specialization_by_hand():
    ds = tiny_counts()
    got = metrics.vocabulary_specialization(ds)["specialization"].sel(layer=0)
    # token 7 occurs twice: expert 0 both times, experts 1 and 2 once each; token 9 once: experts 1, 0
    np.testing.assert_allclose(got.sel(token_id=7).values, [1.0, 0.5, 0.5])
    np.testing.assert_allclose(got.sel(token_id=9).values, [1.0, 1.0, 0.0])
    by_expert = metrics.vocabulary_specialization(ds, normalize="expert")["specialization"].sel(layer=0)
    np.testing.assert_allclose(by_expert.sel(token_id=7).values, [2 / 3, 0.5, 1.0])
    with pytest.raises(MoetraceError, match="'vocab' is missing"):
        metrics.vocabulary_specialization(ds.drop_vars("vocab"))


def test_coactivation_by_hand():
    ratio = metrics.coactivation(tiny_counts()).sel(layer=0).values
    # N(E0)=3, N(E1)=2, N(E2)=1; N(0,1)=2, N(0,2)=1, N(1,2)=0
    np.testing.assert_allclose(ratio, [[1, 2 / 3, 1 / 3], [1, 1, 0], [1, 0, 1]])


def test_coactivation_matches_loop_on_random_routing():
    rng = np.random.default_rng(11)
    experts = random_routing(rng, 200, 2, 6, 3, np.zeros(200, int), 1)
    ds = make_counts(experts, {}, np.zeros(200, int), np.arange(200), 6)
    ratio = metrics.coactivation(ds).values
    for layer in range(2):
        sets = [set(row) for row in experts[:, layer].tolist()]
        for i in range(6):
            n_i = sum(i in s for s in sets)
            for j in range(6):
                expected = sum(i in s and j in s for s in sets) / n_i if n_i else np.nan
                np.testing.assert_allclose(ratio[layer, i, j], expected)


# ----------------------------------------------------------------------------------------------
# Command line: moetrace specialize / moetrace stats
# ----------------------------------------------------------------------------------------------


def _saved_counts(tmp_path, counts):
    from moetrace.counting import save_counts

    path = tmp_path / "counts.zarr"
    save_counts(counts, path)
    return path


def test_cli_specialize_writes_seed_json(tmp_path, capsys):
    from moetrace.cli import main

    samples, topks, experts = seed000_frames(7)
    path = _saved_counts(tmp_path, counts_from_frames(samples, experts, 8))
    data = oracle.load(samples, topks)
    out = tmp_path / "targets.json"
    assert main(["specialize", str(path), "--method", "paths", "--group", "domain=law,lang=de", "--out", str(out)]) == 0
    spec, _, group_total = oracle.spec_paths(data, "law", "de", 1.0)
    assert out.read_text() == oracle.exportable_json(spec) + "\n"
    assert f"of the group's {group_total:,} paths samples" in capsys.readouterr().out

    assert main(["specialize", str(path), "--method", "pairs", "--group", "domain=math", "--threshold", "1.5",
                 "--out", str(out), "--quiet"]) == 2  # an existing output is refused, as by every writer
    assert "output already exists" in capsys.readouterr().err and out.read_text() == oracle.exportable_json(spec) + "\n"
    assert main(["specialize", str(path), "--method", "pairs", "--group", "domain=math", "--threshold", "1.5",
                 "--out", str(out), "--quiet", "--overwrite"]) == 0
    sel = metrics.specialized(counts_from_frames(samples, experts, 8), "pairs", {"domain": "math"}, threshold=1.5)
    assert Targets.load(out, kind="pairs") == Targets.from_specialized("pairs", sel)

    other = tmp_path / "other.json"
    assert main(["specialize", str(path), "--method", "paths", "--group", "domain:law", "--out", str(other)]) == 2
    assert main(["specialize", str(path), "--method", "paths", "--group", "topic=law", "--out", str(other)]) == 2
    err = capsys.readouterr().err
    assert "expected label=value" in err and "unknown label 'topic'" in err


def test_cli_stats_json_matches_metrics(tmp_path, capsys):
    from moetrace.cli import main

    _, counts = seed002_data(8)
    path = _saved_counts(tmp_path, counts)
    assert main(["stats", str(path), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    ranking = metrics.layer_ranking(counts)
    assert [row["chi2"] for row in tables["layer_ranking"]] == pytest.approx(ranking["chi2"].values.tolist())
    best = int(ranking["layer"].values[np.argmax(ranking["chi2"].values)])
    var = metrics.expert_variation(counts, best)
    assert tables["experts_at_layer"]["layer"] == best
    assert [s["expert"] for s in tables["experts_at_layer"]["specialists"]] == np.flatnonzero(var["specialist"].values).tolist()
    assert tables["entropy"]["bits"]["domain-5-mixed"] == [None] * 5
    assert tables["stickiness"]["lag1_same"]["domain-1-code"] == pytest.approx(
        metrics.stickiness(counts)["stickiness"].sel(domain="domain-1-code").values.tolist())

    assert main(["stats", str(path), "--layer", "2"]) == 0
    text = capsys.readouterr().out
    assert "chi-square" in text and "Experts at layer 2" in text and "stickiness" in text
    assert main(["stats", str(path), "--layer", "99"]) == 2
    assert "layer" in capsys.readouterr().err


def test_store_count_specialized_matches_r_oracle(tmp_path):
    """Through the real pipeline: TraceStore -> counting.count(skip_shared_prefix) -> specialized."""
    from moetrace.counting import count
    from moetrace.store import TraceStore

    samples, topks, experts = seed000_frames(9)
    s = samples.assign(row=np.arange(len(samples))).sort_values(["q_ix", "token_ix"])
    s["pos"] = s.groupby("q_ix").cumcount()
    vocab = {t: i for i, t in enumerate(sorted(samples["token"].unique()))}
    with TraceStore.create(tmp_path / "trace.zarr", n_layers=4, n_experts=8, top_k=3, labels=["domain", "lang"]) as st:
        st.append({"seq": s["q_ix"].to_numpy().astype(np.int64), "pos": s["pos"].to_numpy().astype(np.int32),
                   "token_id": s["token"].map(vocab).to_numpy().astype(np.int32),
                   "domain": s["domain"].to_numpy(), "lang": s["lang"].to_numpy(), "experts": experts[s["row"].to_numpy()]})
    counts = count(tmp_path / "trace.zarr", stats="experts,paths,pairs", by=["domain", "lang"],
                   skip_shared_prefix=True, progress=False)
    data = oracle.load(samples, topks)
    for method, (fn, item_cols) in ORACLE_METHODS.items():
        for domain in DOMAINS:
            spec, _, _ = fn(data, domain, "en", metrics.SPECIALIZATION_METHODS[method][3])
            sel = metrics.specialized(counts, method, {"domain": domain, "lang": "en"})
            assert sel.layer.tolist() == spec["layer_ix"].tolist()
            assert sel.items.tolist() == spec[item_cols].to_numpy().tolist()
    spec, _, _ = oracle.spec_paths(data, "math", "de", 1.0)
    sel = metrics.specialized(counts, "paths", {"domain": "math", "lang": "de"})
    assert Targets.from_specialized("paths", sel).bare_json("paths") == oracle.exportable_json(spec)


def test_ungrouped_counts_and_missing_variables(tmp_path, capsys):
    from moetrace.cli import main

    rng = np.random.default_rng(12)
    experts = random_routing(rng, 50, 3, 5, 2, np.zeros(50, int), 1)
    counts = make_counts(experts, {}, np.zeros(50, int), np.arange(50), 5)
    assert metrics.group_dims(counts) == [] and metrics.group_names(counts) == [()]
    assert metrics.chi_square(counts)["dof"].values.tolist() == [0, 0, 0]  # one group: nothing to test
    var = metrics.expert_variation(counts, 1)
    assert np.isnan(var["cv"].values).all() and not var["specialist"].any()
    np.testing.assert_allclose(metrics.stickiness(counts)["stickiness"].values,
                               [np.mean(experts[1:, l, 0] == experts[:-1, l, 0]) for l in range(3)])
    path = _saved_counts(tmp_path, counts)
    assert main(["stats", str(path), "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert list(tables["entropy"]["bits"]) == ["all"] and tables["experts_at_layer"]["specialists"] == []
    with pytest.raises(MoetraceError, match="'temporal' is missing"):
        metrics.stickiness(counts.drop_vars("temporal"))
    with pytest.raises(MoetraceError, match="expected an xarray.Dataset"):
        metrics.check_counts(counts["experts"])
    with pytest.raises(MoetraceError, match="not a moetrace Counts"):
        metrics.entropy(counts.drop_attrs())


def test_specialized_keeps_items_exactly_at_the_threshold():
    """R's rule is ``>=``: an item whose share equals group share x threshold is kept."""
    experts = np.zeros((2, 2, 1, 3), dtype=np.int64)  # (domain, layer, rank, expert)
    experts[:, 1, 0] = [[2, 1, 1], [2, 3, 0]]  # domain a: 4 of 9 samples at layer index 1
    ds = xr.Dataset({"experts": (("domain", "layer", "rank", "expert"), experts)},
                    coords={"domain": ["a", "b"], "layer": [0, 1]}, attrs={"moetrace_counts_version": 1})
    # shares of a: expert 0 -> 2/4 = 0.5, expert 1 -> 1/4, expert 2 -> 1/1; group share 4/9
    sel = metrics.specialized(ds, "experts", {"domain": "a"}, threshold=1.125)  # 4/9 * 1.125 = 0.5
    assert sel.items[:, 0].tolist() == [0, 2] and sel.group_share == 4 / 9
    assert metrics.specialized(ds, "experts", {"domain": "a"}, threshold=1.13).items[:, 0].tolist() == [2]
    assert len(metrics.specialized(ds, "experts", {"domain": "a"}, threshold=2.26)) == 0

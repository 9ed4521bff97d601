"""moetrace.analysis on tiny random models of the real classes: router statistics, the 2-D map of
expert outputs and steering, against plain torch references (the router's own linear layer, numpy
eigenvectors, an expert whose weights are zeroed by hand)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moetrace import figures
from moetrace.analysis import pca_2d, reduce_2d, router_stats, steer_prompt
from moetrace.analysis._common import experts_modules, routed_outputs, token_batches
from moetrace.analysis.dim_reduc import expert_points, umap_available
from moetrace.errors import MoetraceError
from moetrace.intervene import observe_routing
from tiny_models import VOCAB, tiny_model


def sequences(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, size=int(k)).tolist() for k in rng.integers(5, 12, size=n)]


def test_router_stats_match_the_router_linear_layer():
    model = tiny_model("olmoe")  # softmax, no renormalization: top-k weights = top-k probabilities
    seqs = sequences()
    ds = router_stats(model, token_batches(seqs, batch_size=3, num_tokens=40), layers=[1], bins=20)
    assert ds.attrs["tokens"] == 40 and ds.attrs["scoring"] == "softmax"
    gate = model.model.layers[1].mlp.gate
    inputs = []
    hook = gate.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in token_batches(seqs, batch_size=3, num_tokens=40):
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            inputs[-1] = inputs[-1][torch.as_tensor(b["real"])]
    hook.remove()
    h = torch.cat(inputs).double()
    logits = (h @ gate.weight.detach().double().T).numpy()
    sorted_logits = -np.sort(-logits, axis=1)
    probs = torch.softmax(torch.tensor(logits), -1).numpy()
    sorted_probs = -np.sort(-probs, axis=1)
    np.testing.assert_allclose(ds["logit_mean"].sel(layer=1), sorted_logits.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["logit_max"].sel(layer=1), sorted_logits.max(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ds["prob_std"].sel(layer=1), sorted_probs.std(0), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(ds["weight_mean"].sel(layer=1)[:2], sorted_probs[:, :2].mean(0), rtol=1e-4)
    assert np.isnan(ds["weight_mean"].sel(layer=1)[2:]).all()
    # seed 003's renormalized top-k probabilities: OLMoE does not renormalize, so they differ from the weights
    top = sorted_probs[:, :2]
    np.testing.assert_allclose(ds["renorm_mean"].sel(layer=1)[:2], (top / top.sum(1, keepdims=True)).mean(0),
                               rtol=1e-4)
    assert float(ds["renorm_mean"].sel(layer=1, rank=0)) > float(ds["weight_mean"].sel(layer=1, rank=0)) + 0.05
    want, _ = np.histogram(probs.ravel(), bins=20, range=(0, 1))
    assert np.abs(ds["prob_hist"].sel(layer=1).values - want).sum() <= 2  # float32 vs float64 at bin edges
    assert int(ds["prob_hist"].sum()) == 40 * 8


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_router_stats_other_scorings(family):
    model = tiny_model(family)
    ds = router_stats(model, token_batches(sequences(), num_tokens=30))
    assert ds.attrs["scoring"] == ("sigmoid" if family == "deepseek_v3" else "softmax")
    assert (ds["weight_hist"].sum("bin") == 30 * 2).all()
    assert (ds["prob_hist"].sum("bin") == 30 * 8).all()
    assert ("selection_mean" in ds) == (family == "deepseek_v3")
    assert (ds["renorm_hist"].sum("bin") == 30 * 2).all()
    np.testing.assert_allclose(ds["renorm_mean"].sum("rank", skipna=True), 1.0, rtol=1e-5)


def test_renormalized_top_k_equals_the_weights_of_a_family_that_renormalizes():
    model = tiny_model("qwen3_moe")
    assert model.config.norm_topk_prob
    ds = router_stats(model, token_batches(sequences(), num_tokens=30))
    np.testing.assert_allclose(ds["renorm_mean"].values[:, :2], ds["weight_mean"].values[:, :2], rtol=1e-5)


def test_router_stats_bias_corrected_selection_scores():
    model = tiny_model("deepseek_v3")
    seqs = sequences()
    ds = router_stats(model, token_batches(seqs, num_tokens=30), layers=[0])
    gate = model.model.layers[0].mlp.gate
    inputs = []
    hook = gate.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        for b in token_batches(seqs, num_tokens=30):
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            inputs[-1] = inputs[-1][torch.as_tensor(b["real"])]
    hook.remove()
    h = torch.cat(inputs).double()
    scores = torch.sigmoid(h @ gate.weight.detach().double().T) + gate.e_score_correction_bias.double()
    want = torch.sort(scores, dim=-1, descending=True).values.mean(0).numpy()
    np.testing.assert_allclose(ds["selection_mean"].sel(layer=0), want, rtol=1e-4, atol=1e-6)


def test_pca_matches_eigenvectors():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 4)) * [5.0, 2.0, 1.0, 0.5]
    xy = pca_2d(X)
    vals, vecs = np.linalg.eigh(np.cov(X.T))
    want = (X - X.mean(0)) @ vecs[:, ::-1][:, :2]
    np.testing.assert_allclose(np.abs(xy), np.abs(want), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(pca_2d(X, block_rows=7), xy, rtol=1e-10, atol=1e-12)  # blockwise: same result


def test_reduce_2d_points_are_the_routed_experts():
    model = tiny_model("mixtral")
    seqs = sequences()
    pts = reduce_2d(model, token_batches(seqs, batch_size=2, num_tokens=30, groups=["a", "b"] * 3), layer=2,
                    method="pca")
    assert pts.attrs["method"] == "pca" and len(pts) == 30 * 2
    routed = []
    with torch.no_grad(), observe_routing(model, lambda ev: routed.append(ev) if ev.layer_id == 2 else None):
        for b in token_batches(seqs, batch_size=2, num_tokens=30):
            routed.append(torch.as_tensor(b["real"]))
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    experts = [ev.experts[mask] for mask, ev in zip(routed[::2], routed[1::2])]
    np.testing.assert_array_equal(pts["expert"].to_numpy(), torch.cat(experts).reshape(-1).numpy())
    assert set(pts["group"]) == {"a", "b"} and np.isfinite(pts[["x", "y"]].to_numpy()).all()
    with pytest.raises(MoetraceError, match="auto, umap or pca"):
        reduce_2d(model, token_batches(seqs), layer=2, method="tsne")


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe",
                                    "lfm2_moe", "jamba"])
def test_routed_outputs_weighted_by_the_router_are_the_moe_output(family):
    model = tiny_model(family)
    layer, (module, E, K) = next(iter(experts_modules(model).items()))
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(9, model.config.hidden_size, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(9)])
    weights = torch.rand(9, K, generator=g)
    with torch.no_grad():
        out = routed_outputs(module, hidden, index)  # [T, K, H]
        want = module(hidden, index, weights)  # the family's own weighted mixture
    assert out.shape == (9, K, model.config.hidden_size)
    torch.testing.assert_close((out * weights[..., None]).sum(1), want, rtol=1e-5, atol=1e-6)


def _routed_experts(model, seqs, layer, **kw):
    """The top-k expert ids of every real token at ``layer``, from the routing observer: [T*K]."""
    events, masks = [], []
    with torch.no_grad(), observe_routing(model, lambda ev: events.append(ev) if ev.layer_id == layer else None):
        for b in token_batches(seqs, **kw):
            masks.append(torch.as_tensor(b["real"]))
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return torch.cat([ev.experts[m] for m, ev in zip(masks, events)]).reshape(-1).numpy()


def _check_points(pts, model, seqs, kw, layer):
    """2-D, finite, one point per (real token, rank) with the routed expert and the token's group;
    each figure panel has one scatter per label value holding exactly that value's points."""
    K, n = model.config.num_experts_per_tok, kw["num_tokens"]
    xy = pts[["x", "y"]].to_numpy()
    assert xy.shape == (n * K, 2) and np.isfinite(xy).all() and (xy.std(axis=0) > 0).all()
    np.testing.assert_array_equal(pts["token_row"], np.repeat(np.arange(n), K))
    np.testing.assert_array_equal(pts["rank"], np.tile(np.arange(K), n))
    np.testing.assert_array_equal(pts["expert"], _routed_experts(model, seqs, layer, batch_size=kw["batch_size"],
                                                                 num_tokens=n))
    token_groups = np.concatenate([b["groups"] for b in token_batches(seqs, **kw)])
    np.testing.assert_array_equal(pts["group"], np.repeat(token_groups, K))
    fig = figures.embedding(pts)
    for ax, col in zip(fig.axes, ("expert", "group")):
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert sorted(labels) == sorted(set(pts[col].astype(str))) and pts.attrs["method"].upper() in ax.get_title()
        for coll, label in zip(ax.collections, labels):
            np.testing.assert_array_equal(coll.get_offsets(), xy[(pts[col].astype(str) == label).to_numpy()])
    return xy


UMAP_CASE = dict(seqs=sequences(10, seed=3), kw=dict(batch_size=3, num_tokens=60, groups=["a", "b"] * 5))


def test_reduce_2d_without_umap_falls_back_to_pca():
    model, seqs, kw = tiny_model("olmoe"), UMAP_CASE["seqs"], UMAP_CASE["kw"]
    pts = reduce_2d(model, token_batches(seqs, **kw), layer=1, method="auto", umap_installed=False)
    assert pts.attrs["method"] == "pca" and pts.attrs["layer"] == 1
    xy = _check_points(pts, model, seqs, kw, layer=1)
    X, _ = expert_points(model, token_batches(seqs, **kw), layer=1)
    np.testing.assert_allclose(xy, pca_2d(X))
    with pytest.raises(MoetraceError, match="umap-learn is not installed"):
        reduce_2d(model, token_batches(seqs, **kw), layer=1, method="umap", umap_installed=False)


@pytest.mark.slow  # ~30 s, nearly all of it numba compiling umap-learn on first use
@pytest.mark.skipif(not umap_available(), reason="umap-learn is not installed (pip install moetrace[umap])")
def test_reduce_2d_umap_on_a_tiny_model():
    from sklearn.manifold import trustworthiness

    model, seqs, kw = tiny_model("olmoe"), UMAP_CASE["seqs"], UMAP_CASE["kw"]
    pts = reduce_2d(model, token_batches(seqs, **kw), layer=1, method="umap", seed=0)
    assert pts.attrs["method"] == "umap" and pts.attrs["layer"] == 1
    xy = _check_points(pts, model, seqs, kw, layer=1)
    # UMAP keeps the neighbourhoods of the expert outputs it embedded: measured 0.78 here, against
    # 0.67 for their PCA and 0.5 for a random layout
    X, _ = expert_points(model, token_batches(seqs, **kw), layer=1)
    trust = trustworthiness(X, xy, n_neighbors=5)
    assert trust > 0.7 and trust > trustworthiness(X, pca_2d(X), n_neighbors=5) + 0.05


def test_steering_ablation_equals_zeroing_the_expert_by_hand():
    model = tiny_model("olmoe")  # no renormalization: weight x 0 == the expert's output removed
    prompt = sequences(1, seed=4)[0]
    with torch.no_grad():
        before = model(input_ids=torch.tensor([prompt])).logits[0, 3]
    layer, expert = 1, int(torch.argmax(before).item()) % 8
    res = steer_prompt(model, prompt, [layer], expert, scale=0.0, target_idx=3, max_new_tokens=4)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.model.layers[layer].mlp.experts.down_proj[expert].zero_()
        p_ref = torch.softmax(ref(input_ids=torch.tensor([prompt])).logits[0, 3].double(), -1).numpy()
    for t in res["next_token"]["tokens"]:
        assert t["p_after"] == pytest.approx(p_ref[t["token_id"]], rel=1e-4, abs=1e-7)
    assert len(res["before"]["generated_ids"]) == 4
    # no-op steering changes nothing
    same = steer_prompt(model, prompt, [0, 2], 5, scale=1.0, logit=0.0, target_idx=-1, max_new_tokens=3)
    assert same["next_token"]["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["before"]["generated_ids"] == same["after"]["generated_ids"]
    with pytest.raises(MoetraceError, match="target-idx"):
        steer_prompt(model, prompt, [1], 0, target_idx=len(prompt))

"""moetrace.analysis: decisiveness and similarity against independent references (SciPy's entropy,
CKA by the HSIC formula with explicit centering matrices, plain torch expert MLPs, a slow loop)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from moetrace.analysis import decisiveness, expert_similarity, linear_cka, router_entropy, weight_similarity
from moetrace.analysis._common import LayerInputs, blocks, expert_outputs, experts_modules, token_batches
from moetrace.errors import MoetraceError
from moetrace.analysis.decisiveness import table as decisiveness_table
from moetrace.store import TraceStore
from tiny_models import TINY, VOCAB, tiny_model

FAMILIES = ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "granitemoe", "lfm2_moe", "jamba"]


# ------------------------------------------------------------------------------- references


def hsic_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) with linear kernels and the centering matrix H."""
    n = X.shape[0]
    H = np.eye(n) - np.ones((n, n)) / n
    K, L = X @ X.T, Y @ Y.T
    hsic = lambda A, B: np.trace(A @ H @ B @ H) / (n - 1) ** 2  # noqa: E731
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def test_router_entropy_matches_scipy():
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(16, 0.3), size=200)
    p[0] = 0.0
    p[0, 3] = 1.0  # one-hot: entropy 0
    p[1] = 1.0 / 16  # uniform: entropy 1
    got = router_entropy(p)
    want = scipy.stats.entropy(p, axis=1) / np.log(16)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    assert got[0] == 0.0 and got[1] == pytest.approx(1.0)
    np.testing.assert_allclose(router_entropy(torch.tensor(p, dtype=torch.float32)), want, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 9)), elements=st.floats(0, 1)))
def test_router_entropy_property(p):
    p = p + 1e-9  # scipy needs positive row sums
    np.testing.assert_allclose(router_entropy(p), scipy.stats.entropy(p, axis=1) / np.log(p.shape[1]),
                               rtol=1e-9, atol=1e-12)


def test_linear_cka_matches_hsic_reference():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 7))
    Y = X @ rng.normal(size=(7, 3)) + 0.5 * rng.normal(size=(40, 3))  # other width
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-10)
    assert linear_cka(torch.tensor(X), torch.tensor(Y)) == pytest.approx(hsic_cka(X, Y), rel=1e-10)
    # invariances: isotropic scaling, orthogonal transform, translation; CKA(X, X) = 1
    Q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    assert linear_cka(3.0 * X @ Q + 5.0, X) == pytest.approx(1.0)
    assert 0.0 <= linear_cka(X, rng.normal(size=(40, 5))) < 0.6
    with pytest.raises(MoetraceError, match="same samples"):
        linear_cka(X, Y[:10])


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 30), st.integers(1, 6), st.integers(1, 6), st.integers(0, 10_000))
def test_linear_cka_property(n, p, q, seed):
    rng = np.random.default_rng(seed)
    X, Y = rng.normal(size=(n, p)), rng.normal(size=(n, q))
    assert linear_cka(X, Y) == pytest.approx(hsic_cka(X, Y), rel=1e-8, abs=1e-12)


# ------------------------------------------------------------------------------- decisiveness


def probs_store(path, n=700, L=3, E=8, K=2, seed=0):
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(E, 0.4), size=(n, L)).astype(np.float16)
    experts = np.argsort(-probs.astype(np.float32), axis=-1)[..., :K]
    domain = np.where(rng.random(n) < 0.3, "code", "math")
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=K, probs=True, labels={"domain": ["code", "math"]},
                           layer_ids=[1, 3, 5], chunk_rows=128) as st:
        st.append({"seq": np.arange(n) // 50, "pos": np.arange(n) % 50, "token_id": rng.integers(0, 30, n),
                   "domain": domain, "experts": experts, "probs": probs})
    return probs.astype(np.float64), domain


def test_decisiveness_matches_direct_computation(tmp_path):
    probs, domain = probs_store(tmp_path / "t.zarr")
    ds = decisiveness(tmp_path / "t.zarr", layers=[3, 5], num_tokens=600, by=["domain"], bins=50)
    p = probs[:600, 1:]
    h = scipy.stats.entropy(p, axis=-1) / np.log(8)  # [600, 2]
    mass = np.sort(p, axis=-1)[..., -2:].sum(-1) / p.sum(-1)
    for gi, g in enumerate(["code", "math"]):
        sel = domain[:600] == g
        np.testing.assert_allclose(ds["mean_entropy"].values[gi], h[sel].mean(0), rtol=1e-5)
        np.testing.assert_allclose(ds["mean_mass"].values[gi], mass[sel].mean(0), rtol=1e-5)
        assert ds["tokens"].values[gi] == sel.sum()
    for li in range(2):
        want, _ = np.histogram(h[:, li], bins=50, range=(0, 1))
        np.testing.assert_array_equal(ds["entropy_hist"].values[li], want)
        # histogram quantiles are within one bin of the exact ones
        np.testing.assert_allclose(ds["entropy_quantile"].values[li], np.quantile(h[:, li], ds["quantile"].values),
                                   atol=1 / 50)
    for gi, g in enumerate(["code", "math"]):  # each group's own quantiles (the CSV's), not the layer's
        sel = domain[:600] == g
        for li in range(2):
            np.testing.assert_allclose(ds["group_entropy_quantile"].values[gi, li],
                                       np.quantile(h[sel, li], ds["quantile"].values), atol=1 / 50)
            np.testing.assert_allclose(ds["group_mass_quantile"].values[gi, li],
                                       np.quantile(mass[sel, li], ds["quantile"].values), atol=1 / 50)
    csv = decisiveness_table(ds)
    row = csv[(csv["group"] == "code") & (csv["layer"] == 5)].iloc[0]
    assert row["entropy_q0.5"] == pytest.approx(float(ds["group_entropy_quantile"].sel(group="code", layer=5,
                                                                                        quantile=0.5)))
    assert ds["layer"].values.tolist() == [3, 5]
    with pytest.raises(MoetraceError, match="layer 2 is not a recorded"):
        decisiveness(tmp_path / "t.zarr", layers=[2])


def test_decisiveness_mass_is_that_of_the_experts_the_token_was_routed_to(tmp_path):
    """A biased or group-limited router (DeepSeek-V3's family) does not route to the K largest scores:
    the mass is the selected experts' share, not the top-K scores'."""
    rng = np.random.default_rng(3)
    n, E, K = 400, 8, 2
    probs = rng.dirichlet(np.full(E, 0.5), size=(n, 1)).astype(np.float16)
    experts = np.stack([rng.permutation(E)[:K] for _ in range(n)])[:, None, :]  # not the largest
    with TraceStore.create(tmp_path / "t.zarr", n_layers=1, n_experts=E, top_k=K, probs=True) as st:
        st.append({"seq": np.arange(n) // 40, "pos": np.arange(n) % 40, "experts": experts, "probs": probs})
    p = probs.astype(np.float64)[:, 0]
    want = np.take_along_axis(p, experts[:, 0], axis=1).sum(1) / p.sum(1)
    ds = decisiveness(tmp_path / "t.zarr")
    assert float(ds["mean_mass"].values[0, 0]) == pytest.approx(want.mean(), rel=1e-5)
    assert float(ds["mean_mass"].values[0, 0]) < (np.sort(p, 1)[:, -K:].sum(1) / p.sum(1)).mean() - 0.1


def test_blocks_cut_store_chunks_into_bounded_consecutive_views(tmp_path):
    probs, _ = probs_store(tmp_path / "t.zarr")  # 1000 rows in chunks of 128
    st = TraceStore.open(tmp_path / "t.zarr")
    got = list(blocks(st.iter_chunks(["probs", "domain"], rows=(10, 700)), block_rows=50))
    assert [b.start for b in got[1:]] == [b.stop for b in got[:-1]] and (got[0].start, got[-1].stop) == (10, 700)
    assert max(len(b) for b in got) == 50 and all(len(b) > 0 for b in got)
    np.testing.assert_array_equal(np.concatenate([b["probs"] for b in got]).astype(np.float64), probs[10:700])
    assert sum(len(b["domain"]) for b in got) == 690


def test_decisiveness_needs_probs(tmp_path):
    with TraceStore.create(tmp_path / "p.zarr", n_layers=1, n_experts=4, top_k=1) as st:
        st.append({"seq": np.zeros(3), "pos": np.arange(3), "experts": np.zeros((3, 1, 1))})
    with pytest.raises(MoetraceError, match="capture with --probs"):
        decisiveness(tmp_path / "p.zarr")


# ------------------------------------------------------------------------------- expert outputs


def test_expert_outputs_match_plain_torch_olmoe():
    model = tiny_model("olmoe")
    mods = experts_modules(model, [1])
    module, E, _ = mods[1]
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    out = expert_outputs(module, x, E)
    for e in range(E):
        gate, up = (x @ module.gate_up_proj[e].T).chunk(2, dim=-1)
        want = (torch.nn.functional.silu(gate) * up) @ module.down_proj[e].T
        torch.testing.assert_close(out[e], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES + [pytest.param(f, marks=pytest.mark.slow)
                                               for f in TINY if f not in FAMILIES])
def test_expert_outputs_combine_to_the_routed_output(family):
    """On real routed inputs, the routed output of the experts module is the weighted sum of the
    per-expert outputs: the all-experts computation is the family's own expert function."""
    model = tiny_model(family)
    mods = experts_modules(model)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    captured = {}

    def keep(layer):
        def hook(mod, args, kwargs, out):
            captured.setdefault(layer, (args, kwargs, out))
        return hook

    hooks = [m.register_forward_hook(keep(layer), with_kwargs=True) for layer, (m, _, _) in mods.items()]
    with torch.no_grad():
        model(input_ids=ids)
        for h in hooks:
            h.remove()
        for layer, (module, E, K) in mods.items():
            args, kwargs, routed = captured[layer]
            values = list(args) + list(kwargs.values())
            hidden, index, weights = values[0], values[1], values[2]
            all_out = expert_outputs(module, hidden, E)  # [E, T, H]
            want = torch.zeros_like(routed)
            for k in range(index.shape[1]):
                want += all_out[index[:, k], torch.arange(hidden.shape[0])] * weights[:, k, None]
            torch.testing.assert_close(routed, want, rtol=1e-4, atol=1e-5)


def test_expert_similarity_matches_materialized_outputs():
    model = tiny_model("qwen3_moe")
    rng = np.random.default_rng(3)
    seqs = [rng.integers(3, VOCAB, size=int(n)).tolist() for n in rng.integers(4, 12, size=9)]
    ds = expert_similarity(model, token_batches(seqs, batch_size=4, num_tokens=60), layers=[0, 2])
    assert ds.attrs["tokens"] == 60
    # reference: every real token's layer input, then all experts' outputs at once, then loops
    mods = experts_modules(model, [0, 2])
    with torch.no_grad():
        for layer in (0, 2):
            hidden = []
            for batch in token_batches(seqs, batch_size=4, num_tokens=60):
                with LayerInputs(mods) as rec:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                h = rec.inputs[layer][0]
                hidden.append(h.reshape(-1, h.shape[-1])[torch.as_tensor(batch["real"])])
            module, E, _ = mods[layer]
            out = expert_outputs(module, torch.cat(hidden), E).double().numpy()
            for i in range(E):
                for j in range(E):
                    cos = np.mean(np.sum(out[i] * out[j], 1) / np.linalg.norm(out[i], axis=1)
                                  / np.linalg.norm(out[j], axis=1))
                    assert ds["cosine"].sel(layer=layer).values[i, j] == pytest.approx(cos, rel=1e-5, abs=1e-6)
                    assert ds["cka"].sel(layer=layer).values[i, j] == pytest.approx(hsic_cka(out[i], out[j]), rel=1e-5, abs=1e-6)
    w = weight_similarity(model, [0])["weight_cosine"].values[0]
    module = mods[0][0]
    flat = torch.cat([module.gate_up_proj.reshape(8, -1), module.down_proj.reshape(8, -1)], 1).double()
    assert w[1, 4] == pytest.approx(float(torch.nn.functional.cosine_similarity(flat[1], flat[4], dim=0)))
    np.testing.assert_allclose(np.diag(w), 1.0)


def test_cka_in_the_sample_form_equals_the_feature_form():
    """Where (E*H)^2 is over the memory limit, CKA is computed from the n x n Gram matrices of the tokens
    (exact, not an estimate); cosine alone keeps no accumulator at all."""
    model = tiny_model("qwen3_moe")
    rng = np.random.default_rng(4)
    seqs = [rng.integers(3, VOCAB, size=int(n)).tolist() for n in rng.integers(4, 12, size=9)]
    feature = expert_similarity(model, token_batches(seqs, batch_size=4, num_tokens=50), layers=[1])
    H = model.config.hidden_size
    limit = (8 * H) ** 2 * 8 - 1  # the feature form does not fit; 50 tokens' samples do
    sample = expert_similarity(model, token_batches(seqs, batch_size=4, num_tokens=50), layers=[1], max_bytes=limit)
    assert feature.attrs["cka_form"] == "features" and sample.attrs["cka_form"] == "samples"
    np.testing.assert_allclose(sample["cka"].values, feature["cka"].values, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sample["cosine"].values, feature["cosine"].values)
    with pytest.raises(MoetraceError, match=r"use at most [\d,]+ tokens \(--num-tokens\)"):
        expert_similarity(model, token_batches(seqs, batch_size=4, num_tokens=50), layers=[1], max_bytes=8 * 8 * 60 * 8)
    cosine = expert_similarity(model, token_batches(seqs, batch_size=4, num_tokens=50), layers=[1], measures=["cosine"],
                               max_bytes=0)
    assert list(cosine.data_vars) == ["cosine"] and "cka_form" not in cosine.attrs
    np.testing.assert_allclose(cosine["cosine"].values, feature["cosine"].values)


def test_weight_cka_is_linear_cka_of_the_weights_over_the_residual_dimensions():
    model = tiny_model("qwen3_moe")
    module = experts_modules(model, [0])[0][0]
    H = model.config.hidden_size
    oriented = [p.detach().double() if p.shape[1] == H else p.detach().double().transpose(1, 2)
                for p in (module.gate_up_proj, module.down_proj)]
    X = torch.cat(oriented, dim=2).numpy()  # [E, H, features]
    assert X.shape[1] == H
    w = weight_similarity(model, [0])["weight_cka"].values[0]
    for i, j in ((1, 4), (0, 7), (3, 3)):
        assert w[i, j] == pytest.approx(linear_cka(X[i], X[j]), rel=1e-9)
        assert w[i, j] == pytest.approx(hsic_cka(X[i], X[j]), rel=1e-6)


@pytest.mark.parametrize("bad", [[3, 99], [8], [-1], [2, 2]])
def test_expert_ids_outside_the_model_are_refused_before_any_forward(bad):
    """An id >= E or < 0 read memory outside the fused experts' weights (cosine = CKA = 1.0 for expert 99,
    uninitialised outputs from expert_outputs); a repeated id would be compared with itself."""
    model = tiny_model("qwen3_moe")
    batches = token_batches([[5, 6, 7, 8]], batch_size=1)
    with pytest.raises(MoetraceError, match=r"experts: (expected expert ids in \[0, 8\)|expert 2 is named twice)"):
        expert_similarity(model, batches, layers=[0], experts=bad)
    module, n_experts, _ = experts_modules(model, [0])[0]
    with pytest.raises(MoetraceError, match="experts: "):
        expert_outputs(module, torch.zeros(3, 32), n_experts, bad)


def test_analyses_group_tokens_with_the_count_drivers_checked_codes(tmp_path):
    """A store whose label list no longer covers its codes: count refuses it, and so do the analyses
    (they once computed group codes apart, without the check, and put tokens under the wrong group)."""
    import json

    from moetrace.counting import count

    probs_store(tmp_path / "t.zarr")
    meta_path = tmp_path / "t.zarr" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["attributes"]["moetrace"]["labels"]["domain"] = ["code"]  # "math" (code 1) dropped
    meta_path.write_text(json.dumps(meta))
    for run in (lambda: count(tmp_path / "t.zarr", stats=["experts"], by=["domain"], progress=False),
                lambda: decisiveness(tmp_path / "t.zarr", by=["domain"])):
        with pytest.raises(MoetraceError, match=r"tokens/domain: code 1 beyond the label vocabulary \(1 values\)"):
            run()

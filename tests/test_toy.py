"""Seed 001's toy MoE: the model, metrics, batched training and the CLI, against slow Python loops."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch

from moetrace.cli import main as cli_main
from moetrace.errors import MoetraceError
from moetrace.toy import (BatchedMoE, Config, MoEModel, expert_feat_dimensionality, feature_batch,
                          feature_specialization, global_feature_dimensionality, most_monosemantic, optimize,
                          polysemanticity, train_batched, weighted_global_dim)
from moetrace.toy.metrics import feature_dimensionality, specialization, summary


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(W):
    """``[E, F, H]`` tensor -> nested Python lists of floats."""
    return W.tolist()


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def slow_dimensionality(W):
    out = []
    for We in rows(W):
        de = []
        for wi in We:
            n2 = dot(wi, wi)
            if n2 == 0:
                de.append(0.0)
                continue
            hat = [v / math.sqrt(n2) for v in wi]
            de.append(n2 / sum(dot(hat, wj) ** 2 for wj in We))
        out.append(de)
    return out


def slow_specialization(W):
    n2 = [[dot(wi, wi) for wi in We] for We in rows(W)]
    E, F = len(n2), len(n2[0])
    total = [sum(n2[x][i] for x in range(E)) for i in range(F)]
    return [[n2[e][i] / total[i] if total[i] else 0.0 for i in range(F)] for e in range(E)]


def slow_polysemanticity(W):
    out = []
    for We in rows(W):
        pe = []
        for i, wi in enumerate(We):
            hat = [v / (1e-5 + math.sqrt(dot(wi, wi))) for v in wi]
            pe.append(math.sqrt(sum(dot(hat, wj) ** 2 for j, wj in enumerate(We) if j != i)))
        out.append(pe)
    return out


def slow_usage(gate, x):
    g, E = gate.tolist(), gate.shape[0]
    counts = [0] * E
    for xb in x.tolist():
        scores = [dot(xb, g[e]) for e in range(E)]
        counts[max(range(E), key=lambda e: (scores[e], -e))] += 1
    return [c / len(x) for c in counts]


@pytest.mark.parametrize("E,F,H", [(1, 7, 3), (3, 11, 4), (5, 6, 2)])
def test_metrics_match_slow_loops(E, F, H):
    g = torch.Generator().manual_seed(E * 100 + F)
    W = torch.randn(E, F, H, generator=g, dtype=torch.float64)
    W[0, 1] = 0.0  # a feature expert 0 does not hold at all
    D, S, P = slow_dimensionality(W), slow_specialization(W), slow_polysemanticity(W)
    np.testing.assert_allclose(feature_dimensionality(W).numpy(), D, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(specialization(W).numpy(), S, rtol=1e-12)
    np.testing.assert_allclose(polysemanticity(W).numpy(), P, rtol=1e-12, atol=1e-12)
    held = W.square().sum((0, 2)) > 0
    np.testing.assert_allclose(specialization(W).sum(0)[held].numpy(), 1.0)
    # the seed's named functions on a model, rounded to 3 decimals like the seed
    model = MoEModel(Config(F, H, E, 1, False), torch.tensor(0.3), device="cpu", seed=3, dtype=torch.float64)
    with torch.no_grad():
        model.W_experts.copy_(W)
    np.testing.assert_allclose(expert_feat_dimensionality(model).numpy(), np.round(D, 3), atol=1e-12)
    np.testing.assert_allclose(feature_specialization(model).numpy(), np.round(S, 3), atol=1e-12)
    x = model.generate_batch(300)
    usage, glob = global_feature_dimensionality(model, x)
    u = slow_usage(model.gate.detach(), x)
    np.testing.assert_allclose(usage.numpy(), u)
    expected = [sum(u[e] * round(D[e][i], 3) for e in range(E)) for i in range(F)]
    np.testing.assert_allclose(glob.numpy(), np.round(expected, 3), atol=1e-12)
    wg = [sum(round(S[e][i], 3) * round(D[e][i], 3) for e in range(E)) for i in range(F)]
    np.testing.assert_allclose(weighted_global_dim(model).numpy(), wg, atol=1e-12)
    mono = most_monosemantic(W, n=3)
    for e in range(E):
        assert sorted(P[e])[:3] == pytest.approx(sorted(P[e][i] for i in mono[e].tolist()))


def slow_route(gate, x, k):
    """Per input: renormalized softmax weights of the top-k experts (ties to the lower index) and the 0/1 active list."""
    g, E = gate.tolist(), gate.shape[0]
    weights, active = [], []
    for xb in x.tolist():
        scores = [dot(xb, g[e]) for e in range(E)]
        z = [math.exp(v - max(scores)) for v in scores]
        probs = [v / sum(z) for v in z]
        top = sorted(range(E), key=lambda e: (-probs[e], e))[:k]
        total = sum(probs[e] for e in top)
        weights.append([probs[e] / total if e in top else 0.0 for e in range(E)])
        active.append([1.0 if e in top else 0.0 for e in range(E)])
    return weights, active


def slow_summary(W, gate, x, k):
    """Every metric of ``summary`` by Python loops; usage only over inputs that are not all zero."""
    E, F, H = W.shape
    D, S, P = slow_dimensionality(W), slow_specialization(W), slow_polysemanticity(W)
    weights, active = slow_route(gate, x, k)
    xs = x.tolist()
    kept = [b for b, xb in enumerate(xs) if any(v != 0 for v in xb)]
    usage = [sum(weights[b][e] for b in kept) / len(kept) for e in range(E)]
    # Chaudhari et al.'s weighted_avg_features_per_dim: sum_e p_e ||W_e||_F^2 / m / k
    frob = [sum(dot(w, w) for w in W[e].tolist()) for e in range(E)]
    fpd = sum(usage[e] * frob[e] / H for e in range(E)) / k
    # their global_feat_dim: alpha_i^(e) = P(e active | feature i present)
    glob = []
    for i in range(F):
        with_i = [b for b, xb in enumerate(xs) if xb[i] > 0]
        alpha = [sum(active[b][e] for b in with_i) / len(with_i) if with_i else 0.0 for e in range(E)]
        glob.append(sum(alpha[e] * D[e][i] for e in range(E)))
    present = [(e, i) for e in range(E) for i in range(F) if dot(W[e, i].tolist(), W[e, i].tolist()) > 0.25]
    rep = [i for i in range(F) if glob[i] > 0.05]
    share = [u / sum(usage) for u in usage]
    return {
        "features_per_dim": fpd,
        "n_represented": len(rep),
        "mean_global_dim": sum(glob) / F,
        "mean_weighted_global_dim": sum(S[e][i] * D[e][i] for e in range(E) for i in range(F)) / F,
        "dims_per_feature": sum(H / f for f in frob) / E,
        "mean_expert_dim": sum(D[e][i] for e, i in present) / len(present),
        "monosemantic_fraction": sum(D[e][i] > 0.9 for e, i in present) / len(present),
        "features_per_expert": len(present) / E,
        "mean_polysemanticity": sum(P[e][i] for e, i in present) / len(present),
        "mean_max_specialization": sum(max(S[e][i] for e in range(E)) for i in rep) / len(rep),
        "usage_entropy": -sum(p * math.log(p) for p in share if p > 0),
    }


@pytest.mark.parametrize("k", [1, 2])
def test_summary_metrics_match_slow_loops_and_ignore_padding(k):
    g = torch.Generator().manual_seed(7)
    E, F, H = 3, 9, 4
    W = torch.randn(E, F, H, generator=g, dtype=torch.float64) * 0.6
    gate = torch.randn(E, F, generator=g, dtype=torch.float64)
    x = torch.rand(200, F, generator=g, dtype=torch.float64) * (torch.rand(200, F, generator=g) < 0.3)
    assert (x == 0).all(-1).sum() > 5  # all-zero inputs are in the batch and must not count
    want = slow_summary(W, gate, x, k)
    model = BatchedMoE([Config(F, H, E, k)], [0.3], seeds=[0], device="cpu", dtype=torch.float64)
    with torch.no_grad():
        model.W_experts.copy_(W[None])
        model.gate.copy_(gate[None])
    with torch.no_grad():
        weights, active, _ = model.route(x[None])
        got = summary(W[None], x[None], weights, active, model.expert_mask, model.n_active)
    assert set(got) == set(want)
    for name, v in want.items():
        assert float(got[name][0]) == pytest.approx(v, rel=1e-10, abs=1e-12), name
    # the same model padded to 5 experts (zeros, masked) in a stack of two: same numbers
    padded = BatchedMoE([Config(F, H, E, k), Config(F, H, 5, k)], [0.3, 0.3], seeds=[0, 1], device="cpu",
                        dtype=torch.float64)
    with torch.no_grad():
        padded.W_experts.zero_()
        padded.gate.zero_()
        padded.W_experts[:, :E] = W
        padded.gate[:, :E] = gate
    xx = torch.stack([x, x])
    with torch.no_grad():
        weights, active, _ = padded.route(xx)
        got = summary(padded.W_experts, xx, weights, active, padded.expert_mask, padded.n_active)
    for name, v in want.items():
        assert float(got[name][0]) == pytest.approx(v, rel=1e-10, abs=1e-12), name


@pytest.mark.parametrize("p", [0.5, 0.1, 0.01])
def test_representation_metrics_come_from_the_weights_not_from_all_zero_inputs(p):
    """20 features, 5 experts of 4 dimensions; expert e holds features 4e..4e+3 on orthonormal axes
    (each D = 1) and its router row picks exactly those. Every feature is represented at every p.
    At p = 0.01, 82% of inputs are all zero, a router tie that goes to expert 0: a usage over all
    inputs (the seed's top-1 usage, which the sweep's n_represented used to weight by) leaves 16
    of the 20 features under the 0.05 threshold."""
    F, E, H = 20, 5, 4
    W = torch.zeros(E, F, H, dtype=torch.float64)
    gate = torch.full((E, F), -5.0, dtype=torch.float64)
    for e in range(E):
        for j in range(H):
            W[e, H * e + j, j] = 1.0
            gate[e, H * e + j] = 5.0
    model = BatchedMoE([Config(F, H, E, 1)], [p], seeds=[11], device="cpu", dtype=torch.float64)
    with torch.no_grad():
        model.W_experts.copy_(W[None])
        model.gate.copy_(gate[None])
    x = model.training_batch(0, 20_000)
    with torch.no_grad():
        weights, active, _ = model.route(x)
        got = summary(model.W_experts, x, weights, active, model.expert_mask, model.n_active)
    assert float(got["n_represented"][0]) == F
    if p == 0.01:  # an input mostly holds one feature (with another expert's feature in ~15%, half of which it loses)
        assert 0.85 < float(got["mean_global_dim"][0]) < 1.0
    assert float(got["features_per_dim"][0]) == pytest.approx(1.0, abs=0.02)  # 4 features in 4 dims per expert
    # the seed's top-1-usage-weighted global dimensionality, for the record of why it is not used
    seed_usage = torch.tensor(slow_usage(gate, x[0]), dtype=torch.float64)
    seed_glob = torch.einsum("e,ef->f", seed_usage, feature_dimensionality(W))
    if p == 0.01:
        assert float((x[0] == 0).all(-1).double().mean()) == pytest.approx(0.99 ** 20, abs=0.02)
        assert int((seed_glob > 0.05).sum()) == 4  # only expert 0's features
    else:
        assert int((seed_glob > 0.05).sum()) == F


def test_mean_feature_reduction_is_the_sum_over_features_divided_by_their_number():
    cfgs = [Config(7, 3, 3, 2), Config(7, 3, 3, 1)]
    a = BatchedMoE(cfgs, [0.4, 0.2], [torch.linspace(1, 0.5, 7), None], seeds=[1, 2], device="cpu", dtype=torch.float64)
    b = BatchedMoE(cfgs, [0.4, 0.2], [torch.linspace(1, 0.5, 7), None], seeds=[1, 2], device="cpu", dtype=torch.float64,
                   feature_reduction="mean")
    x = a.training_batch(0, 64)
    torch.testing.assert_close(b.losses(x)[0], a.losses(x)[0] / 7)
    with pytest.raises(MoetraceError, match="feature_reduction"):
        BatchedMoE(cfgs, [0.4, 0.2], seeds=[1, 2], device="cpu", feature_reduction="max")


@pytest.mark.parametrize("renormalize,lb", [(True, True), (False, False)])
def test_forward_matches_a_loop_over_inputs(renormalize, lb):
    cfg = Config(6, 3, 4, 2, lb, renormalize=renormalize)
    # p = 0.9: no all-zero input, whose uniform router probabilities would make top-k a tie
    model = MoEModel(cfg, torch.tensor(0.9), 0.8 ** torch.arange(6, dtype=torch.float64), device="cpu", seed=5, dtype=torch.float64)
    x = model.generate_batch(17)
    out, lb_loss = model(x)
    W, b, gate = model.W_experts.tolist(), model.b_final.tolist(), model.gate.tolist()
    f_sum, p_sum = [0.0] * 4, [0.0] * 4
    for n, xb in enumerate(x.tolist()):
        scores = [dot(xb, gate[e]) for e in range(4)]
        z = [math.exp(s - max(scores)) for s in scores]
        probs = [v / sum(z) for v in z]
        top = sorted(range(4), key=lambda e: -probs[e])[:2]
        denom = sum(probs[e] for e in top) if renormalize else 1.0
        expected = [0.0] * 6
        for e in top:
            hidden = [sum(xb[f] * W[e][f][h] for f in range(6)) for h in range(3)]
            for f in range(6):
                expected[f] += probs[e] / denom * max(0.0, dot(hidden, W[e][f]) + b[e][f])
            f_sum[e] += 1
        p_sum = [p_sum[e] + probs[e] for e in range(4)]
        np.testing.assert_allclose(out[n].tolist(), expected, rtol=1e-12, atol=1e-12)
    if lb:
        assert float(lb_loss.detach()) == pytest.approx(0.01 * 4 * sum(f / 17 * p / 17 for f, p in zip(f_sum, p_sum)), rel=1e-12)
    else:
        assert lb_loss is None
    # loss: importance-weighted, mean over the batch, SUMMED over features
    want = sum(0.8 ** f * sum((x[n, f] - out.detach()[n, f]) ** 2 for n in range(17)) / 17 for f in range(6))
    assert float(model.reconstruction_loss(x, out).detach()) == pytest.approx(float(want), rel=1e-12)


def test_feature_batch_is_a_keyed_stream_with_the_right_law():
    p = torch.tensor([[0.1] * 50, [0.6] * 50])
    x = feature_batch(torch.tensor([3, 4]), 7, 4000, p)
    assert x.shape == (2, 4000, 50)
    present = x > 0
    assert present[0].float().mean() == pytest.approx(0.1, abs=0.005)
    assert present[1].float().mean() == pytest.approx(0.6, abs=0.005)
    assert x[present].mean() == pytest.approx(0.5, abs=0.01) and float(x.max()) < 1.0
    # each instance's rows depend only on its own seed and the step
    alone = feature_batch(torch.tensor([4]), 7, 4000, p[1:])
    assert torch.equal(alone[0], x[1])
    assert not torch.equal(feature_batch(torch.tensor([4]), 8, 4000, p[1:]), alone)
    # features of one input are not correlated with each other (loose check of the mixing)
    c = np.corrcoef(x[1].numpy().T)
    assert np.abs(c[~np.eye(50, dtype=bool)]).max() < 0.08


def test_gate_initializations():
    m = MoEModel(Config(23, 2, 5, 1, False, gate_init="disjoint"), device="cpu", seed=1)
    gate = m.gate.detach()
    assert set(gate.unique().tolist()) == {0.0, 1.0}
    assert gate.sum(1).tolist() == [4.0] * 5 and gate.sum(0).max() == 1
    m = MoEModel(Config(6, 2, 3, 1, False, gate_init="identity"), device="cpu", seed=1)
    assert torch.equal(m.gate.detach(), torch.eye(3, 6))
    with pytest.raises(MoetraceError, match="n_active_experts"):
        Config(5, 2, 2, 3, False)


def test_training_is_deterministic_and_logs_like_the_seed(caplog, capsys):
    cfg = Config(8, 3, 2, 1, True)

    def run():
        m = MoEModel(cfg, torch.tensor(0.2), device="cpu", seed=11)
        return m, optimize(m, n_batch=32, steps=25, print_freq=10)

    with caplog.at_level(logging.INFO, logger="moetrace.toy"):
        m1, h1 = run()
    m2, h2 = run()
    assert torch.equal(h1["reconstruction_loss"], h2["reconstruction_loss"])
    assert torch.equal(m1.W_experts, m2.W_experts) and torch.equal(m1.gate, m2.gate)
    assert h1["reconstruction_loss"][-5:].mean() < h1["reconstruction_loss"][:5].mean()
    assert (h1["load_balance_loss"] > 0).all()
    steps = [r.getMessage() for r in caplog.records if r.name == "moetrace.toy"]
    assert [s.split(":")[0] for s in steps] == ["Step 0", "Step 10", "Step 20", "Step 24"]
    assert "Reconstruction loss=" in steps[0] and ", lr=0.001000" in steps[0]
    assert capsys.readouterr().out == ""  # the library logs, never prints


def test_batched_training_equals_one_by_one_training():
    """I instances with different E (padded), k, renormalization, LB loss, sparsity and importance."""
    F, H = 6, 3
    configs = [Config(F, H, 1, 1, False), Config(F, H, 3, 2, True), Config(F, H, 4, 1, False, renormalize=False),
               Config(F, H, 2, 2, True, gate_init="disjoint")]
    probs = [0.5, torch.linspace(0.1, 0.6, F), 0.2, 0.05]
    imps = [None, 0.7 ** torch.arange(F.__float__()), torch.linspace(1, 0.2, F), 2.0]
    seeds = [3, 1, 4, 1_000_003]
    steps, n_batch = 15, 40
    batched = BatchedMoE(configs, probs, imps, seeds, device="cpu", dtype=torch.float64)
    hist = train_batched(batched, n_batch=n_batch, steps=steps, print_freq=100)
    assert hist["reconstruction_loss"].shape == (steps, 4)
    for i, cfg in enumerate(configs):
        single = MoEModel(cfg, torch.as_tensor(probs[i]), None if imps[i] is None else torch.as_tensor(imps[i]),
                          device="cpu", seed=seeds[i], dtype=torch.float64)
        h = optimize(single, n_batch=n_batch, steps=steps, print_freq=100)
        np.testing.assert_allclose(hist["reconstruction_loss"][:, i], h["reconstruction_loss"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(hist["load_balance_loss"][:, i], h["load_balance_loss"], rtol=1e-9, atol=1e-12)
        E = cfg.n_experts
        for name in ("W_experts", "b_final", "gate"):
            np.testing.assert_allclose(getattr(batched, name)[i, :E].detach(), getattr(single, name).detach(),
                                       rtol=1e-8, atol=1e-10, err_msg=f"instance {i} {name}")
            assert not getattr(batched, name)[i, E:].detach().any(), "padded experts must stay zero"
        out_b = batched.instance(i)(single.training_batch(99, 8))[0]
        np.testing.assert_allclose(out_b.detach(), single(single.training_batch(99, 8))[0].detach(), rtol=1e-8, atol=1e-10)
    # the objective is the SUM over instances: doubling the batch of models changes nobody's trajectory
    both = BatchedMoE(configs[1:2] * 2, probs[1:2] * 2, imps[1:2] * 2, [seeds[1]] * 2, device="cpu", dtype=torch.float64)
    h2 = train_batched(both, n_batch=n_batch, steps=steps, print_freq=100)
    np.testing.assert_allclose(h2["reconstruction_loss"][:, 0], hist["reconstruction_loss"][:, 1], rtol=1e-9)


def test_batched_rejects_mismatched_instances():
    with pytest.raises(MoetraceError, match=r"configs\[1\]"):
        BatchedMoE([Config(4, 2, 2, 1, False), Config(5, 2, 2, 1, False)], [0.1, 0.1], device="cpu")
    with pytest.raises(MoetraceError, match="importance"):
        BatchedMoE([Config(4, 2, 2, 1, False)], [0.1], [torch.ones(3)], device="cpu")


def test_cli_train_writes_model_metrics_and_figure(tmp_path):
    out = tmp_path / "train"
    code = cli_main(["toy", "train", "--features", "12", "--hidden", "3", "--experts", "3", "--active", "1",
                     "--feature-probability", "0.2", "--importance-decay", "0.9", "--shuffle-importance", "--steps",
                     "30", "--batch", "32", "--print-freq", "10", "--quiet", "--device", "cpu", "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert np.array(metrics["expert_feat_dimensionality"]).shape == (3, 12)
    assert sum(metrics["seed_top1_usage"]) == pytest.approx(1.0)
    glob = np.array(metrics["global_dimensionality_given_present"])
    assert metrics["n_features_represented"] == int((glob > 0.05).sum())
    assert metrics["features_per_dimension"] > 0
    assert sorted(metrics["importance"]) == pytest.approx(sorted(0.9 ** np.arange(12)))
    from safetensors.torch import load_file

    state = load_file(out / "model.safetensors")
    assert state["W_experts"].shape == (3, 12, 3) and state["gate"].shape == (3, 12)
    import matplotlib.image as mpimg

    img = mpimg.imread(out / "features.png")
    assert img.shape[0] > 700 and img.shape[1] >= 1400


def test_cli_sweep_writes_a_tidy_table_and_phase_diagrams(tmp_path):
    out = tmp_path / "sweep"
    code = cli_main(["toy", "sweep", "--features", "6", "--hidden", "2", "--experts", "1,2,3", "--active", "1,2",
                     "--feature-probability", "0.5,0.1", "--seeds", "0,1", "--steps", "12", "--batch", "16",
                     "--quiet", "--device", "cpu", "--out", str(out)])
    assert code == 0
    t = pd.read_csv(out / "sweep.csv")
    assert len(t) == (1 + 2 + 2) * 2 * 2  # (E, k<=E) pairs x probabilities x seeds
    assert t["seed"].is_unique
    for col in ("n_experts", "n_active_experts", "feature_probability", "network_sparsity", "final_loss",
                "features_per_dim", "n_represented", "mean_global_dim", "monosemantic_fraction", "usage_entropy"):
        assert t[col].notna().all(), col
    assert (t["network_sparsity"] == t["n_active_experts"] / t["n_experts"]).all()
    assert pd.read_parquet(out / "sweep.parquet").shape == t.drop(columns="model").shape
    assert (out / "phase_diagrams.png").stat().st_size > 10_000
    # padding all experts into one group gives the same models
    code = cli_main(["toy", "sweep", "--features", "6", "--hidden", "2", "--experts", "1,2,3", "--active", "1,2",
                     "--feature-probability", "0.5,0.1", "--seeds", "0,1", "--steps", "12", "--batch", "16",
                     "--quiet", "--device", "cpu", "--pad-experts", "--out", str(tmp_path / "padded")])
    assert code == 0
    tp = pd.read_csv(tmp_path / "padded" / "sweep.csv")
    np.testing.assert_allclose(tp["final_loss"], t["final_loss"], rtol=1e-4)


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert cli_main(["toy", "train", "--experts", "2", "--active", "3", "--out", str(tmp_path)]) == 2
    assert "n_active_experts" in capsys.readouterr().err
    assert cli_main(["toy", "sweep", "--experts", "1,x", "--out", str(tmp_path)]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draws_the_same_data_and_trains_like_the_cpu():
    p = torch.tensor([[0.3] * 9, [0.05] * 9])
    seeds = torch.tensor([5, 6])
    assert torch.equal(feature_batch(seeds, 3, 64, p).cuda(), feature_batch(seeds, 3, 64, p.cuda()))
    cfg = Config(9, 3, 4, 2, True)
    gpu = MoEModel(cfg, torch.tensor(0.2), device=None, seed=2)  # None: the GPU
    assert gpu.W_experts.is_cuda
    cpu = MoEModel(cfg, torch.tensor(0.2), device="cpu", seed=2)
    assert torch.equal(gpu.W_experts.detach().cpu(), cpu.W_experts.detach())
    h_gpu = optimize(gpu, n_batch=64, steps=20, print_freq=100)
    h_cpu = optimize(cpu, n_batch=64, steps=20, print_freq=100)
    np.testing.assert_allclose(h_gpu["reconstruction_loss"], h_cpu["reconstruction_loss"], rtol=1e-4)
    batched = BatchedMoE([cfg, Config(9, 3, 2, 1, False)], [0.2, 0.1], seeds=[2, 9], device=None)
    h = train_batched(batched, n_batch=64, steps=20, print_freq=100)
    np.testing.assert_allclose(h["reconstruction_loss"][:, 0], h_gpu["reconstruction_loss"], rtol=1e-4)


@pytest.mark.slow
def test_one_expert_reaches_the_antipodal_plateau():
    """Dense toy model (E = k = 1), F=20, H=5, uniform importance, p = 0.3: the represented features
    pair up antipodally, each at dimensionality 1/2 (the plateau Elhage et al. report; bench/RESULTS.md)."""
    from moetrace.toy.sweep import grid, run_sweep

    table, models = run_sweep(grid(20, 5, [1], [1], [0.3], seeds=[0, 1]), steps=3000, n_batch=256, lr=3e-3,
                              schedule="cosine", print_freq=10**9, device="cpu")
    W = models[0].W_experts.detach()[:, 0]
    D = feature_dimensionality(W)
    held = torch.linalg.vector_norm(W, dim=-1) > 0.5
    assert held.sum(-1).tolist() == [10, 10]
    assert torch.allclose(D[held], torch.full_like(D[held], 0.5), atol=0.03)


def test_sweep_at_a_fixed_total_hidden_size_splits_it_over_the_experts(tmp_path):
    out = tmp_path / "fixed"
    code = cli_main(["toy", "sweep", "--features", "8", "--total-hidden", "4", "--experts", "1,2,4", "--active", "1,2",
                     "--feature-probability", "0.3", "--steps", "5", "--batch", "8", "--quiet", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0
    t = pd.read_csv(out / "sweep.csv")
    assert (t["n_experts"] * t["n_hidden"] == 4).all()
    assert sorted(zip(t["n_experts"], t["n_active_experts"])) == [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2)]
    with pytest.raises(MoetraceError, match="not divisible"):
        from moetrace.toy.sweep import grid

        grid(8, None, [3], [1], [0.5], total_hidden=4)
    with pytest.raises(MoetraceError, match="exactly one"):
        grid(8, 2, [2], [1], [0.5], total_hidden=4)


def test_every_default_is_chaudhari_et_al_s_design():
    """One set of defaults: the CLI's train and sweep, optimize, train_batched and run_sweep all
    train like the paper's repository (ChaudhariDesign)."""
    import argparse
    import inspect

    from moetrace.commands import toy as toy_cmd
    from moetrace.toy.reproduce import PAPER_PROBABILITIES, ChaudhariDesign
    from moetrace.toy.sweep import run_sweep

    paper = ChaudhariDesign()
    parser = argparse.ArgumentParser()
    toy_cmd.add_parser(parser.add_subparsers())
    for command in ("train", "sweep"):
        args = parser.parse_args(["toy", command, "--out", "x"])
        assert (args.features, args.steps, args.batch, args.lr, args.schedule, args.importance_decay) == \
            (paper.n_features, paper.steps, paper.n_batch, paper.lr, "constant", 1.0), command
    sweep = parser.parse_args(["toy", "sweep", "--out", "x"])
    assert sweep.hidden is None and sweep.total_hidden is None  # None: 20 in total, split over E
    assert {(a.n_experts, a.n_active) for a in paper.architectures} <= {
        (int(E), int(k)) for E in sweep.experts.split(",") for k in sweep.active.split(",") if int(k) <= int(E)}
    assert len(PAPER_PROBABILITIES) == 30 and PAPER_PROBABILITIES[0] == 1.0 and PAPER_PROBABILITIES[-1] == 0.1
    for fn in (optimize, train_batched, run_sweep):
        params = inspect.signature(fn).parameters
        assert (params["steps"].default, params["n_batch"].default, params["lr"].default) == \
            (paper.steps, paper.n_batch, paper.lr), fn.__name__


def test_reproduction_statistics_match_independent_references():
    from scipy import stats

    from moetrace.toy.reproduce import chaudhari_claims, count_plateaus, interval, norm_and_superposition, phase_jumps

    # the interval over seeds is scipy's t interval of the mean
    v = [0.41, 0.47, 0.39, 0.52]
    mean, lo, hi = interval(v)
    want = stats.t.interval(0.95, len(v) - 1, loc=np.mean(v), scale=stats.sem(v))
    assert (lo, hi) == pytest.approx(want) and mean == pytest.approx(np.mean(v))
    # norm and superposition score sum_{j != i} (x_hat_i . x_j)^2 (their phase_change.ipynb docstring), by loops
    W = torch.tensor([[[1.0, 0.0], [0.6, 0.8], [-0.5, 0.0]], [[0.0, 0.0], [0.0, 2.0], [0.0, -1.5]]], dtype=torch.float64)
    norm, score = norm_and_superposition(W, 2)
    for e in range(2):
        w = W[e].tolist()
        n = math.sqrt(dot(w[2], w[2]))
        want_score = sum((dot(w[2], wj) / n) ** 2 for j, wj in enumerate(w) if j != 2) if n else 0.0
        assert float(norm[e]) == pytest.approx(n) and float(score[e]) == pytest.approx(want_score)
    # jumps: a 3 x 3 grid whose strongest norm steps 0 -> 1 between the first and second sparsity
    rows = []
    for S, r in [(s, r) for s in (0.1, 0.2, 0.3) for r in (0.5, 1.0, 1.5)]:
        strong = 0.0 if S == 0.1 else 1.0
        for e, nrm in enumerate((strong, 0.2)):
            rows.append({"architecture": "3-1-2", "n_experts": 2, "sparsity": S, "importance": r, "expert": e,
                         "norm": nrm, "phase": "dedicated" if nrm >= 0.5 else "not represented"})
    jumps = phase_jumps(pd.DataFrame(rows)).iloc[0]
    # strongest norm per cell: 0.2 (expert 1) on the first row, 1.0 after; 12 neighbour pairs, 3 jumps of 0.8
    assert jumps["jump_share"] == pytest.approx(3 / 12) and jumps["largest_jump"] == pytest.approx(0.8)
    assert jumps["phases_seen"] == 2
    # plateau counting: a pentagon (D = 2/5 each) and an antipodal pair (1/2) in two seeds
    ang = [2 * math.pi * j / 5 for j in range(5)]
    feats = pd.DataFrame([{"feature_probability": 0.1, "seed": 0, "norm": 1.0, "dimensionality": 0.4} for _ in ang]
                         + [{"feature_probability": 0.1, "seed": 1, "norm": 1.0, "dimensionality": 0.5}] * 2
                         + [{"feature_probability": 0.1, "seed": 1, "norm": 0.1, "dimensionality": 1.0}])
    counted = count_plateaus(feats, pd.Series({0.1: 0.4}), 2, 0.02).set_index("fraction")
    assert counted.loc["2/5", "features"] == 5 and counted.loc["2/5", "seeds_with_it"] == 1
    assert counted.loc["1/2", "features"] == 2 and counted.loc["1", "features"] == 0  # norm 0.1: not represented
    # the dense-vs-MoE claim: Welch intervals per p, counted
    table = pd.DataFrame(
        [{"architecture": "dense", "n_experts": 1, "network_sparsity": 1.0, "feature_probability": p,
          "features_per_dim": 2.0 + 0.01 * s} for p in (1.0, 0.5) for s in range(3)]
        + [{"architecture": "moe", "n_experts": 4, "network_sparsity": 0.25, "feature_probability": p,
            "features_per_dim": (1.0 if p == 1.0 else 2.0) + 0.02 * s} for p in (1.0, 0.5) for s in range(3)])
    dense_claim, rho_claim = chaudhari_claims(table)
    assert (dense_claim["dense_higher"], dense_claim["dense_lower"], dense_claim["undecided"]) == (1, 0, 1)
    assert rho_claim["rho_positive"] == 1  # p = 1: dense above the MoE; p = 0.5: the MoE slightly above


def test_cli_reproduce_writes_tables_with_intervals_and_figures(tmp_path):
    out = tmp_path / "chaudhari"
    code = cli_main(["toy", "reproduce", "chaudhari", "--quick", "--steps", "3", "--quiet", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0
    summary = pd.read_csv(out / "features_per_dimension.csv")
    assert set(summary["architecture"]) == {"dense (m=20)", "MoE 4x5, k=1", "MoE 10x2, k=2", "MoE 20x1, k=5"}
    assert (summary["seeds"] == 3).all()
    assert (summary["features_per_dim_low"] <= summary["features_per_dim"]).all()
    assert (summary["features_per_dim"] <= summary["features_per_dim_high"]).all()
    models = pd.read_csv(out / "models.csv")
    assert (models["n_features"] == 100).all() and (models["total_hidden"] == 20).all()
    assert (models["feature_reduction"] == "mean").all()
    design = json.loads((out / "design.json").read_text())
    assert design["features_per_dimension"]["steps"] == 3 and "18be25e" in design["source"]
    phase = pd.read_csv(out / "phase.csv")
    assert phase.groupby("architecture")["expert"].nunique().to_dict() == {
        "2-1-1": 1, "2-1-2": 2, "3-1-1": 1, "3-1-2": 2, "3-1-3": 3, "3-2-1": 1, "3-2-2": 2, "3-2-3": 3}
    assert len(pd.read_csv(out / "phase_jumps.csv")) == 8
    for png in ("features_per_dimension.png", "phase_diagrams.png"):
        assert (out / png).stat().st_size > 20_000, png
    out = tmp_path / "elhage"
    assert cli_main(["toy", "reproduce", "elhage", "--quick", "--steps", "3", "--quiet", "--device", "cpu",
                     "--out", str(out)]) == 0
    plateaus = pd.read_csv(out / "plateaus.csv")
    assert set(plateaus["fraction"]) == {"1", "3/4", "2/3", "1/2", "2/5", "3/8", "1/3"}
    assert (out / "plateaus.png").stat().st_size > 20_000

"""Routing replay (moetrace.replay) on tiny random models of every supported family."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moetrace.capture import capture
from moetrace.errors import MoetraceError
from moetrace.intervene import router_sites
from moetrace.replay import replay
from moetrace.store import TraceStore
from tiny_models import TINY, tiny_model

SEQ = [10, 11]
# one family per kind of router (softmax with/without renormalization, fp32 softmax, top-k-then-softmax,
# input-dtype weights, leading dims kept, sigmoid with groups and scaling, bias passed by the block,
# soft-capped logits, hybrid layers); the other families run with `make test-slow`
DEFAULT_FAMILIES = {"olmoe", "qwen3_moe", "qwen3_next", "jamba", "mixtral", "gpt_oss", "granitemoe",
                    "cohere2_moe_sigmoid", "deepseek_v2", "deepseek_v3", "lfm2_moe", "minimax_m2", "laguna"}


def padded_batch():
    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [3, 4, 8, 10, 11, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


def record(model, path, probs=False, **inputs):
    with capture(model, path, probs=probs) as cap:
        cap.set_batch(seq=SEQ)
        with torch.no_grad():
            model(**inputs)
    return TraceStore.open(path).read(["seq", "pos", "experts", "weights"] + (["probs"] if probs else []))


def family_weights(probs: np.ndarray, experts: np.ndarray, spec) -> np.ndarray:
    """NumPy reference: the family's weights of ``experts`` [N, L, K] from its scores ``probs`` [N, L, E]
    (softmax distribution or sigmoid scores, as capture records them)."""
    w = np.take_along_axis(probs.astype(np.float64), experts.astype(np.int64), axis=-1)
    if spec.renormalize:
        w = w / (w.sum(axis=-1, keepdims=True) + (1e-20 if spec.scoring == "sigmoid" else 0.0))
    return w * spec.routed_scaling


class original_choices:
    """Records, for every router of ``model``, the experts its original (transformers) forward picks
    from the inputs it gets, whatever patch is installed: {layer_id: int64 [T, K]}."""

    def __init__(self, model):
        self.found: dict[int, torch.Tensor] = {}
        self.handles = [site.module.register_forward_pre_hook(self.hook(site.layer_id), with_kwargs=True)
                        for site in router_sites(model)]

    def hook(self, layer):
        def pre(module, args, kwargs):
            indices = type(module).forward(module, *args, **kwargs)[2]
            self.found[layer] = indices.reshape(-1, indices.shape[-1]).detach().clone()
        return pre

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.mark.parametrize("family", [f if f in DEFAULT_FAMILIES else pytest.param(f, marks=pytest.mark.slow)
                                    for f in sorted(TINY)])
def test_replay_forces_the_recorded_routes_in_every_family(tmp_path, family):
    m1, m2 = tiny_model(family, seed=0), tiny_model(family, seed=7)
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        plain = m1(**inputs).logits
    a = record(m1, tmp_path / "a.zarr", **inputs)

    # the model's own trace: the unpatched logits, nothing re-routed
    with replay(m1, tmp_path / "a.zarr") as rp:
        rp.set_batch(seq=SEQ)
        with torch.no_grad():
            got = m1(**inputs).logits
        rate = rp.replay_rate()
    valid = mask.bool()
    torch.testing.assert_close(got[valid], plain[valid], rtol=1e-5, atol=1e-5)
    assert rate == {s.layer_id: 0.0 for s in router_sites(m1)}

    # another model under replay of A, captured into B: exactly A's experts, weights from M2's scores
    with replay(m2, tmp_path / "a.zarr") as rp, capture(m2, tmp_path / "b.zarr", probs=True) as cap:
        live = original_choices(m2)
        rp.set_batch(seq=SEQ)
        cap.set_batch(seq=SEQ)
        with torch.no_grad():
            m2(**inputs)
        rate = rp.replay_rate()
        live.remove()
    b = TraceStore.open(tmp_path / "b.zarr").read(["seq", "pos", "experts", "weights", "probs"])
    np.testing.assert_array_equal(b["seq"], a["seq"])
    np.testing.assert_array_equal(b["pos"], a["pos"])
    np.testing.assert_array_equal(b["experts"], a["experts"])
    spec = router_sites(m2)[0].spec
    # the store keeps weights and probs in half precision
    np.testing.assert_allclose(b["weights"], family_weights(b["probs"], a["experts"], spec), rtol=2e-3, atol=1e-3)

    # the replay rate: share of the tokens whose top-k set, as transformers' router code picks it from
    # the states of the replayed forward, differs from A's
    valid_rows = mask.reshape(-1).bool()
    for i, site in enumerate(router_sites(m2)):
        chosen = np.sort(live.found[site.layer_id][valid_rows].numpy(), axis=-1)
        differ = (chosen != np.sort(a["experts"][:, i], axis=-1)).any(axis=-1).mean()
        assert rate[site.layer_id] == pytest.approx(float(differ))
    assert max(rate.values()) > 0


@pytest.mark.parametrize("family", ["olmoe", "mixtral", "deepseek_v3", "cohere2_moe_sigmoid"])
def test_gradients_reach_the_router_in_a_training_step(tmp_path, family):
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    m1 = tiny_model(family, seed=0)
    record(m1, tmp_path / "a.zarr", **inputs)

    def router_grads(model, path=None):
        model.train()
        model.zero_grad()
        if path is None:
            loss = model(**inputs, labels=ids).loss
        else:
            with replay(model, path) as rp:
                rp.set_batch(seq=SEQ)
                loss = model(**inputs, labels=ids).loss
        loss.backward()
        return [s.module.weight.grad.clone() for s in router_sites(model)]

    # own trace: the same gradients as the unpatched model (transformers' router code)
    for got, want in zip(router_grads(m1, tmp_path / "a.zarr"), router_grads(m1)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # another model's trace: the router still gets a gradient
    m2 = tiny_model(family, seed=7)
    for grad in router_grads(m2, tmp_path / "a.zarr"):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def greedy(model, ids, mask, steps=4):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                              pad_token_id=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen3_next"])
def test_generate_replays_the_recorded_generated_tokens(tmp_path, family):
    ids, mask = padded_batch()
    m1, m2 = tiny_model(family, seed=0), tiny_model(family, seed=7)
    for m in (m1, m2):
        m.generation_config.eos_token_id = None
    with capture(m1, tmp_path / "a.zarr") as cap:
        cap.set_batch(seq=SEQ)
        out = greedy(m1, ids, mask)
    a = TraceStore.open(tmp_path / "a.zarr").read(["seq", "pos", "generated", "experts"])
    assert a["generated"].sum() == 2 * 3  # every generated token but the last went through the model

    with replay(m1, tmp_path / "a.zarr") as rp:
        rp.set_batch(seq=SEQ)
        again = greedy(m1, ids, mask)
        assert all(v == 0.0 for v in rp.replay_rate(reset=True).values())
        assert all(math.isnan(v) for v in rp.replay_rate().values())  # no token since the reset
    assert torch.equal(again, out)

    # M2 decodes other tokens: with the token check off it still routes every step as A recorded
    with replay(m2, tmp_path / "a.zarr", check_tokens=False) as rp, capture(m2, tmp_path / "b.zarr") as cap:
        rp.set_batch(seq=SEQ)
        cap.set_batch(seq=SEQ)
        greedy(m2, ids, mask)
    b = TraceStore.open(tmp_path / "b.zarr").read(["seq", "pos", "generated", "experts"])
    for name in a:
        np.testing.assert_array_equal(b[name], a[name])


def test_a_row_that_stopped_at_eos_keeps_live_routing_past_its_recorded_end(tmp_path):
    ids, mask = padded_batch()
    model = tiny_model("olmoe", seed=0)
    model.generation_config.eos_token_id = None
    free = greedy(model, ids, mask, steps=5)[:, ids.shape[1]:]
    # an EOS that row 0 generates at its second step and row 1 never does
    candidates = [int(t) for t in free[0, 1:3] if int(t) not in free[1].tolist()]
    if not candidates:
        pytest.skip("no token separates the rows for this seed")
    model.generation_config.eos_token_id = candidates[0]
    with capture(model, tmp_path / "a.zarr") as cap:
        cap.set_batch(seq=SEQ)
        out = greedy(model, ids, mask, steps=5)
    seq = TraceStore.open(tmp_path / "a.zarr").read(["seq"])["seq"]
    assert (seq == 10).sum() < (seq == 11).sum()  # row 0's sequence ends before its EOS
    with replay(model, tmp_path / "a.zarr") as rp:
        rp.set_batch(seq=SEQ)
        again = greedy(model, ids, mask, steps=5)
        assert all(v == 0.0 for v in rp.replay_rate().values())
    assert torch.equal(again, out)


def test_missing_routes_mismatched_batches_and_bad_ids_are_errors(tmp_path):
    ids, mask = padded_batch()
    model = tiny_model("olmoe", seed=0)
    record(model, tmp_path / "a.zarr", input_ids=ids, attention_mask=mask)
    with replay(model, tmp_path / "a.zarr") as rp:
        with pytest.raises(MoetraceError, match="set_batch"):
            model(input_ids=ids, attention_mask=mask)
        with pytest.raises(MoetraceError, match="sequence 99 has no rows"):
            rp.set_batch(seq=[10, 99])
        rp.set_batch(seq=[10])
        with pytest.raises(MoetraceError, match="expected 2 sequence ids for a batch of 2 rows"):
            model(input_ids=ids, attention_mask=mask)
        rp.set_batch(seq=SEQ)
        longer = torch.cat([ids, ids[:, :1]], dim=1)
        with pytest.raises(MoetraceError, match="sequence 10 position 4: no recorded routes"):
            model(input_ids=longer, attention_mask=torch.cat([mask, mask[:, -1:]], dim=1))
        other = ids.clone()
        other[1, 3] = 33
        with pytest.raises(MoetraceError, match="sequence 11 position 3: expected the recorded token id 10, got 33"):
            model(input_ids=other, attention_mask=mask)
        rp.set_batch(seq=SEQ)
        with pytest.raises(MoetraceError, match="outside a forward of the replayed model"):
            model.model(input_ids=ids, attention_mask=mask)  # the hook sits on the causal LM
    with pytest.raises(MoetraceError, match=r"\(layers, experts, top_k, layer_ids\)"):
        with replay(tiny_model("olmoe", num_experts=4), tmp_path / "a.zarr"):
            pass
    # a corrupted store (written past the store's own validation): an expert id >= E
    store = TraceStore.open(tmp_path / "a.zarr", mode="a")
    store._array("experts")[4, 1, 0] = 8
    with replay(model, tmp_path / "a.zarr") as rp:
        with pytest.raises(MoetraceError,
                           match=r"sequence 11 position 0 layer 1: expected expert ids in \[0, 8\), got 8"):
            rp.set_batch(seq=SEQ)
    # leaving the context restores the original routers
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)


@pytest.mark.slow  # about a minute of Dynamo tracing on a shared CPU
def test_replay_under_torch_compile_equals_eager(tmp_path):
    """The host lookup runs outside the graph (torch.compiler.disable); the router side compiles without a break."""
    torch.set_num_threads(1)
    ids, mask = padded_batch()
    inputs = dict(input_ids=ids, attention_mask=mask)
    m1, m2 = tiny_model("olmoe", seed=0), tiny_model("olmoe", seed=7)
    record(m1, tmp_path / "a.zarr", **inputs)
    with torch.no_grad(), replay(m2, tmp_path / "a.zarr") as rp:
        rp.set_batch(seq=SEQ)
        eager = m2(**inputs).logits
        torch._dynamo.reset()
        explained = torch._dynamo.explain(m2)(**inputs)
        assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
        torch._dynamo.reset()
        compiled = torch.compile(m2, backend="aot_eager")(**inputs).logits
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    with torch.no_grad():
        assert not torch.allclose(m2(**inputs).logits, eager, atol=1e-4)  # replay did change the routing


def test_patch_routers_override_nests_and_observers_see_what_it_returns():
    """The route override replay builds on (moetrace.intervene): the innermost one applies, observers and
    the router's outputs see its experts, leaving it brings the enclosing one back."""
    from moetrace.intervene import observe_routing, patch_routers

    model = tiny_model("olmoe", seed=0)
    ids, _ = padded_batch()

    def forcing(pair):
        def override(site, logits, weights, experts):
            forced = torch.tensor(pair, dtype=torch.int32).expand_as(experts)
            return torch.full_like(weights, 0.5), forced
        return override

    returned, seen = [], []
    hooks = [s.module.register_forward_hook(lambda m, a, out: returned.append(out[2])) for s in router_sites(model)]
    with torch.no_grad(), observe_routing(model, lambda e: seen.append(e.experts)):
        with patch_routers(model, override=forcing([0, 1])):
            with patch_routers(model, override=forcing([3, 2])):
                model(input_ids=ids)
            inner = (returned[:], seen[:])
            returned.clear()
            seen.clear()
            model(input_ids=ids)
    for h in hooks:
        h.remove()
    for experts in inner[0] + inner[1]:
        assert experts.reshape(-1, 2).tolist() == [[3, 2]] * ids.numel()
    for experts in returned + seen:
        assert experts.reshape(-1, 2).tolist() == [[0, 1]] * ids.numel()
    assert len(returned) == len(seen) == len(router_sites(model))

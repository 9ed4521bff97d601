"""Interventions inside real transformers MoE classes (tiny random configs, CPU, torch backend).

For every family in ``tests/tiny_models.TINY``: with empty targets the patched model equals
the unpatched one (logits and every router's outputs) and the original forwards come back
(also after an exception); masked experts are never selected; path and pair rules change
exactly the routes ``baseline_route`` (a plain-torch re-implementation) predicts from the
unpatched router logits; generate(), padded batches and a gradient step work.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from moetrace.errors import MoetraceError
from moetrace.intervene import RouteEvent, ablate, intervene, observe_routing, patch_routers, router_sites, steer
from moetrace.models import adapter_for, supported_families
from moetrace.targets import Targets
from tiny_models import TINY, VOCAB, tiny_model

BACKEND = "torch"
NAMES = sorted(TINY)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads; one thread keeps the file cheap on shared CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def cached_model(name: str) -> torch.nn.Module:
    return tiny_model(name)


def token_ids(batch: int = 2, length: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def routed(model, targets=None, **inputs) -> tuple[torch.Tensor, list[RouteEvent]]:
    """(logits, one RouteEvent per MoE layer) of one no-grad forward, under ``targets``."""
    events: list[RouteEvent] = []
    with torch.no_grad(), patch_routers(model, targets, backend=BACKEND), observe_routing(model, events.append):
        logits = model(**inputs).logits
    return logits, events


def baseline_route(logits, spec, bias=None, mask=None, post_group_mask=None):
    """Plain-torch routing of one layer, independent of moetrace.kernels.routing.

    1. score: softmax -> c = logits; sigmoid -> s = sigmoid(logits), c = s + bias;
    2. c[mask] = -inf (token-level expert masks, path rules);
    3. sigmoid with groups: group score = sum of the two best c in each of n_group contiguous
       groups; keep the topk_group best groups (stable: lower group first), c = -inf elsewhere;
    4. c[post_group_mask] = -inf (a pair rule's dropped second expert);
    5. experts = first K of a stable descending sort of c (ties -> lower index);
    6. weights: softmax -> softmax(c)[experts]; sigmoid -> s[experts]; renormalize; x scaling.
    Returns (experts int64 [T, K], weights fp32 [T, K]).
    """
    logits = logits.double()
    n_tokens, n_experts = logits.shape
    if spec.scoring == "sigmoid":
        s = torch.sigmoid(logits)
        c = s + (bias.double() if bias is not None else 0.0)
    else:
        c = logits.clone()
    if mask is not None:
        c = c.masked_fill(mask, float("-inf"))
    if spec.n_group is not None:
        groups = c.view(n_tokens, spec.n_group, -1)
        group_score = groups.sort(dim=-1, descending=True).values[..., :2].sum(-1)
        keep = group_score.sort(dim=-1, descending=True, stable=True).indices[:, : spec.topk_group]
        kept = torch.zeros(n_tokens, spec.n_group, dtype=torch.bool).scatter_(1, keep, True)
        c = c.masked_fill(~kept.repeat_interleave(n_experts // spec.n_group, dim=1), float("-inf"))
    if post_group_mask is not None:
        c = c.masked_fill(post_group_mask, float("-inf"))
    experts = c.sort(dim=-1, descending=True, stable=True).indices[:, : spec.top_k]
    if spec.scoring == "sigmoid":
        weights = s.gather(1, experts)
        if spec.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    else:
        weights = torch.softmax(c, dim=-1).gather(1, experts)
        if spec.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
    return experts, (weights * spec.routed_scaling).float()


def selection_biases(model) -> dict[int, torch.Tensor | None]:
    """layer id -> the selection bias the router uses (buffer on the router or on its MoE block)."""
    out = {}
    modules = dict(model.named_modules())
    for site in router_sites(model):
        block = modules[site.name.rsplit(".", 1)[0]]
        candidates = [getattr(site.module, "e_score_correction_bias", None),
                      getattr(block, "e_score_correction_bias", None),  # MiniMax-M2, Hunyuan-V3
                      getattr(block, "expert_bias", None)]  # LFM2-MoE
        found = [c for c in candidates if isinstance(c, torch.Tensor)]
        out[site.layer_id] = found[0] if found and site.spec.scoring == "sigmoid" else None
    return out


def no_patch_left(model) -> bool:
    return all("forward" not in site.module.__dict__ for site in router_sites(model))


# ----------------------------------------------------------------------------- identity


@pytest.mark.parametrize("name", NAMES)
def test_empty_targets_identity_and_restore(name):
    model = cached_model(name)
    ids = token_ids()
    sites = router_sites(model)
    outputs: dict[str, list] = {"orig": [], "patched": []}

    def recorder(key):
        return lambda module, args, output: outputs[key].append(output)

    def run(key):
        handles = [site.module.register_forward_hook(recorder(key)) for site in sites]
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            for handle in handles:
                handle.remove()

    expected = run("orig")
    with intervene(model, Targets(), backend=BACKEND):
        assert not no_patch_left(model)
        got = run("patched")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert no_patch_left(model)
    assert len(outputs["orig"]) == len(outputs["patched"]) == len(sites)
    for i, ((lo, wo, io), (lp, wp, ip)) in enumerate(zip(outputs["orig"], outputs["patched"])):
        assert (lp.shape, lp.dtype) == (lo.shape, lo.dtype)
        # the first router sees identical inputs; later ones inputs that differ by rounding only
        # (e.g. GPT-OSS softmax over the top K vs renormalized softmax over all experts)
        torch.testing.assert_close(lp, lo, rtol=0 if i == 0 else 1e-5, atol=0 if i == 0 else 1e-5)
        assert (wp.shape, wp.dtype, ip.shape, ip.dtype) == (wo.shape, wo.dtype, io.shape, io.dtype)
        # DeepSeek-V3-style routers use topk(sorted=False): compare per token as sets
        so, sp = io.sort(dim=-1), ip.sort(dim=-1)
        assert torch.equal(so.values, sp.values)
        torch.testing.assert_close(wp.gather(-1, sp.indices), wo.gather(-1, so.indices), rtol=1e-5, atol=1e-6)

    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, Targets(experts={sites[0].layer_id: [0]}), backend=BACKEND):
            raise RuntimeError("boom")
    assert no_patch_left(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "granitemoe"])
def test_bfloat16_model_identity(name):
    model = tiny_model(name).to(torch.bfloat16)
    ids = token_ids()
    outputs: dict[str, list] = {"orig": [], "patched": []}
    sites = router_sites(model)

    def run(key):
        handles = [s.module.register_forward_hook(lambda m, a, o, key=key: outputs[key].append(o)) for s in sites]
        try:
            with torch.no_grad():
                return model(input_ids=ids).logits
        finally:
            for handle in handles:
                handle.remove()

    expected = run("orig")
    with intervene(model, Targets(), backend=BACKEND):
        got = run("patched")
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    (lo, wo, io), (lp, wp, ip) = outputs["orig"][0], outputs["patched"][0]
    assert (lp.dtype, wp.dtype, ip.dtype) == (lo.dtype, wo.dtype, io.dtype)
    torch.testing.assert_close(lp, lo, rtol=0, atol=0)
    assert torch.equal(ip.sort(-1).values, io.sort(-1).values)


# ----------------------------------------------------------------------------- expert masks


def most_used(events: list[RouteEvent], n: int = 2) -> dict[int, list[int]]:
    """layer id -> the n experts most often routed first."""
    out = {}
    for event in events:
        counts = torch.bincount(event.experts[:, 0].long(), minlength=event.logits.shape[1])
        out[event.layer_id] = counts.argsort(descending=True, stable=True)[:n].tolist()
    return out


@pytest.mark.parametrize("name", NAMES)
def test_expert_mask_never_selected(name):
    model = cached_model(name)
    ids = token_ids()
    base, events = routed(model, input_ids=ids)
    masked = most_used(events)
    logits, ablated = routed(model, Targets(experts=masked), input_ids=ids)
    assert [e.layer_id for e in ablated] == [s.layer_id for s in router_sites(model)]
    for event in ablated:
        assert event.experts.dtype == torch.int32 and event.weights.dtype == torch.float32
        assert not torch.isin(event.experts, torch.tensor(masked[event.layer_id], dtype=torch.int32)).any()
    assert not torch.allclose(logits, base, atol=1e-4)

    # zero mode keeps the selection, with weight 0 on the masked experts
    _, zeroed = routed(model, Targets(experts=masked, mask_mode="zero"), input_ids=ids)
    first = zeroed[0]
    hit = torch.isin(first.experts, torch.tensor(masked[first.layer_id], dtype=torch.int32))
    assert hit.any()
    assert torch.equal(first.experts, events[0].experts)
    assert (first.weights[hit] == 0).all() and (first.weights[~hit] != 0).all()


# ----------------------------------------------------------------------------- path and pair rules


@pytest.mark.parametrize("name", NAMES)
def test_path_rule_changes_exactly_the_expected_routes(name):
    model = cached_model(name)
    sites = router_sites(model)
    if len(sites) < 2:
        pytest.skip("needs two MoE layers")
    ids = token_ids(seed=1)
    _, events = routed(model, input_ids=ids)
    prev, last = events[-2], events[-1]
    prefix, target = int(prev.experts[0, 0]), int(last.experts[0, 0])  # fires for token 0 at least
    _, ablated = routed(model, Targets(paths={last.layer_id: [((prefix,), target)]}), input_ids=ids)

    spec = sites[-1].spec
    fires = prev.experts[:, 0] == prefix
    mask = torch.zeros_like(last.logits, dtype=torch.bool)
    mask[fires, target] = True
    bias = selection_biases(model)[last.layer_id]
    expected_experts, expected_weights = baseline_route(last.logits, spec, bias, mask=mask)
    torch.testing.assert_close(ablated[-2].experts, prev.experts, rtol=0, atol=0)
    assert torch.equal(ablated[-1].experts.long(), expected_experts)
    torch.testing.assert_close(ablated[-1].weights, expected_weights, rtol=1e-5, atol=1e-6)
    changed = (ablated[-1].experts != last.experts).any(dim=1)
    assert changed[0] and not changed[~fires].any()


@pytest.mark.parametrize("name", NAMES)
def test_pair_rule_changes_exactly_the_expected_routes(name):
    model = cached_model(name)
    spec = router_sites(model)[-1].spec
    ids = token_ids(seed=2)
    _, events = routed(model, input_ids=ids)
    last = events[-1]
    bias = selection_biases(model)[last.layer_id]
    unmasked, _ = baseline_route(last.logits, spec, bias)
    first, second = int(unmasked[0, 0]), int(unmasked[0, 1])
    _, ablated = routed(model, Targets(pairs={last.layer_id: [(first, second)]}), input_ids=ids)

    fires = (unmasked[:, 0] == first) & (unmasked[:, 1] == second)
    drop = torch.zeros_like(last.logits, dtype=torch.bool)
    drop[fires, second] = True
    expected_experts, expected_weights = baseline_route(last.logits, spec, bias, post_group_mask=drop)
    assert torch.equal(ablated[-1].experts.long(), expected_experts)
    torch.testing.assert_close(ablated[-1].weights, expected_weights, rtol=1e-5, atol=1e-6)
    assert not (ablated[-1].experts[fires] == second).any()
    assert torch.equal(ablated[-1].experts[~fires], last.experts[~fires])


@pytest.mark.parametrize("name", ["olmoe", "deepseek_v3", "gpt_oss"])
def test_two_layer_prefix_path_rule(name):
    model = cached_model(name)
    sites = router_sites(model)
    ids = token_ids(seed=3)
    _, events = routed(model, input_ids=ids)
    a, b, last = events[-3], events[-2], events[-1]
    prefix = (int(a.experts[0, 0]), int(b.experts[0, 0]))
    target = int(last.experts[0, 0])
    targets = Targets(paths={last.layer_id: [(prefix, target)]})
    assert targets.max_prefix_len() == 2
    _, ablated = routed(model, targets, input_ids=ids)

    fires = (a.experts[:, 0] == prefix[0]) & (b.experts[:, 0] == prefix[1])
    mask = torch.zeros_like(last.logits, dtype=torch.bool)
    mask[fires, target] = True
    expected, _ = baseline_route(last.logits, sites[-1].spec, selection_biases(model)[last.layer_id], mask=mask)
    assert torch.equal(ablated[-1].experts.long(), expected)
    assert fires[0] and not (ablated[-1].experts[fires] == target).any()


# ----------------------------------------------------------------------------- generate, padding, training


@pytest.mark.parametrize("name", NAMES)
def test_generate_under_intervention(name):
    model = cached_model(name)
    ids = token_ids(batch=1, length=5, seed=4)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        with intervene(model, Targets(), backend=BACKEND):
            same = model.generate(ids, **kwargs)
    assert torch.equal(same, expected)

    masked = {site.layer_id: [1, 6] for site in router_sites(model)}
    events: list[RouteEvent] = []
    with torch.no_grad(), ablate(model, experts=masked, backend=BACKEND), observe_routing(model, events.append):
        out = model.generate(ids, **kwargs)
    assert out.shape[1] > ids.shape[1]
    assert {e.experts.shape[0] for e in events} >= {5, 1}  # prompt pass, then one token per step
    assert not any(torch.isin(e.experts, torch.tensor([1, 6], dtype=torch.int32)).any() for e in events)
    assert no_patch_left(model)


@pytest.mark.parametrize("name", NAMES)
def test_padded_batch(name):
    model = cached_model(name)
    ids = token_ids(batch=2, length=8, seed=5)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    ids[1, :3] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention_mask).logits
    got, events = routed(model, Targets(), input_ids=ids, attention_mask=attention_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(e.experts.shape[0] == 16 for e in events)

    masked = {site.layer_id: [0, 5] for site in router_sites(model)}
    _, ablated = routed(model, Targets(experts=masked), input_ids=ids, attention_mask=attention_mask)
    assert not any(torch.isin(e.experts, torch.tensor([0, 5], dtype=torch.int32)).any() for e in ablated)


@pytest.mark.parametrize("name", NAMES)
def test_training_step_gradients(name):
    model = tiny_model(name).train()
    ids = token_ids(seed=6)
    sites = router_sites(model)
    with intervene(model, Targets(experts={sites[-1].layer_id: [2]}), backend=BACKEND):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    assert torch.isfinite(loss)
    for site in sites:
        grad = site.module.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


# ----------------------------------------------------------------------------- conveniences and errors


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_steer_boost_and_scale(name):
    model = cached_model(name)
    ids = token_ids(seed=7)
    layer = router_sites(model)[0].layer_id
    events: list[RouteEvent] = []
    with torch.no_grad(), steer(model, layer, 3, logit=50.0, backend=BACKEND), observe_routing(model, events.append):
        model(input_ids=ids)
    assert (events[0].experts[:, 0] == 3).all()

    _, base = routed(model, input_ids=ids)
    events.clear()
    with torch.no_grad(), steer(model, layer, 3, scale=0.5, backend=BACKEND), observe_routing(model, events.append):
        model(input_ids=ids)
    assert torch.equal(events[0].experts, base[0].experts)
    hit = base[0].experts == 3
    torch.testing.assert_close(events[0].weights[hit], base[0].weights[hit] * 0.5)
    torch.testing.assert_close(events[0].weights[~hit], base[0].weights[~hit])


def test_nested_contexts_innermost_targets_win_and_restore():
    model = cached_model("olmoe")
    ids = token_ids()
    layer = router_sites(model)[0].layer_id
    events: list[RouteEvent] = []
    with torch.no_grad(), observe_routing(model, events.append):
        with ablate(model, experts={layer: [0, 1, 2, 3]}, backend=BACKEND):
            model(input_ids=ids)
            assert (events[0].experts >= 4).all()
        assert not no_patch_left(model)
        events.clear()
        model(input_ids=ids)
        assert (events[0].experts < 4).any()
    assert no_patch_left(model)


def test_probs_of_events():
    model = cached_model("olmoe")
    _, events = routed(model, input_ids=token_ids())
    probs = events[0].probs()
    assert probs.dtype == torch.float32 and probs.shape == events[0].logits.shape
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[0]))
    torch.testing.assert_close(probs.gather(1, events[0].experts.long()), events[0].weights)


def test_unknown_model_lists_supported_families():
    with pytest.raises(MoetraceError, match="olmoe") as info:
        adapter_for(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert "deepseek_v3" in str(info.value)

    class FancyTopKRouter(torch.nn.Module):
        pass

    with pytest.raises(MoetraceError, match="FancyTopKRouter"):
        adapter_for(torch.nn.ModuleDict({"layers": torch.nn.ModuleList([FancyTopKRouter()])}))


def test_unsupported_router_configuration():
    model = tiny_model("deepseek_v2", topk_method="group_limited_greedy")
    with pytest.raises(MoetraceError, match="group_limited_greedy"):
        router_sites(model)


def test_targets_outside_the_model_fail_before_patching():
    model = cached_model("mixtral")
    with pytest.raises(MoetraceError, match="layer 7"):
        with intervene(model, Targets(experts={7: [0]})):
            pass
    with pytest.raises(MoetraceError, match="expert 8"):
        with intervene(model, Targets(experts={0: [8]})):
            pass
    assert no_patch_left(model)


def test_every_expert_masked_is_a_moetrace_error():
    model = cached_model("mixtral")
    with pytest.raises(MoetraceError, match="layer 0"):
        with torch.no_grad(), intervene(model, Targets(experts={0: list(range(7))}), backend=BACKEND):
            model(input_ids=token_ids())
    assert no_patch_left(model)


def test_every_tiny_family_is_supported_and_every_supported_family_tested():
    tested = {adapter_for(cached_model(name)).family for name in NAMES}
    assert tested == set(supported_families())


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="the Triton kernel on CPU needs TRITON_INTERPRET=1 set before triton is imported",
)
@pytest.mark.parametrize("name", ["olmoe", "deepseek_v3"])
def test_triton_backend_routes_like_torch(name):
    model = cached_model(name)
    sites = router_sites(model)
    ids = token_ids(seed=8)
    targets = Targets(experts={sites[0].layer_id: [0, 1]}, paths={sites[1].layer_id: [((3,), 4)]},
                      pairs={sites[-1].layer_id: [(5, 6)]})
    runs = {}
    for backend in ("torch", "triton"):
        events: list[RouteEvent] = []
        with torch.no_grad(), intervene(model, targets, backend=backend), observe_routing(model, events.append):
            runs[backend] = (model(input_ids=ids).logits, events)
    (lt, et), (lk, ek) = runs["torch"], runs["triton"]
    torch.testing.assert_close(lk, lt, rtol=1e-5, atol=1e-5)
    for a, b in zip(et, ek):
        assert torch.equal(a.experts, b.experts)
        torch.testing.assert_close(a.weights, b.weights, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- nesting and shared patches


NEST_KINDS = ("intervene", "ablate", "steer", "observe")


def nest_context(kind: str, root, layer: int, sink: list):
    """(context manager on ``root``, the Targets it applies or None) for one nesting kind."""
    if kind == "intervene":
        targets = Targets(experts={layer: [0, 1]})
        return intervene(root, targets, backend=BACKEND), targets
    if kind == "ablate":
        return ablate(root, experts={layer: [1]}, backend=BACKEND), Targets(experts={layer: [1]})
    if kind == "steer":
        return steer(root, layer, 5, logit=3.0, scale=0.5, backend=BACKEND), \
            Targets(boosts={layer: {5: {"logit": 3.0, "scale": 0.5}}})
    return observe_routing(root, sink.append, backend=BACKEND), None


@pytest.mark.parametrize("outer", NEST_KINDS)
@pytest.mark.parametrize("inner", NEST_KINDS)
def test_nested_contexts_every_combination(outer, inner):
    """Two nested contexts (same or different layer, same or different root, with or without an
    exception inside): inside, the innermost targets apply and every observer sees every layer;
    after the inner exit the outer context alone applies; at the end the model is unpatched."""
    model = cached_model("olmoe")
    ids = token_ids(seed=9)
    sites = router_sites(model)
    with torch.no_grad():
        plain = model(input_ids=ids).logits

    def expected(targets):
        if targets is None:
            return plain
        with torch.no_grad(), patch_routers(model, targets, backend=BACKEND):
            return model(input_ids=ids).logits

    for inner_layer in (sites[0].layer_id, sites[1].layer_id):
        for inner_root in (model, model.model):
            for fail in (False, True):
                seen_outer: list[RouteEvent] = []
                seen_inner: list[RouteEvent] = []
                outer_ctx, outer_targets = nest_context(outer, model, sites[0].layer_id, seen_outer)
                inner_ctx, inner_targets = nest_context(inner, inner_root, inner_layer, seen_inner)
                want_inner = expected(inner_targets if inner_targets is not None else outer_targets)
                want_outer = expected(outer_targets)
                with torch.no_grad(), outer_ctx:
                    try:
                        with inner_ctx:
                            torch.testing.assert_close(model(input_ids=ids).logits, want_inner, rtol=0, atol=0)
                            for seen, kind in ((seen_outer, outer), (seen_inner, inner)):
                                if kind == "observe":
                                    assert [e.layer_id for e in seen] == [s.layer_id for s in sites]
                            if fail:
                                raise RuntimeError("inner boom")
                    except RuntimeError as err:
                        assert fail and str(err) == "inner boom"
                    assert not no_patch_left(model)
                    seen_outer.clear()
                    torch.testing.assert_close(model(input_ids=ids).logits, want_outer, rtol=0, atol=0)
                    if outer == "observe":
                        assert [e.layer_id for e in seen_outer] == [s.layer_id for s in sites]
                assert no_patch_left(model)
                with torch.no_grad():
                    torch.testing.assert_close(model(input_ids=ids).logits, plain, rtol=0, atol=0)


@pytest.mark.parametrize("observer_on_full_model", [True, False])
def test_contexts_on_model_and_inner_model_share_one_patch(observer_on_full_model):
    """observe_routing on the causal LM + ablate on its ``.model`` (and the reverse roots), in both
    nesting orders: every observer sees every layer and the ablation applies."""
    model = cached_model("olmoe")
    ids = token_ids(seed=10)
    sites = router_sites(model)
    masked = {site.layer_id: [1, 2] for site in sites}
    with torch.no_grad(), ablate(model, experts=masked, backend=BACKEND):
        want = model(input_ids=ids).logits
    obs_root, abl_root = (model, model.model) if observer_on_full_model else (model.model, model)
    for observer_first in (True, False):
        events: list[RouteEvent] = []
        observe = observe_routing(obs_root, events.append, backend=BACKEND)
        mask = ablate(abl_root, experts=masked, backend=BACKEND)
        first, second = (observe, mask) if observer_first else (mask, observe)
        with torch.no_grad(), first, second:
            got = model(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert [e.layer_id for e in events] == [s.layer_id for s in sites]
        assert all(e.experts.shape[0] == ids.numel() for e in events)
        assert not any(torch.isin(e.experts, torch.tensor([1, 2], dtype=torch.int32)).any() for e in events)
        assert no_patch_left(model)


def test_targets_leaving_too_few_experts_are_refused_on_entry():
    """Reroute targets are checked once, statically, when the context is entered: for every layer the
    expert mask plus any set of path rules that can fire together must leave K (K + 1 with pair rules,
    and K in the worst kept groups) experts; the error names the layer and the rules."""
    model = cached_model("olmoe")  # E = 8, K = 2, MoE layers 0, 1, 2
    ids = token_ids()
    refused = [
        (Targets(experts={1: [6]}, paths={1: [((3,), e) for e in range(6)]}),
         r"layer 1: its expert mask and the path rules that fire after the top-1 experts \[3\] leave 1 selectable"),
        # a two-layer prefix fires together with the one-layer rule on its last expert
        (Targets(paths={2: [((1, 3), e) for e in range(3)] + [((3,), e) for e in range(3, 7)] + [((4,), 7)]}),
         r"layer 2: .*\[1, 3\] leave 1 selectable.*masked: \[0, 1, 2, 3, 4, 5, 6\]"),
        (Targets(experts={0: [0, 1, 2, 3, 4, 5]}, pairs={0: [(6, 7)]}), r"layer 0: its expert mask leave 2 .*needs 3"),
    ]
    for targets, match in refused:
        with pytest.raises(MoetraceError, match=match):
            with intervene(model, targets, backend=BACKEND):
                pass
        assert no_patch_left(model)
    accepted = [
        Targets(paths={2: [((1, 3), e) for e in range(3)] + [((2, 3), e) for e in range(3, 6)]}),  # never together
        Targets(experts={0: [0, 1, 2, 3, 4, 5]}),  # exactly K left
        Targets(experts={0: list(range(8))}, mask_mode="zero"),  # zero mode never reroutes
    ]
    for targets in accepted:
        with torch.no_grad(), intervene(model, targets, backend=BACKEND):
            model(input_ids=ids)

    grouped = cached_model("deepseek_v3")  # 2 groups of 4, topk_group 1, K = 2
    # group 0 keeps 1 expert, so it scores -inf (sum of its two best) and group 1 (4 free) is always kept
    with torch.no_grad(), intervene(grouped, Targets(experts={0: [0, 1, 2]}), backend=BACKEND):
        experts_used = []
        with observe_routing(grouped, lambda e: experts_used.append(e.experts) if e.position == 0 else None):
            grouped(input_ids=ids)
        assert all(bool((x >= 4).all()) for x in experts_used)
    # both groups keep one expert: whichever is kept holds 1 < K
    with pytest.raises(MoetraceError, match=r"layer 0: its expert mask leave 1 selectable experts in its 1 worst kept"):
        with intervene(grouped, Targets(experts={0: [0, 1, 2, 4, 5, 6]}), backend=BACKEND):
            pass
    assert no_patch_left(grouped)

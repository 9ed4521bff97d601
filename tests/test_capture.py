"""Routing capture into a TraceStore from real transformers MoE classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from moetrace.capture import capture
from moetrace.errors import MoetraceError
from moetrace.intervene import intervene, router_sites
from moetrace.store import TraceStore
from moetrace.targets import Targets
from tiny_models import tiny_model


def reference_routing(model, **inputs):
    """The experts each router of the unpatched model picks: {layer_id: int64 [B*S, K]}."""
    found = {}
    hooks = []
    for site in router_sites(model):
        def hook(module, args, output, layer=site.layer_id):
            found[layer] = output[2].reshape(-1, output[2].shape[-1]).detach().clone()
        hooks.append(site.module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


def padded_batch():
    ids = torch.tensor([[0, 0, 5, 9, 12, 7], [3, 4, 8, 10, 11, 6]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    return ids, mask


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "mixtral", "deepseek_v3"])
def test_capture_records_the_models_own_routing_without_padding(tmp_path, family):
    model = tiny_model(family)
    ids, mask = padded_batch()
    ref = reference_routing(model, input_ids=ids, attention_mask=mask)
    with capture(model, tmp_path / "t.zarr", labels=["domain"]) as cap:
        cap.set_batch(seq=[10, 11], labels={"domain": ["math", "code"]})
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    store = TraceStore.open(tmp_path / "t.zarr")
    assert len(store) == int(mask.sum())
    rows = store.read(["seq", "pos", "token_id", "generated", "domain", "experts", "weights"])
    assert rows["seq"].tolist() == [10] * 4 + [11] * 6
    assert rows["pos"].tolist() == [0, 1, 2, 3] + [0, 1, 2, 3, 4, 5]
    assert rows["token_id"].tolist() == [5, 9, 12, 7, 3, 4, 8, 10, 11, 6]
    assert not rows["generated"].any()
    assert store.decode_label("domain", rows["domain"]).tolist() == ["math"] * 4 + ["code"] * 6
    valid = mask.reshape(-1).bool()
    for i, layer in enumerate(store.layer_ids):
        np.testing.assert_array_equal(rows["experts"][:, i, :], ref[int(layer)][valid].numpy())
    assert np.isfinite(rows["weights"]).all() and (rows["weights"] >= 0).all()


def test_capture_during_generate_marks_generated_tokens(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    new = 3
    with capture(model, tmp_path / "t.zarr") as cap:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                           pad_token_id=0)
    rows = TraceStore.open(tmp_path / "t.zarr").read(["seq", "pos", "generated"])
    # Each row routes its prompt and the first new-1 generated tokens (the last one is never fed back).
    per_row = mask.sum(1).tolist()
    assert len(rows["seq"]) == sum(per_row) + 2 * (new - 1)
    for seq, prompt_len in zip((0, 1), per_row):
        sel = rows["seq"] == seq
        assert sorted(rows["pos"][sel].tolist()) == list(range(prompt_len + new - 1))
        assert rows["generated"][sel].sum() == new - 1
        assert not rows["generated"][sel][rows["pos"][sel] < prompt_len].any()
    assert cap.rows_captured == len(rows["seq"])


def test_capture_while_ablating_records_the_routing_used(tmp_path):
    model = tiny_model("qwen2_moe")
    ids, mask = padded_batch()
    ref = reference_routing(model, input_ids=ids, attention_mask=mask)
    first_layer = router_sites(model)[0].layer_id
    popular = int(torch.mode(ref[first_layer][:, 0]).values)
    targets = Targets(experts={first_layer: [popular]})
    with intervene(model, targets), capture(model, tmp_path / "t.zarr") as cap:
        cap.set_batch()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    experts = TraceStore.open(tmp_path / "t.zarr").read(["experts"])["experts"]
    assert popular not in experts[:, 0, :]
    assert (experts[:, 1:, :] >= 0).all()


def test_a_capture_records_the_interventions_its_sequences_were_routed_under(tmp_path):
    """The store says which sequences were captured under which targets (and which under none), so a
    trace captured inside ablate or steer cannot pass for the model's own routing."""
    from moetrace.cli import main
    from moetrace.intervene import steer

    model = tiny_model("qwen2_moe")
    ids, mask = padded_batch()
    layer = router_sites(model)[0].layer_id
    targets = Targets(experts={layer: [1, 2]})
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=[0, 1])
        model(input_ids=ids, attention_mask=mask)          # the model's own routing
        with intervene(model, targets):
            cap.set_batch(seq=[2, 3])
            model(input_ids=ids, attention_mask=mask)
            cap.set_batch(seq=[4, 5])
            model(input_ids=ids, attention_mask=mask)
        with steer(model, layer, 3, logit=2.0):
            cap.set_batch(seq=[6, 7])
            model(input_ids=ids, attention_mask=mask)
    store = TraceStore.open(tmp_path / "t.zarr")
    log = store.interventions
    assert log == [{"what": [{"targets": targets.to_dict()}], "sequences": [[2, 5]]},
                   {"what": [{"targets": Targets(boosts={layer: {3: {"logit": 2.0, "scale": 1.0}}}).to_dict()}],
                    "sequences": [[6, 7]]}]
    assert store.info()["interventions"] == log
    assert main(["info", str(tmp_path / "t.zarr")]) == 0


def test_a_plain_capture_records_no_intervention(tmp_path):
    model = tiny_model("qwen2_moe")
    ids, mask = padded_batch()
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch()
        model(input_ids=ids, attention_mask=mask)
    assert TraceStore.open(tmp_path / "t.zarr").interventions == []


def test_capture_needs_labels_when_the_store_has_them(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    with pytest.raises(MoetraceError, match=r"the store has label 'domain'"):
        with capture(model, tmp_path / "t.zarr", labels=["domain"]):
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)


def test_writer_errors_reach_the_caller_and_committed_rows_survive(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    sites = router_sites(model)
    store = TraceStore.create(tmp_path / "t.zarr", n_layers=len(sites), n_experts=sites[0].spec.n_experts,
                              top_k=sites[0].spec.top_k, layer_ids=[s.layer_id for s in sites],
                              labels={"domain": ["math"]}, weights=True, chunk_rows=4)
    with pytest.raises(MoetraceError, match=r"capture writer failed.*'code' is not in the label vocabulary"):
        with capture(model, store) as cap:
            cap.set_batch(seq=[0, 1], labels={"domain": ["math", "math"]})
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
            cap.set_batch(seq=[2, 3], labels={"domain": ["code", "math"]})
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
    reread = TraceStore.open(tmp_path / "t.zarr")
    assert len(reread) == int(mask.sum())
    assert set(reread.read(["seq"])["seq"].tolist()) == {0, 1}


def test_capture_rejects_a_store_of_another_shape(tmp_path):
    model = tiny_model("olmoe")
    TraceStore.create(tmp_path / "t.zarr", n_layers=2, n_experts=8, top_k=2).close()
    with pytest.raises(MoetraceError, match=r"the model routes with"):
        with capture(model, tmp_path / "t.zarr"):
            pass


def test_cli_capture_from_a_saved_checkpoint(tmp_path):
    import json

    from moetrace.cli import main

    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "ckpt")
    lines = [{"input_ids": [5, 6, 7], "domain": "math"}, {"input_ids": [9, 10], "domain": "code"},
             {"input_ids": [11, 12, 13, 14], "domain": "math"}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "t.zarr"
    assert main(["capture", str(out), "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "data.jsonl"),
                 "--labels", "domain", "--batch-size", "2", "--max-new-tokens", "2", "--quiet"]) == 0
    store = TraceStore.open(out)
    rows = store.read(["seq", "token_id", "generated", "domain"])
    assert len(rows["seq"]) == 9 + 3  # prompt tokens + one fed-back generated token per sequence
    assert rows["generated"].sum() == 3
    prompt = ~rows["generated"]
    assert rows["token_id"][prompt].tolist() == [5, 6, 7, 9, 10, 11, 12, 13, 14]
    assert store.decode_label("domain", rows["domain"][prompt]).tolist() == ["math"] * 3 + ["code"] * 2 + ["math"] * 4
    assert main(["capture", str(tmp_path / "u.zarr"), "--model", str(tmp_path / "ckpt"),
                 "--data", str(tmp_path / "missing.jsonl")]) == 2


def test_automatic_sequence_ids_continue_after_an_existing_store(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    for _ in range(2):  # the second capture reopens the store
        with capture(model, tmp_path / "t.zarr"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    seq = TraceStore.open(tmp_path / "t.zarr").read(["seq"])["seq"]
    assert sorted(set(seq.tolist())) == [0, 1, 2, 3]


def test_positional_attention_mask_skips_padding(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    with capture(model, tmp_path / "t.zarr"), torch.no_grad():
        model(ids, mask)
    assert len(TraceStore.open(tmp_path / "t.zarr")) == int(mask.sum())


def test_probs_setting_must_match_the_store(tmp_path):
    model = tiny_model("olmoe")
    with capture(model, tmp_path / "t.zarr", probs=True):
        pass
    with pytest.raises(MoetraceError, match=r"probs=False but the store has routing/probs"):
        with capture(model, tmp_path / "t.zarr"):
            pass


# --------------------------------------------------------------------- every shape of generation

def routing_of_sequence(model, tokens):
    """{layer_id: int64 [n, K]}: what the model routes for ``tokens`` (one unpadded row, teacher-forced)."""
    return reference_routing(model, input_ids=torch.tensor([tokens]))


def assert_sequence_rows(model, store, rows, seq, tokens, prompt_len, generated=None):
    """The store holds ``tokens`` for ``seq`` as contiguous rows in position order, with the
    routing the model gives that token history and the prompt/generated split at ``prompt_len``
    (or the ``generated`` flag of each token)."""
    at = np.flatnonzero(rows["seq"] == seq)
    assert len(at) == len(tokens), (seq, len(at), len(tokens))
    assert (np.diff(at) == 1).all(), f"sequence {seq}'s rows are not contiguous"
    assert rows["pos"][at].tolist() == list(range(len(tokens)))
    assert rows["token_id"][at].tolist() == list(tokens)
    assert rows["generated"][at].tolist() == (
        [i >= prompt_len for i in range(len(tokens))] if generated is None else list(generated))
    ref = routing_of_sequence(model, list(tokens))
    for i, layer in enumerate(store.layer_ids):
        np.testing.assert_array_equal(rows["experts"][at, i, :], ref[int(layer)].numpy())


def read_all(path):
    store = TraceStore.open(path)
    return store, store.read(["seq", "pos", "token_id", "generated", "experts"])


# name -> (batch rows of padded_batch() used, generate() keyword arguments)
GENERATE_SHAPES = {
    "greedy_padded": ([0, 1], dict(do_sample=False)),
    "greedy_batch_of_one": ([1], dict(do_sample=False)),
    "greedy_all_ones_mask": ([1, 1], dict(do_sample=False)),
    "sampling_padded": ([0, 1], dict(do_sample=True, top_k=0)),
    "static_cache_padded": ([0, 1], dict(do_sample=False, cache_implementation="static")),
    "static_cache_batch_of_one": ([1], dict(do_sample=False, cache_implementation="static")),
}


@pytest.mark.parametrize("shape", sorted(GENERATE_SHAPES))
def test_generate_records_each_sequence_contiguously_with_its_own_routing(tmp_path, shape):
    rows_used, extra = GENERATE_SHAPES[shape]
    model = tiny_model("olmoe")
    ids, mask = (t[rows_used] for t in padded_batch())
    new = 4
    torch.manual_seed(3)
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=[7 + i for i in range(len(rows_used))])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             pad_token_id=0, **extra)
    store, rows = read_all(tmp_path / "t.zarr")
    assert len(set(rows["seq"].tolist())) == len(rows_used)
    for b in range(len(rows_used)):
        prompt = ids[b][mask[b].bool()].tolist()
        tokens = prompt + out[b, ids.shape[1]:].tolist()[:-1]  # the last token never goes through the model
        assert_sequence_rows(model, store, rows, 7 + b, tokens, len(prompt))


@pytest.mark.parametrize("cache_keyword", ["past_key_values", "cache"])
@pytest.mark.parametrize("rows_used", [[1], [0, 1]])
def test_hand_written_decode_loop_continues_the_batch(tmp_path, cache_keyword, rows_used):
    model = tiny_model("qwen3_moe")
    ids, mask = (t[rows_used] for t in padded_batch())
    steps = 3
    with capture(model, tmp_path / "t.zarr"), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        fed = []
        for _ in range(steps):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            fed.append(nxt)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_keyword: cache})
    store, rows = read_all(tmp_path / "t.zarr")
    assert sorted(set(rows["seq"].tolist())) == list(range(len(rows_used)))
    for b in range(len(rows_used)):
        prompt = ids[b][padded_batch()[1][rows_used][b].bool()].tolist()
        assert_sequence_rows(model, store, rows, b, prompt + [int(t[b]) for t in fed], len(prompt))


def test_beam_search_with_an_id_per_input_records_one_coherent_beam_each(tmp_path):
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    new, beams = 5, 3
    with capture(model, tmp_path / "t.zarr", labels=["domain"]) as cap, torch.no_grad():
        cap.set_batch(seq=[10, 11], labels={"domain": ["math", "code"]})
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                       num_beams=beams, do_sample=False, pad_token_id=0)
    store, rows = read_all(tmp_path / "t.zarr")
    assert sorted(set(rows["seq"].tolist())) == [10, 11]
    domain = store.decode_label("domain", store.read(["domain"])["domain"])
    for b in range(2):
        tokens = rows["token_id"][rows["seq"] == 10 + b].tolist()
        prompt = ids[b][mask[b].bool()].tolist()
        assert tokens[:len(prompt)] == prompt and len(tokens) == len(prompt) + new - 1
        assert_sequence_rows(model, store, rows, 10 + b, tokens, len(prompt))
        assert set(domain[rows["seq"] == 10 + b].tolist()) == {["math", "code"][b]}


def test_beam_search_with_an_id_per_beam_records_every_beam(tmp_path):
    """Each recorded beam is one coherent token history (reordering followed): its rows carry
    the routing the model gives that history, and every sequence generate() returns is one of them
    plus its final token."""
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    new, beams = 5, 3
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=list(range(2 * beams)))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             num_beams=beams, num_return_sequences=beams, do_sample=False, pad_token_id=0)
    store, rows = read_all(tmp_path / "t.zarr")
    assert sorted(set(rows["seq"].tolist())) == list(range(2 * beams))
    for b in range(2):
        prompt = ids[b][mask[b].bool()].tolist()
        returned = {tuple(prompt + out[r, ids.shape[1]:-1].tolist()) for r in range(b * beams, (b + 1) * beams)}
        recorded = {tuple(rows["token_id"][rows["seq"] == r].tolist()) for r in range(b * beams, (b + 1) * beams)}
        assert len(recorded) == beams and returned <= recorded  # returned sequences may share a parent beam
        for r in range(b * beams, (b + 1) * beams):
            assert_sequence_rows(model, store, rows, r, rows["token_id"][rows["seq"] == r].tolist(), len(prompt))


def test_cli_capture_refuses_an_existing_store_unless_told_to_overwrite_or_append(tmp_path, capsys):
    import json

    from moetrace.cli import main

    tiny_model("olmoe").save_pretrained(tmp_path / "ckpt")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"input_ids": x}) for x in ([5, 6, 7], [9, 10])) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"input_ids": [11, 12, 13, 14]}) + "\n")
    out = tmp_path / "t.zarr"
    base = ["capture", str(out), "--model", str(tmp_path / "ckpt"), "--quiet", "--data"]

    def stored():
        rows = TraceStore.open(out).read(["seq", "token_id"])
        return list(zip(rows["seq"].tolist(), rows["token_id"].tolist()))

    assert main(base + [str(tmp_path / "a.jsonl")]) == 0
    first = stored()
    assert first == [(0, 5), (0, 6), (0, 7), (1, 9), (1, 10)]
    assert main(base + [str(tmp_path / "b.jsonl")]) == 2
    assert "already exists" in capsys.readouterr().err and stored() == first
    assert main(base + [str(tmp_path / "b.jsonl"), "--append"]) == 0
    assert stored() == first + [(2, 11), (2, 12), (2, 13), (2, 14)]
    assert main(base + [str(tmp_path / "b.jsonl"), "--overwrite"]) == 0
    assert stored() == [(0, 11), (0, 12), (0, 13), (0, 14)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "ckpt", "t.zarr"]
    with pytest.raises(SystemExit):
        main(base + [str(tmp_path / "b.jsonl"), "--overwrite", "--append"])


def test_cli_capture_help_says_the_last_generated_token_is_not_recorded(tmp_path, capsys):
    """--max-new-tokens N records N-1 generated tokens per sequence, as its help says."""
    import json

    from moetrace.cli import main

    with pytest.raises(SystemExit):
        main(["capture", "--help"])
    assert "first N-1" in " ".join(capsys.readouterr().out.split())
    tiny_model("olmoe").save_pretrained(tmp_path / "ckpt")
    (tmp_path / "a.jsonl").write_text(json.dumps({"input_ids": [5, 6, 7]}) + "\n")
    assert main(["capture", str(tmp_path / "t.zarr"), "--model", str(tmp_path / "ckpt"), "--quiet",
                 "--data", str(tmp_path / "a.jsonl"), "--max-new-tokens", "4"]) == 0
    generated = TraceStore.open(tmp_path / "t.zarr").read(["generated"])["generated"]
    assert len(generated) == 3 + 3 and generated.sum() == 3


def test_batched_generate_gives_temporal_counts_and_stickiness_of_each_sequences_token_order(tmp_path):
    """A padded batch generated together: every top-1 transition t -> t+1 of each sequence is
    counted (the interleaved store of before counted 4 of 18), and info sees 2 sequences."""
    from moetrace.counting import count
    from moetrace.metrics import stickiness

    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    new = 6
    with capture(model, tmp_path / "t.zarr"), torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                       do_sample=False)
    store = TraceStore.open(tmp_path / "t.zarr")
    rows = store.read(["seq", "pos", "experts"])
    # Slow reference: each sequence's tokens in position order, whatever the row order.
    tokens: dict[int, dict[int, list[int]]] = {}
    for seq, pos, experts in zip(rows["seq"].tolist(), rows["pos"].tolist(), rows["experts"][:, :, 0].tolist()):
        tokens.setdefault(seq, {})[pos] = experts
    assert len(tokens) == 2 and store.info()["sequences"] == 2
    E = store.n_experts
    ref = np.zeros((store.n_layers, E, E), dtype=np.int64)
    for by_pos in tokens.values():
        for pos in sorted(by_pos):
            if pos + 1 in by_pos:
                for layer in range(store.n_layers):
                    ref[layer, by_pos[pos][layer], by_pos[pos + 1][layer]] += 1
    n_tokens = [int(m.sum()) + new - 1 for m in mask]
    assert int(ref[0].sum()) == sum(n - 1 for n in n_tokens) == 18
    counts = count(store, stats=["temporal"], progress=False)
    np.testing.assert_array_equal(counts["temporal"].transpose("layer", "expert", "next_expert").values, ref)
    same = np.einsum("lii->l", ref)
    np.testing.assert_allclose(stickiness(counts)["stickiness"].values, same / ref.sum(axis=(1, 2)))


def prefill_then_decode(model, forward, steps=2):
    """A padded prefill and ``steps`` greedy decode steps through ``forward`` (the model or its compiled form)."""
    ids, mask = padded_batch()
    with torch.no_grad():
        out = forward(input_ids=ids, attention_mask=mask, use_cache=True)
        cache = getattr(out, "cache", None) or out.past_key_values
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = forward(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)


def test_capture_adds_one_graph_break_a_forward(tmp_path):
    """The hand-off to the writer is capture's only graph break, in prefill and in decode steps."""
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    with torch.no_grad():
        assert torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask).graph_break_count == 0
        with capture(model, tmp_path / "t.zarr"):
            prefill = torch._dynamo.explain(model)(input_ids=ids, attention_mask=mask, use_cache=True)
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            cache = getattr(out, "cache", None) or out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
            decode = torch._dynamo.explain(model)(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                                                  cache=cache, use_cache=True)
    assert (prefill.graph_break_count, decode.graph_break_count) == (1, 1)
    assert all("Capture._hand_off" in str(r.reason) for r in [*prefill.break_reasons, *decode.break_reasons])


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_capture_under_torch_compile_records_what_eager_records(tmp_path, backend):
    model = tiny_model("olmoe")
    torch._dynamo.reset()
    with capture(model, tmp_path / "eager.zarr"):
        prefill_then_decode(model, model)
    with capture(model, tmp_path / "compiled.zarr"):
        prefill_then_decode(model, torch.compile(model, backend=backend))
    columns = ["seq", "pos", "token_id", "generated", "experts", "weights"]
    eager = TraceStore.open(tmp_path / "eager.zarr").read(columns)
    compiled = TraceStore.open(tmp_path / "compiled.zarr").read(columns)
    assert len(eager["seq"]) == int(padded_batch()[1].sum()) + 2 * 2
    for name in columns[:-1]:
        np.testing.assert_array_equal(compiled[name], eager[name], err_msg=name)
    np.testing.assert_allclose(compiled["weights"], eager["weights"], rtol=1e-3, atol=1e-3)


def test_a_sequence_that_generates_eos_stops_there_while_its_batch_goes_on(tmp_path):
    """generate() feeds padding to a finished row of a batch: those rows are not recorded."""
    model = tiny_model("olmoe")
    ids, mask = padded_batch()
    new, width = 5, ids.shape[1]
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, pad_token_id=0)
    eos = int(free[0, width + 1])  # row 0's second generated token becomes its end of sequence
    assert eos not in free[1, width:].tolist() and eos != int(free[0, width])
    model.generation_config.eos_token_id = eos
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=[0, 1])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
    assert out[0, width + 1] == eos and (out[0, width + 2:] == 0).all() and out.shape[1] == width + new
    store, rows = read_all(tmp_path / "t.zarr")
    prompt = [ids[b][mask[b].bool()].tolist() for b in range(2)]
    assert_sequence_rows(model, store, rows, 0, prompt[0] + [int(free[0, width])], len(prompt[0]))
    assert_sequence_rows(model, store, rows, 1, prompt[1] + out[1, width:-1].tolist(), len(prompt[1]))


@pytest.mark.parametrize("family", ["qwen3_next", "jamba", "lfm2_moe", "nemotron_h", "granitemoe_swa"])
def test_generate_with_hybrid_and_sliding_window_caches(tmp_path, family):
    """Linear-attention, Mamba, convolution and sliding-window cache layers: continuation is still
    read from the Cache, and each sequence gets the routing of its own token history."""
    model = tiny_model(family)
    ids, mask = padded_batch()
    new = 3
    with capture(model, tmp_path / "t.zarr"), torch.no_grad():
        # Token 0 (padding) has a zero embedding: its router logits tie, and the unpatched router's
        # torch.topk breaks ties differently from moetrace's lowest-index rule. Keep it out.
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, suppress_tokens=[0])
    store, rows = read_all(tmp_path / "t.zarr")
    for b in range(2):
        prompt = ids[b][mask[b].bool()].tolist()
        assert_sequence_rows(model, store, rows, b, prompt + out[b, ids.shape[1]:-1].tolist(), len(prompt))


# --------------------------------------------------------------------- sliding windows and turns

def test_a_sliding_window_with_a_static_cache_records_every_prompt_token(tmp_path):
    """Mixtral with a 3-token window: the 4-D mask's last query attends only the window and the decode
    steps' key axis is the window's, so neither can say which earlier tokens were padding or count
    positions. Each query's own key (the mask's diagonal) and the rows' running counts can; replay uses
    the same rules and routes the same generation again."""
    model = tiny_model("mixtral", sliding_window=3)
    ids, mask = padded_batch()
    new = 3
    gen = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, suppress_tokens=[0],
               cache_implementation="static")
    with capture(model, tmp_path / "t.zarr") as cap, torch.no_grad():
        cap.set_batch(seq=[0, 1])
        out = model.generate(input_ids=ids, attention_mask=mask, **gen)
    store, rows = read_all(tmp_path / "t.zarr")
    for b in range(2):
        prompt = ids[b][mask[b].bool()].tolist()
        assert_sequence_rows(model, store, rows, b, prompt + out[b, ids.shape[1]:-1].tolist(), len(prompt))
    from moetrace.replay import replay

    with replay(model, tmp_path / "t.zarr") as rp, torch.no_grad():
        rp.set_batch(seq=[0, 1])
        again = model.generate(input_ids=ids, attention_mask=mask, **gen)
        assert all(v == 0.0 for v in rp.replay_rate().values())
    assert torch.equal(again, out)


@pytest.mark.parametrize("end_of_turn", [True, False], ids=["eos-fed-by-caller", "no-eos"])
def test_a_multi_turn_continuation_is_recorded_whole_with_the_users_tokens_as_prompt(tmp_path, end_of_turn):
    """transformers' "continue generation" pattern: turn 2's input is turn 1's output, an end-of-turn token
    (here the EOS id) and new user text, with turn 1's cache passed back. generate() feeds the cache's
    missing tokens (turn 1's last output first) in one forward: that token is generated, the caller's are
    prompt, and a caller-fed EOS ends nothing. Replay under the same calls routes the same tokens again."""
    model = tiny_model("olmoe")
    eos = model.generation_config.eos_token_id
    prompt = [3, 4, 8, 10, 11, 6]
    user = [20, 21, 22]
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)

    def two_turns():
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            first = model.generate(input_ids=torch.tensor([prompt]), cache=cache, **gen)
            turn2 = torch.cat([first, torch.tensor([[eos] * end_of_turn + user])], dim=1)
            return first, model.generate(input_ids=turn2, cache=cache, **gen)

    with capture(model, tmp_path / "t.zarr") as cap:
        cap.set_batch(seq=[5])
        first, second = two_turns()
    store, rows = read_all(tmp_path / "t.zarr")
    tokens = second[0, :-1].tolist()  # the last token never goes through the model
    assert len(tokens) == len(prompt) + 3 + end_of_turn + len(user) + 2
    assert_sequence_rows(model, store, rows, 5, tokens, len(prompt), generated=(
        [False] * len(prompt) + [True] * 3 + [False] * (end_of_turn + len(user)) + [True] * 2))

    from moetrace.replay import replay

    with replay(model, tmp_path / "t.zarr") as rp:
        rp.set_batch(seq=[5])
        again_first, again = two_turns()
        assert all(v == 0.0 for v in rp.replay_rate().values())
    assert torch.equal(again, second) and torch.equal(again_first, first)

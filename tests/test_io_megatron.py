"""Megatron router traces written by Megatron-Core's own ``RouterTracer`` (megatron-core 0.19.2, from PyPI).

The tracer (``megatron/core/transformer/moe/router_trace.py``) and the routing function
(``moe_utils.topk_routing_with_score_function``, the one ``TopKRouter.routing`` calls) are
Megatron's code, run as is on CPU. ``MegatronRouter`` below stands in only for ``TopKRouter``'s
module shell, which needs Megatron's parallel state: like ``TopKRouter.forward`` it flattens
the ``[seq, batch, hidden]`` input, computes logits with ``gating`` and returns ``(probs,
routing_map)``, and the tracer's hook is registered on it as ``RouterTracer.register_hooks``
does, under the module name ``decoder.layers.<l>.mlp.router`` (or the MTP one). The reference
routing is plain torch (``torch.topk`` over each sequence's own logits).

The tracer's hook asks ``torch.cuda.is_current_stream_capturing()``, which a CPU build of torch
cannot answer; it is patched to False (no stream is capturing on a CPU).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

from moetrace.counting import count
from moetrace.compare import compare, summary_json
from moetrace.errors import MoetraceError
from moetrace.io import import_routed
from moetrace.metrics import specialized
from moetrace.store import TraceStore

with warnings.catch_warnings():  # Megatron warns that Transformer Engine and Apex are absent
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function
    from megatron.core.transformer.moe.router_trace import RouterTracer

H, E, K = 16, 8, 2


class MegatronRouter(torch.nn.Module):
    """``TopKRouter``'s forward on one rank: flatten, gate, route with Megatron's routing function."""

    def __init__(self, seed: int, topk: int = K, score_function: str = "softmax", expert_bias=None):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.nn.Parameter(torch.randn(E, H, generator=g))
        self.topk, self.score_function, self.expert_bias = topk, score_function, expert_bias
        self.config = SimpleNamespace(moe_router_score_function=score_function)  # what the weight dump reads

    def gating(self, x):
        return x @ self.weight.t()

    def forward(self, x):
        logits = self.gating(x.reshape(-1, x.shape[-1]))
        return topk_routing_with_score_function(logits, self.topk, score_function=self.score_function,
                                                expert_bias=self.expert_bias)


def megatron_routers(tracer: RouterTracer, layers, block: str = "decoder", **kw) -> dict[int, MegatronRouter]:
    routers = {}
    for layer in layers:
        router = MegatronRouter(seed=layer, **kw)
        name = (f"decoder.layers.{layer}.mlp.router" if block == "decoder"
                else f"mtp.layers.{block.split(':')[1]}.mtp_model_layer.layers.{layer}.mlp.router")
        router.register_forward_hook(tracer.make_hook(name))
        routers[layer] = router
    return routers


@pytest.fixture(autouse=True)
def _cpu_stream():
    with mock.patch.object(torch.cuda, "is_current_stream_capturing", lambda: False):
        yield


def true_topk(router: MegatronRouter, hidden: torch.Tensor, b: int, by_logit: bool = False) -> np.ndarray:
    """Reference ranks of sequence ``b`` of ``hidden`` [S, B, H]: sorted torch.topk over the router's selection
    scores (biased as Megatron's sigmoid routing selects), rank 0 first; ``by_logit``: the chosen experts
    reordered by their unbiased logit. The logits are the forward's own (the same matmul over all rows: a
    matmul over one sequence's rows can round differently and swap two near-equal experts)."""
    with torch.no_grad():
        logits = router.gating(hidden.reshape(-1, hidden.shape[-1]))[b::hidden.shape[1]]
        scores = torch.softmax(logits, -1) if router.score_function == "softmax" else torch.sigmoid(logits)
        chosen = torch.topk(scores + (0 if router.expert_bias is None else router.expert_bias), router.topk).indices
        if by_logit:
            chosen = torch.gather(chosen, 1, torch.argsort(torch.gather(logits, 1, chosen), dim=1, descending=True))
        return chosen.numpy()


def run_training(out: Path, steps: int, micro_batches: int, B: int, S: int, layers=(1, 3), logits=True,
                 seed=0, mtp_layers=(), dump_weights=False, by_logit=False, **kw):
    """Training mode as ``pretrain`` drives it: per step ``micro_batches`` forward passes over hidden states
    ``[S, B, H]`` (Megatron's sequence-major layout), then ``advance_step``. Returns the reference experts
    per (step, micro-batch, sequence): [S, L, K] in rank order."""
    tracer = RouterTracer(str(out), max_steps=steps + 1, rank=0, training_mode=True, capture_logits=logits,
                          dump_router_weights=dump_weights)
    routers = megatron_routers(tracer, layers, **kw)
    mtp = megatron_routers(tracer, mtp_layers, block="mtp:0", **kw)
    g = torch.Generator().manual_seed(seed)
    want = {}
    for step in range(steps):
        for mb in range(micro_batches):
            hidden = torch.randn(S, B, H, generator=g) * 3
            with torch.no_grad():
                for router in [*routers.values(), *mtp.values()]:
                    router(hidden)
            for b in range(B):
                want[step, mb, b] = np.stack([true_topk(r, hidden, b, by_logit) for r in routers.values()], axis=1)
                if mtp:
                    want["mtp", step, mb, b] = np.stack([true_topk(r, hidden, b) for r in mtp.values()], axis=1)
        tracer.advance_step()
    tracer.flush()
    return want


def bf16_ties(experts: np.ndarray, routers, hidden_rows) -> int:
    """Tokens whose chosen experts' logits are equal in bfloat16, counted independently with torch."""
    return 0 if experts is None else sum(
        int(torch.gather(r.gating(h).to(torch.bfloat16).float(), 1, torch.as_tensor(experts[:, i]))
            .sort(dim=1).values.diff(dim=1).eq(0).any(dim=1).sum())
        for i, (r, h) in enumerate(zip(routers, hidden_rows)))


def imported(src, out, **kw) -> TraceStore:
    return import_routed(src, out, format="megatron", progress=False, **kw)


def by_sequence(store: TraceStore) -> list[np.ndarray]:
    cols = store.read(["seq", "experts"])
    return [cols["experts"][cols["seq"] == s] for s in np.unique(cols["seq"])]


# --------------------------------------------------------------------------- rank order
def test_the_routing_map_trace_lists_expert_ids_not_ranks_and_is_stored_rank_unknown(tmp_path):
    want = run_training(tmp_path / "trace", steps=2, micro_batches=1, B=1, S=24, logits=False)
    lines = [json.loads(x) for x in (tmp_path / "trace" / "router_trace_rank0.jsonl").read_text().splitlines()]
    assert all(row == sorted(row) for line in lines for row in line["top_indices"])  # nonzero(): id order
    with pytest.warns(UserWarning, match="rank order as unknown"):
        store = imported(tmp_path / "trace", tmp_path / "o.zarr")
    assert store.rank_order == "unknown" and store.info()["rank_order"] == "unknown"
    got = by_sequence(store)
    assert len(got) == 2
    for s, experts in enumerate(got):  # the same sets as the router chose, in id order
        np.testing.assert_array_equal(experts, np.sort(want[s, 0, 0], axis=2))
    # a ranked reference store disagrees on top-1 in most tokens: that is what the refusal protects
    top1_right = np.mean([(e[..., 0] == want[s, 0, 0][..., 0]).mean() for s, e in enumerate(got)])
    assert top1_right < 0.9


def test_router_logits_recover_the_rank_order(tmp_path):
    want = run_training(tmp_path / "trace", steps=3, micro_batches=1, B=1, S=40)
    assert (tmp_path / "trace" / "logits_rank0.bin").stat().st_size == 3 * 2 * 40 * E * 2  # bf16 [T, E] per record
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scale 3 logits: no bf16 tie among a token's two experts here
        store = imported(tmp_path / "trace", tmp_path / "o.zarr")
    assert store.rank_order == "ranked"
    for s, experts in enumerate(by_sequence(store)):
        np.testing.assert_array_equal(experts, want[s, 0, 0])


def test_logits_tied_in_bfloat16_are_counted_and_ranked_by_id(tmp_path):
    tracer = RouterTracer(str(tmp_path / "t"), max_steps=5, rank=0, training_mode=True, capture_logits=True)
    (router,) = megatron_routers(tracer, [2]).values()
    with torch.no_grad():  # experts 1 and 0 score within 0.1% of each other: equal in bfloat16 (8-bit mantissa)
        router.weight[1] = router.weight[0] * 1.001
    hidden = torch.randn(64, 1, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, routing_map = router(hidden)
    tracer.advance_step()
    tracer.flush()
    chosen = routing_map.nonzero()[:, 1].view(64, K).numpy()[:, None, :]
    ties = bf16_ties(chosen, [router], [hidden[:, 0]])
    assert ties > 0, "the set-up must produce ties"
    with pytest.warns(UserWarning, match=f"{ties} token-layer top-k"):
        store = imported(tmp_path / "t", tmp_path / "o.zarr")
    experts = store.read(["experts"])["experts"]
    logits = router.gating(hidden[:, 0]).detach().to(torch.bfloat16).float().numpy()
    got = np.take_along_axis(logits, experts[:, 0].astype(np.int64), axis=1)
    assert (got[:, 0] >= got[:, 1]).all()
    tied = got[:, 0] == got[:, 1]
    assert (experts[tied, 0, 0] < experts[tied, 0, 1]).all()


@pytest.mark.parametrize("dump_weights", [True, False], ids=["router-state", "logits-only"])
def test_with_an_expert_bias_the_rank_is_the_selection_order_when_the_bias_was_dumped(tmp_path, dump_weights):
    """With the router state (its expert bias) the rank is Megatron's selection order, sigmoid + bias (the
    order capture records); from the logits alone it is the unbiased score's order (the routing weights')."""
    bias = torch.tensor([0.3, 0, 0, 0, 0, 0, 0, -0.3])  # changes which experts are chosen, and their order
    want = run_training(tmp_path / "trace", steps=1, micro_batches=1, B=1, S=60, score_function="sigmoid",
                        expert_bias=bias, dump_weights=dump_weights, by_logit=not dump_weights)
    assert (tmp_path / "trace" / "router_state_rank0.pt").exists() == dump_weights
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = imported(tmp_path / "trace", tmp_path / "o.zarr")
    got = by_sequence(store)[0]
    # the sidecar's logits are bfloat16: a token whose scores lie within that rounding may come out either way,
    # and the import says how many such tokens there were
    unsettled = sum(int(m.group(1)) for w in caught if (m := re.search(r"in (\d+) token-layer", str(w.message))))
    mismatched = int((got != want[0, 0, 0]).any(axis=2).sum())
    assert mismatched <= unsettled <= got.shape[0] * got.shape[1] // 10, (mismatched, unsettled)
    other = run_training(tmp_path / "ref", steps=1, micro_batches=1, B=1, S=60, score_function="sigmoid",
                         expert_bias=bias, by_logit=dump_weights)[0, 0, 0]
    assert (got != other).any(), "the two orders must differ somewhere for this test to tell them apart"


@pytest.mark.parametrize("order", ["scores", "as-written"])
def test_record_indices_import_as_written_only_when_asked(tmp_path, order):
    """``record_indices`` hands over the indices of an unsorted top-k in inference: by default not a rank order."""
    tracer = RouterTracer(str(tmp_path / "t"), max_steps=5, rank=3, training_mode=True)
    rng = np.random.default_rng(0)
    indices = np.stack([rng.permutation(E)[:K] for _ in range(20 * 3)]).reshape(20, 3, K)
    tracer.record_indices(torch.as_tensor(indices), layer_ids=[1, 2, 4])
    tracer.advance_step()
    tracer.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = imported(tmp_path / "t", tmp_path / "o.zarr", label_fields=["rank", "step"], options={"order": order})
    assert store.rank_order == ("ranked" if order == "as-written" else "unknown")
    assert store.layer_ids.tolist() == [1, 2, 4]
    np.testing.assert_array_equal(store.read(["experts"])["experts"], indices)
    assert set(store.decode_label("rank", store.read(["rank"])["rank"])) == {"3"}


# --------------------------------------------------------------------------- blocks and micro-batches
def test_micro_batches_and_sequences_within_them_are_separate_sequences(tmp_path):
    want = run_training(tmp_path / "trace", steps=2, micro_batches=2, B=3, S=10)
    store = imported(tmp_path / "trace", tmp_path / "o.zarr", options={"micro_batch_size": 3},
                     label_fields=["step", "micro_batch", "sequence"])
    cols = store.read(["seq", "pos", "step", "micro_batch", "sequence"])
    got = by_sequence(store)
    assert len(got) == 2 * 2 * 3
    for s, experts in enumerate(got):
        rows = cols["seq"] == s
        step, mb, b = (int(store.decode_label(n, cols[n][rows][:1])[0]) for n in ("step", "micro_batch", "sequence"))
        np.testing.assert_array_equal(experts, want[step, mb, b])
        assert cols["pos"][rows].tolist() == list(range(10))
    # read as one sequence per micro-batch, the three sequences interleave: not what the run saw
    wrong = imported(tmp_path / "trace", tmp_path / "w.zarr")
    assert len(by_sequence(wrong)) == 4 and not np.array_equal(by_sequence(wrong)[0][:10], want[0, 0, 0])
    with pytest.raises(MoetraceError, match="not a multiple of --micro-batch-size 4"):
        imported(tmp_path / "trace", tmp_path / "x.zarr", options={"micro_batch_size": 4})


def test_the_mtp_head_is_its_own_block(tmp_path):
    want = run_training(tmp_path / "trace", steps=1, micro_batches=1, B=1, S=12, layers=(0, 1), mtp_layers=(0,))
    with pytest.warns(UserWarning, match=r"skipped the records of mtp:0 \(1\)"):
        decoder = imported(tmp_path / "trace", tmp_path / "d.zarr")
    assert decoder.layer_ids.tolist() == [0, 1]
    np.testing.assert_array_equal(by_sequence(decoder)[0], want[0, 0, 0])
    head = imported(tmp_path / "trace", tmp_path / "m.zarr", options={"block": "mtp:0"})
    assert head.layer_ids.tolist() == [0]
    np.testing.assert_array_equal(by_sequence(head)[0], want["mtp", 0, 0, 0])
    with pytest.raises(MoetraceError, match=r"no records of block mtp:1; the trace has .*decoder \(2\)"):
        imported(tmp_path / "trace", tmp_path / "x.zarr", options={"block": "mtp:1"})
    with pytest.raises(MoetraceError, match="--block: expected decoder or mtp"):
        imported(tmp_path / "trace", tmp_path / "x.zarr", options={"block": "mtp"})
    with pytest.raises(MoetraceError, match="no option micro_batch_size"):
        import_routed(tmp_path / "trace", tmp_path / "x.zarr", format="npy", options={"micro_batch_size": 2})


def test_a_damaged_logits_sidecar_is_refused(tmp_path):
    run_training(tmp_path / "trace", steps=1, micro_batches=1, B=1, S=8)
    side = tmp_path / "trace" / "logits_rank0.bin"
    side.write_bytes(side.read_bytes()[:-10])
    with pytest.raises(MoetraceError, match=r"logits_rank0.bin holds .* of the record's 128 logit bytes"):
        imported(tmp_path / "trace", tmp_path / "o.zarr")
    side.unlink()
    with pytest.raises(MoetraceError, match="logits_rank0.bin, which is unreadable"):
        imported(tmp_path / "trace", tmp_path / "o.zarr")


# --------------------------------------------------------------------------- what rank-unknown refuses
@pytest.fixture
def unranked(tmp_path) -> tuple[TraceStore, TraceStore]:
    """The same routing twice: from the routing map without logits (rank unknown), and with logits."""
    run_training(tmp_path / "a", steps=2, micro_batches=1, B=1, S=30, logits=False)
    run_training(tmp_path / "b", steps=2, micro_batches=1, B=1, S=30)
    with pytest.warns(UserWarning):
        a = imported(tmp_path / "a", tmp_path / "a.zarr", label_fields=["step"])
    return a, imported(tmp_path / "b", tmp_path / "b.zarr", label_fields=["step"])


@pytest.mark.parametrize("stat", ["paths", "pairs", "temporal"])
def test_statistics_of_the_top1_refuse_a_store_without_rank_order(unranked, stat):
    a, b = unranked
    with pytest.raises(MoetraceError, match=f"statistic '{stat}' needs each token's rank order"):
        count(a, stats=[stat])
    count(b, stats=[stat])


def test_set_statistics_still_count_and_agree_with_the_ranked_store(unranked):
    a, b = unranked
    ca, cb = count(a, stats=["experts", "coact"], by=["step"]), count(b, stats=["experts", "coact"], by=["step"])
    np.testing.assert_array_equal(ca["experts"].sum("rank"), cb["experts"].sum("rank"))
    np.testing.assert_array_equal(ca["coact"], cb["coact"])
    assert ca.attrs["rank_order"] == "unknown" and cb.attrs["rank_order"] == "ranked"
    with pytest.raises(MoetraceError, match="specialization by experts"):
        specialized(ca, method="experts", group={"step": "0"})
    specialized(cb, method="experts", group={"step": "0"})


def test_compare_measures_sets_and_says_top1_is_not_measured(unranked):
    a, b = unranked
    summary = summary_json(compare(a, b))
    assert summary["rank_order_unknown"] == [str(a.path)] and summary["differing"] == "top-k set"
    assert all("top1_agreement" not in layer for layer in summary["layers"])
    assert all(layer["topk_overlap"] == 1.0 for layer in summary["layers"])  # the same sets
    assert all(row["layers_differing"] == 0 for row in summary["worst_tokens"])
    both = summary_json(compare(b, b))
    assert all(layer["top1_agreement"] == 1.0 for layer in both["layers"]) and not both["rank_order_unknown"]


def test_the_command_line_takes_the_megatron_options_and_info_shows_the_rank_order(tmp_path, capsys):
    from moetrace.cli import main

    run_training(tmp_path / "trace", steps=1, micro_batches=2, B=2, S=6, logits=False, mtp_layers=(2,))
    out = tmp_path / "o.zarr"
    with pytest.warns(UserWarning, match="rank order as unknown"):
        assert main(["import-routed", str(tmp_path / "trace"), str(out), "--format", "megatron", "--block", "mtp:0",
                     "--micro-batch-size", "2", "--quiet"]) == 0
    store = TraceStore.open(out)
    assert store.layer_ids.tolist() == [2] and len(by_sequence(store)) == 4 and len(store) == 4 * 6
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "rank order unknown" in capsys.readouterr().out
    assert main(["count", str(out), str(tmp_path / "c.zarr"), "--stats", "paths", "--quiet"]) == 2
    assert "statistic 'paths' needs each token's rank order" in capsys.readouterr().err
    assert main(["import-routed", str(tmp_path / "trace"), str(tmp_path / "x.zarr"), "--format", "megatron",
                 "--order", "sorted", "--quiet"]) == 2
    assert "--order: expected one of scores, as-written" in capsys.readouterr().err


def test_rank_order_survives_parquet_and_the_report_leaves_out_top1_sections(unranked, tmp_path):
    from moetrace.counting import coverage
    from moetrace.io.parquet import export_parquet, import_parquet
    from moetrace.report import write_report
    from moetrace.targets import Targets

    a, _ = unranked
    export_parquet(a, tmp_path / "a.parquet", progress=False)
    back = import_parquet(tmp_path / "a.parquet", tmp_path / "back.zarr", progress=False)
    assert back.rank_order == "unknown"
    np.testing.assert_array_equal(back.read(["experts"])["experts"], a.read(["experts"])["experts"])
    html = write_report(a.path, tmp_path / "report.html").read_text()
    for stat in ("paths", "pairs", "temporal"):
        assert f"{stat} cannot be counted: the trace records each token&#x27;s set of experts" in html
    assert "coact was not counted" not in html  # the set statistics are there
    with pytest.raises(MoetraceError, match="coverage of experts"):
        coverage(a, Targets(), kind="experts", progress=False)

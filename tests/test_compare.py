"""moetrace.compare against a slow pure-Python reference, and on captures of a real tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moetrace.cli import main
from moetrace.compare import compare, sequence_index, summary_json
from moetrace.errors import MoetraceError
from moetrace.store import TraceStore

L, E, K = 3, 8, 2


def _routing(rng, n):
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])
    weights = rng.dirichlet(np.ones(K), size=(n, L)).astype(np.float16)
    weights = -np.sort(-weights, axis=-1)
    return experts, weights


def _write(path, seqs, chunk_rows=16):
    """seqs: list of (seq id, positions, token ids, domain, experts [n, L, K], weights [n, L, K])."""
    with TraceStore.create(path, n_layers=L, n_experts=E, top_k=K, labels={"domain": ["a", "b"]},
                           weights=True, chunk_rows=chunk_rows) as store:
        for seq, pos, tok, domain, experts, weights in seqs:
            n = len(pos)
            store.append({"seq": np.full(n, seq), "pos": pos, "token_id": tok, "domain": np.full(n, domain),
                          "experts": experts, "weights": weights})
    return path


def _reference(seqs_a, seqs_b):
    """Per layer means over aligned (seq, pos) by plain loops; Spearman by scipy per token."""
    b = {(s, int(p)): (e[i], w[i]) for s, pos, _, _, e, w in seqs_b for i, p in enumerate(pos)}
    per_layer = {m: [[] for _ in range(L)] for m in ("top1", "overlap", "jaccard", "rho")}
    n = 0
    for s, pos, _, _, e, w in seqs_a:
        for i, p in enumerate(pos):
            if (s, int(p)) not in b:
                continue
            n += 1
            eb, wb = b[(s, int(p))]
            for layer in range(L):
                A, B = list(e[i, layer]), list(eb[layer])
                inter = len(set(A) & set(B))
                per_layer["top1"][layer].append(float(A[0] == B[0]))
                per_layer["overlap"][layer].append(inter / K)
                per_layer["jaccard"][layer].append(inter / len(set(A) | set(B)))
                union = A + [x for x in B if x not in A]
                x = [float(w[i, layer][A.index(u)]) if u in A else 0.0 for u in union]
                y = [float(wb[layer][B.index(u)]) if u in B else 0.0 for u in union]
                if len(set(x)) > 1 and len(set(y)) > 1:
                    per_layer["rho"][layer].append(scipy.stats.spearmanr(x, y).statistic)
    return n, {m: [np.mean(v) if v else np.nan for v in vals] for m, vals in per_layer.items()}


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31))
def test_compare_equals_a_slow_reference(tmp_path_factory, seed):
    rng = np.random.default_rng(seed)
    tmp = tmp_path_factory.mktemp("cmp")
    seqs_a, seqs_b = [], []
    for s in range(int(rng.integers(1, 9))):
        n = int(rng.integers(1, 20))
        pos = np.arange(n)
        tok = rng.integers(0, 50, n)
        experts, weights = _routing(rng, n)
        seqs_a.append((s, pos, tok, s % 2, experts, weights))
        if rng.random() < 0.8:  # B: some sequences missing, positions dropped, routing perturbed
            keep = np.sort(rng.choice(n, int(rng.integers(1, n + 1)), replace=False))
            eb, wb = experts[keep].copy(), weights[keep].copy()
            flip = rng.random(len(keep)) < 0.4
            other, other_w = _routing(rng, len(keep))
            eb[flip], wb[flip] = other[flip], other_w[flip]
            seqs_b.append((s, pos[keep], tok[keep], s % 2, eb, wb))
    seqs_b.append((99, np.arange(3), np.zeros(3, int), 0, *_routing(rng, 3)))  # only in B
    order = rng.permutation(len(seqs_b))  # B holds its sequences in another order
    a = _write(tmp / "a.zarr", seqs_a, chunk_rows=int(rng.integers(1, 30)))
    b = _write(tmp / "b.zarr", [seqs_b[i] for i in order], chunk_rows=int(rng.integers(1, 30)))
    n, ref = _reference(seqs_a, seqs_b)
    if n == 0:
        with pytest.raises(MoetraceError, match="no token in common"):
            compare(a, b)
        return
    result = compare(a, b, block_rows=int(rng.integers(1, 40)))
    assert result.tokens == n
    ds = result.layers
    np.testing.assert_allclose(ds["top1_agreement"].values, ref["top1"])
    np.testing.assert_allclose(ds["topk_overlap"].values, ref["overlap"])
    np.testing.assert_allclose(ds["jaccard"].values, ref["jaccard"])
    np.testing.assert_allclose(ds["weight_rank_corr"].values, ref["rho"], atol=1e-12)
    by_domain = compare(a, b, by=["domain"])
    assert int(by_domain.layers["tokens"].sum()) == n


def test_sequence_index_and_a_store_that_breaks_contiguity(tmp_path):
    rng = np.random.default_rng(0)
    e, w = _routing(rng, 6)
    store = _write(tmp_path / "a.zarr", [(7, np.arange(4), np.zeros(4, int), 0, e[:4], w[:4]),
                                         (3, np.arange(2), np.zeros(2, int), 1, e[4:], w[4:])], chunk_rows=3)
    ids, starts, lengths = sequence_index(TraceStore.open(store))
    assert ids.tolist() == [3, 7] and starts.tolist() == [4, 0] and lengths.tolist() == [2, 4]


def test_token_ids_must_agree(tmp_path):
    rng = np.random.default_rng(1)
    e, w = _routing(rng, 4)
    a = _write(tmp_path / "a.zarr", [(0, np.arange(4), np.array([1, 2, 3, 4]), 0, e, w)])
    b = _write(tmp_path / "b.zarr", [(0, np.arange(4), np.array([1, 2, 9, 4]), 0, e, w)])
    with pytest.raises(MoetraceError, match="sequence 0 position 2: token id 3"):
        compare(a, b)


def test_different_routing_shapes_are_refused(tmp_path):
    rng = np.random.default_rng(2)
    e, w = _routing(rng, 2)
    a = _write(tmp_path / "a.zarr", [(0, np.arange(2), np.zeros(2, int), 0, e, w)])
    with TraceStore.create(tmp_path / "b.zarr", n_layers=L, n_experts=E + 1, top_k=K) as store:
        store.append({"seq": np.zeros(2, int), "pos": np.arange(2), "experts": e})
    with pytest.raises(MoetraceError, match="expected the same"):
        compare(a, tmp_path / "b.zarr")


def test_ablation_shows_where_routing_changes(tmp_path, capsys):
    """A tiny OLMoE captured with and without one layer's expert ablated: layers before it agree
    fully, the ablated layer's top-1 agrees only where the ablated expert was not first."""
    from moetrace.capture import capture
    from moetrace.intervene import ablate
    from tiny_models import tiny_model

    torch.manual_seed(0)
    model = tiny_model("olmoe").eval()
    ids = torch.randint(0, model.config.vocab_size, (4, 12))
    with torch.no_grad():
        with capture(model, tmp_path / "base.zarr") as cap:
            cap.set_batch(seq=[0, 1, 2, 3])
            model(input_ids=ids)
        base = TraceStore.open(tmp_path / "base.zarr")
        layers = base.layer_ids.tolist()
        top1 = base.read(["experts"])["experts"][:, 1, 0]
        victim = int(np.bincount(top1).argmax())
        with ablate(model, experts={layers[1]: [victim]}), capture(model, tmp_path / "ablated.zarr") as cap:
            cap.set_batch(seq=[0, 1, 2, 3])
            model(input_ids=ids)
    result = compare(tmp_path / "base.zarr", tmp_path / "ablated.zarr")
    agree = result.layers["top1_agreement"].values
    assert agree[0] == 1.0
    assert agree[1] == pytest.approx(np.mean(top1 != victim))
    assert main(["compare", str(tmp_path / "base.zarr"), str(tmp_path / "ablated.zarr"), "--json",
                 "--out", str(tmp_path / "cmp")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 48
    assert [e["layer"] for e in out["layers"]] == layers
    assert out["layers"][1]["top1_agreement"] == pytest.approx(agree[1])
    assert {"layer", "top1_agreement", "topk_overlap"} <= set(out["layers"][0])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5000


def test_report_sections_for_a_comparison_and_for_generated_tokens(tmp_path, capsys):
    """A run directory with compare.json gets the comparison section; a trace with generated tokens
    gets prompt vs generated usage, with the token counts of the store."""
    from moetrace.capture import capture
    from moetrace.intervene import ablate
    from moetrace.report import write_report
    from tiny_models import tiny_model

    torch.manual_seed(2)
    model = tiny_model("olmoe").eval()
    ids = torch.randint(1, model.config.vocab_size, (2, 6))
    run = tmp_path / "run"
    run.mkdir()
    with torch.no_grad():
        with capture(model, run / "trace.zarr") as cap:
            cap.set_batch(seq=[0, 1])
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                           pad_token_id=0)
        layers = TraceStore.open(run / "trace.zarr").layer_ids.tolist()
        with ablate(model, experts={layers[1]: [0]}), capture(model, tmp_path / "ablated.zarr") as cap:
            cap.set_batch(seq=[0, 1])
            model(input_ids=ids)  # the prompts only: they align with the first trace's prompt tokens
    assert main(["compare", str(run / "trace.zarr"), str(tmp_path / "ablated.zarr"), "--out", str(run)]) == 0
    assert json.loads((run / "compare.json").read_text())["tokens"] == ids.numel()
    capsys.readouterr()
    html = write_report(run, tmp_path / "report.html").read_text()
    section = html.split('<section id="compare">', 1)[1].split("</section>", 1)[0]
    assert 'src="data:image/png;base64,' in section and "layers differing" in section
    generated = html.split('<section id="generated">', 1)[1].split("</section>", 1)[0]
    store = TraceStore.open(run / "trace.zarr")
    flags = store.read(["generated"])["generated"]
    assert f"<td class=\"t\">generated</td><td>{int(flags.sum())}</td>" in generated
    assert f"<td class=\"t\">prompt</td><td>{int((~flags).sum())}</td>" in generated


def test_the_command_says_what_was_not_compared_and_lists_only_disagreements(tmp_path, capsys):
    """Tokens of either store without a partner are counted and named; per-group tables come with --by;
    identical routing lists no 'differing' token."""
    rng = np.random.default_rng(7)
    seqs = []
    for s in range(4):
        n = 6
        experts, weights = _routing(rng, n)
        seqs.append((s, np.arange(n), rng.integers(0, 50, n), "ab"[s % 2], experts, weights))
    a = _write(tmp_path / "a.zarr", seqs)
    b = _write(tmp_path / "b.zarr", seqs[:3] + [(9, *seqs[3][1:])])  # sequence 3 is 9 in b: 6 tokens each unmatched
    summary = summary_json(compare(a, b))
    assert summary["tokens"] == 18 and summary["unmatched_tokens"] == {"a": 6, "b": 6}
    assert summary["worst_tokens"] == []  # the same routing everywhere: nothing differs
    assert main(["compare", str(a), str(b), "--by", "domain"]) == 0
    out = capsys.readouterr().out
    assert f"6 tokens of {a} have no match (same seq and pos) in {b} and are not compared" in out
    assert f"6 tokens of {b} have no match" in out
    assert "group a (12 tokens):" in out and "group b (6 tokens):" in out
    assert "no aligned token's top-1 differs in any layer" in out and "differs in most layers" not in out

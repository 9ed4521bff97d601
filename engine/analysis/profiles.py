"""Expert profiles (seed 003's ``profiles.py``): everything about one (layer, expert) as a JSON dict.

One streaming pass over the store: the rows that select the expert among their top-k at the layer
give its selection frequency, each group's share, its top tokens with counts, its mean routing
weight, the experts it co-activates with, and its vocabulary specialization (the share of a token's
occurrences routed to it); the ``contexts`` strongest rows (largest routing weight, or router
probability without weights, else rank 0 first) are kept in a fixed-size buffer and their token
windows read afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moetrace.analysis._common import Analysis, group_codes, layer_positions, row_range, write_outputs
from moetrace.commands import _analysis_args as cli
from moetrace.errors import MoetraceError
from moetrace.models.loading import load_model, load_tokenizer
from moetrace.sections import ANALYSIS_DIR, Context, Section, escape, html_table, note
from moetrace.store import TraceStore


def expert_profile(store: str | TraceStore, layer: int, expert: int, *, by: Sequence[str] | None = None,
                   num_tokens: int | None = None, top_tokens: int = 20, contexts: int = 5, window: int = 8,
                   decode: Callable[[Sequence[int]], str] | None = None) -> dict[str, Any]:
    """A JSON-ready profile of expert ``expert`` at layer id ``layer``.

    by: labels for the group shares (default all labels of the store). decode: token ids -> text
    (e.g. ``tokenizer.decode``) for the top tokens and contexts; else the contexts use the store's
    token text when it has some, and a ``text`` is None where neither gives one (``text_source``
    says which: "decoder", "store" or None; the ids are always in ``token_id`` / ``tokens``).
    Keys: layer, expert, tokens (rows read), selected (rows with the expert in their top-k),
    selection_frequency (selected / tokens), baseline (k/E), by_rank (selections per rank),
    groups ({group: {selected, tokens, share_of_expert, frequency_in_group}}), mean_weight (of the
    selected rows; routing weight or router probability, ``weight_source`` says which),
    coactivation ([{expert, count, share}] of the other experts in the same top-k, descending),
    top_tokens ([{token_id, text, count, share_of_token}], share_of_token = the vocabulary
    specialization: count / the token's occurrences), contexts ([{row, seq, pos, weight, text,
    tokens}] strongest first).
    """
    st = store if isinstance(store, TraceStore) else TraceStore.open(store)
    (li,) = layer_positions(st.layer_ids, [layer], "layer")
    E, K = st.n_experts, st.top_k
    if not 0 <= int(expert) < E:
        raise MoetraceError(f"--expert: expected an expert id in [0, {E}), got {expert}")
    by = list(st.label_names if by is None else by)
    names, codes_of = group_codes(st, by)
    source = "weights" if st.has_weights else "probs" if st.has_probs else None
    cols = ["experts", "token_id", *by] + ([source] if source else [])
    rows = row_range(st, num_tokens)
    G = len(names)
    sel_g = np.zeros(G, dtype=np.int64)
    tok_g = np.zeros(G, dtype=np.int64)
    by_rank = np.zeros(K, dtype=np.int64)
    coact = np.zeros(E, dtype=np.int64)
    token_sel = np.zeros(0, dtype=np.int64)
    token_all = np.zeros(0, dtype=np.int64)
    weight_sum = 0.0
    best_rows = np.zeros(0, dtype=np.int64)
    best_w = np.zeros(0)

    def grow(a: np.ndarray, n: int) -> np.ndarray:
        return a if a.size >= n else np.concatenate([a, np.zeros(n - a.size, dtype=a.dtype)])

    for chunk in st.iter_chunks(cols, rows=rows):
        ex = chunk["experts"][:, li, :].astype(np.int64)  # [n, K]
        hit = ex == expert
        mask = hit.any(axis=1)
        g = codes_of(chunk)
        tok_g += np.bincount(g, minlength=G)
        sel_g += np.bincount(g[mask], minlength=G)
        by_rank += hit.sum(axis=0)
        coact += np.bincount(ex[mask].ravel(), minlength=E)
        tid = chunk["token_id"].astype(np.int64)
        known = tid >= 0
        if known.any():
            size = int(tid[known].max()) + 1
            token_all = grow(token_all, size)
            token_sel = grow(token_sel, size)
            token_all[:size] += np.bincount(tid[known], minlength=size)
            token_sel[:size] += np.bincount(tid[known & mask], minlength=size)
        if source == "weights":
            w = np.where(hit, chunk["weights"][:, li, :].astype(np.float64), 0.0).sum(axis=1)
        elif source == "probs":
            w = chunk["probs"][:, li, expert].astype(np.float64)
        else:
            w = np.where(hit, K - np.arange(K), 0).sum(axis=1).astype(np.float64)
        weight_sum += float(w[mask].sum())
        cand_rows = np.concatenate([best_rows, chunk.start + np.flatnonzero(mask)])
        cand_w = np.concatenate([best_w, w[mask]])
        keep = np.lexsort((cand_rows, -cand_w))[:contexts]
        best_rows, best_w = cand_rows[keep], cand_w[keep]
    n_tokens = int(tok_g.sum())
    if n_tokens == 0:
        raise MoetraceError(f"{st.path}: no rows to profile")
    selected = int(sel_g.sum())
    coact[expert] = 0

    def text_of(ids: Sequence[int], texts: Sequence[str] | None = None) -> str | None:
        """The tokens' text: decoded, else the store's token text, else None (never ids posing as text)."""
        if decode is not None:
            return decode([int(i) for i in ids])
        if texts is not None:
            return "".join(texts)
        return None

    order = np.argsort(-token_sel, kind="stable")[:top_tokens]
    order = order[token_sel[order] > 0]
    top = [{"token_id": int(t), "text": text_of([t]), "count": int(token_sel[t]),
            "share_of_token": float(token_sel[t] / token_all[t])} for t in order]
    co_order = np.argsort(-coact, kind="stable")
    co = [{"expert": int(e), "count": int(coact[e]), "share": float(coact[e] / selected)}
          for e in co_order if coact[e] > 0]
    ctx = []
    text_cols = ["seq", "pos", "token_id"] + (["text"] if st.has_token_text and decode is None else [])
    for row, w in zip(best_rows.tolist(), best_w.tolist()):
        lo, hi = max(rows[0], row - window), min(len(st), row + window + 1)
        win = st.read(text_cols, lo, hi)
        same = win["seq"] == win["seq"][row - lo]
        ids = win["token_id"][same].tolist()
        texts = win["text"][same].tolist() if "text" in win else None
        ctx.append({"row": row, "seq": int(win["seq"][row - lo]), "pos": int(win["pos"][row - lo]),
                    "weight": w, "token": text_of([win["token_id"][row - lo]],
                                                  [win["text"][row - lo]] if texts is not None else None),
                    "text": text_of(ids, texts), "tokens": [int(i) for i in ids]})
    return {
        "layer": int(layer), "expert": int(expert), "tokens": n_tokens, "selected": selected,
        "selection_frequency": selected / n_tokens, "baseline": K / E, "by_rank": by_rank.tolist(),
        "groups": {name: {"selected": int(sel_g[i]), "tokens": int(tok_g[i]),
                          "share_of_expert": float(sel_g[i] / selected) if selected else float("nan"),
                          "frequency_in_group": float(sel_g[i] / tok_g[i]) if tok_g[i] else float("nan")}
                   for i, name in enumerate(names)},
        "mean_weight": weight_sum / selected if selected else float("nan"),
        "weight_source": source or "rank (K - rank; no weights or probs recorded)",
        "coactivation": co, "top_tokens": top, "contexts": ctx,
        "text_source": "decoder" if decode is not None else "store" if "text" in text_cols else None,
    }


# ---------------------------------------------------------------------- figure, command, report section

#: The name of the JSON file the command writes per layer.
OUTPUT = "profile_layer{layer}_expert{expert}"


def _arguments(p) -> None:
    cli.add_common(p, layers_help="layer ids (one profile each; default: all MoE layers)")
    p.add_argument("--expert", type=int, required=True, metavar="E", help="the expert id to profile")
    p.add_argument("--model", default=None, help="checkpoint whose tokenizer decodes token ids ('demo' works; "
                                                 "default: the tokenizer the store recorded at capture)")
    p.add_argument("--top-tokens", type=int, default=20, help="most frequent tokens listed (default 20)")
    p.add_argument("--contexts", type=int, default=5, help="example contexts listed (default 5)")
    p.add_argument("--window", type=int, default=8, help="tokens either side of a context's token (default 8)")


def _run(args) -> int:
    st = cli.open_store(args)
    layers = args.layers if args.layers is not None else st.layer_ids.tolist()
    layer_positions(st.layer_ids, layers, "--layers")  # every layer checked before the first profile is written
    if args.model is not None:
        _, tokenizer = load_model(args.model)
    else:
        tokenizer = load_tokenizer(st.tokenizer)
    decode = tokenizer.decode if tokenizer is not None else None
    out = cli.out_dir(args)
    for layer in layers:
        prof = expert_profile(st, layer, args.expert, num_tokens=args.num_tokens, top_tokens=args.top_tokens,
                              contexts=args.contexts, window=args.window, decode=decode)
        cli.save(out, OUTPUT.format(layer=layer, expert=args.expert), data=prof)
        print(f"layer {layer}, expert {args.expert}: selected by {prof['selection_frequency']:.1%} of tokens "
              f"(uniform {prof['baseline']:.1%}); top tokens "
              + ", ".join(f"{_token(t)} x{t['count']}" for t in prof["top_tokens"][:5]))
    if decode is None:
        print("token text: none (ids shown as #id): the store records no tokenizer that loads; give --model")
    return 0


def _suite(run) -> list[Path]:
    prof = expert_profile(run.store, run.first_layer, run.busiest_expert, decode=run.decode)
    return write_outputs(run.out, OUTPUT.format(layer=run.first_layer, expert=run.busiest_expert), data=prof)


def _token(t: dict) -> str:
    """A top token as shown: its text, or ``#id`` when the profile has no text for it."""
    return repr(t["text"]) if t.get("text") is not None else f"#{t['token_id']}"


def _render(ctx: Context) -> str:
    body = note("One (layer, expert) per profile (moetrace profile): its selection frequency, mean routing "
                "weight, most frequent tokens and the experts it co-activates with.")
    for path in sorted(ctx.analysis_dir.glob(OUTPUT.format(layer="*", expert="*") + ".json")):
        p = json.loads(path.read_text())
        title = f"Layer {p['layer']}, expert {p['expert']}: selected by {p['selection_frequency']:.1%} of tokens"
        body += (f"<h3>{escape(title)}</h3>"
                 + html_table(["fact", "value"], [
                     ["selected", p["selected"]], ["selection frequency", p["selection_frequency"]],
                     ["mean weight", p["mean_weight"]],
                     ["top tokens", ", ".join(f"{_token(t)} ({t['count']})" for t in p["top_tokens"][:10])],
                     ["co-activates with", ", ".join(f"{c['expert']} ({c['share']:.2f})"
                                                     for c in p["coactivation"][:5])]], text_cols=2))
    return body


ANALYSIS = Analysis(
    command="profile", help="JSON profile of one expert at each of --layers: tokens, contexts, co-activation",
    example="profile run/trace.zarr --layers 1 --expert 9 --model demo --out run/analysis",
    arguments=_arguments, run=_run, order=70,
    outputs=(OUTPUT.format(layer="*", expert="*") + ".json",),
    section=Section("profiles", "Expert profiles", "Profiles",
                    (f"{ANALYSIS_DIR}/{OUTPUT.format(layer='*', expert='*')}.json",), _render),
    suite=_suite)

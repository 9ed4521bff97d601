"""Synthetic routing traces with planted specialization, generated chunk by chunk.

Shared by the benchmarks and the demo. Each (domain, lang) group prefers a few
experts per layer; a token's top-k are drawn from its group's distribution over
experts at that layer (distinct within a token), and its top-1 at layer l depends on
its top-1 at layer l-1 (so paths carry signal too). Memory is one chunk at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DOMAINS = ("math", "code", "prose", "dates")
LANGS = ("en", "de")


@dataclass(frozen=True)
class TraceSpec:
    n_tokens: int = 1_000_000
    n_layers: int = 16
    n_experts: int = 64
    top_k: int = 8
    seq_len: int = 256
    seed: int = 0


def group_preferences(spec: TraceSpec) -> np.ndarray:
    """float64 [G, L, E] routing probabilities per group (G = domains x langs) and layer."""
    rng = np.random.default_rng(spec.seed)
    G = len(DOMAINS) * len(LANGS)
    logits = rng.normal(0.0, 1.0, size=(G, spec.n_layers, spec.n_experts))
    for g in range(G):
        favourites = rng.choice(spec.n_experts, size=(spec.n_layers, 3))
        logits[g, np.arange(spec.n_layers)[:, None], favourites] += 3.0
    p = np.exp(logits)
    return p / p.sum(-1, keepdims=True)


def generate_chunk(spec: TraceSpec, start: int, stop: int, prefs: np.ndarray | None = None) -> dict:
    """Rows [start, stop) of the synthetic trace, as a TraceStore.append batch.

    Sequences are ``seq_len`` tokens long; a sequence's group is ``seq % G``
    (domain = group // len(LANGS), lang = group % len(LANGS)). Deterministic in
    (spec.seed, start) so chunks can be generated in any order.
    """
    prefs = group_preferences(spec) if prefs is None else prefs
    G, L, E = prefs.shape
    K = spec.top_k
    rng = np.random.default_rng([spec.seed, start])
    rows = np.arange(start, stop, dtype=np.int64)
    n = len(rows)
    seq = rows // spec.seq_len
    group = (seq % G).astype(np.int64)
    # Inverse-CDF sampling through a quantized lookup table: table[g, l, q] is the expert
    # whose CDF interval holds (q + 0.5) / Q.
    table = _inverse_cdf_table(prefs)
    Q = table.shape[-1]
    q = rng.integers(0, Q, size=(n, L))
    top1 = table[group[:, None], np.arange(L)[None, :], q]           # [n, L]
    # Couple layers: the previous layer's top-1 sometimes decides this layer's top-1.
    follow = rng.random((n, L)) < 0.3
    for layer in range(1, L):
        top1[:, layer] = np.where(follow[:, layer], (top1[:, layer - 1] * 7 + 3) % E, top1[:, layer])
    # Lower ranks: random distinct experts, as offsets with random positive steps whose
    # total stays below E (so no offset wraps onto the top-1 or onto each other).
    max_step = max(1, (E - 1) // max(1, K - 1))
    steps = rng.integers(1, max_step + 1, size=(n, L, K))
    steps[:, :, 0] = 0
    experts = (top1[:, :, None] + np.cumsum(steps, axis=-1)) % E
    w = rng.dirichlet(np.ones(K), size=(n, L)).astype(np.float32)
    w = -np.sort(-w, axis=-1)
    return {
        "seq": seq,
        "pos": (rows % spec.seq_len).astype(np.int32),
        "token_id": rng.integers(0, 32000, n).astype(np.int32),
        "generated": (rows % spec.seq_len) >= spec.seq_len // 2,
        "domain": np.asarray(DOMAINS)[group // len(LANGS)],
        "lang": np.asarray(LANGS)[group % len(LANGS)],
        "experts": experts,
        "weights": w,
    }


def _inverse_cdf_table(prefs: np.ndarray, resolution: int = 4096) -> np.ndarray:
    cdf = np.cumsum(prefs, axis=-1)
    u = (np.arange(resolution) + 0.5) / resolution
    G, L, E = prefs.shape
    table = np.empty((G, L, resolution), dtype=np.int64)
    for g in range(G):
        for layer in range(L):
            table[g, layer] = np.minimum(np.searchsorted(cdf[g, layer], u), E - 1)
    return table


def write_store(path, spec: TraceSpec, *, weights: bool = True, batch_rows: int = 65536, progress: bool = True,
                **create_kwargs):
    """Write the synthetic trace into a new TraceStore at ``path`` and return it (closed)."""
    from moetrace.progress import tqdm

    from moetrace.store import TraceStore

    prefs = group_preferences(spec)
    store = TraceStore.create(path, n_layers=spec.n_layers, n_experts=spec.n_experts, top_k=spec.top_k,
                              labels={"domain": list(DOMAINS), "lang": list(LANGS)}, weights=weights,
                              model="synthetic", scoring="softmax", **create_kwargs)
    with store, tqdm(total=spec.n_tokens, unit="tok", disable=not progress, desc="synthetic trace") as bar:
        for a in range(0, spec.n_tokens, batch_rows):
            b = min(spec.n_tokens, a + batch_rows)
            batch = generate_chunk(spec, a, b, prefs)
            if not weights:
                batch.pop("weights")
            store.append(batch)
            bar.update(b - a)
    return store


# Words per domain for the token text of seed-000 style CSV traces. The shared instruction
# prefix is the same for every question, so seed 000's shared-prefix rule drops it.
SHARED_PREFIX = ("Answer", " the", " following", " question", ":", "\n")
_WORDS = {
    "math": (" 3", " +", " 4", " =", " 7", " times", " sum", " 12", " /", " 5"),
    "code": (" def", " f", "(", "x", ")", ":", " return", " x", " +", " 1"),
    "prose": (" the", " fox", " ran", " over", " a", " hill", ",", " and", " then", " slept"),
    "dates": (" 12", " March", " 1999", " is", " a", " Monday", " km", " 3", " m", " 3000"),
}


def write_seed000_csv(out_dir, spec: TraceSpec) -> tuple["Path", "Path"]:
    """Write the synthetic trace as seed 000's ``samples.csv`` + ``topks.csv`` in ``out_dir``.

    samples.csv: ``q_ix, token_ix, token, domain, lang, question_output_token, answer_char``
    (one row per token; every question starts with the same ``SHARED_PREFIX``; the model's
    output token carries stray whitespace, as real generations do). topks.csv: ``q_ix,
    token_ix, layer_ix, topk_ix, expert, weight`` (topk_ix 1-based). Returns both paths.
    """
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.csv as pacsv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    batch = generate_chunk(spec, 0, spec.n_tokens)
    n, L, K = batch["experts"].shape
    rng = np.random.default_rng(spec.seed + 1)
    pos = batch["pos"].astype(np.int64)
    text = np.empty(n, dtype=object)
    prefix = pos < len(SHARED_PREFIX)
    text[prefix] = np.asarray(SHARED_PREFIX, dtype=object)[pos[prefix]]
    for domain, words in _WORDS.items():
        sel = (~prefix) & (batch["domain"] == domain)
        text[sel] = np.asarray(words, dtype=object)[rng.integers(0, len(words), int(sel.sum()))]
    q_ix = batch["seq"]
    n_q = int(q_ix.max()) + 1
    answers = np.asarray(list("ABCD"))[rng.integers(0, 4, n_q)]
    # About 70% correct; outputs like " B\n" need seed 000's str_squish to compare.
    outputs = np.where(rng.random(n_q) < 0.7, answers, np.asarray(list("ABCD"))[rng.integers(0, 4, n_q)])
    outputs = np.char.add(np.char.add(" ", outputs.astype(str)), "\n")
    samples = pa.table({
        "q_ix": q_ix, "token_ix": pos, "token": pa.array(text.tolist(), pa.string()),
        "domain": batch["domain"], "lang": batch["lang"],
        "question_output_token": outputs[q_ix], "answer_char": answers[q_ix],
    })
    samples_path = out_dir / "samples.csv"
    pacsv.write_csv(samples, samples_path)
    layer = np.broadcast_to(np.arange(L)[None, :, None], (n, L, K)).reshape(-1)
    rank = np.broadcast_to(np.arange(1, K + 1)[None, None, :], (n, L, K)).reshape(-1)
    topks = pa.table({
        "q_ix": np.repeat(q_ix, L * K), "token_ix": np.repeat(pos, L * K), "layer_ix": layer,
        "topk_ix": rank, "expert": batch["experts"].reshape(-1),
        "weight": np.round(batch["weights"].reshape(-1), 4),
    })
    topks_path = out_dir / "topks.csv"
    pacsv.write_csv(topks, topks_path)
    return samples_path, topks_path

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
    from tqdm.auto import tqdm

    from engine.store import TraceStore

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

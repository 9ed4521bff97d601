"""Routing arrays for tests that hold the store's invariant: K distinct experts per token and layer."""

from __future__ import annotations

import numpy as np


def random_topk(rng: np.random.Generator, n: int, L: int, K: int, E: int) -> np.ndarray:
    """int64 [n, L, K]: for every token and layer K distinct expert ids in [0, E) (K <= E): the first
    uniform, each next one a random positive step further (mod E), the steps summing to < E.
    O(n L K), whatever E is."""
    first = rng.integers(0, E, (n, L, 1))
    if K == 1:
        return first.astype(np.int64)
    steps = rng.integers(1, max(1, (E - 1) // (K - 1)) + 1, (n, L, K - 1))
    return (np.concatenate([first, first + np.cumsum(steps, axis=-1)], axis=-1) % E).astype(np.int64)

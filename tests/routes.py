"""Routing arrays for tests that hold the store's invariant: K distinct experts per token and layer."""

from __future__ import annotations

import numpy as np


def random_topk(rng: np.random.Generator, n: int, L: int, K: int, E: int) -> np.ndarray:
    """int64 [n, L, K]: for every token and layer, K distinct expert ids drawn uniformly from [0, E)."""
    return np.argsort(rng.random((n, L, E)), axis=-1)[..., :K].astype(np.int64)

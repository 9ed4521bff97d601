"""The expert-specialization thesis toolkit (seed 003), one module per analysis.

Every function returns data (an ``xarray.Dataset``, a tidy ``pandas.DataFrame`` or a dict) and
never prints; figures are in :mod:`engine.figures`, commands in ``engine/commands/analysis.py``.

- :mod:`.decisiveness`: normalized router entropy and top-k mass from ``routing/probs``.
- :mod:`.router_stats`: distributions of router logits, probabilities and top-k weights.
- :mod:`.similarity`: cosine and linear CKA between all experts' outputs, and of their weights.
- :mod:`.dim_reduc`: 2-D UMAP (PCA fallback) of expert outputs.
- :mod:`.router_metrics`: selection frequency, domain specialization, expert token overlap.
- :mod:`.profiles`: a JSON profile of one (layer, expert).
- :mod:`.steering`: boost / ablate one expert for a prompt, text and next-token change.
- :mod:`.lang_domain`: per-layer divergence of groups' expert distributions, split by language and domain.
"""

from engine.analysis.decisiveness import decisiveness, router_entropy
from engine.analysis.similarity import cluster_order, expert_similarity, linear_cka, weight_similarity

__all__ = ["cluster_order", "decisiveness", "expert_similarity", "linear_cka", "router_entropy",
           "weight_similarity"]

"""The expert-specialization thesis toolkit (seed 003), one module per analysis.

Every function returns data (an ``xarray.Dataset``, a tidy ``pandas.DataFrame`` or a dict) and
never prints; figures are in :mod:`moetrace.figures`, commands in ``engine/commands/analysis.py``.

- :mod:`.decisiveness`: normalized router entropy and top-k mass from ``routing/probs``.
- :mod:`.router_stats`: distributions of router logits, probabilities and top-k weights.
- :mod:`.similarity`: cosine and linear CKA between all experts' outputs, and of their weights.
- :mod:`.dim_reduc`: 2-D UMAP (PCA fallback) of expert outputs.
- :mod:`.router_metrics`: selection frequency, domain specialization, expert token overlap.
- :mod:`.profiles`: a JSON profile of one (layer, expert).
- :mod:`.steering`: boost / ablate one expert for a prompt, text and next-token change.
- :mod:`.lang_domain`: per-layer divergence of groups' expert distributions, split by language and domain.
"""

from moetrace.analysis._common import load_result, save_result, token_batches
from moetrace.analysis.decisiveness import decisiveness, router_entropy
from moetrace.analysis.dim_reduc import pca_2d, reduce_2d, umap_available
from moetrace.analysis.lang_domain import jensen_shannon
from moetrace.analysis.profiles import expert_profile
from moetrace.analysis.router_metrics import router_metrics, token_overlap
from moetrace.analysis.router_stats import router_stats
from moetrace.analysis.similarity import cluster_order, expert_similarity, linear_cka, weight_similarity
from moetrace.analysis.steering import steer_prompt

__all__ = ["cluster_order", "decisiveness", "expert_profile", "expert_similarity", "jensen_shannon", "linear_cka",
           "load_result", "pca_2d", "reduce_2d", "router_entropy", "router_metrics", "router_stats", "save_result",
           "steer_prompt", "token_batches", "token_overlap", "umap_available", "weight_similarity"]

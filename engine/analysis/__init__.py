"""The expert-specialization thesis toolkit (seed 003), one module per analysis.

Every computation returns data (an ``xarray.Dataset``, a tidy ``pandas.DataFrame`` or a dict) and
never prints. Each module also declares, in ``ANALYSIS`` (:class:`moetrace.analysis._common.Analysis`),
its command, its figure, its report section and its step in :func:`moetrace.analysis.suite.run_suite`;
:data:`ANALYSES` collects every module's declaration, so adding an analysis is adding one module.

- :mod:`.router_metrics`: selection frequency, domain specialization, expert token overlap.
- :mod:`.lang_domain`: per-layer divergence of groups' expert distributions, split by language and domain.
- :mod:`.decisiveness`: normalized router entropy and top-k mass from ``routing/probs``.
- :mod:`.router_stats`: distributions of router logits, probabilities and top-k weights.
- :mod:`.similarity`: cosine and linear CKA between all experts' outputs, and of their weights.
- :mod:`.dim_reduc`: 2-D UMAP (PCA fallback) of expert outputs.
- :mod:`.profiles`: a JSON profile of one (layer, expert).
- :mod:`.steering`: boost / ablate one expert for a prompt, text and next-token change.
"""

import importlib
import pkgutil

from moetrace.analysis._common import Analysis, load_result, save_result, token_batches
from moetrace.analysis.decisiveness import decisiveness, router_entropy
from moetrace.analysis.dim_reduc import pca_2d, reduce_2d, umap_available
from moetrace.analysis.lang_domain import jensen_shannon
from moetrace.analysis.profiles import expert_profile
from moetrace.analysis.router_metrics import router_metrics, token_overlap
from moetrace.analysis.router_stats import router_stats
from moetrace.analysis.similarity import cluster_order, expert_similarity, linear_cka, weight_similarity
from moetrace.analysis.steering import steer_prompt


def _declared() -> tuple[Analysis, ...]:
    """Every public module's ``ANALYSIS``, in their declared order; a public module without one is an error."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") or info.name == "suite":
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        declared = getattr(module, "ANALYSIS", None)
        if not isinstance(declared, Analysis):
            raise ImportError(f"{module.__name__}: an analysis module must declare ANALYSIS = Analysis(...)")
        found.append(declared)
    return tuple(sorted(found, key=lambda a: a.order))


#: Every analysis, in order (the command list, the report's page, the suite).
ANALYSES: tuple[Analysis, ...] = _declared()

__all__ = ["ANALYSES", "Analysis", "cluster_order", "decisiveness", "expert_profile", "expert_similarity",
           "jensen_shannon", "linear_cka", "load_result", "pca_2d", "reduce_2d", "router_entropy", "router_metrics",
           "router_stats", "save_result", "steer_prompt", "token_batches", "token_overlap", "umap_available",
           "weight_similarity"]

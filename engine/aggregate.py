"""Counting API (kept for its importers): the implementation lives in :mod:`moetrace.counting`.

``count``, ``count_range``, ``coverage``, ``shared_prefix``, ``save_counts``,
``load_counts``, ``sequence_table``, ``stores_of`` (an archive's stores) and ``Filters`` are re-exported from there;
``STATS`` is the registry of ``kernels/counting.py`` (name -> statistic class, each
describing its dims, whether it is grouped and what it needs).
"""

from __future__ import annotations

from moetrace.counting import (
    COUNTS_VERSION,
    Filters,
    count,
    count_range,
    coverage,
    load_counts,
    save_counts,
    sequence_table,
    shared_prefix,
    stores_of,
)
from moetrace.kernels.counting import STATS

__all__ = [
    "COUNTS_VERSION",
    "STATS",
    "Filters",
    "count",
    "count_range",
    "coverage",
    "shared_prefix",
    "save_counts",
    "load_counts",
    "sequence_table",
    "stores_of",
]

"""Counting: stream a trace store into count tensors (xarray) with the Numba counters.

One concept per module:

- :mod:`~engine.counting.filters`: the row filters as one object (:class:`Filters`)
  and their per-chunk group codes;
- :mod:`~engine.counting.prefix`: seed 000's shared token prefix, in bounded memory;
- :mod:`~engine.counting.driver`: :func:`count` / :func:`count_range` over the
  statistics registered in ``kernels/counting.py``;
- :mod:`~engine.counting.archive`: archives (many stores, local or fsspec URLs), split
  into row ranges, counted in-process or on a Dask cluster, with range checkpoints;
- :mod:`~engine.counting.coverage`: how much of the routing a target set covers;
- :mod:`~engine.counting.files`: the counts file format (version, crash-safe save, load);
- :mod:`~engine.counting.sequences`: the per-sequence table.

``engine.aggregate`` re-exports the public names.
"""

from engine.counting.archive import stores_of
from engine.counting.coverage import coverage
from engine.counting.driver import count, count_range
from engine.counting.files import COUNTS_VERSION, load_counts, save_counts
from engine.counting.filters import Filters
from engine.counting.prefix import shared_prefix
from engine.counting.sequences import sequence_table

__all__ = ["COUNTS_VERSION", "Filters", "count", "count_range", "coverage", "shared_prefix", "save_counts",
           "load_counts", "sequence_table", "stores_of"]

"""Counting: stream a trace store into count tensors (xarray) with the Numba counters.

One concept per module:

- :mod:`~moetrace.counting.filters`: the row filters as one object (:class:`Filters`)
  and their per-chunk group codes;
- :mod:`~moetrace.counting.prefix`: seed 000's shared token prefix, in bounded memory;
- :mod:`~moetrace.counting.driver`: :func:`count_range` of one store over the statistics
  registered in ``kernels/counting.py``;
- :mod:`~moetrace.counting.api`: :func:`count`, of one store or an archive;
- :mod:`~moetrace.counting.archive`: archives (many stores, local or fsspec URLs), split
  into row ranges, counted in-process or on a Dask cluster, with range checkpoints;
- :mod:`~moetrace.counting.coverage`: how much of the routing a target set covers;
- :mod:`~moetrace.counting.files`: the counts file format (version, crash-safe save, load);
- :mod:`~moetrace.counting.sequences`: the per-sequence table.

The public names below are the package's API (``from moetrace.counting import count``).
"""

from moetrace.counting.archive import stores_of
from moetrace.counting.coverage import coverage
from moetrace.counting.api import count
from moetrace.counting.driver import count_range
from moetrace.counting.files import COUNTS_VERSION, load_counts, save_counts
from moetrace.counting.filters import Filters
from moetrace.counting.prefix import shared_prefix
from moetrace.counting.sequences import sequence_table

__all__ = ["COUNTS_VERSION", "Filters", "count", "count_range", "coverage", "shared_prefix", "save_counts",
           "load_counts", "sequence_table", "stores_of"]

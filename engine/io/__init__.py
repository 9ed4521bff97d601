"""Importers and exporters between trace files and a :class:`moetrace.store.TraceStore`.

One source format per module, all returning an open store and all passing the same
round-trip contract (``tests/io_contract.py``):

- :func:`import_csv` (``csv_import.py``): seed 000's ``samples.csv`` + ``topks.csv``.
- :func:`import_llamacpp` (``llamacpp.py``): seed 002's ``DIR/<domain>/traces/token-NNNNN.json``.
- :func:`import_parquet` / :func:`export_parquet` (``parquet.py``): the long format, one row
  per token x layer x rank, that DuckDB and polars users query directly.
- :func:`import_routed` (``routed.py`` + one module per format: ``npy.py``, ``vllm.py``,
  ``sglang.py``, ``megatron.py``): per-request ``[tokens, layers, top_k]`` routing arrays
  from serving and training engines, prompt and generated tokens marked.

The shared skeleton (staged output, create / append / commit, range checks naming file
and row) is :mod:`moetrace.io.base`; a new format is one module here, one command module
in ``engine/commands`` and its tests (``tests/io_contract.py``).

Every importer streams its input, writes into ``OUT.partial-<pid>`` next to ``OUT`` and
renames it to ``OUT`` only when the whole import succeeded (see :func:`staged_store`), so a
failed or killed import never leaves a store that looks complete.
"""

from __future__ import annotations

from moetrace.io.base import (MAX_EXPERTS, MAX_LAYER_ID, MAX_WEIGHT, POS_RANGE, SEQ_RANGE, TOKEN_ID_RANGE,  # noqa: F401
                              PartitionWriter, check_output_path, check_range, check_weights, read_partition,
                              resolve_n_experts, staged_store, write_store)
from moetrace.io.csv_import import import_csv
from moetrace.io.llamacpp import import_llamacpp
from moetrace.io.parquet import export_parquet, import_parquet
from moetrace.io.routed import import_routed

__all__ = ["import_csv", "import_llamacpp", "import_parquet", "export_parquet", "import_routed", "staged_store",
           "write_store"]

"""moetrace: capture, store, count, analyze and intervene on MoE routing.

The package is the folder ``engine/`` (orchestration; it never loops over rows in Python);
native code (Numba counters, Triton routing kernels) is ``moetrace.kernels``, the folder
``kernels/`` (see setup.py).
"""

__version__ = "0.1.0"

from moetrace.errors import MoetraceError  # noqa: F401

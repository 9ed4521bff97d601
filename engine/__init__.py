"""moetrace engine: capture, store, count, analyze and intervene on MoE routing.

The orchestration half of moetrace. Native code (Numba counters, Triton routing
kernels) lives in the sibling package ``kernels``; this package never loops over
rows in Python.
"""

__version__ = "0.1.0"

from engine.errors import MoetraceError  # noqa: F401

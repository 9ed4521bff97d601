"""Session-wide test setup.

Without a GPU, Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be
set before the first import of ``moetrace.kernels.routing`` (which many test modules reach through
``moetrace.intervene``): ``@triton.jit`` decides at decoration time how its helpers run.

Hypothesis profiles (``HYPOTHESIS_PROFILE``, default ``dev``): ``ci``, which ``make test``,
``make test-slow`` and ``.ci/run`` use, derandomizes every property test (a fixed seed per test,
no example database), so CI runs the same examples on every machine and a red run can be
repeated; ``dev`` keeps Hypothesis's random search and its database, to find new failures
locally. A failure either finds becomes an explicit ``@example`` beside its test (or, for a test
that draws with ``st.data()``, whose examples cannot be written down, a plain test). The profile
is loaded here, before any test module builds its own ``settings(...)``, which inherit from it.
"""

import os

import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

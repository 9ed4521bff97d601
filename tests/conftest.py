"""Session-wide test setup.

Without a GPU, Triton kernels run under Triton's CPU interpreter. TRITON_INTERPRET must be
set before the first import of ``moetrace.kernels.routing`` (which many test modules reach through
``moetrace.intervene``): ``@triton.jit`` decides at decoration time how its helpers run.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""moetrace native kernels: arrays in, arrays out.

``moetrace.kernels.counting``: Numba counting kernels (nogil, parallel, per-thread histograms).
``moetrace.kernels.routing``: the fused masked-routing Triton kernel and its plain-torch reference.
``moetrace.kernels.blocks``: Numba checks of the importers' token blocks (per-token strings).

Nothing here knows about files, models or labels.
"""

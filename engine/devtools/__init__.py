"""Developer tools that are not part of the data path: compiling and inspecting the kernels
(``routing_compile``: the routing kernels compiled for sm_80 / sm_90 without a GPU, used by
``tests/test_triton_compile.py`` and ``bench/triton_resources.py``). ``moetrace.kernels`` stays
arrays in, arrays out.
"""

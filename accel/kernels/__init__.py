"""Kernels, one folder per op: `triton_kernel.py` (CUDA), `reference.py` (the spec) and
`cpu.py` (fast CPU path), chosen by `dispatch.select_path`."""

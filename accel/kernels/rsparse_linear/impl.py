"""The body of `accel::rsparse_linear`: dispatch on an already chosen `path` to the Triton kernel,
the CPU path (cpu.py) or the reference. Imports only the implementations: `ops.py` registers
this body as the custom op and `__init__.py` (the entry) calls it, so neither is imported here."""
from __future__ import annotations

from .reference import rsparse_linear_ref


def rsparse_impl(x, weight, scale, threshold: float, down, up, bias, weight_t, thr_vec, path: str):
    """The body of `accel::rsparse_linear` (arguments as `rsparse_linear` / `cpu.rsparse_linear_cpu`)."""
    if path == "triton":
        from .triton_kernel import rsparse_linear_triton
        return rsparse_linear_triton(x, weight_t if weight_t is not None else weight.t().contiguous(),
                                     scale, threshold, down, up, bias)
    if path == "cpu":
        from .cpu import rsparse_cpu_impl
        return rsparse_cpu_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec)
    return rsparse_linear_ref(x, weight, scale, threshold, down, up, bias)

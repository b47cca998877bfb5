"""R-Sparse's `torch.library` custom op `accel::rsparse_linear` (namespace `accel`, see accel/kernels/ops.py).

Registered when this folder is imported (`__init__.py` imports this module), so it exists before
any entry of the folder (`rsparse_linear`, `cpu.rsparse_linear_cpu`) can run. Its body is
`impl.rsparse_impl`; its fake implementation gives torch.compile the output's shape. This module
imports only the implementation.
"""
from __future__ import annotations

from torch import Tensor
from torch.library import custom_op

from .impl import rsparse_impl


@custom_op("accel::rsparse_linear", mutates_args=())
def rsparse_linear(x: Tensor, weight: Tensor, scale: Tensor, threshold: float, down: Tensor | None,
                   up: Tensor | None, bias: Tensor | None, weight_t: Tensor | None, thr_vec: Tensor | None,
                   path: str) -> Tensor:
    """x [..., in] -> [..., out] in x.dtype through path "cpu" | "triton" | "reference"."""
    return rsparse_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec, path)


@rsparse_linear.register_fake
def _(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec, path):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))

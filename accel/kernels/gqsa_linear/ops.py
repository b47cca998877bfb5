"""GQSA's `torch.library` custom op `accel::gqsa_linear` (namespace `accel`, see accel/kernels/ops.py).

Registered when this folder is imported (`__init__.py` imports this module), so it exists before
any entry of the folder (`cpu.CPUGQSA`, `triton_kernel.gqsa_linear_triton`) can run. The body
dispatches on `path` to the implementations, `cpu.avx512_linear` (native AVX-512) and
`triton_kernel.triton_impl`, imported on first call (Triton is optional); its fake implementation
gives torch.compile the output's shape. This module imports only those implementations.
"""
from __future__ import annotations

from torch import Tensor
from torch.library import custom_op


@custom_op("accel::gqsa_linear", mutates_args=())
def gqsa_linear(x: Tensor, qweight: Tensor, colmask: Tensor, cols: Tensor | None, scales: Tensor, zeros: Tensor,
                bias: Tensor | None, in_features: int, group_size: int, bits: int, tile_rows: int, path: str,
                block_n: int, splits: int, force: str) -> Tensor:
    """x [..., in] -> [..., out] in x.dtype. path: "cpu-avx512" (x must be 2-D; no bias: the caller
    adds it) or "triton" (block_n / splits (0 = auto) / force ("" = auto) as `gqsa_linear_triton`)."""
    if path == "cpu-avx512":
        from .cpu import avx512_linear
        return avx512_linear(x, qweight, colmask, scales, zeros, group_size)
    if path == "triton":
        from .triton_kernel import triton_impl
        return triton_impl(x, qweight, colmask, cols, scales, zeros, bias, in_features, group_size, bits,
                           tile_rows, block_n, splits, force)
    raise ValueError(f"accel::gqsa_linear: path must be 'cpu-avx512' or 'triton', got {path!r}")


@gqsa_linear.register_fake
def _(x, qweight, colmask, cols, scales, zeros, bias, in_features, group_size, bits, tile_rows, path, block_n,
      splits, force):
    return x.new_empty((*x.shape[:-1], colmask.shape[0]))

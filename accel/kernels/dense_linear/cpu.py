"""The CPU path of dense linears: `accel::dense_linear` (cpp_ext.py) for bf16 inputs of at most
MAX_ROWS rows, F.linear for everything else (prefill, fp32/fp16, autograd).

Call `cpp_ext.available()` once before (it builds the kernel and registers the op); the branch
below reads only dtypes, devices and shapes, so under torch.compile it costs nothing in the
graph (static shapes: it is decided at trace time and guarded).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpp_ext
from .cpp_ext import MAX_ROWS


def usable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the native kernel computes this call: bf16 CPU tensors, 1..MAX_ROWS rows, no autograd
    (the op has no backward), and `cpp_ext.available()` has been True in this process."""
    if not cpp_ext.READY:
        return False
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or x.device.type != "cpu" or weight.dim() != 2:
        return False
    if weight.device.type != "cpu" or (bias is not None and bias.dtype != torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    k = x.shape[-1]
    return k > 0 and 1 <= x.numel() // k <= MAX_ROWS


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in], weight: [out, in], bias: [out] or None -> [..., out] in x's dtype (= F.linear)."""
    if usable(x, weight, bias):
        return torch.ops.accel.dense_linear(x, weight, bias)
    return F.linear(x, weight, bias)

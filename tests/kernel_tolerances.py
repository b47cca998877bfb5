"""Shared error bounds for kernel-vs-reference tests.

A bound "the kernel's error <= k x torch's own error" alone depends on one CPU's rounding: when
torch happens to round luckily at a shape (its error is a few ulps, or less), any legitimate change
of summation order (another SIMD width, blocking, thread split, another CPU) can exceed k x that.
So every ratio bound gets an absolute floor of a few ulps, scaled by the square root of the
reduction length n (rounding errors of an n-term sum grow like a random walk):

    floor = c * (eps(dtype) + eps(acc) * sqrt(n)),   bound = max(k * torch_err, floor)

acc is the accumulation dtype (fp32 for fp32/fp16/bf16 inputs, fp64 for fp64): the kernels sum in
fp32 and round to `dtype` a bounded number of times (the output, a softmax weight), so those
roundings count once, not sqrt(n) times. For fp32 this is c * eps * (1 + sqrt(n)).

The floor stays far below a real bug: a wrong index or a dropped term is O(1); an fp32 value rounded
to bf16 is ~2e-3 against an fp32 floor of ~3e-6 (n = 128).
"""
from __future__ import annotations

import math

import torch

# Ulps in the floor. Measured here: fp32 DS attention computed in another valid order (scaled q,
# online softmax in blocks) reaches 0.34 eps * sqrt(n) (tests/test_kernel_tolerances.py); the
# failure seen on another Xeon was 0.22 eps * sqrt(n). c = 2 leaves ~6x room.
FLOOR_ULPS = 2.0


def eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def abs_floor(dtype: torch.dtype, n: int, c: float = FLOOR_ULPS) -> float:
    """c * (eps(dtype) + eps(acc) * sqrt(n)) for a reduction over n terms (relative-error units)."""
    return c * (eps(dtype) + eps(acc_dtype(dtype)) * math.sqrt(max(int(n), 1)))


def ratio_bound(torch_err: float, dtype: torch.dtype, n: int, k: float = 2.0, c: float = FLOOR_ULPS) -> float:
    """max(k * torch_err, abs_floor(dtype, n, c)): the bound for a kernel's error."""
    return max(k * float(torch_err), abs_floor(dtype, n, c))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in fp64 (0 when both are 0)."""
    ref = ref.double()
    den = ref.norm().item()
    num = (x.double() - ref).norm().item()
    return num / den if den else num


def sqnr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio of y against ref, in dB (inf when equal)."""
    ref = ref.double()
    noise = (y.double() - ref).pow(2).sum().item()
    return float("inf") if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def assert_within(err: float, torch_err: float, dtype: torch.dtype, n: int, k: float = 2.0, what: str = "") -> None:
    bound = ratio_bound(torch_err, dtype, n, k)
    assert err <= bound, (f"{what}: error {err:.3e} > bound {bound:.3e} "
                          f"(= max({k} x torch {torch_err:.3e}, floor {abs_floor(dtype, n):.3e}))")

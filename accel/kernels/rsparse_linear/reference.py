"""The spec: a plain-torch R-Sparse linear.

x: [..., in]; weight W: [out, in]; scale: [in] (‖W[:, i]‖₂ for R-Sparse, ones for TEAL);
threshold: scalar; down: [r, in] = Σ_r V_rᵀ; up: [out, r] = U_r (r may be 0: pure sparse).

    m = |x| > threshold / scale                      (per token, per channel; = |x|·scale > threshold
                                                      for scale > 0, and a zero column is never active)
    y = W (m ⊙ x) + up · (down · ((1 − m) ⊙ x)) + bias
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_mask(x: torch.Tensor, scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean [..., in]: the channels that take the sparse (exact) path."""
    return x.float().abs() > channel_thresholds(scale, threshold)


def channel_thresholds(scale: torch.Tensor, threshold: float) -> torch.Tensor:
    """[in] fp32 per-channel cut-offs threshold / scale. fp32 so every path (reference, CPU,
    Triton) draws the same boundary in fp16/bf16; precomputed once per linear at run time."""
    return threshold / scale.float()


def rsparse_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, threshold: float,
                       down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    m = channel_mask(x, scale, threshold)
    xs = x * m
    y = F.linear(xs, weight, bias)
    if down is not None and down.numel() > 0:
        y = y + F.linear(F.linear(x - xs, down), up)
    return y

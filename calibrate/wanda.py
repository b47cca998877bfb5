"""Wanda and magnitude pruning masks (pure math, no model walk).

Wanda (Sun et al., ICLR 2024) scores each weight of a linear `W: [out, in]` by

    S_ij = |W_ij| * ||X_:,j||_2          (X: [tokens, in], the layer's calibration inputs)

and prunes the lowest scores *within each output row*, so every row ends with the same sparsity.
N:M patterns prune the N lowest scores of every block of M consecutive inputs of a row (the
reduction dimension, as NVIDIA's 2:4 sparse tensor cores need). The magnitude baseline compares
|W| over the whole layer, as the paper's baseline does.

All masks here are boolean `keep` masks shaped like W (True = weight kept).
"""
from __future__ import annotations

import math

import torch

from accel.errors import AccelError


class PatternError(ValueError, AccelError):
    """A sparsity pattern or ratio is invalid."""


def check_sparsity(sparsity: float) -> None:
    if not isinstance(sparsity, (int, float)) or math.isnan(sparsity) or not (0.0 <= sparsity < 1.0):
        raise PatternError(f"sparsity must be in [0, 1), got {sparsity!r}")


def wanda_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """weight: [out, in]; sq_norm: [in] = sum over tokens of x_j^2. Returns S: [out, in] (fp32)."""
    if sq_norm.shape != (weight.size(1),):
        raise ValueError(f"sq_norm must have shape ({weight.size(1)},), got {tuple(sq_norm.shape)}")
    return weight.detach().float().abs() * sq_norm.float().clamp_min(0).sqrt().unsqueeze(0)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, prune floor(sparsity * in) lowest scores (stable: ties prune the lower index)."""
    check_sparsity(sparsity)
    out, n_in = scores.shape
    k = int(sparsity * n_in)
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k:
        # kthvalue is O(in) per row, a sort O(in log in); a tie at the threshold (rare with real
        # weights) would prune more than k, so those rows fall back to the stable sort.
        thr = torch.kthvalue(scores, k, dim=1, keepdim=True).values
        keep = scores > thr
        bad = (~keep).sum(1) != k
        if bad.any():
            rows = bad.nonzero().squeeze(1)
            idx = torch.sort(scores[rows], dim=1, stable=True).indices[:, :k]
            sub = torch.ones(len(rows), n_in, dtype=torch.bool, device=scores.device)
            sub.scatter_(1, idx, False)
            keep[rows] = sub
    return keep


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Per row and per block of M consecutive inputs, prune the N lowest scores."""
    out, n_in = scores.shape
    if n_in % m:
        raise PatternError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {n_in}")
    blocks = scores.reshape(out, n_in // m, m)
    idx = torch.sort(blocks, dim=2, stable=True).indices[..., :n]
    keep = torch.ones_like(blocks, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(out, n_in)


def variant_mask(scores: torch.Tensor, sparsity: float, tol: float = 1e-3) -> torch.Tensor:
    """Wanda's `use_variant`: per row, prune the lowest scores whose cumulative sum is <= alpha * the
    row total; alpha is found by bisection so that the *layer* sparsity is within `tol` of target.
    Rows end with different sparsities."""
    check_sparsity(sparsity)
    if sparsity == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    srt = torch.sort(scores, dim=1, stable=True)
    cums = srt.values.cumsum(dim=1)
    total = scores.sum(dim=1, keepdim=True)

    def mask_for(alpha: float) -> torch.Tensor:
        # Sorted positions whose cumsum fits under alpha * total are pruned.
        pruned_sorted = cums <= alpha * total
        keep = torch.ones_like(scores, dtype=torch.bool)
        keep.scatter_(1, srt.indices, ~pruned_sorted)
        return keep

    lo, hi, alpha = 0.0, 0.8, 0.4
    keep = mask_for(alpha)
    for _ in range(60):
        cur = 1.0 - keep.float().mean().item()
        if abs(cur - sparsity) <= tol or hi - lo < tol:
            break
        if cur > sparsity:
            hi = alpha
        else:
            lo = alpha
        alpha = (lo + hi) / 2
        keep = mask_for(alpha)
    return keep


def magnitude_mask(weight: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> torch.Tensor:
    """The paper's baseline: prune floor(sparsity * numel) smallest |W| over the whole layer, or the
    N smallest |W| of every M-block of a row for N:M."""
    scores = weight.detach().float().abs()
    if nm is not None:
        return nm_mask(scores, *nm)
    check_sparsity(sparsity)
    k = int(sparsity * scores.numel())
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k:
        idx = torch.sort(scores.flatten(), stable=True).indices[:k]
        keep[idx] = False
    return keep.view_as(scores)


def wanda_mask(weight: torch.Tensor, sq_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None, use_variant: bool = False) -> torch.Tensor:
    """The Wanda keep-mask of one linear. weight: [out, in]; sq_norm: [in]."""
    scores = wanda_scores(weight, sq_norm)
    if nm is not None:
        return nm_mask(scores, *nm)
    if use_variant:
        return variant_mask(scores, sparsity)
    return row_mask(scores, sparsity)

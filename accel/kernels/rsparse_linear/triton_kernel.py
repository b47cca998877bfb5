"""Triton R-Sparse linear for decode (batch 1–8 tokens).

Two launches, each split over K (the input channels) so that a batch-1 GEMV still fills the GPU
(one program per output block alone gave 64 programs for 4096 outputs: 9x slower than dense on
an H200); every split writes fp32 partial sums that are added on the host (deterministic):
  1. `_lowrank_down`: z[b, :] = down · ((1 − m_b) ⊙ x_b)            z: [B, r] fp32
  2. `_sparse_gemv_up`: y[b, n] = Σ_{i: m_b[i]} Wᵀ[i, n] x_b[i] + Σ_j up[n, j] z[b, j] + bias[n]
     Wᵀ is [in, out] row-major, so an inactive channel is a whole row whose load is masked off:
     the kernel reads only the weight rows of active channels (one row = BLOCK_N contiguous values).
     The low-rank and bias terms are added by the first K split only.
The mask m_b = |x_b| > threshold / scale is computed in-kernel, in fp32. Every load is upcast to
fp32 (bf16 is wrong under the interpreter otherwise); offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel.kernels.dispatch import device_guard


@triton.jit
def _lowrank_down(x_ptr, scale_ptr, down_ptr, z_ptr, thr, IN, R, K_PER,
                  stride_xb, stride_dr, stride_zs, stride_zb,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = offs_r < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    k_lo = pid_k * K_PER
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER, IN), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k < IN
        x = tl.load(x_ptr + b * stride_xb + offs_k, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        xl = tl.where(tl.abs(x) > thr / sc, 0.0, x)
        d = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(d * xl[None, :], axis=1)
    tl.store(z_ptr + pid_k * stride_zs + b * stride_zb + offs_r, acc, mask=rmask)


@triton.jit
def _sparse_gemv_up(x_ptr, scale_ptr, wt_ptr, up_ptr, z_ptr, bias_ptr, y_ptr, thr, IN, OUT, R, K_PER,
                    stride_xb, stride_wt, stride_up, stride_zb, stride_ys, stride_yb,
                    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = offs_n < OUT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    k_lo = pid_k * K_PER
    for k0 in range(k_lo, tl.minimum(k_lo + K_PER, IN), BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k < IN
        x = tl.load(x_ptr + b * stride_xb + offs_k, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        active = (tl.abs(x) > thr / sc) & kmask
        # Rows of inactive channels are never loaded: this is where the bandwidth is saved.
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :],
                    mask=active[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[:, None], axis=0)
    if HAS_LR and pid_k == 0:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = offs_r < R
            z = tl.load(z_ptr + b * stride_zb + offs_r, mask=rmask, other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_r[None, :],
                        mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(u * z[None, :], axis=1)
    if HAS_BIAS and pid_k == 0:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + pid_k * stride_ys + b * stride_yb + offs_n, acc, mask=nmask)


def _k_splits(n_programs: int, n_in: int, block_k: int) -> int:
    """K splits so that ~512 programs run (4 per SM on a 132-SM GPU); 1 under the interpreter."""
    if getattr(triton.knobs.runtime, "interpret", False):
        return 1
    return max(1, min(triton.cdiv(n_in, block_k), triton.cdiv(512, max(1, n_programs))))


def rsparse_linear_triton(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, threshold: float,
                          down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, *, block_n: int = 64, block_k: int = 64,
                          block_r: int = 32, k_splits: int | None = None) -> torch.Tensor:
    """x: [..., in] (decode: ≤ 8 tokens is the intended use); weight_t: [in, out] contiguous.

    k_splits: programs per output block along the input channels (default: enough to fill a GPU)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_out = weight_t.shape[1]
    x2 = x.reshape(-1, n_in).contiguous()
    B = x2.size(0)
    weight_t = weight_t.contiguous()
    scale = scale.contiguous()
    R = down.shape[0] if down is not None and down.numel() > 0 else 0
    thr = float(threshold)
    n_blocks = triton.cdiv(n_out, block_n)
    ks = k_splits or _k_splits(n_blocks * B, n_in, block_k)
    k_per = triton.cdiv(triton.cdiv(n_in, ks), block_k) * block_k
    ks = triton.cdiv(n_in, k_per)
    y_part = torch.empty(ks, B, n_out, device=x.device, dtype=torch.float32)
    if R > 0:
        down, up = down.contiguous(), up.contiguous()
        z_part = torch.empty(ks, B, R, device=x.device, dtype=torch.float32)
        with device_guard(x2):
            _lowrank_down[(triton.cdiv(R, block_r), B, ks)](x2, scale, down, z_part, thr, n_in, R, k_per,
                                                            x2.stride(0), down.stride(0), z_part.stride(0),
                                                            z_part.stride(1), BLOCK_R=block_r, BLOCK_K=block_k)
        z = z_part.sum(0) if ks > 1 else z_part[0]
    else:
        z = up = y_part  # placeholders, never read (HAS_LR=False)
    b_ptr = bias.contiguous() if bias is not None else y_part
    with device_guard(x2):
        _sparse_gemv_up[(n_blocks, B, ks)](
            x2, scale, weight_t, up, z, b_ptr, y_part, thr, n_in, n_out, R, k_per,
            x2.stride(0), weight_t.stride(0), up.stride(0) if R > 0 else 0, z.stride(0) if R > 0 else 0,
            y_part.stride(0), y_part.stride(1),
            HAS_LR=R > 0, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r)
    y = y_part.sum(0) if ks > 1 else y_part[0]
    return y.to(x.dtype).view(*lead, n_out)

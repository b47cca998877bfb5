"""Triton R-Sparse linear for decode (batch 1–8 tokens).

Two launches:
  1. `_lowrank_down`: z[b, :] = down · ((1 − m_b) ⊙ x_b)            z: [B, r] fp32
  2. `_sparse_gemv_up`: y[b, n] = Σ_{i: m_b[i]} Wᵀ[i, n] x_b[i] + Σ_j up[n, j] z[b, j] + bias[n]
     Wᵀ is [in, out] row-major, so an inactive channel is a whole row whose load is masked off:
     the kernel reads only the weight rows of active channels (one row = BLOCK_N contiguous values).
The mask m_b = |x_b| > threshold / scale is computed in-kernel, in fp32. Every load is upcast to
fp32 (bf16 is wrong under the interpreter otherwise); offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lowrank_down(x_ptr, scale_ptr, down_ptr, z_ptr, thr, IN, R,
                  stride_xb, stride_dr, stride_zb,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    rmask = offs_r < R
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k < IN
        x = tl.load(x_ptr + b * stride_xb + offs_k, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        xl = tl.where(tl.abs(x) > thr / sc, 0.0, x)
        d = tl.load(down_ptr + offs_r[:, None] * stride_dr + offs_k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(d * xl[None, :], axis=1)
    tl.store(z_ptr + b * stride_zb + offs_r, acc, mask=rmask)


@triton.jit
def _sparse_gemv_up(x_ptr, scale_ptr, wt_ptr, up_ptr, z_ptr, bias_ptr, y_ptr, thr, IN, OUT, R,
                    stride_xb, stride_wt, stride_up, stride_zb, stride_yb,
                    HAS_LR: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    nmask = offs_n < OUT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, IN, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        kmask = offs_k < IN
        x = tl.load(x_ptr + b * stride_xb + offs_k, mask=kmask, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs_k, mask=kmask, other=0.0).to(tl.float32)
        active = (tl.abs(x) > thr / sc) & kmask
        # Rows of inactive channels are never loaded: this is where the bandwidth is saved.
        w = tl.load(wt_ptr + offs_k[:, None] * stride_wt + offs_n[None, :],
                    mask=active[:, None] & nmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * x[:, None], axis=0)
    if HAS_LR:
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            rmask = offs_r < R
            z = tl.load(z_ptr + b * stride_zb + offs_r, mask=rmask, other=0.0)
            u = tl.load(up_ptr + offs_n[:, None] * stride_up + offs_r[None, :],
                        mask=nmask[:, None] & rmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(u * z[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * stride_yb + offs_n, acc.to(y_ptr.dtype.element_ty), mask=nmask)


def rsparse_linear_triton(x: torch.Tensor, weight_t: torch.Tensor, scale: torch.Tensor, threshold: float,
                          down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                          bias: torch.Tensor | None = None, *, block_n: int = 64, block_k: int = 64,
                          block_r: int = 32) -> torch.Tensor:
    """x: [..., in] (decode: ≤ 8 tokens is the intended use); weight_t: [in, out] contiguous."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    n_out = weight_t.shape[1]
    x2 = x.reshape(-1, n_in).contiguous()
    B = x2.size(0)
    weight_t = weight_t.contiguous()
    scale = scale.contiguous()
    y = torch.empty(B, n_out, device=x.device, dtype=x.dtype)
    R = down.shape[0] if down is not None and down.numel() > 0 else 0
    thr = float(threshold)
    if R > 0:
        down, up = down.contiguous(), up.contiguous()
        z = torch.empty(B, R, device=x.device, dtype=torch.float32)
        _lowrank_down[(triton.cdiv(R, block_r), B)](x2, scale, down, z, thr, n_in, R,
                                                    x2.stride(0), down.stride(0), z.stride(0),
                                                    BLOCK_R=block_r, BLOCK_K=block_k)
    else:
        z = up = y  # placeholders, never read (HAS_LR=False)
    b_ptr = bias.contiguous() if bias is not None else y
    _sparse_gemv_up[(triton.cdiv(n_out, block_n), B)](
        x2, scale, weight_t, up, z, b_ptr, y, thr, n_in, n_out, R,
        x2.stride(0), weight_t.stride(0), up.stride(0) if R > 0 else 0, z.stride(0) if R > 0 else 0, y.stride(0),
        HAS_LR=R > 0, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=block_r)
    return y.view(*lead, n_out)

"""Triton GEMV/GEMM over the packed GQSA format (CUDA; tested on CPU under TRITON_INTERPRET=1).

Task-centric work split: every row holds the same number of kept groups (n_keep), and a program
("task") owns BLOCK_N rows x GROUPS_PER_TASK kept groups, so every task carries the same number
of non-zero groups whatever the sparsity, instead of one program per row scanning all K. Tasks
of one row block write partial sums to `part[split, M, N]` (fp32), summed on the host
(deterministic, no atomics).

- GEMV (decode, M <= 8, any layout): codes, scales, zeros and the x entries of each row's own
  kept groups are gathered; products are reduced with `tl.sum` (fp32).
- GEMM (prefill, tile-structured layout, BLOCK_N | tile_rows): the BLOCK_N rows share their
  kept groups, so one x tile [BLOCK_M, G] is gathered per group and `tl.dot` runs on the
  dequantized fp32 weight tile.
Every load is upcast to fp32 right away (bf16 is wrong under the interpreter), offsets are int64.
Shapes: x [M, K]; qweight uint8 [N, nbytes]; cols int16 [N, n_keep]; scales/zeros fp16 [N, n_keep].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from accel.kernels import ops  # the generic use_ops(); this folder's op is gqsa_linear/ops.py
from accel.kernels.dispatch import device_guard

from .format import GQSAWeight


@triton.jit
def _load_codes(q_ptr, row64, stride_q, elem, mask, BITS: tl.constexpr):
    # elem: index of the element in the row's packed stream (int64).
    if BITS == 8:
        b = tl.load(q_ptr + row64 * stride_q + elem, mask=mask, other=0).to(tl.int32)
        return b.to(tl.float32)
    b = tl.load(q_ptr + row64 * stride_q + elem // 2, mask=mask, other=0).to(tl.int32)
    return ((b >> ((elem % 2) * 4).to(tl.int32)) & 0xF).to(tl.float32)


@triton.jit
def _gqsa_gemv_kernel(x_ptr, q_ptr, cols_ptr, s_ptr, z_ptr, part_ptr,
                      M, N, n_keep, stride_xm, stride_q, stride_c, stride_pm, stride_ps,
                      G: tl.constexpr, BITS: tl.constexpr, GROUPS_PER_TASK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_G)
    n_ok = rn < N
    m_ok = rm < M
    e_ok = re < G
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j0 = pid_s * GROUPS_PER_TASK
    for jj in range(0, GROUPS_PER_TASK):
        j = j0 + jj
        ok = n_ok & ((tl.zeros_like(rn) + j) < n_keep)
        col = tl.load(cols_ptr + rn64 * stride_c + j, mask=ok, other=0).to(tl.int64)
        s = tl.load(s_ptr + rn64 * stride_c + j, mask=ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + rn64 * stride_c + j, mask=ok, other=0.0).to(tl.float32)
        wmask = ok[:, None] & e_ok[None, :]
        elem = j.to(tl.int64) * G + re.to(tl.int64)
        q = _load_codes(q_ptr, rn64[:, None], stride_q, elem[None, :], wmask, BITS)
        w = (q - z[:, None]) * s[:, None]
        w = tl.where(wmask, w, 0.0)
        # x entries of each row's own group: [BLOCK_M, BLOCK_N, BLOCK_G]
        kidx = col[:, None] * G + re[None, :].to(tl.int64)
        xmask = m_ok[:, None, None] & wmask[None, :, :]
        xv = tl.load(x_ptr + rm64[:, None, None] * stride_xm + kidx[None, :, :], mask=xmask, other=0.0)
        acc += tl.sum(xv.to(tl.float32) * w[None, :, :], axis=2)
    out = part_ptr + pid_s.to(tl.int64) * stride_ps + rm64[:, None] * stride_pm + rn64[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _gqsa_gemm_kernel(x_ptr, q_ptr, cols_ptr, s_ptr, z_ptr, part_ptr,
                      M, N, n_keep, stride_xm, stride_q, stride_c, stride_pm, stride_ps,
                      G: tl.constexpr, BITS: tl.constexpr, GROUPS_PER_TASK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    # NVIDIA needs K >= 8 for an fp32 dot (K >= 16 for 16-bit); the interpreter would not check.
    tl.static_assert(BLOCK_G >= 16)
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    re = tl.arange(0, BLOCK_G)
    n_ok = rn < N
    m_ok = rm < M
    e_ok = re < G
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    row0 = (pid_n * BLOCK_N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    j0 = pid_s * GROUPS_PER_TASK
    for jj in range(0, GROUPS_PER_TASK):
        j = j0 + jj
        if j < n_keep:
            # The block's rows share kept groups: one column index for the whole tile.
            col = tl.load(cols_ptr + row0 * stride_c + j).to(tl.int64)
            s = tl.load(s_ptr + rn64 * stride_c + j, mask=n_ok, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + rn64 * stride_c + j, mask=n_ok, other=0.0).to(tl.float32)
            wmask = n_ok[:, None] & e_ok[None, :]
            elem = j.to(tl.int64) * G + re.to(tl.int64)
            q = _load_codes(q_ptr, rn64[:, None], stride_q, elem[None, :], wmask, BITS)
            w = tl.where(wmask, (q - z[:, None]) * s[:, None], 0.0)
            kidx = col * G + re.to(tl.int64)
            xv = tl.load(x_ptr + rm64[:, None] * stride_xm + kidx[None, :],
                         mask=m_ok[:, None] & e_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.dot(xv, tl.trans(w))
    out = part_ptr + pid_s.to(tl.int64) * stride_ps + rm64[:, None] * stride_pm + rn64[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _tile_shared(w: GQSAWeight, block_n: int) -> bool:
    if w.tile_rows < block_n or w.tile_rows % block_n:
        return False
    c = w.cols
    n = (c.size(0) // block_n) * block_n
    if n != c.size(0):
        return False
    blocks = c.view(-1, block_n, c.size(1))
    return bool((blocks == blocks[:, :1]).all())


def gqsa_linear_triton(x: torch.Tensor, w: GQSAWeight, bias: torch.Tensor | None = None, *,
                       block_n: int = 32, splits: int | None = None, force: str | None = None) -> torch.Tensor:
    """x: [..., in] -> [..., out] in x's dtype. force: "gemv" or "gemm" (tests).
    `accel::gqsa_linear` (path "triton") under torch.compile (registered by this folder's __init__.py,
    which Python runs before this module; its body is `triton_impl`)."""
    if ops.use_ops():
        return torch.ops.accel.gqsa_linear(x, w.qweight, w.colmask, w.cols, w.scales, w.zeros, bias, w.in_features,
                                           w.group_size, w.bits, w.tile_rows, "triton", block_n, splits or 0,
                                           force or "")
    return _gqsa_linear_triton(x, w, bias, block_n=block_n, splits=splits, force=force)


def triton_impl(x, qweight, colmask, cols, scales, zeros, bias, in_features: int, group_size: int, bits: int,
                tile_rows: int, block_n: int, splits: int, force: str) -> torch.Tensor:
    """The body of `accel::gqsa_linear` on the Triton path (tensors instead of a GQSAWeight)."""
    w = GQSAWeight(qweight, colmask, scales, zeros, in_features, group_size, bits, tile_rows)
    if cols is not None:
        w.__dict__["cols"] = cols  # the decoded column indices, cached by the caller's GQSAWeight
    return _gqsa_linear_triton(x, w, bias, block_n=block_n, splits=splits or None, force=force or None)


def _gqsa_linear_triton(x: torch.Tensor, w: GQSAWeight, bias: torch.Tensor | None = None, *,
                        block_n: int = 32, splits: int | None = None, force: str | None = None) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, N, k = x2.size(0), w.out_features, w.n_keep
    g = w.group_size
    block_g = max(16, triton.next_power_of_2(g))
    kind = force or ("gemm" if M > 8 and _tile_shared(w, block_n) else "gemv")
    if kind == "gemm" and not _tile_shared(w, block_n):
        raise ValueError("the GQSA GEMM kernel needs a tile-structured layout with block_n | tile_rows")
    block_m = triton.next_power_of_2(max(1, min(M, 8))) if kind == "gemv" else 16
    n_blocks = triton.cdiv(N, block_n)
    if splits is None:
        # Enough tasks to fill a GPU (~4 per SM on 132 SMs), never fewer groups than one per task.
        splits = max(1, min(k, triton.cdiv(512, n_blocks)))
    gpt = triton.cdiv(k, splits)
    splits = triton.cdiv(k, gpt)
    dev = x2.device
    q, cols = w.qweight.to(dev), w.cols.to(dev)
    s, z = w.scales.to(dev), w.zeros.to(dev)
    part = torch.empty(splits, M, N, device=dev, dtype=torch.float32)
    grid = (n_blocks, splits, triton.cdiv(M, block_m))
    kern = _gqsa_gemv_kernel if kind == "gemv" else _gqsa_gemm_kernel
    with device_guard(x2):
        kern[grid](x2, q, cols, s, z, part, M, N, k, x2.stride(0), q.stride(0), cols.stride(0),
                   part.stride(1), part.stride(0), G=g, BITS=w.bits, GROUPS_PER_TASK=gpt,
                   BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_G=block_g)
    y = part.sum(0)
    if bias is not None:
        y = y + bias.to(y)
    return y.to(x.dtype).reshape(*shape[:-1], N)

"""Triton (CUDA) Double Sparsity decode attention. Tested on CPU under TRITON_INTERPRET=1.

Design (three launches and one torch op; shapes in reference.py):
  1. `_label_score_kernel`, grid (B*KVH, cdiv(T, BLOCK_T)): for each heavy channel of one KV head,
     loads it from the G query heads and from a tile of BLOCK_T labels and accumulates the fp32
     scores [G, BLOCK_T] (one channel at a time: no 3-D temporaries), reduces over the group
     (max/sum) and writes the selection key [B, KVH, T] fp32 with padded tokens at -inf, recent
     tokens at FLT_MAX and sink tokens at +inf (so they always win the top-k).
  2. `torch.topk(sorted=False)` over that key. An in-kernel top-k over up to ~128K candidates would
     need a multi-pass radix select; torch's is already a tuned single op, so this is the honest
     split: everything before and after it is a fused kernel.
  3. `_attend_split_kernel`, grid (B*KVH, n_splits): each program takes SPLIT selected tokens of
     one KV head, gathers their K/V rows (int64 offsets, any strides) BLOCK_N at a time and runs an
     online softmax for the whole query group at once (tl.dot, group padded to 16 rows), writing an
     un-normalised partial (acc, m, l). Splitting over the selected tokens keeps large budgets from
     spilling and gives enough programs at batch 1 (flash-decoding).
  4. `_split_reduce_kernel`, grid (B*H): log-sum-exp merge of the partials, written in q.dtype.

Interpreter-safe subset: every load is upcast to fp32 right away (bf16 arithmetic is silently wrong
under the interpreter), dots are fp32 with input_precision="ieee" (no tf32 surprise on GPU), block
sizes are powers of two with masks for ragged D, r, T and budgets, and tl.static_assert enforces
the NVIDIA minimum dot sizes the interpreter does not check.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from accel.kernels.dispatch import device_guard

from .reference import forced_budget, valid_rank

# A tl.constexpr: compiled Triton (unlike the interpreter) refuses plain Python globals in @jit code.
FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _label_score_kernel(q_ptr, lab_ptr, ch_ptr, rank_ptr, nvalid_ptr, out_ptr,
                        T, KVH, sink_e, recent_e,
                        sqb, sqh, sqd, slb, slh, slt, slc, sch, scc, srb, srt, sob, soh, sot,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, R: tl.constexpr,
                        BLOCK_T: tl.constexpr, REDUCE_MAX: tl.constexpr, HAS_MASK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // KVH
    h = pid % KVH
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    qh = (h * G + g).to(tl.int64)
    t = tl.program_id(1).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    # One heavy channel at a time: keeps only a [BLOCK_G, BLOCK_T] accumulator live (a 3-D
    # [G, T, r] product spills registers on GPU at BLOCK_T = 256), and r may be below the tl.dot
    # minimum anyway. A label row is r contiguous values, so the column loads share cache lines.
    s = tl.zeros([BLOCK_G, BLOCK_T], tl.float32)
    for c in tl.static_range(R):
        ch = tl.load(ch_ptr + h * sch + c * scc).to(tl.int64)
        qc = tl.load(q_ptr + b * sqb + qh * sqh + ch * sqd, mask=gm, other=0.0).to(tl.float32)   # [BLOCK_G]
        lc = tl.load(lab_ptr + b * slb + h * slh + t * slt + c * slc, mask=tm, other=0.0).to(tl.float32)
        s += qc[:, None] * lc[None, :]
    if REDUCE_MAX:
        s = tl.max(tl.where(gm[:, None], s, float("-inf")), axis=0)
    else:
        s = tl.sum(s, axis=0)
    if HAS_MASK:
        rk = tl.load(rank_ptr + b * srb + t * srt, mask=tm, other=-1)
        nv = tl.load(nvalid_ptr + b)
    else:
        rk = t
        nv = T
    valid = tm & (rk >= 0)
    s = tl.where(valid, s, float("-inf"))
    s = tl.where(valid & (rk >= nv - recent_e), FLT_MAX, s)
    s = tl.where(valid & (rk < sink_e), float("inf"), s)
    tl.store(out_ptr + b * sob + h * soh + t * sot, s, mask=tm)


@triton.jit
def _attend_split_kernel(q_ptr, k_ptr, v_ptr, idx_ptr, km_ptr, acc_ptr, m_ptr, l_ptr,
                         n_sel, KVH, n_splits, scaling,
                         sqb, sqh, sqd, skb, skh, skt, skd, svb, svh, svt, svd, sib, sih, sin, smb, smt,
                         G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                         BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, HAS_MASK: tl.constexpr,
                         USE_DOT: tl.constexpr):
    if USE_DOT:
        tl.static_assert(BLOCK_G >= 16)
        tl.static_assert(BLOCK_N >= 16)
        tl.static_assert(BLOCK_D >= 16)
    pid = tl.program_id(0).to(tl.int64)
    sp = tl.program_id(1).to(tl.int64)
    b = pid // KVH
    h = pid % KVH
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    qh = (h * G + g).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + b * sqb + qh[:, None] * sqh + d[None, :] * sqd,
                mask=gm[:, None] & dm[None, :], other=0.0).to(tl.float32)           # [BLOCK_G, BLOCK_D]
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # Runtime bound: the last split is ragged, and no block past n_sel is visited.
    n_here = tl.minimum(n_sel - sp * SPLIT, SPLIT)
    for n0 in range(0, n_here, BLOCK_N):
        offs = sp * SPLIT + n0 + tl.arange(0, BLOCK_N)
        valid = offs < n_sel
        tok = tl.load(idx_ptr + b * sib + h * sih + offs * sin, mask=valid, other=0).to(tl.int64)
        if HAS_MASK:
            ok = tl.load(km_ptr + b * smb + tok * smt, mask=valid, other=0)
            valid = valid & (ok != 0)
        kv_mask = valid[:, None] & dm[None, :]
        kt = tl.load(k_ptr + b * skb + h * skh + tok[:, None] * skt + d[None, :] * skd,
                     mask=kv_mask, other=0.0).to(tl.float32)                         # [BLOCK_N, BLOCK_D]
        if USE_DOT:
            sc = tl.dot(q, tl.trans(kt), input_precision="ieee")
        else:
            sc = tl.sum(q[:, None, :] * kt[None, :, :], axis=2)                      # [BLOCK_G, BLOCK_N]
        sc = tl.where(valid[None, :], sc * scaling, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, axis=1))
        # A block (or split) with no valid token keeps m = -inf; exp(-inf - 0) = 0 keeps it inert.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(sc - m_safe[:, None])
        vt = tl.load(v_ptr + b * svb + h * svh + tok[:, None] * svt + d[None, :] * svd,
                     mask=kv_mask, other=0.0).to(tl.float32)
        if USE_DOT:
            pv = tl.dot(p, vt, input_precision="ieee")
        else:
            pv = tl.sum(p[:, :, None] * vt[None, :, :], axis=1)
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    H = KVH * G
    row = (b * H + qh) * n_splits + sp                                               # [BLOCK_G]
    tl.store(acc_ptr + row[:, None] * BLOCK_D + d[None, :], acc, mask=gm[:, None])
    tl.store(m_ptr + row, m_i, mask=gm)
    tl.store(l_ptr + row, l_i, mask=gm)


@triton.jit
def _split_reduce_kernel(acc_ptr, m_ptr, l_ptr, out_ptr, n_splits, H, sob, soh, sod,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    hq = pid % H
    s = tl.arange(0, BLOCK_S)
    sm = s < n_splits
    d = tl.arange(0, BLOCK_D)
    row = pid * n_splits + s
    m = tl.load(m_ptr + row, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + row, mask=sm, other=0.0)
    acc = tl.load(acc_ptr + row[:, None] * BLOCK_D + d[None, :], mask=sm[:, None], other=0.0)
    m_max = tl.max(m, axis=0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(sm & (m > float("-inf")), tl.exp(m - m_safe), 0.0)
    den = tl.sum(l * w, axis=0)
    num = tl.sum(acc * w[:, None], axis=0)
    # No valid token at all (fully padded row): output 0, as the reference defines.
    o = tl.where(den > 0, num / tl.where(den > 0, den, 1.0), 0.0)
    tl.store(out_ptr + b * sob + hq * soh + d * sod, o.to(out_ptr.dtype.element_ty), mask=d < D)


def _interpreting() -> bool:
    """Under TRITON_INTERPRET=1 bigger blocks cut the Python-level cost; on GPU they would spill."""
    return bool(getattr(triton.knobs.runtime, "interpret", False)) or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def ds_select_triton(q, labels, channels, budget: int, sink: int = 4, recent: int = 64,
                     group_reduce: str = "max", key_mask=None, block_t: int | None = None) -> torch.Tensor:
    """Selected indices [B, KVH, min(budget, T)] int64 (unordered): label-score kernel + torch.topk."""
    B, H, _, D = q.shape
    _, KVH, T, r = labels.shape
    G = H // KVH
    channels = channels.to(device=q.device, dtype=torch.long)
    sink_e, recent_e = forced_budget(budget, sink, recent)
    key = torch.empty(B, KVH, T, dtype=torch.float32, device=q.device)
    if key_mask is not None:
        rank, n_valid = valid_rank(key_mask, B, T, q.device)
        rank = rank.to(torch.int32).contiguous()
        n_valid = n_valid.to(torch.int32).contiguous()
        srb, srt = rank.stride()
    else:
        rank = n_valid = key
        srb = srt = 0
    block_t = block_t or min(1024 if _interpreting() else 256, _pow2(T))
    grid = (B * KVH, triton.cdiv(T, block_t))
    with device_guard(q):
        _label_score_kernel[grid](
            q, labels, channels, rank, n_valid, key, T, KVH, sink_e, recent_e,
            q.stride(0), q.stride(1), q.stride(3), *labels.stride(), *channels.stride(), srb, srt, *key.stride(),
            G=G, BLOCK_G=_pow2(G), R=r, BLOCK_T=block_t,
            REDUCE_MAX=group_reduce == "max", HAS_MASK=key_mask is not None)
    return torch.topk(key, min(budget, T), dim=-1, sorted=False).indices


def ds_attend_triton(q, k, v, idx, scaling: float | None = None, key_mask=None, block_n: int = 32,
                     split: int | None = None, use_dot: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention over selected tokens idx [B, KVH, n]: out [B, H, 1, D] in q.dtype.

    split: selected tokens per program (a multiple of block_n; default 256 or all of them if fewer);
    out: optional preallocated [B, H, 1, D] output."""
    B, H, _, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    n = idx.shape[-1]
    scaling = D ** -0.5 if scaling is None else float(scaling)
    block_n = max(16, _pow2(block_n)) if use_dot else _pow2(block_n)
    split = min(split or 256, triton.cdiv(n, block_n) * block_n)
    split = max(block_n, triton.cdiv(split, block_n) * block_n)
    n_splits = triton.cdiv(n, split)
    BLOCK_D = _pow2(D)
    BLOCK_G = max(16, _pow2(G)) if use_dot else _pow2(G)
    part_acc = torch.empty(B * H * n_splits, BLOCK_D, dtype=torch.float32, device=q.device)
    part_m = torch.empty(B * H * n_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    if key_mask is not None:
        km = key_mask.to(torch.int8)
        smb, smt = km.stride()
    else:
        km, smb, smt = idx, 0, 0
    with device_guard(q):
        _attend_split_kernel[(B * KVH, n_splits)](
            q, k, v, idx, km, part_acc, part_m, part_l, n, KVH, n_splits, scaling,
            q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(), *idx.stride(), smb, smt,
            G=G, BLOCK_G=BLOCK_G, D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n, SPLIT=split,
            HAS_MASK=key_mask is not None, USE_DOT=use_dot)
    if out is None:
        out = torch.empty(B, H, 1, D, dtype=q.dtype, device=q.device)
    with device_guard(q):
        _split_reduce_kernel[(B * H,)](
            part_acc, part_m, part_l, out, n_splits, H, out.stride(0), out.stride(1), out.stride(3),
            D=D, BLOCK_D=BLOCK_D, BLOCK_S=_pow2(n_splits))
    return out

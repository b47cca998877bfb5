"""Fast CPU path for the R-Sparse linear.

Decode (few tokens): a sparse-input GEMV that reads only the active columns of W. W is kept
transposed (`weight_t: [in, out]`), so column i of W is a contiguous row, and one op sums exactly
the active rows scaled by x_S (no gathered copy of W, which would cost more traffic than the
dense GEMV it replaces). Measured at 4096², 1 thread, 47.5% active, caches flushed between calls
(as in decode, where every layer's weights come from DRAM), ratio to the dense GEMV:
  - fp32, one token, when the optional C++ kernel builds (`cpp_ext.py`: four active rows per
    pass): 1.94–1.97x at 4096², 2.4–2.8x at SmolLM2's shapes. Otherwise:
  - fp32, large weights: `torch.sparse.mm` of x_S as a COO [tokens, in] matrix with Wᵀ,
    1.41–1.49x; `F.embedding_bag` 1.14–1.26x (int64 / int32 offsets). At SmolLM2's sizes
    (≤ 1536×576) the int32 embedding bag has the lower fixed cost (bench: 0.46/0.82/0.70x
    against 0.41/0.74/0.56x for q/o, gate/up, down), so it is used below `COO_MIN_NUMEL`;
  - bf16/fp16: `F.embedding_bag(mode="sum", per_sample_weights=x_S)` with int32 indices and
    `include_last_offset=True` (torch's fast embedding-bag kernel), 2.44x (int64: 2.30x).
The low-rank term is added with one `addmm_` into the same output.

Prefill / many tokens: every token has its own active set, so the union of columns is nearly all
of W; a masked dense matmul is the fastest exact way there. In bf16 with the native kernel it is
one GEMM: a native pass splits x into [x_S | x_rest], then [x_S | down·x_rest] @ [Wᵀ; U_rᵀ]
(cpp_ext.prefill_bf16); the torch masking it replaces took longer than the GEMM itself.

bf16 decode (<= GATHER_MAX_TOKENS tokens): the native `accel::rsparse_decode` (cpp_ext.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops  # the generic use_ops(); this folder's op is rsparse_linear/ops.py
from . import cpp_ext
from .reference import channel_thresholds

# Above this many tokens the per-token active sets cover most of W: masked dense wins.
GATHER_MAX_TOKENS = 8
# fp32 weights with at least this many elements use the COO sparse.mm path (see above).
COO_MIN_NUMEL = 1 << 22


def rsparse_linear_cpu(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, threshold: float,
                       down: torch.Tensor | None = None, up: torch.Tensor | None = None,
                       bias: torch.Tensor | None = None, *, weight_t: torch.Tensor | None = None,
                       thr_vec: torch.Tensor | None = None, up_t: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., in] -> [..., out]. weight_t: [in, out] contiguous (required for the gather path);
    for bf16 prefill (> GATHER_MAX_TOKENS tokens) the stacked [Wᵀ; U_rᵀ; zero rows]: [ld >= in + r, out]
    (one GEMM);
    thr_vec: [in] fp32 `channel_thresholds(scale, threshold)` when precomputed; up_t: [r, out]
    contiguous `up.T` (the bf16 decode kernel reads it; built per call when not given).
    bf16 decode (<= GATHER_MAX_TOKENS tokens, native kernel built): the C++ op `accel::rsparse_decode`,
    also under torch.compile. Otherwise `accel::rsparse_linear` (path "cpu") under torch.compile:
    the active set has a data-dependent size."""
    n_in = x.shape[-1]
    tokens = x.numel() // max(n_in, 1)
    if (0 < tokens <= GATHER_MAX_TOKENS and weight_t is not None and thr_vec is not None
            and x.dtype == torch.bfloat16 and weight_t.dtype == torch.bfloat16 and _bf16_native()):
        has_lr = down is not None and down.numel() > 0
        if has_lr and up_t is None:
            up_t = up.t().contiguous()
        y = cpp_ext.rsparse_decode(x.reshape(tokens, n_in), thr_vec, weight_t, down if has_lr else None,
                                   up_t if has_lr else None, bias)
        return y.view(*x.shape[:-1], y.shape[-1])
    if ops.use_ops():
        # Registered by this folder's __init__.py, which Python runs before this module (ops.py).
        return torch.ops.accel.rsparse_linear(x, weight, scale, float(threshold), down, up, bias, weight_t, thr_vec,
                                              "cpu")
    return rsparse_cpu_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec)


@torch.compiler.assume_constant_result
def _bf16_native() -> bool:
    # A constant for torch.compile: the build (and its lock) must not be traced.
    return cpp_ext.bf16_available()


def rsparse_cpu_impl(x, weight, scale, threshold, down, up, bias, weight_t, thr_vec) -> torch.Tensor:
    """The CPU body of `accel::rsparse_linear` (arguments as `rsparse_linear_cpu`)."""
    lead, n_in = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n_in)
    if thr_vec is None:
        thr_vec = channel_thresholds(scale, threshold)
    has_lr = down is not None and down.numel() > 0
    r = down.shape[0] if has_lr else 0
    if (x2.size(0) > GATHER_MAX_TOKENS and weight_t is not None and weight_t.shape[0] >= n_in + r
            and x2.dtype == torch.bfloat16 and weight_t.dtype == torch.bfloat16 and _bf16_native()):
        # bf16 prefill: weight_t is the stacked [Wᵀ; U_rᵀ; 0] ([ld >= in + r, out]); one native call.
        return cpp_ext.prefill_bf16(x2, thr_vec, weight_t, down if has_lr else None, bias).view(*lead, -1)
    if (x2.size(0) == 1 and weight_t is not None and x2.dtype == torch.float32
            and weight_t.dtype == torch.float32 and cpp_ext.available()):
        # Decode: one native call (each torch op costs microseconds at SmolLM2's sizes).
        return cpp_ext.rsparse_gemv_f32(x2[0], thr_vec, weight_t, down if has_lr else None,
                                        up if has_lr else None, bias).view(*lead, -1)
    m = (x2.abs() if x2.dtype == torch.float32 else x2.float().abs()) > thr_vec
    if weight_t is None or x2.size(0) > GATHER_MAX_TOKENS:
        xs = x2 * m
        y = F.linear(xs, weight, bias)
        if has_lr:
            y.addmm_(F.linear(x2 - xs, down), up.t())
        return y.view(*lead, -1)
    if x2.size(0) == 1:
        return _gemv1(x2[0], m[0], weight_t, down, up, bias, has_lr).view(*lead, -1)
    rows, cols = m.nonzero(as_tuple=True)
    y = _sum_active_rows(cols, x2[rows, cols], weight_t, rows=rows, counts=m.sum(1))
    if has_lr:
        y.addmm_(F.linear(x2.masked_fill(m, 0), down), up.t())
    if bias is not None:
        y += bias
    return y.view(*lead, -1)


def _gemv1(x: torch.Tensor, m: torch.Tensor, weight_t, down, up, bias, has_lr: bool) -> torch.Tensor:
    """One token (x, m: [in]): the decode case, with the fewest small ops (each costs microseconds
    that matter at SmolLM2 sizes)."""
    idx = m.nonzero().view(-1)
    y = _sum_active_rows(idx, x.index_select(0, idx), weight_t)
    if has_lr:
        y.view(-1).addmv_(up, torch.mv(down, x.masked_fill(m, 0)))
    if bias is not None:
        y += bias
    return y


def _sum_active_rows(cols: torch.Tensor, vals: torch.Tensor, weight_t: torch.Tensor,
                     rows: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> torch.Tensor:
    """y[t] = Σ_k vals[k] · Wᵀ[cols[k], :] over the entries k of token t -> [tokens, out].

    rows/counts: each entry's token and the entries per token, row-major as `nonzero()` gives them
    (so the COO matrix is coalesced by construction); None = one token. The op is chosen by dtype
    and size as the module docstring measures."""
    n_tokens = 1 if counts is None else counts.numel()
    if vals.dtype == torch.float32 and weight_t.numel() >= COO_MIN_NUMEL:
        rows = torch.zeros_like(cols) if rows is None else rows
        sp = torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (n_tokens, weight_t.size(0)),
                                     is_coalesced=True, check_invariants=False)
        return torch.sparse.mm(sp, weight_t)
    if counts is None:
        offsets = torch.tensor([0, cols.numel()], dtype=torch.int32)
    else:
        offsets = torch.zeros(n_tokens + 1, dtype=torch.int32)
        offsets[1:] = counts.cumsum(0)
    # One bag per token; empty bags give zeros.
    return F.embedding_bag(cols.int(), weight_t, offsets, mode="sum", per_sample_weights=vals,
                           include_last_offset=True)

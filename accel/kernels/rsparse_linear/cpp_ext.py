"""Optional C++ kernels for the R-Sparse CPU path, built on first use (one extension).

fp32 decode (`rsparse_gemv_f32`): torch's COO `sparse.mm` adds one active row of Wᵀ at a time,
a single memory stream, and reads the active half of a 4096² fp32 weight at ~13 GB/s while the
dense GEMV streams at ~19 GB/s (1 thread, this VM). Summing four active rows per pass keeps four
streams in flight and the output chunk in L1. Output columns are split over torch's threads.

bf16 decode (`rsparse_decode`, source in bf16_src.py; AVX512-BF16): one call per token does the
method's two parts. Mask: 16 channels per step, |x| > thr in fp32, active indices compress-stored,
x_rest = x with the active channels zeroed. Low-rank: t = down · x_rest (vdpbf16ps along `in`,
fp32). Sparse: the active rows of Wᵀ two at a time — unpacklo/hi interleave rows a and b, and one
vdpbf16ps multiplies both by the broadcast pair (x_a, x_b) — into up to 256 output columns held in
registers; then the rows of U_rᵀ times t and the bias in fp32, one rounding to bf16. Columns are
split over threads (`DECODE_GRAIN`). Measured against aten's bf16 F.linear (M = 1, 1 thread,
weights cache-hot, 47.5% active): 576x576 6.7 vs 48 us, 192x576 3.4 vs 28, 1536x576 19 vs 114,
576x1536 15 vs 111. Registered as the C++ op `accel::rsparse_decode` (TORCH_LIBRARY_FRAGMENT), so
a compiled graph calls it without Python; its fake implementation is registered here.

bf16 prefill (`prefill_bf16`): a native split pass writes [x_S | down·x_rest | 0] (the mask as a
16-bit integer compare of the bf16 bits; down·x_rest on AMX tiles, 16 tokens a tile, or vdpbf16ps
without AMX), then one GEMM with the low-rank term folded into K, on oneDNN's prepacked weight
(`pack_weight`, once per linear) or at::mm. The previous pass (vdpbf16ps per token and row of
down, then a GEMM that re-laid the weight out every call) made prefill 0.88x dense.

Built through `accel/kernels/_cpp.py` (needs a C++ compiler and ninja), once per machine. If the
build fails, or ACCEL_CPP=0, `available()` is False and callers keep the torch paths: the result
is the same up to summation order (and, in bf16, the rounding of intermediate terms).
"""
from __future__ import annotations

import torch

from .. import _cpp

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>

// y[c] = sum_k vals[k] * wt[idx[k], c]; idx int64 [K], vals fp32 [K], wt fp32 [in, out] contiguous.
torch::Tensor sum_rows_f32(torch::Tensor idx, torch::Tensor vals, torch::Tensor wt) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous() && wt.scalar_type() == torch::kFloat, "wt: fp32 [in, out] contiguous");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && vals.scalar_type() == torch::kFloat, "idx int64, vals fp32");
  auto idx_c = idx.contiguous();
  auto vals_c = vals.contiguous();
  const int64_t k = idx_c.numel(), n_in = wt.size(0), n = wt.size(1);
  TORCH_CHECK(vals_c.numel() == k, "idx and vals differ in length");
  const int64_t* ip = idx_c.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) TORCH_CHECK(ip[j] >= 0 && ip[j] < n_in, "row index out of range");
  auto y = torch::zeros({n}, wt.options());
  const float* vp = vals_c.data_ptr<float>();
  const float* w = wt.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Each thread owns a slice of output columns (8 KiB of y at a time stays in L1).
  at::parallel_for(0, n, 2048, [&](int64_t c0, int64_t c1) {
    for (int64_t b0 = c0; b0 < c1; b0 += 2048) {
      const int64_t b1 = std::min(c1, b0 + 2048);
      float* __restrict__ yb = yp + b0;
      const int64_t len = b1 - b0;
      int64_t j = 0;
      for (; j + 4 <= k; j += 4) {
        const float* __restrict__ r0 = w + ip[j] * n + b0;
        const float* __restrict__ r1 = w + ip[j + 1] * n + b0;
        const float* __restrict__ r2 = w + ip[j + 2] * n + b0;
        const float* __restrict__ r3 = w + ip[j + 3] * n + b0;
        const float a0 = vp[j], a1 = vp[j + 1], a2 = vp[j + 2], a3 = vp[j + 3];
        #pragma omp simd
        for (int64_t c = 0; c < len; ++c) yb[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
      }
      for (; j < k; ++j) {
        const float* __restrict__ r0 = w + ip[j] * n + b0;
        const float a0 = vp[j];
        #pragma omp simd
        for (int64_t c = 0; c < len; ++c) yb[c] += a0 * r0[c];
      }
    }
  });
  return y;
}

// One decode token, fused: y = W[:, S] x_S + up (down x_{not S}) + bias, S = {i : |x_i| > thr_i}.
// x, thr: fp32 [in]; wt: [in, out]; down: [r, in] and up: [out, r] (r may be 0); bias: [out] or empty.
torch::Tensor rsparse_gemv_f32(torch::Tensor x, torch::Tensor thr, torch::Tensor wt, torch::Tensor down,
                               torch::Tensor up, torch::Tensor bias) {
  TORCH_CHECK(x.is_contiguous() && thr.is_contiguous() && x.scalar_type() == torch::kFloat, "x, thr: fp32 contiguous");
  const int64_t n_in = wt.size(0), n = wt.size(1), r = down.numel() ? down.size(0) : 0;
  TORCH_CHECK(x.numel() == n_in && thr.numel() == n_in, "x / thr do not match wt");
  const float* xp = x.data_ptr<float>();
  const float* tp = thr.data_ptr<float>();
  auto idx = torch::empty({n_in}, torch::dtype(torch::kLong));
  auto vals = torch::empty({n_in}, torch::dtype(torch::kFloat));
  auto rest = torch::zeros({n_in}, torch::dtype(torch::kFloat));
  int64_t* ip = idx.data_ptr<int64_t>();
  float* vp = vals.data_ptr<float>();
  float* rp = rest.data_ptr<float>();
  int64_t k = 0;
  for (int64_t i = 0; i < n_in; ++i) {
    if (std::abs(xp[i]) > tp[i]) { ip[k] = i; vp[k] = xp[i]; ++k; } else { rp[i] = xp[i]; }
  }
  auto y = sum_rows_f32(idx.narrow(0, 0, k), vals.narrow(0, 0, k), wt);
  if (r) y.addmv_(up, torch::mv(down, rest));
  if (bias.numel()) y.add_(bias);
  return y;
}
"""

_mod = None
_fake_done = False


def available() -> bool:
    """Build (once per process) and report success; False keeps the COO path."""
    global _mod, _fake_done
    if _fake_done:
        # Built and registered: skip the import and the loader's lock (a prefill calls this per linear).
        return True
    from .bf16_src import SRC as _BF16_SRC

    _mod = _cpp.load("rsparse_cpu_v4", _SRC + _BF16_SRC, ["sum_rows_f32", "rsparse_gemv_f32", "rsparse_decode",
                                                          "bf16_simd", "rsparse_prefill_bf16", "rsparse_split_bf16", "rsparse_pack_down",
                                                          "rsparse_amx"],
                     "R-Sparse decode uses the torch paths (COO / embedding bag)")
    if _mod is not None and not _fake_done:
        _fake_done = True
        # Loading the library registered accel::rsparse_decode (TORCH_LIBRARY_FRAGMENT in the C++);
        # the compiler gets its output shape here.
        torch.library.register_fake("accel::rsparse_decode")(_decode_fake)
    return _mod is not None


_bf16 = None


def bf16_available() -> bool:
    """The native bf16 decode kernel runs here (AVX512-BF16 in the -march=native build)."""
    global _bf16
    if _bf16 is None:
        _bf16 = available() and bool(_mod.bf16_simd())
    return _bf16


def _decode_fake(x, thr, wt, down, up_t, bias, grain):
    return x.new_empty((x.shape[0], wt.shape[1]))


# 32-column chunks a thread must get before decode splits a linear's columns over threads: below,
# the fork/join costs more than the second core saves (measured at SmolLM2's shapes).
DECODE_GRAIN = 4


def rsparse_decode(x: torch.Tensor, thr: torch.Tensor, weight_t: torch.Tensor, down: torch.Tensor | None,
                   up_t: torch.Tensor | None, bias: torch.Tensor | None, grain: int = DECODE_GRAIN) -> torch.Tensor:
    """Decode tokens, fused (mask, active-row sum, low-rank term, bias), fp32 or bf16.

    x: [M, in] (M small: each token has its own active set); thr: fp32 [in]; weight_t: [in, out]
    contiguous; down: [r, in]; up_t: [r, out] (U_r transposed) -> [M, out] in x's dtype.
    bf16: AVX512-BF16 (`bf16_available()`). Eager calls the extension directly; under
    torch.compile the C++ op `accel::rsparse_decode` (no Python in the compiled graph)."""
    if torch.compiler.is_compiling():
        return torch.ops.accel.rsparse_decode(x, thr, weight_t, down, up_t, bias, grain)
    return _mod.rsparse_decode(x, thr, weight_t, down, up_t, bias, grain)


# oneDNN's batch-size hint for the prepacked prefill weight (it picks the blocking). None (its
# default) was the steadiest over 32-2048 tokens at SmolLM2's shapes (GEMM 1.3-1.5x F.linear at 32
# and 512 tokens, 1.03-1.08x at 2048); 1 lost at 2048 (0.93-0.97x).
PACK_BATCH_HINT = None


def amx_available() -> bool:
    """The bf16 prefill's low-rank product runs on AMX tiles here (AMX-BF16 build, and the kernel
    granted the tile state)."""
    return bf16_available() and bool(_mod.rsparse_amx())


def pack_down(down: torch.Tensor) -> torch.Tensor:
    """down: bf16 [r, in] -> the AMX tile layout `prefill_bf16` reads (1-D, zero-padded to 32 along
    `in` and 16 along r). Built once per linear (patches/rsparse.py keeps it)."""
    return _mod.rsparse_pack_down(down)


# The native entries take "no tensor" as an empty one; never written (zero elements).
_EMPTY_BF16 = torch.empty(0, dtype=torch.bfloat16)


def pack_weight(stacked: torch.Tensor, batch_hint: int | None = PACK_BATCH_HINT):
    """stacked: bf16 [ld, out] -> oneDNN's prepacked (blocked) form of its [out, ld] transpose, which
    `prefill_bf16(..., packed=...)` multiplies without re-laying the weight out on every call
    (the GEMM alone: 1.3-1.5x F.linear at SmolLM2's shapes at 32 and 512 tokens, ~1.05x at 2048). One more copy of
    the weight in memory. None where this torch has no oneDNN linear (callers keep at::mm)."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(stacked.t().contiguous(), batch_hint)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


def prefill_bf16(x: torch.Tensor, thr: torch.Tensor, stacked: torch.Tensor, down: torch.Tensor | None,
                 bias: torch.Tensor | None, down_packed: torch.Tensor | None = None, amx: bool = True,
                 packed=None) -> torch.Tensor:
    """Many bf16 tokens: a native split pass writes [x_S | down·x_rest | 0] and one GEMM multiplies
    it by [Wᵀ; U_rᵀ; 0] (+ bias): W x_S + U_r (down x_rest) with the low-rank term folded into K.

    x: [T, in]; thr: fp32 [in]; stacked: [ld, out] contiguous, ld >= in + r (Wᵀ over U_rᵀ, then zero
    rows: patches/rsparse.py pads ld to a multiple of 32, which oneDNN's AMX GEMM runs faster);
    down: [r, in]; down_packed: `pack_down(down)` (packed per call when None); amx=False forces the
    vdpbf16ps low-rank loop (the fallback where AMX is absent); packed: `pack_weight(stacked)`, the
    GEMM then runs on oneDNN's prepacked weight (else at::mm inside the native call) -> [T, out].

    The split (mask as a 16-bit compare of the bf16 bits, 32 channels a step) and down·x_rest (AMX,
    16 tokens a tile; rounded to bf16 as a bf16 F.linear would) run over token blocks in parallel.
    The old pass (vdpbf16ps dot products per token and row of down) cost 3-4x the masking itself."""
    r = 0 if down is None else down.shape[0]
    e = _EMPTY_BF16 if x.dtype == torch.bfloat16 else x.new_empty(0)
    dpk = (e if down_packed is None else down_packed) if r and amx else e
    if packed is not None:
        buf = _mod.rsparse_split_bf16(x, thr, stacked.shape[0], down if r else e, dpk, int(bool(amx)))
        return torch.ops.mkldnn._linear_pointwise(buf, packed, bias, "none", [], "")
    return _mod.rsparse_prefill_bf16(x, thr, stacked, down if r else e, dpk, e if bias is None else bias,
                                     int(bool(amx)))


def rsparse_gemv_f32(x: torch.Tensor, thr: torch.Tensor, weight_t: torch.Tensor, down: torch.Tensor | None,
                     up: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """One fp32 decode token, fused (mask, active-row sum, low-rank term, bias). x, thr: [in]
    (thr = per-channel threshold on |x|); weight_t: [in, out]; down: [r, in]; up: [out, r] -> [out]."""
    e = x.new_empty(0)
    return _mod.rsparse_gemv_f32(x.contiguous(), thr.contiguous(), weight_t, e if down is None else down,
                                 e if up is None else up, e if bias is None else bias)


def sum_rows_f32(idx: torch.Tensor, vals: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """idx: int64 [K] rows of weight_t: fp32 [in, out]; vals: fp32 [K] -> [1, out] = vals @ weight_t[idx].
    The active-row sum inside `rsparse_gemv_f32`, exposed for its own test."""
    return _mod.sum_rows_f32(idx, vals, weight_t).view(1, -1)

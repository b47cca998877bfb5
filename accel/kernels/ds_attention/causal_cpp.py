"""Native CPU selection for Double Sparsity's evaluation mode (causal.py): every query row's
approximate scores and top-`budget` keys in one pass, instead of ~15 [B, KVH, rows, T] torch
ops per chunk (on SmolLM2 at seq 2048 the torch selection took ~4 s of a layer's ~5 s).

Per (batch, KV head, query row): the allowed keys in order (rank = position among them); when
more than `budget` are allowed, the first `sink` and last `recent` of them are forced (as
reference.select_rows_reference: forced_budget's counts) and the rest of the budget goes to the
highest approximate scores max_g / sum_g (q_lab[g] . labels[t]) among the others (ties broken
arbitrarily, as torch.topk's); otherwise every allowed key, padded with keys it may not see (the
caller masks them out, as it masks the torch path's).

Shapes: q_lab [B, KVH, G, Tq, r] fp32, labels [B, KVH, T, r] fp32, allowed [B, Tq, T] bool
-> idx [B, KVH, Tq, min(budget, T)] int64 (unordered).
"""
from __future__ import annotations

import torch

from .. import _cpp

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#include <vector>

// Dot products of 16 / 64 floats in AVX-512 lanes (a strict-order scalar sum does not vectorise);
// any length falls back to the scalar loop. The summation order differs from torch's, as any
// fast path's does: only near-ties between candidate scores can choose differently.
template <int N>
static inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
#if defined(__AVX512F__)
  if constexpr (N > 0 && N % 16 == 0) {
    __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
    for (int c = 16; c < N; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float s = 0.f;
  const int64_t len = N > 0 ? N : n;
  for (int64_t c = 0; c < len; ++c) s += a[c] * b[c];
  return s;
}

// Exact attention of every query row over its selected keys, those it may see only:
// q [B, H, Tq, D], k/v [B, KVH, T, D] fp32, idx [B, KVH, Tq, nb] int64, allowed [B, Tq, T] bool
// -> [B, H, Tq, D] fp32 (fp32 math, a row with no key it may see gives 0).
torch::Tensor ds_causal_attend_f32(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor idx,
                                   torch::Tensor allowed, double scaling) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == torch::kFloat && q.is_contiguous(), "q: fp32 [B,H,Tq,D]");
  TORCH_CHECK(k.scalar_type() == torch::kFloat && k.is_contiguous() && v.scalar_type() == torch::kFloat &&
              v.is_contiguous() && k.sizes() == v.sizes() && k.dim() == 4, "k, v: fp32 [B,KVH,T,D]");
  TORCH_CHECK(idx.scalar_type() == torch::kLong && idx.is_contiguous() && idx.dim() == 4, "idx: int64 [B,KVH,Tq,nb]");
  TORCH_CHECK(allowed.scalar_type() == torch::kBool && allowed.is_contiguous(), "allowed: bool [B,Tq,T]");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t KVH = k.size(1), T = k.size(2), nb = idx.size(3), G = H / KVH;
  TORCH_CHECK(H == KVH * G && idx.size(0) == B && idx.size(1) == KVH && idx.size(2) == Tq, "shapes");
  auto out = torch::zeros_like(q);
  const float* qp = q.data_ptr<float>(); const float* kp = k.data_ptr<float>(); const float* vp = v.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>(); const bool* ap = allowed.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  at::parallel_for(0, B * KVH * Tq, 8, [&](int64_t w0, int64_t w1) {
    std::vector<int64_t> toks(nb);
    std::vector<float> logit(nb);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w % Tq, bk = w / Tq, b = bk / KVH, kvh = bk % KVH;
      const bool* al = ap + (b * Tq + i) * T;
      const int64_t* ix = ip + w * nb;
      int64_t n = 0;
      for (int64_t j = 0; j < nb; ++j) if (ix[j] >= 0 && ix[j] < T && al[ix[j]]) toks[n++] = ix[j];
      if (n == 0) continue;
      const float* kb = kp + bk * T * D; const float* vb = vp + bk * T * D;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = kvh * G + g;
        const float* qq = qp + ((b * H + h) * Tq + i) * D;
        float* oo = op + ((b * H + h) * Tq + i) * D;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          const float l = (D == 64 ? dot<64>(qq, kb + toks[j] * D, 64) : dot<0>(qq, kb + toks[j] * D, D)) * sc;
          logit[j] = l; mx = std::max(mx, l);
        }
        float den = 0.f;
        for (int64_t j = 0; j < n; ++j) { logit[j] = std::exp(logit[j] - mx); den += logit[j]; }
        const float inv = 1.f / den;
        for (int64_t j = 0; j < n; ++j) {
          const float p = logit[j] * inv; const float* vv = vb + toks[j] * D;
          for (int64_t d = 0; d < D; ++d) oo[d] += p * vv[d];
        }
      }
    }
  });
  return out;
}

torch::Tensor ds_causal_select_f32(torch::Tensor qlab, torch::Tensor labels, torch::Tensor allowed,
                                   int64_t budget, int64_t sink_e, int64_t recent_e, bool reduce_max) {
  TORCH_CHECK(qlab.dim() == 5 && qlab.scalar_type() == torch::kFloat && qlab.is_contiguous(), "q_lab: fp32 [B,KVH,G,Tq,r]");
  TORCH_CHECK(labels.dim() == 4 && labels.scalar_type() == torch::kFloat && labels.is_contiguous(), "labels: fp32 [B,KVH,T,r]");
  TORCH_CHECK(allowed.dim() == 3 && allowed.scalar_type() == torch::kBool && allowed.is_contiguous(), "allowed: bool [B,Tq,T]");
  const int64_t B = qlab.size(0), KVH = qlab.size(1), G = qlab.size(2), Tq = qlab.size(3), r = qlab.size(4);
  const int64_t T = labels.size(2);
  TORCH_CHECK(labels.size(0) == B && labels.size(1) == KVH && labels.size(3) == r, "labels shape");
  TORCH_CHECK(allowed.size(0) == B && allowed.size(1) == Tq && allowed.size(2) == T, "allowed shape");
  const int64_t nb = std::min(budget, T);
  TORCH_CHECK(nb >= 0 && sink_e >= 0 && recent_e >= 0 && sink_e + recent_e <= nb, "budget");
  auto out = torch::empty({B, KVH, Tq, nb}, torch::dtype(torch::kLong));
  const float* qp = qlab.data_ptr<float>();
  const float* lp = labels.data_ptr<float>();
  const bool* ap = allowed.data_ptr<bool>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B * KVH * Tq, 16, [&](int64_t w0, int64_t w1) {
    std::vector<int64_t> valid;
    std::vector<std::pair<float, int64_t>> cand;
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t i = w % Tq, bk = w / Tq, b = bk / KVH;
      const bool* al = ap + (b * Tq + i) * T;
      int64_t* o = op + w * nb;
      valid.clear();
      for (int64_t t = 0; t < T; ++t) if (al[t]) valid.push_back(t);
      const int64_t n = static_cast<int64_t>(valid.size());
      if (n <= nb) {
        int64_t m = 0;
        for (int64_t t : valid) o[m++] = t;
        for (int64_t t = 0; t < T && m < nb; ++t) if (!al[t]) o[m++] = t;
        continue;
      }
      int64_t m = 0;
      for (int64_t j = 0; j < sink_e; ++j) o[m++] = valid[j];
      for (int64_t j = n - recent_e; j < n; ++j) o[m++] = valid[j];
      const int64_t need = nb - m;
      if (need <= 0) continue;
      const float* q = qp + (bk * G * Tq + i) * r;   // q_lab[b, kvh, g, i, :] at q + g * Tq * r
      const float* lab = lp + bk * T * r;
      cand.clear();
      for (int64_t j = sink_e; j < n - recent_e; ++j) {
        const int64_t t = valid[j];
        const float* l = lab + t * r;
        float best = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = q + g * Tq * r;
          const float s = r == 16 ? dot<16>(qg, l, 16) : dot<0>(qg, l, r);
          best = g == 0 ? s : (reduce_max ? std::max(best, s) : best + s);
        }
        cand.emplace_back(best, t);
      }
      std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(),
                       [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) { return a.first > b.first; });
      for (int64_t j = 0; j < need; ++j) o[m++] = cand[j].second;
    }
  });
  return out;
}
"""


def load():
    """The built extension, or None (causal.py keeps the torch selection)."""
    return _cpp.load("ds_causal_v2", _SRC, ["ds_causal_select_f32", "ds_causal_attend_f32"],
                     "DS evaluation mode uses the torch selection and a masked SDPA")


def select_rows(mod, q, labels, channels, group_reduce: str, allowed, budget: int, sink_e: int,
                recent_e: int) -> torch.Tensor:
    """q [B, H, Tq, D], labels [B, KVH, T, r], channels [KVH, r] int64, allowed [B, Tq, T] bool
    -> idx [B, KVH, Tq, min(budget, T)] int64 (what select_rows_reference(row_scores_reference(...)) picks)."""
    B, H, Tq, D = q.shape
    KVH, r = channels.shape
    G = H // KVH
    qg = q.reshape(B, KVH, G, Tq, D)
    q_lab = torch.gather(qg, 4, channels[None, :, None, None, :].expand(B, KVH, G, Tq, r))
    return mod.ds_causal_select_f32(q_lab.float().contiguous(), labels.float().contiguous(),
                                    allowed.expand(B, Tq, labels.shape[2]).contiguous(), int(budget), int(sink_e),
                                    int(recent_e), group_reduce == "max")


def attend_rows(mod, q, k, v, idx, allowed, scaling: float) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, KVH, T, D], idx [B, KVH, Tq, nb] int64, allowed [B, Tq, T] bool
    -> [B, H, Tq, D] fp32: each row's exact softmax attention over the selected keys it may see
    (fp32 math; a row that may see none of them gives 0)."""
    B, Tq, T = q.shape[0], q.shape[2], k.shape[2]
    return mod.ds_causal_attend_f32(q.float().contiguous(), k.float().contiguous(), v.float().contiguous(),
                                    idx.contiguous(), allowed.expand(B, Tq, T).contiguous(), float(scaling))

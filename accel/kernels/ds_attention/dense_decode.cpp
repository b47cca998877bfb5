#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

// Dense decode attention (one query token per sequence) over a KV cache, for the layers Double
// Sparsity leaves dense. torch's CPU flash attention is built for many query rows: at one row and
// an 8K context it took ~4 ms a layer on SmolLM2 (2 threads), several times what reading K and V
// costs. Here the context is split into chunks over (batch, KV head, chunk) work items, each
// item computes the G query heads' logits, its own softmax max / sum and weighted V sum, and a
// second pass combines the chunks (the flash-decoding split). fp32 math; bf16 / fp16 caches are
// widened exactly.

template <int KIND>
static inline const float* row_f32(const char* row, int64_t D, float* __restrict__ tmp) {
  if (KIND == 0) return reinterpret_cast<const float*>(row);
  const uint16_t* __restrict__ r = reinterpret_cast<const uint16_t*>(row);
  if (KIND == 1) {
    #pragma omp simd
    for (int64_t d = 0; d < D; ++d) { const uint32_t u = uint32_t(r[d]) << 16; std::memcpy(tmp + d, &u, 4); }
  } else {
    for (int64_t d = 0; d < D; ++d) tmp[d] = static_cast<float>(c10::Half(r[d], c10::Half::from_bits()));
  }
  return tmp;
}

// q: [B, H, D] fp32 contiguous; k, v: [B, KVH, T, D] with unit stride over D and stride D over T
// (any batch / head strides: a view of a cache grown in place); key_mask: [B, T] bool, or empty
// for "every key"; chunk: tokens per work item. Returns [B, H, D] fp32. A sequence whose keys are
// all masked gets zeros.
template <int KIND>
static torch::Tensor decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor key_mask,
                            double scaling, int64_t chunk) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: fp32 [B, H, D] contiguous");
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.sizes() == v.sizes(), "k, v: [B, KVH, T, D], same shape");
  const int64_t B = k.size(0), KVH = k.size(1), T = k.size(2), D = k.size(3), H = q.size(1);
  TORCH_CHECK(q.size(0) == B && q.size(2) == D && KVH > 0 && H % KVH == 0, "q does not fit k");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.stride(2) == D && v.stride(2) == D,
              "k, v: rows of D contiguous elements");
  TORCH_CHECK(chunk > 0, "chunk must be positive");
  const bool masked = key_mask.numel() > 0;
  if (masked)
    TORCH_CHECK(key_mask.scalar_type() == torch::kBool && key_mask.is_contiguous() && key_mask.dim() == 2 &&
                key_mask.size(0) == B && key_mask.size(1) == T, "key_mask: bool [B, T] contiguous");
  const int64_t G = H / KVH, BK = B * KVH, nc = std::max<int64_t>((T + chunk - 1) / chunk, 1);
  const int64_t esz = KIND == 0 ? 4 : 2;
  auto out = torch::zeros({B, H, D}, q.options());
  auto part_o = torch::empty({BK, nc, G, D}, q.options());
  auto part_m = torch::empty({BK, nc, G}, q.options());
  auto part_s = torch::empty({BK, nc, G}, q.options());
  const float* qp = q.data_ptr<float>();
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const bool* mp = masked ? key_mask.data_ptr<bool>() : nullptr;
  float* po = part_o.data_ptr<float>();
  float* pm = part_m.data_ptr<float>();
  float* ps = part_s.data_ptr<float>();
  const int64_t kb = k.stride(0) * esz, kh = k.stride(1) * esz, vb = v.stride(0) * esz, vh = v.stride(1) * esz;
  const int64_t rb = D * esz;
  const float sc = static_cast<float>(scaling);
  at::parallel_for(0, BK * nc, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> logit(G * chunk), tmp(D);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t p = w / nc, c = w % nc, b = p / KVH, h = p % KVH;
      const int64_t t0 = c * chunk, t1 = std::min(T, t0 + chunk), n = t1 - t0;
      const float* qg = qp + (b * H + h * G) * D;
      const char* krow0 = kp + b * kb + h * kh + t0 * rb;
      const char* vrow0 = vp + b * vb + h * vh + t0 * rb;
      const bool* m = masked ? mp + b * T + t0 : nullptr;
      float* o = po + w * G * D;
      float* mx = pm + w * G;
      float* sm = ps + w * G;
      for (int64_t g = 0; g < G; ++g) { mx[g] = -INFINITY; sm[g] = 0.f; }
      std::fill(o, o + G * D, 0.f);
      for (int64_t j = 0; j < n; ++j) {
        if (m && !m[j]) continue;
        const float* __restrict__ kr = row_f32<KIND>(krow0 + j * rb, D, tmp.data());
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qq = qg + g * D;
          float acc = 0.f;
          #pragma omp simd reduction(+:acc)
          for (int64_t d = 0; d < D; ++d) acc += qq[d] * kr[d];
          const float l = acc * sc;
          logit[g * chunk + j] = l;
          mx[g] = std::max(mx[g], l);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        if (mx[g] == -INFINITY) continue;  // every key of the chunk masked
        float* l = logit.data() + g * chunk;
        float s = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          l[j] = (m && !m[j]) ? 0.f : std::exp(l[j] - mx[g]);
          s += l[j];
        }
        sm[g] = s;
      }
      for (int64_t j = 0; j < n; ++j) {
        if (m && !m[j]) continue;
        const float* __restrict__ vr = row_f32<KIND>(vrow0 + j * rb, D, tmp.data());
        for (int64_t g = 0; g < G; ++g) {
          const float wgt = logit[g * chunk + j];
          float* __restrict__ og = o + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) og[d] += wgt * vr[d];
        }
      }
    }
  });
  float* op = out.data_ptr<float>();
  at::parallel_for(0, BK * G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t p = i / G, g = i % G, b = p / KVH, h = p % KVH;
      float M = -INFINITY;
      for (int64_t c = 0; c < nc; ++c) M = std::max(M, pm[(p * nc + c) * G + g]);
      if (M == -INFINITY) continue;  // all keys masked: zeros
      float S = 0.f;
      float* __restrict__ dst = op + (b * H + h * G + g) * D;
      for (int64_t c = 0; c < nc; ++c) {
        const float mc = pm[(p * nc + c) * G + g];
        if (mc == -INFINITY) continue;
        const float e = std::exp(mc - M);
        S += e * ps[(p * nc + c) * G + g];
        const float* __restrict__ src = po + ((p * nc + c) * G + g) * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] += e * src[d];
      }
      const float inv = 1.f / S;
      #pragma omp simd
      for (int64_t d = 0; d < D; ++d) dst[d] *= inv;
    }
  });
  return out;
}

torch::Tensor dense_decode(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor key_mask, double scaling,
                           int64_t chunk) {
  const auto t = k.scalar_type();
  TORCH_CHECK(v.scalar_type() == t, "k and v: one dtype");
  if (t == torch::kFloat) return decode<0>(q, k, v, key_mask, scaling, chunk);
  if (t == torch::kBFloat16) return decode<1>(q, k, v, key_mask, scaling, chunk);
  TORCH_CHECK(t == torch::kHalf, "k, v: fp32, bf16 or fp16");
  return decode<2>(q, k, v, key_mask, scaling, chunk);
}

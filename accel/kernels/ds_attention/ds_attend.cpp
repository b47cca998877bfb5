#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

static constexpr int64_t PF = 16;

static inline void prefetch_bytes(const void* p, int64_t nbytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < nbytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

static inline float h2f(uint16_t h, bool bf) {
  if (bf) { uint32_t u = uint32_t(h) << 16; float f; std::memcpy(&f, &u, 4); return f; }
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Row `row` of a [rows, D] cache as fp32: the row itself (fp32, KIND 0) or widened exactly into tmp
// (KIND 1 bf16, KIND 2 fp16).
template <int KIND>
static inline const float* row_f32(const void* base, int64_t row, int64_t D, float* __restrict__ tmp) {
  if (KIND == 0) return static_cast<const float*>(base) + row * D;
  const uint16_t* __restrict__ r = static_cast<const uint16_t*>(base) + row * D;
  if (KIND == 1) {
    #pragma omp simd
    for (int64_t d = 0; d < D; ++d) { const uint32_t u = uint32_t(r[d]) << 16; std::memcpy(tmp + d, &u, 4); }
  } else {
    for (int64_t d = 0; d < D; ++d) tmp[d] = h2f(r[d], false);
  }
  return tmp;
}

// q: [B*H, D] fp32; kflat/vflat: row-major [rows, D] views of the caches (row stride D), fp32
// (KIND 0), bf16 (1) or fp16 (2); krows/vrows: [B*KVH, n] int64 flat rows of the selected tokens.
// Returns [B*H, D] fp32 (every product and sum in fp32).
template <int KIND>
static torch::Tensor attend_rows(torch::Tensor q, torch::Tensor kflat, torch::Tensor vflat, torch::Tensor krows,
                                 torch::Tensor vrows, int64_t G, double scaling) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat, "q: fp32");
  TORCH_CHECK(q.is_contiguous() && krows.is_contiguous() && vrows.is_contiguous(), "contiguous q / rows");
  const int64_t D = q.size(1), BK = krows.size(0), n = krows.size(1);
  TORCH_CHECK(kflat.stride(0) == D && kflat.stride(1) == 1 && vflat.stride(0) == D && vflat.stride(1) == 1,
              "K/V views must have row stride D");
  TORCH_CHECK(q.size(0) == BK * G && vrows.size(0) == BK && vrows.size(1) == n, "shape mismatch");
  const int64_t krow_max = kflat.size(0), vrow_max = vflat.size(0);
  const int64_t rb = D * (KIND == 0 ? 4 : 2);
  const float* qp = q.data_ptr<float>();
  const void* kp = kflat.data_ptr();
  const void* vp = vflat.data_ptr();
  const char* kc = static_cast<const char*>(kp);
  const char* vc = static_cast<const char*>(vp);
  const int64_t* kr = krows.data_ptr<int64_t>();
  const int64_t* vr = vrows.data_ptr<int64_t>();
  for (int64_t i = 0; i < BK * n; ++i)
    TORCH_CHECK(kr[i] >= 0 && kr[i] < krow_max && vr[i] >= 0 && vr[i] < vrow_max, "selected row out of range");
  auto out = torch::zeros({BK * G, D}, q.options());
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  at::parallel_for(0, BK, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> logit(G * n), tmp(D);
    for (int64_t p = p0; p < p1; ++p) {
      const float* qg = qp + p * G * D;
      const int64_t* rk = kr + p * n;
      const int64_t* rv = vr + p * n;
      for (int64_t j = 0; j < PF && j < n; ++j) prefetch_bytes(kc + rk[j] * rb, rb);
      for (int64_t j = 0; j < n; ++j) {
        // Selected rows are scattered over the cache: prefetch PF rows ahead so that many
        // cache misses are in flight (a plain loop waits on one row at a time).
        if (j + PF < n) prefetch_bytes(kc + rk[j + PF] * rb, rb);
        const float* __restrict__ krow = row_f32<KIND>(kp, rk[j], D, tmp.data());
        for (int64_t g = 0; g < G; ++g) {
          const float* __restrict__ qq = qg + g * D;
          float acc = 0.f;
          #pragma omp simd reduction(+:acc)
          for (int64_t d = 0; d < D; ++d) acc += qq[d] * krow[d];
          logit[g * n + j] = acc * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* l = logit.data() + g * n;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, l[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) { l[j] = std::exp(l[j] - mx); sum += l[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) l[j] *= inv;
      }
      float* og = op + p * G * D;
      for (int64_t j = 0; j < PF && j < n; ++j) prefetch_bytes(vc + rv[j] * rb, rb);
      for (int64_t j = 0; j < n; ++j) {
        if (j + PF < n) prefetch_bytes(vc + rv[j + PF] * rb, rb);
        const float* __restrict__ vrow = row_f32<KIND>(vp, rv[j], D, tmp.data());
        for (int64_t g = 0; g < G; ++g) {
          const float w = logit[g * n + j];
          float* __restrict__ o = og + g * D;
          #pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] += w * vrow[d];
        }
      }
    }
  });
  return out;
}

torch::Tensor ds_attend_f32(torch::Tensor q, torch::Tensor kflat, torch::Tensor vflat, torch::Tensor krows,
                            torch::Tensor vrows, int64_t G, double scaling) {
  TORCH_CHECK(kflat.scalar_type() == torch::kFloat && vflat.scalar_type() == torch::kFloat, "fp32 only");
  return attend_rows<0>(q, kflat, vflat, krows, vrows, G, scaling);
}

// The same over a 16-bit (bf16 or fp16) cache: each K/V element widened exactly, fp32 math.
torch::Tensor ds_attend_16(torch::Tensor q, torch::Tensor kflat, torch::Tensor vflat, torch::Tensor krows,
                           torch::Tensor vrows, int64_t G, double scaling) {
  const auto t = kflat.scalar_type();
  TORCH_CHECK((t == torch::kBFloat16 || t == torch::kHalf) && vflat.scalar_type() == t, "K/V: both bf16 or both fp16");
  return t == torch::kBFloat16 ? attend_rows<1>(q, kflat, vflat, krows, vrows, G, scaling)
                               : attend_rows<2>(q, kflat, vflat, krows, vrows, G, scaling);
}

// Order-preserving map of a float to uint32 (larger float -> larger key; -inf lowest, +inf highest).
static inline uint32_t fkey(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Indices of the k largest entries of each row of s: [R, T] fp32 -> [R, k] int64, unordered.
// Radix select on the order-preserving keys: 11/11/10-bit histograms, each later pass only over the
// bucket that holds the k-th value, so a row costs about two passes over T (torch.topk sorts a heap).
torch::Tensor topk_rows_f32(torch::Tensor s, int64_t k) {
  TORCH_CHECK(s.dim() == 2 && s.scalar_type() == torch::kFloat && s.is_contiguous(), "s: fp32 [R, T] contiguous");
  const int64_t R = s.size(0), T = s.size(1);
  TORCH_CHECK(k >= 0 && k <= T, "k out of range");
  auto out = torch::empty({R, k}, torch::dtype(torch::kLong));
  const float* sp = s.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> keys(T);
    std::vector<int64_t> cand, next;
    std::vector<int64_t> hist(2048);
    for (int64_t r = r0; r < r1; ++r) {
      const float* row = sp + r * T;
      int64_t* o = op + r * k;
      int64_t n_out = 0, need = k;
      if (need == 0) continue;
      for (int64_t t = 0; t < T; ++t) keys[t] = fkey(row[t]);
      cand.resize(T);
      for (int64_t t = 0; t < T; ++t) cand[t] = t;
      const int shifts[3] = {21, 10, 0};
      const uint32_t masks[3] = {0x7FFu, 0x7FFu, 0x3FFu};
      for (int pass = 0; pass < 3 && need > 0; ++pass) {
        const int sh = shifts[pass];
        const uint32_t m = masks[pass];
        std::fill(hist.begin(), hist.end(), 0);
        for (int64_t c : cand) hist[(keys[c] >> sh) & m]++;
        int64_t b = static_cast<int64_t>(m), above = 0;
        while (above + hist[b] < need) { above += hist[b]; --b; }
        next.clear();
        for (int64_t c : cand) {
          const int64_t kb = (keys[c] >> sh) & m;
          if (kb > b) o[n_out++] = c;
          else if (kb == b) next.push_back(c);
        }
        need -= above;
        if (static_cast<int64_t>(next.size()) == need || pass == 2) {
          // The whole bucket fits, or the keys are equal in every bit: take any `need` of them.
          for (int64_t j = 0; j < need; ++j) o[n_out++] = next[j];
          need = 0;
        }
        cand.swap(next);
      }
    }
  });
  return out;
}

// Label scores of one decode query over 16-bit (bf16/fp16) labels, in fp32 as the spec: each label is
// widened exactly and the dot products accumulate in fp32, without an fp32 copy of all T labels
// (the torch path's upcast of every label on every step cost more than the matmul itself).
template <bool BF, int RC>
static void score_pair(const float* q, const uint16_t* lab, int64_t st, int64_t T, int64_t r_, int64_t G, bool mx, float* out) {
  constexpr int64_t TB = 64;
  const int64_t r = RC > 0 ? RC : r_;
  std::vector<float> buf(r * TB), acc(TB), red(TB);
  for (int64_t t0 = 0; t0 < T; t0 += TB) {
    const int64_t nb = std::min(TB, T - t0);
    // Exact widening into a channel-major tile so that the dot products vectorize over tokens.
    if (BF && (r % 2 == 0) && (st % 2 == 0) && (reinterpret_cast<uintptr_t>(lab) % 4 == 0) && nb == TB) {
      // bf16 pairs: one 32-bit word holds channels j (low half) and j+1 (high half); each half
      // shifted into the top 16 bits is that bf16's fp32 value exactly.
      const uint32_t* w = reinterpret_cast<const uint32_t*>(lab + t0 * st);
      const int64_t sw = st / 2;
      for (int64_t jp = 0; jp < r / 2; ++jp) {
        float* __restrict__ lo = buf.data() + (2 * jp) * TB;
        float* __restrict__ hi = lo + TB;
        #pragma omp simd
        for (int64_t t = 0; t < TB; ++t) {
          const uint32_t x = w[t * sw + jp];
          const uint32_t a = x << 16, b = x & 0xFFFF0000u;
          float fa, fb; std::memcpy(&fa, &a, 4); std::memcpy(&fb, &b, 4);
          lo[t] = fa; hi[t] = fb;
        }
      }
    } else {
      for (int64_t t = 0; t < nb; ++t) {
        const uint16_t* row = lab + (t0 + t) * st;
        for (int64_t j = 0; j < r; ++j) buf[j * TB + t] = h2f(row[j], BF);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * r;
      float* __restrict__ a = acc.data();
      for (int64_t t = 0; t < TB; ++t) a[t] = 0.f;
      for (int64_t j = 0; j < r; ++j) {
        const float w = qg[j];
        const float* __restrict__ b = buf.data() + j * TB;
        #pragma omp simd
        for (int64_t t = 0; t < TB; ++t) a[t] += w * b[t];
      }
      float* __restrict__ rr = red.data();
      if (g == 0) { for (int64_t t = 0; t < TB; ++t) rr[t] = a[t]; }
      else if (mx) { for (int64_t t = 0; t < TB; ++t) rr[t] = std::max(rr[t], a[t]); }
      else { for (int64_t t = 0; t < TB; ++t) rr[t] += a[t]; }
    }
    std::memcpy(out + t0, red.data(), nb * sizeof(float));
  }
}
// q: [BK, G, r] fp32 contiguous; labels: [BK, T, r] 16-bit with row stride st (inner stride 1). -> [BK, T] fp32
torch::Tensor label_scores_16(torch::Tensor q, torch::Tensor labels, bool reduce_max) {
  const bool bf = labels.scalar_type() == torch::kBFloat16;
  TORCH_CHECK(bf || labels.scalar_type() == torch::kHalf, "labels: bf16/fp16");
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3 && labels.dim() == 3, "q fp32 [BK,G,r]");
  const int64_t BK = q.size(0), G = q.size(1), r = q.size(2), T = labels.size(1);
  TORCH_CHECK(labels.size(0) == BK && labels.size(2) == r && labels.stride(2) == 1, "labels [BK,T,r], inner stride 1");
  auto out = torch::empty({BK, T}, q.options());
  const uint16_t* lp = reinterpret_cast<const uint16_t*>(labels.data_ptr());
  const int64_t sp = labels.stride(0), st = labels.stride(1);
  at::parallel_for(0, BK, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* qq = q.data_ptr<float>() + p * G * r; const uint16_t* ll = lp + p * sp; float* oo = out.data_ptr<float>() + p * T;
      if (bf && r == 16) score_pair<true, 16>(qq, ll, st, T, r, G, reduce_max, oo);
      else if (bf) score_pair<true, 0>(qq, ll, st, T, r, G, reduce_max, oo);
      else if (r == 16) score_pair<false, 16>(qq, ll, st, T, r, G, reduce_max, oo);
      else score_pair<false, 0>(qq, ll, st, T, r, G, reduce_max, oo);
    }
  });
  return out;
}
// ---- Quantized labels (patches/ds_cache.quantize_labels): codes uint8 [.., r] (8-bit) or [.., r/2]
// (4-bit, channel 2i in the low nibble), scale / low fp16 per token. ----

// fp32 -> bf16 -> fp32, round to nearest even (torch's .to(bfloat16)); NaN stays NaN.
static inline float round_bf16(float x) {
  uint32_t u; std::memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) { u |= 0x00400000u; }
  else { u += 0x7FFFu + ((u >> 16) & 1u); }
  u &= 0xFFFF0000u;
  float f; std::memcpy(&f, &u, 4); return f;
}

// Scores of one (batch, KV head) pair over tokens [t0, t1): the labels are dequantized as
// dequantize_labels does (code * scale + low in fp32: the product of an 8-bit code and an fp16
// scale is exact in fp32, so a fused multiply-add rounds the same), rounded to the cache dtype
// (RND 0 fp32, 1 bf16, 2 fp16), and dotted with the G query rows in fp32.
template <int BITS, int RND, int RC>
static void score_q_pair(const float* __restrict__ q, const uint8_t* codes, int64_t cst, const at::Half* sc, int64_t sst,
                         const at::Half* lo, int64_t lst, int64_t t0, int64_t t1, int64_t r_, int64_t G, bool mx,
                         float* __restrict__ out) {
  constexpr int64_t TB = 64;
  const int64_t r = RC > 0 ? RC : r_;
  std::vector<float> bufv(r * TB);
  float* __restrict__ buf = bufv.data();
  alignas(64) float sv[TB], lv[TB], acc[TB], red[TB];
  for (int64_t a = t0; a < t1; a += TB) {
    const int64_t nb = std::min(TB, t1 - a);
    for (int64_t t = 0; t < nb; ++t) { sv[t] = static_cast<float>(sc[(a + t) * sst]); lv[t] = static_cast<float>(lo[(a + t) * lst]); }
    const uint8_t* c = codes + a * cst;
    // Channel-major tile (tokens innermost), so the dequantization and the dot products vectorize
    // over tokens.
    for (int64_t j = 0; j < r; ++j) {
      float* __restrict__ bj = buf + j * TB;
      #pragma omp simd
      for (int64_t t = 0; t < nb; ++t) {
        const uint32_t byte = c[t * cst + (BITS == 8 ? j : (j >> 1))];
        const uint32_t code = BITS == 8 ? byte : ((j & 1) ? (byte >> 4) : (byte & 0xFu));
        const float x = static_cast<float>(code) * sv[t] + lv[t];
        bj[t] = RND == 1 ? round_bf16(x) : x;
      }
      if (RND == 2) for (int64_t t = 0; t < nb; ++t) bj[t] = static_cast<float>(at::Half(bj[t]));
    }
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * r;
      #pragma omp simd
      for (int64_t t = 0; t < TB; ++t) acc[t] = 0.f;
      for (int64_t j = 0; j < r; ++j) {
        const float w = qg[j];
        const float* __restrict__ bj = buf + j * TB;
        #pragma omp simd
        for (int64_t t = 0; t < TB; ++t) acc[t] += w * bj[t];
      }
      if (g == 0) { for (int64_t t = 0; t < TB; ++t) red[t] = acc[t]; }
      else if (mx) { for (int64_t t = 0; t < TB; ++t) red[t] = std::max(red[t], acc[t]); }
      else { for (int64_t t = 0; t < TB; ++t) red[t] += acc[t]; }
    }
    std::memcpy(out + a, red, nb * sizeof(float));
  }
}

// q: [BK, G, r] fp32; codes: [BK, T, rc] uint8 (inner stride 1); scale, low: [BK, T] fp16 (any
// strides); bits 8 or 4; rnd: 0 fp32, 1 bf16, 2 fp16 (the dtype the labels are dequantized to).
// -> [BK, T] fp32 (max or sum over G). Work split over (pair, block of tokens).
torch::Tensor label_scores_q(torch::Tensor q, torch::Tensor codes, torch::Tensor scale, torch::Tensor low,
                             int64_t bits, int64_t rnd, bool reduce_max) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat && q.is_contiguous() && q.dim() == 3, "q: fp32 [BK, G, r] contiguous");
  TORCH_CHECK(codes.scalar_type() == torch::kByte && codes.dim() == 3 && codes.stride(2) == 1, "codes: uint8 [BK, T, rc]");
  TORCH_CHECK(scale.scalar_type() == torch::kHalf && low.scalar_type() == torch::kHalf && scale.dim() == 2 && low.dim() == 2,
              "scale / low: fp16 [BK, T]");
  TORCH_CHECK(bits == 8 || bits == 4, "bits: 8 or 4");
  TORCH_CHECK(rnd >= 0 && rnd <= 2, "rnd: 0, 1 or 2");
  const int64_t BK = q.size(0), G = q.size(1), r = q.size(2), T = codes.size(1);
  TORCH_CHECK(r >= 1 && r <= 256, "r in [1, 256]");
  TORCH_CHECK(codes.size(0) == BK && codes.size(2) == (bits == 8 ? r : (r + 1) / 2), "codes shape");
  TORCH_CHECK(scale.size(0) == BK && scale.size(1) == T && low.size(0) == BK && low.size(1) == T, "scale / low shape");
  auto out = torch::empty({BK, T}, q.options());
  constexpr int64_t TB = 1024;
  const int64_t nb = (T + TB - 1) / TB;
  const float* qp = q.data_ptr<float>();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const at::Half* sp = scale.data_ptr<at::Half>();
  const at::Half* lp = low.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  const int64_t cs0 = codes.stride(0), cs1 = codes.stride(1), ss0 = scale.stride(0), ss1 = scale.stride(1);
  const int64_t ls0 = low.stride(0), ls1 = low.stride(1);
  at::parallel_for(0, BK * nb, 1, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t p = w / nb, b = w % nb, t0 = b * TB, t1 = std::min(T, t0 + TB);
      const float* qq = qp + p * G * r;
      const uint8_t* cc = cp + p * cs0;
      const at::Half* ss = sp + p * ss0;
      const at::Half* ll = lp + p * ls0;
      float* oo = op + p * T;
#define DSQ_CALL(B_, R_, C_) score_q_pair<B_, R_, C_>(qq, cc, cs1, ss, ss1, ll, ls1, t0, t1, r, G, reduce_max, oo)
      if (bits == 8 && rnd == 1 && r == 16) DSQ_CALL(8, 1, 16);
      else if (bits == 8 && rnd == 1 && r == 8) DSQ_CALL(8, 1, 8);
      else if (bits == 8 && rnd == 1) DSQ_CALL(8, 1, 0);
      else if (bits == 8 && rnd == 0) DSQ_CALL(8, 0, 0);
      else if (bits == 8) DSQ_CALL(8, 2, 0);
      else if (rnd == 1 && r == 16) DSQ_CALL(4, 1, 16);
      else if (rnd == 1) DSQ_CALL(4, 1, 0);
      else if (rnd == 0) DSQ_CALL(4, 0, 0);
      else DSQ_CALL(4, 2, 0);
#undef DSQ_CALL
    }
  });
  return out;
}

template <typename KT>
static inline float key_f32(const KT* p) { return static_cast<float>(*p); }

// quantize_labels(gather_labels(keys, channels), bits) in one pass: keys [B, KVH, n, D] (fp32,
// bf16 or fp16, any strides), channels [KVH, r] int64 -> (codes [B, KVH, n, rc] uint8, scale
// [B, KVH, n, 1] fp16, low [B, KVH, n, 1] fp16), bit for bit what the torch code computes (min
// and max in fp32, scale = max((hi - lo) / qmax, 1e-8), code = clamp(round-half-even((x - lo) / scale))).
template <typename KT>
static void quant_impl(const torch::Tensor& keys, const int64_t* ch, int64_t r, int64_t bits, uint8_t* co, at::Half* so,
                       at::Half* lo_out) {
  const int64_t B = keys.size(0), KVH = keys.size(1), n = keys.size(2);
  const int64_t s0 = keys.stride(0), s1 = keys.stride(1), s2 = keys.stride(2), s3 = keys.stride(3);
  const KT* kp = keys.data_ptr<KT>();
  const int64_t rc = bits == 8 ? r : r / 2;
  const float qmax = static_cast<float>((1 << bits) - 1);
  at::parallel_for(0, B * KVH * n, 256, [&](int64_t i0, int64_t i1) {
    std::vector<float> x(r);
    std::vector<uint8_t> c(r);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (KVH * n), h = (i / n) % KVH, t = i % n;
      const KT* row = kp + b * s0 + h * s1 + t * s2;
      float mn = INFINITY, mxv = -INFINITY;
      bool nan = false;
      for (int64_t j = 0; j < r; ++j) {
        x[j] = key_f32(row + ch[h * r + j] * s3);
        nan |= std::isnan(x[j]);
        mn = std::min(mn, x[j]); mxv = std::max(mxv, x[j]);
      }
      if (nan) { mn = mxv = NAN; }
      float scale = (mxv - mn) / qmax;
      scale = std::isnan(scale) ? scale : std::max(scale, 1e-8f);
      for (int64_t j = 0; j < r; ++j) {
        float v = std::nearbyint((x[j] - mn) / scale);
        v = std::isnan(v) ? 0.f : std::min(std::max(v, 0.f), qmax);
        c[j] = static_cast<uint8_t>(v);
      }
      uint8_t* o = co + i * rc;
      if (bits == 8) { for (int64_t j = 0; j < r; ++j) o[j] = c[j]; }
      else { for (int64_t j = 0; j < rc; ++j) o[j] = static_cast<uint8_t>(c[2 * j] | (c[2 * j + 1] << 4)); }
      so[i] = at::Half(scale);
      lo_out[i] = at::Half(mn);
    }
  });
}

std::vector<torch::Tensor> label_quant(torch::Tensor keys, torch::Tensor channels, int64_t bits) {
  TORCH_CHECK(keys.dim() == 4, "keys: [B, KVH, n, D]");
  TORCH_CHECK(channels.scalar_type() == torch::kLong && channels.dim() == 2 && channels.is_contiguous(), "channels: int64 [KVH, r]");
  TORCH_CHECK(bits == 8 || bits == 4, "bits: 8 or 4");
  const int64_t B = keys.size(0), KVH = keys.size(1), n = keys.size(2), D = keys.size(3), r = channels.size(1);
  TORCH_CHECK(channels.size(0) == KVH && r >= 1 && (bits == 8 || r % 2 == 0), "channels shape");
  const int64_t* ch = channels.data_ptr<int64_t>();
  for (int64_t i = 0; i < KVH * r; ++i) TORCH_CHECK(ch[i] >= 0 && ch[i] < D, "channel index out of range");
  const int64_t rc = bits == 8 ? r : r / 2;
  auto codes = torch::empty({B, KVH, n, rc}, keys.options().dtype(torch::kByte));
  auto scale = torch::empty({B, KVH, n, 1}, keys.options().dtype(torch::kHalf));
  auto low = torch::empty({B, KVH, n, 1}, keys.options().dtype(torch::kHalf));
  uint8_t* co = codes.data_ptr<uint8_t>();
  at::Half* so = scale.data_ptr<at::Half>();
  at::Half* lo = low.data_ptr<at::Half>();
  const auto t = keys.scalar_type();
  if (t == torch::kBFloat16) quant_impl<at::BFloat16>(keys, ch, r, bits, co, so, lo);
  else if (t == torch::kHalf) quant_impl<at::Half>(keys, ch, r, bits, co, so, lo);
  else if (t == torch::kFloat) quant_impl<float>(keys, ch, r, bits, co, so, lo);
  else TORCH_CHECK(false, "keys: fp32, bf16 or fp16");
  return {codes, scale, low};
}

// Native bf16 linear for a few activation rows (decode GEMVs) on CPU, AVX512-BF16. Loaded by
// cpp_ext.py through accel/kernels/_cpp.py; see cpp_ext.py for the design.
//
// The op accel::dense_linear is defined and implemented here (TORCH_LIBRARY_FRAGMENT +
// TORCH_LIBRARY_IMPL CPU), so a compiled graph calls it through the C++ dispatcher with no Python
// body; its fake (shape) implementation is registered from Python (cpp_ext.py).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define DL_SIMD 1
#endif

// Activation rows the kernel takes per call; above it (prefill) torch's GEMM (AMX / oneDNN) wins.
static constexpr int64_t MAX_ROWS = 8;

bool simd_available() {
#ifdef DL_SIMD
  return true;
#else
  return false;
#endif
}

#ifdef DL_SIMD
// The 16-lane sums of R accumulators (R = 1, 4 or 8), R floats in out: halves added, then a
// horizontal-add tree, so 8 row sums cost ~20 instructions instead of 8 full reductions.
static inline __m256 half_sum(__m512 a) {
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
}

static inline __m256 sum4x(const __m512* a) {
  // Per 128-bit lane: [s0 s1 s2 s3] of lane 0 | [s0 s1 s2 s3] of lane 1.
  const __m256 h01 = _mm256_hadd_ps(half_sum(a[0]), half_sum(a[1]));
  const __m256 h23 = _mm256_hadd_ps(half_sum(a[2]), half_sum(a[3]));
  return _mm256_hadd_ps(h01, h23);
}

template <int R>
static inline void hsum(const __m512 (&acc)[R], float (&out)[R]) {
  if constexpr (R == 8) {
    const __m256 lo = sum4x(acc), hi = sum4x(acc + 4);
    const __m256 s = _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
    _mm256_storeu_ps(out, s);
  } else if constexpr (R == 4) {
    const __m256 t = sum4x(acc);
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
  } else {
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
  }
}

// MB activation rows (x, row stride K) against R weight rows starting at row n: y[m, n + r].
// 32 bf16 per step: one load of each weight row feeds MB dot instructions.
template <int MB, int R>
static inline void block(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, int64_t n, const float* bias,
                         uint16_t* y) {
  __m512 acc[MB][R];
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* wr = w + n * K;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + r * K + k);
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
    }
  }
  if (k < K) {
    // Tail of K % 32 columns: masked loads read zeros past the row's end.
    const __mmask32 km = (__mmask32)((1ull << (K - k)) - 1);
    __m512bh xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = (__m512bh)_mm512_maskz_loadu_epi16(km, x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(km, wr + r * K + k);
      for (int m = 0; m < MB; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv, xv[m]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float s[R];
    hsum<R>(acc[m], s);
    for (int r = 0; r < R; ++r) {
      const float v = s[r] + (bias ? bias[n + r] : 0.f);
      // Round to nearest even, as at::BFloat16 does.
      y[m * N + n + r] = c10::BFloat16(v).x;
    }
  }
}

template <int MB>
static void rows(const uint16_t* x, const uint16_t* w, int64_t K, int64_t N, int64_t r0, int64_t r1, const float* bias,
                 uint16_t* y) {
  constexpr int R = MB == 1 ? 8 : 4;
  int64_t n = r0;
  for (; n + R <= r1; n += R) block<MB, R>(x, w, K, N, n, bias, y);
  for (; n < r1; ++n) block<MB, 1>(x, w, K, N, n, bias, y);
}
#endif

// x: [..., K] bf16, weight: [N, K] bf16, bias: [N] bf16 or None -> [..., N] bf16, fp32 accumulation.
// Anything else (other dtypes, more than MAX_ROWS rows, no AVX512-BF16) runs at::linear.
torch::Tensor dense_linear(const torch::Tensor& x, const torch::Tensor& weight, const std::optional<torch::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2, "accel::dense_linear: weight must be 2-D, got ", weight.dim(), "-D");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == weight.size(1), "accel::dense_linear: x has ", x.size(-1),
              " features, weight expects ", weight.size(1));
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), "accel::dense_linear: bias shape");
  const int64_t K = weight.size(1), N = weight.size(0), M = K ? x.numel() / K : 0;
  bool fast = simd_available() && x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16 &&
              (!has_bias || bias->scalar_type() == at::kBFloat16) && M >= 1 && M <= MAX_ROWS && K >= 1 &&
              x.device().is_cpu() && weight.device().is_cpu();
  if (!fast) return at::linear(x, weight, has_bias ? *bias : torch::Tensor());
#ifdef DL_SIMD
  auto xc = x.reshape({M, K}).contiguous();
  auto wc = weight.contiguous();
  torch::Tensor bf;
  if (has_bias) bf = bias->to(at::kFloat).contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = torch::empty(shape, x.options());
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const float* bp = has_bias ? bf.data_ptr<float>() : nullptr;
  // A thread gets at least ~64 KiB of weights: below that the fork/join costs more than it saves.
  const int64_t grain = std::max<int64_t>(8, (int64_t)65536 / std::max<int64_t>(1, 2 * K));
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
      const uint16_t* xm = xp + m0 * K;
      uint16_t* ym = yp + m0 * N;
      switch (std::min<int64_t>(4, M - m0)) {
        case 1: rows<1>(xm, wp, K, N, r0, r1, bp, ym); break;
        case 2: rows<2>(xm, wp, K, N, r0, r1, bp, ym); break;
        case 3: rows<3>(xm, wp, K, N, r0, r1, bp, ym); break;
        default: rows<4>(xm, wp, K, N, r0, r1, bp, ym);
      }
    }
  });
  return y;
#else
  return at::linear(x, weight, has_bias ? *bias : torch::Tensor());
#endif
}

int64_t max_rows() { return MAX_ROWS; }

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(accel, CPU, m) {
  m.impl("dense_linear", &dense_linear);
}

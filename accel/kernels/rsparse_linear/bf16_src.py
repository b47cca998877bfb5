"""C++ source of the bf16 R-Sparse decode kernel and of the `accel::rsparse_decode` C++ op.

Appended to cpp_ext.py's fp32 source and built with it (one extension). The design is in
cpp_ext.py's docstring; this file is only the text the compiler sees.
"""

SRC = r"""
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define RS_SIMD 1
#else
#define RS_SIMD 0
#endif

bool bf16_simd() { return RS_SIMD != 0; }

#if RS_SIMD
// 16 bf16 (bit patterns) -> 16 fp32, exact.
static inline __m512 bf16_f32(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }

struct Tok {
  const uint16_t* wt;   // bf16 [in, n]
  const uint16_t* upt;  // bf16 [r, n] or null
  const uint16_t* bias; // bf16 [n] or null
  const int32_t* idx;   // active channels, k of them
  const uint32_t* xp;   // their bf16 values two per word: xp[p] = x[idx[2p]] | x[idx[2p+1]] << 16
  const float* t;       // [r] fp32: down . x_rest
  int64_t n, k, r;
  uint16_t* y;          // bf16 [n]
};

// Columns cb .. cb + 32 * NC (the last chunk masked to n): sparse rows two at a time through
// vdpbf16ps, then the low-rank rows and the bias in fp32, one rounding to bf16 at the store.
// unpacklo/hi of rows (a, b) pair a[c] with b[c] per 32-bit lane, so lo accumulates columns
// 8L + 0..3 of each 128-bit lane L and hi columns 8L + 4..7; two vpermt2ps restore the order.
template <int NC>
static void block(const Tok& a, int64_t cb) {
  __m512 lo[NC], hi[NC];
  __mmask32 m[NC];
  for (int c = 0; c < NC; ++c) {
    lo[c] = _mm512_setzero_ps();
    hi[c] = _mm512_setzero_ps();
    const int64_t left = a.n - cb - 32 * c;
    m[c] = left >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << left) - 1);
  }
  const uint16_t* w = a.wt + cb;
  const int64_t pairs = a.k / 2;
  for (int64_t p = 0; p < pairs; ++p) {
    const uint16_t* r0 = w + (int64_t)a.idx[2 * p] * a.n;
    const uint16_t* r1 = w + (int64_t)a.idx[2 * p + 1] * a.n;
    const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)a.xp[p]);
    for (int c = 0; c < NC; ++c) {
      const __m512i u = _mm512_maskz_loadu_epi16(m[c], r0 + 32 * c);
      const __m512i v = _mm512_maskz_loadu_epi16(m[c], r1 + 32 * c);
      lo[c] = _mm512_dpbf16_ps(lo[c], (__m512bh)_mm512_unpacklo_epi16(u, v), xv);
      hi[c] = _mm512_dpbf16_ps(hi[c], (__m512bh)_mm512_unpackhi_epi16(u, v), xv);
    }
  }
  if (a.k & 1) {
    // The odd last row pairs with zeros (its partner value in xp is 0 too).
    const uint16_t* r0 = w + (int64_t)a.idx[a.k - 1] * a.n;
    const __m512bh xv = (__m512bh)_mm512_set1_epi32((int)a.xp[pairs]);
    const __m512i z = _mm512_setzero_si512();
    for (int c = 0; c < NC; ++c) {
      const __m512i u = _mm512_maskz_loadu_epi16(m[c], r0 + 32 * c);
      lo[c] = _mm512_dpbf16_ps(lo[c], (__m512bh)_mm512_unpacklo_epi16(u, z), xv);
      hi[c] = _mm512_dpbf16_ps(hi[c], (__m512bh)_mm512_unpackhi_epi16(u, z), xv);
    }
  }
  const __m512i p0 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i p1 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int c = 0; c < NC; ++c) {
    const __m512 o0 = _mm512_permutex2var_ps(lo[c], p0, hi[c]);
    const __m512 o1 = _mm512_permutex2var_ps(lo[c], p1, hi[c]);
    lo[c] = o0;
    hi[c] = o1;
  }
  for (int64_t j = 0; j < a.r; ++j) {
    const __m512 tv = _mm512_set1_ps(a.t[j]);
    const uint16_t* ur = a.upt + j * a.n + cb;
    for (int c = 0; c < NC; ++c) {
      const __m512i u = _mm512_maskz_loadu_epi16(m[c], ur + 32 * c);
      lo[c] = _mm512_fmadd_ps(tv, bf16_f32(_mm512_castsi512_si256(u)), lo[c]);
      hi[c] = _mm512_fmadd_ps(tv, bf16_f32(_mm512_extracti64x4_epi64(u, 1)), hi[c]);
    }
  }
  for (int c = 0; c < NC; ++c) {
    if (a.bias) {
      const __m512i u = _mm512_maskz_loadu_epi16(m[c], a.bias + cb + 32 * c);
      lo[c] = _mm512_add_ps(lo[c], bf16_f32(_mm512_castsi512_si256(u)));
      hi[c] = _mm512_add_ps(hi[c], bf16_f32(_mm512_extracti64x4_epi64(u, 1)));
    }
    uint16_t* yc = a.y + cb + 32 * c;
    _mm256_mask_storeu_epi16(yc, (__mmask16)(m[c] & 0xFFFF), (__m256i)_mm512_cvtneps_pbh(lo[c]));
    _mm256_mask_storeu_epi16(yc + 16, (__mmask16)(m[c] >> 16), (__m256i)_mm512_cvtneps_pbh(hi[c]));
  }
}

static void run_block(const Tok& a, int64_t cb, int nc) {
  switch (nc) {
    case 1: block<1>(a, cb); break;
    case 2: block<2>(a, cb); break;
    case 3: block<3>(a, cb); break;
    case 4: block<4>(a, cb); break;
    case 5: block<5>(a, cb); break;
    case 6: block<6>(a, cb); break;
    case 7: block<7>(a, cb); break;
    default: block<8>(a, cb); break;
  }
}
#endif

// x: bf16 [M, in]; thr: fp32 [in]; wt: bf16 [in, n]; down: bf16 [r, in]; upt: bf16 [r, n]; bias: bf16 [n].
// Each token: S = {i : |x_i| > thr_i}; y = W[:, S] x_S + up (down x_{not S}) + bias, fp32 sums, bf16 out.
// grain: 32-column chunks per thread below which the columns are not split (fork/join costs more).
static torch::Tensor decode_bf16(const torch::Tensor& x, const torch::Tensor& thr, const torch::Tensor& wt,
                                 const torch::Tensor& down, const torch::Tensor& upt, const torch::Tensor& bias,
                                 int64_t grain) {
#if RS_SIMD
  const int64_t M = x.size(0), n_in = wt.size(0), n = wt.size(1), r = down.numel() ? down.size(0) : 0;
  TORCH_CHECK(down.scalar_type() == torch::kBFloat16 || !r, "rsparse_decode: bf16 down expected");
  TORCH_CHECK(!r || (down.size(1) == n_in && upt.dim() == 2 && upt.size(0) == r && upt.size(1) == n &&
                     down.is_contiguous() && upt.is_contiguous() && upt.scalar_type() == torch::kBFloat16),
              "rsparse_decode: down must be [r, in] and up_t [r, out], contiguous bf16");
  TORCH_CHECK(!bias.numel() || (bias.numel() == n && bias.is_contiguous() && bias.scalar_type() == torch::kBFloat16),
              "rsparse_decode: bias must be bf16 [out]");
  auto y = torch::empty({M, n}, wt.options());
  const int64_t pad = (n_in + 31) / 32 * 32;
  std::vector<int32_t> idx(n_in + 1);
  std::vector<uint32_t> xp(n_in / 2 + 1);
  std::vector<uint16_t> xr(pad, 0);
  std::vector<float> t(r > 0 ? r : 1);
  const uint16_t* wp = (const uint16_t*)wt.data_ptr<at::BFloat16>();
  const uint16_t* dp = r ? (const uint16_t*)down.data_ptr<at::BFloat16>() : nullptr;
  const float* tp = thr.data_ptr<float>();
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int64_t row = 0; row < M; ++row) {
    const uint16_t* xrow = (const uint16_t*)x.data_ptr<at::BFloat16>() + row * n_in;
    int64_t k = 0;
    for (int64_t i = 0; i < n_in; i += 16) {
      const __mmask16 lm = n_in - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_in - i)) - 1);
      const __m256i xh = _mm256_maskz_loadu_epi16(lm, xrow + i);
      const __m512 ax = _mm512_abs_ps(bf16_f32(xh));
      const __mmask16 act = _mm512_mask_cmp_ps_mask(lm, ax, _mm512_maskz_loadu_ps(lm, tp + i), _CMP_GT_OQ);
      _mm512_mask_compressstoreu_epi32(idx.data() + k, act, _mm512_add_epi32(iota, _mm512_set1_epi32((int)i)));
      k += __builtin_popcount((unsigned)act);
      _mm256_storeu_si256((__m256i*)(xr.data() + i), _mm256_maskz_mov_epi16((__mmask16)(lm & ~act), xh));
    }
    for (int64_t p = 0; 2 * p < k; ++p) {
      const uint32_t v0 = xrow[idx[2 * p]], v1 = 2 * p + 1 < k ? xrow[idx[2 * p + 1]] : 0u;
      xp[p] = v0 | (v1 << 16);
    }
    // t = down . x_rest (the rest: inactive channels; active ones are zero in xr).
    for (int64_t j = 0; j < r; ++j) {
      const uint16_t* dr = dp + j * n_in;
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < n_in; i += 32) {
        const __mmask32 lm = n_in - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n_in - i)) - 1);
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(lm, dr + i),
                               (__m512bh)_mm512_loadu_si512(xr.data() + i));
      }
      t[j] = _mm512_reduce_add_ps(acc);
    }
    Tok a{wp, r ? (const uint16_t*)upt.data_ptr<at::BFloat16>() : nullptr,
          bias.numel() ? (const uint16_t*)bias.data_ptr<at::BFloat16>() : nullptr,
          idx.data(), xp.data(), t.data(), n, k, r, (uint16_t*)y.data_ptr<at::BFloat16>() + row * n};
    const int64_t chunks = (n + 31) / 32;
    at::parallel_for(0, chunks, grain, [&](int64_t c0, int64_t c1) {
      // Equal blocks of at most 8 chunks (a 1-chunk straggler would redo the row loop for little).
      const int64_t nb = (c1 - c0 + 7) / 8;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t s = c0 + (c1 - c0) * b / nb, e = c0 + (c1 - c0) * (b + 1) / nb;
        run_block(a, s * 32, (int)(e - s));
      }
    });
  }
  return y;
#else
  TORCH_CHECK(false, "rsparse_decode: bf16 needs AVX512-BF16 (this build has none)");
#endif
}

// Prefill split, bf16, fused with the low-rank input: per token, buf[t, :in] = x_S (x where
// |x| > thr_i, else 0) and buf[t, in + j] = bf16(down[j] . x_rest) for j < r, so one GEMM
// buf @ [Wt; Ut] gives the linear. One pass over x, one parallel region (tokens over threads).
void rsparse_split_bf16(torch::Tensor x, torch::Tensor thr, torch::Tensor buf, torch::Tensor down) {
#if RS_SIMD
  const int64_t T = x.size(0), n_in = x.size(1), r = down.numel() ? down.size(0) : 0;
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == torch::kBFloat16 && buf.scalar_type() == torch::kBFloat16 &&
              buf.is_contiguous() && buf.size(0) == T && buf.size(1) == n_in + r && thr.numel() == n_in &&
              thr.scalar_type() == torch::kFloat,
              "rsparse_split: x bf16 [T, in] contiguous, buf bf16 [T, in + r] contiguous, thr fp32 [in]");
  TORCH_CHECK(!r || (down.is_contiguous() && down.scalar_type() == torch::kBFloat16 && down.size(1) == n_in),
              "rsparse_split: down must be bf16 [r, in] contiguous");
  const uint16_t* xp = (const uint16_t*)x.data_ptr<at::BFloat16>();
  uint16_t* bp = (uint16_t*)buf.data_ptr<at::BFloat16>();
  const uint16_t* dp = r ? (const uint16_t*)down.data_ptr<at::BFloat16>() : nullptr;
  const float* tp = thr.data_ptr<float>();
  const int64_t ld = n_in + r, pad = (n_in + 31) / 32 * 32;
  at::parallel_for(0, T, 32, [&](int64_t t0, int64_t t1) {
    std::vector<uint16_t> xr(pad, 0);
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < n_in; i += 16) {
        const __mmask16 lm = n_in - i >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_in - i)) - 1);
        const __m256i xh = _mm256_maskz_loadu_epi16(lm, xp + t * n_in + i);
        const __mmask16 act = _mm512_mask_cmp_ps_mask(lm, _mm512_abs_ps(bf16_f32(xh)), _mm512_maskz_loadu_ps(lm, tp + i),
                                                      _CMP_GT_OQ);
        _mm256_mask_storeu_epi16(bp + t * ld + i, lm, _mm256_maskz_mov_epi16(act, xh));
        _mm256_storeu_si256((__m256i*)(xr.data() + i), _mm256_maskz_mov_epi16((__mmask16)(lm & ~act), xh));
      }
      // Up to 8 rows of down at a time: independent accumulators (one chain was latency-bound,
      // 4x slower at r = 7), each x_rest chunk loaded once for all of them.
      for (int64_t j0 = 0; j0 < r; j0 += 8) {
        const int nj = (int)std::min<int64_t>(8, r - j0);
        __m512 acc[8];
        for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm512_setzero_ps();
        for (int64_t i = 0; i < n_in; i += 32) {
          const __mmask32 lm = n_in - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n_in - i)) - 1);
          const __m512bh xv = (__m512bh)_mm512_loadu_si512(xr.data() + i);
          for (int jj = 0; jj < nj; ++jj)
            acc[jj] = _mm512_dpbf16_ps(acc[jj], (__m512bh)_mm512_maskz_loadu_epi16(lm, dp + (j0 + jj) * n_in + i), xv);
        }
        for (int jj = 0; jj < nj; ++jj) {
          const at::BFloat16 z(_mm512_reduce_add_ps(acc[jj]));
          std::memcpy(bp + t * ld + n_in + j0 + jj, &z, 2);
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "rsparse_split: needs AVX512-BF16 (this build has none)");
#endif
}

// The C++ op accel::rsparse_decode: one or a few decode tokens, fp32 or bf16 (dtype of x, wt).
// x: [M, in]; thr: fp32 [in]; wt: [in, out] contiguous; down: [r, in]; up_t: [r, out]; bias: [out] -> [M, out].
torch::Tensor rsparse_decode(const torch::Tensor& x, const torch::Tensor& thr, const torch::Tensor& wt,
                             const c10::optional<torch::Tensor>& down, const c10::optional<torch::Tensor>& up_t,
                             const c10::optional<torch::Tensor>& bias, int64_t grain) {
  TORCH_CHECK(x.dim() == 2 && wt.dim() == 2 && x.size(1) == wt.size(0), "rsparse_decode: x [M, in] and wt [in, out] expected");
  TORCH_CHECK(x.scalar_type() == wt.scalar_type(), "rsparse_decode: x and wt differ in dtype");
  TORCH_CHECK(wt.is_contiguous() && thr.is_contiguous() && thr.scalar_type() == torch::kFloat && thr.numel() == wt.size(0),
              "rsparse_decode: wt contiguous, thr fp32 [in]");
  const bool has_lr = down.has_value() && down->numel() > 0;
  auto e = x.new_empty({0});
  const torch::Tensor& d = has_lr ? *down : e;
  const torch::Tensor& u = has_lr ? *up_t : e;
  const torch::Tensor& b = bias.has_value() ? *bias : e;
  auto xc = x.contiguous();
  if (x.scalar_type() == torch::kBFloat16) return decode_bf16(xc, thr, wt, d, u, b, grain);
  TORCH_CHECK(x.scalar_type() == torch::kFloat, "rsparse_decode: fp32 or bf16 expected");
  std::vector<torch::Tensor> rows;
  for (int64_t i = 0; i < xc.size(0); ++i)
    rows.push_back(rsparse_gemv_f32(xc[i], thr, wt, d, has_lr ? u.t() : u, b));
  return torch::stack(rows);
}

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def("rsparse_decode(Tensor x, Tensor thr, Tensor wt, Tensor? down, Tensor? up_t, Tensor? bias, int grain) -> Tensor");
}

TORCH_LIBRARY_IMPL(accel, CPU, m) { m.impl("rsparse_decode", &rsparse_decode); }
"""

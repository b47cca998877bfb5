"""C++ source of the bf16 R-Sparse decode kernel, of the `accel::rsparse_decode` C++ op and of the
bf16 prefill's split pass (`rsparse_split_bf16`, `rsparse_prefill_bf16`, `rsparse_pack_down`).

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

// ---- bf16 prefill: one native pass writes the GEMM's input, then one GEMM (at::mm, oneDNN/AMX) ----
// buf[t] = [x_S (x where |x| > thr, else 0) | bf16(down . x_rest) (r values) | zeros to ld], so
// buf @ stacked ([Wt; Ut; zero rows], [ld, out]) is the linear. The mask is a 16-bit integer compare on
// the bf16 bits (see prefill_ge16), 32 channels an instruction. down . x_rest runs on AMX tiles, 16
// tokens at a time (x_rest written to a per-thread 16-row scratch, down pre-packed by
// rsparse_pack_down); without AMX, vdpbf16ps per token.

// The active set as an integer compare: for bf16 b >= 0 (not NaN) and fp32 t, b > t <=> bits(b) >= ge(t),
// ge(t) = (bits(t) >> 16) + 1 for t > 0 (b > t iff b's 16 bits exceed t's top 16: b is t's prefix or more),
// 1 for t == 0 (b > 0), 0 for t < 0 (always), 0xFFFF for NaN t (never, as |x| > NaN is false).
static void prefill_ge16(const float* thr, int64_t n_in, int64_t kin, uint16_t* ge) {
  for (int64_t i = 0; i < kin; ++i) {
    uint16_t g = 0xFFFF;
    if (i < n_in) {
      const float t = thr[i];
      uint32_t bits;
      std::memcpy(&bits, &t, 4);
      g = t != t ? 0xFFFF : (t == 0.0f ? 1 : (t < 0.0f ? 0 : (uint16_t)((bits >> 16) + 1)));
    }
    ge[i] = g;
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && RS_SIMD
#include <sys/syscall.h>
#include <unistd.h>
#define RS_AMX 1
// Linux hands out AMX tile state only on request (once per process; oneDNN asks for it too).
static bool amx_ok() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}
struct alignas(64) TileCfg { uint8_t palette, start_row, res[14]; uint16_t colsb[16]; uint8_t rows[16]; };
#else
#define RS_AMX 0
static bool amx_ok() { return false; }
#endif

bool rsparse_amx() { return RS_AMX && amx_ok(); }

// down bf16 [r, in] -> the AMX B layout [ceil(in/32)][ceil(r/16)][16 k-pairs][16 n][2], zero-padded:
// packed[((kc * NT + nt) * 16 + kp) * 32 + 2 n + e] = down[16 nt + n][32 kc + 2 kp + e].
torch::Tensor rsparse_pack_down(torch::Tensor down) {
  TORCH_CHECK(down.dim() == 2 && down.scalar_type() == torch::kBFloat16, "rsparse_pack_down: bf16 [r, in] expected");
  auto d = down.contiguous();
  const int64_t r = d.size(0), n_in = d.size(1), KC = (n_in + 31) / 32, NT = (r + 15) / 16;
  auto out = torch::zeros({KC * NT * 512}, d.options());
  const uint16_t* s = (const uint16_t*)d.data_ptr<at::BFloat16>();
  uint16_t* o = (uint16_t*)out.data_ptr<at::BFloat16>();
  for (int64_t j = 0; j < r; ++j)
    for (int64_t i = 0; i < n_in; ++i) {
      const int64_t kc = i / 32, kp = (i % 32) / 2, e = i % 2, nt = j / 16, n = j % 16;
      o[((kc * NT + nt) * 16 + kp) * 32 + 2 * n + e] = s[j * n_in + i];
    }
  return out;
}

// x: bf16 [T, in]; thr: fp32 [in]; stacked: bf16 [ld, out], ld >= in + r (rows past in + r zero);
// down: bf16 [r, in]; down_packed: rsparse_pack_down(down) (AMX; may be empty: packed here);
// bias: bf16 [out] or empty; amx: 0 forces the vdpbf16ps low-rank. -> [T, out] bf16.
// The split alone: -> buf bf16 [T, ld] = [x_S | bf16(down . x_rest) | zeros] (the GEMM's input).
torch::Tensor rsparse_split_bf16(torch::Tensor x, torch::Tensor thr, int64_t ld, torch::Tensor down,
                                 torch::Tensor down_packed, int64_t amx) {
#if RS_SIMD
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && thr.scalar_type() == torch::kFloat &&
              thr.is_contiguous() && thr.numel() == x.size(1),
              "rsparse_prefill: x bf16 [T, in], stacked bf16 [ld, out] contiguous, thr fp32 [in]");
  const int64_t T = x.size(0), n_in = x.size(1), r = down.numel() ? down.size(0) : 0;
  TORCH_CHECK(ld >= n_in + r, "rsparse_prefill: stacked has ", ld, " rows, fewer than in + r = ", n_in + r);
  TORCH_CHECK(!r || (down.is_contiguous() && down.scalar_type() == torch::kBFloat16 && down.size(1) == n_in),
              "rsparse_prefill: down must be bf16 [r, in] contiguous");
  const int64_t kin = (n_in + 31) / 32 * 32, KC = kin / 32, NT = (r + 15) / 16;
  const bool use_amx = r && amx && rsparse_amx();
  torch::Tensor dpk;
  if (use_amx) {
    dpk = down_packed.numel() == KC * NT * 512 ? down_packed : rsparse_pack_down(down);
    TORCH_CHECK(dpk.is_contiguous() && dpk.scalar_type() == torch::kBFloat16, "rsparse_prefill: bad down_packed");
  }
  auto xc = x.contiguous();
  auto buf = torch::empty({T, ld}, x.options());
  std::vector<uint16_t> ge(kin);
  prefill_ge16(thr.data_ptr<float>(), n_in, kin, ge.data());
  const uint16_t* xp = (const uint16_t*)xc.data_ptr<at::BFloat16>();
  uint16_t* bp = (uint16_t*)buf.data_ptr<at::BFloat16>();
  const uint16_t* dp = r ? (const uint16_t*)down.data_ptr<at::BFloat16>() : nullptr;
  const uint16_t* pk = use_amx ? (const uint16_t*)dpk.data_ptr<at::BFloat16>() : nullptr;
  const uint16_t* gp = ge.data();
  const int64_t blocks = (T + 15) / 16;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    // Per-thread scratch: x_rest of 16 tokens (zero past `in` and past the last token).
    std::vector<uint16_t> xr(r ? 16 * kin : 0, 0);
    float cb[256];
#if RS_AMX
    if (use_amx) {
      TileCfg cfg{};
      cfg.palette = 1;
      for (int k = 0; k < 3; ++k) { cfg.rows[k] = 16; cfg.colsb[k] = 64; }
      _tile_loadconfig(&cfg);
    }
#endif
    const __m512i sign = _mm512_set1_epi16(0x7FFF), inf = _mm512_set1_epi16(0x7F80);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t t0 = b * 16, nt_rows = std::min<int64_t>(16, T - t0);
      for (int64_t tt = 0; tt < nt_rows; ++tt) {
        const uint16_t* xrow = xp + (t0 + tt) * n_in;
        uint16_t* brow = bp + (t0 + tt) * ld;
        uint16_t* xrr = r ? xr.data() + tt * kin : nullptr;
        for (int64_t i = 0; i < n_in; i += 32) {
          const __mmask32 lm = n_in - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n_in - i)) - 1);
          const __m512i v = _mm512_maskz_loadu_epi16(lm, xrow + i);
          const __m512i ax = _mm512_and_si512(v, sign);
          // |x| >= ge (the fp32 compare, see prefill_ge16) and |x| not NaN.
          const __mmask32 act = _mm512_mask_cmpge_epu16_mask(_mm512_cmple_epu16_mask(ax, inf), ax,
                                                             _mm512_loadu_si512(gp + i));
          _mm512_mask_storeu_epi16(brow + i, lm, _mm512_maskz_mov_epi16(act, v));
          if (r) _mm512_storeu_si512(xrr + i, _mm512_maskz_mov_epi16(~act, v));
        }
        if (ld > n_in + r) std::memset(brow + n_in + r, 0, (ld - n_in - r) * 2);
        if (r && !use_amx) {
          // No AMX: down . x_rest per token, up to 8 rows of down at a time (independent accumulators).
          for (int64_t j0 = 0; j0 < r; j0 += 8) {
            const int nj = (int)std::min<int64_t>(8, r - j0);
            __m512 acc[8];
            for (int jj = 0; jj < 8; ++jj) acc[jj] = _mm512_setzero_ps();
            for (int64_t i = 0; i < n_in; i += 32) {
              const __mmask32 lm = n_in - i >= 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << (n_in - i)) - 1);
              const __m512bh xv = (__m512bh)_mm512_loadu_si512(xrr + i);
              for (int jj = 0; jj < nj; ++jj)
                acc[jj] = _mm512_dpbf16_ps(acc[jj], (__m512bh)_mm512_maskz_loadu_epi16(lm, dp + (j0 + jj) * n_in + i), xv);
            }
            for (int jj = 0; jj < nj; ++jj) {
              const at::BFloat16 z(_mm512_reduce_add_ps(acc[jj]));
              std::memcpy(brow + n_in + j0 + jj, &z, 2);
            }
          }
        }
      }
#if RS_AMX
      if (use_amx) {
        // Rows past the last token: zeros, so the tile product reads no stale values.
        if (nt_rows < 16) std::memset(xr.data() + nt_rows * kin, 0, (16 - nt_rows) * kin * 2);
        for (int64_t nt = 0; nt < NT; ++nt) {
          _tile_zero(0);
          for (int64_t kc = 0; kc < KC; ++kc) {
            _tile_loadd(1, xr.data() + kc * 32, kin * 2);
            _tile_loadd(2, pk + (kc * NT + nt) * 512, 64);
            _tile_dpbf16ps(0, 1, 2);
          }
          _tile_stored(0, cb, 64);
          const int64_t nn = std::min<int64_t>(16, r - nt * 16);
          for (int64_t tt = 0; tt < nt_rows; ++tt)
            for (int64_t n = 0; n < nn; ++n) {
              const at::BFloat16 z(cb[tt * 16 + n]);
              std::memcpy(bp + (t0 + tt) * ld + n_in + nt * 16 + n, &z, 2);
            }
        }
      }
#endif
    }
#if RS_AMX
    if (use_amx) _tile_release();
#endif
  });
  return buf;
#else
  TORCH_CHECK(false, "rsparse_prefill: needs AVX512-BF16 (this build has none)");
#endif
}

torch::Tensor rsparse_prefill_bf16(torch::Tensor x, torch::Tensor thr, torch::Tensor stacked, torch::Tensor down,
                                   torch::Tensor down_packed, torch::Tensor bias, int64_t amx) {
  TORCH_CHECK(stacked.dim() == 2 && stacked.is_contiguous() && stacked.scalar_type() == torch::kBFloat16,
              "rsparse_prefill: x bf16 [T, in], stacked bf16 [ld, out] contiguous, thr fp32 [in]");
  auto buf = rsparse_split_bf16(x, thr, stacked.size(0), down, down_packed, amx);
  return bias.numel() ? at::addmm(bias, buf, stacked) : at::mm(buf, stacked);
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

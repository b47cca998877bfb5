// Native GQSA int4 decode kernels for CPU (AVX-512 BF16 + VBMI): 1-8 activation rows per weight pass.
// gqsa_op.cpp (compiled after this file, one translation unit: cpp_ext.py joins them) holds the host
// entry points, the prefill path and the op registration; see cpp_ext.py for the design.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cstring>
#include <cstdint>
#include <vector>
#if defined(__AVX512BF16__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define GQSA_SIMD 1

// 16 bytes of codes (element e in byte e/2, low nibble first) -> 32 16-bit lanes; the low 4 bits
// of lane e are code e (the rest is the next nibble's bits, masked or ignored by the caller).
static inline __m512i spread32(__m128i bytes) {
  const __m512i lanes = _mm512_set_epi64(1, 1, 1, 1, 0, 0, 0, 0);
  const __m512i ctrl = _mm512_set_epi64(0x3F3C3F383F343F30LL, 0x3F2C3F283F243F20LL, 0x3F1C3F183F143F10LL, 0x3F0C3F083F043F00LL,
                                        0x3F3C3F383F343F30LL, 0x3F2C3F283F243F20LL, 0x3F1C3F183F143F10LL, 0x3F0C3F083F043F00LL);
  return _mm512_multishift_epi64_epi8(ctrl, _mm512_permutexvar_epi64(lanes, _mm512_castsi128_si512(bytes)));
}

// 32 codes -> 32 bf16 lanes holding the integers 0..15 (vpermw reads the low 5 index bits; the
// table repeats, so the stray fifth bit is harmless).
static inline __m512bh codes_bf16(__m128i bytes) {
  const __m512i table = _mm512_set_epi16(
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0,
      0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080, 0x4040, 0x4000, 0x3F80, 0);
  return (__m512bh)_mm512_permutexvar_epi16(spread32(bytes), table);
}

// The exact kernel's codes, as bf16 128 + q (bits 0x4300 | q, exact): the group pair's two 8-byte
// code runs broadcast into the lower / upper four qwords straight from memory, then one
// multishift and one and-or, where codes_bf16 spends three shuffles (the shuffle port bounds this
// kernel). The 128 * sum(x_group) it adds is taken out with the zero point (z + 128).
// two == false: group b's codes read as 0, i.e. 128; its scale lanes are 0 there.
static inline __m512bh codes_bf16_off(const uint8_t* p, bool two) {
  const __m512i ctrl = _mm512_set_epi64(0x3F3C3F383F343F30LL, 0x3F2C3F283F243F20LL, 0x3F1C3F183F143F10LL, 0x3F0C3F083F043F00LL,
                                        0x3F3C3F383F343F30LL, 0x3F2C3F283F243F20LL, 0x3F1C3F183F143F10LL, 0x3F0C3F083F043F00LL);
  long long qa, qb = 0;
  std::memcpy(&qa, p, 8);
  if (two) std::memcpy(&qb, p + 8, 8);
  const __m512i v = _mm512_mask_set1_epi64(_mm512_set1_epi64(qa), (__mmask8)0xF0, qb);
  return (__m512bh)_mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(ctrl, v), _mm512_set1_epi16(0x000F),
                                             _mm512_set1_epi16(0x4300), 0xEA);
}

static inline __m512bh load_x2(const uint16_t* a, const uint16_t* b) {
  return (__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)a)),
                                      _mm256_loadu_si256((const __m256i*)b), 1);
}

// Pair index pattern: lanes 0-7 take element a, lanes 8-15 element b.
static inline __m512i pair_idx(int a, int b) { return _mm512_inserti64x4(_mm512_set1_epi32(a), _mm256_set1_epi32(b), 1); }

// pair_idx(2j, 2j + 1) for j = 0..7 as loads: built in registers they cost 3 uops (one a shuffle)
// per pair, rebuilt every row once the kernel runs out of vector registers.
alignas(64) static const int32_t kPairIdx[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1}, {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5}, {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9}, {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15}};

// r[i] = sum of the 16 lanes of v[i], for 16 vectors at once: 45 uops and no per-row latency chain,
// against ~10 dependent uops per row for _mm512_reduce_add_ps. The additions of a row run in the
// same order whichever slot it takes (so a thread split changes no bit).
static inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44), _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xDD));
}

struct Args {
  const uint16_t *xh, *xl;  // bf16 bits [M, K] (xl: residual of fp32 activations, or == xh)
  const uint16_t* xi;       // bf16 x per chunk of 8 rows, group-major: [chunk][K / 16][rows][16] (table kernel)
  const float* xs;          // fp32 group sums [M, G]
  int64_t K, G, g, nkeep, N;
  const uint8_t* q;         // [N, nkeep * g / 2]
  const uint16_t *sc, *ze;  // fp16 bits [N, nkeep]
  void* y;                  // [M, N] in the output dtype (yk)
  int yk;                   // 0 fp32, 1 bf16, 2 fp16: the kernel rounds once, as y.to(dtype) did
};

static inline void store_y(const Args& a, int64_t i, float v) {
  if (a.yk == 1) static_cast<at::BFloat16*>(a.y)[i] = at::BFloat16(v);
  else if (a.yk == 2) static_cast<at::Half*>(a.y)[i] = at::Half(v);
  else static_cast<float*>(a.y)[i] = v;
}

// g == 16, 1-2 activation rows or fp32 activations: integer codes, fp32 scales.
// One block = 16 kept groups (FULL) or the row's last kn < 16; lanes past kn load scale 0, so a
// padded last pair adds nothing.
template <int MB, bool LO, bool FULL, int U>
static inline void block_exact16(const Args& a, const int32_t* cidx, const uint16_t* sr, const uint16_t* zr,
                                 const uint8_t* qr, const uint16_t* xh, const uint16_t* xl, const float* xs, int64_t k,
                                 int kn, __m512 (&acc)[MB][U], __m512 (&zacc)[MB], float (&zt)[MB]) {
  const __mmask16 km = FULL ? (__mmask16)0xFFFF : (__mmask16)((1u << kn) - 1);
  const __m512i c16 = FULL ? _mm512_loadu_si512(cidx + k) : _mm512_maskz_loadu_epi32(km, cidx + k);
  const __m256i sh = FULL ? _mm256_loadu_si256((const __m256i*)(sr + k)) : _mm256_maskz_loadu_epi16(km, sr + k);
  const __m256i zh = FULL ? _mm256_loadu_si256((const __m256i*)(zr + k)) : _mm256_maskz_loadu_epi16(km, zr + k);
  const __m512 s16 = _mm512_cvtph_ps(sh);
  // bf16 activations: the codes arrive as 128 + q (codes_bf16_off), so the zero point is z + 128.
  // fp32 (hi + lo) keeps q itself: the offset's cancellation cost ~6x its logits' precision
  // (SmolLM2 fp32 logits vs the reference 1.2e-4 -> 7.7e-4).
  constexpr float OFF = LO ? 0.f : 128.f;
  const __m512 sz16 = _mm512_mul_ps(s16, _mm512_add_ps(_mm512_cvtph_ps(zh), _mm512_set1_ps(OFF)));
  if (FULL) {
    for (int m = 0; m < MB; ++m) zacc[m] = _mm512_fmadd_ps(sz16, _mm512_i32gather_ps(c16, xs + m * a.G, 4), zacc[m]);
  } else {
    // A short tail: scalar math beats a masked gather, whose cost does not shrink with the mask
    // (and a vector built through memory would stall on store forwarding).
    for (int j = 0; j < kn; ++j) {
      const float sz = _cvtsh_ss(sr[k + j]) * (_cvtsh_ss(zr[k + j]) + OFF);
      for (int m = 0; m < MB; ++m) zt[m] += sz * xs[m * a.G + cidx[k + j]];
    }
  }
  const int np = FULL ? 8 : (kn + 1) / 2;
#pragma GCC unroll 8
  for (int j = 0; j < np; ++j) {
    const bool two = FULL || 2 * j + 1 < kn;
    const int64_t ka = k + 2 * j, kb = two ? ka + 1 : ka;
    const __m512bh w = LO ? codes_bf16(two ? _mm_loadu_si128((const __m128i*)(qr + ka * 8))
                                           : _mm_loadl_epi64((const __m128i*)(qr + ka * 8)))
                          : codes_bf16_off(qr + ka * 8, two);
    const __m512 sv = _mm512_permutexvar_ps(_mm512_load_si512(kPairIdx[j]), s16);
    const int64_t oa = (int64_t)cidx[ka] * 16, ob = (int64_t)cidx[kb] * 16;
    for (int m = 0; m < MB; ++m) {
      __m512 d = _mm512_dpbf16_ps(_mm512_setzero_ps(), w, load_x2(xh + m * a.K + oa, xh + m * a.K + ob));
      if (LO) d = _mm512_dpbf16_ps(d, w, load_x2(xl + m * a.K + oa, xl + m * a.K + ob));
      acc[m][j % U] = _mm512_fmadd_ps(d, sv, acc[m][j % U]);
    }
  }
}

// Defer (MB == 1): the row's lanes go to *vout and its scalar tail term to *zout; the caller
// reduces 16 rows at once (reduce16).
struct Defer {
  __m512* vout;
  float* zout;
};

template <int MB, bool LO, bool DEFER = false>
static inline __attribute__((always_inline)) void rows_exact16(const Args& a, const int32_t* cidx, int64_t r, int64_t m0,
                                                               Defer df = {}) {
  constexpr int U = MB == 1 ? 2 : 1;
  const int64_t nk = a.nkeep;
  const uint16_t* sr = a.sc + r * nk;
  const uint16_t* zr = a.ze + r * nk;
  const uint8_t* qr = a.q + r * nk * 8;
  const uint16_t* xh = a.xh + m0 * a.K;
  const uint16_t* xl = a.xl + m0 * a.K;
  const float* xs = a.xs + m0 * a.G;
  __m512 acc[MB][U], zacc[MB];
  float zt[MB];
  for (int m = 0; m < MB; ++m) {
    zacc[m] = _mm512_setzero_ps();
    zt[m] = 0.f;
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  }
  int64_t k = 0;
  for (; k + 16 <= nk; k += 16) block_exact16<MB, LO, true, U>(a, cidx, sr, zr, qr, xh, xl, xs, k, 16, acc, zacc, zt);
  if (k < nk) block_exact16<MB, LO, false, U>(a, cidx, sr, zr, qr, xh, xl, xs, k, (int)(nk - k), acc, zacc, zt);
  for (int m = 0; m < MB; ++m) {
    __m512 t = acc[m][0];
    for (int u = 1; u < U; ++u) t = _mm512_add_ps(t, acc[m][u]);
    if constexpr (DEFER) {
      *df.vout = _mm512_sub_ps(t, zacc[m]);
      *df.zout = zt[m];
    } else {
      store_y(a, (m0 + m) * a.N + r, _mm512_reduce_add_ps(_mm512_sub_ps(t, zacc[m])) - zt[m]);
    }
  }
}

// g == 16, 3-8 bf16 activation rows: a bf16 (q - z) * s table per pair of groups, one dot per row.
template <int MB>
static inline __attribute__((always_inline)) void rows_table16(const Args& a, const int32_t* cidx, int64_t r, int64_t m0) {
  const int64_t nk = a.nkeep;
  const uint16_t* sr = a.sc + r * nk;
  const uint16_t* zr = a.ze + r * nk;
  const uint8_t* qr = a.q + r * nk * 8;
  // Group-major x: the MB rows' 16 values of one group are adjacent (fewer cache lines per pair).
  const uint16_t* xi = a.xi + m0 * a.K;
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // +16 on the upper 16 lanes selects table b; the low nibble selects the entry.
  const __m512i hi16 = _mm512_set_epi64(0x0010001000100010LL, 0x0010001000100010LL, 0x0010001000100010LL,
                                        0x0010001000100010LL, 0, 0, 0, 0);
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nk; k += 16) {
    const int kn = (int)std::min<int64_t>(16, nk - k);
    const __mmask16 km = (__mmask16)((1u << kn) - 1);
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, sr + k));
    const __m512 sz16 = _mm512_mul_ps(s16, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, zr + k)));
    auto pair = [&](int j, bool full) {
      const int64_t ka = k + 2 * j, kb = full ? ka + 1 : ka;
      const __m128i bytes = full ? _mm_loadu_si128((const __m128i*)(qr + ka * 8)) : _mm_loadl_epi64((const __m128i*)(qr + ka * 8));
      const __m512i ia = _mm512_set1_epi32(2 * j), ib = _mm512_set1_epi32(2 * j + 1);
      const __m512 ta = _mm512_fmsub_ps(iota, _mm512_permutexvar_ps(ia, s16), _mm512_permutexvar_ps(ia, sz16));
      const __m512 tb = _mm512_fmsub_ps(iota, _mm512_permutexvar_ps(ib, s16), _mm512_permutexvar_ps(ib, sz16));
      const __m512i table = (__m512i)_mm512_cvtne2ps_pbh(tb, ta);
      const __m512i idx = _mm512_ternarylogic_epi32(spread32(bytes), _mm512_set1_epi16(0x000F), hi16, 0xEA);
      const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table);
      const int64_t oa = (int64_t)cidx[ka] * MB * 16, ob = (int64_t)cidx[kb] * MB * 16;
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_dpbf16_ps(acc[m], w, load_x2(xi + oa + m * 16, xi + ob + m * 16));
    };
    if (kn == 16) {
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) pair(j, true);
    } else {
      for (int j = 0; 2 * j < kn; ++j) pair(j, 2 * j + 1 < kn);
    }
  }
  for (int m = 0; m < MB; ++m) store_y(a, (m0 + m) * a.N + r, _mm512_reduce_add_ps(acc[m]));
}

// g % 32 == 0: each kept group is g/32 chunks of 32 codes under one scale.
template <int MB, bool LO, bool DEFER = false>
static inline __attribute__((always_inline)) void rows_exact32(const Args& a, const int32_t* cidx, int64_t r, int64_t m0,
                                                               Defer df = {}) {
  const int64_t nk = a.nkeep, g = a.g, nc = g / 32;
  const uint16_t* sr = a.sc + r * nk;
  const uint16_t* zr = a.ze + r * nk;
  const uint8_t* qr = a.q + r * nk * (g / 2);
  const uint16_t* xh = a.xh + m0 * a.K;
  const uint16_t* xl = a.xl + m0 * a.K;
  const float* xs = a.xs + m0 * a.G;
  __m512 acc[MB], zacc[MB];
  float zt[MB];
  for (int m = 0; m < MB; ++m) { acc[m] = zacc[m] = _mm512_setzero_ps(); zt[m] = 0.f; }
  for (int64_t k = 0; k < nk; k += 16) {
    const int kn = (int)std::min<int64_t>(16, nk - k);
    const __mmask16 km = (__mmask16)((1u << kn) - 1);
    const __m512i c16 = _mm512_maskz_loadu_epi32(km, cidx + k);
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, sr + k));
    const __m512 sz16 = _mm512_mul_ps(s16, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, zr + k)));
    if (kn == 16) {
      for (int m = 0; m < MB; ++m) zacc[m] = _mm512_fmadd_ps(sz16, _mm512_i32gather_ps(c16, xs + m * a.G, 4), zacc[m]);
    } else {
      for (int j = 0; j < kn; ++j) {  // a short tail: scalar, as in block_exact16
        const float sz = _cvtsh_ss(sr[k + j]) * _cvtsh_ss(zr[k + j]);
        for (int m = 0; m < MB; ++m) zt[m] += sz * xs[m * a.G + cidx[k + j]];
      }
    }
    for (int j = 0; j < kn; ++j) {
      const __m512 sv = _mm512_permutexvar_ps(_mm512_set1_epi32(j), s16);
      const int64_t o = (int64_t)cidx[k + j] * g;
      const uint8_t* qg = qr + (k + j) * (g / 2);
      __m512 d[MB];
      for (int m = 0; m < MB; ++m) d[m] = _mm512_setzero_ps();
      for (int64_t t = 0; t < nc; ++t) {
        const __m512bh w = codes_bf16(_mm_loadu_si128((const __m128i*)(qg + t * 16)));
        for (int m = 0; m < MB; ++m) {
          d[m] = _mm512_dpbf16_ps(d[m], w, (__m512bh)_mm512_loadu_si512(xh + m * a.K + o + t * 32));
          if (LO) d[m] = _mm512_dpbf16_ps(d[m], w, (__m512bh)_mm512_loadu_si512(xl + m * a.K + o + t * 32));
        }
      }
      for (int m = 0; m < MB; ++m) acc[m] = _mm512_fmadd_ps(d[m], sv, acc[m]);
    }
  }
  if constexpr (DEFER) {
    *df.vout = _mm512_sub_ps(acc[0], zacc[0]);
    *df.zout = zt[0];
  } else {
    for (int m = 0; m < MB; ++m) store_y(a, (m0 + m) * a.N + r, _mm512_reduce_add_ps(_mm512_sub_ps(acc[m], zacc[m])) - zt[m]);
  }
}

// Decode one row's bitmap into kept group indices (ascending), 16 groups per step; false if the
// row does not keep exactly nkeep groups below G. `out` needs nkeep + 16 slots.
static bool decode_row(const uint8_t* mr, int64_t mw, int64_t nkeep, int64_t G, int32_t* out) {
  int64_t n = 0;
  for (int64_t b = 0; b < mw; b += 2) {
    const unsigned bits = mr[b] | (b + 1 < mw ? (unsigned)mr[b + 1] << 8 : 0u);
    const int cnt = __builtin_popcount(bits);
    if (n + cnt > nkeep) return false;
    const __m512i ids = _mm512_add_epi32(_mm512_set1_epi32((int)(b * 8)),
                                         _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
    _mm512_storeu_si512(out + n, _mm512_maskz_compress_epi32((__mmask16)bits, ids));
    n += cnt;
  }
  return n == nkeep && (nkeep == 0 || out[nkeep - 1] < G);
}

// Activation rows [m0, m0 + MB) against weight rows [r0, r1), the row kernel inlined into the loop:
// its constant vectors are built once per range and a row's reduction overlaps the next row (a call
// per row cost ~40% of a g16 GEMV in prologue, constants and a reduction that could not overlap).
// Two index buffers: row r+1 is decoded before row r runs, so the wide stores have retired by the
// time their lanes are read back one by one (a store-forwarding stall otherwise).
template <int MB, int KIND>
static void range_rows(const Args& a, const uint8_t* cm, int64_t mw, int64_t r0, int64_t r1, int64_t m0,
                       int32_t* cur, int32_t* nxt, std::atomic<int64_t>& bad_row) {
  if (!decode_row(cm + r0 * mw, mw, a.nkeep, a.G, cur)) { bad_row = r0; return; }
  if constexpr (MB == 1 && KIND != 2) {
    // One activation row: rows' lanes are kept 16 at a time and reduced together.
    __m512 v[16];
    alignas(64) float zt[16], out[16];
    for (int64_t rb = r0; rb < r1; rb += 16) {
      const int n = (int)std::min<int64_t>(16, r1 - rb);
      for (int i = 0; i < n; ++i) {
        const int64_t r = rb + i;
        if (r + 1 < r1 && !decode_row(cm + (r + 1) * mw, mw, a.nkeep, a.G, nxt)) { bad_row = r + 1; return; }
        const Defer df{v + i, zt + i};
        if constexpr (KIND == 0) rows_exact16<1, false, true>(a, cur, r, m0, df);
        else if constexpr (KIND == 1) rows_exact16<1, true, true>(a, cur, r, m0, df);
        else if constexpr (KIND == 3) rows_exact32<1, false, true>(a, cur, r, m0, df);
        else rows_exact32<1, true, true>(a, cur, r, m0, df);
        std::swap(cur, nxt);
      }
      for (int i = n; i < 16; ++i) v[i] = _mm512_setzero_ps();
      _mm512_store_ps(out, reduce16(v));
      for (int i = 0; i < n; ++i) store_y(a, m0 * a.N + rb + i, out[i] - zt[i]);
    }
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    if (r + 1 < r1 && !decode_row(cm + (r + 1) * mw, mw, a.nkeep, a.G, nxt)) { bad_row = r + 1; return; }
    if constexpr (KIND == 0) rows_exact16<MB, false>(a, cur, r, m0);
    else if constexpr (KIND == 1) rows_exact16<MB, true>(a, cur, r, m0);
    else if constexpr (KIND == 2) rows_table16<MB>(a, cur, r, m0);
    else if constexpr (KIND == 3) rows_exact32<MB, false>(a, cur, r, m0);
    else rows_exact32<MB, true>(a, cur, r, m0);
    std::swap(cur, nxt);
  }
}

// g == 16: the exact kernel for fp32 activations (hi + lo) and 1-2 bf16 rows, the table kernel for
// 3-8 bf16 rows; g % 32 == 0: the exact kernel.
template <int MB>
static void run_range(const Args& a, bool lo, const uint8_t* cm, int64_t mw, int64_t r0, int64_t r1, int64_t m0,
                      int32_t* cur, int32_t* nxt, std::atomic<int64_t>& bad_row) {
  if (a.g == 16) {
    if (lo) range_rows<MB, 1>(a, cm, mw, r0, r1, m0, cur, nxt, bad_row);
    else if constexpr (MB <= 2) range_rows<MB, 0>(a, cm, mw, r0, r1, m0, cur, nxt, bad_row);
    else range_rows<MB, 2>(a, cm, mw, r0, r1, m0, cur, nxt, bad_row);
  } else {
    if (lo) range_rows<MB, 4>(a, cm, mw, r0, r1, m0, cur, nxt, bad_row);
    else range_rows<MB, 3>(a, cm, mw, r0, r1, m0, cur, nxt, bad_row);
  }
}

#endif  // GQSA_SIMD

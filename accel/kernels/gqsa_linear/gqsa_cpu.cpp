// Native GQSA int4 kernels for CPU (AVX-512 BF16 + VBMI). Loaded by cpp_ext.py through
// accel/kernels/_cpp.py; see cpp_ext.py for the design and the Python entry points.
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

// 16 codes (8 bytes) -> 16 fp32 integers.
static inline __m512 codes16_f32(const uint8_t* p) {
  const __m128i ctrl = _mm_set_epi64x(0x3C3834302C282420LL, 0x1C1814100C080400LL);
  const __m128i b = _mm_and_si128(_mm_multishift_epi64_epi8(ctrl, _mm_set1_epi64x(*(const long long*)p)), _mm_set1_epi8(0x0F));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}
#endif

bool simd_available() {
#ifdef GQSA_SIMD
  return true;
#else
  return false;
#endif
}

// Kept groups x activation rows (fp32 activations count twice: hi + lo) from which gqsa_mm splits
// rows over threads: ~2 ns each at one row, so below this a fork/join would cost more than half.
static constexpr int64_t kParallelWork = 8192;

// x: [M, K] fp32 or bf16; q: uint8 [N, nkeep * g / 2]; colmask: uint8 [N, ceil(G / 8)] (bit j of byte b:
// group 8b + j kept); scales, zeros: fp16 [N, nkeep]. Returns [M, N] in x's dtype (fp32 accumulation).
torch::Tensor gqsa_mm(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& colmask, const torch::Tensor& sc,
                      const torch::Tensor& ze, int64_t g) {
#ifndef GQSA_SIMD
  TORCH_CHECK(false, "accel GQSA C++ kernel built without AVX512-BF16/VBMI");
  return x;
#else
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && colmask.dim() == 2 && sc.dim() == 2 && ze.dim() == 2, "2-D tensors expected");
  TORCH_CHECK(q.scalar_type() == torch::kByte && colmask.scalar_type() == torch::kByte, "qweight / colmask must be uint8");
  TORCH_CHECK(sc.scalar_type() == torch::kHalf && ze.scalar_type() == torch::kHalf, "scales / zeros must be fp16");
  TORCH_CHECK(q.is_contiguous() && colmask.is_contiguous() && sc.is_contiguous() && ze.is_contiguous(), "contiguous weights");
  TORCH_CHECK(g == 16 || (g > 0 && g % 32 == 0), "group size must be 16 or a multiple of 32");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), nkeep = sc.size(1);
  TORCH_CHECK(K % g == 0, "in_features not a multiple of the group size");
  const int64_t G = K / g, mw = colmask.size(1);
  TORCH_CHECK(colmask.size(0) == N && mw == (G + 7) / 8, "colmask shape");
  TORCH_CHECK(sc.size(0) == N && ze.sizes() == sc.sizes() && q.size(1) == nkeep * g / 2, "weight shapes disagree");
  const bool lo = x.scalar_type() != torch::kBFloat16;
  // One pass over x: bf16 bits (bf16 input is used in place), the bf16 residual of other dtypes,
  // and exact fp32 group sums for the zero-point term.
  auto xc = x.contiguous();
  // Scratch in plain vectors (a torch::empty costs ~1 us, against GEMVs of 5-60 us at decode).
  std::vector<float> xsv(M * G);
  float* xsp = xsv.data();
  std::vector<uint16_t> xhv, xlv;
  const uint16_t *xhp, *xlp;
  if (!lo) {
    const at::BFloat16* xp = xc.data_ptr<at::BFloat16>();
    for (int64_t i = 0; i < M * G; ++i) {
      float t = 0.f;
      for (int64_t e = 0; e < g; ++e) t += (float)xp[i * g + e];
      xsp[i] = t;
    }
    xhp = xlp = reinterpret_cast<const uint16_t*>(xp);
  } else {
    auto xf = xc.to(torch::kFloat).contiguous();
    xhv.resize(M * K);
    xlv.resize(M * K);
    const float* xp = xf.data_ptr<float>();
    at::BFloat16* hp = reinterpret_cast<at::BFloat16*>(xhv.data());
    at::BFloat16* lp = reinterpret_cast<at::BFloat16*>(xlv.data());
    for (int64_t i = 0; i < M * G; ++i) {
      float t = 0.f;
      for (int64_t e = 0; e < g; ++e) {
        const float v = xp[i * g + e];
        const at::BFloat16 h(v);
        hp[i * g + e] = h;
        lp[i * g + e] = at::BFloat16(v - (float)h);
        t += v;
      }
      xsp[i] = t;
    }
    xhp = xhv.data();
    xlp = xlv.data();
  }
  // The table kernel (bf16, g == 16, chunks of 3-8 rows) reads x group-major per chunk.
  std::vector<uint16_t> xiv;
  const uint16_t* xip = xhp;
  if (!lo && g == 16 && M >= 3) {
    xiv.resize(M * K);
    uint16_t* dst = xiv.data();
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      const int64_t mb = std::min<int64_t>(8, M - m0);
      for (int64_t u = 0; u < K / 16; ++u)
        for (int64_t m = 0; m < mb; ++m)
          std::memcpy(dst + m0 * K + (u * mb + m) * 16, xhp + (m0 + m) * K + u * 16, 32);
    }
    xip = dst;
  }
  // The output in x's dtype, rounded once by the kernel (the same bits as fp32 then .to(dtype)).
  const auto xt = x.scalar_type();
  const int yk = xt == torch::kBFloat16 ? 1 : xt == torch::kHalf ? 2 : 0;
  auto y = torch::empty({M, N}, torch::dtype(yk == 0 ? torch::kFloat : xt));
  Args a{xhp, xlp, xip, xsp, K, G, g, nkeep, N, q.data_ptr<uint8_t>(),
         reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), reinterpret_cast<const uint16_t*>(ze.data_ptr<at::Half>()),
         y.data_ptr(), yk};
  const uint8_t* cm = colmask.data_ptr<uint8_t>();
  std::atomic<int64_t> bad_row{-1};
  // A second thread only when the matrix is big enough to pay its fork/join (a few us): below
  // kParallelWork kept groups x rows of x, one thread runs all rows.
  const int64_t work = N * std::max<int64_t>(nkeep, 1) * (lo ? 2 * M : M);
  const int64_t grain = work < kParallelWork ? N : 16;
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> buf(2 * (nkeep + 32), 0);
    int32_t* cur = buf.data();
    int32_t* nxt = buf.data() + nkeep + 32;
    for (int64_t m0 = 0; m0 < M && bad_row.load() < 0; m0 += 8) {
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: run_range<1>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 2: run_range<2>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 3: run_range<3>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 4: run_range<4>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 5: run_range<5>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 6: run_range<6>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        case 7: run_range<7>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row); break;
        default: run_range<8>(a, lo, cm, mw, r0, r1, m0, cur, nxt, bad_row);
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "GQSA column bitmap of row ", bad_row.load(), " does not hold ", nkeep, " groups below ", G);
  return yk == 0 && xt != torch::kFloat ? y.to(xt) : y;
#endif
}

// Rows [r0, r0 + out.size(0)) of the dense weight into `out` ([n, K] fp32 or bf16, pruned groups
// zero), for large batches: a reused block buffer, then a dense GEMM on it. Same rounding as the
// reference: (q - z) * s in fp32, then out's dtype.
void gqsa_dequant_rows(const torch::Tensor& q, const torch::Tensor& colmask, const torch::Tensor& sc, const torch::Tensor& ze,
                       int64_t g, int64_t r0, const torch::Tensor& out) {
#ifndef GQSA_SIMD
  TORCH_CHECK(false, "accel GQSA C++ kernel built without AVX512-BF16/VBMI");
#else
  const int64_t K = out.size(1), n = out.size(0);
  TORCH_CHECK(g % 16 == 0 && K % g == 0, "group size must be a multiple of 16 dividing in_features");
  TORCH_CHECK(out.is_contiguous() && (out.scalar_type() == torch::kBFloat16 || out.scalar_type() == torch::kFloat),
              "out: contiguous fp32 or bf16");
  TORCH_CHECK(q.is_contiguous() && colmask.is_contiguous() && sc.is_contiguous() && ze.is_contiguous(), "contiguous weights");
  const int64_t N = q.size(0), nkeep = sc.size(1), G = K / g, mw = colmask.size(1);
  TORCH_CHECK(mw == (G + 7) / 8 && q.size(1) == nkeep * g / 2, "weight shapes disagree");
  TORCH_CHECK(r0 >= 0 && r0 + n <= N, "row range out of bounds");
  const bool bf16 = out.scalar_type() == torch::kBFloat16;
  at::BFloat16* wb = bf16 ? out.data_ptr<at::BFloat16>() : nullptr;
  float* wf = bf16 ? nullptr : out.data_ptr<float>();
  const uint8_t* cm = colmask.data_ptr<uint8_t>();
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const uint16_t* zp = reinterpret_cast<const uint16_t*>(ze.data_ptr<at::Half>());
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> cidx(nkeep + 32, 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = r0 + i;
      if (!decode_row(cm + r * mw, mw, nkeep, G, cidx.data())) { bad_row = r; return; }
      if (bf16) std::memset(wb + i * K, 0, K * 2); else std::memset(wf + i * K, 0, K * 4);
      for (int64_t k = 0; k < nkeep; ++k) {
        const __m512 s = _mm512_set1_ps(_cvtsh_ss(sp[r * nkeep + k]));
        const __m512 sz = _mm512_mul_ps(s, _mm512_set1_ps(_cvtsh_ss(zp[r * nkeep + k])));
        const uint8_t* qg = qp + (r * nkeep + k) * (g / 2);
        const int64_t o = i * K + (int64_t)cidx[k] * g;
        for (int64_t t = 0; t < g / 16; ++t) {
          const __m512 v = _mm512_fmsub_ps(codes16_f32(qg + t * 8), s, sz);
          if (bf16) _mm256_storeu_si256((__m256i*)(wb + o + t * 16), (__m256i)_mm512_cvtneps_pbh(v));
          else _mm512_storeu_ps(wf + o + t * 16, v);
        }
      }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "GQSA column bitmap of row ", bad_row.load(), " does not hold ", nkeep, " groups below ", G);
#endif
}


// Batches of this many rows or more (prefill) dequantize blocks of kBlockRows weight rows and run a
// dense GEMM on each (torch's bf16 GEMM uses AMX here); fewer rows run gqsa_mm's kernel passes.
// cpu.py's PREFILL_ROWS mirrors it (tests/test_gqsa_cpp_op.py checks they agree).
static constexpr int64_t kPrefillRows = 64;
static constexpr int64_t kBlockRows = 256;

int64_t prefill_rows() { return kPrefillRows; }

// The whole native "cpu-avx512" linear, any number of rows: x [M, K] fp32/bf16/fp16 -> [M, N] in
// x's dtype, no bias. The body of the C++ op accel::gqsa_mm_cpu (registered below), which compiled
// graphs call without a Python dispatch per linear, and of eager calls.
torch::Tensor gqsa_linear_cpu(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& colmask,
                              const torch::Tensor& sc, const torch::Tensor& ze, int64_t g) {
  TORCH_CHECK(x.dim() == 2, "accel::gqsa_mm_cpu: x must be 2-D [M, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "accel::gqsa_mm_cpu: x must be a CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = colmask.size(0);
  if (M < kPrefillRows) return gqsa_mm(x, q, colmask, sc, ze, g);
  // Prefill: blocks of dequantized rows in one buffer of this call (a fresh full-size weight costs
  // more in page faults than the GEMM; a shared buffer would race between threads, issue 13).
  const auto dtype = x.scalar_type();
  const auto wdt = dtype == torch::kBFloat16 ? torch::kBFloat16 : torch::kFloat;
  auto xw = x.to(wdt);
  auto buf = torch::empty({std::min(kBlockRows, N) * K}, torch::dtype(wdt));
  auto y = torch::empty({M, N}, torch::dtype(wdt));
  for (int64_t r0 = 0; r0 < N; r0 += kBlockRows) {
    const int64_t n = std::min(kBlockRows, N - r0);
    auto blk = buf.narrow(0, 0, n * K).view({n, K});
    gqsa_dequant_rows(q, colmask, sc, ze, g, r0, blk);
    y.narrow(1, r0, n).copy_(at::mm(xw, blk.t()));
  }
  return dtype == wdt ? y : y.to(dtype);
}

TORCH_LIBRARY_FRAGMENT(accel, m) {
  m.def("gqsa_mm_cpu(Tensor x, Tensor qweight, Tensor colmask, Tensor scales, Tensor zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(accel, CPU, m) { m.impl("gqsa_mm_cpu", &gqsa_linear_cpu); }

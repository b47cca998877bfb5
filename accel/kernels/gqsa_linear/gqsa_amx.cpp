// GQSA prefill on CPU: dequantization of weight rows to bf16 and AMX tile GEMMs on them (compiled
// after gqsa_cpu.cpp, before gqsa_op.cpp, as one translation unit: see cpp_ext.py).
#include <sys/syscall.h>
#include <unistd.h>
#ifdef GQSA_SIMD

// 16 codes (8 bytes) -> 16 fp32 integers.
static inline __m512 codes16_f32(const uint8_t* p) {
  const __m128i ctrl = _mm_set_epi64x(0x3C3834302C282420LL, 0x1C1814100C080400LL);
  long long v;
  std::memcpy(&v, p, 8);
  const __m128i b = _mm_and_si128(_mm_multishift_epi64_epi8(ctrl, _mm_set1_epi64x(v)), _mm_set1_epi8(0x0F));
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b));
}

static inline void store16(uint16_t* o, __m512 v) { _mm256_storeu_si256((__m256i*)o, (__m256i)_mm512_cvtneps_pbh(v)); }
static inline void store16(float* o, __m512 v) { _mm512_storeu_ps(o, v); }

// Weight row r, all K = G * g values, into o (bf16 bits or fp32): kept groups (q - z) * s in fp32
// (the reference's rounding), then o's dtype; pruned groups 0. cidx: nkeep + 32 ints of scratch.
template <typename T>
static inline bool dequant_row(const uint8_t* cm, int64_t mw, const uint8_t* qp, const uint16_t* sp, const uint16_t* zp,
                               int64_t nkeep, int64_t G, int64_t g, int64_t r, T* o, int32_t* cidx) {
  if (!decode_row(cm + r * mw, mw, nkeep, G, cidx)) return false;
  std::memset(o, 0, G * g * sizeof(T));
  const uint16_t* sr = sp + r * nkeep;
  const uint16_t* zr = zp + r * nkeep;
  const uint8_t* qr = qp + r * nkeep * (g / 2);
  for (int64_t k = 0; k < nkeep; ++k) {
    const __m512 s = _mm512_set1_ps(_cvtsh_ss(sr[k])), z = _mm512_set1_ps(_cvtsh_ss(zr[k]));
    T* og = o + (int64_t)cidx[k] * g;
    for (int64_t t = 0; t < g / 16; ++t)
      store16(og + t * 16, _mm512_mul_ps(_mm512_sub_ps(codes16_f32(qr + k * (g / 2) + t * 8), z), s));
  }
  return true;
}
// dequant_row for bf16 output, the same values (each table entry is (q - z) * s in fp32, rounded
// to nearest-even once), in fewer instructions: a 16-entry bf16 table per kept group, the codes
// looked up with one vpermw for 32 of them (two 16-groups, or one 32-code chunk of a larger group).
static inline bool dequant_row_bf16(const uint8_t* cm, int64_t mw, const uint8_t* qp, const uint16_t* sp,
                                    const uint16_t* zp, int64_t nkeep, int64_t G, int64_t g, int64_t r, uint16_t* o,
                                    int32_t* cidx) {
  if (!decode_row(cm + r * mw, mw, nkeep, G, cidx)) return false;
  std::memset(o, 0, G * g * 2);
  const uint16_t* sr = sp + r * nkeep;
  const uint16_t* zr = zp + r * nkeep;
  const uint8_t* qr = qp + r * nkeep * (g / 2);
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  // +16 on the upper 16 lanes selects the second table.
  const __m512i hi16 = _mm512_set_epi64(0x0010001000100010LL, 0x0010001000100010LL, 0x0010001000100010LL,
                                        0x0010001000100010LL, 0, 0, 0, 0);
  for (int64_t k = 0; k < nkeep; k += 16) {
    const int kn = (int)std::min<int64_t>(16, nkeep - k);
    const __mmask16 km = (__mmask16)((1u << kn) - 1);
    const __m512 s16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, sr + k));
    const __m512 z16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, zr + k));
    auto table = [&](int j) {
      const __m512i i = _mm512_set1_epi32(j);
      return _mm512_mul_ps(_mm512_sub_ps(iota, _mm512_permutexvar_ps(i, z16)), _mm512_permutexvar_ps(i, s16));
    };
    if (g == 16) {
      for (int j = 0; 2 * j < kn; ++j) {
        const bool two = 2 * j + 1 < kn;
        const int64_t ka = k + 2 * j;
        const __m512i tab = (__m512i)_mm512_cvtne2ps_pbh(table(two ? 2 * j + 1 : 2 * j), table(2 * j));
        const __m128i bytes = two ? _mm_loadu_si128((const __m128i*)(qr + ka * 8)) : _mm_loadl_epi64((const __m128i*)(qr + ka * 8));
        const __m512i idx = _mm512_ternarylogic_epi32(spread32(bytes), _mm512_set1_epi16(0x000F), hi16, 0xEA);
        const __m512i w = _mm512_permutexvar_epi16(idx, tab);
        _mm256_storeu_si256((__m256i*)(o + (int64_t)cidx[ka] * 16), _mm512_castsi512_si256(w));
        if (two) _mm256_storeu_si256((__m256i*)(o + (int64_t)cidx[ka + 1] * 16), _mm512_extracti64x4_epi64(w, 1));
      }
    } else {
      for (int j = 0; j < kn; ++j) {
        const __m512 t = table(j);
        // The table twice: vpermw's fifth index bit (the next nibble's) picks the same entry.
        const __m512i tab = (__m512i)_mm512_cvtne2ps_pbh(t, t);
        const uint8_t* qg = qr + (k + j) * (g / 2);
        uint16_t* og = o + (int64_t)cidx[k + j] * g;
        for (int64_t c = 0; c < g / 32; ++c)
          _mm512_storeu_si512(og + c * 32, _mm512_permutexvar_epi16(spread32(_mm_loadu_si128((const __m128i*)(qg + c * 16))), tab));
      }
    }
  }
  return true;
}
#endif  // GQSA_SIMD

#if defined(GQSA_SIMD) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define GQSA_AMX 1
// Linux hands out AMX tile state only on request (once per process; oneDNN asks too). A static
// set once: nothing mutable is shared between calls.
static bool amx_usable() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

struct alignas(64) TileCfg {
  uint8_t palette, start;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Eight 16 x 64-byte tiles, in this thread (tile state is per thread).
static inline void config_tiles() {
  TileCfg cfg{};
  cfg.palette = 1;
  for (int i = 0; i < 8; ++i) { cfg.colsb[i] = 64; cfg.rows[i] = 16; }
  _tile_loadconfig(&cfg);
}

// Weight rows [n0, n0 + 32) (rows from N on: zero) into w [32][K] bf16; false on a bad bitmap row.
static inline bool dequant_block(const uint8_t* cm, int64_t mw, const uint8_t* qp, const uint16_t* sp, const uint16_t* zp,
                                 int64_t nkeep, int64_t g, int64_t K, int64_t N, int64_t n0, uint16_t* w, int32_t* cidx,
                                 std::atomic<int64_t>& bad_row) {
  const int64_t nn = std::min<int64_t>(32, N - n0);
  for (int64_t i = 0; i < nn; ++i)
    if (!dequant_row_bf16(cm, mw, qp, sp, zp, nkeep, K / g, g, n0 + i, w + i * K, cidx)) { bad_row = n0 + i; return false; }
  if (nn < 32) std::memset(w + nn * K, 0, (32 - nn) * K * 2);
  return true;
}

// out[c][r] = in[r][c] for a 16 x 16 block of 32-bit values (in: row stride ld; out: 16 x 16 dense).
static inline void transpose16(const uint32_t* in, int64_t ld, uint32_t* out) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(in + i * ld);
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // r[4i + j], 128-bit lane L: column 4L + j of rows 4i .. 4i + 3.
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  const __m512i i0 = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0), i1 = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int j = 0; j < 4; ++j) {
    const __m512i a0 = _mm512_permutex2var_epi64(r[j], i0, r[4 + j]), a1 = _mm512_permutex2var_epi64(r[j], i1, r[4 + j]);
    const __m512i b0 = _mm512_permutex2var_epi64(r[8 + j], i0, r[12 + j]), b1 = _mm512_permutex2var_epi64(r[8 + j], i1, r[12 + j]);
    t[j] = _mm512_shuffle_i64x2(a0, b0, 0x44);
    t[4 + j] = _mm512_shuffle_i64x2(a0, b0, 0xEE);
    t[8 + j] = _mm512_shuffle_i64x2(a1, b1, 0x44);
    t[12 + j] = _mm512_shuffle_i64x2(a1, b1, 0xEE);
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_si512(out + c * 16, t[c]);
}

// Scratch of the calling thread, reused across calls while small (a fresh buffer per call costs
// page faults comparable to a small GEMM); each thread has its own, and every element read is
// written first in the same call, so no result depends on which thread or call ran before.
static constexpr size_t kKeepScratchBytes = size_t(16) << 20;
static uint16_t* scratch(std::vector<uint16_t>& keep, std::vector<uint16_t>& once, size_t n) {
  std::vector<uint16_t>& v = n * 2 <= kKeepScratchBytes ? keep : once;
  if (v.size() < n) v.resize(n);
  return v.data();
}

// y [M, N] = x @ W^T for large M: W dequantized whole (bf16, rows split over threads), then torch's
// GEMM (oneDNN, AMX where the CPU has it), which blocks a large product better than amx_prefill_wide.
static int64_t dequant_gemm(const torch::Tensor& x, const uint8_t* cm, int64_t mw, const uint8_t* qp, const uint16_t* sp,
                            const uint16_t* zp, int64_t nkeep, int64_t g, int64_t N, const torch::Tensor& y) {
  const int64_t K = x.size(1);
  thread_local std::vector<uint16_t> w_keep;
  std::vector<uint16_t> w_once;
  uint16_t* w = scratch(w_keep, w_once, N * K);
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> cidx(nkeep + 32);
    for (int64_t r = r0; r < r1 && bad_row.load() < 0; ++r)
      if (!dequant_row_bf16(cm, mw, qp, sp, zp, nkeep, K / g, g, r, w + r * K, cidx.data())) bad_row = r;
  });
  if (bad_row.load() >= 0) return bad_row.load();
  auto wt = torch::from_blob(w, {N, K}, torch::dtype(torch::kBFloat16));
  at::mm_out(const_cast<torch::Tensor&>(y), x, wt.t());
  return -1;
}

// y [M, N] bf16 = x [M, K] bf16 @ W^T with AMX, K % 32 == 0. W is dequantized 32 rows at a time (L1/L2)
// as the A operand (C^T = W x^T, so W keeps its row-major layout); x is packed once per call into
// VNNI B tiles [M/16][K/32][16 pairs of k][16 m][2]. Each output element is summed by one thread in
// a fixed k order: the thread split changes no bit. Returns a bad row index, or -1.
static int64_t amx_prefill(const uint16_t* x, int64_t M, int64_t K, const uint8_t* cm, int64_t mw, const uint8_t* qp,
                           const uint16_t* sp, const uint16_t* zp, int64_t nkeep, int64_t g, int64_t N, uint16_t* y) {
  const int64_t KT = K / 32, MT = (M + 15) / 16, NB = (N + 31) / 32;
  thread_local std::vector<uint16_t> xb_keep;
  std::vector<uint16_t> xb_once;
  uint16_t* xb = scratch(xb_keep, xb_once, MT * KT * 512);
  at::parallel_for(0, MT, 1, [&](int64_t t0, int64_t t1) {
    alignas(64) uint16_t pad[16 * 32];
    for (int64_t mt = t0; mt < t1; ++mt) {
      const int64_t rows = std::min<int64_t>(16, M - mt * 16);
      for (int64_t kt = 0; kt < KT; ++kt) {
        const uint16_t* src = x + mt * 16 * K + kt * 32;
        int64_t ld = K / 2;
        if (rows < 16) {  // the last rows: zero-padded to a full tile (never read past x)
          std::memset(pad, 0, sizeof(pad));
          for (int64_t m = 0; m < rows; ++m) std::memcpy(pad + m * 32, src + m * K, 64);
          src = pad;
          ld = 16;
        }
        transpose16(reinterpret_cast<const uint32_t*>(src), ld, reinterpret_cast<uint32_t*>(xb + (mt * KT + kt) * 512));
      }
    }
  });
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint16_t> w_keep;
    thread_local std::vector<int32_t> cidx;
    std::vector<uint16_t> w_once;
    uint16_t* w = scratch(w_keep, w_once, 32 * K);
    if (cidx.size() < (size_t)nkeep + 32) cidx.resize(nkeep + 32);
    config_tiles();
    alignas(64) uint32_t ct[4][256], cy[256];
    for (int64_t nb = b0; nb < b1 && bad_row.load() < 0; ++nb) {
      const int64_t n0 = nb * 32, nn = std::min<int64_t>(32, N - n0);
      if (!dequant_block(cm, mw, qp, sp, zp, nkeep, g, K, N, n0, w, cidx.data(), bad_row)) break;
      // C tiles: 0, 1 = W rows 0-15 x m tiles 0, 1; 2, 3 = W rows 16-31. A: 4, 5 (W); B: 6, 7 (x).
      for (int64_t mt = 0; mt < MT; mt += 2) {
        const bool two = mt + 1 < MT;
        _tile_zero(0); _tile_zero(2);
        if (two) { _tile_zero(1); _tile_zero(3); }
        for (int64_t kt = 0; kt < KT; ++kt) {
          _tile_loadd(4, w + kt * 32, K * 2);
          _tile_loadd(5, w + 16 * K + kt * 32, K * 2);
          _tile_loadd(6, xb + (mt * KT + kt) * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(2, 5, 6);
          if (two) {
            _tile_loadd(7, xb + ((mt + 1) * KT + kt) * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        // Tile 2h + j (W rows 16h.., m tile mt + j) holds y^T: all four stored first (a tile store
        // read back at once stalls until it retires), then transposed, rounded once to bf16 and
        // stored where the rows are below M and the columns below N.
        _tile_stored(0, ct[0], 64);
        _tile_stored(2, ct[2], 64);
        if (two) {
          _tile_stored(1, ct[1], 64);
          _tile_stored(3, ct[3], 64);
        }
        for (int c = 0; c < 4; ++c) {
          const int64_t h = c / 2, j = c % 2, nv = std::min<int64_t>(16, nn - h * 16), r0 = (mt + j) * 16;
          if ((j && !two) || nv <= 0) continue;
          transpose16(ct[c], 16, cy);
          for (int64_t m = 0; m < 16 && r0 + m < M; ++m)
            _mm256_mask_storeu_epi16(y + (r0 + m) * N + n0 + h * 16, (__mmask16)((1u << nv) - 1),
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(reinterpret_cast<float*>(cy + m * 16))));
        }
      }
    }
    _tile_release();
  });
  return bad_row.load();
}

// The same product for many rows (M >= kAmxWideRows), with x as the A operand read in place and W
// packed per 32-row block into VNNI B tiles [K/32][2][16 pairs of k][16 n][2]: no transpose of x or
// of the output (which cost more than packing W once M outgrows N / 2 or so).
static int64_t amx_prefill_wide(const uint16_t* x, int64_t M, int64_t K, const uint8_t* cm, int64_t mw,
                                const uint8_t* qp, const uint16_t* sp, const uint16_t* zp, int64_t nkeep, int64_t g,
                                int64_t N, uint16_t* y) {
  const int64_t KT = K / 32, MT = (M + 15) / 16, NB = (N + 31) / 32;
  // x with its rows padded to a multiple of 16 (tile loads never read past x).
  thread_local std::vector<uint16_t> xp_keep;
  std::vector<uint16_t> xp_once;
  const uint16_t* xa = x;
  if (M % 16) {
    uint16_t* xp = scratch(xp_keep, xp_once, MT * 16 * K);
    std::memcpy(xp, x, M * K * 2);
    std::memset(xp + M * K, 0, (MT * 16 - M) * K * 2);
    xa = xp;
  }
  std::atomic<int64_t> bad_row{-1};
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    thread_local std::vector<uint16_t> w_keep, wv_keep;
    thread_local std::vector<int32_t> cidx;
    std::vector<uint16_t> w_once, wv_once;
    uint16_t* w = scratch(w_keep, w_once, 32 * K);
    uint16_t* wv = scratch(wv_keep, wv_once, 32 * K);
    if (cidx.size() < (size_t)nkeep + 32) cidx.resize(nkeep + 32);
    config_tiles();
    // Output tiles go through two staging sets: a set is converted one m step after its tile
    // stores (reading a tile store back at once stalls until it retires).
    alignas(64) float ct[2][4][256];
    int64_t pend_mt = -1, pend_n0 = 0, pend_nn = 0;
    int pend_set = 0;
    auto flush = [&]() {
      if (pend_mt < 0) return;
      for (int c = 0; c < 4; ++c) {
        const int64_t j = c / 2, h = c % 2, nv = std::min<int64_t>(16, pend_nn - h * 16), r0 = (pend_mt + j) * 16;
        if (r0 >= M || nv <= 0) continue;
        for (int64_t m = 0; m < 16 && r0 + m < M; ++m)
          _mm256_mask_storeu_epi16(y + (r0 + m) * N + pend_n0 + h * 16, (__mmask16)((1u << nv) - 1),
                                   (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(ct[pend_set][c] + m * 16)));
      }
      pend_mt = -1;
    };
    int set = 0;
    for (int64_t nb = b0; nb < b1 && bad_row.load() < 0; ++nb) {
      const int64_t n0 = nb * 32, nn = std::min<int64_t>(32, N - n0);
      if (!dequant_block(cm, mw, qp, sp, zp, nkeep, g, K, N, n0, w, cidx.data(), bad_row)) break;
      for (int64_t kt = 0; kt < KT; ++kt)
        for (int h = 0; h < 2; ++h)
          transpose16(reinterpret_cast<const uint32_t*>(w + h * 16 * K + kt * 32), K / 2,
                      reinterpret_cast<uint32_t*>(wv + (kt * 2 + h) * 512));
      // C tiles 2j + h: x rows of m tile mt + j x W rows 16h..; A: 4, 5 (x); B: 6, 7 (W).
      for (int64_t mt = 0; mt < MT; mt += 2) {
        const bool two = mt + 1 < MT;
        _tile_zero(0); _tile_zero(1);
        if (two) { _tile_zero(2); _tile_zero(3); }
        for (int64_t kt = 0; kt < KT; ++kt) {
          _tile_loadd(4, xa + mt * 16 * K + kt * 32, K * 2);
          _tile_loadd(6, wv + kt * 1024, 64);
          _tile_loadd(7, wv + kt * 1024 + 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, xa + (mt + 1) * 16 * K + kt * 32, K * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, ct[set][0], 64);
        _tile_stored(1, ct[set][1], 64);
        if (two) {
          _tile_stored(2, ct[set][2], 64);
          _tile_stored(3, ct[set][3], 64);
        }
        flush();
        pend_mt = mt, pend_n0 = n0, pend_nn = nn, pend_set = set;
        set ^= 1;
      }
    }
    flush();
    _tile_release();
  });
  return bad_row.load();
}
#endif  // GQSA_AMX

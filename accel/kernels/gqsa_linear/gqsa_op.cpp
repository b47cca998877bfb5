// GQSA CPU host entry points: the decode passes (gqsa_mm; kernels in gqsa_cpu.cpp), the prefill
// paths (gqsa_amx.cpp, else torch's GEMM on dequantized blocks) and the registration of the C++ op
// accel::gqsa_mm_cpu. cpp_ext.py compiles gqsa_cpu.cpp, gqsa_amx.cpp and this file as one unit.

bool simd_available() {
#ifdef GQSA_SIMD
  return true;
#else
  return false;
#endif
}

// The stored format's invariants that the kernels index by (shapes, dtypes, layout).
static void check_args(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& colmask, const torch::Tensor& sc,
                       const torch::Tensor& ze, int64_t g) {
  TORCH_CHECK(x.dim() == 2 && q.dim() == 2 && colmask.dim() == 2 && sc.dim() == 2 && ze.dim() == 2, "2-D tensors expected");
  TORCH_CHECK(q.scalar_type() == torch::kByte && colmask.scalar_type() == torch::kByte, "qweight / colmask must be uint8");
  TORCH_CHECK(sc.scalar_type() == torch::kHalf && ze.scalar_type() == torch::kHalf, "scales / zeros must be fp16");
  TORCH_CHECK(q.is_contiguous() && colmask.is_contiguous() && sc.is_contiguous() && ze.is_contiguous(), "contiguous weights");
  TORCH_CHECK(g == 16 || (g > 0 && g % 32 == 0), "group size must be 16 or a multiple of 32");
  const int64_t K = x.size(1), N = q.size(0), nkeep = sc.size(1);
  TORCH_CHECK(K % g == 0, "in_features not a multiple of the group size");
  const int64_t G = K / g, mw = colmask.size(1);
  TORCH_CHECK(colmask.size(0) == N && mw == (G + 7) / 8, "colmask shape");
  TORCH_CHECK(sc.size(0) == N && ze.sizes() == sc.sizes() && q.size(1) == nkeep * g / 2, "weight shapes disagree");
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
  check_args(x, q, colmask, sc, ze, g);
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0), nkeep = sc.size(1);
  const int64_t G = K / g, mw = colmask.size(1);
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
      const bool ok = bf16 ? dequant_row(cm, mw, qp, sp, zp, nkeep, G, g, r, reinterpret_cast<uint16_t*>(wb + i * K), cidx.data())
                           : dequant_row(cm, mw, qp, sp, zp, nkeep, G, g, r, wf + i * K, cidx.data());
      if (!ok) { bad_row = r; return; }
    }
  });
  TORCH_CHECK(bad_row.load() < 0, "GQSA column bitmap of row ", bad_row.load(), " does not hold ", nkeep, " groups below ", G);
#endif
}


// bf16 batches on a CPU with AMX (and K % 32 == 0), by measurement (1 and 2 threads, SmolLM2 and
// Qwen2.5 shapes; `accel bench decode --prompt-tokens 32,512,8192 --prefill-only`):
// - M < kAmxRows: gqsa_mm's 1-8-row passes (they read the int4 codes only);
// - kAmxRows <= M < kAmxWideRows: amx_prefill (32 weight rows dequantized in L1 at a time, x packed
//   once); torch's GEMM on a dequantized weight pays a full weight pass and oneDNN's repacking;
// - kAmxWideRows <= M < kGemmRows: amx_prefill_wide (x read in place, W packed per block);
// - M >= kGemmRows: dequant_gemm (the whole weight dequantized, then torch's GEMM, which blocks a
//   large product better).
// Without AMX (or fp32 / fp16 activations), from kPrefillRows rows on: blocks of kBlockRows
// dequantized rows and torch's GEMM on each; fewer rows run gqsa_mm's passes.
// cpu.py's AMX_ROWS / PREFILL_ROWS mirror kAmxRows / kPrefillRows (tests/test_gqsa_prefill.py).
static constexpr int64_t kAmxRows = 8;
static constexpr int64_t kAmxWideRows = 64;
static constexpr int64_t kGemmRows = 256;
static constexpr int64_t kPrefillRows = 64;
static constexpr int64_t kBlockRows = 256;

int64_t prefill_rows() { return kPrefillRows; }
int64_t amx_rows() { return kAmxRows; }

bool amx_available() {
#ifdef GQSA_AMX
  return amx_usable();
#else
  return false;
#endif
}

// The whole native "cpu-avx512" linear, any number of rows: x [M, K] fp32/bf16/fp16 -> [M, N] in
// x's dtype, no bias. The body of the C++ op accel::gqsa_mm_cpu (registered below), which compiled
// graphs call without a Python dispatch per linear, and of eager calls.
torch::Tensor gqsa_linear_cpu(const torch::Tensor& x, const torch::Tensor& q, const torch::Tensor& colmask,
                              const torch::Tensor& sc, const torch::Tensor& ze, int64_t g) {
  TORCH_CHECK(x.dim() == 2, "accel::gqsa_mm_cpu: x must be 2-D [M, in_features], got ", x.dim(), "-D");
  TORCH_CHECK(x.device().is_cpu(), "accel::gqsa_mm_cpu: x must be a CPU tensor");
  const int64_t M = x.size(0), K = x.size(1), N = colmask.size(0);
  const auto dtype = x.scalar_type();
#ifdef GQSA_AMX
  if (dtype == torch::kBFloat16 && M >= kAmxRows && K % 32 == 0 && amx_usable()) {
    check_args(x, q, colmask, sc, ze, g);
    auto xc = x.contiguous();
    auto y = torch::empty({M, N}, torch::dtype(torch::kBFloat16));
    if (M >= kGemmRows) {
      const int64_t bad = dequant_gemm(xc, colmask.data_ptr<uint8_t>(), colmask.size(1), q.data_ptr<uint8_t>(),
                                       reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
                                       reinterpret_cast<const uint16_t*>(ze.data_ptr<at::Half>()), sc.size(1), g, N, y);
      TORCH_CHECK(bad < 0, "GQSA column bitmap of row ", bad, " does not hold ", sc.size(1), " groups below ", K / g);
      return y;
    }
    const int64_t bad = (M >= kAmxWideRows ? amx_prefill_wide : amx_prefill)(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()), M, K,
                                    colmask.data_ptr<uint8_t>(), colmask.size(1), q.data_ptr<uint8_t>(),
                                    reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()),
                                    reinterpret_cast<const uint16_t*>(ze.data_ptr<at::Half>()), sc.size(1), g, N,
                                    reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
    TORCH_CHECK(bad < 0, "GQSA column bitmap of row ", bad, " does not hold ", sc.size(1), " groups below ", K / g);
    return y;
  }
#endif
  if (M < kPrefillRows) return gqsa_mm(x, q, colmask, sc, ze, g);
  // Prefill: blocks of dequantized rows in one buffer of this call (a fresh full-size weight costs
  // more in page faults than the GEMM; a shared buffer would race between threads, issue 13).
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

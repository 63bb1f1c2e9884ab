// bfloat16 weights on a CPU without bfloat16 arithmetic (AVX2 + FMA), built with cpu_gemv.cpp by
// kernels/cpu_gemv.py (one compiler call, one library) and called through kernels/cpu_bf16.py.
//
// The weights stay bfloat16 in memory and are widened to float32 in registers (a bfloat16 is the top half of
// a float32: zero-extend to 32 bits, shift left 16); x is widened the same way (exactly); products are summed
// in float32 with FMA; the result is rounded to bfloat16 to nearest even, as torch rounds a bfloat16 linear's
// float32 sums (c10::BFloat16's round_to_nearest_even: NaN -> 0x7FC0). So y is the float32 model of the bf16
// weights and activations, rounded once, up to float32 summation order.
//
//   GEMV (a few rows of x: decode, speculation's verify): each weight row read once per call, one after another
//     against each row of x, the output rows split over threads.
//   GEMM (many rows: prefill, an expert's tokens): BLIS-like. Per thread a strip of 16 weight rows and 256
//     inputs is widened once into a float32 panel [256][16] (16 KiB, in L1), which 6 x 16 register tiles of
//     the output (12 accumulators) then sweep over 96 rows of x at a time (96 KiB of x, in L2).
//   Several weights at one row (a token's chosen experts; projections that read the same x): their rows as one
//     range over the threads (gemv_segments), one parallel region where each weight had its own.
//   Experts: one token through its chosen routed experts, reading only their rows, rounding where the
//     PyTorch loop (fused_moe.moe_experts_loop in bfloat16) rounds: gate/up to bf16, silu(gate) to bf16, its
//     product with up to bf16, down to bf16, the weighted sum in float32, rounded to bf16 at the end.
//
//   The bfloat16 lean decode step's small operations (engine/cpu_step_bf16.py): RMSNorm, RoPE and the latent
//     row, SwiGLU's product, a sum, MLA's scores and weighted sum over the cache rows in place.
//
// Entry points (C, raw pointers): dschat_bf16_abi_version, dschat_bf16_linear, dschat_bf16_linear_n,
// dschat_bf16_bmm, dschat_bf16_experts, dschat_bf16_add_sq, dschat_bf16_rms, dschat_bf16_rope_latent,
// dschat_bf16_silu_mul, dschat_bf16_add, dschat_bf16_mla_scores, dschat_bf16_mla_mix.

#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <atomic>
#include <vector>

namespace {

#include "cpu_common.h"

inline float bf2f(uint16_t v) {
  uint32_t u = (uint32_t)v << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f2bf(float f) {  // round to nearest even, as c10::BFloat16
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline float round_bf(float f) { return bf2f(f2bf(f)); }

// F.silu(g) * u in bfloat16 (g, u bfloat16 values): silu rounded, then the product rounded.
inline float swiglu_bf(float g, float u) { return round_bf(round_bf(silu(g)) * u); }

// f(i) for i in [0, n) over up to `nthreads` threads, each taking the next i as it finishes one (a thread that
// another process holds off its core leaves its share to the others, where an even split would wait for it).
// The results do not depend on which thread runs what.
template <class F>
void parallel_dynamic(int64_t n, int nthreads, const F& f) {
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, n));
  if (nt == 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < n; ++i) f(i);
}

// Where results go: float32 or bfloat16 (rounded), row-major [M, N] with row stride ld.
struct Out {
  float* f = nullptr;
  uint16_t* b = nullptr;
  int64_t ld = 0;
  inline void put(int64_t m, int64_t n, float v) const {
    if (b)
      b[m * ld + n] = f2bf(v);
    else
      f[m * ld + n] = v;
  }
};

// ---- GEMV: rows [n0, n1) of W [N, K] against M rows of x --------------------------------------------------
// 16 bfloat16 weights are one 256-bit load of 8 pairs: u << 16 is the even elements as float32, u & 0xFFFF0000
// the odd ones, so x is laid out to match (xp: per block of 16, its 8 even elements, then its 8 odd ones) and
// each 16 weights cost two integer ops to widen.
constexpr int64_t PF = 4096;  // bytes a row's prefetch runs ahead

template <int R>
inline void dot_rows(const uint16_t* w, int64_t ld, int64_t K, const float* xp, const float* x, float* out) {
  const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const int64_t kf = K / 16 * 16;
  for (int64_t k = 0; k < kf; k += 16) {
    if ((k & 31) == 0)  // each row's stream, a cache line ahead of PF bytes (non-temporal: as cpu_gemv.cpp's)
      for (int r = 0; r < R; ++r) _mm_prefetch((const char*)(w + r * ld + k) + PF, _MM_HINT_NTA);
    const __m256 xe = _mm256_loadu_ps(xp + k), xo = _mm256_loadu_ps(xp + k + 8);
    for (int r = 0; r < R; ++r) {
      const __m256i u = _mm256_loadu_si256((const __m256i*)(w + r * ld + k));
      acc[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), xe, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(u, hi)), xo, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
    for (int64_t k = kf; k < K; ++k) s = std::fma(bf2f(w[r * ld + k]), x[k], s);  // as every build rounds it
    out[r] = s;
  }
}

// x [M, K] -> the layout dot_rows reads (the full blocks of 16 only).
std::vector<float> pair_layout(const float* x, int64_t M, int64_t K) {
  const int64_t kf = K / 16 * 16;
  std::vector<float> xp((size_t)M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < kf; b += 16)
      for (int i = 0; i < 8; ++i) {
        xp[m * K + b + i] = x[m * K + b + 2 * i];
        xp[m * K + b + 8 + i] = x[m * K + b + 2 * i + 1];
      }
  return xp;
}

// W's rows ld apart (ld = K: a whole matrix), one after another: one stream of weights a thread. Four rows at a
// time a quarter of the range apart (four streams a thread, as int8's one_row pairs two) read V2-Lite's decode
// weights (bf16, 6 layers, in decode's order, 2 threads, Zen 4) at 23.6 GB/s against 28.4 this way (median of
// 24 interleaved rounds); two rows half apart 23.7, eight a quarter apart 22.9. Each row's sum is the same
// either way.
void gemv_rows(const uint16_t* W, int64_t ld, int64_t K, const float* xp, const float* x, int64_t M, int64_t n0,
               int64_t n1, const Out& y) {
  float s;
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t m = 0; m < M; ++m) {  // the row stays in L1 while each row of x meets it
      dot_rows<1>(W + n * ld, ld, K, xp + m * K, x + m * K, &s);
      y.put(m, n, s);
    }
}

void gemv(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, const Out& y, int nthreads) {
  const std::vector<float> xp = pair_layout(x, M, K);
  // a long run of rows a thread, then chunks of >= 64 KiB of weights (cpu_common.h's parallel_runs);
  // V2-Lite shapes, 6 layers, 2 threads, decode: 9.0 -> 9.6 tok/s against 128 KiB chunks and no prefetch
  const int64_t grain = std::max<int64_t>(1, (64 * 1024) / std::max<int64_t>(1, K * 2));
  parallel_runs(N, grain, nthreads, [&](int64_t n0, int64_t n1) { gemv_rows(W, K, K, xp.data(), x, M, n0, n1, y); });
}

// Several GEMVs at one row of x in one parallel region (a token's chosen experts, projections that read the same
// x): segment s is W_s [N_s, K_s] against its own x_s into y_s. The rows of all segments form one
// range, split over threads as gemv splits one weight's: one fork and join where each weight had its own, each
// thread's rows one long run. Each row's sum is the one gemv gives it (a row's dot product does not depend on
// the rows beside it).
struct Seg {
  const uint16_t* W;
  int64_t N, K;
  const float* xp;  // x_s in pair_layout
  const float* x;
  Out y;
};

void gemv_segments(const std::vector<Seg>& segs, int nthreads) {
  std::vector<int64_t> rows(segs.size());
  int64_t kmax = 1;
  for (size_t i = 0; i < segs.size(); ++i) {
    rows[i] = segs[i].N;
    kmax = std::max(kmax, segs[i].K);
  }
  parallel_parts(rows, std::max<int64_t>(1, (64 * 1024) / (kmax * 2)), nthreads, [&](size_t i, int64_t lo, int64_t hi) {
    const Seg& s = segs[i];
    gemv_rows(s.W, s.K, s.K, s.xp, s.x, 1, lo, hi, s.y);
  });
}

// ---- GEMM ----------------------------------------------------------------------------------------------
#ifndef DSCHAT_BF16_MR
#define DSCHAT_BF16_MR 6
#define DSCHAT_BF16_NR 16
#endif
constexpr int MR = DSCHAT_BF16_MR, NR = DSCHAT_BF16_NR;
constexpr int64_t KC = 256, MC = 96;

// The panel [kc][NR] of nn weight rows (rows ld apart, from k0 = 0 of w) widened to float32, zeros past nn:
// blocks of 8 rows x 8 inputs widened and transposed in registers, the rest one by one.
void widen_panel(const uint16_t* w, int64_t ld, int64_t nn, int64_t kc, float* panel) {
  const int64_t kf = kc / 8 * 8;
  int64_t j0 = 0;
  for (; j0 + 8 <= nn; j0 += 8) {
    for (int64_t k = 0; k < kf; k += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i)
        r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + (j0 + i) * ld + k))), 16));
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (k + i) * NR + j0, r[i]);
    }
    for (int64_t k = kf; k < kc; ++k)
      for (int64_t j = j0; j < j0 + 8; ++j) panel[k * NR + j] = bf2f(w[j * ld + k]);
  }
  for (int64_t j = j0; j < NR; ++j)
    for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = j < nn ? bf2f(w[j * ld + k]) : 0.f;
}

// Strips of NR weight rows [s0, s1) of W [N, K] against x float32 [M, K]: for each block of KC inputs the
// strips are widened once into panels, then every block of MC rows of x sweeps them (x's block in L2, a
// panel in L1); the float32 sums wait in `acc` ([M, 16] a strip) until the last block rounds them out.
void gemm_strips(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, int64_t s0, int64_t s1,
                 const Out& y) {
  const int64_t ns = s1 - s0;
  std::vector<float> panels((size_t)ns * KC * NR), acc((size_t)ns * M * NR);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t s = 0; s < ns; ++s) {  // widen: panel[k][j] = W[n0 + j, k0 + k] (zeros past N)
      const int64_t n0 = (s0 + s) * NR, nn = std::min<int64_t>(NR, N - n0);
      widen_panel(W + n0 * K + k0, K, nn, kc, panels.data() + s * KC * NR);
    }
    for (int64_t m0 = 0; m0 < M; m0 += MC) {
      const int64_t m1 = std::min(M, m0 + MC);
      for (int64_t s = 0; s < ns; ++s)
        for (int64_t m = m0; m < m1; m += MR)
          micro_any<MR, NR>((int)std::min<int64_t>(MR, m1 - m), x + m * K + k0, K, panels.data() + s * KC * NR,
                            kc, acc.data() + (s * M + m) * NR, NR, k0 > 0);
    }
  }
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t n0 = (s0 + s) * NR, nn = std::min<int64_t>(NR, N - n0);
    const float* c = acc.data() + s * M * NR;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nn; ++j) y.put(m, n0 + j, c[m * NR + j]);
  }
}

void gemm(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, const Out& y, int nthreads) {
  const int64_t strips = (N + NR - 1) / NR;
  constexpr int64_t SG = 4;  // strips at a time: 4 panels (64 KiB) and their sums beside x's block in L2
  parallel_dynamic((strips + SG - 1) / SG, nthreads, [&](int64_t g) {
    gemm_strips(W, N, K, x, M, g * SG, std::min(strips, (g + 1) * SG), y);
  });
}

constexpr int64_t GEMV_MAX_ROWS = 4;  // up to this many rows of x: the GEMV (no panel to widen)

void linear(const uint16_t* W, int64_t N, int64_t K, const float* x, int64_t M, const Out& y, int nthreads) {
  if (M <= GEMV_MAX_ROWS)
    gemv(W, N, K, x, M, y, nthreads);
  else
    gemm(W, N, K, x, M, y, nthreads);
}

std::vector<float> widen(const void* x, int x_bf16, int64_t n) {
  std::vector<float> v(n);
  if (x_bf16) {
    const uint16_t* p = (const uint16_t*)x;
    for (int64_t i = 0; i < n; ++i) v[i] = bf2f(p[i]);
  } else {
    std::memcpy(v.data(), x, n * sizeof(float));
  }
  return v;
}

// One batch entry of bmm, on the calling thread: x bfloat16 [M, K] (rows xs apart), W bfloat16 [N, K] (trans:
// rows ws apart) or [K, N] (rows ws apart), y bfloat16 [M, N] (rows ys apart).
void bmm_one(const uint16_t* x, int64_t M, int64_t K, int64_t xs, const uint16_t* W, int64_t N, int64_t ws,
             int trans, uint16_t* y, int64_t ys) {
  std::vector<float> xf((size_t)M * K);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf2f(x[m * xs + k]);
  Out o;
  o.b = y;
  o.ld = ys;
  if (trans) {
    const std::vector<float> xp = pair_layout(xf.data(), M, K);
    gemv_rows(W, ws, K, xp.data(), xf.data(), M, 0, N, o);
    return;
  }
  // y[m, :] = sum_k x[m, k] W[k, :]: the rows of W scaled and added into a float32 row, in k's order
  std::vector<float> acc(N);
  const int64_t nf = N / 8 * 8;
  for (int64_t m = 0; m < M; ++m) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = xf[m * K + k];
      const uint16_t* w = W + k * ws;
      const __m256 av = _mm256_set1_ps(a);
      for (int64_t n = 0; n < nf; n += 8) {
        const __m256 wv = _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(w + n))), 16));
        _mm256_storeu_ps(acc.data() + n, _mm256_fmadd_ps(av, wv, _mm256_loadu_ps(acc.data() + n)));
      }
      for (int64_t n = nf; n < N; ++n) acc[n] += a * bf2f(w[n]);
    }
    for (int64_t n = 0; n < N; ++n) y[m * ys + n] = f2bf(acc[n]);
  }
}


}  // namespace

extern "C" {

int dschat_bf16_abi_version() { return 5; }

// Batched y[b] = x[b] W[b]^T (trans) or x[b] W[b], all bfloat16, y rounded to nearest even: MLA's absorbed
// attention folding kv_b_proj's halves into the query and out of the output, a few rows per head. Strides in
// elements (the last dimension of each contiguous); batch entries split over threads. 0 on success.
int dschat_bf16_bmm(const uint16_t* x, int64_t B, int64_t M, int64_t K, int64_t xsb, int64_t xsm, const uint16_t* W,
                    int64_t N, int64_t wsb, int64_t wsr, int trans, uint16_t* y, int64_t ysb, int64_t ysm,
                    int nthreads) {
  if (B < 0 || M < 0 || K <= 0 || N < 0) return 1;
  parallel_dynamic(B, nthreads, [&](int64_t b) {
    bmm_one(x + b * xsb, M, K, xsm, W + b * wsb, N, wsr, trans, y + b * ysb, ysm);
  });
  return 0;
}

// y [M, N] = x [M, K] W^T, W bfloat16 [N, K] contiguous; x bfloat16 (x_bf16) or float32; y bfloat16 rounded
// to nearest even (y_bf16) or float32. 0 on success.
int dschat_bf16_linear(const void* x, int64_t M, int64_t K, const uint16_t* W, int64_t N, void* y, int x_bf16,
                       int y_bf16, int nthreads) {
  if (M < 0 || K <= 0 || N < 0) return 1;
  std::vector<float> xf;
  const float* xp = (const float*)x;
  if (x_bf16) {
    xf = widen(x, 1, M * K);
    xp = xf.data();
  }
  Out o;
  o.ld = N;
  if (y_bf16)
    o.b = (uint16_t*)y;
  else
    o.f = (float*)y;
  linear(W, N, K, xp, M, o, nthreads);
  return 0;
}

// One token through its chosen routed experts: x bfloat16 [H], ids [k] (outside 0..E-1: nothing), weights
// float32 [k], w13 bfloat16 [E, 2I, H] (gate rows, then up rows), w2 bfloat16 [E, H, I] -> y bfloat16 [H],
// rounded where the PyTorch loop rounds (the header). Only the chosen experts' rows are read. 0 on success.
int dschat_bf16_experts(const uint16_t* x, int64_t H, const int64_t* ids, const float* weights, int64_t k,
                        const uint16_t* w13, const uint16_t* w2, int64_t E, int64_t I, uint16_t* y, int nthreads) {
  if (H <= 0 || I <= 0 || E < 0) return 1;
  std::vector<int64_t> chosen;  // the entries j of ids that name an expert here, in order
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] >= 0 && ids[j] < E) chosen.push_back(j);
  const int64_t c = (int64_t)chosen.size();
  std::vector<float> xf = widen(x, 1, H), h(c * 2 * I), a(c * I), o(c * H), acc(H, 0.f);
  const std::vector<float> xp = pair_layout(xf.data(), 1, H);
  std::vector<Seg> segs(c);
  for (int64_t i = 0; i < c; ++i) {  // every chosen expert's gate and up rows: one parallel region
    segs[i] = Seg{w13 + ids[chosen[i]] * 2 * I * H, 2 * I, H, xp.data(), xf.data(), Out{}};
    segs[i].y.f = h.data() + i * 2 * I;
    segs[i].y.ld = 2 * I;
  }
  gemv_segments(segs, nthreads);
  parallel_runs(c * I, 512, nthreads, [&](int64_t i0, int64_t i1) {  // the SwiGLU, element by element
    for (int64_t ji = i0; ji < i1; ++ji) {
      const int64_t j = ji / I, i = ji % I;
      const float g = round_bf(h[j * 2 * I + i]), u = round_bf(h[j * 2 * I + I + i]);
      a[j * I + i] = swiglu_bf(g, u);
    }
  });
  const std::vector<float> ap = pair_layout(a.data(), c, I);
  for (int64_t i = 0; i < c; ++i) {  // and their down rows: one more
    segs[i] = Seg{w2 + ids[chosen[i]] * H * I, H, I, ap.data() + i * I, a.data() + i * I, Out{}};
    segs[i].y.f = o.data() + i * H;
    segs[i].y.ld = H;
  }
  gemv_segments(segs, nthreads);
  for (int64_t j = 0; j < c; ++j) {
    const float wj = weights[chosen[j]];
    for (int64_t i = 0; i < H; ++i) {
      const float p = round_bf(o[j * H + i]) * wj;
      acc[i] += p;
    }
  }
  for (int64_t i = 0; i < H; ++i) y[i] = f2bf(acc[i]);
  return 0;
}

// y_s [N_s] = x W_s^T for n weights W_s bfloat16 [N_s, K] that read the same x bfloat16 [K] (one row), each y_s
// bfloat16 rounded to nearest even: dschat_bf16_linear's outputs at one row, in one parallel region. 0 on
// success.
int dschat_bf16_linear_n(const uint16_t* x, int64_t K, int64_t n, const uint16_t* const* Ws, const int64_t* Ns,
                         uint16_t* const* ys, int nthreads) {
  if (K <= 0 || n < 0) return 1;
  const std::vector<float> xf = widen(x, 1, K), xp = pair_layout(xf.data(), 1, K);
  std::vector<Seg> segs(n);
  for (int64_t i = 0; i < n; ++i) {
    if (Ns[i] < 0) return 1;
    segs[i] = Seg{Ws[i], Ns[i], K, xp.data(), xf.data(), Out{}};
    segs[i].y.b = ys[i];
    segs[i].y.ld = Ns[i];
  }
  gemv_segments(segs, nthreads);
  return 0;
}

}  // extern "C"

// -- the one-token decode step's small operations in bfloat16 (engine/cpu_step_bf16.py) ---------------------
// Each rounds to bfloat16 where the PyTorch reference of a bfloat16 model rounds (every operator's output;
// inside an operator the arithmetic is float32, as PyTorch's bfloat16 kernels compute), operation by operation
// with no fused multiply-adds. The reductions whose order PyTorch fixes stay PyTorch's (RMSNorm's mean, the
// attention's softmax: the caller runs them between two calls); the dot products are the kernels' own, the ones
// the plain path runs.
DSCHAT_NO_CONTRACT

namespace {

// norm_rope.rms_norm_reference in bfloat16 after its mean: y = w * bf16(x * (1 / sqrt(mean + eps))), each product
// rounded (torch.rsqrt is 1 / sqrt, two roundings). The mean of the squares is PyTorch's own (the caller's
// torch.mean over dschat_bf16_add_sq's squares): its float32 sum in another order moved the scale by one bit in
// 7 of 20000 rows (D = 2048), and with it ~14 of each such row's outputs by a bfloat16 step.
inline void rms_bf(const uint16_t* x, const uint16_t* w, const float* mean, float eps, int64_t D, uint16_t* y) {
  const float r = 1.0f / std::sqrt(*mean + eps);
  for (int64_t i = 0; i < D; ++i) y[i] = f2bf(bf2f(w[i]) * round_bf(bf2f(x[i]) * r));
}

// apply_rope in bfloat16: interleaved pairs rotated in float32, rounded.
inline void rope_bf(const uint16_t* src, const float* cs, const float* sn, int64_t P, uint16_t* dst) {
  for (int64_t i = 0; i < P / 2; ++i) {
    const float x0 = bf2f(src[2 * i]), x1 = bf2f(src[2 * i + 1]), c = cs[i], s = sn[i];
    dst[2 * i] = f2bf(x0 * c - x1 * s);
    dst[2 * i + 1] = f2bf(x1 * c + x0 * s);
  }
}

// One bfloat16 row w [K] against NH rows of x (ldx apart; xp in pair layout): out[i] = dot_rows<1>(w, x_i), the
// same float32 operations in the same order for each (two accumulators over the blocks of 16, then the tail),
// the row's blocks loaded once for all NH.
template <int NH>
inline void dot_heads(const uint16_t* w, int64_t K, const float* xp, const float* x, int64_t ldx, float* out) {
  const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 acc[NH][2];
  for (int i = 0; i < NH; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const int64_t kf = K / 16 * 16;
  for (int64_t k = 0; k < kf; k += 16) {
    const __m256i u = _mm256_loadu_si256((const __m256i*)(w + k));
    const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)), wo = _mm256_castsi256_ps(_mm256_and_si256(u, hi));
    for (int i = 0; i < NH; ++i) {
      acc[i][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xp + i * ldx + k), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xp + i * ldx + k + 8), acc[i][1]);
    }
  }
  for (int i = 0; i < NH; ++i) {
    float s = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
    for (int64_t k = kf; k < K; ++k) s = std::fma(bf2f(w[k]), x[i * ldx + k], s);
    out[i] = s;
  }
}

}  // namespace

extern "C" {

// x [D] bfloat16 (with res: first x = bf16(x + res), in place); sq [D] = x^2 in float32 (h.float().pow(2)), whose
// mean PyTorch takes before dschat_bf16_rms.
void dschat_bf16_add_sq(uint16_t* x, const uint16_t* res, int64_t D, float* sq) {
  if (res)
    for (int64_t i = 0; i < D; ++i) x[i] = f2bf(bf2f(x[i]) + bf2f(res[i]));
  for (int64_t i = 0; i < D; ++i) {
    const float v = bf2f(x[i]);
    sq[i] = v * v;
  }
}

// y [D] = RMSNorm(x) with weight w [D], given the mean of x's squares (*mean).
void dschat_bf16_rms(const uint16_t* x, const uint16_t* w, const float* mean, float eps, int64_t D, uint16_t* y) {
  rms_bf(x, w, mean, eps, D, y);
}

// dschat_rope_latent's bfloat16 twin (norm_rope.rope_latent_write_reference in bfloat16): q_out [H, P] = rope
// of each head's rope part (at offset nope of q's rows, q_stride apart); row [R + P] (the cache row) =
// [RMSNorm(kv[:R]) | rope(kv[R:])], *mean the mean of kv[:R]'s squares.
void dschat_bf16_rope_latent(const uint16_t* q, int64_t H, int64_t q_stride, int64_t nope, const uint16_t* kv,
                             int64_t R, int64_t P, const uint16_t* w, const float* mean, float eps, const float* cs,
                             const float* sn, uint16_t* row, uint16_t* q_out) {
  for (int64_t h = 0; h < H; ++h) rope_bf(q + h * q_stride + nope, cs, sn, P, q_out + h * P);
  rms_bf(kv, w, mean, eps, R, row);
  rope_bf(kv + R, cs, sn, P, row + R);
}

// out [I] = bf16(bf16(silu(g)) * u): F.silu(gate) * up in bfloat16, gate = gu[:I], up = gu[I:2I]; elements over
// threads.
void dschat_bf16_silu_mul(const uint16_t* gu, int64_t I, uint16_t* out, int nthreads) {
  parallel_runs(I, 512, nthreads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) out[i] = f2bf(swiglu_bf(bf2f(gu[i]), bf2f(gu[I + i])));
  });
}

// y [n] = bf16(y + x).
void dschat_bf16_add(uint16_t* y, const uint16_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = f2bf(bf2f(y[i]) + bf2f(x[i]));
}

// mla_decode.mla_decode_bf16_cpu at one query, over T rows of the bfloat16 latent cache read in place (row t at
// slot slots[t], or first + t where slots is null; rows R + P apart), in two calls around PyTorch's softmax
// (attention_probs, the plain path's own: no second softmax to keep equal to it):
//   scores [H, T] = bf16(bf16(q_lat[h] . c_kv[t]) + bf16(q_pe[h] . k_pe[t]))   (dschat_bf16_mla_scores)
//   o_lat [H, R] = bf16(sum_t p[h, t] c_kv[t])                                 (dschat_bf16_mla_mix)
// The dot products are the ones its bmm computes (dot_rows, x in pair layout: the same float32 sums), the
// weighted sum its bmm's too (the rows scaled and added in t's order), so the results are the plain path's bit
// for bit. The scores split the keys over threads, each row read once for every head; the weighted sum splits
// the columns (dschat_bf16_mla_mix). 0 on success.
int dschat_bf16_mla_scores(const uint16_t* q_lat, const uint16_t* q_pe, int64_t H, int64_t R, int64_t P,
                           const uint16_t* cache, const int64_t* slots, int64_t first, int64_t T, uint16_t* scores,
                           int nthreads) {
  if (H <= 0 || R <= 0 || P < 0 || T <= 0) return 1;
  const int64_t ld = R + P;
  const std::vector<float> q = widen(q_lat, 1, H * R), qp = widen(q_pe, 1, H * P);
  const std::vector<float> xq = pair_layout(q.data(), H, R), xqp = pair_layout(qp.data(), H, P);
  // keys over threads; each key's row read once, against 4 heads at a time (dot_heads: each head's sum dot_rows')
  parallel_runs(T, 16, nthreads, [&](int64_t t0, int64_t t1) {
    float s1[4], s2[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t t = t0; t < t1; ++t) {
      const uint16_t* c = cache + (slots ? slots[t] : first + t) * ld;
      for (int64_t h = 0; h < H; h += 4) {
        const int nh = (int)std::min<int64_t>(4, H - h);
        if (nh == 4) {
          dot_heads<4>(c, R, xq.data() + h * R, q.data() + h * R, R, s1);
          if (P > 0) dot_heads<4>(c + R, P, xqp.data() + h * P, qp.data() + h * P, P, s2);
        } else {
          for (int i = 0; i < nh; ++i) {
            dot_heads<1>(c, R, xq.data() + (h + i) * R, q.data() + (h + i) * R, R, s1 + i);
            if (P > 0) dot_heads<1>(c + R, P, xqp.data() + (h + i) * P, qp.data() + (h + i) * P, P, s2 + i);
          }
        }
        for (int i = 0; i < nh; ++i) scores[(h + i) * T + t] = f2bf(round_bf(s1[i]) + round_bf(s2[i]));
      }
    }
  });
  return 0;
}

int dschat_bf16_mla_mix(const uint16_t* p, int64_t H, int64_t R, int64_t P, const uint16_t* cache,
                        const int64_t* slots, int64_t first, int64_t T, uint16_t* o_lat, int nthreads) {
  if (H <= 0 || R <= 0 || P < 0 || T <= 0) return 1;
  const int64_t ld = R + P;
  const std::vector<float> pf = widen(p, 1, H * T);
  std::vector<float> sums((size_t)(H * R));  // float32 (cpu_common.h's attend_sum), then rounded once
  float* o = sums.data();
  attend_sum(cache, slots, first, ld, pf.data(), H, T, R, o, nthreads);
  for (int64_t i = 0; i < H * R; ++i) o_lat[i] = f2bf(o[i]);
  return 0;
}

}  // extern "C"

DSCHAT_CONTRACT_END

// Packed int8 / int4 GEMV for the CPU (AVX2 + FMA; AVX512-VNNI's dot product where the CPU has it), built at
// first use by kernels/cpu_gemv.py.
//
// The llama.cpp way: each row of x is quantized to int8 in blocks of 32 (one float scale per block, "Q8"),
// then each weight row's dot product runs in integers (cpu_common.h's dot4 / dot8: _mm256_maddubs_epi16 +
// _mm256_madd_epi16, or one _mm256_dpbusd_epi32, the same int32 sums) and is scaled per block in float32. The
// weights are read in their stored layout (kernels/quant_format.py), once per call, whatever the number of
// rows of x (each weight row meets every row of x while it sits in L1):
//   int8: W = data[n, k] * scale[n]
//   int4: W = (nibble[n, k] - zero[n, g]) * scale[n, g] per group g of `group` inputs (a multiple of 64);
//         byte j of a row holds element 2j in its low nibble and 2j+1 in its high one, so x's blocks are
//         stored in pairs, evens then odds (quantize_rows), and 32 bytes of weights meet 64 activations
//         without a shuffle; the two blocks' int32 sums share one vector, scaled by [d_b x4, d_b+1 x4].
//   int6 (lm_head under int4; dschat_gemv only): int4's layout and arithmetic with 6-bit values, zero 32, their
//         high bit pairs in 16 bytes after each 64 inputs' nibbles (unpack64).
// y[m, n] = sum_b d[m, b] * (sum_{k in b} q[n, k] * xq[m, k])  (int8), and for int4, per group,
//           scale[n, g] * (sum_{b in g} d[m, b] * idot(b) - zero[n, g] * sum_{b in g} d[m, b] * xsum[m, b]).
// Output rows are split over `nthreads` OpenMP threads (the caller passes torch.get_num_threads(); decode's
// one row of x: long runs of weight rows, then chunks of 64 KiB, taken from a shared counter, two weight rows at
// a time, half the run or chunk apart: one_row); the library links the libgomp that torch ships, so torch's
// parallel regions and these share one OpenMP runtime and its thread pool. No torch headers: plain C entry
// points over raw pointers (the end of this file), loaded with ctypes, so that the build is one compiler call
// of a few seconds.

#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

#include "cpu_common.h"

constexpr int QK = 32;

struct QuantRows {
  std::vector<int8_t> q;      // [M, Kp]
  std::vector<float> d;       // [M, Kp / 32]
  std::vector<float> dsum;    // [M, Kp / 32]: d * (sum of the block's q)
  int64_t kp = 0, nb = 0;
};

// x [M, K] float32 -> int8 blocks of 32 (zeros past K up to Kp). `paired` (the int4 layout): each pair of
// blocks (b, b+1) is stored as b's even elements, b+1's even elements, b's odd ones, b+1's odd ones: the
// order of the low nibbles, then the high nibbles, of 32 bytes of weights.
QuantRows quantize_rows(const float* x, int64_t M, int64_t K, int64_t kp, bool paired) {
  QuantRows r;
  r.kp = kp;
  r.nb = kp / QK;
  r.q.assign(M * kp, 0);
  r.d.assign(M * r.nb, 0.f);
  r.dsum.assign(M * r.nb, 0.f);
  // AVX2, the same numbers as the scalar rounding (x * (1 / d), rounded to nearest even, clamped to +-127;
  // a NaN's |x| is skipped by the max as std::max skips it, and converts to -127 as a cast of it would)
  alignas(32) float buf[QK];
  alignas(32) int32_t iv[QK];
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < r.nb; ++b) {
      const float* src = x + m * K + b * QK;
      if ((b + 1) * QK > K) {  // the last block, past K: zeros
        for (int i = 0; i < QK; ++i) buf[i] = b * QK + i < K ? src[i] : 0.f;
        src = buf;
      }
      __m256 v[4], mx = _mm256_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = _mm256_loadu_ps(src + 8 * j);
        mx = _mm256_max_ps(_mm256_and_ps(v[j], absmask), mx);
      }
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float amax = _mm_cvtss_f32(h);
      const float d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      const __m256 idv = _mm256_set1_ps(id);
      __m256i sv = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        const __m256 scaled = _mm256_mul_ps(v[j], idv);
        __m256i t = _mm256_cvtps_epi32(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        t = _mm256_min_epi32(_mm256_max_epi32(t, lo), hi);
        sv = _mm256_add_epi32(sv, t);
        _mm256_store_si256((__m256i*)(iv + 8 * j), t);
      }
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sv), _mm256_extracti128_si256(sv, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      const int sum = _mm_cvtsi128_si32(s4);
      int8_t* q = r.q.data() + m * kp + (paired ? (b / 2) * 2 * QK : b * QK);
      if (paired) {
        for (int i = 0; i < QK; ++i) q[(i % 2) * QK + (b % 2) * (QK / 2) + i / 2] = (int8_t)iv[i];
      } else {
        for (int i = 0; i < QK; ++i) q[i] = (int8_t)iv[i];
      }
      r.d[m * r.nb + b] = d;
      r.dsum[m * r.nb + b] = d * (float)sum;
    }
  }
  return r;
}

int64_t grain_for(int64_t row_bytes) {
  return std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, row_bytes));  // >= 32 KiB of weights a chunk
}

// A packed weight [N, K] (int8: data [N, K], scale [N]; int4: data [N, kp/2], scale/zero [N, G]; int6: data
// [N, kp * 3/4], per 64 inputs int4's 32 bytes of low nibbles then 16 of their high bit pairs, scale [N, G]).
struct PackedW {
  int bits = 8;
  const uint8_t* data = nullptr;
  const float* scale = nullptr;
  const uint8_t* zero = nullptr;  // int4 asymmetric; null: zero 8 (int4), 32 (int6, always symmetric)
  int64_t N = 0, K = 0, kp = 0, G = 1, group = 0;
  int64_t row_bytes() const { return bits == 8 ? K : bits == 4 ? kp / 2 : kp / 4 * 3; }
  float zsym() const { return bits == 6 ? 32.f : 8.f; }  // ZSYM<bits>
};

// The zero of a symmetric int4 (8) / int6 (32) weight.
template <int BITS>
constexpr float ZSYM = BITS == 6 ? 32.f : 8.f;

// x's rows as the kernel reads them, for one weight layout (bits, kp, group).
struct PreparedX {
  QuantRows xr;
  std::vector<float> gsum;  // int4: per row and group, sum over its blocks of d * xsum (the zero's term)
  std::vector<float> dvec;  // int4: per row and pair of blocks, [d_b x4, d_b+1 x4] (the 8 int32 lanes' scales)
  std::vector<int8_t> xa;   // int8, one row (decode): |q|
  int64_t M = 0;
};

PreparedX prepare(const float* x, int64_t M, const PackedW& w) {
  PreparedX p;
  p.M = M;
  p.xr = quantize_rows(x, M, w.K, w.bits == 8 ? (w.K + QK - 1) / QK * QK : w.kp, w.bits != 8);
  if (w.bits == 8 && M == 1) {
    p.xa.resize(p.xr.kp);
    for (int64_t k = 0; k < p.xr.kp; ++k) p.xa[k] = (int8_t)std::abs((int)p.xr.q[k]);
  }
  if (w.bits != 8) {
    const int64_t nb = p.xr.nb, bpg = w.group / QK;
    p.gsum.assign(M * w.G, 0.f);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < w.G; ++g)
        for (int64_t j = 0; j < bpg; ++j) p.gsum[m * w.G + g] += p.xr.dsum[m * nb + g * bpg + j];
    p.dvec.resize(M * nb * 4);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t b = 0; b < nb; ++b)
        for (int i = 0; i < 4; ++i) p.dvec[m * nb * 4 + (b / 2) * 8 + (b % 2) * 4 + i] = p.xr.d[m * nb + b];
  }
  return p;
}

inline float dot_q8(const int8_t* w, const int8_t* q, const float* d, int64_t K) {
  const int64_t nfull = K / QK;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two: the FMA's latency
  for (int64_t b = 0; b < nfull; ++b) {
    __m256i wv = _mm256_loadu_si256((const __m256i*)(w + b * QK));
    __m256i xv = _mm256_loadu_si256((const __m256i*)(q + b * QK));
    const __m256i p = dot4(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d[b]), acc[b & 1]);
  }
  float s = hsum(_mm256_add_ps(acc[0], acc[1]));
  if (nfull * QK < K) {
    int tail = 0;
    for (int64_t k = nfull * QK; k < K; ++k) tail += (int)w[k] * (int)q[k];
    s = std::fma(d[nfull], (float)tail, s);  // explicit: every build rounds it once
  }
  return s;
}

// Decode (one row of x): two weight rows at a time, each block of x loaded once for both. int8 multiplies
// |x| by w carrying x's sign (_mm256_sign_epi8(w, x)): the same integer products as dot_q8's |w| * sign(x, w)
// with one sign instead of two, |x| made once per call (PreparedX::xa). Each row keeps dot_q8's two float32
// accumulators (even and odd blocks), so its sum is dot_q8's exactly. The weight rows are prefetched PF bytes
// ahead: with two rows' streams the hardware prefetcher alone fell behind (measured 1 thread, 128 MB of
// int8 weights: 6.9 GB/s without, 9.4 with, 13 GB/s in cache). The hint is non-temporal (weights are read once
// a token, so they need not push the activations and the cache rows out of L2/L3): V2-Lite shapes, 6 layers,
// 2 threads, decode, T0 -> NTA: int4 22.4 -> 24.0 tok/s (the long runs of parallel_runs), int8 19.0 -> 19.6
// (256 KiB chunks) (Zen 1).
constexpr int64_t PF = 4096;

inline void dot2_q8(const int8_t* w0, const int8_t* w1, const int8_t* q, const int8_t* qa, const float* d,
                    int64_t K, float* out) {
  const int64_t nfull = K / QK;
  __m256 a0[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, a1[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t b = 0; b < nfull; ++b) {
    if ((b & 1) == 0) {
      _mm_prefetch((const char*)(w0 + b * QK + PF), _MM_HINT_NTA);
      _mm_prefetch((const char*)(w1 + b * QK + PF), _MM_HINT_NTA);
    }
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(q + b * QK));
    const __m256i xa = _mm256_loadu_si256((const __m256i*)(qa + b * QK));
    const __m256 db = _mm256_broadcast_ss(d + b);
    const __m256i p0 = dot4(xa, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w0 + b * QK)), xv));
    const __m256i p1 = dot4(xa, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i*)(w1 + b * QK)), xv));
    a0[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), db, a0[b & 1]);
    a1[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), db, a1[b & 1]);
  }
  float s0 = hsum(_mm256_add_ps(a0[0], a0[1])), s1 = hsum(_mm256_add_ps(a1[0], a1[1]));
  if (nfull * QK < K) {
    int t0 = 0, t1 = 0;
    for (int64_t k = nfull * QK; k < K; ++k) {
      t0 += (int)w0[k] * (int)q[k];
      t1 += (int)w1[k] * (int)q[k];
    }
    s0 = std::fma(d[nfull], (float)t0, s0);
    s1 = std::fma(d[nfull], (float)t1, s1);
  }
  out[0] = s0;
  out[1] = s1;
}

// int4's zero term of one weight row: sum over its G groups of scale[g] * zero[g] * gs[g] (zero zs where z is
// null: 8, int6's 32), 8 groups at a time (vectorized: in the dot products' loops it was 5 scalar operations a
// group and row, about a quarter of the decode loop's instructions), the rest one by one. Every int4 / int6
// kernel takes it from here.
inline float zero_term(const float* sc, const uint8_t* z, const float* gs, int64_t G, float zs = 8.f) {
  __m256 acc = _mm256_setzero_ps();
  const __m256 eight = _mm256_set1_ps(zs);
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    const __m256 zf = z ? _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(z + g)))) : eight;
    acc = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(sc + g), zf), _mm256_loadu_ps(gs + g), acc);
  }
  float t = hsum(acc);
  for (; g < G; ++g) t = std::fma(sc[g] * (z ? (float)z[g] : zs), gs[g], t);  // one rounding, in every build
  return t;
}

// 64 weights of an int4 (BITS 4) or int6 (6) row from its 64-input piece p (BYTES64 bytes: int4's 32 bytes, byte j
// inputs 2j and 2j + 1 in its nibbles; int6: those as the low 4 bits, then 16 bytes H of the high bit pairs, H[i]
// bits 0-1 for input 2i, 2-3 for 2(i + 16), 4-5 for 2i + 1, 6-7 for 2(i + 16) + 1): lo = the even inputs',
// hi = the odd inputs' unsigned values (0-15, 0-63), the orders of x's paired blocks (quantize_rows).
template <int BITS>
constexpr int64_t BYTES64 = BITS == 4 ? 32 : 48;

template <int BITS>
inline void unpack64(const uint8_t* p, __m256i& lo, __m256i& hi) {
  const __m256i lowmask = _mm256_set1_epi8(0x0F);
  const __m256i raw = _mm256_loadu_si256((const __m256i*)p);
  lo = _mm256_and_si256(raw, lowmask);
  hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask);
  if (BITS == 6) {  // H in both halves; each byte's pair moved to bits 0-1 by its half's shift, then to 4-5
    const __m256i h = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(p + 32)));
    const __m256i three = _mm256_set1_epi8(3);
    const __m256i hl = _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three);
    const __m256i hh = _mm256_and_si256(_mm256_srlv_epi32(h, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three);
    lo = _mm256_or_si256(lo, _mm256_slli_epi16(hl, 4));
    hi = _mm256_or_si256(hi, _mm256_slli_epi16(hh, 4));
  }
}

template <int BITS>
inline float dot_q4(const uint8_t* w, const int8_t* q, const float* dd, const float* sc, const uint8_t* z,
                    const float* gs, int64_t G, int64_t bpg) {
  __m256 acc = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 accg = _mm256_setzero_ps();
    for (int64_t j = 0; j < bpg; j += 2) {  // two blocks: 64 weights, 64 activations
      const int64_t b = g * bpg + j;
      __m256i lo, hi;
      unpack64<BITS>(w + (b / 2) * BYTES64<BITS>, lo, hi);
      const __m256i p = dot8(lo, _mm256_loadu_si256((const __m256i*)(q + b * QK)), hi,
                             _mm256_loadu_si256((const __m256i*)(q + b * QK + QK)));
      accg = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_loadu_ps(dd + b * 4), accg);
    }
    acc = _mm256_fmadd_ps(accg, _mm256_set1_ps(sc[g]), acc);
  }
  return hsum(acc) - zero_term(sc, z, gs, G, ZSYM<BITS>);
}

// dot_q4 for two weight rows w, w1 (their scales sc, sc1, zeros z, z1): each pair of x's blocks and its scales
// loaded once for both; each row's arithmetic and summation order are dot_q4's.
template <int BITS>
inline void dot2_q4(const uint8_t* w, const uint8_t* w1, const int8_t* q, const float* dd, const float* sc,
                    const float* sc1, const uint8_t* z, const uint8_t* z1, const float* gs, int64_t G, int64_t bpg,
                    float* out) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 g0 = _mm256_setzero_ps(), g1 = _mm256_setzero_ps();
    for (int64_t j = 0; j < bpg; j += 2) {
      const int64_t b = g * bpg + j, at = (b / 2) * BYTES64<BITS>;
      if (BITS == 6 || (j & 3) == 0) {  // a 64-byte line every 128 inputs (int4), every 48 bytes (int6)
        _mm_prefetch((const char*)(w + at + PF), _MM_HINT_NTA);
        _mm_prefetch((const char*)(w1 + at + PF), _MM_HINT_NTA);
      }
      const __m256i xl = _mm256_loadu_si256((const __m256i*)(q + b * QK));
      const __m256i xh = _mm256_loadu_si256((const __m256i*)(q + b * QK + QK));
      const __m256 dv = _mm256_loadu_ps(dd + b * 4);
      __m256i lo0, hi0, lo1, hi1;
      unpack64<BITS>(w + at, lo0, hi0);
      unpack64<BITS>(w1 + at, lo1, hi1);
      g0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(lo0, xl, hi0, xh)), dv, g0);
      g1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot8(lo1, xl, hi1, xh)), dv, g1);
    }
    acc0 = _mm256_fmadd_ps(g0, _mm256_set1_ps(sc[g]), acc0);
    acc1 = _mm256_fmadd_ps(g1, _mm256_set1_ps(sc1[g]), acc1);
  }
  out[0] = hsum(acc0) - zero_term(sc, z, gs, G, ZSYM<BITS>);
  out[1] = hsum(acc1) - zero_term(sc1, z1, gs, G, ZSYM<BITS>);
}

// f(n0, n1) over [0, n) in chunks of at least `grain`, split evenly over up to `nthreads` OpenMP threads (as
// at::parallel_for splits): one thread runs it inline, with no parallel region.
template <class F>
void parallel_for(int64_t n, int64_t grain, int nthreads, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks));
  if (nt == 1) {
    f(0, n);
    return;
  }
#pragma omp parallel num_threads(nt)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    const int64_t per = (n + T - 1) / T, n0 = std::min<int64_t>(n, t * per), n1 = std::min<int64_t>(n, n0 + per);
    if (n0 < n1) f(n0, n1);
  }
}

// f(n0, n1) over [0, n) in chunks of `grain`, which up to `nthreads` OpenMP threads take in turn from a shared
// counter (prefill's GEMMs: a thread that the machine's other processes hold back takes fewer chunks, instead of
// the others waiting for its fixed share at the region's end). One thread: inline, no parallel region.
template <class F>
void parallel_chunks(int64_t n, int64_t grain, int nthreads, const F& f) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, chunks));
  if (nt == 1) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < chunks;
         c = next.fetch_add(1, std::memory_order_relaxed))
      f(c * grain, std::min(n, (c + 1) * grain));
  }
}

// The blocked kernels (prefill: many rows of x): RM rows of x times RN weight rows, RM x RN float32 sums in
// registers, so that each block of weights is unpacked once for RM rows and each block of x loaded once for
// RN weight rows. Same arithmetic as dot_q8 / dot_q4 per (row, weight row): int32 per block, float32 across
// blocks in the same order (the results are those of the one-row kernels up to float32 summation order).
// Each weight row is prefetched PF bytes ahead, as the one-row kernels do: the tile reads RN neighbouring rows
// side by side, the pattern the hardware prefetcher alone falls behind on (2-16 rows of x, 2 threads, Zen 4:
// 25-45% faster, e.g. int4 2816 x 2048 at 8 rows 530 -> 351 µs, the dense gate|up 21888 x 2048 4327 -> 2656).
template <int RM, int RN>
void tile_q8(const PackedW& w, const PreparedX& px, int64_t m0, int64_t n0, float* y) {
  const int64_t kp = px.xr.kp, nb = px.xr.nb, nfull = w.K / QK;
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  const int8_t* wr[RN];
  for (int j = 0; j < RN; ++j) wr[j] = (const int8_t*)w.data + (n0 + j) * w.K;
  const int8_t* xq = px.xr.q.data() + m0 * kp;
  const float* xd = px.xr.d.data() + m0 * nb;
  for (int64_t b = 0; b < nfull; ++b) {
    for (int j = 0; j < RN; ++j) {  // one weight row's block at a time in registers, every row of x against it
      if ((b & 1) == 0) _mm_prefetch((const char*)(wr[j] + b * QK + PF), _MM_HINT_NTA);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(wr[j] + b * QK));
      const __m256i wa = _mm256_sign_epi8(wv, wv);
      for (int i = 0; i < RM; ++i) {
        const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + i * kp + b * QK));
        const __m256i p = dot4(wa, _mm256_sign_epi8(xv, wv));
        acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                    _mm256_broadcast_ss(xd + i * nb + b), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      float s = hsum(acc[i][j]);
      if (nfull * QK < w.K) {
        int tail = 0;
        for (int64_t k = nfull * QK; k < w.K; ++k) tail += (int)wr[j][k] * (int)xq[i * kp + k];
        s = std::fma(xd[i * nb + nfull], (float)tail, s);
      }
      y[(m0 + i) * w.N + n0 + j] = s * w.scale[n0 + j];
    }
}

template <int RM, int RN, int BITS>
void tile_q4(const PackedW& w, const PreparedX& px, int64_t m0, int64_t n0, float* y) {
  const int64_t kp = px.xr.kp, nb = px.xr.nb, bpg = w.group / QK, rb = w.row_bytes();
  __m256 acc[RM][RN];
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) acc[i][j] = _mm256_setzero_ps();
  const int8_t* xq = px.xr.q.data() + m0 * kp;
  const float* dv = px.dvec.data() + m0 * nb * 4;
  for (int64_t g = 0; g < w.G; ++g) {
    __m256 sc[RN];
    for (int j = 0; j < RN; ++j) sc[j] = _mm256_set1_ps(w.scale[(n0 + j) * w.G + g]);
    for (int64_t jj = 0; jj < bpg; jj += 2) {  // two blocks: 64 weights, 64 activations
      const int64_t b = g * bpg + jj;
      for (int j = 0; j < RN; ++j) {  // one weight row's 64 weights at a time in registers
        const uint8_t* at = w.data + (n0 + j) * rb + (b / 2) * BYTES64<BITS>;
        if (BITS == 6 || (jj & 3) == 0) _mm_prefetch((const char*)(at + PF), _MM_HINT_NTA);
        __m256i lo, hi;
        unpack64<BITS>(at, lo, hi);
        for (int i = 0; i < RM; ++i) {
          const __m256i p = dot8(lo, _mm256_loadu_si256((const __m256i*)(xq + i * kp + b * QK)), hi,
                                 _mm256_loadu_si256((const __m256i*)(xq + i * kp + b * QK + QK)));
          acc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),
                                      _mm256_mul_ps(_mm256_loadu_ps(dv + i * nb * 4 + b * 4), sc[j]), acc[i][j]);
        }
      }
    }
  }
  for (int i = 0; i < RM; ++i)
    for (int j = 0; j < RN; ++j) {
      const int64_t n = n0 + j;
      y[(m0 + i) * w.N + n] = hsum(acc[i][j]) - zero_term(w.scale + n * w.G, w.zero ? w.zero + n * w.G : nullptr,
                                                        px.gsum.data() + (m0 + i) * w.G, w.G, w.zsym());
    }
}

template <int RM, int RN>
inline void tile(const PackedW& w, const PreparedX& px, int64_t m0, int64_t n0, float* y) {
  if (w.bits == 8)
    tile_q8<RM, RN>(w, px, m0, n0, y);
  else if (w.bits == 4)
    tile_q4<RM, RN, 4>(w, px, m0, n0, y);
  else
    tile_q4<RM, RN, 6>(w, px, m0, n0, y);
}

#ifndef DSCHAT_TM
#define DSCHAT_TM 4
#define DSCHAT_TN 2
#endif
// the blocked kernels' tile (4 x 2: 8 sums + the operands in 16 registers)
constexpr int TM = DSCHAT_TM, TN = DSCHAT_TN;
constexpr int64_t N_STRIP = 16;  // weight rows a thread takes at a time (in L1 while every row of x meets them)

constexpr int64_t M_CHUNK = 64;  // rows of x at a time (int8: 64 x 2 KiB, in L2 while the weights stream past)

// Rows m0..m1 of x against weight row n (RN rows from n) in tiles (the leftover rows in smaller ones).
template <int RN>
void tiles_rows(const PackedW& w, const PreparedX& px, int64_t m0, int64_t m1, int64_t n, float* y) {
  int64_t m = m0;
  for (; m + TM <= m1; m += TM) tile<TM, RN>(w, px, m, n, y);
  switch (m1 - m) {
    case 3: tile<3, RN>(w, px, m, n, y); break;
    case 2: tile<2, RN>(w, px, m, n, y); break;
    case 1: tile<1, RN>(w, px, m, n, y); break;
    default: break;
  }
}

// y[n0..n1) for one prepared row of x (decode): weight rows in pairs, row n0 + i with row n0 + h + i (h half the
// range), the last one alone when the range is odd. Not two adjacent rows: read side by side, two streams a row
// apart inside the same pages left the hardware prefetcher behind (Zen 4, one thread, int8 rows of 2 KiB: 9 GB/s,
// against 17-19 for two rows half a range apart and 23 for a plain sum of the same bytes).
void one_row(const PackedW& w, const PreparedX& px, int64_t n0, int64_t n1, float* y) {
  const int64_t rb = w.row_bytes(), h = (n1 - n0) / 2;
  const int8_t* q = px.xr.q.data();
  const float* d = px.xr.d.data();
  const int64_t G = w.G;
  for (int64_t n = n0; n < n0 + h; ++n) {
    const int64_t m = n + h;  // the pair's second row
    if (w.bits == 8) {
      float o[2];
      dot2_q8((const int8_t*)(w.data + n * rb), (const int8_t*)(w.data + m * rb), q, px.xa.data(), d, w.K, o);
      y[n] = o[0] * w.scale[n];
      y[m] = o[1] * w.scale[m];
    } else {
      float o[2];
      (w.bits == 4 ? dot2_q4<4> : dot2_q4<6>)(w.data + n * rb, w.data + m * rb, q, px.dvec.data(), w.scale + n * G,
                                              w.scale + m * G, w.zero ? w.zero + n * G : nullptr,
                                              w.zero ? w.zero + m * G : nullptr, px.gsum.data(), G, w.group / QK, o);
      y[n] = o[0];
      y[m] = o[1];
    }
  }
  if ((n1 - n0) % 2) {
    const int64_t n = n1 - 1;
    const uint8_t* row = w.data + n * rb;
    if (w.bits == 8) {
      y[n] = dot_q8((const int8_t*)row, q, d, w.K) * w.scale[n];
    } else {
      y[n] = (w.bits == 4 ? dot_q4<4> : dot_q4<6>)(row, q, px.dvec.data(), w.scale + n * G,
                                                   w.zero ? w.zero + n * G : nullptr, px.gsum.data(), G, w.group / QK);
    }
  }
}

// y [M, N] = x W^T for the prepared rows of x; output rows split over `nthreads` threads. One row of x (decode):
// the one-row kernels; more: the blocked ones, each thread over its strips of N_STRIP weight rows for each
// chunk of M_CHUNK rows of x in turn.
void run(const PackedW& w, const PreparedX& px, float* y, int nthreads) {
  const int64_t M = px.M;
  if (M == 0) return;
  if (M >= 2) {
    const int64_t strips = (w.N + N_STRIP - 1) / N_STRIP;
    parallel_for(strips, 1, nthreads, [&](int64_t s0, int64_t s1) {
      for (int64_t m0 = 0; m0 < M; m0 += M_CHUNK) {
        const int64_t m1 = std::min(M, m0 + M_CHUNK);
        for (int64_t s = s0; s < s1; ++s) {
          const int64_t e = std::min(w.N, (s + 1) * N_STRIP);
          int64_t n = s * N_STRIP;
          for (; n + TN <= e; n += TN) tiles_rows<TN>(w, px, m0, m1, n, y);
          for (; n < e; ++n) tiles_rows<1>(w, px, m0, m1, n, y);
        }
      }
    });
    return;
  }
  // one row of x: runs and chunks of an even number of weight rows (one_row pairs them inside), the last row
  // alone when N is odd; grain_for(row)'s 32 KiB of rows counted in pairs: chunks of 64 KiB
  parallel_runs((w.N + 1) / 2, grain_for(w.row_bytes()), nthreads,
                [&](int64_t p0, int64_t p1) { one_row(w, px, 2 * p0, std::min(w.N, 2 * p1), y); });
}

// run() at one row of x for several weights at once (a token's chosen experts): weight i against its prepared x
// px[i] into y + i * ldy, all their rows one range over the threads (pairs, runs and chunks as run() splits one
// weight's: one_row on each weight's share), so one parallel region where each weight had its own.
void run_experts(const std::vector<PackedW>& ws, const std::vector<const PreparedX*>& px, float* y, int64_t ldy,
                 int nthreads) {
  std::vector<int64_t> pairs(ws.size());  // each weight's rows in pairs
  for (size_t i = 0; i < ws.size(); ++i) pairs[i] = (ws[i].N + 1) / 2;
  parallel_parts(pairs, grain_for(ws[0].row_bytes()), nthreads, [&](size_t i, int64_t lo, int64_t hi) {
    one_row(ws[i], *px[i], 2 * lo, std::min(ws[i].N, 2 * hi), y + i * ldy);
  });
}

// A packed weight [N, K] as stored: data [N, row] (int8: row = K; int4: row = kp/2 bytes; int6: kp * 3/4), scale
// [N] (int8) or [N, kp/group] (int4, int6), zero [N, kp/group] or null (int4; int6 has none: zero 32).
PackedW packed(const void* data, const float* scale, const uint8_t* zero, int bits, int64_t group, int64_t N,
               int64_t K, int64_t row) {
  PackedW w;
  w.bits = bits;
  w.N = N;
  w.K = K;
  w.data = (const uint8_t*)data;
  w.scale = scale;
  if (bits == 8) {
    w.kp = (K + QK - 1) / QK * QK;
  } else {
    w.kp = bits == 4 ? row * 2 : row / 3 * 4;
    w.group = group;
    w.G = w.kp / group;
    w.zero = bits == 4 ? zero : nullptr;
  }
  return w;
}

// The arguments the Python side checks, checked again (a wrong call returns an error, never reads astray).
// int6 (symmetric, groups of a multiple of 64) only where `six` (dschat_gemv: lm_head's decode and its few rows).
int bad(int bits, int64_t group, int64_t K, int64_t row, bool six = false) {
  if (bits == 8) return row == K ? 0 : 1;
  if (!(bits == 4 || (six && bits == 6)) || group <= 0 || group % (2 * QK)) return 2;
  if (bits == 6) return (row % 3 == 0 && K <= row / 3 * 4 && (row / 3 * 4) % group == 0) ? 0 : 3;
  return (K <= 2 * row && (2 * row) % group == 0) ? 0 : 3;
}

// -- MLA's absorbed attention over a packed kv_b_proj (engine/mla.py) ---------------------------------------
// kv_b_proj [heads * (nope + v), R] holds per head W_UK [nope, R] then W_UV [v, R]. The absorbed attention folds
// W_UK into the query (q_lat[h] = q_nope[h] W_UK[h], a contraction over W's rows) and W_UV out of the result
// (out[h] = W_UV[h] o_lat[h], over W's columns, the stored layout's own GEMV): a batched GEMV, each head its
// own x and its own rows, in the stored layout (no second copy of the weight in another order).

// The head's rows [r0, r0 + n) of a packed weight as a PackedW of n rows.
PackedW head_rows(const PackedW& w, int64_t r0, int64_t n) {
  PackedW h = w;
  const int64_t gs = w.bits == 8 ? 1 : w.G;
  h.data = w.data + r0 * w.row_bytes();
  h.scale = w.scale + r0 * gs;
  h.zero = w.zero ? w.zero + r0 * gs : nullptr;
  h.N = n;
  return h;
}

// y[k] (k < K) = sum_{n < N} x[n] W[n, k]: float32 x, each weight element dequantised in registers as
// (x[n] * scale) * q (int8) or (x[n] * scale[n, g]) * (nibble - zero[n, g]) (int4; the integer difference is
// exact), summed in float32 over the rows in order: the float model of the dequantised weight to float32
// rounding. The rows go in blocks of T_ROWS (contiguous bytes, the next block prefetched while this one is
// summed); in a block, the columns 64 at a time in 8 accumulators down its rows, kept in `acc` between blocks.
constexpr int64_t T_ROWS = 16;

void gemv_t(const PackedW& w, const float* x, float* y) {
  const int64_t rb = w.row_bytes();
  if (w.bits == 8) {
    const int64_t K = w.K, full = K / 64 * 64, eights = K / 8 * 8;
    for (int64_t n0 = 0; n0 < w.N; n0 += T_ROWS) {
      const int64_t n1 = std::min(w.N, n0 + T_ROWS);
      const bool first = n0 == 0;
      for (int64_t c0 = 0; c0 < full; c0 += 64) {
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + c0 + 8 * j);
        for (int64_t n = n0; n < n1; ++n) {
          const int8_t* r = (const int8_t*)(w.data + n * rb + c0);
          _mm_prefetch((const char*)(r + T_ROWS * rb), _MM_HINT_T0);
          const __m256 a = _mm256_set1_ps(x[n] * w.scale[n]);
          for (int j = 0; j < 8; ++j)
            acc[j] = _mm256_fmadd_ps(
                a, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + 8 * j)))), acc[j]);
        }
        for (int j = 0; j < 8; ++j) _mm256_storeu_ps(y + c0 + 8 * j, acc[j]);
      }
      for (int64_t c0 = full; c0 < eights; c0 += 8) {
        __m256 acc = first ? _mm256_setzero_ps() : _mm256_loadu_ps(y + c0);
        for (int64_t n = n0; n < n1; ++n)
          acc = _mm256_fmadd_ps(_mm256_set1_ps(x[n] * w.scale[n]),
                                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                    _mm_loadl_epi64((const __m128i*)(w.data + n * rb + c0)))), acc);
        _mm256_storeu_ps(y + c0, acc);
      }
      for (int64_t c = eights; c < K; ++c) {
        float acc = first ? 0.f : y[c];
        for (int64_t n = n0; n < n1; ++n)
          acc = std::fma(x[n] * w.scale[n], (float)((const int8_t*)w.data)[n * rb + c], acc);
        y[c] = acc;
      }
    }
    return;
  }
  // int4: 64 columns are 32 bytes of a row, inside one group (a multiple of 64); byte j holds column 2j in its
  // low nibble, 2j + 1 in its high one: the low nibbles sum into 4 accumulators of even columns, the high ones
  // into 4 of odd columns (kept so in `acc` between blocks), interleaved at the end.
  const __m128i lowmask = _mm_set1_epi8(0x0F);
  thread_local std::vector<float> acc_;  // a thread's scratch, kept between calls
  if (acc_.size() < (size_t)w.kp) acc_.resize((size_t)w.kp);
  float* acc = acc_.data();
  for (int64_t n0 = 0; n0 < w.N; n0 += T_ROWS) {
    const int64_t n1 = std::min(w.N, n0 + T_ROWS);
    const bool first = n0 == 0;
    for (int64_t c0 = 0; c0 < w.kp; c0 += 64) {
      const int64_t g = c0 / w.group;
      __m256 ev[4], od[4];
      for (int j = 0; j < 4; ++j) {
        ev[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + c0 + 8 * j);
        od[j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + c0 + 32 + 8 * j);
      }
      for (int64_t n = n0; n < n1; ++n) {
        const uint8_t* r = w.data + n * rb + c0 / 2;
        if ((c0 & 64) == 0) _mm_prefetch((const char*)(r + T_ROWS * rb), _MM_HINT_T0);
        const __m256 a = _mm256_set1_ps(x[n] * w.scale[n * w.G + g]);
        const __m256i z = _mm256_set1_epi32(w.zero ? (int)w.zero[n * w.G + g] : 8);
        for (int half = 0; half < 2; ++half) {
          const __m128i raw = _mm_loadu_si128((const __m128i*)(r + 16 * half));
          const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
          const __m128i lo2 = _mm_srli_si128(lo, 8), hi2 = _mm_srli_si128(hi, 8);
          ev[2 * half] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo), z)),
                                         ev[2 * half]);
          ev[2 * half + 1] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(lo2), z)),
                                             ev[2 * half + 1]);
          od[2 * half] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi), z)),
                                         od[2 * half]);
          od[2 * half + 1] = _mm256_fmadd_ps(a, _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(hi2), z)),
                                             od[2 * half + 1]);
        }
      }
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(acc + c0 + 8 * j, ev[j]);
        _mm256_storeu_ps(acc + c0 + 32 + 8 * j, od[j]);
      }
    }
  }
  // acc's tile at c0: evens c0 + 0, 2, .., 62 then odds c0 + 1, 3, .., 63
  for (int64_t c0 = 0; c0 < w.K; c0 += 64) {
    alignas(32) float tile[64];
    for (int j = 0; j < 4; ++j) {
      const __m256 e = _mm256_loadu_ps(acc + c0 + 8 * j), o = _mm256_loadu_ps(acc + c0 + 32 + 8 * j);
      const __m256 u0 = _mm256_unpacklo_ps(e, o), u1 = _mm256_unpackhi_ps(e, o);
      _mm256_store_ps(tile + 16 * j, _mm256_permute2f128_ps(u0, u1, 0x20));
      _mm256_store_ps(tile + 16 * j + 8, _mm256_permute2f128_ps(u0, u1, 0x31));
    }
    std::copy(tile, tile + std::min<int64_t>(64, w.K - c0), y + c0);
  }
}

// y[n] (n < N) = sum_k W[n, k] x[k] with float32 x, the weight dequantised in registers: int8 scale[n] *
// sum_k q x[k]; int4 sum_g scale[n, g] * sum_{k in g} (nibble - zero[n, g]) x[k] (the integer difference
// exact), summed in float32: the float model of the dequantised weight to float32 rounding, with no rounding
// of x (decode_step's other GEMVs quantize x to int8 blocks; MLA's unfold does not, as its fold cannot).
void gemv_f(const PackedW& w, const float* x, float* y) {
  const int64_t rb = w.row_bytes();
  if (w.bits == 8) {
    const int64_t full = w.K / 32 * 32;
    for (int64_t n = 0; n < w.N; ++n) {
      const int8_t* r = (const int8_t*)(w.data + n * rb);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t k = 0; k < full; k += 32)
        for (int j = 0; j < 4; ++j)
          acc[j] = _mm256_fmadd_ps(
              _mm256_loadu_ps(x + k + 8 * j),
              _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(r + k + 8 * j)))), acc[j]);
      float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
      for (int64_t k = full; k < w.K; ++k) s = std::fma(x[k], (float)r[k], s);
      y[n] = s * w.scale[n];
    }
    return;
  }
  // int4: x in the nibbles' order, per 64 inputs its evens then its odds (zeros past K)
  std::vector<float> xp((size_t)w.kp, 0.f);
  for (int64_t k = 0; k < w.K; ++k) xp[(k / 64) * 64 + (k % 2) * 32 + (k % 64) / 2] = x[k];
  const __m128i lowmask = _mm_set1_epi8(0x0F);
  for (int64_t n = 0; n < w.N; ++n) {
    const uint8_t* r = w.data + n * rb;
    float total = 0.f;
    for (int64_t g = 0; g < w.G; ++g) {
      const __m256i z = _mm256_set1_epi32(w.zero ? (int)w.zero[n * w.G + g] : 8);
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      for (int64_t c0 = g * w.group; c0 < (g + 1) * w.group; c0 += 64) {
        const float* xe = xp.data() + c0;
        for (int half = 0; half < 2; ++half) {
          const __m128i raw = _mm_loadu_si128((const __m128i*)(r + c0 / 2 + 16 * half));
          const __m128i lo = _mm_and_si128(raw, lowmask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), lowmask);
          const __m128i lo2 = _mm_srli_si128(lo, 8), hi2 = _mm_srli_si128(hi, 8);
          const float* e = xe + 16 * half;  // evens of columns c0 + 32 half ..
          const float* o = xe + 32 + 16 * half;
          auto nib = [&](__m128i b) { return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), z)); };
          acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(e), nib(lo), acc[0]);
          acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(e + 8), nib(lo2), acc[1]);
          acc[2] = _mm256_fmadd_ps(_mm256_loadu_ps(o), nib(hi), acc[2]);
          acc[3] = _mm256_fmadd_ps(_mm256_loadu_ps(o + 8), nib(hi2), acc[3]);
        }
      }
      const float gsum = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
      total = std::fma(w.scale[n * w.G + g], gsum, total);
    }
    y[n] = total;
  }
}

// For each of the B rows of x (row b: head h = b % heads), the head's n weight rows from row0 + h * head_rows:
// transposed 0: y[b, :n] = W_h x[b, :K]; 1: y[b, :K] = x[b, :n] W_h, both in float32 x (gemv_f, gemv_t). A head's
// rows are read for all its rows of x in turn (B / heads tokens); threads take the (head, token) pairs.
int heads_gemv(const float* x, int64_t ldx, int64_t B, int64_t heads, int64_t K, const void* data,
               const float* scale, const uint8_t* zero, int bits, int64_t group, int64_t N, int64_t row, int64_t n,
               int64_t row0, int64_t hrows, float* y, int64_t ldy, int nthreads, bool transposed) {
  if (int e = bad(bits, group, K, row)) return e;
  if (heads <= 0 || B % heads || n <= 0 || row0 < 0 || hrows < 0 || row0 + (heads - 1) * hrows + n > N) return 4;
  const PackedW w = packed(data, scale, zero, bits, group, N, K, row);
  const int64_t S = B / heads;
  parallel_for(B, 1, nthreads, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / S, b = (i % S) * heads + h;
      const PackedW wh = head_rows(w, row0 + h * hrows, n);
      if (transposed) {
        gemv_t(wh, x + b * ldx, y + b * ldy);
      } else {
        gemv_f(wh, x + b * ldx, y + b * ldy);
      }
    }
  });
  return 0;
}

}  // namespace

extern "C" {

int dschat_abi_version() { return 5; }

// 1 where this library's integer dot products are AVX512-VNNI's (cpu_common.h), 0 where they are AVX2's.
int dschat_vnni() { return DSCHAT_VNNI; }

// y [M, N] = x [M, K] (float32) through a packed weight [N, K] (see packed(); int8, int4 or int6); 0 on success.
int dschat_gemv(const float* x, int64_t M, int64_t K, const void* data, const float* scale, const uint8_t* zero,
                int bits, int64_t group, int64_t N, int64_t row, float* y, int nthreads) {
  if (int e = bad(bits, group, K, row, true)) return e;
  PackedW w = packed(data, scale, zero, bits, group, N, K, row);
  PreparedX px = prepare(x, M, w);
  run(w, px, y, nthreads);
  return 0;
}

// MLA's fold and unfold over a packed kv_b_proj [N, K] (heads_gemv above): y[b, :n] = W_h x[b, :K] (float32 x), and
// y[b, :K] = x[b, :n] W_h (transposed), head h = b % heads, W_h the n rows from row0 + h * head_rows; rows of
// x and y ldx and ldy floats apart; 0 on success.
int dschat_heads_gemv(const float* x, int64_t ldx, int64_t B, int64_t heads, int64_t K, const void* data,
                      const float* scale, const uint8_t* zero, int bits, int64_t group, int64_t N, int64_t row,
                      int64_t n, int64_t row0, int64_t head_rows, float* y, int64_t ldy, int nthreads) {
  return heads_gemv(x, ldx, B, heads, K, data, scale, zero, bits, group, N, row, n, row0, head_rows, y, ldy,
                    nthreads, false);
}

int dschat_heads_gemv_t(const float* x, int64_t ldx, int64_t B, int64_t heads, int64_t K, const void* data,
                        const float* scale, const uint8_t* zero, int bits, int64_t group, int64_t N, int64_t row,
                        int64_t n, int64_t row0, int64_t head_rows, float* y, int64_t ldy, int nthreads) {
  return heads_gemv(x, ldx, B, heads, K, data, scale, zero, bits, group, N, row, n, row0, head_rows, y, ldy,
                    nthreads, true);
}

// One token through its chosen routed experts (fused_moe.moe_experts's function): x [H] float32, ids [k]
// (ids outside 0..E-1 contribute nothing), weights [k], the packed stacks w13 [E, 2I, H] (gate rows, then up
// rows; row13 bytes a row) and w2 [E, H, I] (row2 bytes a row) -> y [H] = sum_j weights[j] *
// down(silu(gate x) * up x) in float32, each intermediate quantized to int8 blocks like x; 0 on success.
int dschat_experts(const float* x, int64_t H, const int64_t* ids, const float* weights, int64_t k,
                   const void* d13, const float* s13, const uint8_t* z13, const void* d2, const float* s2,
                   const uint8_t* z2, int64_t E, int64_t I, int64_t row13, int64_t row2, int bits, int64_t group,
                   float* y, int nthreads) {
  if (int e = bad(bits, group, H, row13)) return e;
  if (int e = bad(bits, group, I, row2)) return e;
  const int64_t G13 = bits == 8 ? 1 : 2 * row13 / group, G2 = bits == 8 ? 1 : 2 * row2 / group;
  std::fill(y, y + H, 0.f);
  std::vector<int64_t> chosen;  // the entries j of ids that name an expert here, in order
  for (int64_t j = 0; j < k; ++j)
    if (ids[j] >= 0 && ids[j] < E) chosen.push_back(j);
  const int64_t c = (int64_t)chosen.size();
  if (c == 0) return 0;
  std::vector<PackedW> w13(c), w2(c);
  for (int64_t i = 0; i < c; ++i) {
    const int64_t e = ids[chosen[i]];
    w13[i] = packed((const uint8_t*)d13 + e * 2 * I * row13, s13 + e * 2 * I * G13,
                    z13 ? z13 + e * 2 * I * G13 : nullptr, bits, group, 2 * I, H, row13);
    w2[i] = packed((const uint8_t*)d2 + e * H * row2, s2 + e * H * G2, z2 ? z2 + e * H * G2 : nullptr, bits, group,
                   H, I, row2);
  }
  std::vector<float> h(c * 2 * I), a(c * I), o(c * H);
  // every chosen expert's gate|up rows in one parallel region, then their down rows in one more (one_rows over
  // all the experts' rows as one range: each row's sum what run() gives it)
  const PreparedX px = prepare(x, 1, w13[0]);
  std::vector<const PreparedX*> p13(c, &px);
  run_experts(w13, p13, h.data(), 2 * I, nthreads);
  parallel_runs(c * I, 512, nthreads, [&](int64_t i0, int64_t i1) {
    for (int64_t ji = i0; ji < i1; ++ji) {
      const float* hj = h.data() + ji / I * 2 * I;
      const int64_t i = ji % I;
      a[ji] = silu(hj[i]) * hj[I + i];
    }
  });
  std::vector<PreparedX> pa(c);
  std::vector<const PreparedX*> p2(c);
  for (int64_t i = 0; i < c; ++i) {
    pa[i] = prepare(a.data() + i * I, 1, w2[i]);
    p2[i] = &pa[i];
  }
  run_experts(w2, p2, o.data(), H, nthreads);
  for (int64_t j = 0; j < c; ++j)
    for (int64_t i = 0; i < H; ++i) y[i] += o[j * H + i] * weights[chosen[j]];
  return 0;
}

// The weight [N, K] the kernels compute with, in float32 (out [N, K]): int8 data * scale, int4 (nibble - zero) *
// scale per group; rows split over `nthreads` threads. Many rows of x (a long prefill) run faster as this
// and a float32 matmul than as integer dot products on a CPU whose integer multiplies have half the float
// FMA's throughput (AVX2 without VNNI).
int dschat_dequantize(const void* data, const float* scale, const uint8_t* zero, int bits, int64_t group,
                      int64_t N, int64_t K, int64_t row, float* out, int nthreads) {
  if (int e = bad(bits, group, K, row)) return e;
  const PackedW w = packed(data, scale, zero, bits, group, N, K, row);
  parallel_for(N, grain_for(w.row_bytes()), nthreads, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* o = out + n * K;
      if (bits == 8) {
        const int8_t* r = (const int8_t*)w.data + n * K;
        const float s = w.scale[n];
        for (int64_t k = 0; k < K; ++k) o[k] = (float)r[k] * s;
      } else {
        const uint8_t* r = w.data + n * row;
        for (int64_t g = 0; g < w.G; ++g) {
          const float s = w.scale[n * w.G + g], z = w.zero ? (float)w.zero[n * w.G + g] : 8.f;
          const int64_t k1 = std::min(K, (g + 1) * group);
          for (int64_t k = g * group; k < k1; k += 2) {  // group is even, so is k
            const uint8_t v = r[k / 2];
            o[k] = ((float)(v & 0xF) - z) * s;
            if (k + 1 < k1) o[k + 1] = ((float)(v >> 4) - z) * s;
          }
        }
      }
    }
  });
  return 0;
}

// The activation quantization alone (for tests): x [M, K] -> the dequantised activations out [M, kp], in
// natural order.
void dschat_q8_activations(const float* x, int64_t M, int64_t K, int64_t kp, float* out) {
  QuantRows r = quantize_rows(x, M, K, kp, false);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < kp; ++k) out[m * kp + k] = r.d[m * r.nb + k / QK] * (float)r.q[m * kp + k];
}


// -- the one-token decode step's small operations (engine/cpu_step.py), float32 -----------------------------
// Each is one call where PyTorch runs 2 to 15 operators of a few microseconds each. Each rounds as the
// PyTorch reference does, operation by operation (no fused multiply-adds: see the pragmas), except that the
// sums of RMSNorm and softmax run in double before their one rounding to float.
DSCHAT_NO_CONTRACT

static inline float rms_scale(const float* x, int64_t D, float eps) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += (double)(x[i] * x[i]);
  return 1.0f / std::sqrt((float)(ss / (double)D) + eps);
}

// y [D] = w * (x * rsqrt(mean(x^2) + eps)); with res, first x += res (in place).
void dschat_add_rms(float* x, const float* res, const float* w, float eps, int64_t D, float* y) {
  if (res)
    for (int64_t i = 0; i < D; ++i) x[i] = x[i] + res[i];
  const float r = rms_scale(x, D, eps);
  for (int64_t i = 0; i < D; ++i) y[i] = w[i] * (x[i] * r);
}

// q's RoPE and the latent row: q [H, q_stride] holds each head's rope part at offset `nope` (P values);
// kv [R + P] is kv_a_proj's output. q_out [H, P] = rope(q_pe); row [R + P] = [w * rmsnorm(kv[:R]) | rope(kv[R:])].
// RoPE rotates interleaved pairs: (x0 cos - x1 sin, x1 cos + x0 sin), cos/sin [P / 2].
void dschat_rope_latent(const float* q, int64_t H, int64_t q_stride, int64_t nope, const float* kv, int64_t R,
                        int64_t P, const float* w, float eps, const float* cs, const float* sn, float* row,
                        float* q_out) {
  for (int64_t h = 0; h < H; ++h) {
    const float* src = q + h * q_stride + nope;
    float* dst = q_out + h * P;
    for (int64_t i = 0; i < P / 2; ++i) {
      const float x0 = src[2 * i], x1 = src[2 * i + 1], c = cs[i], s = sn[i];
      dst[2 * i] = x0 * c - x1 * s;
      dst[2 * i + 1] = x1 * c + x0 * s;
    }
  }
  const float r = rms_scale(kv, R, eps);
  for (int64_t i = 0; i < R; ++i) row[i] = w[i] * (kv[i] * r);
  for (int64_t i = 0; i < P / 2; ++i) {
    const float x0 = kv[R + 2 * i], x1 = kv[R + 2 * i + 1], c = cs[i], s = sn[i];
    row[R + 2 * i] = x0 * c - x1 * s;
    row[R + 2 * i + 1] = x1 * c + x0 * s;
  }
}

// out [I] = silu(gu[:I]) * gu[I:2I] (silu(g) = g / (1 + exp(-g))).
void dschat_silu_mul(const float* gu, int64_t I, float* out) {
  for (int64_t i = 0; i < I; ++i) out[i] = silu(gu[i]) * gu[I + i];
}

// The index of the largest of v[0..n) as torch.argmax gives it: the first of equal largest values, the first NaN
// where there is one (n >= 1). The lean step's greedy token: two passes over the logits (just written, in L2),
// 8 at a time, where torch.argmax took ~0.13 ms over V2-Lite's 102400.
int64_t dschat_argmax(const float* v, int64_t n) {
  const int64_t n8 = n / 8 * 8;
  __m256 mx = _mm256_set1_ps(-INFINITY);
  int nan = 0;
  for (int64_t i = 0; i < n8; i += 8) {
    const __m256 x = _mm256_loadu_ps(v + i);
    nan |= _mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    mx = _mm256_max_ps(mx, x);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mx);
  float m = lanes[0];
  for (int j = 1; j < 8; ++j) m = std::max(m, lanes[j]);
  for (int64_t i = n8; i < n; ++i) {
    nan |= std::isnan(v[i]);
    m = std::max(m, v[i]);
  }
  if (nan) {
    for (int64_t i = 0; i < n; ++i)
      if (std::isnan(v[i])) return i;
  }
  const __m256 mv = _mm256_set1_ps(m);
  for (int64_t i = 0; i < n8; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + i), mv, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (int64_t i = n8; i < n; ++i)
    if (v[i] == m) return i;
  return 0;
}

// y [n] (first: y = a * x, else y = y + a * x), the product rounded before the sum.
void dschat_axpy(float* y, const float* x, float a, int64_t n, int first) {
  if (first)
    for (int64_t i = 0; i < n; ++i) y[i] = x[i] * a;
  else
    for (int64_t i = 0; i < n; ++i) y[i] = y[i] + x[i] * a;
}

// out [n] = softmax(x) (out may be x): the largest subtracted, exp, the sum in double rounded once to float,
// each divided by it (the router's and the attention's).
static inline void softmax_into(const float* x, int64_t n, float* out) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    out[i] = std::exp(x[i] - m);
    sum += out[i];
  }
  const float fs = (float)sum;
  for (int64_t i = 0; i < n; ++i) out[i] = out[i] / fs;
}

// The router after its linear (kernels/router.py route_reference) for one token: logits [E] -> ids [k] (minus
// offset; in the order chosen, ties to the lower id) and weights [k]. scale <= 0: none.
void dschat_route(const float* logits, int64_t E, const float* bias, int k, int n_group, int topk_group, int top2,
                  int softmax, int normalise, float scale, int64_t offset, int64_t* ids, float* weights) {
  std::vector<float> scores(E), choice(E);
  if (softmax) {
    softmax_into(logits, E, scores.data());
  } else {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-logits[e]));
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = bias ? scores[e] + bias[e] : scores[e];
  if (n_group > 1) {
    const int64_t G = E / n_group;
    std::vector<float> gs(n_group);
    for (int g = 0; g < n_group; ++g) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int64_t j = 0; j < G; ++j) {
        const float v = choice[g * G + j];
        if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
      }
      gs[g] = top2 ? b1 + b2 : b1;
    }
    std::vector<char> keep(n_group, 0);
    for (int t = 0; t < topk_group; ++t) {
      int best = -1;
      for (int g = 0; g < n_group; ++g)
        if (!keep[g] && (best < 0 || gs[g] > gs[best])) best = g;
      keep[best] = 1;
    }
    for (int g = 0; g < n_group; ++g)
      if (!keep[g])
        for (int64_t j = 0; j < G; ++j) choice[g * G + j] = -INFINITY;
  }
  float total = 0.0f;
  for (int j = 0; j < k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < E; ++e)
      if (choice[e] != -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
    if (best < 0) best = 0;
    choice[best] = -INFINITY;
    ids[j] = best - offset;
    weights[j] = scores[best];
  }
  if (normalise) {
    for (int j = 0; j < k; ++j) total = total + weights[j];
    for (int j = 0; j < k; ++j) weights[j] = weights[j] / (total + 1e-20f);
  }
  if (scale > 0.0f)
    for (int j = 0; j < k; ++j) weights[j] = weights[j] * scale;
}

DSCHAT_CONTRACT_END

}  // extern "C"

namespace {

// dschat_mla_attend's register tiles. NR rows' scores against NH heads: q_lat . c_kv over R plus q_pe . k_pe over
// P, 8 floats at a time into NR x NH accumulators, each piece of a row and of a head's query loaded once for the
// tile; out[h * T + t + i] (ql, qp, out at the tile's first head).
template <int NR, int NH>
inline void score_tile(const float* const* c, const float* ql, const float* qp, int64_t R, int64_t P, float scale,
                       float* out, int64_t T, int64_t t) {
  __m256 a[NR][NH];
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NH; ++j) a[i][j] = _mm256_setzero_ps();
  const int64_t r8 = R / 8 * 8, p8 = P / 8 * 8;
  for (int64_t k = 0; k < r8; k += 8) {
    __m256 v[NR];
    for (int i = 0; i < NR; ++i) v[i] = _mm256_loadu_ps(c[i] + k);
    for (int j = 0; j < NH; ++j) {
      const __m256 q = _mm256_loadu_ps(ql + j * R + k);
      for (int i = 0; i < NR; ++i) a[i][j] = _mm256_fmadd_ps(q, v[i], a[i][j]);
    }
  }
  for (int64_t k = 0; k < p8; k += 8) {
    __m256 v[NR];
    for (int i = 0; i < NR; ++i) v[i] = _mm256_loadu_ps(c[i] + R + k);
    for (int j = 0; j < NH; ++j) {
      const __m256 q = _mm256_loadu_ps(qp + j * P + k);
      for (int i = 0; i < NR; ++i) a[i][j] = _mm256_fmadd_ps(q, v[i], a[i][j]);
    }
  }
  for (int i = 0; i < NR; ++i)
    for (int j = 0; j < NH; ++j) {
      float s = hsum(a[i][j]);
      for (int64_t k = r8; k < R; ++k) s = std::fma(ql[j * R + k], c[i][k], s);
      for (int64_t k = p8; k < P; ++k) s = std::fma(qp[j * P + k], c[i][R + k], s);
      out[j * T + t + i] = s * scale;
    }
}

// Rows t..t+NR-1 against every head: tiles of 4 heads, then one at a time.
template <int NR, class Row>
inline void score_heads(const Row& row, int64_t t, const float* q_lat, const float* q_pe, int64_t H, int64_t R,
                        int64_t P, float scale, float* S, int64_t T) {
  const float* c[NR];
  for (int i = 0; i < NR; ++i) c[i] = row(t + i);
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) score_tile<NR, 4>(c, q_lat + h * R, q_pe + h * P, R, P, scale, S + h * T, T, t);
  for (; h < H; ++h) score_tile<NR, 1>(c, q_lat + h * R, q_pe + h * P, R, P, scale, S + h * T, T, t);
}

// With 32 vector registers (AVX-512VL, cpu_common.h's DSCHAT_WIDE) tiles of 4 rows x 4 heads of scores, else 2 x
// 4; -DDSCHAT_ATT_ROWS to measure others (the sums' tiles: cpu_common.h's attend_sum).
#ifndef DSCHAT_ATT_ROWS
#define DSCHAT_ATT_ROWS (DSCHAT_WIDE ? 4 : 2)
#endif
constexpr int ATT_ROWS = DSCHAT_ATT_ROWS;

}  // namespace

extern "C" {

// MLA's absorbed attention for one query over T rows of the latent cache, in place (the lean step's; the
// static step's mla_decode_reference otherwise): row t = cache + slot_t * (R + P), slot_t = slots[t] (a
// sequence's scattered pages) or first + t (slots null: its pages follow one another), holding [c_kv | k_pe].
//   o_lat[h] = sum_t softmax_t(scale * (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t])) c_kv[t]   (h < H)
// The reference's function up to float32 summation order (its einsums, then softmax), with no gather of the
// rows: the scores in tiles of ATT_ROWS rows x 4 heads (threads split the keys), each row read once for all
// heads; the sum in tiles of 4 heads x 8 ATT_BLOCKS columns (threads split the columns of c_kv) over the keys 64
// rows at a time, which stay in L2 while every tile meets them. Every score and output element is summed in the
// same order whatever the tiles' sizes (bit-equal at 2 x 4 / 4 x 16 and 4 x 4 / 4 x 32). With 32 vector
// registers the larger tiles and the row pointers made once a tile of keys (attend_sum_tile, cpu_common.h) measured,
// 2 threads, Zen 4, H 16, R 512, P 64: 154 keys 89 -> 53 µs, 2048 keys 1389 -> 964, 8192 keys 5939 -> 4056. 0 on
// success.
int dschat_mla_attend(const float* q_lat, const float* q_pe, int64_t H, int64_t R, int64_t P, const float* cache,
                      const int64_t* slots, int64_t first, int64_t T, float scale, float* o_lat, int nthreads) {
  if (H <= 0 || R <= 0 || P < 0 || T <= 0) return 1;
  const int64_t ld = R + P;
  auto row = [&](int64_t t) { return cache + (slots ? slots[t] : first + t) * ld; };
  std::vector<float> sc((size_t)(H * T));
  float* S = sc.data();
  parallel_for(T, 16, nthreads, [&](int64_t t0, int64_t t1) {
    int64_t t = t0;
    for (; t + ATT_ROWS <= t1; t += ATT_ROWS) score_heads<ATT_ROWS>(row, t, q_lat, q_pe, H, R, P, scale, S, T);
    for (; t + 2 <= t1; t += 2) score_heads<2>(row, t, q_lat, q_pe, H, R, P, scale, S, T);
    for (; t < t1; ++t) score_heads<1>(row, t, q_lat, q_pe, H, R, P, scale, S, T);
  });
  // softmax over each head's T scores, in place
  parallel_for(H, 1, nthreads, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) softmax_into(S + h * T, T, S + h * T);
  });
  // o_lat, each element summed over the keys in their order
  attend_sum(cache, slots, first, ld, S, H, T, R, o_lat, nthreads);
  return 0;
}

}  // extern "C"


// -- prefill: a float32 GEMM over the packed weights (many rows of x) ------------------------------------------
// y [M, N] = x [M, K] W^T with x in float32 as it comes (no activation quantization) and W the packed weight
// dequantised exactly as dschat_dequantize writes it (int8: q * scale; int4: (nibble - zero) * scale), but a
// panel at a time, in registers: per thread a strip of 16 weight rows and 256 inputs is dequantised once into
// a float32 panel [256][16] (16 KiB, in L1) -- 8 rows x 8 inputs loaded, widened to float32, transposed in
// registers, scaled -- which 6 x 16 register tiles of the output (12 FMA accumulators) then sweep over 96 rows
// of x at a time (x's block in L2), as cpu_gemv_bf16.cpp's GEMM does with bfloat16 weights. So y is the float32
// product of x with the dequantised weight (F.linear(x, dequantize(w))), up to float32 summation order (each
// output summed by FMA along k, blocks of 256 in order). On this AVX2 CPU without VNNI, the float FMA does 8
// multiply-adds a cycle and the integer path (maddubs + madd, one multiply pipe) no more, and prefill's
// activations are in float32 anyway: dequantising in registers costs the panel once per 96..M rows.
namespace {
namespace fgemm {

constexpr int MR = 6, NR = 16;
constexpr int64_t KC = 256, MC = 96, SG = 4;

// Weight row n's stored integers at inputs k..k+7 as float32 (int8: q; int4: the nibbles; k a multiple of 8).
inline __m256 ints8(const PackedW& w, int64_t n, int64_t k) {
  if (w.bits == 8)
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(w.data + n * w.K + k))));
  uint32_t u;
  std::memcpy(&u, w.data + n * (w.kp / 2) + k / 2, 4);
  const __m128i b = _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)u));  // bytes j..j+3: input 2j low, 2j+1 high
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi32(15)), hi = _mm_srli_epi32(b, 4);
  return _mm256_cvtepi32_ps(_mm256_set_m128i(_mm_unpackhi_epi32(lo, hi), _mm_unpacklo_epi32(lo, hi)));
}

// One weight, dequantised as dschat_dequantize does.
inline float weight(const PackedW& w, int64_t n, int64_t k) {
  if (w.bits == 8) return (float)((const int8_t*)w.data)[n * w.K + k] * w.scale[n];
  const uint8_t v = w.data[n * (w.kp / 2) + k / 2];
  const int64_t g = n * w.G + k / w.group;
  return ((float)((k & 1) ? v >> 4 : v & 0xF) - (w.zero ? (float)w.zero[g] : 8.f)) * w.scale[g];
}

// The panel [kc][NR] of weight rows n0..n0+nn-1 at inputs k0..k0+kc-1, dequantised (zeros past nn): blocks of
// 8 rows x 8 inputs widened and transposed in registers, then int8 times the rows' scales, int4 minus their
// zeros and times their scales (the group's: a group holds whole blocks of 8); the rest one by one.
void dequant_panel(const PackedW& w, int64_t n0, int64_t nn, int64_t k0, int64_t kc, float* panel) {
  const int64_t kf = kc / 8 * 8;
  int64_t j0 = 0;
  for (; j0 + 8 <= nn; j0 += 8) {
    const int64_t n = n0 + j0;
    __m256 s = w.bits == 8 ? _mm256_loadu_ps(w.scale + n) : _mm256_setzero_ps(), z = _mm256_setzero_ps();
    int64_t g = -1;
    for (int64_t k = 0; k < kf; k += 8) {
      if (w.bits == 4 && (k0 + k) / w.group != g) {
        g = (k0 + k) / w.group;
        alignas(32) float sv[8], zv[8];
        for (int i = 0; i < 8; ++i) {
          sv[i] = w.scale[(n + i) * w.G + g];
          zv[i] = w.zero ? (float)w.zero[(n + i) * w.G + g] : 8.f;
        }
        s = _mm256_load_ps(sv);
        z = _mm256_load_ps(zv);
      }
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = ints8(w, n + i, k0 + k);
      transpose8(r);  // r[i]: input k0+k+i of the 8 rows
      for (int i = 0; i < 8; ++i) {
        const __m256 v = w.bits == 8 ? _mm256_mul_ps(r[i], s) : _mm256_mul_ps(_mm256_sub_ps(r[i], z), s);
        _mm256_storeu_ps(panel + (k + i) * NR + j0, v);
      }
    }
    for (int64_t k = kf; k < kc; ++k)
      for (int64_t j = j0; j < j0 + 8; ++j) panel[k * NR + j] = weight(w, n0 + j, k0 + k);
  }
  for (int64_t j = j0; j < NR; ++j)
    for (int64_t k = 0; k < kc; ++k) panel[k * NR + j] = j < nn ? weight(w, n0 + j, k0 + k) : 0.f;
}

// Strips [s0, s1) of NR weight rows against x [M, K]: for each block of KC inputs the strips' panels are
// dequantised once, then every block of MC rows of x sweeps them; the float32 sums wait in `acc` ([M, NR] a
// strip) until the last block writes them out.
void gemm_strips(const PackedW& w, const float* x, int64_t M, int64_t s0, int64_t s1, float* y) {
  const int64_t ns = s1 - s0, K = w.K, N = w.N;
  std::vector<float> panels((size_t)ns * KC * NR), acc((size_t)ns * M * NR);
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n0 = (s0 + s) * NR;
      dequant_panel(w, n0, std::min<int64_t>(NR, N - n0), k0, kc, panels.data() + s * KC * NR);
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
      for (int64_t j = 0; j < nn; ++j) y[m * N + n0 + j] = c[m * NR + j];
  }
}

void gemm(const PackedW& w, const float* x, int64_t M, float* y, int nthreads) {
  const int64_t strips = (w.N + NR - 1) / NR, groups = (strips + SG - 1) / SG;
  parallel_chunks(groups, 1, nthreads, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) gemm_strips(w, x, M, g * SG, std::min(strips, (g + 1) * SG), y);
  });
}


// -- prefill, int4: an integer GEMM summing 8 maddubs in int16 per madd (VNNI: 8 dpbusd into int32) -----------
// x quantized as the GEMV quantizes it (int8 blocks of 32, natural order). A strip of 8 weight rows is laid out
// per block of 32 inputs as 8 vectors, vector c holding inputs 4c..4c+3 of each of the 8 rows (its nibbles
// widened to bytes, an 8 x 8 transpose of 4-byte words), so that one maddubs of it with x's 4 inputs broadcast
// gives 8 rows' pair sums; the 8 vectors of a block are summed in int16 (a nibble 0..15 times |x| <= 127: a
// pair sum <= 3810, 8 of them <= 30480, no overflow), then one madd widens them to int32 and one FMA scales
// them by d[m, b] * scale[n, g] into float32. So 4 multiplies (maddubs) of 2 cycles on the one vector-integer
// multiply pipe do 128 multiply-adds, against the float FMA's 8 a cycle. The zero point's term, per row and
// group scale * zero * sum_{b in g} d * sum(q), is taken off at the end. The result is gemv's (the float model
// of the dequantised weight and the dequantised activations) up to float32 summation order.
#ifndef DSCHAT_IMR
#define DSCHAT_IMR 6
#endif
constexpr int IMR = DSCHAT_IMR;  // rows of x a tile (2..6 measured within 10%: 6, 2-3% ahead of 4)
constexpr int64_t IKC = 512, IMC = 96, ISG = 4;  // inputs a panel, rows of x a block, strips of 8 a task

// One tile: R rows of x against a strip's panel, over nblk blocks. int4: the block's int32 sums scaled by
// d[m, b] * its group's scale; int8 (VNNI only): the sums start from -128 * the block's sum of x (xs), the
// weight's offset, and are scaled by d[m, b] alone (the row's scale comes at the end).
template <int BITS, int R>
inline void micro_i(const int8_t* xq, int64_t ldx, const float* xd, [[maybe_unused]] const int32_t* xs, int64_t ldd,
                    const uint8_t* panel, [[maybe_unused]] const float* sv, int64_t nblk, float* c, bool add) {
  __m256 f[R];
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; ++b) {
    __m256i a[R];
    for (int r = 0; r < R; ++r) a[r] = BITS == 8 ? _mm256_set1_epi32(-xs[r * ldd + b]) : _mm256_setzero_si256();
    const uint8_t* pb = panel + b * 256;
    const int8_t* xb = xq + b * QK;
    for (int q = 0; q < 8; ++q) {
      const __m256i wv = _mm256_load_si256((const __m256i*)(pb + q * 32));
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, xb + r * ldx + q * 4, 4);
#if DSCHAT_VNNI
        a[r] = _mm256_dpbusd_epi32(a[r], wv, _mm256_set1_epi32(x4));  // int32 sums directly
#else
        a[r] = _mm256_add_epi16(a[r], _mm256_maddubs_epi16(wv, _mm256_set1_epi32(x4)));
#endif
      }
    }
    if constexpr (BITS == 8) {
      for (int r = 0; r < R; ++r)
        f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_broadcast_ss(xd + r * ldd + b), f[r]);
    } else {
      const __m256 s = _mm256_loadu_ps(sv + b * 8);
      for (int r = 0; r < R; ++r) {
#if DSCHAT_VNNI
        const __m256i sum = a[r];
#else
        const __m256i sum = _mm256_madd_epi16(a[r], _mm256_set1_epi16(1));
#endif
        f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(_mm256_broadcast_ss(xd + r * ldd + b), s),
                               f[r]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    if (add) f[r] = _mm256_add_ps(f[r], _mm256_loadu_ps(c + r * 8));
    _mm256_storeu_ps(c + r * 8, f[r]);
  }
}

// micro_i at r rows of x (1..IMR), the row count as its template argument.
template <int BITS>
inline void micro_any(int r, const int8_t* xq, int64_t ldx, const float* xd, const int32_t* xs, int64_t ldd,
                      const uint8_t* panel, const float* sv, int64_t nblk, float* c, bool add) {
  switch (r) {
    case 6: micro_i<BITS, (IMR >= 6 ? 6 : 1)>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
    case 5: micro_i<BITS, (IMR >= 5 ? 5 : 1)>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
    case 4: micro_i<BITS, 4>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
    case 3: micro_i<BITS, 3>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
    case 2: micro_i<BITS, 2>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
    default: micro_i<BITS, 1>(xq, ldx, xd, xs, ldd, panel, sv, nblk, c, add); break;
  }
}

// Weight rows n0..n0+nn-1 (nn <= 8; zeros past nn) at blocks b0..b0+nblk-1 -> the panel [nblk][8 vectors] and
// the scales sv [nblk][8] (each block's group's scale, per row).
void panel_i4(const PackedW& w, int64_t n0, int64_t nn, int64_t b0, int64_t nblk, uint8_t* panel, float* sv) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const int64_t rb = w.kp / 2;
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t g = (b0 + b) * QK / w.group;
    __m256 r[8];
    for (int i = 0; i < 8; ++i) {
      if (i < nn) {
        const uint8_t* at = w.data + (n0 + i) * rb + (b0 + b) * (QK / 2);
        if ((b & 3) == 0) _mm_prefetch((const char*)(at + PF), _MM_HINT_NTA);
        const __m128i raw = _mm_loadu_si128((const __m128i*)at);
        const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
        r[i] = _mm256_castsi256_ps(_mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi)));
        sv[b * 8 + i] = w.scale[(n0 + i) * w.G + g];
      } else {
        r[i] = _mm256_setzero_ps();
        sv[b * 8 + i] = 0.f;
      }
    }
    transpose8(r);  // r[c]: inputs 4c..4c+3 of the 8 rows
    for (int c = 0; c < 8; ++c) _mm256_store_si256((__m256i*)(panel + b * 256 + c * 32), _mm256_castps_si256(r[c]));
  }
}

// -- prefill, int8 (AVX512-VNNI builds only): the same integer GEMM over the int8 weight --------------------
// x quantized as the GEMV quantizes it (int8 blocks of 32, natural order, as for int4). dpbusd multiplies
// unsigned bytes by signed ones, so the panel holds each weight plus 128 (w ^ 0x80: 0..255) and each block's
// int32 sum of (w + 128) x loses 128 * sum(x) (per row of x and block, made once) in integers: the exact integer
// dot product of the block, as dot_q8's. Then, as dot_q8 does, float32 sums of d[m, b] times it across the
// blocks, and the row's scale once at the end: gemv's numbers up to float32 summation order. Without VNNI
// (maddubs: a pair of (w + 128) x overflows int16) the library does not offer it and int8 prefill keeps the
// float GEMM (quant_cpu.py).
#if DSCHAT_VNNI
// Weight rows n0..n0+nn-1 (nn <= 8; zeros past nn) at blocks b0..b0+nblk-1 -> the panel [nblk][8 vectors] of
// w + 128, laid out as panel_i4's (vector c: inputs 4c..4c+3 of the 8 rows); past K (the last block) w is 0.
// Each row's bytes PF ahead are prefetched (at K 2048, rows further down this strip or the next one's; at the
// dense 10944, this row's a few panels on): 2 threads, 2816 x 2048 + 2048 x 1408 at 16 / 48 rows, 5-10% over no
// prefetch, the next strip's rows at the same inputs no better (panel_i4 does the same, within noise there).
void panel_i8(const PackedW& w, int64_t n0, int64_t nn, int64_t b0, int64_t nblk, uint8_t* panel) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  alignas(32) int8_t tail[QK];
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t k = (b0 + b) * QK, kn = std::min<int64_t>(QK, w.K - k);
    __m256 r[8];
    for (int i = 0; i < 8; ++i) {
      if (i < nn) {
        const int8_t* src = (const int8_t*)w.data + (n0 + i) * w.K + k;
        if ((b & 1) == 0) _mm_prefetch((const char*)(src + PF), _MM_HINT_NTA);
        if (kn < QK) {
          std::memset(tail, 0, QK);
          std::memcpy(tail, src, kn);
          src = tail;
        }
        r[i] = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)src), flip));
      } else {
        r[i] = _mm256_setzero_ps();
      }
    }
    transpose8(r);
    for (int c = 0; c < 8; ++c) _mm256_store_si256((__m256i*)(panel + b * 256 + c * 32), _mm256_castps_si256(r[c]));
  }
}
#endif

struct alignas(32) Aligned256 { uint8_t v[256]; };

// Strips [s0, s1) of 8 weight rows against x's quantized rows: for each block of IKC inputs the strips' panels
// are made once, then every block of IMC rows of x sweeps them; the float32 sums wait in `acc` ([M, 8] a strip)
// until the last block. int4 (BITS 4): y = the sums - the zero's term; int8 (BITS 8, VNNI only; xs the rows'
// 128 * block sums): y = the sums times the row's scale.
template <int BITS>
void igemm_strips(const PackedW& w, const QuantRows& xr, const float* gsum, const int32_t* xs, int64_t M,
                  int64_t s0, int64_t s1, float* y) {
  const int64_t ns = s1 - s0, nb = xr.nb, N = w.N, kb = IKC / QK;
  std::vector<Aligned256> panels((size_t)ns * kb);
  std::vector<float> svs(BITS == 4 ? (size_t)ns * kb * 8 : 0), acc((size_t)ns * M * 8);
  for (int64_t b0 = 0; b0 < nb; b0 += kb) {
    const int64_t nblk = std::min(kb, nb - b0);
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t n0 = (s0 + s) * 8;
      if constexpr (BITS == 4) {
        panel_i4(w, n0, std::min<int64_t>(8, N - n0), b0, nblk, panels[s * kb].v, svs.data() + s * kb * 8);
      } else {
#if DSCHAT_VNNI
        panel_i8(w, n0, std::min<int64_t>(8, N - n0), b0, nblk, panels[s * kb].v);
#endif
      }
    }
    for (int64_t m0 = 0; m0 < M; m0 += IMC) {
      const int64_t m1 = std::min(M, m0 + IMC);
      for (int64_t s = 0; s < ns; ++s)
        for (int64_t m = m0; m < m1; m += IMR) {
          const int r = (int)std::min<int64_t>(IMR, m1 - m);
          const int8_t* xq = xr.q.data() + m * xr.kp + b0 * QK;
          float* c = acc.data() + (s * M + m) * 8;
          micro_any<BITS>(r, xq, xr.kp, xr.d.data() + m * nb + b0, BITS == 8 ? xs + m * nb + b0 : xs, nb,
                          panels[s * kb].v, BITS == 4 ? svs.data() + s * kb * 8 : nullptr, nblk, c, b0 > 0);
        }
    }
  }
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t n0 = (s0 + s) * 8, nn = std::min<int64_t>(8, N - n0);
    for (int64_t j = 0; j < nn; ++j) {
      const int64_t n = n0 + j;
      for (int64_t m = 0; m < M; ++m) {
        const float a = acc[(s * M + m) * 8 + j];
        if constexpr (BITS == 4)  // y = the sums - sum_g scale * zero * gsum
          y[m * N + n] = a - zero_term(w.scale + n * w.G, w.zero ? w.zero + n * w.G : nullptr, gsum + m * w.G, w.G);
        else
          y[m * N + n] = a * w.scale[n];
      }
    }
  }
}

// The strips of 8 weight rows in tasks of ISG, which the threads take in turn.
template <int BITS>
void igemm_tasks(const PackedW& w, const QuantRows& xr, const float* gsum, const int32_t* xs, int64_t M, float* y,
                 int nthreads) {
  const int64_t strips = (w.N + 7) / 8, tasks = (strips + ISG - 1) / ISG;
  parallel_chunks(tasks, 1, nthreads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      igemm_strips<BITS>(w, xr, gsum, xs, M, t * ISG, std::min(strips, (t + 1) * ISG), y);
  });
}

void igemm4(const PackedW& w, const float* x, int64_t M, float* y, int nthreads) {
  const QuantRows xr = quantize_rows(x, M, w.K, w.kp, false);
  const int64_t bpg = w.group / QK;
  std::vector<float> gsum(M * w.G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < w.G; ++g)
      for (int64_t j = 0; j < bpg; ++j) gsum[m * w.G + g] += xr.dsum[m * xr.nb + g * bpg + j];
  igemm_tasks<4>(w, xr, gsum.data(), nullptr, M, y, nthreads);
}

#if DSCHAT_VNNI
void igemm8(const PackedW& w, const float* x, int64_t M, float* y, int nthreads) {
  const QuantRows xr = quantize_rows(x, M, w.K, w.kp, false);
  std::vector<int32_t> xs(M * xr.nb);  // 128 * each block's sum of q: what the weights' offset adds
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < xr.nb; ++b) {
      int32_t t = 0;
      for (int i = 0; i < QK; ++i) t += xr.q[m * xr.kp + b * QK + i];
      xs[m * xr.nb + b] = 128 * t;
    }
  igemm_tasks<8>(w, xr, nullptr, xs.data(), M, y, nthreads);
}
#endif

}  // namespace fgemm
}  // namespace

extern "C" {

int dschat_prefill_abi_version() { return 2; }

// int4 only: y [M, N] = x [M, K] (float32, quantized to int8 blocks as dschat_gemv quantizes it) times the packed
// weight, by the integer GEMM above (gemv's numbers up to float32 summation order); 0 on success.
int dschat_igemm4(const float* x, int64_t M, int64_t K, const void* data, const float* scale, const uint8_t* zero,
                  int bits, int64_t group, int64_t N, int64_t row, float* y, int nthreads) {
  if (int e = bad(bits, group, K, row)) return e;
  if (bits != 4) return 4;
  if (M <= 0 || N <= 0) return 0;
  fgemm::igemm4(packed(data, scale, zero, bits, group, N, K, row), x, M, y, nthreads);
  return 0;
}

// int8 only, AVX512-VNNI builds only (else 5): y [M, N] = x [M, K] (float32, quantized to int8 blocks as
// dschat_gemv quantizes it) times the packed weight, by the integer GEMM above (gemv's numbers up to float32
// summation order); 0 on success.
int dschat_igemm8(const float* x, int64_t M, int64_t K, const void* data, const float* scale, const uint8_t* zero,
                  int bits, int64_t group, int64_t N, int64_t row, float* y, int nthreads) {
  if (int e = bad(bits, group, K, row)) return e;
  if (bits != 8) return 4;
#if DSCHAT_VNNI
  if (M <= 0 || N <= 0) return 0;
  fgemm::igemm8(packed(data, scale, zero, bits, group, N, K, row), x, M, y, nthreads);
  return 0;
#else
  (void)x, (void)M, (void)data, (void)scale, (void)zero, (void)N, (void)y, (void)nthreads;
  return 5;
#endif
}

// y [M, N] = x [M, K] (float32) times the packed weight [N, K] (see packed()) dequantised, in float32 (the
// float GEMM above: no activation quantization); 0 on success.
int dschat_gemm_f32(const float* x, int64_t M, int64_t K, const void* data, const float* scale,
                    const uint8_t* zero, int bits, int64_t group, int64_t N, int64_t row, float* y, int nthreads) {
  if (int e = bad(bits, group, K, row)) return e;
  if (M <= 0 || N <= 0) return 0;
  fgemm::gemm(packed(data, scale, zero, bits, group, N, K, row), x, M, y, nthreads);
  return 0;
}

}  // extern "C"

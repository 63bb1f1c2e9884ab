// What cpu_gemv.cpp and cpu_gemv_bf16.cpp share (AVX2 + FMA, AVX512-VNNI where built with it): a horizontal sum,
// the integer dot products, decode's split of a GEMV's rows over threads, the float32 register tile of the
// prefill GEMMs with its 8 x 8 transpose, and the decode attention's weighted sum over float32 or bf16 rows. Included
// inside each source's anonymous namespace (each gets its own copy); kernels/cpu_gemv.py counts this text in
// the library's build key and ships it with the sources.

// silu(g) = g / (1 + exp(-g)), in float32 as PyTorch's F.silu computes it element by element (the SwiGLUs of
// both libraries: each then multiplies by up, bfloat16's rounding first).
inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The integer dot products of the int8 / int4 kernels: int32 lanes each the sum of 4 products of unsigned bytes
// u and signed bytes s (dot4), or of two such pairs (dot8, 8 products a lane). With AVX512-VNNI (the library is
// built with it where the CPU has it: kernels/cpu_gemv.py) one vpdpbusd a pair; else maddubs (pairs into
// int16), madd by ones (int16 pairs into int32), dot8's two maddubs summed in int16 first. The kernels' operands
// never saturate int16 there (|u| <= 127 times |s| <= 127, a nibble <= 15 times |s| <= 128, or int6's value <= 63
// times |s| <= 127: 4 * 63 * 127 = 32004; two products a pair and two pairs at most), so both give the same int32
// lanes and every result is the same bit for bit.
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DSCHAT_VNNI 1
inline __m256i dot4(__m256i u, __m256i s) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s); }
inline __m256i dot8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u0, s0), u1, s1);
}
#else
#define DSCHAT_VNNI 0
inline __m256i dot4(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
inline __m256i dot8(__m256i u0, __m256i s0, __m256i u1, __m256i s1) {
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, s0), _mm256_maddubs_epi16(u1, s1)),
                           _mm256_set1_epi16(1));
}
#endif

// f(n0, n1) over [0, n) for decode's GEMV: first one long run a thread (3/4 of an even split, whichever thread
// comes first taking the next), then chunks of `grain`, all from a shared counter. Long runs let a thread stream
// its weights with the prefetcher ahead (chunks of 32 KiB alone left each thread's stream cold every 32 KiB, and
// prefetching into the other thread's chunk); the small chunks at the end still let a thread that the machine's
// other processes hold back leave the rest to the others. V2-Lite shapes, 6 layers, 2 threads (Zen 1), decode:
// int8 15.7 -> 20.1 tok/s with the non-temporal prefetch, an even split of the rows 20.2. One thread: inline.
template <class F>
void parallel_runs(int64_t n, int64_t grain, int nthreads, const F& f) {
  const int nt = (int)std::max<int64_t>(1, std::min<int64_t>(nthreads, (n + grain - 1) / grain));
  if (nt == 1) {
    f(0, n);
    return;
  }
  const int64_t run = std::max<int64_t>(grain, n * 3 / (4 * nt)), runs_end = std::min(n, run * nt);
  const int64_t tasks = nt + (n - runs_end + grain - 1) / grain;
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
  {
    for (int64_t c = next.fetch_add(1, std::memory_order_relaxed); c < tasks;
         c = next.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t a = c < nt ? c * run : runs_end + (c - nt) * grain;
      const int64_t e = std::min(c < nt ? runs_end : n, a + (c < nt ? run : grain));
      if (a < e) f(a, e);
    }
  }
}

// DSCHAT_NO_CONTRACT ... DSCHAT_CONTRACT_END: no fused multiply-adds made from a * b + c in between (the code
// there rounds as PyTorch's operators do, operation by operation). GCC: push / pop options; clang: its pragma
// holds to the end of the file (it has no pop).
#if defined(__clang__)
#define DSCHAT_NO_CONTRACT _Pragma("clang fp contract(off)")
#define DSCHAT_CONTRACT_END
#elif defined(__GNUC__)
#define DSCHAT_NO_CONTRACT _Pragma("GCC push_options") _Pragma("GCC optimize(\"fp-contract=off\")")
#define DSCHAT_CONTRACT_END _Pragma("GCC pop_options")
#else
#define DSCHAT_NO_CONTRACT
#define DSCHAT_CONTRACT_END
#endif

// parallel_runs over several parts as one range (part i: sizes[i] units, after the parts before it), so that
// several weights' rows split over the threads in one parallel region where each had its own: f(i, lo, hi) for
// units lo..hi-1 of part i (its own numbering), every piece of the range once.
template <class F>
void parallel_parts(const std::vector<int64_t>& sizes, int64_t grain, int nthreads, const F& f) {
  std::vector<int64_t> p0(sizes.size() + 1, 0);  // each part's first unit in the joint range
  for (size_t i = 0; i < sizes.size(); ++i) p0[i + 1] = p0[i] + sizes[i];
  parallel_runs(p0.back(), grain, nthreads, [&](int64_t a, int64_t b) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      const int64_t lo = std::max(a, p0[i]), hi = std::min(b, p0[i + 1]);
      if (lo < hi) f(i, lo - p0[i], hi - p0[i]);
    }
  });
}

// c[i, 0..NR) (+)= sum over kc of A[i, k] * P[k, 0..NR) for R rows of A (lda apart), P a float32 panel
// [kc][NR] (NR a multiple of 8), c's rows ldc apart: R x NR / 8 accumulators in registers.
template <int R, int NR>
inline void micro(const float* A, int64_t lda, const float* P, int64_t kc, float* c, int64_t ldc, bool add) {
  constexpr int V = NR / 8;
  __m256 acc[R][V];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < V; ++v) acc[i][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; ++k) {
    __m256 b[V];
    for (int v = 0; v < V; ++v) b[v] = _mm256_loadu_ps(P + k * NR + 8 * v);
    for (int i = 0; i < R; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      for (int v = 0; v < V; ++v) acc[i][v] = _mm256_fmadd_ps(a, b[v], acc[i][v]);
    }
  }
  for (int i = 0; i < R; ++i) {
    float* ci = c + i * ldc;
    for (int v = 0; v < V; ++v) {
      if (add) acc[i][v] = _mm256_add_ps(acc[i][v], _mm256_loadu_ps(ci + 8 * v));
      _mm256_storeu_ps(ci + 8 * v, acc[i][v]);
    }
  }
}

// micro for r (1..MR, MR <= 6) rows.
template <int MR, int NR>
inline void micro_any(int r, const float* A, int64_t lda, const float* P, int64_t kc, float* c, int64_t ldc,
                      bool add) {
  switch (r) {
    case 6: micro<(MR >= 6 ? 6 : 1), NR>(A, lda, P, kc, c, ldc, add); break;
    case 5: micro<(MR >= 5 ? 5 : 1), NR>(A, lda, P, kc, c, ldc, add); break;
    case 4: micro<(MR >= 4 ? 4 : 1), NR>(A, lda, P, kc, c, ldc, add); break;
    case 3: micro<(MR >= 3 ? 3 : 1), NR>(A, lda, P, kc, c, ldc, add); break;
    case 2: micro<(MR >= 2 ? 2 : 1), NR>(A, lda, P, kc, c, ldc, add); break;
    default: micro<1, NR>(A, lda, P, kc, c, ldc, add); break;
  }
}

// 8 x 8 floats transposed in registers (r[i] = row i -> r[j] = column j).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Values of a latent cache row as float32: float32 rows as they are, bfloat16 ones widened (exact).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  const uint32_t u = (uint32_t)*p << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// MLA's decode attention, its weighted sum: o[h, k .. k + 8 NB) (float32; from zero where t0 is 0) += sum over
// keys t0..t1 of p[h, t] c_kv[t, k ..] for NH heads (p, o at the first head; p's rows T apart, o's R apart;
// rows[t - t0] key t's row, float32 or bfloat16): NH x NB accumulators in registers, each piece of a row loaded
// once for the NH heads, each weight broadcast once for the NB pieces, every element summed in t's order. The
// rows come as pointers made once a tile of keys and NH is fixed at compile time: with a row lambda's branch
// (scattered pages or not) inside the loop, or a run-time head count, GCC kept the sums in memory, a store each
// per key (the float32 step's sum 2x slower, the bf16 step's 2-3x).
template <int NH, int NB, class E>
inline void attend_sum_tile(const E* const* rows, const float* p, int64_t T, int64_t t0, int64_t t1,
                            int64_t k, float* o, int64_t R) {
  __m256 acc[NH][NB];
  for (int j = 0; j < NH; ++j)
    for (int b = 0; b < NB; ++b) acc[j][b] = t0 ? _mm256_loadu_ps(o + j * R + k + 8 * b) : _mm256_setzero_ps();
  for (int64_t t = t0; t < t1; ++t) {
    const E* c = rows[t - t0] + k;
    __m256 v[NB];
    for (int b = 0; b < NB; ++b) v[b] = load8(c + 8 * b);
    for (int j = 0; j < NH; ++j) {
      const __m256 w = _mm256_broadcast_ss(p + j * T + t);
      for (int b = 0; b < NB; ++b) acc[j][b] = _mm256_fmadd_ps(w, v[b], acc[j][b]);
    }
  }
  for (int j = 0; j < NH; ++j)
    for (int b = 0; b < NB; ++b) _mm256_storeu_ps(o + j * R + k + 8 * b, acc[j][b]);
}

// Columns k..k+8NB-1 for every head over keys t0..t1: tiles of 4 heads, then one at a time.
template <int NB, class E>
inline void attend_sum_heads(const E* const* rows, const float* p, int64_t H, int64_t T, int64_t t0,
                             int64_t t1, int64_t k, float* o, int64_t R) {
  int64_t h = 0;
  for (; h + 4 <= H; h += 4) attend_sum_tile<4, NB>(rows, p + h * T, T, t0, t1, k, o + h * R, R);
  for (; h < H; ++h) attend_sum_tile<1, NB>(rows, p + h * T, T, t0, t1, k, o + h * R, R);
}

// With 32 vector registers (AVX-512VL) the attentions' tiles are larger (4 heads x 32 columns here, 16 sums);
// -DDSCHAT_ATT_BLOCKS to measure others.
#if defined(__AVX512VL__)
#define DSCHAT_WIDE 1
#else
#define DSCHAT_WIDE 0
#endif
#ifndef DSCHAT_ATT_BLOCKS
#define DSCHAT_ATT_BLOCKS (DSCHAT_WIDE ? 4 : 2)
#endif
constexpr int ATT_BLOCKS = DSCHAT_ATT_BLOCKS;
constexpr int64_t ATT_KEYS = 64;  // keys a tile: their rows stay in L2 while every tile of columns meets them

// o [H, R] (float32) = sum over the keys t < T of p[h, t] c_kv[t, :R], row t at cache + slot_t * ld, slot_t =
// slots[t] or first + t (slots null): the columns over threads in blocks of 8 (those past the last 8 with the last
// block), per tile of ATT_KEYS keys tiles of 4 heads x 8 ATT_BLOCKS columns, each element summed in t's order, so
// the results are those of one pass over the keys with the sums in registers, bit for bit, whatever the tiles,
// the threads or the build (dschat_mla_attend's float32 rows, dschat_bf16_mla_mix's bfloat16 ones).
template <class E>
void attend_sum(const E* cache, const int64_t* slots, int64_t first, int64_t ld, const float* p, int64_t H,
                int64_t T, int64_t R, float* o, int nthreads) {
  const int64_t blocks = R / 8;
  parallel_runs(blocks + (R % 8 ? 1 : 0), 4, nthreads, [&](int64_t b0, int64_t b1) {
    const E* rows[ATT_KEYS];
    for (int64_t t0 = 0; t0 < T; t0 += ATT_KEYS) {
      const int64_t t1 = std::min(T, t0 + ATT_KEYS);
      for (int64_t t = t0; t < t1; ++t) rows[t - t0] = cache + (slots ? slots[t] : first + t) * ld;
      const int64_t be = std::min(b1, blocks);
      int64_t bl = b0;
      for (; bl + ATT_BLOCKS <= be; bl += ATT_BLOCKS) attend_sum_heads<ATT_BLOCKS>(rows, p, H, T, t0, t1, bl * 8, o, R);
      for (; bl + 2 <= be; bl += 2) attend_sum_heads<2>(rows, p, H, T, t0, t1, bl * 8, o, R);
      for (; bl < be; ++bl) attend_sum_heads<1>(rows, p, H, T, t0, t1, bl * 8, o, R);
      if (b1 > blocks)  // the columns past the last 8
        for (int64_t h = 0; h < H; ++h)
          for (int64_t r = blocks * 8; r < R; ++r) {
            float a = t0 ? o[h * R + r] : 0.f;
            for (int64_t t = t0; t < t1; ++t) a = std::fma(p[h * T + t], load1(rows[t - t0] + r), a);
            o[h * R + r] = a;
          }
    }
  });
}

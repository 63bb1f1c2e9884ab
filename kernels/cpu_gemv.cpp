// Packed int8 / int4 GEMV for the CPU (AVX2 + FMA), built at first use by kernels/cpu_gemv.py.
//
// The llama.cpp way: each row of x is quantized to int8 in blocks of 32 (one float scale per block, "Q8"),
// then each weight row's dot product runs in integers (_mm256_maddubs_epi16 / _mm256_madd_epi16) and is
// scaled per block in float32. The weights are read in their stored layout (kernels/quant_format.py), once
// per call, whatever the number of rows of x (each weight row meets every row of x while it sits in L1):
//   int8: W = data[n, k] * scale[n]
//   int4: W = (nibble[n, k] - zero[n, g]) * scale[n, g] per group g of `group` inputs (a multiple of 64);
//         byte j of a row holds element 2j in its low nibble and 2j+1 in its high one, so x's blocks are
//         stored in pairs, evens then odds (quantize_rows), and 32 bytes of weights meet 64 activations
//         without a shuffle; the two blocks' int32 sums share one vector, scaled by [d_b x4, d_b+1 x4].
// y[m, n] = sum_b d[m, b] * (sum_{k in b} q[n, k] * xq[m, k])  (int8), and for int4, per group,
//           scale[n, g] * (sum_{b in g} d[m, b] * idot(b) - zero[n, g] * sum_{b in g} d[m, b] * xsum[m, b]).
// Output rows are split across at::parallel_for's threads (torch.get_num_threads()).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

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
  float buf[QK];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < r.nb; ++b) {
      float amax = 0.f;
      for (int i = 0; i < QK; ++i) {
        int64_t k = b * QK + i;
        buf[i] = k < K ? x[m * K + k] : 0.f;
        amax = std::max(amax, std::fabs(buf[i]));
      }
      float d = amax / 127.f;
      float id = d > 0.f ? 1.f / d : 0.f;
      int8_t* q = r.q.data() + m * kp + (paired ? (b / 2) * 2 * QK : b * QK);
      int sum = 0;
      for (int i = 0; i < QK; ++i) {
        int v = (int)std::nearbyint(buf[i] * id);
        v = std::min(127, std::max(-127, v));
        int pos = paired ? (i % 2) * QK + (b % 2) * (QK / 2) + i / 2 : i;
        q[pos] = (int8_t)v;
        sum += v;
      }
      r.d[m * r.nb + b] = d;
      r.dsum[m * r.nb + b] = d * (float)sum;
    }
  }
  return r;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

int64_t grain_for(int64_t row_bytes) {
  return std::max<int64_t>(1, (32 * 1024) / std::max<int64_t>(1, row_bytes));  // >= 32 KiB of weights a chunk
}

}  // namespace

// x [M, K] float32, data int8 [N, K], scale float32 [N] -> [M, N] float32
torch::Tensor q8_gemv(torch::Tensor x, torch::Tensor data, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && data.dtype() == torch::kInt8 && scale.dtype() == torch::kFloat32);
  x = x.contiguous();
  TORCH_CHECK(data.is_contiguous() && scale.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = data.size(0);
  TORCH_CHECK(data.size(1) == K && scale.size(0) == N);
  const int64_t kp = (K + QK - 1) / QK * QK, nfull = K / QK;
  QuantRows xr = quantize_rows(x.data_ptr<float>(), M, K, kp, false);
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const int8_t* wp = data.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, grain_for(K), [&](int64_t n0, int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = xr.q.data() + m * kp;
        const float* d = xr.d.data() + m * xr.nb;
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // two: the FMA's latency
        for (int64_t b = 0; b < nfull; ++b) {
          __m256i wv = _mm256_loadu_si256((const __m256i*)(w + b * QK));
          __m256i xv = _mm256_loadu_si256((const __m256i*)(q + b * QK));
          __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
          acc[b & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(d[b]), acc[b & 1]);
        }
        float s = hsum(_mm256_add_ps(acc[0], acc[1]));
        if (nfull * QK < K) {
          int tail = 0;
          for (int64_t k = nfull * QK; k < K; ++k) tail += (int)w[k] * (int)q[k];
          s += d[nfull] * (float)tail;
        }
        yp[m * N + n] = s * sp[n];
      }
    }
  });
  return y;
}

// x [M, K] float32, data uint8 [N, Kp/2], scale float32 [N, G], zero uint8 [N, G] (or an empty tensor:
// symmetric, zero 8), group: Kp / G, a multiple of 64 -> [M, N] float32
torch::Tensor q4_gemv(torch::Tensor x, torch::Tensor data, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && data.dtype() == torch::kUInt8 && scale.dtype() == torch::kFloat32);
  TORCH_CHECK(group % (2 * QK) == 0, "group must be a multiple of 64");
  x = x.contiguous();
  TORCH_CHECK(data.is_contiguous() && scale.is_contiguous());
  const bool has_zero = zero.numel() > 0;
  TORCH_CHECK(!has_zero || (zero.dtype() == torch::kUInt8 && zero.is_contiguous()));
  const int64_t M = x.size(0), K = x.size(1), N = data.size(0), kp = data.size(1) * 2, G = scale.size(1);
  TORCH_CHECK(K <= kp && G * group == kp && scale.size(0) == N);
  const int64_t bpg = group / QK;
  QuantRows xr = quantize_rows(x.data_ptr<float>(), M, K, kp, true);
  // per row of x and group: sum over the group's blocks of d * xsum (the zero point's term)
  std::vector<float> gsum(M * G, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t j = 0; j < bpg; ++j) gsum[m * G + g] += xr.dsum[m * xr.nb + g * bpg + j];
  // per row of x and pair of blocks: [d_b x4, d_b+1 x4], the scales of the 8 int32 lanes of a pair's sums
  std::vector<float> dvec(M * xr.nb * 4);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < xr.nb; ++b)
      for (int i = 0; i < 4; ++i) dvec[m * xr.nb * 4 + (b / 2) * 8 + (b % 2) * 4 + i] = xr.d[m * xr.nb + b];
  auto y = torch::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  const uint8_t* wp = data.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const uint8_t* zp = has_zero ? zero.data_ptr<uint8_t>() : nullptr;
  at::parallel_for(0, N, grain_for(kp / 2), [&](int64_t n0, int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i lowmask = _mm256_set1_epi8(0x0F);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wp + n * (kp / 2);
      const float* sc = sp + n * G;
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = xr.q.data() + m * kp;
        const float* dd = dvec.data() + m * xr.nb * 4;
        const float* gs = gsum.data() + m * G;
        __m256 acc = _mm256_setzero_ps();
        float zterm = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          __m256 accg = _mm256_setzero_ps();
          for (int64_t j = 0; j < bpg; j += 2) {  // two blocks: 32 bytes of weights, 64 activations
            const int64_t b = g * bpg + j;
            __m256i raw = _mm256_loadu_si256((const __m256i*)(w + b * (QK / 2)));
            __m256i lo = _mm256_and_si256(raw, lowmask);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lowmask);
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(q + b * QK))),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(q + b * QK + QK))));
            accg = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_loadu_ps(dd + b * 4), accg);
          }
          acc = _mm256_fmadd_ps(accg, _mm256_set1_ps(sc[g]), acc);
          zterm += sc[g] * (has_zero ? (float)zp[n * G + g] : 8.f) * gs[g];
        }
        yp[m * N + n] = hsum(acc) - zterm;
      }
    }
  });
  return y;
}

// The activation quantization alone (for tests): x [M, K] -> the dequantised activations [M, Kp] float32,
// in natural order.
torch::Tensor q8_activations(torch::Tensor x, int64_t kp) {
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  QuantRows r = quantize_rows(x.data_ptr<float>(), M, K, kp, false);
  auto out = torch::empty({M, kp}, x.options());
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < kp; ++k) o[m * kp + k] = r.d[m * r.nb + k / QK] * (float)r.q[m * kp + k];
  return out;
}

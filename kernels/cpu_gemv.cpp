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

// A packed weight [N, K] (int8: data [N, K], scale [N]; int4: data [N, kp/2], scale/zero [N, G]).
struct PackedW {
  int bits = 8;
  const uint8_t* data = nullptr;
  const float* scale = nullptr;
  const uint8_t* zero = nullptr;  // int4 asymmetric; null: zero 8
  int64_t N = 0, K = 0, kp = 0, G = 1, group = 0;
  int64_t row_bytes() const { return bits == 8 ? K : kp / 2; }
};

// x's rows as the kernel reads them, for one weight layout (bits, kp, group).
struct PreparedX {
  QuantRows xr;
  std::vector<float> gsum;  // int4: per row and group, sum over its blocks of d * xsum (the zero's term)
  std::vector<float> dvec;  // int4: per row and pair of blocks, [d_b x4, d_b+1 x4] (the 8 int32 lanes' scales)
  int64_t M = 0;
};

PreparedX prepare(const float* x, int64_t M, const PackedW& w) {
  PreparedX p;
  p.M = M;
  p.xr = quantize_rows(x, M, w.K, w.bits == 8 ? (w.K + QK - 1) / QK * QK : w.kp, w.bits == 4);
  if (w.bits == 4) {
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
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t nfull = K / QK;
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
  return s;
}

inline float dot_q4(const uint8_t* w, const int8_t* q, const float* dd, const float* sc, const uint8_t* z,
                    const float* gs, int64_t G, int64_t bpg) {
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i lowmask = _mm256_set1_epi8(0x0F);
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
    zterm += sc[g] * (z ? (float)z[g] : 8.f) * gs[g];
  }
  return hsum(acc) - zterm;
}

// y [M, N] = x W^T for the prepared rows of x; output rows split over torch's threads.
void run(const PackedW& w, const PreparedX& px, float* y) {
  const int64_t M = px.M, kp = px.xr.kp, nb = px.xr.nb;
  at::parallel_for(0, w.N, grain_for(w.row_bytes()), [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = w.data + n * w.row_bytes();
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* q = px.xr.q.data() + m * kp;
        if (w.bits == 8) {
          y[m * w.N + n] = dot_q8((const int8_t*)row, q, px.xr.d.data() + m * nb, w.K) * w.scale[n];
        } else {
          y[m * w.N + n] = dot_q4(row, q, px.dvec.data() + m * nb * 4, w.scale + n * w.G,
                                  w.zero ? w.zero + n * w.G : nullptr, px.gsum.data() + m * w.G, w.G, w.group / QK);
        }
      }
    }
  });
}

// Expert e of a stack [E, N, ...] (or the one weight [N, ...] when e < 0), with K inputs.
PackedW packed(const torch::Tensor& data, const torch::Tensor& scale, const torch::Tensor& zero, int64_t bits,
               int64_t group, int64_t K, int64_t e = -1) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(data.is_contiguous() && scale.is_contiguous() && scale.dtype() == torch::kFloat32);
  TORCH_CHECK(data.dtype() == (bits == 8 ? torch::kInt8 : torch::kUInt8));
  const int64_t lead = e < 0 ? 0 : 1;
  TORCH_CHECK(data.dim() == 2 + lead && (e < 0 || e < data.size(0)));
  PackedW w;
  w.bits = (int)bits;
  w.N = data.size(lead);
  w.K = K;
  const int64_t row = data.size(lead + 1), per = w.N * row;
  w.data = (const uint8_t*)data.data_ptr() + (e < 0 ? 0 : e * per);
  if (bits == 8) {
    TORCH_CHECK(row == K && scale.numel() == (e < 0 ? 1 : data.size(0)) * w.N);
    w.scale = scale.data_ptr<float>() + (e < 0 ? 0 : e * w.N);
    w.kp = (K + QK - 1) / QK * QK;
  } else {
    TORCH_CHECK(group > 0 && group % (2 * QK) == 0, "int4 groups must be a multiple of 64");
    w.kp = row * 2;
    w.group = group;
    w.G = w.kp / group;
    TORCH_CHECK(K <= w.kp && w.G * group == w.kp && scale.size(lead + 1) == w.G && scale.size(lead) == w.N);
    w.scale = scale.data_ptr<float>() + (e < 0 ? 0 : e * w.N * w.G);
    if (zero.numel() > 0) {
      TORCH_CHECK(zero.is_contiguous() && zero.dtype() == torch::kUInt8 && zero.sizes() == scale.sizes());
      w.zero = zero.data_ptr<uint8_t>() + (e < 0 ? 0 : e * w.N * w.G);
    }
  }
  return w;
}

}  // namespace

// x [..., K] (float32 or bfloat16) through a packed weight -> [..., N] in x's dtype. data/scale/zero: the stored
// tensors (zero: an empty tensor for int8 and symmetric int4); group: int4's (a multiple of 64).
torch::Tensor gemv(torch::Tensor x, torch::Tensor data, torch::Tensor scale, torch::Tensor zero, int64_t bits,
                   int64_t group) {
  const int64_t K = x.size(-1);
  PackedW w = packed(data, scale, zero, bits, group, K);
  auto xf = x.reshape({-1, K}).to(torch::kFloat32).contiguous();
  const int64_t M = xf.size(0);
  PreparedX px = prepare(xf.data_ptr<float>(), M, w);
  auto sizes = x.sizes().vec();
  sizes.back() = w.N;
  auto y = torch::empty(sizes, xf.options());
  run(w, px, y.data_ptr<float>());
  return x.scalar_type() == torch::kFloat32 ? y : y.to(x.scalar_type());
}

// One token through its chosen routed experts (fused_moe.moe_experts's function): x [1, H], ids [k] int64 (ids
// outside 0..E-1 contribute nothing), weights [k] float32, the packed stacks w13 [E, 2I, H] (gate rows, then
// up rows) and w2 [E, H, I] -> [1, H] in x's dtype; sum_j weights[j] * down(silu(gate x) * up x) in float32,
// each intermediate quantized to int8 blocks like x.
torch::Tensor experts(torch::Tensor x, torch::Tensor ids, torch::Tensor weights, torch::Tensor d13,
                      torch::Tensor s13, torch::Tensor z13, torch::Tensor d2, torch::Tensor s2, torch::Tensor z2,
                      int64_t bits, int64_t group) {
  const int64_t H = x.size(-1), E = d13.size(0), I = d13.size(1) / 2;
  TORCH_CHECK(x.numel() == H, "one token");
  auto idc = ids.to(torch::kInt64).contiguous();
  auto wc = weights.to(torch::kFloat32).contiguous();
  auto xf = x.reshape({1, H}).to(torch::kFloat32).contiguous();
  std::vector<float> y(H, 0.f), h(2 * I), a(I), o(H);
  bool prepared = false;
  PreparedX px;
  for (int64_t j = 0; j < idc.numel(); ++j) {
    const int64_t e = idc.data_ptr<int64_t>()[j];
    if (e < 0 || e >= E) continue;
    PackedW w13 = packed(d13, s13, z13, bits, group, H, e), w2 = packed(d2, s2, z2, bits, group, I, e);
    if (!prepared) {
      px = prepare(xf.data_ptr<float>(), 1, w13);
      prepared = true;
    }
    run(w13, px, h.data());
    for (int64_t i = 0; i < I; ++i) a[i] = h[i] / (1.f + std::exp(-h[i])) * h[I + i];
    PreparedX pa = prepare(a.data(), 1, w2);
    run(w2, pa, o.data());
    const float wt = wc.data_ptr<float>()[j];
    for (int64_t i = 0; i < H; ++i) y[i] += o[i] * wt;
  }
  auto out = torch::from_blob(y.data(), x.sizes(), torch::kFloat32).clone();
  return x.scalar_type() == torch::kFloat32 ? out : out.to(x.scalar_type());
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

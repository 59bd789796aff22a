// Weight-streaming matrix-vector products for CPU decode: y[t, n] = sum_k x[t, k] * W[n, k] for a few tokens t,
// reading each weight row once and never making a dequantised copy. Decode is bound by memory bandwidth, so the
// point is to keep up with it: bf16 weights are widened to fp32 in registers (or multiplied as bf16 pairs where
// the CPU has AVX512-BF16); int8 and int4 weights meet activations quantised to int8 per block of 32, as in
// llama.cpp, so that integer multiply-adds do the work (see "Activations" below for the exact contract).
//
// Built by smallthinker/inference/native.py with the machine's compiler and -march=native, so the AVX-512 or
// AVX2 branch below is the one the CPU has; a plain C++ branch covers the rest (the tests build all three).
// Threads: at::parallel_for, i.e. torch's own OpenMP pool and `torch.set_num_threads`.
//
// Layouts (row-major, contiguous):
//   bf16: w [N, K] bf16.
//   int8: q [N, K] int8, scale [N] (w = q * scale).
//   int4: codes [N, K/2] uint8, even input channel in the low nibble; sz [N, K/32, 2] bf16 (scale, zero) per
//         group of 32 input channels: w = (code - 8) * scale + zero.
// `rows` (optional int64 indices) computes only those outputs (neuron-sparse up projections); axpy_rows
// accumulates y[0, :] = sum_i h[i] * W[rows[i], :] (a transposed down projection read one live row at a time).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::Tensor;
constexpr int64_t kMaxTokens = 16;  // decode and speculative batches; prefill goes to a GEMM
constexpr int64_t kTaskWeights = 1 << 15;  // weights per thread task: below this a split costs more than it saves

inline float bf16_to_float(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

#if defined(__AVX2__)
inline float hsum256(__m256 a) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Activations. bf16 weights meet fp32 (or bf16) activations. The int8 and int4 kernels meet activations quantised
// the way llama.cpp's Q8_0 does it, so that a 64-byte multiply-add (VNNI `vpdpbusd`, or AVX2's `vpmaddubsw`)
// does the work of 64 fp32 FMAs: per block of 32 channels, d = amax / 127 and q = round(x / d) in int8. The result
// equals `dequant(x_q8) @ dequant(W).T` to fp32 rounding (`formats.quantize_activations_q8` is the reference).

constexpr int64_t kBlock = 32;  // activation block = int4 group

struct Q8Row {
  std::vector<int8_t> q;  // [K]
  std::vector<float> d;   // [K / 32] block scales
  std::vector<float> s;   // [K / 32] block sums of the dequantised activations: sum_j q_j * d
};

Q8Row quantize_q8(const float* x, int64_t K) {
  const int64_t B = K / kBlock;
  Q8Row r{std::vector<int8_t>(K), std::vector<float>(B), std::vector<float>(B)};
  for (int64_t b = 0; b < B; ++b) {
    float amax = 0.f;
    for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(x[b * kBlock + j]));
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const int8_t q = static_cast<int8_t>(std::nearbyint(x[b * kBlock + j] * id));
      r.q[b * kBlock + j] = q;
      sum += q;
    }
    r.d[b] = d;
    r.s[b] = static_cast<float>(sum) * d;
  }
  return r;
}

// ---------------------------------------------------------------------------------------------------------------
// bf16: one weight row against one activation vector.

inline float dot_bf16(const uint16_t* w, const float* x, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 32 <= K; k += 32) {
    __m512i w0 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    __m512i w1 = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16)));
    a0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w0, 16)), _mm512_loadu_ps(x + k), a0);
    a1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(w1, 16)), _mm512_loadu_ps(x + k + 16), a1);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; k + 16 <= K; k += 16) {
    __m256i w0 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    __m256i w1 = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k + 8)));
    a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), _mm256_loadu_ps(x + k), a0);
    a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), _mm256_loadu_ps(x + k + 8), a1);
  }
  s = hsum256(_mm256_add_ps(a0, a1));
#endif
  for (; k < K; ++k) s += bf16_to_float(w[k]) * x[k];
  return s;
}

#if defined(__AVX512BF16__)
// Native bf16 pairs (AVX512-BF16 `vdpbf16ps`) when the activations are bf16 already: one instruction per 32 weights.
inline float dot_bf16_native(const uint16_t* w, const uint16_t* x, int64_t K) {
  int64_t k = 0;
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; k + 64 <= K; k += 64) {
    a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(x + k));
    a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(x + k + 32));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
  for (; k < K; ++k) s += bf16_to_float(w[k]) * bf16_to_float(x[k]);
  return s;
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// int8 weights x q8 activations. The multiply-add takes one unsigned operand: |x_q| is it, and the weight takes the
// sign of x_q (exact: weights are in [-127, 127]).

struct Int8Act {
  std::vector<uint8_t> a;   // |q| [K]
  std::vector<int8_t> q;    // q [K] (the sign source)
  std::vector<float> lane;  // per 64 channels, 16 lanes: the block scale of each vpdpbusd lane (AVX-512)
  std::vector<float> d;
  std::vector<uint64_t> neg;  // per 64 channels: bit j set where q_j < 0 (AVX-512)
};

Int8Act prepare_int8(const float* x, int64_t K) {
  Q8Row r = quantize_q8(x, K);
  Int8Act p;
  p.a.resize(K);
  for (int64_t k = 0; k < K; ++k) p.a[k] = static_cast<uint8_t>(std::abs(static_cast<int>(r.q[k])));
  const int64_t C = K / 64;
  p.lane.resize(C * 16);
  p.neg.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    uint64_t m = 0;
    for (int64_t j = 0; j < 64; ++j) m |= static_cast<uint64_t>(r.q[c * 64 + j] < 0) << j;
    p.neg[c] = m;
    for (int64_t l = 0; l < 16; ++l) p.lane[c * 16 + l] = r.d[c * 2 + l / 8];
  }
  p.q = std::move(r.q);
  p.d = std::move(r.d);
  return p;
}

inline float dot_int8(const int8_t* w, const Int8Act& p, int64_t K) {
  int64_t k = 0;
  float s = 0.f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  int64_t c = 0;
  for (; k + 64 <= K; k += 64, ++c) {
    __m512i wv = _mm512_loadu_si512(w + k);
    wv = _mm512_mask_sub_epi8(wv, p.neg[c], zero, wv);  // w * sign(x)
    __m512i dp = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(p.a.data() + k), wv);
    if (c & 1)
      acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_loadu_ps(p.lane.data() + c * 16), acc1);
    else
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_loadu_ps(p.lane.data() + c * 16), acc0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif defined(__AVX2__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; k + 32 <= K; k += 32, ++b) {
    __m256i wv = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q.data() + k)));
    __m256i pr = _mm256_maddubs_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.a.data() + k)), wv);
    __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
    if (b & 1)
      acc1 = _mm256_fmadd_ps(f, _mm256_set1_ps(p.d[b]), acc1);
    else
      acc0 = _mm256_fmadd_ps(f, _mm256_set1_ps(p.d[b]), acc0);
  }
  s = hsum256(_mm256_add_ps(acc0, acc1));
#endif
  for (; k < K; k += kBlock) {  // blocks the vector loop left (K % 64 == 32 on AVX-512), or all of them
    int32_t t = 0;
    for (int64_t j = 0; j < kBlock; ++j) t += static_cast<int32_t>(w[k + j]) * p.q[k + j];
    s += static_cast<float>(t) * p.d[k / kBlock];
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// int4 weights x q8 activations. Codes 0..15 are the unsigned operand. A stored byte holds channels 2j (low
// nibble) and 2j+1 (high), so the activations are reordered to match the nibble planes: per group on AVX2
// [16 even, 16 odd], per quad of groups on AVX-512 [4 x 16 even, 4 x 16 odd]. With
// w = (c - 8) * s + z:  sum_j w_j x_j = s * d * sum_j c_j q_j + (z - 8 s) * sum_j x_j.

struct Int4Act {
  std::vector<int8_t> q;    // reordered q8 activations [K]
  std::vector<float> d;     // [G] block scales
  std::vector<float> lane;  // AVX-512: per quad of groups, 16 lanes: the block scale of each vpdpbusd lane
  std::vector<float> bias;  // per quad, 8 lanes [-8 s0, s0, .., -8 s3, s3] (s = block sum): meets (scale, zero) x 4
  std::vector<float> sum;   // [G] block sums
};

Int4Act prepare_int4(const float* x, int64_t K) {
  Q8Row r = quantize_q8(x, K);
  const int64_t G = K / kBlock, Q = G / 4;
  Int4Act p{std::vector<int8_t>(K), r.d, std::vector<float>(Q * 16), std::vector<float>(Q * 8), r.s};
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = 0; j < 16; ++j) {
      const int8_t e = r.q[g * kBlock + 2 * j], o = r.q[g * kBlock + 2 * j + 1];
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      if (g < Q * 4) {  // quad layout; groups past the last whole quad keep the per-group layout
        const int64_t base = (g / 4) * 128, off = (g % 4) * 16;
        p.q[base + off + j] = e;
        p.q[base + 64 + off + j] = o;
        continue;
      }
#endif
      p.q[g * kBlock + j] = e;
      p.q[g * kBlock + 16 + j] = o;
    }
  for (int64_t qd = 0; qd < Q; ++qd)
    for (int64_t i = 0; i < 4; ++i) {
      for (int64_t l = 0; l < 4; ++l) p.lane[qd * 16 + i * 4 + l] = r.d[4 * qd + i];
      p.bias[qd * 8 + 2 * i] = -8.f * r.s[4 * qd + i];
      p.bias[qd * 8 + 2 * i + 1] = r.s[4 * qd + i];
    }
  return p;
}

// One group the portable way (also the AVX-512 kernel's unpaired last group).
template <typename SZ>
inline float group_int4_scalar(const uint8_t* c, const SZ* sz, const int8_t* q, float d, float sum) {
  int32_t t = 0;
  for (int64_t j = 0; j < 16; ++j) t += (c[j] & 0xF) * q[j] + (c[j] >> 4) * q[16 + j];
  const float scale = static_cast<float>(sz[0]), zero = static_cast<float>(sz[1]);
  return scale * d * static_cast<float>(t) + (zero - 8.f * scale) * sum;
}

template <typename SZ>
inline __attribute__((always_inline)) float dot_int4(const uint8_t* c, const SZ* sz, const Int4Act& p, int64_t G) {
  int64_t g = 0;
  float s = 0.f;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // Four groups (128 channels, 64 bytes) a step: the low-nibble plane meets the quad's even activations and the
  // high plane its odd ones, and both products land in the same lanes (lane l belongs to group l / 4).
  static_assert(sizeof(SZ) == 2, "the AVX-512 int4 kernel reads bf16 scales");
  const __m512i nib = _mm512_set1_epi8(0xF);
  const __m512i zero = _mm512_setzero_si512();
  const __m512i lane_of = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  __m256 bias = _mm256_setzero_ps();
  for (int64_t qd = 0; g + 4 <= G; g += 4, ++qd) {
    const __m512i b = _mm512_loadu_si512(c + g * 16);
    const __m512i lo = _mm512_and_si512(b, nib), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
    const int8_t* xq = p.q.data() + g * kBlock;
    __m512i dp = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(xq));
    dp = _mm512_dpbusd_epi32(dp, hi, _mm512_loadu_si512(xq + 64));
    // (s0, z0, .., s3, z3) from bf16
    const __m256 szv = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sz + g * 2))), 16));
    bias = _mm256_fmadd_ps(szv, _mm256_loadu_ps(p.bias.data() + qd * 8), bias);
    const __m512 ws = _mm512_permutexvar_ps(lane_of, _mm512_castps256_ps512(szv));
    const __m512 scale = _mm512_mul_ps(ws, _mm512_loadu_ps(p.lane.data() + qd * 16));
    if (qd & 1)
      acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc1);
    else
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), scale, acc0);
  }
  s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + hsum256(bias);
#elif defined(__AVX2__)
  // Eight groups a step: their scales and zeros are widened and de-interleaved as vectors, the activation block
  // scales and the zero term applied eight at a time; each group's products meet its lane of the scale vector.
  static_assert(sizeof(SZ) == 2, "the AVX2 int4 kernel reads bf16 scales");
  const __m128i nib = _mm_set1_epi8(0xF);
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i fix = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), biasv = _mm256_setzero_ps();
  float bias = 0.f;
  auto widen = [](__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); };
  for (; g + 8 <= G; g += 8) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sz + g * 2));  // s0 z0 .. s7 z7
    const __m256 a = widen(_mm256_castsi256_si128(raw)), b = widen(_mm256_extracti128_si256(raw, 1));
    const __m256 sc = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0)), fix);
    const __m256 zr = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1)), fix);
    biasv = _mm256_fmadd_ps(_mm256_fnmadd_ps(_mm256_set1_ps(8.f), sc, zr), _mm256_loadu_ps(p.sum.data() + g), biasv);
    const __m256 cs = _mm256_mul_ps(sc, _mm256_loadu_ps(p.d.data() + g));
    for (int j = 0; j < 8; ++j) {
      const __m128i bt = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + (g + j) * 16));
      const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bt, 4), nib), _mm_and_si128(bt, nib));
      const __m256i pr = _mm256_maddubs_epi16(
          codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q.data() + (g + j) * kBlock)));
      const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
      const __m256 scale = _mm256_permutevar8x32_ps(cs, _mm256_set1_epi32(j));
      if (j & 1)
        acc1 = _mm256_fmadd_ps(f, scale, acc1);
      else
        acc0 = _mm256_fmadd_ps(f, scale, acc0);
    }
  }
  for (; g < G; ++g) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + g * 16));
    const __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), nib), _mm_and_si128(b, nib));
    const __m256i pr = _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.q.data() + g * kBlock)));
    const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(pr, ones));
    const float scale = static_cast<float>(sz[g * 2]), zero = static_cast<float>(sz[g * 2 + 1]);
    bias += (zero - 8.f * scale) * p.sum[g];
    acc0 = _mm256_fmadd_ps(f, _mm256_set1_ps(scale * p.d[g]), acc0);
  }
  bias += hsum256(biasv);
  s = hsum256(_mm256_add_ps(acc0, acc1)) + bias;
#endif
  for (; g < G; ++g)
    s += group_int4_scalar(c + g * 16, sz + g * 2, p.q.data() + g * kBlock, p.d[g], p.sum[g]);
  return s;
}

// y[0, :] += h * row, row widened from the stored type (the sparse down projection, one live neuron at a time).
inline void axpy_bf16(float h, const uint16_t* w, float* y, int64_t K) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 hv = _mm512_set1_ps(h);
  for (; k + 16 <= K; k += 16) {
    __m512i wi = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
    _mm512_storeu_ps(y + k,
                     _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wi, 16)), hv, _mm512_loadu_ps(y + k)));
  }
#elif defined(__AVX2__)
  const __m256 hv = _mm256_set1_ps(h);
  for (; k + 8 <= K; k += 8) {
    __m256i wi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k)));
    _mm256_storeu_ps(y + k,
                     _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(wi, 16)), hv, _mm256_loadu_ps(y + k)));
  }
#endif
  for (; k < K; ++k) y[k] += h * bf16_to_float(w[k]);
}

inline void axpy_int8(float h, const int8_t* q, float* y, int64_t K) {
  int64_t k = 0;
#if defined(__AVX512F__)
  const __m512 hv = _mm512_set1_ps(h);
  for (; k + 16 <= K; k += 16) {
    __m512i qi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + k)));
    _mm512_storeu_ps(y + k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(qi), hv, _mm512_loadu_ps(y + k)));
  }
#elif defined(__AVX2__)
  const __m256 hv = _mm256_set1_ps(h);
  for (; k + 8 <= K; k += 8) {
    __m256i qi = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k)));
    _mm256_storeu_ps(y + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(qi), hv, _mm256_loadu_ps(y + k)));
  }
#endif
  for (; k < K; ++k) y[k] += h * static_cast<float>(q[k]);
}

// ---------------------------------------------------------------------------------------------------------------
// Drivers.

void check_x(const Tensor& x, int64_t K, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, op, ": x must be [T, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxTokens, op, ": takes 1 to ", kMaxTokens, " tokens, got ",
              x.size(0), " (a GEMM is the tool for more)");
}

// x [T, K] -> fp32 contiguous copy (T * K floats: a few KiB).
std::vector<float> activations_fp32(const Tensor& x) {
  const int64_t T = x.size(0), K = x.size(1);
  std::vector<float> out(T * K);
  Tensor xc = x.contiguous();
  if (xc.scalar_type() == at::kFloat) {
    std::memcpy(out.data(), xc.data_ptr<float>(), sizeof(float) * T * K);
  } else {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
    for (int64_t i = 0; i < T * K; ++i) out[i] = bf16_to_float(p[i]);
  }
  return out;
}

const int64_t* check_rows(const c10::optional<Tensor>& rows, int64_t N, const char* op) {
  if (!rows.has_value()) return nullptr;
  TORCH_CHECK(rows->scalar_type() == at::kLong && rows->dim() == 1 && rows->is_contiguous(), op,
              ": rows must be a contiguous 1-d int64 tensor");
  const int64_t* r = rows->data_ptr<int64_t>();
  for (int64_t i = 0; i < rows->numel(); ++i)
    TORCH_CHECK(r[i] >= 0 && r[i] < N, op, ": row ", r[i], " out of range for ", N, " rows");
  return r;
}

// Runs row(n, acc) for each output row n (all of them, or `rows`) and writes acc[t] into y[t, i] in x's dtype.
template <typename RowFn>
Tensor for_each_row(const Tensor& x, int64_t N, int64_t K, const c10::optional<Tensor>& rows, const char* op,
                    RowFn row) {
  const int64_t T = x.size(0);
  const int64_t* r = check_rows(rows, N, op);
  const bool selected = rows.has_value();  // an empty selection may have a null data pointer
  const int64_t n_out = selected ? rows->numel() : N;
  Tensor y = at::empty({T, n_out}, x.options());
  const bool f32 = y.scalar_type() == at::kFloat;
  float* yf = f32 ? y.data_ptr<float>() : nullptr;
  c10::BFloat16* yb = f32 ? nullptr : y.data_ptr<c10::BFloat16>();
  const int64_t grain = std::max<int64_t>(1, kTaskWeights / std::max<int64_t>(K, 1));
  at::parallel_for(0, n_out, grain, [&](int64_t begin, int64_t end) {
    float acc[kMaxTokens];
    for (int64_t i = begin; i < end; ++i) {
      row(selected ? r[i] : i, acc);
      for (int64_t t = 0; t < T; ++t) {
        if (f32)
          yf[t * n_out + i] = acc[t];
        else
          yb[t * n_out + i] = c10::BFloat16(acc[t]);
      }
    }
  });
  return y;
}

Tensor gemv_bf16(const Tensor& x, const Tensor& w, const c10::optional<Tensor>& rows) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous(),
              "gemv_bf16: w must be a contiguous [N, K] bfloat16 matrix");
  const int64_t N = w.size(0), K = w.size(1), T = x.size(0);
  check_x(x, K, "gemv_bf16");
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    const Tensor xc = x.contiguous();
    const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
    return for_each_row(x, N, K, rows, "gemv_bf16", [&](int64_t n, float* acc) {
      for (int64_t t = 0; t < T; ++t) acc[t] = dot_bf16_native(wp + n * K, xp + t * K, K);
    });
  }
#endif
  const std::vector<float> xf = activations_fp32(x);
  return for_each_row(x, N, K, rows, "gemv_bf16", [&](int64_t n, float* acc) {
    for (int64_t t = 0; t < T; ++t) acc[t] = dot_bf16(wp + n * K, xf.data() + t * K, K);
  });
}

Tensor gemv_int8(const Tensor& x, const Tensor& q, const Tensor& scale, const c10::optional<Tensor>& rows) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous(),
              "gemv_int8: q must be a contiguous [N, K] int8 matrix");
  const int64_t N = q.size(0), K = q.size(1), T = x.size(0);
  TORCH_CHECK(K % kBlock == 0, "gemv_int8: the input width must be a multiple of ", kBlock, ", got ", K);
  check_x(x, K, "gemv_int8");
  TORCH_CHECK(scale.numel() == N, "gemv_int8: scale must have one entry per output row");
  const std::vector<float> xf = activations_fp32(x);
  std::vector<Int8Act> acts;
  for (int64_t t = 0; t < T; ++t) acts.push_back(prepare_int8(xf.data() + t * K, K));
  const Tensor sf = scale.to(at::kFloat).contiguous();
  const float* sp = sf.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  return for_each_row(x, N, K, rows, "gemv_int8", [&](int64_t n, float* acc) {
    for (int64_t t = 0; t < T; ++t) acc[t] = sp[n] * dot_int8(qp + n * K, acts[t], K);
  });
}

Tensor gemv_int4(const Tensor& x, const Tensor& codes, const Tensor& sz, const c10::optional<Tensor>& rows) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "gemv_int4: codes must be a contiguous [N, K/2] uint8 matrix");
  const int64_t N = codes.size(0), K = codes.size(1) * 2, T = x.size(0), G = K / kBlock;
  TORCH_CHECK(K % kBlock == 0, "gemv_int4: the input width must be a multiple of ", kBlock, ", got ", K);
  check_x(x, K, "gemv_int4");
  TORCH_CHECK(sz.scalar_type() == at::kBFloat16 && sz.is_contiguous() && sz.dim() == 3 && sz.size(0) == N &&
                  sz.size(1) == G && sz.size(2) == 2,
              "gemv_int4: sz must be a contiguous [N, K/32, 2] bfloat16 tensor (scale, zero), got ", sz.sizes());
  const std::vector<float> xf = activations_fp32(x);
  std::vector<Int4Act> acts;
  for (int64_t t = 0; t < T; ++t) acts.push_back(prepare_int4(xf.data() + t * K, K));
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const c10::BFloat16* szp = sz.data_ptr<c10::BFloat16>();
  return for_each_row(x, N, K, rows, "gemv_int4", [&](int64_t n, float* acc) {
    for (int64_t t = 0; t < T; ++t) acc[t] = dot_int4(cp + n * (K / 2), szp + n * G * 2, acts[t], G);
  });
}

// y [1, K] = sum_i h[i] * W[rows[i], :], W [F, K] with only the listed rows read.
Tensor axpy_rows(const Tensor& h, const Tensor& w, const Tensor& rows, const c10::optional<Tensor>& scale) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "axpy_rows: w must be a contiguous [F, K] matrix");
  check_rows(rows, w.size(0), "axpy_rows");  // int64, 1-d, contiguous, in range
  TORCH_CHECK(h.numel() == rows.numel(), "axpy_rows: one coefficient per row");
  const int64_t K = w.size(1), R = rows.numel();
  const Tensor hf = h.to(at::kFloat).contiguous();
  const float* hp = hf.data_ptr<float>();
  const int64_t* rp = rows.data_ptr<int64_t>();
  Tensor y = at::zeros({1, K}, h.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  // Columns split across threads, so each thread owns its part of y and reads its slice of every live row.
  const int64_t grain = std::max<int64_t>(64, kTaskWeights / std::max<int64_t>(R, 1));
  if (w.scalar_type() == at::kBFloat16) {
    const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>());
    at::parallel_for(0, K, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = 0; i < R; ++i) axpy_bf16(hp[i], wp + rp[i] * K + b, yp + b, e - b);
    });
  } else {
    TORCH_CHECK(w.scalar_type() == at::kChar, "axpy_rows: w must be bfloat16 or int8");
    TORCH_CHECK(scale.has_value() && scale->numel() == w.size(0), "axpy_rows: int8 rows need one scale per row");
    const Tensor sf = scale->to(at::kFloat).contiguous();
    const float* sp = sf.data_ptr<float>();
    const int8_t* qp = w.data_ptr<int8_t>();
    at::parallel_for(0, K, grain, [&](int64_t b, int64_t e) {
      for (int64_t i = 0; i < R; ++i) axpy_int8(hp[i] * sp[rp[i]], qp + rp[i] * K + b, yp + b, e - b);
    });
  }
  return y;
}

// One decode token through its routed experts, in one call: for each expert in ascending id,
//   y = down(relu(gate) * up) * weight, out += y,
// with every intermediate rounded to bf16 exactly where the per-op path (formats.QuantizedExperts) rounds it, so
// the two give the same bits. Weights are stacked over experts: bf16 gate_up [E, 2F, H] / down [E, H, F]; int8
// adds scales [E, 2F] / [E, H]; int4 holds codes [E, 2F, H/2] / [E, H, F/2] and sz [E, 2F, H/32, 2] /
// [E, H, F/32, 2]. (What it saves: some thirty small tensor ops per layer and token, each a trip through Python and
// the dispatcher.)
Tensor expert_gemv(const Tensor& x, const Tensor& w, const Tensor& aux, int64_t e) {
  switch (w.scalar_type()) {
    case at::kBFloat16:
      return gemv_bf16(x, w.select(0, e), c10::nullopt);
    case at::kChar:
      return gemv_int8(x, w.select(0, e), aux.select(0, e), c10::nullopt);
    case at::kByte:
      return gemv_int4(x, w.select(0, e), aux.select(0, e), c10::nullopt);
    default:
      TORCH_CHECK(false, "moe_decode: expert weights must be bfloat16, int8 or uint8 (int4 codes), got ",
                  w.scalar_type());
  }
}

Tensor moe_decode(const Tensor& x, const Tensor& experts, const Tensor& weights, const Tensor& gate_up,
                  const Tensor& gate_up_aux, const Tensor& down, const Tensor& down_aux) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "moe_decode: x must be one contiguous bfloat16 token [1, H]");
  TORCH_CHECK(experts.dim() == 1 && experts.scalar_type() == at::kLong && weights.numel() == experts.numel(),
              "moe_decode: experts (int64 [k]) and weights ([k]) must match");
  TORCH_CHECK(gate_up.dim() == 3 && down.dim() == 3 && gate_up.size(0) == down.size(0),
              "moe_decode: gate_up and down must be stacked [E, ...] over the same experts");
  const int64_t E = gate_up.size(0), F = gate_up.size(1) / 2, H = x.size(1), k = experts.numel();
  const Tensor ex = experts.contiguous();
  const Tensor wt = weights.to(at::kBFloat16).contiguous();
  std::vector<std::pair<int64_t, int64_t>> order;  // (expert, position)
  for (int64_t i = 0; i < k; ++i) {
    const int64_t e = ex.data_ptr<int64_t>()[i];
    TORCH_CHECK(e >= 0 && e < E, "moe_decode: expert ", e, " out of range for ", E, " experts");
    order.emplace_back(e, i);
  }
  std::sort(order.begin(), order.end());
  Tensor out = at::zeros({1, H}, x.options());
  c10::BFloat16* o = out.data_ptr<c10::BFloat16>();
  Tensor h = at::empty({1, F}, x.options());
  c10::BFloat16* hp = h.data_ptr<c10::BFloat16>();
  for (const auto& [e, i] : order) {
    const Tensor gu = expert_gemv(x, gate_up, gate_up_aux, e);  // [1, 2F] bf16: gate rows, then up rows
    const c10::BFloat16* g = gu.data_ptr<c10::BFloat16>();
    for (int64_t f = 0; f < F; ++f) hp[f] = c10::BFloat16(std::max(static_cast<float>(g[f]), 0.f) * static_cast<float>(g[F + f]));
    const Tensor y = expert_gemv(h, down, down_aux, e);  // [1, H] bf16
    const c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
    const float w = static_cast<float>(wt.data_ptr<c10::BFloat16>()[i]);
    for (int64_t j = 0; j < H; ++j) o[j] = c10::BFloat16(static_cast<float>(o[j]) + static_cast<float>(c10::BFloat16(static_cast<float>(yp[j]) * w)));
  }
  return out;
}

// Which SIMD branch this build took (reported by the loader and the benchmarks).
std::string isa() {
  std::string bf16 = "fp32-fma", q = "scalar";
#if defined(__AVX512F__)
  bf16 = "avx512-fma";
#elif defined(__AVX2__)
  bf16 = "avx2-fma";
#endif
#if defined(__AVX512BF16__)
  bf16 = "avx512-bf16";
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  q = "avx512-vnni";
#elif defined(__AVX2__)
  q = "avx2";
#endif
  return "bf16=" + bf16 + " int8/int4=" + q;
}

}  // namespace

#ifndef KERNEL_NAMESPACE
#define KERNEL_NAMESPACE smallthinker
#endif
// One level of indirection so that KERNEL_NAMESPACE expands before TORCH_LIBRARY pastes it into its names.
#define SMALLTHINKER_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

SMALLTHINKER_LIBRARY(KERNEL_NAMESPACE, m) {
  m.def("gemv_bf16(Tensor x, Tensor w, Tensor? rows=None) -> Tensor", &gemv_bf16);
  m.def("gemv_int8(Tensor x, Tensor q, Tensor scale, Tensor? rows=None) -> Tensor", &gemv_int8);
  m.def("gemv_int4(Tensor x, Tensor codes, Tensor sz, Tensor? rows=None) -> Tensor", &gemv_int4);
  m.def("axpy_rows(Tensor h, Tensor w, Tensor rows, Tensor? scale=None) -> Tensor", &axpy_rows);
  m.def(
      "moe_decode(Tensor x, Tensor experts, Tensor weights, Tensor gate_up, Tensor gate_up_aux, Tensor down, "
      "Tensor down_aux) -> Tensor",
      &moe_decode);
  m.def("isa() -> str", &isa);
}

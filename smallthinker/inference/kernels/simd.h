#pragma once

// The kernels decode runs on: weight-streaming dot products for CPU matrix-vector work, y[n] = sum_k x[k] * W[n, k],
// reading each weight row once and never making a dequantised copy. Decode is bound by memory bandwidth, so the
// point is to keep up with it: bf16 weights are widened to fp32 in registers (or multiplied as bf16 pairs where
// the CPU has AVX512-BF16); int8 and int4 weights meet activations quantised to int8 per block of 32, as in
// llama.cpp, so that integer multiply-adds do the work (see "Activations" below for the exact contract).
// gemv.cpp wraps them as torch ops; decoder.cpp runs a whole decode step on them.
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

}  // namespace

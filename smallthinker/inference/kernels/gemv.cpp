// Torch ops over the kernels of simd.h: matrix-vector products for a few tokens, the sparse down projection and one
// decode token through its routed experts. Registered as torch.ops.<KERNEL_NAMESPACE>.*; the whole-step decoder
// (decoder.cpp) adds its class to the same library.

#include "simd.h"

#include <string>
#include <utility>

namespace {

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

// One batch-1 decode step of a SmallThinker model in one call: embedding, every layer (pre-attention router and
// top-k, RMSNorm, q/k/v, RoPE, the KV-cache write, grouped attention over the cache or its sliding window, o_proj,
// the routed ReGLU experts) and the LM head, on the kernels of simd.h.
//
// Why: a decode step of the per-op model is some 250 small tensor ops per layer, each a trip through Python and the
// dispatcher; with the weights streaming at memory speed that overhead was a third of an int4 step. Here each layer
// is four parallel regions (router+q+k+v, o_proj, the experts' gate/up, their down) and a little serial work.
//
// The numbers are the per-op model's: every value is rounded to bf16 exactly where the bf16 model rounds it (norm
// outputs, projections, RoPE products, attention output, expert intermediates, residual sums), so a step differs
// from `model(token)` only by fp32 summation order inside norms and attention (the tests hold it to that).
//
// The offloaded model drives the same layer in pieces (embed, route, attend, moe with the cache's expert
// weights, head), so that it can start reading experts from disk between routing and attention.

#include "simd.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/topk.h>
#include <torch/custom_class.h>

#include <chrono>
#include <string>
#include <vector>

namespace {

inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

// One weight matrix in its format (raw pointers into tensors that the decoder keeps alive).
struct Mat {
  enum Kind { kBf16, kInt8, kInt4 } kind = kBf16;
  int64_t N = 0, K = 0;
  const uint16_t* bf = nullptr;     // bf16 [N, K]
  const int8_t* q8 = nullptr;       // int8 [N, K]
  const float* scale_f = nullptr;   // int8 scales [N], fp32 ...
  const c10::BFloat16* scale_b = nullptr;  // ... or bf16
  const uint8_t* codes = nullptr;   // int4 [N, K / 2]
  const c10::BFloat16* sz = nullptr;  // int4 [N, K / 32, 2]
};

// `m` (and `aux`: int8 scales or int4 scales-and-zeros, empty for bf16) -> Mat.
Mat make_mat(const Tensor& m, const Tensor& a, const char* what) {
  TORCH_CHECK(m.dim() == 2 && m.is_contiguous(), "Decoder: ", what, " must be a contiguous matrix, got ", m.sizes());
  Mat r;
  r.N = m.size(0);
  switch (m.scalar_type()) {
    case at::kBFloat16:
      r.kind = Mat::kBf16;
      r.K = m.size(1);
      r.bf = reinterpret_cast<const uint16_t*>(m.data_ptr<c10::BFloat16>());
      break;
    case at::kChar:
      r.kind = Mat::kInt8;
      r.K = m.size(1);
      r.q8 = m.data_ptr<int8_t>();
      TORCH_CHECK(a.numel() == r.N && a.is_contiguous(), "Decoder: ", what, " needs one scale per row");
      if (a.scalar_type() == at::kFloat)
        r.scale_f = a.data_ptr<float>();
      else {
        TORCH_CHECK(a.scalar_type() == at::kBFloat16, "Decoder: ", what, " scales must be fp32 or bf16");
        r.scale_b = a.data_ptr<c10::BFloat16>();
      }
      break;
    case at::kByte:
      r.kind = Mat::kInt4;
      r.K = m.size(1) * 2;
      r.codes = m.data_ptr<uint8_t>();
      TORCH_CHECK(a.scalar_type() == at::kBFloat16 && a.is_contiguous() && a.dim() == 3 && a.size(0) == r.N &&
                      a.size(1) * kBlock == r.K && a.size(2) == 2,
                  "Decoder: ", what, " int4 scales must be [N, K/32, 2] bf16");
      r.sz = a.data_ptr<c10::BFloat16>();
      break;
    default:
      TORCH_CHECK(false, "Decoder: ", what, " must be bf16, int8 or uint8 (int4 codes), got ", m.scalar_type());
  }
  TORCH_CHECK(r.kind == Mat::kBf16 || r.K % kBlock == 0, "Decoder: ", what, " input width must be a multiple of 32");
  return r;
}

// Rows [start, start + n) of m (the gate and the up half of a stacked gate_up matrix).
Mat row_slice(Mat m, int64_t start, int64_t n) {
  const int64_t K = m.K;
  if (m.bf) m.bf += start * K;
  if (m.q8) m.q8 += start * K;
  if (m.scale_f) m.scale_f += start;
  if (m.scale_b) m.scale_b += start;
  if (m.codes) m.codes += start * (K / 2);
  if (m.sz) m.sz += start * (K / kBlock) * 2;
  m.N = n;
  return m;
}

// One routed expert: gate and up [F, H]; down [H, F], or its transpose [F, H] (bf16 store records keep it so
// that the live neurons' rows of it are contiguous).
struct Expert {
  Mat gate, up, down;
  bool down_t = false;
};

// One input vector, in every form the weight kinds want (bf16 bits, fp32, q8 for int8 and for int4).
struct Act {
  std::vector<float> f;
  std::vector<uint16_t> b;
  Int8Act i8;
  Int4Act i4;

  void set(const float* x, int64_t K, bool int8, bool int4) {
    f.assign(x, x + K);
#if defined(__AVX512BF16__)  // only the native bf16 dot product reads them
    b.resize(K);
    for (int64_t k = 0; k < K; ++k) b[k] = c10::BFloat16(x[k]).x;
#endif
    if (int8) i8 = prepare_int8(x, K);
    if (int4) i4 = prepare_int4(x, K);
  }
};

inline float dot(const Mat& m, int64_t n, const Act& a) {
  switch (m.kind) {
    case Mat::kBf16:
#if defined(__AVX512BF16__)
      return dot_bf16_native(m.bf + n * m.K, a.b.data(), m.K);
#else
      return dot_bf16(m.bf + n * m.K, a.f.data(), m.K);
#endif
    case Mat::kInt8: {
      const float s = m.scale_f ? m.scale_f[n] : static_cast<float>(m.scale_b[n]);
      return s * dot_int8(m.q8 + n * m.K, a.i8, m.K);
    }
    default:
      return dot_int4(m.codes + n * (m.K / 2), m.sz + n * (m.K / kBlock) * 2, a.i4, m.K / kBlock);
  }
}

// y[i] = bf16(W[r_i] . x) for i < n, r_i = rows[i] if given else row0 + i: several matrices in one parallel region.
struct Job {
  const Mat* m;
  const Act* a;
  float* y;
  int64_t row0, n;
  const int64_t* rows = nullptr;
};

void run(const std::vector<Job>& jobs) {
  std::vector<int64_t> start(jobs.size() + 1, 0);
  int64_t K = 1;
  for (size_t j = 0; j < jobs.size(); ++j) {
    start[j + 1] = start[j] + jobs[j].n;
    K = std::max(K, jobs[j].m->K);
  }
  const int64_t grain = std::max<int64_t>(1, kTaskWeights / K);
  at::parallel_for(0, start.back(), grain, [&](int64_t b, int64_t e) {
    size_t j = std::upper_bound(start.begin(), start.end(), b) - start.begin() - 1;
    for (int64_t i = b; i < e; ++i) {
      while (i >= start[j + 1]) ++j;
      const Job& job = jobs[j];
      const int64_t r = job.rows ? job.rows[i - start[j]] : job.row0 + i - start[j];
      job.y[i - start[j]] = round_bf16(dot(*job.m, r, *job.a));
    }
  });
}

bool wants(const std::vector<const Mat*>& ms, Mat::Kind k) {
  for (const Mat* m : ms)
    if (m->kind == k) return true;
  return false;
}

struct Layer {
  std::vector<float> in_norm, post_norm;
  Mat router, q, k, v, o;
  bool resident = false;  // experts held here, stacked [E, ...] (else an expert cache hands them over per step)
  Mat gate_up, down;      // the stacks seen as [E * 2F, H] and [E * H, F]: expert e is a block of rows
  bool rope = true;
  int64_t window = 0;  // 0: full attention
};

std::vector<float> to_float(const Tensor& t) {
  Tensor c = t.to(at::kFloat).contiguous();
  return std::vector<float>(c.data_ptr<float>(), c.data_ptr<float>() + c.numel());
}

class Decoder : public torch::CustomClassHolder {
 public:
  // ints: hidden, heads, kv_heads, head_dim, experts, top_k, softmax routing (0/1). The head is [V, H] in any
  // format (head_aux: its scales, or an empty tensor); layers follow one by one (`add_layer`).
  Decoder(std::vector<int64_t> ints, double eps, Tensor inv_freq, Tensor embed, Tensor norm, Tensor head,
          Tensor head_aux)
      : H_(ints.at(0)), heads_(ints.at(1)), kv_heads_(ints.at(2)), D_(ints.at(3)), E_(ints.at(4)),
        top_k_(ints.at(5)), softmax_(ints.at(6) != 0), eps_(static_cast<float>(eps)) {
    TORCH_CHECK(heads_ % kv_heads_ == 0, "Decoder: heads must be a multiple of kv heads");
    TORCH_CHECK(embed.scalar_type() == at::kBFloat16 && embed.is_contiguous() && embed.dim() == 2 &&
                    embed.size(1) == H_,
                "Decoder: the embedding table must be a contiguous [V, H] bf16 matrix");
    inv_freq_ = to_float(inv_freq);
    TORCH_CHECK(static_cast<int64_t>(inv_freq_.size()) * 2 == D_, "Decoder: inv_freq must have head_dim / 2 entries");
    keep_ = {embed, head, head_aux};
    embed_ = reinterpret_cast<const uint16_t*>(embed.data_ptr<c10::BFloat16>());
    vocab_ = embed.size(0);
    norm_ = to_float(norm);
    head_ = make_mat(head, head_aux, "lm_head");
    TORCH_CHECK(head_.K == H_, "Decoder: lm_head must be [V, H]");
    x_.assign(H_, 0.f);
  }

  // t: in_norm, post_norm, router, then (weight, aux) for q, k, v, o, then the expert stacks gate_up [E, 2F, ..],
  // its aux, down [E, H, ..], its aux (empty tensors when the experts are offloaded). aux: int8 scales, int4
  // scales-and-zeros, or an empty tensor for bf16.
  void add_layer(std::vector<Tensor> t, int64_t rope, int64_t window) {
    TORCH_CHECK(t.size() == 15, "Decoder.add_layer: 15 tensors expected");
    Layer l;
    l.in_norm = to_float(t[0]);
    l.post_norm = to_float(t[1]);
    l.router = make_mat(t[2], Tensor(), "router");
    TORCH_CHECK(l.router.kind == Mat::kBf16 && l.router.N == E_ && l.router.K == H_, "Decoder: router must be [E, H] bf16");
    l.q = make_mat(t[3], t[4], "q_proj");
    l.k = make_mat(t[5], t[6], "k_proj");
    l.v = make_mat(t[7], t[8], "v_proj");
    l.o = make_mat(t[9], t[10], "o_proj");
    TORCH_CHECK(l.q.N == heads_ * D_ && l.k.N == kv_heads_ * D_ && l.v.N == kv_heads_ * D_ && l.q.K == H_ &&
                    l.o.N == H_ && l.o.K == heads_ * D_,
                "Decoder: attention projections do not match the model's shapes");
    if (t[11].defined() && t[11].numel() > 0) {
      TORCH_CHECK(t[11].dim() == 3 && t[13].dim() == 3 && t[11].size(0) == E_ && t[13].size(0) == E_,
                  "Decoder: expert stacks must be [E, 2F, ..] and [E, H, ..]");
      auto flat = [](const Tensor& x) { return x.numel() ? x.flatten(0, 1) : x; };
      l.gate_up = make_mat(flat(t[11]), flat(t[12]), "gate_up");
      l.down = make_mat(flat(t[13]), flat(t[14]), "down");
      l.resident = true;
    }
    l.rope = rope != 0;
    l.window = window;
    for (const Tensor& x : t) keep_.push_back(x);
    layers_.push_back(std::move(l));
    k_cache_.emplace_back();
    v_cache_.emplace_back();
  }

  // The KV buffers of layer `l`: bf16 [1, kv_heads, capacity, head_dim] each (owned by the Python cache).
  void set_cache(int64_t l, Tensor k, Tensor v) {
    TORCH_CHECK(k.scalar_type() == at::kBFloat16 && k.is_contiguous() && k.dim() == 4 && k.size(0) == 1 &&
                    k.size(1) == kv_heads_ && k.size(3) == D_ && v.sizes() == k.sizes() && v.is_contiguous() &&
                    v.scalar_type() == at::kBFloat16,
                "Decoder.set_cache: buffers must be contiguous bf16 [1, kv_heads, capacity, head_dim]");
    k_cache_.at(l) = k;
    v_cache_.at(l) = v;
  }

  // The whole step: logits [1, 1, V] bf16 of token `token` at position `pos`.
  Tensor step(int64_t token, int64_t pos) {
    const auto start = Clock::now();
    embed(token);
    for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
      select(l);
      attend(l, pos);
      const Layer& L = layers_[l];
      TORCH_CHECK(L.resident, "Decoder.step: layer ", l, " has no resident experts");
      const int64_t F2 = L.gate_up.N / E_, Hd = L.down.N / E_;
      std::vector<Expert> ex(top_k_);
      for (int64_t i = 0; i < top_k_; ++i) {
        const int64_t e = experts_[i];
        ex[i].gate = row_slice(L.gate_up, e * F2, F2 / 2);
        ex[i].up = row_slice(L.gate_up, e * F2 + F2 / 2, F2 / 2);
        ex[i].down = row_slice(L.down, e * Hd, Hd);
      }
      moe(ex);
    }
    Tensor logits = head();
    step_s_ += seconds_since(start);
    ++steps_;
    return logits;
  }

  // --- the same step in pieces, for callers that fetch the experts themselves -----------------------------------
  void embed(int64_t token) {
    TORCH_CHECK(token >= 0 && token < vocab_, "Decoder: token ", token, " out of range for ", vocab_);
    for (int64_t h = 0; h < H_; ++h) x_[h] = bf16_to_float(embed_[token * H_ + h]);
  }

  // Router logits of the current layer input and the top-k: the chosen experts, in routing order.
  Tensor route(int64_t l) {
    select(l);
    Tensor out = at::empty({top_k_}, at::kLong);
    std::copy(experts_.begin(), experts_.end(), out.data_ptr<int64_t>());
    return out;
  }

  // `route` without the result tensor (the resident step needs no copy).
  void select(int64_t l) {
    const Layer& L = layers_.at(l);
    Act ax;
    ax.set(x_.data(), H_, false, false);
    std::vector<float> logits(E_);
    kernels({{&L.router, &ax, logits.data(), 0, E_}});
    if (forced_.defined() && forced_.numel() > 0) {
      // A replayed routing trace: its experts lifted above every real logit, in its order (as
      // routing.replay_trace's router hook does to the model's logits, bf16 arithmetic included).
      const int64_t* p = forced_.data_ptr<int64_t>() + l * top_k_;
      const float base = round_bf16(*std::max_element(logits.begin(), logits.end()) + 1.f);
      for (int64_t i = 0; i < top_k_; ++i) logits[p[i]] = round_bf16(base + static_cast<float>(top_k_ - i));
    }
    // Top-k of the bf16 logits, then the weights in the precision the model computes them: sigmoid in bf16
    // renormalised to sum 1, or softmax in fp32, cast to bf16. Where the k-th and the next logit are equal (bf16
    // ties are not rare), torch.topk itself decides, so that the experts are the model's own choice.
    std::vector<int64_t> idx(E_);
    for (int64_t e = 0; e < E_; ++e) idx[e] = e;
    const int64_t sorted = std::min(E_, top_k_ + 1);
    std::partial_sort(idx.begin(), idx.begin() + sorted, idx.end(), [&](int64_t a, int64_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    if (sorted > top_k_ && logits[idx[top_k_ - 1]] == logits[idx[top_k_]]) {
      Tensor t = at::empty({1, E_}, at::kBFloat16);
      for (int64_t e = 0; e < E_; ++e) t.data_ptr<c10::BFloat16>()[e] = c10::BFloat16(logits[e]);
      const Tensor chosen = std::get<1>(at::topk(t, top_k_, -1)).contiguous();
      std::copy(chosen.data_ptr<int64_t>(), chosen.data_ptr<int64_t>() + top_k_, idx.begin());
    }
    experts_.assign(idx.begin(), idx.begin() + top_k_);
    weights_.assign(top_k_, 0.f);
    if (softmax_) {
      float mx = -INFINITY, sum = 0.f;
      for (int64_t i = 0; i < top_k_; ++i) mx = std::max(mx, logits[experts_[i]]);
      for (int64_t i = 0; i < top_k_; ++i) sum += (weights_[i] = std::exp(logits[experts_[i]] - mx));
      for (int64_t i = 0; i < top_k_; ++i) weights_[i] = round_bf16(weights_[i] / sum);
    } else {
      float sum = 0.f;
      for (int64_t i = 0; i < top_k_; ++i) {
        weights_[i] = round_bf16(1.f / (1.f + std::exp(-logits[experts_[i]])));
        sum += weights_[i];
      }
      sum = round_bf16(sum);
      for (int64_t i = 0; i < top_k_; ++i) weights_[i] = round_bf16(weights_[i] / sum);
    }
  }

  // Attention of layer `l` at position `pos` (writes this token's K/V into the cache) and its residual add.
  void attend(int64_t l, int64_t pos) {
    const Layer& L = layers_.at(l);
    const Tensor& kc = k_cache_.at(l);
    const Tensor& vc = v_cache_.at(l);
    TORCH_CHECK(kc.defined() && pos >= 0 && pos < kc.size(2), "Decoder: position ", pos,
                " is outside the KV buffers of layer ", l, " (capacity ", kc.defined() ? kc.size(2) : 0, ")");
    std::vector<float> hn(H_);
    rms_norm(x_.data(), L.in_norm, hn.data());
    Act ah;
    const std::vector<const Mat*> qkv = {&L.q, &L.k, &L.v};
    ah.set(hn.data(), H_, wants(qkv, Mat::kInt8), wants(qkv, Mat::kInt4));
    const int64_t Q = heads_ * D_, KV = kv_heads_ * D_;
    std::vector<float> q(Q), k(KV), v(KV);
    kernels({{&L.q, &ah, q.data(), 0, Q}, {&L.k, &ah, k.data(), 0, KV}, {&L.v, &ah, v.data(), 0, KV}});
    if (L.rope) {
      rope(q.data(), heads_, pos);
      rope(k.data(), kv_heads_, pos);
    }
    const int64_t cap = kc.size(2);
    uint16_t* kp = reinterpret_cast<uint16_t*>(kc.data_ptr<c10::BFloat16>());
    uint16_t* vp = reinterpret_cast<uint16_t*>(vc.data_ptr<c10::BFloat16>());
    for (int64_t g = 0; g < kv_heads_; ++g)
      for (int64_t d = 0; d < D_; ++d) {
        kp[(g * cap + pos) * D_ + d] = c10::BFloat16(k[g * D_ + d]).x;
        vp[(g * cap + pos) * D_ + d] = c10::BFloat16(v[g * D_ + d]).x;
      }
    const int64_t first = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
    std::vector<float> attn(Q);
    attention(q.data(), kp, vp, cap, first, pos, attn.data());
    Act aa;
    aa.set(attn.data(), Q, L.o.kind == Mat::kInt8, L.o.kind == Mat::kInt4);
    std::vector<float> o(H_);
    kernels({{&L.o, &aa, o.data(), 0, H_}});
    for (int64_t h = 0; h < H_; ++h) x_[h] = round_bf16(x_[h] + o[h]);
    h2_.resize(H_);
    rms_norm(x_.data(), L.post_norm, h2_.data());
  }

  // The routed experts of the current layer with weights from the caller (an expert cache): per expert in routing
  // order (the order `route` returned) six tensors, gate, its aux, up, its aux, down, its aux (aux: int8 scales,
  // int4 scales-and-zeros, or empty for bf16); `down_t`: down is stored transposed [F, H] (bf16). Then the
  // residual add.
  void moe_with(std::vector<Tensor> t, bool down_t) {
    TORCH_CHECK(static_cast<int64_t>(t.size()) == 6 * top_k_,
                "Decoder.moe_with: six tensors (gate, aux, up, aux, down, aux) per routed expert");
    std::vector<Expert> ex(top_k_);
    for (int64_t i = 0; i < top_k_; ++i) {
      ex[i].gate = make_mat(t[6 * i], t[6 * i + 1], "gate");
      ex[i].up = make_mat(t[6 * i + 2], t[6 * i + 3], "up");
      ex[i].down = make_mat(t[6 * i + 4], t[6 * i + 5], "down");
      ex[i].down_t = down_t;
    }
    moe(ex);
  }

  // [seconds in weight kernels, seconds in whole steps, steps] since the last reset: what a step spends outside
  // its matrix products (attention, norms, routing, the call itself) is the difference.
  std::vector<double> timings() { return {kernel_s_, step_s_, static_cast<double>(steps_)}; }
  void reset_timings() { kernel_s_ = step_s_ = 0.0, steps_ = 0; }

  // Experts every layer must pick from now on, int64 [layers, k] (a routing trace replayed); empty: the router's.
  void force_routing(Tensor picks) {
    TORCH_CHECK(picks.numel() == 0 || (picks.scalar_type() == at::kLong && picks.dim() == 2 &&
                                       picks.size(0) == num_layers() && picks.size(1) == top_k_),
                "Decoder.force_routing: picks must be int64 [layers, k] or empty");
    forced_ = picks.contiguous();
    if (forced_.numel())
      for (int64_t i = 0; i < forced_.numel(); ++i)
        TORCH_CHECK(forced_.data_ptr<int64_t>()[i] >= 0 && forced_.data_ptr<int64_t>()[i] < E_,
                    "Decoder.force_routing: expert out of range");
  }

  // Live-neuron fraction up to which experts run neuron-sparse (0, the default: always dense).
  void set_sparse_threshold(double t) { sparse_ = t; }

  // Final norm and LM head of the current hidden state: logits [1, 1, V] bf16.
  Tensor head() {
    std::vector<float> hn(H_);
    rms_norm(x_.data(), norm_, hn.data());
    Act a;
    a.set(hn.data(), H_, head_.kind == Mat::kInt8, head_.kind == Mat::kInt4);
    std::vector<float> logits(head_.N);
    kernels({{&head_, &a, logits.data(), 0, head_.N}});
    Tensor out = at::empty({1, 1, head_.N}, at::kBFloat16);
    c10::BFloat16* p = out.data_ptr<c10::BFloat16>();
    for (int64_t n = 0; n < head_.N; ++n) p[n] = c10::BFloat16(logits[n]);
    return out;
  }

  // The current hidden state (the residual stream), bf16 [1, H]: for tests and debugging.
  Tensor hidden() {
    Tensor out = at::empty({1, H_}, at::kBFloat16);
    for (int64_t h = 0; h < H_; ++h) out.data_ptr<c10::BFloat16>()[h] = c10::BFloat16(x_[h]);
    return out;
  }

  int64_t num_layers() { return static_cast<int64_t>(layers_.size()); }

 private:
  using Clock = std::chrono::steady_clock;
  static double seconds_since(Clock::time_point t) {
    return std::chrono::duration<double>(Clock::now() - t).count();
  }

  // The matrix products of one parallel region, timed.
  void kernels(const std::vector<Job>& jobs) {
    const auto start = Clock::now();
    run(jobs);
    kernel_s_ += seconds_since(start);
  }

  // Llama RMSNorm in the model's precision: statistics in fp32, normalised value rounded to bf16, times the weight.
  void rms_norm(const float* x, const std::vector<float>& w, float* out) const {
    float ss = 0.f;
    for (int64_t h = 0; h < H_; ++h) ss += x[h] * x[h];
    const float r = 1.f / std::sqrt(ss / static_cast<float>(H_) + eps_);
    for (int64_t h = 0; h < H_; ++h) out[h] = round_bf16(w[h] * round_bf16(x[h] * r));
  }

  // NEOX RoPE as the bf16 model computes it: bf16 cos/sin tables, each product and the sum rounded to bf16.
  void rope(float* v, int64_t heads, int64_t pos) const {
    const int64_t half = D_ / 2;
    std::vector<float> c(half), s(half);
    for (int64_t i = 0; i < half; ++i) {
      const float f = static_cast<float>(pos) * inv_freq_[i];
      c[i] = round_bf16(std::cos(f));
      s[i] = round_bf16(std::sin(f));
    }
    for (int64_t h = 0; h < heads; ++h) {
      float* p = v + h * D_;
      for (int64_t i = 0; i < half; ++i) {
        const float a = p[i], b = p[i + half];
        p[i] = round_bf16(round_bf16(a * c[i]) + round_bf16(-b * s[i]));
        p[i + half] = round_bf16(round_bf16(b * c[i]) + round_bf16(a * s[i]));
      }
    }
  }

  // One query token against cache positions [first, last], fp32 scores and softmax, output rounded to bf16.
  void attention(const float* q, const uint16_t* kp, const uint16_t* vp, int64_t cap, int64_t first, int64_t last,
                 float* out) const {
    const int64_t n = last - first + 1, rep = heads_ / kv_heads_;
    const float scale = 1.f / std::sqrt(static_cast<float>(D_));
    at::parallel_for(0, heads_, 1, [&](int64_t hb, int64_t he) {
      std::vector<float> p(n), acc(D_);
      for (int64_t hq = hb; hq < he; ++hq) {
        const int64_t g = hq / rep;
        const float* qh = q + hq * D_;
        float mx = -INFINITY;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = dot_bf16(kp + (g * cap + first + j) * D_, qh, D_) * scale;
          mx = std::max(mx, p[j]);
        }
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += (p[j] = std::exp(p[j] - mx));
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t j = 0; j < n; ++j) axpy_bf16(p[j] / sum, vp + (g * cap + first + j) * D_, acc.data(), D_);
        for (int64_t d = 0; d < D_; ++d) out[hq * D_ + d] = round_bf16(acc[d]);
      }
    });
  }

  // Routed experts on h2_ (experts_/weights_ from `route`), summed in ascending expert id as the model sums them.
  // Neuron-sparse where an expert's live neurons (gate > 0) are at most `sparse_` of them: only their rows of up
  // are read, and of down where it is stored transposed; dead neurons are exact zeros either way.
  void moe(const std::vector<Expert>& ex) {
    const int64_t k = static_cast<int64_t>(ex.size()), F = ex[0].gate.N;
    std::vector<int64_t> order(k);
    for (int64_t i = 0; i < k; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return experts_[a] < experts_[b]; });
    std::vector<const Mat*> in_h;
    for (const Expert& e : ex) {
      TORCH_CHECK(e.gate.N == F && e.up.N == F && e.gate.K == H_ && e.up.K == H_ &&
                      (e.down_t ? (e.down.N == F && e.down.K == H_) : (e.down.N == H_ && e.down.K == F)),
                  "Decoder: expert matrices must be gate/up [F, H] and down [H, F] (or down^T [F, H])");
      TORCH_CHECK(!e.down_t || e.down.kind == Mat::kBf16, "Decoder: a transposed down must be bf16");
      in_h.push_back(&e.gate);
      in_h.push_back(&e.up);
    }
    Act ah;
    ah.set(h2_.data(), H_, wants(in_h, Mat::kInt8), wants(in_h, Mat::kInt4));
    std::vector<float> g(k * F), u(k * F, 0.f);
    std::vector<Job> jobs;
    for (int64_t i = 0; i < k; ++i) jobs.push_back({&ex[i].gate, &ah, g.data() + i * F, 0, F});
    kernels(jobs);
    std::vector<std::vector<int64_t>> live(k);
    std::vector<char> sparse(k, 0);
    sparse_u_.assign(k * F, 0.f);
    jobs.clear();
    for (int64_t i = 0; i < k; ++i) {
      for (int64_t f = 0; f < F; ++f)
        if (g[i * F + f] > 0.f) live[i].push_back(f);
      sparse[i] = static_cast<double>(live[i].size()) <= sparse_ * static_cast<double>(F);
      if (!sparse[i])
        jobs.push_back({&ex[i].up, &ah, u.data() + i * F, 0, F});
      else if (!live[i].empty()) {
        jobs.push_back({&ex[i].up, &ah, sparse_u_.data() + i * F, 0, static_cast<int64_t>(live[i].size()),
                        live[i].data()});
      }
    }
    kernels(jobs);
    std::vector<Act> acts(k);
    std::vector<float> h(k * F, 0.f);
    for (int64_t i = 0; i < k; ++i) {
      float* hi = h.data() + i * F;
      if (sparse[i])
        for (size_t n = 0; n < live[i].size(); ++n) {
          const int64_t f = live[i][n];
          hi[f] = round_bf16(sparse_u_[i * F + n] * g[i * F + f]);
        }
      else
        for (int64_t f = 0; f < F; ++f) hi[f] = round_bf16(std::max(g[i * F + f], 0.f) * u[i * F + f]);
      if (!ex[i].down_t) acts[i].set(hi, F, ex[i].down.kind == Mat::kInt8, ex[i].down.kind == Mat::kInt4);
    }
    // Output columns split across threads; a transposed down is accumulated a live row at a time over the
    // thread's columns (fp32), a plain one is a dot product per column.
    const auto start = Clock::now();
    at::parallel_for(0, H_, 64, [&](int64_t b, int64_t e) {
      std::vector<float> y(e - b), o(e - b, 0.f);
      for (int64_t i : order) {
        const Expert& ei = ex[i];
        if (ei.down_t) {
          std::fill(y.begin(), y.end(), 0.f);
          const float* hi = h.data() + i * F;
          for (int64_t f = 0; f < F; ++f)
            if (hi[f] != 0.f) axpy_bf16(hi[f], ei.down.bf + f * H_ + b, y.data(), e - b);
        } else {
          for (int64_t j = b; j < e; ++j) y[j - b] = dot(ei.down, j, acts[i]);
        }
        for (int64_t j = b; j < e; ++j) o[j - b] = round_bf16(o[j - b] + round_bf16(round_bf16(y[j - b]) * weights_[i]));
      }
      for (int64_t j = b; j < e; ++j) x_[j] = round_bf16(x_[j] + o[j - b]);
    });
    kernel_s_ += seconds_since(start);
  }

  int64_t H_, heads_, kv_heads_, D_, E_, top_k_;
  bool softmax_;
  float eps_;
  int64_t vocab_ = 0;
  double sparse_ = 0.0, kernel_s_ = 0.0, step_s_ = 0.0;
  int64_t steps_ = 0;  // live-neuron fraction up to which an expert runs neuron-sparse (0: always dense)
  std::vector<float> inv_freq_, norm_, x_, h2_, weights_, sparse_u_;
  std::vector<int64_t> experts_;
  const uint16_t* embed_ = nullptr;
  Mat head_;
  std::vector<Layer> layers_;
  std::vector<Tensor> keep_, k_cache_, v_cache_;
  Tensor forced_;
};

}  // namespace

#ifndef KERNEL_NAMESPACE
#define KERNEL_NAMESPACE smallthinker
#endif
#define SMALLTHINKER_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)

SMALLTHINKER_FRAGMENT(KERNEL_NAMESPACE, m) {
  m.class_<Decoder>("Decoder")
      .def(torch::init<std::vector<int64_t>, double, Tensor, Tensor, Tensor, Tensor, Tensor>())
      .def("add_layer", &Decoder::add_layer)
      .def("set_cache", &Decoder::set_cache)
      .def("step", &Decoder::step)
      .def("embed", &Decoder::embed)
      .def("route", &Decoder::route)
      .def("attend", &Decoder::attend)
      .def("moe_with", &Decoder::moe_with)
      .def("set_sparse_threshold", &Decoder::set_sparse_threshold)
      .def("force_routing", &Decoder::force_routing)
      .def("timings", &Decoder::timings)
      .def("reset_timings", &Decoder::reset_timings)
      .def("head", &Decoder::head)
      .def("hidden", &Decoder::hidden)
      .def("num_layers", &Decoder::num_layers);
}

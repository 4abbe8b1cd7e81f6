// mnemo/memory/segment_recurrence.hpp — Transformer-XL segment recurrence (Dai, Yang, Yang,
// Carbonell, Le & Salakhutdinov, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length
// Context", ACL 2019) with its relative-position attention, and the GTrXL gate (Parisotto, Song,
// Rae, Pascanu, Gulcehre, Jayakumar, Jaderberg, Kaufman, Clark, Noury, Botvinick, Heess & Hadsell,
// "Stabilizing Transformers for Reinforcement Learning", 2019).
//
// Segment recurrence. A layer caches the hidden states of the last M tokens it has seen (the
// previous segment when M = L), with a stop-gradient, and the tokens of the next segment attend over
// [memory; segment]:
//   h~   = [SG(m_{tau}); h_{tau+1}]                     [M + L, d]
//   q, k, v = h_{tau+1} W_q,  h~ W_k,  h~ W_v
//   s_ij = q_i.k_j + q_i.W_{k,R} R_{i-j} + u.k_j + v.W_{k,R} R_{i-j}     (Dai et al. eq. (2), terms a-d)
//   out  = softmax(scale s + causal mask) v              query i sees keys j <= i + M
//   m_{tau+1} = the last M rows of h~
// The projections are linear and fixed within a step, so this module caches the projected keys and
// values of the memory tokens (kv_memory: [B, H, M, D] and [B, H, M, Dv]) instead of the hidden
// states: the same scores, and the memory is not re-projected at every segment. The relative
// terms are mods::relative_position (attention/score_terms.hpp) with min_distance = 0: the caller
// supplies r = W_{k,R} R as [Hr, N, D] (row n = distance n; Hr = 1 or H; distances >= N clamp to
// row N - 1, so N >= M + L covers every pair), u and v [H, D] (empty: 0). An empty r gives plain
// causal attention (absolute positions already in q and k). The attention over [memory; segment]
// is bottom-right causal (DESIGN.md), since Lk = M + L.
//
// GTrXL gate (Parisotto et al., eq. of the GRU-type gating): replaces the residual x + y of a
// sub-layer (y = the sub-layer's output, x its input stream) with
//   r = sigma(y W_r + x U_r)
//   z = sigma(y W_z + x U_z - b_g)
//   h = tanh(y W_g + (r * x) U_g)
//   g(x, y) = (1 - z) * x + z * h
// Row vectors times [D, D] weights (x W: W is [D_in, D_out]); b_g > 0 keeps z small at the start,
// so the gate starts near the identity map x (the paper sets b_g = 2 in its experiments; 2 here by
// default). In GTrXL the sub-layer input is layer-normed first (y = relu(MHA(LN(x)))); that is the
// caller's part.
//
// API: kv_memory (the state: push is the write, save/load), xl_attention (one step: read over
// [memory; segment], then the write), xl_read (the read alone: attention of any queries over the
// stored pairs, no mask: an associative read), gtrxl_gate.
//
// Shapes: q [B, H, L, D], k [B, H, L, D], v [B, H, L, Dv], out [B, H, L, Dv]; memory keys
// [B, H, M, D], values [B, H, M, Dv]; gate x, y, out [B, L, D], weights [D, D].
// Paths: reference::* run the attention through attention::reference (double) and the gate in
// double; the fast path runs attention::flash (one call per batch entry when the relative terms
// are on: their q and k differ per sequence) and the gate as six Eigen GEMMs per batch entry.
// Left out: the backward (the relative terms have none in mnemo yet; see score_terms.hpp).
//
// The shared pieces of the segment memories (kv_memory, the [memory; segment] concatenation and
// the causal attention over it) are here; memory/compressive_transformer.hpp and memory/lamemo.hpp
// build on them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/attention.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/score_terms.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"

namespace mnemo::memory {

// Options of the segment memories' attention.
struct segment_options {
  float scale = 0;  // 0: 1 / sqrt(D)
  int threads = 0;  // 0: the OpenMP default
};

// The keys and values of the last `capacity` tokens, per (batch, head), oldest first; size() of
// them are held (all batch entries alike).
class kv_memory {
 public:
  kv_memory() = default;
  kv_memory(std::int64_t B, std::int64_t H, std::int64_t capacity, std::int64_t D, std::int64_t Dv)
      : k_((mnemo::detail::require(B >= 1 && H >= 1 && capacity >= 0 && D >= 1 && Dv >= 1,
                                   "kv_memory: B, H, D, Dv must be >= 1 and capacity >= 0, got B=", B, ", H=", H,
                                   ", capacity=", capacity, ", D=", D, ", Dv=", Dv),
            shape_t<4>{B, H, capacity, D})),
        v_({B, H, capacity, Dv}) {}

  std::int64_t batch() const { return k_.extent(0); }
  std::int64_t heads() const { return k_.extent(1); }
  std::int64_t capacity() const { return k_.extent(2); }
  std::int64_t size() const { return size_; }
  std::int64_t key_dim() const { return k_.extent(3); }
  std::int64_t value_dim() const { return v_.extent(3); }
  bool empty() const { return k_.extent(0) == 0; }
  void clear() { size_ = 0; }

  view<const float, 4> keys() const { return k_.as_view().narrow(2, 0, size_); }  // [B, H, size, D]
  view<const float, 4> values() const { return v_.as_view().narrow(2, 0, size_); }  // [B, H, size, Dv]
  view<float, 4> keys() { return k_.as_view().narrow(2, 0, size_); }
  view<float, 4> values() { return v_.as_view().narrow(2, 0, size_); }

  // The write: appends the n tokens of k [B, H, n, D], v [B, H, n, Dv]; the oldest fall out past
  // the capacity. Returns how many fell out.
  std::int64_t push(view<const float, 4> k, view<const float, 4> v);

  // <prefix>k.npy, <prefix>v.npy (the whole capacity), <prefix>config.npy (int64: size).
  void save(const std::string& prefix) const;
  static kv_memory load(const std::string& prefix);

 private:
  tensor<float, 4> k_, v_;
  std::int64_t size_ = 0;
};

namespace detail {

// dst rows [dst0, dst0 + n) = src rows [src0, src0 + n), for every (batch, head); src and dst may be
// the same tensor (rows move towards the front: dst0 <= src0).
inline void copy_rows(const view<const float, 4>& src, std::int64_t src0, const view<float, 4>& dst, std::int64_t dst0,
                      std::int64_t n) {
  if (n <= 0 || (src.data() == dst.data() && src0 == dst0)) return;
  const std::int64_t B = dst.extent(0), H = dst.extent(1), D = dst.extent(3);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t t = 0; t < n; ++t) std::copy_n(src.ptr(b, h, src0 + t), D, dst.ptr(b, h, dst0 + t));
}

// [a; b] along the token axis: a [B, H, n, D], b [B, H, L, D] -> [B, H, n + L, D].
inline tensor<float, 4> concat_tokens(const view<const float, 4>& a, const view<const float, 4>& b) {
  tensor<float, 4> c({b.extent(0), b.extent(1), a.extent(2) + b.extent(2), b.extent(3)});
  copy_rows(a, 0, c, 0, a.extent(2));
  copy_rows(b, 0, c, a.extent(2), b.extent(2));
  return c;
}

inline attention::options attention_options(const segment_options& opt) {
  return {.scale = opt.scale, .threads = opt.threads};
}

// Causal attention of q over keys and values whose last Lq rows are the queries' own tokens
// (bottom-right: query i sees keys j <= i + Lk - Lq): attention::reference (Exact) or flash.
template <bool Exact, class Mod = attention::mods::causal>
void attend(view<const float, 4> q, view<const float, 4> k, view<const float, 4> v, view<float, 4> out,
            view<float, 3> lse, const attention::options& opt, const attention::column_sums& cs = {},
            const Mod& mod = {}) {
  if constexpr (Exact) attention::reference<float, Mod>(q, k, v, out, lse, mod, opt, cs);
  else attention::flash<float, Mod>(q, k, v, out, lse, mod, opt, cs);
}

// The checks every segment memory makes on one step's tensors; returns L.
inline std::int64_t check_segment(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                                  const view<const float, 4>& v, const view<float, 4>& out, std::int64_t B,
                                  std::int64_t H, std::int64_t D, std::int64_t Dv, int threads, const char* from) {
  const std::int64_t L = q.extent(2);
  mnemo::detail::require_shape(fn, "q", q, {B, H, L, D}, from);
  mnemo::detail::require_shape(fn, "k", k, {B, H, L, D}, " [B, H, L, D] (L from q)");
  mnemo::detail::require_shape(fn, "v", v, {B, H, L, Dv}, " [B, H, L, Dv]");
  mnemo::detail::require_shape(fn, "out", out, {B, H, L, Dv}, " [B, H, L, Dv]");
  check_threads(fn, threads);
  return L;
}

// <prefix><name>.npy as [B, H, n, x] (x free), checked against the state's B, H and n.
inline tensor<float, 4> load_rows(const char* who, const std::string& prefix, const char* name, std::int64_t B,
                                  std::int64_t H, std::int64_t n) {
  const std::string path = npy_path(prefix, name);
  tensor<float, 4> t = npy::load<float, 4>(path);
  mnemo::detail::require(t.extent(0) == B && t.extent(1) == H && t.extent(2) == n, who, ": ", path,
                         ": expected [B, H, n, .] with [B, H, n] = ", shape_string(shape_t<3>{B, H, n}), ", got ",
                         shape_string(t.shape()));
  return t;
}

// The fill level saved in <prefix>config.npy, checked against the capacity.
inline std::int64_t load_size(const char* who, const std::string& prefix, std::int64_t capacity, std::int64_t at = 0,
                              std::int64_t n = 1) {
  const auto r = load_record(npy_path(prefix, "config"), n);
  mnemo::detail::require(r[at] >= 0 && r[at] <= capacity, who, ": ", prefix, "config.npy: size ", r[at],
                         " outside [0, capacity = ", capacity, "]");
  return r[at];
}

inline void check_scale(const char* fn, float scale) {
  mnemo::detail::require(std::isfinite(scale), fn, ": options.scale must be finite, got ", scale);
}

// The read of a memory alone: attention of q [B, H, Lq, D] over keys [B, H, n, D] and values
// [B, H, n, Dv], no mask (every stored token is in the past of every query); n = 0 reads 0.
template <bool Exact>
void memory_read(const char* fn, view<const float, 4> q, view<const float, 4> keys, view<const float, 4> values,
                 view<float, 4> out, const segment_options& opt) {
  const std::int64_t B = keys.extent(0), H = keys.extent(1), D = keys.extent(3), Dv = values.extent(3), Lq = q.extent(2);
  mnemo::detail::require_shape(fn, "q", q, {B, H, Lq, D}, " [B, H, Lq, D] (B, H, D from the memory)");
  mnemo::detail::require_shape(fn, "out", out, {B, H, Lq, Dv}, " [B, H, Lq, Dv]");
  check_threads(fn, opt.threads);
  check_scale(fn, opt.scale);
  attend<Exact, attention::mods::none>(q, keys, values, out, {}, attention_options(opt));
}

}  // namespace detail

inline std::int64_t kv_memory::push(view<const float, 4> k, view<const float, 4> v) {
  constexpr const char* fn = "kv_memory::push";
  mnemo::detail::require(!empty(), fn, ": the memory is empty (default-constructed)");
  const std::int64_t n = k.extent(2), cap = capacity();
  mnemo::detail::require_shape(fn, "k", k, {batch(), heads(), n, key_dim()}, " [B, H, n, D] (B, H, D from the memory)");
  mnemo::detail::require_shape(fn, "v", v, {batch(), heads(), n, value_dim()}, " [B, H, n, Dv]");
  const std::int64_t total = size_ + n, kept = std::min(total, cap), dropped = total - kept;
  const std::int64_t old_kept = std::max<std::int64_t>(size_ - dropped, 0), new_from = n - (kept - old_kept);
  detail::copy_rows(k_, size_ - old_kept, k_, 0, old_kept);
  detail::copy_rows(v_, size_ - old_kept, v_, 0, old_kept);
  detail::copy_rows(k, new_from, k_, old_kept, kept - old_kept);
  detail::copy_rows(v, new_from, v_, old_kept, kept - old_kept);
  size_ = kept;
  return dropped;
}

inline void kv_memory::save(const std::string& prefix) const {
  mnemo::detail::require(!empty(), "kv_memory::save: the memory is empty");
  npy::save(detail::npy_path(prefix, "k"), k_);
  npy::save(detail::npy_path(prefix, "v"), v_);
  detail::save_record(detail::npy_path(prefix, "config"), {size_});
}

inline kv_memory kv_memory::load(const std::string& prefix) {
  constexpr const char* who = "kv_memory::load";
  kv_memory m;
  m.k_ = npy::load<float, 4>(detail::npy_path(prefix, "k"));
  m.v_ = detail::load_rows(who, prefix, "v", m.k_.extent(0), m.k_.extent(1), m.k_.extent(2));
  m.size_ = detail::load_size(who, prefix, m.capacity());
  return m;
}

// ---------------------------------------------------------------------------------------------
// Transformer-XL.

// The relative terms: r = W_{k,R} R [Hr, N, D] (row n: distance n), u, v [H, D] or empty.
struct xl_position {
  view<const float, 3> r = {};  // empty: no relative term
  view<const float, 2> u = {};
  view<const float, 2> v = {};
};

namespace detail {

template <bool Exact>
void xl_step(const char* fn, view<const float, 4> q, view<const float, 4> k, view<const float, 4> v,
             const xl_position& pos, kv_memory& mem, view<float, 4> out, const segment_options& opt) {
  mnemo::detail::require(!mem.empty(), fn, ": memory is empty (default-constructed)");
  check_segment(fn, q, k, v, out, mem.batch(), mem.heads(), mem.key_dim(), mem.value_dim(), opt.threads,
                " [B, H, L, D] (B, H, D from the memory)");
  check_scale(fn, opt.scale);
  const std::int64_t H = mem.heads(), D = mem.key_dim();
  if (!pos.r.empty())
    mnemo::detail::require((pos.r.extent(0) == 1 || pos.r.extent(0) == H) && pos.r.extent(1) >= 1 && pos.r.extent(2) == D,
                           fn, ": position.r must have shape [1 or H = ", H, ", N >= 1, D = ", D, "], got ",
                           shape_string(pos.r.shape()));
  const tensor<float, 4> kc = concat_tokens(mem.keys(), k), vc = concat_tokens(mem.values(), v);
  const attention::options ao = attention_options(opt);
  if (pos.r.empty()) {
    attend<Exact>(q, kc, vc, out, {}, ao);
  } else {
    // One mod per batch entry (its q and k feed the relative terms); attention's own threads work
    // inside each entry.
    for (std::int64_t b = 0; b < q.extent(0); ++b) {
      const auto qb = q.narrow(0, b, 1), kb = cview(kc).narrow(0, b, 1), vb = cview(vc).narrow(0, b, 1);
      const auto mod = attention::mods::all_of(
          attention::mods::relative_position(qb[0], kb[0], pos.r, pos.u, pos.v, 0, opt.scale), attention::mods::causal{});
      attend<Exact>(qb, kb, vb, out.narrow(0, b, 1), {}, ao, {}, mod);
    }
  }
  mem.push(k, v);
}

struct gtrxl_dims {
  std::int64_t B, L, D;
};

}  // namespace detail

// The GTrXL gate's weights, each [D, D] (x W), and the bias b_g of z.
struct gtrxl_weights {
  view<const float, 2> w_r, u_r, w_z, u_z, w_g, u_g;
  float b_g = 2.0f;
};

namespace detail {

inline gtrxl_dims check_gate(const char* fn, const view<const float, 3>& x, const view<const float, 3>& y,
                             const gtrxl_weights& w, const view<float, 3>& out, int threads) {
  const std::int64_t B = x.extent(0), L = x.extent(1), D = x.extent(2);
  mnemo::detail::require(D >= 1, fn, ": x.shape[2] (D) must be >= 1, got ", D);
  mnemo::detail::require_shape(fn, "y", y, {B, L, D}, " [B, L, D] (from x)");
  mnemo::detail::require_shape(fn, "out", out, {B, L, D}, " [B, L, D]");
  const std::pair<const char*, const view<const float, 2>*> ws[] = {{"weights.w_r", &w.w_r}, {"weights.u_r", &w.u_r},
                                                                    {"weights.w_z", &w.w_z}, {"weights.u_z", &w.u_z},
                                                                    {"weights.w_g", &w.w_g}, {"weights.u_g", &w.u_g}};
  for (const auto& [name, m] : ws) mnemo::detail::require_shape(fn, name, *m, {D, D}, " [D, D]");
  mnemo::detail::require(std::isfinite(w.b_g), fn, ": weights.b_g must be finite, got ", w.b_g);
  check_threads(fn, threads);
  return {B, L, D};
}

}  // namespace detail

namespace reference {

// One Transformer-XL step: out = causal attention of the segment over [memory; segment] with the
// relative terms, then the segment's keys and values join the memory. In double.
inline void xl_attention(view<const float, 4> q,  // [B, H, L, D]
                         view<const float, 4> k,  // [B, H, L, D]
                         view<const float, 4> v,  // [B, H, L, Dv]
                         const xl_position& position,
                         kv_memory& memory,   // [B, H, M, D | Dv], in and out
                         view<float, 4> out,  // [B, H, L, Dv]
                         const segment_options& opt = {}) {
  detail::xl_step<true>("memory::reference::xl_attention", q, k, v, position, memory, out, opt);
}

// out = g(x, y), the GTrXL gate, in double.
inline void gtrxl_gate(view<const float, 3> x,  // [B, L, D] the residual stream
                       view<const float, 3> y,  // [B, L, D] the sub-layer's output
                       const gtrxl_weights& w,
                       view<float, 3> out,  // [B, L, D]
                       int threads = 0) {
  const auto d = detail::check_gate("memory::reference::gtrxl_gate", x, y, w, out, threads);
  const auto sigmoid = [](double a) { return 1.0 / (1.0 + std::exp(-a)); };
  parallel_for(d.B * d.L, [&](std::int64_t bt) {
    const std::int64_t b = bt / d.L, t = bt % d.L;
    std::vector<double> r(static_cast<std::size_t>(d.D)), z(r.size()), g(r.size());
    for (std::int64_t o = 0; o < d.D; ++o) {
      double ar = 0, az = 0;
      for (std::int64_t i = 0; i < d.D; ++i) {
        ar += double(y(b, t, i)) * w.w_r(i, o) + double(x(b, t, i)) * w.u_r(i, o);
        az += double(y(b, t, i)) * w.w_z(i, o) + double(x(b, t, i)) * w.u_z(i, o);
      }
      r[o] = sigmoid(ar);
      z[o] = sigmoid(az - w.b_g);
    }
    for (std::int64_t o = 0; o < d.D; ++o) {
      double a = 0;
      for (std::int64_t i = 0; i < d.D; ++i) a += double(y(b, t, i)) * w.w_g(i, o) + r[i] * x(b, t, i) * w.u_g(i, o);
      g[o] = (1 - z[o]) * x(b, t, o) + z[o] * std::tanh(a);
    }
    for (std::int64_t o = 0; o < d.D; ++o) out(b, t, o) = static_cast<float>(g[o]);
  }, threads);
}

// The read alone: attention of q over the memory's keys and values, no mask, no positions (an
// associative read of the stored pairs; the memory does not change). In double.
inline void xl_read(view<const float, 4> q,  // [B, H, Lq, D]
                    const kv_memory& memory,
                    view<float, 4> out,  // [B, H, Lq, Dv]
                    const segment_options& opt = {}) {
  mnemo::detail::require(!memory.empty(), "memory::reference::xl_read: memory is empty (default-constructed)");
  detail::memory_read<true>("memory::reference::xl_read", q, memory.keys(), memory.values(), out, opt);
}

}  // namespace reference

// The read alone (attention::flash); same contract as reference::xl_read.
inline void xl_read(view<const float, 4> q,  // [B, H, Lq, D]
                    const kv_memory& memory,
                    view<float, 4> out,  // [B, H, Lq, Dv]
                    const segment_options& opt = {}) {
  mnemo::detail::require(!memory.empty(), "memory::xl_read: memory is empty (default-constructed)");
  detail::memory_read<false>("memory::xl_read", q, memory.keys(), memory.values(), out, opt);
}

// One Transformer-XL step (attention::flash); same contract as reference::xl_attention.
inline void xl_attention(view<const float, 4> q,  // [B, H, L, D]
                         view<const float, 4> k,  // [B, H, L, D]
                         view<const float, 4> v,  // [B, H, L, Dv]
                         const xl_position& position,
                         kv_memory& memory,   // [B, H, M, D | Dv], in and out
                         view<float, 4> out,  // [B, H, L, Dv]
                         const segment_options& opt = {}) {
  detail::xl_step<false>("memory::xl_attention", q, k, v, position, memory, out, opt);
}

// The GTrXL gate (f32, six GEMMs per batch entry); same contract as reference::gtrxl_gate. out may
// not overlap x or y.
inline void gtrxl_gate(view<const float, 3> x,  // [B, L, D]
                       view<const float, 3> y,  // [B, L, D]
                       const gtrxl_weights& w,
                       view<float, 3> out,  // [B, L, D]
                       int threads = 0) {
  const auto d = detail::check_gate("memory::gtrxl_gate", x, y, w, out, threads);
  using detail::accumulate;
  detail::for_each_item(d.B, threads, true, [&](std::int64_t b) {
    const auto X = detail::as_matrix(x[b]), Y = detail::as_matrix(y[b]);
    detail::matrix r(d.L, d.D), z(d.L, d.D), rx(d.L, d.D), a(d.L, d.D);
    detail::gemm<accumulate::assign>(r, Y, detail::as_matrix(w.w_r));
    detail::gemm<accumulate::add>(r, X, detail::as_matrix(w.u_r));
    detail::gemm<accumulate::assign>(z, Y, detail::as_matrix(w.w_z));
    detail::gemm<accumulate::add>(z, X, detail::as_matrix(w.u_z));
    for (std::int64_t t = 0; t < d.L; ++t)
      for (std::int64_t i = 0; i < d.D; ++i) rx(t, i) = X(t, i) / (1.0f + std::exp(-r(t, i)));
    detail::gemm<accumulate::assign>(a, Y, detail::as_matrix(w.w_g));
    detail::gemm<accumulate::add>(a, rx, detail::as_matrix(w.u_g));
    auto o = detail::as_matrix(out[b]);
    for (std::int64_t t = 0; t < d.L; ++t)
      for (std::int64_t i = 0; i < d.D; ++i) {
        const float zi = 1.0f / (1.0f + std::exp(w.b_g - z(t, i)));
        o(t, i) = (1 - zi) * X(t, i) + zi * std::tanh(a(t, i));
      }
  });
}

}  // namespace mnemo::memory

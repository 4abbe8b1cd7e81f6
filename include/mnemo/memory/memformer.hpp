// mnemo/memory/memformer.hpp — the external slot memory of Memformer (Wu, Lan, Qian, Gu,
// Geramifard & Yu, "Memformer: A Memory-Augmented Transformer for Sequence Modeling",
// arXiv:2010.06891, 2020), and the projected multi-head cross-attention that the slot memories share
// (memformer.hpp, lm2.hpp, reactive.hpp).
//
// Cross-attention with projections (H heads of width Dh = D / H, x W convention):
//   Q = x Wq [Lq, D],  K = c Wk,  V = c Wv [Lk, D]
//   O_h = softmax(Q_h K_h^T / sqrt(Dh)) V_h  per head h (columns h Dh .. (h + 1) Dh)
//   out = [O_1 .. O_H] Wo  [Lq, D]
// Queries never mask: every query sees every key (Lq != Lk allowed, non-causal).
//
// Memformer. A memory of S slots M_t [S, D] per sequence.
//   Read (the encoder's memory cross-attention): every token of the segment attends to the slots,
//     r = CrossAttn_read(x, M_t)                                        [L, D]
//   Write (the memory writer: slot attention). Slot i attends over its own slot and the encoded
//   segment h [L, D] (the slots do not see each other):
//     m'_i = CrossAttn_write(m_i, [m_i; h])                             [D]
//   Forgetting. The paper's two mechanisms, both implemented:
//     - retention: the slot's score against its own key is the softmax's "keep" term; a slot
//       whose own score dominates keeps its (projected) content, one whose segment scores
//       dominate is overwritten by the segment;
//     - Biased Memory Normalization (BMN), the paper's forgetting rule:
//         m''_i = m'_i + b_i,   m'''_i = m''_i / ||m''_i||
//       with a learned bias b [S, D]: repeated writes with little segment information drift
//       every slot towards the terminal direction b_i / ||b_i|| (memformer_options::normalize
//       = false skips the normalisation, an empty bias is b = 0).
//
// Shapes: x, h, r [B, L, D]; memory [B, S, D] (the state, owned by the caller, updated in
// place by memformer_write); every weight [D, D], bias [S, D] or empty.
// Paths: reference:: in double, loop by loop; the fast path runs the projections as Eigen GEMMs
// (one per batch item) and the attention through attention::flash (f32, non-causal). The write's
// own-slot key is one extra key per query: flash returns (O, lse) over the segment and the
// own-slot term joins them by the exact (out, lse) merge of attention/merge.hpp:
//   lse' = log(exp(lse) + exp(s_ii)),  O' = exp(lse - lse') O + exp(s_ii - lse') v_i.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::memory {

// ---------------------------------------------------------------------------------------------
// Projected multi-head cross-attention (shared by the slot memories).

// The four projections of one multi-head attention, each [D, D], applied as x W.
struct attention_projections {
  view<const float, 2> wq = {}, wk = {}, wv = {}, wo = {};  // [D, D] each
};

namespace detail {

inline void check_heads(const char* fn, std::int64_t D, std::int64_t H) {
  mnemo::detail::require(H >= 1 && D % H == 0, fn, ": options.heads must be >= 1 and divide D = ", D, ", got ", H);
}

inline void check_square(const char* fn, const char* name, const view<const float, 2>& w, std::int64_t D) {
  mnemo::detail::require_shape(fn, name, w, {D, D}, " [D, D]");
}

inline void check_projections(const char* fn, const char* name, const attention_projections& w, std::int64_t D) {
  const std::string n(name);
  check_square(fn, (n + ".wq").c_str(), w.wq, D);
  check_square(fn, (n + ".wk").c_str(), w.wk, D);
  check_square(fn, (n + ".wv").c_str(), w.wv, D);
  check_square(fn, (n + ".wo").c_str(), w.wo, D);
}

// Item b of a [B, L, D] view as an [L, D] matrix view.
template <class T>
view<T, 2> batch_item(const view<T, 3>& x, std::int64_t b) {
  return {x.ptr(b), {x.extent(1), x.extent(2)}, {x.extent(1) > 1 ? x.stride(1) : x.extent(2), 1}};
}

// ---- double-precision building blocks of the references ----

using dmatrix = std::vector<double>;  // row-major, sizes passed beside it

// Item b of x as doubles [L, D].
inline dmatrix to_double(const view<const float, 3>& x, std::int64_t b) {
  const std::int64_t L = x.extent(1), D = x.extent(2);
  dmatrix y(static_cast<std::size_t>(L * D));
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t c = 0; c < D; ++c) y[t * D + c] = x(b, t, c);
  return y;
}

// x [L, K] times w [K, N], in double.
inline dmatrix ref_matmul(const dmatrix& x, std::int64_t L, const view<const float, 2>& w) {
  const std::int64_t K = w.extent(0), N = w.extent(1);
  dmatrix y(static_cast<std::size_t>(L * N), 0.0);
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t k = 0; k < K; ++k) {
      const double a = x[t * K + k];
      for (std::int64_t c = 0; c < N; ++c) y[t * N + c] += a * w(k, c);
    }
  return y;
}

inline double ref_sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

// sigmoid, f32 (exp(-a) = inf for a < -88 gives 0, the limit).
template <class Arch>
inline float sigmoid(float a) {
  return 1.0f / (1.0f + simd::exp<Arch>(-a));
}


// O [Lq, D] of H heads: query row i attends over the Lk rows of k, v (and, when self_k is not
// null, over one more key of its own: row i of self_k, self_v), scores scaled by 1/sqrt(Dh).
inline dmatrix ref_heads(const dmatrix& q, std::int64_t Lq, const dmatrix& k, const dmatrix& v, std::int64_t Lk,
                         std::int64_t D, std::int64_t H, const dmatrix* self_k = nullptr,
                         const dmatrix* self_v = nullptr) {
  const std::int64_t Dh = D / H;
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  dmatrix o(static_cast<std::size_t>(Lq * D), 0.0);
  std::vector<double> s(static_cast<std::size_t>(Lk + 1));
  for (std::int64_t i = 0; i < Lq; ++i)
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t c0 = h * Dh;
      auto dot = [&](const dmatrix& a, std::int64_t ra, const dmatrix& b, std::int64_t rb) {
        double acc = 0;
        for (std::int64_t c = c0; c < c0 + Dh; ++c) acc += a[ra * D + c] * b[rb * D + c];
        return acc;
      };
      const std::int64_t n = Lk + (self_k ? 1 : 0);
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < Lk; ++j) m = std::max(m, s[j] = scale * dot(q, i, k, j));
      if (self_k) m = std::max(m, s[Lk] = scale * dot(q, i, *self_k, i));
      double z = 0;
      for (std::int64_t j = 0; j < n; ++j) z += s[j] = std::exp(s[j] - m);
      for (std::int64_t j = 0; j < n; ++j) {
        const double p = s[j] / z;
        const dmatrix& vv = j < Lk ? v : *self_v;
        const std::int64_t row = j < Lk ? j : i;
        for (std::int64_t c = c0; c < c0 + Dh; ++c) o[i * D + c] += p * vv[row * D + c];
      }
    }
  return o;
}

// CrossAttn(x, c) of item b in double: [Lq, D].
inline dmatrix ref_cross_attention(const view<const float, 3>& x, const view<const float, 3>& c, std::int64_t b,
                                   const attention_projections& w, std::int64_t H) {
  const std::int64_t Lq = x.extent(1), Lk = c.extent(1), D = x.extent(2);
  const dmatrix xd = to_double(x, b), cd = to_double(c, b);
  const dmatrix o =
      ref_heads(ref_matmul(xd, Lq, w.wq), Lq, ref_matmul(cd, Lk, w.wk), ref_matmul(cd, Lk, w.wv), Lk, D, H);
  return ref_matmul(o, Lq, w.wo);
}

inline void store_item(const dmatrix& y, const view<float, 3>& out, std::int64_t b) {
  const std::int64_t L = out.extent(1), D = out.extent(2);
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t c = 0; c < D; ++c) out(b, t, c) = static_cast<float>(y[t * D + c]);
}

inline void check_cross_attention(const char* fn, const view<const float, 3>& x, const view<const float, 3>& c,
                                  const attention_projections& w, const view<float, 3>& out, std::int64_t H,
                                  int threads) {
  const std::int64_t B = x.extent(0), Lq = x.extent(1), D = x.extent(2);
  mnemo::detail::require(B >= 1 && Lq >= 1 && D >= 1, fn, ": x must have shape [B, Lq, D] with B, Lq, D >= 1, got ",
                         shape_string(x.shape()));
  mnemo::detail::require(c.extent(0) == B && c.extent(1) >= 1 && c.extent(2) == D, fn,
                         ": context must have shape [", B, ", Lk >= 1, ", D, "] (B, D from x), got ",
                         shape_string(c.shape()));
  mnemo::detail::require_shape(fn, "out", out, {B, Lq, D}, " [B, Lq, D]");
  check_heads(fn, D, H);
  check_projections(fn, "weights", w, D);
  check_threads(fn, threads);
}

// ---- the f32 fast path ----

// Rows per panel below which project_rows does not split an item's rows across threads.
inline constexpr std::int64_t min_panel_rows = 32;

// y[b] = x[b] W for every item b: serial Eigen GEMMs over (item, row panel). One panel per item
// with one thread; with T threads an item's L rows are cut into up to T panels of at least
// min_panel_rows rows, so B = 1 uses the threads too (each panel repacks W: none at 1 thread).
inline void project_rows(const view<const float, 3>& x, const view<const float, 2>& w, const view<float, 3>& y,
                         int threads) {
  const std::int64_t B = x.extent(0), L = x.extent(1);
  const std::int64_t panels =
      std::max<std::int64_t>(1, std::min<std::int64_t>(L / min_panel_rows, resolve_threads(threads)));
  for_each_item(B * panels, threads, true, [&](std::int64_t item) {
    const std::int64_t b = item / panels, p = item % panels, r0 = p * L / panels, r1 = (p + 1) * L / panels;
    auto yb = as_matrix(batch_item(y, b).narrow(0, r0, r1 - r0));
    gemm<accumulate::assign>(yb, as_matrix(batch_item(x, b).narrow(0, r0, r1 - r0)), as_matrix(w));
  });
}

// A [B, L, D] buffer read as [B, H, L, Dh] heads, through strides (no copy).
template <class T>
view<T, 4> as_heads(const view<T, 3>& x, std::int64_t H) {
  const std::int64_t Dh = x.extent(2) / H;
  return {x.data(), {x.extent(0), H, x.extent(1), Dh}, {x.stride(0), Dh, x.stride(1), 1}};
}

// The attention part of CrossAttn before Wo: o [B, Lq, D] (heads side by side) and, when lse is
// not empty, lse [B, H, Lq]; q [B, Lq, D], k, v [B, Lk, D] already projected.
template <class Arch>
void flash_heads(const tensor<float, 3>& q, const tensor<float, 3>& k, const tensor<float, 3>& v, tensor<float, 3>& o,
            view<float, 3> lse, std::int64_t H, int threads) {
  attention::flash<float, attention::mods::none, Arch>(as_heads(cview(q), H), as_heads(cview(k), H),
                                                        as_heads(cview(v), H), as_heads(o.as_view(), H), lse,
                                                        attention::mods::none{}, {.threads = threads});
}

}  // namespace detail

namespace reference {

// out = CrossAttn(x, context) (see the header), in double.
inline void cross_attention(view<const float, 3> x,        // [B, Lq, D] queries
                            view<const float, 3> context,  // [B, Lk, D] keys and values
                            const attention_projections& w,
                            view<float, 3> out,  // [B, Lq, D]
                            std::int64_t heads = 1, int threads = 0) {
  detail::check_cross_attention("memory::reference::cross_attention", x, context, w, out, heads, threads);
  parallel_for(x.extent(0), [&](std::int64_t b) {
    detail::store_item(detail::ref_cross_attention(x, context, b, w, heads), out, b);
  }, threads);
}

}  // namespace reference

// out = CrossAttn(x, context): projections by GEMM, the heads by attention::flash (f32).
template <class Arch = simd::default_arch>
void cross_attention(view<const float, 3> x,        // [B, Lq, D] queries
                     view<const float, 3> context,  // [B, Lk, D] keys and values
                     const attention_projections& w,
                     view<float, 3> out,  // [B, Lq, D]
                     std::int64_t heads = 1, int threads = 0) {
  detail::check_cross_attention("memory::cross_attention", x, context, w, out, heads, threads);
  const std::int64_t B = x.extent(0), Lq = x.extent(1), Lk = context.extent(1), D = x.extent(2);
  tensor<float, 3> q({B, Lq, D}), k({B, Lk, D}), v({B, Lk, D}), o({B, Lq, D});
  detail::project_rows(x, w.wq, q, threads);
  detail::project_rows(context, w.wk, k, threads);
  detail::project_rows(context, w.wv, v, threads);
  detail::flash_heads<Arch>(q, k, v, o, {}, heads, threads);
  detail::project_rows(cview(o), w.wo, out, threads);
}

// ---------------------------------------------------------------------------------------------
// Memformer.

struct memformer_options {
  std::int64_t heads = 1;  // H, divides D
  bool normalize = true;   // BMN's normalisation of every written slot to unit length
  int threads = 0;         // 0: the OpenMP default
};

struct memformer_weights {
  attention_projections read = {};   // the tokens query the slots
  attention_projections write = {};  // each slot queries [its own slot; the encoded segment]
  view<const float, 2> bias = {};    // [S, D] BMN's bias b, or empty (b = 0)
};

namespace detail {

// BMN floor on the norm: a slot of zeros stays zeros instead of 0/0.
inline constexpr double bmn_min_norm = 1e-12;

inline void check_memformer(const char* fn, const view<const float, 3>& x, const view<const float, 3>& memory,
                            const memformer_weights& w, const memformer_options& opt, bool write) {
  const std::int64_t B = memory.extent(0), S = memory.extent(1), D = memory.extent(2);
  mnemo::detail::require(B >= 1 && S >= 1 && D >= 1, fn, ": memory must have shape [B, S, D] with B, S, D >= 1, got ",
                         shape_string(memory.shape()));
  mnemo::detail::require(x.extent(0) == B && x.extent(1) >= 1 && x.extent(2) == D, fn, ": x must have shape [", B,
                         ", L >= 1, ", D, "] (B, D from memory), got ", shape_string(x.shape()));
  check_heads(fn, D, opt.heads);
  check_projections(fn, write ? "weights.write" : "weights.read", write ? w.write : w.read, D);
  if (write && !w.bias.empty()) mnemo::detail::require_shape(fn, "weights.bias", w.bias, {S, D}, " [S, D]");
  check_threads(fn, opt.threads);
}

// m <- (m + b) / ||m + b|| (or only + b), one slot of D values.
template <class T>
void bmn(T* m, const float* bias, std::int64_t D, bool normalize) {
  if (bias)
    for (std::int64_t c = 0; c < D; ++c) m[c] += bias[c];
  if (!normalize) return;
  double ss = 0;
  for (std::int64_t c = 0; c < D; ++c) ss += static_cast<double>(m[c]) * m[c];
  const T inv = static_cast<T>(1.0 / std::max(std::sqrt(ss), bmn_min_norm));
  for (std::int64_t c = 0; c < D; ++c) m[c] *= inv;
}

}  // namespace detail

namespace reference {

// r = CrossAttn_read(x, memory), in double.
inline void memformer_read(view<const float, 3> x,       // [B, L, D]
                           view<const float, 3> memory,  // [B, S, D]
                           const memformer_weights& w,
                           view<float, 3> out,  // [B, L, D]
                           const memformer_options& opt = {}) {
  constexpr const char* fn = "memory::reference::memformer_read";
  detail::check_memformer(fn, x, memory, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  cross_attention(x, memory, w.read, out, opt.heads, opt.threads);
}

// The memory writer (slot attention over [own slot; h]) and BMN, in double; memory in place.
inline void memformer_write(view<const float, 3> h,  // [B, L, D] the encoded segment
                            view<float, 3> memory,   // [B, S, D] in and out
                            const memformer_weights& w, const memformer_options& opt = {}) {
  detail::check_memformer("memory::reference::memformer_write", h, memory, w, opt, true);
  const std::int64_t S = memory.extent(1), L = h.extent(1), D = memory.extent(2);
  parallel_for(memory.extent(0), [&](std::int64_t b) {
    const detail::dmatrix md = detail::to_double(memory, b), hd = detail::to_double(h, b);
    const detail::dmatrix sk = detail::ref_matmul(md, S, w.write.wk), sv = detail::ref_matmul(md, S, w.write.wv);
    const detail::dmatrix o =
        detail::ref_heads(detail::ref_matmul(md, S, w.write.wq), S, detail::ref_matmul(hd, L, w.write.wk),
                          detail::ref_matmul(hd, L, w.write.wv), L, D, opt.heads, &sk, &sv);
    detail::dmatrix m = detail::ref_matmul(o, S, w.write.wo);
    for (std::int64_t i = 0; i < S; ++i)
      detail::bmn(m.data() + i * D, w.bias.empty() ? nullptr : w.bias.ptr(i), D, opt.normalize);
    detail::store_item(m, memory, b);
  }, opt.threads);
}

}  // namespace reference

// r = CrossAttn_read(x, memory) (f32: GEMMs and flash); same contract as reference::memformer_read.
template <class Arch = simd::default_arch>
void memformer_read(view<const float, 3> x,       // [B, L, D]
                    view<const float, 3> memory,  // [B, S, D]
                    const memformer_weights& w,
                    view<float, 3> out,  // [B, L, D]
                    const memformer_options& opt = {}) {
  constexpr const char* fn = "memory::memformer_read";
  detail::check_memformer(fn, x, memory, w, opt, false);
  mnemo::detail::require_shape(fn, "out", out, x.shape(), " [B, L, D]");
  cross_attention<Arch>(x, memory, w.read, out, opt.heads, opt.threads);
}

// The memory writer and BMN (f32: GEMMs, flash over the segment, the own-slot key merged by
// (out, lse)); same contract as reference::memformer_write.
template <class Arch = simd::default_arch>
void memformer_write(view<const float, 3> h,  // [B, L, D] the encoded segment
                     view<float, 3> memory,   // [B, S, D] in and out
                     const memformer_weights& w, const memformer_options& opt = {}) {
  detail::check_memformer("memory::memformer_write", h, memory, w, opt, true);
  const std::int64_t B = memory.extent(0), S = memory.extent(1), L = h.extent(1), D = memory.extent(2), H = opt.heads,
                     Dh = D / H;
  const view<const float, 3> m = memory;
  tensor<float, 3> q({B, S, D}), sk({B, S, D}), sv({B, S, D}), k({B, L, D}), v({B, L, D}), o({B, S, D});
  tensor<float, 3> lse({B, H, S});
  detail::project_rows(m, w.write.wq, q, opt.threads);
  detail::project_rows(m, w.write.wk, sk, opt.threads);
  detail::project_rows(m, w.write.wv, sv, opt.threads);
  detail::project_rows(h, w.write.wk, k, opt.threads);
  detail::project_rows(h, w.write.wv, v, opt.threads);
  detail::flash_heads<Arch>(q, k, v, o, lse, H, opt.threads);
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(Dh)));
  parallel_for(B * S, [&](std::int64_t bi) {
    const std::int64_t b = bi / S, i = bi % S;
    for (std::int64_t hh = 0; hh < H; ++hh) {
      const float* qi = q.data() + (b * S + i) * D + hh * Dh;
      const float* ki = sk.data() + (b * S + i) * D + hh * Dh;
      const float* vi = sv.data() + (b * S + i) * D + hh * Dh;
      float* oi = o.data() + (b * S + i) * D + hh * Dh;
      float s = 0;
      for (std::int64_t c = 0; c < Dh; ++c) s += qi[c] * ki[c];
      s *= scale;
      const float l = lse(b, hh, i), top = std::max(l, s);
      const float merged = top + std::log(std::exp(l - top) + std::exp(s - top));
      const float wa = std::exp(l - merged), ws = std::exp(s - merged);
      for (std::int64_t c = 0; c < Dh; ++c) oi[c] = wa * oi[c] + ws * vi[c];
    }
  }, opt.threads);
  detail::project_rows(cview(o), w.write.wo, memory, opt.threads);
  parallel_for(B * S, [&](std::int64_t bi) {
    const std::int64_t b = bi / S, i = bi % S;
    detail::bmn(memory.ptr(b, i), w.bias.empty() ? nullptr : w.bias.ptr(i), D, opt.normalize);
  }, opt.threads);
}

}  // namespace mnemo::memory

// mnemo/attention/flash_backward.hpp — the FlashAttention-2 backward of attention::flash
// (flash.hpp), and its readable double-precision reference.
//
// Backward (Dao, "FlashAttention-2", 2023, Algorithm 2). With s = f(scale q.k) the score after
// the score mods and P = exp(s - lse) recomputed from the forward lse:
//
//   D_i = rowsum(dO_i o O_i),  dV = P^T dO,  dP = dO V^T,  dS = P o (dP - D) o f'(scale q.k),
//   dQ = scale dS K,           dK = scale dS^T Q
//
// f' is the derivative of the score mods, each mod's score_derivative (mods.hpp): 1 without a
// score mod, 1 - tanh^2(s / c) for softcap, 1 for ALiBi, the chain rule through all_of; a user
// score mod provides `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`, and its
// tile-level score_tile multiplies the derivative into g when given one.
//
// Attention sinks (options.sinks, common.hpp): the sink joins the denominator, so with the
// forward's lse (which includes it) P is already right and the formulas above hold as they are;
// the sink's own gradient, when wanted (dsinks [Hq]), is
//
//   dsink_h = -sum_{b, i} exp(sink_h - lse_i) D_i          (a logit whose value is 0)
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq]; dq like q, dk like k, dv like v (summed over the query heads of a group).
// Any outer strides ([B, L, H, D] buffers through view::permute) are read in place.
//
// How it runs: on the forward's key-major tiles (tiles.hpp), in two passes over the same
// recomputed tiles, dK/dV per (kv head, key tile) and dQ per (query head, query tile), so no two
// threads ever add into the same output and results do not depend on the thread count.
//
// Numerics: f32 products and sums with fused multiply-adds, like the forward. The readable
// double-precision reference is attention::reference_backward (below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"
#include "mnemo/simd/gemm.hpp"

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Score-mod derivatives (for the backward pass).

// True when the backward pass knows d score / d s for every score mod inside M (mods.hpp:
// score_derivative).
template <class M>
inline constexpr bool backward_supported = has_known_derivative<M>;

// {score(s), d score / d s} for one element, through every score mod of m in composition order.
template <class M, class S>
std::pair<S, S> score_and_derivative(const M& m, S s, std::int64_t h, std::int64_t qp, std::int64_t kp) {
  return {mods::score(m, s, h, qp, kp), mods::score_derivative(m, s, h, qp, kp)};
}

// ---------------------------------------------------------------------------------------------
// Reference backward: double precision, one (batch, kv head) at a time, written like the maths.

namespace reference_detail {

template <class Mod>
void backward_group(const dims& d, view<const float, 4> q, view<const float, 4> k, view<const float, 4> v,
                    view<const float, 4> dout, view<float, 4> dq, view<float, 4> dk, view<float, 4> dv,
                    const Mod& mod, const options& opt, std::int64_t b, std::int64_t hk, double* dsinks) {
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const std::int64_t Lk = d.Lk, D = d.D, Dv = d.Dv;
  std::vector<double> s(Lk), ds_dx(Lk), p(Lk), dp(Lk), dq_row(D);
  std::vector<double> dk_acc(Lk * D, 0.0), dv_acc(Lk * Dv, 0.0);
  for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
    for (std::int64_t i = 0; i < d.Lq; ++i) {
      const std::int64_t qp = i + d.offset();
      const float* qi = q.ptr(b, h, i);
      const float* gi = dout.ptr(b, h, i);
      // s_j = f(scale q.k_j), masked -inf; ds_dx = f'
      double m = neg_inf;
      for (std::int64_t j = 0; j < Lk; ++j) {
        s[j] = neg_inf;
        if (!mods::visible(mod, h, qp, j)) continue;
        double dot = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(qi[c]) * static_cast<double>(k(b, hk, j, c));
        std::tie(s[j], ds_dx[j]) = score_and_derivative(mod, static_cast<double>(d.scale) * dot, h, qp, j);
        m = std::max(m, s[j]);
      }
      if (m == neg_inf) {  // no visible key: out = 0, no gradient
        for (std::int64_t c = 0; c < D; ++c) dq(b, h, i, c) = 0.0f;
        continue;
      }
      const double sink = sink_of(opt, h);
      m = std::max(m, sink);
      double sum = std::exp(sink - m);  // the sink joins the denominator (0 without one)
      const double sink_term = sum;
      for (std::int64_t j = 0; j < Lk; ++j) sum += p[j] = s[j] == neg_inf ? 0.0 : std::exp(s[j] - m);
      // P_j, dP_j = dO_i . v_j, D_i = sum_j P_j dP_j (= dO_i . out_i)
      double delta = 0;
      for (std::int64_t j = 0; j < Lk; ++j) {
        p[j] /= sum;
        dp[j] = 0;
        if (p[j] == 0) continue;
        for (std::int64_t c = 0; c < Dv; ++c) dp[j] += static_cast<double>(gi[c]) * static_cast<double>(v(b, hk, j, c));
        delta += p[j] * dp[j];
      }
      if (dsinks) dsinks[h - hk * d.group()] -= sink_term / sum * delta;
      std::fill(dq_row.begin(), dq_row.end(), 0.0);
      for (std::int64_t j = 0; j < Lk; ++j) {
        if (p[j] == 0) continue;
        const double dx = p[j] * (dp[j] - delta) * ds_dx[j] * static_cast<double>(d.scale);  // d/d(q.k)
        for (std::int64_t c = 0; c < D; ++c) {
          dq_row[c] += dx * static_cast<double>(k(b, hk, j, c));
          dk_acc[j * D + c] += dx * static_cast<double>(qi[c]);
        }
        for (std::int64_t c = 0; c < Dv; ++c) dv_acc[j * Dv + c] += p[j] * static_cast<double>(gi[c]);
      }
      for (std::int64_t c = 0; c < D; ++c) dq(b, h, i, c) = static_cast<float>(dq_row[c]);
    }
  }
  for (std::int64_t j = 0; j < Lk; ++j) {
    for (std::int64_t c = 0; c < D; ++c) dk(b, hk, j, c) = static_cast<float>(dk_acc[j * D + c]);
    for (std::int64_t c = 0; c < Dv; ++c) dv(b, hk, j, c) = static_cast<float>(dv_acc[j * Dv + c]);
  }
}

}  // namespace reference_detail

namespace flash_backward_detail {

// Shapes of dout, dq, dk, dv against the validated dims of a backward call.
inline void check_grads(const char* fn, const dims& d, const view<const float, 4>& dout, const view<float, 4>& dq,
                        const view<float, 4>& dk, const view<float, 4>& dv) {
  using mnemo::detail::require;
  using mnemo::detail::require_shape;
  require(!dout.empty() && !dq.empty() && !dk.empty() && !dv.empty(), fn,
          ": dout, dq, dk and dv must all be non-empty views");
  require_shape(fn, "dout", dout, {d.B, d.Hq, d.Lq, d.Dv}, " [B, Hq, Lq, Dv]");
  require_shape(fn, "dq", dq, {d.B, d.Hq, d.Lq, d.D}, " [B, Hq, Lq, D]");
  require_shape(fn, "dk", dk, {d.B, d.Hkv, d.Lk, d.D}, " [B, Hkv, Lk, D]");
  require_shape(fn, "dv", dv, {d.B, d.Hkv, d.Lk, d.Dv}, " [B, Hkv, Lk, Dv]");
}

// dsinks [Hq], wanted only with options.sinks.
inline void check_dsinks(const char* fn, const dims& d, const options& opt, const view<float, 1>& dsinks) {
  if (dsinks.empty()) return;
  mnemo::detail::require(!opt.sinks.empty(), fn, ": dsinks is the gradient of options.sinks, which is empty");
  mnemo::detail::require_shape(fn, "dsinks", dsinks, {d.Hq}, " [Hq]");
}

}  // namespace flash_backward_detail

// Gradients of sum(out * dout) for out = attention(q, k, v) (lse is not differentiated), in
// double precision. dk and dv are summed over the query heads of each kv head's group.
template <class Mod = mods::none>
void reference_backward(view<const float, 4> q,     // [B, Hq, Lq, D]
                        view<const float, 4> k,     // [B, Hkv, Lk, D]
                        view<const float, 4> v,     // [B, Hkv, Lk, Dv]
                        view<const float, 4> dout,  // [B, Hq, Lq, Dv]
                        view<float, 4> dq,          // [B, Hq, Lq, D]
                        view<float, 4> dk,          // [B, Hkv, Lk, D]
                        view<float, 4> dv,          // [B, Hkv, Lk, Dv]
                        const Mod& mod = {}, const options& opt = {},
                        view<float, 1> dsinks = {}) {  // [Hq] or empty: the gradient of options.sinks
  static_assert(backward_supported<Mod>,
                "attention::reference_backward: every score mod needs a derivative: softcap, alibi, all_of of "
                "them, or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::reference_backward";
  const dims d = detail::check_args(fn, q, k, v, dout, view<float, 3>{}, mod, opt);
  flash_backward_detail::check_grads(fn, d, dout, dq, dk, dv);
  flash_backward_detail::check_dsinks(fn, d, opt, dsinks);
  // Per (batch, kv head) the sink gradients of its query heads, summed over the batch in order.
  std::vector<double> ds(static_cast<std::size_t>(d.B * d.Hq), 0.0);
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hkv, hk = bh % d.Hkv;
        reference_detail::backward_group(d, q, k, v, dout, dq, dk, dv, mod, opt, b, hk,
                                         dsinks.empty() ? nullptr : ds.data() + b * d.Hq + hk * d.group());
      },
      opt.threads);
  if (dsinks.empty()) return;
  for (std::int64_t h = 0; h < d.Hq; ++h) {
    double acc = 0;
    for (std::int64_t b = 0; b < d.B; ++b) acc += ds[static_cast<std::size_t>(b * d.Hq + h)];
    dsinks(h) = static_cast<float>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward.

namespace flash_backward_detail {

template <class Mod, class Arch>
struct backward_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q, k, v, out;
  view<const float, 3> lse;
  view<const float, 4> dout;
  view<float, 4> dq, dk, dv;
  const Mod& mod;

  std::int64_t G = d.group(), dp = tiles::round_up(d.D, w), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk, lq_pad = n_qt * bq;
  // Rows that feed whole vectors of B (Q and dO for dK/dV, K for dQ) are used in place when
  // their width is a multiple of the SIMD width, else copied once with zero padding.
  bool q_direct = d.D % w == 0, do_direct = d.Dv % w == 0;

  // Shared, written by the preparation pass: per (b, h, query tile) the packed scale * Q^T and
  // dO^T, lse and D = rowsum(dO o O) padded to whole tiles (lse -inf and D 0 in the padding).
  tensor<float, 1> qt_all{{d.B * d.Hq * lq_pad * d.D}}, dot_all{{d.B * d.Hq * lq_pad * d.Dv}};
  tensor<float, 1> lse_all{{d.B * d.Hq * lq_pad}}, delta_all{{d.B * d.Hq * lq_pad}};
  tensor<float, 1> q_rows{{q_direct ? 0 : d.B * d.Hq * d.Lq * dp}}, do_rows{{do_direct ? 0 : d.B * d.Hq * d.Lq * dvp}},
      k_rows{{q_direct ? 0 : d.B * d.Hkv * d.Lk * dp}};

  tiles::workspace_layout ws_kv{}, ws_q{};
  // pass over key tiles: dK, dV accumulators and three score-shaped tiles
  std::int64_t kv_dk = ws_kv.take(bk * dp), kv_dv = ws_kv.take(bk * dvp), kv_s = ws_kv.take(bk * bq),
               kv_dp = ws_kv.take(bk * bq), kv_g = ws_kv.take(has_score<Mod> ? bk * bq : 0);
  // pass over query tiles: dQ accumulator and three score-shaped tiles
  std::int64_t q_dq = ws_q.take(bq * dp), q_s = ws_q.take(bk * bq), q_dp = ws_q.take(bk * bq),
               q_g = ws_q.take(has_score<Mod> ? bk * bq : 0);

  std::int64_t tile_index(std::int64_t b, std::int64_t h, std::int64_t qt) const { return (b * d.Hq + h) * n_qt + qt; }

  // Row-major operands: pointer to row 0 and the row stride.
  std::pair<const float*, std::int64_t> q_rows_at(std::int64_t b, std::int64_t h, std::int64_t i) const {
    if (q_direct) return {q.ptr(b, h, i), q.stride(2)};
    return {q_rows.data() + ((b * d.Hq + h) * d.Lq + i) * dp, dp};
  }
  std::pair<const float*, std::int64_t> do_rows_at(std::int64_t b, std::int64_t h, std::int64_t i) const {
    if (do_direct) return {dout.ptr(b, h, i), dout.stride(2)};
    return {do_rows.data() + ((b * d.Hq + h) * d.Lq + i) * dvp, dvp};
  }
  std::pair<const float*, std::int64_t> k_rows_at(std::int64_t b, std::int64_t hk, std::int64_t j) const {
    if (q_direct) return {k.ptr(b, hk, j), k.stride(2)};
    return {k_rows.data() + ((b * d.Hkv + hk) * d.Lk + j) * dp, dp};
  }

  // The gradient of head h's sink, after prepare: -sum over (b, i) of exp(sink - lse) D_i, in a
  // fixed order (D_i = dO . O of the row; a row that saw nothing has lse = -inf and adds 0).
  float sink_gradient(std::int64_t h, float sink) const {
    double acc = 0;
    for (std::int64_t b = 0; b < d.B; ++b)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        const std::int64_t at = tile_index(b, h, i / bq) * bq + i % bq;
        const float l = lse_all.data()[at];
        if (l != -std::numeric_limits<float>::infinity())
          acc -= std::exp(static_cast<double>(sink) - l) * static_cast<double>(delta_all.data()[at]);
      }
    return static_cast<float>(acc);
  }

  // Preparation, one (b, h, query tile) per item.
  void prepare(std::int64_t item) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t qt = item % n_qt, h = item / n_qt % d.Hq, b = item / n_qt / d.Hq;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), ti = tile_index(b, h, qt);
    tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, bq, d.D, d.scale, qt_all.data() + ti * d.D * bq, bq);
    tiles::pack_transposed(dout.ptr(b, h, q0), dout.stride(2), qn, bq, d.Dv, 1.0f, dot_all.data() + ti * d.Dv * bq, bq);
    float* lse_t = lse_all.data() + ti * bq;
    float* delta_t = delta_all.data() + ti * bq;
    for (std::int64_t i = 0; i < bq; ++i) {
      lse_t[i] = i < qn ? lse(b, h, q0 + i) : neg_inf;
      double acc = 0;
      for (std::int64_t c = 0; i < qn && c < d.Dv; ++c)
        acc += static_cast<double>(dout(b, h, q0 + i, c)) * static_cast<double>(out(b, h, q0 + i, c));
      delta_t[i] = static_cast<float>(acc);
    }
    for (std::int64_t i = 0; i < qn; ++i) {
      if (!q_direct) std::copy_n(q.ptr(b, h, q0 + i), d.D, q_rows.data() + ((b * d.Hq + h) * d.Lq + q0 + i) * dp);
      if (!do_direct)
        std::copy_n(dout.ptr(b, h, q0 + i), d.Dv, do_rows.data() + ((b * d.Hq + h) * d.Lq + q0 + i) * dvp);
    }
  }

  // K rows with zero padding, one (b, kv head) per item (only when D is not a multiple of w).
  void prepare_k(std::int64_t item) {
    const std::int64_t hk = item % d.Hkv, b = item / d.Hkv;
    for (std::int64_t j = 0; j < d.Lk; ++j)
      std::copy_n(k.ptr(b, hk, j), d.D, k_rows.data() + ((b * d.Hkv + hk) * d.Lk + j) * dp);
  }

  // S^T = f(scale K Q^T) masked, P^T = exp(S^T - lse), dP^T = V dO^T, dS^T = scale P o (dP - D) o f'
  // for keys [k0, k0 + kn) of kv head hk and queries [q0, q0 + qn) of head h. On return s holds
  // P^T and dp holds dS^T (key-major, leading dimension bq).
  void tile_grads(std::int64_t b, std::int64_t h, std::int64_t hk, std::int64_t qt, std::int64_t k0, std::int64_t kn,
                  tile t, float* s, float* dpt, float* g) const {
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    const std::int64_t ti = tile_index(b, h, qt);
    simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, k.ptr(b, hk, k0), k.stride(2),
                                               qt_all.data() + ti * d.D * bq, bq, s, bq, simd::c_mode::overwrite);
    if constexpr (has_score<Mod>) {
      for (std::int64_t j = 0; j < kn; ++j) std::fill_n(g + j * bq, nq, 1.0f);
      tiles::apply_score<Arch>(mod, s, g, bq, kn, qn, nq, k0, qp0, h);
    }
    tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
    simd::probs_from_lse_columns<Arch>(s, bq, kn, nq, lse_all.data() + ti * bq);
    simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.Dv, v.ptr(b, hk, k0), v.stride(2),
                                               dot_all.data() + ti * d.Dv * bq, bq, dpt, bq, simd::c_mode::overwrite);
    simd::softmax_grad_columns<Arch>(s, dpt, bq, kn, nq, delta_all.data() + ti * bq, d.scale,
                                     has_score<Mod> ? g : nullptr);
  }

  std::int64_t kv_items() const { return d.B * d.Hkv * n_kt; }
  std::int64_t q_items() const { return d.B * d.Hq * n_qt; }

  // dK, dV of one (b, kv head, key tile), summed over the group's query heads and all query tiles.
  void run_kv(std::int64_t item, float* work) const {
    const std::int64_t kt = item % n_kt, hk = item / n_kt % d.Hkv, b = item / n_kt / d.Hkv;
    const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
    float* dk_acc = work + kv_dk;
    float* dv_acc = work + kv_dv;
    std::fill_n(dk_acc, bk * dp, 0.0f);
    std::fill_n(dv_acc, bk * dvp, 0.0f);
    for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (std::int64_t qt = 0; qt < n_qt; ++qt) {
        const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), qp0 = q0 + d.offset();
        const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
        if (t == tile::empty) continue;
        float* s = work + kv_s;
        float* dst = work + kv_dp;
        tile_grads(b, h, hk, qt, k0, kn, t, s, dst, work + kv_g);
        const auto [dop, lddo] = do_rows_at(b, h, q0);
        simd::gemm<simd::a_order::row_major, Arch>(kn, dvp, qn, s, bq, dop, lddo, dv_acc, dvp,
                                                   simd::c_mode::accumulate);  // dV += P^T dO
        const auto [qp, ldq] = q_rows_at(b, h, q0);
        simd::gemm<simd::a_order::row_major, Arch>(kn, dp, qn, dst, bq, qp, ldq, dk_acc, dp,
                                                   simd::c_mode::accumulate);  // dK += dS^T Q
      }
    }
    for (std::int64_t j = 0; j < kn; ++j) {
      std::copy_n(dk_acc + j * dp, d.D, dk.ptr(b, hk, k0 + j));
      std::copy_n(dv_acc + j * dvp, d.Dv, dv.ptr(b, hk, k0 + j));
    }
  }

  // dQ of one (b, query head, query tile), summed over all key tiles.
  void run_q(std::int64_t item, float* work) const {
    const std::int64_t qt = n_qt - 1 - item % n_qt, h = item / n_qt % d.Hq, b = item / n_qt / d.Hq;
    const std::int64_t hk = h / G, q0 = qt * bq, qn = std::min(bq, d.Lq - q0), qp0 = q0 + d.offset();
    float* dq_acc = work + q_dq;
    std::fill_n(dq_acc, bq * dp, 0.0f);
    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;
      float* s = work + q_s;
      float* dst = work + q_dp;
      tile_grads(b, h, hk, qt, k0, kn, t, s, dst, work + q_g);
      const auto [kp, ldk] = k_rows_at(b, hk, k0);
      simd::gemm<simd::a_order::col_major, Arch>(qn, dp, kn, dst, bq, kp, ldk, dq_acc, dp,
                                                 simd::c_mode::accumulate);  // dQ += dS K
    }
    for (std::int64_t i = 0; i < qn; ++i) std::copy_n(dq_acc + i * dp, d.D, dq.ptr(b, h, q0 + i));
  }
};

}  // namespace flash_backward_detail

// FlashAttention-2 backward: the gradients of sum(out * dout) with respect to q, k and v, from
// the forward's out and lse (float32 K/V). dk and dv are summed over the query heads of each
// kv head's group. Every score mod needs a known derivative (see backward_supported).
template <class Mod = mods::none, class TuArch = simd::default_arch>
void flash_backward(view<const float, 4> q,     // [B, Hq, Lq, D]
                    view<const float, 4> k,     // [B, Hkv, Lk, D]
                    view<const float, 4> v,     // [B, Hkv, Lk, Dv]
                    view<const float, 4> out,   // [B, Hq, Lq, Dv]  the forward's output
                    view<const float, 3> lse,   // [B, Hq, Lq]      the forward's lse
                    view<const float, 4> dout,  // [B, Hq, Lq, Dv]
                    view<float, 4> dq,          // [B, Hq, Lq, D]
                    view<float, 4> dk,          // [B, Hkv, Lk, D]
                    view<float, 4> dv,          // [B, Hkv, Lk, Dv]
                    const Mod& mod = {}, const options& opt = {},
                    view<float, 1> dsinks = {}) {  // [Hq] or empty: the gradient of options.sinks
  static_assert(backward_supported<Mod>,
                "attention::flash_backward: every score mod needs a derivative: softcap, alibi, all_of of them, "
                "or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::flash_backward";
  const dims d = detail::check_args(fn, q, k, v, out, view<float, 3>{}, mod, opt);
  mnemo::detail::require(!lse.empty(), fn, ": lse must be the forward's lse [B, Hq, Lq], got an empty view");
  mnemo::detail::require_shape(fn, "lse", lse, {d.B, d.Hq, d.Lq}, " [B, Hq, Lq]");
  flash_backward_detail::check_grads(fn, d, dout, dq, dk, dv);
  flash_backward_detail::check_dsinks(fn, d, opt, dsinks);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    flash_backward_detail::backward_plan<Mod, Arch> plan{d, q, k, v, out, lse, dout, dq, dk, dv, mod};
    parallel_for(d.B * d.Hq * plan.n_qt, [&](std::int64_t item) { plan.prepare(item); }, opt.threads);
    if (!dsinks.empty()) parallel_for(d.Hq, [&](std::int64_t h) { dsinks(h) = plan.sink_gradient(h, opt.sinks(h)); }, opt.threads);
    if (!plan.q_direct) parallel_for(d.B * d.Hkv, [&](std::int64_t item) { plan.prepare_k(item); }, opt.threads);
    tiles::run_items(plan.kv_items(), plan.ws_kv.total, opt.threads,
                            [&](std::int64_t item, float* work) { plan.run_kv(item, work); });
    tiles::run_items(plan.q_items(), plan.ws_q.total, opt.threads,
                            [&](std::int64_t item, float* work) { plan.run_q(item, work); });
  });
}

}  // namespace mnemo::attention

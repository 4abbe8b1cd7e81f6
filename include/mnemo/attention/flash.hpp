// mnemo/attention/flash.hpp — tiled attention with online softmax (FlashAttention-2), forward
// and backward, without any Lq x Lk buffer.
//
// Forward (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
// Partitioning", 2023, Algorithm 1). For one query tile Q_t (Bq rows) and every key tile
// K_j, V_j (Bk keys) the tile's mods leave non-empty:
//
//   S   = mods(scale * Q_t K_j^T)            score mods, then the mask (-inf)     [Bq, Bk]
//   m'  = max(m, rowmax S)
//   P   = exp(S - m')
//   l   = exp(m - m') l + rowsum P
//   O   = diag(exp(m - m')) O + P V_j        the accumulator is rescaled once per tile
//
// and at the end out_t = O / l, lse_t = m + log l. A row that never saw a key keeps l = 0 and
// gets out = 0, lse = -inf.
//
// Backward (FlashAttention-2, Algorithm 2). With s = f(scale q.k) the score after the score mods
// and P = exp(s - lse) recomputed from the forward lse:
//
//   D_i = rowsum(dO_i o O_i),  dV = P^T dO,  dP = dO V^T,  dS = P o (dP - D) o f'(scale q.k),
//   dQ = scale dS K,           dK = scale dS^T Q
//
// f' is the derivative of the score mods: 1 without one, 1 - tanh^2(s / c) for softcap, 1 for
// ALiBi, the chain rule through all_of; a user score mod provides
// `S score_derivative(S s, int64 h, int64 qp, int64 kp) const` (see has_score_derivative).
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq]; dq like q, dk like k, dv like v (summed over the query heads of a group).
// Any outer strides ([B, L, H, D] buffers through view::permute) are read in place.
//
// How it runs. Scores are computed key-major, S^T = K Q^T, so that each query is one SIMD lane
// of the score tile and the online softmax is purely vertical (simd/gemm.hpp): Q^T is packed
// once per query tile (with the scale folded in), K and V rows are used where they lie (f32) or
// converted once per key tile (f16/bf16, or a Dv that is not a multiple of the SIMD width).
// Work items are (batch, kv head, query tile): each key tile is loaded once and used by every
// query head of its GQA group. Items are taken from a shared counter, last query tile first
// (causal tiles grow with the query index, so the longest go first); each item is computed the
// same way whichever thread takes it, so results do not depend on the thread count. The
// backward runs two passes over the same recomputed tiles, dK/dV per (kv head, key tile) and
// dQ per (query head, query tile), so no two threads ever add into the same output.
//
// Side output (column_sums, reference.hpp): the column sums of the final probabilities over the
// last `rows` query rows. The online softmax only knows a row's normaliser after its last key
// tile, so the sums are a second sweep over the query tiles that hold summed rows, with the lse
// of the first: P^T = exp(f(scale K Q^T) - lse) per tile (the backward's recompute), summed over
// the tile's summed queries. Work items are (batch, kv head, key tile), so every item owns its
// slice of sums (no atomics, thread-count independent). Cost: one extra K Q^T GEMM per tile of
// summed rows, i.e. about 1/Lq-tiles of the forward for a SnapKV window of <= 64 rows and half a
// forward when every row is summed (H2O); nothing at all when the side output is not wanted.
//
// Numerics: f32 products and sums with fused multiply-adds, exp from simd/math.hpp (1 ulp);
// the forward rescales the accumulator by exp(m - m'), which is exact when the max does not
// change. The readable double-precision references are attention::reference (forward,
// reference.hpp) and attention::reference_backward (below): swap `flash` for `reference`
// to check a surprising result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/gemm.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/vec.hpp"

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
                    const Mod& mod, std::int64_t b, std::int64_t hk) {
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
      if (m == neg_inf) continue;  // no visible key: out = 0, no gradient
      double sum = 0;
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

namespace flash_detail {

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

}  // namespace flash_detail

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
                        const Mod& mod = {}, const options& opt = {}) {
  static_assert(backward_supported<Mod>,
                "attention::reference_backward: every score mod needs a derivative: softcap, alibi, all_of of "
                "them, or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::reference_backward";
  const dims d = detail::check_args(fn, q, k, v, dout, view<float, 3>{}, mod, opt);
  flash_detail::check_grads(fn, d, dout, dq, dk, dv);
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bh) {
        reference_detail::backward_group(d, q, k, v, dout, dq, dk, dv, mod, bh / d.Hkv, bh % d.Hkv);
      },
      opt.threads);
}

// ---------------------------------------------------------------------------------------------
// Forward.

namespace flash_detail {

template <class KV, class Mod, class Arch>
struct forward_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k, v;
  view<float, 4> out;
  view<float, 3> lse;
  const Mod& mod;

  std::int64_t G = d.group(), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk;
  // V rows feed whole vectors of B: in place when they are f32 and a multiple of the width.
  bool v_direct = std::is_same_v<KV, float> && d.Dv % w == 0;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(G * d.D * bq), at_o = ws.take(G * bq * dvp), at_m = ws.take(G * bq),
               at_l = ws.take(G * bq), at_s = ws.take(bk * bq), at_alpha = ws.take(bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D), at_v = v_direct ? 0 : ws.take(bk * dvp);

  std::int64_t items() const { return d.B * d.Hkv * n_qt; }

  // Item -> (b, kv head, query tile), the last query tile first.
  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t qt = n_qt - 1 - item % n_qt, hk = item / n_qt % d.Hkv, b = item / n_qt / d.Hkv;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    float* s = work + at_s;
    float* alpha = work + at_alpha;

    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt + g * d.D * bq, bq);
      std::fill_n(work + at_o + g * bq * dvp, qn * dvp, 0.0f);
      std::fill_n(work + at_m + g * bq, nq, neg_inf);
      std::fill_n(work + at_l + g * bq, nq, 0.0f);
    }

    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;

      const float* kp;
      std::int64_t ldk;
      if constexpr (std::is_same_v<KV, float>) {
        kp = k.ptr(b, hk, k0);
        ldk = k.stride(2);
      } else {
        for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(k.ptr(b, hk, k0 + j), work + at_k + j * d.D, d.D);
        kp = work + at_k;
        ldk = d.D;
      }
      const float* vp = work + at_v;
      std::int64_t ldv = dvp;
      if constexpr (std::is_same_v<KV, float>) {
        if (v_direct) {
          vp = v.ptr(b, hk, k0);
          ldv = v.stride(2);
        }
      }
      if (!v_direct) {  // the padding columns [Dv, dvp) stay 0 from the zeroed workspace
        for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(v.ptr(b, hk, k0 + j), work + at_v + j * dvp, d.Dv);
      }

      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h = hk * G + g;
        simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, work + at_qt + g * d.D * bq, bq, s, bq,
                                                   simd::c_mode::overwrite);
        tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
        tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
        simd::online_softmax_columns<Arch>(s, bq, kn, nq, work + at_m + g * bq, work + at_l + g * bq, alpha);
        simd::gemm<simd::a_order::col_major, Arch>(qn, dvp, kn, s, bq, vp, ldv, work + at_o + g * bq * dvp, dvp,
                                                   simd::c_mode::rescale, alpha);
      }
    }

    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      const float* o = work + at_o + g * bq * dvp;
      const float* m = work + at_m + g * bq;
      const float* l = work + at_l + g * bq;
      for (std::int64_t i = 0; i < qn; ++i) {
        float* oi = out.ptr(b, h, q0 + i);
        if (l[i] == 0.0f) {  // no visible key
          std::fill_n(oi, d.Dv, 0.0f);
          if (!lse.empty()) lse(b, h, q0 + i) = neg_inf;
          continue;
        }
        const float inv = 1.0f / l[i];
        for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = o[i * dvp + c] * inv;
        if (!lse.empty()) lse(b, h, q0 + i) = m[i] + std::log(l[i]);
      }
    }
  }
};

// The side output: column sums of P over the summed rows [first, Lq), from the forward's lse.
template <class KV, class Mod, class Arch>
struct column_sums_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k;
  view<const float, 3> lse;  // [B, Hq, Lq] of the forward
  const Mod& mod;
  view<float, 3> sums;  // [B, Hq, Lk]
  std::int64_t first;   // first summed query row

  std::int64_t n_kt = (d.Lk + bk - 1) / bk, qt_first = first / bq, n_qt = (d.Lq + bq - 1) / bq;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(d.D * bq), at_s = ws.take(bk * bq), at_lse = ws.take(bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D);

  std::int64_t items() const { return d.B * d.Hkv * n_kt; }

  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t kt = item % n_kt, hk = item / n_kt % d.Hkv, b = item / n_kt / d.Hkv;
    const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
    const float* kp;
    std::int64_t ldk;
    if constexpr (std::is_same_v<KV, float>) {
      kp = k.ptr(b, hk, k0);
      ldk = k.stride(2);
    } else {
      for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(k.ptr(b, hk, k0 + j), work + at_k + j * d.D, d.D);
      kp = work + at_k;
      ldk = d.D;
    }
    float* s = work + at_s;
    float* lse_t = work + at_lse;
    for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
      float* out = sums.ptr(b, h, k0);
      std::fill_n(out, kn, 0.0f);
      for (std::int64_t qt = qt_first; qt < n_qt; ++qt) {
        const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w);
        const std::int64_t qp0 = q0 + d.offset();
        const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
        if (t == tile::empty) continue;
        // Rows before `first` and the padding get lse = -inf, hence p = 0.
        for (std::int64_t i = 0; i < nq; ++i) lse_t[i] = i < qn && q0 + i >= first ? lse(b, h, q0 + i) : neg_inf;
        tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt, bq);
        simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, work + at_qt, bq, s, bq,
                                                   simd::c_mode::overwrite);
        tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
        tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
        simd::probs_from_lse_columns<Arch>(s, bq, kn, nq, lse_t);
        for (std::int64_t j = 0; j < kn; ++j) out[j] += simd::reduce_sum<Arch>(s + j * bq, nq);
      }
    }
  }
};

// The forward (and the column sums when wanted) for one Arch, on validated arguments.
template <class KV, class Mod, class Arch>
void forward(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
             view<float, 3> lse, const Mod& mod, const options& opt, const column_sums& cs) {
  if (!cs.wanted()) {
    const forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, lse, mod};
    tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run(item, work); });
    return;
  }
  // The sums need every summed row's lse: the caller's, or one of our own.
  tensor<float, 3> own_lse(lse.empty() ? shape_t<3>{d.B, d.Hq, d.Lq} : shape_t<3>{0, 0, 0});
  const view<float, 3> lse_used = lse.empty() ? own_lse.as_view() : lse;
  const forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, lse_used, mod};
  tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                   [&](std::int64_t item, float* work) { plan.run(item, work); });
  const column_sums_plan<KV, Mod, Arch> sums_plan{d, q, k, lse_used, mod, cs.sums, cs.first_row(d.Lq)};
  tiles::run_items(sums_plan.items(), sums_plan.ws.total, opt.threads,
            [&](std::int64_t item, float* work) { sums_plan.run(item, work); });
}

}  // namespace flash_detail

// FlashAttention-2 forward. K/V elements may be float, f16 or bf16; out and lse as in
// attention::reference, to float32 accuracy. `cs`: the optional column sums of the probabilities
// (reference.hpp); not wanted by default, and then nothing of it runs. Runs at the ISA level
// opt.isa asks for (simd/dispatch.hpp: by default $MNEMO_ISA or the best the CPU has).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void flash(view<const float, 4> q,   // [B, Hq, Lq, D]
           view<const KV, 4> k,      // [B, Hkv, Lk, D]
           view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
           view<float, 4> out,       // [B, Hq, Lq, Dv]
           view<float, 3> lse = {},  // [B, Hq, Lq] or empty
           const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  constexpr const char* fn = "attention::flash";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  detail::check_column_sums(fn, d, cs);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() { flash_detail::forward<KV, Mod, Arch>(d, q, k, v, out, lse, mod, opt, cs); });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void flash(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
           const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  flash<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, lse, mod, opt, cs);
}

// ---------------------------------------------------------------------------------------------
// Backward.

namespace flash_detail {

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

}  // namespace flash_detail

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
                    const Mod& mod = {}, const options& opt = {}) {
  static_assert(backward_supported<Mod>,
                "attention::flash_backward: every score mod needs a derivative: softcap, alibi, all_of of them, "
                "or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::flash_backward";
  const dims d = detail::check_args(fn, q, k, v, out, view<float, 3>{}, mod, opt);
  mnemo::detail::require(!lse.empty(), fn, ": lse must be the forward's lse [B, Hq, Lq], got an empty view");
  mnemo::detail::require_shape(fn, "lse", lse, {d.B, d.Hq, d.Lq}, " [B, Hq, Lq]");
  flash_detail::check_grads(fn, d, dout, dq, dk, dv);

  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    flash_detail::backward_plan<Mod, Arch> plan{d, q, k, v, out, lse, dout, dq, dk, dv, mod};
    parallel_for(d.B * d.Hq * plan.n_qt, [&](std::int64_t item) { plan.prepare(item); }, opt.threads);
    if (!plan.q_direct) parallel_for(d.B * d.Hkv, [&](std::int64_t item) { plan.prepare_k(item); }, opt.threads);
    tiles::run_items(plan.kv_items(), plan.ws_kv.total, opt.threads,
                            [&](std::int64_t item, float* work) { plan.run_kv(item, work); });
    tiles::run_items(plan.q_items(), plan.ws_q.total, opt.threads,
                            [&](std::int64_t item, float* work) { plan.run_q(item, work); });
  });
}

}  // namespace mnemo::attention

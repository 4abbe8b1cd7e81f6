// mnemo/attention/approx/aaren.hpp — Aaren: attention as a many-to-many RNN (Feng, Tung, Hajimirsadeghi,
// Bengio, Ahmed, "Attention as an RNN", 2024). Exact, not an approximation: the prefix outputs of
// softmax attention for one query per head, computed by an associative scan.
//
//   s_t   = scale q . k_t                                 one query q per head (Aaren's learned query)
//   out_t = sum_{j <= t} exp(s_j) v_j / sum_{j <= t} exp(s_j)       t = 0 .. L-1
//   lse_t = log sum_{j <= t} exp(s_j)
// i.e. causal attention in which every row has the same query. The state of a prefix is (m, u, w):
//   m = max_j s_j,  u = sum_j exp(s_j - m),  w = sum_j exp(s_j - m) v_j    (out = w / u, lse = m + log u)
// and two adjacent pieces merge with the associative operator of the paper (section 3.2):
//   (m_a, u_a, w_a) (+) (m_b, u_b, w_b) = (m, u_a e^{m_a - m} + u_b e^{m_b - m}, w_a e^{m_a - m} + w_b e^{m_b - m}),
//   m = max(m_a, m_b);  the identity is (-inf, 0, 0).
// The RNN form applies (+) one token at a time (reference::aaren, in double). The parallel form is
// the prefix scan of (+) over the tokens; here blocked (the usual three-phase scan): every block of
// options.block tokens scans its own tokens (inclusive, local), the carries into the blocks are a
// short serial scan of the block totals per head, and every block merges its carry into its local
// states. Phases 1 and 3 run in parallel over (batch, head, block), phase 2 over (batch, head).
// Work O(L (D + Dv)) per head, like the RNN; depth O(L / P + blocks).
//
// Shapes: q [B, Hq, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv], out [B, Hq, L, Dv], lse [B, Hq, L]
// (optional), f32; query head h reads kv head h / (Hq / Hkv). Checked as attention with q broadcast
// over L (a stride-0 view), so the argument rules are those of attention::flash with the causal mask,
// which is what this computes (the tests compare the two).
// Numerics: float, exp(-inf) = 0 for the identity; a block's local state is rescaled at every new
// maximum, as the online softmax does, so nothing overflows.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/approx/common.hpp"
#include "mnemo/core/parallel.hpp"

namespace mnemo::attention::approx {

struct aaren_options {
  std::int64_t block = 256;  // tokens per scan block (>= 1): the unit of parallel work
  float scale = 0;           // 0: 1 / sqrt(D)
  int threads = 0;           // 0: the OpenMP default
};

namespace detail {

// q [B, Hq, D] seen as [B, Hq, L, D] with stride 0 along L (the same query at every row).
inline view<const float, 4> broadcast_query(const view<const float, 3>& q, std::int64_t L) {
  return {q.data(), {q.extent(0), q.extent(1), L, q.extent(2)}, {q.stride(0), q.stride(1), 0, 1}};
}

inline dims check_aaren(const char* fn, const view<const float, 3>& q, const view<const float, 4>& k,
                        const view<const float, 4>& v, const view<float, 4>& out, const view<float, 3>& lse,
                        const aaren_options& opt) {
  mnemo::detail::require_data(fn, "q", q, " [B, Hq, D]");
  mnemo::detail::require(k.extent(2) == out.extent(2), fn, ": out.shape[2] must equal L = k.shape[2] = ", k.extent(2),
                         ", got ", out.extent(2));
  options o;
  o.scale = opt.scale;
  o.threads = opt.threads;
  const dims d = attention::detail::check_args(fn, broadcast_query(q, k.extent(2)), k, v, out, lse, mods::none{}, o);
  mnemo::detail::require(opt.block >= 1, fn, ": options.block must be >= 1, got ", opt.block);
  return d;
}

}  // namespace detail

namespace reference {

// Aaren's RNN form in double: (+) applied one token at a time.
inline void aaren(view<const float, 3> q,  // [B, Hq, D]
                  view<const float, 4> k,  // [B, Hkv, L, D]
                  view<const float, 4> v,  // [B, Hkv, L, Dv]
                  view<float, 4> out,      // [B, Hq, L, Dv]
                  view<float, 3> lse = {},  // [B, Hq, L] or empty
                  const aaren_options& opt = {}) {
  const dims d = detail::check_aaren("approx::reference::aaren", q, k, v, out, lse, opt);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        double m = -std::numeric_limits<double>::infinity(), u = 0;
        std::vector<double> w(static_cast<std::size_t>(d.Dv), 0.0);
        for (std::int64_t t = 0; t < d.Lk; ++t) {
          double s = 0;
          for (std::int64_t c = 0; c < d.D; ++c) s += static_cast<double>(q(b, h, c)) * k(b, hk, t, c);
          s *= d.scale;
          const double mn = std::max(m, s), alpha = std::exp(m - mn), beta = std::exp(s - mn);
          u = u * alpha + beta;
          for (std::int64_t c = 0; c < d.Dv; ++c) w[static_cast<std::size_t>(c)] = w[static_cast<std::size_t>(c)] * alpha + beta * v(b, hk, t, c);
          m = mn;
          for (std::int64_t c = 0; c < d.Dv; ++c) out(b, h, t, c) = static_cast<float>(w[static_cast<std::size_t>(c)] / u);
          if (!lse.empty()) lse(b, h, t) = static_cast<float>(m + std::log(u));
        }
      },
      opt.threads);
}

}  // namespace reference

// Aaren's parallel form: the blocked prefix scan of (+) (see the header). out and lse written in full.
inline void aaren(view<const float, 3> q,   // [B, Hq, D]
                  view<const float, 4> k,   // [B, Hkv, L, D]
                  view<const float, 4> v,   // [B, Hkv, L, Dv]
                  view<float, 4> out,       // [B, Hq, L, Dv]
                  view<float, 3> lse = {},  // [B, Hq, L] or empty
                  const aaren_options& opt = {}) {
  const dims d = detail::check_aaren("approx::aaren", q, k, v, out, lse, opt);
  const std::int64_t L = d.Lk, nb = (L + opt.block - 1) / opt.block, heads = d.B * d.Hq;
  if (L == 0 || heads == 0) return;
  constexpr float minus_inf = -std::numeric_limits<float>::infinity();
  // Local states: m and u per token (w lives in out until the end); carries into each block.
  std::vector<float> ms(static_cast<std::size_t>(heads * L)), us(static_cast<std::size_t>(heads * L));
  std::vector<float> cm(static_cast<std::size_t>(heads * nb)), cu(static_cast<std::size_t>(heads * nb));
  std::vector<float> cw(static_cast<std::size_t>(heads * nb * d.Dv));
  using row = Eigen::Map<Eigen::RowVectorXf>;
  using crow = Eigen::Map<const Eigen::RowVectorXf>;
  // Phase 1: the inclusive scan of every block on its own.
  parallel_for(
      heads * nb,
      [&](std::int64_t item) {
        const std::int64_t bh = item / nb, blk = item % nb, b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        const std::int64_t t0 = blk * opt.block, t1 = std::min(L, t0 + opt.block);
        const crow qv(q.ptr(b, h, 0), d.D);
        float m = minus_inf, u = 0;
        for (std::int64_t t = t0; t < t1; ++t) {
          const float s = d.scale * qv.dot(crow(k.ptr(b, hk, t, 0), d.D));
          const float mn = std::max(m, s), alpha = std::exp(m - mn), beta = std::exp(s - mn);
          u = u * alpha + beta;
          row w(out.ptr(b, h, t, 0), d.Dv);
          const crow vt(v.ptr(b, hk, t, 0), d.Dv);
          if (t == t0) w = beta * vt;
          else w = alpha * row(out.ptr(b, h, t - 1, 0), d.Dv) + beta * vt;
          m = mn;
          ms[static_cast<std::size_t>(bh * L + t)] = m;
          us[static_cast<std::size_t>(bh * L + t)] = u;
        }
      },
      opt.threads);
  // Phase 2: the carry into block blk is the merge of the totals of blocks 0 .. blk-1.
  parallel_for(
      heads,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq;
        float m = minus_inf, u = 0;
        Eigen::RowVectorXf w = Eigen::RowVectorXf::Zero(d.Dv);
        for (std::int64_t blk = 0; blk < nb; ++blk) {
          const std::size_t at = static_cast<std::size_t>(bh * nb + blk);
          cm[at] = m;  // the exclusive prefix: blocks 0 .. blk-1
          cu[at] = u;
          row(cw.data() + at * d.Dv, d.Dv) = w;
          if (blk + 1 == nb) break;
          const std::int64_t last = std::min(L, (blk + 1) * opt.block) - 1;  // block blk's total
          const float ml = ms[static_cast<std::size_t>(bh * L + last)], ul = us[static_cast<std::size_t>(bh * L + last)];
          const float mn = std::max(m, ml), alpha = std::exp(m - mn), beta = std::exp(ml - mn);
          u = u * alpha + ul * beta;
          w = alpha * w + beta * crow(out.ptr(b, h, last, 0), d.Dv);
          m = mn;
        }
      },
      opt.threads);
  // Phase 3: merge each block's carry into its local states and normalise.
  parallel_for(
      heads * nb,
      [&](std::int64_t item) {
        const std::int64_t bh = item / nb, blk = item % nb, b = bh / d.Hq, h = bh % d.Hq;
        const std::int64_t t0 = blk * opt.block, t1 = std::min(L, t0 + opt.block);
        const std::size_t at = static_cast<std::size_t>(bh * nb + blk);
        const float mc = cm[at], uc = cu[at];
        const crow wc(cw.data() + at * d.Dv, d.Dv);
        for (std::int64_t t = t0; t < t1; ++t) {
          const float mt = ms[static_cast<std::size_t>(bh * L + t)], ut = us[static_cast<std::size_t>(bh * L + t)];
          const float mn = std::max(mc, mt), alpha = std::exp(mc - mn), beta = std::exp(mt - mn);
          const float u = uc * alpha + ut * beta;
          row w(out.ptr(b, h, t, 0), d.Dv);
          if (blk == 0) w *= 1.0f / u;
          else w = (alpha * wc + beta * w) / u;
          if (!lse.empty()) lse(b, h, t) = mn + std::log(u);
        }
      },
      opt.threads);
}

}  // namespace mnemo::attention::approx

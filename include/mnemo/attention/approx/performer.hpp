// mnemo/attention/approx/performer.hpp — Performer / FAVOR+ attention (Choromanski et al., "Rethinking
// Attention with Performers", ICLR 2021): softmax attention approximated with positive orthogonal
// random features, in time linear in L.
//
//   x' = sqrt(scale) x                        (so q' . k' = scale q . k)
//   phi(x)_r = exp(w_r . x' - |x'|^2 / 2) / sqrt(m),   r = 1..m,  E[phi(q) . phi(k)] = exp(scale q . k)
//   W [m, D]: orthogonal blocks of Gaussian rows with chi_D norms (common.hpp, orthogonal_features),
//            drawn from options.seed: deterministic, the same W for every head
//   non-causal:  out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))
//   causal:      the same sums over the keys j <= i + Lk - Lq only (prefix sums; bottom-right aligned
//                as every mnemo mask)
//
// Numerical stabilisation (the paper's released code does the same): a query's features are shifted
// by that row's largest logit a_i = max_r (w_r . q_i' - |q_i'|^2 / 2), the keys' by one constant
// c = the largest logit over all keys of the head and all features. Each shift multiplies a row's
// numerator and denominator alike, so the result is unchanged while exp never overflows; features of
// keys more than ~87 below c underflow to 0 in float (their share is below 2^-126 of the largest).
// Causal rows use the same c (set by all keys, past and future): still exact, only the underflow
// threshold depends on later keys. A row whose denominator is 0 (no visible key) gets out = 0.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv] (GQA: query
// head h reads kv head h / (Hq / Hkv)), f32. No lse (the approximation has no normaliser of its own),
// no sinks, no masks but causal.
//
// reference::performer: the same estimator in double, written as the quadratic sum
// out_i = sum_j kappa_ij v_j / sum_j kappa_ij with kappa_ij = phi(q_i) . phi(k_j) over the visible j
// (so it checks the prefix sums too), O(Lq Lk m). The fast path: per head, Phi_K [Lk, m] once
// (Eigen GEMM + vectorised exp), S = Phi_K^T V and z = Phi_K^T 1, then query chunks of `chunk` rows:
// out = Phi_Q S / Phi_Q z; causal chunks add their triangle Phi_Q Phi_K[lo, hi)^T (masked) times V
// to the prefix S of the keys every row of the chunk sees (the chunked form of linear attention).
// Cost O((Lq + Lk) m (D + Dv)); threads over (batch, head).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/attention/approx/common.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"

namespace mnemo::attention::approx {

struct performer_options {
  std::int64_t features = 256;  // m, the number of random features (>= 1; more: smaller error)
  std::uint64_t seed = 0;       // W = orthogonal_features(features, D, seed)
  bool causal = false;          // prefix sums: row i sees keys j <= i + Lk - Lq
  float scale = 0;              // 0: 1 / sqrt(D)
  int threads = 0;              // 0: the OpenMP default
};

namespace detail {

inline dims check_performer(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                            const view<const float, 4>& v, const view<float, 4>& out, const performer_options& opt) {
  const dims d = check_qkv(fn, q, k, v, out, opt.scale, opt.threads);
  mnemo::detail::require(opt.features >= 1, fn, ": options.features (m) must be >= 1, got ", opt.features);
  return d;
}

// Query rows per chunk of the fast path (the causal triangle is chunk x chunk).
inline constexpr std::int64_t performer_chunk = 128;

// Keys [0, e) are visible to query row i of a call: e = clamp(i + Lk - Lq + 1, 0, Lk) (causal).
inline std::int64_t visible_end(const dims& d, bool causal, std::int64_t i) {
  return causal ? std::clamp<std::int64_t>(i + d.offset() + 1, 0, d.Lk) : d.Lk;
}

}  // namespace detail

namespace reference {

// FAVOR+ in double, as the quadratic sum of kernel estimates (see the header).
inline void performer(view<const float, 4> q,  // [B, Hq, Lq, D]
                      view<const float, 4> k,  // [B, Hkv, Lk, D]
                      view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                      view<float, 4> out,      // [B, Hq, Lq, Dv]
                      const performer_options& opt = {}) {
  constexpr const char* fn = "approx::reference::performer";
  const dims d = detail::check_performer(fn, q, k, v, out, opt);
  const tensor<float, 2> w = orthogonal_features(opt.features, d.D, opt.seed);
  const std::int64_t m = opt.features;
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        double c = 0;
        const std::vector<double> pk =
            detail::reference_features(k.ptr(b, hk, 0, 0), d.Lk, k.stride(2), w, d.scale, false, &c);
        std::vector<double> a(static_cast<std::size_t>(d.Lq));
        const std::vector<double> pq =
            detail::reference_features(q.ptr(b, h, 0, 0), d.Lq, q.stride(2), w, d.scale, true, a.data());
        std::vector<double> acc(static_cast<std::size_t>(d.Dv));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          std::fill(acc.begin(), acc.end(), 0.0);
          double den = 0;
          const std::int64_t e = detail::visible_end(d, opt.causal, i);
          for (std::int64_t j = 0; j < e; ++j) {
            double kappa = 0;
            for (std::int64_t r = 0; r < m; ++r) kappa += pq[static_cast<std::size_t>(i * m + r)] * pk[static_cast<std::size_t>(j * m + r)];
            den += kappa;
            const float* vj = v.ptr(b, hk, j, 0);
            for (std::int64_t c2 = 0; c2 < d.Dv; ++c2) acc[static_cast<std::size_t>(c2)] += kappa * vj[c2];
          }
          float* oi = out.ptr(b, h, i, 0);
          for (std::int64_t c2 = 0; c2 < d.Dv; ++c2) oi[c2] = den > 0 ? static_cast<float>(acc[static_cast<std::size_t>(c2)] / den) : 0.0f;
        }
      },
      opt.threads);
}

}  // namespace reference

// FAVOR+ attention, f32 (see the header). out is written in full.
inline void performer(view<const float, 4> q,  // [B, Hq, Lq, D]
                      view<const float, 4> k,  // [B, Hkv, Lk, D]
                      view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                      view<float, 4> out,      // [B, Hq, Lq, Dv]
                      const performer_options& opt = {}) {
  using detail::matrix;
  constexpr const char* fn = "approx::performer";
  const dims d = detail::check_performer(fn, q, k, v, out, opt);
  const tensor<float, 2> wt = orthogonal_features(opt.features, d.D, opt.seed);
  const matrix w = Eigen::Map<const matrix>(wt.data(), opt.features, d.D);
  const std::int64_t m = opt.features, C = detail::performer_chunk;
  mnemo::detail::for_each_item(d.B * d.Hq, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
    if (d.Lq == 0) return;
    const auto K = detail::head_rows(k, b, hk);
    const auto V = detail::head_rows(v, b, hk);
    const auto Q = detail::head_rows(q, b, h);
    auto O = detail::head_rows(out, b, h);
    matrix pk, pq, s = matrix::Zero(m, d.Dv), tri;
    Eigen::RowVectorXf z = Eigen::RowVectorXf::Zero(m);
    Eigen::VectorXf den;
    std::vector<float> a(static_cast<std::size_t>(C));
    detail::key_features(K, w, d.scale, pk);
    std::int64_t done = 0;  // keys [0, done) are in s and z
    if (!opt.causal) {
      mnemo::detail::gemm<mnemo::detail::accumulate::assign>(s, pk.transpose(), V);
      z = pk.colwise().sum();
      done = d.Lk;
    }
    for (std::int64_t i0 = 0; i0 < d.Lq; i0 += C) {
      const std::int64_t n = std::min(C, d.Lq - i0);
      const std::int64_t lo = detail::visible_end(d, opt.causal, i0), hi = detail::visible_end(d, opt.causal, i0 + n - 1);
      if (lo > done) {  // keys every row of this chunk sees join the prefix
        mnemo::detail::gemm<mnemo::detail::accumulate::add>(s, pk.middleRows(done, lo - done).transpose(),
                                                            V.middleRows(done, lo - done));
        z += pk.middleRows(done, lo - done).colwise().sum();
        done = lo;
      }
      detail::query_features(Q.middleRows(i0, n), w, d.scale, pq, a.data());
      auto On = O.middleRows(i0, n);
      mnemo::detail::gemm<mnemo::detail::accumulate::assign>(On, pq, s);
      den = pq * z.transpose();
      if (hi > lo) {  // the causal triangle: row i0 + t sees keys [lo, e_t)
        tri.resize(n, hi - lo);
        tri.noalias() = pq * pk.middleRows(lo, hi - lo).transpose();
        for (std::int64_t t = 0; t < n; ++t) {
          const std::int64_t e = detail::visible_end(d, true, i0 + t);
          tri.row(t).tail(hi - std::max(e, lo)).setZero();
        }
        mnemo::detail::gemm<mnemo::detail::accumulate::add>(On, tri, V.middleRows(lo, hi - lo));
        den += tri.rowwise().sum();
      }
      for (std::int64_t t = 0; t < n; ++t) {
        if (den(t) > 0) On.row(t) /= den(t);
        else On.row(t).setZero();
      }
    }
  });
}

}  // namespace mnemo::attention::approx

// mnemo/attention/approx/routing.hpp — Routing Transformer attention: online k-means on queries
// and keys, each query attends to the keys of its own cluster.
//
// Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention with Routing
// Transformers", TACL 2021. Per kv head hk there are C centroids mu_c (unit vectors, [Hkv, C, D]),
// shared by the queries of the head's G query heads and by its keys:
//
//   c(x)    = argmax_c mu_c . x / |x|           (ties: the lower c; x = 0 goes to cluster 0)
//   out_i   = sum_{j in S_i} softmax_{S_i}(scale q_i . k_j) v_j
//   S_i     = { j : c(k_j) = c(q_i) }           and j <= i + Lk - Lq when causal
//   lse_i   = log sum_{j in S_i} exp(scale q_i . k_j)
//
// A query whose cluster holds no visible key gets out = 0, lse = -inf (as every mnemo kernel).
// With C = 1 every query sees every (visible) key: exact attention.
//
// Centroid update (the paper's mini-batch k-means, section 4.1), one step per batch of q and k,
// on unit-normalised rows x^ = x / |x|:
//
//   mu_c <- lambda mu_c + (1 - lambda) / 2 * ( sum_{q: c(q) = c} q^ + sum_{k: c(k) = c} k^ )
//   mu_c <- mu_c / |mu_c|                       (kept as is if it came out 0)
//
// summed over the batch entries, the G query heads and the rows; lambda = 0.999 in the paper.
// Centroids start as unit Gaussian directions from a seed (approx/positions.hpp random_stream),
// so the same seed gives the same state on every machine.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq]; clusters of rows [B, H, L] (int64). K/V are float.
//
// Fast path: assignments with f32 dot products; then per (batch, kv head, cluster) the cluster's
// keys and values are gathered once into contiguous rows, and for each query head of the group its
// queries of that cluster too; attention::flash runs on the gathered rows with the causal mask on
// original positions (approx::position_mask) and the rows are scattered back. Work: about
// Lq * Lk / C pairs instead of Lq * Lk for balanced clusters. Work items (batch, kv head, cluster)
// are spread over threads; each flash call inside is serial, so results do not depend on the
// thread count.
//
// Numerics: the reference assigns with double dot products; the fast path with f32 ones, so a row
// whose two best centroids are within f32 rounding may land in the other cluster (tests use data
// without such near-ties). Within a cluster the fast path is flash (f32, online softmax).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/approx/positions.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention::approx {

// The k-means state: unit centroids per kv head.
struct routing_state {
  tensor<float, 3> centroids;  // [Hkv, C, D]

  std::int64_t heads() const { return centroids.extent(0); }
  std::int64_t clusters() const { return centroids.extent(1); }
  std::int64_t dim() const { return centroids.extent(2); }
};

// C unit Gaussian directions per kv head, from `seed`.
inline routing_state routing_init(std::int64_t Hkv, std::int64_t C, std::int64_t D, std::uint64_t seed) {
  constexpr const char* fn = "approx::routing_init";
  mnemo::detail::require(Hkv >= 1 && C >= 1 && D >= 1, fn, ": Hkv, C (clusters) and D must be >= 1, got Hkv=", Hkv,
                         ", C=", C, ", D=", D);
  routing_state st{tensor<float, 3>({Hkv, C, D})};
  for (std::int64_t h = 0; h < Hkv; ++h)
    for (std::int64_t c = 0; c < C; ++c) {
      sparse_detail::random_stream rng(seed, static_cast<std::uint64_t>(h * C + c));
      std::vector<double> x(static_cast<std::size_t>(D));
      double n2 = 0;
      for (double& e : x) {
        e = rng.normal();
        n2 += e * e;
      }
      const double inv = n2 > 0 ? 1.0 / std::sqrt(n2) : 0.0;
      for (std::int64_t e = 0; e < D; ++e) st.centroids(h, c, e) = static_cast<float>(x[static_cast<std::size_t>(e)] * inv);
    }
  return st;
}

namespace routing_detail {

inline void check_state(const char* fn, const routing_state& st, std::int64_t Hkv, std::int64_t D) {
  mnemo::detail::require(st.centroids.size() > 0 && st.heads() == Hkv && st.dim() == D, fn,
                         ": state.centroids must have shape [Hkv, C, D] = [", Hkv, ", C, ", D, "], got ",
                         shape_string(st.centroids.shape()));
}

// Rows x [B, H, L, D], H a multiple of Hkv: the cluster of every row (f32 dots, or double ones).
template <bool Double>
void assign(const routing_state& st, view<const float, 4> x, view<std::int64_t, 3> out, int threads) {
  const std::int64_t B = x.extent(0), H = x.extent(1), L = x.extent(2), D = x.extent(3), C = st.clusters();
  const std::int64_t G = H / st.heads();
  parallel_for(
      B * H,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / H, h = bh % H, hk = h / G;
        for (std::int64_t i = 0; i < L; ++i) {
          const float* xi = x.ptr(b, h, i);
          std::int64_t best = 0;
          double top = -std::numeric_limits<double>::infinity();
          for (std::int64_t c = 0; c < C; ++c) {
            const float* mu = st.centroids.as_view().ptr(hk, c);
            const double s = Double ? simd::reference::dot(xi, mu, D) : static_cast<double>(simd::dot(xi, mu, D));
            if (s > top) {
              top = s;
              best = c;
            }
          }
          out(b, h, i) = best;
        }
      },
      threads);
}

inline void check_rows(const char* fn, const routing_state& st, const view<const float, 4>& x, const char* name) {
  mnemo::detail::require_data(fn, name, x, " [B, H, L, D]");
  check_state(fn, st, st.heads(), x.extent(3));
  mnemo::detail::require(x.extent(1) >= 1 && x.extent(1) % st.heads() == 0, fn, ": ", name,
                         ".shape[1] must be a positive multiple of the state's Hkv = ", st.heads(), ", got ",
                         x.extent(1));
}

inline void check_call(const char* fn, const dims& d, const routing_state& st, const options& opt) {
  check_state(fn, st, d.Hkv, d.D);
  mnemo::detail::require(opt.sinks.empty(), fn, ": options.sinks are not supported by routing attention");
}

}  // namespace routing_detail

// The cluster of every row of x [B, H, L, D] (queries, H = Hq, or keys, H = Hkv): argmax_c of
// mu_c . x in f32, ties to the lower c. clusters [B, H, L].
inline void routing_assign(const routing_state& st, view<const float, 4> x, view<std::int64_t, 3> clusters,
                           const options& opt = {}) {
  constexpr const char* fn = "approx::routing_assign";
  routing_detail::check_rows(fn, st, x, "x");
  mnemo::detail::require_shape(fn, "clusters", clusters, {x.extent(0), x.extent(1), x.extent(2)}, " [B, H, L]");
  routing_detail::assign<false>(st, x, clusters, opt.threads);
}

// One mini-batch k-means step (the header's EMA) on queries q [B, Hq, Lq, D] and keys
// k [B, Hkv, Lk, D], assigning with the centroids before the step; sums in double.
inline void routing_update(routing_state& st, view<const float, 4> q, view<const float, 4> k, float decay = 0.999f,
                           const options& opt = {}) {
  constexpr const char* fn = "approx::routing_update";
  routing_detail::check_rows(fn, st, q, "q");
  routing_detail::check_rows(fn, st, k, "k");
  mnemo::detail::require(k.extent(1) == st.heads() && k.extent(0) == q.extent(0), fn,
                         ": k must be [B, Hkv, Lk, D] with B = q.shape[0] = ", q.extent(0), " and Hkv = ", st.heads(),
                         ", got ", shape_string(k.shape()));
  mnemo::detail::require(decay >= 0.0f && decay <= 1.0f, fn, ": decay (lambda) must be in [0, 1], got ", decay);
  const std::int64_t Hkv = st.heads(), C = st.clusters(), D = st.dim(), G = q.extent(1) / Hkv;
  tensor<std::int64_t, 3> cq({q.extent(0), q.extent(1), q.extent(2)}), ck({k.extent(0), k.extent(1), k.extent(2)});
  routing_detail::assign<false>(st, q, cq, opt.threads);
  routing_detail::assign<false>(st, k, ck, opt.threads);
  parallel_for(
      Hkv,
      [&](std::int64_t hk) {
        std::vector<double> sum(static_cast<std::size_t>(C * D), 0.0);
        auto add = [&](const float* x, std::int64_t c) {
          double n2 = 0;
          for (std::int64_t e = 0; e < D; ++e) n2 += static_cast<double>(x[e]) * x[e];
          if (n2 == 0) return;
          const double inv = 1.0 / std::sqrt(n2);
          for (std::int64_t e = 0; e < D; ++e) sum[static_cast<std::size_t>(c * D + e)] += x[e] * inv;
        };
        for (std::int64_t b = 0; b < q.extent(0); ++b) {
          for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h)
            for (std::int64_t i = 0; i < q.extent(2); ++i) add(q.ptr(b, h, i), cq(b, h, i));
          for (std::int64_t j = 0; j < k.extent(2); ++j) add(k.ptr(b, hk, j), ck(b, hk, j));
        }
        const double lam = decay, half = (1.0 - lam) / 2.0;
        for (std::int64_t c = 0; c < C; ++c) {
          std::vector<double> mu(static_cast<std::size_t>(D));
          double n2 = 0;
          for (std::int64_t e = 0; e < D; ++e) {
            mu[static_cast<std::size_t>(e)] = lam * st.centroids(hk, c, e) + half * sum[static_cast<std::size_t>(c * D + e)];
            n2 += mu[static_cast<std::size_t>(e)] * mu[static_cast<std::size_t>(e)];
          }
          if (n2 == 0) continue;
          const double inv = 1.0 / std::sqrt(n2);
          for (std::int64_t e = 0; e < D; ++e) st.centroids(hk, c, e) = static_cast<float>(mu[static_cast<std::size_t>(e)] * inv);
        }
      },
      opt.threads);
}

// Routing attention in double: assignments with double dots, softmax within the cluster.
inline void reference_routing_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                        view<const float, 4> k,  // [B, Hkv, Lk, D]
                                        view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                        const routing_state& st, bool causal,
                                        view<float, 4> out,       // [B, Hq, Lq, Dv]
                                        view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                                        const options& opt = {}) {
  constexpr const char* fn = "approx::reference_routing_attention";
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mods::none{}, opt);
  routing_detail::check_call(fn, d, st, opt);
  tensor<std::int64_t, 3> cq({d.B, d.Hq, d.Lq}), ck({d.B, d.Hkv, d.Lk});
  routing_detail::assign<true>(st, q, cq, opt.threads);
  routing_detail::assign<true>(st, k, ck, opt.threads);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        std::vector<double> s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t qp = i + d.offset();
          double m = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            const bool in = ck(b, hk, j) == cq(b, h, i) && (!causal || j <= qp);
            s[static_cast<std::size_t>(j)] =
                in ? d.scale * simd::reference::dot(q.ptr(b, h, i), k.ptr(b, hk, j), d.D)
                   : -std::numeric_limits<double>::infinity();
            m = std::max(m, s[static_cast<std::size_t>(j)]);
          }
          float* o = out.ptr(b, h, i);
          if (m == -std::numeric_limits<double>::infinity()) {
            std::fill_n(o, d.Dv, 0.0f);
            if (!lse.empty()) lse(b, h, i) = -std::numeric_limits<float>::infinity();
            continue;
          }
          std::fill(acc.begin(), acc.end(), 0.0);
          double sum = 0;
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            if (s[static_cast<std::size_t>(j)] == -std::numeric_limits<double>::infinity()) continue;
            const double p = std::exp(s[static_cast<std::size_t>(j)] - m);
            sum += p;
            for (std::int64_t c = 0; c < d.Dv; ++c) acc[static_cast<std::size_t>(c)] += p * v(b, hk, j, c);
          }
          for (std::int64_t c = 0; c < d.Dv; ++c) o[c] = static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
          if (!lse.empty()) lse(b, h, i) = static_cast<float>(m + std::log(sum));
        }
      },
      opt.threads);
}

namespace routing_detail {

// Rows of one (batch, head) sorted by cluster (stable: positions ascend within a cluster):
// order [L], start [C + 1].
inline void bucket(const std::int64_t* cl, std::int64_t L, std::int64_t C, std::int64_t* order, std::int64_t* start) {
  std::fill_n(start, C + 1, 0);
  for (std::int64_t i = 0; i < L; ++i) ++start[cl[i] + 1];
  for (std::int64_t c = 0; c < C; ++c) start[c + 1] += start[c];
  std::vector<std::int64_t> at(start, start + C);
  for (std::int64_t i = 0; i < L; ++i) order[at[static_cast<std::size_t>(cl[i])]++] = i;
}

}  // namespace routing_detail

// Routing attention, fast path (see the header).
inline void routing_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                              view<const float, 4> k,  // [B, Hkv, Lk, D]
                              view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                              const routing_state& st, bool causal,
                              view<float, 4> out,       // [B, Hq, Lq, Dv]
                              view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                              const options& opt = {}) {
  constexpr const char* fn = "approx::routing_attention";
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mods::none{}, opt);
  routing_detail::check_call(fn, d, st, opt);
  const std::int64_t C = st.clusters(), G = d.group();
  tensor<std::int64_t, 3> cq({d.B, d.Hq, d.Lq}), ck({d.B, d.Hkv, d.Lk});
  routing_detail::assign<false>(st, q, cq, opt.threads);
  routing_detail::assign<false>(st, k, ck, opt.threads);
  // Per (b, head): rows ordered by cluster, and each cluster's start.
  std::vector<std::int64_t> q_order(static_cast<std::size_t>(d.B * d.Hq * d.Lq)),
      q_start(static_cast<std::size_t>(d.B * d.Hq * (C + 1))), k_order(static_cast<std::size_t>(d.B * d.Hkv * d.Lk)),
      k_start(static_cast<std::size_t>(d.B * d.Hkv * (C + 1)));
  for (std::int64_t bh = 0; bh < d.B * d.Hq; ++bh)
    routing_detail::bucket(cq.data() + bh * d.Lq, d.Lq, C, q_order.data() + bh * d.Lq, q_start.data() + bh * (C + 1));
  for (std::int64_t bh = 0; bh < d.B * d.Hkv; ++bh)
    routing_detail::bucket(ck.data() + bh * d.Lk, d.Lk, C, k_order.data() + bh * d.Lk, k_start.data() + bh * (C + 1));

  options inner = opt;
  inner.threads = 1;
  inner.scale = d.scale;
  parallel_for_dynamic(
      d.B * d.Hkv * C,
      [&](std::int64_t item) {
        const std::int64_t c = item % C, bhk = item / C, b = bhk / d.Hkv, hk = bhk % d.Hkv;
        const std::int64_t* kidx = k_order.data() + bhk * d.Lk + k_start[static_cast<std::size_t>(bhk * (C + 1) + c)];
        const std::int64_t n = k_start[static_cast<std::size_t>(bhk * (C + 1) + c + 1)] -
                               k_start[static_cast<std::size_t>(bhk * (C + 1) + c)];
        std::vector<float> kc(static_cast<std::size_t>(n * d.D)), vc(static_cast<std::size_t>(n * d.Dv));
        sparse_detail::gather_rows(k.ptr(b, hk, 0), k.stride(2), d.D, kidx, n, kc.data());
        sparse_detail::gather_rows(v.ptr(b, hk, 0), v.stride(2), d.Dv, kidx, n, vc.data());
        std::vector<float> qc, oc, lc;
        std::vector<std::int64_t> qpos;
        for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) {
          const std::int64_t bh = b * d.Hq + h;
          const std::int64_t* qidx = q_order.data() + bh * d.Lq + q_start[static_cast<std::size_t>(bh * (C + 1) + c)];
          const std::int64_t m = q_start[static_cast<std::size_t>(bh * (C + 1) + c + 1)] -
                                 q_start[static_cast<std::size_t>(bh * (C + 1) + c)];
          if (m == 0) continue;
          if (n == 0) {  // no key in the cluster
            for (std::int64_t t = 0; t < m; ++t) {
              std::fill_n(out.ptr(b, h, qidx[t]), d.Dv, 0.0f);
              if (!lse.empty()) lse(b, h, qidx[t]) = -std::numeric_limits<float>::infinity();
            }
            continue;
          }
          qc.resize(static_cast<std::size_t>(m * d.D));
          oc.resize(static_cast<std::size_t>(m * d.Dv));
          lc.resize(static_cast<std::size_t>(m));
          qpos.resize(static_cast<std::size_t>(m));
          sparse_detail::gather_rows(q.ptr(b, h, 0), q.stride(2), d.D, qidx, m, qc.data());
          for (std::int64_t t = 0; t < m; ++t) qpos[static_cast<std::size_t>(t)] = qidx[t] + d.offset();
          const position_mask mask{causal, qpos.data(), 0, kidx, 0, 1, 1, n - m};
          attention::flash<float, position_mask>(sparse_detail::as_heads(qc.data(), 1, m, d.D),
                                                 sparse_detail::as_heads(kc.data(), 1, n, d.D),
                                                 sparse_detail::as_heads(vc.data(), 1, n, d.Dv),
                                                 view<float, 4>(oc.data(), {1, 1, m, d.Dv}),
                                                 view<float, 3>(lc.data(), {1, 1, m}), mask, inner);
          for (std::int64_t t = 0; t < m; ++t) {
            std::copy_n(oc.data() + t * d.Dv, d.Dv, out.ptr(b, h, qidx[t]));
            if (!lse.empty()) lse(b, h, qidx[t]) = lc[static_cast<std::size_t>(t)];
          }
        }
      },
      opt.threads);
}

}  // namespace mnemo::attention::approx

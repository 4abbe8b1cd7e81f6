// mnemo/attention/approx/scatterbrain.hpp — Scatterbrain attention (Chen, Dao, Winsor, Song, Rudra,
// Ré, "Scatterbrain: Unifying Sparse and Low-rank Attention Approximation", NeurIPS 2021): an
// LSH-bucketed sparse part computed exactly plus the Performer low-rank estimate everywhere else,
// combined without counting any pair twice. Non-causal.
//
//   s_ij     = scale q_i . k_j                                     the exact score
//   kappa_ij = phi(q_i) . phi(k_j)                                  FAVOR+'s estimate of exp(s_ij)
//                                                                   (performer.hpp, the same W and seed)
//   S_i      = { j : bucket(k_j) = bucket(q_i) }                    the sparse support (LSH)
//   A_ij     = kappa_ij + [j in S_i] (exp(s_ij) - kappa_ij)         on S_i the estimate is replaced
//   out_i    = sum_j A_ij v_j / sum_j A_ij                          by the exact exp score
// so out_i = (phi(q_i)^T S + sum_{j in S_i} (exp(s_ij) - kappa_ij) v_j) / (phi(q_i)^T z + sum_{j in S_i}
// (exp(s_ij) - kappa_ij)) with S = sum_j phi(k_j) v_j^T and z = sum_j phi(k_j): the low-rank term is
// one Performer pass and the correction costs O(|S_i| (D + m + Dv)) per query.
//
// LSH (angular, as Reformer's: Kitaev et al. 2020): bucket(x) = argmax over [x R, -x R] with R [D,
// buckets / 2] Gaussian from the seed, the same R for queries and keys; buckets = 1 puts every key in
// every query's support, which is exact attention. Buckets are computed in double by one function
// (lsh_bucket) that the reference and the fast path share, so both see the same support.
//
// Numerics. Features are shifted as in performer.hpp (per query row a_i, one key constant c), so
// kappa~_ij = kappa_ij e^{-a_i - c}. Row i is then shifted once more by t_i = max(a_i + c, max_{j in
// S_i} s_ij), i.e. every term is multiplied by e^{-t_i}: exact terms become exp(s_ij - t_i) <= 1 and
// estimates kappa~_ij e^{a_i + c - t_i} with a factor <= 1, so nothing overflows and the ratio is
// unchanged. A row whose denominator is not > 0 gets out = 0. (A_ij may be negative on S_i in theory
// only through the estimate's own sign, which is positive: it is not.)
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv], f32, GQA.
// reference::scatterbrain: the sum over all (i, j) in double, O(Lq Lk (D + m)). The fast path per
// head: Phi_K, S, z once; keys and queries grouped by bucket (counting sort); per bucket and chunk
// of queries, the scores (Q_b K_b^T) and estimates (Phi_Qb Phi_Kb^T) of the bucket's pairs by Eigen
// GEMM, their difference times V_b. Threads over (batch, head).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/attention/approx/common.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"

namespace mnemo::attention::approx {

struct scatterbrain_options {
  std::int64_t features = 256;  // m, FAVOR+ features of the low-rank part (>= 1)
  std::int64_t buckets = 16;    // LSH buckets: 1 (every pair exact) or an even count >= 2
  std::uint64_t seed = 0;       // features W = orthogonal_features(m, D, seed); LSH R from the seed too
  float scale = 0;              // 0: 1 / sqrt(D)
  int threads = 0;              // 0: the OpenMP default
};

// The LSH projections R^T [buckets / 2, D] of a call (empty for one bucket).
inline tensor<float, 2> lsh_projections(std::int64_t buckets, std::int64_t D, std::uint64_t seed) {
  const std::int64_t half = buckets / 2;
  tensor<float, 2> r({half, D});
  gaussian_stream g(seed ^ 0x3c6ef372fe94f82bull);  // a stream apart from the features'
  for (float& x : r) x = static_cast<float>(g.next());
  return r;
}

// The bucket of one row x [D]: argmax over [x R, -x R] in double (ties: the lower index).
inline std::int64_t lsh_bucket(const float* x, const view<const float, 2>& r) {
  const std::int64_t half = r.extent(0), D = r.extent(1);
  std::int64_t best = 0;
  double best_val = -std::numeric_limits<double>::infinity();
  for (std::int64_t p = 0; p < half; ++p) {
    double dot = 0;
    for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(r(p, c)) * x[c];
    if (dot > best_val) best_val = dot, best = p;
    if (-dot > best_val) best_val = -dot, best = p + half;
  }
  return best;
}

namespace detail {

inline dims check_scatterbrain(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                               const view<const float, 4>& v, const view<float, 4>& out,
                               const scatterbrain_options& opt) {
  const dims d = check_qkv(fn, q, k, v, out, opt.scale, opt.threads);
  mnemo::detail::require(opt.features >= 1, fn, ": options.features (m) must be >= 1, got ", opt.features);
  mnemo::detail::require(opt.buckets == 1 || (opt.buckets >= 2 && opt.buckets % 2 == 0), fn,
                         ": options.buckets must be 1 or an even count >= 2, got ", opt.buckets);
  return d;
}

// Buckets of the n rows of one head (rows at stride ld).
inline std::vector<std::int64_t> buckets_of(const float* x, std::int64_t n, std::int64_t ld,
                                            const view<const float, 2>& r) {
  std::vector<std::int64_t> out(static_cast<std::size_t>(n), 0);
  if (r.extent(0) > 0)
    for (std::int64_t i = 0; i < n; ++i) out[static_cast<std::size_t>(i)] = lsh_bucket(x + i * ld, r);
  return out;
}

// Counting sort of row indices by bucket: rows of bucket b are order[start[b] .. start[b + 1]).
struct bucket_lists {
  std::vector<std::int64_t> order, start;
  bucket_lists(const std::vector<std::int64_t>& bucket, std::int64_t nb)
      : order(bucket.size()), start(static_cast<std::size_t>(nb + 1), 0) {
    for (std::int64_t b : bucket) ++start[static_cast<std::size_t>(b + 1)];
    for (std::int64_t b = 0; b < nb; ++b) start[static_cast<std::size_t>(b + 1)] += start[static_cast<std::size_t>(b)];
    std::vector<std::int64_t> fill(start.begin(), start.end() - 1);
    for (std::size_t i = 0; i < bucket.size(); ++i)
      order[static_cast<std::size_t>(fill[static_cast<std::size_t>(bucket[i])]++)] = static_cast<std::int64_t>(i);
  }
};

// Query rows per chunk inside a bucket (the score block is chunk x bucket size).
inline constexpr std::int64_t scatterbrain_chunk = 64;

}  // namespace detail

namespace reference {

// Scatterbrain in double, the sum over every pair (see the header).
inline void scatterbrain(view<const float, 4> q,  // [B, Hq, Lq, D]
                         view<const float, 4> k,  // [B, Hkv, Lk, D]
                         view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                         view<float, 4> out,      // [B, Hq, Lq, Dv]
                         const scatterbrain_options& opt = {}) {
  constexpr const char* fn = "approx::reference::scatterbrain";
  const dims d = detail::check_scatterbrain(fn, q, k, v, out, opt);
  const tensor<float, 2> w = orthogonal_features(opt.features, d.D, opt.seed);
  const tensor<float, 2> r = lsh_projections(opt.buckets, d.D, opt.seed);
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
        const auto kb = detail::buckets_of(k.ptr(b, hk, 0, 0), d.Lk, k.stride(2), r);
        const auto qb = detail::buckets_of(q.ptr(b, h, 0, 0), d.Lq, q.stride(2), r);
        std::vector<double> s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const float* qi = q.ptr(b, h, i, 0);
          double shift = a[static_cast<std::size_t>(i)] + c;
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            if (kb[static_cast<std::size_t>(j)] != qb[static_cast<std::size_t>(i)]) continue;
            const float* kj = k.ptr(b, hk, j, 0);
            double dot = 0;
            for (std::int64_t x = 0; x < d.D; ++x) dot += static_cast<double>(qi[x]) * kj[x];
            s[static_cast<std::size_t>(j)] = static_cast<double>(d.scale) * dot;
            shift = std::max(shift, s[static_cast<std::size_t>(j)]);
          }
          const double g = std::exp(a[static_cast<std::size_t>(i)] + c - shift);
          std::fill(acc.begin(), acc.end(), 0.0);
          double den = 0;
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            double weight;
            if (kb[static_cast<std::size_t>(j)] == qb[static_cast<std::size_t>(i)]) {
              weight = std::exp(s[static_cast<std::size_t>(j)] - shift);
            } else {
              double kappa = 0;
              for (std::int64_t x = 0; x < m; ++x)
                kappa += pq[static_cast<std::size_t>(i * m + x)] * pk[static_cast<std::size_t>(j * m + x)];
              weight = g * kappa;
            }
            den += weight;
            const float* vj = v.ptr(b, hk, j, 0);
            for (std::int64_t x = 0; x < d.Dv; ++x) acc[static_cast<std::size_t>(x)] += weight * vj[x];
          }
          float* oi = out.ptr(b, h, i, 0);
          for (std::int64_t x = 0; x < d.Dv; ++x) oi[x] = den > 0 ? static_cast<float>(acc[static_cast<std::size_t>(x)] / den) : 0.0f;
        }
      },
      opt.threads);
}

}  // namespace reference

// Scatterbrain attention, f32 (see the header). out is written in full.
inline void scatterbrain(view<const float, 4> q,  // [B, Hq, Lq, D]
                         view<const float, 4> k,  // [B, Hkv, Lk, D]
                         view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                         view<float, 4> out,      // [B, Hq, Lq, Dv]
                         const scatterbrain_options& opt = {}) {
  using detail::matrix;
  using mnemo::detail::accumulate;
  constexpr const char* fn = "approx::scatterbrain";
  const dims d = detail::check_scatterbrain(fn, q, k, v, out, opt);
  const tensor<float, 2> wt = orthogonal_features(opt.features, d.D, opt.seed);
  const matrix w = Eigen::Map<const matrix>(wt.data(), opt.features, d.D);
  const tensor<float, 2> r = lsh_projections(opt.buckets, d.D, opt.seed);
  const std::int64_t m = opt.features, C = detail::scatterbrain_chunk;
  mnemo::detail::for_each_item(d.B * d.Hq, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
    if (d.Lq == 0) return;
    const auto K = detail::head_rows(k, b, hk);
    const auto V = detail::head_rows(v, b, hk);
    const auto Q = detail::head_rows(q, b, h);
    auto O = detail::head_rows(out, b, h);
    matrix pk, pq, s(m, d.Dv), kb_rows, pkb_rows, vb_rows, qc, num, sc, est;
    Eigen::RowVectorXf z = Eigen::RowVectorXf::Zero(m);
    Eigen::VectorXf den;
    std::vector<float> a(static_cast<std::size_t>(C));
    const float c = detail::key_features(K, w, d.scale, pk);
    mnemo::detail::gemm<accumulate::assign>(s, pk.transpose(), V);
    z = pk.colwise().sum();
    const detail::bucket_lists keys(detail::buckets_of(k.ptr(b, hk, 0, 0), d.Lk, k.stride(2), r), opt.buckets);
    const detail::bucket_lists queries(detail::buckets_of(q.ptr(b, h, 0, 0), d.Lq, q.stride(2), r), opt.buckets);
    for (std::int64_t bucket = 0; bucket < opt.buckets; ++bucket) {
      const std::int64_t q0 = queries.start[static_cast<std::size_t>(bucket)], q1 = queries.start[static_cast<std::size_t>(bucket + 1)];
      if (q0 == q1) continue;
      const std::int64_t k0 = keys.start[static_cast<std::size_t>(bucket)];
      const std::int64_t nk = keys.start[static_cast<std::size_t>(bucket + 1)] - k0;
      kb_rows.resize(nk, d.D);
      pkb_rows.resize(nk, m);
      vb_rows.resize(nk, d.Dv);
      for (std::int64_t t = 0; t < nk; ++t) {
        const std::int64_t j = keys.order[static_cast<std::size_t>(k0 + t)];
        kb_rows.row(t) = K.row(j);
        pkb_rows.row(t) = pk.row(j);
        vb_rows.row(t) = V.row(j);
      }
      for (std::int64_t i0 = q0; i0 < q1; i0 += C) {
        const std::int64_t n = std::min(C, q1 - i0);
        qc.resize(n, d.D);
        for (std::int64_t t = 0; t < n; ++t) qc.row(t) = Q.row(queries.order[static_cast<std::size_t>(i0 + t)]);
        detail::query_features(qc, w, d.scale, pq, a.data());
        num.resize(n, d.Dv);
        mnemo::detail::gemm<accumulate::assign>(num, pq, s);
        den = pq * z.transpose();
        if (nk > 0) {
          sc.resize(n, nk);
          mnemo::detail::gemm<accumulate::assign>(sc, qc, kb_rows.transpose());
          est.resize(n, nk);
          mnemo::detail::gemm<accumulate::assign>(est, pq, pkb_rows.transpose());
          for (std::int64_t t = 0; t < n; ++t) {
            const float base = a[static_cast<std::size_t>(t)] + c;
            sc.row(t) *= d.scale;
            const float shift = std::max(base, sc.row(t).maxCoeff());
            const float g = std::exp(base - shift);
            // the correction exp(s - shift) - g kappa~ on the bucket, in sc
            sc.row(t).array() = (sc.row(t).array() - shift).exp() - g * est.row(t).array();
            num.row(t) *= g;
            den(t) = g * den(t) + sc.row(t).sum();
          }
          mnemo::detail::gemm<accumulate::add>(num, sc, vb_rows);
        }
        for (std::int64_t t = 0; t < n; ++t) {
          auto o = O.row(queries.order[static_cast<std::size_t>(i0 + t)]);
          if (den(t) > 0) o = num.row(t) / den(t);
          else o.setZero();
        }
      }
    }
  });
}

}  // namespace mnemo::attention::approx

// mnemo/kvcache/policies/qfilter.hpp — Q-Filters: score keys by their projection on the main
// direction of the queries.
//
// Godey et al., "Q-Filters: Leveraging QK Geometry for Efficient KV Cache Compression" (2025).
// Queries and keys of a head are anisotropic: most of their mass lies along one direction u, so
// the expected attention logit of key j is, up to a positive factor, its projection on u. The
// filter of kv head h is the first right singular vector of the observed queries of its group,
//
//   Q_h = [q_1; ...; q_n]  (n x D, every query head of the group),   Q_h = U S V^T,
//   f_h = ±V[:, 0],  the sign chosen so that mean_i (q_i . f_h) < 0,
//   score_j = -(f_h . k_j)                                   (kvpress's QFilterPress)
//
// so -f_h points where the queries point and keys aligned with the queries are kept. The filters
// are fitted once (offline or on a prefill), from the top eigenvector of Q_h^T Q_h (= V[:, 0]), and
// reused for every step.
// Needs keys and the filters. Decoding: a new slot's score is one dot product, O(D), fixed.
// Golden: kv_qfilter (filters given as the input q_filter).
#pragma once

#include <Eigen/Eigenvalues>

#include <cstdint>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct qfilter {
  view<const float, 2> filters;  // [Hkv, D]

  // Fits the filters from observed queries q [Hq, n, D] (n >= 1) of Hkv kv heads: [Hkv, D].
  static tensor<float, 2> fit(view<const float, 3> q, std::int64_t Hkv) {
    constexpr const char* fn = "kvcache::policies::qfilter::fit";
    detail::require(!q.empty() && q.extent(1) >= 1, fn, ": q [Hq, n, D] must be a non-empty view with n >= 1");
    detail::require(Hkv >= 1 && q.extent(0) % Hkv == 0, fn, ": q.shape[0] (Hq) must be a multiple of Hkv = ", Hkv,
                    ", got ", q.extent(0));
    const std::int64_t G = q.extent(0) / Hkv, n = q.extent(1), D = q.extent(2);
    tensor<float, 2> f({Hkv, D});
    for (std::int64_t h = 0; h < Hkv; ++h) {
      // The first right singular vector of Q_h is the top eigenvector of the Gram matrix Q_h^T Q_h
      // (D x D, accumulated in double): one pass over Q_h and a D x D eigenproblem instead of an
      // SVD of the n x D matrix, and a fraction of the compiled code (Eigen's BDCSVD was most of
      // the object code of every test that includes the policies).
      Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(D, D);
      Eigen::VectorXd mean = Eigen::VectorXd::Zero(D);  // mean of the rows, for the sign
      for (std::int64_t g = 0; g < G; ++g)
        for (std::int64_t i = 0; i < n; ++i) {
          const float* row = q.ptr(h * G + g, i);
          for (std::int64_t a = 0; a < D; ++a) {
            mean(a) += row[a];
            for (std::int64_t b = 0; b <= a; ++b) gram(a, b) += static_cast<double>(row[a]) * row[b];
          }
        }
      const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);  // reads the lower triangle
      Eigen::VectorXd u = eig.eigenvectors().col(D - 1);                // eigenvalues ascend
      if (mean.dot(u) > 0) u = -u;
      for (std::int64_t c = 0; c < D; ++c) f(h, c) = static_cast<float>(u(c));
    }
    return f;
  }

  float score_of(std::int64_t h, const float* k) const {
    double s = 0;
    for (std::int64_t c = 0; c < filters.extent(1); ++c) s += static_cast<double>(filters(h, c)) * k[c];
    return static_cast<float>(-s);
  }

  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::qfilter::scores";
    const obs_dims d = detail::check(fn, o, false, false);
    check_filters(fn, d);
    detail::check_scores(fn, out, d.Hkv, d.L);
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = 0; j < d.L; ++j) out(h, j) = score_of(h, o.k.ptr(h, j));
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::qfilter::select";
    const obs_dims d = detail::check(fn, o, false, false);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

  class decoder;  // decode-time state, defined below

 private:
  void check_filters(const char* fn, const obs_dims& d) const {
    detail::require(!filters.empty(), fn, ": filters [Hkv, D] must be a non-empty view (see qfilter::fit)");
    detail::require_shape(fn, "filters", filters, {d.Hkv, d.D}, " [Hkv, D]");
  }
};

// Decode-time state: one fixed score per slot, one dot product per appended key.
class qfilter::decoder : public scored_slots {
 public:
  explicit decoder(const qfilter& p) : scored_slots(p.filters.extent(0)), p_(p) {}
  void append(std::int64_t h, const float* k) { mutable_scores(h).push_back(p_.score_of(h, k)); }

 private:
  qfilter p_;
};

}  // namespace mnemo::kvcache::policies

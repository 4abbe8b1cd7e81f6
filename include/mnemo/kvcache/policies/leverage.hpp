// mnemo/kvcache/policies/leverage.hpp — keep the slots with the highest statistical leverage
// (the rows a CUR decomposition of the head's keys and values would pick).
//
// CUR selects the rows of a matrix by their leverage scores (Drineas, Mahoney & Muthukrishnan,
// "Relative-Error CUR Matrix Decompositions", 2008): with the thin SVD X = U S W^T of an L x D
// matrix and its rank-r truncation,
//
//   lev_j(X) = ||U_r[j, :]||^2 = sum_{c < r} (x_j . w_c)^2 / s_c^2          (sum_j lev_j = r)
//
// the share of the top-r row space carried by row j: a row alone in its direction has leverage 1,
// a row among many similar ones a small share. CurDKV (Sengupta, Chaudhary & Chakraborty,
// "Value-Guided KV Compression for LLMs via Approximated CUR Decomposition", NeurIPS 2025;
// kvpress's CURPress) scores slot j of a head by the leverage of its key and of its value, and
// keeps the slots whose rows best span the attention output softmax(QK^T)V:
//
//   lk_j = lev_j(K) / sum_i lev_i(K),   lv_j = lev_j(V) / sum_i lev_i(V)        (K [L, D], V [L, Dv])
//   score_j = lk_j * lv_j          (source::product, the paper's and kvpress's default)
//           = lk_j | lv_j | (lk_j + lv_j) / 2   (source::keys | values | average)
//   score_j = max(score over every head) + 1    for the first `sinks` slots (kvpress's num_sinks)
//
// What exactly is computed: the leverage is exact, not sketched. The paper approximates it with the
// squared norms of Gaussian random projections of the rows; kvpress's CURPress by default takes the
// squared row norms themselves, normalised within local windows of 16 slots (its projection to
// r = 20 dimensions is an option). At these sizes the exact value is cheap: the Gram
// matrix X^T X (D x D, double) is eigen-decomposed (Eigen's SelfAdjointEigenSolver), so
// s_c^2 = lambda_c and w_c are its eigenpairs, and lev_j = sum_c (x_j . w_c)^2 / lambda_c over the
// top `rank` eigenvalues (rank = 0: every eigenvalue above rel_tol lambda_max, the numerical rank;
// with L <= D and full rank every slot then has leverage 1, and a rank below min(L, D) is what
// ranks the slots). Directions with lambda_c <= rel_tol lambda_max count as null (the default
// 1e-10 is s_c < 1e-5 s_max: keys stored in float carry ~7 digits, so a direction that faint is
// mostly rounding, and 1 / lambda_c would amplify it). kvpress's local-window normalisation and
// random projection are left out.
//
// Reads observation.k (the cached, post-RoPE keys, as kvpress) and, for every source but keys,
// observation.v. No queries, no attention: the selection is query-agnostic. Cost per head
// O(L (D^2 + Dv^2) + D^3 + Dv^3); memory O(D^2 + Dv^2 + L). L = 0 gives empty selections.
#pragma once

#include <Eigen/Eigenvalues>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct leverage {
  static constexpr std::string_view name = "leverage";

  enum class source { product, keys, values, average };

  source of = source::product;  // which leverage scores the slots (see the header)
  std::int64_t rank = 0;        // r: top eigenpairs used; 0 = the numerical rank
  std::int64_t sinks = 4;       // first slots always kept
  double rel_tol = 1e-10;       // eigenvalues <= rel_tol * lambda_max are null directions

  // lev [L]: the rank-r leverage of the rows x [L, C] of one head (unnormalised, sum = r).
  void leverage_of(view<const float, 2> x, std::vector<double>& lev) const {
    const std::int64_t L = x.extent(0), C = x.extent(1);
    lev.assign(static_cast<std::size_t>(L), 0.0);
    if (L == 0 || C == 0) return;
    Eigen::MatrixXd gram = Eigen::MatrixXd::Zero(C, C);
    for (std::int64_t j = 0; j < L; ++j) {
      const float* row = x.ptr(j);
      for (std::int64_t a = 0; a < C; ++a)
        for (std::int64_t b = 0; b <= a; ++b) gram(a, b) += static_cast<double>(row[a]) * row[b];
    }
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(gram);  // reads the lower triangle; ascending
    const double top = eig.eigenvalues()(C - 1);
    if (!(top > 0)) return;  // all rows zero: no leverage anywhere
    const std::int64_t r = rank == 0 ? C : std::min(rank, C);
    for (std::int64_t c = C - 1; c >= C - r; --c) {
      const double lambda = eig.eigenvalues()(c);
      if (!(lambda > rel_tol * top)) break;
      for (std::int64_t j = 0; j < L; ++j) {
        const float* row = x.ptr(j);
        double p = 0;
        for (std::int64_t a = 0; a < C; ++a) p += row[a] * eig.eigenvectors()(a, c);
        lev[static_cast<std::size_t>(j)] += p * p / lambda;
      }
    }
  }

  // scores [Hkv, L] from observation.k (and observation.v unless of == keys).
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::leverage::scores";
    const obs_dims d = check(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    const std::int64_t first = std::min(sinks, d.L);
    std::vector<double> lk, lv;
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      if (of != source::values) leverage_of(o.k[hk], lk);
      if (of != source::keys) leverage_of(o.v[hk], lv);
      normalize(lk);
      normalize(lv);
      for (std::int64_t j = first; j < d.L; ++j) {
        const auto i = static_cast<std::size_t>(j);
        double s = 0;
        switch (of) {
          case source::product: s = lk[i] * lv[i]; break;
          case source::keys: s = lk[i]; break;
          case source::values: s = lv[i]; break;
          case source::average: s = 0.5 * (lk[i] + lv[i]); break;
        }
        out(hk, j) = static_cast<float>(s);
      }
    }
    detail::force_slots(out, 0, first);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::leverage::select";
    const obs_dims d = check(fn, o);
    detail::check_budget(fn, budget);
    if (d.L == 0) return selection{std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(d.Hkv))};
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

 private:
  obs_dims check(const char* fn, const observation& o) const {
    const obs_dims d = detail::check(fn, o, false, false);
    detail::require(rank >= 0, fn, ": rank must be >= 0 (0: the numerical rank), got ", rank);
    detail::require(sinks >= 0, fn, ": sinks must be >= 0, got ", sinks);
    detail::require(rel_tol >= 0.0 && rel_tol < 1.0, fn, ": rel_tol must be in [0, 1), got ", rel_tol);
    if (of != source::keys)
      detail::require(!o.v.empty(), fn, ": observation.v [Hkv, L, Dv] must be a non-empty view (every source but keys reads it)");
    return d;
  }

  // x / sum(x) (a zero vector stays zero).
  static void normalize(std::vector<double>& x) {
    double sum = 0;
    for (double v : x) sum += v;
    if (sum > 0)
      for (double& v : x) v /= sum;
  }
};

}  // namespace mnemo::kvcache::policies

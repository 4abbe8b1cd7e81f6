// mnemo/kvcache/policies/expected_attention.hpp — keep the keys the *future* queries are expected
// to attend to, from a Gaussian model of the queries.
//
// Devoto, Jeblick & Jégou, "Expected Attention: KV Cache Compression by Estimating Attention from
// Future Queries Distribution" (2025, arXiv 2510.00636; NVIDIA kvpress's ExpectedAttentionPress).
// The queries still to come are modelled as q ~ N(mu_h, Sigma_h), with mu_h and Sigma_h the mean
// and covariance of query head h's observed queries. The unnormalised attention exp(q.k / sqrt(D))
// then has the expectation (the moment generating function of a Gaussian)
//
//   E[exp(q.k / sqrt(D))] = exp(z_j),   z_j = mu_h.k_j / sqrt(D) + k_j^T Sigma_h k_j / (2 D)
//
// and the score of slot j in kv head hk is
//
//   a_h,j   = softmax over the non-sink slots j >= sinks of z_h,j                (per query head h)
//   s_hk,j  = (mean over the query heads h of group hk of a_h,j + epsilon) * ||v_j||_2
//   s_hk,j  = max(s over every head and non-sink slot) + 1     for the first `sinks` slots (kept)
//
// What exactly is computed, and how it maps to the observation:
//   - the statistics come from observation.q [Hq, Lw, D], the last Lw queries of the context, in
//     double: mu = (1/n) sum_i q_i, Sigma = (1/n) sum_i (q_i - mu)(q_i - mu)^T (biased, as kvpress),
//     over the n window rows whose position is >= `sinks` (kvpress drops the first n_sink queries as
//     outliers; with Lw = L this is exactly its set of rows). covariance = false drops the
//     Sigma term (z_j = mu.k_j / sqrt(D)).
//   - value_norm = false drops the ||v_j|| factor (kvpress's use_vnorm; CriticalKV, criticalkv.hpp,
//     replaces it with the projected value norm). With value_norm, observation.v is required.
//   - RoPE extrapolation (kvpress's apply_avg_rope) is optional: rope_base > 0 says the queries and
//     keys were rotated with RoPE of that base, half_split layout (Hugging Face Llama), over the
//     first rope_dim channels (0: all D). Then each window row i is first rotated back to its
//     pre-RoPE form (its position is p_i = L - Lw + i when observation.causal, the last Lw tokens
//     of the context; L + i when not, held-out queries that follow it), the statistics are taken
//     of those, and both are moved to the next `future` positions by the average rotation
//     R = mean_{t in [p_last + 1, p_last + 1 + future)} R(t):  mu <- R mu,  Sigma <- R Sigma R^T.
//     Per channel pair (a, b) = (i, i + rope_dim / 2) with angle theta_i = rope_base^(-2i/rope_dim),
//     R acts as [[cbar, -sbar], [sbar, cbar]], cbar / sbar the means of cos / sin(t theta_i).
//     With rope_base = 0 (the default) the post-RoPE window queries model the future queries as
//     they are: no extrapolation (the rotation of the next positions is not applied).
//   - the keys are the cached (post-RoPE) keys observation.k; the causal flag matters only for the
//     positions of the RoPE extrapolation above.
// Cost: O(Hq (Lw D^2 + L D^2)) with the covariance, O(Hq (Lw + L) D) without; memory O(D^2 + L).
// Numerics: statistics, z and the softmax in double (max subtracted), stored as float.
// L = 0 gives empty selections (the queries are not read then).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct expected_attention {
  static constexpr std::string_view name = "expected_attention";

  std::int64_t sinks = 4;        // first slots always kept, and left out of the query statistics
  bool covariance = true;        // include k^T Sigma k / (2 D)
  bool value_norm = true;        // multiply by ||v_j||_2 (needs observation.v)
  float epsilon = 0.0f;          // added to the averaged probabilities before the value norm
  double rope_base = 0.0;        // > 0: RoPE extrapolation with this base (half_split layout)
  std::int64_t rope_dim = 0;     // rotated channels (even); 0: all of D
  std::int64_t future = 512;     // number of future positions the rotation is averaged over

  // scores [Hkv, L] from observation.q [Hq, Lw, D], observation.k and (value_norm) observation.v.
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::expected_attention::scores";
    const obs_dims d = check(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    if (d.L == 0) return;
    const std::int64_t G = d.group(), D = d.D, first = std::min(sinks, d.L);
    const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));
    std::vector<double> mu(static_cast<std::size_t>(D)), sigma(static_cast<std::size_t>(D * D)), rows, z(static_cast<std::size_t>(d.L));
    std::vector<double> acc(static_cast<std::size_t>(d.L));
    const std::vector<std::pair<double, double>> avg = average_rotation(o, d);
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h = hk * G + g;
        statistics(o, d, h, avg, rows, mu, sigma);
        double zmax = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = first; j < d.L; ++j) {
          const float* k = o.k.ptr(hk, j);
          double lin = 0, quad = 0;
          for (std::int64_t a = 0; a < D; ++a) {
            lin += mu[static_cast<std::size_t>(a)] * k[a];
            if (!covariance) continue;
            double row = 0;
            for (std::int64_t b = 0; b < D; ++b) row += sigma[static_cast<std::size_t>(a * D + b)] * k[b];
            quad += static_cast<double>(k[a]) * row;
          }
          z[static_cast<std::size_t>(j)] = lin * inv_sqrt_d + quad / (2.0 * static_cast<double>(D));
          zmax = std::max(zmax, z[static_cast<std::size_t>(j)]);
        }
        double sum = 0;
        for (std::int64_t j = first; j < d.L; ++j) sum += std::exp(z[static_cast<std::size_t>(j)] - zmax);
        for (std::int64_t j = first; j < d.L; ++j) acc[static_cast<std::size_t>(j)] += std::exp(z[static_cast<std::size_t>(j)] - zmax) / sum;
      }
      for (std::int64_t j = first; j < d.L; ++j) {
        double s = acc[static_cast<std::size_t>(j)] / static_cast<double>(G) + epsilon;
        if (value_norm) {
          double vv = 0;
          for (std::int64_t c = 0; c < o.v.extent(2); ++c) vv += static_cast<double>(o.v(hk, j, c)) * o.v(hk, j, c);
          s *= std::sqrt(vv);
        }
        out(hk, j) = static_cast<float>(s);
      }
    }
    detail::force_slots(out, 0, first);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::expected_attention::select";
    const obs_dims d = check(fn, o);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    if (d.L > 0) scores(o, s);
    return top_budget(view<const float, 2>(s.data(), {d.Hkv, d.L}), budget);
  }

 private:
  obs_dims check(const char* fn, const observation& o) const {
    obs_dims d = detail::check(fn, o, false, false);
    detail::require(sinks >= 0, fn, ": sinks must be >= 0, got ", sinks);
    detail::require(epsilon >= 0.0f, fn, ": epsilon must be >= 0, got ", epsilon);
    if (value_norm)
      detail::require(!o.v.empty(), fn, ": observation.v [Hkv, L, Dv] must be a non-empty view (value_norm = true)");
    if (d.L == 0) return d;
    d = detail::check(fn, o, true, false);
    detail::require(rope_base >= 0.0, fn, ": rope_base must be >= 0 (0: no RoPE extrapolation), got ", rope_base);
    if (rope_base > 0.0) {
      const std::int64_t dim = rope_dim == 0 ? d.D : rope_dim;
      detail::require(dim >= 2 && dim <= d.D && dim % 2 == 0, fn, ": rope_dim must be 0 or even in [2, D = ", d.D, "], got ",
                      rope_dim);
      detail::require(future >= 1, fn, ": future must be >= 1, got ", future);
    }
    return d;
  }

  // Rotates pair (x_a, x_b) of every channel pair by angle(i) (RoPE's rule, half_split layout).
  template <class Angle>
  void rotate(double* x, std::int64_t dim, Angle&& cos_sin) const {
    const std::int64_t half = dim / 2;
    for (std::int64_t i = 0; i < half; ++i) {
      const auto [c, s] = cos_sin(i);
      const double a = x[i], b = x[i + half];
      x[i] = c * a - s * b;
      x[i + half] = c * b + s * a;
    }
  }

  double theta(std::int64_t i, std::int64_t dim) const {
    return std::pow(rope_base, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
  }

  // The position of window row 0 (see the header).
  static std::int64_t first_position(const observation& o, const obs_dims& d) { return o.causal ? d.L - d.Lw : d.L; }

  // (cbar_i, sbar_i) of every channel pair: the rotation averaged over the `future` positions after
  // the window (empty without RoPE extrapolation).
  std::vector<std::pair<double, double>> average_rotation(const observation& o, const obs_dims& d) const {
    if (!(rope_base > 0.0)) return {};
    const std::int64_t dim = rope_dim == 0 ? d.D : rope_dim, next = first_position(o, d) + d.Lw;
    std::vector<std::pair<double, double>> avg(static_cast<std::size_t>(dim / 2));
    for (std::int64_t i = 0; i < dim / 2; ++i) {
      double c = 0, s = 0;
      for (std::int64_t t = next; t < next + future; ++t) {
        c += std::cos(static_cast<double>(t) * theta(i, dim));
        s += std::sin(static_cast<double>(t) * theta(i, dim));
      }
      avg[static_cast<std::size_t>(i)] = {c / static_cast<double>(future), s / static_cast<double>(future)};
    }
    return avg;
  }

  // mu [D] and sigma [D, D] of query head h's window rows at positions >= sinks (see the header),
  // moved by the average rotation `avg` when RoPE extrapolation is on.
  void statistics(const observation& o, const obs_dims& d, std::int64_t h, const std::vector<std::pair<double, double>>& avg,
                  std::vector<double>& rows, std::vector<double>& mu, std::vector<double>& sigma) const {
    const std::int64_t D = d.D, first_pos = first_position(o, d);
    const bool rope = rope_base > 0.0;
    const std::int64_t dim = rope_dim == 0 ? D : rope_dim;
    rows.clear();
    std::int64_t n = 0;
    for (std::int64_t i = 0; i < d.Lw; ++i) {
      const std::int64_t p = first_pos + i;
      if (p < sinks) continue;
      const float* q = o.q.ptr(h, i);
      rows.insert(rows.end(), q, q + D);
      if (rope)  // back to the pre-RoPE query: the rotation by -p
        rotate(rows.data() + n * D, dim, [&](std::int64_t c) {
          const double angle = -static_cast<double>(p) * theta(c, dim);
          return std::pair{std::cos(angle), std::sin(angle)};
        });
      ++n;
    }
    std::fill(mu.begin(), mu.end(), 0.0);
    std::fill(sigma.begin(), sigma.end(), 0.0);
    for (std::int64_t r = 0; r < n; ++r)
      for (std::int64_t a = 0; a < D; ++a) mu[static_cast<std::size_t>(a)] += rows[static_cast<std::size_t>(r * D + a)];
    for (double& m : mu) m /= static_cast<double>(n);
    if (covariance) {
      for (std::int64_t r = 0; r < n; ++r)
        for (std::int64_t a = 0; a < D; ++a) {
          const double xa = rows[static_cast<std::size_t>(r * D + a)] - mu[static_cast<std::size_t>(a)];
          for (std::int64_t b = 0; b < D; ++b)
            sigma[static_cast<std::size_t>(a * D + b)] += xa * (rows[static_cast<std::size_t>(r * D + b)] - mu[static_cast<std::size_t>(b)]);
        }
      for (double& s : sigma) s /= static_cast<double>(n);
    }
    if (!rope) return;
    // The average rotation over the next `future` positions, applied as R mu and R Sigma R^T.
    auto by_avg = [&](std::int64_t i) { return avg[static_cast<std::size_t>(i)]; };
    rotate(mu.data(), dim, by_avg);
    if (!covariance) return;
    for (std::int64_t a = 0; a < D; ++a) rotate(sigma.data() + a * D, dim, by_avg);  // rows: Sigma R^T
    std::vector<double> col(static_cast<std::size_t>(D));
    for (std::int64_t b = 0; b < D; ++b) {  // columns: R (Sigma R^T)
      for (std::int64_t a = 0; a < D; ++a) col[static_cast<std::size_t>(a)] = sigma[static_cast<std::size_t>(a * D + b)];
      rotate(col.data(), dim, by_avg);
      for (std::int64_t a = 0; a < D; ++a) sigma[static_cast<std::size_t>(a * D + b)] = col[static_cast<std::size_t>(a)];
    }
  }
};

}  // namespace mnemo::kvcache::policies

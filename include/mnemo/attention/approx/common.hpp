// mnemo/attention/approx/common.hpp — what the approximate-attention headers share: argument
// checks, the error measure they are judged by, deterministic Gaussian streams, the orthogonal
// random features of FAVOR+ (performer.hpp, scatterbrain.hpp) and the positive feature map.
//
//   relative_error(got, want)       ||got - want||_F / ||want||_F over every element (double)
//   gaussian_stream(seed)           N(0, 1) draws (core/random.hpp: the same numbers on every
//                                   platform and standard library)
//   orthogonal_features(m, D, seed) W [m, D]: blocks of D rows, each block an orthonormal basis
//                                   (modified Gram-Schmidt of a Gaussian D x D matrix, in double)
//                                   with every row rescaled to the norm of an independent Gaussian
//                                   D-vector (chi_D), so each row is marginally N(0, I_D) and rows
//                                   of one block are exactly orthogonal (Choromanski et al. 2021,
//                                   "Rethinking Attention with Performers", ICLR, section 4.2)
//   The positive feature map of FAVOR+ for the softmax kernel exp(scale q.k), on x' = sqrt(scale) x:
//     phi(x)_r = exp(w_r . x' - |x'|^2 / 2 - shift) / sqrt(m),     E[phi(q) . phi(k)] e^{shifts} = exp(scale q.k)
//   feature_logits computes w_r . x' - |x'|^2 / 2 (the exponent before the shift).
//
// Shapes follow DESIGN.md: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv];
// query head h reads kv head h / (Hq / Hkv).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/common.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/random.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::attention::approx {

// ||got - want||_F / ||want||_F over all elements of two views of one shape (any strides); 0 when
// both are zero, +inf when only want is.
template <class G, class W, int R>
double relative_error(const view<G, R>& got, const view<W, R>& want) {
  mnemo::detail::require(got.shape() == want.shape(), "approx::relative_error: got ", shape_string(got.shape()),
                         " and want ", shape_string(want.shape()), " must have the same shape");
  double err = 0, ref = 0;
  shape_t<R> idx{};
  const std::int64_t n = got.size();
  for (std::int64_t flat = 0; flat < n; ++flat) {
    std::int64_t rest = flat, go = 0, wo = 0;
    for (int d = R - 1; d >= 0; --d) {
      idx[d] = rest % got.extent(d);
      rest /= got.extent(d);
      go += idx[d] * got.stride(d);
      wo += idx[d] * want.stride(d);
    }
    const double w = static_cast<double>(want.data()[wo]), e = static_cast<double>(got.data()[go]) - w;
    err += e * e;
    ref += w * w;
  }
  if (ref == 0) return err == 0 ? 0.0 : std::numeric_limits<double>::infinity();
  return std::sqrt(err / ref);
}

template <class G, class W, int R>
double relative_error(const tensor<G, R>& got, const tensor<W, R>& want) {
  return relative_error(got.as_view(), want.as_view());
}

// N(0, 1) draws, reproducible from a seed on every platform (core/random.hpp).
using rng::gaussian_stream;

// FAVOR+'s orthogonal Gaussian features W [m, D] (see the header). The same (m, D, seed) always
// gives the same matrix; the first rows of a larger m are not those of a smaller one.
inline tensor<float, 2> orthogonal_features(std::int64_t m, std::int64_t D, std::uint64_t seed) {
  mnemo::detail::require(m >= 1, "approx::orthogonal_features: the feature count m must be >= 1, got ", m);
  mnemo::detail::require(D >= 1, "approx::orthogonal_features: the head dim D must be >= 1, got ", D);
  tensor<float, 2> w({m, D});
  gaussian_stream g(seed);
  std::vector<double> block(static_cast<std::size_t>(D * D));
  for (std::int64_t r0 = 0; r0 < m; r0 += D) {
    for (double& x : block) x = g.next();
    // Modified Gram-Schmidt over the rows (a Gaussian matrix has full rank with probability 1; a
    // row that came out degenerate is redrawn).
    for (std::int64_t i = 0; i < D; ++i) {
      double* ri = block.data() + i * D;
      for (int attempt = 0;; ++attempt) {
        for (std::int64_t p = 0; p < i; ++p) {
          const double* rp = block.data() + p * D;
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c) dot += ri[c] * rp[c];
          for (std::int64_t c = 0; c < D; ++c) ri[c] -= dot * rp[c];
        }
        double norm = 0;
        for (std::int64_t c = 0; c < D; ++c) norm += ri[c] * ri[c];
        norm = std::sqrt(norm);
        if (norm > 1e-8 || attempt == 8) {
          for (std::int64_t c = 0; c < D; ++c) ri[c] /= norm;
          break;
        }
        for (std::int64_t c = 0; c < D; ++c) ri[c] = g.next();
      }
    }
    for (std::int64_t i = 0; i < D && r0 + i < m; ++i) {
      double chi = 0;  // the norm of an independent Gaussian D-vector
      for (std::int64_t c = 0; c < D; ++c) {
        const double x = g.next();
        chi += x * x;
      }
      chi = std::sqrt(chi);
      for (std::int64_t c = 0; c < D; ++c) w(r0 + i, c) = static_cast<float>(chi * block[static_cast<std::size_t>(i * D + c)]);
    }
  }
  return w;
}

namespace detail {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using dmatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using rows_map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using const_rows_map = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

// The [L, D] rows of head (b, h) of a [B, H, L, D] view, in place.
inline const_rows_map head_rows(const view<const float, 4>& x, std::int64_t b, std::int64_t h) {
  return const_rows_map(x.ptr(b, h, 0, 0), x.extent(2), x.extent(3), Eigen::OuterStride<>(x.stride(2)));
}
inline rows_map head_rows(const view<float, 4>& x, std::int64_t b, std::int64_t h) {
  return rows_map(x.ptr(b, h, 0, 0), x.extent(2), x.extent(3), Eigen::OuterStride<>(x.stride(2)));
}

// The attention argument checks (attention/common.hpp) for f32 q, k, v, out, no lse, no mask;
// options.sinks are not part of these approximations and are rejected.
inline dims check_qkv(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                      const view<const float, 4>& v, const view<float, 4>& out, float scale, int threads) {
  options opt;
  opt.scale = scale;
  opt.threads = threads;
  return attention::detail::check_args(fn, q, k, v, out, view<float, 3>{}, mods::none{}, opt);
}

// Logits w_r . x' - |x'|^2 / 2 of FAVOR+ for the n rows of x [n, D] (x' = sqrt(scale) x), into
// out [n, m] (float, Eigen GEMM).
template <class X>
void feature_logits(const X& x, const matrix& w, float scale, matrix& out) {
  const float root = std::sqrt(scale);
  out.resize(x.rows(), w.rows());
  out.noalias() = (root * x) * w.transpose();
  out.array().colwise() -= 0.5f * scale * x.rowwise().squaredNorm().array();
}

// The same in double for one row.
inline void feature_logits_row(const float* x, const view<const float, 2>& w, double scale, double* out) {
  const std::int64_t m = w.extent(0), D = w.extent(1);
  const double root = std::sqrt(scale);
  double sq = 0;
  for (std::int64_t c = 0; c < D; ++c) sq += static_cast<double>(x[c]) * x[c];
  for (std::int64_t r = 0; r < m; ++r) {
    double dot = 0;
    for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(w(r, c)) * x[c];
    out[r] = root * dot - 0.5 * scale * sq;
  }
}

// FAVOR+ features of the keys of one head, k [n, D] -> phi [n, m] with the one shift c = the largest
// logit over all n keys and m features (one constant for every key, so it cancels in every ratio of
// kernel sums); returns c. Float, exp on Eigen's vectorised path.
template <class X>
float key_features(const X& k, const matrix& w, float scale, matrix& phi) {
  feature_logits(k, w, scale, phi);
  const float c = phi.size() > 0 ? phi.maxCoeff() : 0.0f;
  const float norm = 1.0f / std::sqrt(static_cast<float>(w.rows()));
  phi.array() = (phi.array() - c).exp() * norm;
  return c;
}

// FAVOR+ features of n query rows, q [n, D] -> phi [n, m], each row shifted by its own largest
// logit a_i (written to a[i]; a per-row constant cancels in that row's ratio).
template <class X>
void query_features(const X& q, const matrix& w, float scale, matrix& phi, float* a) {
  feature_logits(q, w, scale, phi);
  const float norm = 1.0f / std::sqrt(static_cast<float>(w.rows()));
  for (Eigen::Index i = 0; i < phi.rows(); ++i) {
    a[i] = phi.row(i).maxCoeff();
    phi.row(i).array() = (phi.row(i).array() - a[i]).exp() * norm;
  }
}

// The reference's features in double: rows [n, m] of x (one head, rows at stride ld), shifted by
// the global maximum (keys) or per row (queries, shifts written to `a`).
inline std::vector<double> reference_features(const float* x, std::int64_t n, std::int64_t ld,
                                              const view<const float, 2>& w, double scale, bool per_row,
                                              double* a_or_c) {
  const std::int64_t m = w.extent(0);
  std::vector<double> phi(static_cast<std::size_t>(n * m));
  double c = -std::numeric_limits<double>::infinity();
  for (std::int64_t i = 0; i < n; ++i) {
    double* row = phi.data() + i * m;
    feature_logits_row(x + i * ld, w, scale, row);
    const double rmax = *std::max_element(row, row + m);
    if (per_row) {
      a_or_c[i] = rmax;
      for (std::int64_t r = 0; r < m; ++r) row[r] = std::exp(row[r] - rmax) / std::sqrt(static_cast<double>(m));
    }
    c = std::max(c, rmax);
  }
  if (!per_row) {
    *a_or_c = n > 0 ? c : 0.0;
    for (double& x2 : phi) x2 = std::exp(x2 - *a_or_c) / std::sqrt(static_cast<double>(m));
  }
  return phi;
}

}  // namespace detail
}  // namespace mnemo::attention::approx

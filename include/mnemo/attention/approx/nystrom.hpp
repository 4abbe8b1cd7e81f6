// mnemo/attention/approx/nystrom.hpp — Nyströmformer attention (Xiong, Zeng, Chakraborty, Tan, Fung,
// Li, Singh, "Nyströmformer: A Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021).
// Non-causal.
//
//   Landmarks (the paper's segment means): m segments of the rows, segment s = rows
//     [floor(s L / m), floor((s + 1) L / m)) (equal lengths L / m when m divides L, as in the paper;
//     lengths differing by at most one otherwise), Q~_s = mean of the segment's rows of Q, K~_s of K.
//   F = softmax(scale Q K~^T)      [Lq, m]
//   A = softmax(scale Q~ K~^T)     [m, m]
//   G = softmax(scale Q~ K^T)      [m, Lk]          (row-wise softmax everywhere)
//   out = F A^+ (G V)                               [Lq, Dv]
//   A^+ by the paper's iterative Newton–Schulz (hyper-power) scheme, eq. (14) and its initialisation:
//     Z_0 = A^T / (||A||_1 ||A||_inf)               (max column sum times max row sum of |A|)
//     Z_{j+1} = 1/4 Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j)))
//   options.pinv_iterations times (6, the paper's default).
// With m = Lq = Lk every segment is one row: F = A = G = softmax(scale Q K^T) and out = A A^+ A V =
// exact attention, up to how far the iteration has converged.
// Left out: the paper's depthwise convolution skip on V (a learned residual added to the output,
// not part of the approximation); a caller adds it to out.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv] (GQA: query
// head h reads kv head h / (Hq / Hkv)), f32; 1 <= m <= min(Lq, Lk).
// Numerics: reference::nystrom computes everything in double with plain loops. The fast path: the
// softmax matrices and products in float (Eigen GEMM, vectorised exp; rows shifted by their max),
// the m x m iteration and A^+ (G V) in double (m^3 work, small next to the O(L m D) rest, and the
// iteration amplifies rounding when A is ill-conditioned). Threads over (batch, head).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/approx/common.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"

namespace mnemo::attention::approx {

struct nystrom_options {
  std::int64_t landmarks = 64;  // m, 1 <= m <= min(Lq, Lk)
  int pinv_iterations = 6;      // Newton–Schulz steps for A^+ (>= 0)
  float scale = 0;              // 0: 1 / sqrt(D)
  int threads = 0;              // 0: the OpenMP default
};

namespace detail {

inline dims check_nystrom(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                          const view<const float, 4>& v, const view<float, 4>& out, const nystrom_options& opt) {
  const dims d = check_qkv(fn, q, k, v, out, opt.scale, opt.threads);
  mnemo::detail::require(opt.landmarks >= 1 && opt.landmarks <= std::min(d.Lq, d.Lk), fn,
                         ": options.landmarks (m) must be in [1, min(Lq, Lk) = ", std::min(d.Lq, d.Lk), "], got ",
                         opt.landmarks, " (Lq=", d.Lq, ", Lk=", d.Lk, ")");
  mnemo::detail::require(opt.pinv_iterations >= 0, fn, ": options.pinv_iterations must be >= 0, got ",
                         opt.pinv_iterations);
  return d;
}

// First row of segment s of L rows in m segments.
inline std::int64_t segment_start(std::int64_t s, std::int64_t L, std::int64_t m) { return s * L / m; }

// The Newton–Schulz pseudo-inverse of the m x m matrix a (row-major, double), as in the header.
inline dmatrix newton_schulz_pinv(const dmatrix& a, int iterations) {
  const Eigen::Index m = a.rows();
  const double col = a.cwiseAbs().colwise().sum().maxCoeff(), row = a.cwiseAbs().rowwise().sum().maxCoeff();
  dmatrix z = a.transpose() / (col * row);
  const dmatrix I = dmatrix::Identity(m, m);
  for (int it = 0; it < iterations; ++it) {
    const dmatrix az = a * z;
    z = 0.25 * z * (13.0 * I - az * (15.0 * I - az * (7.0 * I - az)));
  }
  return z;
}

// Row-wise softmax of x in place (float; rows shifted by their max).
inline void softmax_rows(matrix& x) {
  for (Eigen::Index i = 0; i < x.rows(); ++i) {
    const float mx = x.row(i).maxCoeff();
    x.row(i).array() = (x.row(i).array() - mx).exp();
    x.row(i) /= x.row(i).sum();
  }
}

}  // namespace detail

namespace reference {

// Nyströmformer in double (see the header).
inline void nystrom(view<const float, 4> q,  // [B, Hq, Lq, D]
                    view<const float, 4> k,  // [B, Hkv, Lk, D]
                    view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                    view<float, 4> out,      // [B, Hq, Lq, Dv]
                    const nystrom_options& opt = {}) {
  constexpr const char* fn = "approx::reference::nystrom";
  const dims d = detail::check_nystrom(fn, q, k, v, out, opt);
  const std::int64_t m = opt.landmarks;
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        using vec = std::vector<double>;
        auto at = [](auto& x, std::int64_t cols, std::int64_t i, std::int64_t j) -> auto& {
          return x[static_cast<std::size_t>(i * cols + j)];
        };
        // Landmarks: segment means.
        auto means = [&](const view<const float, 4>& x, std::int64_t hx, std::int64_t L) {
          vec lm(static_cast<std::size_t>(m * d.D), 0.0);
          for (std::int64_t s = 0; s < m; ++s) {
            const std::int64_t r0 = detail::segment_start(s, L, m), r1 = detail::segment_start(s + 1, L, m);
            for (std::int64_t r = r0; r < r1; ++r)
              for (std::int64_t c = 0; c < d.D; ++c) at(lm, d.D, s, c) += x(b, hx, r, c);
            for (std::int64_t c = 0; c < d.D; ++c) at(lm, d.D, s, c) /= static_cast<double>(r1 - r0);
          }
          return lm;
        };
        const vec ql = means(q, h, d.Lq), kl = means(k, hk, d.Lk);
        // softmax(scale X Y^T) rows, X rows from fx(i, c), Y rows from fy(j, c).
        auto softmax = [&](std::int64_t rows, std::int64_t cols, auto fx, auto fy) {
          vec p(static_cast<std::size_t>(rows * cols));
          for (std::int64_t i = 0; i < rows; ++i) {
            double mx = -std::numeric_limits<double>::infinity(), sum = 0;
            for (std::int64_t j = 0; j < cols; ++j) {
              double dot = 0;
              for (std::int64_t c = 0; c < d.D; ++c) dot += fx(i, c) * fy(j, c);
              at(p, cols, i, j) = static_cast<double>(d.scale) * dot;
              mx = std::max(mx, at(p, cols, i, j));
            }
            for (std::int64_t j = 0; j < cols; ++j) sum += (at(p, cols, i, j) = std::exp(at(p, cols, i, j) - mx));
            for (std::int64_t j = 0; j < cols; ++j) at(p, cols, i, j) /= sum;
          }
          return p;
        };
        auto qrow = [&](std::int64_t i, std::int64_t c) { return static_cast<double>(q(b, h, i, c)); };
        auto krow = [&](std::int64_t j, std::int64_t c) { return static_cast<double>(k(b, hk, j, c)); };
        auto qlrow = [&](std::int64_t i, std::int64_t c) { return ql[static_cast<std::size_t>(i * d.D + c)]; };
        auto klrow = [&](std::int64_t j, std::int64_t c) { return kl[static_cast<std::size_t>(j * d.D + c)]; };
        const vec F = softmax(d.Lq, m, qrow, klrow), A = softmax(m, m, qlrow, klrow), G = softmax(m, d.Lk, qlrow, krow);
        // Newton–Schulz in plain loops.
        auto mul = [&](const vec& x, const vec& y) {  // m x m products
          vec p(static_cast<std::size_t>(m * m), 0.0);
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t t = 0; t < m; ++t)
              for (std::int64_t j = 0; j < m; ++j) p[static_cast<std::size_t>(i * m + j)] += x[static_cast<std::size_t>(i * m + t)] * y[static_cast<std::size_t>(t * m + j)];
          return p;
        };
        auto c_minus = [&](double cst, const vec& x) {  // cst I - x
          vec p(x.size());
          for (std::int64_t i = 0; i < m; ++i)
            for (std::int64_t j = 0; j < m; ++j) p[static_cast<std::size_t>(i * m + j)] = (i == j ? cst : 0.0) - x[static_cast<std::size_t>(i * m + j)];
          return p;
        };
        double colmax = 0, rowmax = 0;
        for (std::int64_t i = 0; i < m; ++i) {
          double rs = 0, cs = 0;
          for (std::int64_t j = 0; j < m; ++j) rs += std::fabs(A[static_cast<std::size_t>(i * m + j)]), cs += std::fabs(A[static_cast<std::size_t>(j * m + i)]);
          rowmax = std::max(rowmax, rs);
          colmax = std::max(colmax, cs);
        }
        vec Z(static_cast<std::size_t>(m * m));
        for (std::int64_t i = 0; i < m; ++i)
          for (std::int64_t j = 0; j < m; ++j) Z[static_cast<std::size_t>(i * m + j)] = A[static_cast<std::size_t>(j * m + i)] / (colmax * rowmax);
        for (int it = 0; it < opt.pinv_iterations; ++it) {
          const vec AZ = mul(A, Z);
          vec Y = mul(Z, c_minus(13.0, mul(AZ, c_minus(15.0, mul(AZ, c_minus(7.0, AZ))))));
          for (double& y : Y) y *= 0.25;
          Z = std::move(Y);
        }
        // out = F (Z (G V))
        vec GV(static_cast<std::size_t>(m * d.Dv), 0.0), W(static_cast<std::size_t>(m * d.Dv), 0.0);
        for (std::int64_t s = 0; s < m; ++s)
          for (std::int64_t j = 0; j < d.Lk; ++j)
            for (std::int64_t c = 0; c < d.Dv; ++c) at(GV, d.Dv, s, c) += at(G, d.Lk, s, j) * v(b, hk, j, c);
        for (std::int64_t s = 0; s < m; ++s)
          for (std::int64_t t = 0; t < m; ++t)
            for (std::int64_t c = 0; c < d.Dv; ++c) at(W, d.Dv, s, c) += Z[static_cast<std::size_t>(s * m + t)] * at(GV, d.Dv, t, c);
        for (std::int64_t i = 0; i < d.Lq; ++i)
          for (std::int64_t c = 0; c < d.Dv; ++c) {
            double acc = 0;
            for (std::int64_t s = 0; s < m; ++s) acc += F[static_cast<std::size_t>(i * m + s)] * at(W, d.Dv, s, c);
            out(b, h, i, c) = static_cast<float>(acc);
          }
      },
      opt.threads);
}

}  // namespace reference

// Nyströmformer attention, f32 with the m x m pseudo-inverse in double (see the header).
inline void nystrom(view<const float, 4> q,  // [B, Hq, Lq, D]
                    view<const float, 4> k,  // [B, Hkv, Lk, D]
                    view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                    view<float, 4> out,      // [B, Hq, Lq, Dv]
                    const nystrom_options& opt = {}) {
  using detail::matrix;
  using mnemo::detail::accumulate;
  constexpr const char* fn = "approx::nystrom";
  const dims d = detail::check_nystrom(fn, q, k, v, out, opt);
  const std::int64_t m = opt.landmarks;
  mnemo::detail::for_each_item(d.B * d.Hq, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
    const auto K = detail::head_rows(k, b, hk);
    const auto V = detail::head_rows(v, b, hk);
    const auto Q = detail::head_rows(q, b, h);
    auto O = detail::head_rows(out, b, h);
    auto means = [&](const auto& X, std::int64_t L) {
      matrix lm(m, d.D);
      for (std::int64_t s = 0; s < m; ++s) {
        const std::int64_t r0 = detail::segment_start(s, L, m), r1 = detail::segment_start(s + 1, L, m);
        lm.row(s) = X.middleRows(r0, r1 - r0).colwise().sum() / static_cast<float>(r1 - r0);
      }
      return lm;
    };
    const matrix ql = means(Q, d.Lq), kl = means(K, d.Lk);
    matrix f(d.Lq, m), a(m, m), g(m, d.Lk), gv(m, d.Dv);
    mnemo::detail::gemm<accumulate::assign>(f, Q, kl.transpose());
    mnemo::detail::gemm<accumulate::assign>(a, ql, kl.transpose());
    mnemo::detail::gemm<accumulate::assign>(g, ql, K.transpose());
    f *= d.scale;
    a *= d.scale;
    g *= d.scale;
    detail::softmax_rows(f);
    detail::softmax_rows(a);
    detail::softmax_rows(g);
    mnemo::detail::gemm<accumulate::assign>(gv, g, V);
    const detail::dmatrix z = detail::newton_schulz_pinv(a.cast<double>(), opt.pinv_iterations);
    const matrix w = (z * gv.cast<double>()).cast<float>();
    mnemo::detail::gemm<accumulate::assign>(O, f, w);
  });
}

}  // namespace mnemo::attention::approx

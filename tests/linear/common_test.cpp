// Tests of mnemo/linear/common.hpp: decay tables (incl. -inf gates), feature maps against their
// double references, the choice of form, the head loop, and the GEMM wrapper that keeps Eigen from
// starting its own threads.
#include <gtest/gtest.h>

#include <Eigen/Core>
#include <atomic>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/linear/common.hpp"

namespace {

namespace linear = mnemo::linear;
namespace ld = mnemo::linear::detail;
using arch = mnemo::simd::default_arch;
using mnemo::tensor;

// decay(t, j) = exp(sum_{j < s <= t} g_s), prefix and suffix, against sums in double, with gates
// near 0, moderate, huge and -inf (exact zeros, never NaN).
TEST(linear_common, scalar_decay_tables) {
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> g = {-0.01f, -0.0f, -2.0f, -inf, -1e-7f, -0.5f, -200.0f, -0.3f, -inf, -inf, -0.1f, -1e30f, -0.2f};
  const std::int64_t n = static_cast<std::int64_t>(g.size());
  ld::matrix decay(n, n);
  std::vector<float> prefix(n), suffix(n);
  ld::scalar_decay_tables<arch>(g.data(), n, decay, prefix.data(), suffix.data());
  auto range = [&](std::int64_t lo, std::int64_t hi) {  // exp(sum g over (lo, hi])
    double s = 0;
    for (std::int64_t i = lo + 1; i <= hi; ++i) s += g[i];
    return std::exp(s);
  };
  for (std::int64_t t = 0; t < n; ++t) {
    EXPECT_NEAR(prefix[t], range(-1, t), 1e-6 * range(-1, t) + 1e-30) << "prefix " << t;
    EXPECT_NEAR(suffix[t], range(t, n - 1), 1e-6 * range(t, n - 1) + 1e-30) << "suffix " << t;
    for (std::int64_t j = 0; j <= t; ++j) {
      ASSERT_FALSE(std::isnan(decay(t, j))) << t << ", " << j;
      EXPECT_NEAR(decay(t, j), range(j, t), 1e-6 * range(j, t) + 1e-30) << t << ", " << j;
    }
  }
  EXPECT_EQ(decay(5, 2), 0.0f);  // crosses the -inf at 3
  EXPECT_NEAR(decay(10, 9), std::exp(-0.1), 1e-7);  // after two -inf gates: still exact
}

// Every feature map against its double reference, with and without the L2 norm.
TEST(linear_common, prepare_row_matches_reference) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (std::int64_t Dk : {1, 5, 16, 37}) {
    std::vector<float> x(Dk);
    for (float& e : x) e = u(rng);
    for (auto map : {linear::feature_map::identity, linear::feature_map::elu_plus_one, linear::feature_map::relu,
                     linear::feature_map::taylor2})
      for (bool l2 : {false, true}) {
        ld::dims d{1, 1, 1, Dk, 1, linear::feature_dim(map, Dk), 1, 1.0f, map, l2, false};
        std::vector<float> out(d.Df), scratch(Dk);
        ld::prepare_row<arch>(x.data(), d, 0.5f, out.data(), scratch.data());
        const std::vector<double> want = ld::reference_row(x.data(), d, 0.5);
        ASSERT_EQ(static_cast<std::int64_t>(want.size()), d.Df);
        for (std::int64_t i = 0; i < d.Df; ++i)
          EXPECT_NEAR(out[i], want[i], 1e-6 * (1 + std::abs(want[i])))
              << linear::feature_map_name(map) << " l2=" << l2 << " Dk=" << Dk << " i=" << i;
      }
  }
}

TEST(linear_common, feature_dim_and_form) {
  EXPECT_EQ(linear::feature_dim(linear::feature_map::identity, 7), 7);
  EXPECT_EQ(linear::feature_dim(linear::feature_map::elu_plus_one, 7), 7);
  EXPECT_EQ(linear::feature_dim(linear::feature_map::taylor2, 7), 1 + 7 + 49);
  linear::options opt;
  EXPECT_EQ(ld::choose_form(opt, 1), linear::form::recurrent);
  EXPECT_EQ(ld::choose_form(opt, linear::recurrent_below - 1), linear::form::recurrent);
  EXPECT_EQ(ld::choose_form(opt, linear::recurrent_below), linear::form::chunked);
  opt.path = linear::form::chunked;
  EXPECT_EQ(ld::choose_form(opt, 1), linear::form::chunked);
  opt.path = linear::form::recurrent;
  EXPECT_EQ(ld::choose_form(opt, 100000), linear::form::recurrent);
  EXPECT_EQ(ld::chunk_size({}, 17), 17);
  EXPECT_EQ(ld::chunk_size({.chunk_size = 5}, 17), 5);
}

// Each item exactly once, whatever the thread count and whether Eigen is in play.
TEST(linear_common, for_each_head_runs_every_item_once) {
  for (int threads : {0, 1, 2})
    for (bool eigen : {false, true})
      for (std::int64_t n : {0, 1, 7}) {
        std::vector<std::atomic<int>> seen(static_cast<std::size_t>(n));
        ld::for_each_head(n, threads, eigen, [&](std::int64_t i) { ++seen[static_cast<std::size_t>(i)]; });
        for (std::int64_t i = 0; i < n; ++i) EXPECT_EQ(seen[i].load(), 1) << threads << " " << eigen << " " << i;
      }
}

// gemm() equals Eigen's product on the direct path and on the panel path (taken when a global
// Eigen::setNbThreads(n > 1) would make Eigen thread), for destinations that are matrices, blocks
// and strided maps, overwrite and accumulate.
TEST(linear_common, gemm_direct_and_panels) {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  auto random = [&](std::int64_t r, std::int64_t c) {
    ld::matrix m(r, c);
    for (std::int64_t i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
    return m;
  };
  for (int eigen_threads : {1, 2}) {
    Eigen::setNbThreads(eigen_threads);
    for (std::int64_t rows : {1, 31, 32, 33, 100}) {
      const ld::matrix a = random(rows, 70), b = random(70, 45);
      ld::matrix want = a * b;
      ld::matrix c(rows, 45);
      ld::gemm<false>(c, a, b);
      EXPECT_LE((c - want).cwiseAbs().maxCoeff(), 1e-5) << "matrix rows " << rows;
      ld::gemm<true>(c, a, b);
      EXPECT_LE((c - 2 * want).cwiseAbs().maxCoeff(), 2e-5) << "accumulate rows " << rows;
      ld::matrix wide = ld::matrix::Zero(rows + 3, 60);  // a strided map of its middle columns
      ld::state_map m(&wide(2, 5), rows, 45, Eigen::OuterStride<>(60));
      ld::gemm<false>(m, a, b);
      EXPECT_LE((ld::matrix(m) - want).cwiseAbs().maxCoeff(), 1e-5) << "map rows " << rows;
      EXPECT_EQ(wide.topRows(2).cwiseAbs().maxCoeff(), 0.0f) << "wrote outside the map";
      EXPECT_EQ(wide.middleCols(50, 10).cwiseAbs().maxCoeff(), 0.0f) << "wrote outside the map";
      ld::matrix big = ld::matrix::Zero(rows + 4, 45);
      ld::gemm<false>(big.middleRows(4, rows), a.transpose().transpose(), b);
      EXPECT_LE((big.middleRows(4, rows) - want).cwiseAbs().maxCoeff(), 1e-5) << "block rows " << rows;
    }
  }
  Eigen::setNbThreads(0);  // back to Eigen's default (the OpenMP setting)
}

// all_nonpositive: zeros of both signs, negatives down to -inf pass; anything positive (down to the
// smallest subnormal), +inf and NaNs of either sign fail, at every position of a vector body and tail.
TEST(linear_common, all_nonpositive_special_values) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const float denorm = std::numeric_limits<float>::denorm_min();
  for (std::int64_t n : {1, 7, 16, 37}) {
    std::vector<float> x(n, -0.5f);
    x[0] = 0.0f;
    x[n / 2] = -0.0f;
    x[n - 1] = -inf;
    EXPECT_TRUE(ld::all_nonpositive(x.data(), n)) << n;
    for (float bad : {denorm, 1e-30f, 1.0f, inf, nan, -nan})
      for (std::int64_t i : {std::int64_t{0}, n / 2, n - 1}) {
        std::vector<float> y = x;
        y[i] = bad;
        EXPECT_FALSE(ld::all_nonpositive(y.data(), n)) << "n=" << n << " i=" << i << " x=" << bad;
      }
  }
  EXPECT_TRUE(ld::all_nonpositive(nullptr, 0));
}

// recurrent_token (register blocks + scalar tail) against the recurrence in double: plain, scalar
// decay, per-row decays and the delta rule, on column counts around the vector width and a row
// stride wider than the state.
TEST(linear_common, recurrent_token_matches_double) {
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f), e(0.5f, 1.0f);
  const std::int64_t w = mnemo::simd::width<arch>;
  for (std::int64_t Df : {1, 5, 33})
    for (std::int64_t Ds : {std::int64_t{1}, w - 1, w, w + 1, 3 * w, 4 * w, 5 * w + 3})
      for (int kind = 0; kind < 4; ++kind) {  // 0 plain, 1 scalar decay, 2 row decays, 3 delta with decay
        const std::int64_t lds = Ds + 3;
        std::vector<float> s(Df * lds), q(Df), k(Df), v(Ds), rows(Df), out(Ds);
        for (auto* x : {&s, &q, &k, &v}) for (float& y : *x) y = u(rng);
        for (float& y : rows) y = e(rng);
        const float a = kind == 1 || kind == 3 ? e(rng) : 1.0f, beta = 0.7f;
        ld::token_decay decay{a, kind == 2 ? rows.data() : nullptr};
        std::vector<double> want_s(s.begin(), s.end()), want_o(Ds, 0.0);
        for (std::int64_t c = 0; c < Ds; ++c) {
          double uc = v[c];
          if (kind == 3) {
            double wc = 0;
            for (std::int64_t i = 0; i < Df; ++i) wc += want_s[i * lds + c] * k[i];
            uc = beta * (v[c] - a * wc);
          }
          for (std::int64_t i = 0; i < Df; ++i) {
            double& x = want_s[i * lds + c];
            x = (kind == 2 ? rows[i] : a) * x + k[i] * uc;
            want_o[c] += q[i] * x;
          }
        }
        ld::recurrent_token<arch>(s.data(), lds, Df, Ds, q.data(), k.data(), v.data(), kind == 3 ? &beta : nullptr,
                                  decay, out.data());
        for (std::int64_t c = 0; c < Ds; ++c) {
          EXPECT_NEAR(out[c], want_o[c], 1e-5 * Df) << "Df=" << Df << " Ds=" << Ds << " kind=" << kind << " c=" << c;
          for (std::int64_t i = 0; i < Df; ++i)
            EXPECT_NEAR(s[i * lds + c], want_s[i * lds + c], 1e-5 * Df) << "state " << i << ", " << c;
        }
        for (std::int64_t i = 0; i < Df; ++i)  // the padding columns are untouched
          for (std::int64_t c = Ds; c < lds; ++c) EXPECT_EQ(s[i * lds + c], static_cast<float>(want_s[i * lds + c]));
      }
}

// chunk_products against the products in double, with and without the row factors, chunk heights
// around the micro-kernel's, column counts over several column blocks, strided operands.
TEST(linear_common, chunk_products_match_double) {
  std::mt19937 rng(9);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const std::int64_t w = mnemo::simd::width<arch>;
  for (std::int64_t n : {1, 5, 6, 7, 13, 32})
    for (std::int64_t Df : {3, 20})
      for (std::int64_t Ds : {w, 5 * w})
        for (bool alphas : {false, true}) {
          const std::int64_t ld_in = Df + 2, ldv = Ds + 1, lds = Ds + 5, ldo = Ds + 2;
          std::vector<float> q(n * ld_in), k(n * ld_in), v(n * ldv), a(n * n, 0.0f), s(Df * lds), o(n * ldo, 7.0f);
          std::vector<float> alpha_o(n), alpha_s(Df);
          for (auto* x : {&q, &k, &v, &s, &alpha_o, &alpha_s}) for (float& y : *x) y = u(rng);
          for (std::int64_t t = 0; t < n; ++t)
            for (std::int64_t j = 0; j <= t; ++j) a[t * n + j] = u(rng);
          std::vector<double> want_o(n * Ds), want_s(Df * Ds);
          for (std::int64_t t = 0; t < n; ++t)
            for (std::int64_t c = 0; c < Ds; ++c) {
              double qs = 0, av = 0;
              for (std::int64_t i = 0; i < Df; ++i) qs += double(q[t * ld_in + i]) * s[i * lds + c];
              for (std::int64_t j = 0; j <= t; ++j) av += double(a[t * n + j]) * v[j * ldv + c];
              want_o[t * Ds + c] = (alphas ? alpha_o[t] : 1.0) * qs + av;
            }
          for (std::int64_t i = 0; i < Df; ++i)
            for (std::int64_t c = 0; c < Ds; ++c) {
              double kv = 0;
              for (std::int64_t j = 0; j < n; ++j) kv += double(k[j * ld_in + i]) * v[j * ldv + c];
              want_s[i * Ds + c] = (alphas ? alpha_s[i] : 1.0) * s[i * lds + c] + kv;
            }
          ld::chunk_products<arch>(n, Df, Ds, {q.data(), ld_in}, {a.data(), n}, {k.data(), ld_in}, {v.data(), ldv},
                                   {o.data(), ldo}, s.data(), lds, alphas ? alpha_o.data() : nullptr,
                                   alphas ? alpha_s.data() : nullptr);
          const double tol = 1e-5 * (Df + n);
          for (std::int64_t t = 0; t < n; ++t) {
            for (std::int64_t c = 0; c < Ds; ++c)
              ASSERT_NEAR(o[t * ldo + c], want_o[t * Ds + c], tol) << "n=" << n << " Df=" << Df << " Ds=" << Ds << " t=" << t;
            for (std::int64_t c = Ds; c < ldo; ++c) EXPECT_EQ(o[t * ldo + c], 7.0f) << "wrote past O's row";
          }
          for (std::int64_t i = 0; i < Df; ++i)
            for (std::int64_t c = 0; c < Ds; ++c)
              ASSERT_NEAR(s[i * lds + c], want_s[i * Ds + c], tol) << "state n=" << n << " Df=" << Df << " i=" << i;
        }
}

}  // namespace

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

}  // namespace

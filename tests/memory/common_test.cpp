// Tests of memory/common.hpp: the SIMD partial top-k against the full sort (ties, NaN, k = 1,
// k = n, n around the batch width), the vectorised activations against their double
// definitions, and the DPFP feature map.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/memory/common.hpp"

namespace {

namespace mem = mnemo::memory;

void check_topk(const std::vector<float>& s, std::int64_t k) {
  const std::int64_t n = static_cast<std::int64_t>(s.size());
  std::vector<float> rv(k), fv(k);
  std::vector<std::int64_t> ri(k), fi(k);
  mem::topk_workspace ws;
  const std::int64_t rm = mem::reference::topk(s.data(), n, k, rv.data(), ri.data());
  const std::int64_t fm = mem::topk(s.data(), n, k, fv.data(), fi.data(), ws);
  ASSERT_EQ(fm, rm) << "n=" << n << " k=" << k;
  ASSERT_EQ(rm, std::min(n, k));
  for (std::int64_t j = 0; j < rm; ++j) {
    EXPECT_EQ(fi[j], ri[j]) << "n=" << n << " k=" << k << " rank " << j;
    EXPECT_EQ(fv[j], rv[j]) << "n=" << n << " k=" << k << " rank " << j;
    if (j) {
      EXPECT_TRUE(rv[j - 1] > rv[j] || (rv[j - 1] == rv[j] && ri[j - 1] < ri[j]));
    }
  }
}

TEST(memory_common, topk_matches_full_sort) {
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> small(0, 4);
  for (std::int64_t n : {1, 2, 7, 15, 16, 17, 31, 33, 100, 1000})
    for (std::int64_t k : {1, 2, 5, 16, 32, 1000}) {
      if (k > n) continue;
      std::vector<float> s(n), ties(n), rising(n);
      for (std::int64_t i = 0; i < n; ++i) {
        s[i] = u(rng);
        ties[i] = static_cast<float>(small(rng));  // many equal values
        rising[i] = static_cast<float>(i);         // every entry beats the threshold
      }
      check_topk(s, k);
      check_topk(ties, k);
      check_topk(rising, k);
    }
}

TEST(memory_common, topk_nan_ranks_as_minus_infinity) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::vector<float> s(40, nan);
  s[3] = 1.0f;
  s[30] = -inf;
  s[35] = 2.0f;
  check_topk(s, 4);
  std::vector<float> v(4);
  std::vector<std::int64_t> idx(4);
  mem::topk_workspace ws;
  mem::topk(s.data(), 40, 4, v.data(), idx.data(), ws);
  EXPECT_EQ(idx[0], 35);
  EXPECT_EQ(idx[1], 3);
  EXPECT_EQ(v[2], -inf);  // the rest: -inf and NaNs, by index
  EXPECT_EQ(idx[2], 0);
  EXPECT_EQ(idx[3], 1);
}

TEST(memory_common, topk_threshold_path_handles_special_values) {
  // n >= 4k takes the bound-and-filter path in SIMD builds: NaN among finite scores, +-inf,
  // signed zeros (equal, so ordered by index) and groups made only of NaN (the sorted-list path).
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::uniform_int_distribution<int> pick(0, 9);
  for (std::int64_t n : {64, 129, 512, 4099})
    for (std::int64_t k : {1, 3, 16, 32}) {
      std::vector<float> s(n), zeros(n), nan_head(n, nan);
      for (std::int64_t i = 0; i < n; ++i) {
        const int c = pick(rng);
        s[i] = c == 0 ? nan : c == 1 ? inf : c == 2 ? -inf : u(rng);
        zeros[i] = c < 5 ? 0.0f : c < 9 ? -0.0f : -1.0f;
      }
      for (std::int64_t i = n / 2; i < n; ++i) nan_head[i] = u(rng);
      check_topk(s, k);
      check_topk(zeros, k);
      check_topk(nan_head, k);
    }
}

TEST(memory_common, activations_match_their_definitions) {
  std::vector<float> z;
  for (float x = -100.0f; x <= 100.0f; x += 0.37f) z.push_back(x);
  z.push_back(0.0f);
  const std::int64_t n = static_cast<std::int64_t>(z.size());
  for (mem::activation a : {mem::activation::silu, mem::activation::gelu}) {
    std::vector<float> h(n), dh(n), h_only(n);
    mem::detail::activate(a, z.data(), h.data(), dh.data(), n);
    mem::detail::activate(a, z.data(), h_only.data(), nullptr, n);
    for (std::int64_t i = 0; i < n; ++i) {
      const double want = mem::detail::act_value(a, z[i]), dwant = mem::detail::act_derivative(a, z[i]);
      EXPECT_NEAR(h[i], want, 1e-6 + 1e-5 * std::abs(want)) << mem::activation_name(a) << " at " << z[i];
      EXPECT_NEAR(dh[i], dwant, 1e-6 + 1e-5 * std::abs(dwant)) << mem::activation_name(a) << "' at " << z[i];
      EXPECT_EQ(h_only[i], h[i]);
    }
  }
}

TEST(memory_common, dpfp_is_products_of_rolled_relu_pairs) {
  const float x[3] = {0.5f, -2.0f, 1.5f};
  std::vector<float> phi(2 * 2 * 3);
  mem::detail::dpfp(x, 3, 2, phi.data());
  const float r[6] = {0.5f, 0.0f, 1.5f, 0.0f, 2.0f, 0.0f};  // [relu(x), relu(-x)]
  for (int j = 1; j <= 2; ++j)
    for (int i = 0; i < 6; ++i) EXPECT_EQ(phi[(j - 1) * 6 + i], r[i] * r[(i - j + 6) % 6]) << "j=" << j << " i=" << i;
}

}  // namespace

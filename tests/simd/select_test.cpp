// Tests for simd/select.hpp: top_k_indices against the sort-everything reference for every
// architecture of the build and the scalar loops (ties, -inf, NaN, sorted inputs that defeat a
// sampled threshold, sizes around the SIMD width and the sampling cut-off), both output orders,
// ties broken by caller ids, and the argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/simd/select.hpp"
#include "simd/arches.hpp"

namespace {

namespace simd = mnemo::simd;
constexpr float neg_inf = -std::numeric_limits<float>::infinity();
constexpr float nan = std::numeric_limits<float>::quiet_NaN();

template <class Arch>
class Select : public ::testing::Test {};

using arches = ::testing::Types<
#if XSIMD_WITH_AVX512BW
    xsimd::avx512bw,
#endif
#if XSIMD_WITH_AVX2
    xsimd::avx2,
#endif
    xsimd::sse2, simd::scalar_arch>;
TYPED_TEST_SUITE(Select, arches, mnemo::test::arch_name);

template <class Arch>
void expect_same_selection(const std::vector<float>& x, std::int64_t k, const std::string& what,
                           simd::top_k_order order = simd::top_k_order::by_index, const std::int64_t* ids = nullptr) {
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<std::int64_t> got(static_cast<std::size_t>(k)), want(static_cast<std::size_t>(k));
  simd::top_k_indices<Arch>(x.data(), n, k, got.data(), order, ids);
  simd::reference_top_k_indices(x.data(), n, k, want.data(), order, ids);
  EXPECT_EQ(got, want) << what << " n=" << n << " k=" << k;
}

TYPED_TEST(Select, MatchesSortReference) {
  std::mt19937 gen(1);
  std::normal_distribution<float> normal;
  for (std::int64_t n : {1, 7, 16, 37, 1000, 4095, 4096, 5000, 100003}) {
    std::vector<float> x(static_cast<std::size_t>(n));
    for (float& e : x) e = normal(gen);
    for (std::int64_t k : {std::int64_t{1}, std::int64_t{3}, n / 100 + 1, n / 4 + 1, n}) {
      if (k > n) continue;
      expect_same_selection<TypeParam>(x, k, "normal");
      expect_same_selection<TypeParam>(x, k, "normal, best first", simd::top_k_order::best_first);
    }
    expect_same_selection<TypeParam>(x, 0, "k = 0");
  }
}

TYPED_TEST(Select, TiesInfinitiesNaNAndAdversarialOrder) {
  const std::int64_t n = 20000;
  std::mt19937 gen(2);
  std::uniform_int_distribution<int> digit(0, 9);
  std::vector<float> ties(n), sorted_up(n), sorted_down(n), equal(n, 0.5f), masked(n), nans(n);
  for (std::int64_t i = 0; i < n; ++i) {
    ties[i] = static_cast<float>(digit(gen));  // ties everywhere: the lower index must win
    sorted_up[i] = static_cast<float>(i);
    sorted_down[i] = static_cast<float>(n - i);
    masked[i] = i % 3 == 0 ? static_cast<float>(digit(gen)) : neg_inf;
    nans[i] = i % 2 == 0 ? nan : static_cast<float>(digit(gen));
  }
  for (std::int64_t k : {1, 123, 2000, 7000}) {
    expect_same_selection<TypeParam>(ties, k, "ties");
    expect_same_selection<TypeParam>(ties, k, "ties, best first", simd::top_k_order::best_first);
    expect_same_selection<TypeParam>(sorted_up, k, "ascending");
    expect_same_selection<TypeParam>(sorted_down, k, "descending");
    expect_same_selection<TypeParam>(equal, k, "all equal");
    expect_same_selection<TypeParam>(masked, k, "-inf");  // k = 7000 > the 6667 finite scores: -inf ones fill up
  }
  expect_same_selection<TypeParam>(nans, 500, "NaN");
  expect_same_selection<TypeParam>(nans, 15000, "more than the numbers: NaN last, by index");
  // The order itself, on a case small enough to write down: NaN after -inf.
  const std::vector<float> x{1.0f, 3.0f, 3.0f, neg_inf, nan, 2.0f};
  std::vector<std::int64_t> got(6);
  simd::top_k_indices<TypeParam>(x.data(), 6, 5, got.data());
  EXPECT_EQ(std::vector<std::int64_t>(got.begin(), got.begin() + 5), (std::vector<std::int64_t>{0, 1, 2, 3, 5}));
  simd::top_k_indices<TypeParam>(x.data(), 6, 6, got.data(), simd::top_k_order::best_first);
  EXPECT_EQ(got, (std::vector<std::int64_t>{1, 2, 5, 0, 3, 4}));
}

TYPED_TEST(Select, IdsBreakTies) {
  // Candidates gathered out of id order (as retrieval gathers them list by list): equal scores go
  // to the lower id, not the lower position.
  const std::vector<float> x{2.0f, 5.0f, 5.0f, 2.0f, nan, 5.0f};
  const std::vector<std::int64_t> ids{40, 30, 10, 20, 0, 50};
  std::vector<std::int64_t> got(4);
  simd::top_k_indices<TypeParam>(x.data(), 6, 4, got.data(), simd::top_k_order::best_first, ids.data());
  EXPECT_EQ(got, (std::vector<std::int64_t>{2, 1, 5, 3}));  // ids 10, 30, 50 (score 5), then 20 (score 2)
  std::mt19937 gen(3);
  std::uniform_int_distribution<int> digit(0, 9);
  std::vector<float> y(9000);
  std::vector<std::int64_t> perm(9000);
  for (std::size_t i = 0; i < y.size(); ++i) {
    y[i] = static_cast<float>(digit(gen));
    perm[i] = static_cast<std::int64_t>((i * 7919) % y.size());  // a permutation: 7919 is prime to 9000
  }
  for (std::int64_t k : {1, 50, 3000}) {
    expect_same_selection<TypeParam>(y, k, "ids", simd::top_k_order::by_index, perm.data());
    expect_same_selection<TypeParam>(y, k, "ids, best first", simd::top_k_order::best_first, perm.data());
  }
}

// The message of the mnemo::error f throws ("" when it throws none).
template <class F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const mnemo::error& e) {
    return e.what();
  }
  return "";
}

TEST(SelectErrors, Arguments) {
  std::vector<float> x(10, 1.0f);
  std::vector<std::int64_t> out(11);
  const std::string too_many = error_message([&] { simd::top_k_indices(x.data(), 10, 11, out.data()); });
  EXPECT_NE(too_many.find("top_k_indices: k must be in [0, n] = [0, 10], got 11"), std::string::npos) << too_many;
  const std::string negative_k = error_message([&] { simd::top_k_indices(x.data(), 10, -1, out.data()); });
  EXPECT_NE(negative_k.find("got -1"), std::string::npos) << negative_k;
  const std::string negative_n = error_message([&] { simd::top_k_indices(x.data(), -2, 0, out.data()); });
  EXPECT_NE(negative_n.find("n must be >= 0, got -2"), std::string::npos) << negative_n;
}

}  // namespace

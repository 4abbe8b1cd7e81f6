// Tests for bench/baselines.hpp: the naive Eigen baseline against attention::reference.
// (The OpenBLAS baseline needs a BLAS, which the tests do not link; mnemo_bench checks it against
// the reference at start-up and refuses to run if they disagree.)
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>

#include "../../bench/baselines.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace {

using mnemo::tensor;
using mnemo::view;
namespace att = mnemo::attention;
namespace baselines = mnemo::bench::baselines;

struct case_shape {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  bool causal;
};

std::string describe(const case_shape& s) {
  return "B=" + std::to_string(s.B) + " Hq=" + std::to_string(s.Hq) + " Hkv=" + std::to_string(s.Hkv) +
         " Lq=" + std::to_string(s.Lq) + " Lk=" + std::to_string(s.Lk) + " D=" + std::to_string(s.D) +
         " Dv=" + std::to_string(s.Dv) + " causal=" + std::to_string(s.causal);
}

template <int R>
tensor<float, R> random_tensor(mnemo::shape_t<R> shape, std::uint32_t seed, float scale = 1.0f) {
  tensor<float, R> t(shape);
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  for (float& x : t) x = u(gen);
  return t;
}

// |got - want| <= atol + rtol |want| everywhere; infinities (lse of rows with no key) must match.
void expect_close(const float* got, const float* want, std::int64_t n, const std::string& what) {
  constexpr float atol = 2e-5f, rtol = 1e-4f;
  for (std::int64_t i = 0; i < n; ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << what << " element " << i;
    if (std::isinf(want[i])) {
      ASSERT_EQ(got[i], want[i]) << what << " element " << i;
      continue;
    }
    ASSERT_NEAR(got[i], want[i], atol + rtol * std::abs(want[i])) << what << " element " << i;
  }
}

void compare_with_reference(const case_shape& s, int threads, float score_scale = 1.0f, float opt_scale = 0.0f) {
  const auto q = random_tensor<4>({s.B, s.Hq, s.Lq, s.D}, 1, score_scale);
  const auto k = random_tensor<4>({s.B, s.Hkv, s.Lk, s.D}, 2, score_scale);
  const auto v = random_tensor<4>({s.B, s.Hkv, s.Lk, s.Dv}, 3);
  tensor<float, 4> out_ref({s.B, s.Hq, s.Lq, s.Dv}), out({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> lse_ref({s.B, s.Hq, s.Lq}), lse({s.B, s.Hq, s.Lq});
  const att::options opt{opt_scale, threads};
  if (s.causal) att::reference(q, k, v, out_ref, lse_ref, att::mods::causal{}, opt);
  else att::reference(q, k, v, out_ref, lse_ref, att::mods::none{}, opt);
  baselines::eigen_attention(q, k, v, out, lse, s.causal, opt);
  const std::string what = describe(s) + " threads=" + std::to_string(threads);
  expect_close(out.data(), out_ref.data(), out.size(), "out " + what);
  expect_close(lse.data(), lse_ref.data(), lse.size(), "lse " + what);
}

TEST(EigenBaseline, MatchesReferenceOnAwkwardShapes) {
  const case_shape shapes[] = {
      {1, 1, 1, 1, 1, 1, 1, false},        // smallest
      {2, 4, 4, 37, 37, 40, 40, false},    // MHA, odd sizes
      {2, 4, 4, 37, 37, 40, 40, true},     // causal square
      {1, 8, 2, 37, 53, 96, 24, true},     // GQA 4, Lq < Lk (a cache before the queries), Dv != D
      {1, 8, 1, 100, 100, 64, 64, false},  // MQA (GQA 8)
      {1, 32, 8, 1, 1000, 128, 128, false},  // decode step
      {1, 4, 2, 5, 300, 256, 256, true},   // D = 256
  };
  for (const case_shape& s : shapes)
    for (int threads : {1, 2}) compare_with_reference(s, threads);
}

TEST(EigenBaseline, RowsWithoutVisibleKeysGiveZeroAndMinusInf) {
  // Lq > Lk with a bottom-right causal mask: rows 0 .. Lq - Lk - 1 see no key.
  const case_shape s{1, 2, 1, 40, 10, 16, 16, true};
  compare_with_reference(s, 1);
  const auto q = random_tensor<4>({s.B, s.Hq, s.Lq, s.D}, 4);
  const auto k = random_tensor<4>({s.B, s.Hkv, s.Lk, s.D}, 5);
  const auto v = random_tensor<4>({s.B, s.Hkv, s.Lk, s.Dv}, 6);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> lse({s.B, s.Hq, s.Lq});
  for (float& x : out) x = 1.0f;  // must be overwritten with zeros
  baselines::eigen_attention(q, k, v, out, lse, true);
  for (std::int64_t h = 0; h < s.Hq; ++h) {
    for (std::int64_t i = 0; i < s.Lq - s.Lk; ++i) {
      EXPECT_EQ(lse(0, h, i), -std::numeric_limits<float>::infinity()) << "h=" << h << " i=" << i;
      for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_EQ(out(0, h, i, c), 0.0f) << "h=" << h << " i=" << i;
    }
    EXPECT_TRUE(std::isfinite(lse(0, h, s.Lq - s.Lk))) << "the first row with a key, h=" << h;
  }
}

TEST(EigenBaseline, LargeLogitsAndCustomScaleStayFinite) {
  // Scores of order +-1e3 overflow a softmax that does not subtract the row maximum.
  compare_with_reference({1, 2, 2, 33, 47, 32, 32, true}, 1, 6.0f, 1.0f);
  compare_with_reference({1, 2, 2, 33, 47, 32, 32, false}, 2, 1.0f, 0.37f);
}

TEST(EigenBaseline, ReadsStridedViewsWithoutCopies) {
  // q, k, v, out stored [B, L, H, D] and read as [B, H, L, D] through strides.
  const std::int64_t B = 2, Hq = 4, Hkv = 2, L = 29, D = 24;
  const auto q_blhd = random_tensor<4>({B, L, Hq, D}, 7);
  const auto k_blhd = random_tensor<4>({B, L, Hkv, D}, 8);
  const auto v_blhd = random_tensor<4>({B, L, Hkv, D}, 9);
  tensor<float, 4> out_blhd({B, L, Hq, D}), out_ref({B, Hq, L, D});
  const auto q = mnemo::cview(q_blhd).permute({0, 2, 1, 3});
  const auto k = mnemo::cview(k_blhd).permute({0, 2, 1, 3});
  const auto v = mnemo::cview(v_blhd).permute({0, 2, 1, 3});
  const view<float, 4> out = out_blhd.as_view().permute({0, 2, 1, 3});
  att::reference(q, k, v, out_ref, {}, att::mods::causal{});
  baselines::eigen_attention(q, k, v, out, {}, true);
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t c = 0; c < D; ++c)
          ASSERT_NEAR(out(b, h, i, c), out_ref(b, h, i, c), 2e-5f + 1e-4f * std::abs(out_ref(b, h, i, c)))
              << "b=" << b << " h=" << h << " i=" << i << " c=" << c;
}

TEST(EigenBaseline, BadShapesThrowNamingTheArgument) {
  tensor<float, 4> q({1, 4, 8, 16}), k({1, 2, 8, 16}), v({1, 2, 8, 16}), out({1, 4, 8, 16});
  tensor<float, 4> k_bad_d({1, 2, 8, 12}), k_bad_heads({1, 3, 8, 16}), out_bad({1, 4, 8, 8});
  tensor<float, 3> lse_bad({1, 4, 7});
  auto expect_error = [](auto&& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "expected mnemo::error mentioning '" << needle << "'";
    } catch (const mnemo::error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("baselines::eigen_attention"), std::string::npos) << e.what();
    }
  };
  expect_error([&] { baselines::eigen_attention(q, k_bad_d, v, out); }, "k must have shape [1, 2, 8, 16]");
  expect_error([&] { baselines::eigen_attention(q, k_bad_heads, k_bad_heads, out); }, "multiple of");
  expect_error([&] { baselines::eigen_attention(q, k, v, out_bad); }, "out must have shape [1, 4, 8, 16]");
  expect_error([&] { baselines::eigen_attention(q, k, v, out, lse_bad); }, "lse must have shape [1, 4, 8]");
  expect_error([&] { baselines::eigen_attention(q, k, v, out, {}, false, {0, -1}); }, "options.threads");
}

}  // namespace

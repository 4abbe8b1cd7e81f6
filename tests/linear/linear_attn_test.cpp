// Tests of mnemo/linear/linear_attn.hpp: both forms against the double reference (and the
// reference against the parallel form computed here), feature maps and normalisation, pieces,
// steps (and their rollback), long runs, bf16, threads, strided views, the golden cases and the
// boundary checks.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(linear_attn, forms_match_reference) { check_forms(member::linear_attn{}); }
TEST(linear_attn, reference_matches_parallel_form) { check_parallel_form(member::linear_attn{}); }
TEST(linear_attn, pieces_then_continue) { check_pieces(member::linear_attn{}); }
TEST(linear_attn, long_run_stays_finite) { check_long_run(member::linear_attn{}); }
TEST(linear_attn, bf16_inputs) { check_bf16(member::linear_attn{}); }
TEST(linear_attn, threads_and_state) { check_threads_and_state(member::linear_attn{}); }
TEST(linear_attn, strided_views) { check_strided(member::linear_attn{}); }
TEST(linear_attn, golden) { check_golden(member::linear_attn{}); }
TEST(linear_attn, bad_inputs) { check_bad_common(member::linear_attn{}); }

TEST(linear_attn, step_after_prefill) { check_steps(member::linear_attn{}); }
TEST(linear_attn, rollback) { check_rollback(member::linear_attn{}); }
// The state of a feature map with normalisation: [B, H, 1 + Dk + Dk^2, Dv + 1].
TEST(linear_attn, rollback_features) {
  check_rollback(member::linear_attn{}, {.map = linear::feature_map::taylor2, .normalize = true});
}

// Small shapes: taylor2 has 1 + Dk + Dk^2 features.
std::vector<shape_case> feature_shapes() {
  return {{1, 2, 1, 6, 5, 16}, {1, 1, 15, 8, 12, 16}, {2, 1, 17, 5, 7, 16}, {1, 2, 70, 7, 9, 32}, {1, 1, 300, 4, 6, 64}};
}

TEST(linear_attn, feature_maps) {
  for (auto map : {linear::feature_map::identity, linear::feature_map::elu_plus_one, linear::feature_map::relu,
                   linear::feature_map::taylor2}) {
    SCOPED_TRACE(linear::feature_map_name(map));
    check_forms(member::linear_attn{}, {.map = map}, {}, feature_shapes());
  }
}

TEST(linear_attn, normalized) {
  for (auto map : {linear::feature_map::elu_plus_one, linear::feature_map::taylor2}) {
    SCOPED_TRACE(linear::feature_map_name(map));
    check_forms(member::linear_attn{}, {.map = map, .normalize = true}, {}, feature_shapes());
    check_pieces(member::linear_attn{}, {.map = map, .normalize = true});
  }
}

// The normalised output is the attention form o_t = sum_j s_tj v_j / (sum_j s_tj + eps) with
// s_tj = scale phi(q_t).phi(k_j), here with phi = elu + 1 written out independently.
TEST(linear_attn, normalized_is_attention_form) {
  const linear::options opt{.map = linear::feature_map::elu_plus_one, .normalize = true};
  problem p = make_problem(member::linear_attn{}, 1, 1, 30, 6, 4, 3, opt);
  std::fill(p.state0.begin(), p.state0.end(), 0.0f);
  auto phi = [](double x) { return x > 0 ? x + 1 : std::exp(x); };
  const double scale = 1.0 / std::sqrt(6.0);
  tensor<float, 4> want({1, 1, p.L, p.Dv});
  for (std::int64_t t = 0; t < p.L; ++t) {
    double den = 0;
    std::vector<double> num(p.Dv, 0.0);
    for (std::int64_t j = 0; j <= t; ++j) {
      double s = 0;
      for (std::int64_t c = 0; c < p.Dk; ++c) s += scale * phi(p.q(0, 0, t, c)) * phi(p.k(0, 0, j, c));
      den += s;
      for (std::int64_t e = 0; e < p.Dv; ++e) num[e] += s * p.v(0, 0, j, e);
    }
    for (std::int64_t e = 0; e < p.Dv; ++e) want(0, 0, t, e) = static_cast<float>(num[e] / (den + linear::normalize_eps));
  }
  for (impl i : {impl::reference, impl::chunked, impl::recurrent})
    EXPECT_TRUE(close(run_all(member::linear_attn{}, i, p, opt).o, want, f32_tol));
}

// taylor2: phi(q).phi(k) = 1 + x + x^2 / 2 with x = q.k / sqrt(Dk).
TEST(linear_attn, taylor2_is_second_order_exp) {
  const std::int64_t Dk = 5;
  const linear::options opt{.map = linear::feature_map::taylor2};
  const problem p = make_problem(member::linear_attn{}, 1, 1, 2, Dk, 1, 4, opt);
  tensor<float, 4> o({1, 1, 2, 1});
  const auto d = linear::detail::check_common<float>("test", p.q, p.k, p.v, o, {}, opt, true);
  const std::int64_t Df = linear::feature_dim(opt.map, Dk);
  ASSERT_EQ(Df, 1 + Dk + Dk * Dk);
  std::vector<float> fq(Df), fk(Df), scratch(Dk);
  linear::detail::prepare_row<mnemo::simd::default_arch>(p.q.data(), d, 1.0f, fq.data(), scratch.data());
  linear::detail::prepare_row<mnemo::simd::default_arch>(p.k.data(), d, 1.0f, fk.data(), scratch.data());
  double dot = 0, x = 0;
  for (std::int64_t i = 0; i < Df; ++i) dot += static_cast<double>(fq[i]) * fk[i];
  for (std::int64_t c = 0; c < Dk; ++c) x += static_cast<double>(p.q.data()[c]) * p.k.data()[c];
  x /= std::sqrt(static_cast<double>(Dk));
  EXPECT_NEAR(dot, 1 + x + x * x / 2, 1e-6);
  EXPECT_FLOAT_EQ(d.scale, 1.0f);  // taylor2 carries its own 1/sqrt(Dk)
}

// With normalize the state has one more column (the key sum); with taylor2, 1 + Dk + Dk^2 rows.
TEST(linear_attn, feature_state_shapes_are_checked) {
  const problem p = make_problem(member::linear_attn{}, 1, 2, 10, 4, 6, 5);
  tensor<float, 4> o({1, 2, 10, 6}), plain({1, 2, 4, 6});
  expect_error([&] { linear::linear_attn(p.q, p.k, p.v, o, plain, {.normalize = true}); },
               {"linear::linear_attn", "state must have shape [1, 2, 4, 7]", "Dv + 1", "got [1, 2, 4, 6]"});
  expect_error([&] { linear::linear_attn(p.q, p.k, p.v, o, plain, {.map = linear::feature_map::taylor2}); },
               {"linear::linear_attn", "state must have shape [1, 2, 21, 6]", "got [1, 2, 4, 6]"});
  tensor<float, 4> taylor({1, 2, 21, 7});
  linear::linear_attn(p.q, p.k, p.v, o, taylor, {.map = linear::feature_map::taylor2, .normalize = true});
  for (float x : o) EXPECT_TRUE(std::isfinite(x));
}

}  // namespace

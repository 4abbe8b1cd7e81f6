// Tests of mnemo/linear/retention.hpp: both forms against the double reference (and the reference
// against the parallel form D_tj = gamma^(t-j)), pieces, steps (and their rollback), long runs, bf16, threads,
// strided views, the golden cases and the boundary checks (gamma in (0, 1]).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(retention, forms_match_reference) { check_forms(member::retention{}); }
TEST(retention, reference_matches_parallel_form) { check_parallel_form(member::retention{}); }
TEST(retention, pieces_then_continue) { check_pieces(member::retention{}); }
TEST(retention, long_run_stays_finite) { check_long_run(member::retention{}); }
TEST(retention, bf16_inputs) { check_bf16(member::retention{}); }
TEST(retention, threads_and_state) { check_threads_and_state(member::retention{}); }
TEST(retention, strided_views) { check_strided(member::retention{}); }
TEST(retention, golden) { check_golden(member::retention{}); }
TEST(retention, bad_inputs) { check_bad_common(member::retention{}); }

TEST(retention, step_after_prefill) { check_steps(member::retention{}); }
TEST(retention, rollback) { check_rollback(member::retention{}); }

TEST(retention, retnet_gamma) {
  const auto gamma = linear::retnet_gamma(4);
  for (std::int64_t h = 0; h < 4; ++h) EXPECT_DOUBLE_EQ(gamma(h), 1.0 - std::pow(2.0, -5.0 - static_cast<double>(h)));
}

TEST(retention, bad_gamma) {
  const problem p = make_problem(member::retention{}, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  for (float bad : {0.0f, 1.5f, -0.5f, std::numeric_limits<float>::quiet_NaN()}) {
    tensor<float, 1> gamma({2});
    gamma(0) = 0.9f;
    gamma(1) = bad;
    expect_error([&] { linear::retention(p.q, p.k, p.v, gamma, o); },
                 {"linear::retention", "gamma must be in (0, 1], got gamma[1] = "});
    expect_error([&] { linear::reference::retention(p.q, p.k, p.v, gamma, o); },
                 {"linear::reference::retention", "gamma must be in (0, 1]"});
  }
  expect_error([&] { linear::retention(p.q, p.k, p.v, tensor<float, 1>({3}), o); },
               {"linear::retention", "gamma must have shape [2] [H], got [3]"});
  expect_error([&] { linear::retention(p.q, p.k, p.v, view<const float, 1>{}, o); },
               {"linear::retention", "gamma must have shape [2] [H], got [0]"});
}

// gamma = 1 is plain linear attention.
TEST(retention, gamma_one_is_linear_attention) {
  problem p = make_problem(member::retention{}, 1, 2, 40, 8, 6, 43);
  std::fill(p.gamma.begin(), p.gamma.end(), 1.0f);
  for (impl i : {impl::chunked, impl::recurrent})
    EXPECT_TRUE(close(run_all(member::retention{}, i, p, {}).o, run_all(member::linear_attn{}, impl::reference, p, {}).o,
                      f32_tol));
}

}  // namespace

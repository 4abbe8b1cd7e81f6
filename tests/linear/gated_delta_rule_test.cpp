// Tests of mnemo/linear/gated_delta_rule.hpp: both forms against the double reference (with and
// without the in-op L2 norm), gates near 0 and near -inf, pieces, steps (and their rollback), long runs, bf16,
// threads, strided views, the golden cases and the boundary checks.
#include <gtest/gtest.h>

#include <limits>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(gated_delta_rule, forms_match_reference) { check_forms(member::gated_delta_rule{}); }
TEST(gated_delta_rule, forms_match_reference_l2norm) { check_forms(member::gated_delta_rule{}, {.use_qk_l2norm = true}); }
TEST(gated_delta_rule, strong_gates) { check_forms(member::gated_delta_rule{}, {}, {-6.0f, -1.0f}); }
TEST(gated_delta_rule, extreme_gates) { check_extreme_gates(member::gated_delta_rule{}); }
TEST(gated_delta_rule, pieces_then_continue) { check_pieces(member::gated_delta_rule{}); }
TEST(gated_delta_rule, long_run_stays_finite) { check_long_run(member::gated_delta_rule{}); }
TEST(gated_delta_rule, bf16_inputs) { check_bf16(member::gated_delta_rule{}); }
TEST(gated_delta_rule, threads_and_state) { check_threads_and_state(member::gated_delta_rule{}); }
TEST(gated_delta_rule, strided_views) { check_strided(member::gated_delta_rule{}); }
TEST(gated_delta_rule, golden) { check_golden(member::gated_delta_rule{}); }
TEST(gated_delta_rule, bad_inputs) { check_bad_common(member::gated_delta_rule{}); }

TEST(gated_delta_rule, step_after_prefill) { check_steps(member::gated_delta_rule{}); }
TEST(gated_delta_rule, rollback) { check_rollback(member::gated_delta_rule{}); }

// g = 0 everywhere is the plain delta rule.
TEST(gated_delta_rule, zero_gate_is_delta_rule) {
  problem p = make_problem(member::gated_delta_rule{}, 1, 2, 50, 16, 8, 37);
  std::fill(p.g.begin(), p.g.end(), 0.0f);
  const outputs want = run_all(member::delta_rule{}, impl::reference, p, {.chunk_size = 16});
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs got = run_all(member::gated_delta_rule{}, i, p, {.chunk_size = 16});
    EXPECT_TRUE(close(got.o, want.o, f32_tol));
    EXPECT_TRUE(close(got.state, want.state, f32_tol));
  }
}

// g = -inf at token t wipes everything before it: the outputs from t on equal a fresh start at t.
TEST(gated_delta_rule, minus_inf_gate_resets) {
  problem p = make_problem(member::gated_delta_rule{}, 1, 1, 60, 16, 8, 39);
  const std::int64_t reset = 21;
  p.g(0, 0, reset) = -std::numeric_limits<float>::infinity();
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs full = run_all(member::gated_delta_rule{}, i, p, {.chunk_size = 16});
    outputs fresh{tensor<float, 4>({1, 1, p.L, p.Dv}), tensor<float, 4>(p.state0.shape())};
    run_range<float>(member::gated_delta_rule{}, i, p.q, p.k, p.v, p, reset, p.L - reset, fresh.o, fresh.state,
                     {.chunk_size = 16});
    double err = 0;
    for (std::int64_t t = reset; t < p.L; ++t)
      for (std::int64_t c = 0; c < p.Dv; ++c) err = std::max(err, std::abs(double(full.o(0, 0, t, c)) - fresh.o(0, 0, t, c)));
    EXPECT_LE(err, 1e-5);
    EXPECT_TRUE(close(full.state, fresh.state, 1e-5));
  }
}

TEST(gated_delta_rule, bad_gates_and_beta) {
  const problem p = make_problem(member::gated_delta_rule{}, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  tensor<float, 3> g = p.g;
  g(0, 0, 3) = 1.0f;
  expect_error([&] { linear::gated_delta_rule(p.q, p.k, p.v, g, p.beta, o); },
               {"linear::gated_delta_rule", "g (log-decay) must be <= 0 and not NaN, got g[0, 0, 3] = 1"});
  tensor<float, 3> beta = p.beta;
  beta(0, 1, 9) = 3.0f;
  expect_error([&] { linear::gated_delta_rule(p.q, p.k, p.v, p.g, beta, o); },
               {"linear::gated_delta_rule", "beta must be in [0, 2], got beta[0, 1, 9] = 3"});
  expect_error([&] { linear::reference::gated_delta_rule(p.q, p.k, p.v, p.g, beta, o); },
               {"linear::reference::gated_delta_rule", "beta[0, 1, 9]"});
}

}  // namespace

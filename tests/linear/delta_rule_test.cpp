// Tests of mnemo/linear/delta_rule.hpp: both forms against the double reference (with and
// without the in-op L2 norm, beta up to 2), pieces, steps (and their rollback), long runs, bf16, threads, strided
// views, the golden cases and the boundary checks (beta in [0, 2]).
#include <gtest/gtest.h>

#include <limits>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(delta_rule, forms_match_reference) { check_forms(member::delta_rule{}); }
TEST(delta_rule, forms_match_reference_l2norm) { check_forms(member::delta_rule{}, {.use_qk_l2norm = true}); }
TEST(delta_rule, pieces_then_continue) { check_pieces(member::delta_rule{}); }
TEST(delta_rule, long_run_stays_finite) { check_long_run(member::delta_rule{}); }
TEST(delta_rule, bf16_inputs) { check_bf16(member::delta_rule{}, {.use_qk_l2norm = true}); }
TEST(delta_rule, threads_and_state) { check_threads_and_state(member::delta_rule{}); }
TEST(delta_rule, strided_views) { check_strided(member::delta_rule{}); }
TEST(delta_rule, golden) { check_golden(member::delta_rule{}); }
TEST(delta_rule, bad_inputs) { check_bad_common(member::delta_rule{}); }

TEST(delta_rule, step_after_prefill) { check_steps(member::delta_rule{}); }
TEST(delta_rule, rollback) { check_rollback(member::delta_rule{}); }

// beta at the ends of its range: 0 (no write), 1 (full overwrite), 2 (reflection).
TEST(delta_rule, beta_range) {
  for (float b : {0.0f, 1.0f, 2.0f}) {
    problem p = make_problem(member::delta_rule{}, 1, 2, 70, 16, 8, 23);
    std::fill(p.beta.begin(), p.beta.end(), b);
    const outputs want = run_all(member::delta_rule{}, impl::reference, p, {.chunk_size = 16});
    for (impl i : {impl::chunked, impl::recurrent}) {
      const outputs got = run_all(member::delta_rule{}, i, p, {.chunk_size = 16});
      EXPECT_TRUE(close(got.o, want.o, f32_tol)) << "beta " << b;
      EXPECT_TRUE(close(got.state, want.state, f32_tol)) << "beta " << b;
    }
    if (b == 0.0f) {
      EXPECT_TRUE(close(want.state, p.state0, 0.0)) << "beta = 0 leaves the state unchanged";
    }
  }
}

// With beta = 1 and a unit key, the state then maps that key exactly to its value.
TEST(delta_rule, beta_one_stores_the_value) {
  problem p = make_problem(member::delta_rule{}, 1, 1, 1, 16, 8, 29);
  std::fill(p.beta.begin(), p.beta.end(), 1.0f);
  for (impl i : {impl::chunked, impl::recurrent, impl::reference}) {
    const outputs r = run_all(member::delta_rule{}, i, p, {});
    for (std::int64_t c = 0; c < p.Dv; ++c) {
      double read = 0;  // S^T k
      for (std::int64_t j = 0; j < p.Dk; ++j) read += static_cast<double>(r.state(0, 0, j, c)) * p.k(0, 0, 0, j);
      EXPECT_NEAR(read, p.v(0, 0, 0, c), 1e-5);
    }
  }
}

TEST(delta_rule, bad_beta) {
  const problem p = make_problem(member::delta_rule{}, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  for (float bad : {-0.01f, 2.01f, std::numeric_limits<float>::quiet_NaN()}) {
    tensor<float, 3> beta = p.beta;
    beta(0, 1, 4) = bad;
    expect_error([&] { linear::delta_rule(p.q, p.k, p.v, beta, o); },
                 {"linear::delta_rule", "beta must be in [0, 2], got beta[0, 1, 4] = "});
    expect_error([&] { linear::reference::delta_rule(p.q, p.k, p.v, beta, o); },
                 {"linear::reference::delta_rule", "beta[0, 1, 4]"});
  }
  expect_error([&] { linear::delta_rule(p.q, p.k, p.v, tensor<float, 3>({1, 1, 10}), o); },
               {"linear::delta_rule", "beta must have shape [1, 2, 10] [B, H, L], got [1, 1, 10]"});
}

}  // namespace

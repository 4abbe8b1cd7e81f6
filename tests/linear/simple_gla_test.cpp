// Tests of mnemo/linear/simple_gla.hpp: both forms against the double reference (and the
// reference against the parallel form), gates near 0 and near -inf, pieces, steps (and their rollback), long runs,
// bf16, threads, strided views, the golden cases and the boundary checks.
#include <gtest/gtest.h>

#include <limits>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(simple_gla, forms_match_reference) { check_forms(member::simple_gla{}); }
TEST(simple_gla, strong_gates) { check_forms(member::simple_gla{}, {}, {-6.0f, -1.0f}); }
TEST(simple_gla, reference_matches_parallel_form) { check_parallel_form(member::simple_gla{}); }
TEST(simple_gla, extreme_gates) { check_extreme_gates(member::simple_gla{}); }
TEST(simple_gla, pieces_then_continue) { check_pieces(member::simple_gla{}); }
TEST(simple_gla, long_run_stays_finite) { check_long_run(member::simple_gla{}); }
TEST(simple_gla, bf16_inputs) { check_bf16(member::simple_gla{}); }
TEST(simple_gla, threads_and_state) { check_threads_and_state(member::simple_gla{}); }
TEST(simple_gla, strided_views) { check_strided(member::simple_gla{}); }
TEST(simple_gla, golden) { check_golden(member::simple_gla{}); }
TEST(simple_gla, bad_inputs) { check_bad_common(member::simple_gla{}); }

TEST(simple_gla, step_after_prefill) { check_steps(member::simple_gla{}); }
TEST(simple_gla, rollback) { check_rollback(member::simple_gla{}); }

TEST(simple_gla, bad_gates) {
  const problem p = make_problem(member::simple_gla{}, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  for (float bad : {0.25f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    tensor<float, 3> g = p.g;
    g(0, 1, 7) = bad;
    expect_error([&] { linear::simple_gla(p.q, p.k, p.v, g, o); },
                 {"linear::simple_gla", "g (log-decay) must be <= 0 and not NaN, got g[0, 1, 7] = "});
    expect_error([&] { linear::reference::simple_gla(p.q, p.k, p.v, g, o); }, {"linear::reference::simple_gla", "g[0, 1, 7]"});
  }
  expect_error([&] { linear::simple_gla(p.q, p.k, p.v, tensor<float, 3>({1, 2, 9}), o); },
               {"linear::simple_gla", "g must have shape [1, 2, 10] [B, H, L], got [1, 2, 9]"});
  expect_error([&] { linear::simple_gla(p.q, p.k, p.v, view<const float, 3>{}, o); },
               {"linear::simple_gla", "g must have shape [1, 2, 10] [B, H, L], got [0, 0, 0]"});
}

}  // namespace

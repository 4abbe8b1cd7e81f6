// Tests of mnemo/linear/gla.hpp: both forms against the double reference (and the reference
// against the parallel form), sub-block edges, gates near 0 and near -inf, pieces, steps (and their rollback), long
// runs, bf16, threads, strided views, the golden cases and the boundary checks.
#include <gtest/gtest.h>

#include <limits>

#include "linear/test_util.hpp"

namespace {

using namespace linear_test;

TEST(gla, forms_match_reference) { check_forms(member::gla{}); }
TEST(gla, strong_gates) { check_forms(member::gla{}, {}, {-6.0f, -1.0f}); }
TEST(gla, reference_matches_parallel_form) { check_parallel_form(member::gla{}); }
TEST(gla, extreme_gates) { check_extreme_gates(member::gla{}); }
TEST(gla, pieces_then_continue) { check_pieces(member::gla{}); }
TEST(gla, long_run_stays_finite) { check_long_run(member::gla{}); }
TEST(gla, bf16_inputs) { check_bf16(member::gla{}); }
TEST(gla, threads_and_state) { check_threads_and_state(member::gla{}); }
TEST(gla, strided_views) { check_strided(member::gla{}); }
TEST(gla, golden) { check_golden(member::gla{}); }
TEST(gla, bad_inputs) { check_bad_common(member::gla{}); }

// Chunks around multiples of the sub-block: one, one plus a token, several, several plus a partial one.
TEST(gla, sub_block_edges) {
  const std::int64_t s = linear::gla_sub_block;
  std::vector<shape_case> shapes;
  for (std::int64_t chunk : {s - 1, s, s + 1, 2 * s, 3 * s + 5, 4 * s})
    shapes.push_back({1, 1, 5 * s + 3, 12, 10, chunk});
  check_forms(member::gla{}, {}, {}, shapes);
}

TEST(gla, step_after_prefill) { check_steps(member::gla{}); }
TEST(gla, rollback) { check_rollback(member::gla{}); }

TEST(gla, bad_gates) {
  const problem p = make_problem(member::gla{}, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  for (float bad : {0.25f, std::numeric_limits<float>::quiet_NaN()}) {
    tensor<float, 4> g = p.gk;
    g(0, 1, 7, 3) = bad;
    expect_error([&] { linear::gla(p.q, p.k, p.v, g, o); },
                 {"linear::gla", "g (log-decay) must be <= 0 and not NaN, got g[0, 1, 7, 3] = "});
    expect_error([&] { linear::reference::gla(p.q, p.k, p.v, g, o); }, {"linear::reference::gla", "g[0, 1, 7, 3]"});
  }
  expect_error([&] { linear::gla(p.q, p.k, p.v, tensor<float, 4>({1, 2, 10, 7}), o); },
               {"linear::gla", "g must have shape [1, 2, 10, 8] [B, H, L, Dk], got [1, 2, 10, 7]"});
}

}  // namespace

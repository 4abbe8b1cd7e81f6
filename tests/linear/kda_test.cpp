// Tests of mnemo/linear/kda.hpp: both forms against the double reference
// (with and without the in-op L2 norm; weak chunks, strong chunks and both in one sequence), gates
// near 0 and at -inf (all channels and single channels), pieces, steps, rollback for speculative
// decoding (kda_step out of place on a linear::state_ring), long runs, bf16, threads, strided views, NaN propagation, the golden cases and the
// boundary checks. Only kda is compiled (the checks of test_util.hpp are templates on the member);
// Gated DeltaNet's reference is the one other function instantiated.

#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "linear/test_util.hpp"
#include "mnemo/linear/state_ring.hpp"

namespace {

using namespace linear_test;

constexpr member::kda kda{};

TEST(kda, forms_match_reference) { check_forms(kda); }
TEST(kda, forms_match_reference_l2norm) { check_forms(kda, {.use_qk_l2norm = true}); }
// Totals below -2 kda_factor_limit in (nearly) every chunk: the exact (strong) path throughout.
TEST(kda, strong_gates) { check_forms(kda, {}, {-6.0f, -1.0f}); }
// Chunks on both sides of the limit in one sequence: a 16-token chunk at -4..0 totals about -32
// per channel, its most negative channel often below -40; 64-token chunks are strong, 7-token ones
// weak.
TEST(kda, mixed_gates) { check_forms(kda, {}, {-4.0f, 0.0f}); }
TEST(kda, extreme_gates) { check_extreme_gates(kda); }
TEST(kda, pieces_then_continue) { check_pieces(kda); }
TEST(kda, long_run_stays_finite) { check_long_run(kda); }
TEST(kda, bf16_inputs) { check_bf16(kda); }
TEST(kda, threads_and_state) { check_threads_and_state(kda); }
TEST(kda, strided_views) { check_strided(kda); }
TEST(kda, golden) { check_golden(kda); }
TEST(kda, bad_inputs) { check_bad_common(kda); }

void step(const problem& p, std::int64_t t, view<float, 4> o, view<float, 4> state, const linear::options& opt) {
  linear::kda_step(token(p.q, t), token(p.k, t), token(p.v, t), token(p.gk, t), token(p.beta, t), token(o, t), state,
                   opt);
}

TEST(kda, step_after_prefill) { check_steps(kda); }

// Equal gates in every channel: Gated DeltaNet; g = 0: the delta rule (through Gated DeltaNet's
// reference with g = 0).
TEST(kda, channel_equal_gates_are_gated_delta_rule) {
  problem p = make_problem(kda, 2, 2, 45, 24, 16, 37);
  for (float scale : {1.0f, 0.0f}) {
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.H; ++h)
        for (std::int64_t t = 0; t < p.L; ++t) {
          p.g(b, h, t) *= scale;
          for (std::int64_t c = 0; c < p.Dk; ++c) p.gk(b, h, t, c) = p.g(b, h, t);
        }
    outputs want{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
    linear::reference::gated_delta_rule(p.q, p.k, p.v, p.g, p.beta, want.o, want.state);
    for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
      const outputs got = run_all(kda, i, p, {.chunk_size = 16});
      EXPECT_TRUE(close(got.o, want.o, f32_tol)) << "gate scale " << scale << " impl " << static_cast<int>(i);
      EXPECT_TRUE(close(got.state, want.state, f32_tol)) << "gate scale " << scale;
    }
  }
}

// g = -inf in every channel at token t wipes everything before it: the outputs from t on equal a
// fresh start at t. In one channel only, that channel's rows of the state restart.
TEST(kda, minus_inf_gate_resets) {
  const float inf = std::numeric_limits<float>::infinity();
  problem p = make_problem(kda, 1, 1, 60, 16, 8, 39);
  const std::int64_t reset = 21;
  for (std::int64_t c = 0; c < p.Dk; ++c) p.gk(0, 0, reset, c) = -inf;
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs full = run_all(kda, i, p, {.chunk_size = 16});
    outputs fresh{tensor<float, 4>({1, 1, p.L, p.Dv}), tensor<float, 4>(p.state0.shape())};
    run_range<float>(kda, i, p.q, p.k, p.v, p, reset, p.L - reset, fresh.o, fresh.state, {.chunk_size = 16});
    double err = 0;
    for (std::int64_t t = reset; t < p.L; ++t)
      for (std::int64_t c = 0; c < p.Dv; ++c) err = std::max(err, std::abs(double(full.o(0, 0, t, c)) - fresh.o(0, 0, t, c)));
    EXPECT_LE(err, 1e-5);
    EXPECT_TRUE(close(full.state, fresh.state, 1e-5));
  }
  // One channel at -inf from token 0 on (chunk-start and inside chunks): row 3 of the initial
  // state never matters.
  problem one = make_problem(kda, 1, 2, 40, 12, 8, 43);
  for (std::int64_t h = 0; h < one.H; ++h) one.gk(0, h, 0, 3) = -inf;
  problem other = one;
  for (std::int64_t h = 0; h < one.H; ++h)
    for (std::int64_t c = 0; c < one.Dv; ++c) other.state0(0, h, 3, c) = 5.0f;
  for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
    const outputs a = run_all(kda, i, one, {.chunk_size = 16}), b = run_all(kda, i, other, {.chunk_size = 16});
    EXPECT_TRUE(close(a.o, b.o, 1e-6)) << static_cast<int>(i);
    EXPECT_TRUE(close(a.state, b.state, 1e-6)) << static_cast<int>(i);
  }
}

// Speculative decoding: out-of-place steps on the slots of a state_ring equal in-place steps bit
// for bit, and ring.rollback(n) gives the state of n tokens ago; rollbacks and steps interleave; the
// ring keeps only `depth` states; a checkpoint before a multi-token chunked call plus a re-run of
// the accepted tokens gives the same state as stepping them.
TEST(kda, rollback) {
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(kda, 2, 3, 30, 24, 16, 45, opt);
  tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
  const std::int64_t prefill = 10, steps = 6, depth = 4;
  // states[t]: the state after the first t tokens (prefill, then in-place steps).
  std::vector<tensor<float, 4>> states(prefill + steps + 1);
  tensor<float, 4> state = p.state0;
  run_range<float>(kda, impl::chunked, p.q, p.k, p.v, p, 0, prefill, o, state, opt);
  states[prefill] = state;
  for (std::int64_t t = prefill; t < prefill + steps; ++t) {
    step(p, t, o, state, opt);
    states[t + 1] = state;
  }
  linear::state_ring<4> ring({p.B, p.H, p.Dk, p.Dv}, depth);
  std::copy(states[prefill].begin(), states[prefill].end(), ring.state().data());
  auto advance = [&](std::int64_t t) {
    auto [in, out] = ring.advance();
    linear::kda_step(token(p.q, t), token(p.k, t), token(p.v, t), token(p.gk, t), token(p.beta, t),
                     token(o.as_view(), t), in, out, opt);
  };
  auto is = [&](std::int64_t t) {
    const view<float, 4> s = ring.state();
    return std::equal(s.data(), s.data() + s.size(), states[t].begin());
  };
  for (std::int64_t t = prefill; t < prefill + steps; ++t) {
    advance(t);
    EXPECT_TRUE(is(t + 1)) << "out-of-place step " << t;
  }
  EXPECT_EQ(ring.available(), depth);  // 6 steps, the ring keeps the last 4
  ring.rollback(3);
  EXPECT_TRUE(is(prefill + 3));
  EXPECT_EQ(ring.available(), 1);
  advance(prefill + 3);  // the same token again: the same state
  EXPECT_TRUE(is(prefill + 4));
  ring.rollback(2);  // the oldest state the full ring kept
  EXPECT_TRUE(is(prefill + 2));
  EXPECT_EQ(ring.available(), 0);

  // Checkpoint + recompute: verify 5 draft tokens in one chunked call, accept 2.
  const std::int64_t t0 = prefill + 2, drafted = 5, accepted = 2;
  const tensor<float, 4> checkpoint = states[t0];
  tensor<float, 4> s2 = checkpoint, o2({p.B, p.H, p.L, p.Dv});
  run_range<float>(kda, impl::chunked, p.q, p.k, p.v, p, t0, drafted, o2, s2, opt);
  s2 = checkpoint;
  run_range<float>(kda, impl::chunked, p.q, p.k, p.v, p, t0, accepted, o2, s2, opt);
  EXPECT_TRUE(close(s2, states[t0 + accepted], f32_tol));

  // state_in and state_out: the same view or disjoint.
  const view<float, 4> all = state.as_view();
  tensor<float, 4> wide({p.B, p.H, p.Dk + 1, p.Dv});
  const view<float, 4> shifted(wide.data() + p.Dv, all.shape(), wide.as_view().strides());
  expect_error([&] {
    linear::kda_step(token(p.q, 0), token(p.k, 0), token(p.v, 0), token(p.gk, 0), token(p.beta, 0),
                     token(o.as_view(), 0), cview(wide.as_view()).narrow(2, 0, p.Dk), shifted, opt);
  }, {"linear::kda_step", "state_out", "state_in", "must not overlap", "the same view (in place)"});
  expect_error([&] {
    linear::kda_step(token(p.q, 0), token(p.k, 0), token(p.v, 0), token(p.gk, 0), token(p.beta, 0),
                     token(o.as_view(), 0), cview(tensor<float, 4>({p.B, p.H, p.Dk, p.Dv + 1})), all, opt);
  }, {"linear::kda_step", "state_in must have shape"});
}

// NaN (common.hpp): in q_t it reaches o_t only; in k_t or v_t, o_t and every later output of its
// head; outputs before t stay clean (before t's chunk in the chunked form); other heads are clean.
TEST(kda, nan_propagates_forward_only) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const linear::options opt{.chunk_size = 16};
  const problem clean = make_problem(kda, 1, 2, 40, 8, 6, 47, opt);
  const std::int64_t t = 21, chunk_start = 16;
  const outputs want = run_all(kda, impl::reference, clean, opt);
  for (int where = 0; where < 3; ++where) {
    problem p = clean;
    (where == 0 ? p.q : where == 1 ? p.k : p.v)(0, 1, t, 2) = nan;
    for (impl i : {impl::reference, impl::recurrent, impl::chunked}) {
      const outputs got = run_all(kda, i, p, opt);
      const std::int64_t clean_before = i == impl::chunked ? chunk_start : t;
      for (std::int64_t tt = 0; tt < p.L; ++tt) {
        bool any_nan = false;
        for (std::int64_t e = 0; e < p.Dv; ++e) {
          any_nan = any_nan || std::isnan(got.o(0, 1, tt, e));
          EXPECT_NEAR(got.o(0, 0, tt, e), want.o(0, 0, tt, e), 1e-5) << "head 0 is clean";
        }
        const bool must = tt == t || (tt > t && where != 0);
        if (must) {
          EXPECT_TRUE(any_nan) << "input " << where << " impl " << static_cast<int>(i) << " token " << tt;
        }
        if (tt < clean_before || (where == 0 && tt != t)) {
          EXPECT_FALSE(any_nan) << "input " << where << " impl " << static_cast<int>(i) << " token " << tt;
        }
      }
    }
  }
}

TEST(kda, bad_gates_and_beta) {
  const problem p = make_problem(kda, 1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6});
  tensor<float, 4> g = p.gk;
  g(0, 1, 3, 7) = 1.0f;
  expect_error([&] { linear::kda(p.q, p.k, p.v, g, p.beta, o); },
               {"linear::kda", "g (log-decay) must be <= 0 and not NaN, got g[0, 1, 3, 7] = 1"});
  g(0, 1, 3, 7) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { linear::reference::kda(p.q, p.k, p.v, g, p.beta, o); },
               {"linear::reference::kda", "g[0, 1, 3, 7] = nan"});
  expect_error([&] { linear::kda(p.q, p.k, p.v, tensor<float, 4>({1, 2, 10, 7}), p.beta, o); },
               {"linear::kda", "g must have shape [1, 2, 10, 8]"});
  tensor<float, 3> beta = p.beta;
  beta(0, 1, 9) = 3.0f;
  expect_error([&] { linear::kda(p.q, p.k, p.v, p.gk, beta, o); },
               {"linear::kda", "beta must be in [0, 2], got beta[0, 1, 9] = 3"});
  expect_error([&] { linear::reference::kda(p.q, p.k, p.v, p.gk, beta, o); }, {"linear::reference::kda", "beta[0, 1, 9]"});
}

}  // namespace

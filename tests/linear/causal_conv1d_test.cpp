// Tests of mnemo/linear/causal_conv1d.hpp: the SIMD path (and the scalar one) against the double
// reference on awkward shapes (L = 1, 37, 1000, L < W-1, W = 1, odd Dm), streaming in pieces,
// the step against the full op, rollback through linear::state_ring, NaN propagation, threads,
// and every boundary check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mnemo/linear/causal_conv1d.hpp"
#include "mnemo/linear/state_ring.hpp"
#include "support/support.hpp"

namespace {

using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_close;
using mnemo::test::expect_error;
using mnemo::test::random_tensor;
namespace linear = mnemo::linear;

constexpr double atol = 1e-5, rtol = 1e-5;

struct problem {
  std::int64_t B, Dm, L, W;
  tensor<float, 3> x, init;
  tensor<float, 2> weight;
  tensor<float, 1> bias;

  problem(std::int64_t B_, std::int64_t Dm_, std::int64_t L_, std::int64_t W_, std::uint32_t seed)
      : B(B_), Dm(Dm_), L(L_), W(W_),
        x(random_tensor<float, 3>({B_, Dm_, L_}, seed)),
        init(random_tensor<float, 3>({B_, Dm_, W_ - 1}, seed + 1)),
        weight(random_tensor<float, 2>({Dm_, W_}, seed + 2, -0.8f, 0.8f)),
        bias(random_tensor<float, 1>({Dm_}, seed + 3)) {}
};

struct result {
  tensor<float, 3> y, fin;
};

enum class impl { reference, fast, scalar };

result run(const problem& p, impl i, bool bias, bool init, const linear::conv1d_options& opt) {
  result r{tensor<float, 3>({p.B, p.Dm, p.L}), tensor<float, 3>({p.B, p.Dm, p.W - 1})};
  const view<const float, 1> b = bias ? mnemo::cview(p.bias) : view<const float, 1>{};
  const view<const float, 3> s = init ? mnemo::cview(p.init) : view<const float, 3>{};
  switch (i) {
    case impl::reference: linear::reference::causal_conv1d(p.x, p.weight, b, r.y, s, r.fin, opt); break;
    case impl::fast: linear::causal_conv1d(p.x, p.weight, b, r.y, s, r.fin, opt); break;
    case impl::scalar: linear::causal_conv1d<mnemo::simd::scalar_arch>(p.x, p.weight, b, r.y, s, r.fin, opt); break;
  }
  return r;
}

const linear::conv1d_options silu{linear::conv_activation::silu};

TEST(causal_conv1d, fast_matches_reference) {
  struct shape {
    std::int64_t B, Dm, L, W;
  };
  const shape shapes[] = {{1, 1, 1, 4},  {2, 7, 37, 4}, {1, 5, 1000, 4}, {2, 3, 37, 3}, {1, 4, 2, 5},
                          {1, 3, 10, 1}, {1, 2, 37, 9}, {3, 17, 8, 4},   {1, 33, 3, 4}, {1, 2, 16, 2}};
  std::uint32_t seed = 1;
  for (const shape& s : shapes) {
    const problem p(s.B, s.Dm, s.L, s.W, seed += 10);
    for (int variant = 0; variant < 8; ++variant) {
      const bool bias = variant & 1, init = variant & 2;
      const linear::conv1d_options opt = variant & 4 ? silu : linear::conv1d_options{};
      const std::string what = "B=" + std::to_string(s.B) + " Dm=" + std::to_string(s.Dm) + " L=" +
                               std::to_string(s.L) + " W=" + std::to_string(s.W) + " variant=" + std::to_string(variant);
      const result want = run(p, impl::reference, bias, init, opt);
      for (impl i : {impl::fast, impl::scalar}) {
        const result got = run(p, i, bias, init, opt);
        expect_close(got.y, want.y, atol, rtol, what + " y");
        expect_close(got.fin, want.fin, 0, 0, what + " final_states");  // raw inputs: exact
      }
    }
  }
}

// Spot values by hand: W = 2, weight [a, b]: y_t = a x_{t-1} + b x_t (+ bias).
TEST(causal_conv1d, semantics_by_hand) {
  tensor<float, 3> x({1, 1, 3}), init({1, 1, 1}), y({1, 1, 3}), fin({1, 1, 1});
  tensor<float, 2> w({1, 2});
  tensor<float, 1> bias({1});
  x(0, 0, 0) = 1, x(0, 0, 1) = 2, x(0, 0, 2) = 3, init(0, 0, 0) = 5, w(0, 0) = 10, w(0, 1) = 1, bias(0) = 0.5f;
  linear::causal_conv1d(x, w, bias, y, init, fin);
  EXPECT_FLOAT_EQ(y(0, 0, 0), 50 + 1 + 0.5f);
  EXPECT_FLOAT_EQ(y(0, 0, 1), 10 + 2 + 0.5f);
  EXPECT_FLOAT_EQ(y(0, 0, 2), 20 + 3 + 0.5f);
  EXPECT_EQ(fin(0, 0, 0), 3.0f);
}

// Feeding the input in pieces with the state carried in place equals one call, including pieces
// shorter than W - 1.
TEST(causal_conv1d, streaming_pieces) {
  const problem p(2, 9, 41, 4, 7);
  const result want = run(p, impl::fast, true, true, silu);
  for (std::int64_t cut : {1, 2, 3, 20, 40}) {
    tensor<float, 3> state = p.init, y({p.B, p.Dm, p.L});
    for (auto [t0, n] : {std::pair<std::int64_t, std::int64_t>{0, cut}, {cut, p.L - cut}}) {
      const view<const float, 3> xs = mnemo::cview(p.x).narrow(2, t0, n);
      linear::causal_conv1d(xs, p.weight, p.bias, view<float, 3>(y).narrow(2, t0, n), state, state, silu);
    }
    expect_close(y, want.y, atol, rtol, "cut " + std::to_string(cut));
    expect_close(state, want.fin, 0, 0, "final state, cut " + std::to_string(cut));
  }
}

// [B, Dm] column of token t.
tensor<float, 2> column(const tensor<float, 3>& x, std::int64_t t) {
  tensor<float, 2> c({x.extent(0), x.extent(1)});
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t d = 0; d < x.extent(1); ++d) c(b, d) = x(b, d, t);
  return c;
}

TEST(causal_conv1d, step_matches_full_op) {
  for (std::int64_t W : {1, 2, 4, 6}) {
    const problem p(2, 13, 12, W, 20 + static_cast<std::uint32_t>(W));
    for (bool act : {false, true}) {
      const linear::conv1d_options opt = act ? silu : linear::conv1d_options{};
      const result want = run(p, impl::reference, true, true, opt);
      tensor<float, 3> state = p.init;
      for (std::int64_t t = 0; t < p.L; ++t) {
        tensor<float, 2> y({p.B, p.Dm});
        linear::causal_conv1d_step(column(p.x, t), p.weight, p.bias, y, state, opt);
        expect_close(y, column(want.y, t), atol, rtol, "W=" + std::to_string(W) + " t=" + std::to_string(t));
      }
      expect_close(state, want.fin, 0, 0, "W=" + std::to_string(W) + " state");
    }
  }
}

// Speculative decoding: step 5 drafted tokens through a state_ring, reject the last 3, step 2
// other tokens: outputs and state equal the full op over the accepted tokens.
TEST(causal_conv1d, rollback_with_state_ring) {
  const problem p(1, 11, 9, 4, 31);
  const problem other(1, 11, 9, 4, 77);  // the tokens that replace the rejected ones
  linear::state_ring<3> ring({p.B, p.Dm, p.W - 1}, 4);
  std::copy(p.init.begin(), p.init.end(), ring.state().data());
  for (std::int64_t t = 0; t < 5; ++t) {
    tensor<float, 2> y({p.B, p.Dm});
    auto [in, out] = ring.advance();
    linear::causal_conv1d_step(column(p.x, t), p.weight, p.bias, y, in, out);
  }
  EXPECT_EQ(ring.available(), 4);
  ring.rollback(3);
  EXPECT_EQ(ring.available(), 1);
  // Accepted: p's tokens 0, 1; then other's tokens 2, 3.
  tensor<float, 3> xs({p.B, p.Dm, 4});
  for (std::int64_t d = 0; d < p.Dm; ++d)
    for (std::int64_t t = 0; t < 4; ++t) xs(0, d, t) = t < 2 ? p.x(0, d, t) : other.x(0, d, t);
  tensor<float, 3> want_y({p.B, p.Dm, 4}), want_state({p.B, p.Dm, p.W - 1});
  linear::reference::causal_conv1d(xs, p.weight, p.bias, want_y, p.init, want_state);
  for (std::int64_t t = 2; t < 4; ++t) {
    tensor<float, 2> y({p.B, p.Dm});
    auto [in, out] = ring.advance();
    linear::causal_conv1d_step(column(xs, t), p.weight, p.bias, y, in, out);
    expect_close(y, column(want_y, t), atol, rtol, "after rollback, t=" + std::to_string(t));
  }
  expect_close(ring.state(), want_state, 0, 0, "state after rollback and two steps");
  // 3 steps are kept now (1 + 2), and no more: back to the state after token 0.
  expect_error([&] { ring.rollback(4); }, {"linear::state_ring::rollback", "[0, 3]", "got 4"});
  ring.rollback(3);
  tensor<float, 3> y0({p.B, p.Dm, 1}), after0({p.B, p.Dm, p.W - 1});
  linear::reference::causal_conv1d(mnemo::cview(xs).narrow(2, 0, 1), p.weight, p.bias, y0, p.init, after0);
  expect_close(ring.state(), after0, 0, 0, "rolled back to the state after token 0");
  expect_error([] { linear::state_ring<3>({1, 2, 3}, 0); }, {"linear::state_ring", "depth", ">= 1", "got 0"});
}

// Results do not depend on the thread count.
TEST(causal_conv1d, threads) {
  const problem p(3, 70, 50, 4, 41);
  linear::conv1d_options one = silu, two = silu;
  one.threads = 1;
  two.threads = 2;
  const result a = run(p, impl::fast, true, true, one), b = run(p, impl::fast, true, true, two);
  expect_close(a.y, b.y, 0, 0, "y");
}

// A NaN input spoils exactly the W outputs whose window holds it (also through a zero weight).
TEST(causal_conv1d, nan_propagation) {
  problem p(1, 3, 30, 4, 51);
  p.weight(1, 1) = 0.0f;
  const std::int64_t t_nan = 11;
  p.x(0, 1, t_nan) = std::numeric_limits<float>::quiet_NaN();
  for (impl i : {impl::reference, impl::fast}) {
    const result r = run(p, i, true, true, silu);
    for (std::int64_t d = 0; d < p.Dm; ++d)
      for (std::int64_t t = 0; t < p.L; ++t) {
        const bool spoiled = d == 1 && t >= t_nan && t < t_nan + p.W;
        EXPECT_EQ(std::isnan(r.y(0, d, t)), spoiled) << "d=" << d << " t=" << t;
      }
    for (float v : r.fin) EXPECT_FALSE(std::isnan(v));
  }
  // In the last W-1 inputs, it is carried into the state.
  p.x(0, 1, p.L - 1) = std::numeric_limits<float>::quiet_NaN();
  const result r = run(p, impl::fast, true, true, silu);
  EXPECT_TRUE(std::isnan(r.fin(0, 1, p.W - 2)));
  EXPECT_FALSE(std::isnan(r.fin(0, 0, p.W - 2)));
}

// SiLU at the extremes, in the vector body, the scalar tail and the step (W = 1, weight 1: y = silu(x)):
// -inf gives NaN (as torch), +inf gives +inf, large negative values 0, NaN stays NaN.
TEST(causal_conv1d, silu_extremes) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> values = {-inf, -1e30f, -100.0f, -87.5f, -30.0f, -1.0f, -0.0f, 0.0f, 1.0f, 30.0f, 100.0f, inf, nan};
  const std::int64_t L = 2 * static_cast<std::int64_t>(values.size()) + 5;  // vector body and scalar tail
  tensor<float, 3> x({1, 1, L}), y({1, 1, L}), want({1, 1, L});
  for (std::int64_t t = 0; t < L; ++t) x(0, 0, t) = values[t % values.size()];
  tensor<float, 2> w({1, 1});
  w(0, 0) = 1.0f;
  linear::reference::causal_conv1d(x, w, {}, want, {}, {}, silu);
  linear::causal_conv1d(x, w, {}, y, {}, {}, silu);
  for (std::int64_t t = 0; t < L; ++t) {
    const float v = x(0, 0, t), got = y(0, 0, t), ref = want(0, 0, t);
    if (std::isnan(v) || v == -inf) {
      EXPECT_TRUE(std::isnan(got) && std::isnan(ref)) << "x=" << v;
    } else if (std::isinf(ref)) {
      EXPECT_EQ(got, ref) << "x=" << v;
    } else {
      EXPECT_NEAR(got, ref, 1e-6 + 1e-6 * std::fabs(ref)) << "x=" << v;
    }
    tensor<float, 2> x1({1, 1}), y1({1, 1});
    tensor<float, 3> state({1, 1, 0});
    x1(0, 0) = v;
    linear::causal_conv1d_step(x1, w, {}, y1, state, silu);
    EXPECT_TRUE(std::isnan(y1(0, 0)) ? std::isnan(got) : y1(0, 0) == got) << "step, x=" << v;
  }
  EXPECT_EQ(y(0, 0, 11), inf);
  EXPECT_EQ(y(0, 0, 2), 0.0f);  // -100 sigmoid(-100) = -3.7e-42 in double; 0 (-0) here
}

TEST(causal_conv1d, bad_inputs) {
  const problem p(2, 5, 8, 4, 61);
  tensor<float, 3> y({2, 5, 8}), fin({2, 5, 3});
  const char* fn = "linear::causal_conv1d";
  expect_error([&] { linear::causal_conv1d(p.x, tensor<float, 2>({5, 0}), p.bias, y); },
               {fn, "weight", "W >= 1", "W=0"});
  expect_error([&] { linear::causal_conv1d(p.x, tensor<float, 2>({4, 4}), p.bias, y); },
               {fn, "weight", "[5, 4]", "[4, 4]"});
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, tensor<float, 1>({6}), y); }, {fn, "bias", "[5]", "[6]"});
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, tensor<float, 3>({2, 5, 7})); },
               {fn, "y", "[2, 5, 8]", "[2, 5, 7]"});
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, y, tensor<float, 3>({2, 5, 4}), fin); },
               {fn, "initial_states", "[2, 5, 3]", "[2, 5, 4]"});
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, y, p.init, tensor<float, 3>({1, 5, 3})); },
               {fn, "final_states", "[2, 5, 3]", "[1, 5, 3]"});
  linear::conv1d_options bad_threads;
  bad_threads.threads = -1;
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, y, {}, {}, bad_threads); },
               {fn, "options.threads", "got -1"});
  linear::conv1d_options bad_act;
  bad_act.activation = static_cast<linear::conv_activation>(7);
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, y, {}, {}, bad_act); },
               {fn, "options.activation", "got 7"});
  // Aliasing: y over x; overlapping but different state views.
  tensor<float, 3> buf({2, 5, 8});
  expect_error([&] { linear::causal_conv1d(buf, p.weight, p.bias, buf); }, {fn, "y", "x", "overlap"});
  tensor<float, 3> st({2, 5, 4});
  const view<float, 3> s0 = view<float, 3>(st).narrow(2, 0, 3), s1 = view<float, 3>(st).narrow(2, 1, 3);
  expect_error([&] { linear::causal_conv1d(p.x, p.weight, p.bias, y, s0, s1); },
               {fn, "final_states", "initial_states", "overlap"});
  // The reference checks the same.
  expect_error([&] { linear::reference::causal_conv1d(p.x, tensor<float, 2>({5, 0}), p.bias, y); },
               {"linear::reference::causal_conv1d", "W >= 1"});

  const char* fs = "linear::causal_conv1d_step";
  tensor<float, 2> x1({2, 5}), y1({2, 5});
  tensor<float, 3> state({2, 5, 3});
  expect_error([&] { linear::causal_conv1d_step(x1, p.weight, p.bias, y1, tensor<float, 3>({2, 5, 2})); },
               {fs, "state_in", "[2, 5, 3]", "[2, 5, 2]"});
  expect_error([&] { linear::causal_conv1d_step(x1, p.weight, p.bias, tensor<float, 2>({2, 4}), state); },
               {fs, "y", "[2, 5]", "[2, 4]"});
  expect_error([&] { linear::causal_conv1d_step(x1, p.weight, p.bias, y1, view<float, 3>{}); },
               {fs, "state_in", "[2, 5, 3]"});
  expect_error([&] { linear::causal_conv1d_step(x1, p.weight, p.bias, y1, s0, s1); },
               {fs, "state_out", "state_in", "overlap"});
}

}  // namespace

// tests/linear/test_util.hpp — what the tests of include/mnemo/linear/ share: random problems for
// any member, one call that runs a member by any of its paths on a token range, comparisons, and
// the checks every member goes through (forms against the reference on awkward shapes, pieces,
// steps, rollback of out-of-place steps, extreme gates, long runs, bf16 inputs, threads, strided
// views, golden cases).
//
// A member is a row of the member table (mnemo/linear/members.hpp), passed as a value:
// check_forms(member::gla{}). Each check is a template on the row, so a test file compiles only
// the members it names.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "golden/runner.hpp"
#include "linear/golden_ops.hpp"
#include "mnemo/linear/members.hpp"
#include "mnemo/linear/state_ring.hpp"
#include "support/support.hpp"

namespace linear_test {

using mnemo::bf16;
using mnemo::tensor;
using mnemo::view;
namespace linear = mnemo::linear;

namespace member = mnemo::linear::members;
using mnemo::test::expect_error;
enum class impl { reference, recurrent, chunked, automatic };

template <class M>
const char* member_name(M) {
  return M::name;
}

// Gate values of a random problem: log-decays uniform in [lo, hi] (hi <= 0).
struct gate_range {
  float lo = -0.5f, hi = -0.01f;
};

// One random problem: inputs of every member (each uses what it needs) and an initial state.
struct problem {
  std::int64_t B, H, L, Dk, Dv;
  tensor<float, 4> q, k, v;  // [B, H, L, Dk], [B, H, L, Dk], [B, H, L, Dv]
  tensor<float, 3> g;        // [B, H, L]       simple_gla, gated_delta_rule
  tensor<float, 4> gk;       // [B, H, L, Dk]   gla, kda
  tensor<float, 3> beta;     // [B, H, L]       delta rules
  tensor<float, 1> gamma;    // [H]             retention
  tensor<float, 4> state0;   // [B, H, Df, Ds]
  tensor<float, 4> a, b;     // [B, H, L, Dk]   rwkv7
};

inline std::int64_t state_rows(const problem& p, const linear::options& opt) { return linear::feature_dim(opt.map, p.Dk); }
inline std::int64_t state_cols(const problem& p, const linear::options& opt) { return opt.normalize ? p.Dv + 1 : p.Dv; }

// q, k, v uniform in [-1, 1] (delta rules: q and k L2-normalised unless opt.use_qk_l2norm, as
// the rule expects unit keys), beta in [0.05, 1], gamma RetNet's, a small random initial state
// (with normalize: a positive key-sum column, as a real prefix would leave), RWKV-7's a = -kk and
// b = kk * iclr (kk a random unit vector, iclr in [0, 1) per channel: a transition that does not
// expand; drawn last, so the other inputs are those of the same seed without them).
template <class M>
problem make_problem(M, std::int64_t B, std::int64_t H, std::int64_t L, std::int64_t Dk, std::int64_t Dv,
                            std::uint32_t seed, const linear::options& opt = {}, gate_range gr = {}) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f), gate(gr.lo, gr.hi), beta(0.05f, 1.0f);
  problem p{B, H, L, Dk, Dv, tensor<float, 4>({B, H, L, Dk}), tensor<float, 4>({B, H, L, Dk}),
            tensor<float, 4>({B, H, L, Dv}), tensor<float, 3>({B, H, L}), tensor<float, 4>({B, H, L, Dk}),
            tensor<float, 3>({B, H, L}), linear::retnet_gamma(H), tensor<float, 4>(), tensor<float, 4>({B, H, L, Dk}),
            tensor<float, 4>({B, H, L, Dk})};
  for (auto* t : {&p.q, &p.k, &p.v})
    for (float& x : *t) x = unit(rng);
  if (M::beta && !opt.use_qk_l2norm)
    for (auto* t : {&p.q, &p.k})
      for (std::int64_t r = 0; r < B * H * L; ++r) {
        float* row = t->data() + r * Dk;
        double ss = 0;
        for (std::int64_t c = 0; c < Dk; ++c) ss += static_cast<double>(row[c]) * row[c];
        for (std::int64_t c = 0; c < Dk; ++c) row[c] = static_cast<float>(row[c] / std::sqrt(ss + 1e-6));
      }
  for (float& x : p.g) x = gate(rng);
  for (float& x : p.gk) x = gate(rng);
  for (float& x : p.beta) x = beta(rng);
  const std::int64_t Df = state_rows(p, opt), Ds = state_cols(p, opt);
  p.state0 = tensor<float, 4>({B, H, Df, Ds});
  for (std::int64_t i = 0; i < p.state0.size(); ++i) {
    const bool key_sum = opt.normalize && i % Ds == Ds - 1;
    p.state0.data()[i] = key_sum ? 1.0f + 0.5f * (unit(rng) + 1.0f) : 0.1f * unit(rng);
  }
  std::uniform_real_distribution<float> rate(0.0f, 1.0f);
  for (std::int64_t r = 0; r < B * H * L; ++r) {
    float* a = p.a.data() + r * Dk;
    float* b = p.b.data() + r * Dk;
    double ss = 0;
    for (std::int64_t c = 0; c < Dk; ++c) {
      a[c] = unit(rng);
      ss += static_cast<double>(a[c]) * a[c];
    }
    for (std::int64_t c = 0; c < Dk; ++c) {
      const float kk = static_cast<float>(a[c] / std::sqrt(ss + 1e-12));
      a[c] = -kk;
      b[c] = kk * rate(rng);
    }
  }
  return p;
}

inline linear::options with_path(linear::options opt, impl i) {
  opt.path = i == impl::chunked ? linear::form::chunked
             : i == impl::recurrent ? linear::form::recurrent
                                    : linear::form::automatic;
  return opt;
}

// The inputs of p (every kind; each member reads its own).
inline linear::member_inputs inputs_of(const problem& p) { return {p.gamma, p.g, p.gk, p.beta, p.a, p.b}; }

// Runs member m by implementation i on q, k, v (element type T) with the inputs `in`.
template <class T, class M>
void call_member(M m, impl i, const view<const T, 4>& q, const view<const T, 4>& k, const view<const T, 4>& v,
                 const linear::member_inputs& in, const view<float, 4>& o, const view<float, 4>& state,
                 const linear::options& opt) {
  const linear::options o2 = with_path(opt, i);
  if (i == impl::reference)
    linear::reference_member(m, q, k, v, in, o, state, o2);
  else
    linear::run_member(m, q, k, v, in, o, state, o2);
}

// Runs member m by implementation i on tokens [t0, t0 + n) of q, k, v and of the gates of p,
// writing rows [t0, t0 + n) of o; `state` in and out.
template <class T, class M>
void run_range(M m, impl i, const view<const T, 4>& q, const view<const T, 4>& k, const view<const T, 4>& v,
               const problem& p, std::int64_t t0, std::int64_t n, const view<float, 4>& o, const view<float, 4>& state,
               const linear::options& opt) {
  call_member<T>(m, i, q.narrow(2, t0, n), k.narrow(2, t0, n), v.narrow(2, t0, n), linear::narrow(inputs_of(p), t0, n),
                 o.narrow(2, t0, n), state, opt);
}

struct outputs {
  tensor<float, 4> o, state;
};

// The whole sequence in one call, from p.state0.
template <class M>
outputs run_all(M m, impl i, const problem& p, const linear::options& opt) {
  outputs r{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
  run_range<float>(m, i, p.q, p.k, p.v, p, 0, p.L, r.o, r.state, opt);
  return r;
}

// max |got - want| <= tol * max(1, max |want|), and everything finite.
template <class T, int R>
::testing::AssertionResult close(const tensor<T, R>& got, const tensor<T, R>& want, double tol) {
  if (got.shape() != want.shape())
    return ::testing::AssertionFailure() << "shape " << mnemo::shape_string(got.shape()) << " vs "
                                         << mnemo::shape_string(want.shape());
  double err = 0, mag = 1;
  std::int64_t worst = -1;
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const double g = got.data()[i], w = want.data()[i];
    if (!std::isfinite(g) || !std::isfinite(w))
      return ::testing::AssertionFailure() << "non-finite value at flat index " << i << ": got " << g << ", want " << w;
    mag = std::max(mag, std::abs(w));
    if (std::abs(g - w) > err) {
      err = std::abs(g - w);
      worst = i;
    }
  }
  if (err <= tol * mag) return ::testing::AssertionSuccess() << "max err " << err;
  return ::testing::AssertionFailure() << "max err " << err << " > " << tol << " * " << mag << " at flat index "
                                       << worst << " (got " << got.data()[worst] << ", want " << want.data()[worst]
                                       << ")";
}

// f32 kernels against the double reference: a few hundred ulps of the output's magnitude covers
// L = 1000 with gates near 0 (measured worst 3e-6, see the *_test.cpp runs).
inline constexpr double f32_tol = 2e-5;

// ---- the checks every member goes through ----------------------------------------------------

struct shape_case {
  std::int64_t B, H, L, Dk, Dv, chunk;
};

// L = 1, chunk - 1, chunk, chunk + 1, several chunks, 1000; Dk != Dv; odd and tiny chunks.
inline std::vector<shape_case> awkward_shapes() {
  return {{1, 1, 1, 16, 16, 64},  {2, 3, 15, 24, 40, 16}, {1, 2, 16, 40, 24, 16}, {2, 1, 17, 32, 48, 16},
          {1, 2, 63, 33, 20, 64}, {1, 1, 64, 8, 72, 64},  {1, 2, 65, 64, 64, 64}, {1, 1, 200, 20, 36, 7},
          {1, 1, 50, 12, 12, 1},  {1, 1, 1000, 32, 24, 64}};
}

// Chunked and recurrent (and automatic) forms against the reference.
template <class M>
void check_forms(M m, linear::options opt = {}, gate_range gr = {},
                        const std::vector<shape_case>& shapes = awkward_shapes()) {
  std::uint32_t seed = 1;
  for (const shape_case& s : shapes) {
    opt.chunk_size = s.chunk;
    const problem p = make_problem(m, s.B, s.H, s.L, s.Dk, s.Dv, seed++, opt, gr);
    const outputs want = run_all(m, impl::reference, p, opt);
    for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
      const outputs got = run_all(m, i, p, opt);
      const char* name = i == impl::chunked ? "chunked" : i == impl::recurrent ? "recurrent" : "automatic";
      EXPECT_TRUE(close(got.o, want.o, f32_tol)) << member_name(m) << " " << name << " o, L=" << s.L << " Dk=" << s.Dk
                                                 << " Dv=" << s.Dv << " chunk=" << s.chunk;
      EXPECT_TRUE(close(got.state, want.state, f32_tol))
          << member_name(m) << " " << name << " state, L=" << s.L << " Dk=" << s.Dk << " Dv=" << s.Dv
          << " chunk=" << s.chunk;
    }
  }
}

// The parallel ("attention") form, computed here independently of the library:
//   o_t = scale q_t^T diag(E(-1, t)) S_0 + sum_{j <= t} scale (sum_c q_t[c] E(j, t)[c] k_j[c]) v_j,
//   E(j, t)[c] = exp(sum_{j < s <= t} log-decay_s[c])
// for the members without a delta rule; the reference and both forms must match it.
template <class M>
void check_parallel_form(M m) {
  linear::options opt;
  opt.chunk_size = 16;
  const problem p = make_problem(m, 1, 2, 41, 12, 10, 31, opt);
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.Dk));
  tensor<float, 4> want({p.B, p.H, p.L, p.Dv});
  auto log_decay = [&](std::int64_t h, std::int64_t s, std::int64_t c) -> double {
    switch (M::gate) {
      case linear::gate_kind::head: return std::log(static_cast<double>(p.gamma(h)));
      case linear::gate_kind::scalar: return static_cast<double>(p.g(0, h, s));
      case linear::gate_kind::channel: return static_cast<double>(p.gk(0, h, s, c));
      case linear::gate_kind::none: break;
    }
    return 0.0;
  };
  for (std::int64_t h = 0; h < p.H; ++h)
    for (std::int64_t t = 0; t < p.L; ++t)
      for (std::int64_t e = 0; e < p.Dv; ++e) {
        double acc = 0;
        for (std::int64_t c = 0; c < p.Dk; ++c) {
          double sum = 0;  // E(-1, t)[c]
          for (std::int64_t s = 0; s <= t; ++s) sum += log_decay(h, s, c);
          acc += scale * p.q(0, h, t, c) * std::exp(sum) * p.state0(0, h, c, e);
        }
        for (std::int64_t j = 0; j <= t; ++j) {
          double score = 0;
          for (std::int64_t c = 0; c < p.Dk; ++c) {
            double sum = 0;  // E(j, t)[c]
            for (std::int64_t s = j + 1; s <= t; ++s) sum += log_decay(h, s, c);
            score += scale * p.q(0, h, t, c) * std::exp(sum) * p.k(0, h, j, c);
          }
          acc += score * p.v(0, h, j, e);
        }
        want(0, h, t, e) = static_cast<float>(acc);
      }
  for (impl i : {impl::reference, impl::chunked, impl::recurrent})
    EXPECT_TRUE(close(run_all(m, i, p, opt).o, want, f32_tol)) << member_name(m) << " parallel form, impl "
                                                                << static_cast<int>(i);
}

// Pieces of uneven lengths (through the state) == all at once; then token-by-token steps after a
// prefill == all at once.
template <class M>
void check_pieces(M m, linear::options opt = {}) {
  opt.chunk_size = 16;
  const problem p = make_problem(m, 2, 2, 150, 24, 20, 7, opt);
  const outputs whole = run_all(m, impl::chunked, p, opt);
  for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
    outputs parts{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
    std::int64_t t0 = 0;
    for (std::int64_t n : {37, 1, 16, 5, 60, 31}) {
      run_range<float>(m, i, p.q, p.k, p.v, p, t0, n, parts.o, parts.state, opt);
      t0 += n;
    }
    ASSERT_EQ(t0, p.L);
    EXPECT_TRUE(close(parts.o, whole.o, f32_tol)) << member_name(m) << " pieces o";
    EXPECT_TRUE(close(parts.state, whole.state, f32_tol)) << member_name(m) << " pieces state";
  }
}

// Token t of a [B, H, L, D] tensor as a [B, H, D] view.
template <class T>
view<const T, 3> token(const tensor<T, 4>& x, std::int64_t t) {
  const auto v = cview(x);
  return {v.ptr(0, 0, t), {v.extent(0), v.extent(1), v.extent(3)}, {v.stride(0), v.stride(1), 1}};
}
inline view<float, 3> token(const view<float, 4>& x, std::int64_t t) {
  return {x.ptr(0, 0, t), {x.extent(0), x.extent(1), x.extent(3)}, {x.stride(0), x.stride(1), 1}};
}
// Token t of a [B, H, L] tensor, copied to a [B, H] tensor (a view of it would have stride L in
// its innermost dimension, which views do not allow).
inline tensor<float, 2> token(const tensor<float, 3>& x, std::int64_t t) {
  tensor<float, 2> y({x.extent(0), x.extent(1)});
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t h = 0; h < x.extent(1); ++h) y(b, h) = x(b, h, t);
  return y;
}

// The inputs of token t of p, for the *_step functions.
struct token_of {
  tensor<float, 2> g, beta;  // [B, H] copies
  linear::token_inputs in;
  token_of(const problem& p, std::int64_t t) : g(token(p.g, t)), beta(token(p.beta, t)) {
    in = {p.gamma, g, token(p.gk, t), beta, token(p.a, t), token(p.b, t)};
  }
};

// One *_step of member m on token t of p, in place.
template <class M>
void step(M m, const problem& p, std::int64_t t, const view<float, 4>& o, const view<float, 4>& state,
          const linear::options& opt) {
  const token_of x(p, t);
  linear::step_member(m, token(p.q, t), token(p.k, t), token(p.v, t), x.in, token(o, t), state, opt);
}

// Prefill of L - steps tokens, then `steps` calls of the member's *_step: equals all at once.
template <class M>
void check_steps(M m, linear::options opt = {}) {
  opt.chunk_size = 16;
  const std::int64_t steps = 5;
  const problem p = make_problem(m, 2, 3, 53, 16, 24, 11, opt);
  const outputs whole = run_all(m, impl::chunked, p, opt);
  outputs inc{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
  const std::int64_t prefill = p.L - steps;
  run_range<float>(m, impl::chunked, p.q, p.k, p.v, p, 0, prefill, inc.o, inc.state, opt);
  for (std::int64_t t = prefill; t < p.L; ++t) step(m, p, t, inc.o, inc.state, opt);
  EXPECT_TRUE(close(inc.o, whole.o, f32_tol)) << member_name(m) << " steps o";
  EXPECT_TRUE(close(inc.state, whole.state, f32_tol)) << member_name(m) << " steps state";
}

// Speculative decoding (state_ring.hpp): the out-of-place *_step on the slots of a state_ring
// equals the in-place step bit for bit (o and state); after k steps, ring.rollback(n) holds
// exactly the state of k - n steps, for every n the ring keeps; steps and rollbacks interleave;
// state_in == state_out (the same view) is an in-place step, a partial overlap is rejected.
template <class M>
void check_rollback(M m, linear::options opt = {}) {
  opt.chunk_size = 16;
  const problem p = make_problem(m, 2, 3, 30, 24, 16, 45, opt);
  const std::int64_t prefill = 10, steps = 6, depth = 4;
  const std::int64_t Df = state_rows(p, opt), Ds = state_cols(p, opt);
  // states[t], outs[t]: the state after the first t tokens and o of token t - 1, by in-place steps.
  std::vector<tensor<float, 4>> states(prefill + steps + 1), outs(prefill + steps + 1);
  tensor<float, 4> state = p.state0, o({p.B, p.H, p.L, p.Dv});
  run_range<float>(m, impl::chunked, p.q, p.k, p.v, p, 0, prefill, o, state, opt);
  states[prefill] = state;
  for (std::int64_t t = prefill; t < prefill + steps; ++t) {
    step(m, p, t, o, state, opt);
    states[t + 1] = state;
    outs[t + 1] = o;
  }
  linear::state_ring<4> ring({p.B, p.H, Df, Ds}, depth);
  std::copy(states[prefill].begin(), states[prefill].end(), ring.state().data());
  tensor<float, 4> o2({p.B, p.H, p.L, p.Dv});
  auto advance = [&](std::int64_t t) {
    auto [in, out] = ring.advance();
    const token_of x(p, t);
    linear::step_member(m, token(p.q, t), token(p.k, t), token(p.v, t), x.in, token(o2.as_view(), t), in, out, opt);
    const auto got = token(o2.as_view(), t), want = token(outs[t + 1].as_view(), t);
    bool same = true;
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.H; ++h)
        same = same && std::equal(got.ptr(b, h), got.ptr(b, h) + p.Dv, want.ptr(b, h));
    EXPECT_TRUE(same) << member_name(m) << " out-of-place o of token " << t;
  };
  auto is = [&](std::int64_t t) {
    const view<float, 4> s = ring.state();
    return std::equal(s.data(), s.data() + s.size(), states[t].begin());
  };
  for (std::int64_t t = prefill; t < prefill + steps; ++t) {
    advance(t);
    EXPECT_TRUE(is(t + 1)) << member_name(m) << " out-of-place step " << t;
  }
  EXPECT_EQ(ring.available(), depth);  // 6 steps, the ring keeps the last 4
  for (std::int64_t n = 0; n <= depth; ++n) {  // every rollback the ring allows, from the same point
    linear::state_ring<4> copy = ring;
    copy.rollback(n);
    const view<float, 4> s = copy.state();
    EXPECT_TRUE(std::equal(s.data(), s.data() + s.size(), states[prefill + steps - n].begin()))
        << member_name(m) << " rollback(" << n << ")";
  }
  ring.rollback(3);
  EXPECT_TRUE(is(prefill + 3)) << member_name(m);
  EXPECT_EQ(ring.available(), 1);
  advance(prefill + 3);  // the same token again: the same state
  EXPECT_TRUE(is(prefill + 4)) << member_name(m);
  ring.rollback(2);  // the oldest state the full ring kept
  EXPECT_TRUE(is(prefill + 2)) << member_name(m);
  EXPECT_EQ(ring.available(), 0);

  // state_in and state_out the same view: in place, as the in-place step.
  tensor<float, 4> same = states[prefill];
  {
    const token_of x(p, prefill);
    linear::step_member(m, token(p.q, prefill), token(p.k, prefill), token(p.v, prefill), x.in,
                        token(o2.as_view(), prefill), cview(same), same.as_view(), opt);
  }
  EXPECT_TRUE(std::equal(same.begin(), same.end(), states[prefill + 1].begin())) << member_name(m) << " in place";

  // Overlapping but not the same view, or another shape: rejected.
  const std::string fn = std::string("linear::") + member_name(m) + "_step";
  tensor<float, 4> wide({p.B, p.H, Df + 1, Ds});
  const view<float, 4> shifted(wide.data() + Ds, {p.B, p.H, Df, Ds}, wide.as_view().strides());
  const token_of x(p, 0);
  expect_error([&] {
    linear::step_member(m, token(p.q, 0), token(p.k, 0), token(p.v, 0), x.in, token(o2.as_view(), 0),
                        cview(wide.as_view()).narrow(2, 0, Df), shifted, opt);
  }, {fn.c_str(), "state_out", "state_in", "must not overlap", "the same view (in place)"});
  expect_error([&] {
    linear::step_member(m, token(p.q, 0), token(p.k, 0), token(p.v, 0), x.in, token(o2.as_view(), 0),
                        cview(tensor<float, 4>({p.B, p.H, Df, Ds + 1})), same.as_view(), opt);
  }, {fn.c_str(), "state_in must have shape"});
}

// Gates near 0 (-1e-7, -0.0), moderate, large (-80, -200) and -inf (single, runs, at chunk
// borders, in the first token): chunked and recurrent agree with the reference and stay finite.
template <class M>
void check_extreme_gates(M m) {
  linear::options opt;
  opt.chunk_size = 16;
  problem p = make_problem(m, 1, 2, 100, 16, 12, 21, opt);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> pattern = {-1e-7f, -0.0f, -0.3f, -80.0f, -inf, -1e-7f, -200.0f, -inf, -inf, -2.0f, -1e30f};
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::size_t> pick(0, pattern.size() - 1);
  for (std::int64_t i = 0; i < p.g.size(); ++i) p.g.data()[i] = i % 3 == 0 ? pattern[pick(rng)] : -1e-7f;
  for (std::int64_t i = 0; i < p.gk.size(); ++i) p.gk.data()[i] = i % 5 == 0 ? pattern[pick(rng)] : -1e-6f;
  for (std::int64_t bh = 0; bh < p.B * p.H; ++bh) {  // -inf exactly at a chunk start and end, and at t = 0
    for (std::int64_t t : {0, 15, 16, 47}) {
      p.g.data()[bh * p.L + t] = -inf;
      for (std::int64_t c = 0; c < p.Dk; c += 2) p.gk.data()[(bh * p.L + t) * p.Dk + c] = -inf;
    }
  }
  const outputs want = run_all(m, impl::reference, p, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs got = run_all(m, i, p, opt);
    EXPECT_TRUE(close(got.o, want.o, f32_tol)) << member_name(m) << (i == impl::chunked ? " chunked" : " recurrent");
    EXPECT_TRUE(close(got.state, want.state, f32_tol)) << member_name(m) << " state";
  }
}

// 65,536 tokens (small H and D, so it stays fast): chunked stays finite and agrees with the
// recurrent form.
template <class M>
void check_long_run(M m, gate_range gr = {}) {
  linear::options opt;
  opt.chunk_size = 64;
  const problem p = make_problem(m, 1, 1, 65536, 8, 8, 3, opt, gr);
  const outputs ch = run_all(m, impl::chunked, p, opt);
  const outputs rec = run_all(m, impl::recurrent, p, opt);
  // Without a decay (linear_attn, delta_rule) the outputs grow; close() scales by the magnitude.
  EXPECT_TRUE(close(ch.o, rec.o, 1e-4)) << member_name(m) << " o over 65536 tokens";
  EXPECT_TRUE(close(ch.state, rec.state, 1e-4)) << member_name(m) << " state over 65536 tokens";
}

// bf16 q, k, v: each form on the bf16 inputs against the reference on the same (rounded) values.
// Not for members with other inputs: member_inputs holds f32 views, and rwkv7 wants a and b in q's
// element type (tests/linear/rwkv7_test.cpp checks its bf16 inputs itself).
template <class M>
void check_bf16(M m, linear::options opt = {}) {
  if constexpr (M::other_inputs) {
    GTEST_SKIP() << member_name(m) << ": its other inputs are f32 views in member_inputs";
  } else {
    opt.chunk_size = 16;
    const problem p = make_problem(m, 1, 2, 45, 24, 16, 9, opt);
    tensor<bf16, 4> qb(p.q.shape()), kb(p.k.shape()), vb(p.v.shape());
    problem rounded = p;
    for (auto [src, dst, back] : {std::tuple{&p.q, &qb, &rounded.q}, std::tuple{&p.k, &kb, &rounded.k},
                                  std::tuple{&p.v, &vb, &rounded.v}})
      for (std::int64_t i = 0; i < src->size(); ++i) {
        dst->data()[i] = bf16(src->data()[i]);
        back->data()[i] = static_cast<float>(dst->data()[i]);
      }
    const outputs want = run_all(m, impl::reference, rounded, opt);
    for (impl i : {impl::chunked, impl::recurrent}) {
      outputs got{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
      run_range<bf16>(m, i, qb, kb, vb, p, 0, p.L, got.o, got.state, opt);
      EXPECT_TRUE(close(got.o, want.o, f32_tol)) << member_name(m) << " bf16 o";
      EXPECT_TRUE(close(got.state, want.state, f32_tol)) << member_name(m) << " bf16 state";
    }
  }
}

// Threads: 1 and 2 threads give identical bits (each (batch, head) runs the same code); an empty
// state view is a zero initial state; L = 0 leaves the state as it was.
template <class M>
void check_threads_and_state(M m) {
  linear::options opt;
  opt.chunk_size = 16;
  problem p = make_problem(m, 2, 3, 40, 16, 8, 13, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    opt.threads = 1;
    const outputs one = run_all(m, i, p, opt);
    opt.threads = 2;
    const outputs two = run_all(m, i, p, opt);
    EXPECT_TRUE(std::equal(one.o.begin(), one.o.end(), two.o.begin())) << member_name(m) << " threads o";
    EXPECT_TRUE(std::equal(one.state.begin(), one.state.end(), two.state.begin())) << member_name(m) << " threads state";
  }
  opt.threads = 0;
  const problem zero = [&] {
    problem z = p;
    std::fill(z.state0.begin(), z.state0.end(), 0.0f);
    return z;
  }();
  const outputs want = run_all(m, impl::chunked, zero, opt);
  tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
  run_range<float>(m, impl::chunked, p.q, p.k, p.v, p, 0, p.L, o, {}, opt);
  EXPECT_TRUE(std::equal(o.begin(), o.end(), want.o.begin())) << member_name(m) << " empty state == zero state";
  tensor<float, 4> state = p.state0;
  run_range<float>(m, impl::chunked, p.q, p.k, p.v, p, 0, 0, o, state, opt);
  EXPECT_TRUE(std::equal(state.begin(), state.end(), p.state0.begin())) << member_name(m) << " L = 0";
}

// q, k, v, o read and written through [B, L, H, D] buffers permuted to [B, H, L, D] (no copy).
template <class M>
void check_strided(M m) {
  linear::options opt;
  opt.chunk_size = 16;
  const problem p = make_problem(m, 2, 3, 37, 16, 24, 17, opt);
  auto blhd = [](const tensor<float, 4>& x) {  // [B, H, L, D] -> a [B, L, H, D] buffer
    tensor<float, 4> y({x.extent(0), x.extent(2), x.extent(1), x.extent(3)});
    for (std::int64_t b = 0; b < x.extent(0); ++b)
      for (std::int64_t h = 0; h < x.extent(1); ++h)
        for (std::int64_t t = 0; t < x.extent(2); ++t)
          for (std::int64_t c = 0; c < x.extent(3); ++c) y(b, t, h, c) = x(b, h, t, c);
    return y;
  };
  const tensor<float, 4> q = blhd(p.q), k = blhd(p.k), v = blhd(p.v);
  tensor<float, 4> o_blhd({p.B, p.L, p.H, p.Dv});
  const outputs want = run_all(m, impl::chunked, p, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    tensor<float, 4> state = p.state0;
    run_range<float>(m, i, cview(q).permute({0, 2, 1, 3}), cview(k).permute({0, 2, 1, 3}),
                     cview(v).permute({0, 2, 1, 3}), p, 0, p.L, o_blhd.as_view().permute({0, 2, 1, 3}), state, opt);
    tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.H; ++h)
        for (std::int64_t t = 0; t < p.L; ++t)
          for (std::int64_t c = 0; c < p.Dv; ++c) o(b, h, t, c) = o_blhd(b, t, h, c);
    EXPECT_TRUE(close(o, want.o, f32_tol)) << member_name(m) << " strided o";
    EXPECT_TRUE(close(state, want.state, f32_tol)) << member_name(m) << " strided state";
  }
}

// Every golden case of member m's op, by each implementation.
template <class M>
void check_golden(M m) {
  const std::string op = M::name;
  namespace fs = std::filesystem;
  namespace lg = mnemo::linear_golden;
  if (!mnemo::test::golden_available()) GTEST_SKIP() << "golden cases not found at " << mnemo::test::golden_dir();
  int ran = 0;
  for (const fs::path& path : mnemo::test::golden_cases()) {
    const mnemo::golden::golden_case c(path);
    if (c.op() != op) continue;
    ++ran;
    for (lg::impl i : {lg::impl::reference, lg::impl::recurrent, lg::impl::chunked}) {
      const mnemo::golden::results got = lg::run_member(m, c, i);
      for (const std::string& name : c.outputs()) {
        const mnemo::npy::array* g = got.find(name);
        ASSERT_NE(g, nullptr) << c.name() << ": output " << name << " not produced";
        const auto cmp = mnemo::golden::compare(name, *g, c.expected(name), c.atol(), c.rtol());
        EXPECT_TRUE(cmp.ok) << c.name() << " [" << lg::impl_name(i) << "] " << cmp.failure;
      }
    }
  }
  EXPECT_GT(ran, 0) << "no golden case of op " << op;
}

// The boundary checks every member shares: shapes of k, v, o and state, chunk_size, threads and
// scale, and (except linear_attn) the feature-map options.
template <class M>
void check_bad_common(M m) {
  const problem p = make_problem(m, 1, 2, 10, 8, 6, 41);
  const std::string fn = std::string("linear::") + member_name(m);
  tensor<float, 4> o({1, 2, 10, 6}), state({1, 2, 8, 6});
  auto call = [&](const tensor<float, 4>& q, const tensor<float, 4>& k, const tensor<float, 4>& v, view<float, 4> out,
                  view<float, 4> st, const linear::options& opt, impl i = impl::chunked) {
    call_member<float>(m, i, q, k, v, inputs_of(p), out, st, opt);
  };
  for (impl i : {impl::chunked, impl::recurrent, impl::reference}) {
    const std::string name = i == impl::reference ? "linear::reference::" + std::string(member_name(m)) : fn;
    expect_error([&] { call(p.q, tensor<float, 4>({1, 2, 10, 9}), p.v, o, state, {}, i); },
                 {name.c_str(), "k must have shape [1, 2, 10, 8]", "got [1, 2, 10, 9]"});
    expect_error([&] { call(p.q, p.k, tensor<float, 4>({1, 2, 11, 6}), o, state, {}, i); },
                 {name.c_str(), "v must have shape [1, 2, 10, 6]", "got [1, 2, 11, 6]"});
    tensor<float, 4> bad_o({1, 2, 10, 5});
    expect_error([&] { call(p.q, p.k, p.v, bad_o, state, {}, i); }, {name.c_str(), "o must have shape [1, 2, 10, 6]"});
    tensor<float, 4> bad_state({1, 2, 6, 8});
    expect_error([&] { call(p.q, p.k, p.v, o, bad_state, {}, i); },
                 {name.c_str(), "state must have shape [1, 2, 8, 6]", "got [1, 2, 6, 8]"});
    expect_error([&] { call(p.q, p.k, p.v, o, state, {.chunk_size = -1}, i); },
                 {name.c_str(), "options.chunk_size must be >= 0 (0: the default), got -1"});
    expect_error([&] { call(p.q, p.k, p.v, o, state, {.threads = -1}, i); },
                 {name.c_str(), "options.threads must be >= 0, got -1"});
    expect_error([&] { call(p.q, p.k, p.v, o, state, {.scale = std::numeric_limits<float>::quiet_NaN()}, i); },
                 {name.c_str(), "options.scale must be finite"});
    expect_error([&] { call(p.q, p.k, p.v, {}, state, {}, i); }, {name, "o must have shape [1, 2, 10, 6] [B, H, L, Dv]"});
    if (!M::features) {
      expect_error([&] { call(p.q, p.k, p.v, o, state, {.map = linear::feature_map::relu}, i); },
                   {name.c_str(), "options.map must be identity", "relu"});
      expect_error([&] { call(p.q, p.k, p.v, o, state, {.normalize = true}, i); },
                   {name.c_str(), "options.normalize must be false"});
    }
  }
}

}  // namespace linear_test

// Tests of mnemo/linear/rwkv7.hpp: the recurrent and chunked forms and the step against the double
// reference on awkward sizes (L = 1 .. 1000, odd head dims, chunk sizes 1 .. 64), with RWKV-7's a
// and b (a = -kk, b = kk * iclr) and with general ones; weak, strong and mixed decays, gates near 0
// and at -inf; the KDA special case against linear::reference::kda (an independent check of the
// orientation); pieces and steps against one call; rollback on a linear::state_ring; bf16 inputs;
// strided views; threads, empty state, L = 0; NaN propagation; the boundary checks. Then the linear
// family's shared checks (tests/linear/test_util.hpp) on rwkv7's row of the member table
// (mnemo/linear/members.hpp), on the family's q, k, v and gates with RWKV-7's a and b; not its bf16
// check (member_inputs holds f32 a and b) nor the golden cases (none has a and b).
//
// The tests above are self-contained (tests/support only); test_util.hpp's checks are templates on
// the member, so only rwkv7 (float and bf16 inputs) and KDA's reference are built.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <utility>
#include <vector>

#include "linear/test_util.hpp"
#include "mnemo/linear/kda.hpp"
#include "mnemo/linear/rwkv7.hpp"
#include "mnemo/linear/state_ring.hpp"
#include "support/support.hpp"

namespace {

using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_error;
namespace linear = mnemo::linear;

enum class impl { reference, recurrent, chunked, automatic };

const char* impl_name(impl i) {
  switch (i) {
    case impl::reference: return "reference";
    case impl::recurrent: return "recurrent";
    case impl::chunked: return "chunked";
    case impl::automatic: return "automatic";
  }
  return "?";
}

// How a and b are drawn: RWKV-7's (a = -kk, b = kk * iclr, kk a unit vector, iclr in [0, 1] per
// channel) or general (uniform in [-r, r], r = 0.5 / sqrt(Dk): a transition that may expand a
// little, for short sequences only).
enum class ab_kind { rwkv7, general };

struct problem {
  std::int64_t B, H, L, Dk, Dv;
  tensor<float, 4> q, k, v, g, a, b;  // [B, H, L, Dk] except v [B, H, L, Dv]
  tensor<float, 4> state0;            // [B, H, Dk, Dv]
};

// q uniform in [-1, 1], k in [-1, 1] / sqrt(Dk), v in [-1, 1], g uniform in [lo, hi], a small
// random initial state.
problem make_problem(std::int64_t B, std::int64_t H, std::int64_t L, std::int64_t Dk, std::int64_t Dv,
                     std::uint32_t seed, float lo = -0.5f, float hi = -0.01f, ab_kind kind = ab_kind::rwkv7) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f), gate(lo, hi), rate(0.0f, 1.0f);
  problem p{B, H, L, Dk, Dv, tensor<float, 4>({B, H, L, Dk}), tensor<float, 4>({B, H, L, Dk}),
            tensor<float, 4>({B, H, L, Dv}), tensor<float, 4>({B, H, L, Dk}), tensor<float, 4>({B, H, L, Dk}),
            tensor<float, 4>({B, H, L, Dk}), tensor<float, 4>({B, H, Dk, Dv})};
  const float inv_sqrt = 1.0f / std::sqrt(static_cast<float>(Dk));
  for (float& x : p.q) x = unit(rng);
  for (float& x : p.k) x = unit(rng) * inv_sqrt;
  for (float& x : p.v) x = unit(rng);
  for (float& x : p.g) x = gate(rng);
  for (float& x : p.state0) x = 0.1f * unit(rng);
  for (std::int64_t r = 0; r < B * H * L; ++r) {
    float* a = p.a.data() + r * Dk;
    float* b = p.b.data() + r * Dk;
    if (kind == ab_kind::general) {
      for (std::int64_t c = 0; c < Dk; ++c) {
        a[c] = 0.5f * inv_sqrt * unit(rng);
        b[c] = 0.5f * inv_sqrt * unit(rng);
      }
      continue;
    }
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

linear::options with_path(linear::options opt, impl i) {
  opt.path = i == impl::chunked ? linear::form::chunked
             : i == impl::recurrent ? linear::form::recurrent
                                    : linear::form::automatic;
  return opt;
}

// Tokens [t0, t0 + n) of p by implementation i, writing rows [t0, t0 + n) of o; state in and out.
void run_range(impl i, const problem& p, std::int64_t t0, std::int64_t n, const view<float, 4>& o,
               const view<float, 4>& state, const linear::options& opt) {
  const auto q = cview(p.q).narrow(2, t0, n), k = cview(p.k).narrow(2, t0, n), v = cview(p.v).narrow(2, t0, n);
  const auto g = cview(p.g).narrow(2, t0, n), a = cview(p.a).narrow(2, t0, n), b = cview(p.b).narrow(2, t0, n);
  if (i == impl::reference)
    linear::reference::rwkv7(q, k, v, g, a, b, o.narrow(2, t0, n), state, opt);
  else
    linear::rwkv7(q, k, v, g, a, b, o.narrow(2, t0, n), state, with_path(opt, i));
}

struct outputs {
  tensor<float, 4> o, state;
};

outputs run_all(impl i, const problem& p, const linear::options& opt) {
  outputs r{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
  run_range(i, p, 0, p.L, r.o, r.state, opt);
  return r;
}

// max |got - want| <= tol * max(1, max |want|), and everything finite.
::testing::AssertionResult close(const tensor<float, 4>& got, const tensor<float, 4>& want, double tol) {
  if (got.shape() != want.shape()) return ::testing::AssertionFailure() << "shapes differ";
  double err = 0, mag = 1;
  std::int64_t worst = 0;
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
  if (err <= tol * mag) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "max err " << err << " > " << tol << " * " << mag << " at flat index " << worst
                                       << " (got " << got.data()[worst] << ", want " << want.data()[worst] << ")";
}

// f32 kernels against the double reference (tests/linear/test_util.hpp's f32_tol).
constexpr double f32_tol = 2e-5;

struct shape_case {
  std::int64_t B, H, L, Dk, Dv, chunk;
};

// L = 1, chunk - 1, chunk, chunk + 1, several chunks, 1000; Dk != Dv, odd dims, Dk = Dv = 1; chunks 1 .. 64.
const std::vector<shape_case>& awkward_shapes() {
  static const std::vector<shape_case> shapes = {
      {1, 1, 1, 16, 16, 64}, {2, 3, 15, 24, 40, 16}, {1, 2, 16, 40, 24, 16}, {2, 1, 17, 32, 48, 16},
      {1, 2, 37, 33, 20, 16}, {1, 1, 64, 8, 72, 64}, {1, 2, 65, 13, 17, 64}, {1, 1, 200, 20, 36, 7},
      {1, 1, 50, 12, 12, 1},  {1, 1, 9, 1, 1, 4},      {1, 1, 1000, 16, 24, 16}};
  return shapes;
}

void check_forms(float lo, float hi, ab_kind kind = ab_kind::rwkv7) {
  std::uint32_t seed = 1;
  for (const shape_case& s : awkward_shapes()) {
    if (kind == ab_kind::general && s.L > 100) continue;  // a general transition may grow over long runs
    const linear::options opt{.chunk_size = s.chunk};
    const problem p = make_problem(s.B, s.H, s.L, s.Dk, s.Dv, seed++, lo, hi, kind);
    const outputs want = run_all(impl::reference, p, opt);
    for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
      const outputs got = run_all(i, p, opt);
      EXPECT_TRUE(close(got.o, want.o, f32_tol))
          << impl_name(i) << " o, L=" << s.L << " Dk=" << s.Dk << " Dv=" << s.Dv << " chunk=" << s.chunk;
      EXPECT_TRUE(close(got.state, want.state, f32_tol))
          << impl_name(i) << " state, L=" << s.L << " Dk=" << s.Dk << " Dv=" << s.Dv << " chunk=" << s.chunk;
    }
  }
}

// Gates in [-0.5, 0]: every chunk weak (the reference-point GEMM).
TEST(rwkv7, forms_match_reference) { check_forms(-0.5f, -0.01f); }
// RWKV-7's decay range, log w in [-exp(-0.5), 0] (w = exp(-exp(-0.5) sigmoid(x))).
TEST(rwkv7, rwkv7_decay_range) { check_forms(-0.6065307f, 0.0f); }
// Totals below -2 rwkv7_factor_limit in (nearly) every chunk: the exact (strong) path throughout.
TEST(rwkv7, strong_gates) { check_forms(-6.0f, -1.0f); }
// Chunks on both sides of the limit in one sequence.
TEST(rwkv7, mixed_gates) { check_forms(-4.0f, 0.0f); }
// a and b not of RWKV-7's form.
TEST(rwkv7, general_a_b) { check_forms(-0.5f, -0.01f, ab_kind::general); }

// Gates near 0 (-1e-7, -0.0), moderate, large (-80, -200, -1e30) and -inf (single channels, at
// chunk borders, at t = 0).
TEST(rwkv7, extreme_gates) {
  const linear::options opt{.chunk_size = 16};
  problem p = make_problem(1, 2, 100, 16, 12, 21);
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> pattern = {-1e-7f, -0.0f, -0.3f, -80.0f, -inf, -1e-7f, -200.0f, -inf, -inf, -2.0f, -1e30f};
  std::mt19937 rng(5);
  std::uniform_int_distribution<std::size_t> pick(0, pattern.size() - 1);
  for (std::int64_t i = 0; i < p.g.size(); ++i) p.g.data()[i] = i % 5 == 0 ? pattern[pick(rng)] : -1e-6f;
  for (std::int64_t h = 0; h < p.H; ++h)
    for (std::int64_t t : {0, 15, 16, 47})
      for (std::int64_t c = 0; c < p.Dk; c += 2) p.g(0, h, t, c) = -inf;
  const outputs want = run_all(impl::reference, p, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs got = run_all(i, p, opt);
    EXPECT_TRUE(close(got.o, want.o, f32_tol)) << impl_name(i);
    EXPECT_TRUE(close(got.state, want.state, f32_tol)) << impl_name(i);
  }
}

// g = -inf in every channel at token t and a = 0 there: everything before t is forgotten, so the
// outputs from t on equal a fresh start at t.
TEST(rwkv7, minus_inf_gate_resets) {
  const float inf = -std::numeric_limits<float>::infinity();
  problem p = make_problem(1, 1, 60, 16, 8, 39);
  const std::int64_t reset = 21;
  for (std::int64_t c = 0; c < p.Dk; ++c) {
    p.g(0, 0, reset, c) = inf;
    p.a(0, 0, reset, c) = 0.0f;
  }
  const linear::options opt{.chunk_size = 16};
  for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
    const outputs full = run_all(i, p, opt);
    outputs fresh{tensor<float, 4>({1, 1, p.L, p.Dv}), tensor<float, 4>(p.state0.shape())};
    run_range(i, p, reset, p.L - reset, fresh.o, fresh.state, opt);
    double err = 0;
    for (std::int64_t t = reset; t < p.L; ++t)
      for (std::int64_t c = 0; c < p.Dv; ++c) err = std::max(err, std::abs(double(full.o(0, 0, t, c)) - fresh.o(0, 0, t, c)));
    EXPECT_LE(err, 1e-5) << impl_name(i);
    EXPECT_TRUE(close(full.state, fresh.state, 1e-5)) << impl_name(i);
  }
}

// 65,536 tokens at RWKV-7's decays (small H and D, so it stays fast): the chunked form stays finite
// and agrees with the recurrent one.
TEST(rwkv7, long_run_stays_finite) {
  const linear::options opt{.chunk_size = 64};
  const problem p = make_problem(1, 1, 65536, 8, 8, 3, -0.6065307f, 0.0f);
  const outputs ch = run_all(impl::chunked, p, opt), rec = run_all(impl::recurrent, p, opt);
  EXPECT_TRUE(close(ch.o, rec.o, 1e-4));
  EXPECT_TRUE(close(ch.state, rec.state, 1e-4));
}

// KDA is the case b = k, a = -beta (exp(g) o k), key beta k (header comment): every form of rwkv7
// against linear::reference::kda, in the weak and the strong regime.
TEST(rwkv7, kda_special_case) {
  for (auto [lo, hi] : {std::pair{-0.5f, -0.01f}, std::pair{-6.0f, -1.0f}}) {
    problem p = make_problem(2, 2, 45, 24, 16, 37, lo, hi);
    std::mt19937 rng(3);
    std::uniform_real_distribution<float> unit(-1.0f, 1.0f), rate(0.05f, 1.0f);
    tensor<float, 3> beta({p.B, p.H, p.L});
    tensor<float, 4> k_unit(p.k.shape());
    for (std::int64_t r = 0; r < p.B * p.H * p.L; ++r) {  // unit keys, as the delta rule expects
      float* k = k_unit.data() + r * p.Dk;
      double ss = 0;
      for (std::int64_t c = 0; c < p.Dk; ++c) {
        k[c] = unit(rng);
        ss += static_cast<double>(k[c]) * k[c];
      }
      for (std::int64_t c = 0; c < p.Dk; ++c) k[c] = static_cast<float>(k[c] / std::sqrt(ss));
      const float bt = beta.data()[r] = rate(rng);
      for (std::int64_t c = 0; c < p.Dk; ++c) {
        const float e = std::exp(p.g.data()[r * p.Dk + c]);
        p.a.data()[r * p.Dk + c] = -bt * e * k[c];
        p.b.data()[r * p.Dk + c] = k[c];
        p.k.data()[r * p.Dk + c] = bt * k[c];
      }
    }
    outputs want{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
    linear::reference::kda(p.q, k_unit, p.v, p.g, beta, want.o, want.state);
    for (impl i : {impl::reference, impl::chunked, impl::recurrent}) {
      const outputs got = run_all(i, p, {.chunk_size = 16});
      EXPECT_TRUE(close(got.o, want.o, f32_tol)) << impl_name(i) << " gates [" << lo << ", " << hi << "]";
      EXPECT_TRUE(close(got.state, want.state, f32_tol)) << impl_name(i) << " gates [" << lo << ", " << hi << "]";
    }
  }
}

// Pieces of uneven lengths (through the state) == one call, by every path.
TEST(rwkv7, pieces_then_continue) {
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(2, 2, 150, 24, 20, 7);
  const outputs whole = run_all(impl::reference, p, opt);
  for (impl i : {impl::chunked, impl::recurrent, impl::automatic}) {
    outputs parts{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
    std::int64_t t0 = 0;
    for (std::int64_t n : {37, 1, 16, 5, 60, 2, 29}) {
      run_range(i, p, t0, n, parts.o, parts.state, opt);
      t0 += n;
    }
    ASSERT_EQ(t0, p.L);
    EXPECT_TRUE(close(parts.o, whole.o, f32_tol)) << impl_name(i);
    EXPECT_TRUE(close(parts.state, whole.state, f32_tol)) << impl_name(i);
  }
}

// Token t of a [B, H, L, D] tensor as a [B, H, D] view.
view<const float, 3> token(const tensor<float, 4>& x, std::int64_t t) {
  const auto v = cview(x);
  return {v.ptr(0, 0, t), {v.extent(0), v.extent(1), v.extent(3)}, {v.stride(0), v.stride(1), 1}};
}
view<float, 3> token(const view<float, 4>& x, std::int64_t t) {
  return {x.ptr(0, 0, t), {x.extent(0), x.extent(1), x.extent(3)}, {x.stride(0), x.stride(1), 1}};
}

void step(const problem& p, std::int64_t t, view<float, 4> o, view<float, 4> state, const linear::options& opt) {
  linear::rwkv7_step(token(p.q, t), token(p.k, t), token(p.v, t), token(p.g, t), token(p.a, t), token(p.b, t),
                     token(o, t), state, opt);
}

// A chunked prefill, then steps: equals the reference over the whole sequence (Dv = 40: vector
// blocks and a scalar tail in the step).
TEST(rwkv7, step_after_prefill) {
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(2, 3, 53, 16, 43, 11);
  const outputs want = run_all(impl::reference, p, opt);
  outputs inc{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
  const std::int64_t prefill = p.L - 5;
  run_range(impl::chunked, p, 0, prefill, inc.o, inc.state, opt);
  for (std::int64_t t = prefill; t < p.L; ++t) step(p, t, inc.o, inc.state, opt);
  EXPECT_TRUE(close(inc.o, want.o, f32_tol));
  EXPECT_TRUE(close(inc.state, want.state, f32_tol));
}

// Speculative decoding: out-of-place steps on the slots of a state_ring equal in-place steps bit
// for bit; ring.rollback(n) gives the state of n tokens ago; the ring keeps only `depth` states.
TEST(rwkv7, rollback) {
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(2, 3, 30, 24, 16, 45);
  tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
  const std::int64_t prefill = 10, steps = 6, depth = 4;
  std::vector<tensor<float, 4>> states(prefill + steps + 1);  // states[t]: after the first t tokens
  tensor<float, 4> state = p.state0;
  run_range(impl::chunked, p, 0, prefill, o, state, opt);
  states[prefill] = state;
  for (std::int64_t t = prefill; t < prefill + steps; ++t) {
    step(p, t, o, state, opt);
    states[t + 1] = state;
  }
  linear::state_ring<4> ring({p.B, p.H, p.Dk, p.Dv}, depth);
  std::copy(states[prefill].begin(), states[prefill].end(), ring.state().data());
  auto advance = [&](std::int64_t t) {
    auto [in, out] = ring.advance();
    linear::rwkv7_step(token(p.q, t), token(p.k, t), token(p.v, t), token(p.g, t), token(p.a, t), token(p.b, t),
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
  EXPECT_EQ(ring.available(), depth);
  ring.rollback(3);
  EXPECT_TRUE(is(prefill + 3));
  advance(prefill + 3);  // the same token again: the same state
  EXPECT_TRUE(is(prefill + 4));
  ring.rollback(2);
  EXPECT_TRUE(is(prefill + 2));
  EXPECT_EQ(ring.available(), 0);

  // state_in and state_out: the same view or disjoint.
  tensor<float, 4> wide({p.B, p.H, p.Dk + 1, p.Dv});
  const view<float, 4> shifted(wide.data() + p.Dv, state.shape(), wide.as_view().strides());
  expect_error([&] {
    linear::rwkv7_step(token(p.q, 0), token(p.k, 0), token(p.v, 0), token(p.g, 0), token(p.a, 0), token(p.b, 0),
                       token(o.as_view(), 0), cview(wide.as_view()).narrow(2, 0, p.Dk), shifted, opt);
  }, {"linear::rwkv7_step", "state_out", "state_in", "must not overlap", "the same view (in place)"});
  expect_error([&] {
    linear::rwkv7_step(token(p.q, 0), token(p.k, 0), token(p.v, 0), token(p.g, 0), token(p.a, 0), token(p.b, 0),
                       token(o.as_view(), 0), cview(tensor<float, 4>({p.B, p.H, p.Dk, p.Dv + 1})), state, opt);
  }, {"linear::rwkv7_step", "state_in must have shape"});
}

// bf16 q, k, v, a, b: each form against the reference on the same (rounded) values.
TEST(rwkv7, bf16_inputs) {
  using mnemo::bf16;
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(1, 2, 45, 24, 16, 9);
  problem rounded = p;
  std::vector<tensor<bf16, 4>> low;
  for (auto [src, back] : {std::pair{&p.q, &rounded.q}, std::pair{&p.k, &rounded.k}, std::pair{&p.v, &rounded.v},
                           std::pair{&p.a, &rounded.a}, std::pair{&p.b, &rounded.b}}) {
    tensor<bf16, 4> x(src->shape());
    for (std::int64_t i = 0; i < src->size(); ++i) {
      x.data()[i] = bf16(src->data()[i]);
      back->data()[i] = static_cast<float>(x.data()[i]);
    }
    low.push_back(std::move(x));
  }
  const outputs want = run_all(impl::reference, rounded, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    outputs got{tensor<float, 4>({p.B, p.H, p.L, p.Dv}), p.state0};
    linear::rwkv7(low[0], low[1], low[2], p.g, low[3], low[4], got.o, got.state, with_path(opt, i));
    EXPECT_TRUE(close(got.o, want.o, f32_tol)) << impl_name(i);
    EXPECT_TRUE(close(got.state, want.state, f32_tol)) << impl_name(i);
  }
}

// q, k, v, a, b and o through [B, L, H, D] buffers permuted to [B, H, L, D] (no copy).
TEST(rwkv7, strided_views) {
  const linear::options opt{.chunk_size = 16};
  const problem p = make_problem(2, 3, 37, 16, 24, 17);
  auto blhd = [](const tensor<float, 4>& x) {  // [B, H, L, D] -> a [B, L, H, D] buffer
    tensor<float, 4> y({x.extent(0), x.extent(2), x.extent(1), x.extent(3)});
    for (std::int64_t b = 0; b < x.extent(0); ++b)
      for (std::int64_t h = 0; h < x.extent(1); ++h)
        for (std::int64_t t = 0; t < x.extent(2); ++t)
          for (std::int64_t c = 0; c < x.extent(3); ++c) y(b, t, h, c) = x(b, h, t, c);
    return y;
  };
  const tensor<float, 4> q = blhd(p.q), k = blhd(p.k), v = blhd(p.v), a = blhd(p.a), b = blhd(p.b);
  auto perm = [](const tensor<float, 4>& x) { return cview(x).permute({0, 2, 1, 3}); };
  const outputs want = run_all(impl::reference, p, opt);
  for (impl i : {impl::chunked, impl::recurrent}) {
    tensor<float, 4> o_blhd({p.B, p.L, p.H, p.Dv}), state = p.state0;
    linear::rwkv7(perm(q), perm(k), perm(v), p.g, perm(a), perm(b), o_blhd.as_view().permute({0, 2, 1, 3}), state,
                  with_path(opt, i));
    tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
    for (std::int64_t bb = 0; bb < p.B; ++bb)
      for (std::int64_t h = 0; h < p.H; ++h)
        for (std::int64_t t = 0; t < p.L; ++t)
          for (std::int64_t c = 0; c < p.Dv; ++c) o(bb, h, t, c) = o_blhd(bb, t, h, c);
    EXPECT_TRUE(close(o, want.o, f32_tol)) << impl_name(i);
    EXPECT_TRUE(close(state, want.state, f32_tol)) << impl_name(i);
  }
}

// 1 and 2 threads give the same bits; an empty state is a zero state; L = 0 leaves the state.
TEST(rwkv7, threads_and_state) {
  problem p = make_problem(2, 3, 40, 16, 8, 13);
  for (impl i : {impl::chunked, impl::recurrent}) {
    const outputs one = run_all(i, p, {.chunk_size = 16, .threads = 1});
    const outputs two = run_all(i, p, {.chunk_size = 16, .threads = 2});
    EXPECT_TRUE(std::equal(one.o.begin(), one.o.end(), two.o.begin())) << impl_name(i);
    EXPECT_TRUE(std::equal(one.state.begin(), one.state.end(), two.state.begin())) << impl_name(i);
  }
  problem zero = p;
  std::fill(zero.state0.begin(), zero.state0.end(), 0.0f);
  const outputs want = run_all(impl::chunked, zero, {.chunk_size = 16});
  tensor<float, 4> o({p.B, p.H, p.L, p.Dv});
  run_range(impl::chunked, p, 0, p.L, o, {}, {.chunk_size = 16});
  EXPECT_TRUE(std::equal(o.begin(), o.end(), want.o.begin()));
  tensor<float, 4> state = p.state0;
  run_range(impl::chunked, p, 0, 0, o, state, {});
  EXPECT_TRUE(std::equal(state.begin(), state.end(), p.state0.begin()));
}

// NaN (header comment): in q_t it reaches o_t only; in k_t, v_t, a_t or b_t, o_t and every later
// output of its head; outputs before t stay clean (before t's chunk in the chunked form); the
// other head is clean.
TEST(rwkv7, nan_propagates_forward_only) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const linear::options opt{.chunk_size = 16};
  const problem clean = make_problem(1, 2, 40, 8, 6, 47);
  const std::int64_t t = 21, chunk_start = 16;
  const outputs want = run_all(impl::reference, clean, opt);
  for (int where = 0; where < 5; ++where) {
    problem p = clean;
    tensor<float, 4>* inputs[] = {&p.q, &p.k, &p.v, &p.a, &p.b};
    (*inputs[where])(0, 1, t, 2) = nan;
    for (impl i : {impl::reference, impl::recurrent, impl::chunked}) {
      const outputs got = run_all(i, p, opt);
      const std::int64_t clean_before = i == impl::chunked ? chunk_start : t;
      for (std::int64_t tt = 0; tt < p.L; ++tt) {
        bool any_nan = false;
        for (std::int64_t e = 0; e < p.Dv; ++e) {
          any_nan = any_nan || std::isnan(got.o(0, 1, tt, e));
          EXPECT_NEAR(got.o(0, 0, tt, e), want.o(0, 0, tt, e), 1e-5) << "head 0 is clean";
        }
        // A NaN in a_t or b_t enters the state at t: o_t is NaN (b_t u_t^T, u_t = S^T a_t).
        if (tt == t || (tt > t && where != 0)) {
          EXPECT_TRUE(any_nan) << "input " << where << " " << impl_name(i) << " token " << tt;
        }
        if (tt < clean_before || (where == 0 && tt != t)) {
          EXPECT_FALSE(any_nan) << "input " << where << " " << impl_name(i) << " token " << tt;
        }
      }
    }
  }
}

TEST(rwkv7, bad_inputs) {
  const problem p = make_problem(1, 2, 10, 8, 6, 41);
  tensor<float, 4> o({1, 2, 10, 6}), state({1, 2, 8, 6});
  for (impl i : {impl::chunked, impl::recurrent, impl::reference}) {
    const std::string fn = i == impl::reference ? "linear::reference::rwkv7" : "linear::rwkv7";
    auto call = [&](const problem& q, view<float, 4> out, view<float, 4> st, const linear::options& opt) {
      if (i == impl::reference)
        linear::reference::rwkv7(q.q, q.k, q.v, q.g, q.a, q.b, out, st, opt);
      else
        linear::rwkv7(q.q, q.k, q.v, q.g, q.a, q.b, out, st, with_path(opt, i));
    };
    problem bad = p;
    bad.a = tensor<float, 4>({1, 2, 10, 7});
    expect_error([&] { call(bad, o, state, {}); }, {fn, "a must have shape [1, 2, 10, 8]", "got [1, 2, 10, 7]"});
    bad = p;
    bad.b = tensor<float, 4>({1, 2, 9, 8});
    expect_error([&] { call(bad, o, state, {}); }, {fn, "b must have shape [1, 2, 10, 8]", "got [1, 2, 9, 8]"});
    bad = p;
    bad.k = tensor<float, 4>({1, 2, 10, 9});
    expect_error([&] { call(bad, o, state, {}); }, {fn, "k must have shape [1, 2, 10, 8]"});
    bad = p;
    bad.g(0, 1, 3, 7) = 1.0f;
    expect_error([&] { call(bad, o, state, {}); }, {fn, "g (log-decay) must be <= 0 and not NaN, got g[0, 1, 3, 7] = 1"});
    bad.g(0, 1, 3, 7) = std::numeric_limits<float>::quiet_NaN();
    expect_error([&] { call(bad, o, state, {}); }, {fn, "g[0, 1, 3, 7] = nan"});
    expect_error([&] { call(p, o, tensor<float, 4>({1, 2, 6, 8}), {}); },
                 {fn, "state must have shape [1, 2, 8, 6]", "got [1, 2, 6, 8]"});
    expect_error([&] { call(p, o, state, {.use_qk_l2norm = true}); }, {fn, "options.use_qk_l2norm must be false"});
    expect_error([&] { call(p, o, state, {.chunk_size = -1}); }, {fn, "options.chunk_size must be >= 0"});
    expect_error([&] { call(p, o, state, {.normalize = true}); }, {fn, "options.normalize must be false"});
    // o over a (same memory): an aliasing error naming both.
    problem alias = p;
    alias.a = tensor<float, 4>({1, 2, 10, 8});
    const view<float, 4> o_on_a(alias.a.data(), {1, 2, 10, 6}, {160, 80, 8, 1});
    expect_error([&] { call(alias, o_on_a, state, {}); }, {fn, "o", "a", "must not overlap"});
  }
}

// ---- the shared checks of tests/linear/test_util.hpp, on the member table's row ------------------

namespace table {

constexpr linear_test::member::rwkv7 rwkv7{};

TEST(rwkv7_table, forms_match_reference) { linear_test::check_forms(rwkv7); }
TEST(rwkv7_table, strong_gates) { linear_test::check_forms(rwkv7, {}, {-6.0f, -1.0f}); }
TEST(rwkv7_table, extreme_gates) { linear_test::check_extreme_gates(rwkv7); }
TEST(rwkv7_table, pieces_then_continue) { linear_test::check_pieces(rwkv7); }
TEST(rwkv7_table, long_run_stays_finite) { linear_test::check_long_run(rwkv7); }
TEST(rwkv7_table, threads_and_state) { linear_test::check_threads_and_state(rwkv7); }
TEST(rwkv7_table, strided_views) { linear_test::check_strided(rwkv7); }
TEST(rwkv7_table, bad_inputs) { linear_test::check_bad_common(rwkv7); }
TEST(rwkv7_table, step_after_prefill) { linear_test::check_steps(rwkv7); }
TEST(rwkv7_table, rollback) { linear_test::check_rollback(rwkv7); }

}  // namespace table
}  // namespace

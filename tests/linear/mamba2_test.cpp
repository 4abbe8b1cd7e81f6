// Tests of mnemo/linear/mamba2.hpp: the recurrent and chunked forms against the double reference
// on awkward shapes (L = 1, 37, 1000; odd head dims; N and P below, at and off the vector width;
// G > 1) with every option on and off, the reference against Mamba-1's selective scan with A equal
// over each head's channels (an independent implementation of the same recurrence) and a case
// worked out by hand, mamba's token-major buffers through strides, streaming in pieces, the step
// against the full op, rollback through linear::state_ring, extreme steps, NaN propagation,
// threads, and the boundary checks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "mnemo/linear/mamba2.hpp"
#include "mnemo/linear/selective_scan.hpp"
#include "mnemo/linear/state_ring.hpp"
#include "support/support.hpp"

namespace {

using mnemo::tensor;
using mnemo::view;
using mnemo::test::expect_close;
using mnemo::test::expect_error;
using mnemo::test::random_tensor;
namespace linear = mnemo::linear;

constexpr double atol = 5e-5, rtol = 2e-4;

struct options {
  bool D = true, z = true, bias = true, softplus = true, h0 = true;
};

struct problem {
  std::int64_t B, H, L, P, N, G;
  tensor<float, 4> x, z, Bm, Cm, h0;
  tensor<float, 3> dt;
  tensor<float, 1> A, D, bias;

  problem(std::int64_t B_, std::int64_t H_, std::int64_t L_, std::int64_t P_, std::int64_t N_, std::int64_t G_,
          std::uint32_t seed, bool softplus = true)
      : B(B_), H(H_), L(L_), P(P_), N(N_), G(G_),
        x(random_tensor<float, 4>({B_, H_, L_, P_}, seed)),
        z(random_tensor<float, 4>({B_, H_, L_, P_}, seed + 1, -3.0f, 3.0f)),
        Bm(random_tensor<float, 4>({B_, G_, L_, N_}, seed + 2)),
        Cm(random_tensor<float, 4>({B_, G_, L_, N_}, seed + 3)),
        h0(random_tensor<float, 4>({B_, H_, N_, P_}, seed + 4)),
        // softplus(dt + bias) in about (0.03, 1); without softplus dt is the positive step itself
        dt(softplus ? random_tensor<float, 3>({B_, H_, L_}, seed + 5, -3.0f, 0.5f)
                    : random_tensor<float, 3>({B_, H_, L_}, seed + 5, 0.01f, 0.8f)),
        A(random_tensor<float, 1>({H_}, seed + 6, -3.0f, -0.05f)),
        D(random_tensor<float, 1>({H_}, seed + 7)),
        bias(random_tensor<float, 1>({H_}, seed + 8, -0.5f, 0.5f)) {}
};

template <class T>
auto maybe(const T& t, bool on) {
  using V = decltype(mnemo::cview(t));
  return on ? mnemo::cview(t) : V{};
}

struct result {
  tensor<float, 4> y, state;
};

enum class impl { reference, recurrent, chunked, automatic };

// One thread unless told (the threads test runs 0, 1 and 2): on a loaded 2-core machine an OpenMP
// team per small call took 2.5 s of wall time for this file against 0.15 s on one thread.
result run(const problem& p, impl i, const options& o, std::int64_t chunk = 0, int threads = 1) {
  result r{tensor<float, 4>({p.B, p.H, p.L, p.P}), o.h0 ? p.h0 : tensor<float, 4>({p.B, p.H, p.N, p.P})};
  linear::mamba2_options opt{o.softplus, chunk, linear::form::automatic, threads};
  if (i == impl::recurrent) opt.path = linear::form::recurrent;
  if (i == impl::chunked) opt.path = linear::form::chunked;
  const auto D = maybe(p.D, o.D);
  const auto z = maybe(p.z, o.z);
  const auto bias = maybe(p.bias, o.bias);
  if (i == impl::reference) linear::reference::mamba2(p.x, p.dt, p.A, p.Bm, p.Cm, D, z, bias, r.y, r.state, opt);
  else linear::mamba2(p.x, p.dt, p.A, p.Bm, p.Cm, D, z, bias, r.y, r.state, opt);
  return r;
}

std::string describe(const problem& p, const options& o) {
  return "B=" + std::to_string(p.B) + " H=" + std::to_string(p.H) + " L=" + std::to_string(p.L) +
         " P=" + std::to_string(p.P) + " N=" + std::to_string(p.N) + " G=" + std::to_string(p.G) +
         " D=" + std::to_string(o.D) + " z=" + std::to_string(o.z) + " bias=" + std::to_string(o.bias) +
         " softplus=" + std::to_string(o.softplus) + " h0=" + std::to_string(o.h0);
}

const char* impl_name(impl i) {
  switch (i) {
    case impl::reference: return "reference";
    case impl::recurrent: return "recurrent";
    case impl::chunked: return "chunked";
    case impl::automatic: return "automatic";
  }
  return "?";
}

TEST(mamba2, forms_match_reference) {
  struct shape {
    std::int64_t B, H, L, P, N, G, chunk;
  };
  // P = 1, 5, 17, 37 (the Eigen products: not a multiple of the vector width) and 16, 32, 64 (the
  // SIMD ones); N odd and even; groups of 1, 2 and 3 heads; chunks of 7, the default 32 and 64.
  const shape shapes[] = {{1, 1, 1, 1, 1, 1, 0},    {2, 3, 37, 5, 7, 1, 0},  {1, 4, 37, 16, 16, 2, 0},
                          {1, 2, 1000, 16, 8, 1, 0}, {1, 1, 1000, 5, 3, 1, 64}, {1, 6, 70, 17, 13, 2, 7},
                          {2, 6, 33, 32, 32, 3, 0},  {1, 2, 3, 64, 16, 2, 0},   {1, 2, 37, 37, 9, 1, 0}};
  std::uint32_t seed = 100;
  for (const shape& s : shapes) {
    for (int variant = 0; variant < 3; ++variant) {
      options o;
      if (variant == 1) o = {false, false, false, false, false};
      if (variant == 2) o = {true, false, true, true, false};
      if (s.L == 1000 && variant > 0) continue;  // the long case once, with everything on
      const problem p(s.B, s.H, s.L, s.P, s.N, s.G, seed += 10, o.softplus);
      const result want = run(p, impl::reference, o);
      for (impl i : {impl::recurrent, impl::chunked, impl::automatic}) {
        const result got = run(p, i, o, s.chunk);
        const std::string what = describe(p, o) + " chunk=" + std::to_string(s.chunk) + " " + impl_name(i);
        expect_close(got.y, want.y, atol, rtol, what + " y");
        expect_close(got.state, want.state, atol, rtol, what + " state");
      }
    }
  }
}

// The reference against linear::reference::selective_scan (Mamba-1, written independently) with
// A[d, n] = A[h] for each channel d = h P + p of head h: the same recurrence, its state transposed.
TEST(mamba2, reference_equals_selective_scan_with_scalar_A) {
  const problem p(2, 4, 23, 3, 5, 2, 900);
  const std::int64_t Dm = p.H * p.P;
  tensor<float, 3> u({p.B, Dm, p.L}), delta({p.B, Dm, p.L}), z({p.B, Dm, p.L}), y1({p.B, Dm, p.L}),
      s1({p.B, Dm, p.N});
  tensor<float, 2> A1({Dm, p.N});
  tensor<float, 4> B1({p.B, p.G, p.N, p.L}), C1({p.B, p.G, p.N, p.L});
  tensor<float, 1> D1({Dm}), bias1({Dm});
  for (std::int64_t b = 0; b < p.B; ++b) {
    for (std::int64_t h = 0; h < p.H; ++h)
      for (std::int64_t c = 0; c < p.P; ++c) {
        const std::int64_t d = h * p.P + c;
        for (std::int64_t t = 0; t < p.L; ++t) {
          u(b, d, t) = p.x(b, h, t, c);
          delta(b, d, t) = p.dt(b, h, t);
          z(b, d, t) = p.z(b, h, t, c);
        }
        for (std::int64_t n = 0; n < p.N; ++n) s1(b, d, n) = p.h0(b, h, n, c);
      }
    for (std::int64_t g = 0; g < p.G; ++g)
      for (std::int64_t n = 0; n < p.N; ++n)
        for (std::int64_t t = 0; t < p.L; ++t) {
          B1(b, g, n, t) = p.Bm(b, g, t, n);
          C1(b, g, n, t) = p.Cm(b, g, t, n);
        }
  }
  for (std::int64_t d = 0; d < Dm; ++d) {
    D1(d) = p.D(d / p.P);
    bias1(d) = p.bias(d / p.P);
    for (std::int64_t n = 0; n < p.N; ++n) A1(d, n) = p.A(d / p.P);
  }
  linear::reference::selective_scan(u, delta, A1, B1, C1, D1, z, bias1, y1, s1, {true});
  for (impl i : {impl::reference, impl::chunked}) {
    const result r = run(p, i, {}, 8);
    double worst = 0;
    for (std::int64_t b = 0; b < p.B; ++b)
      for (std::int64_t h = 0; h < p.H; ++h)
        for (std::int64_t c = 0; c < p.P; ++c) {
          for (std::int64_t t = 0; t < p.L; ++t)
            worst = std::max(worst, std::abs(double(r.y(b, h, t, c)) - y1(b, h * p.P + c, t)));
          for (std::int64_t n = 0; n < p.N; ++n)
            worst = std::max(worst, std::abs(double(r.state(b, h, n, c)) - s1(b, h * p.P + c, n)));
        }
    EXPECT_LT(worst, i == impl::reference ? 1e-6 : 5e-5) << impl_name(i);
  }
}

// One head, N = 2, P = 1, by hand: S_t = exp(dt A) S + dt x B, y = C . S + D x, times silu(z).
TEST(mamba2, semantics_by_hand) {
  tensor<float, 4> x({1, 1, 2, 1}), z({1, 1, 2, 1}), Bm({1, 1, 2, 2}), Cm({1, 1, 2, 2}), y({1, 1, 2, 1}),
      state({1, 1, 2, 1});
  tensor<float, 3> dt({1, 1, 2});
  tensor<float, 1> A({1}), D({1}), bias({1});
  x(0, 0, 0, 0) = 1, x(0, 0, 1, 0) = 2, dt(0, 0, 0) = 0.5f, dt(0, 0, 1) = 0.25f, A(0) = -2, D(0) = 0.5f,
  bias(0) = 0.25f;
  Bm(0, 0, 0, 0) = 3, Bm(0, 0, 0, 1) = -1, Bm(0, 0, 1, 0) = 1, Bm(0, 0, 1, 1) = 2;
  Cm(0, 0, 0, 0) = 2, Cm(0, 0, 0, 1) = 1, Cm(0, 0, 1, 0) = -1, Cm(0, 0, 1, 1) = 4;
  z(0, 0, 0, 0) = 1, z(0, 0, 1, 0) = -0.5f;
  state(0, 0, 0, 0) = 1, state(0, 0, 1, 0) = -1;
  for (impl i : {impl::reference, impl::recurrent, impl::chunked}) {
    tensor<float, 4> s = state;
    linear::mamba2_options opt;
    opt.path = i == impl::chunked ? linear::form::chunked : linear::form::recurrent;
    if (i == impl::reference) linear::reference::mamba2(x, dt, A, Bm, Cm, D, {}, {}, y, s, opt);
    else linear::mamba2(x, dt, A, Bm, Cm, D, {}, {}, y, s, opt);
    const double a1 = std::exp(-1.0), a2 = std::exp(-0.5);
    const double s10 = a1 * 1 + 0.5 * 1 * 3, s11 = a1 * -1 + 0.5 * 1 * -1;
    const double s20 = a2 * s10 + 0.25 * 2 * 1, s21 = a2 * s11 + 0.25 * 2 * 2;
    EXPECT_NEAR(y(0, 0, 0, 0), 2 * s10 + 1 * s11 + 0.5, 1e-6) << impl_name(i);
    EXPECT_NEAR(y(0, 0, 1, 0), -1 * s20 + 4 * s21 + 1.0, 1e-6) << impl_name(i);
    EXPECT_NEAR(s(0, 0, 0, 0), s20, 1e-6) << impl_name(i);
    EXPECT_NEAR(s(0, 0, 1, 0), s21, 1e-6) << impl_name(i);
  }
  // With the gate, the bias and softplus: dt = softplus(0.5 + 0.25) at token 0.
  linear::reference::mamba2(x, dt, A, Bm, Cm, D, z, bias, y, {}, {true});
  const double d0 = std::log1p(std::exp(0.75)), s0 = 3 * d0, s1 = -1 * d0;
  EXPECT_NEAR(y(0, 0, 0, 0), (2 * s0 + s1 + 0.5) * (1 / (1 + std::exp(-1.0))), 1e-6);
}

// Two calls with the state carried equal one call, with cuts inside and on chunk boundaries.
TEST(mamba2, streaming_pieces) {
  const problem p(2, 4, 150, 16, 8, 2, 7);
  const options o;
  const result want = run(p, impl::reference, o);
  for (std::int64_t cut : {1, 31, 32, 100}) {
    tensor<float, 4> y({p.B, p.H, p.L, p.P}), state = p.h0;
    for (auto [t0, n] : {std::pair<std::int64_t, std::int64_t>{0, cut}, {cut, p.L - cut}}) {
      auto piece = [&](const auto& t) { return mnemo::cview(t).narrow(2, t0, n); };
      linear::mamba2(piece(p.x), piece(p.dt), p.A, piece(p.Bm), piece(p.Cm), p.D, piece(p.z), p.bias,
                     view<float, 4>(y).narrow(2, t0, n), state, {true, 0, linear::form::automatic, 1});
    }
    expect_close(y, want.y, atol, rtol, "cut " + std::to_string(cut));
    expect_close(state, want.state, atol, rtol, "state, cut " + std::to_string(cut));
  }
}

// Token t of a [B, H, L(, D)] tensor as [B, H(, D)].
tensor<float, 3> token(const tensor<float, 4>& x, std::int64_t t) {
  tensor<float, 3> out({x.extent(0), x.extent(1), x.extent(3)});
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t h = 0; h < x.extent(1); ++h)
      for (std::int64_t c = 0; c < x.extent(3); ++c) out(b, h, c) = x(b, h, t, c);
  return out;
}

tensor<float, 2> token(const tensor<float, 3>& x, std::int64_t t) {
  tensor<float, 2> out({x.extent(0), x.extent(1)});
  for (std::int64_t b = 0; b < x.extent(0); ++b)
    for (std::int64_t h = 0; h < x.extent(1); ++h) out(b, h) = x(b, h, t);
  return out;
}

// One step of token t of p (in place, or from `in` into `out`).
void step(const problem& p, std::int64_t t, const options& o, tensor<float, 3>& y, view<const float, 4> in,
          view<float, 4> out) {
  const tensor<float, 3> z = token(p.z, t);
  linear::mamba2_step(token(p.x, t), token(p.dt, t), p.A, token(p.Bm, t), token(p.Cm, t), maybe(p.D, o.D),
                      maybe(z, o.z), maybe(p.bias, o.bias), y, in, out, {o.softplus, 0, linear::form::automatic, 1});
}

TEST(mamba2, step_matches_full_op) {
  for (std::int64_t N : {3, 16}) {
    for (std::int64_t P : {5, 32}) {
      for (const options& o : {options{}, options{false, false, false, false, true}}) {
        const problem p(2, 4, 9, P, N, 2, 200 + static_cast<std::uint32_t>(N + P), o.softplus);
        const result want = run(p, impl::reference, o);
        tensor<float, 4> state = p.h0;
        for (std::int64_t t = 0; t < p.L; ++t) {
          tensor<float, 3> y({p.B, p.H, p.P});
          step(p, t, o, y, state, state);
          expect_close(y, token(want.y, t), atol, rtol, describe(p, o) + " t=" + std::to_string(t));
        }
        expect_close(state, want.state, atol, rtol, describe(p, o) + " state");
        // The in-place overload, continuing a chunked prefill of the first 8 tokens.
        tensor<float, 4> pre({p.B, p.H, 8, p.P}), s = p.h0;
        auto first = [&](const auto& x) { return mnemo::cview(x).narrow(2, 0, 8); };
        linear::mamba2(first(p.x), first(p.dt), p.A, first(p.Bm), first(p.Cm), maybe(p.D, o.D),
                       o.z ? first(p.z) : view<const float, 4>{}, maybe(p.bias, o.bias), pre, s,
                       {o.softplus, 0, linear::form::chunked, 1});
        tensor<float, 3> y({p.B, p.H, p.P});
        const tensor<float, 3> z = token(p.z, 8);
        linear::mamba2_step(token(p.x, 8), token(p.dt, 8), p.A, token(p.Bm, 8), token(p.Cm, 8), maybe(p.D, o.D),
                            maybe(z, o.z), maybe(p.bias, o.bias), y, s, {o.softplus, 0, linear::form::automatic, 1});
        expect_close(y, token(want.y, 8), atol, rtol, describe(p, o) + " step after prefill");
      }
    }
  }
}

// Speculative decoding: 6 drafted tokens through a state_ring of depth 4, reject the last 3 and
// continue with 3 other tokens: the outputs and the state equal the full op over the accepted ones.
TEST(mamba2, rollback_with_state_ring) {
  const options o;
  const problem p(1, 4, 6, 8, 5, 2, 300), other(1, 4, 6, 8, 5, 2, 400);
  linear::state_ring<4> ring({p.B, p.H, p.N, p.P}, 4);
  std::copy(p.h0.begin(), p.h0.end(), ring.state().data());
  for (std::int64_t t = 0; t < 6; ++t) {
    tensor<float, 3> y({p.B, p.H, p.P});
    auto [in, out] = ring.advance();
    step(p, t, o, y, in, out);
  }
  EXPECT_EQ(ring.available(), 4);
  ring.rollback(3);
  // Accepted: p's tokens 0..2, then other's tokens 3..5.
  problem mixed = p;
  auto splice = [](auto& a, const auto& b) {
    for (std::int64_t i = 0; i < a.extent(0) * a.extent(1); ++i)
      for (std::int64_t t = 3; t < 6; ++t) {
        const std::int64_t row = a.size() / (a.extent(0) * a.extent(1));  // elements per (b, h)
        const std::int64_t per_t = row / 6;
        std::copy(b.data() + i * row + t * per_t, b.data() + i * row + (t + 1) * per_t, a.data() + i * row + t * per_t);
      }
  };
  splice(mixed.x, other.x);
  splice(mixed.dt, other.dt);
  splice(mixed.z, other.z);
  splice(mixed.Bm, other.Bm);
  splice(mixed.Cm, other.Cm);
  const result want = run(mixed, impl::reference, o);
  for (std::int64_t t = 3; t < 6; ++t) {
    tensor<float, 3> y({p.B, p.H, p.P});
    auto [in, out] = ring.advance();
    step(mixed, t, o, y, in, out);
    expect_close(y, token(want.y, t), atol, rtol, "after rollback, t=" + std::to_string(t));
  }
  expect_close(ring.state(), want.state, atol, rtol, "state");
}

// mamba's token-major buffers, x, z, y [B, L, H, P] and B, C [B, L, G, N], passed through strides
// without copies, give the results of the contiguous [B, H, L, P] / [B, G, L, N] tensors.
TEST(mamba2, token_major_buffers_through_strides) {
  const problem p(2, 4, 45, 16, 8, 2, 800);
  const std::int64_t B = p.B, H = p.H, L = p.L, P = p.P, N = p.N, G = p.G;
  auto token_major = [&](const tensor<float, 4>& t, std::int64_t heads, std::int64_t dim) {
    tensor<float, 4> out({B, L, heads, dim});
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t l = 0; l < L; ++l)
          for (std::int64_t c = 0; c < dim; ++c) out(b, l, h, c) = t(b, h, l, c);
    return out;
  };
  // [B, L, heads, dim] memory as a [B, heads, L, dim] view.
  auto as_bhld = [&](auto* data, std::int64_t heads, std::int64_t dim) {
    using T = std::remove_pointer_t<decltype(data)>;
    return view<T, 4>(data, {B, heads, L, dim}, {L * heads * dim, dim, heads * dim, 1});
  };
  const tensor<float, 4> x = token_major(p.x, H, P), z = token_major(p.z, H, P), Bm = token_major(p.Bm, G, N),
                         Cm = token_major(p.Cm, G, N);
  for (impl i : {impl::recurrent, impl::chunked}) {
    const result want = run(p, i, {});
    tensor<float, 4> y({B, L, H, P}), state = p.h0;
    linear::mamba2_options opt{true, 0, i == impl::chunked ? linear::form::chunked : linear::form::recurrent, 1};
    linear::mamba2(as_bhld(x.data(), H, P), p.dt, p.A, as_bhld(Bm.data(), G, N), as_bhld(Cm.data(), G, N), p.D,
                   as_bhld(z.data(), H, P), p.bias, as_bhld(y.data(), H, P), state, opt);
    expect_close(as_bhld(y.data(), H, P), want.y, 1e-6, 1e-6, std::string(impl_name(i)) + " y");
    expect_close(state, want.state, 1e-6, 1e-6, std::string(impl_name(i)) + " state");
  }
}

// Large steps (dt + bias in [-60, 60] through softplus, A down to -3): decays far below FLT_MIN
// underflow to 0, never NaN.
TEST(mamba2, extreme_steps) {
  problem p(1, 3, 70, 16, 8, 1, 150);
  mnemo::test::fill_uniform(p.dt, -60.0f, 60.0f, 151);
  const result want = run(p, impl::reference, {});
  for (impl i : {impl::recurrent, impl::chunked}) {
    const result got = run(p, i, {});
    expect_close(got.y, want.y, 2e-4, rtol, std::string(impl_name(i)) + " y");
    expect_close(got.state, want.state, 2e-4, rtol, std::string(impl_name(i)) + " state");
  }
}

// Results do not depend on the thread count.
TEST(mamba2, threads) {
  const problem p(2, 6, 40, 16, 8, 3, 500);
  for (impl i : {impl::recurrent, impl::chunked}) {
    const result a = run(p, i, {}, 0, 1);
    for (int t : {0, 2}) {
      const result b = run(p, i, {}, 0, t);
      expect_close(a.y, b.y, 0, 0, "y, threads " + std::to_string(t));
      expect_close(a.state, b.state, 0, 0, "state, threads " + std::to_string(t));
    }
  }
}

// A NaN in x at (h, t, c) spoils column c of head h from t on (through the state), and in the
// chunked form possibly the earlier tokens of t's chunk, nothing else; a NaN in C at t spoils
// token t of the group's heads only.
TEST(mamba2, nan_propagation) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  constexpr std::int64_t chunk = 8, t_nan = 19, chunk_start = t_nan / chunk * chunk;
  for (impl i : {impl::reference, impl::recurrent, impl::chunked}) {
    problem p(1, 4, 40, 16, 5, 2, 600);
    p.x(0, 3, t_nan, 2) = nan;
    const result r = run(p, i, {}, chunk);
    for (std::int64_t h = 0; h < p.H; ++h) {
      for (std::int64_t t = 0; t < p.L; ++t) {
        EXPECT_FALSE(std::isnan(r.y(0, h, t, 1))) << impl_name(i) << " x, other column: h=" << h << " t=" << t;
        const bool is_nan = std::isnan(r.y(0, h, t, 2));
        const bool must = h == 3 && t >= t_nan, may = h == 3 && t >= (i == impl::chunked ? chunk_start : t_nan);
        if (must || !may) {
          EXPECT_EQ(is_nan, must) << impl_name(i) << " x: h=" << h << " t=" << t;
        }
      }
      EXPECT_EQ(std::isnan(r.state(0, h, 0, 2)), h == 3) << impl_name(i);
    }
    problem q(1, 4, 40, 16, 5, 2, 600);
    q.Cm(0, 1, 9, 4) = nan;  // group 1: heads 2 and 3
    const result s = run(q, i, {}, chunk);
    for (std::int64_t h = 0; h < q.H; ++h)
      for (std::int64_t t = 0; t < q.L; ++t)
        EXPECT_EQ(std::isnan(s.y(0, h, t, 1)), h >= 2 && t == 9) << impl_name(i) << " C: h=" << h << " t=" << t;
  }
}

TEST(mamba2, bad_inputs) {
  const problem p(2, 4, 8, 3, 5, 2, 700);
  tensor<float, 4> y({2, 4, 8, 3}), state({2, 4, 5, 3});
  const char* fn = "linear::mamba2";
  auto call = [&](const auto& x, const auto& dt, const auto& A, const auto& Bm, const auto& Cm, const auto& D,
                  const auto& z, const auto& bias, view<float, 4> yy, view<float, 4> st,
                  linear::mamba2_options opt = {}) { linear::mamba2(x, dt, A, Bm, Cm, D, z, bias, yy, st, opt); };
  expect_error([&] { call(p.x, tensor<float, 3>({2, 4, 7}), p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "dt", "[2, 4, 8]", "[2, 4, 7]"});
  expect_error([&] { call(p.x, p.dt, tensor<float, 1>({3}), p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "A", "[4]", "[3]"});
  expect_error([&] { call(p.x, p.dt, p.A, tensor<float, 4>({2, 3, 8, 5}), p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "G", "H=4", "G=3"});
  expect_error([&] { call(p.x, p.dt, p.A, tensor<float, 4>({2, 2, 8, 0}), p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "N >= 1", "N=0"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, tensor<float, 4>({2, 2, 8, 4}), p.D, p.z, p.bias, y, state); },
               {fn, "Cm", "[2, 2, 8, 5]", "[2, 2, 8, 4]"});
  expect_error([&] { call(p.x, p.dt, p.A, tensor<float, 4>({2, 2, 7, 5}), p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "Bm", "[2, 2, 8, 5]", "[2, 2, 7, 5]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, tensor<float, 1>({5}), p.z, p.bias, y, state); },
               {fn, "D", "[4]", "[5]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, tensor<float, 4>({2, 4, 8, 4}), p.bias, y, state); },
               {fn, "z", "[2, 4, 8, 3]", "[2, 4, 8, 4]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, tensor<float, 1>({1}), y, state); },
               {fn, "dt_bias", "[4]", "[1]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, tensor<float, 4>({2, 4, 8, 2}), state); },
               {fn, "y", "[2, 4, 8, 3]", "[2, 4, 8, 2]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, tensor<float, 4>({2, 4, 3, 5})); },
               {fn, "state", "[2, 4, 5, 3]", "[2, 4, 3, 5]"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state, {false, -1}); },
               {fn, "options.chunk_size", "got -1"});
  expect_error([&] { call(p.x, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state, {false, 0, linear::form::automatic, -2}); },
               {fn, "options.threads", "got -2"});
  tensor<float, 1> A = p.A;
  A(2) = 0.5f;
  expect_error([&] { call(p.x, p.dt, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "A must be finite and <= 0", "A[2] = 0.5"});
  A(2) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { call(p.x, p.dt, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); }, {fn, "A[2] = nan"});
  A(2) = -std::numeric_limits<float>::infinity();
  expect_error([&] { call(p.x, p.dt, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); }, {fn, "A[2] = -inf"});
  // Aliasing: y over x, the state over Bm.
  tensor<float, 4> buf = p.x;
  expect_error([&] { call(buf, p.dt, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, buf, state); }, {fn, "y", "x", "overlap"});
  tensor<float, 4> big({2, 2, 8, 5});  // Bm, and a [2, 4, 5, 3] state over its first 120 floats
  expect_error([&] { call(p.x, p.dt, p.A, big, p.Cm, p.D, p.z, p.bias, y, view<float, 4>(big.data(), {2, 4, 5, 3})); },
               {fn, "state", "Bm", "overlap"});
  expect_error(
      [&] {
        linear::reference::mamba2(p.x, p.dt, p.A, tensor<float, 4>({2, 3, 8, 5}), p.Cm, p.D, p.z, p.bias, y, state);
      },
      {"linear::reference::mamba2", "G=3"});

  const char* fs = "linear::mamba2_step";
  tensor<float, 3> x1({2, 4, 3}), y1({2, 4, 3}), B1({2, 2, 5});
  tensor<float, 2> dt1({2, 4});
  tensor<float, 4> st({2, 4, 5, 3});
  auto stp = [&](const auto& Bm, const auto& Cm, view<float, 3> yy, view<const float, 4> in, view<float, 4> out) {
    linear::mamba2_step(x1, dt1, p.A, Bm, Cm, p.D, {}, p.bias, yy, in, out);
  };
  expect_error([&] { stp(tensor<float, 3>({2, 3, 5}), B1, y1, st, st); }, {fs, "G", "H=4", "G=3"});
  expect_error([&] { stp(B1, tensor<float, 3>({2, 2, 4}), y1, st, st); }, {fs, "Cm", "[2, 2, 5]", "[2, 2, 4]"});
  expect_error([&] { stp(B1, B1, tensor<float, 3>({2, 4, 2}), st, st); }, {fs, "y", "[2, 4, 3]", "[2, 4, 2]"});
  expect_error([&] { stp(B1, B1, y1, tensor<float, 4>({2, 4, 4, 3}), st); },
               {fs, "state_in", "[2, 4, 5, 3]", "[2, 4, 4, 3]"});
  expect_error([&] { stp(B1, B1, y1, st, tensor<float, 4>({1, 4, 5, 3})); },
               {fs, "state_out", "[2, 4, 5, 3]", "[1, 4, 5, 3]"});
  expect_error([&] { stp(B1, B1, y1, {}, st); }, {fs, "state_in", "[2, 4, 5, 3]", "[0, 0, 0, 0]"});
  tensor<float, 4> wide({2, 4, 5, 4});
  expect_error([&] { stp(B1, B1, y1, view<float, 4>(wide).narrow(3, 0, 3), view<float, 4>(wide).narrow(3, 1, 3)); },
               {fs, "state_out", "state_in", "overlap"});
}

}  // namespace

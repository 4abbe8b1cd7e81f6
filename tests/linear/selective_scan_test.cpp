// Tests of mnemo/linear/selective_scan.hpp: the SIMD path (and the scalar one) against the double
// reference on awkward shapes (L = 1, 37, 1000; odd Dm; N below, at, between and above multiples
// of the vector width; G > 1) with every option on and off, streaming in pieces, the step against
// the full op, rollback through linear::state_ring, NaN propagation, threads, and every boundary
// check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>

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

constexpr double atol = 2e-5, rtol = 1e-4;

struct options {
  bool D = true, z = true, bias = true, softplus = true, h0 = true;
};

struct problem {
  std::int64_t B, Dm, N, L, G;
  tensor<float, 3> u, delta, z, h0;
  tensor<float, 2> A;
  tensor<float, 4> Bm, Cm;
  tensor<float, 1> D, bias;

  problem(std::int64_t B_, std::int64_t Dm_, std::int64_t N_, std::int64_t L_, std::int64_t G_, std::uint32_t seed,
          bool softplus = true)
      : B(B_), Dm(Dm_), N(N_), L(L_), G(G_),
        u(random_tensor<float, 3>({B_, Dm_, L_}, seed)),
        // softplus(delta + bias) in about (0.03, 1); without softplus delta is the positive step itself
        delta(softplus ? random_tensor<float, 3>({B_, Dm_, L_}, seed + 1, -3.0f, 0.5f)
                       : random_tensor<float, 3>({B_, Dm_, L_}, seed + 1, 0.01f, 0.8f)),
        z(random_tensor<float, 3>({B_, Dm_, L_}, seed + 2, -3.0f, 3.0f)),
        h0(random_tensor<float, 3>({B_, Dm_, N_}, seed + 3)),
        A(random_tensor<float, 2>({Dm_, N_}, seed + 4, -3.0f, -0.05f)),
        Bm(random_tensor<float, 4>({B_, G_, N_, L_}, seed + 5)),
        Cm(random_tensor<float, 4>({B_, G_, N_, L_}, seed + 6)),
        D(random_tensor<float, 1>({Dm_}, seed + 7)),
        bias(random_tensor<float, 1>({Dm_}, seed + 8, -0.5f, 0.5f)) {}
};

template <class T>
auto maybe(const T& t, bool on) {
  using V = decltype(mnemo::cview(t));
  return on ? mnemo::cview(t) : V{};
}

struct result {
  tensor<float, 3> y, state;
};

enum class impl { reference, fast, scalar };

result run(const problem& p, impl i, const options& o, int threads = 0) {
  result r{tensor<float, 3>({p.B, p.Dm, p.L}), o.h0 ? p.h0 : tensor<float, 3>({p.B, p.Dm, p.N})};
  linear::selective_scan_options opt{o.softplus, threads};
  auto D = maybe(p.D, o.D);
  auto z = maybe(p.z, o.z);
  auto bias = maybe(p.bias, o.bias);
  switch (i) {
    case impl::reference: linear::reference::selective_scan(p.u, p.delta, p.A, p.Bm, p.Cm, D, z, bias, r.y, r.state, opt); break;
    case impl::fast: linear::selective_scan(p.u, p.delta, p.A, p.Bm, p.Cm, D, z, bias, r.y, r.state, opt); break;
    case impl::scalar:
      linear::selective_scan<mnemo::simd::scalar_arch>(p.u, p.delta, p.A, p.Bm, p.Cm, D, z, bias, r.y, r.state, opt);
      break;
  }
  return r;
}

std::string describe(const problem& p, const options& o) {
  return "B=" + std::to_string(p.B) + " Dm=" + std::to_string(p.Dm) + " N=" + std::to_string(p.N) +
         " L=" + std::to_string(p.L) + " G=" + std::to_string(p.G) + " D=" + std::to_string(o.D) +
         " z=" + std::to_string(o.z) + " bias=" + std::to_string(o.bias) + " softplus=" + std::to_string(o.softplus) +
         " h0=" + std::to_string(o.h0);
}

TEST(selective_scan, fast_matches_reference) {
  struct shape {
    std::int64_t B, Dm, N, L, G;
  };
  // N = 1, 7, 8, 13, 16, 32, 40 (vector widths 8 and 16: registers for 1, 2, 4 vectors, the loop
  // beyond); Dm over several channel blocks; groups of 1, 3 and 4 channels.
  const shape shapes[] = {{1, 1, 1, 1, 1},   {2, 5, 16, 37, 1}, {1, 6, 7, 37, 3},  {1, 3, 16, 1000, 1},
                          {2, 4, 13, 64, 2}, {1, 8, 40, 37, 4}, {1, 3, 32, 20, 1}, {1, 67, 8, 70, 1},
                          {1, 36, 16, 5, 12}};
  std::uint32_t seed = 100;
  for (const shape& s : shapes) {
    for (int variant = 0; variant < 4; ++variant) {
      options o;
      if (variant == 1) o = {false, false, false, false, false};
      if (variant == 2) o = {true, false, true, true, false};
      if (variant == 3) o = {false, true, false, false, true};
      const problem p(s.B, s.Dm, s.N, s.L, s.G, seed += 10, o.softplus);
      const result want = run(p, impl::reference, o);
      for (impl i : {impl::fast, impl::scalar}) {
        const result got = run(p, i, o);
        const std::string what = describe(p, o) + (i == impl::fast ? " fast" : " scalar");
        expect_close(got.y, want.y, atol, rtol, what + " y");
        expect_close(got.state, want.state, atol, rtol, what + " state");
      }
    }
  }
}

// softplus far out on both sides (delta + bias in [-60, 60]): dt is then about 0 or delta itself,
// and the decay exp(dt A) reaches far below FLT_MIN.
TEST(selective_scan, softplus_extremes) {
  problem p(1, 5, 16, 40, 1, 150);
  mnemo::test::fill_uniform(p.delta, -60.0f, 60.0f, 151);
  const result want = run(p, impl::reference, {}), got = run(p, impl::fast, {});
  expect_close(got.y, want.y, atol, rtol, "y");
  expect_close(got.state, want.state, atol, rtol, "state");
}

// One channel, N = 1, by hand: x_t = exp(dt A) x_{t-1} + dt B u, y = C x + D u.
TEST(selective_scan, semantics_by_hand) {
  tensor<float, 3> u({1, 1, 2}), delta({1, 1, 2}), y({1, 1, 2}), state({1, 1, 1});
  tensor<float, 2> A({1, 1});
  tensor<float, 4> Bm({1, 1, 1, 2}), Cm({1, 1, 1, 2});
  tensor<float, 1> D({1});
  u(0, 0, 0) = 1, u(0, 0, 1) = 2, delta(0, 0, 0) = 0.5f, delta(0, 0, 1) = 0.25f, A(0, 0) = -2, Bm(0, 0, 0, 0) = 3,
  Bm(0, 0, 0, 1) = -1, Cm(0, 0, 0, 0) = 2, Cm(0, 0, 0, 1) = 4, D(0) = 0.5f, state(0, 0, 0) = 1;
  linear::selective_scan(u, delta, A, Bm, Cm, D, {}, {}, y, state);
  const double x1 = std::exp(-1.0) * 1 + 0.5 * 3 * 1, x2 = std::exp(-0.5) * x1 + 0.25 * -1 * 2;
  EXPECT_NEAR(y(0, 0, 0), 2 * x1 + 0.5, 1e-6);
  EXPECT_NEAR(y(0, 0, 1), 4 * x2 + 1.0, 1e-6);
  EXPECT_NEAR(state(0, 0, 0), x2, 1e-6);
}

// Two calls with the state carried equal one call.
TEST(selective_scan, streaming_pieces) {
  const problem p(2, 10, 16, 150, 2, 7);
  const options o;
  const result want = run(p, impl::fast, o);
  for (std::int64_t cut : {1, 64, 100}) {
    tensor<float, 3> y({p.B, p.Dm, p.L}), state = p.h0;
    for (auto [t0, n] : {std::pair<std::int64_t, std::int64_t>{0, cut}, {cut, p.L - cut}}) {
      auto piece = [&](const auto& t) { return mnemo::cview(t).narrow(t.rank - 1, t0, n); };
      linear::selective_scan(piece(p.u), piece(p.delta), p.A, piece(p.Bm), piece(p.Cm), p.D, piece(p.z), p.bias,
                             view<float, 3>(y).narrow(2, t0, n), state, {true});
    }
    expect_close(y, want.y, atol, rtol, "cut " + std::to_string(cut));
    expect_close(state, want.state, atol, rtol, "state, cut " + std::to_string(cut));
  }
}

// Token t of a [..., L] tensor as a [...] tensor.
template <int R>
tensor<float, R - 1> column(const tensor<float, R>& x, std::int64_t t) {
  mnemo::shape_t<R - 1> s{};
  for (int i = 0; i < R - 1; ++i) s[i] = x.extent(i);
  tensor<float, R - 1> out(s);
  const std::int64_t L = x.extent(R - 1);
  for (std::int64_t i = 0; i < out.size(); ++i) out.data()[i] = x.data()[i * L + t];
  return out;
}

// One step of token t of p (in place, or from `in` into `out`).
void step(const problem& p, std::int64_t t, const options& o, tensor<float, 2>& y, view<const float, 3> in,
          view<float, 3> out) {
  const tensor<float, 2> z = column(p.z, t);
  linear::selective_scan_step(column(p.u, t), column(p.delta, t), p.A, column(p.Bm, t), column(p.Cm, t),
                              maybe(p.D, o.D), maybe(z, o.z), maybe(p.bias, o.bias), y, in, out, {o.softplus});
}

TEST(selective_scan, step_matches_full_op) {
  for (std::int64_t N : {3, 16, 21}) {
    for (const options& o : {options{}, options{false, false, false, false, true}}) {
      const problem p(2, 12, N, 9, 3, 200 + static_cast<std::uint32_t>(N), o.softplus);
      const result want = run(p, impl::reference, o);
      tensor<float, 3> state = p.h0;
      for (std::int64_t t = 0; t < p.L; ++t) {
        tensor<float, 2> y({p.B, p.Dm});
        step(p, t, o, y, state, state);
        expect_close(y, column(want.y, t), atol, rtol, describe(p, o) + " t=" + std::to_string(t));
      }
      expect_close(state, want.state, atol, rtol, describe(p, o) + " state");
    }
  }
}

// More channels than one work item of the step (detail::scan_step_block), with groups that
// straddle the items' boundary.
TEST(selective_scan, step_over_several_blocks) {
  const options o;
  const problem p(2, 300, 13, 3, 4, 250);
  const result want = run(p, impl::reference, o);
  tensor<float, 3> state = p.h0;
  for (std::int64_t t = 0; t < p.L; ++t) {
    tensor<float, 2> y({p.B, p.Dm});
    step(p, t, o, y, state, state);
    expect_close(y, column(want.y, t), atol, rtol, "t=" + std::to_string(t));
  }
  expect_close(state, want.state, atol, rtol, "state");
}

// Speculative decoding: 6 drafted tokens through a state_ring of depth 4, reject the last 3 and
// continue with 3 other tokens: the outputs and the state equal the full op over the accepted ones.
TEST(selective_scan, rollback_with_state_ring) {
  const options o;
  const problem p(1, 9, 13, 6, 1, 300), other(1, 9, 13, 6, 1, 400);
  linear::state_ring<3> ring({p.B, p.Dm, p.N}, 4);
  std::copy(p.h0.begin(), p.h0.end(), ring.state().data());
  for (std::int64_t t = 0; t < 6; ++t) {
    tensor<float, 2> y({p.B, p.Dm});
    auto [in, out] = ring.advance();
    step(p, t, o, y, in, out);
  }
  EXPECT_EQ(ring.available(), 4);  // the depth: only the last 4 steps can be undone
  ring.rollback(3);
  // Accepted: p's tokens 0..2, then other's tokens 3..5.
  problem mixed = p;
  auto splice = [](tensor<float, 3>& a, const tensor<float, 3>& b) {
    for (std::int64_t d = 0; d < a.extent(1); ++d)
      for (std::int64_t t = 3; t < 6; ++t) a(0, d, t) = b(0, d, t);
  };
  auto splice4 = [](tensor<float, 4>& a, const tensor<float, 4>& b) {
    for (std::int64_t n = 0; n < a.extent(2); ++n)
      for (std::int64_t t = 3; t < 6; ++t) a(0, 0, n, t) = b(0, 0, n, t);
  };
  splice(mixed.u, other.u);
  splice(mixed.delta, other.delta);
  splice(mixed.z, other.z);
  splice4(mixed.Bm, other.Bm);
  splice4(mixed.Cm, other.Cm);
  const result want = run(mixed, impl::reference, o);
  for (std::int64_t t = 3; t < 6; ++t) {
    tensor<float, 2> y({p.B, p.Dm});
    auto [in, out] = ring.advance();
    step(mixed, t, o, y, in, out);
    expect_close(y, column(want.y, t), atol, rtol, "after rollback, t=" + std::to_string(t));
  }
  expect_close(ring.state(), want.state, atol, rtol, "state");
}

// Results do not depend on the thread count.
TEST(selective_scan, threads) {
  const problem p(2, 70, 16, 40, 2, 500);
  const result a = run(p, impl::fast, {}, 1), b = run(p, impl::fast, {}, 2);
  expect_close(a.y, b.y, 0, 0, "y");
  expect_close(a.state, b.state, 0, 0, "state");
}

// A NaN in u at (d, t) spoils channel d from t on (through the state), nothing else; a NaN in C at
// t spoils token t of the group's channels only.
TEST(selective_scan, nan_propagation) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (impl i : {impl::reference, impl::fast}) {
    problem p(1, 6, 11, 40, 2, 600);
    p.u(0, 4, 17) = static_cast<float>(nan);
    const result r = run(p, i, {});
    for (std::int64_t d = 0; d < p.Dm; ++d) {
      for (std::int64_t t = 0; t < p.L; ++t)
        EXPECT_EQ(std::isnan(r.y(0, d, t)), d == 4 && t >= 17) << "u: d=" << d << " t=" << t;
      EXPECT_EQ(std::isnan(r.state(0, d, 0)), d == 4);
    }
    problem q(1, 6, 11, 40, 2, 600);
    q.Cm(0, 1, 5, 9) = static_cast<float>(nan);  // group 1: channels 3..5
    const result s = run(q, i, {});
    for (std::int64_t d = 0; d < q.Dm; ++d)
      for (std::int64_t t = 0; t < q.L; ++t)
        EXPECT_EQ(std::isnan(s.y(0, d, t)), d >= 3 && t == 9) << "C: d=" << d << " t=" << t;
  }
}

TEST(selective_scan, bad_inputs) {
  const problem p(2, 6, 5, 8, 2, 700);
  tensor<float, 3> y({2, 6, 8}), state({2, 6, 5});
  const char* fn = "linear::selective_scan";
  auto call = [&](const auto& u, const auto& delta, const auto& A, const auto& Bm, const auto& Cm, const auto& D,
                  const auto& z, const auto& bias, view<float, 3> yy, view<float, 3> st,
                  linear::selective_scan_options opt = {}) {
    linear::selective_scan(u, delta, A, Bm, Cm, D, z, bias, yy, st, opt);
  };
  expect_error([&] { call(p.u, tensor<float, 3>({2, 6, 7}), p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "delta", "[2, 6, 8]", "[2, 6, 7]"});
  expect_error([&] { call(p.u, p.delta, tensor<float, 2>({6, 0}), p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "A", "N >= 1", "N=0"});
  expect_error([&] { call(p.u, p.delta, tensor<float, 2>({5, 5}), p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "A", "[6, 5]", "[5, 5]"});
  expect_error([&] { call(p.u, p.delta, p.A, tensor<float, 4>({2, 4, 5, 8}), p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "G", "Dm=6", "G=4"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, tensor<float, 4>({2, 2, 5, 7}), p.D, p.z, p.bias, y, state); },
               {fn, "Cm", "[2, 2, 5, 8]", "[2, 2, 5, 7]"});
  expect_error([&] { call(p.u, p.delta, p.A, tensor<float, 4>({2, 2, 4, 8}), p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "Bm", "[2, 2, 5, 8]", "[2, 2, 4, 8]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, tensor<float, 1>({5}), p.z, p.bias, y, state); },
               {fn, "D", "[6]", "[5]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, p.D, tensor<float, 3>({2, 6, 9}), p.bias, y, state); },
               {fn, "z", "[2, 6, 8]", "[2, 6, 9]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, p.D, p.z, tensor<float, 1>({7}), y, state); },
               {fn, "delta_bias", "[6]", "[7]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, tensor<float, 3>({2, 6, 1}), state); },
               {fn, "y", "[2, 6, 8]", "[2, 6, 1]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, tensor<float, 3>({2, 6, 4})); },
               {fn, "state", "[2, 6, 5]", "[2, 6, 4]"});
  expect_error([&] { call(p.u, p.delta, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state, {false, -2}); },
               {fn, "options.threads", "got -2"});
  tensor<float, 2> A = p.A;
  A(3, 2) = 0.5f;
  expect_error([&] { call(p.u, p.delta, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); },
               {fn, "A must be finite and <= 0", "A[3, 2] = 0.5"});
  A(3, 2) = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { call(p.u, p.delta, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); }, {fn, "A[3, 2] = nan"});
  A(3, 2) = -std::numeric_limits<float>::infinity();
  expect_error([&] { call(p.u, p.delta, A, p.Bm, p.Cm, p.D, p.z, p.bias, y, state); }, {fn, "A[3, 2] = -inf"});
  // Aliasing: y over u, the state over delta.
  tensor<float, 3> buf = p.u;
  expect_error([&] { call(buf, p.delta, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, buf, state); }, {fn, "y", "u", "overlap"});
  tensor<float, 3> big({2, 6, 8});
  expect_error([&] { call(p.u, big, p.A, p.Bm, p.Cm, p.D, p.z, p.bias, y, view<float, 3>(big).narrow(2, 0, 5)); },
               {fn, "state", "delta", "overlap"});
  expect_error(
      [&] {
        linear::reference::selective_scan(p.u, p.delta, p.A, tensor<float, 4>({2, 4, 5, 8}), p.Cm, p.D, p.z, p.bias,
                                          y, state);
      },
      {"linear::reference::selective_scan", "G=4"});

  const char* fs = "linear::selective_scan_step";
  tensor<float, 2> u1({2, 6}), y1({2, 6});
  tensor<float, 3> B1({2, 2, 5}), st({2, 6, 5});
  auto step = [&](const auto& Bm, const auto& Cm, view<float, 2> yy, view<const float, 3> in, view<float, 3> out) {
    linear::selective_scan_step(u1, u1, p.A, Bm, Cm, p.D, {}, p.bias, yy, in, out);
  };
  expect_error([&] { step(tensor<float, 3>({2, 4, 5}), B1, y1, st, st); }, {fs, "G", "Dm=6", "G=4"});
  expect_error([&] { step(B1, tensor<float, 3>({2, 2, 4}), y1, st, st); }, {fs, "Cm", "[2, 2, 5]", "[2, 2, 4]"});
  expect_error([&] { step(B1, B1, tensor<float, 2>({2, 5}), st, st); }, {fs, "y", "[2, 6]", "[2, 5]"});
  expect_error([&] { step(B1, B1, y1, tensor<float, 3>({2, 6, 4}), st); }, {fs, "state_in", "[2, 6, 5]", "[2, 6, 4]"});
  expect_error([&] { step(B1, B1, y1, st, tensor<float, 3>({1, 6, 5})); }, {fs, "state_out", "[2, 6, 5]", "[1, 6, 5]"});
  tensor<float, 3> wide({2, 6, 6});
  expect_error([&] { step(B1, B1, y1, view<float, 3>(wide).narrow(2, 0, 5), view<float, 3>(wide).narrow(2, 1, 5)); },
               {fs, "state_out", "state_in", "overlap"});
}

}  // namespace

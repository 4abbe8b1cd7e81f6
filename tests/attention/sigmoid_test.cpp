// Tests for attention/sigmoid.hpp: sigmoid_attention against reference_sigmoid_attention on
// shapes around the tile edges (L = 1, L not a multiple of the tile, Lq != Lk both ways, GQA/MQA,
// Dv != D) with every mod of mods.hpp (causal, sliding window, prefix-LM, document, softcap and
// ALiBi composed with a mask) and f16 K/V; rows that see no key; the reference against a closed
// form; the backward against the reference backward and the reference backward against finite
// differences of the reference forward; the scalar loops (TuArch = scalar_arch); thread-count
// independence; NaN propagation; and every argument check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/sigmoid.hpp"
#include "support/support.hpp"

namespace mnemo::attention {
namespace {

using test::expect_close;
using test::expect_error;
using test::random_tensor;

struct dims_case {
  std::int64_t B, Hq, Hkv, Lq, Lk, D, Dv;
  std::string name() const {
    return "B" + std::to_string(B) + " Hq" + std::to_string(Hq) + " Hkv" + std::to_string(Hkv) + " Lq" +
           std::to_string(Lq) + " Lk" + std::to_string(Lk) + " D" + std::to_string(D) + " Dv" + std::to_string(Dv);
  }
};

// Around the tiles (64 x 64 on AVX2/AVX-512): one row and key, odd sizes, Lq < Lk, Lq > Lk (the
// first rows see nothing under a causal mask), exactly one tile, GQA 4 and MQA.
const std::vector<dims_case> shapes = {
    {1, 1, 1, 1, 1, 8, 8},     {1, 2, 1, 37, 53, 40, 24}, {2, 4, 2, 64, 64, 64, 64},
    {1, 4, 1, 70, 130, 16, 16}, {1, 2, 2, 90, 30, 32, 20}, {1, 8, 2, 129, 129, 96, 72},
};

struct inputs {
  tensor<float, 4> q, k, v;
  inputs(const dims_case& s, std::uint32_t seed)
      : q(random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed, -4.0f, 4.0f)),
        k(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1)),
        v(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2)) {}
};

template <class Mod>
void check_forward(const dims_case& s, const Mod& mod, std::uint32_t seed, std::optional<float> bias,
                   const std::string& what) {
  const inputs in(s, seed);
  tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  sigmoid_attention(cview(in.q), in.k, in.v, got.as_view(), mod, {}, bias);
  reference_sigmoid_attention(cview(in.q), in.k, in.v, want.as_view(), mod, {}, bias);
  expect_close(got, want, 1e-5, 1e-4, what + " " + s.name());
}

template <class Mod>
void check_forward_all(const Mod& mod, const std::string& what) {
  std::uint32_t seed = 10;
  for (const dims_case& s : shapes) {
    check_forward(s, mod, seed, std::nullopt, what + " (bias -log Lk)");
    check_forward(s, mod, seed + 3, -1.5f, what + " (bias -1.5)");
    seed += 7;
  }
}

TEST(SigmoidAttention, ForwardNoMask) { check_forward_all(mods::none{}, "none"); }
TEST(SigmoidAttention, ForwardCausal) { check_forward_all(mods::causal{}, "causal"); }
TEST(SigmoidAttention, ForwardWindow) {
  check_forward_all(mods::sliding_window{17}, "window 17");
  check_forward_all(mods::sliding_window{64}, "window 64");
}
TEST(SigmoidAttention, ForwardPrefixLm) { check_forward_all(mods::prefix_lm{20}, "prefix_lm 20"); }

TEST(SigmoidAttention, ForwardSoftcapAlibiCausal) {
  for (const dims_case& s : shapes) {
    const std::vector<float> slopes = mods::alibi_slopes(s.Hq);
    const auto mod = mods::all_of(mods::softcap{2.0f}, mods::alibi{view<const float, 1>(slopes.data(), {s.Hq})},
                                  mods::causal{});
    check_forward(s, mod, 40, std::nullopt, "softcap+alibi+causal");
  }
}

TEST(SigmoidAttention, ForwardDocument) {
  for (const dims_case& s : shapes) {
    if (s.Lq > s.Lk) continue;  // the document mask needs Lq <= Lk
    std::vector<std::int64_t> ids(static_cast<std::size_t>(s.Lk));
    for (std::int64_t j = 0; j < s.Lk; ++j) ids[static_cast<std::size_t>(j)] = j / 23;
    const mods::document doc{view<const std::int64_t, 1>(ids.data(), {s.Lk})};
    check_forward(s, mods::all_of(doc, mods::causal{}), 50, std::nullopt, "document+causal");
  }
}

TEST(SigmoidAttention, ForwardHalfKv) {
  const dims_case s{1, 4, 2, 37, 70, 40, 24};
  const inputs in(s, 60);
  tensor<f16, 4> k16({s.B, s.Hkv, s.Lk, s.D}), v16({s.B, s.Hkv, s.Lk, s.Dv});
  tensor<float, 4> k_r({s.B, s.Hkv, s.Lk, s.D}), v_r({s.B, s.Hkv, s.Lk, s.Dv});
  for (std::int64_t n = 0; n < k16.size(); ++n) k_r.data()[n] = float(k16.data()[n] = f16(in.k.data()[n]));
  for (std::int64_t n = 0; n < v16.size(); ++n) v_r.data()[n] = float(v16.data()[n] = f16(in.v.data()[n]));
  tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  sigmoid_attention(cview(in.q), k16, v16, got.as_view(), mods::causal{});
  reference_sigmoid_attention(cview(in.q), k_r, v_r, want.as_view(), mods::causal{});
  expect_close(got, want, 1e-5, 1e-4, "f16 K/V");
}

// The reference against a closed form: with q = 0 every visible weight is sigmoid(b), so
// out_i = sigmoid(b) * (sum of the visible v_j); rows that see nothing are 0.
TEST(SigmoidAttention, ReferenceClosedForm) {
  const dims_case s{1, 2, 1, 9, 6, 4, 3};
  tensor<float, 4> q({s.B, s.Hq, s.Lq, s.D});
  std::fill(q.begin(), q.end(), 0.0f);
  const tensor<float, 4> k = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, 1);
  const tensor<float, 4> v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, 2);
  for (const float bias : {-1.5f, 0.0f, 2.0f}) {
    tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), fast({s.B, s.Hq, s.Lq, s.Dv});
    reference_sigmoid_attention(cview(q), k, v, out.as_view(), mods::causal{}, {}, bias);
    sigmoid_attention(cview(q), k, v, fast.as_view(), mods::causal{}, {}, bias);
    const double w = 1.0 / (1.0 + std::exp(-static_cast<double>(bias)));
    for (std::int64_t h = 0; h < s.Hq; ++h)
      for (std::int64_t i = 0; i < s.Lq; ++i)
        for (std::int64_t c = 0; c < s.Dv; ++c) {
          double sum = 0;
          for (std::int64_t j = 0; j <= i + s.Lk - s.Lq && j < s.Lk; ++j) sum += v(0, 0, j, c);
          EXPECT_NEAR(out(0, h, i, c), w * sum, 1e-6) << "h " << h << " i " << i << " c " << c;
          EXPECT_NEAR(fast(0, h, i, c), w * sum, 1e-5) << "h " << h << " i " << i << " c " << c;
        }
  }
}

// Lq > Lk under a causal mask: the first Lq - Lk rows see nothing and get exactly 0 (no NaN),
// forward and backward (their dq is 0, and they add nothing to dk, dv).
TEST(SigmoidAttention, EmptyRowsAreZero) {
  const dims_case s{1, 4, 2, 80, 20, 16, 8};
  const inputs in(s, 70);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
  std::fill(out.begin(), out.end(), 7.0f);
  sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mods::causal{});
  const tensor<float, 4> dout = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.Dv}, 71);
  tensor<float, 4> dq({s.B, s.Hq, s.Lq, s.D}), dk({s.B, s.Hkv, s.Lk, s.D}), dv({s.B, s.Hkv, s.Lk, s.Dv});
  std::fill(dq.begin(), dq.end(), 7.0f);
  sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(dout), dq.as_view(), dk.as_view(),
                             dv.as_view(), mods::causal{});
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Lq - s.Lk; ++i) {
      for (std::int64_t c = 0; c < s.Dv; ++c) ASSERT_EQ(out(0, h, i, c), 0.0f) << h << " " << i;
      for (std::int64_t c = 0; c < s.D; ++c) ASSERT_EQ(dq(0, h, i, c), 0.0f) << h << " " << i;
    }
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_NE(out(0, h, s.Lq - 1, c), 0.0f);
}

// An empty key set (Lk = 0) or query set (Lq = 0): zeros, nothing read.
TEST(SigmoidAttention, ZeroLengths) {
  tensor<float, 4> q = random_tensor<float, 4>({1, 2, 5, 8}, 1), k({1, 1, 0, 8}), v({1, 1, 0, 8});
  tensor<float, 4> out({1, 2, 5, 8});
  std::fill(out.begin(), out.end(), 3.0f);
  sigmoid_attention(cview(q), k, v, out.as_view());
  for (float x : out) ASSERT_EQ(x, 0.0f);
  const tensor<float, 4> q0({1, 2, 0, 8}), dout0({1, 2, 0, 8});
  tensor<float, 4> k1 = random_tensor<float, 4>({1, 1, 7, 8}, 2), v1 = random_tensor<float, 4>({1, 1, 7, 8}, 3);
  tensor<float, 4> dq0({1, 2, 0, 8}), dk({1, 1, 7, 8}), dv({1, 1, 7, 8});
  std::fill(dk.begin(), dk.end(), 3.0f);
  std::fill(dv.begin(), dv.end(), 3.0f);
  sigmoid_attention_backward(cview(q0), cview(k1), cview(v1), cview(dout0), dq0.as_view(), dk.as_view(), dv.as_view());
  for (float x : dk) ASSERT_EQ(x, 0.0f);
  for (float x : dv) ASSERT_EQ(x, 0.0f);
}

// The default bias is -log(Lk), the same for every row.
TEST(SigmoidAttention, DefaultBias) {
  EXPECT_FLOAT_EQ(sigmoid_default_bias(100), static_cast<float>(-std::log(100.0)));
  EXPECT_EQ(sigmoid_default_bias(1), 0.0f);
  EXPECT_EQ(sigmoid_default_bias(0), 0.0f);
  const dims_case s{1, 2, 2, 30, 50, 16, 16};
  const inputs in(s, 80);
  tensor<float, 4> a({s.B, s.Hq, s.Lq, s.Dv}), b({s.B, s.Hq, s.Lq, s.Dv});
  sigmoid_attention(cview(in.q), in.k, in.v, a.as_view(), mods::causal{});
  sigmoid_attention(cview(in.q), in.k, in.v, b.as_view(), mods::causal{}, {}, sigmoid_default_bias(s.Lk));
  EXPECT_EQ(test::max_abs_diff(a, b), 0.0);
}

// A custom scale, in place (out is q), several threads, and the scalar loops.
TEST(SigmoidAttention, ScaleInPlaceThreadsScalar) {
  const dims_case s{2, 4, 2, 67, 67, 32, 32};
  const inputs in(s, 90);
  const options opt{.scale = 0.3f};
  tensor<float, 4> want({s.B, s.Hq, s.Lq, s.Dv}), t1({s.B, s.Hq, s.Lq, s.Dv}), t2({s.B, s.Hq, s.Lq, s.Dv}),
      sc({s.B, s.Hq, s.Lq, s.Dv});
  reference_sigmoid_attention(cview(in.q), in.k, in.v, want.as_view(), mods::sliding_window{20}, opt);
  sigmoid_attention(cview(in.q), in.k, in.v, t1.as_view(), mods::sliding_window{20}, {.scale = 0.3f, .threads = 1});
  sigmoid_attention(cview(in.q), in.k, in.v, t2.as_view(), mods::sliding_window{20}, {.scale = 0.3f, .threads = 2});
  sigmoid_attention<float, mods::sliding_window, simd::scalar_arch>(cview(in.q), cview(in.k), cview(in.v),
                                                                   sc.as_view(), mods::sliding_window{20}, opt);
  expect_close(t1, want, 1e-5, 1e-4, "threads 1");
  EXPECT_EQ(test::max_abs_diff(t1, t2), 0.0) << "results depend on the thread count";
  expect_close(sc, want, 1e-5, 1e-4, "scalar loops");
  tensor<float, 4> q = in.q;  // D == Dv: out may be q itself
  sigmoid_attention(cview(q), in.k, in.v, q.as_view(), mods::sliding_window{20}, opt);
  expect_close(q, want, 1e-5, 1e-4, "in place");
}

// A NaN in q makes its row NaN (never a clean-looking row), the other rows are untouched.
TEST(SigmoidAttention, NanPropagates) {
  const dims_case s{1, 1, 1, 10, 10, 8, 8};
  inputs in(s, 100);
  in.q(0, 0, 3, 2) = std::numeric_limits<float>::quiet_NaN();
  tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  sigmoid_attention(cview(in.q), in.k, in.v, got.as_view());
  reference_sigmoid_attention(cview(in.q), in.k, in.v, want.as_view());
  for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_TRUE(std::isnan(got(0, 0, 3, c)));
  expect_close(got, want, 1e-5, 1e-4, "NaN row");
}

// ---------------------------------------------------------------------------------------------
// Backward.

struct grads {
  tensor<float, 4> dq, dk, dv;
  explicit grads(const dims_case& s)
      : dq({s.B, s.Hq, s.Lq, s.D}), dk({s.B, s.Hkv, s.Lk, s.D}), dv({s.B, s.Hkv, s.Lk, s.Dv}) {}
};

template <class Mod, class TuArch = simd::default_arch>
void check_backward(const dims_case& s, const Mod& mod, std::uint32_t seed, const std::string& what) {
  const inputs in(s, seed);
  const tensor<float, 4> dout = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.Dv}, seed + 5);
  grads got(s), want(s);
  sigmoid_attention_backward<Mod, TuArch>(cview(in.q), cview(in.k), cview(in.v), cview(dout), got.dq.as_view(),
                                          got.dk.as_view(), got.dv.as_view(), mod, {}, -2.0f);
  reference_sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(dout), want.dq.as_view(),
                                       want.dk.as_view(), want.dv.as_view(), mod, {}, -2.0f);
  expect_close(got.dq, want.dq, 2e-5, 2e-4, what + " dq " + s.name());
  expect_close(got.dk, want.dk, 2e-5, 2e-4, what + " dk " + s.name());
  expect_close(got.dv, want.dv, 2e-5, 2e-4, what + " dv " + s.name());
}

TEST(SigmoidAttentionBackward, MatchesReference) {
  std::uint32_t seed = 200;
  for (const dims_case& s : shapes) {
    check_backward(s, mods::none{}, seed, "none");
    check_backward(s, mods::causal{}, seed + 1, "causal");
    const std::vector<float> slopes = mods::alibi_slopes(s.Hq);
    check_backward(s,
                   mods::all_of(mods::softcap{2.0f}, mods::alibi{view<const float, 1>(slopes.data(), {s.Hq})},
                                mods::sliding_window{21}),
                   seed + 2, "softcap+alibi+window");
    seed += 10;
  }
}

TEST(SigmoidAttentionBackward, ScalarLoops) {
  check_backward<mods::causal, simd::scalar_arch>({1, 4, 2, 37, 53, 40, 24}, mods::causal{}, 300, "scalar causal");
  check_backward<mods::softcap, simd::scalar_arch>({1, 2, 1, 20, 20, 8, 8}, mods::softcap{1.5f}, 301,
                                                   "scalar softcap");
}

// The reference backward against central differences of the reference forward, on
// L = sum(out * dout), for a few elements of q, k and v (GQA, softcap + ALiBi + causal, Lq < Lk).
TEST(SigmoidAttentionBackward, ReferenceMatchesFiniteDifferences) {
  const dims_case s{1, 4, 2, 5, 7, 6, 5};
  inputs in(s, 400);
  const tensor<float, 4> dout = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.Dv}, 405);
  const std::vector<float> slopes = mods::alibi_slopes(s.Hq);
  const auto mod = mods::all_of(mods::softcap{3.0f}, mods::alibi{view<const float, 1>(slopes.data(), {s.Hq})},
                                mods::causal{});
  const float bias = -0.7f;
  grads g(s);
  reference_sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(dout), g.dq.as_view(),
                                       g.dk.as_view(), g.dv.as_view(), mod, {}, bias);
  auto loss = [&]() {
    tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
    reference_sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mod, {}, bias);
    double sum = 0;
    for (std::int64_t n = 0; n < out.size(); ++n) sum += static_cast<double>(out.data()[n]) * dout.data()[n];
    return sum;
  };
  constexpr float eps = 1e-2f;
  auto check = [&](tensor<float, 4>& x, const tensor<float, 4>& grad, const char* name) {
    for (std::int64_t n = 0; n < x.size(); n += 7) {
      const float keep = x.data()[n];
      x.data()[n] = keep + eps;
      const double up = loss();
      x.data()[n] = keep - eps;
      const double down = loss();
      x.data()[n] = keep;
      const double fd = (up - down) / (2.0 * static_cast<double>(eps));
      EXPECT_NEAR(grad.data()[n], fd, 1e-4 + 1e-3 * std::abs(fd)) << name << " element " << n;
    }
  };
  check(in.q, g.dq, "dq");
  check(in.k, g.dk, "dk");
  check(in.v, g.dv, "dv");
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

TEST(SigmoidAttention, Errors) {
  const dims_case s{1, 4, 2, 8, 9, 16, 8};
  const inputs in(s, 500);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
  const std::vector<float> sinks(4, 0.0f);
  const options with_sinks{.sinks = view<const float, 1>(sinks.data(), {4})};
  expect_error([&] { sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mods::none{}, with_sinks); },
               {"attention::sigmoid_attention", "options.sinks must be empty", "[4]"});
  expect_error(
      [&] { reference_sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mods::none{}, with_sinks); },
      {"attention::reference_sigmoid_attention", "options.sinks"});
  expect_error(
      [&] {
        sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mods::none{}, {},
                          std::numeric_limits<float>::infinity());
      },
      {"attention::sigmoid_attention", "bias must be finite", "inf"});
  tensor<float, 4> bad_out({s.B, s.Hq, s.Lq, s.Dv + 1});
  expect_error([&] { sigmoid_attention(cview(in.q), in.k, in.v, bad_out.as_view()); },
               {"attention::sigmoid_attention", "out", "[1, 4, 8, 8]", "[1, 4, 8, 9]"});
  const tensor<float, 4> k3({1, 3, s.Lk, s.D}), v3({1, 3, s.Lk, s.Dv});
  expect_error([&] { sigmoid_attention(cview(in.q), k3, v3, out.as_view()); },
               {"attention::sigmoid_attention", "multiple of", "Hq=4", "Hkv=3"});
  expect_error([&] { sigmoid_attention(cview(in.q), in.k, in.v, out.as_view(), mods::sliding_window{0}); },
               {"attention::sigmoid_attention", "sliding_window.size must be > 0"});

  const tensor<float, 4> dout = random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.Dv}, 501);
  grads g(s);
  tensor<float, 4> bad_dk({s.B, s.Hkv, s.Lk + 1, s.D});
  expect_error(
      [&] {
        sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(dout), g.dq.as_view(),
                                   bad_dk.as_view(), g.dv.as_view());
      },
      {"attention::sigmoid_attention_backward", "dk", "[1, 2, 9, 16]", "[1, 2, 10, 16]"});
  tensor<float, 4> q_copy = in.q;
  expect_error(
      [&] {
        sigmoid_attention_backward(cview(q_copy), cview(in.k), cview(in.v), cview(dout), q_copy.as_view(),
                                   g.dk.as_view(), g.dv.as_view());
      },
      {"attention::sigmoid_attention_backward", "dq", "q", "must not overlap"});
  expect_error(
      [&] {
        reference_sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(dout), g.dq.as_view(),
                                             g.dk.as_view(), view<float, 4>(g.dk.data(), {s.B, s.Hkv, s.Lk, s.Dv}));
      },
      {"attention::reference_sigmoid_attention_backward", "dk", "dv", "must not overlap"});
  tensor<float, 4> bad_dout({s.B, s.Hq, s.Lq, s.Dv + 2});
  expect_error(
      [&] {
        sigmoid_attention_backward(cview(in.q), cview(in.k), cview(in.v), cview(bad_dout), g.dq.as_view(),
                                   g.dk.as_view(), g.dv.as_view());
      },
      {"attention::sigmoid_attention_backward", "dout", "[1, 4, 8, 8]", "[1, 4, 8, 10]"});
}

}  // namespace
}  // namespace mnemo::attention

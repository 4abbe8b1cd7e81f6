// Tests for attention/clipped.hpp: clipped_softmax_attention against
// reference_clipped_softmax_attention on shapes around the tile edges (L = 1, odd sizes, Lq != Lk
// both ways, GQA/MQA, Dv != D) with the mods of mods.hpp and several (zeta, gamma), f16 K/V and the
// scalar loops; zeta = 1, gamma = 0 against ordinary attention (flash and the softmax reference);
// the reference against a closed form; rows that see no key; output_gate against its double
// reference and a closed form; and every argument check.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "mnemo/attention/clipped.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
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

const std::vector<dims_case> shapes = {
    {1, 1, 1, 1, 1, 8, 8},     {1, 2, 1, 37, 53, 40, 24}, {2, 4, 2, 64, 64, 64, 64},
    {1, 4, 1, 70, 130, 16, 16}, {1, 2, 2, 90, 30, 32, 20}, {1, 8, 2, 129, 129, 96, 72},
};

// Clips that bite: gamma around -alpha / T for T ~ 64 (weights below ~1/64 * alpha become 0),
// zeta > 1 (weights near 1 saturate), and both.
const std::vector<clipped_softmax> clips = {{1.0f, -0.03f}, {1.1f, 0.0f}, {1.05f, -0.1f}};

struct inputs {
  tensor<float, 4> q, k, v;
  inputs(const dims_case& s, std::uint32_t seed)
      : q(random_tensor<float, 4>({s.B, s.Hq, s.Lq, s.D}, seed, -4.0f, 4.0f)),
        k(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, seed + 1)),
        v(random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, seed + 2)) {}
};

template <class Mod, class TuArch = simd::default_arch>
void check_forward(const dims_case& s, const Mod& mod, const clipped_softmax& clip, std::uint32_t seed,
                   const std::string& what) {
  const inputs in(s, seed);
  tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> lse({s.B, s.Hq, s.Lq}), want_lse({s.B, s.Hq, s.Lq});
  clipped_softmax_attention<float, Mod, TuArch>(cview(in.q), cview(in.k), cview(in.v), got.as_view(), lse.as_view(),
                                                clip, mod);
  reference_clipped_softmax_attention(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view(), clip, mod);
  const std::string tag = what + " zeta " + std::to_string(clip.zeta) + " gamma " + std::to_string(clip.gamma) + " " +
                          s.name();
  // A weight within f32 rounding of a clip threshold may land on either side of it: the error
  // of one such weight is |v| * (zeta - gamma) * ~1e-7, inside the tolerance.
  expect_close(got, want, 2e-5, 2e-4, tag + " out");
  expect_close(lse, want_lse, 2e-5, 1e-5, tag + " lse");
}

template <class Mod>
void check_forward_all(const Mod& mod, const std::string& what) {
  std::uint32_t seed = 10;
  for (const dims_case& s : shapes)
    for (const clipped_softmax& c : clips) check_forward(s, mod, c, seed++ * 3, what);
}

TEST(ClippedSoftmax, ForwardNoMask) { check_forward_all(mods::none{}, "none"); }
TEST(ClippedSoftmax, ForwardCausal) { check_forward_all(mods::causal{}, "causal"); }
TEST(ClippedSoftmax, ForwardWindow) { check_forward_all(mods::sliding_window{17}, "window 17"); }

TEST(ClippedSoftmax, ForwardSoftcapAlibiPrefix) {
  for (const dims_case& s : shapes) {
    const std::vector<float> slopes = mods::alibi_slopes(s.Hq);
    const auto mod = mods::all_of(mods::softcap{3.0f}, mods::alibi{view<const float, 1>(slopes.data(), {s.Hq})},
                                  mods::prefix_lm{10});
    check_forward(s, mod, clips[2], 40, "softcap+alibi+prefix_lm");
  }
}

TEST(ClippedSoftmax, ForwardDocument) {
  for (const dims_case& s : shapes) {
    if (s.Lq > s.Lk) continue;  // the document mask needs Lq <= Lk
    std::vector<std::int64_t> ids(static_cast<std::size_t>(s.Lk));
    for (std::int64_t j = 0; j < s.Lk; ++j) ids[static_cast<std::size_t>(j)] = j / 23;
    const mods::document doc{view<const std::int64_t, 1>(ids.data(), {s.Lk})};
    check_forward(s, mods::all_of(doc, mods::causal{}), clips[0], 50, "document+causal");
  }
}

TEST(ClippedSoftmax, ScalarLoops) {
  check_forward<mods::causal, simd::scalar_arch>({1, 4, 2, 37, 53, 40, 24}, mods::causal{}, clips[2], 60,
                                                 "scalar causal");
}

TEST(ClippedSoftmax, HalfKvThreadsInPlace) {
  const dims_case s{2, 4, 2, 67, 80, 32, 32};
  const inputs in(s, 70);
  tensor<bf16, 4> k16({s.B, s.Hkv, s.Lk, s.D}), v16({s.B, s.Hkv, s.Lk, s.Dv});
  tensor<float, 4> k_r({s.B, s.Hkv, s.Lk, s.D}), v_r({s.B, s.Hkv, s.Lk, s.Dv});
  for (std::int64_t n = 0; n < k16.size(); ++n) k_r.data()[n] = float(k16.data()[n] = bf16(in.k.data()[n]));
  for (std::int64_t n = 0; n < v16.size(); ++n) v_r.data()[n] = float(v16.data()[n] = bf16(in.v.data()[n]));
  tensor<float, 4> want({s.B, s.Hq, s.Lq, s.Dv}), t1({s.B, s.Hq, s.Lq, s.Dv}), t2({s.B, s.Hq, s.Lq, s.Dv});
  reference_clipped_softmax_attention(cview(in.q), k_r, v_r, want.as_view(), {}, clips[0], mods::causal{});
  clipped_softmax_attention(cview(in.q), k16, v16, t1.as_view(), {}, clips[0], mods::causal{}, {.threads = 1});
  clipped_softmax_attention(cview(in.q), k16, v16, t2.as_view(), {}, clips[0], mods::causal{}, {.threads = 2});
  expect_close(t1, want, 2e-5, 2e-4, "bf16 K/V");
  EXPECT_EQ(test::max_abs_diff(t1, t2), 0.0) << "results depend on the thread count";
  tensor<float, 4> q = in.q;  // D == Dv: out may be q itself
  clipped_softmax_attention(cview(q), k16, v16, q.as_view(), {}, clips[0], mods::causal{});
  expect_close(q, want, 2e-5, 2e-4, "in place");
}

// zeta = 1, gamma = 0 is ordinary softmax attention: against flash and against the softmax
// reference, out and lse.
TEST(ClippedSoftmax, IdentityClipIsSoftmaxAttention) {
  for (const dims_case& s : shapes) {
    const inputs in(s, 80);
    tensor<float, 4> got({s.B, s.Hq, s.Lq, s.Dv}), fl({s.B, s.Hq, s.Lq, s.Dv}), ref({s.B, s.Hq, s.Lq, s.Dv});
    tensor<float, 3> got_lse({s.B, s.Hq, s.Lq}), fl_lse({s.B, s.Hq, s.Lq}), ref_lse({s.B, s.Hq, s.Lq});
    clipped_softmax_attention(cview(in.q), in.k, in.v, got.as_view(), got_lse.as_view(), {}, mods::causal{});
    flash(cview(in.q), in.k, in.v, fl.as_view(), fl_lse.as_view(), mods::causal{});
    reference(cview(in.q), in.k, in.v, ref.as_view(), ref_lse.as_view(), mods::causal{});
    expect_close(got, fl, 1e-5, 1e-4, "vs flash " + s.name());
    expect_close(got, ref, 1e-5, 1e-4, "vs reference " + s.name());
    expect_close(got_lse, ref_lse, 1e-5, 1e-5, "lse vs reference " + s.name());
    tensor<float, 4> clipped_ref({s.B, s.Hq, s.Lq, s.Dv});
    reference_clipped_softmax_attention(cview(in.q), in.k, in.v, clipped_ref.as_view(), {}, {}, mods::causal{});
    expect_close(clipped_ref, ref, 1e-6, 1e-5, "clipped reference vs reference " + s.name());
  }
}

// The reference against a closed form: q = 0 makes every visible weight 1/n (n visible keys), so
// each is clip((zeta - gamma) / n + gamma, 0, 1) and out_i = that times the sum of the visible v.
TEST(ClippedSoftmax, ReferenceClosedForm) {
  const dims_case s{1, 1, 1, 12, 12, 4, 3};
  tensor<float, 4> q({s.B, s.Hq, s.Lq, s.D});
  std::fill(q.begin(), q.end(), 0.0f);
  const tensor<float, 4> k = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.D}, 1);
  const tensor<float, 4> v = random_tensor<float, 4>({s.B, s.Hkv, s.Lk, s.Dv}, 2);
  const clipped_softmax clip{1.2f, -0.5f};  // 1/n below 0.5/1.7 = 0.294 (n >= 4) is clipped to 0
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), fast({s.B, s.Hq, s.Lq, s.Dv});
  reference_clipped_softmax_attention(cview(q), k, v, out.as_view(), {}, clip, mods::causal{});
  clipped_softmax_attention(cview(q), k, v, fast.as_view(), {}, clip, mods::causal{});
  for (std::int64_t i = 0; i < s.Lq; ++i) {
    const double n = static_cast<double>(i + 1);
    const double w = std::clamp((1.2 + 0.5) / n - 0.5, 0.0, 1.0);
    for (std::int64_t c = 0; c < s.Dv; ++c) {
      double sum = 0;
      for (std::int64_t j = 0; j <= i; ++j) sum += v(0, 0, j, c);
      EXPECT_NEAR(out(0, 0, i, c), w * sum, 1e-6) << "row " << i;
      EXPECT_NEAR(fast(0, 0, i, c), w * sum, 1e-5) << "row " << i;
    }
  }
  EXPECT_EQ(out(0, 0, 5, 0), 0.0f);  // 1.7 / 6 - 0.5 < 0
}

// Lq > Lk under a causal mask: the first rows see nothing (out 0, lse -inf, no NaN).
TEST(ClippedSoftmax, EmptyRows) {
  const dims_case s{1, 2, 1, 80, 20, 16, 8};
  const inputs in(s, 90);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> lse({s.B, s.Hq, s.Lq});
  std::fill(out.begin(), out.end(), 7.0f);
  clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), clips[2], mods::causal{});
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Lq - s.Lk; ++i) {
      ASSERT_EQ(lse(0, h, i), -std::numeric_limits<float>::infinity());
      for (std::int64_t c = 0; c < s.Dv; ++c) ASSERT_EQ(out(0, h, i, c), 0.0f);
    }
  for (std::int64_t h = 0; h < s.Hq; ++h) EXPECT_TRUE(std::isfinite(lse(0, h, s.Lq - 1)));
}

// ---------------------------------------------------------------------------------------------
// Output gate.

TEST(OutputGate, MatchesReferenceAndClosedForm) {
  const std::int64_t B = 2, H = 3, L = 5, Dv = 7;
  const tensor<float, 4> x = random_tensor<float, 4>({B, H, L, Dv}, 1);
  tensor<float, 3> g = random_tensor<float, 3>({B, H, L}, 2, -6.0f, 6.0f);
  g(0, 0, 0) = -std::numeric_limits<float>::infinity();  // the head does nothing on this token
  g(0, 0, 1) = 100.0f;                                    // fully open
  g(1, 2, 4) = -100.0f;
  tensor<float, 4> fast = x, ref = x;
  output_gate(fast.as_view(), cview(g));
  reference_output_gate(ref.as_view(), cview(g));
  expect_close(fast, ref, 1e-7, 1e-6, "output_gate");
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t i = 0; i < L; ++i)
        for (std::int64_t c = 0; c < Dv; ++c) {
          const double want = x(b, h, i, c) / (1.0 + std::exp(-static_cast<double>(g(b, h, i))));
          EXPECT_NEAR(ref(b, h, i, c), want, 1e-7 + 1e-6 * std::abs(want));
        }
  for (std::int64_t c = 0; c < Dv; ++c) {
    EXPECT_EQ(fast(0, 0, 0, c), 0.0f);
    EXPECT_EQ(fast(0, 0, 1, c), x(0, 0, 1, c));
  }
}

// The gate after clipped softmax: the two fixes of the paper together (a head can output
// nothing through either).
TEST(OutputGate, AfterClippedSoftmax) {
  const dims_case s{1, 2, 1, 9, 9, 8, 8};
  const inputs in(s, 100);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv}), want({s.B, s.Hq, s.Lq, s.Dv});
  tensor<float, 3> g({s.B, s.Hq, s.Lq});
  std::fill(g.begin(), g.end(), 0.0f);  // sigmoid(0) = 1/2
  clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), {}, clips[0], mods::causal{});
  reference_clipped_softmax_attention(cview(in.q), in.k, in.v, want.as_view(), {}, clips[0], mods::causal{});
  output_gate(out.as_view(), cview(g));
  for (float& x : want) x *= 0.5f;
  expect_close(out, want, 2e-5, 2e-4, "gated clipped softmax");
}

// ---------------------------------------------------------------------------------------------
// Argument checks.

TEST(ClippedSoftmax, Errors) {
  const dims_case s{1, 4, 2, 8, 9, 16, 8};
  const inputs in(s, 500);
  tensor<float, 4> out({s.B, s.Hq, s.Lq, s.Dv});
  expect_error([&] { clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), {}, {0.5f, 0.0f}); },
               {"attention::clipped_softmax_attention", "clipped_softmax.zeta must be finite and >= 1", "0.5"});
  expect_error([&] { clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), {}, {1.0f, 0.25f}); },
               {"attention::clipped_softmax_attention", "clipped_softmax.gamma must be finite and <= 0", "0.25"});
  expect_error(
      [&] {
        reference_clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), {},
                                            {1.0f, -std::numeric_limits<float>::infinity()});
      },
      {"attention::reference_clipped_softmax_attention", "clipped_softmax.gamma", "inf"});
  const std::vector<float> sinks(4, 0.0f);
  const options with_sinks{.sinks = view<const float, 1>(sinks.data(), {4})};
  expect_error(
      [&] { clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), {}, {}, mods::none{}, with_sinks); },
      {"attention::clipped_softmax_attention", "options.sinks must be empty", "[4]"});
  tensor<float, 3> bad_lse({s.B, s.Hq, s.Lq + 1});
  expect_error([&] { clipped_softmax_attention(cview(in.q), in.k, in.v, out.as_view(), bad_lse.as_view()); },
               {"attention::clipped_softmax_attention", "lse", "[1, 4, 8]", "[1, 4, 9]"});
  const tensor<float, 4> v_bad({s.B, s.Hkv, s.Lk + 1, s.Dv});
  expect_error([&] { clipped_softmax_attention(cview(in.q), in.k, v_bad, out.as_view()); },
               {"attention::clipped_softmax_attention", "v", "[1, 2, 9, 8]", "[1, 2, 10, 8]"});

  tensor<float, 3> g_bad({s.B, s.Hq, s.Lq + 2});
  expect_error([&] { output_gate(out.as_view(), cview(g_bad)); },
               {"attention::output_gate", "gate_logits", "[1, 4, 8]", "[1, 4, 10]"});
  tensor<float, 1> flat({s.B * s.Hq * s.Lq * s.Dv});
  const view<float, 4> o4(flat.data(), {s.B, s.Hq, s.Lq, s.Dv});
  const view<const float, 3> g_alias(flat.data(), {s.B, s.Hq, s.Lq});
  expect_error([&] { reference_output_gate(o4, g_alias); },
               {"attention::reference_output_gate", "out", "gate_logits", "must not overlap"});
}

}  // namespace
}  // namespace mnemo::attention

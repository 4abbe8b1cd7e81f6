// Numerical extremes for every stable family: attention (reference / flash / decode), the linear
// family (every member of its table, linear::all_members, recurrent and chunked) and the memory
// modules.
//
// Documented behaviour checked here:
//  * finite inputs with extreme magnitudes (logits near +-1e4, huge and tiny scales, denormals,
//    f16 values at the top of its range) give the reference's answer, never inf or NaN that the
//    reference does not have;
//  * -inf mask biases remove keys; a row left with no key gives out = 0, lse = -inf, never NaN;
//  * gates at 0 (no decay) and -inf (full reset) are exact: a reset equals a fresh start;
//  * NaN in a data input propagates to (and only to) the outputs that depend on it, and never
//    crashes: on every attention path (reference, flash, and each path of split-KV decode) a row
//    that sees a NaN score is NaN in out and lse; in the linear family a NaN in k or v makes its
//    token and every later one NaN (the chunked form may also reach the earlier tokens of the
//    NaN's own chunk, linear/common.hpp); NaN in a gate, beta or learning rate is rejected with
//    mnemo::error.
// Expected values come from the double-precision references or from an identity of the maths
// (a reset equals a fresh start, a zero gate equals no gate, scaling q scales o).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include "mnemo/attention/attention.hpp"
#include "mnemo/linear/members.hpp"
#include "mnemo/memory/compressive.hpp"
#include "mnemo/memory/knn.hpp"
#include "mnemo/memory/neural_memory.hpp"
#include "mnemo/memory/product_keys.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
namespace att = mnemo::attention;
namespace lin = mnemo::linear;
namespace mem = mnemo::memory;

constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float nan = std::numeric_limits<float>::quiet_NaN();
constexpr float denormal = 1e-40f;  // below FLT_MIN = 1.18e-38
constexpr float f16_max = 65504.0f;

using mnemo::test::fill_uniform;

template <int R>
bool all_finite(const tensor<float, R>& t) {
  for (float x : t)
    if (!std::isfinite(x)) return false;
  return true;
}

// ------------------------------------------------------------------------------------------------
// Attention

// out and lse of reference, flash and decode for the same call.
struct attention_runs {
  tensor<float, 4> out[3];
  tensor<float, 3> lse[3];
};
constexpr const char* path_names[3] = {"reference", "flash", "decode"};

template <class KV, class Mod = att::mods::none>
attention_runs run_attention(const tensor<float, 4>& q, const tensor<KV, 4>& k, const tensor<KV, 4>& v,
                             const Mod& mod = {}, att::options opt = {}) {
  attention_runs r;
  const shape_t<4> os{q.extent(0), q.extent(1), q.extent(2), v.extent(3)};
  for (int p = 0; p < 3; ++p) {
    r.out[p] = tensor<float, 4>(os);
    r.lse[p] = tensor<float, 3>({os[0], os[1], os[2]});
    const att::path path[3] = {att::path::reference, att::path::flash, att::path::decode};
    att::attend<KV, Mod>(q, k, v, r.out[p], r.lse[p], mod, opt, path[p]);
  }
  return r;
}

// flash and decode agree with the reference within atol + rtol |ref| (inf == inf).
void expect_paths_agree(const attention_runs& r, double atol, double rtol) {
  for (int p = 1; p < 3; ++p) {
    SCOPED_TRACE(path_names[p]);
    for (std::int64_t i = 0; i < r.out[0].size(); ++i) {
      const float want = r.out[0].data()[i], got = r.out[p].data()[i];
      ASSERT_TRUE(std::isfinite(got)) << "out[" << i << "] = " << got << ", reference " << want;
      ASSERT_NEAR(got, want, atol + rtol * std::abs(want)) << "out[" << i << "]";
    }
    for (std::int64_t i = 0; i < r.lse[0].size(); ++i) {
      const float want = r.lse[0].data()[i], got = r.lse[p].data()[i];
      if (std::isinf(want)) {
        ASSERT_EQ(got, want) << "lse[" << i << "]";
        continue;
      }
      ASSERT_NEAR(got, want, atol + rtol * std::abs(want)) << "lse[" << i << "]";
    }
  }
}

struct attention_shape {
  std::int64_t B = 1, Hq = 4, Hkv = 2, Lq = 5, Lk = 37, D = 16, Dv = 12;
};

template <class KV = float>
void make_qkv(const attention_shape& s, tensor<float, 4>& q, tensor<KV, 4>& k, tensor<KV, 4>& v, float amp,
              std::uint32_t seed) {
  q = tensor<float, 4>({s.B, s.Hq, s.Lq, s.D});
  k = tensor<KV, 4>({s.B, s.Hkv, s.Lk, s.D});
  v = tensor<KV, 4>({s.B, s.Hkv, s.Lk, s.Dv});
  fill_uniform(q, -amp, amp, seed);
  fill_uniform(k, -amp, amp, seed + 1);
  fill_uniform(v, -1.0f, 1.0f, seed + 2);
}

TEST(AttentionExtremes, LogitsNearPlusMinus1e4) {
  // scale chosen so the largest |score| is 1e4: softmax is nearly one-hot, the exps span 1e4
  // nats; f32 scores carry ~1e4 * 2^-24 * D of rounding, so lse agrees to ~1e-2 absolute.
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 1);
  double max_dot = 0;
  for (std::int64_t h = 0; h < s.Hq; ++h)
    for (std::int64_t i = 0; i < s.Lq; ++i)
      for (std::int64_t j = 0; j < s.Lk; ++j) {
        double d = 0;
        for (std::int64_t c = 0; c < s.D; ++c) d += q(0, h, i, c) * k(0, h / 2, j, c);
        max_dot = std::max(max_dot, std::abs(d));
      }
  att::options opt;
  opt.scale = static_cast<float>(1e4 / max_dot);
  const auto r = run_attention<float>(q, k, v, att::mods::causal{}, opt);
  const float top = *std::max_element(r.lse[0].begin(), r.lse[0].end());
  EXPECT_GT(top, 1e3f) << "the test did not reach large logits";
  // out: a score error e moves the weights by ~e relative; near ties that is visible in out
  expect_paths_agree(r, 5e-2, 1e-5);
}

TEST(AttentionExtremes, TinyScaleIsUniformAverage) {
  // scale 1e-30: every score rounds to 0 relative to the others, softmax is uniform:
  // out = mean of v over the visible keys, lse = log(visible keys).
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 2);
  att::options opt;
  opt.scale = 1e-30f;
  const auto r = run_attention<float>(q, k, v, att::mods::none{}, opt);
  expect_paths_agree(r, 1e-6, 1e-5);
  for (std::int64_t c = 0; c < s.Dv; ++c) {
    double mean = 0;
    for (std::int64_t j = 0; j < s.Lk; ++j) mean += v(0, 0, j, c);
    EXPECT_NEAR(r.out[1](0, 0, 0, c), mean / s.Lk, 1e-6);
  }
  EXPECT_NEAR(r.lse[2](0, 1, 3), std::log(static_cast<double>(s.Lk)), 1e-6);
}

TEST(AttentionExtremes, HugeScaleWithinFloatRange) {
  // scale 1e6 on unit inputs: scores up to ~1e7, still f32; the argmax key dominates.
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 3);
  att::options opt;
  opt.scale = 1e6f;
  const auto r = run_attention<float>(q, k, v, att::mods::none{}, opt);
  // lse ~ max score ~ 1e7 with ~1 ulp * D of rounding; out is one v row unless two keys tie.
  expect_paths_agree(r, 1e-3, 1e-5);
}

TEST(AttentionExtremes, DenormalInputs) {
  // q and k denormal: every score is ~0 (uniform softmax); v denormal: out is denormal-sized.
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 4);
  for (auto& x : q) x *= denormal;
  for (auto& x : v) x *= denormal;
  const auto r = run_attention<float>(q, k, v, att::mods::causal{});
  expect_paths_agree(r, 1e-44, 1e-3);  // flush-to-zero would show as a 1e-40 error
  for (int p = 0; p < 3; ++p) EXPECT_TRUE(all_finite(r.lse[p]));
}

// A user score mod: an additive mask bias of -inf on odd keys and on every key of head 0,
// the way an engine passes a padding mask.
struct minus_inf_bias {
  template <class S>
  S score(S s, std::int64_t h, std::int64_t, std::int64_t kp) const {
    return h == 0 || kp % 2 == 1 ? -std::numeric_limits<S>::infinity() : s;
  }
};

TEST(AttentionExtremes, MinusInfMaskBias) {
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 5);
  const auto r = run_attention<float>(q, k, v, minus_inf_bias{});
  expect_paths_agree(r, 1e-5, 1e-5);
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(path_names[p]);
    for (std::int64_t i = 0; i < s.Lq; ++i) {
      EXPECT_EQ(r.lse[p](0, 0, i), -inf) << "head 0 sees no key";
      for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_EQ(r.out[p](0, 0, i, c), 0.0f);
    }
    EXPECT_TRUE(all_finite(r.out[p]));
  }
  // Head 1 equals attention over the even keys only, computed with the keys removed.
  const std::int64_t even = (s.Lk + 1) / 2;
  tensor<float, 4> ke({1, s.Hkv, even, s.D}), ve({1, s.Hkv, even, s.Dv});
  for (std::int64_t h = 0; h < s.Hkv; ++h)
    for (std::int64_t j = 0; j < even; ++j) {
      for (std::int64_t c = 0; c < s.D; ++c) ke(0, h, j, c) = k(0, h, 2 * j, c);
      for (std::int64_t c = 0; c < s.Dv; ++c) ve(0, h, j, c) = v(0, h, 2 * j, c);
    }
  tensor<float, 4> out({1, s.Hq, s.Lq, s.Dv});
  // Lk differs, so the positions shift; without a positional mod the result does not depend on them
  att::reference(q, ke, ve, out);
  for (std::int64_t i = 0; i < s.Lq; ++i)
    for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_NEAR(r.out[1](0, 1, i, c), out(0, 1, i, c), 1e-5);
}

TEST(AttentionExtremes, F16StorageAtTheTopOfItsRange) {
  // K and V in f16 at up to 65504 (f16's largest finite value): scores and outputs exceed f16
  // but not f32; the kernels convert on load and must agree with the reference on the same
  // rounded values.
  attention_shape s;
  tensor<float, 4> q;
  tensor<f16, 4> k, v;
  make_qkv(s, q, k, v, 1.0f, 6);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-f16_max, f16_max);
  for (auto& x : v) x = f16(u(rng));
  for (auto& x : k) x = f16(u(rng) * 1e-3f);  // scores ~ 65 * D * scale: large but not one-hot everywhere
  const auto r = run_attention<f16>(q, k, v, att::mods::causal{});
  expect_paths_agree(r, 1e-3 * f16_max * 1e-3, 2e-5);
  for (int p = 0; p < 3; ++p) EXPECT_TRUE(all_finite(r.out[p]));
}

TEST(AttentionExtremes, InfInF16StoragePropagatesOnlyWhereRead) {
  // f16(1e5) overflows to +inf in storage: a value of inf in kv head 1 makes the outputs of the
  // query heads reading it non-finite; kv head 0's query heads are untouched.
  attention_shape s;
  tensor<float, 4> q;
  tensor<f16, 4> k, v;
  make_qkv(s, q, k, v, 1.0f, 8);
  v(0, 1, 3, 2) = f16(1e5f);
  ASSERT_TRUE(std::isinf(to_float(v(0, 1, 3, 2))));
  const auto r = run_attention<f16>(q, k, v);
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(path_names[p]);
    for (std::int64_t h = 0; h < s.Hq; ++h)
      for (std::int64_t i = 0; i < s.Lq; ++i) {
        EXPECT_TRUE(std::isfinite(r.lse[p](0, h, i))) << "lse depends on k only";
        for (std::int64_t c = 0; c < s.Dv; ++c) {
          const float x = r.out[p](0, h, i, c);
          if (h / 2 == 0 || c != 2) {
            EXPECT_NEAR(x, r.out[0](0, h, i, c), 1e-5) << "h=" << h << " c=" << c;
          } else {
            EXPECT_FALSE(std::isfinite(x)) << "h=" << h << " c=" << c << ": inf in v must show";
          }
        }
      }
  }
}

// NaN inputs: a NaN score (NaN in q or k) makes its row NaN (out and lse) on every path, never a
// row that reads as fully masked (out = 0, lse = -inf) or as clean; attention::merge propagates a
// NaN part. Rows that do not see the NaN stay exact.

// True if out[b, h, i, :] or lse[b, h, i] holds a NaN.
bool row_has_nan(const tensor<float, 4>& out, const tensor<float, 3>& lse, std::int64_t b, std::int64_t h,
                 std::int64_t i) {
  bool any_nan = std::isnan(lse(b, h, i));
  for (std::int64_t c = 0; c < out.extent(3); ++c) any_nan = any_nan || std::isnan(out(b, h, i, c));
  return any_nan;
}

TEST(AttentionExtremes, NanInQueryPropagatesToItsRowOnly) {
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 9);
  q(0, 2, 1, 0) = nan;
  const auto r = run_attention<float>(q, k, v, att::mods::causal{});
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(path_names[p]);
    for (std::int64_t h = 0; h < s.Hq; ++h)
      for (std::int64_t i = 0; i < s.Lq; ++i) {
        if (h == 2 && i == 1) {
          EXPECT_TRUE(std::isnan(r.lse[p](0, h, i))) << "a NaN query must not give a clean-looking row";
          EXPECT_TRUE(std::isnan(r.out[p](0, h, i, 0)));
        } else {
          EXPECT_FALSE(row_has_nan(r.out[p], r.lse[p], 0, h, i)) << "h=" << h << " i=" << i;
          EXPECT_NEAR(r.out[p](0, h, i, 0), r.out[0](0, h, i, 0), 1e-5);
        }
      }
  }
}

TEST(AttentionExtremes, NanInKeysReachesEveryRowThatSeesIt) {
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 10);
  const std::int64_t j = s.Lk - 2;  // visible (causally) to the last two query rows only
  k(0, 0, j, 3) = nan;
  const auto r = run_attention<float>(q, k, v, att::mods::causal{});
  const std::int64_t offset = s.Lk - s.Lq;
  for (int p = 0; p < 3; ++p) {
    SCOPED_TRACE(path_names[p]);
    for (std::int64_t h = 0; h < s.Hq; ++h)
      for (std::int64_t i = 0; i < s.Lq; ++i) {
        const bool sees = h / 2 == 0 && i + offset >= j;
        EXPECT_EQ(row_has_nan(r.out[p], r.lse[p], 0, h, i), sees) << "h=" << h << " i=" << i;
        if (sees) {
          EXPECT_TRUE(std::isnan(r.lse[p](0, h, i))) << "h=" << h << " i=" << i;
        }
      }
  }
}

// Split-KV decode on every path of decode.hpp: one chunk and several (Lk past 2 * decode_chunk),
// GQA ratios 1 and 4, Lq 1 and 3, f32, f16 and bf16 K/V; NaN in a query row, in a key of a middle
// chunk, and in a query whose only visible keys (a sliding window) sit in the scalar tail of the
// last chunk, where the chunk maximum is -inf and the scores alone carry the NaN. Every poisoned
// row must be NaN in out and lse; every other row must equal the reference.
template <class KV>
void check_decode_nan(std::int64_t Hq, std::int64_t Hkv, std::int64_t Lq, std::int64_t Lk, std::uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << "Hq=" << Hq << " Hkv=" << Hkv << " Lq=" << Lq << " Lk=" << Lk);
  attention_shape s;
  s.Hq = Hq;
  s.Hkv = Hkv;
  s.Lq = Lq;
  s.Lk = Lk;
  s.D = 20;  // not a multiple of any batch width: the score pass's partial loads run too
  s.Dv = 9;
  const std::int64_t G = Hq / Hkv, offset = Lk - Lq;
  tensor<float, 4> q;
  tensor<KV, 4> k, v;
  make_qkv(s, q, k, v, 1.0f, seed);
  const std::int64_t jk = std::min<std::int64_t>(Lk / 2, att::decode_chunk + 7);  // middle chunk when split
  k(0, Hkv - 1, jk, 1) = KV(nan);  // every row of the last kv head's query heads sees it (causal)
  q(0, 0, Lq - 1, 2) = nan;        // one query row of head 0
  for (const bool windowed : {false, true}) {
    SCOPED_TRACE(windowed ? "sliding window of 3" : "causal");
    attention_runs r;
    // window 3: the key jk is visible to no row (jk <= Lk - 1 - 3), so only the NaN query shows
    if (windowed) r = run_attention<KV>(q, k, v, att::mods::sliding_window{3});
    else r = run_attention<KV>(q, k, v, att::mods::causal{});
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t i = 0; i < Lq; ++i) {
        const bool sees_k = !windowed && h / G == Hkv - 1 && jk <= i + offset;
        const bool poisoned = sees_k || (h == 0 && i == Lq - 1);
        for (int p = 0; p < 3; ++p) {
          SCOPED_TRACE(path_names[p]);
          if (poisoned) {
            EXPECT_TRUE(std::isnan(r.lse[p](0, h, i))) << "h=" << h << " i=" << i << ": lse " << r.lse[p](0, h, i);
            for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_TRUE(std::isnan(r.out[p](0, h, i, c))) << "c=" << c;
          } else {
            EXPECT_FALSE(row_has_nan(r.out[p], r.lse[p], 0, h, i)) << "h=" << h << " i=" << i;
            EXPECT_NEAR(r.lse[p](0, h, i), r.lse[0](0, h, i), 1e-4);
            for (std::int64_t c = 0; c < s.Dv; ++c) EXPECT_NEAR(r.out[p](0, h, i, c), r.out[0](0, h, i, c), 1e-5);
          }
        }
      }
  }
}

TEST(AttentionExtremes, NanPropagatesThroughEveryDecodePath) {
  const std::int64_t split = 2 * att::decode_chunk + 77;  // three chunks, the last one partial
  check_decode_nan<float>(4, 1, 1, 37, 20);    // one chunk, GQA 4, one row
  check_decode_nan<float>(2, 2, 3, split, 21);  // split chunks, no GQA, three rows
  check_decode_nan<f16>(4, 1, 3, split, 22);   // split, GQA 4, f16 K/V
  check_decode_nan<bf16>(4, 2, 1, split, 23);  // split, GQA 2, bf16 K/V
}

TEST(AttentionExtremes, NonFiniteScaleIsRejected) {
  attention_shape s;
  tensor<float, 4> q, k, v;
  make_qkv(s, q, k, v, 1.0f, 11);
  for (float bad : {inf, -inf, nan}) {
    att::options opt;
    opt.scale = bad;
    EXPECT_THROW(run_attention<float>(q, k, v, att::mods::none{}, opt), mnemo::error) << bad;
  }
}

// ------------------------------------------------------------------------------------------------
// Linear family

// The members come from the member table (linear::all_members); a test that needs some of them
// selects by the row's gate and beta, and leaves out rows with other inputs (their identities differ).
using lin::all_members;
using lin::gate_kind;
enum run_kind { reference_run, recurrent_run, chunked_run };

// A data-dependent gate (g or gk), checked at the boundary.
template <class M>
constexpr bool checked_gate = M::gate == gate_kind::scalar || M::gate == gate_kind::channel;
// One where -inf resets the state and 0 is no decay (not RWKV-7's: its rank-one term reads the
// state before the decay).
template <class M>
constexpr bool data_gate = checked_gate<M> && !M::other_inputs;

struct linear_case {
  std::int64_t B = 1, H = 2, L = 40, Dk = 8, Dv = 6;
  tensor<float, 4> q, k, v, g4;  // g4: GLA's, KDA's and RWKV-7's per-channel log-gates [B, H, L, Dk]
  tensor<float, 3> g, beta;      // [B, H, L]
  tensor<float, 1> gamma;        // [H]
  tensor<float, 4> a, b;         // RWKV-7's a = -kk, b = kk * iclr [B, H, L, Dk]
  lin::options opt;

  explicit linear_case(std::uint32_t seed)
      : q({B, H, L, Dk}), k({B, H, L, Dk}), v({B, H, L, Dv}), g4({B, H, L, Dk}), g({B, H, L}), beta({B, H, L}),
        gamma({H}), a({B, H, L, Dk}), b({B, H, L, Dk}) {
    fill_uniform(q, -1.0f, 1.0f, seed);
    fill_uniform(k, -1.0f, 1.0f, seed + 1);
    fill_uniform(v, -1.0f, 1.0f, seed + 2);
    fill_uniform(g4, -1.0f, 0.0f, seed + 3);
    fill_uniform(g, -1.0f, 0.0f, seed + 4);
    fill_uniform(beta, 0.0f, 1.0f, seed + 5);
    gamma(0) = 0.9f;
    gamma(1) = 1.0f;
    // kk a unit vector per token (from a's random values), iclr in [0, 1] (b's): a transition that
    // does not expand
    fill_uniform(a, -1.0f, 1.0f, seed + 6);
    fill_uniform(b, 0.0f, 1.0f, seed + 7);
    for (std::int64_t r = 0; r < B * H * L; ++r) {
      float* ar = a.data() + r * Dk;
      float* br = b.data() + r * Dk;
      double ss = 0;
      for (std::int64_t c = 0; c < Dk; ++c) ss += static_cast<double>(ar[c]) * ar[c];
      for (std::int64_t c = 0; c < Dk; ++c) {
        const float kk = static_cast<float>(ar[c] / std::sqrt(ss + 1e-12));
        ar[c] = -kk;
        br[c] *= kk;
      }
    }
    opt.use_qk_l2norm = true;  // keeps the delta rules contractive (rwkv7 rejects it: run() clears it)
    opt.chunk_size = 16;
    opt.threads = 1;  // concurrency has its own test; one thread keeps this one fast on a busy machine
  }

  // o [B, H, L, Dv] of member m on all tokens; the state, if given, in and out.
  template <class M>
  tensor<float, 4> run(M m, run_kind kind, view<float, 4> state = {}) const {
    tensor<float, 4> o({B, H, L, Dv});
    lin::options o_opt = opt;
    o_opt.path = kind == chunked_run ? lin::form::chunked : lin::form::recurrent;
    // RWKV-7 normalises its keys before forming a and b, and rejects the flag
    if constexpr (std::is_same_v<M, lin::members::rwkv7>) o_opt.use_qk_l2norm = false;
    const view<const float, 4> vq = q, vk = k, vv = v;
    const lin::member_inputs in{gamma, g, g4, beta, a, b};
    if (kind == reference_run)
      lin::reference_member(m, vq, vk, vv, in, o, state, o_opt);
    else
      lin::run_member(m, vq, vk, vv, in, o, state, o_opt);
    return o;
  }
};

void expect_close(const tensor<float, 4>& got, const tensor<float, 4>& want, double atol, double rtol,
                  const char* what) {
  ASSERT_EQ(got.shape(), want.shape());
  for (std::int64_t i = 0; i < got.size(); ++i) {
    const float a = got.data()[i], b = want.data()[i];
    ASSERT_TRUE(std::isfinite(a)) << what << "[" << i << "] = " << a;
    ASSERT_NEAR(a, b, atol + rtol * std::abs(b)) << what << "[" << i << "]";
  }
}

// Every form of every member agrees with its reference on this case.
void expect_forms_agree(const linear_case& c, double atol, double rtol) {
  all_members::for_each([&](auto m) {
    SCOPED_TRACE(m.name);
    const tensor<float, 4> want = c.run(m, reference_run);
    expect_close(c.run(m, recurrent_run), want, atol, rtol, "recurrent o");
    expect_close(c.run(m, chunked_run), want, atol, rtol, "chunked o");
  });
}

TEST(LinearExtremes, GatesAtMinusInfResetTheState) {
  // g = -inf at token t: decay exp(-inf) = 0, so outputs from t on equal a fresh start at t.
  linear_case c(20);
  const std::int64_t t = 23;
  for (std::int64_t b = 0; b < c.B; ++b)
    for (std::int64_t h = 0; h < c.H; ++h) {
      c.g(b, h, t) = -inf;
      for (std::int64_t i = 0; i < c.Dk; ++i) c.g4(b, h, t, i) = -inf;
    }
  linear_case tail(20);  // the same inputs from token t on, as a fresh sequence
  tail.L = c.L - t;
  auto cut = [&](const auto& full, auto& part) {
    part = std::remove_cvref_t<decltype(part)>(
        [&] { auto s = full.shape(); s[2] = tail.L; return s; }());
    for (std::int64_t i = 0; i < part.size(); ++i) {
      const std::int64_t inner = part.size() / (c.B * c.H * tail.L);
      const std::int64_t row = i / inner, col = i % inner, bh = row / tail.L, tt = row % tail.L;
      part.data()[i] = full.data()[(bh * c.L + t + tt) * inner + col];
    }
  };
  cut(c.q, tail.q);
  cut(c.k, tail.k);
  cut(c.v, tail.v);
  cut(c.g4, tail.g4);
  cut(c.g, tail.g);
  cut(c.beta, tail.beta);
  cut(c.a, tail.a);
  cut(c.b, tail.b);
  all_members::for_each([&](auto m) {
    if constexpr (data_gate<decltype(m)>) {  // simple_gla, gla, gated_delta_rule, kda
      SCOPED_TRACE(m.name);
      for (run_kind kind : {reference_run, recurrent_run, chunked_run}) {
        const tensor<float, 4> full = c.run(m, kind), fresh = tail.run(m, kind);
        for (std::int64_t b = 0; b < c.B; ++b)
          for (std::int64_t h = 0; h < c.H; ++h)
            for (std::int64_t tt = 0; tt < tail.L; ++tt)
              for (std::int64_t e = 0; e < c.Dv; ++e)
                ASSERT_NEAR(full(b, h, t + tt, e), fresh(b, h, tt, e), 2e-5) << "kind " << kind << " token " << t + tt;
      }
    }
  });
}

TEST(LinearExtremes, GatesAtZeroEqualNoDecay) {
  // g = 0 everywhere: simple_gla and GLA are linear attention; retention with gamma = 1 too.
  linear_case c(30);
  for (auto& x : c.g) x = 0.0f;
  for (auto& x : c.g4) x = 0.0f;
  c.gamma(0) = 1.0f;
  const tensor<float, 4> want = c.run(lin::members::linear_attn{}, reference_run);
  all_members::for_each([&](auto m) {
    using M = decltype(m);  // retention, simple_gla, gla: a gate and nothing else
    if constexpr (M::gate != gate_kind::none && !M::beta && !M::other_inputs)
      for (run_kind kind : {recurrent_run, chunked_run}) {
        SCOPED_TRACE(m.name);
        expect_close(c.run(m, kind), want, 1e-5, 1e-5, "o");
      }
  });
}

TEST(LinearExtremes, VeryStrongDecaysUnderflowCleanly) {
  // log-gates of -80 per step: decays of e^-80 ~ 1.8e-35 and their products underflow to 0
  // (and denormals) inside a chunk; the chunked form must not turn 0 * inf into NaN.
  linear_case c(40);
  for (auto& x : c.g) x = -80.0f;
  for (auto& x : c.g4) x = -80.0f;
  expect_forms_agree(c, 1e-5, 1e-4);
}

TEST(LinearExtremes, MixedZeroAndMinusInfGates) {
  linear_case c(50);
  for (std::int64_t i = 0; i < c.g.size(); ++i) c.g.data()[i] = i % 3 == 0 ? 0.0f : i % 3 == 1 ? -inf : -0.5f;
  for (std::int64_t i = 0; i < c.g4.size(); ++i) c.g4.data()[i] = i % 5 == 0 ? -inf : i % 5 == 1 ? 0.0f : -2.0f;
  expect_forms_agree(c, 1e-5, 1e-4);
}

TEST(LinearExtremes, DenormalInputs) {
  linear_case c(60);
  c.opt.use_qk_l2norm = false;  // keep the denormals as they are
  for (auto& x : c.v) x *= denormal;
  // o ~ q.k * v ~ 1e-40: compare with an absolute tolerance far below the values' size
  all_members::for_each([&](auto m) {
    SCOPED_TRACE(m.name);
    if (m.beta) return;  // the delta rules with unnormalised keys: not a contraction
    const tensor<float, 4> want = c.run(m, reference_run);
    expect_close(c.run(m, recurrent_run), want, 1e-44, 1e-3, "recurrent o");
    expect_close(c.run(m, chunked_run), want, 1e-44, 1e-3, "chunked o");
  });
}

TEST(LinearExtremes, HugeAndTinyScales) {
  // o is linear in the q scale for every member (the state does not depend on q).
  linear_case c(70);
  all_members::for_each([&](auto m) {
    SCOPED_TRACE(m.name);
    c.opt.scale = 1.0f;
    const tensor<float, 4> unit = c.run(m, reference_run);
    double top = 0;
    for (float x : unit) top = std::max(top, static_cast<double>(std::abs(x)));
    for (float scale : {1e-30f, 1e20f}) {
      c.opt.scale = scale;
      tensor<float, 4> want = unit;
      for (auto& x : want) x *= scale;
      // elements may be sums that cancel: the tolerance is relative to the largest output
      for (run_kind kind : {recurrent_run, chunked_run})
        expect_close(c.run(m, kind), want, 1e-5 * top * scale, 0, "o");
    }
  });
}

TEST(LinearExtremes, NanInQueryKeyOrValuePropagatesForwardOnly) {
  // The behaviour linear/common.hpp documents, for every member and form: a NaN in q_t reaches o_t
  // only (q never enters the state); a NaN in k_t or v_t enters the state, so o_t and every later
  // output of its head are NaN (no clean-looking row after it). Outputs before t stay exact in the
  // recurrent form and the reference; the chunked form keeps every chunk before t's exact and may
  // also make the earlier tokens of t's own chunk NaN (0 * NaN in its masked intra-chunk product).
  const linear_case clean(80);
  const std::int64_t t = 21, chunk_start = t / clean.opt.chunk_size * clean.opt.chunk_size;
  ASSERT_GT(t, chunk_start) << "the NaN must not open its chunk, or the same-chunk rows go untested";
  enum input { in_q, in_k, in_v };
  constexpr const char* input_names[] = {"q", "k", "v"};
  for (input where : {in_q, in_k, in_v}) {
    linear_case c = clean;
    if (where == in_q) c.q(0, 1, t, 2) = nan;
    if (where == in_k) c.k(0, 1, t, 2) = nan;
    if (where == in_v) c.v(0, 1, t, 2) = nan;
    all_members::for_each([&](auto m) {
      SCOPED_TRACE(::testing::Message() << m.name << ", NaN in " << input_names[where]);
      const tensor<float, 4> want = clean.run(m, reference_run);
      for (run_kind kind : {reference_run, recurrent_run, chunked_run}) {
        SCOPED_TRACE(::testing::Message() << "kind " << kind);
        const tensor<float, 4> o = c.run(m, kind);
        const std::int64_t exact_before = kind == chunked_run ? chunk_start : t;
        for (std::int64_t tt = 0; tt < c.L; ++tt) {
          bool any_nan = false;
          for (std::int64_t e = 0; e < c.Dv; ++e) any_nan = any_nan || std::isnan(o(0, 1, tt, e));
          const bool must_be_nan = tt == t || (tt > t && where != in_q);
          const bool may_be_nan = must_be_nan || (tt >= exact_before && tt < t && where != in_q);
          if (must_be_nan) {
            EXPECT_TRUE(any_nan) << "token " << tt << " must show the NaN of token " << t;
          } else if (!may_be_nan) {
            ASSERT_FALSE(any_nan) << "token " << tt << " does not depend on the NaN";
            for (std::int64_t e = 0; e < c.Dv; ++e)
              EXPECT_NEAR(o(0, 1, tt, e), want(0, 1, tt, e), 1e-5) << "token " << tt;
          }
          for (std::int64_t e = 0; e < c.Dv; ++e)
            EXPECT_NEAR(o(0, 0, tt, e), want(0, 0, tt, e), 1e-5) << "head 0 is clean, token " << tt;
        }
      }
    });
  }
}

TEST(LinearExtremes, NanOrPositiveGatesAreRejected) {
  linear_case c(90);
  for (float bad : {nan, 0.5f, inf}) {
    linear_case d = c;
    d.g(0, 1, 5) = bad;
    d.g4(0, 0, 7, 3) = bad;
    d.beta(0, 0, 2) = bad;
    all_members::for_each([&](auto m) {
      using M = decltype(m);  // simple_gla, gla, delta_rule, gated_delta_rule, kda, rwkv7: a checked g, gk or beta
      if constexpr (checked_gate<M> || M::beta) {
        SCOPED_TRACE(m.name);
        if (!checked_gate<M> && bad == 0.5f) return;  // 0.5 is a valid beta (delta_rule)
        EXPECT_THROW(d.run(m, chunked_run), mnemo::error) << bad;
        EXPECT_THROW(d.run(m, reference_run), mnemo::error) << bad;
      }
    });
  }
}

TEST(LinearExtremes, F16InputsAtTheTopOfTheirRange) {
  // q, k, v stored in f16 near 65504: products exceed f16 but the kernels compute in f32.
  const std::int64_t B = 1, H = 2, L = 20, D = 4;
  tensor<f16, 4> q({B, H, L, D}), k({B, H, L, D}), v({B, H, L, D});
  fill_uniform(q, -f16_max, f16_max, 95);
  fill_uniform(k, -f16_max, f16_max, 96);
  fill_uniform(v, -f16_max, f16_max, 97);
  tensor<float, 4> want({B, H, L, D});
  lin::options opt;
  lin::reference::linear_attn(q, k, v, want, {}, opt);
  double top = 0;
  for (float x : want) top = std::max(top, static_cast<double>(std::abs(x)));
  for (lin::form f : {lin::form::recurrent, lin::form::chunked}) {
    opt.path = f;
    tensor<float, 4> o({B, H, L, D});
    lin::linear_attn(q, k, v, o, {}, opt);
    expect_close(o, want, 1e-5 * top, 0, "o");
  }
}

// ------------------------------------------------------------------------------------------------
// Memory modules

TEST(MemoryExtremes, InfiniAttentionGateAtPlusMinusInfinity) {
  // beta = -inf: sigmoid 0, out is the local causal attention alone; beta = +inf: the memory
  // retrieval alone (0 in the first segment, when the memory is still empty). No NaN either way.
  const std::int64_t B = 1, H = 2, L = 12, Dk = 8, Dv = 4;
  tensor<float, 4> q({B, H, L, Dk}), k({B, H, L, Dk}), v({B, H, L, Dv});
  fill_uniform(q, -1, 1, 100);
  fill_uniform(k, -1, 1, 101);
  fill_uniform(v, -1, 1, 102);
  tensor<float, 1> beta({H});
  beta(0) = -inf;
  beta(1) = inf;
  mem::compressive_options opt;
  opt.segment_len = L;  // one segment: the memory is empty while it is read
  mem::compressive_state state(B, H, Dk, Dv);
  tensor<float, 4> out({B, H, L, Dv}), local({B, H, L, Dv});
  mem::infini_attention(q, k, v, beta, state, out, opt);
  att::reference(q, k, v, local, {}, att::mods::causal{});
  for (std::int64_t t = 0; t < L; ++t)
    for (std::int64_t e = 0; e < Dv; ++e) {
      EXPECT_NEAR(out(0, 0, t, e), local(0, 0, t, e), 1e-5);
      EXPECT_EQ(out(0, 1, t, e), 0.0f) << "an empty memory retrieves 0";
    }
  // A second segment reads a non-empty memory: still finite.
  mem::infini_attention(q, k, v, beta, state, out, opt);
  EXPECT_TRUE(all_finite(out));
}

TEST(MemoryExtremes, InfiniAttentionLargeLogitsAndNan) {
  const std::int64_t B = 1, H = 1, L = 16, Dk = 8, Dv = 4;
  tensor<float, 4> q({B, H, L, Dk}), k({B, H, L, Dk}), v({B, H, L, Dv});
  fill_uniform(q, -100, 100, 110);  // q.k / sqrt(8) up to ~3e4
  fill_uniform(k, -100, 100, 111);
  fill_uniform(v, -1, 1, 112);
  tensor<float, 1> beta({H});
  mem::compressive_options opt;
  opt.segment_len = 4;
  mem::compressive_state s_ref(B, H, Dk, Dv), s_fast(B, H, Dk, Dv);
  tensor<float, 4> want({B, H, L, Dv}), got({B, H, L, Dv});
  mem::reference::infini_attention(q, k, v, beta, s_ref, want, opt);
  mem::infini_attention(q, k, v, beta, s_fast, got, opt);
  expect_close(got, want, 1e-3, 1e-3, "out");
  // NaN in one key: no crash, and the segments before it are unaffected.
  k(0, 0, 9, 1) = nan;
  mem::compressive_state s_nan(B, H, Dk, Dv);
  mem::infini_attention(q, k, v, beta, s_nan, got, opt);
  for (std::int64_t t = 0; t < 8; ++t)
    for (std::int64_t e = 0; e < Dv; ++e) EXPECT_NEAR(got(0, 0, t, e), want(0, 0, t, e), 1e-3) << t;
}

TEST(MemoryExtremes, KnnEmptyMemoryAndExtremeQueries) {
  const std::int64_t B = 1, H = 1, D = 4, Dv = 3, cap = 8, Lq = 3, topk = 4;
  mem::knn_memory m(B, H, D, Dv, cap);
  tensor<float, 4> q({B, H, Lq, D}), out({B, H, Lq, Dv});
  tensor<float, 3> lse({B, H, Lq});
  fill_uniform(q, -1, 1, 120);
  mem::knn_attention(q, m, topk, out, lse);
  for (float x : lse) EXPECT_EQ(x, -inf) << "an empty memory gives lse = -inf";
  for (float x : out) EXPECT_EQ(x, 0.0f) << "an empty memory gives out = 0, not NaN";
  tensor<float, 4> k({B, H, 5, D}), v({B, H, 5, Dv});
  fill_uniform(k, -1e4, 1e4, 121);  // scores up to ~1e8
  fill_uniform(v, -1, 1, 122);
  m.add(k, v);
  tensor<float, 4> want({B, H, Lq, Dv});
  tensor<float, 3> want_lse({B, H, Lq});
  mem::reference::knn_attention(q, m, topk, want, want_lse);
  mem::knn_attention(q, m, topk, out, lse);
  expect_close(out, want, 1e-4, 1e-4, "out");
  q(0, 0, 1, 0) = nan;  // NaN query: no crash, other rows unaffected
  mem::knn_attention(q, m, topk, out, lse);
  for (std::int64_t e = 0; e < Dv; ++e) EXPECT_NEAR(out(0, 0, 0, e), want(0, 0, 0, e), 1e-4);
}

TEST(MemoryExtremes, NeuralMemoryZeroAndFullForgetting) {
  // theta = 0 (no learning) and alpha = 1 (forget everything): W stays 0, so with the residual
  // M(x) = x + mlp_0(x) = x exactly, whatever the keys and values.
  const std::int64_t B = 1, L = 6, D = 4;
  mem::mlp_shape shape{D, 8, 2};
  mem::neural_memory_state state(B, shape);
  tensor<float, 3> q({B, L, D}), k({B, L, D}), v({B, L, D}), y({B, L, D});
  fill_uniform(q, -1, 1, 130);
  fill_uniform(k, -1e4, 1e4, 131);
  fill_uniform(v, -1e4, 1e4, 132);
  tensor<float, 2> theta({B, L}), eta({B, L}), alpha({B, L});
  for (auto& x : alpha) x = 1.0f;
  mem::neural_memory(q, k, v, theta, eta, alpha, state, y);
  for (std::int64_t i = 0; i < y.size(); ++i) EXPECT_EQ(y.data()[i], q.data()[i]);
  // NaN in a learning rate is rejected; NaN in a key propagates into the weights without a crash.
  theta(0, 2) = nan;
  EXPECT_THROW(mem::neural_memory(q, k, v, theta, eta, alpha, state, y), mnemo::error);
  theta(0, 2) = 0.1f;
  alpha(0, 2) = 0.0f;
  k(0, 2, 1) = nan;
  mem::neural_memory(q, k, v, theta, eta, alpha, state, y);
  bool any_nan = false;
  for (std::int64_t t = 2; t < L; ++t)
    for (std::int64_t c = 0; c < D; ++c) any_nan = any_nan || std::isnan(y(0, t, c));
  EXPECT_TRUE(any_nan) << "a NaN key learned at token 2 must show from token 2 on";
  for (std::int64_t c = 0; c < D; ++c) EXPECT_EQ(y(0, 0, c), q(0, 0, c)) << "token 0 is before the NaN";
}

TEST(MemoryExtremes, ProductKeysHugeScoresAndNanQuery) {
  const std::int64_t N = 3, heads = 2, k_dim = 8, n_keys = 6, v_dim = 5, knn = 4;
  tensor<float, 3> query({N, heads, k_dim});
  tensor<float, 4> keys({heads, 2, n_keys, k_dim / 2});
  tensor<float, 2> values({n_keys * n_keys, v_dim}), out({N, v_dim}), want({N, v_dim});
  tensor<std::int64_t, 3> idx({N, heads, knn}), want_idx({N, heads, knn});
  tensor<float, 3> w({N, heads, knn}), want_w({N, heads, knn});
  fill_uniform(query, -1e3, 1e3, 140);  // sub-key scores up to ~4e6
  fill_uniform(keys, -1e3, 1e3, 141);
  fill_uniform(values, -1, 1, 142);
  mem::reference::pkm_forward(query, keys, values, knn, want, want_idx, want_w);
  mem::pkm_forward(query, keys, values, knn, out, idx, w);
  tensor<float, 4> out4({1, 1, N, v_dim}), want4({1, 1, N, v_dim});
  std::copy(out.begin(), out.end(), out4.begin());
  std::copy(want.begin(), want.end(), want4.begin());
  expect_close(out4, want4, 1e-4, 1e-4, "out");
  query(1, 0, 2) = nan;  // NaN query row: no crash, indices stay in range, other rows unaffected
  mem::pkm_forward(query, keys, values, knn, out, idx, w);
  for (std::int64_t x : idx) {
    EXPECT_GE(x, 0);
    EXPECT_LT(x, n_keys * n_keys);
  }
  for (std::int64_t e = 0; e < v_dim; ++e) EXPECT_NEAR(out(0, e), want(0, e), 1e-4);
}

}  // namespace

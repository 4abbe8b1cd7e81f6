// Long sequences and 64-bit index arithmetic.
//
//  * Split-KV decode against a cache of 1,048,576 tokens (D = 8, f16 K/V: 16 MiB each): agrees
//    with the reference, finds a planted needle, and is bit-identical across thread counts.
//  * The linear family after 1,048,576 tokens (chunked prefill, then one *_step): agrees with the
//    double-precision recurrence over the same tokens.
//  * Element offsets past 2^31: K/V and q views whose head stride is 2^31 + 64 elements, over a
//    sparse anonymous mapping (MAP_NORESERVE) of which only the touched rows get pages: attention
//    and the linear family read them exactly as a compact copy. An int32 offset anywhere would
//    wrap and read the wrong (unmapped or zero) page.
//
// Under AddressSanitizer (Debug -O1) the 1M-token cases take minutes of instrumented loops, so
// they skip there (see long_enabled below); the >2^31 offset cases run in every build.
#include <gtest/gtest.h>
#include <sys/mman.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/attention/attention.hpp"
#include "mnemo/linear/gated_delta_rule.hpp"
#include "mnemo/linear/simple_gla.hpp"
#include "support/support.hpp"

#if defined(__SANITIZE_ADDRESS__)
#define MNEMO_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MNEMO_TEST_ASAN 1
#endif
#endif

namespace {

using namespace mnemo;
namespace att = mnemo::attention;
namespace lin = mnemo::linear;

constexpr std::int64_t million = std::int64_t{1} << 20;  // 1,048,576 tokens

#if defined(MNEMO_TEST_ASAN)
constexpr bool long_enabled = false;
#else
constexpr bool long_enabled = true;
#endif
#define MNEMO_SKIP_LONG_UNDER_ASAN()                                                                      \
  if (!long_enabled)                                                                                      \
  GTEST_SKIP() << "1M-token case skipped under AddressSanitizer: minutes of instrumented loops; it runs " \
                  "in the Release builds"

using mnemo::test::fill_uniform;

TEST(LongSequence, DecodeOverAMillionCachedTokens) {
  MNEMO_SKIP_LONG_UNDER_ASAN();
  const std::int64_t B = 1, Hkv = 1, Hq = 2, Lq = 1, Lk = million, D = 8, Dv = 8;
  tensor<float, 4> q({B, Hq, Lq, D});
  tensor<f16, 4> k({B, Hkv, Lk, D}), v({B, Hkv, Lk, Dv});
  fill_uniform(q, -1, 1, 1);
  fill_uniform(k, -1, 1, 2);
  fill_uniform(v, -1, 1, 3);
  // A needle at position 1,000,003: its key is 40 x head 0's query, so its score (scale 1/sqrt(8))
  // beats the ~1M others by > 14 nats in head 0.
  const std::int64_t needle = 1000003;
  for (std::int64_t c = 0; c < D; ++c) k(0, 0, needle, c) = f16(40.0f * q(0, 0, 0, c) / 1.0f);
  for (std::int64_t c = 0; c < Dv; ++c) v(0, 0, needle, c) = f16(c % 2 ? 0.75f : -0.5f);

  tensor<float, 4> want({B, Hq, Lq, Dv});
  tensor<float, 3> want_lse({B, Hq, Lq});
  att::reference(q, k, v, want, want_lse);
  tensor<float, 4> got[2] = {tensor<float, 4>({B, Hq, Lq, Dv}), tensor<float, 4>({B, Hq, Lq, Dv})};
  tensor<float, 3> lse[2] = {tensor<float, 3>({B, Hq, Lq}), tensor<float, 3>({B, Hq, Lq})};
  for (int t = 0; t < 2; ++t) att::decode(q, k, v, got[t], lse[t], att::mods::causal{}, {.threads = t + 1});
  for (std::int64_t h = 0; h < Hq; ++h) {
    EXPECT_NEAR(lse[0](0, h, 0), want_lse(0, h, 0), 1e-4 * std::abs(want_lse(0, h, 0)));
    for (std::int64_t c = 0; c < Dv; ++c) {
      EXPECT_NEAR(got[0](0, h, 0, c), want(0, h, 0, c), 1e-4) << "h=" << h << " c=" << c;
      EXPECT_EQ(got[0](0, h, 0, c), got[1](0, h, 0, c)) << "1 vs 2 threads must be bit-identical";
    }
  }
  for (std::int64_t c = 0; c < Dv; ++c) EXPECT_NEAR(got[0](0, 0, 0, c), c % 2 ? 0.75f : -0.5f, 1e-3) << "needle";
  // A sliding window of 1000 keys at the end of the million: only the last chunks are read.
  tensor<float, 4> win({B, Hq, Lq, Dv}), win_want({B, Hq, Lq, Dv});
  att::decode(q, k, v, win, {}, att::mods::sliding_window{1000});
  att::reference(q, k, v, win_want, {}, att::mods::sliding_window{1000});
  for (std::int64_t i = 0; i < win.size(); ++i) EXPECT_NEAR(win.data()[i], win_want.data()[i], 1e-5);
}

TEST(LongSequence, LinearStepAfterAMillionTokens) {
  MNEMO_SKIP_LONG_UNDER_ASAN();
  constexpr std::int64_t B = 1, H = 1, L = million, Dk = 4, Dv = 4;
  tensor<float, 4> q({B, H, L + 1, Dk}), k({B, H, L + 1, Dk}), v({B, H, L + 1, Dv});
  tensor<float, 3> g({B, H, L + 1}), beta({B, H, L + 1});
  fill_uniform(q, -1, 1, 10);
  fill_uniform(k, -1, 1, 11);
  fill_uniform(v, -1, 1, 12);
  fill_uniform(g, -0.05f, 0.0f, 13);
  fill_uniform(beta, 0.0f, 1.0f, 14);
  lin::options opt;
  opt.use_qk_l2norm = true;
  const view<const float, 4> prefix_q = cview(q).narrow(2, 0, L), prefix_k = cview(k).narrow(2, 0, L),
                             prefix_v = cview(v).narrow(2, 0, L);
  const view<const float, 3> prefix_g = cview(g).narrow(2, 0, L), prefix_beta = cview(beta).narrow(2, 0, L);
  // The last token as a step: [B, H, D] views of token L.
  const view<const float, 3> step_q(q.data() + L * Dk, {B, H, Dk}, {H * (L + 1) * Dk, (L + 1) * Dk, 1});
  const view<const float, 3> step_k(k.data() + L * Dk, {B, H, Dk}, {H * (L + 1) * Dk, (L + 1) * Dk, 1});
  const view<const float, 3> step_v(v.data() + L * Dv, {B, H, Dv}, {H * (L + 1) * Dv, (L + 1) * Dv, 1});
  // [B, H] gates of token L: the head stride of a [B, H, L + 1] tensor is not 1, and the
  // innermost dimension of a view must be contiguous; with H = 1 any stride reads the same cell.
  static_assert(H == 1, "the step gate views below rely on a single head");
  const view<const float, 2> step_g(g.data() + L, {B, H}, {H * (L + 1), 1});
  const view<const float, 2> step_beta(beta.data() + L, {B, H}, {H * (L + 1), 1});

  for (int member = 0; member < 2; ++member) {
    SCOPED_TRACE(member == 0 ? "simple_gla" : "gated_delta_rule");
    tensor<float, 4> state({B, H, Dk, Dv}), ref_state({B, H, Dk, Dv});
    tensor<float, 4> o({B, H, L, Dv}), ref_o({B, H, L, Dv});
    tensor<float, 3> o_step({B, H, Dv});
    tensor<float, 4> ref_step({B, H, 1, Dv});
    lin::options chunked = opt;
    chunked.path = lin::form::chunked;
    if (member == 0) {
      lin::simple_gla(prefix_q, prefix_k, prefix_v, prefix_g, o, state, chunked);
      lin::simple_gla_step(step_q, step_k, step_v, step_g, o_step, state, opt);
      lin::reference::simple_gla(prefix_q, prefix_k, prefix_v, prefix_g, ref_o, ref_state, opt);
      lin::reference::simple_gla(cview(q).narrow(2, L, 1), cview(k).narrow(2, L, 1), cview(v).narrow(2, L, 1),
                                 cview(g).narrow(2, L, 1), ref_step, ref_state, opt);
    } else {
      lin::gated_delta_rule(prefix_q, prefix_k, prefix_v, prefix_g, prefix_beta, o, state, chunked);
      lin::gated_delta_rule_step(step_q, step_k, step_v, step_g, step_beta, o_step, state, opt);
      lin::reference::gated_delta_rule(prefix_q, prefix_k, prefix_v, prefix_g, prefix_beta, ref_o, ref_state, opt);
      lin::reference::gated_delta_rule(cview(q).narrow(2, L, 1), cview(k).narrow(2, L, 1), cview(v).narrow(2, L, 1),
                                       cview(g).narrow(2, L, 1), cview(beta).narrow(2, L, 1), ref_step, ref_state, opt);
    }
    // f32 rounding does not accumulate over the million tokens: the decays (and the delta rule's
    // contraction) forget it at the rate they forget the inputs.
    double worst = 0;
    for (std::int64_t i = 0; i < o.size(); ++i) worst = std::max(worst, std::abs(double(o.data()[i]) - ref_o.data()[i]));
    EXPECT_LT(worst, 1e-4) << "largest prefill error over 1M tokens";
    for (std::int64_t c = 0; c < Dv; ++c) EXPECT_NEAR(o_step(0, 0, c), ref_step(0, 0, 0, c), 1e-4) << "step " << c;
    for (std::int64_t i = 0; i < state.size(); ++i) EXPECT_NEAR(state.data()[i], ref_state.data()[i], 1e-4);
  }
}

// ------------------------------------------------------------------------------------------------
// Offsets past 2^31 elements.

// A sparse anonymous mapping: only the pages written get memory.
class sparse_region {
 public:
  explicit sparse_region(std::size_t bytes) : bytes_(bytes) {
    void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    base_ = p == MAP_FAILED ? nullptr : static_cast<float*>(p);
  }
  ~sparse_region() {
    if (base_) ::munmap(base_, bytes_);
  }
  sparse_region(const sparse_region&) = delete;
  sparse_region& operator=(const sparse_region&) = delete;
  float* data() const { return base_; }

 private:
  float* base_ = nullptr;
  std::size_t bytes_;
};

constexpr std::int64_t big_stride = (std::int64_t{1} << 31) + 64;  // elements: > INT32_MAX

TEST(LargeOffsets, ViewArithmeticIsSixtyFourBit) {
  float* base = nullptr;
  const view<float, 4> v(base, {2, 3, 5, 7}, {3 * big_stride, big_stride, 7, 1});
  EXPECT_EQ(v.ptr(1, 2, 4, 6) - base, 3 * big_stride + 2 * big_stride + 4 * 7 + 6);
  EXPECT_GT(v.ptr(1, 2, 4, 6) - base, std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(v[1][2].data() - base, 5 * big_stride);
  EXPECT_EQ(v.narrow(1, 2, 1).data() - base, 2 * big_stride);
}

// q, k, v [1, 2, L, D] with head 1 at element offset big_stride: attention (reference, flash,
// decode) and the linear family (chunked) over them equal the same calls on compact copies.
TEST(LargeOffsets, KernelsReadHeadsPastTwoToTheThirtyOne) {
  const std::int64_t H = 2, L = 9, D = 8;
  // Head 0 of q, k, v at elements [0, 3 L D), head 1 of each at big_stride + the same: about
  // 8 GiB of address space, of which 2 pages get memory.
  const std::size_t bytes = static_cast<std::size_t>(big_stride + 3 * L * D) * sizeof(float);
  sparse_region region(bytes);
  if (!region.data()) GTEST_SKIP() << "could not map " << bytes << " bytes of address space (MAP_NORESERVE)";
  float* base = region.data();
  const shape_t<4> shape{1, H, L, D}, strides{H * big_stride, big_stride, D, 1};
  const view<float, 4> q(base, shape, strides), k(base + L * D, shape, strides), v(base + 2 * L * D, shape, strides);
  tensor<float, 4> cq({1, H, L, D}), ck({1, H, L, D}), cv({1, H, L, D});
  fill_uniform(cq, -1, 1, 20);
  fill_uniform(ck, -1, 1, 21);
  fill_uniform(cv, -1, 1, 22);
  for (std::int64_t h = 0; h < H; ++h)
    for (std::int64_t t = 0; t < L; ++t)
      for (std::int64_t c = 0; c < D; ++c) {
        q(0, h, t, c) = cq(0, h, t, c);
        k(0, h, t, c) = ck(0, h, t, c);
        v(0, h, t, c) = cv(0, h, t, c);
      }
  ASSERT_GT(k.ptr(0, 1, L - 1, D - 1) - base, std::numeric_limits<std::int32_t>::max());

  tensor<float, 4> want({1, H, L, D}), got({1, H, L, D});
  att::reference(cq, ck, cv, want, {}, att::mods::causal{});
  const view<const float, 4> sq = q, sk = k, sv = v;
  for (att::path p : {att::path::reference, att::path::flash, att::path::decode}) {
    att::attend<float>(sq, sk, sv, got, {}, att::mods::causal{}, {}, p);
    for (std::int64_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got.data()[i], want.data()[i], 1e-5) << int(p);
  }
  tensor<float, 3> g({1, H, L});
  fill_uniform(g, -0.5f, 0.0f, 23);
  lin::options opt;
  opt.path = lin::form::chunked;
  opt.chunk_size = 4;
  lin::reference::simple_gla(cview(cq), cview(ck), cview(cv), cview(g), want, {}, opt);
  lin::simple_gla(sq, sk, sv, cview(g), got, {}, opt);
  for (std::int64_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got.data()[i], want.data()[i], 1e-5) << "simple_gla";
}

}  // namespace

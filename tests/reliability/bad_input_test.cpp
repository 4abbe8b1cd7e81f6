// Regression tests of the bad-input audit of issue 16: one test per defect (the number in the test
// name), each of which failed before its fix. Inputs that are bad must give mnemo::error naming the
// argument; edge inputs that are valid (empty heads, zero sizes, huge windows, huge thread counts)
// must work. The aliasing rule checked here is stated in docs/errors.md.
//
// EmptyKvHead (defect 2) failed on the bounds assertion of view::ptr, so only in Debug builds.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "mnemo/attention/attention.hpp"
#include "mnemo/attention/sparse.hpp"
#include "mnemo/attention/topk.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/decode.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"
#include "mnemo/kvcache/policies/tova.hpp"
#include "mnemo/kvcache/selection.hpp"
#include "mnemo/linear/linear_attn.hpp"
#include "mnemo/linear/simple_gla.hpp"
#include "support/support.hpp"

namespace {

using namespace mnemo;
namespace att = mnemo::attention;
namespace kv = mnemo::kvcache;
namespace lin = mnemo::linear;
using mnemo::test::expect_close;
using mnemo::test::expect_error;
using mnemo::test::random_tensor;

constexpr std::int64_t int64_max = std::numeric_limits<std::int64_t>::max();
constexpr float neg_inf = -std::numeric_limits<float>::infinity();

// q, k, v of one attention call.
struct qkv {
  tensor<float, 4> q, k, v;
  qkv(std::int64_t B, std::int64_t Hq, std::int64_t Hkv, std::int64_t Lq, std::int64_t Lk, std::int64_t D,
      std::int64_t Dv, std::uint32_t seed)
      : q(random_tensor<float, 4>({B, Hq, Lq, D}, seed)),
        k(random_tensor<float, 4>({B, Hkv, Lk, D}, seed + 1)),
        v(random_tensor<float, 4>({B, Hkv, Lk, Dv}, seed + 2)) {}
  shape_t<4> out_shape() const { return {q.extent(0), q.extent(1), q.extent(2), v.extent(3)}; }
  shape_t<3> lse_shape() const { return {q.extent(0), q.extent(1), q.extent(2)}; }
};

const att::path all_paths[] = {att::path::reference, att::path::flash, att::path::decode};

// ------------------------------------------------------------------------------------------------
// 1. flash with column sums and out aliasing q: rejected (the sums re-read q after out is written).

TEST(Issue16, D01_ColumnSumsWithOutAliasingQThrows) {
  const qkv in(1, 2, 2, 12, 12, 16, 16, 1);
  tensor<float, 4> buffer = in.q;  // q and out in one buffer, in place
  tensor<float, 3> sums({1, 2, 12});
  const att::column_sums cs{sums.as_view(), 0};
  expect_error([&] { att::flash(cview(buffer), in.k, in.v, buffer.as_view(), {}, att::mods::causal{}, {}, cs); },
               {"attention::flash", "out [1, 2, 12, 16] and q [1, 2, 12, 16] must not overlap", "column_sums"});
  expect_error([&] { att::reference(cview(buffer), in.k, in.v, buffer.as_view(), {}, att::mods::causal{}, {}, cs); },
               {"attention::reference", "out", "q", "column_sums"});
  expect_error([&] { att::decode(cview(buffer), in.k, in.v, buffer.as_view(), {}, att::mods::causal{}, {}, cs); },
               {"attention::decode", "out", "q", "column_sums"});
  // The sums themselves overlap nothing either.
  tensor<float, 4> out(in.out_shape());
  const view<float, 3> sums_in_out(out.data(), {1, 2, 12});
  expect_error([&] { att::flash(cview(in.q), in.k, in.v, out.as_view(), {}, att::mods::causal{}, {}, {sums_in_out, 0}); },
               {"attention::flash", "column_sums.sums [1, 2, 12] and out", "must not overlap"});
}

// ------------------------------------------------------------------------------------------------
// 2. A kv head with no slot (AdaKV with alpha 0 can make one): empty selections, no assertion.

TEST(Issue16, D02_EmptyKvHeadGivesEmptySelection) {
  float unused = 0;
  const kv::selection top = kv::top_budget(view<const float, 2>(&unused, {2, 0}), 3);
  ASSERT_EQ(top.num_heads(), 2);
  EXPECT_EQ(top.kept(0), 0);
  EXPECT_EQ(top.kept(1), 0);

  // h2o: head 0 empty, head 1 with three slots.
  kv::policies::h2o::decoder h2o(2, 1);
  for (int j = 0; j < 3; ++j) h2o.append(1);
  tensor<float, 2> probs({2, 3});
  probs(1, 0) = 0.5f, probs(1, 1) = 0.2f, probs(1, 2) = 0.3f;
  h2o.observe(probs);
  const kv::selection a = h2o.select(2);
  ASSERT_EQ(a.num_heads(), 2);
  EXPECT_EQ(a.kept(0), 0);
  EXPECT_EQ(a.heads[1], (std::vector<std::int64_t>{0, 2}));  // the recent slot 2 and the top score 0

  // tova: every head empty (the same slots in every head is TOVA's rule).
  kv::policies::tova::decoder tova(2);
  tova.observe(tensor<float, 2>({2, 0}));
  const kv::selection b = tova.select(4);
  ASSERT_EQ(b.num_heads(), 2);
  EXPECT_EQ(b.kept(0), 0);
  EXPECT_EQ(b.kept(1), 0);
}

// ------------------------------------------------------------------------------------------------
// 3. Sizes that overflow, and allocations that fail, throw instead of leaving a null buffer.

TEST(Issue16, D03_OverflowingTensorSizeThrows) {
  constexpr std::int64_t two31 = std::int64_t{1} << 31, two62 = std::int64_t{1} << 62;
  expect_error([] { tensor<float, 2> t({two31, two31}); },
               {"tensor: shape [2147483648, 2147483648] of 4-byte elements", "2^63 bytes"});
  expect_error([] { tensor<float, 3> t({0, two62, 4}); }, {"tensor: shape [0, 4611686018427387904, 4]"});
  expect_error([] { kv::layer_cache c({.kind = kv::storage::f32, .Hkv = 1, .capacity = two62, .D = 8}); },
               {"kvcache::layer_cache: config (Hkv = 1, capacity = 4611686018427387904, D = 8, Dv = 8, f32)",
                "cannot be allocated"});
  expect_error([] { kv::layer_cache c({.kind = kv::storage::int4, .Hkv = 2, .capacity = two62, .D = 8}); },
               {"kvcache::layer_cache", "capacity = 4611686018427387904", "int4"});
}

TEST(Issue16, D03_FailedAllocationThrows) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "AddressSanitizer aborts on an allocation this size instead of throwing std::bad_alloc";
#endif
  constexpr std::int64_t huge = std::int64_t{1} << 60;  // 1 EiB: more than any address space
  expect_error([] { tensor<std::uint8_t, 1> t({huge}); },
               {"tensor: cannot allocate 1152921504606846976 bytes for shape [1152921504606846976]"});
  expect_error([] { kv::layer_cache c({.kind = kv::storage::f16, .Hkv = 1, .capacity = huge / 64, .D = 16}); },
               {"kvcache::layer_cache", "cannot be allocated", "tensor: cannot allocate"});
}

// ------------------------------------------------------------------------------------------------
// 4. view::narrow with a range whose end overflows.

TEST(Issue16, D04_NarrowOverflowThrows) {
  float buf[4] = {};
  const view<float, 1> v(buf, {4});
  expect_error([&] { (void)v.narrow(0, 2, int64_max - 1); },
               {"view::narrow: range start 2 + len 9223372036854775806 overflows", "extent 4 of dimension 0"});
  expect_error([&] { (void)v.narrow(0, int64_max, 1); }, {"view::narrow: range start 9223372036854775807 + len 1"});
  expect_error([&] { (void)v.narrow(0, 3, 2); }, {"view::narrow: range [3, 5) out of bounds for extent 4"});
  EXPECT_EQ(v.narrow(0, 1, 3).extent(0), 3);
  EXPECT_EQ(v.narrow(0, 4, 0).extent(0), 0);
}

// ------------------------------------------------------------------------------------------------
// 5. A huge sliding window is no window: every path agrees with causal, also with Lq > Lk (query
// rows at negative positions).

TEST(Issue16, D05_HugeSlidingWindowIsCausal) {
  const att::mods::sliding_window huge{int64_max};
  for (const auto& [Lq, Lk] : {std::pair<std::int64_t, std::int64_t>{12, 8}, {5, 40}, {16, 16}}) {
    SCOPED_TRACE("Lq=" + std::to_string(Lq) + " Lk=" + std::to_string(Lk));
    const qkv in(1, 4, 2, Lq, Lk, 16, 8, 5);
    tensor<float, 4> want(in.out_shape());
    tensor<float, 3> want_lse(in.lse_shape());
    att::reference(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view(), att::mods::causal{});
    for (att::path p : all_paths) {
      SCOPED_TRACE(static_cast<int>(p));
      tensor<float, 4> out(in.out_shape());
      tensor<float, 3> lse(in.lse_shape());
      att::attend(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), huge, {}, p);
      expect_close(out, want, 1e-5, 1e-4, "out");
      expect_close(lse, want_lse, 1e-5, 1e-4, "lse");
    }
  }
  // Prefill rows over several tiles (flash), and the sparse kernels' bulk window masker.
  const std::int64_t L = 150;
  const qkv in(1, 2, 2, L, L, 16, 16, 6);
  tensor<float, 4> want(in.out_shape()), out(in.out_shape());
  tensor<float, 3> want_lse(in.lse_shape()), lse(in.lse_shape());
  att::reference(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view(), att::mods::causal{});
  att::flash(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), huge);
  expect_close(out, want, 1e-5, 1e-4, "flash out");
  const att::sparse::block_layout layout = att::sparse::layout_of(huge, L, 16, 16);
  att::flash(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), att::sparse::block_sparse{&layout, huge});
  expect_close(out, want, 1e-5, 1e-4, "flash, block_sparse window out");
  expect_close(lse, want_lse, 1e-5, 1e-4, "flash, block_sparse window lse");
  att::sparse::attention(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), att::sparse::block_sparse{&layout, huge});
  expect_close(out, want, 1e-5, 1e-4, "sparse::attention, window out");
}

// ------------------------------------------------------------------------------------------------
// 6. Finite inputs whose scores are finite but whose f32 dot products overflow on the way.

// Whether every element of t is finite.
template <class T>
bool all_finite(const T& t) {
  return std::all_of(t.data(), t.data() + t.size(), [](float x) { return std::isfinite(x); });
}

TEST(Issue16, D06_OverflowingDotProductsGiveFiniteResults) {
  // q = 1e19 everywhere, every key the same +-3e19 pattern: each product is 3e38 (finite), the
  // true scores are all 0 (out = mean of v, lse = ln Lk), but an f32 partial sum of two like
  // terms is inf (NaN after the cancelling half).
  for (const std::int64_t D : {64, 128}) {
    for (const bool halves : {true, false}) {
      SCOPED_TRACE("D=" + std::to_string(D) + (halves ? " +halves" : " +-alternating"));
      qkv in(1, 2, 1, 3, 37, D, 16, 30);
      std::fill_n(in.q.data(), in.q.size(), 1e19f);
      for (std::int64_t j = 0; j < 37; ++j)
        for (std::int64_t c = 0; c < D; ++c) in.k(0, 0, j, c) = (halves ? c >= D / 2 : c % 2 == 1) ? -3e19f : 3e19f;
      tensor<float, 4> want(in.out_shape());
      tensor<float, 3> want_lse(in.lse_shape());
      att::reference(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view());
      EXPECT_NEAR(want_lse(0, 0, 0), std::log(37.0), 1e-6);
      for (att::path p : all_paths) {
        SCOPED_TRACE(static_cast<int>(p));
        const std::int64_t Lq = p == att::path::decode ? 1 : 3;
        const view<const float, 4> q = cview(in.q).narrow(2, 0, Lq);
        tensor<float, 4> out({1, 2, Lq, 16});
        tensor<float, 3> lse({1, 2, Lq});
        att::attend(q, in.k, in.v, out.as_view(), lse.as_view(), att::mods::none{}, {}, p);
        EXPECT_TRUE(all_finite(out));
        EXPECT_TRUE(all_finite(lse));
        // Every key has the same score (the same products in the same order), so out is exact;
        // lse carries the f32 error of the score, eps * sum |q_c k_c| = 2e31 here.
        expect_close(out, cview(want).narrow(2, 0, Lq), 1e-6, 1e-5, "out");
      }
    }
  }
  // Scores of 1e20 to 1e28, from products and partial sums that stay in range: one key wins.
  for (const float mag : {1e10f, 1e12f, 1e14f}) {
    SCOPED_TRACE(mag);
    qkv in(1, 4, 2, 5, 50, 32, 8, 31);
    for (float& x : std::span(in.q.data(), in.q.size())) x *= mag;
    for (float& x : std::span(in.k.data(), in.k.size())) x *= mag;
    tensor<float, 4> want(in.out_shape());
    tensor<float, 3> want_lse(in.lse_shape());
    att::reference(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view(), att::mods::causal{});
    for (att::path p : all_paths) {
      SCOPED_TRACE(static_cast<int>(p));
      tensor<float, 4> out(in.out_shape());
      tensor<float, 3> lse(in.lse_shape());
      att::attend(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), att::mods::causal{}, {}, p);
      expect_close(out, want, 1e-6, 1e-5, "out");
      expect_close(lse, want_lse, 0, 1e-5, "lse");
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 7. Values near FLT_MAX: the unnormalised f32 accumulator of flash overflowed.

TEST(Issue16, D07_ValuesNearFloatMaxStayFinite) {
  for (const std::int64_t Lq : {1, 2, 70}) {
    SCOPED_TRACE("Lq=" + std::to_string(Lq));
    qkv in(1, 2, 2, Lq, 90, 8, 8, 32);
    for (std::int64_t j = 0; j < 90; ++j)
      for (std::int64_t c = 0; c < 8; ++c) in.v(0, 0, j, c) = (j + c) % 2 ? 3e38f : 2.9e38f;
    for (std::int64_t j = 0; j < 90; ++j)
      for (std::int64_t c = 0; c < 8; ++c) in.v(0, 1, j, c) = (j + c) % 2 ? -3.3e38f : 3.3e38f;
    tensor<float, 4> want(in.out_shape());
    tensor<float, 3> want_lse(in.lse_shape());
    att::reference(cview(in.q), in.k, in.v, want.as_view(), want_lse.as_view(), att::mods::causal{});
    ASSERT_TRUE(all_finite(want));
    for (att::path p : all_paths) {
      if (p == att::path::decode && Lq > 16) continue;
      SCOPED_TRACE(static_cast<int>(p));
      tensor<float, 4> out(in.out_shape());
      tensor<float, 3> lse(in.lse_shape());
      att::attend(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), att::mods::causal{}, {}, p);
      expect_close(out, want, 0, 1e-5, "out");
      expect_close(lse, want_lse, 1e-5, 1e-5, "lse");
    }
  }
}

// ------------------------------------------------------------------------------------------------
// 8. Aliasing: an output overlapping an input it is still reading is rejected; out may be q itself.

TEST(Issue16, D08_AttentionOutOverlappingKOrVThrows) {
  const qkv in(1, 2, 2, 20, 20, 16, 16, 8);
  tensor<float, 4> k = in.k, v = in.v;
  for (att::path p : all_paths) {
    const std::string fn = p == att::path::reference ? "attention::reference"
                           : p == att::path::flash   ? "attention::flash"
                                                     : "attention::decode";
    const std::int64_t Lq = p == att::path::decode ? 16 : 20;
    const view<float, 4> out_in_v(v.data() + 16, {1, 2, Lq, 16});  // shifted by one row
    const view<float, 4> out_in_k(k.data(), {1, 2, Lq, 16});
    const view<const float, 4> q = cview(in.q).narrow(2, 0, Lq);
    expect_error([&] { att::attend(q, cview(k), cview(v), out_in_v, {}, att::mods::none{}, {}, p); },
                 {fn, "out [1, 2, " + std::to_string(Lq) + ", 16] and v [1, 2, 20, 16] must not overlap"});
    expect_error([&] { att::attend(q, cview(k), cview(v), out_in_k, {}, att::mods::causal{}, {}, p); },
                 {fn, "out", "and k", "must not overlap"});
    tensor<float, 4> out({1, 2, Lq, 16});
    const view<float, 3> lse_in_q(const_cast<float*>(in.q.data()), {1, 2, Lq});
    expect_error([&] { att::attend(q, cview(k), cview(v), out.as_view(), lse_in_q, att::mods::none{}, {}, p); },
                 {fn, "lse [1, 2, " + std::to_string(Lq) + "] and q", "must not overlap"});
  }
  // out overlapping q other than as q itself.
  tensor<float, 4> buffer({1, 2, 21, 16});
  const view<const float, 4> q(buffer.data(), {1, 2, 20, 16}, {2 * 21 * 16, 21 * 16, 16, 1});
  const view<float, 4> out(buffer.data() + 16, {1, 2, 20, 16}, {2 * 21 * 16, 21 * 16, 16, 1});
  expect_error([&] { att::flash(q, in.k, in.v, out); }, {"attention::flash", "out", "and q", "may be q itself"});
}

TEST(Issue16, D08_AttentionInPlaceOverQIsExact) {
  // out = q (the same view) is allowed: every kernel reads a query row before writing its output row.
  const qkv in(1, 4, 2, 150, 150, 16, 16, 9);
  const qkv dec(1, 4, 2, 13, 150, 16, 16, 10);
  auto in_place = [](const tensor<float, 4>& q0, auto&& run) {
    tensor<float, 4> separate(q0.shape()), buffer = q0;
    run(cview(q0), separate.as_view());
    run(cview(buffer), buffer.as_view());
    EXPECT_EQ(mnemo::test::max_abs_diff(buffer, separate), 0.0);
  };
  for (att::path p : {att::path::reference, att::path::flash})
    in_place(in.q, [&](auto q, auto out) { att::attend(q, in.k, in.v, out, {}, att::mods::causal{}, {}, p); });
  in_place(dec.q, [&](auto q, auto out) { att::decode(q, dec.k, dec.v, out, {}, att::mods::causal{}); });
  in_place(in.q, [&](auto q, auto out) { att::topk_attention(q, in.k, in.v, 8, out); });
  const att::sparse::block_layout layout = att::sparse::layout_of(att::mods::causal{}, 150, 16, 16);
  in_place(in.q, [&](auto q, auto out) {
    att::sparse::attention(q, in.k, in.v, out, {}, att::sparse::block_sparse{&layout, att::mods::causal{}});
  });
}

TEST(Issue16, D08_LinearOutputOverlappingAnInputThrows) {
  const std::int64_t B = 1, H = 2, L = 40, D = 8;
  const tensor<float, 4> q = random_tensor<float, 4>({B, H, L, D}, 11), k = random_tensor<float, 4>({B, H, L, D}, 12);
  tensor<float, 4> v = random_tensor<float, 4>({B, H, L, D}, 13);
  tensor<float, 4> state({B, H, D, D});
  const tensor<float, 3> g({B, H, L});
  for (lin::form f : {lin::form::chunked, lin::form::recurrent}) {
    const lin::options opt{.path = f};
    expect_error([&] { lin::linear_attn(q, k, cview(v), v.as_view(), {}, opt); },
                 {"linear::linear_attn: o [1, 2, 40, 8] and v [1, 2, 40, 8] must not overlap"});
    expect_error([&] { lin::simple_gla(q, k, cview(v), g, v.as_view(), {}, opt); },
                 {"linear::simple_gla", "o", "and v", "must not overlap"});
    const view<float, 4> state_in_v(v.data(), {B, H, D, D});
    tensor<float, 4> o({B, H, L, D});
    expect_error([&] { lin::linear_attn(q, k, cview(v), o.as_view(), state_in_v, opt); },
                 {"linear::linear_attn", "state [1, 2, 8, 8] and v", "must not overlap"});
  }
  expect_error([&] { lin::reference::simple_gla(q, k, cview(v), g, v.as_view()); },
               {"linear::reference::simple_gla", "o", "and v"});
}

// ------------------------------------------------------------------------------------------------
// 9. A default-constructed layer_cache is a valid empty cache.

TEST(Issue16, D09_DefaultLayerCacheIsEmpty) {
  const std::vector<kv::layer_cache> caches(2);
  for (const kv::layer_cache& c : caches) {
    EXPECT_EQ(c.num_heads(), 1);
    EXPECT_EQ(c.capacity(), 0);
    EXPECT_EQ(c.length(0), 0);
    EXPECT_EQ(c.max_length(), 0);
    EXPECT_EQ(c.total_length(), 0);
    EXPECT_TRUE(c.positions(0).empty());
    EXPECT_EQ(c.bytes(), 0);
    EXPECT_EQ(c.keys().size(), 0);
  }
  kv::layer_cache c;
  expect_error([&] { c.append(tensor<float, 3>({1, 1, 4}), tensor<float, 3>({1, 1, 4})); },
               {"kvcache::layer_cache::append", "not configured"});
  tensor<float, 3> out({1, 1, 4});
  expect_error([&] { kv::decode(c, tensor<float, 3>({1, 1, 4}), out.as_view()); }, {"kvcache::decode", "not configured"});
  c = kv::layer_cache({.Hkv = 1, .capacity = 4, .D = 4});  // assigned a configured cache later
  c.append(tensor<float, 3>({1, 2, 4}), tensor<float, 3>({1, 2, 4}));
  EXPECT_EQ(c.length(0), 2);
}

// ------------------------------------------------------------------------------------------------
// 10. Zero-size tensors and zero-size views follow one rule: valid; a null view with elements is
// rejected naming the argument and its shape.

TEST(Issue16, D10_ZeroSizeAttentionTensorsWork) {
  for (const shape_t<3> s : {shape_t<3>{0, 4, 6}, shape_t<3>{1, 0, 6}, shape_t<3>{1, 4, 0}}) {  // B, Lq, Lk
    SCOPED_TRACE("B, Lq, Lk = " + shape_string(s));
    const qkv in(s[0], 2, 1, s[1], s[2], 8, 8, 14);
    for (att::path p : all_paths) {
      tensor<float, 4> out(in.out_shape());
      tensor<float, 3> lse(in.lse_shape());
      std::fill(out.begin(), out.end(), 7.0f);
      att::attend(cview(in.q), in.k, in.v, out.as_view(), lse.as_view(), att::mods::none{}, {}, p);
      for (float x : out) EXPECT_EQ(x, 0.0f);  // Lk = 0: no key, out = 0 and lse = -inf
      for (float x : lse) EXPECT_EQ(x, neg_inf);
    }
  }
  // The same shapes as views of memory give the same.
  std::vector<float> mem(64, 1.0f);
  const view<const float, 4> q(mem.data(), {1, 2, 4, 8}), kv0(mem.data(), {1, 1, 0, 8});
  tensor<float, 4> out({1, 2, 4, 8});
  att::flash(q, kv0, kv0, out.as_view());
  for (float x : out) EXPECT_EQ(x, 0.0f);
}

TEST(Issue16, D10_NullViewWithElementsNamesTheArgument) {
  const qkv in(1, 2, 2, 4, 4, 8, 8, 15);
  tensor<float, 4> out(in.out_shape());
  const view<const float, 4> null_k(nullptr, {1, 2, 4, 8});
  for (att::path p : all_paths)
    expect_error([&] { att::attend(cview(in.q), null_k, cview(in.v), out.as_view(), {}, att::mods::none{}, {}, p); },
                 {"attention::", "k [B, Hkv, Lk, D] must be a view of memory, got a null view of shape [1, 2, 4, 8]"});
  expect_error([&] { lin::linear_attn(cview(in.q), null_k, cview(in.v), out.as_view()); },
               {"linear::linear_attn: k [B, H, L, Dk] must be a view of memory", "[1, 2, 4, 8]"});
  kv::layer_cache c({.Hkv = 2, .capacity = 8, .D = 8});
  expect_error([&] { c.append(view<const float, 3>(nullptr, {2, 1, 8}), tensor<float, 3>({2, 1, 8})); },
               {"kvcache::layer_cache::append: k [Hkv, n, D] must be a view of memory", "[2, 1, 8]"});
  // A default-constructed (all-zero shape) view is a zero-size view: the shape check names it.
  expect_error([&] { att::flash(cview(in.q), in.k, in.v, view<float, 4>{}); },
               {"attention::flash: out must have shape [1, 2, 4, 8] [B, Hq, Lq, Dv], got [0, 0, 0, 0]"});
}

TEST(Issue16, D10_ZeroSizeLinearCacheAndMergeTensorsWork) {
  // linear, L = 0: no output, the state passes through unchanged.
  const tensor<float, 4> q({1, 2, 0, 8}), k({1, 2, 0, 8}), v({1, 2, 0, 8});
  tensor<float, 4> o({1, 2, 0, 8});
  tensor<float, 4> state = random_tensor<float, 4>({1, 2, 8, 8}, 16);
  const tensor<float, 4> state0 = state;
  for (lin::form f : {lin::form::chunked, lin::form::recurrent}) {
    lin::linear_attn(q, k, v, o.as_view(), state.as_view(), {.path = f});
    lin::simple_gla(q, k, v, tensor<float, 3>({1, 2, 0}), o.as_view(), state.as_view(), {.path = f});
  }
  EXPECT_EQ(mnemo::test::max_abs_diff(state, state0), 0.0);

  // append n = 0, gather of no slot.
  kv::layer_cache c({.Hkv = 2, .capacity = 8, .D = 8});
  c.append(tensor<float, 3>({2, 0, 8}), tensor<float, 3>({2, 0, 8}));
  EXPECT_EQ(c.max_length(), 0);
  c.append(tensor<float, 3>({2, 3, 8}), tensor<float, 3>({2, 3, 8}));
  tensor<float, 2> none_k({0, 8}), none_v({0, 8});
  c.gather(1, {}, none_k.as_view(), none_v.as_view());
  EXPECT_EQ(c.length(1), 3);

  // merge of zero-size parts, two-way and N-way.
  const tensor<float, 4> oa({0, 2, 1, 8}), ob({0, 2, 1, 8});
  const tensor<float, 3> la({0, 2, 1}), lb({0, 2, 1});
  tensor<float, 4> out({0, 2, 1, 8});
  tensor<float, 3> lse({0, 2, 1});
  att::merge(cview(oa), cview(la), cview(ob), cview(lb), out.as_view(), lse.as_view());
  const view<const float, 4> outs[] = {cview(oa), cview(ob)};
  const view<const float, 3> lses[] = {cview(la), cview(lb)};
  att::merge(std::span<const view<const float, 4>>(outs), std::span<const view<const float, 3>>(lses), out.as_view(),
             lse.as_view());
}

// ------------------------------------------------------------------------------------------------
// 11. Values a quantized cache cannot hold: rejected by name; the largest accepted ones read back
// finite.

TEST(Issue16, D11_QuantizedCacheRejectsValuesOutsideItsRange) {
  for (kv::storage kind : {kv::storage::int8, kv::storage::int4}) {
    SCOPED_TRACE(kv::storage_name(kind));
    const kv::cache_config cfg{.kind = kind, .Hkv = 1, .capacity = 16, .D = 16, .quant = {4, 16, 4}};
    kv::layer_cache c(cfg);
    tensor<float, 3> k({1, 1, 16}), v({1, 1, 16});
    k(0, 0, 3) = 3e38f;
    expect_error([&] { c.append(k, v); }, {"kvcache::layer_cache::append: k must be finite with |k| <= ", "got 3e+38",
                                           "at [0, 0, 3]"});
    k(0, 0, 3) = 0;
    v(0, 0, 5) = -3e38f;
    expect_error([&] { c.append(k, v); }, {"kvcache::layer_cache::append: v must be finite", "got -3e+38"});
    EXPECT_EQ(c.length(0), 0);

    // +-max_magnitude in one value group and in one key group (4 tokens: one flush) stay finite.
    const float m = kv::quant::max_magnitude;
    tensor<float, 3> k4({1, 4, 16}), v4({1, 4, 16});
    for (std::int64_t t = 0; t < 4; ++t)
      for (std::int64_t ch = 0; ch < 16; ++ch) {
        k4(0, t, ch) = (t + ch) % 2 ? m : -m;
        v4(0, t, ch) = ch % 2 ? m : -m;
      }
    c.append(k4, v4);
    ASSERT_EQ(c.quantized_length(0), 4);
    for (float x : c.keys()) EXPECT_TRUE(std::isfinite(x)) << x;
    for (float x : c.values()) EXPECT_TRUE(std::isfinite(x)) << x;
    expect_close(c.keys(), k4, 0, 1e-6, "keys at +-max_magnitude");
    expect_close(c.values(), v4, 0, 1e-6, "values at +-max_magnitude");
  }
}

// ------------------------------------------------------------------------------------------------
// 12. attend with a path that is not one.

TEST(Issue16, D12_UnknownPathThrows) {
  const qkv in(1, 2, 2, 4, 4, 8, 8, 17);
  tensor<float, 4> out(in.out_shape());
  expect_error([&] { att::attend(cview(in.q), in.k, in.v, out.as_view(), {}, att::mods::none{}, {}, static_cast<att::path>(7)); },
               {"attention::attend: p must be path::automatic, reference, flash or decode, got 7"});
}

// ------------------------------------------------------------------------------------------------
// 13. A thread count far beyond the machine is clamped (it made libgomp exit the process).

TEST(Issue16, D13_HugeThreadCountIsClamped) {
  EXPECT_LT(resolve_threads(20000), 20000);  // on any machine of fewer than 2500 processors
  EXPECT_GE(resolve_threads(20000), 1);
  const tensor<float, 4> oa = random_tensor<float, 4>({2, 4, 8, 16}, 18), ob = random_tensor<float, 4>({2, 4, 8, 16}, 19);
  const tensor<float, 3> la = random_tensor<float, 3>({2, 4, 8}, 20), lb = random_tensor<float, 3>({2, 4, 8}, 21);
  tensor<float, 4> one({2, 4, 8, 16}), many({2, 4, 8, 16});
  att::merge(cview(oa), cview(la), cview(ob), cview(lb), one.as_view(), {}, 1);
  att::merge(cview(oa), cview(la), cview(ob), cview(lb), many.as_view(), {}, 20000);
  EXPECT_EQ(mnemo::test::max_abs_diff(one, many), 0.0);
  const qkv in(1, 2, 2, 70, 70, 16, 16, 22);
  tensor<float, 4> a(in.out_shape()), b(in.out_shape());
  att::flash(cview(in.q), in.k, in.v, a.as_view(), {}, att::mods::causal{}, {.threads = 1});
  att::flash(cview(in.q), in.k, in.v, b.as_view(), {}, att::mods::causal{}, {.threads = 20000});
  EXPECT_EQ(mnemo::test::max_abs_diff(a, b), 0.0);
}

// ------------------------------------------------------------------------------------------------
// 14. Decode over 2M keys: the merge of 4000 chunk partials must not lose precision with their count.

TEST(Issue16, D14_DecodeOverTwoMillionKeysMergesExactly) {
  const std::int64_t Lk = 2'048'000, D = 4;
  const tensor<float, 4> q = random_tensor<float, 4>({1, 2, 1, D}, 40);
  const tensor<float, 4> k = random_tensor<float, 4>({1, 1, Lk, D}, 41);
  tensor<float, 4> ones({1, 1, Lk, 2});
  std::fill_n(ones.data(), ones.size(), 1.0f);
  tensor<float, 4> out({1, 2, 1, 2});
  tensor<float, 3> lse({1, 2, 1});
  att::decode(cview(q), cview(k), cview(ones), out.as_view(), lse.as_view());
  for (std::int64_t i = 0; i < out.size(); ++i) EXPECT_NEAR(out.data()[i], 1.0f, 1e-6) << i;  // was 0.9999731
  // Random values against the double-precision reference.
  const tensor<float, 4> v = random_tensor<float, 4>({1, 1, Lk, 2}, 42);
  tensor<float, 4> want({1, 2, 1, 2});
  tensor<float, 3> want_lse({1, 2, 1});
  att::reference(cview(q), cview(k), cview(v), want.as_view(), want_lse.as_view());
  att::decode(cview(q), cview(k), cview(v), out.as_view(), lse.as_view());
  expect_close(out, want, 1e-7, 1e-5, "out");
  expect_close(lse, want_lse, 1e-6, 1e-6, "lse");
}

// ------------------------------------------------------------------------------------------------
// 15. npy headers whose shape is not a tuple.

TEST(Issue16, D15_NpyShapeMustBeATuple) {
  const mnemo::test::scratch_dir dir("bad_input");
  auto write = [&](const std::string& dict) {
    std::string header = dict;
    header.append((64 - (10 + header.size() + 1) % 64) % 64, ' ');
    header += '\n';
    const std::string path = dir.file("a.npy");
    std::ofstream f(path, std::ios::binary);
    f << "\x93NUMPY" << '\x01' << '\x00' << static_cast<char>(header.size() & 0xff)
      << static_cast<char>(header.size() >> 8) << header << std::string(48, '\0');
    return path;
  };
  expect_error([&] { (void)npy::load(write("{'descr': '<f4', 'fortran_order': False, 'shape': 12, }")); },
               {"npy: ", "header 'shape' must be a tuple such as (2, 3), got 12"});
  expect_error([&] { (void)npy::load(write("{'descr': '<f4', 'fortran_order': False, 'shape': [12], }")); },
               {"npy: ", "'shape' must be a tuple", "got [12]"});
  EXPECT_EQ(npy::load(write("{'descr': '<f4', 'fortran_order': False, 'shape': (12,), }")).shape,
            (std::vector<std::int64_t>{12}));
}

// ------------------------------------------------------------------------------------------------
// 16. Positions at the end of int64.

TEST(Issue16, D16_AppendAtTheLastPositionThrows) {
  kv::layer_cache c({.Hkv = 1, .capacity = 8, .D = 4});
  const tensor<float, 3> k({1, 1, 4}), v({1, 1, 4});
  const std::int64_t last[] = {int64_max};
  expect_error([&] { c.append(k, v, last); },
               {"kvcache::layer_cache::append: positions[0] must be < 9223372036854775807", "got 9223372036854775807"});
  EXPECT_EQ(c.length(0), 0);
  const std::int64_t before_last[] = {int64_max - 1};
  c.append(k, v, before_last);
  EXPECT_EQ(c.next_position(), int64_max);
  expect_error([&] { c.append(k, v); }, {"kvcache::layer_cache::append: n = 1 tokens at next_position() = 9223372036854775807"});
  EXPECT_EQ(c.length(0), 1);
}

}  // namespace

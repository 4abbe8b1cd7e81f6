// Tests for mnemo/core/tensor.hpp: strided views over raw memory and owning aligned tensors.
#include "mnemo/core/tensor.hpp"

#include <gtest/gtest.h>

#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mnemo::shape_t;
using mnemo::tensor;
using mnemo::view;

// Runs `fn`, expects a mnemo::error whose message contains every one of `parts`.
template <class Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected mnemo::error";
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

std::vector<float> iota_buffer(std::int64_t n) {
  std::vector<float> b(static_cast<std::size_t>(n));
  std::iota(b.begin(), b.end(), 0.0f);
  return b;
}

TEST(View, FromPointerAndShapeIsRowMajor) {
  auto buf = iota_buffer(2 * 3 * 4);
  view<float, 3> v(buf.data(), {2, 3, 4});
  EXPECT_EQ(v.shape(), (shape_t<3>{2, 3, 4}));
  EXPECT_EQ(v.strides(), (shape_t<3>{12, 4, 1}));
  EXPECT_EQ(v.size(), 24);
  EXPECT_TRUE(v.is_contiguous());
  EXPECT_FALSE(v.empty());
  for (std::int64_t a = 0; a < 2; ++a)
    for (std::int64_t b = 0; b < 3; ++b)
      for (std::int64_t c = 0; c < 4; ++c) {
        EXPECT_EQ(v(a, b, c), buf[static_cast<std::size_t>((a * 3 + b) * 4 + c)]);
        EXPECT_EQ(v.ptr(a, b, c), buf.data() + (a * 3 + b) * 4 + c);
      }
  EXPECT_EQ(v.ptr(1), buf.data() + 12);
  EXPECT_EQ(v.ptr(1, 2), buf.data() + 20);
  v(1, 2, 3) = -5.0f;
  EXPECT_EQ(buf.back(), -5.0f);
}

TEST(View, StridedRowsWithPadding) {
  // 3 rows of 5 used elements in a buffer whose rows are 8 long.
  constexpr std::int64_t rows = 3, cols = 5, pitch = 8;
  auto buf = iota_buffer(rows * pitch);
  view<float, 2> v(buf.data(), {rows, cols}, {pitch, 1});
  EXPECT_FALSE(v.is_contiguous());
  EXPECT_EQ(v.size(), rows * cols);
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < cols; ++c) EXPECT_EQ(v(r, c), static_cast<float>(r * pitch + c));
}

TEST(View, DefaultIsEmpty) {
  view<float, 2> v;
  EXPECT_TRUE(v.empty());
  EXPECT_EQ(v.data(), nullptr);
  EXPECT_EQ(v.size(), 0);
}

TEST(View, InnermostStrideMustBeOne) {
  std::vector<float> buf(64);
  expect_error([&] { view<float, 2>(buf.data(), {4, 4}, {8, 2}); }, {"stride[1] = 1", "got 2"});
  expect_error([&] { view<float, 4>(buf.data(), {1, 2, 2, 2}, {8, 4, 2, 0}); }, {"stride[3] = 1", "got 0"});
  expect_error([&] { view<float, 1>(buf.data(), {4}, {3}); }, {"stride[0] = 1", "got 3"});
}

TEST(View, NegativeExtentsAndStridesThrow) {
  std::vector<float> buf(64);
  expect_error([&] { view<float, 3>(buf.data(), {2, -1, 4}); }, {"shape[1]", ">= 0", "got -1"});
  expect_error([&] { view<float, 2>(buf.data(), {2, 4}, {-4, 1}); }, {"stride[0]", ">= 0", "got -4"});
  expect_error([&] { tensor<float, 2>({3, -2}); }, {"shape[1]", ">= 0", "got -2"});
}

TEST(View, ZeroExtentIsAllowed) {
  std::vector<float> buf(4);
  view<float, 2> v(buf.data(), {0, 4});
  EXPECT_EQ(v.size(), 0);
  tensor<float, 3> t({2, 0, 5});
  EXPECT_EQ(t.size(), 0);
  EXPECT_EQ(t.data(), nullptr);
}

TEST(View, ConstConversion) {
  auto buf = iota_buffer(6);
  view<float, 2> v(buf.data(), {2, 3});
  view<const float, 2> c = v;
  EXPECT_EQ(c.data(), v.data());
  EXPECT_EQ(c.shape(), v.shape());
  EXPECT_EQ(c.strides(), v.strides());
  static_assert(std::is_convertible_v<view<float, 2>, view<const float, 2>>);
  static_assert(!std::is_convertible_v<view<const float, 2>, view<float, 2>>, "no const_cast through views");
  static_assert(std::is_same_v<decltype(mnemo::cview(v)), view<const float, 2>>);
  static_assert(std::is_same_v<mnemo::element_t<tensor<float, 2>>, float>);
  static_assert(std::is_same_v<mnemo::element_t<view<const double, 3>>, double>);
}

TEST(View, Narrow) {
  auto buf = iota_buffer(4 * 6);
  view<float, 2> v(buf.data(), {4, 6});
  auto rows = v.narrow(0, 1, 2);  // rows 1, 2
  EXPECT_EQ(rows.shape(), (shape_t<2>{2, 6}));
  EXPECT_EQ(rows(0, 0), 6.0f);
  EXPECT_EQ(rows(1, 5), 17.0f);
  auto cols = v.narrow(1, 2, 3);  // columns 2..4: stays strided by the full row
  EXPECT_EQ(cols.shape(), (shape_t<2>{4, 3}));
  EXPECT_EQ(cols.strides(), (shape_t<2>{6, 1}));
  EXPECT_FALSE(cols.is_contiguous());
  for (std::int64_t r = 0; r < 4; ++r)
    for (std::int64_t c = 0; c < 3; ++c) EXPECT_EQ(cols(r, c), static_cast<float>(r * 6 + c + 2));
  EXPECT_EQ(v.narrow(1, 6, 0).size(), 0);  // an empty range at the end is fine

  expect_error([&] { v.narrow(1, 4, 3); }, {"[4, 7)", "extent 6", "dimension 1"});
  expect_error([&] { v.narrow(0, -1, 2); }, {"[-1, 1)", "extent 4"});
  expect_error([&] { v.narrow(2, 0, 1); }, {"dim", "[0, 2)", "got 2"});
}

TEST(View, OperatorBracketDropsTheFirstDimension) {
  auto buf = iota_buffer(2 * 3 * 4);
  view<float, 3> v(buf.data(), {2, 3, 4});
  auto s = v[1];
  static_assert(std::is_same_v<decltype(s), view<float, 2>>);
  EXPECT_EQ(s.shape(), (shape_t<2>{3, 4}));
  EXPECT_EQ(s.strides(), (shape_t<2>{4, 1}));
  EXPECT_EQ(s(2, 3), 23.0f);
  EXPECT_EQ(v[1][2](3), 23.0f);
}

TEST(View, BLHDBufferReadAsBHLD) {
  // A [B, L, H, D] buffer (the layout of most checkpoints) used as [B, H, L, D] without a copy.
  constexpr std::int64_t B = 2, L = 5, H = 3, D = 4;
  auto buf = iota_buffer(B * L * H * D);
  view<float, 4> blhd(buf.data(), {B, L, H, D});
  view<float, 4> bhld = blhd.permute({0, 2, 1, 3});
  EXPECT_EQ(bhld.shape(), (shape_t<4>{B, H, L, D}));
  EXPECT_EQ(bhld.strides(), (shape_t<4>{L * H * D, D, H * D, 1}));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t d = 0; d < D; ++d)
          EXPECT_EQ(bhld(b, h, l, d), buf[static_cast<std::size_t>(((b * L + l) * H + h) * D + d)]);
  // Views of a permuted view: one head, then a range of positions.
  auto head = bhld[1][2].narrow(0, 1, 3);  // [3, D] of batch 1, head 2, positions 1..3
  for (std::int64_t l = 0; l < 3; ++l)
    for (std::int64_t d = 0; d < D; ++d)
      EXPECT_EQ(head(l, d), buf[static_cast<std::size_t>(((1 * L + l + 1) * H + 2) * D + d)]);
}

TEST(View, PermuteChecks) {
  std::vector<float> buf(24);
  view<float, 3> v(buf.data(), {2, 3, 4});
  expect_error([&] { v.permute({0, 2, 1}); }, {"innermost", "perm[2] = 1"});
  expect_error([&] { v.permute({0, 0, 2}); }, {"not a permutation"});
  expect_error([&] { v.permute({3, 0, 2}); }, {"not a permutation"});
  auto same = v.permute({0, 1, 2});
  EXPECT_EQ(same.shape(), v.shape());
  EXPECT_EQ(same.strides(), v.strides());
}

TEST(Tensor, ZeroInitialisedAnd64ByteAligned) {
  for (std::int64_t n : {1, 3, 15, 16, 17, 63, 64, 65, 1000}) {
    tensor<float, 1> f({n});
    tensor<std::int64_t, 2> i({n, 3});
    tensor<std::uint16_t, 3> h({2, n, 1});
    for (const void* p : {static_cast<const void*>(f.data()), static_cast<const void*>(i.data()),
                          static_cast<const void*>(h.data())})
      EXPECT_EQ(reinterpret_cast<std::uintptr_t>(p) % (tensor<float, 1>::alignment), 0u) << "n=" << n;
    for (float x : f) EXPECT_EQ(x, 0.0f);
    for (std::int64_t x : i) EXPECT_EQ(x, 0);
    EXPECT_EQ(f.bytes(), static_cast<std::size_t>(n) * sizeof(float));
  }
  static_assert(tensor<float, 1>::alignment == 64);
}

TEST(Tensor, IndexingAndViews) {
  tensor<float, 3> t({2, 3, 5});
  EXPECT_EQ(t.shape(), (shape_t<3>{2, 3, 5}));
  EXPECT_EQ(t.size(), 30);
  float x = 0;
  for (auto& e : t) e = x++;
  EXPECT_EQ(t(1, 2, 4), 29.0f);
  EXPECT_EQ(t(0, 1, 0), 5.0f);
  view<float, 3> v = t;
  EXPECT_EQ(v.data(), t.data());
  EXPECT_TRUE(v.is_contiguous());
  v(1, 0, 0) = -1.0f;
  EXPECT_EQ(t(1, 0, 0), -1.0f);
  const tensor<float, 3>& ct = t;
  view<const float, 3> cv = ct;
  EXPECT_EQ(cv(1, 2, 4), 29.0f);
  static_assert(std::is_same_v<decltype(ct.as_view()), view<const float, 3>>);
}

TEST(Tensor, CopyIsDeepMoveTransfers) {
  tensor<float, 2> a({3, 4});
  for (std::int64_t i = 0; i < 3; ++i)
    for (std::int64_t j = 0; j < 4; ++j) a(i, j) = static_cast<float>(i * 10 + j);

  tensor<float, 2> b = a;
  EXPECT_NE(b.data(), a.data());
  EXPECT_EQ(b.shape(), a.shape());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(b.data()) % 64, 0u);
  b(2, 3) = 100.0f;
  EXPECT_EQ(a(2, 3), 23.0f);

  const float* storage = a.data();
  tensor<float, 2> c = std::move(a);
  EXPECT_EQ(c.data(), storage);
  EXPECT_EQ(c(1, 2), 12.0f);
  EXPECT_EQ(a.data(), nullptr);  // NOLINT(bugprone-use-after-move): the moved-from state is specified
  EXPECT_EQ(a.size(), 0);

  tensor<float, 2> d({1, 1});
  d = c;  // copy assignment
  EXPECT_EQ(d.shape(), c.shape());
  EXPECT_NE(d.data(), c.data());
  EXPECT_EQ(d(1, 2), 12.0f);
  d = std::move(c);  // move assignment
  EXPECT_EQ(d.data(), storage);
  d = d;  // self-assignment keeps the contents
  EXPECT_EQ(d(2, 3), 23.0f);

  tensor<float, 2> empty;
  tensor<float, 2> e2 = empty;
  EXPECT_EQ(e2.data(), nullptr);
}

TEST(Tensor, ShapeStringAndRequireShape) {
  EXPECT_EQ(mnemo::shape_string(shape_t<4>{2, 8, 37, 64}), "[2, 8, 37, 64]");
  EXPECT_EQ(mnemo::contiguous_strides(shape_t<3>{2, 3, 4}), (shape_t<3>{12, 4, 1}));
  tensor<float, 2> t({3, 4});
  expect_error([&] { mnemo::detail::require_shape("fn", "x", t.as_view(), {3, 5}, " [M, N]"); },
               {"fn", "x", "[3, 5] [M, N]", "got [3, 4]"});
  mnemo::detail::require_shape("fn", "x", t.as_view(), {3, 4});
}

TEST(Error, IsInvalidArgument) {
  static_assert(std::is_base_of_v<std::invalid_argument, mnemo::error>);
  expect_error([] { mnemo::detail::fail("a=", 1, ", b=", 2.5); }, {"a=1, b=2.5"});
  mnemo::detail::require(true, "never built");
}

}  // namespace

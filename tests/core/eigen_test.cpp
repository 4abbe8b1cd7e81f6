// Tests for mnemo/core/eigen.hpp: views over Eigen matrices, maps and refs without copies.
#include "mnemo/core/eigen.hpp"

#include <gtest/gtest.h>

#include <Eigen/Core>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mnemo::view;
using row_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using col_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::ColMajor>;

template <class M>
void fill(M& m) {
  for (Eigen::Index r = 0; r < m.rows(); ++r)
    for (Eigen::Index c = 0; c < m.cols(); ++c) m(r, c) = static_cast<float>(100 * r + c);
}

TEST(Eigen, RowMajorMatrixIsRowsByCols) {
  row_major m(37, 5);
  fill(m);
  auto v = mnemo::as_view(m);
  static_assert(std::is_same_v<decltype(v), view<float, 2>>);
  EXPECT_EQ(v.shape(), (mnemo::shape_t<2>{37, 5}));
  EXPECT_EQ(v.data(), m.data());
  EXPECT_TRUE(v.is_contiguous());
  for (std::int64_t r = 0; r < 37; ++r)
    for (std::int64_t c = 0; c < 5; ++c) EXPECT_EQ(v(r, c), m(r, c));
  v(3, 4) = -1.0f;  // writes through
  EXPECT_EQ(m(3, 4), -1.0f);
}

TEST(Eigen, ColMajorMatrixIsTransposed) {
  col_major m(6, 4);
  fill(m);
  auto v = mnemo::as_view(m);
  EXPECT_EQ(v.shape(), (mnemo::shape_t<2>{4, 6}));  // [cols, rows]: rows are contiguous
  EXPECT_EQ(v.strides(), (mnemo::shape_t<2>{6, 1}));
  for (std::int64_t c = 0; c < 4; ++c)
    for (std::int64_t r = 0; r < 6; ++r) EXPECT_EQ(v(c, r), m(r, c));
}

TEST(Eigen, VectorsAreRankOne) {
  Eigen::VectorXf x = Eigen::VectorXf::LinSpaced(9, 0, 8);
  Eigen::RowVectorXf y = Eigen::RowVectorXf::LinSpaced(4, 1, 4);
  auto vx = mnemo::as_view(x);
  auto vy = mnemo::as_view(y);
  static_assert(std::is_same_v<decltype(vx), view<float, 1>>);
  EXPECT_EQ(vx.extent(0), 9);
  EXPECT_EQ(vy.extent(0), 4);
  EXPECT_EQ(vx(8), 8.0f);
  EXPECT_EQ(vy(0), 1.0f);
}

TEST(Eigen, ConstObjectsGiveConstViews) {
  row_major m(3, 4);
  fill(m);
  const row_major& cm = m;
  auto v = mnemo::as_view(cm);
  static_assert(std::is_same_v<decltype(v), view<const float, 2>>);
  EXPECT_EQ(v(2, 3), 203.0f);

  const Eigen::Map<const row_major> cmap(m.data(), 3, 4);
  auto vm = mnemo::as_view(cmap);
  static_assert(std::is_same_v<decltype(vm), view<const float, 2>>);
  EXPECT_EQ(vm(1, 2), 102.0f);

  const Eigen::Ref<const col_major> cref = col_major::Constant(2, 2, 1.5f);
  static_assert(std::is_same_v<decltype(mnemo::as_view(cref)), view<const float, 2>>);
  EXPECT_EQ(mnemo::as_view(cref)(1, 0), 1.5f);
}

TEST(Eigen, WritableMapGivesWritableView) {
  std::vector<float> buf(12);
  Eigen::Map<row_major> map(buf.data(), 3, 4);
  auto v = mnemo::as_view(map);
  static_assert(std::is_same_v<decltype(v), view<float, 2>>);
  EXPECT_EQ(v.data(), buf.data());
  v(2, 1) = 7.0f;
  EXPECT_EQ(buf[9], 7.0f);
  // A temporary writable map still writes through (Eigen's shallow constness).
  mnemo::as_view(Eigen::Map<row_major>(buf.data(), 3, 4))(0, 0) = 3.0f;
  EXPECT_EQ(buf[0], 3.0f);
}

TEST(Eigen, MapWithOuterStride) {
  // 4 rows of 5 floats in rows of 8.
  std::vector<float> buf(32);
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<float>(i);
  Eigen::Map<row_major, 0, Eigen::OuterStride<>> map(buf.data(), 4, 5, Eigen::OuterStride<>(8));
  auto v = mnemo::as_view(map);
  EXPECT_EQ(v.shape(), (mnemo::shape_t<2>{4, 5}));
  EXPECT_EQ(v.strides(), (mnemo::shape_t<2>{8, 1}));
  for (std::int64_t r = 0; r < 4; ++r)
    for (std::int64_t c = 0; c < 5; ++c) EXPECT_EQ(v(r, c), map(r, c));
}

TEST(Eigen, RefToBlocksKeepsTheOuterStride) {
  col_major m(10, 8);
  fill(m);
  Eigen::Ref<col_major, 0, Eigen::OuterStride<>> block = m.block(2, 3, 4, 5);  // rows 2..5, cols 3..7
  auto v = mnemo::as_view(block);
  static_assert(std::is_same_v<decltype(v), view<float, 2>>);
  EXPECT_EQ(v.shape(), (mnemo::shape_t<2>{5, 4}));
  EXPECT_EQ(v.strides(), (mnemo::shape_t<2>{10, 1}));
  for (std::int64_t c = 0; c < 5; ++c)
    for (std::int64_t r = 0; r < 4; ++r) EXPECT_EQ(v(c, r), m(r + 2, c + 3));
  v(0, 0) = -9.0f;
  EXPECT_EQ(m(2, 3), -9.0f);

  row_major rm(6, 7);
  fill(rm);
  Eigen::Ref<const row_major, 0, Eigen::OuterStride<>> rblock = rm.block(1, 2, 3, 4);
  auto rv = mnemo::as_view(rblock);
  static_assert(std::is_same_v<decltype(rv), view<const float, 2>>);
  EXPECT_EQ(rv.shape(), (mnemo::shape_t<2>{3, 4}));
  EXPECT_EQ(rv.strides(), (mnemo::shape_t<2>{7, 1}));
  for (std::int64_t r = 0; r < 3; ++r)
    for (std::int64_t c = 0; c < 4; ++c) EXPECT_EQ(rv(r, c), rm(r + 1, c + 2));
}

TEST(Eigen, InnerStrideOtherThanOneThrows) {
  std::vector<float> buf(16);
  Eigen::Map<Eigen::VectorXf, 0, Eigen::InnerStride<2>> every_other(buf.data(), 8);
  try {
    (void)mnemo::as_view(every_other);
    ADD_FAILURE() << "expected mnemo::error";
  } catch (const mnemo::error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("inner stride must be 1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("got 2"), std::string::npos) << msg;
  }
}

}  // namespace

// tests/simd/vec_test.cpp — simd/vec.hpp against its double-precision references.
//
// Every function runs for every architecture of the build (tests/simd/arches.hpp), at lengths
// around the batch width and its unrolled multiple (0, 1, w-1, w, w+1, 4w-1, 4w, 4w+1, 37, 1000,
// 1023), on inputs that end at an unmapped page, so a tail that reads or writes past the end
// crashes the test. Writes are also checked against sentinels on both sides.
//
// Tolerances: an f32 sum of n products in k interleaved accumulators has error at most about
// (n / k + log2 k) * eps * sum |a_i b_i|; the tests allow n * eps * sum |a_i b_i|, which also
// covers the scalar (MNEMO_NO_SIMD) loop with its single accumulator.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"
#include "simd/arches.hpp"
#include "simd/guarded.hpp"

namespace {

namespace simd = mnemo::simd;
using mnemo::bf16;
using mnemo::f16;
using mnemo::test::bits_of;
using mnemo::test::guarded_buffer;

constexpr float eps = std::numeric_limits<float>::epsilon() / 2;  // unit roundoff 2^-24
constexpr float inf = std::numeric_limits<float>::infinity();
constexpr float sentinel = -777.0f;

template <class Arch>
std::vector<std::int64_t> awkward_lengths() {
  const std::int64_t w = simd::width<Arch>;
  const std::int64_t u = simd::unroll * w;
  return {0, 1, w - 1, w, w + 1, u - 1, u, u + 1, 37, 1000, 1023};
}

template <class T>
void fill_random(T* p, std::int64_t n, std::uint32_t seed, float lo = -2.0f, float hi = 2.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  for (std::int64_t i = 0; i < n; ++i) p[i] = mnemo::from_float<T>(dist(rng));
}

// A float vector in a guarded buffer (end at an unmapped page).
template <class T>
struct guarded_input {
  guarded_buffer<T> buf;
  guarded_input(std::int64_t n, std::uint32_t seed) : buf(n) { fill_random(buf.data(), n, seed); }
};

// y[0 .. n) with `pad` sentinels on each side, to see that nothing outside is written.
struct padded_output {
  static constexpr std::int64_t pad = 17;
  std::vector<float> v;
  explicit padded_output(std::int64_t n) : v(static_cast<std::size_t>(n + 2 * pad), sentinel) {}
  float* data() { return v.data() + pad; }
  bool pads_intact(std::int64_t n) const {
    for (std::int64_t i = 0; i < pad; ++i) {
      if (bits_of(v[static_cast<std::size_t>(i)]) != bits_of(sentinel)) return false;
      if (bits_of(v[static_cast<std::size_t>(n + pad + i)]) != bits_of(sentinel)) return false;
    }
    return true;
  }
};

template <class Arch>
class Vec : public ::testing::Test {};
TYPED_TEST_SUITE(Vec, mnemo::test::simd_arches, mnemo::test::arch_name);

template <class Arch, class T>
void check_dot() {
  for (const std::int64_t n : awkward_lengths<Arch>()) {
    guarded_input<float> a(n, 1);
    guarded_input<T> b(n, 2);
    const double ref = simd::reference::dot(a.buf.data(), b.buf.data(), n);
    double mag = 0;
    for (std::int64_t i = 0; i < n; ++i) mag += std::abs(static_cast<double>(a.buf[i]) * mnemo::to_float(b.buf[i]));
    const float got = simd::dot<Arch>(a.buf.data(), b.buf.data(), n);
    EXPECT_NEAR(got, ref, static_cast<double>(n) * eps * mag + std::numeric_limits<float>::min()) << "n = " << n;
  }
}

TYPED_TEST(Vec, DotFloat) { check_dot<TypeParam, float>(); }
TYPED_TEST(Vec, DotF16) { check_dot<TypeParam, f16>(); }
TYPED_TEST(Vec, DotBf16) { check_dot<TypeParam, bf16>(); }

TYPED_TEST(Vec, DotOfEmptyIsZero) {
  const float x = 1.0f;
  EXPECT_EQ(simd::dot<TypeParam>(&x, &x, 0), 0.0f);
}

template <class Arch, class T>
void check_axpy() {
  constexpr float alpha = -0.75f;
  for (const std::int64_t n : awkward_lengths<Arch>()) {
    guarded_input<T> x(n, 3);
    padded_output y(n);
    fill_random(y.data(), n, 4);
    const std::vector<float> y0(y.data(), y.data() + n);
    simd::axpy<Arch>(alpha, x.buf.data(), y.data(), n);
    for (std::int64_t i = 0; i < n; ++i) {
      const double yi = y0[static_cast<std::size_t>(i)], ax = static_cast<double>(alpha) * mnemo::to_float(x.buf[i]);
      const double ref = yi + ax;
      const double tol = 2 * eps * (std::abs(yi) + std::abs(ax));
      ASSERT_NEAR(y.data()[i], ref, tol) << "n = " << n << ", i = " << i;
    }
    EXPECT_TRUE(y.pads_intact(n)) << "n = " << n;

    // And in place on a guarded y (writes past the end would fault).
    guarded_input<float> yg(n, 5);
    simd::axpy<Arch>(alpha, x.buf.data(), yg.buf.data(), n);
  }
}

TYPED_TEST(Vec, AxpyFloat) { check_axpy<TypeParam, float>(); }
TYPED_TEST(Vec, AxpyF16) { check_axpy<TypeParam, f16>(); }
TYPED_TEST(Vec, AxpyBf16) { check_axpy<TypeParam, bf16>(); }

TYPED_TEST(Vec, ScaleIsExactFloatMultiplication) {
  constexpr float alpha = 1.0f / 3.0f;
  for (const std::int64_t n : awkward_lengths<TypeParam>()) {
    padded_output y(n);
    fill_random(y.data(), n, 6);
    const std::vector<float> y0(y.data(), y.data() + n);
    simd::scale<TypeParam>(alpha, y.data(), n);
    for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(y.data()[i], alpha * y0[static_cast<std::size_t>(i)]) << "i = " << i;
    EXPECT_TRUE(y.pads_intact(n)) << "n = " << n;
    guarded_input<float> yg(n, 7);
    simd::scale<TypeParam>(alpha, yg.buf.data(), n);
  }
}

TYPED_TEST(Vec, ReduceMaxMatchesReference) {
  for (const std::int64_t n : awkward_lengths<TypeParam>()) {
    guarded_input<float> x(n, 8);
    EXPECT_EQ(simd::reduce_max<TypeParam>(x.buf.data(), n), simd::reference::reduce_max(x.buf.data(), n))
        << "n = " << n;
    // The maximum at each end (the tail and the first lane), with everything else negative.
    for (const std::int64_t where : {std::int64_t{0}, n - 1}) {
      if (n == 0) continue;
      guarded_buffer<float> y(n);
      for (std::int64_t i = 0; i < n; ++i) y[i] = -1.0f - static_cast<float>(i);
      y[where] = 5.0f;
      EXPECT_EQ(simd::reduce_max<TypeParam>(y.data(), n), 5.0f) << "n = " << n << ", max at " << where;
    }
  }
}

TYPED_TEST(Vec, ReduceMaxOfEmptyAndMaskedRows) {
  const float x = 1.0f;
  EXPECT_EQ(simd::reduce_max<TypeParam>(&x, 0), -inf);
  for (const std::int64_t n : awkward_lengths<TypeParam>()) {
    guarded_buffer<float> y(n);
    std::fill(y.data(), y.data() + n, -inf);
    EXPECT_EQ(simd::reduce_max<TypeParam>(y.data(), n), -inf) << "n = " << n;
  }
}

TYPED_TEST(Vec, ReduceSumMatchesReference) {
  for (const std::int64_t n : awkward_lengths<TypeParam>()) {
    guarded_input<float> x(n, 9);
    double mag = 0;
    for (std::int64_t i = 0; i < n; ++i) mag += std::abs(x.buf[i]);
    EXPECT_NEAR(simd::reduce_sum<TypeParam>(x.buf.data(), n), simd::reference::reduce_sum(x.buf.data(), n),
                static_cast<double>(n) * eps * mag)
        << "n = " << n;
  }
}

TYPED_TEST(Vec, ExpSumMatchesScalarExpAndReference) {
  using Arch = TypeParam;
  for (const std::int64_t n : awkward_lengths<Arch>()) {
    guarded_buffer<float> x(n);
    fill_random(x.data(), n, 10, -30.0f, 3.0f);
    if (n > 2) x[n / 2] = -inf;  // a masked score inside the row
    const std::vector<float> x0(x.data(), x.data() + n);
    const float shift = simd::reference::reduce_max(x.data(), n);
    const float s = simd::exp_sum<Arch>(x.data(), n, n == 0 ? 0.0f : shift);
    double ref = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const float want = simd::exp<Arch>(x0[static_cast<std::size_t>(i)] - shift);  // same bits as the batch exp
      ASSERT_EQ(bits_of(x[i]), bits_of(want)) << "n = " << n << ", i = " << i;
      ref += std::exp(static_cast<double>(x0[static_cast<std::size_t>(i)]) - shift);
    }
    // Each term is within 1.2 ulp of exp, then summed in f32.
    EXPECT_NEAR(s, ref, (static_cast<double>(n) + 2) * 2 * eps * ref) << "n = " << n;

    padded_output y(n);
    std::copy(x0.begin(), x0.end(), y.data());
    simd::exp_sum<Arch>(y.data(), n, shift);
    EXPECT_TRUE(y.pads_intact(n)) << "n = " << n;
  }
}

TYPED_TEST(Vec, ExpSumOfFullyMaskedRowIsZeroNotNaN) {
  for (const std::int64_t n : awkward_lengths<TypeParam>()) {
    guarded_buffer<float> x(n);
    std::fill(x.data(), x.data() + n, -inf);
    const float shift = simd::reduce_max<TypeParam>(x.data(), n);  // -inf
    EXPECT_EQ(simd::exp_sum<TypeParam>(x.data(), n, shift), 0.0f) << "n = " << n;
    for (std::int64_t i = 0; i < n; ++i) ASSERT_EQ(bits_of(x[i]), bits_of(0.0f)) << "n = " << n << ", i = " << i;
  }
}

TYPED_TEST(Vec, HorizontalSumAndMaxOfABatch) {
  using batch = simd::fbatch<TypeParam>;
  alignas(64) float lanes[batch::size];
  for (std::size_t i = 0; i < batch::size; ++i) lanes[i] = static_cast<float>(i) - 2.5f;
  const batch x = batch::load_unaligned(lanes);
  double sum = 0;
  for (const float v : lanes) sum += v;
  EXPECT_EQ(simd::hsum(x), static_cast<float>(sum));  // small integers and halves: exact
  EXPECT_EQ(simd::hmax(x), lanes[batch::size - 1]);
}

}  // namespace

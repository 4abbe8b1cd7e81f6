// Tests for mnemo/core/dtype.hpp: f16 and bf16, exhaustively over their 65536 bit patterns.
//
// The expected values never come from dtype.hpp itself:
//   * bits -> value is checked against the IEEE formula evaluated with std::ldexp in double;
//   * float -> bits is checked at every exact midpoint between adjacent representable values
//     (computed in double, exact in float since both formats have < 24 significant bits) and
//     one float ulp either side of it, and on random floats against "nearest value of the
//     sorted table of all finite values, ties to the even bit pattern";
//   * with F16C in the build, also against the hardware conversion.
#include "mnemo/core/dtype.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

using mnemo::bf16;
using mnemo::f16;

constexpr std::uint32_t n_patterns = 1u << 16;
constexpr double f16_max = 65504.0;
constexpr double f16_overflow = 65520.0;          // midpoint of 65504 and 2^16: rounds to inf
constexpr double f16_half_min_subnormal = 0x1p-25;  // below or at this, f16 rounds to 0

float next_up(float x) { return std::nextafter(x, std::numeric_limits<float>::infinity()); }
float next_down(float x) { return std::nextafter(x, -std::numeric_limits<float>::infinity()); }
std::uint32_t float_bits(float x) { return std::bit_cast<std::uint32_t>(x); }

// IEEE binary16 / bfloat16 value of a bit pattern, from the definition.
double decode(std::uint16_t bits, int exp_bits, int man_bits) {
  const int bias = (1 << (exp_bits - 1)) - 1;
  const bool neg = bits >> 15;
  const int e = (bits >> man_bits) & ((1 << exp_bits) - 1);
  const int m = bits & ((1 << man_bits) - 1);
  double v = 0;
  if (e == (1 << exp_bits) - 1) v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else if (e == 0) v = std::ldexp(static_cast<double>(m), 1 - bias - man_bits);
  else v = std::ldexp(static_cast<double>(m + (1 << man_bits)), e - bias - man_bits);
  return neg ? -v : v;
}

double f16_value(std::uint16_t b) { return decode(b, 5, 10); }
double bf16_value(std::uint16_t b) { return decode(b, 8, 7); }

bool is_nan_bits16(std::uint16_t b, int man_bits) {
  const int exp_mask = 0x7fff >> man_bits;
  return ((b >> man_bits) & exp_mask) == exp_mask && (b & ((1 << man_bits) - 1)) != 0;
}

// Nearest finite non-negative value in the sorted table `vals` (indexed by bit pattern),
// ties to the even pattern; `limit` is the midpoint between the largest value and the next
// power of two, from which on the result is infinity.
std::uint16_t nearest_by_table(double ax, const std::vector<double>& vals, double limit, std::uint16_t inf_bits) {
  if (ax >= limit) return inf_bits;
  const auto it = std::lower_bound(vals.begin(), vals.end(), ax);
  const auto hi = static_cast<std::uint16_t>(it - vals.begin());
  if (it != vals.end() && *it == ax) return hi;
  if (it == vals.end()) return static_cast<std::uint16_t>(hi - 1);
  const auto lo = static_cast<std::uint16_t>(hi - 1);
  const double dl = ax - vals[lo], dh = vals[hi] - ax;
  if (dl < dh) return lo;
  if (dh < dl) return hi;
  return (lo & 1u) ? hi : lo;
}

TEST(F16, DecodeMatchesTheIeeeFormula) {
  for (std::uint32_t b = 0; b < n_patterns; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float got = static_cast<float>(f16::from_bits(h));
    const double want = f16_value(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << b;
      EXPECT_EQ(std::signbit(got), (b >> 15) != 0) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << b;
      ASSERT_EQ(std::signbit(got), (b >> 15) != 0) << std::hex << b;  // -0 stays -0
    }
  }
}

TEST(F16, EveryBitPatternSurvivesTheRoundTrip) {
  // Includes +-0, all subnormals, +-inf, and quiet and signalling NaNs with every payload.
  for (std::uint32_t b = 0; b < n_patterns; ++b) {
    const auto h = f16::from_bits(static_cast<std::uint16_t>(b));
    ASSERT_EQ(f16(static_cast<float>(h)).bits, b) << std::hex << b;
    ASSERT_EQ(mnemo::from_float<f16>(mnemo::to_float(h)).bits, b) << std::hex << b;
  }
}

TEST(F16, MidpointsRoundToNearestEven) {
  // Every adjacent pair a < b of non-negative f16 values (b = inf's position: 2^16 for the last
  // pair, where the midpoint 65520 must overflow); negatives by symmetry.
  for (std::uint32_t lo = 0; lo < 0x7c00u; ++lo) {
    const std::uint32_t hi = lo + 1;
    const double a = f16_value(static_cast<std::uint16_t>(lo));
    const double b = hi == 0x7c00u ? 65536.0 : f16_value(static_cast<std::uint16_t>(hi));
    const double mid = (a + b) / 2;
    const auto fm = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(fm), mid) << "midpoint not exact in float at " << std::hex << lo;
    const std::uint32_t even = (lo & 1u) ? hi : lo;
    for (const std::uint32_t sign : {0u, 0x8000u}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(f16(s * static_cast<float>(a)).bits, sign | lo) << std::hex << lo;
      ASSERT_EQ(f16(s * next_down(fm)).bits, sign | lo) << std::hex << lo;
      ASSERT_EQ(f16(s * fm).bits, sign | even) << std::hex << lo;
      ASSERT_EQ(f16(s * next_up(fm)).bits, sign | hi) << std::hex << lo;
    }
  }
}

TEST(F16, OverflowAndUnderflowEdges) {
  const auto inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(f16(static_cast<float>(f16_max)).bits, 0x7bffu);
  EXPECT_EQ(f16(next_down(static_cast<float>(f16_overflow))).bits, 0x7bffu);
  EXPECT_EQ(f16(static_cast<float>(f16_overflow)).bits, 0x7c00u);
  EXPECT_EQ(f16(-static_cast<float>(f16_overflow)).bits, 0xfc00u);
  EXPECT_EQ(f16(1e10f).bits, 0x7c00u);
  EXPECT_EQ(f16(std::numeric_limits<float>::max()).bits, 0x7c00u);
  EXPECT_EQ(f16(inf).bits, 0x7c00u);
  EXPECT_EQ(f16(-inf).bits, 0xfc00u);

  const auto half_min = static_cast<float>(f16_half_min_subnormal);
  EXPECT_EQ(f16(half_min).bits, 0x0000u);  // tie between 0 and 2^-24: even is 0
  EXPECT_EQ(f16(-half_min).bits, 0x8000u);
  EXPECT_EQ(f16(next_down(half_min)).bits, 0x0000u);
  EXPECT_EQ(f16(next_up(half_min)).bits, 0x0001u);
  EXPECT_EQ(f16(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
  EXPECT_EQ(f16(std::numeric_limits<float>::min()).bits, 0x0000u);
  EXPECT_EQ(f16(0.0f).bits, 0x0000u);
  EXPECT_EQ(f16(-0.0f).bits, 0x8000u);
}

TEST(F16, RandomFloatsMatchTheNearestTableValue) {
  std::vector<double> table;  // all finite non-negative f16 values, ascending with the bits
  for (std::uint32_t b = 0; b < 0x7c00u; ++b) table.push_back(f16_value(static_cast<std::uint16_t>(b)));
  std::mt19937 rng(1234);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  // Exponents around f16's range, where the interesting cases are; plus any float at all.
  std::uniform_int_distribution<std::uint32_t> exponent(127 - 27, 127 + 17);
  constexpr int samples = 400000;
  for (int n = 0; n < samples; ++n) {
    std::uint32_t x = any_bits(rng);
    if (n % 4) x = (x & 0x807fffffu) | (exponent(rng) << 23);
    const float f = std::bit_cast<float>(x);
    if (std::isnan(f)) continue;
    const std::uint16_t sign = (x >> 31) ? 0x8000u : 0u;
    const std::uint16_t want = sign | nearest_by_table(std::fabs(static_cast<double>(f)), table, f16_overflow, 0x7c00u);
    ASSERT_EQ(f16(f).bits, want) << std::hexfloat << f;
  }
}

TEST(F16, FloatNanStaysNanKeepingSignAndPayloadTop) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> payload(1, 0x7fffffu);
  for (int n = 0; n < 10000; ++n) {
    const std::uint32_t p = n < 2 ? (n == 0 ? 1u : 0x1fffu) : payload(rng);  // payloads that vanish first
    for (const std::uint32_t sign : {0u, 0x80000000u}) {
      const auto h = f16(std::bit_cast<float>(sign | 0x7f800000u | p)).bits;
      ASSERT_TRUE(is_nan_bits16(h, 10)) << std::hex << p;
      ASSERT_EQ(h >> 15, sign >> 31);
      const std::uint32_t top = p >> 13;
      ASSERT_EQ(h & 0x3ffu, top ? top : 0x200u) << std::hex << p;
    }
  }
}

#if defined(__F16C__)
TEST(F16, MatchesF16CHardware) {
  // Every 4099th float (all exponents, both signs), NaN excluded: F16C quiets NaNs.
  constexpr std::uint64_t step = 4099;
  for (std::uint64_t x = 0; x < (std::uint64_t{1} << 32); x += step) {
    const float f = std::bit_cast<float>(static_cast<std::uint32_t>(x));
    if (std::isnan(f)) continue;
    const auto hw = static_cast<std::uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    ASSERT_EQ(f16(f).bits, hw) << std::hexfloat << f;
  }
  for (std::uint32_t b = 0; b < n_patterns; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float hw = _cvtsh_ss(h);
    const float sw = static_cast<float>(f16::from_bits(h));
    if (std::isnan(hw)) ASSERT_TRUE(std::isnan(sw));
    else ASSERT_EQ(float_bits(sw), float_bits(hw)) << std::hex << b;
  }
}
#endif

TEST(BF16, DecodeMatchesTheFormula) {
  for (std::uint32_t b = 0; b < n_patterns; ++b) {
    const auto h = static_cast<std::uint16_t>(b);
    const float got = static_cast<float>(bf16::from_bits(h));
    const double want = bf16_value(h);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << std::hex << b;
    } else {
      ASSERT_EQ(static_cast<double>(got), want) << std::hex << b;
      ASSERT_EQ(std::signbit(got), (b >> 15) != 0) << std::hex << b;
    }
    ASSERT_EQ(float_bits(got), b << 16) << std::hex << b;  // bf16 is the top half of a float
  }
}

TEST(BF16, EveryBitPatternSurvivesTheRoundTrip) {
  for (std::uint32_t b = 0; b < n_patterns; ++b) {
    const auto h = bf16::from_bits(static_cast<std::uint16_t>(b));
    ASSERT_EQ(bf16(static_cast<float>(h)).bits, b) << std::hex << b;
    ASSERT_EQ(mnemo::from_float<bf16>(mnemo::to_float(h)).bits, b) << std::hex << b;
  }
}

TEST(BF16, MidpointsRoundToNearestEven) {
  // Adjacent non-negative pairs, the last one being (max finite, 2^128) whose midpoint must
  // overflow to inf (the max's pattern 0x7f7f is odd).
  for (std::uint32_t lo = 0; lo < 0x7f80u; ++lo) {
    const std::uint32_t hi = lo + 1;
    const double a = bf16_value(static_cast<std::uint16_t>(lo));
    const double b = hi == 0x7f80u ? std::ldexp(1.0, 128) : bf16_value(static_cast<std::uint16_t>(hi));
    const double mid = (a + b) / 2;
    const auto fm = static_cast<float>(mid);
    ASSERT_EQ(static_cast<double>(fm), mid) << "midpoint not exact in float at " << std::hex << lo;
    const std::uint32_t even = (lo & 1u) ? hi : lo;
    for (const std::uint32_t sign : {0u, 0x8000u}) {
      const float s = sign ? -1.0f : 1.0f;
      ASSERT_EQ(bf16(s * static_cast<float>(a)).bits, sign | lo) << std::hex << lo;
      ASSERT_EQ(bf16(s * next_down(fm)).bits, sign | lo) << std::hex << lo;
      ASSERT_EQ(bf16(s * fm).bits, sign | even) << std::hex << lo;
      ASSERT_EQ(bf16(s * next_up(fm)).bits, sign | hi) << std::hex << lo;
    }
  }
  EXPECT_EQ(bf16(std::numeric_limits<float>::max()).bits, 0x7f80u);
  EXPECT_EQ(bf16(-std::numeric_limits<float>::infinity()).bits, 0xff80u);
  EXPECT_EQ(bf16(std::numeric_limits<float>::denorm_min()).bits, 0x0000u);
}

TEST(BF16, RandomFloatsMatchTheNearestTableValue) {
  std::vector<double> table;
  for (std::uint32_t b = 0; b < 0x7f80u; ++b) table.push_back(bf16_value(static_cast<std::uint16_t>(b)));
  const double limit = (bf16_value(0x7f7fu) + std::ldexp(1.0, 128)) / 2;
  std::mt19937 rng(99);
  std::uniform_int_distribution<std::uint32_t> any_bits;
  for (int n = 0; n < 400000; ++n) {
    const std::uint32_t x = any_bits(rng);
    const float f = std::bit_cast<float>(x);
    if (std::isnan(f)) continue;
    const std::uint16_t sign = (x >> 31) ? 0x8000u : 0u;
    ASSERT_EQ(bf16(f).bits, sign | nearest_by_table(std::fabs(static_cast<double>(f)), table, limit, 0x7f80u))
        << std::hexfloat << f;
  }
}

TEST(BF16, FloatNanStaysNanKeepingSignAndPayloadTop) {
  std::mt19937 rng(8);
  std::uniform_int_distribution<std::uint32_t> payload(1, 0x7fffffu);
  for (int n = 0; n < 10000; ++n) {
    const std::uint32_t p = n < 2 ? (n == 0 ? 1u : 0xffffu) : payload(rng);
    for (const std::uint32_t sign : {0u, 0x80000000u}) {
      const auto h = bf16(std::bit_cast<float>(sign | 0x7f800000u | p)).bits;
      ASSERT_TRUE(is_nan_bits16(h, 7)) << std::hex << p;
      ASSERT_EQ(h >> 15, sign >> 31);
      const std::uint32_t top = p >> 16;
      ASSERT_EQ(h & 0x7fu, top ? top : 0x40u) << std::hex << p;
    }
  }
}

TEST(Dtype, ConstexprAndNames) {
  static_assert(f16(1.0f).bits == 0x3c00u);
  static_assert(f16(-2.0f).bits == 0xc000u);
  static_assert(bf16(1.0f).bits == 0x3f80u);
  static_assert(static_cast<float>(f16::from_bits(0x3555u)) == 0x1.554p-2f);
  static_assert(f16::from_bits(0x3c00u) == f16(1.0f));
  static_assert(mnemo::is_kv_type_v<float> && mnemo::is_kv_type_v<f16> && mnemo::is_kv_type_v<bf16>);
  static_assert(!mnemo::is_kv_type_v<double>);
  EXPECT_STREQ(mnemo::dtype_name<f16>(), "float16");
  EXPECT_STREQ(mnemo::dtype_name<bf16>(), "bfloat16");
  EXPECT_STREQ(mnemo::dtype_name<float>(), "float32");
  EXPECT_STREQ(mnemo::dtype_name<std::int64_t>(), "int64");
  EXPECT_EQ(f16().bits, 0u);
  EXPECT_EQ(bf16().bits, 0u);
}

}  // namespace

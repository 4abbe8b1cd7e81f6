// Tests for mnemo/kvcache/quant.hpp: the int8 / int4 group quantizers. Per format: the
// quantize -> dequantize error bound (|x - x'| <= scale / 2 per group), codes inside [0, levels],
// exact round trip of constant groups, the packed int4 layout; the SIMD quantizer against the
// reference (bit-identical codes, scales, minimums), SIMD dequantization and the fused code loads
// (load_codes, dot_codes) against the scalar definitions, on awkward sizes.
#include "mnemo/kvcache/quant.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

namespace {

namespace quant = mnemo::kvcache::quant;
using arch = mnemo::simd::default_arch;

std::vector<float> random_vector(std::int64_t n, std::uint32_t seed, float spread = 3.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, spread);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (float& v : x) v = normal(rng);
  return x;
}

// Half a quantization step plus the f32 rounding of min + scale * code.
double bound(float scale, float x) { return 0.5 * scale * (1 + 1e-5) + 4e-7 * std::fabs(x) + 1e-30; }

template <int Bits>
void check_token_round_trip(std::int64_t n, std::int64_t group, std::uint32_t seed) {
  const std::vector<float> x = random_vector(n, seed);
  const std::int64_t groups = (n + group - 1) / group;
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(quant::row_bytes(Bits, n)));
  std::vector<float> scale(static_cast<std::size_t>(groups)), min(static_cast<std::size_t>(groups)), y(x.size());
  quant::reference::quantize_token(x.data(), n, group, Bits, codes.data(), scale.data(), min.data());
  quant::reference::dequantize_token(codes.data(), n, group, Bits, scale.data(), min.data(), y.data());
  for (std::int64_t g = 0; g < groups; ++g) {
    float lo = x[g * group], hi = lo;
    for (std::int64_t c = g * group; c < std::min(n, (g + 1) * group); ++c) lo = std::min(lo, x[c]), hi = std::max(hi, x[c]);
    EXPECT_EQ(min[g], lo);
    EXPECT_NEAR(scale[g], (hi - lo) / quant::levels(Bits), 1e-6 * (hi - lo));
  }
  for (std::int64_t c = 0; c < n; ++c) {
    const int code = quant::get_code(codes.data(), Bits, c);
    EXPECT_GE(code, 0);
    EXPECT_LE(code, quant::levels(Bits));
    EXPECT_LE(std::fabs(x[c] - y[c]), bound(scale[c / group], x[c])) << "bits " << Bits << " n " << n << " c " << c;
  }
}

TEST(Quant, TokenRoundTripWithinHalfAStep) {
  for (std::int64_t n : {1, 7, 37, 128, 200})
    for (std::int64_t group : {16, 32, 128}) {
      check_token_round_trip<8>(n, group, static_cast<std::uint32_t>(n * 131 + group));
      check_token_round_trip<4>(n, group, static_cast<std::uint32_t>(n * 137 + group));
    }
}

TEST(Quant, Int4ErrorIsAboutSixteenTimesInt8) {
  // The step of b bits is range / (2^b - 1): int4's is 255 / 15 = 17 times int8's.
  const std::int64_t n = 4096;
  const std::vector<float> x = random_vector(n, 5);
  double err[2] = {0, 0};
  for (int which = 0; which < 2; ++which) {
    const int bits = which ? 4 : 8;
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(quant::row_bytes(bits, n)));
    float scale, min;
    std::vector<float> y(x.size());
    quant::reference::quantize_token(x.data(), n, n, bits, codes.data(), &scale, &min);
    quant::reference::dequantize_token(codes.data(), n, n, bits, &scale, &min, y.data());
    for (std::int64_t c = 0; c < n; ++c) err[which] += std::fabs(x[c] - y[c]);
  }
  EXPECT_GT(err[1] / err[0], 17.0 * 0.8);
  EXPECT_LT(err[1] / err[0], 17.0 * 1.25);
}

TEST(Quant, ConstantGroupIsExact) {
  const std::vector<float> x(37, 1.25f);
  for (int bits : {8, 4}) {
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(quant::row_bytes(bits, 37)));
    std::vector<float> scale(3), min(3), y(37);
    quant::reference::quantize_token(x.data(), 37, 16, bits, codes.data(), scale.data(), min.data());
    quant::reference::dequantize_token(codes.data(), 37, 16, bits, scale.data(), min.data(), y.data());
    for (float v : y) EXPECT_EQ(v, 1.25f);
    for (float s : scale) EXPECT_EQ(s, 0.0f);
  }
}

TEST(Quant, Int4PacksLowNibbleFirst) {
  std::vector<std::uint8_t> row(3, 0);
  quant::set_code(row.data(), 4, 0, 0x3);
  quant::set_code(row.data(), 4, 1, 0xa);
  quant::set_code(row.data(), 4, 4, 0xf);
  EXPECT_EQ(row[0], 0xa3);
  EXPECT_EQ(row[1], 0x00);
  EXPECT_EQ(row[2], 0x0f);
  quant::set_code(row.data(), 4, 0, 0x5);  // rewriting one nibble keeps the other
  EXPECT_EQ(row[0], 0xa5);
  EXPECT_EQ(quant::row_bytes(4, 5), 3);
  EXPECT_EQ(quant::row_bytes(8, 5), 5);
}

template <int Bits>
void check_channels(std::int64_t n, std::int64_t D, std::uint32_t seed) {
  const std::vector<float> x = random_vector(n * D, seed);
  const std::int64_t cs = quant::row_bytes(Bits, D);
  std::vector<std::uint8_t> codes(static_cast<std::size_t>(n * cs));
  std::vector<float> scale(static_cast<std::size_t>(D)), min(static_cast<std::size_t>(D)), y(static_cast<std::size_t>(D));
  quant::reference::quantize_channels(x.data(), D, n, D, Bits, codes.data(), cs, scale.data(), min.data());
  for (std::int64_t t = 0; t < n; ++t) {
    quant::reference::dequantize_channels(codes.data() + t * cs, D, Bits, scale.data(), min.data(), y.data());
    for (std::int64_t c = 0; c < D; ++c) EXPECT_LE(std::fabs(x[t * D + c] - y[c]), bound(scale[c], x[t * D + c]));
  }
}

TEST(Quant, ChannelGroupsRoundTripWithinHalfAStep) {
  for (std::int64_t n : {1, 5, 64})
    for (std::int64_t D : {3, 40, 128}) {
      check_channels<8>(n, D, static_cast<std::uint32_t>(n + 7 * D));
      check_channels<4>(n, D, static_cast<std::uint32_t>(n + 11 * D));
    }
}

template <int Bits>
void check_simd(std::int64_t n, std::int64_t group, std::uint32_t seed) {
  const std::vector<float> x = random_vector(n, seed);
  const std::int64_t groups = (n + group - 1) / group, rb = quant::row_bytes(Bits, n);
  std::vector<std::uint8_t> c_ref(static_cast<std::size_t>(rb)), c_simd(static_cast<std::size_t>(rb));
  std::vector<float> s_ref(static_cast<std::size_t>(groups)), m_ref(s_ref.size()), s_simd(s_ref.size()), m_simd(s_ref.size());
  quant::reference::quantize_token(x.data(), n, group, Bits, c_ref.data(), s_ref.data(), m_ref.data());
  quant::quantize_token<arch, Bits>(x.data(), n, group, c_simd.data(), s_simd.data(), m_simd.data());
  EXPECT_EQ(c_ref, c_simd) << "n " << n << " group " << group;
  EXPECT_EQ(s_ref, s_simd);
  EXPECT_EQ(m_ref, m_simd);
  std::vector<float> y_ref(x.size()), y_simd(x.size());
  quant::reference::dequantize_token(c_ref.data(), n, group, Bits, s_ref.data(), m_ref.data(), y_ref.data());
  quant::dequantize_token<arch, Bits>(c_ref.data(), n, group, s_ref.data(), m_ref.data(), y_simd.data());
  for (std::int64_t c = 0; c < n; ++c) EXPECT_NEAR(y_ref[c], y_simd[c], 2e-7 * (std::fabs(y_ref[c]) + std::fabs(m_ref[c / group])));
  // Fused loads and dot product against the scalar code definition.
  const std::vector<float> a = random_vector(n, seed + 1, 1.0f);
  double want = 0;
  for (std::int64_t c = 0; c < n; ++c) want += static_cast<double>(a[c]) * quant::get_code(c_ref.data(), Bits, c);
  const float got = quant::dot_codes<arch, Bits>(a.data(), c_ref.data(), n);
  EXPECT_NEAR(got, want, 1e-5 * (1 + std::fabs(want)) * static_cast<double>(n));
  constexpr std::int64_t W = mnemo::simd::width<arch>;
  alignas(64) float lanes[W];
  for (std::int64_t c = 0; c + W <= n; c += W) {
    quant::load_codes<arch, Bits>(c_ref.data(), c).store_aligned(lanes);
    for (std::int64_t i = 0; i < W; ++i) ASSERT_EQ(lanes[i], quant::get_code(c_ref.data(), Bits, c + i));
  }
  const std::int64_t c0 = n / W * W;
  if (c0 < n) {
    quant::load_codes_partial<arch, Bits>(c_ref.data(), c0, n - c0).store_aligned(lanes);
    for (std::int64_t i = 0; i < W; ++i) EXPECT_EQ(lanes[i], c0 + i < n ? quant::get_code(c_ref.data(), Bits, c0 + i) : 0);
  }
}

TEST(Quant, SimdMatchesReference) {
  for (std::int64_t n : {1, 15, 16, 37, 128, 131})
    for (std::int64_t group : {16, 32, 1000}) {
      check_simd<8>(n, group, static_cast<std::uint32_t>(3 * n + group));
      check_simd<4>(n, group, static_cast<std::uint32_t>(5 * n + group));
    }
}

}  // namespace

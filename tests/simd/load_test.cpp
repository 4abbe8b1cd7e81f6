// tests/simd/load_test.cpp — simd/load.hpp against the scalar conversions of core/dtype.hpp.
//
// Loads: all 65536 f16 and bf16 bit patterns. Stores: all 65536 values as floats, every f32 at and
// next to a rounding midpoint between two neighbouring 16-bit values (ties to even, carries into
// the exponent, subnormals, overflow to inf), and every 4099th pattern of all 2^32 floats (NaNs
// included). Results must equal dtype.hpp bit for bit; NaNs from the hardware F16C / AVX-512
// converters only need to stay NaN (the hardware quiets them). Partial loads/stores and convert
// run on buffers that end at an unmapped page, so any access past the end would crash the test.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/core/dtype.hpp"
#include "mnemo/simd/load.hpp"
#include "simd/arches.hpp"
#include "simd/guarded.hpp"

namespace {

namespace simd = mnemo::simd;
using mnemo::bf16;
using mnemo::f16;
using mnemo::test::bits_of;
using mnemo::test::guarded_buffer;
using mnemo::test::is_nan;
using mnemo::test::same_or_both_nan;

constexpr std::uint32_t patterns16 = 1u << 16;
constexpr std::uint64_t f32_sweep_stride = 4099;  // prime: ~1M patterns spread over all 2^32

template <class T>
std::vector<T> all_16bit_patterns() {
  std::vector<T> v(patterns16);
  for (std::uint32_t b = 0; b < patterns16; ++b) v[b] = T::from_bits(static_cast<std::uint16_t>(b));
  return v;
}

// Floats where rounding to T is hardest: each 16-bit value, the exact midpoint between it and its
// successor, and the floats one f32 ulp either side of that midpoint; plus a strided f32 sweep.
template <class T>
std::vector<float> rounding_inputs() {
  std::vector<float> v;
  for (std::uint32_t b = 0; b < patterns16; ++b) {
    const T lo = T::from_bits(static_cast<std::uint16_t>(b));
    const T hi = T::from_bits(static_cast<std::uint16_t>(b + 1));
    const float a = static_cast<float>(lo);
    v.push_back(a);
    if (b + 1 == patterns16 || is_nan(lo) || is_nan(hi) || std::isinf(a)) continue;
    const float c = static_cast<float>(hi);
    if (std::isinf(c)) {
      // Largest finite value: the midpoint towards infinity (65520 for f16) is one half-step past it.
      const float below = static_cast<float>(T::from_bits(static_cast<std::uint16_t>(b - 1)));
      const float m = static_cast<float>(static_cast<double>(a) + (static_cast<double>(a) - below) / 2);
      v.insert(v.end(), {std::nextafter(m, a), m, std::nextafter(m, c)});
      continue;
    }
    const float m = static_cast<float>((static_cast<double>(a) + static_cast<double>(c)) / 2);  // exact in f32
    v.insert(v.end(), {std::nextafter(m, a), m, std::nextafter(m, c)});
  }
  for (std::uint64_t b = 0; b < (std::uint64_t{1} << 32); b += f32_sweep_stride) {
    v.push_back(std::bit_cast<float>(static_cast<std::uint32_t>(b)));
  }
  return v;
}

template <class Arch>
class Load : public ::testing::Test {};
TYPED_TEST_SUITE(Load, mnemo::test::simd_arches, mnemo::test::arch_name);

template <class Arch, class T>
void check_load_all_patterns(bool exact_nan_bits) {
  using batch = simd::fbatch<Arch>;
  const std::vector<T> h = all_16bit_patterns<T>();
  std::vector<float> out(patterns16);
  for (std::uint32_t i = 0; i < patterns16; i += batch::size) {
    simd::store(out.data() + i, simd::load<Arch>(h.data() + i));
  }
  std::uint32_t wrong = 0;
  for (std::uint32_t b = 0; b < patterns16; ++b) {
    const float want = static_cast<float>(h[b]);
    const bool ok = exact_nan_bits ? bits_of(out[b]) == bits_of(want) : same_or_both_nan(out[b], want);
    if (!ok && wrong++ < 5) ADD_FAILURE() << "pattern 0x" << std::hex << b << ": got " << out[b] << ", want " << want;
  }
  EXPECT_EQ(wrong, 0u);
}

TYPED_TEST(Load, F16AllPatternsMatchDtype) { check_load_all_patterns<TypeParam, f16>(false); }

TYPED_TEST(Load, Bf16AllPatternsMatchDtypeBitForBit) { check_load_all_patterns<TypeParam, bf16>(true); }

template <class Arch, class T>
void check_store(const std::vector<float>& in, bool exact_nan_bits) {
  using batch = simd::fbatch<Arch>;
  std::vector<float> x = in;
  while (x.size() % batch::size != 0) x.push_back(0.0f);
  std::vector<T> out(x.size());
  for (std::size_t i = 0; i < x.size(); i += batch::size) simd::store(out.data() + i, simd::load<Arch>(x.data() + i));
  std::size_t wrong = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const T want = T(x[i]);
    const bool ok = exact_nan_bits ? out[i] == want : same_or_both_nan(out[i], want);
    if (!ok && wrong++ < 5) {
      ADD_FAILURE() << "float " << x[i] << " (0x" << std::hex << bits_of(x[i]) << "): got 0x" << bits_of(out[i])
                    << ", want 0x" << bits_of(want);
    }
  }
  EXPECT_EQ(wrong, 0u);
  EXPECT_GT(x.size(), patterns16);
}

TYPED_TEST(Load, F16StoreRoundsLikeDtype) { check_store<TypeParam, f16>(rounding_inputs<f16>(), false); }

TYPED_TEST(Load, Bf16StoreRoundsLikeDtypeBitForBit) { check_store<TypeParam, bf16>(rounding_inputs<bf16>(), true); }

// The integer f16 path (used when the build has no F16C, e.g. -mavx2 -mfma) is checked directly
// in every build, bit for bit including NaN payloads.
TYPED_TEST(Load, F16IntegerPathMatchesDtypeBitForBit) {
  using Arch = TypeParam;
  if constexpr (!simd::detail::has_int16_path<Arch>()) {
    GTEST_SKIP() << "no integer 16-bit path in this build (MNEMO_NO_SIMD)";
  } else {
    using batch = simd::fbatch<Arch>;
    namespace d = simd::detail;
    const std::vector<f16> h = all_16bit_patterns<f16>();
    std::uint32_t wrong = 0;
    for (std::uint32_t i = 0; i < patterns16; i += batch::size) {
      const auto* bits = reinterpret_cast<const std::uint16_t*>(h.data() + i);
      const batch f = d::f16_bits_to_float<Arch>(d::widen_u16<Arch>(bits));
      for (std::size_t l = 0; l < batch::size; ++l) {
        if (bits_of(f.get(l)) != bits_of(static_cast<float>(h[i + l])) && wrong++ < 5) {
          ADD_FAILURE() << "load of f16 0x" << std::hex << (i + l);
        }
      }
    }
    std::vector<float> x = rounding_inputs<f16>();
    while (x.size() % batch::size != 0) x.push_back(0.0f);
    std::vector<std::uint16_t> out(x.size());
    for (std::size_t i = 0; i < x.size(); i += batch::size) {
      d::narrow_u16<Arch>(out.data() + i, d::float_to_f16_bits<Arch>(batch::load_unaligned(x.data() + i)));
    }
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (out[i] != f16(x[i]).bits && wrong++ < 5) ADD_FAILURE() << "store of float 0x" << std::hex << bits_of(x[i]);
    }
    EXPECT_EQ(wrong, 0u);
  }
}

// The f16 conversion the build selects: AVX-512 or F16C instructions when the compiler may use
// them, the integer path otherwise (an -mavx2 -mfma build has no F16C and must not use it).
TEST(LoadPath, F16PathFollowsTheBuildFlags) {
  using simd::detail::cvt_path;
  constexpr cvt_path path = simd::detail::f16_path<simd::default_arch>();
  if constexpr (!simd::enabled) {
    EXPECT_EQ(path, cvt_path::lanes);
  } else {
#if defined(__AVX512F__)
    EXPECT_EQ(path, cvt_path::avx512);
#elif defined(__F16C__) && defined(__AVX__)
    EXPECT_EQ(path, cvt_path::f16c_256);
#elif defined(__F16C__)
    EXPECT_EQ(path, cvt_path::f16c_128);
#else
    EXPECT_EQ(path, cvt_path::int16);
#endif
  }
}

// Values for the partial and bulk tests: ordinary numbers with some specials mixed in.
template <class T>
std::vector<T> sample(std::int64_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 3.0f);
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float specials[] = {0.0f, -0.0f, inf, -inf, std::numeric_limits<float>::quiet_NaN(), 1e-6f, -7e-8f, 70000.0f};
  std::vector<T> v(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) {
    const float x = (i % 7 == 3) ? specials[(i / 7) % std::size(specials)] : dist(rng);
    v[static_cast<std::size_t>(i)] = mnemo::from_float<T>(x);
  }
  return v;
}

template <class Arch, class T>
void check_partial() {
  using batch = simd::fbatch<Arch>;
  for (std::int64_t n = 0; n <= static_cast<std::int64_t>(batch::size); ++n) {
    const std::vector<T> src = sample<T>(n, static_cast<std::uint32_t>(n) + 1);
    guarded_buffer<T> in(n);  // the next byte after in[n - 1] is unmapped
    std::copy(src.begin(), src.end(), in.data());
    const batch x = simd::load_partial<Arch>(in.data(), n);
    for (std::int64_t l = 0; l < static_cast<std::int64_t>(batch::size); ++l) {
      const float want = l < n ? mnemo::to_float(src[static_cast<std::size_t>(l)]) : 0.0f;
      EXPECT_TRUE(same_or_both_nan(x.get(static_cast<std::size_t>(l)), want)) << "n = " << n << ", lane " << l;
    }
    guarded_buffer<T> out(n);
    simd::store_partial(out.data(), x, n);
    for (std::int64_t i = 0; i < n; ++i) {
      EXPECT_TRUE(same_or_both_nan(out[i], src[static_cast<std::size_t>(i)])) << "n = " << n << ", i = " << i;
    }
    // Nothing before or after the n elements changes (the guard page covers only the end).
    constexpr int pad = 8;
    std::vector<T> padded(static_cast<std::size_t>(n + 2 * pad), mnemo::from_float<T>(-123.0f));
    simd::store_partial(padded.data() + pad, x, n);
    for (int i = 0; i < pad; ++i) {
      EXPECT_EQ(bits_of(padded[static_cast<std::size_t>(i)]), bits_of(mnemo::from_float<T>(-123.0f)));
      EXPECT_EQ(bits_of(padded[static_cast<std::size_t>(n + pad + i)]), bits_of(mnemo::from_float<T>(-123.0f)));
    }
  }
}

TYPED_TEST(Load, PartialFloatTouchesOnlyNElements) { check_partial<TypeParam, float>(); }
TYPED_TEST(Load, PartialF16TouchesOnlyNElements) { check_partial<TypeParam, f16>(); }
TYPED_TEST(Load, PartialBf16TouchesOnlyNElements) { check_partial<TypeParam, bf16>(); }

template <class Arch>
std::vector<std::int64_t> awkward_lengths() {
  const std::int64_t w = simd::width<Arch>;
  return {0, 1, w - 1, w, w + 1, 2 * w + 3, 37, 1000, 1023};
}

template <class Arch, class From, class To>
void check_convert() {
  for (const std::int64_t n : awkward_lengths<Arch>()) {
    const std::vector<From> src = sample<From>(n, static_cast<std::uint32_t>(n) + 100);
    guarded_buffer<From> in(n);
    std::copy(src.begin(), src.end(), in.data());
    guarded_buffer<To> out(n);
    simd::convert<Arch>(in.data(), out.data(), n);
    for (std::int64_t i = 0; i < n; ++i) {
      const To want = mnemo::from_float<To>(mnemo::to_float(src[static_cast<std::size_t>(i)]));
      ASSERT_TRUE(same_or_both_nan(out[i], want)) << "n = " << n << ", i = " << i;
    }
  }
}

TYPED_TEST(Load, ConvertEveryPairAtAwkwardLengths) {
  using A = TypeParam;
  check_convert<A, float, float>();
  check_convert<A, float, f16>();
  check_convert<A, float, bf16>();
  check_convert<A, f16, float>();
  check_convert<A, f16, f16>();
  check_convert<A, f16, bf16>();
  check_convert<A, bf16, float>();
  check_convert<A, bf16, f16>();
  check_convert<A, bf16, bf16>();
}

TYPED_TEST(Load, UnalignedFullLoadsAndStores) {
  using Arch = TypeParam;
  using batch = simd::fbatch<Arch>;
  // Every misalignment of a whole batch inside a buffer that ends at an unmapped page.
  for (std::int64_t off = 0; off < static_cast<std::int64_t>(batch::size); ++off) {
    const std::int64_t n = off + static_cast<std::int64_t>(batch::size);
    const std::vector<f16> src = sample<f16>(n, 7);
    guarded_buffer<f16> in(n);
    std::copy(src.begin(), src.end(), in.data());
    guarded_buffer<f16> out(n);
    simd::store(out.data() + off, simd::load<Arch>(in.data() + off));
    for (std::int64_t i = off; i < n; ++i) EXPECT_TRUE(same_or_both_nan(out[i], src[static_cast<std::size_t>(i)]));
  }
}

}  // namespace

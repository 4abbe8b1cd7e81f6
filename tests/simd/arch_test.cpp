// tests/simd/arch_test.cpp — the build gets the SIMD width it asked for.
//
// -march=native on an AVX-512 machine must give xsimd::avx512bw and 16-float batches (not a
// silent fall back to AVX2); -mavx2 -mfma gives fma3<avx2> with 8 floats; the baseline SSE2
// build 4 floats. MNEMO_NO_SIMD switches `enabled` off without changing the batch type.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <type_traits>

#include "mnemo/simd/simd.hpp"

namespace {

namespace simd = mnemo::simd;

TEST(Arch, EnabledFollowsMnemoNoSimd) {
#ifdef MNEMO_NO_SIMD
  EXPECT_FALSE(simd::enabled);
#else
  EXPECT_TRUE(simd::enabled);
#endif
}

TEST(Arch, DefaultArchIsTheWidestTheBuildAllows) {
  const std::string name = simd::default_arch::name();
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512CD__)
  EXPECT_EQ(name, "avx512bw");
  EXPECT_EQ(simd::width<>, 16);
#elif defined(__AVX2__) && defined(__FMA__)
  EXPECT_EQ(name, "fma3+avx2");
  EXPECT_EQ(simd::width<>, 8);
#elif defined(__SSE2__) && !defined(__AVX__) && !defined(__SSE3__)
  EXPECT_EQ(name, "sse2");
  EXPECT_EQ(simd::width<>, 4);
#else
  GTEST_SKIP() << "build for " << name << " has no expectation here";
#endif
  EXPECT_EQ(static_cast<std::size_t>(simd::width<>), simd::fbatch<>::size);
  std::printf("[ simd ] default_arch = %s, %lld floats per batch, simd %s\n", name.c_str(),
              static_cast<long long>(simd::width<>), simd::enabled ? "on" : "off (MNEMO_NO_SIMD)");
}

TEST(Arch, FmaTraitMatchesTheArch) {
  EXPECT_TRUE(simd::detail::has_fma<xsimd::fma3<xsimd::avx2>>);
  EXPECT_TRUE(simd::detail::has_fma<xsimd::avx512bw>);
#if defined(__FMA__)
  // With FMA hardware enabled, fmadd fuses on every x86 tag (see arch.hpp).
  EXPECT_TRUE(simd::detail::has_fma<xsimd::avx2>);
  EXPECT_TRUE(simd::detail::has_fma<xsimd::sse2>);
#else
  EXPECT_FALSE(simd::detail::has_fma<xsimd::sse2>);
#endif
}

}  // namespace

// tests/simd/arches.hpp — the xsimd architectures this build can run, as a GoogleTest type list.
//
// A native (AVX-512) build runs every simd/ test for avx512bw, fma3<avx2>, avx2, sse4_1 and sse2,
// so the AVX2 and SSE code paths are exercised on this machine even in the default build.
#pragma once

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "mnemo/core/dtype.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::test {

using simd_arches = ::testing::Types<
#if XSIMD_WITH_AVX512BW
    xsimd::avx512bw,
#endif
#if XSIMD_WITH_FMA3_AVX2
    xsimd::fma3<xsimd::avx2>,
#endif
#if XSIMD_WITH_AVX2
    xsimd::avx2,
#endif
#if XSIMD_WITH_SSE4_1
    xsimd::sse4_1,
#endif
    xsimd::sse2>;

struct arch_name {
  template <class Arch>
  static std::string GetName(int) {
    std::string s = Arch::name();
    for (char& c : s) {
      if (c == '+' || c == '.') c = '_';
    }
    return s;
  }
};

// Bit pattern of a float, f16 or bf16 value.
inline std::uint32_t bits_of(float x) { return std::bit_cast<std::uint32_t>(x); }
inline std::uint32_t bits_of(f16 x) { return x.bits; }
inline std::uint32_t bits_of(bf16 x) { return x.bits; }

inline bool is_nan(float x) { return std::isnan(x); }
inline bool is_nan(f16 x) { return (x.bits & 0x7c00u) == 0x7c00u && (x.bits & 0x03ffu) != 0; }
inline bool is_nan(bf16 x) { return (x.bits & 0x7f80u) == 0x7f80u && (x.bits & 0x007fu) != 0; }

// Same value bit for bit, or both NaN (hardware conversions quiet NaNs, so payloads may differ).
template <class T>
bool same_or_both_nan(T a, T b) {
  return bits_of(a) == bits_of(b) || (is_nan(a) && is_nan(b));
}

}  // namespace mnemo::test

// mnemo/simd/math.hpp — exp for float batches, and its scalar companion (same algorithm, same
// bits).
//
//   exp(x) = 2^n * exp(r),   n = round(x * log2(e)),   r = x - n * ln2,   |r| <= ln2 / 2
//
// Range reduction (Cody & Waite, "Software Manual for the Elementary Functions", 1980): ln2 is
// split into ln2_hi = 355/512 (9 significant bits, so n * ln2_hi is exact for |n| < 2^15 and
// x - n * ln2_hi is exact by Sterbenz) and ln2_lo = ln2 - ln2_hi rounded to float. n is found
// with the "shifter" trick: adding 1.5 * 2^23 rounds x * log2(e) to an integer in the low
// mantissa bits, so no float -> int conversion instruction is needed.
//
// exp(r) ~ 1 + r + r^2 * (c2 + c3 r + c4 r^2 + c5 r^3 + c6 r^4), evaluated in Horner form with
// FMA where the build has it. The coefficients are a relative-error minimax fit on
// [-ln2/2, ln2/2] (1 and r fixed; Remez exchange in 40-digit mpmath, then rounded to float); the
// fit's own error is 3.1e-9 = 0.03 ulp, so the result's error is the float rounding of the
// evaluation.
//
// Scaling by 2^n: n is split as n1 + n2 with both halves in the normal exponent range and the
// result is (p * 2^n1) * 2^n2 — the first product is exact, so the result is rounded once, also
// when it is subnormal (gradual underflow, no flush to zero). AVX-512 does the same single
// rounding with one vscalefps.
//
// Special values: x is first clamped to [-104, 89]. exp(-104) < 2^-150 (half the smallest
// subnormal) rounds to +0, so exp(-inf) = exp(x < -103.97) = +0; exp(89) > FLT_MAX overflows to
// +inf, so exp(+inf) = exp(x > 88.7228) = +inf; NaN -> NaN (quieted). exp(-0) = exp(+0) = 1.
//
// Accuracy, against std::exp in double, in ulps of the correctly rounded float result (2^-149
// for subnormal results), measured on all 2^32 float bit patterns:
//   with FMA (AVX-512, AVX2+FMA, any x86 arch in an -mfma build)   max 0.894 ulp (x = 5.20193)
//   without FMA (SSE2 baseline)                                    max 1.176 ulp (x = -71.0455)
// i.e. a relative error below 1.07e-7 (FMA) / 1.41e-7 (no FMA) for normal results, and at most
// one subnormal step 2^-149 for subnormal ones. tests/simd/math_test.cpp asserts 0.9 / 1.2 ulp on
// every 7th pattern of all 2^32 plus every pattern of the underflow, overflow and near-zero ranges
// and of +-2048 ulps around each range-reduction boundary (k + 1/2) ln2.
// The batch and the scalar versions give identical bits on the same Arch (checked on all patterns):
// both fuse exactly when detail::has_fma<Arch> (see arch.hpp).
//
// Cost per batch: 2 clamps, 1 subtraction, 9 FMAs, then 5 integer ops and 2 multiplies (one
// vscalefps on AVX-512); no table, no branch, no NaN fix-up on x86 (see clamp_keeps_nan).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "mnemo/simd/arch.hpp"

namespace mnemo::simd {

namespace detail {

// Constants of exp; see the header comment for where each comes from.
struct exp_constants {
  static constexpr float log2e = 0x1.715476p+0f;      // log2(e) rounded to float
  static constexpr float ln2_hi = 0x1.63p-1f;         // 355/512 = 0.693359375
  static constexpr float ln2_lo = -0x1.bd0106p-13f;   // ln2 - ln2_hi rounded to float
  static constexpr float shifter = 0x1.8p23f;         // 1.5 * 2^23: adding it rounds to an integer
  static constexpr float min_arg = -104.0f;           // exp(-104) < 2^-150: rounds to +0
  static constexpr float max_arg = 89.0f;             // exp(89) > FLT_MAX: overflows to +inf
  // exp(r) ~ 1 + r + r^2 * (c2 + c3 r + c4 r^2 + c5 r^3 + c6 r^4) on [-ln2/2, ln2/2]
  static constexpr float c2 = 0x1.fffffcp-2f;
  static constexpr float c3 = 0x1.555492p-3f;
  static constexpr float c4 = 0x1.5558f2p-5f;
  static constexpr float c5 = 0x1.1239e2p-7f;
  static constexpr float c6 = 0x1.6a2434p-10f;
  static constexpr std::int32_t exponent_bias = 127;
  static constexpr int mantissa_bits = 23;
};

// a * b + c, fused exactly when has_fma<Arch> (see arch.hpp), so scalar and batch code round alike.
template <class Arch>
inline float fmadd(float a, float b, float c) {
  if constexpr (has_fma<Arch>) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// The batch form deduces its batch type B, never takes Arch explicitly: fmadd<scalar_arch>(float...)
// then never names batch<float, scalar_arch> (see exp below).
template <class B>
  requires is_batch_arch<typename B::arch_type> && std::is_same_v<typename B::value_type, float>
inline B fmadd(B a, B b, B c) {
  using Arch = typename B::arch_type;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) {
    return _mm512_fmadd_ps(a, b, c);  // xsimd 8.1 has no avx512f fma kernel (it would mul + add)
  } else
#endif
#if defined(__FMA__)
  if constexpr (std::is_base_of_v<xsimd::avx, Arch>) {
    return _mm256_fmadd_ps(a, b, c);
  } else if constexpr (is_sse2<Arch>) {
    return _mm_fmadd_ps(a, b, c);
  } else
#endif
  {
    return xsimd::fma(a, b, c);
  }
}

// Keeps b in a register from here on: the compiler may no longer fold the load that made it into
// each instruction that uses it. A tile loop that multiplies one loaded batch with several others
// (the split-KV score pass: one q slice times key_tile keys) otherwise reloads it once per use
// (GCC 12 does), and on Zen 4, where a 512-bit load takes both load ports for a cycle, the loads
// and not the FMAs bound the loop. An empty asm with the register as in-out operand; no code.
template <class B>
  requires is_batch_arch<typename B::arch_type>
inline void in_register([[maybe_unused]] B& b) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  using Arch = typename B::arch_type;
  if constexpr (is_sse2<Arch> || std::is_base_of_v<xsimd::avx, Arch> || is_avx512<Arch>) {
    auto r = static_cast<typename B::register_type>(b);
    asm("" : "+v"(r));
    b = r;
  }
#endif
}

// The exponent fields of 2^n1 and 2^n2, n1 = floor(n / 2), n2 = n - n1, straight from the bits
// of t = shifter + n: u = n + 2 * bias, e1 = u >> 1 = n1 + bias, e2 = u - e1 = n2 + bias.
inline constexpr std::int32_t exp_split_offset =
    std::bit_cast<std::int32_t>(exp_constants::shifter) - 2 * exp_constants::exponent_bias;

// On x86, max/min return their second operand when either is NaN, so clamping as
// min(hi, max(lo, x)) passes a NaN x through, and the arithmetic after it keeps it NaN: no final
// NaN select is needed.
template <class Arch>
inline constexpr bool clamp_keeps_nan = is_sse2<Arch> || std::is_base_of_v<xsimd::avx, Arch> || is_avx512<Arch>;

}  // namespace detail

// exp of one float, the same operations as the batch version below, so both give the same bits.
template <class Arch = default_arch>
inline float exp(float x) {
  using c = detail::exp_constants;
  if (x != x) return x + x;  // NaN in, quiet NaN out
  const float xc = std::min(std::max(x, c::min_arg), c::max_arg);
  const float t = detail::fmadd<Arch>(xc, c::log2e, c::shifter);
  const float n = t - c::shifter;
  float r = detail::fmadd<Arch>(n, -c::ln2_hi, xc);
  r = detail::fmadd<Arch>(n, -c::ln2_lo, r);
  float p = detail::fmadd<Arch>(c::c6, r, c::c5);
  p = detail::fmadd<Arch>(p, r, c::c4);
  p = detail::fmadd<Arch>(p, r, c::c3);
  p = detail::fmadd<Arch>(p, r, c::c2);
  p = detail::fmadd<Arch>(p, r, 1.0f);
  p = detail::fmadd<Arch>(p, r, 1.0f);
  // 2^n1 * 2^n2 = 2^n, each factor a normal float (|n| <= 151 after the clamp).
  const auto u = static_cast<std::int32_t>(std::bit_cast<std::uint32_t>(t) -
                                           static_cast<std::uint32_t>(detail::exp_split_offset));
  const std::int32_t e1 = u >> 1;
  const std::int32_t e2 = u - e1;
  const float s1 = std::bit_cast<float>(static_cast<std::uint32_t>(e1) << c::mantissa_bits);
  const float s2 = std::bit_cast<float>(static_cast<std::uint32_t>(e2) << c::mantissa_bits);
  return p * s1 * s2;
}

// exp of every lane; see the header comment for the algorithm and its accuracy. Called as
// exp(batch) or exp<Arch>(batch): the lane arch is always deduced from the argument, so that
// exp<scalar_arch>(float) never names batch<float, scalar_arch> (clang 14 checks an argument's
// conversion to a parameter type fixed by explicit template arguments before the constraints).
template <class Arch>
  requires detail::is_batch_arch<Arch>
inline xsimd::batch<float, Arch> exp_batch(xsimd::batch<float, Arch> x);

template <class B>
  requires detail::is_batch_arch<typename B::arch_type> && std::is_same_v<typename B::value_type, float>
inline B exp(B x) {
  return exp_batch<typename B::arch_type>(x);
}

template <class Arch, class A>
  requires(detail::is_batch_arch<Arch> && std::is_same_v<A, Arch>)
inline xsimd::batch<float, Arch> exp(xsimd::batch<float, A> x) {
  return exp_batch<Arch>(x);
}

template <class Arch>
  requires detail::is_batch_arch<Arch>
inline xsimd::batch<float, Arch> exp_batch(xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  using c = detail::exp_constants;
  if constexpr (!vectorized<Arch>) {
    alignas(Arch::alignment()) float lanes[batch::size];
    x.store_aligned(lanes);
    for (float& v : lanes) v = exp<Arch>(v);
    return batch::load_aligned(lanes);
  } else {
    const batch xc = xsimd::min(batch(c::max_arg), xsimd::max(batch(c::min_arg), x));  // NaN x stays x on x86
    const batch t = detail::fmadd(xc, batch(c::log2e), batch(c::shifter));
    const batch n = t - batch(c::shifter);
    batch r = detail::fmadd(n, batch(-c::ln2_hi), xc);
    r = detail::fmadd(n, batch(-c::ln2_lo), r);
    batch p = detail::fmadd(batch(c::c6), r, batch(c::c5));
    p = detail::fmadd(p, r, batch(c::c4));
    p = detail::fmadd(p, r, batch(c::c3));
    p = detail::fmadd(p, r, batch(c::c2));
    p = detail::fmadd(p, r, batch(1.0f));
    p = detail::fmadd(p, r, batch(1.0f));
    batch y;
#if XSIMD_WITH_AVX512F
    if constexpr (detail::is_avx512<Arch>) {
      y = _mm512_scalef_ps(p, n);  // p * 2^n, rounded once (to a subnormal or inf if need be)
    } else
#endif
    {
      using ibatch = detail::ibatch<Arch>;
      const ibatch u = xsimd::bitwise_cast<ibatch>(t) - ibatch(detail::exp_split_offset);
      const ibatch e1 = u >> 1;
      const ibatch e2 = u - e1;
      const batch s1 = xsimd::bitwise_cast<batch>(e1 << c::mantissa_bits);
      const batch s2 = xsimd::bitwise_cast<batch>(e2 << c::mantissa_bits);
      y = p * s1 * s2;
    }
    if constexpr (detail::clamp_keeps_nan<Arch>) {
      return y;
    } else {
      // xsimd::isnan rather than x != x: xsimd 8.1's operator!= is an ordered compare on AVX.
      return xsimd::select(xsimd::isnan(x), x + x, y);
    }
  }
}

// exp(x) is a normal float iff x >= ln(FLT_MIN) = -87.336... (the softmax kernels flush p to 0 below).
inline constexpr float min_normal_exp_arg = -87.33654f;

// exp(x) for the softmax kernels' arguments: x in [min_normal_exp_arg, 0] (score minus its row's
// running maximum, the lanes that would underflow already set to 0 by the caller) or NaN. Same
// bits as exp(x) there, with less work: no clamps (nothing can overflow or reach the subnormal
// range), and 2^n for n in [-126, 0] is one normal float, so p * 2^n needs one multiply where
// exp's full range needs two factors. exp computes p * 2^n1 * 2^n2; p * 2^n1 is exact and the
// second multiply rounds p * 2^n once, as the single multiply here does. A NaN x gives NaN (p is
// NaN). Outside the domain the result is unspecified. The per-element cost of flash's online
// softmax on AVX2 drops from about 27 to 21 vector operations.
// exp_nonpositive of N batches at once, each step applied to all N before the next: N
// independent dependency chains side by side. One exp is a chain of about 12 dependent
// operations; a core whose floating-point scheduler holds little more than one of them (AMD Zen 1:
// its 256-bit operations take two entries each) otherwise waits on each step's latency.
template <std::size_t N, class B>
  requires detail::is_batch_arch<typename B::arch_type> && std::is_same_v<typename B::value_type, float>
[[gnu::always_inline]] inline void exp_nonpositive_n(B* x) {
  using Arch = typename B::arch_type;
  using c = detail::exp_constants;
  if constexpr (!vectorized<Arch>) {
    for (std::size_t k = 0; k < N; ++k) x[k] = exp_batch<Arch>(x[k]);
  } else {
    B t[N], r[N], p[N];
    for (std::size_t k = 0; k < N; ++k) t[k] = detail::fmadd(x[k], B(c::log2e), B(c::shifter));
    for (std::size_t k = 0; k < N; ++k) {
      const B n = t[k] - B(c::shifter);
      r[k] = detail::fmadd(n, B(-c::ln2_hi), x[k]);
      x[k] = n;  // x is dead from here: it keeps n (the AVX-512 scale needs it)
    }
    for (std::size_t k = 0; k < N; ++k) r[k] = detail::fmadd(x[k], B(-c::ln2_lo), r[k]);
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(B(c::c6), r[k], B(c::c5));
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(p[k], r[k], B(c::c4));
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(p[k], r[k], B(c::c3));
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(p[k], r[k], B(c::c2));
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(p[k], r[k], B(1.0f));
    for (std::size_t k = 0; k < N; ++k) p[k] = detail::fmadd(p[k], r[k], B(1.0f));
    for (std::size_t k = 0; k < N; ++k) {
#if XSIMD_WITH_AVX512F
      if constexpr (detail::is_avx512<Arch>) {
        x[k] = _mm512_scalef_ps(p[k], x[k]);
        continue;
      }
#endif
      // t = shifter + n exactly, so its bits are shifter's plus n: the biased exponent n + 127
      // is those bits minus (shifter's bits - 127).
      using ibatch = detail::ibatch<Arch>;
      constexpr std::int32_t offset = std::bit_cast<std::int32_t>(c::shifter) - c::exponent_bias;
      const ibatch e = (xsimd::bitwise_cast<ibatch>(t[k]) - ibatch(offset)) << c::mantissa_bits;
      x[k] = p[k] * xsimd::bitwise_cast<B>(e);
    }
  }
}

template <class B>
  requires detail::is_batch_arch<typename B::arch_type> && std::is_same_v<typename B::value_type, float>
inline B exp_nonpositive(B x) {
  exp_nonpositive_n<1>(&x);
  return x;
}

}  // namespace mnemo::simd

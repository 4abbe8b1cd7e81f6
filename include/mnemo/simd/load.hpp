// mnemo/simd/load.hpp — float batches from and to float, f16 and bf16 memory.
//
//   load<Arch>(p)                 p[0 .. size)       -> fbatch<Arch>   (unaligned, converted to f32)
//   load_partial<Arch>(p, n)      p[0 .. n), 0 after -> fbatch<Arch>   (reads nothing past p + n)
//   store(p, x)                   fbatch<Arch>       -> p[0 .. size)   (f16/bf16: round to nearest even)
//   store_partial(p, x, n)        first n lanes      -> p[0 .. n)      (writes nothing past p + n)
//   convert<Arch>(src, dst, n)    src[0 .. n)        -> dst[0 .. n)    float/f16/bf16 in any pair
//
// Results are those of the scalar conversions in core/dtype.hpp, bit for bit, with one exception:
// where the hardware converts f16 (F16C, AVX-512), a NaN comes out as a quiet NaN of the same sign
// (the hardware sets the quiet bit; dtype.hpp keeps a signalling payload as it is). Every other
// value, subnormals included, matches exactly; tests/simd/load_test.cpp checks all 65536 16-bit
// patterns both ways plus the f32 rounding boundaries.
//
// How each conversion is done, by build:
//   f16 -> f32   AVX-512: vcvtph2ps zmm;  F16C: vcvtph2ps ymm/xmm;  otherwise (e.g. -mavx2 -mfma
//                without -mf16c, or SSE2) integer bit manipulation: shift the exponent/mantissa
//                into place, re-bias by 112 = 127 - 15, lift inf/NaN to exponent 255, and make
//                subnormals exact as (2^-14 + m 2^-24) - 2^-14 in float (no subnormal float
//                arithmetic, which costs a microcode assist on Intel cores).
//   f32 -> f16   AVX-512 / F16C: vcvtps2ph with round-to-nearest-even; otherwise integer rounding
//                (add 0xfff + lsb, shift by 13) for normals, and for results below 2^-14 the float
//                addition v + 0.5, whose ulp 2^-24 is the f16 subnormal step, so the FPU's own
//                round-to-nearest-even produces the subnormal mantissa.
//   bf16 <-> f32 always integer: widen and shift by 16; narrowing adds 0x7fff + lsb (round to
//                nearest even) and treats NaNs like dtype.hpp. (AVX512-BF16's vcvtneps2bf16 is not
//                used: it flushes subnormals to zero.)
// Widening 16 -> 32 bits and narrowing back use vpmovzxwd / vpmovdw (AVX-512), vpmovzxwd /
// vpackusdw (AVX2), pmovzxwd / packusdw (SSE4.1), punpcklwd / packssdw (SSE2). Any other Arch
// (and every Arch under MNEMO_NO_SIMD) converts lane by lane with the dtype.hpp functions.
//
// Partial loads and stores use AVX-512 masked moves (which never touch masked-off memory, even
// across a page boundary); elsewhere they go through a small stack buffer.
#pragma once

#include <cassert>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "mnemo/core/dtype.hpp"
#include "mnemo/simd/arch.hpp"

#if XSIMD_WITH_SSE2
#include <immintrin.h>
#endif

namespace mnemo::simd {

namespace detail {

// How a conversion is done for Arch in this build (see the header comment); decided in one place.
enum class cvt_path { avx512, f16c_256, f16c_128, int16, lanes };

// 16 <-> 32-bit widening/narrowing with integer instructions: used for bf16 always, and for f16
// when the build has no F16C.
template <class Arch>
constexpr bool has_int16_path() {
  if constexpr (!vectorized<Arch>) return false;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) return true;
#endif
#if XSIMD_WITH_AVX2
  if constexpr (is_avx2<Arch>) return true;
#endif
#if XSIMD_WITH_SSE2
  if constexpr (is_sse2<Arch>) return true;
#endif
  return false;
}

template <class Arch>
constexpr cvt_path f16_path() {
  if constexpr (!vectorized<Arch>) return cvt_path::lanes;
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) return cvt_path::avx512;
#endif
#if defined(__F16C__)
  if constexpr (xsimd::batch<float, Arch>::size == 8 && std::is_base_of_v<xsimd::avx, Arch>) return cvt_path::f16c_256;
  if constexpr (is_sse2<Arch>) return cvt_path::f16c_128;
#endif
  if constexpr (has_int16_path<Arch>()) return cvt_path::int16;
  return cvt_path::lanes;
}

// Constants of the f16 / bf16 bit manipulation (IEEE binary16: 1 sign, 5 exponent, 10 mantissa bits).
struct half_bits {
  static constexpr std::int32_t f16_sign = 0x8000;
  static constexpr std::int32_t f16_abs_mask = 0x7fff;
  static constexpr std::int32_t f16_exp_mask = 0x7c00;       // also: f16 +inf
  static constexpr std::int32_t f16_min_normal = 0x0400;     // 2^-14
  static constexpr std::int32_t f16_quiet_bit = 0x0200;
  static constexpr std::int32_t f16_mantissa_mask = 0x03ff;
  static constexpr int mantissa_shift = 13;                  // 23 - 10 mantissa bits
  static constexpr int sign_shift = 16;                      // f32 sign bit 31 -> f16 bit 15
  static constexpr std::int32_t rebias = 112 << 23;          // (127 - 15) in the f32 exponent field
  static constexpr std::int32_t exp_one = 1 << 23;           // +1 in the f32 exponent field
  static constexpr std::int32_t f32_abs_mask = 0x7fffffff;
  static constexpr std::int32_t f32_inf = 0x7f800000;
  static constexpr std::int32_t f32_f16_min_normal = 0x38800000;  // 2^-14 as f32 bits
  static constexpr std::int32_t f32_f16_overflow = 0x477ff000;    // 65520: rounds to f16 inf
  static constexpr std::int32_t round_half_minus_one = 0x0fff;    // below half of 2^13
  static constexpr float f16_min_normal_value = 0x1p-14f;
  static constexpr float subnormal_magic = 0.5f;             // ulp(0.5) = 2^-24 = f16 subnormal step
  static constexpr int bf16_shift = 16;
  static constexpr std::int32_t bf16_round_half_minus_one = 0x7fff;
  static constexpr std::int32_t bf16_quiet_bit = 0x0040;
  static constexpr std::int32_t bf16_mantissa_mask = 0x007f;
  static constexpr std::int32_t low16 = 0xffff;
};

// Shifts of 32-bit lanes by a constant. On AVX-512 these use the zero-masked intrinsics with an
// all-ones mask: GCC 12's plain _mm512_srai/slli/cvt* are written with _mm512_undefined_*() and
// raise false -Wmaybe-uninitialized warnings once inlined (GCC bug 105593).
#if XSIMD_WITH_AVX512F
inline constexpr __mmask16 all_lanes = 0xffff;

// Bits 0..255 of a 512-bit register.
template <class Arch>
inline __m256i low_half(__m512i v) {
  constexpr __mmask8 all_quads = 0xff;
  return _mm512_maskz_extracti64x4_epi64(all_quads, v, 0);
}
#endif

template <int N, class Arch>
inline ibatch<Arch> shift_left(ibatch<Arch> v) {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) {
    return _mm512_maskz_slli_epi32(all_lanes, v, N);
  } else
#endif
  {
    return v << N;
  }
}

// Arithmetic (sign-propagating) right shift.
template <int N, class Arch>
inline ibatch<Arch> shift_right(ibatch<Arch> v) {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) {
    return _mm512_maskz_srai_epi32(all_lanes, v, N);
  } else
#endif
  {
    return v >> N;
  }
}

// Zero-extends size 16-bit values at p into the 32-bit lanes of an int batch.
template <class Arch>
inline ibatch<Arch> widen_u16(const std::uint16_t* p) {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) {
    return _mm512_maskz_cvtepu16_epi32(all_lanes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  } else
#endif
#if XSIMD_WITH_AVX2
  if constexpr (is_avx2<Arch>) {
    return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  } else
#endif
#if XSIMD_WITH_SSE4_1
  if constexpr (is_sse4_1<Arch>) {
    return _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  } else
#endif
#if XSIMD_WITH_SSE2
  if constexpr (is_sse2<Arch>) {
    return _mm_unpacklo_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), _mm_setzero_si128());
  } else
#endif
  {
    static_assert(!std::is_same_v<Arch, Arch>, "widen_u16: no 16-bit widening path for this Arch");
  }
}

// Stores the low 16 bits of each 32-bit lane (every lane must hold a value in [0, 0xffff]).
template <class Arch>
inline void narrow_u16(std::uint16_t* p, ibatch<Arch> v) {
#if XSIMD_WITH_AVX512F
  if constexpr (is_avx512<Arch>) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtepi32_epi16(all_lanes, v));
  } else
#endif
#if XSIMD_WITH_AVX2
  if constexpr (is_avx2<Arch>) {
    constexpr int low_quads_of_each_lane = 0x08;  // 64-bit elements 0 and 2 -> 0 and 1
    const __m256i packed = _mm256_packus_epi32(v, v);  // [a0..a3 a0..a3 | a4..a7 a4..a7]
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, low_quads_of_each_lane)));
  } else
#endif
#if XSIMD_WITH_SSE4_1
  if constexpr (is_sse4_1<Arch>) {
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packus_epi32(v, v));
  } else
#endif
#if XSIMD_WITH_SSE2
  if constexpr (is_sse2<Arch>) {
    // SSE2 only packs with signed saturation: sign-extend the low 16 bits first.
    const __m128i s = _mm_srai_epi32(_mm_slli_epi32(v, 16), 16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi32(s, s));
  } else
#endif
  {
    static_assert(!std::is_same_v<Arch, Arch>, "narrow_u16: no 16-bit narrowing path for this Arch");
  }
}

// f16 bits (zero-extended in 32-bit lanes) -> float, exactly, with integer operations.
template <class Arch>
inline xsimd::batch<float, Arch> f16_bits_to_float(ibatch<Arch> h) {
  using batch = xsimd::batch<float, Arch>;
  using ib = ibatch<Arch>;
  using k = half_bits;
  const ib em = h & ib(k::f16_abs_mask);
  const ib sign = shift_left<k::sign_shift, Arch>(h & ib(k::f16_sign));
  ib bits = shift_left<k::mantissa_shift, Arch>(em) + ib(k::rebias);
  const auto infnan = em >= ib(k::f16_exp_mask);
  const auto subnormal = em < ib(k::f16_min_normal);
  bits = bits + xsimd::select(infnan, ib(k::rebias), ib(0));      // exponent 143 -> 255
  bits = bits + xsimd::select(subnormal, ib(k::exp_one), ib(0));  // 2^-14 + m 2^-24
  batch f = xsimd::bitwise_cast<batch>(bits);
  // A select, not f - (subnormal ? 2^-14 : 0): arithmetic on a signalling NaN would quiet it.
  f = xsimd::select(xsimd::bool_cast(subnormal), f - batch(k::f16_min_normal_value), f);
  return xsimd::bitwise_cast<batch>(xsimd::bitwise_cast<ib>(f) | sign);
}

// float -> f16 bits in 32-bit lanes, round to nearest even, NaN handled as in core/dtype.hpp.
template <class Arch>
inline ibatch<Arch> float_to_f16_bits(xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  using ib = ibatch<Arch>;
  using k = half_bits;
  const ib xi = xsimd::bitwise_cast<ib>(x);
  const ib ax = xi & ib(k::f32_abs_mask);
  const ib sign = shift_right<k::sign_shift, Arch>(xi) & ib(k::f16_sign);
  const ib lsb = shift_right<k::mantissa_shift, Arch>(ax) & ib(1);
  const ib normal = shift_right<k::mantissa_shift, Arch>(ax - ib(k::rebias) + ib(k::round_half_minus_one) + lsb);
  const ib sub = xsimd::bitwise_cast<ib>(xsimd::bitwise_cast<batch>(ax) + batch(k::subnormal_magic)) -
                 ib(std::bit_cast<std::int32_t>(k::subnormal_magic));
  ib payload = shift_right<k::mantissa_shift, Arch>(ax) & ib(k::f16_mantissa_mask);
  payload = xsimd::select(payload == ib(0), ib(k::f16_quiet_bit), payload);
  ib r = xsimd::select(ax < ib(k::f32_f16_min_normal), sub, normal);
  r = xsimd::select(ax >= ib(k::f32_f16_overflow), ib(k::f16_exp_mask), r);
  r = xsimd::select(ax > ib(k::f32_inf), ib(k::f16_exp_mask) | payload, r);
  return r | sign;
}

// float -> bf16 bits in 32-bit lanes, round to nearest even; a NaN keeps its top 16 bits, or gets
// the quiet bit if its payload would vanish (as in core/dtype.hpp).
template <class Arch>
inline ibatch<Arch> float_to_bf16_bits(xsimd::batch<float, Arch> x) {
  using ib = ibatch<Arch>;
  using k = half_bits;
  const ib xi = xsimd::bitwise_cast<ib>(x);
  const ib high = shift_right<k::bf16_shift, Arch>(xi) & ib(k::low16);
  const ib lsb = high & ib(1);
  const ib rounded = shift_right<k::bf16_shift, Arch>(xi + ib(k::bf16_round_half_minus_one) + lsb) & ib(k::low16);
  const ib nan = xsimd::select((high & ib(k::bf16_mantissa_mask)) == ib(0), high | ib(k::bf16_quiet_bit), high);
  return xsimd::select((xi & ib(k::f32_abs_mask)) > ib(k::f32_inf), nan, rounded);
}

// Lane-by-lane conversion through core/dtype.hpp: the fallback for any Arch and for MNEMO_NO_SIMD.
template <class Arch, class T>
inline xsimd::batch<float, Arch> load_scalar(const T* p) {
  using batch = xsimd::batch<float, Arch>;
  alignas(Arch::alignment()) float lanes[batch::size];
  for (std::size_t i = 0; i < batch::size; ++i) lanes[i] = to_float(p[i]);
  return batch::load_aligned(lanes);
}

template <class Arch, class T>
inline void store_scalar(T* p, xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  alignas(Arch::alignment()) float lanes[batch::size];
  x.store_aligned(lanes);
  for (std::size_t i = 0; i < batch::size; ++i) p[i] = from_float<T>(lanes[i]);
}

#if XSIMD_WITH_SSE2
// Rounding immediate of vcvtps2ph: nearest, ties to even, no precision exception.
inline constexpr int round_nearest_even = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#endif

// The low n bits set, for AVX-512 masked moves (n <= 16).
inline std::uint16_t lane_mask(std::int64_t n) {
  return static_cast<std::uint16_t>((std::uint32_t{1} << n) - 1u);
}

}  // namespace detail

// ---- loads ----

template <class Arch = default_arch>
inline fbatch<Arch> load(const float* p) {
  return fbatch<Arch>::load_unaligned(p);
}

template <class Arch = default_arch>
inline fbatch<Arch> load(const f16* p) {
  constexpr auto path = detail::f16_path<Arch>();
  [[maybe_unused]] const auto* bits = reinterpret_cast<const std::uint16_t*>(p);
  if constexpr (path == detail::cvt_path::avx512) {
#if XSIMD_WITH_AVX512F
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bits));
    return _mm512_maskz_cvtph_ps(detail::all_lanes, h);
#endif
  } else if constexpr (path == detail::cvt_path::f16c_256) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bits)));
#endif
  } else if constexpr (path == detail::cvt_path::f16c_128) {
#if defined(__F16C__)
    return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bits)));
#endif
  } else if constexpr (path == detail::cvt_path::int16) {
    return detail::f16_bits_to_float<Arch>(detail::widen_u16<Arch>(bits));
  } else {
    return detail::load_scalar<Arch>(p);
  }
}

template <class Arch = default_arch>
inline fbatch<Arch> load(const bf16* p) {
  if constexpr (detail::has_int16_path<Arch>()) {
    const auto wide = detail::widen_u16<Arch>(reinterpret_cast<const std::uint16_t*>(p));
    return xsimd::bitwise_cast<fbatch<Arch>>(detail::shift_left<detail::half_bits::bf16_shift, Arch>(wide));
  } else {
    return detail::load_scalar<Arch>(p);
  }
}

// The first n elements (0 <= n <= size) converted to f32, the other lanes 0. Reads p[0 .. n) only.
template <class Arch = default_arch, class T>
inline fbatch<Arch> load_partial(const T* p, std::int64_t n) {
  static_assert(is_kv_type_v<T>, "load_partial: T must be float, f16 or bf16");
  using batch = fbatch<Arch>;
  assert(n >= 0 && n <= static_cast<std::int64_t>(batch::size) && "load_partial: n must be in [0, size]");
#if XSIMD_WITH_AVX512F
  if constexpr (vectorized<Arch> && detail::is_avx512<Arch> && std::is_same_v<T, float>) {
    return _mm512_maskz_loadu_ps(detail::lane_mask(n), p);
  } else
#endif
#if XSIMD_WITH_AVX512BW
  if constexpr (vectorized<Arch> && detail::is_avx512bw<Arch>) {
    // 16 halves sit in the low 256 bits of a 512-bit masked load; lanes 16..31 are masked off.
    const __m256i h = detail::low_half<Arch>(_mm512_maskz_loadu_epi16(detail::lane_mask(n), p));
    if constexpr (std::is_same_v<T, f16>) {
      return _mm512_maskz_cvtph_ps(detail::all_lanes, h);
    } else {
      const detail::ibatch<Arch> wide = _mm512_maskz_cvtepu16_epi32(detail::all_lanes, h);
      return xsimd::bitwise_cast<batch>(detail::shift_left<detail::half_bits::bf16_shift, Arch>(wide));
    }
  } else
#endif
  {
    T buf[batch::size] = {};
    std::memcpy(buf, p, static_cast<std::size_t>(n) * sizeof(T));
    return load<Arch>(buf);
  }
}

// ---- stores ----

template <class Arch>
inline void store(float* p, xsimd::batch<float, Arch> x) {
  x.store_unaligned(p);
}

template <class Arch>
inline void store(f16* p, xsimd::batch<float, Arch> x) {
  constexpr auto path = detail::f16_path<Arch>();
  [[maybe_unused]] auto* bits = reinterpret_cast<std::uint16_t*>(p);
  if constexpr (path == detail::cvt_path::avx512) {
#if XSIMD_WITH_AVX512F
    const __m256i h = _mm512_maskz_cvtps_ph(detail::all_lanes, x, detail::round_nearest_even);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bits), h);
#endif
  } else if constexpr (path == detail::cvt_path::f16c_256) {
#if defined(__F16C__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(bits), _mm256_cvtps_ph(x, detail::round_nearest_even));
#endif
  } else if constexpr (path == detail::cvt_path::f16c_128) {
#if defined(__F16C__)
    _mm_storel_epi64(reinterpret_cast<__m128i*>(bits), _mm_cvtps_ph(x, detail::round_nearest_even));
#endif
  } else if constexpr (path == detail::cvt_path::int16) {
    detail::narrow_u16<Arch>(bits, detail::float_to_f16_bits<Arch>(x));
  } else {
    detail::store_scalar<Arch>(p, x);
  }
}

template <class Arch>
inline void store(bf16* p, xsimd::batch<float, Arch> x) {
  if constexpr (detail::has_int16_path<Arch>()) {
    detail::narrow_u16<Arch>(reinterpret_cast<std::uint16_t*>(p), detail::float_to_bf16_bits<Arch>(x));
  } else {
    detail::store_scalar<Arch>(p, x);
  }
}

// Stores the first n lanes (0 <= n <= size) of x to p[0 .. n); writes nothing else.
template <class Arch, class T>
inline void store_partial(T* p, xsimd::batch<float, Arch> x, std::int64_t n) {
  static_assert(is_kv_type_v<T>, "store_partial: T must be float, f16 or bf16");
  using batch = xsimd::batch<float, Arch>;
  assert(n >= 0 && n <= static_cast<std::int64_t>(batch::size) && "store_partial: n must be in [0, size]");
#if XSIMD_WITH_AVX512F
  if constexpr (vectorized<Arch> && detail::is_avx512<Arch> && std::is_same_v<T, float>) {
    _mm512_mask_storeu_ps(p, detail::lane_mask(n), x);
  } else
#endif
#if XSIMD_WITH_AVX512BW
  if constexpr (vectorized<Arch> && detail::is_avx512bw<Arch>) {
    __m256i h;
    if constexpr (std::is_same_v<T, f16>) {
      h = _mm512_maskz_cvtps_ph(detail::all_lanes, x, detail::round_nearest_even);
    } else {
      h = _mm512_maskz_cvtepi32_epi16(detail::all_lanes, detail::float_to_bf16_bits<Arch>(x));
    }
    _mm512_mask_storeu_epi16(p, detail::lane_mask(n), _mm512_castsi256_si512(h));
  } else
#endif
  {
    T buf[batch::size];
    store(buf, x);
    std::memcpy(p, buf, static_cast<std::size_t>(n) * sizeof(T));
  }
}

// dst[i] = src[i] converted (through f32) for i in [0, n); From, To in {float, f16, bf16}.
template <class Arch = default_arch, class From, class To>
inline void convert(const From* src, To* dst, std::int64_t n) {
  static_assert(is_kv_type_v<From> && is_kv_type_v<To>,
                "convert: From and To must be float, f16 or bf16");
  if constexpr (!vectorized<Arch>) {
    for (std::int64_t i = 0; i < n; ++i) dst[i] = from_float<To>(to_float(src[i]));
  } else {
    constexpr std::int64_t w = width<Arch>;
    std::int64_t i = 0;
    for (; i + w <= n; i += w) store(dst + i, load<Arch>(src + i));
    if (i < n) store_partial(dst + i, load_partial<Arch>(src + i, n - i), n - i);
  }
}

}  // namespace mnemo::simd

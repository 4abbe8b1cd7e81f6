// mnemo/kvcache/quant.hpp — the int8 / int4 / int2 group quantizers of the KV cache (KIVI-style).
//
// Asymmetric uniform quantization of a group of values x with b bits (levels = 2^b - 1):
//   min = min_i x_i,  scale = (max_i x_i - min) / levels,
//   code_i = clamp(round_half_even((x_i - min) / scale), 0, levels)     (scale = 0: code_i = 0)
//   x_i ~ min + scale * code_i,     |x_i - (min + scale * code_i)| <= scale / 2   (+ f32 rounding)
// KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache") groups
// keys per channel (outlier channels of K keep their own range: a group is one channel over a
// block of tokens) and values per token (a group is a block of channels of one token). Both
// groupings are here:
//   quantize_token     one token's row x[n], groups of `group` consecutive channels  (values)
//   quantize_channels  rows x[t][c] of n tokens, one group per channel c              (keys)
// Codes are packed per token row: int8 one byte per channel; int4 two channels per byte, channel
// 2i in the low nibble and 2i + 1 in the high nibble (row_bytes = ceil(D / 2)); int2 (KIVI's 2-bit
// format) four channels per byte, channel 4i + k in bits [2k, 2k + 2) (row_bytes = ceil(D / 4)).
// Scales and minimums are stored in f32.
//
// The decode kernel never dequantizes to memory: it reads codes as floats (load_codes, below) and
// folds scale and min into the dot products (kvcache/decode.hpp), so reading int4 K/V moves a
// quarter of the bytes of f16 (int2: an eighth). Non-finite inputs have no meaningful range, and neither has a group
// whose max - min overflows f32 (then scale = inf and every code reads back as NaN): the cache
// rejects both before quantizing (append, set_keys), so these functions assume finite x with
// |x| <= max_magnitude.
//
// `reference` holds the readable scalar loops; the SIMD functions below produce bit-identical
// codes, scales and minimums (the same min/max, the same division and rounding), which the tests
// check.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::kvcache::quant {

// The largest |x| the quantizers take: half of FLT_MAX, so that the range max - min of any group
// and min + scale * code stay finite floats (3e38 and -3e38 in one group would give scale = inf).
inline constexpr float max_magnitude = std::numeric_limits<float>::max() / 2;

// Whether x can be quantized: finite and |x| <= max_magnitude (false for NaN).
inline bool quantizable(float x) { return std::abs(x) <= max_magnitude; }

// x [Hkv, n, D] finite with |x| <= limit, else mnemo::error naming fn, the tensor (`name`), the
// bound (`why` says where it comes from), the value and where it is.
inline void require_bounded(const char* fn, const char* name, view<const float, 3> x, float limit, const char* why) {
  for (std::int64_t h = 0; h < x.extent(0); ++h)
    for (std::int64_t t = 0; t < x.extent(1); ++t)
      for (std::int64_t c = 0; c < x.extent(2); ++c)
        if (!(std::abs(x(h, t, c)) <= limit))
          mnemo::detail::fail(fn, ": ", name, " must be finite with |", name, "| <= ", limit, why, ", got ", x(h, t, c),
                              " at [", h, ", ", t, ", ", c, "]");
}

// The check of every append to a quantized cache (layer_cache, paged_cache): k [Hkv, n, D] and
// v [Hkv, n, Dv] finite with |x| <= max_magnitude, else mnemo::error naming fn, the tensor, the
// value and where it is.
inline void require_quantizable(const char* fn, view<const float, 3> k, view<const float, 3> v) {
  constexpr const char* why = " (quant::max_magnitude) for quantized storage";
  require_bounded(fn, "k", k, max_magnitude, why);
  require_bounded(fn, "v", v, max_magnitude, why);
}

// The highest code of a b-bit quantizer.
constexpr int levels(int bits) { return (1 << bits) - 1; }

// Whether b is a code width of the quantizers.
constexpr bool valid_bits(int bits) { return bits == 8 || bits == 4 || bits == 2; }

// Codes per byte of a b-bit row.
constexpr int codes_per_byte(int bits) { return 8 / bits; }

// Bytes of one packed row of n codes.
constexpr std::int64_t row_bytes(int bits, std::int64_t n) {
  return (n + codes_per_byte(bits) - 1) / codes_per_byte(bits);
}

// Code c of a packed row: bits [(c mod k) b, (c mod k) b + b) of byte c / k, k = codes_per_byte(b).
inline int get_code(const std::uint8_t* row, int bits, std::int64_t c) {
  if (bits == 8) return row[c];
  const int k = codes_per_byte(bits), shift = static_cast<int>(c % k) * bits;
  return (row[c / k] >> shift) & levels(bits);
}

inline void set_code(std::uint8_t* row, int bits, std::int64_t c, int code) {
  if (bits == 8) {
    row[c] = static_cast<std::uint8_t>(code);
    return;
  }
  const int k = codes_per_byte(bits), shift = static_cast<int>(c % k) * bits;
  std::uint8_t& b = row[c / k];
  b = static_cast<std::uint8_t>((b & ~(levels(bits) << shift)) | (code << shift));
}

// Scale of a group with range [lo, hi].
inline float fit_scale(float lo, float hi, int bits) { return (hi - lo) / static_cast<float>(levels(bits)); }

// The code of x in a group (min, scale).
inline int encode(float x, float min, float scale, int bits) {
  if (scale == 0) return 0;
  const float q = std::nearbyint((x - min) / scale);  // round half to even (default rounding mode)
  return static_cast<int>(std::clamp(q, 0.0f, static_cast<float>(levels(bits))));
}

inline float decode_value(int code, float min, float scale) { return min + scale * static_cast<float>(code); }

namespace reference {

// One token: x[0 .. n) in groups of `group` channels (the last may be shorter): scale[g], min[g],
// codes packed into `codes` (row_bytes(bits, n) bytes).
inline void quantize_token(const float* x, std::int64_t n, std::int64_t group, int bits, std::uint8_t* codes,
                           float* scale, float* min) {
  for (std::int64_t g0 = 0, g = 0; g0 < n; g0 += group, ++g) {
    const std::int64_t g1 = std::min(n, g0 + group);
    float lo = x[g0], hi = x[g0];
    for (std::int64_t c = g0; c < g1; ++c) {
      lo = std::min(lo, x[c]);
      hi = std::max(hi, x[c]);
    }
    min[g] = lo;
    scale[g] = fit_scale(lo, hi, bits);
    for (std::int64_t c = g0; c < g1; ++c) set_code(codes, bits, c, encode(x[c], lo, scale[g], bits));
  }
}

inline void dequantize_token(const std::uint8_t* codes, std::int64_t n, std::int64_t group, int bits,
                             const float* scale, const float* min, float* x) {
  for (std::int64_t c = 0; c < n; ++c) x[c] = decode_value(get_code(codes, bits, c), min[c / group], scale[c / group]);
}

// Keys: rows x + t * xs (t < n) of D channels; per channel c one group over the n tokens:
// scale[c], min[c]; token t's codes go to codes + t * cs.
inline void quantize_channels(const float* x, std::int64_t xs, std::int64_t n, std::int64_t D, int bits,
                              std::uint8_t* codes, std::int64_t cs, float* scale, float* min) {
  for (std::int64_t c = 0; c < D; ++c) {
    float lo = x[c], hi = x[c];
    for (std::int64_t t = 1; t < n; ++t) {
      lo = std::min(lo, x[t * xs + c]);
      hi = std::max(hi, x[t * xs + c]);
    }
    min[c] = lo;
    scale[c] = fit_scale(lo, hi, bits);
    for (std::int64_t t = 0; t < n; ++t) set_code(codes + t * cs, bits, c, encode(x[t * xs + c], lo, scale[c], bits));
  }
}

// One key row from its channel groups: x[c] = min[c] + scale[c] * code_c.
inline void dequantize_channels(const std::uint8_t* codes, std::int64_t D, int bits, const float* scale,
                                const float* min, float* x) {
  for (std::int64_t c = 0; c < D; ++c) x[c] = decode_value(get_code(codes, bits, c), min[c], scale[c]);
}

}  // namespace reference

// ---------------------------------------------------------------------------------------------
// SIMD: codes as float batches.

namespace detail {

template <class Arch>
inline constexpr std::int64_t lanes = simd::lanes<Arch>;

// Lane by lane, for any Arch without a hand-written path and for partial batches: codes
// c .. c + n of `row` as floats, zero after n.
template <class Arch>
inline simd::fbatch<Arch> load_codes_scalar(const std::uint8_t* row, int bits, std::int64_t c, std::int64_t n) {
  using batch = simd::fbatch<Arch>;
  alignas(64) float f[batch::size] = {};
  for (std::int64_t i = 0; i < n; ++i) f[i] = static_cast<float>(get_code(row, bits, c + i));
  return batch::load_aligned(f);
}

#if XSIMD_WITH_SSE2
// The 2n nibbles of the low n bytes as 2n bytes in channel order (low nibble first).
template <class Arch>
inline __m128i unpack_nibbles(__m128i bytes) {
  const __m128i mask = _mm_set1_epi8(0x0f);
  constexpr int nibble = 4;
  const __m128i lo = _mm_and_si128(bytes, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, nibble), mask);
  return _mm_unpacklo_epi8(lo, hi);
}
#endif

}  // namespace detail

// Codes [c, c + W) of a packed row as floats (c a multiple of W; all W codes exist). Reads exactly
// the bytes of those codes: W bytes (int8), W / 2 (int4) or W / 4 (int2). int2 broadcasts those
// W / 4 bytes to every 32-bit lane and shifts lane i right by 2i (one variable shift, one mask).
template <class Arch, int Bits>
inline simd::fbatch<Arch> load_codes(const std::uint8_t* row, std::int64_t c) {
  static_assert(valid_bits(Bits), "load_codes: Bits must be 8, 4 or 2");
#if XSIMD_WITH_AVX512F
  if constexpr (simd::vectorized<Arch> && simd::detail::is_avx512<Arch> && Bits == 2) {
    std::int32_t four;  // 16 codes
    std::memcpy(&four, row + c / 4, sizeof four);
    const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i codes = _mm512_maskz_and_epi32(
        simd::detail::all_lanes, _mm512_maskz_srlv_epi32(simd::detail::all_lanes, _mm512_set1_epi32(four), shifts),
        _mm512_set1_epi32(levels(2)));
    return _mm512_maskz_cvtepi32_ps(simd::detail::all_lanes, codes);
  } else if constexpr (simd::vectorized<Arch> && simd::detail::is_avx512<Arch>) {
    __m128i bytes;
    if constexpr (Bits == 8) bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c));
    else bytes = detail::unpack_nibbles<Arch>(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2)));
    return _mm512_maskz_cvtepi32_ps(simd::detail::all_lanes,
                                    _mm512_maskz_cvtepu8_epi32(simd::detail::all_lanes, bytes));
  } else
#endif
#if XSIMD_WITH_AVX2
  if constexpr (simd::vectorized<Arch> && simd::detail::is_avx2<Arch> && Bits == 2) {
    std::uint16_t two;  // 8 codes
    std::memcpy(&two, row + c / 4, sizeof two);
    const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    const __m256i codes = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(two), shifts), _mm256_set1_epi32(levels(2)));
    return _mm256_cvtepi32_ps(codes);
  } else if constexpr (simd::vectorized<Arch> && simd::detail::is_avx2<Arch>) {
    __m128i bytes;
    if constexpr (Bits == 8) {
      bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c));
    } else {
      std::int32_t four;
      std::memcpy(&four, row + c / 2, sizeof four);
      bytes = detail::unpack_nibbles<Arch>(_mm_cvtsi32_si128(four));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
  } else
#endif
  {
    return detail::load_codes_scalar<Arch>(row, Bits, c, static_cast<std::int64_t>(simd::fbatch<Arch>::size));
  }
}

// Codes [c, c + 2W) as two float batches, in the order that is cheapest to unpack (c a multiple of
// 2W; all 2W codes exist):
//   int8, int2  first = codes c .. c + W - 1, second = codes c + W .. c + 2W - 1   (natural order)
//   int4  first = codes c, c + 2, .., c + 2W - 2 (low nibbles of W bytes),
//         second = codes c + 1, c + 3, .., c + 2W - 1 (high nibbles)
// Lane i of batch b holds the code of channel c + pair_channel<Bits>(b * W + i, W). Splitting the
// nibbles instead of interleaving them back saves a byte shuffle per W codes; the decode kernel
// lays its f32 operands out in the same order (a permutation inside each 2W block), which a dot
// product or an axpy does not notice. (AVX-512, D = 128, int4 decode at Lk = 32768: see decode.hpp.)
template <int Bits>
constexpr std::int64_t pair_channel(std::int64_t lane, std::int64_t W) {
  if constexpr (Bits != 4) return lane;
  else return lane < W ? 2 * lane : 2 * (lane - W) + 1;
}

template <class Arch, int Bits>
inline void load_code_pair(const std::uint8_t* row, std::int64_t c, simd::fbatch<Arch>& first,
                           simd::fbatch<Arch>& second) {
  static_assert(valid_bits(Bits), "load_code_pair: Bits must be 8, 4 or 2");
  constexpr std::int64_t W = static_cast<std::int64_t>(simd::fbatch<Arch>::size);
  if constexpr (Bits != 4) {
    first = load_codes<Arch, Bits>(row, c);
    second = load_codes<Arch, Bits>(row, c + W);
  } else {
#if XSIMD_WITH_AVX512F
    if constexpr (simd::vectorized<Arch> && simd::detail::is_avx512<Arch>) {
      const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2));
      const __m128i mask = _mm_set1_epi8(0x0f);
      constexpr int nibble = 4;
      const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, nibble), mask);
      first = _mm512_maskz_cvtepi32_ps(simd::detail::all_lanes, _mm512_maskz_cvtepu8_epi32(simd::detail::all_lanes, lo));
      second = _mm512_maskz_cvtepi32_ps(simd::detail::all_lanes, _mm512_maskz_cvtepu8_epi32(simd::detail::all_lanes, hi));
      return;
    }
#endif
#if XSIMD_WITH_AVX2
    if constexpr (simd::vectorized<Arch> && simd::detail::is_avx2<Arch>) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c / 2));
      const __m128i mask = _mm_set1_epi8(0x0f);
      constexpr int nibble = 4;
      const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, nibble), mask);
      first = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
      second = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
      return;
    }
#endif
    alignas(64) float a[W], b[W];
    for (std::int64_t i = 0; i < W; ++i) {
      a[i] = static_cast<float>(get_code(row, 4, c + pair_channel<4>(i, W)));
      b[i] = static_cast<float>(get_code(row, 4, c + pair_channel<4>(W + i, W)));
    }
    first = simd::fbatch<Arch>::load_aligned(a);
    second = simd::fbatch<Arch>::load_aligned(b);
  }
}

// Codes [c, c + n) as floats, zero after n (n < W); reads nothing past code c + n.
template <class Arch, int Bits>
inline simd::fbatch<Arch> load_codes_partial(const std::uint8_t* row, std::int64_t c, std::int64_t n) {
  return detail::load_codes_scalar<Arch>(row, Bits, c, n);
}

// sum_c a[c] * code_c over c in [0, n).
template <class Arch, int Bits>
inline float dot_codes(const float* a, const std::uint8_t* row, std::int64_t n) {
  if constexpr (!simd::vectorized<Arch>) {
    float s = 0;
    for (std::int64_t c = 0; c < n; ++c) s += a[c] * static_cast<float>(get_code(row, Bits, c));
    return s;
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    batch acc0(0.0f), acc1(0.0f);
    std::int64_t c = 0;
    for (; c + 2 * W <= n; c += 2 * W) {
      acc0 = simd::detail::fmadd(simd::load<Arch>(a + c), load_codes<Arch, Bits>(row, c), acc0);
      acc1 = simd::detail::fmadd(simd::load<Arch>(a + c + W), load_codes<Arch, Bits>(row, c + W), acc1);
    }
    for (; c + W <= n; c += W) acc0 = simd::detail::fmadd(simd::load<Arch>(a + c), load_codes<Arch, Bits>(row, c), acc0);
    if (c < n)
      acc1 = simd::detail::fmadd(simd::load_partial<Arch>(a + c, n - c), load_codes_partial<Arch, Bits>(row, c, n - c),
                                 acc1);
    return simd::hsum(acc0 + acc1);
  }
}

// One token dequantized: x[c] = min[c / group] + scale[c / group] * code_c, as one FMA per element
// (so within one f32 rounding of reference::dequantize_token, which multiplies and adds).
template <class Arch, int Bits>
inline void dequantize_token(const std::uint8_t* codes, std::int64_t n, std::int64_t group, const float* scale,
                             const float* min, float* x) {
  constexpr std::int64_t W = detail::lanes<Arch>;
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    if (group % W == 0)
      for (; c + W <= n; c += W) {
        const std::int64_t g = c / group;
        simd::store(x + c, simd::detail::fmadd(batch(scale[g]), load_codes<Arch, Bits>(codes, c), batch(min[g])));
      }
  }
  for (; c < n; ++c)
    x[c] = simd::detail::fmadd<Arch>(scale[c / group], static_cast<float>(get_code(codes, Bits, c)), min[c / group]);
}

// One token quantized, the same codes, scales and minimums as reference::quantize_token: the group
// range by vector min/max, the codes by the same division and round-half-even per lane.
template <class Arch, int Bits>
inline void quantize_token(const float* x, std::int64_t n, std::int64_t group, std::uint8_t* codes, float* scale,
                           float* min) {
  constexpr std::int64_t W = detail::lanes<Arch>;
  for (std::int64_t g0 = 0, g = 0; g0 < n; g0 += group, ++g) {
    const std::int64_t g1 = std::min(n, g0 + group);
    float lo = x[g0], hi = x[g0];
    std::int64_t c = g0;
    if constexpr (simd::vectorized<Arch>) {
      using batch = simd::fbatch<Arch>;
      if (g1 - g0 >= W) {
        batch blo = simd::load<Arch>(x + g0), bhi = blo;
        for (c = g0 + W; c + W <= g1; c += W) {
          const batch v = simd::load<Arch>(x + c);
          blo = xsimd::min(blo, v);
          bhi = xsimd::max(bhi, v);
        }
        lo = -simd::hmax(-blo);
        hi = simd::hmax(bhi);
      }
    }
    for (; c < g1; ++c) {
      lo = std::min(lo, x[c]);
      hi = std::max(hi, x[c]);
    }
    min[g] = lo;
    scale[g] = fit_scale(lo, hi, Bits);
    c = g0;
    if constexpr (simd::vectorized<Arch>) {
      using batch = simd::fbatch<Arch>;
      alignas(64) float q[batch::size];
      const batch bmin(lo), bscale(scale[g]), top(static_cast<float>(levels(Bits))), zero(0.0f);
      if (scale[g] != 0)
        for (; c + W <= g1; c += W) {
          const batch v = xsimd::nearbyint((simd::load<Arch>(x + c) - bmin) / bscale);
          xsimd::min(xsimd::max(v, zero), top).store_aligned(q);
          for (std::int64_t i = 0; i < W; ++i) set_code(codes, Bits, c + i, static_cast<int>(q[i]));
        }
    }
    for (; c < g1; ++c) set_code(codes, Bits, c, encode(x[c], lo, scale[g], Bits));
  }
}

}  // namespace mnemo::kvcache::quant

// mnemo/core/dtype.hpp — 16-bit storage types: IEEE half (f16) and bfloat16 (bf16).
//
// Both are storage only: arithmetic converts to float32 (all mnemo kernels accumulate in f32,
// references in double). float -> f16/bf16 rounds to nearest, ties to even; overflow gives
// +-inf, values below half the smallest f16 subnormal give +-0. NaN stays NaN (the payload's
// top bits are kept; a payload that would vanish becomes the quiet bit), so every f16 and bf16
// bit pattern survives the round trip through float unchanged.
//
// These are the portable scalar conversions; simd/ converts whole vectors with F16C/AVX-512
// where the build has them, and the tests hold the two to the same answers.
#pragma once

#include <bit>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace mnemo {

namespace detail {

constexpr std::uint16_t float_to_f16_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t ax = x & 0x7fffffffu;
  constexpr std::uint32_t f32_inf = 0x7f800000u;
  constexpr std::uint32_t f16_inf = 0x7c00u;
  constexpr std::uint32_t f16_overflow = 0x477ff000u;      // 65520: halfway 65504 -> 65536, rounds to inf
  constexpr std::uint32_t f16_min_normal = 0x38800000u;    // 2^-14
  constexpr std::uint32_t f16_half_min_sub = 0x33000000u;  // 2^-25: half the smallest subnormal
  constexpr std::uint32_t rebias = 112u << 23;             // (127 - 15) in the exponent field

  if (ax >= f32_inf) {
    if (ax == f32_inf) return static_cast<std::uint16_t>(sign | f16_inf);
    std::uint32_t payload = (ax >> 13) & 0x3ffu;
    if (payload == 0) payload = 0x200u;
    return static_cast<std::uint16_t>(sign | f16_inf | payload);
  }
  if (ax >= f16_overflow) return static_cast<std::uint16_t>(sign | f16_inf);
  if (ax < f16_min_normal) {
    if (ax <= f16_half_min_sub) return static_cast<std::uint16_t>(sign);  // ties to even: 0
    const std::uint32_t e = ax >> 23;
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126u - e;  // value / 2^-24 = m >> shift
    std::uint32_t n = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1u);
    const std::uint32_t half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (n & 1u))) ++n;
    return static_cast<std::uint16_t>(sign | n);
  }
  std::uint32_t n = (ax - rebias) >> 13;
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (n & 1u))) ++n;  // a carry rounds into the exponent
  return static_cast<std::uint16_t>(sign | n);
}

constexpr float f16_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  std::uint32_t e = (h >> 10) & 0x1fu;
  std::uint32_t m = h & 0x3ffu;
  std::uint32_t bits = 0;
  if (e == 0x1fu) {
    bits = sign | 0x7f800000u | (m << 13);
  } else if (e != 0) {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  } else if (m == 0) {
    bits = sign;
  } else {  // subnormal: normalise
    e = 1;
    while (!(m & 0x400u)) {
      m <<= 1;
      --e;
    }
    bits = sign | ((e + 112u) << 23) | ((m & 0x3ffu) << 13);
  }
  return std::bit_cast<float>(bits);
}

constexpr std::uint16_t float_to_bf16_bits(float f) {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {  // NaN: keep the payload's top bits, as for f16
    const std::uint32_t top = x >> 16;
    return static_cast<std::uint16_t>((top & 0x7fu) ? top : top | 0x40u);
  }
  const std::uint32_t lsb = (x >> 16) & 1u;
  return static_cast<std::uint16_t>((x + 0x7fffu + lsb) >> 16);
}

constexpr float bf16_bits_to_float(std::uint16_t b) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

struct f16 {
  std::uint16_t bits = 0;

  f16() = default;
  constexpr explicit f16(float f) : bits(detail::float_to_f16_bits(f)) {}
  static constexpr f16 from_bits(std::uint16_t b) {
    f16 h;
    h.bits = b;
    return h;
  }
  constexpr explicit operator float() const { return detail::f16_bits_to_float(bits); }
  friend constexpr bool operator==(f16 a, f16 b) { return a.bits == b.bits; }
};

struct bf16 {
  std::uint16_t bits = 0;

  bf16() = default;
  constexpr explicit bf16(float f) : bits(detail::float_to_bf16_bits(f)) {}
  static constexpr bf16 from_bits(std::uint16_t b) {
    bf16 h;
    h.bits = b;
    return h;
  }
  constexpr explicit operator float() const { return detail::bf16_bits_to_float(bits); }
  friend constexpr bool operator==(bf16 a, bf16 b) { return a.bits == b.bits; }
};

static_assert(sizeof(f16) == 2 && sizeof(bf16) == 2, "f16 and bf16 must be 2-byte storage types");

// Any storage type -> float (identity for float).
template <class T>
constexpr float to_float(T x) {
  return static_cast<float>(x);
}

// float -> any storage type, rounding to nearest even.
template <class T>
constexpr T from_float(float x) {
  return T(x);
}

// Element types a K/V view may hold.
template <class T>
inline constexpr bool is_kv_type_v = std::is_same_v<T, float> || std::is_same_v<T, f16> || std::is_same_v<T, bf16>;

template <class T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, f16>) return "float16";
  else if constexpr (std::is_same_v<T, bf16>) return "bfloat16";
  else if constexpr (std::is_same_v<T, double>) return "float64";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "int64";
  else return "unknown";
}

}  // namespace mnemo

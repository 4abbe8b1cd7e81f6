// mnemo/simd/vec.hpp — BLAS-1 style loops over contiguous float/f16/bf16 vectors.
//
//   dot(a, b, n)            sum_i a[i] * b[i]                      a: float, b: float | f16 | bf16
//   axpy(alpha, x, y, n)    y[i] += alpha * x[i]                   x: float | f16 | bf16, y: float
//   scale(alpha, y, n)      y[i] *= alpha
//   reduce_max(x, n)        max_i x[i]          (-inf for n == 0)
//   reduce_sum(x, n)        sum_i x[i]          (0 for n == 0)
//   exp_sum(x, n, shift)    x[i] = exp(x[i] - shift), returns sum_i x[i]
//                           (shift = -inf: the row is all -inf; x is zeroed and 0 returned, no NaN)
//   hsum(v), hmax(v)        sum / maximum of the lanes of one batch
//
// Numerics: everything accumulates in float32 (the references below in double). The vector
// loops keep `unroll` independent accumulators so consecutive FMAs do not wait on each other
// (FMA latency 4 cycles, 2 per cycle on the cores we target), and add them pairwise at the end,
// so a result's rounding depends on n and on the batch width of the build, never on alignment.
// The last n % size elements go through load_partial / store_partial, which touch nothing past
// x + n (masked moves on AVX-512). NaN inputs give NaN sums; reduce_max's result for NaN inputs
// is unspecified (x86 max is not NaN-propagating).
//
// Under MNEMO_NO_SIMD each function is the plain scalar loop, accumulating in one float.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mnemo/core/dtype.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::simd {

namespace reference {

// The obviously correct loops, in double; tests compare the fast paths against these.
template <class T>
double dot(const float* a, const T* b, std::int64_t n) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * static_cast<double>(to_float(b[i]));
  return s;
}

inline double reduce_sum(const float* x, std::int64_t n) {
  double s = 0;
  for (std::int64_t i = 0; i < n; ++i) s += x[i];
  return s;
}

inline float reduce_max(const float* x, std::int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

}  // namespace reference

// Independent accumulators in the reductions (see the header comment).
inline constexpr std::int64_t unroll = 4;

// Sum of the lanes of a batch.
template <class Arch>
inline float hsum(xsimd::batch<float, Arch> x) {
  return xsimd::hadd(x);
}

// Maximum of the lanes of a batch.
template <class Arch>
inline float hmax(xsimd::batch<float, Arch> x) {
  using batch = xsimd::batch<float, Arch>;
  alignas(Arch::alignment()) float lanes[batch::size];
  x.store_aligned(lanes);
  float m = lanes[0];
  for (std::size_t i = 1; i < batch::size; ++i) m = std::max(m, lanes[i]);
  return m;
}

template <class Arch = default_arch, class T>
inline float dot(const float* a, const T* b, std::int64_t n) {
  static_assert(is_kv_type_v<T>, "dot: b must point to float, f16 or bf16");
  if constexpr (!vectorized<Arch>) {
    float s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += a[i] * to_float(b[i]);
    return s;
  } else {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    batch acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);
    std::int64_t i = 0;
    for (; i + unroll * w <= n; i += unroll * w) {
      acc0 = detail::fmadd(load<Arch>(a + i), load<Arch>(b + i), acc0);
      acc1 = detail::fmadd(load<Arch>(a + i + w), load<Arch>(b + i + w), acc1);
      acc2 = detail::fmadd(load<Arch>(a + i + 2 * w), load<Arch>(b + i + 2 * w), acc2);
      acc3 = detail::fmadd(load<Arch>(a + i + 3 * w), load<Arch>(b + i + 3 * w), acc3);
    }
    for (; i + w <= n; i += w) acc0 = detail::fmadd(load<Arch>(a + i), load<Arch>(b + i), acc0);
    if (i < n) acc1 = detail::fmadd(load_partial<Arch>(a + i, n - i), load_partial<Arch>(b + i, n - i), acc1);
    return hsum((acc0 + acc1) + (acc2 + acc3));
  }
}

template <class Arch = default_arch, class T>
inline void axpy(float alpha, const T* x, float* y, std::int64_t n) {
  static_assert(is_kv_type_v<T>, "axpy: x must point to float, f16 or bf16");
  if constexpr (!vectorized<Arch>) {
    for (std::int64_t i = 0; i < n; ++i) y[i] += alpha * to_float(x[i]);
  } else {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    const batch a(alpha);
    std::int64_t i = 0;
    for (; i + w <= n; i += w) store(y + i, detail::fmadd(a, load<Arch>(x + i), load<Arch>(y + i)));
    if (i < n) {
      store_partial(y + i, detail::fmadd(a, load_partial<Arch>(x + i, n - i), load_partial<Arch>(y + i, n - i)), n - i);
    }
  }
}

template <class Arch = default_arch>
inline void scale(float alpha, float* y, std::int64_t n) {
  if constexpr (!vectorized<Arch>) {
    for (std::int64_t i = 0; i < n; ++i) y[i] *= alpha;
  } else {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    const batch a(alpha);
    std::int64_t i = 0;
    for (; i + w <= n; i += w) store(y + i, a * load<Arch>(y + i));
    if (i < n) store_partial(y + i, a * load_partial<Arch>(y + i, n - i), n - i);
  }
}

template <class Arch = default_arch>
inline float reduce_max(const float* x, std::int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  std::int64_t i = 0;
  if constexpr (vectorized<Arch>) {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    if (n >= w) {
      batch m0 = load<Arch>(x), m1 = m0, m2 = m0, m3 = m0;
      for (i = w; i + unroll * w <= n; i += unroll * w) {
        m0 = xsimd::max(m0, load<Arch>(x + i));
        m1 = xsimd::max(m1, load<Arch>(x + i + w));
        m2 = xsimd::max(m2, load<Arch>(x + i + 2 * w));
        m3 = xsimd::max(m3, load<Arch>(x + i + 3 * w));
      }
      for (; i + w <= n; i += w) m0 = xsimd::max(m0, load<Arch>(x + i));
      m = hmax(xsimd::max(xsimd::max(m0, m1), xsimd::max(m2, m3)));
    }
  }
  for (; i < n; ++i) m = std::max(m, x[i]);  // scalar tail: a zero-filled partial batch would bias the max
  return m;
}

template <class Arch = default_arch>
inline float reduce_sum(const float* x, std::int64_t n) {
  if constexpr (!vectorized<Arch>) {
    float s = 0;
    for (std::int64_t i = 0; i < n; ++i) s += x[i];
    return s;
  } else {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    batch acc0(0.0f), acc1(0.0f), acc2(0.0f), acc3(0.0f);
    std::int64_t i = 0;
    for (; i + unroll * w <= n; i += unroll * w) {
      acc0 += load<Arch>(x + i);
      acc1 += load<Arch>(x + i + w);
      acc2 += load<Arch>(x + i + 2 * w);
      acc3 += load<Arch>(x + i + 3 * w);
    }
    for (; i + w <= n; i += w) acc0 += load<Arch>(x + i);
    if (i < n) acc1 += load_partial<Arch>(x + i, n - i);
    return hsum((acc0 + acc1) + (acc2 + acc3));
  }
}

// x[i] = exp(x[i] - shift) in place; returns the float sum of the new x. shift is normally the
// row maximum, so every exponent is <= 0 and nothing overflows. shift = -inf means every x[i] is
// -inf (a fully masked row): x is zeroed and 0 returned instead of exp(-inf + inf) = NaN.
template <class Arch = default_arch>
inline float exp_sum(float* x, std::int64_t n, float shift) {
  if (shift == -std::numeric_limits<float>::infinity()) {
    std::fill(x, x + n, 0.0f);
    return 0.0f;
  }
  if constexpr (!vectorized<Arch>) {
    float s = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      x[i] = exp<Arch>(x[i] - shift);
      s += x[i];
    }
    return s;
  } else {
    using batch = fbatch<Arch>;
    constexpr std::int64_t w = width<Arch>;
    const batch sh(shift);
    batch acc0(0.0f), acc1(0.0f);
    std::int64_t i = 0;
    for (; i + 2 * w <= n; i += 2 * w) {
      const batch e0 = simd::exp(load<Arch>(x + i) - sh);
      const batch e1 = simd::exp(load<Arch>(x + i + w) - sh);
      store(x + i, e0);
      store(x + i + w, e1);
      acc0 += e0;
      acc1 += e1;
    }
    for (; i + w <= n; i += w) {
      const batch e = simd::exp(load<Arch>(x + i) - sh);
      store(x + i, e);
      acc0 += e;
    }
    if (i < n) {
      // The lanes past n hold exp(0 - shift); only the n stored values are summed (read back).
      store_partial(x + i, simd::exp(load_partial<Arch>(x + i, n - i) - sh), n - i);
      acc1 += load_partial<Arch>(x + i, n - i);
    }
    return hsum(acc0 + acc1);
  }
}

}  // namespace mnemo::simd

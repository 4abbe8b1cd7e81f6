// mnemo/linear/activation.hpp — the element-wise functions of the state-space front-ends
// (causal_conv1d.hpp, selective_scan.hpp): SiLU and softplus, in double for the references and in
// f32 for the fast paths, one float or K batches at a time.
//
//   silu(x)     = x sigmoid(x)
//   softplus(x) = log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|))
//
// f32 forms: both start from e = exp(-|x|) in (0, 1], through simd::exp_nonpositive (cheaper than
// simd::exp and the same bits on its domain), with -|x| clamped at simd::min_normal_exp_arg
// (-87.3), where e is below FLT_MIN anyway. K batches go side by side, so their dependency chains
// (an exp, a division, a polynomial) overlap: on the 2-core Zen 1 EPYC, softplus of a batch at a
// time took 5.1 ns a float with xsimd::log1p(simd::exp(..)) and 3.0 ns with the series below,
// latency-bound; several batches at once are what the scan's chunk gives.
//   silu:     sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0, 0 where -|x| was
//             clamped and x < 0; silu(-inf) = -inf * 0 = NaN, as torch's x * sigmoid(x) and the
//             reference's x / (1 + exp(-x)) give; silu(+inf) = +inf.
//   softplus: log1p(e) = 2 atanh(s), s = e / (2 + e) in (0, 1/3], atanh(s) = s + s^3/3 + ... + s^15/15
//             (the next term is below 1.5e-9 relative); max 2e-7 relative error in f32 against
//             double over [-30, 10]. softplus(+inf) = +inf.
// NaN gives NaN (max(lo, x) keeps a NaN x on x86, and NaN-propagating max does elsewhere).
// The scalar f32 forms run the same operations, so a vector body and its scalar tail agree.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <iterator>

#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::linear::detail {

inline double silu(double x) { return x / (1.0 + std::exp(-x)); }
inline double softplus(double x) { return std::max(x, 0.0) + std::log1p(std::exp(-std::fabs(x))); }

// 1/3, 1/5, ..., 1/15: the atanh series in s^2, highest first.
inline constexpr float atanh_coefficients[] = {1.0f / 15, 1.0f / 13, 1.0f / 11, 1.0f / 9,
                                               1.0f / 7,  1.0f / 5,  1.0f / 3,  1.0f};

// The f32 forms on one float.
template <class Arch>
float silu(float x) {
  const float arg = -std::fabs(x);
  if (arg < simd::min_normal_exp_arg) return x >= 0.0f ? x : x * 0.0f;
  const float e = simd::exp<Arch>(arg), r = 1.0f / (1.0f + e);
  return x * (x >= 0.0f ? r : e * r);
}

template <class Arch>
float softplus(float x) {
  const float e = simd::exp<Arch>(std::max(simd::min_normal_exp_arg, -std::fabs(x)));
  const float s = e / (2.0f + e), s2 = s * s;
  float p = atanh_coefficients[0];
  for (std::size_t k = 1; k < std::size(atanh_coefficients); ++k)
    p = simd::detail::fmadd<Arch>(p, s2, atanh_coefficients[k]);
  return std::max(x, 0.0f) + 2.0f * s * p;
}

// K batches in place.
template <std::size_t K, class B>
void silu_n(B* x) {
  const B lo(simd::min_normal_exp_arg), zero(0.0f), one(1.0f);
  B e[K];
  for (std::size_t k = 0; k < K; ++k) e[k] = xsimd::max(lo, -xsimd::abs(x[k]));
  simd::exp_nonpositive_n<K>(e);
  for (std::size_t k = 0; k < K; ++k) {
    const B r = one / (one + e[k]);
    const B sigmoid = xsimd::select(x[k] >= zero, r, xsimd::select(-xsimd::abs(x[k]) < lo, zero, e[k] * r));
    x[k] = x[k] * sigmoid;
  }
}

template <std::size_t K, class B>
void softplus_n(B* x) {
  const B lo(simd::min_normal_exp_arg), two(2.0f);
  B e[K], s[K], s2[K], p[K];
  for (std::size_t k = 0; k < K; ++k) e[k] = xsimd::max(lo, -xsimd::abs(x[k]));
  simd::exp_nonpositive_n<K>(e);
  for (std::size_t k = 0; k < K; ++k) {
    s[k] = e[k] / (two + e[k]);
    s2[k] = s[k] * s[k];
    p[k] = B(atanh_coefficients[0]);
  }
  for (std::size_t c = 1; c < std::size(atanh_coefficients); ++c)
    for (std::size_t k = 0; k < K; ++k) p[k] = simd::detail::fmadd(p[k], s2[k], B(atanh_coefficients[c]));
  for (std::size_t k = 0; k < K; ++k) x[k] = xsimd::max(x[k], B(0.0f)) + two * s[k] * p[k];
}

// Batches side by side in the array forms below.
inline constexpr std::size_t activation_group = 4;

// f(y[0 .. n)) in place, f = silu_n or softplus_n (Silu: true or false), groups of batches, one
// batch, then the scalar tail.
template <bool Silu, class Arch>
void activate_inplace(float* y, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>, K = static_cast<std::int64_t>(activation_group);
    for (; i + K * w <= n; i += K * w) {
      batch b[K];
      for (std::int64_t k = 0; k < K; ++k) b[k] = simd::load<Arch>(y + i + k * w);
      if constexpr (Silu) silu_n<K>(b);
      else softplus_n<K>(b);
      for (std::int64_t k = 0; k < K; ++k) simd::store(y + i + k * w, b[k]);
    }
    for (; i + w <= n; i += w) {
      batch b = simd::load<Arch>(y + i);
      if constexpr (Silu) silu_n<1>(&b);
      else softplus_n<1>(&b);
      simd::store(y + i, b);
    }
  }
  for (; i < n; ++i) y[i] = Silu ? silu<Arch>(y[i]) : softplus<Arch>(y[i]);
}

}  // namespace mnemo::linear::detail

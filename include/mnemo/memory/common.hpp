// mnemo/memory/common.hpp — what the memory modules share: the (batch, head) loop that keeps
// Eigen single-threaded, exact partial top-k (scalar reference and SIMD fast path), row-wise
// activations with their derivatives, the feature maps of the associative memories, and the
// .npy helpers behind every module's save/load.
//
// Top-k. topk(s, n, k) returns the k largest of s[0 .. n), sorted by value descending; equal
// values keep index order (the lower index first), so the result is a function of the input
// alone. NaN ranks as -inf (so k results always exist for k <= n, and a NaN reads back as -inf).
// The SIMD path (topk below) bounds the k-th value from below with group maxima, keeps only the
// entries above the bound and selects among them with integer rank keys; small n use a sorted
// list of the k best seen so far, skipping whole batches that do not beat its k-th value.
//
// Activations: silu(a) = a sigma(a), silu'(a) = sigma(a) (1 + a (1 - sigma(a)));
// gelu(a) = a Phi(a) (the exact, erf form), gelu'(a) = Phi(a) + a phi(a).
// Feature maps: elu_plus_one(x) = elu(x) + 1 > 0 (Katharopoulos et al. 2020, Infini-attention's
// sigma); dpfp_nu(x) = the DPFP map of Schlag et al. 2021, 2 nu D features (ARMT's phi).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include <Eigen/Core>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "mnemo/core/error.hpp"
#include "mnemo/core/npy.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::memory {

// Nonlinearity of an MLP memory.
enum class activation { silu, gelu };

inline const char* activation_name(activation a) { return a == activation::silu ? "silu" : "gelu"; }

namespace detail {

using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using map = Eigen::Map<matrix>;
using cmap = Eigen::Map<const matrix>;
using outer_stride_map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using const_outer_stride_map = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

inline constexpr float minus_inf = -std::numeric_limits<float>::infinity();
inline constexpr double inv_sqrt_2 = 0.70710678118654752440;
inline constexpr double inv_sqrt_2pi = 0.39894228040143267794;

// Serial Eigen products and the per-item loop around them: core/serial_gemm.hpp.
using mnemo::detail::accumulate;
using mnemo::detail::for_each_item;
using mnemo::detail::gemm;

inline void check_threads(const char* fn, int threads) {
  mnemo::detail::require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
}

// A matrix given as a view has a contiguous innermost dimension; Eigen reads it with its outer stride.
inline const_outer_stride_map as_matrix(view<const float, 2> v) {
  return {v.data(), v.extent(0), v.extent(1), Eigen::OuterStride<>(v.extent(0) > 1 ? v.stride(0) : v.extent(1))};
}
inline outer_stride_map as_matrix(view<float, 2> v) {
  return {v.data(), v.extent(0), v.extent(1), Eigen::OuterStride<>(v.extent(0) > 1 ? v.stride(0) : v.extent(1))};
}

// ---- activations ----

inline double act_value(activation a, double x) {
  if (a == activation::silu) return x / (1.0 + std::exp(-x));
  return 0.5 * x * (1.0 + std::erf(x * inv_sqrt_2));
}

inline double act_derivative(activation a, double x) {
  if (a == activation::silu) {
    const double s = 1.0 / (1.0 + std::exp(-x));
    return s * (1.0 + x * (1.0 - s));
  }
  return 0.5 * (1.0 + std::erf(x * inv_sqrt_2)) + x * inv_sqrt_2pi * std::exp(-0.5 * x * x);
}

// h[i] = act(z[i]) and, when dh is not null, dh[i] = act'(z[i]); n contiguous floats.
template <class Arch = simd::default_arch>
void activate(activation a, const float* z, float* h, float* dh, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    const batch one(1.0f), half(0.5f), c1(static_cast<float>(inv_sqrt_2)), c2(static_cast<float>(inv_sqrt_2pi));
    for (; i + w <= n; i += w) {
      const batch x = simd::load<Arch>(z + i);
      if (a == activation::silu) {
        // exp(-x) = +inf for x < -88 gives sigma = 0 and silu = -0, silu' = 0: the limits.
        const batch s = one / (one + simd::exp(-x));
        simd::store(h + i, x * s);
        if (dh) simd::store(dh + i, s * (one + x * (one - s)));
      } else {
        const batch cdf = half * (one + xsimd::erf(x * c1));
        simd::store(h + i, x * cdf);
        if (dh) simd::store(dh + i, cdf + x * c2 * simd::exp(-half * x * x));
      }
    }
  }
  for (; i < n; ++i) {
    const float x = z[i];
    if (a == activation::silu) {
      const float s = 1.0f / (1.0f + simd::exp<Arch>(-x));
      h[i] = x * s;
      if (dh) dh[i] = s * (1.0f + x * (1.0f - s));
    } else {
      const float cdf = 0.5f * (1.0f + std::erf(x * static_cast<float>(inv_sqrt_2)));
      h[i] = x * cdf;
      if (dh) dh[i] = cdf + x * static_cast<float>(inv_sqrt_2pi) * simd::exp<Arch>(-0.5f * x * x);
    }
  }
}

// ---- feature maps ----

// elu(x) + 1: x + 1 for x > 0, exp(x) otherwise; always > 0.
inline double elu_plus_one(double x) { return x > 0 ? x + 1.0 : std::exp(x); }

template <class Arch = simd::default_arch>
inline float elu_plus_one(float x) {
  return x > 0 ? x + 1.0f : simd::exp<Arch>(x);
}

// DPFP_nu (Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers"):
// r = [relu(x), relu(-x)] (2D entries), phi_{(j-1) 2D + i} = r_i r_{(i - j) mod 2D} for j = 1..nu
// (r rolled right by j), so phi has 2 nu D >= 0 entries. out must hold 2 nu D values.
template <class X, class T>
void dpfp(const X* x, std::int64_t D, int nu, T* out) {
  const std::int64_t n = 2 * D;
  auto r = [&](std::int64_t i) -> T {
    const T xi = i < D ? static_cast<T>(x[i]) : -static_cast<T>(x[i - D]);
    return xi > 0 ? xi : T(0);
  };
  for (int j = 1; j <= nu; ++j)
    for (std::int64_t i = 0; i < n; ++i) out[(j - 1) * n + i] = r(i) * r(((i - j) % n + n) % n);
}

// ---- top-k ----

// One candidate of a top-k list.
struct scored {
  float value;
  std::int64_t index;
};

// The order of a top-k list: larger value first, then the lower index.
inline bool before(const scored& a, const scored& b) {
  return a.value > b.value || (a.value == b.value && a.index < b.index);
}

// Inserts (value, index) into list[0 .. size) (sorted by `before`, capacity k) if it belongs in
// the k best; returns the new size.
inline std::int64_t insert_top(scored* list, std::int64_t size, std::int64_t k, float value, std::int64_t index) {
  const scored c{value, index};
  if (size == k) {
    if (!before(c, list[k - 1])) return size;
    --size;
  }
  std::int64_t p = size;
  while (p > 0 && before(c, list[p - 1])) {
    list[p] = list[p - 1];
    --p;
  }
  list[p] = c;
  return size + 1;
}

}  // namespace detail

namespace reference {

// The k largest of s[0 .. n), value descending, ties by index: a full sort in the order of
// detail::before (NaN as -inf). Writes min(k, n) results and returns that count.
inline std::int64_t topk(const float* s, std::int64_t n, std::int64_t k, float* values, std::int64_t* indices) {
  std::vector<detail::scored> all;
  all.reserve(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) all.push_back({std::isnan(s[i]) ? detail::minus_inf : s[i], i});
  std::sort(all.begin(), all.end(), detail::before);
  const std::int64_t m = std::min<std::int64_t>(k, static_cast<std::int64_t>(all.size()));
  for (std::int64_t i = 0; i < m; ++i) {
    values[i] = all[i].value;
    indices[i] = all[i].index;
  }
  return m;
}

}  // namespace reference

namespace detail {

// Order-preserving map of a float to 32 bits: x < y <=> float_order(x) < float_order(y) for
// non-NaN x, y, and -0 maps as +0 (x + 0.0f turns -0 into +0 under round-to-nearest).
inline std::uint32_t float_order(float x) {
  const std::uint32_t u = std::bit_cast<std::uint32_t>(x + 0.0f);
  return (u >> 31) ? ~u : (u | 0x80000000u);
}
inline float float_from_order(std::uint32_t o) { return std::bit_cast<float>((o >> 31) ? (o & 0x7fffffffu) : ~o); }

// A 64-bit rank key whose ascending order is the order of `before`: the high half is the value
// order complemented (larger first), the low half the index (lower first).
inline std::uint64_t rank_key(float value, std::int64_t index) {
  return (static_cast<std::uint64_t>(~float_order(value)) << 32) | static_cast<std::uint32_t>(index);
}

// The threshold path of topk needs at least this many scores per wanted result (below, the
// sorted-list scan is as fast) and indices that fit the rank key's 32 bits.
inline constexpr std::int64_t topk_threshold_ratio = 4;
inline constexpr std::int64_t topk_max_index = std::int64_t{1} << 32;
// Bisection steps that raise the bound (each one vector pass over the scores), and the candidate
// count up to which the final order comes from rank counting (m^2 compares) rather than a sort.
inline constexpr int topk_bisection_steps = 6;
inline constexpr std::int64_t topk_rank_count_max = 96;

}  // namespace detail

// Scratch of topk, kept by the caller across calls (it grows to the largest n seen, then stops
// allocating).
struct topk_workspace {
  std::vector<detail::scored> list;
  std::vector<std::uint64_t> keys, ranked;
};

// SIMD partial top-k: the same result as reference::topk. Returns min(k, n).
//
// For n >= 4k (SIMD builds) it runs in three passes instead of keeping a sorted list:
//   1. a lower bound T on the k-th largest value: the scores are cut into G >= k groups (the lanes
//      of ceil(k / width) running maxima over contiguous runs of batches), and T = the smallest
//      group maximum; the G maxima are G distinct entries >= T, so at least k entries are >= T.
//      Then T is raised by bisection towards the maximum while >= k entries stay >= T (a vector
//      count per step), until at most 2k entries are left.
//   2. every entry >= T is appended, as a rank key (detail::rank_key), branch-free; batches with
//      no entry >= T are skipped with one compare (most of them when n >> k).
//   3. the k best keys in order (integer compares: ties by index for free): rank counting for a
//      few candidates, nth_element and a sort otherwise.
// NaN never passes step 2 (a NaN ranks as -inf); when T is not > -inf (a group of only NaN and
// -inf) the sorted-list scan below handles the -inf ranks instead. Measured on the PKM search at
// n = 512, k = 32: see bench/memory_rows.cpp, rows memory/fast/module:pkm_search and pkm_score.
template <class Arch = simd::default_arch>
std::int64_t topk(const float* s, std::int64_t n, std::int64_t k, float* values, std::int64_t* indices,
                  topk_workspace& ws) {
  if (k <= 0) return 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    const std::int64_t runs = (k + w - 1) / w, batches = n / w;
    if (n >= detail::topk_threshold_ratio * k && batches >= runs && n < detail::topk_max_index) {
      // 1. T = the smallest of runs * w >= k group maxima (NaN never selected: x > m is false).
      float bound = std::numeric_limits<float>::infinity();
      for (std::int64_t r = 0; r < runs; ++r) {
        batch m(detail::minus_inf);
        for (std::int64_t b = r * batches / runs; b < (r + 1) * batches / runs; ++b) {
          const batch x = simd::load<Arch>(s + b * w);
          m = xsimd::select(x > m, x, m);
        }
        bound = std::min(bound, -simd::hmax<Arch>(-m));  // the lanes' minimum
      }
      if (bound > detail::minus_inf) {
        // 1b. Raise T while at least k entries stay >= T: bisection between T and the maximum,
        // counting with vector compares, until at most 2k entries remain (or the steps run out).
        const batch one(1.0f), zero(0.0f);
        const auto count_at_least = [&](float t) {
          batch acc(0.0f);
          std::int64_t c = 0, i = 0;
          for (; i + w <= n; i += w) acc += xsimd::select(simd::load<Arch>(s + i) >= batch(t), one, zero);
          for (; i < n; ++i) c += s[i] >= t ? 1 : 0;
          return c + static_cast<std::int64_t>(simd::hsum<Arch>(acc));
        };
        float lo = bound, hi = simd::reduce_max<Arch>(s, n);
        std::int64_t m = count_at_least(lo);
        for (int step = 0; step < detail::topk_bisection_steps && m > 2 * k && std::isfinite(hi); ++step) {
          const float mid = lo + (hi - lo) / 2;
          if (!(mid > lo && mid < hi)) break;
          const std::int64_t c = count_at_least(mid);
          if (c >= k) {
            lo = mid;
            m = c;
          } else {
            hi = mid;
          }
        }
        // 2. The m entries >= T, as rank keys in index order.
        if (static_cast<std::int64_t>(ws.keys.size()) < n) ws.keys.resize(static_cast<std::size_t>(n));
        if (static_cast<std::int64_t>(ws.ranked.size()) < n) ws.ranked.resize(static_cast<std::size_t>(n));
        std::uint64_t* keys = ws.keys.data();
        std::int64_t got = 0, i = 0;
        const batch t(lo);
        for (; i + w <= n; i += w) {
          if (!xsimd::any(simd::load<Arch>(s + i) >= t)) continue;
          for (std::int64_t j = i; j < i + w; ++j) {
            keys[got] = detail::rank_key(s[j], j);
            got += s[j] >= lo ? 1 : 0;
          }
        }
        for (; i < n; ++i) {
          keys[got] = detail::rank_key(s[i], i);
          got += s[i] >= lo ? 1 : 0;
        }
        // 3. The k smallest keys in order. For a few candidates, each key's rank is the count of
        // smaller keys (keys are distinct: the index is in them), a branch-free loop the compiler
        // vectorises; otherwise nth_element and a sort.
        if (got <= detail::topk_rank_count_max) {
          std::uint64_t* out = ws.ranked.data();
          for (std::int64_t a = 0; a < got; ++a) {
            std::int64_t rank = 0;
            for (std::int64_t b = 0; b < got; ++b) rank += keys[b] < keys[a] ? 1 : 0;
            if (rank < k) out[rank] = keys[a];
          }
          keys = out;
        } else {
          std::nth_element(keys, keys + (k - 1), keys + got);
          std::sort(keys, keys + k);
        }
        for (std::int64_t j = 0; j < k; ++j) {
          values[j] = detail::float_from_order(~static_cast<std::uint32_t>(keys[j] >> 32));
          indices[j] = static_cast<std::int64_t>(keys[j] & 0xffffffffu);
        }
        return k;
      }
    }
  }
  // The sorted-list scan: until the list is full every entry goes in; then only those that beat
  // the k-th value (a whole batch that does not is skipped with one compare).
  if (static_cast<std::int64_t>(ws.list.size()) < k) ws.list.resize(static_cast<std::size_t>(k));
  detail::scored* list = ws.list.data();
  std::int64_t size = 0, i = 0;
  for (; i < n && size < k; ++i) size = detail::insert_top(list, size, k, std::isnan(s[i]) ? detail::minus_inf : s[i], i);
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    for (; i + w <= n; i += w) {
      // A later entry equal to the k-th value has a larger index and never enters: strict >.
      // (NaN compares false, as a -inf would.)
      if (!xsimd::any(simd::load<Arch>(s + i) > batch(list[k - 1].value))) continue;
      for (std::int64_t j = i; j < i + w; ++j)
        if (s[j] > list[k - 1].value) size = detail::insert_top(list, size, k, s[j], j);
    }
  }
  for (; i < n; ++i)
    if (s[i] > list[k - 1].value) size = detail::insert_top(list, size, k, s[i], i);
  for (std::int64_t j = 0; j < size; ++j) {
    values[j] = list[j].value;
    indices[j] = list[j].index;
  }
  return size;
}

namespace detail {

// ---- save / load helpers ----

// "<prefix><name>.npy"
// (Built by appending: GCC 12's -Wrestrict misfires on `"literal" + std::string&&`.)
inline std::string npy_path(const std::string& prefix, const char* name) {
  std::string p(prefix);
  return p.append(name).append(".npy");
}

// "<prefix><name><index>.npy"
inline std::string npy_path(const std::string& prefix, const char* name, std::int64_t index) {
  std::string p(prefix);
  return p.append(name).append(std::to_string(index)).append(".npy");
}

// Loads a float tensor of rank R and checks its shape against `want`.
template <int R>
tensor<float, R> load_checked(const std::string& path, const shape_t<R>& want) {
  tensor<float, R> t = npy::load<float, R>(path);
  mnemo::detail::require(t.shape() == want, "memory: ", path, ": expected shape ", shape_string(want), ", got ",
                         shape_string(t.shape()));
  return t;
}

// A small int64 record (sizes, flags) saved next to a state's tensors.
inline void save_record(const std::string& path, const std::vector<std::int64_t>& values) {
  tensor<std::int64_t, 1> t({static_cast<std::int64_t>(values.size())});
  std::copy(values.begin(), values.end(), t.data());
  npy::save(path, t);
}

inline std::vector<std::int64_t> load_record(const std::string& path, std::int64_t n) {
  const tensor<std::int64_t, 1> t = npy::load<std::int64_t, 1>(path);
  mnemo::detail::require(t.extent(0) == n, "memory: ", path, ": expected ", n, " entries, got ", t.extent(0));
  return std::vector<std::int64_t>(t.begin(), t.end());
}

}  // namespace detail
}  // namespace mnemo::memory

// mnemo/simd/select.hpp — top-k selection, the one primitive every selecting kernel uses
// (top-k attention and Loki, Quest pages, landmark blocks, retrieval's probed lists and hits).
//
// The order, one rule everywhere: element a comes before element b iff
//   x[a] > x[b], or x[a] == x[b] and id(a) < id(b)         (ties: the lower index first)
//   NaN comes after every number, -inf included; NaNs among themselves by id.
// id(a) is a itself, or ids[a] when the caller passes ids (retrieval: hits gathered from several
// lists break ties by key id, not by where they were gathered). So a NaN score is selected only
// when fewer than k of the scores are numbers, and -inf only when fewer than k are larger.
//
//   top_k_indices(x, n, k) = the first k of [0, n) in that order, written sorted by index
//                            (top_k_order::by_index) or in the order itself (best_first).
//
// The fast path is a sampled threshold: the (k / n)-quantile of an evenly spaced sample, raised
// by three standard deviations of its rank, gives a threshold t that about 1.5 k of the scores
// reach; one SIMD pass collects the indices with x[i] >= t (a whole batch below t costs one
// compare), and an exact selection (std::nth_element in the order above) over those candidates
// finishes. If fewer than k scores reach t, t is lowered (the sample rank doubles) and the pass
// repeats; the last resort takes every index, so the result is always exact. O(n) compares plus
// O(k) selection. reference_top_k_indices sorts everything, for the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::simd {

// How top_k_indices writes the selected indices.
enum class top_k_order {
  by_index,    // ascending index
  best_first,  // the selection order itself (largest first, ties by id, NaN last)
};

// Scratch memory of top_k_indices, kept by a caller that selects many times.
struct top_k_workspace {
  std::vector<std::int64_t> candidates;
  std::vector<float> sample;
};

namespace select_detail {

// Scores above which only a few times k of n elements should lie, from an evenly spaced sample.
inline constexpr std::int64_t sample_size = 2048;
// Below this many scores the threshold pass does not pay: select over all of them.
inline constexpr std::int64_t direct_below = 2 * sample_size;

// Keeps the first k of cand[0 .. n) in the selection order and writes them to out.
template <class Before>
void finish(std::int64_t* cand, std::int64_t n, std::int64_t k, std::int64_t* out, top_k_order order,
            Before&& before) {
  if (k < n) std::nth_element(cand, cand + k, cand + n, before);
  if (order == top_k_order::by_index) std::sort(cand, cand + k);
  else std::sort(cand, cand + k, before);
  std::copy_n(cand, k, out);
}

inline void check(std::int64_t n, std::int64_t k) {
  mnemo::detail::require(n >= 0, "simd::top_k_indices: n must be >= 0, got ", n);
  mnemo::detail::require(k >= 0 && k <= n, "simd::top_k_indices: k must be in [0, n] = [0, ", n, "], got ", k);
}

}  // namespace select_detail

// The selection order of the header: true iff element a of x comes before element b.
template <class T>
bool top_k_before(const T* x, const std::int64_t* ids, std::int64_t a, std::int64_t b) {
  const T xa = x[a], xb = x[b];
  const std::int64_t ia = ids ? ids[a] : a, ib = ids ? ids[b] : b;
  const bool na = std::isnan(xa), nb = std::isnan(xb);
  if (na || nb) return na == nb ? ia < ib : nb;
  return xa > xb || (xa == xb && ia < ib);
}

// The obvious selection: sort every index in the selection order, keep k. Scores in float, or in
// double for the double-precision references of the selecting kernels.
template <class T>
void reference_top_k_indices(const T* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices,
                                    top_k_order order = top_k_order::by_index, const std::int64_t* ids = nullptr) {
  select_detail::check(n, k);
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), std::int64_t{0});
  std::stable_sort(idx.begin(), idx.end(),
                   [&](std::int64_t a, std::int64_t b) { return top_k_before(scores, ids, a, b); });
  if (order == top_k_order::by_index) std::sort(idx.begin(), idx.begin() + k);
  std::copy_n(idx.begin(), k, out_indices);
}

// The first k of scores[0 .. n) in the selection order (see the header), written to
// out_indices[0 .. k) in `order`. ids [n] (optional) break ties instead of the indices; they must
// be distinct. Requires 0 <= k <= n.
template <class Arch = default_arch>
void top_k_indices(const float* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices, top_k_workspace& ws,
                   top_k_order order = top_k_order::by_index, const std::int64_t* ids = nullptr) {
  select_detail::check(n, k);
  if (k == 0) return;
  auto before = [scores, ids](std::int64_t a, std::int64_t b) { return top_k_before(scores, ids, a, b); };
  ws.candidates.resize(static_cast<std::size_t>(n));
  std::int64_t* cand = ws.candidates.data();
  if (n < select_detail::direct_below || k * 4 > n) {  // a threshold would keep most of them anyway
    std::iota(cand, cand + n, std::int64_t{0});
    select_detail::finish(cand, n, k, out_indices, order, before);
    return;
  }
  // Evenly spaced sample, NaN as -inf (only an estimate of the threshold).
  constexpr std::int64_t m = select_detail::sample_size;
  ws.sample.resize(static_cast<std::size_t>(m));
  float* sample = ws.sample.data();
  const double expected = static_cast<double>(k) * m / static_cast<double>(n);  // sample rank of the k-th score
  std::int64_t rank = static_cast<std::int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected) + 2.0));
  while (true) {
    if (rank >= m) {  // the threshold would be the sample minimum: take everything
      std::iota(cand, cand + n, std::int64_t{0});
      select_detail::finish(cand, n, k, out_indices, order, before);
      return;
    }
    for (std::int64_t s = 0; s < m; ++s) {
      const float x = scores[s * n / m];
      sample[s] = std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
    }
    std::nth_element(sample, sample + rank, sample + m, [](float a, float b) { return a > b; });
    const float t = sample[rank];
    std::int64_t c = 0;
    std::int64_t i = 0;
    if constexpr (vectorized<Arch>) {
      using batch = fbatch<Arch>;
      constexpr std::int64_t w = width<Arch>;
      const batch tb(t);
      for (; i + w <= n; i += w) {
        if (!xsimd::any(batch::load_unaligned(scores + i) >= tb)) continue;
        for (std::int64_t l = 0; l < w; ++l)
          if (scores[i + l] >= t) cand[c++] = i + l;
      }
    }
    for (; i < n; ++i)
      if (scores[i] >= t) cand[c++] = i;
    if (c >= k) {
      select_detail::finish(cand, c, k, out_indices, order, before);
      return;
    }
    rank *= 2;
  }
}

// As above, with scratch memory of its own (allocated for this call).
template <class Arch = default_arch>
void top_k_indices(const float* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices,
                   top_k_order order = top_k_order::by_index, const std::int64_t* ids = nullptr) {
  top_k_workspace ws;
  top_k_indices<Arch>(scores, n, k, out_indices, ws, order, ids);
}

}  // namespace mnemo::simd

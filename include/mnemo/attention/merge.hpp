// mnemo/attention/merge.hpp — the exact merge of partial attention results over disjoint key sets.
//
// A partial result over a key set X is (o_X, lse_X) with
//   lse_X = log sum_{j in X} exp(s_j),   o_X = sum_{j in X} exp(s_j - lse_X) v_j.
// For disjoint parts X_1 .. X_N of the keys (any N, any split, parts may be empty):
//   m   = max_p lse_p,   w_p = exp(lse_p - m)
//   lse = m + log(sum_p w_p)
//   o   = sum_p w_p o_p / sum_p w_p
// which is exactly attention over the union (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"; the combine step of Flash-Decoding, Dao et al. 2023). An empty part
// has lse = -inf and gets weight 0 (its out is never read); if every part is empty the result is
// out = 0, lse = -inf, never NaN. A NaN part (NaN in its q, k or v) makes the row NaN (out and
// lse). Parts are combined in index order, so the result does not depend on who computed which
// part.
//
// Users: the split-KV engine (split_kv.hpp) merges its chunks with merge_row; landmark, Quest and
// retrieval decode merge their selected part with their window; ring attention and anyone
// sharding keys across threads, sockets or machines merge with `merge`, which runs at the ISA level
// $MNEMO_ISA asks for, else the best one (simd/dispatch.hpp; it takes no options struct).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/dispatch.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::attention {

// out[0 .. Dv) = sum_p w_p part_out(p)[0 .. Dv) / sum_p w_p with w_p = exp(part_lse(p) - m), and
// *lse = m + log(sum_p w_p) (lse may be null). `w` [n] is scratch; it may be the storage of the
// part lse values themselves (w[p] is written only after part_lse(p) is read). `out` may be one of
// the part rows: each element is written after every part's element at that index was read.
// On return w[p] is part p's merge weight exp(lse_p - lse) (0 for an empty part), the factor that
// turns its probabilities into final ones; a NaN row leaves NaN in w, an empty row leaves w as is.
template <class Arch, class PartOut, class PartLse>
void merge_row(std::int64_t n, PartOut&& part_out, PartLse&& part_lse, float* w, std::int64_t Dv, float* out,
               float* lse) {
  constexpr float minus_inf = -std::numeric_limits<float>::infinity();
  float m = minus_inf;
  bool nan = false;
  for (std::int64_t p = 0; p < n; ++p) {
    const float l = part_lse(p);
    m = std::max(m, l);
    nan = nan || std::isnan(l);
  }
  if (nan) {  // a NaN part (NaN in its q, k or v) makes the row NaN; std::max alone would drop it
    for (std::int64_t p = 0; p < n; ++p) w[p] = std::numeric_limits<float>::quiet_NaN();
    std::fill(out, out + Dv, std::numeric_limits<float>::quiet_NaN());
    if (lse) *lse = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (m == minus_inf) {  // every part empty (or no parts)
    std::fill(out, out + Dv, 0.0f);
    if (lse) *lse = minus_inf;
    return;
  }
  // The weights, their sum and the weighted outputs in double, divided once at the end: the
  // rounding error does not grow with the number of parts (a decode over 2M keys merges 4000
  // chunks; an f32 sum of their weights lost 2.7e-5), and parts of equal out give exactly it.
  double sum = 0;
  for (std::int64_t p = 0; p < n; ++p) {
    const float l = part_lse(p);
    w[p] = l == minus_inf ? 0.0f : simd::exp<Arch>(l - m);
    sum += w[p];
  }
  const double inv = 1.0 / sum;  // sum >= 1: the largest part has weight exp(0)
  constexpr std::int64_t block = 64;
  double acc[block];
  for (std::int64_t c0 = 0; c0 < Dv; c0 += block) {
    const std::int64_t nc = std::min(block, Dv - c0);
    std::fill_n(acc, nc, 0.0);
    for (std::int64_t p = 0; p < n; ++p) {
      if (w[p] == 0) continue;
      const double wp = w[p];
      const float* o = part_out(p) + c0;
      for (std::int64_t c = 0; c < nc; ++c) acc[c] += wp * static_cast<double>(o[c]);
    }
    for (std::int64_t c = 0; c < nc; ++c) out[c0 + c] = static_cast<float>(acc[c] * inv);
  }
  for (std::int64_t p = 0; p < n; ++p) w[p] = static_cast<float>(w[p] * inv);
  if (lse) *lse = m + static_cast<float>(std::log(sum));
}

// Exact merge of two partial results over disjoint key sets (see the header): out and lse may be
// the same views as out_a/lse_a or out_b/lse_b (in place); other overlaps are not allowed. lse
// may be empty when the merged lse is not wanted.
template <class TuArch = simd::default_arch>
void merge(view<const float, 4> out_a,  // [B, Hq, Lq, Dv]
           view<const float, 3> lse_a,  // [B, Hq, Lq]
           view<const float, 4> out_b,  // [B, Hq, Lq, Dv]
           view<const float, 3> lse_b,  // [B, Hq, Lq]
           view<float, 4> out,          // [B, Hq, Lq, Dv]
           view<float, 3> lse,          // [B, Hq, Lq] or empty
           int threads = 0) {
  constexpr const char* fn = "attention::merge";
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "out_a", out_a, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_data(fn, "lse_a", lse_a, " [B, Hq, Lq]");
  mnemo::detail::require_data(fn, "out_b", out_b, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_data(fn, "lse_b", lse_b, " [B, Hq, Lq]");
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const shape_t<4> os = out_a.shape();
  const shape_t<3> ls{os[0], os[1], os[2]};
  mnemo::detail::require_shape(fn, "lse_a", lse_a, ls, " [B, Hq, Lq] (from out_a)");
  mnemo::detail::require_shape(fn, "out_b", out_b, os, " [B, Hq, Lq, Dv] (from out_a)");
  mnemo::detail::require_shape(fn, "lse_b", lse_b, ls, " [B, Hq, Lq] (from out_a)");
  mnemo::detail::require_shape(fn, "out", out, os, " [B, Hq, Lq, Dv] (from out_a)");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, ls, " [B, Hq, Lq] (from out_a)");
  const std::int64_t Hq = os[1], Lq = os[2], Dv = os[3];
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    parallel_for(
        os[0] * Hq * Lq,
        [&](std::int64_t row) {
          const std::int64_t b = row / (Hq * Lq), h = row / Lq % Hq, i = row % Lq;
          const float* parts[2] = {out_a.ptr(b, h, i), out_b.ptr(b, h, i)};
          const float lses[2] = {lse_a(b, h, i), lse_b(b, h, i)};
          float w[2];
          merge_row<Arch>(
              2, [&](std::int64_t p) { return parts[p]; }, [&](std::int64_t p) { return lses[p]; }, w, Dv,
              out.ptr(b, h, i), lse.empty() ? nullptr : lse.ptr(b, h, i));
        },
        threads);
  });
}

// Exact N-way merge: parts combined in index order, so the result depends only on the parts and
// their order. outs[p] [B, Hq, Lq, Dv] and lses[p] [B, Hq, Lq]; out may be the same view as one of
// the outs and lse as one of the lses. No parts: out = 0, lse = -inf.
template <class TuArch = simd::default_arch>
void merge(std::span<const view<const float, 4>> outs,  // N x [B, Hq, Lq, Dv]
           std::span<const view<const float, 3>> lses,  // N x [B, Hq, Lq]
           view<float, 4> out,                          // [B, Hq, Lq, Dv]
           view<float, 3> lse,                          // [B, Hq, Lq] or empty
           int threads = 0) {
  constexpr const char* fn = "attention::merge";
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  require(outs.size() == lses.size(), fn, ": outs and lses must have the same number of parts, got ", outs.size(),
          " and ", lses.size());
  require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const shape_t<4> os = out.shape();
  const shape_t<3> ls{os[0], os[1], os[2]};
  for (std::size_t p = 0; p < outs.size(); ++p) {
    const bool null_out = outs[p].empty() && outs[p].size() != 0, null_lse = lses[p].empty() && lses[p].size() != 0;
    if (null_out || null_lse)
      mnemo::detail::fail(fn, ": ", null_out ? "outs[" : "lses[", p, "] must be a view of memory, got a null view of shape ",
                          null_out ? shape_string(outs[p].shape()) : shape_string(lses[p].shape()));
    if (outs[p].shape() != os)
      mnemo::detail::fail(fn, ": outs[", p, "] must have shape ", shape_string(os), " [B, Hq, Lq, Dv] (from out), got ",
                          shape_string(outs[p].shape()));
    if (lses[p].shape() != ls)
      mnemo::detail::fail(fn, ": lses[", p, "] must have shape ", shape_string(ls), " [B, Hq, Lq] (from out), got ",
                          shape_string(lses[p].shape()));
  }
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, ls, " [B, Hq, Lq] (from out)");
  const std::int64_t n = static_cast<std::int64_t>(outs.size());
  const std::int64_t Hq = os[1], Lq = os[2], Dv = os[3], rows = os[0] * Hq * Lq;
  std::vector<float> weights(static_cast<std::size_t>(rows * n));
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    parallel_for(
        rows,
        [&](std::int64_t row) {
          const std::int64_t b = row / (Hq * Lq), h = row / Lq % Hq, i = row % Lq;
          merge_row<Arch>(
              n, [&](std::int64_t p) { return outs[static_cast<std::size_t>(p)].ptr(b, h, i); },
              [&](std::int64_t p) { return lses[static_cast<std::size_t>(p)](b, h, i); }, weights.data() + row * n, Dv,
              out.ptr(b, h, i), lse.empty() ? nullptr : lse.ptr(b, h, i));
        },
        threads);
  });
}

}  // namespace mnemo::attention

// mnemo/attention/approx/probsparse.hpp — Informer's ProbSparse self-attention: the u queries with
// the most peaked score rows get exact attention, every other query gets the mean of the values.
//
// Zhou, Zhang, Peng, Zhang, Li, Xiong, Zhang, "Informer: Beyond Efficient Transformer for Long
// Sequence Time-Series Forecasting", AAAI 2021, section "ProbSparse Self-attention". With
// s_ij = scale q_i . k_j over the keys V_i visible to query i (all keys, or j <= i + Lk - Lq when
// causal), the query sparsity measurement is
//
//   M(q_i, K) = max_{j in V_i} s_ij - (1 / |V_i|) sum_{j in V_i} s_ij
//
// The paper estimates it from U = c * ceil(ln Lk) keys drawn uniformly (with replacement) from
// V_i for each query: M^_i = max over the draws - mean over the draws. The draws come from a seed
// (approx/positions.hpp random_stream, one stream per (b, h, i)); `exact_measure` uses every
// visible key instead. Then per (batch, query head):
//
//   T     = the u = c * ceil(ln Lq) rows with the largest M (ties: the lower row; at least 1, at
//           most Lq; `top_u` overrides)
//   out_i = softmax_{j in V_i}(s_ij) v_j                          i in T
//   out_i = (1 / |V_i|) sum_{j in V_i} v_j                        i not in T
//
// i.e. the mean of V (non-causal), or its cumulative mean up to the query's position (causal, as
// Informer's masked decoder self-attention). A row with no visible key gets out = 0 and M = -inf.
// With u = Lq every row gets exact attention. Informer's code divides the sampled sum by Lk, not
// by the number of draws; here the mean is over the draws, the estimator of M as written.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv];
// selected [B, Hq, u] (int64, the rows of T ascending), optional. K/V are float.
//
// Fast path: M with f32 dot products (U per row, or Lk with exact_measure); T by partial sort;
// the rows of T gathered into [1, Hq, u, D] per batch entry and attention::flash run on them
// against all of K and V (the causal mask on their original positions: approx::position_mask);
// the means from double running sums of V (one pass over V per kv head).
//
// Numerics: the reference computes M in double, the fast path in f32: two rows whose measures
// are within f32 rounding of each other at the u-th place may be chosen differently (tests use
// data without such near-ties and compare `selected` too).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "mnemo/attention/approx/positions.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention::approx {

struct probsparse_options {
  std::int64_t factor = 5;     // c: u = c * ceil(ln Lq) rows, U = c * ceil(ln Lk) draws
  std::int64_t top_u = 0;      // > 0: exactly this many rows (at most Lq)
  bool exact_measure = false;  // M over every visible key instead of U draws
  bool causal = false;
  std::uint64_t seed = 0;  // the draws
};

// The rows that get attention per (batch, query head) for Lq rows.
inline std::int64_t probsparse_rows(std::int64_t Lq, const probsparse_options& p) {
  if (Lq <= 0) return 0;
  const std::int64_t u = p.top_u > 0 ? p.top_u
                                     : p.factor * static_cast<std::int64_t>(std::ceil(std::log(static_cast<double>(Lq))));
  return std::clamp<std::int64_t>(u, 1, Lq);
}

// Keys drawn per row for Lk keys.
inline std::int64_t probsparse_draws(std::int64_t Lk, const probsparse_options& p) {
  if (Lk <= 0) return 0;
  return std::clamp<std::int64_t>(p.factor * static_cast<std::int64_t>(std::ceil(std::log(static_cast<double>(Lk)))), 1, Lk);
}

namespace probsparse_detail {

inline dims check(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                  const view<const float, 4>& v, const view<float, 4>& out, const view<std::int64_t, 3>& selected,
                  const probsparse_options& p, const options& opt) {
  const dims d = attention::detail::check_args(fn, q, k, v, out, view<float, 3>{}, mods::none{}, opt);
  mnemo::detail::require(p.factor >= 1, fn, ": probsparse_options.factor must be >= 1, got ", p.factor);
  mnemo::detail::require(p.top_u >= 0, fn, ": probsparse_options.top_u must be >= 0 (0: factor * ceil(ln Lq)), got ",
                         p.top_u);
  mnemo::detail::require(opt.sinks.empty(), fn, ": options.sinks are not supported by ProbSparse attention");
  if (!selected.empty())
    mnemo::detail::require_shape(fn, "selected", selected, {d.B, d.Hq, probsparse_rows(d.Lq, p)},
                                 " [B, Hq, u] (u = probsparse_rows(Lq, options))");
  return d;
}

// Keys visible to row i: [0, visible_keys).
inline std::int64_t visible_keys(const dims& d, bool causal, std::int64_t i) {
  return causal ? std::clamp<std::int64_t>(i + d.offset() + 1, 0, d.Lk) : d.Lk;
}

// The measure of row i of (b, h); Score(j) gives s_ij (double or float).
template <class Score>
double measure(const dims& d, const probsparse_options& p, std::int64_t b, std::int64_t h, std::int64_t i,
               Score&& score) {
  const std::int64_t n = visible_keys(d, p.causal, i);
  if (n == 0) return -std::numeric_limits<double>::infinity();
  double top = -std::numeric_limits<double>::infinity(), sum = 0;
  std::int64_t count = 0;
  auto take = [&](std::int64_t j) {
    const double s = score(j);
    top = std::max(top, s);
    sum += s;
    ++count;
  };
  if (p.exact_measure) {
    for (std::int64_t j = 0; j < n; ++j) take(j);
  } else {
    sparse_detail::random_stream rng(p.seed, static_cast<std::uint64_t>((b * d.Hq + h) * d.Lq + i));
    const std::int64_t U = probsparse_draws(d.Lk, p);
    for (std::int64_t t = 0; t < U; ++t) take(rng.below(n));
  }
  return top - sum / static_cast<double>(count);
}

// The u rows of largest M (NaN as -inf; ties: the lower row), ascending, into sel.
inline void top_rows(const std::vector<double>& M, std::int64_t u, std::int64_t* sel) {
  std::vector<std::int64_t> idx(M.size());
  std::iota(idx.begin(), idx.end(), 0);
  auto key = [&](std::int64_t i) {
    const double m = M[static_cast<std::size_t>(i)];
    return std::isnan(m) ? -std::numeric_limits<double>::infinity() : m;
  };
  std::partial_sort(idx.begin(), idx.begin() + u, idx.end(), [&](std::int64_t a, std::int64_t b) {
    return key(a) > key(b) || (key(a) == key(b) && a < b);
  });
  std::sort(idx.begin(), idx.begin() + u);
  std::copy_n(idx.begin(), u, sel);
}

// out rows of the rows not in T: the (cumulative) mean of v, from double running sums.
inline void mean_rows(const dims& d, const probsparse_options& p, view<const float, 4> v, view<float, 4> out,
                      std::int64_t b, std::int64_t hk, const std::vector<std::vector<char>>& chosen) {
  std::vector<double> run(static_cast<std::size_t>(d.Dv), 0.0);
  std::vector<float> mean(static_cast<std::size_t>(d.Dv));
  std::int64_t have = 0;  // keys summed into run
  auto advance = [&](std::int64_t n) {
    for (; have < n; ++have)
      for (std::int64_t c = 0; c < d.Dv; ++c) run[static_cast<std::size_t>(c)] += v(b, hk, have, c);
    for (std::int64_t c = 0; c < d.Dv; ++c)
      mean[static_cast<std::size_t>(c)] = n == 0 ? 0.0f : static_cast<float>(run[static_cast<std::size_t>(c)] / static_cast<double>(n));
  };
  if (!p.causal) advance(d.Lk);
  for (std::int64_t i = 0; i < d.Lq; ++i) {  // visible_keys grows with i
    if (p.causal) advance(visible_keys(d, true, i));
    for (std::int64_t g = 0; g < d.group(); ++g)
      if (!chosen[static_cast<std::size_t>(g)][static_cast<std::size_t>(i)])
        std::copy(mean.begin(), mean.end(), out.ptr(b, hk * d.group() + g, i));
  }
}

}  // namespace probsparse_detail

// The fast path's measure M [B, Hq, Lq] (f32 dot products), as the attention computes it.
inline void probsparse_measure(view<const float, 4> q,  // [B, Hq, Lq, D]
                               view<const float, 4> k,  // [B, Hkv, Lk, D]
                               view<float, 3> M,        // [B, Hq, Lq]
                               const probsparse_options& p = {}, const options& opt = {}) {
  constexpr const char* fn = "approx::probsparse_measure";
  mnemo::detail::require_data(fn, "q", q, " [B, Hq, Lq, D]");
  mnemo::detail::require_data(fn, "k", k, " [B, Hkv, Lk, D]");
  const std::int64_t B = q.extent(0), Hq = q.extent(1), Lq = q.extent(2), D = q.extent(3), Hkv = k.extent(1);
  mnemo::detail::require(Hkv >= 1 && Hq % Hkv == 0, fn, ": q.shape[1] (Hq) must be a multiple of k.shape[1] (Hkv), got Hq=",
                         Hq, ", Hkv=", Hkv);
  mnemo::detail::require_shape(fn, "k", k, {B, Hkv, k.extent(2), D}, " [B, Hkv, Lk, D]");
  mnemo::detail::require_shape(fn, "M", M, {B, Hq, Lq}, " [B, Hq, Lq]");
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  const dims d{B, Hq, Hkv, Lq, k.extent(2), D, D, scale};
  parallel_for(
      B * Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / Hq, h = bh % Hq, hk = h / d.group();
        for (std::int64_t i = 0; i < Lq; ++i) {
          const float* qi = q.ptr(b, h, i);
          M(b, h, i) = static_cast<float>(probsparse_detail::measure(d, p, b, h, i, [&](std::int64_t j) {
            return static_cast<double>(scale * simd::dot(qi, k.ptr(b, hk, j), D));
          }));
        }
      },
      opt.threads);
}

// ProbSparse attention in double (the measure, the choice of rows, their attention, the means).
inline void reference_probsparse_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                           view<const float, 4> k,  // [B, Hkv, Lk, D]
                                           view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                           view<float, 4> out,      // [B, Hq, Lq, Dv]
                                           const probsparse_options& p = {},
                                           view<std::int64_t, 3> selected = {},  // [B, Hq, u] or empty
                                           const options& opt = {}) {
  constexpr const char* fn = "approx::reference_probsparse_attention";
  const dims d = probsparse_detail::check(fn, q, k, v, out, selected, p, opt);
  const std::int64_t u = probsparse_rows(d.Lq, p);
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bhk) {
        const std::int64_t b = bhk / d.Hkv, hk = bhk % d.Hkv, G = d.group();
        std::vector<std::vector<char>> chosen(static_cast<std::size_t>(G), std::vector<char>(static_cast<std::size_t>(d.Lq), 0));
        std::vector<double> M(static_cast<std::size_t>(d.Lq)), s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
        std::vector<std::int64_t> sel(static_cast<std::size_t>(u));
        for (std::int64_t g = 0; g < G; ++g) {
          const std::int64_t h = hk * G + g;
          auto score = [&](std::int64_t i, std::int64_t j) {
            return d.scale * simd::reference::dot(q.ptr(b, h, i), k.ptr(b, hk, j), d.D);
          };
          for (std::int64_t i = 0; i < d.Lq; ++i)
            M[static_cast<std::size_t>(i)] = probsparse_detail::measure(d, p, b, h, i, [&](std::int64_t j) { return score(i, j); });
          probsparse_detail::top_rows(M, u, sel.data());
          for (std::int64_t t = 0; t < u; ++t) {
            const std::int64_t i = sel[static_cast<std::size_t>(t)], n = probsparse_detail::visible_keys(d, p.causal, i);
            chosen[static_cast<std::size_t>(g)][static_cast<std::size_t>(i)] = 1;
            if (!selected.empty()) selected(b, h, t) = i;
            float* o = out.ptr(b, h, i);
            if (n == 0) {
              std::fill_n(o, d.Dv, 0.0f);
              continue;
            }
            double m = -std::numeric_limits<double>::infinity(), sum = 0;
            for (std::int64_t j = 0; j < n; ++j) m = std::max(m, s[static_cast<std::size_t>(j)] = score(i, j));
            std::fill(acc.begin(), acc.end(), 0.0);
            for (std::int64_t j = 0; j < n; ++j) {
              const double e = std::exp(s[static_cast<std::size_t>(j)] - m);
              sum += e;
              for (std::int64_t c = 0; c < d.Dv; ++c) acc[static_cast<std::size_t>(c)] += e * v(b, hk, j, c);
            }
            for (std::int64_t c = 0; c < d.Dv; ++c) o[c] = static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
          }
        }
        probsparse_detail::mean_rows(d, p, v, out, b, hk, chosen);
      },
      opt.threads);
}

// ProbSparse attention, fast path (see the header).
inline void probsparse_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                 view<const float, 4> k,  // [B, Hkv, Lk, D]
                                 view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                 view<float, 4> out,      // [B, Hq, Lq, Dv]
                                 const probsparse_options& p = {},
                                 view<std::int64_t, 3> selected = {},  // [B, Hq, u] or empty
                                 const options& opt = {}) {
  constexpr const char* fn = "approx::probsparse_attention";
  const dims d = probsparse_detail::check(fn, q, k, v, out, selected, p, opt);
  const std::int64_t u = probsparse_rows(d.Lq, p), G = d.group();
  if (d.B == 0 || d.Lq == 0) return;
  tensor<float, 3> M({d.B, d.Hq, d.Lq});
  options mopt = opt;
  mopt.scale = d.scale;
  probsparse_measure(q, k, M, p, mopt);
  // The chosen rows, per (b, h), ascending; their positions for the causal mask.
  std::vector<std::int64_t> sel(static_cast<std::size_t>(d.B * d.Hq * u)), pos(sel.size());
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        std::vector<double> m(M.data() + bh * d.Lq, M.data() + (bh + 1) * d.Lq);
        probsparse_detail::top_rows(m, u, sel.data() + bh * u);
        for (std::int64_t t = 0; t < u; ++t) pos[static_cast<std::size_t>(bh * u + t)] = sel[static_cast<std::size_t>(bh * u + t)] + d.offset();
      },
      opt.threads);
  tensor<float, 4> qs({1, d.Hq, u, d.D}), os({1, d.Hq, u, d.Dv});
  options inner = opt;
  inner.scale = d.scale;
  for (std::int64_t b = 0; b < d.B; ++b) {
    for (std::int64_t h = 0; h < d.Hq; ++h)
      sparse_detail::gather_rows(q.ptr(b, h, 0), q.stride(2), d.D, sel.data() + (b * d.Hq + h) * u, u, qs.as_view().ptr(0, h, 0));
    const position_mask mask{p.causal, pos.data() + b * d.Hq * u, u, nullptr, 0, d.Hq, G, d.Lk - u};
    if (d.Lk > 0)
      attention::flash<float, position_mask>(cview(qs), k.narrow(0, b, 1), v.narrow(0, b, 1), os.as_view(), {}, mask, inner);
    else
      std::fill(os.data(), os.data() + os.size(), 0.0f);
    // Scatter the chosen rows, then the means into the others (q is no longer read).
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t t = 0; t < u; ++t) {
        const std::int64_t i = sel[static_cast<std::size_t>((b * d.Hq + h) * u + t)];
        std::copy_n(os.as_view().ptr(0, h, t), d.Dv, out.ptr(b, h, i));
        if (!selected.empty()) selected(b, h, t) = i;
      }
  }
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bhk) {
        const std::int64_t b = bhk / d.Hkv, hk = bhk % d.Hkv;
        std::vector<std::vector<char>> chosen(static_cast<std::size_t>(G), std::vector<char>(static_cast<std::size_t>(d.Lq), 0));
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t t = 0; t < u; ++t)
            chosen[static_cast<std::size_t>(g)][static_cast<std::size_t>(sel[static_cast<std::size_t>((b * d.Hq + hk * G + g) * u + t)])] = 1;
        probsparse_detail::mean_rows(d, p, v, out, b, hk, chosen);
      },
      opt.threads);
}

}  // namespace mnemo::attention::approx

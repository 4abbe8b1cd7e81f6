// mnemo/attention/approx/sparsek.hpp — SPARSEK attention: a score per key, the SparseK operator
// (a differentiable top-k mask), attention over the keys it selects with their values weighted
// by the mask.
//
// Lou, Jia, Zheng, Tu, "Sparser is Faster and Less is More: Efficient Sparse Attention for
// Long-Range Transformers", 2024. Each key j of a kv head has an importance score z_j, given by
// the caller or by a linear scoring network z_j = w_h . k_j (sparsek_scores). The SparseK operator
// is the Euclidean projection onto the capped simplex {0 <= m <= 1, sum m = k}:
//
//   SparseK(z, k) = argmin_m |m - z|^2 over that set  =  clip(z - tau, 0, 1),
//   tau such that  sum_j clip(z_j - tau, 0, 1) = k                                (n > k keys)
//
// and m = 1 for every key when n <= k. f(tau) = sum_j clip(z_j - tau, 0, 1) is piecewise linear
// and non-increasing with breakpoints at z_j and z_j - 1; the paper's exact algorithm sorts them
// and walks down from max z, the slope being the number of keys with z_j - 1 < tau < z_j, until
// f reaches k, where tau follows by linear interpolation (reference::sparsek_threshold, double,
// O(n log n)). Only keys with z_j > z_(k) - 1 (z_(k) the k-th largest) can reach the crossing
// (f(z_(k) - 1) >= k), so the fast threshold selects z_(k) in O(n) and walks those keys only, in
// the same order: the same tau, to the last bit.
//
// Attention (inference path): the keys with m_j > 0 are gathered and their values weighted by m,
//
//   S     = the k keys of largest z (ties: the lower index) among those with m > 0
//   out_i = sum_{j in S, visible} softmax(scale q_i . k_j) m_j v_j,
//   lse_i = log sum_{j in S, visible} exp(scale q_i . k_j)
//
// Since m_j > 0 for the k keys of largest z (tau < z_(k)), S is the top-k of z; more than k keys
// have m > 0 only when several scores sit within 1 of tau, and the gather keeps a fixed k (the
// dropped keys carry the smallest masks). With well-separated ("sharp") scores m is 1 on S and 0
// elsewhere, and out is exact attention over S; with k >= Lk it is exact attention.
//
// Causal (the paper's incremental selection): the query at position p selects among the keys
// j <= p, m^(p) = SparseK(z_{0..p}, k), so keys are selected as the context grows; a decode step
// (Lq = 1) does exactly that. For prefill, `window` W fixes the selection for W query rows at a
// time: rows [t W, (t + 1) W) use the selection made at the window's last row (over the keys up
// to its position), each row seeing the selected keys at or before its own position. W = 1 is
// the per-position selection; larger W makes W times fewer selections. Not causal: every query
// uses one selection over all Lk keys (W is ignored). A row that sees no selected key gets
// out = 0, lse = -inf.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], z [B, Hkv, Lk] (one score per
// key and kv head, shared by the kv head's G query heads), out [B, Hq, Lq, Dv], lse [B, Hq, Lq].
// K/V are float.
//
// Fast path: per (batch, kv head, window) the selection (O(visible keys)), the selected keys and
// their mask-weighted values gathered into contiguous rows, and attention::flash on the window's
// query rows of the G heads against them (the causal mask on original positions,
// approx::position_mask), written straight into out. The split-KV engine's gathered-keys source
// is not used: it cannot weight the values by m, and flash covers the W-row windows of prefill.
// The paper keeps a heap for its incremental decode selection; here each selection is an O(n)
// partial selection over the visible keys, the same result.
//
// Numerics: tau and m in double in both paths (the fast path reads the f32 scores), so both pick
// the same keys with the same weights; the attention over them is f32 (flash) against double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <utility>
#include <vector>

#include "mnemo/attention/approx/positions.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention::approx {

namespace sparsek_detail {

// The walk of the header over breakpoints of keys z[idx[0 .. n)], idx sorted by z descending;
// requires n > k. Returns tau.
template <class Z>
double walk(const Z* z, const std::int64_t* idx, std::int64_t n, std::int64_t k) {
  // Events descending: an entry at z_j (slope + 1 below it), an exit at z_j - 1 (slope - 1).
  // Both lists are sorted already; merge them, entries first on equal values.
  double f = 0, slope = 0, at = static_cast<double>(z[idx[0]]);
  std::int64_t e = 0, x = 0;
  const double want = static_cast<double>(k);
  while (e < n || x < n) {
    const double ze = e < n ? static_cast<double>(z[idx[e]]) : -std::numeric_limits<double>::infinity();
    const double zx = static_cast<double>(z[idx[x]]) - 1.0;
    const bool entry = e < n && ze >= zx;
    const double next = entry ? ze : zx;
    const double reached = f + slope * (at - next);
    if (reached >= want && slope > 0) return at - (want - f) / slope;
    f = reached;
    at = next;
    if (entry) {
      slope += 1;
      ++e;
    } else {
      slope -= 1;
      ++x;
    }
  }
  return at;  // not reached for n > k (f ends at n)
}

inline void check_k(const char* fn, std::int64_t k) {
  mnemo::detail::require(k >= 1, fn, ": k (the budget) must be >= 1, got ", k);
}

}  // namespace sparsek_detail

namespace reference {

// tau of SparseK(z, k) by the sort-based exact algorithm, in double; -inf when n <= k (m = 1).
inline double sparsek_threshold(const float* z, std::int64_t n, std::int64_t k) {
  sparsek_detail::check_k("approx::reference::sparsek_threshold", k);
  if (n <= k) return -std::numeric_limits<double>::infinity();
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) { return z[a] > z[b]; });
  return sparsek_detail::walk(z, idx.data(), n, k);
}

}  // namespace reference

// tau of SparseK(z, k), fast: the k-th largest score by selection, then the walk over the keys
// within 1 of it (see the header). -inf when n <= k. NaN scores are not allowed (unchecked).
inline double sparsek_threshold(const float* z, std::int64_t n, std::int64_t k) {
  sparsek_detail::check_k("approx::sparsek_threshold", k);
  if (n <= k) return -std::numeric_limits<double>::infinity();
  std::vector<float> copy(z, z + n);
  std::nth_element(copy.begin(), copy.begin() + (k - 1), copy.end(), std::greater<float>());
  const double cut = static_cast<double>(copy[static_cast<std::size_t>(k - 1)]) - 1.0;
  std::vector<std::int64_t> idx;
  idx.reserve(static_cast<std::size_t>(2 * k));
  for (std::int64_t j = 0; j < n; ++j)
    if (static_cast<double>(z[j]) > cut) idx.push_back(j);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) { return z[a] > z[b]; });
  return sparsek_detail::walk(z, idx.data(), static_cast<std::int64_t>(idx.size()), k);
}

// The mask of one key for threshold tau.
inline float sparsek_weight(float z, double tau) {
  return static_cast<float>(std::clamp(static_cast<double>(z) - tau, 0.0, 1.0));
}

// SparseK(z, k) into m [n] (m may be z). Returns tau.
inline double sparsek(view<const float, 1> z, std::int64_t k, view<float, 1> m) {
  constexpr const char* fn = "approx::sparsek";
  mnemo::detail::require_shape(fn, "m", m, {z.extent(0)}, " [n] (the shape of z)");
  mnemo::detail::require(z.stride(0) == 1 && m.stride(0) == 1, fn, ": z and m must be contiguous");
  const double tau = sparsek_threshold(z.data(), z.extent(0), k);
  for (std::int64_t j = 0; j < z.extent(0); ++j) m(j) = sparsek_weight(z(j), tau);
  return tau;
}

// The linear scoring network: z [B, Hkv, Lk] = w [Hkv, D] . k_j (f32 dot products).
inline void sparsek_scores(view<const float, 4> k,  // [B, Hkv, Lk, D]
                           view<const float, 2> w,  // [Hkv, D]
                           view<float, 3> z,        // [B, Hkv, Lk]
                           const options& opt = {}) {
  constexpr const char* fn = "approx::sparsek_scores";
  mnemo::detail::require_data(fn, "k", k, " [B, Hkv, Lk, D]");
  mnemo::detail::require_shape(fn, "w", w, {k.extent(1), k.extent(3)}, " [Hkv, D]");
  mnemo::detail::require_shape(fn, "z", z, {k.extent(0), k.extent(1), k.extent(2)}, " [B, Hkv, Lk]");
  mnemo::detail::require(w.stride(1) == 1, fn, ": w rows must be contiguous");
  parallel_for(
      k.extent(0) * k.extent(1),
      [&](std::int64_t bh) {
        const std::int64_t b = bh / k.extent(1), hk = bh % k.extent(1);
        for (std::int64_t j = 0; j < k.extent(2); ++j) z(b, hk, j) = simd::dot(w.ptr(hk), k.ptr(b, hk, j), k.extent(3));
      },
      opt.threads);
}

struct sparsek_options {
  std::int64_t k = 64;       // the budget: keys per selection
  bool causal = false;
  std::int64_t window = 1;   // causal prefill: query rows per selection (1: every position)
};

namespace sparsek_detail {

inline dims check(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                  const view<const float, 4>& v, const view<const float, 3>& z, const view<float, 4>& out,
                  const view<float, 3>& lse, const sparsek_options& p, const options& opt) {
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mods::none{}, opt);
  mnemo::detail::require_shape(fn, "z", z, {d.B, d.Hkv, d.Lk}, " [B, Hkv, Lk] (one score per key)");
  mnemo::detail::require(d.Lk == 0 || z.stride(2) == 1, fn, ": z rows must be contiguous");
  check_k(fn, p.k);
  mnemo::detail::require(p.window >= 1, fn, ": sparsek_options.window must be >= 1, got ", p.window);
  mnemo::detail::require(opt.sinks.empty(), fn, ": options.sinks are not supported by SPARSEK attention");
  return d;
}

// Query rows [first, last) of window t, and the keys [0, n) its selection chooses from.
struct window {
  std::int64_t first, last, n;
};
inline std::int64_t windows(const dims& d, const sparsek_options& p) {
  return p.causal ? (d.Lq + p.window - 1) / p.window : (d.Lq > 0 ? 1 : 0);
}
inline window window_of(const dims& d, const sparsek_options& p, std::int64_t t) {
  if (!p.causal) return {0, d.Lq, d.Lk};
  const std::int64_t first = t * p.window, last = std::min(d.Lq, first + p.window);
  return {first, last, std::clamp<std::int64_t>(last - 1 + d.offset() + 1, 0, d.Lk)};
}

// S of the header for scores z[0 .. n), ascending positions, and their masks.
template <bool Reference>
void select(const float* z, std::int64_t n, std::int64_t k, std::vector<std::int64_t>& sel, std::vector<float>& m) {
  const double tau = Reference ? reference::sparsek_threshold(z, n, k) : sparsek_threshold(z, n, k);
  sel.resize(static_cast<std::size_t>(n));
  std::iota(sel.begin(), sel.end(), 0);
  if (n > k) {
    auto better = [&](std::int64_t a, std::int64_t b) { return z[a] > z[b] || (z[a] == z[b] && a < b); };
    if constexpr (Reference) std::sort(sel.begin(), sel.end(), better);
    else std::nth_element(sel.begin(), sel.begin() + (k - 1), sel.end(), better);
    sel.resize(static_cast<std::size_t>(k));
    std::sort(sel.begin(), sel.end());
  }
  m.resize(sel.size());
  for (std::size_t t = 0; t < sel.size(); ++t) m[t] = sparsek_weight(z[sel[t]], tau);
}

}  // namespace sparsek_detail

// SPARSEK attention in double: the selection of every window by the sort-based operator, softmax
// over the selected visible keys, values weighted by the mask.
inline void reference_sparsek_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                        view<const float, 4> k,  // [B, Hkv, Lk, D]
                                        view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                        view<const float, 3> z,  // [B, Hkv, Lk]
                                        const sparsek_options& p,
                                        view<float, 4> out,       // [B, Hq, Lq, Dv]
                                        view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                                        const options& opt = {}) {
  constexpr const char* fn = "approx::reference_sparsek_attention";
  const dims d = sparsek_detail::check(fn, q, k, v, z, out, lse, p, opt);
  const std::int64_t nw = sparsek_detail::windows(d, p);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        std::vector<std::int64_t> sel;
        std::vector<float> m;
        std::vector<double> s, acc(static_cast<std::size_t>(d.Dv));
        for (std::int64_t t = 0; t < nw; ++t) {
          const sparsek_detail::window w = sparsek_detail::window_of(d, p, t);
          sparsek_detail::select<true>(d.Lk > 0 ? z.ptr(b, hk) : nullptr, w.n, p.k, sel, m);
          s.resize(sel.size());
          for (std::int64_t i = w.first; i < w.last; ++i) {
            const std::int64_t qp = i + d.offset();
            double top = -std::numeric_limits<double>::infinity();
            for (std::size_t t2 = 0; t2 < sel.size(); ++t2) {
              s[t2] = !p.causal || sel[t2] <= qp ? d.scale * simd::reference::dot(q.ptr(b, h, i), k.ptr(b, hk, sel[t2]), d.D)
                                                 : -std::numeric_limits<double>::infinity();
              top = std::max(top, s[t2]);
            }
            float* o = out.ptr(b, h, i);
            if (top == -std::numeric_limits<double>::infinity()) {
              std::fill_n(o, d.Dv, 0.0f);
              if (!lse.empty()) lse(b, h, i) = -std::numeric_limits<float>::infinity();
              continue;
            }
            std::fill(acc.begin(), acc.end(), 0.0);
            double sum = 0;
            for (std::size_t t2 = 0; t2 < sel.size(); ++t2) {
              if (s[t2] == -std::numeric_limits<double>::infinity()) continue;
              const double e = std::exp(s[t2] - top);
              sum += e;
              for (std::int64_t c = 0; c < d.Dv; ++c)
                acc[static_cast<std::size_t>(c)] += e * static_cast<double>(m[t2]) * v(b, hk, sel[t2], c);
            }
            for (std::int64_t c = 0; c < d.Dv; ++c) o[c] = static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
            if (!lse.empty()) lse(b, h, i) = static_cast<float>(top + std::log(sum));
          }
        }
      },
      opt.threads);
}

// SPARSEK attention, fast path (see the header).
inline void sparsek_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                              view<const float, 4> k,  // [B, Hkv, Lk, D]
                              view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                              view<const float, 3> z,  // [B, Hkv, Lk]
                              const sparsek_options& p,
                              view<float, 4> out,       // [B, Hq, Lq, Dv]
                              view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                              const options& opt = {}) {
  constexpr const char* fn = "approx::sparsek_attention";
  const dims d = sparsek_detail::check(fn, q, k, v, z, out, lse, p, opt);
  const std::int64_t nw = sparsek_detail::windows(d, p), G = d.group(), items = d.B * d.Hkv * nw;
  // Many windows: one per thread, each flash serial; a few (non-causal, decode): flash threaded.
  const bool outer = items >= 2 * resolve_threads(opt.threads);
  options inner = opt;
  inner.scale = d.scale;
  inner.threads = outer ? 1 : opt.threads;
  auto run = [&](std::int64_t item) {
    const std::int64_t t = item % nw, bhk = item / nw, b = bhk / d.Hkv, hk = bhk % d.Hkv;
    const sparsek_detail::window w = sparsek_detail::window_of(d, p, t);
    const std::int64_t rows = w.last - w.first;
    auto out_w = out.narrow(0, b, 1).narrow(1, hk * G, G).narrow(2, w.first, rows);
    auto lse_w = lse.empty() ? lse : lse.narrow(0, b, 1).narrow(1, hk * G, G).narrow(2, w.first, rows);
    if (w.n == 0) {
      for (std::int64_t g = 0; g < G; ++g)
        for (std::int64_t i = 0; i < rows; ++i) {
          std::fill_n(out_w.ptr(0, g, i), d.Dv, 0.0f);
          if (!lse.empty()) lse_w(0, g, i) = -std::numeric_limits<float>::infinity();
        }
      return;
    }
    std::vector<std::int64_t> sel;
    std::vector<float> m;
    sparsek_detail::select<false>(z.ptr(b, hk), w.n, p.k, sel, m);
    const std::int64_t n = static_cast<std::int64_t>(sel.size());
    std::vector<float> ks(static_cast<std::size_t>(n * d.D)), vs(static_cast<std::size_t>(n * d.Dv));
    sparse_detail::gather_rows(k.ptr(b, hk, 0), k.stride(2), d.D, sel.data(), n, ks.data());
    sparse_detail::gather_rows(v.ptr(b, hk, 0), v.stride(2), d.Dv, sel.data(), n, vs.data(), m.data());
    std::vector<std::int64_t> qpos(static_cast<std::size_t>(rows));
    for (std::int64_t i = 0; i < rows; ++i) qpos[static_cast<std::size_t>(i)] = w.first + i + d.offset();
    const position_mask mask{p.causal, qpos.data(), 0, sel.data(), 0, G, G, n - rows};
    attention::flash<float, position_mask>(q.narrow(0, b, 1).narrow(1, hk * G, G).narrow(2, w.first, rows),
                                           sparse_detail::as_heads(ks.data(), 1, n, d.D),
                                           sparse_detail::as_heads(vs.data(), 1, n, d.Dv), out_w, lse_w, mask, inner);
  };
  if (outer) parallel_for_dynamic(items, run, opt.threads);
  else
    for (std::int64_t item = 0; item < items; ++item) run(item);
}

}  // namespace mnemo::attention::approx

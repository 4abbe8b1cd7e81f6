// mnemo/memory/product_keys.hpp — product-key memory (Lample, Sablayrolles, Ranzato, Denoyer &
// Jégou, "Large Memory Layers with Product Keys", NeurIPS 2019).
//
// A memory of n_keys^2 value rows addressed through two sets of n_keys sub-keys per head. For a
// query row and head h, q = [q1, q2] (two halves of k_dim / 2):
//   s1 = q1 . keys[h, 0]^T,  s2 = q2 . keys[h, 1]^T                         [n_keys] each
//   A  = top-knn(s1),  B = top-knn(s2)                                         (sorted, descending)
//   candidates (a, b) in A x B with score s1[a] + s2[b] and memory index a * n_keys + b
//   I  = top-knn candidates, sorted by score descending                        -> indices, scores
//   w  = softmax(scores)                                                       -> weights
//   out = sum_heads sum_{i in I} w_i values[i]                                 (heads summed)
// (golden/README.md "pkm" fixes the flattened index, the order and the head sum.)
// Optional query normalisation (options.query_norm): each half of each head's query is replaced
// by x / sqrt(sum x^2 + eps), eps = 1e-6, before scoring (cosine-like sub-key scores).
//
// Ties: sub-keys of equal score keep index order; candidates of equal score keep (a, b) order
// over the two sorted lists. Both paths use this rule, so indices agree exactly. With that rule
// a candidate (a, b) has (a + 1)(b + 1) - 1 candidates ranked before it, so only pairs with
// (a + 1)(b + 1) <= knn can be selected. The reference scores and sorts all knn^2 pairs; the fast
// path walks them best-first from (0, 0) with a heap (detail::best_pairs): knn pops.
//
// Split API: pkm_search (indices, weights, scores; no value row read) and pkm_gather (the
// weighted sum of value rows) are the two halves of pkm_forward, which fuses them per block.
//
// Backward, for the gradient dout of out (top-k selection is piecewise constant, so gradients
// flow through the selected entries only):
//   dw_i = dout . values[i],   ds_i = w_i (dw_i - sum_j w_j dw_j)               softmax
//   dvalues[i] += w_i dout                                                       touched rows only
//   ds1[a] = sum of ds_i over selected i with first sub-key a (ds2 likewise)
//   dq1 = sum_a ds1[a] keys[h, 0, a],   dkeys[h, 0, a] = ds1[a] q1 (summed over rows)
// and through the normalisation dq = dq^/r - q (q . dq^)/r^3 with r = sqrt(|q|^2 + eps).
//
// Shapes: query [N, heads, k_dim], keys [heads, 2, n_keys, k_dim / 2], values [n_keys^2, v_dim],
// out [N, v_dim], indices (int64) / weights / scores [N, heads, knn].
// Backward: dout [N, v_dim] -> dquery [N, heads, k_dim] (overwritten), dkeys [heads, 2, n_keys,
// k_dim / 2] (overwritten), dvalues [n_keys^2, v_dim] (accumulated into, touched rows only: the
// caller zeroes it once, as with any sparse gradient).
//
// Numerics: the reference scores and softmaxes in double; the fast path in f32 (Eigen GEMM for the
// sub-key scores of a block of rows, SIMD partial top-k, SIMD axpy for the value rows, read with
// software prefetch since they are scattered over the table).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/common.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::memory {

struct pkm_options {
  bool query_norm = false;  // L2-normalise each query half first
  int threads = 0;          // 0: the OpenMP default
};

// eps of the query normalisation, as the linear family's l2norm.
inline constexpr double pkm_norm_eps = 1e-6;

namespace detail {

struct pkm_dims {
  std::int64_t N, heads, k_dim, half, n_keys, v_dim, knn;
};

// The query and sub-key checks (v_dim = 0: no values involved).
inline pkm_dims check_pkm_keys(const char* fn, const view<const float, 3>& query, const view<const float, 4>& keys,
                               std::int64_t knn, int threads) {
  using mnemo::detail::require;
  const std::int64_t N = query.extent(0), heads = query.extent(1), k_dim = query.extent(2);
  require(heads >= 1, fn, ": query.shape[1] (heads) must be >= 1, got ", heads);
  require(k_dim >= 2 && k_dim % 2 == 0, fn, ": query.shape[2] (k_dim) must be even and >= 2, got ", k_dim);
  const std::int64_t n_keys = keys.extent(2);
  mnemo::detail::require_shape(fn, "keys", keys, {heads, 2, n_keys, k_dim / 2}, " [heads, 2, n_keys, k_dim / 2]");
  require(n_keys >= 1, fn, ": keys.shape[2] (n_keys) must be >= 1, got ", n_keys);
  require(knn >= 1 && knn <= n_keys, fn, ": knn must be in [1, n_keys = ", n_keys, "], got ", knn);
  check_threads(fn, threads);
  return {N, heads, k_dim, k_dim / 2, n_keys, 0, knn};
}

inline pkm_dims check_pkm(const char* fn, const view<const float, 3>& query, const view<const float, 4>& keys,
                          const view<const float, 2>& values, std::int64_t knn, int threads) {
  pkm_dims d = check_pkm_keys(fn, query, keys, knn, threads);
  mnemo::detail::require(values.extent(0) == d.n_keys * d.n_keys, fn, ": values.shape[0] must be n_keys^2 = ",
                         d.n_keys * d.n_keys, ", got ", values.extent(0));
  d.v_dim = values.extent(1);
  return d;
}

inline void check_pkm_outputs(const char* fn, const pkm_dims& d, const view<float, 2>& out,
                              const view<std::int64_t, 3>& indices, const view<float, 3>& weights,
                              const view<float, 3>& scores) {
  mnemo::detail::require_shape(fn, "out", out, {d.N, d.v_dim}, " [N, v_dim]");
  mnemo::detail::require_shape(fn, "indices", indices, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  mnemo::detail::require_shape(fn, "weights", weights, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  if (!scores.empty()) mnemo::detail::require_shape(fn, "scores", scores, {d.N, d.heads, d.knn}, " [N, heads, knn]");
}

inline void check_pkm_backward(const char* fn, const pkm_dims& d, const view<const std::int64_t, 3>& indices,
                               const view<const float, 3>& weights, const view<const float, 2>& dout,
                               const view<float, 3>& dquery, const view<float, 4>& dkeys,
                               const view<float, 2>& dvalues) {
  mnemo::detail::require_shape(fn, "indices", indices, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  mnemo::detail::require_shape(fn, "weights", weights, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  mnemo::detail::require_shape(fn, "dout", dout, {d.N, d.v_dim}, " [N, v_dim]");
  mnemo::detail::require_shape(fn, "dquery", dquery, {d.N, d.heads, d.k_dim}, " [N, heads, k_dim]");
  mnemo::detail::require_shape(fn, "dkeys", dkeys, {d.heads, 2, d.n_keys, d.half}, " [heads, 2, n_keys, k_dim / 2]");
  mnemo::detail::require_shape(fn, "dvalues", dvalues, {d.n_keys * d.n_keys, d.v_dim}, " [n_keys^2, v_dim]");
  for (std::int64_t n = 0; n < d.N; ++n)
    for (std::int64_t h = 0; h < d.heads; ++h)
      for (std::int64_t j = 0; j < d.knn; ++j) {
        const std::int64_t i = indices(n, h, j);
        mnemo::detail::require(i >= 0 && i < d.n_keys * d.n_keys, fn, ": indices[", n, ", ", h, ", ", j,
                               "] must be in [0, n_keys^2 = ", d.n_keys * d.n_keys, "), got ", i);
      }
}

// x / sqrt(sum x^2 + eps) in double; returns r = sqrt(sum x^2 + eps).
template <class T>
double normalize_half(const float* x, std::int64_t n, T* out) {
  double ss = 0;
  for (std::int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
  const double r = std::sqrt(ss + pkm_norm_eps);
  for (std::int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(x[i] / r);
  return r;
}

}  // namespace detail

namespace reference {

// Product-key lookup in double: all n_keys sub-key scores, full sorts, all knn^2 candidates.
inline void pkm_forward(view<const float, 3> query,       // [N, heads, k_dim]
                        view<const float, 4> keys,        // [heads, 2, n_keys, k_dim / 2]
                        view<const float, 2> values,      // [n_keys^2, v_dim]
                        std::int64_t knn,
                        view<float, 2> out,               // [N, v_dim]
                        view<std::int64_t, 3> indices,    // [N, heads, knn]
                        view<float, 3> weights,           // [N, heads, knn]
                        view<float, 3> scores = {},       // [N, heads, knn] or empty
                        const pkm_options& opt = {}) {
  constexpr const char* fn = "memory::reference::pkm_forward";
  const detail::pkm_dims d = detail::check_pkm(fn, query, keys, values, knn, opt.threads);
  detail::check_pkm_outputs(fn, d, out, indices, weights, scores);
  parallel_for(d.N, [&](std::int64_t n) {
    std::vector<double> acc(static_cast<std::size_t>(d.v_dim), 0.0), qh(static_cast<std::size_t>(d.half));
    for (std::int64_t h = 0; h < d.heads; ++h) {
      std::vector<double> sub[2];
      std::vector<std::int64_t> top[2];
      for (int part = 0; part < 2; ++part) {
        const float* qp = query.ptr(n, h) + part * d.half;
        if (opt.query_norm) detail::normalize_half(qp, d.half, qh.data());
        else std::copy(qp, qp + d.half, qh.begin());
        std::vector<std::pair<double, std::int64_t>> s(static_cast<std::size_t>(d.n_keys));
        for (std::int64_t j = 0; j < d.n_keys; ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < d.half; ++c) dot += qh[c] * keys(h, part, j, c);
          s[j] = {-dot, j};  // ascending (-score, index) = descending score, ties by index
        }
        std::sort(s.begin(), s.end());
        for (std::int64_t a = 0; a < d.knn; ++a) {
          sub[part].push_back(-s[a].first);
          top[part].push_back(s[a].second);
        }
      }
      std::vector<std::pair<double, std::int64_t>> cand;  // (-score, a * knn + b)
      for (std::int64_t a = 0; a < d.knn; ++a)
        for (std::int64_t b = 0; b < d.knn; ++b) cand.push_back({-(sub[0][a] + sub[1][b]), a * d.knn + b});
      std::sort(cand.begin(), cand.end());
      const double m = -cand[0].first;
      double z = 0;
      for (std::int64_t j = 0; j < d.knn; ++j) z += std::exp(-cand[j].first - m);
      for (std::int64_t j = 0; j < d.knn; ++j) {
        const std::int64_t a = cand[j].second / d.knn, b = cand[j].second % d.knn;
        const std::int64_t idx = top[0][a] * d.n_keys + top[1][b];
        const double w = std::exp(-cand[j].first - m) / z;
        indices(n, h, j) = idx;
        weights(n, h, j) = static_cast<float>(w);
        if (!scores.empty()) scores(n, h, j) = static_cast<float>(-cand[j].first);
        for (std::int64_t c = 0; c < d.v_dim; ++c) acc[c] += w * values(idx, c);
      }
    }
    for (std::int64_t c = 0; c < d.v_dim; ++c) out(n, c) = static_cast<float>(acc[c]);
  }, opt.threads);
}

// Backward of pkm_forward in double, from the forward's indices and weights (see the header).
inline void pkm_backward(view<const float, 3> query,            // [N, heads, k_dim]
                         view<const float, 4> keys,             // [heads, 2, n_keys, k_dim / 2]
                         view<const float, 2> values,           // [n_keys^2, v_dim]
                         view<const std::int64_t, 3> indices,   // [N, heads, knn] from pkm_forward
                         view<const float, 3> weights,          // [N, heads, knn] from pkm_forward
                         view<const float, 2> dout,             // [N, v_dim]
                         view<float, 3> dquery,                 // [N, heads, k_dim], overwritten
                         view<float, 4> dkeys,                  // [heads, 2, n_keys, k_dim / 2], overwritten
                         view<float, 2> dvalues,                // [n_keys^2, v_dim], accumulated (touched rows)
                         const pkm_options& opt = {}) {
  constexpr const char* fn = "memory::reference::pkm_backward";
  const std::int64_t knn = indices.extent(2);
  const detail::pkm_dims d = detail::check_pkm(fn, query, keys, values, knn, opt.threads);
  detail::check_pkm_backward(fn, d, indices, weights, dout, dquery, dkeys, dvalues);
  std::vector<double> dk(static_cast<std::size_t>(d.heads * 2 * d.n_keys * d.half), 0.0);
  for (std::int64_t n = 0; n < d.N; ++n)
    for (std::int64_t h = 0; h < d.heads; ++h) {
      std::vector<double> dw(static_cast<std::size_t>(d.knn)), ds(static_cast<std::size_t>(d.knn));
      double wdw = 0;
      for (std::int64_t j = 0; j < d.knn; ++j) {
        const std::int64_t idx = indices(n, h, j);
        double dot = 0;
        for (std::int64_t c = 0; c < d.v_dim; ++c) dot += static_cast<double>(dout(n, c)) * values(idx, c);
        dw[j] = dot;
        wdw += weights(n, h, j) * dot;
      }
      for (std::int64_t j = 0; j < d.knn; ++j) {
        const double w = weights(n, h, j);
        ds[j] = w * (dw[j] - wdw);
        for (std::int64_t c = 0; c < d.v_dim; ++c)
          dvalues(indices(n, h, j), c) += static_cast<float>(w * dout(n, c));
      }
      for (int part = 0; part < 2; ++part) {
        const float* qp = query.ptr(n, h) + part * d.half;
        std::vector<double> qh(static_cast<std::size_t>(d.half)), dqh(static_cast<std::size_t>(d.half), 0.0);
        const double r = opt.query_norm ? detail::normalize_half(qp, d.half, qh.data()) : 1.0;
        if (!opt.query_norm) std::copy(qp, qp + d.half, qh.begin());
        for (std::int64_t j = 0; j < d.knn; ++j) {
          const std::int64_t sub = part == 0 ? indices(n, h, j) / d.n_keys : indices(n, h, j) % d.n_keys;
          double* dks = dk.data() + ((h * 2 + part) * d.n_keys + sub) * d.half;
          for (std::int64_t c = 0; c < d.half; ++c) {
            dqh[c] += ds[j] * keys(h, part, sub, c);
            dks[c] += ds[j] * qh[c];
          }
        }
        float* dq = dquery.ptr(n, h) + part * d.half;
        if (opt.query_norm) {
          double qdq = 0;  // q . dq^ with the raw q
          for (std::int64_t c = 0; c < d.half; ++c) qdq += static_cast<double>(qp[c]) * dqh[c];
          for (std::int64_t c = 0; c < d.half; ++c) dq[c] = static_cast<float>(dqh[c] / r - qp[c] * qdq / (r * r * r));
        } else {
          for (std::int64_t c = 0; c < d.half; ++c) dq[c] = static_cast<float>(dqh[c]);
        }
      }
    }
  for (std::int64_t h = 0; h < d.heads; ++h)
    for (int part = 0; part < 2; ++part)
      for (std::int64_t j = 0; j < d.n_keys; ++j)
        for (std::int64_t c = 0; c < d.half; ++c)
          dkeys(h, part, j, c) = static_cast<float>(dk[((h * 2 + part) * d.n_keys + j) * d.half + c]);
}

}  // namespace reference

namespace detail {

// Query rows per work item of the fast search: one [rows, half] x [half, n_keys] GEMM per head and
// half, then the selections. 64 rows keep the score block at 128 KiB for n_keys = 512.
inline constexpr std::int64_t pkm_row_block = 64;
// Columns of dvalues per work item of the backward's value pass (each item owns its columns).
inline constexpr std::int64_t pkm_value_columns = 64;
// Value rows requested ahead of the one being added in the gather. The rows are scattered over
// the table (512 MiB at n_keys = 512, v_dim = 512), so the hardware prefetchers cannot guess the
// next one; asking 4 rows (8 KiB at v_dim = 512) ahead keeps the loads in flight while the adds of
// the current row run.
inline constexpr std::int64_t pkm_prefetch_rows = 4;

// Asks for the cache lines of bytes [p, p + n) (a hint: never faults, never changes a result).
inline void pkm_prefetch(const void* p, std::int64_t n) {
#if defined(__GNUC__)
  constexpr std::int64_t line = 64;
  const char* c = static_cast<const char*>(p);
  for (std::int64_t b = 0; b < n; b += line) __builtin_prefetch(c + b);
#else
  (void)p;
  (void)n;
#endif
}

// The query halves of rows [n0, n0 + rows) and head h, normalised when asked, as [rows, half].
inline void pkm_stage_queries(const view<const float, 3>& query, const pkm_dims& d, std::int64_t n0,
                              std::int64_t rows, std::int64_t h, int part, bool norm, matrix& qs) {
  for (std::int64_t r = 0; r < rows; ++r) {
    const float* qp = query.ptr(n0 + r, h) + part * d.half;
    if (norm) normalize_half(qp, d.half, qs.row(r).data());
    else std::copy(qp, qp + d.half, qs.row(r).data());
  }
}

// The knn best pairs (a, b) of two descending lists v1, v2 of knn entries, in the order of
// `before` on (v1[a] + v2[b], a * knn + b): a best-first walk. (a, b + 1) never ranks before
// (a, b) (rounded addition is monotone and its index is larger), nor (a + 1, 0) before (a, 0),
// so the next best pair is always on the frontier that `heap` holds; each step pops the best and
// pushes its successors. knn pops of a heap of at most knn + 1 entries, instead of the
// knn * H(knn) insertions of scanning every pair with (a + 1)(b + 1) <= knn (measured in
// bench rows memory/fast/module:pkm_search at knn = 32: see bench/memory_rows.cpp).
inline void best_pairs(const float* v1, const float* v2, std::int64_t knn, scored* result, std::vector<scored>& heap) {
  const auto worse = [](const scored& x, const scored& y) { return before(y, x); };
  heap.clear();
  heap.push_back({v1[0] + v2[0], 0});
  for (std::int64_t j = 0; j < knn; ++j) {
    std::pop_heap(heap.begin(), heap.end(), worse);
    const scored top = heap.back();
    heap.pop_back();
    result[j] = top;
    const std::int64_t a = top.index / knn, b = top.index % knn;
    if (b + 1 < knn) {
      heap.push_back({v1[a] + v2[b + 1], top.index + 1});
      std::push_heap(heap.begin(), heap.end(), worse);
    }
    if (b == 0 && a + 1 < knn) {
      heap.push_back({v1[a + 1] + v2[0], (a + 1) * knn});
      std::push_heap(heap.begin(), heap.end(), worse);
    }
  }
}

// Scratch of one search work item, sized once per thread.
struct pkm_workspace {
  matrix qs, s;                          // [rows, half], [rows, n_keys]
  std::vector<float> sub_v, top_v;       // [2, rows, knn], [knn]
  std::vector<std::int64_t> sub_i;       // [2, rows, knn]
  std::vector<scored> heap, best;        // <= knn + 1, [knn]
  topk_workspace top;

  pkm_workspace(const pkm_dims& d, std::int64_t rows)
      : qs(rows, d.half), s(rows, d.n_keys), sub_v(static_cast<std::size_t>(2 * rows * d.knn)),
        top_v(static_cast<std::size_t>(d.knn)), sub_i(static_cast<std::size_t>(2 * rows * d.knn)),
        best(static_cast<std::size_t>(d.knn)) {
    heap.reserve(static_cast<std::size_t>(d.knn + 1));
  }
};

// The sub-key scores of rows [n0, n0 + rows), head h and one half, into ws.s [rows, n_keys].
inline void pkm_subkey_scores(const view<const float, 3>& query, const view<const float, 4>& keys, const pkm_dims& d,
                              std::int64_t n0, std::int64_t rows, std::int64_t h, int part, bool norm,
                              pkm_workspace& ws) {
  pkm_stage_queries(query, d, n0, rows, h, part, norm, ws.qs);
  const cmap kp(keys.ptr(h, part), d.n_keys, d.half);
  gemm<accumulate::assign>(ws.s.topRows(rows), ws.qs.topRows(rows), kp.transpose());
}

// Search of rows [n0, n0 + rows), every head: indices, weights and (when not empty) scores.
template <class Arch>
void pkm_search_rows(const view<const float, 3>& query, const view<const float, 4>& keys, const pkm_dims& d,
                     std::int64_t n0, std::int64_t rows, bool norm, const view<std::int64_t, 3>& indices,
                     const view<float, 3>& weights, const view<float, 3>& scores, pkm_workspace& ws) {
  for (std::int64_t h = 0; h < d.heads; ++h) {
    // Sub-key scores of the block's rows, one GEMM per half, then each row's top-knn.
    for (int part = 0; part < 2; ++part) {
      pkm_subkey_scores(query, keys, d, n0, rows, h, part, norm, ws);
      for (std::int64_t r = 0; r < rows; ++r) {
        const std::int64_t at = (part * rows + r) * d.knn;
        topk<Arch>(ws.s.row(r).data(), d.n_keys, d.knn, ws.sub_v.data() + at, ws.sub_i.data() + at, ws.top);
      }
    }
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t n = n0 + r;
      const std::int64_t* i1 = ws.sub_i.data() + r * d.knn;
      const std::int64_t* i2 = ws.sub_i.data() + (rows + r) * d.knn;
      best_pairs(ws.sub_v.data() + r * d.knn, ws.sub_v.data() + (rows + r) * d.knn, d.knn, ws.best.data(), ws.heap);
      const float m = ws.best[0].value;
      float z = 0;
      for (std::int64_t j = 0; j < d.knn; ++j) {
        ws.top_v[j] = m == minus_inf ? 0.0f : simd::exp<Arch>(ws.best[j].value - m);
        z += ws.top_v[j];
      }
      for (std::int64_t j = 0; j < d.knn; ++j) {
        const std::int64_t a = ws.best[j].index / d.knn, b = ws.best[j].index % d.knn;
        indices(n, h, j) = i1[a] * d.n_keys + i2[b];
        weights(n, h, j) = z > 0 ? ws.top_v[j] / z : 0.0f;
        if (!scores.empty()) scores(n, h, j) = ws.best[j].value;
      }
    }
  }
}

// out[n] = sum_h sum_j weights[n, h, j] values[indices[n, h, j]] for rows [n0, n0 + rows).
template <class Arch>
void pkm_gather_rows(const view<const float, 2>& values, const view<const std::int64_t, 3>& indices,
                     const view<const float, 3>& weights, std::int64_t n0, std::int64_t rows, const view<float, 2>& out) {
  const std::int64_t heads = indices.extent(1), knn = indices.extent(2), per_row = heads * knn, v_dim = values.extent(1);
  const std::int64_t row_bytes = v_dim * static_cast<std::int64_t>(sizeof(float));
  // Entry e of the block: row n0 + e / per_row, head e % per_row / knn, rank e % knn.
  const auto index_of = [&](std::int64_t e) {
    return indices(n0 + e / per_row, e % per_row / knn, e % knn);
  };
  const std::int64_t entries = rows * per_row;
  for (std::int64_t e = 0; e < std::min(pkm_prefetch_rows, entries); ++e) pkm_prefetch(values.ptr(index_of(e)), row_bytes);
  for (std::int64_t r = 0; r < rows; ++r) {
    float* o = out.ptr(n0 + r);
    std::fill(o, o + v_dim, 0.0f);
    for (std::int64_t k = 0; k < per_row; ++k) {
      const std::int64_t e = r * per_row + k;
      if (e + pkm_prefetch_rows < entries) pkm_prefetch(values.ptr(index_of(e + pkm_prefetch_rows)), row_bytes);
      simd::axpy<Arch>(weights(n0 + r, k / knn, k % knn), values.ptr(index_of(e)), o, v_dim);
    }
  }
}

inline void check_pkm_gather(const char* fn, const view<const float, 2>& values,
                             const view<const std::int64_t, 3>& indices, const view<const float, 3>& weights,
                             const view<float, 2>& out, int threads) {
  const std::int64_t N = indices.extent(0), heads = indices.extent(1), knn = indices.extent(2);
  const std::int64_t slots = values.extent(0);
  mnemo::detail::require_shape(fn, "weights", weights, {N, heads, knn}, " [N, heads, knn] (from indices)");
  mnemo::detail::require_shape(fn, "out", out, {N, values.extent(1)}, " [N, v_dim] (v_dim from values)");
  check_threads(fn, threads);
  for (std::int64_t n = 0; n < N; ++n)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t j = 0; j < knn; ++j) {
        const std::int64_t i = indices(n, h, j);
        mnemo::detail::require(i >= 0 && i < slots, fn, ": indices[", n, ", ", h, ", ", j,
                               "] must be in [0, values.shape[0] = ", slots, "), got ", i);
      }
}

}  // namespace detail

// Product-key search alone (f32 fast path): the indices, weights and scores of pkm_forward,
// without reading a value row (pkm_gather then reads them). Same indices as reference::pkm_forward.
template <class Arch = simd::default_arch>
void pkm_search(view<const float, 3> query,      // [N, heads, k_dim]
                view<const float, 4> keys,       // [heads, 2, n_keys, k_dim / 2]
                std::int64_t knn,
                view<std::int64_t, 3> indices,   // [N, heads, knn]
                view<float, 3> weights,          // [N, heads, knn]
                view<float, 3> scores = {},      // [N, heads, knn] or empty
                const pkm_options& opt = {}) {
  constexpr const char* fn = "memory::pkm_search";
  const detail::pkm_dims d = detail::check_pkm_keys(fn, query, keys, knn, opt.threads);
  mnemo::detail::require_shape(fn, "indices", indices, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  mnemo::detail::require_shape(fn, "weights", weights, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  if (!scores.empty()) mnemo::detail::require_shape(fn, "scores", scores, {d.N, d.heads, d.knn}, " [N, heads, knn]");
  const std::int64_t blocks = (d.N + detail::pkm_row_block - 1) / detail::pkm_row_block;
  detail::for_each_item(blocks, opt.threads, true, [&](std::int64_t blk) {
    const std::int64_t n0 = blk * detail::pkm_row_block, rows = std::min(detail::pkm_row_block, d.N - n0);
    detail::pkm_workspace ws(d, rows);
    detail::pkm_search_rows<Arch>(query, keys, d, n0, rows, opt.query_norm, indices, weights, scores, ws);
  });
}

// The value read alone: out[n] = sum_h sum_j weights[n, h, j] values[indices[n, h, j]] (heads
// summed, as pkm_forward). Indices must lie in [0, values.shape[0]).
template <class Arch = simd::default_arch>
void pkm_gather(view<const float, 2> values,            // [slots, v_dim]
                view<const std::int64_t, 3> indices,    // [N, heads, knn]
                view<const float, 3> weights,           // [N, heads, knn]
                view<float, 2> out,                     // [N, v_dim]
                int threads = 0) {
  detail::check_pkm_gather("memory::pkm_gather", values, indices, weights, out, threads);
  const std::int64_t N = indices.extent(0), blocks = (N + detail::pkm_row_block - 1) / detail::pkm_row_block;
  parallel_for(blocks, [&](std::int64_t blk) {
    const std::int64_t n0 = blk * detail::pkm_row_block;
    detail::pkm_gather_rows<Arch>(values, indices, weights, n0, std::min(detail::pkm_row_block, N - n0), out);
  }, threads);
}

// Product-key lookup (f32 fast path): pkm_search and pkm_gather fused per block of rows (the
// block's indices are still in cache when its value rows are read). Same contract and the same
// indices as reference::pkm_forward.
template <class Arch = simd::default_arch>
void pkm_forward(view<const float, 3> query,      // [N, heads, k_dim]
                 view<const float, 4> keys,       // [heads, 2, n_keys, k_dim / 2]
                 view<const float, 2> values,     // [n_keys^2, v_dim]
                 std::int64_t knn,
                 view<float, 2> out,              // [N, v_dim]
                 view<std::int64_t, 3> indices,   // [N, heads, knn]
                 view<float, 3> weights,          // [N, heads, knn]
                 view<float, 3> scores = {},      // [N, heads, knn] or empty
                 const pkm_options& opt = {}) {
  constexpr const char* fn = "memory::pkm_forward";
  const detail::pkm_dims d = detail::check_pkm(fn, query, keys, values, knn, opt.threads);
  detail::check_pkm_outputs(fn, d, out, indices, weights, scores);
  const std::int64_t blocks = (d.N + detail::pkm_row_block - 1) / detail::pkm_row_block;
  detail::for_each_item(blocks, opt.threads, true, [&](std::int64_t blk) {
    const std::int64_t n0 = blk * detail::pkm_row_block, rows = std::min(detail::pkm_row_block, d.N - n0);
    detail::pkm_workspace ws(d, rows);
    detail::pkm_search_rows<Arch>(query, keys, d, n0, rows, opt.query_norm, indices, weights, scores, ws);
    detail::pkm_gather_rows<Arch>(values, indices, weights, n0, rows, out);
  });
}

// Backward of pkm_forward (f32 fast path); same contract as reference::pkm_backward.
template <class Arch = simd::default_arch>
void pkm_backward(view<const float, 3> query,            // [N, heads, k_dim]
                  view<const float, 4> keys,             // [heads, 2, n_keys, k_dim / 2]
                  view<const float, 2> values,           // [n_keys^2, v_dim]
                  view<const std::int64_t, 3> indices,   // [N, heads, knn] from pkm_forward
                  view<const float, 3> weights,          // [N, heads, knn] from pkm_forward
                  view<const float, 2> dout,             // [N, v_dim]
                  view<float, 3> dquery,                 // [N, heads, k_dim], overwritten
                  view<float, 4> dkeys,                  // [heads, 2, n_keys, k_dim / 2], overwritten
                  view<float, 2> dvalues,                // [n_keys^2, v_dim], accumulated (touched rows)
                  const pkm_options& opt = {}) {
  constexpr const char* fn = "memory::pkm_backward";
  const std::int64_t knn = indices.extent(2);
  const detail::pkm_dims d = detail::check_pkm(fn, query, keys, values, knn, opt.threads);
  detail::check_pkm_backward(fn, d, indices, weights, dout, dquery, dkeys, dvalues);
  // Pass 1, per head (each head owns its sub-keys, so dkeys needs no reduction across threads):
  // ds, then dquery and dkeys.
  detail::for_each_item(d.heads, opt.threads, false, [&](std::int64_t h) {
    std::vector<float> ds(static_cast<std::size_t>(d.knn)), qh(static_cast<std::size_t>(d.half)),
        dqh(static_cast<std::size_t>(d.half));
    for (int part = 0; part < 2; ++part)
      for (std::int64_t j = 0; j < d.n_keys; ++j) std::fill(dkeys.ptr(h, part, j), dkeys.ptr(h, part, j) + d.half, 0.0f);
    for (std::int64_t n = 0; n < d.N; ++n) {
      float wdw = 0;
      for (std::int64_t j = 0; j < d.knn; ++j) {
        ds[j] = simd::dot<Arch>(dout.ptr(n), values.ptr(indices(n, h, j)), d.v_dim);
        wdw += weights(n, h, j) * ds[j];
      }
      for (std::int64_t j = 0; j < d.knn; ++j) ds[j] = weights(n, h, j) * (ds[j] - wdw);
      for (int part = 0; part < 2; ++part) {
        const float* qp = query.ptr(n, h) + part * d.half;
        const double r = opt.query_norm ? detail::normalize_half(qp, d.half, qh.data()) : 1.0;
        if (!opt.query_norm) std::copy(qp, qp + d.half, qh.begin());
        std::fill(dqh.begin(), dqh.end(), 0.0f);
        for (std::int64_t j = 0; j < d.knn; ++j) {
          const std::int64_t sub = part == 0 ? indices(n, h, j) / d.n_keys : indices(n, h, j) % d.n_keys;
          simd::axpy<Arch>(ds[j], keys.ptr(h, part, sub), dqh.data(), d.half);
          simd::axpy<Arch>(ds[j], qh.data(), dkeys.ptr(h, part, sub), d.half);
        }
        float* dq = dquery.ptr(n, h) + part * d.half;
        if (opt.query_norm) {
          const float inv_r = static_cast<float>(1.0 / r), c = simd::dot<Arch>(qp, dqh.data(), d.half) * inv_r * inv_r * inv_r;
          for (std::int64_t i = 0; i < d.half; ++i) dq[i] = dqh[i] * inv_r - qp[i] * c;
        } else {
          std::copy(dqh.begin(), dqh.end(), dq);
        }
      }
    }
  });
  // Pass 2: dvalues[i] += w_i dout over the touched rows; each item owns a column range, so no
  // two threads add into the same element and the order of the additions is fixed.
  const std::int64_t col_blocks = (d.v_dim + detail::pkm_value_columns - 1) / detail::pkm_value_columns;
  parallel_for(col_blocks, [&](std::int64_t cb) {
    const std::int64_t c0 = cb * detail::pkm_value_columns, nc = std::min(detail::pkm_value_columns, d.v_dim - c0);
    for (std::int64_t n = 0; n < d.N; ++n)
      for (std::int64_t h = 0; h < d.heads; ++h)
        for (std::int64_t j = 0; j < d.knn; ++j)
          simd::axpy<Arch>(weights(n, h, j), dout.ptr(n) + c0, dvalues.ptr(indices(n, h, j)) + c0, nc);
  }, opt.threads);
}

}  // namespace mnemo::memory

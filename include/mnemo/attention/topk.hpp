// mnemo/attention/topk.hpp — exact top-k attention and Loki (low-rank keys for top-k selection).
//
// Top-k selection (the building block, also used by retrieval attention):
//
//   top_k_indices(x, n, k) = the k indices of the largest x[i], ties to the lower index,
//                            returned sorted by index ascending.
//
// Order used everywhere: a before b iff x[a] > x[b], or x[a] == x[b] and a < b; NaN is after
// every number (a NaN score is selected only when fewer than k scores are numbers). The fast
// path is a sampled threshold: the (k / n)-quantile of an evenly spaced sample, raised by three
// standard deviations of its rank, gives a threshold t that about 1.5 k of the scores reach; one
// SIMD pass collects the indices with x[i] >= t (a whole batch below t costs one compare), and an
// exact selection (std::nth_element in the order above) over those candidates finishes. If fewer
// than k scores reach t, t is lowered (the sample rank doubles) and the pass repeats; the last
// resort takes every index, so the result is always exact. O(n) compares plus O(k) selection.
//
// Top-k attention (each query attends exactly to its k highest-scoring visible keys):
//
//   s_j  = scale * q . k_j                 j visible to the query (mask mod, e.g. causal)
//   S    = top_k_indices(s, k)             per query row and query head
//   out  = sum_{j in S} softmax(s_S)_j v_j,  lse = log sum_{j in S} exp(s_j)
//
// (Gupta et al. 2021, "Memory-efficient Transformers via Top-k Attention".) A row with fewer than
// k visible keys attends to all of them; a row with none gets out = 0, lse = -inf.
//
// Loki (Singhania et al. 2024, "Loki: Low-Rank Keys for Efficient Sparse Attention"): keys of a
// head lie close to a low-dimensional subspace. PCA of calibration keys, per kv head, gives an
// orthonormal basis P [D, D] (principal directions by decreasing variance). Keys are stored
// rotated, k' = P^T k; a query is rotated the same way, q' = P^T q, so q' . k' = q . k exactly.
// Selection uses only the first r rotated coordinates:
//
//   s~_j = scale * q'[:r] . k'_j[:r]        approximate scores, r / D of the work and of the reads
//   S    = top_k_indices(s~, k)
//   out  = softmax over S of the exact scores scale * q' . k'_j, times v_j
//
// The cache keeps k' [B, Hkv, Lk, D] and a compact copy of its first r columns, k_low
// [B, Hkv, Lk, r]: the selection pass streams only k_low (r / D of the key bytes; reading r of
// every D-float row in place costs nearly the full row, as the hardware prefetchers fetch the
// neighbouring lines), the exact pass reads the k rows of the chosen keys only.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq], selected [B, Hq, Lq, k] (int64, the chosen key indices ascending, -1 padding
// when fewer keys are visible). Query row i sits at key position i + Lk - Lq (bottom-right).
//
// Cost (bench/sparse_rows.cpp, Hq = 32, Hkv = 8, D = 128, 1 thread, decode): every query head
// selects its own keys, so a GQA group of 4 gathers up to 4 k rows of K and V per kv head. At
// Lk = 32768, k = 2048: top-k 0.75x the dense decode time (it still streams all of K), Loki with
// r = 32 0.63x, both with recall 1.0 of the true top-256 and 3.7% output error vs dense on the
// benchmark's synthetic keys; at Lk = 4096, k = 512 the gathers make Loki slower than dense (1.4x).
//
// Numerics: f32 scores (FMA dot products), f32 softmax and value sums; the references below are
// double. The selection is exact for the scores as computed: a near-tie between two keys may be
// decided differently by the f32 fast path and the double reference, which the tests allow for.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

// After simd/arch.hpp, which must be the first to include <immintrin.h> (see there).
#include <Eigen/Eigenvalues>

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Top-k selection.

namespace topk_detail {

// The selection order: larger first, ties to the lower index, NaN last (NaNs by index).
inline bool before(const float* x, std::int64_t a, std::int64_t b) {
  const float xa = x[a], xb = x[b];
  const bool na = std::isnan(xa), nb = std::isnan(xb);
  if (na || nb) return na == nb ? a < b : nb;
  return xa > xb || (xa == xb && a < b);
}

// Keeps the first k of cand[0 .. n) in the selection order and writes them ascending to out.
inline void finish(const float* x, std::int64_t* cand, std::int64_t n, std::int64_t k, std::int64_t* out) {
  auto order = [x](std::int64_t a, std::int64_t b) { return before(x, a, b); };
  if (k < n) std::nth_element(cand, cand + k, cand + n, order);
  std::sort(cand, cand + k);
  std::copy_n(cand, k, out);
}

// Scores above which only a few times k of n elements should lie, from an evenly spaced sample.
inline constexpr std::int64_t sample_size = 2048;
// Below this many scores the threshold pass does not pay: select over all of them.
inline constexpr std::int64_t direct_below = 2 * sample_size;

}  // namespace topk_detail

// Scratch memory of top_k_indices, kept by a caller that selects many times.
struct top_k_workspace {
  std::vector<std::int64_t> candidates;
  std::vector<float> sample;
};

// The obvious selection: sort every index in the selection order, keep k, sort by index.
inline void reference_top_k_indices(const float* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices) {
  std::vector<std::int64_t> idx(static_cast<std::size_t>(n));
  std::iota(idx.begin(), idx.end(), std::int64_t{0});
  std::stable_sort(idx.begin(), idx.end(),
                   [scores](std::int64_t a, std::int64_t b) { return topk_detail::before(scores, a, b); });
  std::sort(idx.begin(), idx.begin() + k);
  std::copy_n(idx.begin(), k, out_indices);
}

// The indices of the k largest of scores[0 .. n), ties to the lower index, NaN after every
// number, written to out_indices[0 .. k) sorted ascending. Requires 0 <= k <= n.
template <class Arch = simd::default_arch>
void top_k_indices(const float* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices,
                   top_k_workspace& ws) {
  using mnemo::detail::require;
  require(n >= 0, "attention::top_k_indices: n must be >= 0, got ", n);
  require(k >= 0 && k <= n, "attention::top_k_indices: k must be in [0, n] = [0, ", n, "], got ", k);
  if (k == 0) return;
  ws.candidates.resize(static_cast<std::size_t>(n));
  std::int64_t* cand = ws.candidates.data();
  if (n < topk_detail::direct_below || k * 4 > n) {  // a threshold would keep most of them anyway
    std::iota(cand, cand + n, std::int64_t{0});
    topk_detail::finish(scores, cand, n, k, out_indices);
    return;
  }
  // Evenly spaced sample, NaN as -inf (only an estimate of the threshold).
  constexpr std::int64_t m = topk_detail::sample_size;
  ws.sample.resize(static_cast<std::size_t>(m));
  float* sample = ws.sample.data();
  const double expected = static_cast<double>(k) * m / static_cast<double>(n);  // sample rank of the k-th score
  std::int64_t rank = static_cast<std::int64_t>(std::ceil(expected + 3.0 * std::sqrt(expected) + 2.0));
  while (true) {
    if (rank >= m) {  // the threshold would be the sample minimum: take everything
      std::iota(cand, cand + n, std::int64_t{0});
      topk_detail::finish(scores, cand, n, k, out_indices);
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
    if constexpr (simd::vectorized<Arch>) {
      using batch = simd::fbatch<Arch>;
      constexpr std::int64_t w = simd::width<Arch>;
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
      topk_detail::finish(scores, cand, c, k, out_indices);
      return;
    }
    rank *= 2;
  }
}

// As above, with scratch memory of its own (allocated for this call).
template <class Arch = simd::default_arch>
void top_k_indices(const float* scores, std::int64_t n, std::int64_t k, std::int64_t* out_indices) {
  top_k_workspace ws;
  top_k_indices<Arch>(scores, n, k, out_indices, ws);
}

// ---------------------------------------------------------------------------------------------
// Top-k attention and Loki: references (double, written like the equations).

namespace topk_detail {

// The keys a row attends to, in double: the `top_k` best of the visible keys (all of them when
// fewer), ascending. s[j] = -inf marks an invisible key.
inline std::vector<std::int64_t> select_double(const std::vector<double>& s, std::int64_t top_k) {
  std::vector<std::int64_t> idx;
  for (std::int64_t j = 0; j < static_cast<std::int64_t>(s.size()); ++j)
    if (s[static_cast<std::size_t>(j)] != -std::numeric_limits<double>::infinity()) idx.push_back(j);
  std::stable_sort(idx.begin(), idx.end(), [&](std::int64_t a, std::int64_t b) {
    return s[static_cast<std::size_t>(a)] > s[static_cast<std::size_t>(b)];
  });
  if (static_cast<std::int64_t>(idx.size()) > top_k) idx.resize(static_cast<std::size_t>(top_k));
  std::sort(idx.begin(), idx.end());
  return idx;
}

// softmax over the chosen keys of the exact scores `e`, times v; writes out, lse and selected.
template <class KV>
void finish_row_double(const std::vector<std::int64_t>& idx, const std::vector<double>& e, view<const KV, 4> v,
                       std::int64_t b, std::int64_t hk, float* out_row, std::int64_t Dv, float* lse_at,
                       std::int64_t* sel_row, std::int64_t top_k) {
  std::vector<double> acc(static_cast<std::size_t>(Dv), 0.0);
  double m = -std::numeric_limits<double>::infinity(), sum = 0;
  for (std::int64_t j : idx) m = std::max(m, e[static_cast<std::size_t>(j)]);
  for (std::int64_t j : idx) {
    const double p = std::exp(e[static_cast<std::size_t>(j)] - m);
    sum += p;
    for (std::int64_t c = 0; c < Dv; ++c) acc[static_cast<std::size_t>(c)] += p * static_cast<double>(to_float(v(b, hk, j, c)));
  }
  for (std::int64_t c = 0; c < Dv; ++c) out_row[c] = idx.empty() ? 0.0f : static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
  if (lse_at) *lse_at = idx.empty() ? -std::numeric_limits<float>::infinity() : static_cast<float>(m + std::log(sum));
  if (sel_row)
    for (std::int64_t t = 0; t < top_k; ++t)
      sel_row[t] = t < static_cast<std::int64_t>(idx.size()) ? idx[static_cast<std::size_t>(t)] : -1;
}

// Shapes of top_k and `selected` against the validated dims.
inline void check_topk(const char* fn, const dims& d, std::int64_t top_k, const view<std::int64_t, 4>& selected) {
  mnemo::detail::require(top_k >= 1, fn, ": top_k must be >= 1, got ", top_k);
  if (!selected.empty())
    mnemo::detail::require_shape(fn, "selected", selected, {d.B, d.Hq, d.Lq, top_k}, " [B, Hq, Lq, top_k]");
}

template <class Mod>
constexpr void check_mod() {
  static_assert(!has_score<Mod>,
                "top-k attention: the mod must be a mask only (causal, sliding_window, ...): the selection is made "
                "on the scaled dot products");
}

}  // namespace topk_detail

// Exact top-k attention, double precision: per query row and head, softmax over the top_k
// highest-scoring visible keys. selected [B, Hq, Lq, top_k] (optional) gets their indices.
template <class KV, class Mod = mods::causal>
void reference_topk_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                              view<const KV, 4> k,      // [B, Hkv, Lk, D]
                              view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
                              std::int64_t top_k,
                              view<float, 4> out,                   // [B, Hq, Lq, Dv]
                              view<float, 3> lse = {},              // [B, Hq, Lq] or empty
                              view<std::int64_t, 4> selected = {},  // [B, Hq, Lq, top_k] or empty
                              const Mod& mod = {}, const options& opt = {}) {
  topk_detail::check_mod<Mod>();
  constexpr const char* fn = "attention::reference_topk_attention";
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mod, opt);
  topk_detail::check_topk(fn, d, top_k, selected);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        std::vector<double> s(static_cast<std::size_t>(d.Lk));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t qp = i + d.offset();
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            double dot = 0;
            for (std::int64_t c = 0; c < d.D; ++c)
              dot += static_cast<double>(q(b, h, i, c)) * static_cast<double>(to_float(k(b, hk, j, c)));
            s[static_cast<std::size_t>(j)] = mods::visible(mod, h, qp, j) ? static_cast<double>(d.scale) * dot
                                                                      : -std::numeric_limits<double>::infinity();
          }
          topk_detail::finish_row_double(topk_detail::select_double(s, top_k), s, v, b, hk, out.ptr(b, h, i), d.Dv,
                                         lse.empty() ? nullptr : lse.ptr(b, h, i),
                                         selected.empty() ? nullptr : selected.ptr(b, h, i), top_k);
        }
      },
      opt.threads);
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::causal>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void reference_topk_attention(view<const float, 4> q, const K& k, const V& v, std::int64_t top_k, view<float, 4> out,
                              view<float, 3> lse = {}, view<std::int64_t, 4> selected = {}, const Mod& mod = {},
                              const options& opt = {}) {
  reference_topk_attention<element_t<K>, Mod>(q, cview(k), cview(v), top_k, out, lse, selected, mod, opt);
}

// ---------------------------------------------------------------------------------------------
// Loki basis: PCA of calibration keys.

struct loki_basis {
  tensor<float, 3> components;  // [Hkv, D, D]: components(h, c, :) is the c-th principal direction of
                                // kv head h (unit norm), by decreasing variance
  tensor<float, 2> variance;    // [Hkv, D]: the calibration keys' variance along each direction

  std::int64_t heads() const { return components.extent(0); }
  std::int64_t dim() const { return components.extent(1); }
};

// PCA per kv head over every calibration key of every batch: the eigenvectors of the keys'
// covariance (double, Eigen's SelfAdjointEigenSolver), sorted by decreasing eigenvalue, each
// signed so that its largest-magnitude coordinate is positive (a reproducible basis).
inline loki_basis loki_calibrate(view<const float, 4> keys,  // [B, Hkv, N, D]
                                 const options& opt = {}) {
  constexpr const char* fn = "attention::loki_calibrate";
  mnemo::detail::require(!keys.empty() && keys.size() > 0, fn,
                         ": keys must be a non-empty [B, Hkv, N, D] view, got shape ", shape_string(keys.shape()));
  const std::int64_t B = keys.extent(0), Hkv = keys.extent(1), N = keys.extent(2), D = keys.extent(3);
  loki_basis basis{tensor<float, 3>({Hkv, D, D}), tensor<float, 2>({Hkv, D})};
  using rows_map = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                              Eigen::OuterStride<>>;
  mnemo::detail::for_each_item(Hkv, opt.threads, true, [&](std::int64_t hk) {
    const double count = static_cast<double>(B * N);
    Eigen::VectorXd mean = Eigen::VectorXd::Zero(D);
    Eigen::MatrixXd second = Eigen::MatrixXd::Zero(D, D);  // sum of k k^T
    for (std::int64_t b = 0; b < B; ++b) {
      const Eigen::MatrixXd x = rows_map(keys.ptr(b, hk), N, D, Eigen::OuterStride<>(keys.stride(2))).cast<double>();
      mean += x.colwise().sum().transpose();
      second.noalias() += x.transpose() * x;
    }
    mean /= count;
    const Eigen::MatrixXd cov = second / count - mean * mean.transpose();
    const Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(cov);
    for (std::int64_t c = 0; c < D; ++c) {
      const Eigen::Index col = static_cast<Eigen::Index>(D - 1 - c);  // ascending -> descending
      Eigen::VectorXd u = eig.eigenvectors().col(col);
      Eigen::Index at = 0;
      u.cwiseAbs().maxCoeff(&at);
      if (u(at) < 0) u = -u;
      for (std::int64_t e = 0; e < D; ++e) basis.components(hk, c, e) = static_cast<float>(u(e));
      basis.variance(hk, c) = static_cast<float>(std::max(0.0, eig.eigenvalues()(col)));
    }
  });
  return basis;
}

namespace topk_detail {

inline void check_basis(const char* fn, const loki_basis& basis, std::int64_t Hkv, std::int64_t D);

// k_low [B, Hkv, Lk, r] against the validated dims; returns r.
inline std::int64_t check_low(const char* fn, const dims& d, const view<const float, 4>& k_low) {
  mnemo::detail::require(!k_low.empty(), fn, ": k_low must be a non-empty [B, Hkv, Lk, r] view");
  const std::int64_t r = k_low.extent(3);
  mnemo::detail::require(r >= 1 && r <= d.D, fn, ": k_low.shape[3] (the rank r) must be in [1, D] = [1, ", d.D,
                         "], got ", r);
  mnemo::detail::require_shape(fn, "k_low", k_low, {d.B, d.Hkv, d.Lk, r}, " [B, Hkv, Lk, r]");
  return r;
}

inline void check_basis(const char* fn, const loki_basis& basis, std::int64_t Hkv, std::int64_t D) {
  mnemo::detail::require(basis.components.extent(0) == Hkv && basis.components.extent(1) == D &&
                             basis.components.extent(2) == D,
                         fn, ": basis.components must have shape [Hkv, D, D] = [", Hkv, ", ", D, ", ", D, "], got ",
                         shape_string(basis.components.shape()));
}

}  // namespace topk_detail

// k_rot = k P^T per kv head: the keys' coordinates along the principal directions (the form a
// Loki cache stores), and k_low (when given) = its first r columns, contiguous. Eigen products,
// one (batch, kv head) per work item.
inline void loki_rotate(view<const float, 4> k,  // [B, Hkv, Lk, D]
                        const loki_basis& basis,
                        view<float, 4> k_rot,       // [B, Hkv, Lk, D]
                        view<float, 4> k_low = {},  // [B, Hkv, Lk, r] or empty
                        const options& opt = {}) {
  constexpr const char* fn = "attention::loki_rotate";
  mnemo::detail::require(!k.empty() && !k_rot.empty(), fn, ": k and k_rot must be non-empty views");
  const std::int64_t B = k.extent(0), Hkv = k.extent(1), Lk = k.extent(2), D = k.extent(3);
  topk_detail::check_basis(fn, basis, Hkv, D);
  mnemo::detail::require_shape(fn, "k_rot", k_rot, {B, Hkv, Lk, D}, " [B, Hkv, Lk, D] (the shape of k)");
  if (!k_low.empty()) {
    const std::int64_t r = k_low.extent(3);
    mnemo::detail::require(r >= 1 && r <= D, fn, ": k_low.shape[3] (the rank r) must be in [1, D] = [1, ", D,
                           "], got ", r);
    mnemo::detail::require_shape(fn, "k_low", k_low, {B, Hkv, Lk, r}, " [B, Hkv, Lk, r]");
  }
  using rows = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using col_major = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic>;
  mnemo::detail::for_each_item(B * Hkv, opt.threads, true, [&](std::int64_t bh) {
    const std::int64_t b = bh / Hkv, hk = bh % Hkv;
    Eigen::Map<const rows, 0, Eigen::OuterStride<>> src(k.ptr(b, hk), Lk, D, Eigen::OuterStride<>(k.stride(2)));
    Eigen::Map<rows, 0, Eigen::OuterStride<>> dst(k_rot.ptr(b, hk), Lk, D, Eigen::OuterStride<>(k_rot.stride(2)));
    // components(hk) is P [D, D] row-major; read column-major it is P^T.
    Eigen::Map<const col_major> pt(basis.components.data() + hk * D * D, D, D);
    mnemo::detail::gemm<mnemo::detail::accumulate::assign>(dst, src, pt);
    if (!k_low.empty())
      for (std::int64_t j = 0; j < Lk; ++j) std::copy_n(k_rot.ptr(b, hk, j), k_low.extent(3), k_low.ptr(b, hk, j));
  });
}

// Loki in double: approximate scores from the r = k_low.shape[3] leading rotated coordinates
// select top_k keys, then softmax of the exact scores (all D rotated coordinates) over them.
// k_rot and k_low from loki_rotate.
template <class Mod = mods::causal>
void reference_loki_attention(view<const float, 4> q,      // [B, Hq, Lq, D]
                              view<const float, 4> k_rot,  // [B, Hkv, Lk, D]  keys in the basis
                              view<const float, 4> k_low,  // [B, Hkv, Lk, r]  their first r coordinates
                              view<const float, 4> v,      // [B, Hkv, Lk, Dv]
                              const loki_basis& basis, std::int64_t top_k,
                              view<float, 4> out,                   // [B, Hq, Lq, Dv]
                              view<float, 3> lse = {},              // [B, Hq, Lq] or empty
                              view<std::int64_t, 4> selected = {},  // [B, Hq, Lq, top_k] or empty
                              const Mod& mod = {}, const options& opt = {}) {
  topk_detail::check_mod<Mod>();
  constexpr const char* fn = "attention::reference_loki_attention";
  const dims d = attention::detail::check_args(fn, q, k_rot, v, out, lse, mod, opt);
  topk_detail::check_topk(fn, d, top_k, selected);
  topk_detail::check_basis(fn, basis, d.Hkv, d.D);
  const std::int64_t rank = topk_detail::check_low(fn, d, k_low);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        std::vector<double> approx(static_cast<std::size_t>(d.Lk)), exact(static_cast<std::size_t>(d.Lk)),
            qr(static_cast<std::size_t>(d.D));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t qp = i + d.offset();
          for (std::int64_t c = 0; c < d.D; ++c) {
            double x = 0;
            for (std::int64_t e = 0; e < d.D; ++e)
              x += static_cast<double>(basis.components(hk, c, e)) * static_cast<double>(q(b, h, i, e));
            qr[static_cast<std::size_t>(c)] = static_cast<double>(d.scale) * x;
          }
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            double lo = 0, all = 0;
            for (std::int64_t c = 0; c < d.D; ++c) {
              all += qr[static_cast<std::size_t>(c)] * static_cast<double>(k_rot(b, hk, j, c));
              if (c < rank) lo += qr[static_cast<std::size_t>(c)] * static_cast<double>(k_low(b, hk, j, c));
            }
            const bool vis = mods::visible(mod, h, qp, j);
            approx[static_cast<std::size_t>(j)] = vis ? lo : -std::numeric_limits<double>::infinity();
            exact[static_cast<std::size_t>(j)] = all;
          }
          topk_detail::finish_row_double(topk_detail::select_double(approx, top_k), exact, v, b, hk, out.ptr(b, h, i),
                                         d.Dv, lse.empty() ? nullptr : lse.ptr(b, h, i),
                                         selected.empty() ? nullptr : selected.ptr(b, h, i), top_k);
        }
      },
      opt.threads);
}

// ---------------------------------------------------------------------------------------------
// Fast path.

namespace topk_detail {

template <class Arch>
inline constexpr std::int64_t lanes = simd::lanes<Arch>;

// Lane l of xsimd::haddp(rows) sums rows[haddp_lane_source<Arch>()[l]]: probed, because xsimd 8.1's
// avx512f haddp permutes its lanes (0, 1, 4, 5, 2, 3, ...) while SSE/AVX keep them in order.
template <class Arch>
const std::array<int, lanes<Arch>>& haddp_lane_source() {
  static const std::array<int, lanes<Arch>> source = [] {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    batch rows[W];
    for (std::int64_t r = 0; r < W; ++r) rows[r] = batch(static_cast<float>(r));
    alignas(64) float sums[W];
    xsimd::haddp(rows).store_aligned(sums);
    std::array<int, lanes<Arch>> src{};
    for (std::int64_t l = 0; l < W; ++l) src[static_cast<std::size_t>(l)] = static_cast<int>(sums[l]) / static_cast<int>(W);
    return src;
  }();
  return source;
}

// Keys per chunk of the score pass; chunks are classified by the mod (empty ones are skipped).
inline constexpr std::int64_t score_chunk = 512;

// s[r * lds + j] = qs_r[0 .. D) . k_j[0 .. D) for rows r < R and keys j < n; qs rows are Dpad
// floats apart (zero padded). SIMD: W keys at a time (W accumulators, one haddp for W sums), the
// W key rows staying in L1 while every row of the group uses them.
template <class Arch, class KV>
void score_rows(const float* qs, std::int64_t Dpad, std::int64_t R, const KV* k0, std::int64_t ks, std::int64_t n,
                std::int64_t D, float* s, std::int64_t lds) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t r = 0; r < R; ++r)
      for (std::int64_t j = 0; j < n; ++j) s[r * lds + j] = simd::dot<Arch>(qs + r * Dpad, k0 + j * ks, D);
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    const std::int64_t Dfull = D / W * W;
    const auto& source = haddp_lane_source<Arch>();
    for (std::int64_t j = 0; j < n; j += W) {
      const KV* kr[W];
      for (std::int64_t t = 0; t < W; ++t) kr[t] = k0 + std::min(j + t, n - 1) * ks;  // tail: repeat the last key
      const std::int64_t valid = std::min(W, n - j);
      for (std::int64_t r = 0; r < R; ++r) {
        const float* qr = qs + r * Dpad;
        batch acc[W];
        for (auto& a : acc) a = batch(0.0f);
        std::int64_t c = 0;
        for (; c < Dfull; c += W) {
          const batch qb = batch::load_unaligned(qr + c);
          for (std::int64_t t = 0; t < W; ++t) acc[t] = simd::detail::fmadd(qb, simd::load<Arch>(kr[t] + c), acc[t]);
        }
        if (c < D) {
          const batch qb = batch::load_unaligned(qr + c);  // zero padded to Dpad
          for (std::int64_t t = 0; t < W; ++t)
            acc[t] = simd::detail::fmadd(qb, simd::load_partial<Arch>(kr[t] + c, D - c), acc[t]);
        }
        alignas(64) float sums[W];
        xsimd::haddp(acc).store_aligned(sums);
        for (std::int64_t l = 0; l < W; ++l) {
          const std::int64_t t = source[static_cast<std::size_t>(l)];
          if (t < valid) s[r * lds + j + t] = sums[l];
        }
      }
    }
  }
}

// Scratch of one worker.
struct row_scratch {
  std::vector<float> q;         // [R, Dpad] scaled (and for Loki rotated) queries
  std::vector<float> s;         // [R, Lk] selection scores
  std::vector<float> p;         // [top_k] probabilities
  std::vector<float> acc;       // [Dv]
  std::vector<std::int64_t> idx;  // [top_k]
  top_k_workspace top;
};

// Runs body(item, scratch) over items, one scratch per worker, items from a shared counter.
template <class Body>
void run_items(std::int64_t n_items, int threads, Body&& body) {
  if (n_items <= 0) return;
  const std::int64_t workers = std::min<std::int64_t>(resolve_threads(threads), n_items);
  std::vector<row_scratch> scratch(static_cast<std::size_t>(workers));
  std::atomic<std::int64_t> next{0};
  parallel_for(
      workers,
      [&](std::int64_t w) {
        for (std::int64_t item = next.fetch_add(1); item < n_items; item = next.fetch_add(1))
          body(item, scratch[static_cast<std::size_t>(w)]);
      },
      static_cast<int>(workers));
}

// Selection scores of the G rows of one (batch, kv head, query row): s = qs . k over the first
// `Dsel` coordinates for visible keys, -inf elsewhere. Returns the visible keys' count and sets
// *hi to one past the last key of a non-empty chunk (keys at or after it are all invisible).
template <class Arch, class KV, class Mod>
std::int64_t selection_scores(const float* qs, std::int64_t Dpad, std::int64_t G, view<const KV, 4> k, std::int64_t b,
                              std::int64_t hk, std::int64_t Lk, std::int64_t Dsel, std::int64_t qp, const Mod& mod,
                              float* s, std::int64_t* hi) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  std::int64_t visible = 0;
  *hi = 0;
  for (std::int64_t k0 = 0; k0 < Lk; k0 += score_chunk) {
    const std::int64_t kn = std::min(score_chunk, Lk - k0);
    const tile t = mods::classify(mod, qp, qp + 1, k0, k0 + kn);
    if (t == tile::empty) {
      for (std::int64_t g = 0; g < G; ++g) std::fill_n(s + g * Lk + k0, kn, neg_inf);
      continue;
    }
    *hi = k0 + kn;
    score_rows<Arch>(qs, Dpad, G, k.ptr(b, hk, k0), k.stride(2), kn, Dsel, s + k0, Lk);
    if (t == tile::full) {
      visible += kn;
      continue;
    }
    for (std::int64_t j = k0; j < k0 + kn; ++j) {
      if (mods::visible(mod, qp, j)) {
        ++visible;
        continue;
      }
      for (std::int64_t g = 0; g < G; ++g) s[g * Lk + j] = neg_inf;
    }
  }
  return visible;
}

// out = softmax(e) v over the chosen keys idx[0 .. n) with exact scores e[0 .. n) (overwritten
// by the probabilities); lse and the selected row (padded with -1) when wanted.
template <class Arch, class KV>
void attend_selected(const std::int64_t* idx, float* e, std::int64_t n, view<const KV, 4> v, std::int64_t b,
                     std::int64_t hk, std::int64_t Dv, float* acc, float* out_row, float* lse_at, std::int64_t* sel_row,
                     std::int64_t top_k) {
  if (n == 0) {
    std::fill_n(out_row, Dv, 0.0f);
    if (lse_at) *lse_at = -std::numeric_limits<float>::infinity();
  } else {
    const float m = simd::reduce_max<Arch>(e, n);
    const float l = simd::exp_sum<Arch>(e, n, m);
    std::fill_n(acc, Dv, 0.0f);
    for (std::int64_t t = 0; t < n; ++t) simd::axpy<Arch>(e[t], v.ptr(b, hk, idx[t]), acc, Dv);
    const float inv = 1.0f / l;
    for (std::int64_t c = 0; c < Dv; ++c) out_row[c] = acc[c] * inv;
    if (lse_at) *lse_at = m + std::log(l);
  }
  if (sel_row) {
    std::copy_n(idx, n, sel_row);
    std::fill(sel_row + n, sel_row + top_k, std::int64_t{-1});
  }
}

// The shared driver of top-k attention and Loki. Items are (batch, kv head, query row); the G
// query heads of the group share one pass over K. Rotate: q is taken into the Loki basis.
template <class Arch, class KV, class Mod>
void run(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> ksel,
         view<const KV, 4> v, std::int64_t top_k, const loki_basis* basis, view<float, 4> out, view<float, 3> lse,
         view<std::int64_t, 4> selected, const Mod& mod, int threads) {
  const std::int64_t G = d.group(), Dpad = (d.D + lanes<Arch> - 1) / lanes<Arch> * lanes<Arch>;
  run_items(d.B * d.Hkv * d.Lq, threads, [&](std::int64_t item, row_scratch& w) {
    const std::int64_t i = item % d.Lq, hk = item / d.Lq % d.Hkv, b = item / d.Lq / d.Hkv;
    const std::int64_t qp = i + d.offset();
    w.q.assign(static_cast<std::size_t>(G * Dpad), 0.0f);
    w.s.resize(static_cast<std::size_t>(G * d.Lk));
    w.p.resize(static_cast<std::size_t>(top_k));
    w.idx.resize(static_cast<std::size_t>(top_k));
    w.acc.resize(static_cast<std::size_t>(d.Dv));
    for (std::int64_t g = 0; g < G; ++g) {
      const float* qi = q.ptr(b, hk * G + g, i);
      float* qs = w.q.data() + g * Dpad;
      if (basis) {
        for (std::int64_t c = 0; c < d.D; ++c)
          qs[c] = d.scale * simd::dot<Arch>(qi, basis->components.data() + (hk * d.D + c) * d.D, d.D);
      } else {
        for (std::int64_t c = 0; c < d.D; ++c) qs[c] = d.scale * qi[c];
      }
    }
    std::int64_t hi = 0;
    const std::int64_t visible =
        selection_scores<Arch>(w.q.data(), Dpad, G, ksel, b, hk, d.Lk, ksel.extent(3), qp, mod, w.s.data(), &hi);
    const std::int64_t n = std::min(top_k, visible);
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      const float* s = w.s.data() + g * d.Lk;
      top_k_indices<Arch>(s, hi, n, w.idx.data(), w.top);
      const float* qs = w.q.data() + g * Dpad;
      for (std::int64_t t = 0; t < n; ++t)  // exact scores (Loki: all D rotated coordinates)
        w.p[static_cast<std::size_t>(t)] = basis ? simd::dot<Arch>(qs, k.ptr(b, hk, w.idx[static_cast<std::size_t>(t)]), d.D)
                                                 : s[w.idx[static_cast<std::size_t>(t)]];
      attend_selected<Arch>(w.idx.data(), w.p.data(), n, v, b, hk, d.Dv, w.acc.data(), out.ptr(b, h, i),
                            lse.empty() ? nullptr : lse.ptr(b, h, i), selected.empty() ? nullptr : selected.ptr(b, h, i),
                            top_k);
    }
  });
}

}  // namespace topk_detail

// Exact top-k attention: every query row of every head attends to its top_k highest-scoring
// visible keys (all of them when fewer are visible). K/V may be float, f16 or bf16. Works for
// decode (Lq = 1) and prefill rows (any Lq, causal by default).
template <class KV, class Mod = mods::causal, class Arch = simd::default_arch>
void topk_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                    view<const KV, 4> k,      // [B, Hkv, Lk, D]
                    view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
                    std::int64_t top_k,
                    view<float, 4> out,                   // [B, Hq, Lq, Dv]
                    view<float, 3> lse = {},              // [B, Hq, Lq] or empty
                    view<std::int64_t, 4> selected = {},  // [B, Hq, Lq, top_k] or empty
                    const Mod& mod = {}, const options& opt = {}) {
  topk_detail::check_mod<Mod>();
  constexpr const char* fn = "attention::topk_attention";
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mod, opt);
  topk_detail::check_topk(fn, d, top_k, selected);
  topk_detail::run<Arch>(d, q, k, k, v, top_k, nullptr, out, lse, selected, mod, opt.threads);
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::causal>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void topk_attention(view<const float, 4> q, const K& k, const V& v, std::int64_t top_k, view<float, 4> out,
                    view<float, 3> lse = {}, view<std::int64_t, 4> selected = {}, const Mod& mod = {},
                    const options& opt = {}) {
  topk_attention<element_t<K>, Mod>(q, cview(k), cview(v), top_k, out, lse, selected, mod, opt);
}

// Loki: select top_k keys by the r = k_low.shape[3] leading rotated coordinates, attend to them
// exactly. k_rot [B, Hkv, Lk, D] are the keys in the basis and k_low [B, Hkv, Lk, r] their first
// r coordinates (both from loki_rotate); v as usual.
template <class Mod = mods::causal, class Arch = simd::default_arch>
void loki_attention(view<const float, 4> q,      // [B, Hq, Lq, D]
                    view<const float, 4> k_rot,  // [B, Hkv, Lk, D]  keys in the basis
                    view<const float, 4> k_low,  // [B, Hkv, Lk, r]  their first r coordinates
                    view<const float, 4> v,      // [B, Hkv, Lk, Dv]
                    const loki_basis& basis, std::int64_t top_k,
                    view<float, 4> out,                   // [B, Hq, Lq, Dv]
                    view<float, 3> lse = {},              // [B, Hq, Lq] or empty
                    view<std::int64_t, 4> selected = {},  // [B, Hq, Lq, top_k] or empty
                    const Mod& mod = {}, const options& opt = {}) {
  topk_detail::check_mod<Mod>();
  constexpr const char* fn = "attention::loki_attention";
  const dims d = attention::detail::check_args(fn, q, k_rot, v, out, lse, mod, opt);
  topk_detail::check_topk(fn, d, top_k, selected);
  topk_detail::check_basis(fn, basis, d.Hkv, d.D);
  topk_detail::check_low(fn, d, k_low);
  topk_detail::run<Arch>(d, q, k_rot, k_low, v, top_k, &basis, out, lse, selected, mod, opt.threads);
}

}  // namespace mnemo::attention

// mnemo/attention/topk.hpp — exact top-k attention and Loki (low-rank keys for top-k selection).
//
// Top-k selection is simd::top_k_indices (simd/select.hpp, re-exported here as
// attention::top_k_indices): the k indices of the largest scores, ties to the lower index, NaN
// after every number, returned sorted by index ascending; the same primitive and rule as every
// other selecting decode.
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
// Fast path: per query row, the selection pass streams K (Loki: k_low) once for the G query heads
// of a kv head with the split-KV engine's score tiles, each head selects its keys, and then the
// split-KV engine (split_kv.hpp) attends over the selected keys as a gathered source, with the
// selection's scores (Loki: the exact rotated scores of the selected keys) given, in slices of
// decode_max_rows query rows.
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
#include "mnemo/attention/split_kv.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/select.hpp"
#include "mnemo/simd/vec.hpp"

// After simd/arch.hpp, which must be the first to include <immintrin.h> (see there).
#include <Eigen/Eigenvalues>

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Top-k selection: one primitive for every selecting kernel (simd/select.hpp).

using simd::reference_top_k_indices;
using simd::top_k_indices;
using simd::top_k_workspace;

// ---------------------------------------------------------------------------------------------
// Top-k attention and Loki: references (double, written like the equations).

namespace topk_detail {

// The keys a row attends to, in double: the `top_k` best of the visible keys (all of them when
// fewer), ascending, by the selection rule of the fast path. s[j] = -inf marks an invisible key.
inline std::vector<std::int64_t> select_double(const std::vector<double>& s, std::int64_t top_k) {
  const auto n = static_cast<std::int64_t>(s.size());
  const auto visible = n - std::count(s.begin(), s.end(), -std::numeric_limits<double>::infinity());
  std::vector<std::int64_t> idx(static_cast<std::size_t>(std::min<std::int64_t>(top_k, visible)));
  reference_top_k_indices(s.data(), n, static_cast<std::int64_t>(idx.size()), idx.data());
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
template <class KV, class Mod = mods::none>
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
template <class K, class V, class Mod = mods::none>
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
template <class Mod = mods::none>
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

// Scratch of one selecting worker.
struct row_scratch {
  tensor<float, 1> q;             // [Rpad, Dpad] scaled (and for Loki rotated) queries, 64-byte aligned
  tensor<float, 1> s;             // [Rpad, Lk] selection scores
  simd::top_k_workspace top;
};

// Runs body(item, scratch) over items, one scratch per worker, items from a shared counter.
template <class Body>
void run_items(std::int64_t n_items, int threads, std::vector<row_scratch>& scratch, Body&& body) {
  if (n_items <= 0) return;
  const std::int64_t workers = std::min<std::int64_t>(resolve_threads(threads), n_items);
  if (static_cast<std::int64_t>(scratch.size()) < workers) scratch.resize(static_cast<std::size_t>(workers));
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
// `Dsel` coordinates for visible keys, -inf elsewhere (rows lds = Lk apart, Rpad of them written).
// Returns the visible keys' count and sets *hi to one past the last key of a non-empty chunk (keys
// at or after it are all invisible).
template <class Arch, int RowTile, class KV, class Mod>
std::int64_t selection_scores(const float* qs, std::int64_t Dpad, std::int64_t G, view<const KV, 4> k, std::int64_t b,
                              std::int64_t hk, std::int64_t Lk, std::int64_t Dsel, std::int64_t qp, const Mod& mod,
                              float* s, std::int64_t* hi) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  const std::int64_t Rpad = split_kv::round_up(G, RowTile);
  std::int64_t visible = 0;
  *hi = 0;
  for (std::int64_t k0 = 0; k0 < Lk; k0 += decode_chunk) {
    const std::int64_t kn = std::min(decode_chunk, Lk - k0);
    const tile t = mods::classify(mod, qp, qp + 1, k0, k0 + kn);
    if (t == tile::empty) {
      for (std::int64_t g = 0; g < G; ++g) std::fill_n(s + g * Lk + k0, kn, neg_inf);
      continue;
    }
    *hi = k0 + kn;
    const split_kv::element_rows<Arch, KV> rows{k.ptr(b, hk, k0), k.stride(2), Dsel};
    split_kv::score_pass<Arch, RowTile>(G, Rpad, qs, Dpad, Dsel, rows, kn, nullptr, s + k0, Lk);
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

// The selection of rows [i0, i0 + n_rows) for every (batch, kv head): keys(b, hk, r, :) the chosen
// keys ascending, given(b, hk, r, :) their exact scores (top-k: the selection scores; Loki: all D
// rotated coordinates), counts(b, hk, r), with r = g * n_rows + (i - i0); `selected` as documented.
template <class Arch, int RowTile, class KV, class Mod>
void select_rows(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> ksel,
                 std::int64_t top_k, const loki_basis* basis, view<std::int64_t, 4> selected, const Mod& mod,
                 int threads, std::int64_t i0, std::int64_t n_rows, std::vector<row_scratch>& scratch,
                 view<std::int64_t, 4> keys, view<float, 4> given, view<std::int64_t, 3> counts) {
  const std::int64_t G = d.group(), Dpad = split_kv::round_up(d.D, split_kv::lanes<Arch>);
  const std::int64_t Rpad = split_kv::round_up(G, RowTile);
  run_items(d.B * d.Hkv * n_rows, threads, scratch, [&](std::int64_t item, row_scratch& w) {
    const std::int64_t il = item % n_rows, i = i0 + il, hk = item / n_rows % d.Hkv, b = item / n_rows / d.Hkv;
    const std::int64_t qp = i + d.offset();
    if (w.q.size() < Rpad * Dpad) w.q = tensor<float, 1>({Rpad * Dpad});
    if (w.s.size() < Rpad * d.Lk) w.s = tensor<float, 1>({Rpad * d.Lk});
    std::fill_n(w.q.data(), Rpad * Dpad, 0.0f);
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
    const std::int64_t visible = selection_scores<Arch, RowTile>(w.q.data(), Dpad, G, ksel, b, hk, d.Lk,
                                                                 ksel.extent(3), qp, mod, w.s.data(), &hi);
    const std::int64_t n = std::min(top_k, visible);
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g, r = g * n_rows + il;
      const float* s = w.s.data() + g * d.Lk;
      std::int64_t* idx = keys.ptr(b, hk, r);
      float* e = given.ptr(b, hk, r);
      simd::top_k_indices<Arch>(s, hi, n, idx, w.top);
      const float* qs = w.q.data() + g * Dpad;
      for (std::int64_t t = 0; t < n; ++t)  // exact scores (Loki: all D rotated coordinates)
        e[t] = basis ? simd::dot<Arch>(qs, k.ptr(b, hk, idx[t]), d.D) : s[idx[t]];
      counts(b, hk, r) = n;
      if (!selected.empty()) {
        std::copy_n(idx, n, selected.ptr(b, h, i));
        std::fill(selected.ptr(b, h, i) + n, selected.ptr(b, h, i) + top_k, std::int64_t{-1});
      }
    }
  });
}

// The shared driver of top-k attention and Loki, per slice of decode_max_rows query rows: select
// (items (batch, kv head, query row); the G query heads of the group share one pass over K), then
// attend over the selected keys on the split-KV engine. Rotate: q is taken into the Loki basis.
template <class Arch, class KV, class Mod>
void run(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> ksel, view<const KV, 4> v,
         std::int64_t top_k, const loki_basis* basis, view<float, 4> out, view<float, 3> lse,
         view<std::int64_t, 4> selected, const Mod& mod, int threads) {
  const std::int64_t G = d.group(), rows = std::min(d.Lq, decode_max_rows), cap = std::max<std::int64_t>(1, std::min(top_k, d.Lk));
  tensor<std::int64_t, 4> keys({d.B, d.Hkv, G * rows, cap});
  tensor<float, 4> given({d.B, d.Hkv, G * rows, cap});
  tensor<std::int64_t, 3> counts({d.B, d.Hkv, G * rows});
  std::vector<row_scratch> scratch;
  decode_workspace ws;
  for (std::int64_t i0 = 0; i0 < d.Lq; i0 += rows) {
    const std::int64_t n_rows = std::min(rows, d.Lq - i0), R = G * n_rows;
    const auto kv = keys.as_view().narrow(2, 0, R);
    const auto gv = given.as_view().narrow(2, 0, R);
    const auto cv = counts.as_view().narrow(2, 0, R);
    auto select = [&]<int RowTile>() {
      select_rows<Arch, RowTile>(d, q, k, ksel, top_k, basis, selected, mod, threads, i0, n_rows, scratch, kv, gv, cv);
    };
    if (G == 1) select.template operator()<1>();
    else if (G == 2) select.template operator()<2>();
    else select.template operator()<4>();
    // The selection applied the mask: the engine sees only the chosen keys, every one visible.
    dims ds = d;
    ds.Lq = n_rows;
    const split_kv::gathered_source<KV> src{k, v, kv, cv, gv};
    split_kv::attend<Arch>(ds, src, q.narrow(2, i0, n_rows), out.narrow(2, i0, n_rows),
                           lse.empty() ? lse : lse.narrow(2, i0, n_rows), mods::none{}, threads, ws);
  }
}

}  // namespace topk_detail

// Exact top-k attention: every query row of every head attends to its top_k highest-scoring
// visible keys (all of them when fewer are visible). K/V may be float, f16 or bf16. Works for
// decode (Lq = 1) and prefill rows (any Lq). Like flash, decode and reference, no mask by default:
// pass mods::causal{} for causal prefill rows.
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
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
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    topk_detail::run<Arch>(d, q, k, k, v, top_k, nullptr, out, lse, selected, mod, opt.threads);
  });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void topk_attention(view<const float, 4> q, const K& k, const V& v, std::int64_t top_k, view<float, 4> out,
                    view<float, 3> lse = {}, view<std::int64_t, 4> selected = {}, const Mod& mod = {},
                    const options& opt = {}) {
  topk_attention<element_t<K>, Mod>(q, cview(k), cview(v), top_k, out, lse, selected, mod, opt);
}

// Loki: select top_k keys by the r = k_low.shape[3] leading rotated coordinates, attend to them
// exactly. k_rot [B, Hkv, Lk, D] are the keys in the basis and k_low [B, Hkv, Lk, r] their first
// r coordinates (both from loki_rotate); v as usual.
template <class Mod = mods::none, class TuArch = simd::default_arch>
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
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    topk_detail::run<Arch>(d, q, k_rot, k_low, v, top_k, &basis, out, lse, selected, mod, opt.threads);
  });
}

}  // namespace mnemo::attention

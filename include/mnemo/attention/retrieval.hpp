// mnemo/attention/retrieval.hpp — retrieval attention for decode over an IVF (k-means) index of
// the cached keys (RetrievalAttention, Liu et al. 2024; the inverted-file index of Jégou, Douze &
// Schmid, "Product quantization for nearest neighbor search", TPAMI 2011), with exact brute-force
// search as the reference.
//
// Index (ivf_index, one set of keys [N, D], reusable on its own, e.g. by a kNN memory):
//   build: k-means (Lloyd) with n_lists centroids on at most `train_per_list` * n_lists keys
//          sampled with `seed`, initialised from distinct sampled
//          keys; an emptied list takes half of the largest one (its centroid split in two by a
//          relative 1/1024 nudge, as faiss does). Then every key goes to the list of its
//          nearest centroid (L2), stored packed per list with its id (its row in the input).
//   add:   new keys get ids size() .. size() + M - 1 and join the list of their nearest centroid.
//   search(q, n_probe, k): the n_probe lists whose centroids have the largest q . c (the
//          inner-product coarse quantizer), then the exact q . k of every key in them; the k best
//          (larger first, ties: the lower id, NaN last: simd::top_k_indices, the selection every
//          selecting kernel shares). n_probe = n_lists is exact search.
//
// Retrieval decode (one step, q [B, Hq, 1, D]; K/V [B, Hkv, Lk, D|Dv] in f32, f16 or bf16):
//   keys = the top_k keys the index returns for the scaled query, restricted to ids < Lk - window
//          u the window [Lk - window, Lk)
//   out  = attention over keys (the split-KV engine over the gathered keys, one softmax)
// Each query head searches the index of its kv head (retrieval_index keeps one ivf_index per
// (batch, kv head)). Keys that are neither indexed nor in the window are not attended: add keys
// to the index at the latest when they leave the window. reference_retrieval_decode does the same
// with exact (brute-force, double) search, and reference_exact_search is the top-k truth that
// recall is measured against.
//
// Numerics: k-means in f32 scores (GEMM) and double centroid sums; search scores in f32 (simd::dot)
// are the attention scores of the retrieved keys (no second pass over K); softmax in f32 with
// simd::exp.
// Results do not depend on the thread count (items are independent, sums in a fixed order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/quest.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/serial_gemm.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"
#include "mnemo/simd/select.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention {

// Training sample per centroid of the k-means. faiss samples up to 256 (max_points_per_centroid)
// and warns below 39; 64 cuts the k-means work of a 131072-key, 512-list build to a quarter of
// training on every key, and still gave recall 0.99 of the true top-256 with 12 of 512 lists probed
// on the clustered keys of bench/retrieval_rows.cpp.
inline constexpr std::int64_t train_per_list = 64;

// A search result: its id and score (q . k with the query as given).
struct ivf_hit {
  std::int64_t id;
  float score;
};

// Scratch of ivf_index::search_into, kept by a caller that searches many times.
struct ivf_search_scratch {
  std::vector<float> centroid_scores, scores;       // [n_lists], [candidates]
  std::vector<std::int64_t> lists, ids, picked;     // [n_probe], [candidates], [k]
  simd::top_k_workspace top;
};

namespace ivf_detail {

// Keys per GEMM block of the nearest-centroid assignment: [256, D] x [D, n_lists].
inline constexpr std::int64_t assign_block = 256;

// Relative nudge that splits a centroid in two for an emptied list (faiss's EPS = 1/1024).
inline constexpr float split_nudge = 1.0f / 1024.0f;

}  // namespace ivf_detail

// Inverted-file index over one set of keys [N, D] (see the header).
class ivf_index {
 public:
  ivf_index() = default;

  // k-means over keys [N, D] (1 <= n_lists <= N, iterations >= 0), then every key into its list.
  void build(view<const float, 2> keys, std::int64_t n_lists, int iterations, std::uint64_t seed, int threads = 0) {
    constexpr const char* fn = "ivf_index::build";
    using mnemo::detail::require;
    require(!keys.empty() && keys.extent(0) >= 1 && keys.extent(1) >= 1, fn,
            ": keys must be a non-empty [N, D] view, got ", shape_string(keys.shape()));
    const std::int64_t N = keys.extent(0), D = keys.extent(1);
    require(n_lists >= 1 && n_lists <= N, fn, ": n_lists must be in [1, N] = [1, ", N, "], got ", n_lists);
    require(iterations >= 0, fn, ": iterations must be >= 0, got ", iterations);
    require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
    D_ = D;
    n_lists_ = n_lists;
    size_ = 0;
    list_keys_.assign(static_cast<std::size_t>(n_lists), {});
    list_ids_.assign(static_cast<std::size_t>(n_lists), {});

    // Training sample: a seeded partial Fisher-Yates shuffle of the row indices.
    std::mt19937_64 rng(seed);
    const std::int64_t n_train = std::min(N, n_lists * train_per_list);
    std::vector<std::int64_t> rows(static_cast<std::size_t>(N));
    std::iota(rows.begin(), rows.end(), std::int64_t{0});
    for (std::int64_t i = 0; i < n_train; ++i) {
      std::uniform_int_distribution<std::int64_t> pick(i, N - 1);
      std::swap(rows[static_cast<std::size_t>(i)], rows[static_cast<std::size_t>(pick(rng))]);
    }
    std::vector<float> train(static_cast<std::size_t>(n_train * D));
    for (std::int64_t i = 0; i < n_train; ++i)
      std::copy(keys.ptr(rows[static_cast<std::size_t>(i)]), keys.ptr(rows[static_cast<std::size_t>(i)]) + D,
                train.data() + i * D);

    // Initial centroids: the first n_lists sampled keys (distinct rows, random order).
    centroids_.assign(train.begin(), train.begin() + n_lists * D);
    std::vector<std::int64_t> assign(static_cast<std::size_t>(n_train));
    for (int it = 0; it < iterations; ++it) {
      nearest(train.data(), D, n_train, assign.data(), threads);
      update_centroids(train.data(), n_train, assign.data());
    }
    add_rows(keys, threads);
  }

  // Adds keys [M, D]: ids size() .. size() + M - 1, each into the list of its nearest centroid.
  void add(view<const float, 2> keys, int threads = 0) {
    constexpr const char* fn = "ivf_index::add";
    mnemo::detail::require(!empty(), fn, ": the index is empty (call build first)");
    mnemo::detail::require(keys.extent(1) == D_ || keys.extent(0) == 0, fn, ": keys must have shape [M, D] = [M, ", D_,
                           "], got ", shape_string(keys.shape()));
    mnemo::detail::require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
    if (keys.extent(0) > 0) add_rows(keys, threads);
  }

  // The k best keys of the n_probe lists nearest to q [D] by q . c, sorted (larger score first,
  // ties: the lower id); only ids < max_id count. Returns min(k, candidates) hits.
  template <class Arch = simd::default_arch>
  std::vector<ivf_hit> search(const float* q, std::int64_t n_probe, std::int64_t k,
                              std::int64_t max_id = std::numeric_limits<std::int64_t>::max()) const {
    check_search("ivf_index::search", n_probe, k);
    ivf_search_scratch w;
    std::vector<ivf_hit> hits;
    search_into<Arch>(q, n_probe, k, max_id, w, hits);
    return hits;
  }

  // As search, for a query view [D]; returns the ids only.
  template <class Arch = simd::default_arch>
  std::vector<std::int64_t> search(view<const float, 1> q, std::int64_t n_probe, std::int64_t k) const {
    mnemo::detail::require(!empty(), "ivf_index::search: the index is empty (call build first)");
    mnemo::detail::require(q.extent(0) == D_, "ivf_index::search: q must have shape [D] = [", D_, "], got [",
                           q.extent(0), "]");
    std::vector<std::int64_t> ids;
    for (const ivf_hit& h : search<Arch>(q.data(), n_probe, k)) ids.push_back(h.id);
    return ids;
  }

  // The search with caller-owned scratch (no allocation once its vectors have grown); hits is
  // overwritten. Arguments must have passed check_search.
  template <class Arch = simd::default_arch>
  void search_into(const float* q, std::int64_t n_probe, std::int64_t k, std::int64_t max_id, ivf_search_scratch& w,
                   std::vector<ivf_hit>& hits) const {
    w.centroid_scores.resize(static_cast<std::size_t>(n_lists_));
    for (std::int64_t l = 0; l < n_lists_; ++l)
      w.centroid_scores[static_cast<std::size_t>(l)] = simd::dot<Arch>(q, centroids_.data() + l * D_, D_);
    w.lists.resize(static_cast<std::size_t>(n_probe));
    simd::top_k_indices<Arch>(w.centroid_scores.data(), n_lists_, n_probe, w.lists.data(), w.top);
    w.scores.clear();
    w.ids.clear();
    for (std::int64_t l : w.lists) {
      const auto& ks = list_keys_[static_cast<std::size_t>(l)];
      const auto& ids = list_ids_[static_cast<std::size_t>(l)];
      for (std::size_t i = 0; i < ids.size(); ++i) {
        if (ids[i] >= max_id) continue;
        w.scores.push_back(simd::dot<Arch>(q, ks.data() + static_cast<std::int64_t>(i) * D_, D_));
        w.ids.push_back(ids[i]);
      }
    }
    const std::int64_t n = std::min(k, static_cast<std::int64_t>(w.ids.size()));
    w.picked.resize(static_cast<std::size_t>(n));
    simd::top_k_indices<Arch>(w.scores.data(), static_cast<std::int64_t>(w.ids.size()), n, w.picked.data(), w.top,
                              simd::top_k_order::best_first, w.ids.data());
    hits.resize(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i) {
      const auto p = static_cast<std::size_t>(w.picked[static_cast<std::size_t>(i)]);
      hits[static_cast<std::size_t>(i)] = {w.ids[p], w.scores[p]};
    }
  }

  void check_search(const char* fn, std::int64_t n_probe, std::int64_t k) const {
    mnemo::detail::require(!empty(), fn, ": the index is empty (call build first)");
    mnemo::detail::require(n_probe >= 1 && n_probe <= n_lists_, fn, ": n_probe must be in [1, n_lists] = [1, ",
                           n_lists_, "], got ", n_probe);
    mnemo::detail::require(k >= 1, fn, ": k must be >= 1, got ", k);
  }

  bool empty() const { return n_lists_ == 0; }
  std::int64_t size() const { return size_; }  // keys indexed
  std::int64_t dim() const { return D_; }
  std::int64_t n_lists() const { return n_lists_; }
  const float* centroid(std::int64_t l) const { return centroids_.data() + l * D_; }  // D floats
  const std::vector<std::int64_t>& list(std::int64_t l) const { return list_ids_[static_cast<std::size_t>(l)]; }

  // Sum over the indexed keys of the squared distance to their list's centroid (k-means objective).
  double inertia() const {
    double sum = 0;
    for (std::int64_t l = 0; l < n_lists_; ++l) {
      const auto& ks = list_keys_[static_cast<std::size_t>(l)];
      for (std::size_t i = 0; i < ks.size(); ++i) {
        const double d = static_cast<double>(ks[i]) - centroids_[static_cast<std::size_t>(l * D_) + i % static_cast<std::size_t>(D_)];
        sum += d * d;
      }
    }
    return sum;
  }

 private:
  // assign[i] = the nearest centroid (L2, ties: the lower list) of x[i] (rows of `stride` floats).
  void nearest(const float* x, std::int64_t stride, std::int64_t n, std::int64_t* assign, int threads) const {
    using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
    using cmap = Eigen::Map<const mat, Eigen::Unaligned, Eigen::OuterStride<>>;
    const cmap C(centroids_.data(), n_lists_, D_, Eigen::OuterStride<>(D_));
    std::vector<float> cnorm(static_cast<std::size_t>(n_lists_));
    for (std::int64_t l = 0; l < n_lists_; ++l) cnorm[static_cast<std::size_t>(l)] = C.row(l).squaredNorm();
    const std::int64_t blocks = (n + ivf_detail::assign_block - 1) / ivf_detail::assign_block;
    mnemo::detail::for_each_item(blocks, threads, true, [&](std::int64_t blk) {
      const std::int64_t r0 = blk * ivf_detail::assign_block, r = std::min(ivf_detail::assign_block, n - r0);
      const cmap X(x + r0 * stride, r, D_, Eigen::OuterStride<>(stride));
      mat S(r, n_lists_);
      mnemo::detail::gemm<mnemo::detail::accumulate::assign>(S, X, C.transpose());
      for (std::int64_t i = 0; i < r; ++i) {
        std::int64_t best = 0;
        float bd = std::numeric_limits<float>::infinity();
        for (std::int64_t l = 0; l < n_lists_; ++l) {
          const float dist = cnorm[static_cast<std::size_t>(l)] - 2.0f * S(i, l);  // ||x - c||^2 - ||x||^2
          if (dist < bd) {
            bd = dist;
            best = l;
          }
        }
        assign[r0 + i] = best;
      }
    });
  }

  // Lloyd update: each centroid the mean of its points (double sums, in point order); an emptied
  // list splits the largest one.
  void update_centroids(const float* x, std::int64_t n, const std::int64_t* assign) {
    std::vector<double> sum(static_cast<std::size_t>(n_lists_ * D_), 0.0);
    std::vector<std::int64_t> count(static_cast<std::size_t>(n_lists_), 0);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t l = assign[i];
      ++count[static_cast<std::size_t>(l)];
      for (std::int64_t c = 0; c < D_; ++c) sum[static_cast<std::size_t>(l * D_ + c)] += x[i * D_ + c];
    }
    for (std::int64_t l = 0; l < n_lists_; ++l)
      if (count[static_cast<std::size_t>(l)] > 0)
        for (std::int64_t c = 0; c < D_; ++c)
          centroids_[static_cast<std::size_t>(l * D_ + c)] =
              static_cast<float>(sum[static_cast<std::size_t>(l * D_ + c)] / count[static_cast<std::size_t>(l)]);
    for (std::int64_t l = 0; l < n_lists_; ++l) {
      if (count[static_cast<std::size_t>(l)] > 0) continue;
      const auto big = static_cast<std::int64_t>(std::max_element(count.begin(), count.end()) - count.begin());
      for (std::int64_t c = 0; c < D_; ++c) {
        const float x0 = centroids_[static_cast<std::size_t>(big * D_ + c)];
        const float nudge = (c % 2 == 0 ? 1.0f : -1.0f) * ivf_detail::split_nudge;
        centroids_[static_cast<std::size_t>(l * D_ + c)] = x0 * (1 + nudge);
        centroids_[static_cast<std::size_t>(big * D_ + c)] = x0 * (1 - nudge);
      }
      count[static_cast<std::size_t>(l)] = count[static_cast<std::size_t>(big)] / 2;
      count[static_cast<std::size_t>(big)] -= count[static_cast<std::size_t>(l)];
    }
  }

  void add_rows(view<const float, 2> keys, int threads) {
    const std::int64_t M = keys.extent(0);
    std::vector<std::int64_t> assign(static_cast<std::size_t>(M));
    nearest(keys.data(), keys.stride(0), M, assign.data(), threads);
    for (std::int64_t i = 0; i < M; ++i) {
      const std::int64_t l = assign[static_cast<std::size_t>(i)];
      auto& ks = list_keys_[static_cast<std::size_t>(l)];
      ks.insert(ks.end(), keys.ptr(i), keys.ptr(i) + D_);
      list_ids_[static_cast<std::size_t>(l)].push_back(size_ + i);
    }
    size_ += M;
  }

  std::int64_t D_ = 0, n_lists_ = 0, size_ = 0;
  std::vector<float> centroids_;                    // [n_lists, D]
  std::vector<std::vector<float>> list_keys_;       // per list: [n, D], packed
  std::vector<std::vector<std::int64_t>> list_ids_; // per list: [n]
};

// One ivf_index per (batch, kv head) over a K cache.
struct retrieval_index_options {
  std::int64_t n_lists = 1024;  // clamped to the keys indexed
  int iterations = 10;
  std::uint64_t seed = 0;
  int threads = 0;
};

class retrieval_index {
 public:
  retrieval_index() = default;

  // Indexes keys [B, Hkv, N, D] (f32, f16 or bf16): one k-means per (batch, kv head).
  template <class K>
  static retrieval_index build(const K& kin, const retrieval_index_options& opt = {}) {
    constexpr const char* fn = "retrieval_index::build";
    const auto k = cview(kin);
    mnemo::detail::require(!k.empty() && k.extent(2) >= 1, fn, ": k must be a non-empty [B, Hkv, N, D] view, got ",
                           shape_string(k.shape()));
    mnemo::detail::require(opt.n_lists >= 1, fn, ": options.n_lists must be >= 1, got ", opt.n_lists);
    retrieval_index r;
    r.B_ = k.extent(0);
    r.Hkv_ = k.extent(1);
    r.index_.resize(static_cast<std::size_t>(r.B_ * r.Hkv_));
    const std::int64_t n_lists = std::min(opt.n_lists, k.extent(2));
    for (std::int64_t bh = 0; bh < r.B_ * r.Hkv_; ++bh) {
      const tensor<float, 2> x = to_f32(k, bh / r.Hkv_, bh % r.Hkv_);
      r.index_[static_cast<std::size_t>(bh)].build(x, n_lists, opt.iterations, opt.seed + static_cast<std::uint64_t>(bh),
                                                   opt.threads);
    }
    return r;
  }

  // Appends keys [B, Hkv, M, D] (ids continue from size()).
  template <class K>
  void add(const K& kin, int threads = 0) {
    constexpr const char* fn = "retrieval_index::add";
    const auto k = cview(kin);
    mnemo::detail::require(!empty(), fn, ": the index is empty (call build first)");
    mnemo::detail::require_shape(fn, "k", k, {B_, Hkv_, k.extent(2), dim()}, " [B, Hkv, M, D] (B, Hkv, D from the index)");
    for (std::int64_t bh = 0; bh < B_ * Hkv_; ++bh)
      index_[static_cast<std::size_t>(bh)].add(to_f32(k, bh / Hkv_, bh % Hkv_), threads);
  }

  bool empty() const { return index_.empty(); }
  std::int64_t batch() const { return B_; }
  std::int64_t kv_heads() const { return Hkv_; }
  std::int64_t dim() const { return index_.empty() ? 0 : index_[0].dim(); }
  std::int64_t size() const { return index_.empty() ? 0 : index_[0].size(); }
  std::int64_t n_lists() const { return index_.empty() ? 0 : index_[0].n_lists(); }
  const ivf_index& at(std::int64_t b, std::int64_t hk) const { return index_[static_cast<std::size_t>(b * Hkv_ + hk)]; }

 private:
  template <class KV>
  static tensor<float, 2> to_f32(const view<const KV, 4>& k, std::int64_t b, std::int64_t hk) {
    tensor<float, 2> x({k.extent(2), k.extent(3)});
    for (std::int64_t j = 0; j < k.extent(2); ++j)
      for (std::int64_t c = 0; c < k.extent(3); ++c) x(j, c) = to_float(k(b, hk, j, c));
    return x;
  }

  std::int64_t B_ = 0, Hkv_ = 0;
  std::vector<ivf_index> index_;  // [B * Hkv]
};

// Options of retrieval_decode.
struct retrieval_options {
  std::int64_t n_probe = 32;   // lists probed per query head, in [1, n_lists]
  std::int64_t top_k = 2048;   // keys retrieved per query head, >= 1
  std::int64_t window = 0;     // most recent keys always attended, >= 0
  float scale = 0;             // 0: 1 / sqrt(D)
  int threads = 0;             // 0: the OpenMP default
};

// Exact top-k of q . k_j over keys [N, D] in double (larger first, ties: the lower id, NaN last:
// the selection rule of every selecting kernel), ids < max_id.
inline std::vector<std::int64_t> reference_exact_search(view<const float, 2> keys, const float* q, std::int64_t k,
                                              std::int64_t max_id = std::numeric_limits<std::int64_t>::max()) {
  const std::int64_t n = std::min(keys.extent(0), max_id);
  std::vector<double> s(static_cast<std::size_t>(n));
  for (std::int64_t j = 0; j < n; ++j) {
    double dot = 0;
    for (std::int64_t c = 0; c < keys.extent(1); ++c) dot += static_cast<double>(q[c]) * keys(j, c);
    s[static_cast<std::size_t>(j)] = dot;
  }
  std::vector<std::int64_t> ids(static_cast<std::size_t>(std::min(k, n)));
  simd::reference_top_k_indices(s.data(), n, static_cast<std::int64_t>(ids.size()), ids.data(),
                                simd::top_k_order::best_first);
  return ids;
}

// Fraction of `truth` found in `found` (1 for an empty truth).
inline double search_recall(const std::vector<std::int64_t>& found, const std::vector<std::int64_t>& truth) {
  if (truth.empty()) return 1.0;
  std::vector<std::int64_t> f(found);
  std::sort(f.begin(), f.end());
  std::int64_t hit = 0;
  for (std::int64_t t : truth) hit += std::binary_search(f.begin(), f.end(), t) ? 1 : 0;
  return static_cast<double>(hit) / static_cast<double>(truth.size());
}

// Retrieval decode with exact search: per query head the top_k keys below Lk - window by
// q . k (double), plus the window, attention::reference over that key set. `ids`
// [B, Hq, top_k] (or empty) receives the retrieved keys (score order, -1 padded).
template <class KV>
void reference_retrieval_decode(view<const float, 4> q,  // [B, Hq, 1, D]
                      view<const KV, 4> k,     // [B, Hkv, Lk, D]
                      view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                      view<float, 4> out,      // [B, Hq, 1, Dv]
                      view<float, 3> lse,      // [B, Hq, 1] or empty
                      const retrieval_options& opt = {}, view<std::int64_t, 3> ids = {}) {
  constexpr const char* fn = "attention::reference_retrieval_decode";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mods::none{}, options{opt.scale, opt.threads});
  mnemo::detail::require(d.Lq == 1, fn, ": q.shape[2] (Lq) must be 1 (one decode step), got ", d.Lq);
  mnemo::detail::require(opt.top_k >= 1, fn, ": options.top_k must be >= 1, got ", opt.top_k);
  mnemo::detail::require(opt.window >= 0, fn, ": options.window must be >= 0, got ", opt.window);
  if (!ids.empty()) mnemo::detail::require_shape(fn, "ids", ids, {d.B, d.Hq, opt.top_k}, " [B, Hq, top_k]");
  const std::int64_t limit = std::max<std::int64_t>(0, d.Lk - opt.window);
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t hk = h / d.group();
      tensor<float, 2> keys({d.Lk, d.D});
      for (std::int64_t j = 0; j < d.Lk; ++j)
        for (std::int64_t c = 0; c < d.D; ++c) keys(j, c) = to_float(k(b, hk, j, c));
      std::vector<float> qs(static_cast<std::size_t>(d.D));
      for (std::int64_t c = 0; c < d.D; ++c) qs[static_cast<std::size_t>(c)] = d.scale * q(b, h, 0, c);
      const std::vector<std::int64_t> found = reference_exact_search(keys, qs.data(), opt.top_k, limit);
      if (!ids.empty())
        for (std::int64_t i = 0; i < opt.top_k; ++i)
          ids(b, h, i) = i < static_cast<std::int64_t>(found.size()) ? found[static_cast<std::size_t>(i)] : -1;
      std::vector<char> keep(static_cast<std::size_t>(d.Lk), 0);
      for (std::int64_t j : found) keep[static_cast<std::size_t>(j)] = 1;
      for (std::int64_t j = limit; j < d.Lk; ++j) keep[static_cast<std::size_t>(j)] = 1;
      sparse_decode_detail::reference_over_keys(q, k, v, out, lse, b, h, hk, keep, d.scale);
    }
}


// Retrieval decode (see the header): per query head, the top_k keys the index returns from
// n_probe lists (ids < Lk - window) and the window, exact attention over them on the split-KV
// engine. `ids` [B, Hq, top_k] (or empty) receives the retrieved keys (score order, -1 padded).
template <class KV, class TuArch = simd::default_arch>
void retrieval_decode(view<const float, 4> q,  // [B, Hq, 1, D]
                      view<const KV, 4> k,     // [B, Hkv, Lk, D]
                      view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                      const retrieval_index& index,
                      view<float, 4> out,      // [B, Hq, 1, Dv]
                      view<float, 3> lse = {}, // [B, Hq, 1] or empty
                      const retrieval_options& opt = {}, view<std::int64_t, 3> ids = {}) {
  constexpr const char* fn = "attention::retrieval_decode";
  using mnemo::detail::require;
  const dims d = detail::check_args(fn, q, k, v, out, lse, mods::none{}, options{opt.scale, opt.threads});
  require(d.Lq == 1, fn, ": q.shape[2] (Lq) must be 1 (one decode step), got ", d.Lq);
  require(!index.empty(), fn, ": index is empty (build it first)");
  require(index.batch() == d.B && index.kv_heads() == d.Hkv && index.dim() == d.D, fn,
          ": index must cover keys [B, Hkv, *, D] = [", d.B, ", ", d.Hkv, ", *, ", d.D, "], got [", index.batch(), ", ",
          index.kv_heads(), ", *, ", index.dim(), "]");
  require(index.size() <= d.Lk, fn, ": index holds ", index.size(), " keys, more than the cache's Lk = ", d.Lk);
  require(opt.top_k >= 1, fn, ": options.top_k must be >= 1, got ", opt.top_k);
  require(opt.window >= 0, fn, ": options.window must be >= 0, got ", opt.window);
  index.at(0, 0).check_search(fn, opt.n_probe, opt.top_k);
  if (!ids.empty()) mnemo::detail::require_shape(fn, "ids", ids, {d.B, d.Hq, opt.top_k}, " [B, Hq, top_k]");
  const std::int64_t limit = std::max<std::int64_t>(0, d.Lk - opt.window), G = d.group();
  const std::int64_t cap = std::max<std::int64_t>(1, std::min(opt.top_k, limit) + d.Lk - limit);
  sparse_decode_detail::key_lists lists{tensor<std::int64_t, 4>({d.B, d.Hkv, G, cap}),
                                        tensor<std::int64_t, 3>({d.B, d.Hkv, G})};
  tensor<float, 4> scores({d.B, d.Hkv, G, cap});
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    // Dynamic: on a shared machine a statically assigned thread that starts late holds up the call.
    parallel_for_dynamic(
        d.B * d.Hq,
        [&](std::int64_t bh) {
          const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / G, g = h % G;
          std::vector<float> qs(static_cast<std::size_t>(d.D));
          for (std::int64_t c = 0; c < d.D; ++c) qs[static_cast<std::size_t>(c)] = d.scale * q(b, h, 0, c);
          ivf_search_scratch w;
          std::vector<ivf_hit> hits;
          index.at(b, hk).search_into<Arch>(qs.data(), opt.n_probe, opt.top_k, limit, w, hits);
          const auto n = static_cast<std::int64_t>(hits.size());
          if (!ids.empty())
            for (std::int64_t i = 0; i < opt.top_k; ++i) ids(b, h, i) = i < n ? hits[static_cast<std::size_t>(i)].id : -1;
          for (std::int64_t i = 0; i < n; ++i) {
            lists.keys(b, hk, g, i) = hits[static_cast<std::size_t>(i)].id;
            scores(b, hk, g, i) = hits[static_cast<std::size_t>(i)].score;
          }
          lists.counts(b, hk, g) = n;
        },
        opt.threads);
    sparse_decode_detail::attend_lists<Arch>(d, q, k, v, out, lse, limit, opt.threads, lists, &scores);
  });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void retrieval_decode(view<const float, 4> q, const K& k, const V& v, const retrieval_index& index, view<float, 4> out,
                      view<float, 3> lse = {}, const retrieval_options& opt = {}, view<std::int64_t, 3> ids = {}) {
  retrieval_decode<element_t<K>, TuArch>(q, cview(k), cview(v), index, out, lse, opt, ids);
}

}  // namespace mnemo::attention

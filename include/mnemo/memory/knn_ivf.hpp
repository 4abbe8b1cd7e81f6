// mnemo/memory/knn_ivf.hpp — approximate search for the kNN memory (memory/knn.hpp) through the
// IVF (k-means, inverted-file) index of the retrieval attention work (attention/retrieval.hpp,
// attention::ivf_index; Jégou, Douze & Schmid, TPAMI 2011).
//
// knn_index keeps one ivf_index per (batch, head) over the memory's stored keys, the ids being
// the memory's slots. A search probes the n_probe lists whose centroids score highest against
// the query and returns the topk best stored keys among them (larger q . k first, ties: the
// lower slot), so n_probe = n_lists is exact search, and smaller n_probe trades recall for speed
// (the tests measure recall against knn_search). Missing entries (fewer candidates than topk)
// are index -1 and score -inf, as in knn_search, so knn_attention's rules carry over.
//
// Staleness: the index describes the memory as it was at build (or the last sync). sync()
// appends the slots added since, as long as the ring has not wrapped (then no stored pair was
// overwritten); after a wrap it rebuilds. A search with an index that is out of date with the
// memory throws.
//
// Shapes as knn.hpp: q [B, H, Lq, D]; indices, scores [B, H, Lq, topk]; out [B, H, Lq, Dv].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/attention/retrieval.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/memory/knn.hpp"

namespace mnemo::memory {

struct knn_index_options {
  std::int64_t n_lists = 64;  // k-means lists per (batch, head); clamped to the stored pairs
  int iterations = 10;        // Lloyd iterations
  std::uint64_t seed = 0;     // training sample and initial centroids
  int threads = 0;            // 0: the OpenMP default
};

class knn_index {
 public:
  knn_index() = default;

  // Builds the lists over the memory's stored keys (at least one pair must be stored).
  void build(const knn_memory& mem, const knn_index_options& opt = {}) {
    constexpr const char* fn = "knn_index::build";
    mnemo::detail::require(!mem.empty() && mem.size() >= 1, fn, ": the memory must hold at least one pair, got ",
                           mem.empty() ? 0 : mem.size());
    mnemo::detail::require(opt.n_lists >= 1, fn, ": options.n_lists must be >= 1, got ", opt.n_lists);
    mnemo::detail::require(opt.iterations >= 0, fn, ": options.iterations must be >= 0, got ", opt.iterations);
    detail::check_threads(fn, opt.threads);
    opt_ = opt;
    B_ = mem.batch();
    H_ = mem.heads();
    lists_.assign(static_cast<std::size_t>(B_ * H_), {});
    const view<const float, 4> keys = mem.keys();
    const std::int64_t n_lists = std::min(opt.n_lists, mem.size());
    for (std::int64_t bh = 0; bh < B_ * H_; ++bh) {
      lists_[static_cast<std::size_t>(bh)].build(slots(keys, bh, 0, mem.size()), n_lists, opt.iterations, opt.seed,
                                                 opt.threads);
    }
    size_ = mem.size();
    total_ = mem.total_added();
  }

  // Brings the index up to date with the memory: appends the new slots when the ring has not
  // wrapped since, else rebuilds.
  void sync(const knn_memory& mem) {
    mnemo::detail::require(!empty(), "knn_index::sync: the index is empty (call build first)");
    if (mem.total_added() == total_ && mem.size() == size_) return;
    const bool appended_only = mem.total_added() == mem.size() && mem.size() >= size_ && mem.batch() == B_ &&
                               mem.heads() == H_;
    if (!appended_only) {
      build(mem, opt_);
      return;
    }
    const view<const float, 4> keys = mem.keys();
    for (std::int64_t bh = 0; bh < B_ * H_; ++bh)
      lists_[static_cast<std::size_t>(bh)].add(slots(keys, bh, size_, mem.size() - size_), opt_.threads);
    size_ = mem.size();
    total_ = mem.total_added();
  }

  bool empty() const { return lists_.empty(); }
  std::int64_t n_lists() const { return empty() ? 0 : lists_.front().n_lists(); }
  const attention::ivf_index& lists(std::int64_t b, std::int64_t h) const {
    return lists_.at(static_cast<std::size_t>(b * H_ + h));
  }

  // Throws unless the index describes `mem` as it is now.
  void check_current(const char* fn, const knn_memory& mem) const {
    mnemo::detail::require(!empty(), fn, ": the index is empty (call build first)");
    mnemo::detail::require(mem.batch() == B_ && mem.heads() == H_, fn, ": the index was built for [B, H] = [", B_,
                           ", ", H_, "], the memory is [", mem.batch(), ", ", mem.heads(), "]");
    mnemo::detail::require(mem.total_added() == total_ && mem.size() == size_, fn,
                           ": the index is stale (built at total_added = ", total_, ", the memory is at ",
                           mem.total_added(), "): call sync");
  }

 private:
  // Slots [s0, s0 + n) of (b, h) = bh of the memory's keys, as [n, D].
  view<const float, 2> slots(const view<const float, 4>& keys, std::int64_t bh, std::int64_t s0, std::int64_t n) const {
    return {keys.ptr(bh / H_, bh % H_, s0), {n, keys.extent(3)}, {keys.stride(2), 1}};
  }

  knn_index_options opt_{};
  std::int64_t B_ = 0, H_ = 0, size_ = 0, total_ = 0;
  std::vector<attention::ivf_index> lists_;  // [B * H]
};

// Approximate top-k search through the index (same contract as knn_search otherwise).
template <class Arch = simd::default_arch>
void knn_search_ivf(view<const float, 4> q,  // [B, H, Lq, D]
                    const knn_memory& mem, const knn_index& index, std::int64_t n_probe, std::int64_t topk,
                    view<std::int64_t, 4> indices,  // [B, H, Lq, topk]
                    view<float, 4> scores,          // [B, H, Lq, topk] or empty
                    int threads = 0) {
  constexpr const char* fn = "memory::knn_search_ivf";
  const auto d = detail::check_knn_search(fn, q, mem, topk, indices, scores, threads);
  mnemo::detail::require(!indices.empty(), fn, ": indices must be a non-empty view");
  index.check_current(fn, mem);
  mnemo::detail::require(n_probe >= 1 && n_probe <= index.n_lists(), fn, ": n_probe must be in [1, n_lists = ",
                         index.n_lists(), "], got ", n_probe);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const attention::ivf_index& ivf = index.lists(b, h);
    attention::ivf_search_scratch scratch;
    std::vector<attention::ivf_hit> hits;
    for (std::int64_t t = 0; t < d.Lq; ++t) {
      ivf.search_into<Arch>(q.ptr(b, h, t), n_probe, topk, mem.size(), scratch, hits);
      for (std::int64_t j = 0; j < topk; ++j) {
        const bool have = j < static_cast<std::int64_t>(hits.size());
        indices(b, h, t, j) = have ? hits[static_cast<std::size_t>(j)].id : -1;
        if (!scores.empty()) scores(b, h, t, j) = have ? hits[static_cast<std::size_t>(j)].score : detail::minus_inf;
      }
    }
  }, threads);
}

// Attention over the pairs the index retrieves; same contract as knn_attention.
template <class Arch = simd::default_arch>
void knn_attention_ivf(view<const float, 4> q,  // [B, H, Lq, D]
                       const knn_memory& mem, const knn_index& index, std::int64_t n_probe, std::int64_t topk,
                       view<float, 4> out,       // [B, H, Lq, Dv]
                       view<float, 3> lse = {},  // [B, H, Lq] or empty
                       const knn_options& opt = {}) {
  const auto d = detail::check_knn_attention("memory::knn_attention_ivf", q, mem, topk, out, lse, opt);
  tensor<std::int64_t, 4> idx({d.B, d.H, d.Lq, topk});
  tensor<float, 4> sc({d.B, d.H, d.Lq, topk});
  knn_search_ivf<Arch>(q, mem, index, n_probe, topk, idx, sc, opt.threads);
  detail::attend_retrieved<Arch>(mem, d, idx, sc, out, lse, opt.threads);
}

}  // namespace mnemo::memory

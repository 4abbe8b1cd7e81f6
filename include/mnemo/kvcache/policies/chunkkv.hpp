// mnemo/kvcache/policies/chunkkv.hpp — ChunkKV: keep whole chunks of consecutive slots, not
// single tokens, so what is kept stays readable text.
//
// Liu et al., "ChunkKV: Semantic-Preserving KV Cache Compression for Efficient Long-Context LLM
// Inference" (2025; kvpress's ChunkKVPress). Token-level policies keep scattered tokens and lose
// the phrase around a kept token; ChunkKV scores fixed chunks of `chunk_size` slots by the mean
// score of their slots and keeps the best chunks whole:
//
//   s_hk,j   = the base policy's score (SnapKV's window attention by default)
//   c_m      = (1 / |C_m|) sum_{j in C_m} sum_hk s_hk,j      C_m = [m c, min((m + 1) c, L)), c = chunk_size
//              (shared: one set of chunks for the whole layer, kvpress's rule; the last chunk may be
//               partial and is scored by the mean over its own slots)
//   c_hk,m   = (1 / |C_m|) sum_{j in C_m} s_hk,j                (per_head = true: each kv head its own)
//   kept     chunks in order of decreasing c (ties: the earlier chunk), each one whole if it fits in
//            what is left of the budget (min(budget, L) slots); so every full chunk that is kept
//            is kept entirely, at most chunk_size - 1 slots of the budget stay unused, and the
//            short last chunk can fill a remainder a full chunk would not fit in. The budget is a
//            hard limit: below chunk_size it keeps no full chunk (kvpress keeps one chunk anyway).
//
// With SnapKV as the base the observation window scores above every other slot (snapkv.hpp), so
// the chunks holding it come first. scores() returns the chunk score of each slot's chunk
// (c_m or c_hk,m broadcast over its slots); select() is the whole-chunk rule above, which differs
// from top_budget(scores) when the budget is not a multiple of chunk_size.
//
// Out of scope: the paper's layer-wise index reuse (the kept chunks of one layer reused by the
// next ones) — a caller can apply one layer's selection to others itself.
// Reads what the base policy reads (SnapKV: observation.attn). Cost beyond the base: O(Hkv L) and
// a sort of the L / chunk_size chunks.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"

namespace mnemo::kvcache::policies {

template <class Base = snapkv>
struct chunkkv {
  static constexpr std::string_view name = "chunkkv";

  Base base{};                  // the slot scorer: anything with scores(observation, view<float, 2>)
  std::int64_t chunk_size = 10;  // c: slots per chunk (the paper's default; kvpress uses 20)
  bool per_head = false;         // false: one set of chunks for the layer (kvpress); true: per kv head

  // out [Hkv, L]: the score of each slot's chunk (see the header).
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::chunkkv::scores";
    const obs_dims d = check(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    base.scores(o, out);
    pool(out, d.Hkv, d.L);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::chunkkv::select";
    const obs_dims d = check(fn, o);
    detail::check_budget(fn, budget);
    selection sel;
    sel.heads.resize(static_cast<std::size_t>(d.Hkv));
    if (d.L == 0) return sel;
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    const std::int64_t n_chunks = (d.L + chunk_size - 1) / chunk_size;
    std::vector<std::int64_t> order(static_cast<std::size_t>(n_chunks));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      auto& row = sel.heads[static_cast<std::size_t>(hk)];
      if (!per_head && hk > 0) {  // the layer's chunks: the same for every head
        row = sel.heads[0];
        continue;
      }
      // Chunk m's score is s(hk, m c), the first slot of the chunk (scores() broadcast it).
      std::iota(order.begin(), order.end(), std::int64_t{0});
      std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
        return s(hk, a * chunk_size) > s(hk, b * chunk_size);
      });
      std::int64_t left = std::min(budget, d.L);
      for (std::int64_t m : order) {
        const std::int64_t lo = m * chunk_size, hi = std::min(lo + chunk_size, d.L);
        if (hi - lo > left) continue;
        for (std::int64_t j = lo; j < hi; ++j) row.push_back(j);
        left -= hi - lo;
      }
      std::sort(row.begin(), row.end());
    }
    return sel;
  }

 private:
  obs_dims check(const char* fn, const observation& o) const {
    const obs_dims d = detail::check(fn, o, false, false);
    detail::require(chunk_size >= 1, fn, ": chunk_size must be >= 1, got ", chunk_size);
    return d;
  }

  // s [Hkv, L] <- the mean of each chunk (over the layer's heads unless per_head), broadcast.
  void pool(view<float, 2> s, std::int64_t Hkv, std::int64_t L) const {
    std::vector<double> head(static_cast<std::size_t>(Hkv));
    for (std::int64_t lo = 0; lo < L; lo += chunk_size) {
      const std::int64_t hi = std::min(lo + chunk_size, L);
      double layer = 0;
      std::fill(head.begin(), head.end(), 0.0);
      for (std::int64_t hk = 0; hk < Hkv; ++hk)
        for (std::int64_t j = lo; j < hi; ++j) head[static_cast<std::size_t>(hk)] += s(hk, j);
      for (double h : head) layer += h;
      for (std::int64_t hk = 0; hk < Hkv; ++hk) {
        const double sum = per_head ? head[static_cast<std::size_t>(hk)] : layer;
        const auto c = static_cast<float>(sum / static_cast<double>(hi - lo));
        for (std::int64_t j = lo; j < hi; ++j) s(hk, j) = c;
      }
    }
  }
};

}  // namespace mnemo::kvcache::policies

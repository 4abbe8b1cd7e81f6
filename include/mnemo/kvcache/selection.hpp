// mnemo/kvcache/selection.hpp — what a KV policy returns: the kept slots of every kv head.
//
// A policy only decides what to keep (DESIGN.md, "KV cache and policies"); the cache applies
// the decision with `cache::compact`. The two meet here:
//
//   selection.heads[h] = ascending, unique slot indices kept by kv head h
//
// Heads may keep different numbers of slots (ragged: AdaKV, PyramidKV, FastGen), so a
// head-adaptive budget really frees memory in the cache.
//
// `top_budget` is the rule every score-based policy shares: keep the `budget` highest scores
// of each head (ties go to the lower index, so the result is deterministic), returned in
// ascending slot order so compaction keeps the original token order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"

namespace mnemo::kvcache {

struct selection {
  std::vector<std::vector<std::int64_t>> heads;  // [Hkv][kept_h], ascending

  std::int64_t num_heads() const { return static_cast<std::int64_t>(heads.size()); }
  std::int64_t kept(std::int64_t h) const { return static_cast<std::int64_t>(heads[static_cast<std::size_t>(h)].size()); }
  std::int64_t total_kept() const {
    std::int64_t n = 0;
    for (const auto& row : heads) n += static_cast<std::int64_t>(row.size());
    return n;
  }
};

// Throws unless `sel` has `num_heads` heads and head h's indices are ascending, unique and
// inside [0, length[h]).
inline void validate(const char* fn, const selection& sel, const std::vector<std::int64_t>& length) {
  detail::require(sel.num_heads() == static_cast<std::int64_t>(length.size()), fn,
                  ": selection.heads.size() must equal the number of kv heads: expected ", length.size(),
                  ", got ", sel.num_heads());
  for (std::size_t h = 0; h < sel.heads.size(); ++h) {
    const auto& row = sel.heads[h];
    for (std::size_t i = 0; i < row.size(); ++i) {
      detail::require(row[i] >= 0 && row[i] < length[h], fn, ": selection.heads[", h, "][", i,
                      "] must be in [0, ", length[h], "), got ", row[i]);
      // Not require(i == 0 || ...): its message arguments are evaluated first, and row[i - 1] at
      // i = 0 reads before the row (UBSan, fuzz/regressions/kvcache_fuzz/validate_first_index).
      if (i > 0 && !(row[i] > row[i - 1]))
        detail::fail(fn, ": selection.heads[", h, "] must be strictly ascending: index ", i, " is ", row[i],
                     " after ", row[i - 1]);
    }
  }
}

// Per head: the min(budget, L) indices with the largest scores, ascending. scores: [Hkv, L].
inline selection top_budget(view<const float, 2> scores, std::int64_t budget) {
  detail::require(budget >= 0, "kvcache::top_budget: budget must be >= 0, got ", budget);
  const std::int64_t H = scores.shape()[0], L = scores.shape()[1];
  const std::int64_t keep = std::min(budget, L);
  selection sel;
  sel.heads.resize(static_cast<std::size_t>(H));
  std::vector<std::int64_t> order(static_cast<std::size_t>(L));
  for (std::int64_t h = 0; h < H; ++h) {
    const float* s = scores.ptr(h);  // not &scores(h, 0): a head may hold no slot (L = 0)
    std::iota(order.begin(), order.end(), std::int64_t{0});
    // Higher score first; ties to the lower index. NaN scores sort last (never kept before a number).
    auto better = [s](std::int64_t a, std::int64_t b) {
      const bool na = s[a] != s[a], nb = s[b] != s[b];
      if (na != nb) return nb;
      if (!na && s[a] != s[b]) return s[a] > s[b];
      return a < b;
    };
    std::nth_element(order.begin(), order.begin() + keep, order.end(), better);
    auto& row = sel.heads[static_cast<std::size_t>(h)];
    row.assign(order.begin(), order.begin() + keep);
    std::sort(row.begin(), row.end());
  }
  return sel;
}

}  // namespace mnemo::kvcache

// mnemo/kvcache/policies/adakv.hpp — AdaKV: one budget for the whole layer, shared adaptively
// between the kv heads, with a per-head floor.
//
// Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation for
// Efficient LLM Inference" (2024). Heads differ in how concentrated their attention is, so the
// layer's budget H b goes to the H b highest scores over all heads together; a safeguard gives
// every head at least a floor of alpha b slots first:
//
//   floor   = floor(alpha b);  each head keeps its own `floor` highest scores
//   rest    = H b - H floor slots, the highest remaining scores of all heads together
//   kept_h  = floor + (head h's share of the rest)               (ragged: heads differ)
//
// Scores must be comparable across heads: SnapKV's (attention probabilities, snapkv.hpp) are the
// paper's choice and the default here. The ragged result frees memory per head
// (layer_cache::compact keeps each head's own count). Prefill only.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"

namespace mnemo::kvcache::policies {

struct adakv {
  snapkv base{};
  double alpha = 0.2;  // per-head floor as a fraction of the average budget

  // Allocation over any scores [Hkv, L] with an average budget of `budget` slots per head.
  selection allocate(view<const float, 2> scores, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::adakv::allocate";
    detail::require(!scores.empty(), fn, ": scores [Hkv, L] must be a non-empty view");
    detail::require(alpha >= 0 && alpha <= 1, fn, ": alpha must be in [0, 1], got ", alpha);
    detail::check_budget(fn, budget);
    const std::int64_t H = scores.extent(0), L = scores.extent(1);
    const std::int64_t keep = std::min(budget, L);
    const std::int64_t floor = std::min(keep, static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(keep))));
    selection sel = top_budget(scores, floor);
    // The rest: (score, head, slot) of every slot not yet kept, best first (ties: lower head, slot).
    std::vector<std::tuple<float, std::int64_t, std::int64_t>> rest;
    for (std::int64_t h = 0; h < H; ++h) {
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      std::size_t next = 0;
      for (std::int64_t j = 0; j < L; ++j) {
        if (next < kept.size() && kept[next] == j) {
          ++next;
          continue;
        }
        rest.emplace_back(scores(h, j), h, j);
      }
    }
    const auto n_rest = static_cast<std::size_t>(std::min<std::int64_t>(H * (keep - floor), static_cast<std::int64_t>(rest.size())));
    std::partial_sort(rest.begin(), rest.begin() + static_cast<std::ptrdiff_t>(n_rest), rest.end(), [](const auto& a, const auto& b) {
      if (std::get<0>(a) != std::get<0>(b)) return std::get<0>(a) > std::get<0>(b);
      return std::make_pair(std::get<1>(a), std::get<2>(a)) < std::make_pair(std::get<1>(b), std::get<2>(b));
    });
    for (std::size_t i = 0; i < n_rest; ++i) sel.heads[static_cast<std::size_t>(std::get<1>(rest[i]))].push_back(std::get<2>(rest[i]));
    for (auto& row : sel.heads) std::sort(row.begin(), row.end());
    return sel;
  }

  // SnapKV scores (observation.attn over the last base.window queries), allocated across heads.
  selection select(const observation& o, std::int64_t budget) const {
    const obs_dims d = detail::check("kvcache::policies::adakv::select", o, false, true);
    tensor<float, 2> s({d.Hkv, d.L});
    base.scores(o, s);
    return allocate(s, budget);
  }
};

}  // namespace mnemo::kvcache::policies

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
// (layer_cache::compact keeps each head's own count).
//
// Ragged heads (decoding): allocate_rows takes one score row per head of its own length; with
// Lmax the longest, the layer keeps H min(b, Lmax) slots in all and head h's floor is
// min(floor(alpha min(b, Lmax)), length(h)) (on equal lengths this is exactly allocate).
//
// Decoding (adakv::decoder): SnapKV's decoder (a sliding window of the last w steps' attention,
// snapkv.hpp) supplies the scores, and on overflow of the layer's budget (the total over the
// heads, should_compress) the allocation runs again over the ragged heads. Per step the cost of
// snapkv::decoder; the allocation sorts the layer's slots on overflow only.
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
    detail::require(!scores.empty(), "kvcache::policies::adakv::allocate: scores [Hkv, L] must be a non-empty view");
    std::vector<std::vector<float>> rows(static_cast<std::size_t>(scores.extent(0)));
    for (std::int64_t h = 0; h < scores.extent(0); ++h) rows[static_cast<std::size_t>(h)].assign(scores.ptr(h), scores.ptr(h) + scores.extent(1));
    return allocate_rows(rows, budget);
  }

  // The same over ragged heads: scores[h] holds head h's slots (see the header).
  selection allocate_rows(const std::vector<std::vector<float>>& scores, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::adakv::allocate";
    detail::require(!scores.empty(), fn, ": scores must hold at least one head");
    detail::require(alpha >= 0 && alpha <= 1, fn, ": alpha must be in [0, 1], got ", alpha);
    detail::check_budget(fn, budget);
    const auto H = static_cast<std::int64_t>(scores.size());
    std::int64_t Lmax = 0, floors = 0;
    for (const auto& row : scores) Lmax = std::max(Lmax, static_cast<std::int64_t>(row.size()));
    const std::int64_t keep = std::min(budget, Lmax);
    const auto floor = static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(keep)));
    selection sel;
    for (const auto& row : scores) {
      sel.heads.push_back(detail::top_row(row.data(), static_cast<std::int64_t>(row.size()), floor));
      floors += static_cast<std::int64_t>(sel.heads.back().size());
    }
    // The rest: (score, head, slot) of every slot not yet kept, best first (ties: lower head, slot).
    std::vector<std::tuple<float, std::int64_t, std::int64_t>> rest;
    for (std::int64_t h = 0; h < H; ++h) {
      const auto& kept = sel.heads[static_cast<std::size_t>(h)];
      const auto& row = scores[static_cast<std::size_t>(h)];
      std::size_t next = 0;
      for (std::int64_t j = 0; j < static_cast<std::int64_t>(row.size()); ++j) {
        if (next < kept.size() && kept[next] == j) {
          ++next;
          continue;
        }
        rest.emplace_back(row[static_cast<std::size_t>(j)], h, j);
      }
    }
    const auto n_rest = static_cast<std::size_t>(std::min<std::int64_t>(H * keep - floors, static_cast<std::int64_t>(rest.size())));
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

  class decoder;  // decode-time state, below
};

// Decode-time state: snapkv::decoder's window sums, allocated across the heads on overflow.
class adakv::decoder : public snapkv::decoder {
 public:
  decoder(std::int64_t Hkv, const adakv& p) : snapkv::decoder(Hkv, p.base), p_(p) {}
  // Whether the layer holds more than Hkv * budget slots (heads may hold more than `budget` each).
  bool should_compress(std::int64_t budget) const {
    std::int64_t total = 0;
    for (std::int64_t n : lengths()) total += n;
    return total > num_heads() * budget;
  }
  // The ragged kept set of an average budget of `budget` slots per head.
  selection select(std::int64_t budget) const { return p_.allocate_rows(scores(), budget); }

 private:
  adakv p_;
};

}  // namespace mnemo::kvcache::policies

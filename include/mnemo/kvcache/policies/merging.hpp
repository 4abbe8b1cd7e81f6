// mnemo/kvcache/policies/merging.hpp — merge-on-evict over any policy (kvpress's MergingPress):
// every evicted value is blended into the kept slot with the most similar key.
//
// kvpress, MergingPress (NVIDIA/kvpress, kvpress/presses/merging_press.py; after Token Merging,
// Bolya et al. ICLR 2023, and D2O, Wan et al. 2024). A base policy decides what to keep; instead
// of dropping the rest, each evicted slot e is folded into one kept slot, per kv head:
//
//   c(x, y)  = x . y / (max(|x|, eps) max(|y|, eps))               eps = 1e-6 (a zero key: c = 0)
//   t(e)     = argmax_{t kept} c(k_e, k_t)       (ties: the lower slot),   s_e = c(k_e, k_t(e))
//   w_e      = max(s_e, 0) [s_e >= threshold] |v_e| / (|v_e| + |v_t(e)| + eps)
//   plan     folds (e -> t(e), w_e) for w_e > 0, merge_rule::mean, keys unchanged:
//
//     k'_t = k_t,     v'_t = (v_t + sum_{e : t(e) = t} w_e v_e) / (1 + sum_{e : t(e) = t} w_e)
//
// (kvpress's merge_fraction is not here: every evicted slot above the threshold merges.) The kept
// set is base.select(o, budget) unchanged; the observation needs v (the value norms).
// Cost: O(evicted x kept x D) per head beside the base policy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

// The MergingPress folds of a kept set `keep` (any policy's selection over o's slots).
inline merge_plan fold_similar(const observation& o, selection keep, float threshold = 0.0f) {
  constexpr const char* fn = "kvcache::policies::fold_similar";
  constexpr double eps = 1e-6;
  const obs_dims d = detail::check(fn, o, false, false);
  detail::require(!o.v.empty(), fn, ": observation.v [Hkv, L, Dv] (the value norms) must be a non-empty view");
  detail::require(std::isfinite(threshold) && threshold >= 0 && threshold <= 1, fn,
                  ": threshold must be in [0, 1], got ", threshold);
  validate(fn, keep, std::vector<std::int64_t>(static_cast<std::size_t>(d.Hkv), d.L));
  merge_plan p = eviction_plan(std::move(keep));
  p.rule = merge_rule::mean;
  p.keys = false;
  auto norm = [](const view<const float, 3>& x, std::int64_t h, std::int64_t j) {
    double n = 0;
    for (std::int64_t c = 0; c < x.extent(2); ++c) n += static_cast<double>(x(h, j, c)) * x(h, j, c);
    return std::sqrt(n);
  };
  std::vector<char> kept(static_cast<std::size_t>(d.L));
  for (std::int64_t h = 0; h < d.Hkv; ++h) {
    const auto& ks = p.keep.heads[static_cast<std::size_t>(h)];
    if (ks.empty()) continue;
    std::fill(kept.begin(), kept.end(), 0);
    for (std::int64_t t : ks) kept[static_cast<std::size_t>(t)] = 1;
    std::vector<double> kn(static_cast<std::size_t>(d.L));
    for (std::int64_t j = 0; j < d.L; ++j) kn[static_cast<std::size_t>(j)] = std::max(norm(o.k, h, j), eps);
    for (std::int64_t e = 0; e < d.L; ++e) {
      if (kept[static_cast<std::size_t>(e)]) continue;
      std::int64_t best = ks.front();
      double top = -std::numeric_limits<double>::infinity();
      for (std::int64_t t : ks) {
        double dot = 0;
        for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(o.k(h, e, c)) * o.k(h, t, c);
        const double s = dot / (kn[static_cast<std::size_t>(e)] * kn[static_cast<std::size_t>(t)]);
        if (s > top) top = s, best = t;
      }
      if (!(top >= threshold) || !(top > 0)) continue;
      const double ve = norm(o.v, h, e), vt = norm(o.v, h, best);
      const double w = top * ve / (ve + vt + eps);
      if (w > 0) p.folds[static_cast<std::size_t>(h)].push_back({e, best, static_cast<float>(w)});
    }
  }
  return p;
}

// MergingPress over a base policy: its kept set, with every evicted value folded as above.
template <class Base>
struct merging {
  static constexpr std::string_view name = "merging";

  Base base{};
  float threshold = 0.0f;  // minimum cosine for a merge (kvpress's similarity_threshold)

  selection select(const observation& o, std::int64_t budget) const { return base.select(o, budget); }
  merge_plan plan(const observation& o, std::int64_t budget) const {
    return fold_similar(o, base.select(o, budget), threshold);
  }
};

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/policies/cam.hpp — CaM: evicted values merged into kept ones, with a probability
// set by attention.
//
// Zhang et al., "CaM: Cache Merging for Memory-efficient LLMs Inference" (ICML 2024). Evicting a
// token removes its term a_e v_e from every later attention output; CaM instead adds the evicted
// value to kept values, so that a kept slot t with attention a_t carries a_t (v_t + (a_e / a_t) v_e)
// ~ a_t v_t + a_e v_e. The paper merges an evicted token i into the m tokens after it with a
// Bernoulli mask M ~ B(p_i), p_i = clamp(A_i / avg_{j in window} A_j, 0, 1), v_j += M v_i / m
// (A: accumulated attention; the official code and kvpress's CAMPress, where the window is the m
// kept tokens after i and the division is by the window's actual size).
//
// Here, deterministically (the expectation of the mask: the Bernoulli draw is replaced by p):
//
//   s_j      H2O's score of slot j (policies/h2o.hpp: the group mean of observation.attn, divided
//            by the number of queries that saw j when `normalize`)
//   keep     h2o{recent, normalize}.select(o, budget): the `recent` newest slots, then the highest s
//   T_e      per evicted slot e, its targets:
//              target::next     the first min(m, #) kept slots after e in slot order (the paper);
//                               none if no kept slot follows e (e is then dropped)
//              target::similar  the one kept slot t with the largest cos(k_e, k_t) (ties: the lower
//                               slot; kvpress's MergingPress target)
//   p_e      clamp(s_e / mean_{t in T_e} s_t, 0, 1)    (0 / 0 -> 0, x / 0 -> 1 for x > 0)
//   plan     folds (e -> t, weight p_e / |T_e|) for t in T_e, merge_rule::sum, keys unchanged:
//
//     k'_t = k_t,     v'_t = v_t + sum_{e : t in T_e} (p_e / |T_e|) v_e
//
// select(o, budget) is the kept set alone (H2O), so cam also serves as a plain eviction policy.
// Cost: O(L log L) for the selection, plus O(L m) (next) or O(L kept D) (similar) for the folds.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/h2o.hpp"

namespace mnemo::kvcache::policies {

struct cam {
  static constexpr std::string_view name = "cam";

  enum class target { next, similar };

  std::int64_t recent = 0;         // newest slots always kept (H2O's window)
  bool normalize = true;           // H2O's prefill normalisation of the scores
  std::int64_t merge_window = 32;  // m: kept slots after an evicted one that share its value (target::next)
  target into = target::next;

  selection select(const observation& o, std::int64_t budget) const {
    return h2o{recent, normalize}.select(o, budget);
  }

  merge_plan plan(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::cam::plan";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::require(merge_window >= 1, fn, ": merge_window must be >= 1, got ", merge_window);
    detail::check_budget(fn, budget, recent, " (recent: the recent window is always kept)");
    tensor<float, 2> s({d.Hkv, d.L});
    h2o{recent, normalize}.scores(o, s);
    merge_plan p = eviction_plan(select(o, budget));
    p.rule = merge_rule::sum;
    p.keys = false;
    std::vector<char> kept(static_cast<std::size_t>(d.L));
    std::vector<double> norm(static_cast<std::size_t>(d.L));
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      const auto& keep = p.keep.heads[static_cast<std::size_t>(h)];
      auto& folds = p.folds[static_cast<std::size_t>(h)];
      if (keep.empty()) continue;
      std::fill(kept.begin(), kept.end(), 0);
      for (std::int64_t t : keep) kept[static_cast<std::size_t>(t)] = 1;
      if (into == target::similar)
        for (std::int64_t j = 0; j < d.L; ++j) norm[static_cast<std::size_t>(j)] = key_norm(o, h, j);
      for (std::int64_t e = 0; e < d.L; ++e) {
        if (kept[static_cast<std::size_t>(e)]) continue;
        std::vector<std::int64_t> targets;
        if (into == target::next) {
          for (auto it = std::upper_bound(keep.begin(), keep.end(), e);
               it != keep.end() && static_cast<std::int64_t>(targets.size()) < merge_window; ++it)
            targets.push_back(*it);
        } else {
          targets.push_back(most_similar(o, h, e, keep, norm));
        }
        if (targets.empty()) continue;
        double mean = 0;
        for (std::int64_t t : targets) mean += s(h, t);
        mean /= static_cast<double>(targets.size());
        const double p_e = probability(s(h, e), mean);
        for (std::int64_t t : targets)
          folds.push_back({e, t, static_cast<float>(p_e / static_cast<double>(targets.size()))});
      }
    }
    return p;
  }

  // clamp(a / mean, 0, 1) with 0 / 0 -> 0 and x / 0 -> 1 (kvpress's CAMPress).
  static double probability(double a, double mean) {
    if (mean == 0) return a > 0 ? 1.0 : 0.0;
    const double r = a / mean;
    return r != r ? 0.0 : std::clamp(r, 0.0, 1.0);
  }

 private:
  static double key_norm(const observation& o, std::int64_t h, std::int64_t j) {
    double n = 0;
    for (std::int64_t c = 0; c < o.k.extent(2); ++c) n += static_cast<double>(o.k(h, j, c)) * o.k(h, j, c);
    return std::sqrt(n);
  }

  // The kept slot whose key has the largest cosine with key e (a zero key has cosine 0 with all).
  static std::int64_t most_similar(const observation& o, std::int64_t h, std::int64_t e,
                                   const std::vector<std::int64_t>& keep, const std::vector<double>& norm) {
    std::int64_t best = keep.front();
    double top = -2;
    for (std::int64_t t : keep) {
      double dot = 0;
      for (std::int64_t c = 0; c < o.k.extent(2); ++c) dot += static_cast<double>(o.k(h, e, c)) * o.k(h, t, c);
      const double den = norm[static_cast<std::size_t>(e)] * norm[static_cast<std::size_t>(t)];
      const double cs = den > 0 ? dot / den : 0.0;
      if (cs > top) top = cs, best = t;
    }
    return best;
  }
};

}  // namespace mnemo::kvcache::policies

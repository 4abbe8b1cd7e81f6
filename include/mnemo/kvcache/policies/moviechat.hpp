// mnemo/kvcache/policies/moviechat.hpp — MovieChat-style consolidation: merge the most similar
// adjacent pair of slots until the budget is met.
//
// Song et al., "MovieChat: From Dense Token to Sparse Memory for Long Video Understanding"
// (CVPR 2024). Its short-term memory is consolidated by repeatedly averaging the most similar
// adjacent pair of frame tokens (cosine similarity) until the memory has its target length. Here
// the tokens are one kv head's slots, the similarity is that of keys, and a merged slot stands for
// every token it absorbed, so pairs are averaged by the number of tokens each holds:
//
//   groups    start with one group {j} per slot, sum K_g = k_j, count n_g = 1
//   while #groups > budget:
//     (a, b) = the adjacent pair with the largest cos(K_a, K_b)  (= cos of the group means;
//              ties: the pair further left; a zero key has cosine 0 with every key)
//     a <- a u b:  mean key (n_a k_a + n_b k_b) / (n_a + n_b), same for values, n_a + n_b tokens
//
// Every group is a run of consecutive slots r..s. The plan (kvcache/merge_plan.hpp) keeps its
// first slot r with folds (j -> r, 1) for r < j <= s, merge_rule::mean, keys merged:
//
//   k'_r = (1 / (s - r + 1)) sum_{j=r}^{s} k_j,   v'_r = (1 / (s - r + 1)) sum_{j=r}^{s} v_j,
//   position of r kept
//
// Budget 0 keeps nothing. Similarities are computed in double from running sums; a priority queue
// with lazy deletion makes a head O(L D + L log L).
#pragma once

#include <cmath>
#include <cstdint>
#include <queue>
#include <string_view>
#include <tuple>
#include <vector>

#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct moviechat {
  static constexpr std::string_view name = "moviechat";

  // The kept slots (each group's first slot).
  selection select(const observation& o, std::int64_t budget) const { return plan(o, budget).keep; }

  merge_plan plan(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::moviechat::plan";
    const obs_dims d = detail::check(fn, o, false, false);
    detail::check_budget(fn, budget);
    merge_plan p;
    p.rule = merge_rule::mean;
    p.keys = true;
    p.keep.heads.resize(static_cast<std::size_t>(d.Hkv));
    p.folds.resize(static_cast<std::size_t>(d.Hkv));
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      if (budget == 0) continue;
      const std::vector<std::int64_t> end = groups(o, h, budget);  // end[r] = last slot of the group at r, -1 elsewhere
      for (std::int64_t r = 0; r < d.L; ++r) {
        if (end[static_cast<std::size_t>(r)] < 0) continue;
        p.keep.heads[static_cast<std::size_t>(h)].push_back(r);
        for (std::int64_t j = r + 1; j <= end[static_cast<std::size_t>(r)]; ++j)
          p.folds[static_cast<std::size_t>(h)].push_back({j, r, 1.0f});
      }
    }
    return p;
  }

 private:
  // The greedy merge of one head down to `budget` >= 1 groups.
  static std::vector<std::int64_t> groups(const observation& o, std::int64_t h, std::int64_t budget) {
    const std::int64_t L = o.k.extent(1), D = o.k.extent(2);
    std::vector<double> sum(static_cast<std::size_t>(L * D));
    for (std::int64_t j = 0; j < L; ++j)
      for (std::int64_t c = 0; c < D; ++c) sum[static_cast<std::size_t>(j * D + c)] = o.k(h, j, c);
    // Groups are identified by their first slot; next/prev link the live ones.
    std::vector<std::int64_t> end(static_cast<std::size_t>(L)), next(static_cast<std::size_t>(L)),
        prev(static_cast<std::size_t>(L)), version(static_cast<std::size_t>(L), 0);
    for (std::int64_t j = 0; j < L; ++j) {
      end[static_cast<std::size_t>(j)] = j;
      next[static_cast<std::size_t>(j)] = j + 1 < L ? j + 1 : -1;
      prev[static_cast<std::size_t>(j)] = j - 1;
    }
    auto cosine = [&](std::int64_t a, std::int64_t b) {
      double dot = 0, na = 0, nb = 0;
      for (std::int64_t c = 0; c < D; ++c) {
        const double x = sum[static_cast<std::size_t>(a * D + c)], y = sum[static_cast<std::size_t>(b * D + c)];
        dot += x * y, na += x * x, nb += y * y;
      }
      const double cs = na > 0 && nb > 0 ? dot / std::sqrt(na * nb) : 0.0;
      return cs == cs ? cs : -3.0;  // NaN ranks last
    };
    // (similarity, -left, version of left, version of right): the largest similarity first, then the left-most.
    using entry = std::tuple<double, std::int64_t, std::int64_t, std::int64_t>;
    std::priority_queue<entry> queue;
    auto push = [&](std::int64_t a) {
      const std::int64_t b = next[static_cast<std::size_t>(a)];
      if (b >= 0) queue.emplace(cosine(a, b), -a, version[static_cast<std::size_t>(a)], version[static_cast<std::size_t>(b)]);
    };
    for (std::int64_t j = 0; j + 1 < L; ++j) push(j);
    for (std::int64_t live = L; live > budget && !queue.empty();) {
      const auto [sim, neg_a, va, vb] = queue.top();
      queue.pop();
      const std::int64_t a = -neg_a, b = next[static_cast<std::size_t>(a)];
      if (b < 0 || version[static_cast<std::size_t>(a)] != va || version[static_cast<std::size_t>(b)] != vb) continue;
      for (std::int64_t c = 0; c < D; ++c) sum[static_cast<std::size_t>(a * D + c)] += sum[static_cast<std::size_t>(b * D + c)];
      end[static_cast<std::size_t>(a)] = end[static_cast<std::size_t>(b)];
      end[static_cast<std::size_t>(b)] = -1;
      next[static_cast<std::size_t>(a)] = next[static_cast<std::size_t>(b)];
      if (next[static_cast<std::size_t>(b)] >= 0) prev[static_cast<std::size_t>(next[static_cast<std::size_t>(b)])] = a;
      ++version[static_cast<std::size_t>(a)];
      ++version[static_cast<std::size_t>(b)];
      --live;
      push(a);
      if (prev[static_cast<std::size_t>(a)] >= 0) push(prev[static_cast<std::size_t>(a)]);
    }
    return end;
  }
};

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/merge_plan.hpp — what a merging KV policy returns: the kept slots, and how every
// evicted slot folds into kept ones; its checks and its reference semantics on f32 K/V.
//
// The exact rule (kvcache/merge.hpp applies it to a layer_cache in every storage kind): with x the
// key or value rows of kv head h before the merge, kept slot t (in plan.keep.heads[h]) becomes
//
//   S_t = a_t x_t + sum_{folds (e, t, w) of head h} w x_e,     W_t = a_t + sum_{same folds} w
//   merge_rule::sum    x'_t = S_t
//   merge_rule::mean   x'_t = S_t / W_t
//
// a_t = plan.self[h][i] for the i-th kept slot (1 when plan.self is empty). Values always follow
// the rule; keys only when plan.keys (else x'_t = x_t for keys). The merged slot keeps slot t's
// position. Policies do not depend on the cache: they include this header only (as selection.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::kvcache {

// One evicted slot handing part of itself to a kept slot.
struct fold {
  std::int64_t from = 0;  // an evicted slot of the head (not in plan.keep.heads[h])
  std::int64_t into = 0;  // a kept slot of the head (in plan.keep.heads[h])
  float weight = 0;       // w >= 0, finite
};

enum class merge_rule { sum, mean };

inline const char* merge_rule_name(merge_rule r) { return r == merge_rule::sum ? "sum" : "mean"; }

struct merge_plan {
  selection keep;                          // [Hkv][kept_h], ascending: what the cache keeps
  std::vector<std::vector<fold>> folds;    // [Hkv][*], any order
  std::vector<std::vector<float>> self;    // [Hkv][kept_h] own weights a_t, or empty: all 1
  merge_rule rule = merge_rule::mean;
  bool keys = false;                       // merge keys by the same rule (false: kept keys unchanged)

  std::int64_t num_heads() const { return keep.num_heads(); }
  std::int64_t num_folds() const {
    std::int64_t n = 0;
    for (const auto& f : folds) n += static_cast<std::int64_t>(f.size());
    return n;
  }
};

// A plan that only keeps `sel` (no fold): plain eviction.
inline merge_plan eviction_plan(selection sel) {
  merge_plan p;
  p.folds.resize(sel.heads.size());
  p.keep = std::move(sel);
  return p;
}

// Throws mnemo::error unless `plan` fits heads of the given lengths (see the header for the rules).
inline void validate(const char* fn, const merge_plan& plan, const std::vector<std::int64_t>& length) {
  using detail::require;
  validate(fn, plan.keep, length);
  const auto H = static_cast<std::int64_t>(length.size());
  require(static_cast<std::int64_t>(plan.folds.size()) == H, fn,
          ": plan.folds.size() must equal the number of kv heads: expected ", H, ", got ", plan.folds.size());
  require(plan.self.empty() || static_cast<std::int64_t>(plan.self.size()) == H, fn,
          ": plan.self.size() must be 0 or the number of kv heads: expected ", H, ", got ", plan.self.size());
  std::vector<std::int64_t> kept_index;
  std::vector<double> total;
  for (std::size_t h = 0; h < length.size(); ++h) {
    const auto& keep = plan.keep.heads[h];
    kept_index.assign(static_cast<std::size_t>(length[h]), -1);
    for (std::size_t i = 0; i < keep.size(); ++i) kept_index[static_cast<std::size_t>(keep[i])] = static_cast<std::int64_t>(i);
    total.assign(keep.size(), 1.0);
    if (!plan.self.empty()) {
      const auto& a = plan.self[h];
      require(a.size() == keep.size(), fn, ": plan.self[", h, "] must have one weight per kept slot: expected ",
              keep.size(), ", got ", a.size());
      for (std::size_t i = 0; i < a.size(); ++i) {
        require(std::isfinite(a[i]) && a[i] >= 0, fn, ": plan.self[", h, "][", i, "] must be finite and >= 0, got ", a[i]);
        total[i] = a[i];
      }
    }
    const auto& folds = plan.folds[h];
    for (std::size_t i = 0; i < folds.size(); ++i) {
      const fold& f = folds[i];
      require(f.from >= 0 && f.from < length[h], fn, ": plan.folds[", h, "][", i, "].from must be in [0, ", length[h],
              "), got ", f.from);
      require(f.into >= 0 && f.into < length[h], fn, ": plan.folds[", h, "][", i, "].into must be in [0, ", length[h],
              "), got ", f.into);
      require(kept_index[static_cast<std::size_t>(f.from)] < 0, fn, ": plan.folds[", h, "][", i,
              "].from must be an evicted slot (not in plan.keep.heads[", h, "]), got ", f.from, ", which is kept");
      require(kept_index[static_cast<std::size_t>(f.into)] >= 0, fn, ": plan.folds[", h, "][", i,
              "].into must be a kept slot (in plan.keep.heads[", h, "]), got ", f.into, ", which is evicted");
      require(std::isfinite(f.weight) && f.weight >= 0, fn, ": plan.folds[", h, "][", i,
              "].weight must be finite and >= 0, got ", f.weight);
      total[static_cast<std::size_t>(kept_index[static_cast<std::size_t>(f.into)])] += f.weight;
    }
    if (plan.rule == merge_rule::mean)
      for (std::size_t i = 0; i < keep.size(); ++i)
        require(total[i] > 0, fn, ": kept slot ", keep[i], " of kv head ", h,
                " has total weight a_t + sum of its folds' weights = 0 under merge_rule::mean: expected > 0, got ",
                total[i]);
  }
}

namespace plan_detail {

// The terms of every kept slot of head h that changes (see the header): its old slot, its new
// index after compaction, its weighted sources (the slot itself first, then its folds in plan
// order) and W_t. A kept slot changes iff it receives a fold, or rule::sum and a_t != 1.
struct head_terms {
  std::vector<std::int64_t> changed, changed_new;
  std::vector<std::vector<std::pair<std::int64_t, double>>> sources;
  std::vector<double> total;
};

inline head_terms terms(const merge_plan& p, std::int64_t h, std::int64_t length) {
  const auto& keep = p.keep.heads[static_cast<std::size_t>(h)];
  std::vector<std::int64_t> kept_index(static_cast<std::size_t>(length), -1);
  for (std::size_t i = 0; i < keep.size(); ++i) kept_index[static_cast<std::size_t>(keep[i])] = static_cast<std::int64_t>(i);
  std::vector<std::vector<std::pair<std::int64_t, double>>> src(keep.size());
  for (std::size_t i = 0; i < keep.size(); ++i)
    src[i].emplace_back(keep[i], p.self.empty() ? 1.0 : static_cast<double>(p.self[static_cast<std::size_t>(h)][i]));
  for (const fold& f : p.folds[static_cast<std::size_t>(h)])
    src[static_cast<std::size_t>(kept_index[static_cast<std::size_t>(f.into)])].emplace_back(f.from, f.weight);
  head_terms t;
  for (std::size_t i = 0; i < keep.size(); ++i) {
    const bool changes = src[i].size() > 1 || (p.rule == merge_rule::sum && src[i][0].second != 1.0);
    if (!changes) continue;
    double w = 0;
    for (const auto& s : src[i]) w += s.second;
    t.changed.push_back(keep[i]);
    t.changed_new.push_back(static_cast<std::int64_t>(i));
    t.sources.push_back(std::move(src[i]));
    t.total.push_back(w);
  }
  return t;
}

}  // namespace plan_detail

namespace reference {

// The merged keys and values of every head: [Hkv, max kept, D] and [Hkv, max kept, Dv], row i of
// head h the i-th kept slot after the merge, rows past kept(h) zero.
struct merged_kv {
  tensor<float, 3> k, v;
};

// The plan applied to f32 K/V, k [Hkv, L, D] and v [Hkv, L, Dv] (every head L slots), in double:
// the header's equations as written.
inline merged_kv merge(const merge_plan& plan, view<const float, 3> k, view<const float, 3> v) {
  constexpr const char* fn = "kvcache::reference::merge";
  detail::require_data(fn, "k", k, " [Hkv, L, D]");
  detail::require_data(fn, "v", v, " [Hkv, L, Dv]");
  const std::int64_t H = k.extent(0), L = k.extent(1), D = k.extent(2), Dv = v.extent(2);
  detail::require_shape(fn, "v", v, {H, L, Dv}, " [Hkv, L, Dv] (Hkv, L from k)");
  validate(fn, plan, std::vector<std::int64_t>(static_cast<std::size_t>(H), L));
  std::int64_t kept = 0;
  for (const auto& row : plan.keep.heads) kept = std::max(kept, static_cast<std::int64_t>(row.size()));
  merged_kv out{tensor<float, 3>({H, kept, D}), tensor<float, 3>({H, kept, Dv})};
  std::fill(out.k.begin(), out.k.end(), 0.0f);
  std::fill(out.v.begin(), out.v.end(), 0.0f);
  for (std::int64_t h = 0; h < H; ++h) {
    const auto& keep = plan.keep.heads[static_cast<std::size_t>(h)];
    for (std::size_t i = 0; i < keep.size(); ++i) {
      const std::int64_t t = keep[i];
      const double a = plan.self.empty() ? 1.0 : plan.self[static_cast<std::size_t>(h)][i];
      for (int which = 0; which < 2; ++which) {
        const view<const float, 3>& x = which ? v : k;
        float* y = which ? &out.v(h, static_cast<std::int64_t>(i), 0) : &out.k(h, static_cast<std::int64_t>(i), 0);
        const std::int64_t W = x.extent(2);
        if (!which && !plan.keys) {
          for (std::int64_t e = 0; e < W; ++e) y[e] = x(h, t, e);
          continue;
        }
        for (std::int64_t e = 0; e < W; ++e) {
          double s = a * x(h, t, e), w = a;
          for (const fold& f : plan.folds[static_cast<std::size_t>(h)])
            if (f.into == t) s += f.weight * static_cast<double>(x(h, f.from, e)), w += f.weight;
          y[e] = static_cast<float>(plan.rule == merge_rule::mean ? s / w : s);
        }
      }
    }
  }
  return out;
}

}  // namespace reference

}  // namespace mnemo::kvcache

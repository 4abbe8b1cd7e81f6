// mnemo/kvcache/merge.hpp — merged tokens: a plan that folds evicted slots into kept ones, its
// reference semantics on f32 K/V, and its application to a layer_cache in every storage kind.
//
// Merging methods (kvcache/policies/cam.hpp, dmc.hpp, moviechat.hpp) do not only decide what to
// keep (DESIGN.md, "KV cache and policies"): every evicted slot may hand its key and/or value to
// kept slots. A merge_plan says exactly how, per kv head h:
//
//   keep.heads[h]   the kept slots, ascending (a kvcache::selection: the cache's compaction)
//   folds[h]        (from e, into t, weight w): evicted slot e adds w x_e to kept slot t (an evicted
//                   slot may fold into several kept slots, a kept slot may receive many folds)
//   self[h][i]      a_t, the own weight of the i-th kept slot t (empty: every a_t = 1)
//
// With x the key or the value rows of the head before the merge, kept slot t becomes
//
//   S_t = a_t x_t + sum_{folds (e, t, w)} w x_e,      W_t = a_t + sum_{folds (e, t, w)} w
//   rule::sum    x'_t = S_t                      (CaM: values gain the evicted values)
//   rule::mean   x'_t = S_t / W_t                (a weighted mean: DMC, MovieChat, MergingPress)
//
// Values are always merged; keys only when plan.keys is true (else every kept key is unchanged,
// which keeps its RoPE rotation exact). A merged slot keeps the position and the rotary position of
// its kept slot t (positions(h), rotary_positions(h)); the folded slots' positions are gone.
// A kept slot without folds is unchanged (under rule::sum only if a_t = 1: else x'_t = a_t x_t).
//
// Storage. kvcache::merge(cache, plan) reads the involved slots as f32 (dequantized: gather),
// combines them in double, compacts the cache to plan.keep, and writes the merged rows back with
// layer_cache::set_slots: f16 / bf16 round the merged row; int8 / int4 / int2 requantize a merged
// value row with its own per-token groups and every key group holding a merged key over its slots
// (one more rounding of at most half a step for that group's other keys); a Hadamard-rotating cache
// (cache_config::rotate) merges in the original space and stores the merged rows rotated. So a
// merged cache reads back the f32 reference merge of what the cache held, within one rounding of
// its kind; against the merge of the original f32 tokens add the kind's error on the inputs.
// Decoding (kvcache::decode) reads a merged cache like any other.
//
// Errors: validate(fn, plan, lengths) throws mnemo::error naming the argument, what was expected and
// what it got (wrong head count, a fold from a kept slot, into an evicted one, a negative or
// non-finite weight, a mean with zero total weight); kvcache::merge checks everything (including
// that quantized kinds can store the merged rows) before changing the cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/merge_plan.hpp"

namespace mnemo::kvcache {

namespace merge_detail {

// The merged rows of one head of a cache: the kept slots that change (old slot indices, ascending),
// their new indices after compaction, and their merged keys [n, D] (if plan.keys) and values [n, Dv].
struct head_update {
  std::vector<std::int64_t> slots;
  tensor<float, 2> k, v;
};

template <class Arch>
head_update merged_head(const layer_cache& c, const merge_plan& p, std::int64_t h) {
  const plan_detail::head_terms t = plan_detail::terms(p, h, c.length(h));
  head_update u;
  u.slots = t.changed_new;
  const auto n = static_cast<std::int64_t>(t.changed.size());
  const std::int64_t D = c.head_dim(), Dv = c.value_dim();
  if (n == 0) return u;
  // Read every slot the changed rows draw from once (ascending, unique).
  std::vector<std::int64_t> src;
  for (std::size_t i = 0; i < t.changed.size(); ++i)
    for (const auto& [slot, w] : t.sources[i]) src.push_back(slot);
  std::sort(src.begin(), src.end());
  src.erase(std::unique(src.begin(), src.end()), src.end());
  const auto m = static_cast<std::int64_t>(src.size());
  tensor<float, 2> k({m, D}), v({m, Dv});
  c.gather<Arch>(h, src, k, v);
  auto row_of = [&](std::int64_t slot) {
    return static_cast<std::int64_t>(std::lower_bound(src.begin(), src.end(), slot) - src.begin());
  };
  if (p.keys) u.k = tensor<float, 2>({n, D});
  u.v = tensor<float, 2>({n, Dv});
  std::vector<double> acc(static_cast<std::size_t>(std::max(D, Dv)));
  for (std::int64_t i = 0; i < n; ++i) {
    const auto& s = t.sources[static_cast<std::size_t>(i)];
    const double norm = p.rule == merge_rule::mean ? t.total[static_cast<std::size_t>(i)] : 1.0;
    for (int which = p.keys ? 0 : 1; which < 2; ++which) {
      const tensor<float, 2>& x = which ? v : k;
      const std::int64_t W = which ? Dv : D;
      std::fill_n(acc.begin(), W, 0.0);
      for (const auto& [slot, w] : s) {
        const float* r = x.as_view().ptr(row_of(slot));
        for (std::int64_t e = 0; e < W; ++e) acc[static_cast<std::size_t>(e)] += w * static_cast<double>(r[e]);
      }
      float* out = which ? u.v.as_view().ptr(i) : u.k.as_view().ptr(i);
      for (std::int64_t e = 0; e < W; ++e) out[e] = static_cast<float>(acc[static_cast<std::size_t>(e)] / norm);
    }
  }
  return u;
}

// Throws unless the cache can store head h's merged rows: finite with |x| <= quant::max_magnitude
// in the quantized kinds (the dense kinds store any float).
inline void check_storable(const char* fn, const layer_cache& c, const merge_plan& plan, std::int64_t h,
                           const head_update& u) {
  if (!is_quantized(c.kind())) return;
  const auto& keep = plan.keep.heads[static_cast<std::size_t>(h)];
  for (int which = plan.keys ? 0 : 1; which < 2; ++which) {
    const tensor<float, 2>& x = which ? u.v : u.k;
    for (std::size_t i = 0; i < u.slots.size(); ++i)
      for (std::int64_t e = 0; e < x.extent(1); ++e)
        detail::require(quant::quantizable(x(static_cast<std::int64_t>(i), e)), fn, ": the merged ",
                        which ? "value" : "key", " of kv head ", h, ", kept slot ",
                        keep[static_cast<std::size_t>(u.slots[i])], " must be finite with |x| <= ",
                        quant::max_magnitude, " for ", storage_name(c.kind()), " storage, got ",
                        x(static_cast<std::int64_t>(i), e), " at channel ", e);
  }
}

}  // namespace merge_detail

// Applies `plan` to the cache: merged rows computed from the cache's own (dequantized) slots, the
// cache compacted to plan.keep, the merged rows written back in the cache's storage kind (see the
// header). Throws mnemo::error before changing anything if the plan does not fit the cache or a
// quantized cache cannot store a merged row (non-finite or |x| > quant::max_magnitude).
template <class Arch = simd::default_arch>
void merge(layer_cache& c, const merge_plan& plan) {
  constexpr const char* fn = "kvcache::merge";
  validate(fn, plan, c.lengths());
  std::vector<merge_detail::head_update> updates;
  updates.reserve(static_cast<std::size_t>(c.num_heads()));
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    updates.push_back(merge_detail::merged_head<Arch>(c, plan, h));
    merge_detail::check_storable(fn, c, plan, h, updates.back());
  }
  c.compact(plan.keep);
  for (std::int64_t h = 0; h < c.num_heads(); ++h) {
    const merge_detail::head_update& u = updates[static_cast<std::size_t>(h)];
    if (u.slots.empty()) continue;
    c.set_slots<Arch>(h, u.slots, plan.keys ? view<const float, 2>(u.k) : view<const float, 2>{}, u.v);
  }
}

}  // namespace mnemo::kvcache

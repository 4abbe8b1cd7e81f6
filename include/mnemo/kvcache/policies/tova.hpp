// mnemo/kvcache/policies/tova.hpp — TOVA: keep what the current query attends to most.
//
// Oren et al., "Transformers are Multi-State RNNs" (2024), Token Omission Via Attention: when the
// cache is full, drop the token with the lowest attention from the current (last) query,
// averaged over the heads of the layer:
//
//   s_j = mean over all Hq query heads of p_h,j      (the same score for every kv head)
//
// prefill: the last query's probabilities (column_sums with rows = 1), its own key dropped and
// given max + 1 so it is always kept (kvpress's TOVAPress); decoding: the step's probabilities
// replace the scores (no accumulation), so the kept set is the same for every head.
// Per step: one pass over the slots (O(L Hq) adds). Golden: kv_tova.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct tova {
  // scores [Hkv, L] from observation.attn [Hq, L] (the last query's probabilities).
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::tova::scores";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_scores(fn, out, d.Hkv, d.L);
    float top = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j + 1 < d.L; ++j) {
      double acc = 0;
      for (std::int64_t h = 0; h < d.Hq; ++h) acc += o.attn(h, j);
      const float s = static_cast<float>(acc / static_cast<double>(d.Hq));
      for (std::int64_t hk = 0; hk < d.Hkv; ++hk) out(hk, j) = s;
      top = std::max(top, s);
    }
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) out(hk, d.L - 1) = d.L > 1 ? top + 1.0f : 1.0f;
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::tova::select";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

  // Decode-time state: the current step's head-mean probability of every slot.
  class decoder : public scored_slots {
   public:
    explicit decoder(std::int64_t Hkv) : scored_slots(Hkv) {}
    void append(std::int64_t h) { mutable_scores(h).push_back(0.0f); }
    // probs [Hq, L]: every kv head must hold the same L slots (TOVA keeps one set for all heads).
    void observe(view<const float, 2> probs) {
      constexpr const char* fn = "kvcache::policies::tova::decoder::observe";
      const std::int64_t L = length(0);
      for (std::int64_t h = 1; h < num_heads(); ++h)
        detail::require(length(h) == L, fn, ": every kv head must hold the same number of slots, head 0 has ", L,
                        ", head ", h, " has ", length(h));
      // Checked before any score changes: a rejected call leaves the tracker as it was (the old
      // order zeroed the scores first; fuzz/trackers_fuzz.cpp found it).
      detail::check_step_probs(fn, probs, num_heads(), [this](std::int64_t h) { return length(h); });
      std::fill(mutable_scores(0).begin(), mutable_scores(0).end(), 0.0f);
      const float inv = 1.0f / static_cast<float>(probs.extent(0));
      for_each_head(fn, probs, [&](std::int64_t, const float* p, std::int64_t n) {
        float* s = mutable_scores(0).data();
        for (std::int64_t j = 0; j < n; ++j) s[j] += inv * p[j];
      });
      for (std::int64_t h = 1; h < num_heads(); ++h) mutable_scores(h) = mutable_scores(0);
    }
  };
};

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/policies/snapkv.hpp — SnapKV: what the last queries of the prompt attend to.
//
// Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (2024). The last w
// queries of the prompt (the observation window) already attend to what generation will need:
//
//   P      = softmax over all L keys of the last w queries (causal among themselves)    [Hq, w, L]
//   a_j    = (1/w) sum_i P[i, j]              for j < L - w (the window's own keys are dropped)
//   a'_j   = (1/k) sum_{t=-k/2}^{k/2} a_{j+t}   1-D average pool, zero padding, stride 1, kernel k
//   s_hk,j = mean over the query heads of kv group hk of a'_j
//   s_j    = max(s over all heads and j < L - w) + 1      for the w window slots (always kept)
//
// The column sums of P over the window come from the prefill's attention pass itself:
// attention::flash(..., mods::causal{}, opt, attention::column_sums{sums, w}) -> observation.attn.
// Prefill only (decoding: pair it with streaming_llm or h2o, examples/20_kv_budget_decode.cpp).
// Golden: kv_snapkv, kv_snapkv_b2_gqa4 (kvpress's SnapKVPress; the window fill is the max over the
// whole score tensor + 1, which for a batch means over every batch element: the golden runner
// applies that across the batch).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct snapkv {
  std::int64_t window = 32;      // w: observation window (the last w queries)
  std::int64_t kernel_size = 5;  // k: average pool width (odd)

  // scores [Hkv, L] from observation.attn [Hq, L] (column sums over the last `window` queries).
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::snapkv::scores";
    const obs_dims d = detail::check(fn, o, false, true);
    check(fn, d);
    detail::check_scores(fn, out, d.Hkv, d.L);
    const std::int64_t n = d.L - window, G = d.group(), half = kernel_size / 2;
    float top = -std::numeric_limits<float>::infinity();
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t t = j - half; t <= j + half; ++t)
            if (t >= 0 && t < n) acc += o.attn(hk * G + g, t);
        out(hk, j) = static_cast<float>(acc / static_cast<double>(window * kernel_size * G));
        top = std::max(top, out(hk, j));
      }
    const float fill = n > 0 ? top + 1.0f : 1.0f;
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = n; j < d.L; ++j) out(hk, j) = fill;
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::snapkv::select";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

 private:
  void check(const char* fn, const obs_dims& d) const {
    detail::require(window >= 1 && window <= d.L, fn, ": window must be in [1, L = ", d.L, "], got ", window);
    detail::require(kernel_size >= 1 && kernel_size % 2 == 1, fn, ": kernel_size must be odd and >= 1, got ",
                    kernel_size);
  }
};

}  // namespace mnemo::kvcache::policies

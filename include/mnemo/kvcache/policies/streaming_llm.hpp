// mnemo/kvcache/policies/streaming_llm.hpp — attention sinks + a recent window.
//
// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR
// 2024): the first few tokens absorb attention mass whatever their content ("sinks"), so keeping
// them plus a window of the most recent tokens keeps the softmax's normaliser stable:
//
//   score_j = 1  if j < n_sink or j >= L - (budget - n_sink),  else 0
//   kept    = { j : score_j = 1 }                                   (n_sink + window slots)
//
// Content-free: the decision needs only the slot count (keys are read for their shape only).
// Decoding: O(1) per step (no state), and on overflow the kept set is again sinks + window.
// Golden: kv_streaming_llm (kvpress's StreamingLLMPress).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct streaming_llm {
  std::int64_t n_sink = 4;

  // scores [Hkv, L]: 1 for a sink or a window slot, 0 otherwise; window = budget - n_sink.
  void scores(const observation& o, std::int64_t budget, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::streaming_llm::scores";
    const obs_dims d = detail::check(fn, o, false, false);
    check(fn, budget);
    detail::check_scores(fn, out, d.Hkv, d.L);
    const std::int64_t window = budget - n_sink;
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = 0; j < d.L; ++j) out(h, j) = j < n_sink || j >= d.L - window ? 1.0f : 0.0f;
  }

  selection select(const observation& o, std::int64_t budget) const {
    const obs_dims d = detail::check("kvcache::policies::streaming_llm::select", o, false, false);
    return keep(std::vector<std::int64_t>(static_cast<std::size_t>(d.Hkv), d.L), budget);
  }

  // The same rule on ragged head lengths (decoding): head h keeps its first n_sink slots and its
  // last budget - n_sink slots; a head with <= budget slots keeps everything.
  selection keep(const std::vector<std::int64_t>& lengths, std::int64_t budget) const {
    check("kvcache::policies::streaming_llm::keep", budget);
    selection sel;
    for (std::int64_t L : lengths) {
      std::vector<std::int64_t> row;
      if (L <= budget) {
        for (std::int64_t j = 0; j < L; ++j) row.push_back(j);
      } else {
        for (std::int64_t j = 0; j < n_sink; ++j) row.push_back(j);
        for (std::int64_t j = L - (budget - n_sink); j < L; ++j) row.push_back(j);
      }
      sel.heads.push_back(std::move(row));
    }
    return sel;
  }

 private:
  void check(const char* fn, std::int64_t budget) const {
    detail::require(n_sink >= 0, fn, ": n_sink must be >= 0, got ", n_sink);
    detail::check_budget(fn, budget, n_sink, " (n_sink: the sinks are always kept)");
  }
};

}  // namespace mnemo::kvcache::policies

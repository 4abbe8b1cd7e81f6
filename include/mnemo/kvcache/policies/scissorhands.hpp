// mnemo/kvcache/policies/scissorhands.hpp — Scissorhands: persistence of importance.
//
// Liu et al., "Scissorhands: Exploiting the Persistence of Importance Hypothesis for LLM KV
// Cache Compression at Test Time" (NeurIPS 2023). A token that mattered to past queries keeps
// mattering, so count, over a history of queries, how often each token was unimportant (its
// probability below the uniform 1/n of the n slots the query saw) and drop the most often
// unimportant ones, never the recent window:
//
//   low_j = #{ i in history : p_i,j < 1 / n_i }      (summed over the query heads of the group)
//   s_j   = -low_j,       kept = the `recent` newest slots, then the highest s_j
//
// prefill: the history is the observation window, observation.q [Hq, Lw, D] (each row needs its
//          own threshold, so the per-row probabilities are recomputed from q and k: O(Lw L D)
//          for a window of Lw rows, a few decode steps' worth). observation.causal: row i is
//          position L - Lw + i and saw keys [0, L - Lw + i] (n_i = L - Lw + i + 1); false (an
//          encoder, or held-out queries after the context): every row saw all n_i = L keys.
// decoding: each step's probabilities (attention::column_sums, rows = 1) add one count per slot
//          and query head below 1/n: one pass over the slots, O(L Hq).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct scissorhands {
  std::int64_t recent = 0;  // newest slots always kept
  float scale = 0;          // logit scale; 0: 1 / sqrt(D)

  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::scissorhands::scores";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::check_scores(fn, out, d.Hkv, d.L);
    const double sc = scale != 0 ? scale : 1.0 / std::sqrt(static_cast<double>(d.D));
    std::vector<double> s(static_cast<std::size_t>(d.L));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      for (std::int64_t j = 0; j < d.L; ++j) out(hk, j) = 0.0f;
      for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h)
        for (std::int64_t i = 0; i < d.Lw; ++i) {
          const std::int64_t n = o.causal ? d.L - d.Lw + i + 1 : d.L;  // row i saw keys [0, n)
          double m = -std::numeric_limits<double>::infinity(), sum = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            double dot = 0;
            for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(o.q(h, i, c)) * o.k(hk, j, c);
            s[static_cast<std::size_t>(j)] = sc * dot;
            m = std::max(m, sc * dot);
          }
          for (std::int64_t j = 0; j < n; ++j) sum += std::exp(s[static_cast<std::size_t>(j)] - m);
          for (std::int64_t j = 0; j < n; ++j)
            if (std::exp(s[static_cast<std::size_t>(j)] - m) / sum < 1.0 / static_cast<double>(n)) out(hk, j) -= 1.0f;
        }
    }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::scissorhands::select";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::check_budget(fn, budget, recent, " (recent: the recent window is always kept)");
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < d.Hkv; ++h) sel.heads.push_back(detail::top_row_forced(s.as_view().ptr(h), d.L, budget, 0, recent, scratch));
    return sel;
  }

  // Decode-time state: minus the number of steps each slot was unimportant.
  class decoder : public scored_slots {
   public:
    explicit decoder(std::int64_t Hkv, std::int64_t recent = 0) : scored_slots(Hkv), recent_(recent) {}
    void append(std::int64_t h, float initial = 0.0f) { mutable_scores(h).push_back(initial); }
    // probs [Hq, >= max length]: this step's probabilities of every query head.
    void observe(view<const float, 2> probs) {
      constexpr const char* fn = "kvcache::policies::scissorhands::decoder::observe";
      const std::int64_t G =
          detail::check_step_probs(fn, probs, num_heads(), [this](std::int64_t h) { return length(h); });
      for (std::int64_t h = 0; h < num_heads(); ++h) {
        const std::int64_t n = length(h);
        if (n == 0) continue;
        const float uniform = 1.0f / static_cast<float>(n);
        float* __restrict s = mutable_scores(h).data();
        for (std::int64_t g = 0; g < G; ++g) {
          const float* __restrict p = probs.ptr(h * G + g, 0);
          for (std::int64_t j = 0; j < n; ++j) {  // d, then s - d: GCC vectorizes this form (not s -= cond)
            const float d = p[j] < uniform ? 1.0f : 0.0f;
            s[j] = s[j] - d;
          }
        }
      }
    }
    selection select(std::int64_t budget) const { return scored_slots::select(budget, 0, recent_); }

   private:
    std::int64_t recent_;
  };
};

}  // namespace mnemo::kvcache::policies

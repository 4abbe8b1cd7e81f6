// mnemo/kvcache/policies/h2o.hpp — H2O: heavy hitters (accumulated attention) + recent tokens.
//
// Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
// Models" (NeurIPS 2023). A few tokens collect most of the attention over time; keep them and a
// window of recent tokens:
//
//   prefill   s_j = (sum_i P[i, j]) / n_j,  n_j = the number of observed rows that saw key j,
//             averaged over the query heads of each kv group (kvpress's ObservedAttentionPress)
//
// The rows behind observation.attn are the last `rows` positions (0: all L, H2O's prefill with
// attention::column_sums rows = 0). observation.causal says what they saw: causal, row i of them
// saw keys [0, L - rows + i], so n_j = min(rows, L - j) (all rows: L - j, the golden case's rule);
// non-causal (an encoder, or held-out queries after the context), every row saw every key, n_j =
// rows. normalize = false skips the division (the raw accumulated attention).
//   decoding  s_j += sum_{h in group} p_h,j   every step (the accumulated attention)
//   kept      the `recent` newest slots, then the highest s_j up to the budget
//
// The attention sums come from the attention pass: prefill attention::flash with
// column_sums{sums, 0} (all rows), each decode step attention::decode with column_sums{sums, 1}.
// Per step: one add per slot and query head, O(L Hq) beside the kernel's O(L Hkv (D + Dv)) reads.
// Golden: kv_observed_attention.
#pragma once

#include <algorithm>
#include <cstdint>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct h2o {
  std::int64_t recent = 0;  // newest slots always kept
  bool normalize = true;    // prefill: divide by the number of rows that saw each key
  std::int64_t rows = 0;    // the number of (last) query rows behind observation.attn; 0: all L

  // scores [Hkv, L] from observation.attn [Hq, L], the column sums over the observed rows.
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::h2o::scores";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_scores(fn, out, d.Hkv, d.L);
    detail::require(rows >= 0 && rows <= d.L, fn, ": rows (the query rows behind observation.attn) must be in [0, L = ",
                    d.L, "], got ", rows);
    const std::int64_t G = d.group(), n = rows == 0 ? d.L : rows;
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = 0; j < d.L; ++j) {
        double acc = 0;
        for (std::int64_t g = 0; g < G; ++g) acc += o.attn(hk * G + g, j);
        const double seen = !normalize ? 1.0 : static_cast<double>(o.causal ? std::min(n, d.L - j) : n);
        out(hk, j) = static_cast<float>(acc / seen / static_cast<double>(G));
      }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::h2o::select";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget, recent, " (recent: the recent window is always kept)");
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      sel.heads.push_back(detail::top_row_forced(s.as_view().ptr(h), d.L, budget, 0, recent, scratch));
    return sel;
  }

  // Decode-time state: the accumulated attention of every slot.
  class decoder : public scored_slots {
   public:
    explicit decoder(std::int64_t Hkv, std::int64_t recent = 0) : scored_slots(Hkv), recent_(recent) {}
    // A new slot, with an initial score (0, or its prefill score).
    void append(std::int64_t h, float initial = 0.0f) { mutable_scores(h).push_back(initial); }
    // This step's probabilities, probs [Hq, >= max length] (attention::column_sums, rows = 1).
    void observe(view<const float, 2> probs) {
      for_each_head("kvcache::policies::h2o::decoder::observe", probs, [&](std::int64_t h, const float* p, std::int64_t n) {
        float* s = mutable_scores(h).data();
        for (std::int64_t j = 0; j < n; ++j) s[j] += p[j];
      });
    }
    selection select(std::int64_t budget) const { return scored_slots::select(budget, 0, recent_); }

   private:
    std::int64_t recent_;
  };
};

}  // namespace mnemo::kvcache::policies

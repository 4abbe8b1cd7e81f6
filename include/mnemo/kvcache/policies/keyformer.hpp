// mnemo/kvcache/policies/keyformer.hpp — Keyformer: Gumbel-regularised accumulated attention.
//
// Adnan et al., "Keyformer: KV Cache Reduction through Key Tokens Selection for Efficient
// Generative Inference" (MLSys 2024). Dropping tokens skews the softmax towards the survivors;
// Keyformer scores with a Gumbel-perturbed, tempered softmax of the logits x_j so that tokens
// which are key under perturbation accumulate score:
//
//   zeta_j ~ Gumbel(0, 1) (= -log(-log u), u ~ U(0, 1), seeded),
//   f_j    = exp((x_j + zeta_j) / tau) / sum_m exp((x_m + zeta_m) / tau),
//   s_j   += f_j  at every observed query;   kept = the `recent` newest slots + the highest s_j
//
// prefill: x_j = scale q_i . k_j for each row i of the observation window over the keys it saw,
//          summed over the window and the group's query heads. observation.causal: row i is
//          position L - Lw + i and saw keys [0, L - Lw + i]; false (an encoder, or held-out
//          queries after the context): every row saw all L keys;
// decoding: x_j = log p_j + const from the step's probabilities (the constant cancels in the
//          softmax), so f_j = p_j^(1/tau) g_j / sum_m p_m^(1/tau) g_m with g = exp(zeta / tau).
//          The Gumbel factors g come from a table of `noise_table` seeded draws indexed by a hash of
//          (step, slot), so a step costs one pass over the slots and no log per slot.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct keyformer {
  std::int64_t recent = 0;   // newest slots always kept
  float tau = 1.0f;          // temperature
  std::uint64_t seed = 0;    // Gumbel noise seed
  float scale = 0;           // logit scale; 0: 1 / sqrt(D)

  static double gumbel(std::mt19937_64& rng) {
    // u in (0, 1): never 0 or 1, so both logs are finite.
    constexpr double eps = 1e-12;
    const double u = std::uniform_real_distribution<double>(eps, 1.0 - eps)(rng);
    return -std::log(-std::log(u));
  }

  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::keyformer::scores";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::check_scores(fn, out, d.Hkv, d.L);
    detail::require(tau > 0, fn, ": tau must be > 0, got ", tau);
    const double sc = scale != 0 ? scale : 1.0 / std::sqrt(static_cast<double>(d.D));
    std::mt19937_64 rng(seed);
    std::vector<double> y(static_cast<std::size_t>(d.L));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      for (std::int64_t j = 0; j < d.L; ++j) out(hk, j) = 0.0f;
      for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h)
        for (std::int64_t i = 0; i < d.Lw; ++i) {
          const std::int64_t n = o.causal ? d.L - d.Lw + i + 1 : d.L;  // row i saw keys [0, n)
          double m = -std::numeric_limits<double>::infinity(), sum = 0;
          for (std::int64_t j = 0; j < n; ++j) {
            double dot = 0;
            for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(o.q(h, i, c)) * o.k(hk, j, c);
            y[static_cast<std::size_t>(j)] = (sc * dot + gumbel(rng)) / tau;
            m = std::max(m, y[static_cast<std::size_t>(j)]);
          }
          for (std::int64_t j = 0; j < n; ++j) sum += std::exp(y[static_cast<std::size_t>(j)] - m);
          for (std::int64_t j = 0; j < n; ++j)
            out(hk, j) += static_cast<float>(std::exp(y[static_cast<std::size_t>(j)] - m) / sum);
        }
    }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::keyformer::select";
    const obs_dims d = detail::check(fn, o, true, false);
    detail::check_budget(fn, budget, recent, " (recent: the recent window is always kept)");
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < d.Hkv; ++h) sel.heads.push_back(detail::top_row_forced(s.as_view().ptr(h), d.L, budget, 0, recent, scratch));
    return sel;
  }

  // The table of Gumbel factors the decoder draws from: 2^noise_bits entries, indexed by the top
  // bits of a multiplicative hash of (step, head, slot).
  static constexpr int noise_bits = 12;
  static constexpr std::int64_t noise_table = std::int64_t{1} << noise_bits;

  class decoder;  // decode-time state, defined below
};

// Decode-time state: the accumulated perturbed scores of every slot.
class keyformer::decoder : public scored_slots {
 public:
  decoder(std::int64_t Hkv, const keyformer& p) : scored_slots(Hkv), p_(p), g_(noise_table) {
    detail::require(p.tau > 0, "kvcache::policies::keyformer::decoder: tau must be > 0, got ", p.tau);
    std::mt19937_64 rng(p.seed);
    for (auto& g : g_) g = static_cast<float>(std::exp(gumbel(rng) / p.tau));
  }
  void append(std::int64_t h, float initial = 0.0f) { mutable_scores(h).push_back(initial); }
  void observe(view<const float, 2> probs) {
    constexpr const char* fn = "kvcache::policies::keyformer::decoder::observe";
    detail::check_step_probs(fn, probs, num_heads(), [this](std::int64_t h) { return length(h); });  // before step_ moves
    ++step_;
    const std::uint64_t mix = static_cast<std::uint64_t>(step_) * 0x9e3779b97f4a7c15ull;
    for_each_head(fn, probs, [&](std::int64_t h, float* p, std::int64_t n) {
      const std::uint64_t head_mix = mix ^ (static_cast<std::uint64_t>(h) * 0xbf58476d1ce4e5b9ull);
      double sum = 0;
      for (std::int64_t j = 0; j < n; ++j) {
        const float base = p_.tau == 1.0f ? p[j] : std::pow(p[j], 1.0f / p_.tau);
        p[j] = base * g_[static_cast<std::size_t>((head_mix + static_cast<std::uint64_t>(j) * 0x94d049bb133111ebull) >> (64 - noise_bits))];
        sum += p[j];
      }
      if (!(sum > 0)) return;
      const float inv = static_cast<float>(1.0 / sum);
      float* s = mutable_scores(h).data();
      for (std::int64_t j = 0; j < n; ++j) s[j] += inv * p[j];
    });
  }
  selection select(std::int64_t budget) const { return scored_slots::select(budget, 0, p_.recent); }

 private:
  keyformer p_;
  std::vector<float> g_;
  std::int64_t step_ = 0;
};

}  // namespace mnemo::kvcache::policies

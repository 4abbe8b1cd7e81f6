// mnemo/kvcache/policies/dmc.hpp — Dynamic Memory Compression: every new token either opens a
// slot or is averaged into the newest one.
//
// Nawrot et al., "Dynamic Memory Compression: Retrofitting LLMs for Accelerated Inference"
// (ICML 2024). Per kv head and step t the model predicts a decision alpha_t in {0, 1} (a neuron of
// k_t through a sigmoid, rounded at inference) and an importance omega_t in (0, 1] (a neuron of
// q_t through a sigmoid). With the newest slot (k_last, v_last) and its accumulated weight z_last:
//
//   alpha_t = 0 (append)   a new slot (k_t, v_t), z = omega_t
//   alpha_t = 1 (merge)    k_last <- (z_last k_last + omega_t k_t) / (z_last + omega_t)
//                          v_last <- (z_last v_last + omega_t v_t) / (z_last + omega_t)
//                          z_last <- z_last + omega_t
//
// so a slot holds the omega-weighted mean of a run of consecutive tokens: the run's first token
// (alpha = 0) and the merged ones after it. The first token of a head always appends. alpha and
// omega are inputs here (the model computes them).
//
// As a merge plan (kvcache/merge_plan.hpp) a run s, s+1, .., r is kept slot s with self weight
// omega_s and folds (j -> s, omega_j) for s < j <= r, merge_rule::mean, keys merged:
//
//   k'_s = sum_{j=s}^{r} omega_j k_j / sum_{j=s}^{r} omega_j,   v'_s likewise,   position of s kept
//
// which is the running mean above, up to rounding.
//
//   plan(o, budget)   the prefill form: alpha [Hkv, L] and omega [Hkv, L] (fields) when given;
//                     else the deterministic test rule: alpha_t = 1 for the L - budget tokens
//                     t >= 1 with the largest cos(k_t, k_{t-1}) (ties: the lower t), omega = 1,
//                     so every head keeps min(budget, L) slots (budget 0: nothing is kept).
//                     With alpha given the budget is not used (the model sets the ratio).
//   dmc::decoder      the decode form: after appending step t's token to the cache, step(alpha,
//                     omega) returns the plan that merges it into the previous slot where
//                     alpha = 1 (apply with kvcache::merge); O(1) per head beside the plan's
//                     O(L) index list.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/merge_plan.hpp"
#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct dmc {
  static constexpr std::string_view name = "dmc";

  view<const float, 2> alpha;  // [Hkv, L] or empty: 1 = merge token t into the newest slot, 0 = append
  view<const float, 2> omega;  // [Hkv, L] or empty (all 1): importance weights, > 0

  // The kept slots (each run's first token).
  selection select(const observation& o, std::int64_t budget) const { return plan(o, budget).keep; }

  merge_plan plan(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::dmc::plan";
    const obs_dims d = detail::check(fn, o, false, false);
    detail::check_budget(fn, budget);
    check_inputs(fn, d);
    merge_plan p;
    p.rule = merge_rule::mean;
    p.keys = true;
    p.keep.heads.resize(static_cast<std::size_t>(d.Hkv));
    p.folds.resize(static_cast<std::size_t>(d.Hkv));
    p.self.resize(static_cast<std::size_t>(d.Hkv));
    std::vector<char> merge(static_cast<std::size_t>(d.L));
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      if (alpha.empty()) test_rule(o, h, budget, merge);
      else
        for (std::int64_t t = 0; t < d.L; ++t) merge[static_cast<std::size_t>(t)] = t > 0 && alpha(h, t) > 0.5f;
      if (alpha.empty() && budget == 0) continue;  // nothing kept
      auto& keep = p.keep.heads[static_cast<std::size_t>(h)];
      for (std::int64_t t = 0; t < d.L; ++t) {
        const float w = omega.empty() ? 1.0f : omega(h, t);
        if (!merge[static_cast<std::size_t>(t)]) {
          keep.push_back(t);
          p.self[static_cast<std::size_t>(h)].push_back(w);
        } else {
          p.folds[static_cast<std::size_t>(h)].push_back({t, keep.back(), w});
        }
      }
    }
    return p;
  }

  class decoder;

 private:
  void check_inputs(const char* fn, const obs_dims& d) const {
    if (!alpha.empty()) detail::require_shape(fn, "alpha", alpha, {d.Hkv, d.L}, " [Hkv, L]");
    if (omega.empty()) return;
    detail::require_shape(fn, "omega", omega, {d.Hkv, d.L}, " [Hkv, L]");
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t t = 0; t < d.L; ++t)
        detail::require(std::isfinite(omega(h, t)) && omega(h, t) > 0, fn, ": omega must be finite and > 0, got ",
                        omega(h, t), " at [", h, ", ", t, "]");
  }

  // merge[t] = 1 for the L - budget tokens t >= 1 with the largest cos(k_t, k_{t-1}).
  static void test_rule(const observation& o, std::int64_t h, std::int64_t budget, std::vector<char>& merge) {
    const std::int64_t L = o.k.extent(1), D = o.k.extent(2);
    std::fill(merge.begin(), merge.end(), 0);
    const std::int64_t n = std::max<std::int64_t>(0, L - std::max<std::int64_t>(budget, 1));
    if (n == 0) return;
    std::vector<double> sim(static_cast<std::size_t>(L), 0.0);
    for (std::int64_t t = 1; t < L; ++t) {
      double dot = 0, a = 0, b = 0;
      for (std::int64_t c = 0; c < D; ++c) {
        dot += static_cast<double>(o.k(h, t, c)) * o.k(h, t - 1, c);
        a += static_cast<double>(o.k(h, t, c)) * o.k(h, t, c);
        b += static_cast<double>(o.k(h, t - 1, c)) * o.k(h, t - 1, c);
      }
      const double cs = a > 0 && b > 0 ? dot / std::sqrt(a * b) : 0.0;
      sim[static_cast<std::size_t>(t)] = cs == cs ? cs : -2.0;  // NaN ranks last
    }
    std::vector<std::int64_t> order(static_cast<std::size_t>(L - 1));
    std::iota(order.begin(), order.end(), std::int64_t{1});
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) {
      return sim[static_cast<std::size_t>(x)] > sim[static_cast<std::size_t>(y)];
    });
    for (std::int64_t i = 0; i < n; ++i) merge[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
  }
};

// Decode-time state: the accumulated weight z of every slot of every head.
class dmc::decoder {
 public:
  explicit decoder(std::int64_t Hkv) : z_(Hkv) {
    detail::require(Hkv >= 1, "kvcache::policies::dmc::decoder: Hkv must be >= 1, got ", Hkv);
  }

  std::int64_t num_heads() const { return z_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return z_.length(h); }
  std::vector<std::int64_t> lengths() const { return z_.lengths(); }
  // z of head h's slots: the summed omega of the tokens each slot holds.
  const std::vector<float>& weights(std::int64_t h) const { return z_.row(h); }

  // Slots the cache already holds (a prefill, or a plan applied outside the decoder): head h gains
  // a slot of weight z (1: one token of weight 1).
  void append(std::int64_t h, float z = 1.0f) { z_.row(h).push_back(z); }

  // Step t, after its token was appended to every head of the cache (so head h holds length(h) + 1
  // slots): alpha[h] = 1 merges the new slot into the one before it (when there is one), 0 keeps it;
  // omega[h] > 0 its weight. Returns the plan to apply with kvcache::merge(cache, plan); the decoder
  // is already updated.
  merge_plan step(std::span<const float> alpha, std::span<const float> omega) {
    constexpr const char* fn = "kvcache::policies::dmc::decoder::step";
    const std::int64_t H = num_heads();
    detail::require(static_cast<std::int64_t>(alpha.size()) == H, fn, ": alpha must have Hkv = ", H, " entries, got ",
                    alpha.size());
    detail::require(static_cast<std::int64_t>(omega.size()) == H, fn, ": omega must have Hkv = ", H, " entries, got ",
                    omega.size());
    for (std::int64_t h = 0; h < H; ++h)
      detail::require(std::isfinite(omega[static_cast<std::size_t>(h)]) && omega[static_cast<std::size_t>(h)] > 0, fn,
                      ": omega[", h, "] must be finite and > 0, got ", omega[static_cast<std::size_t>(h)]);
    merge_plan p;
    p.rule = merge_rule::mean;
    p.keys = true;
    p.keep.heads.resize(static_cast<std::size_t>(H));
    p.folds.resize(static_cast<std::size_t>(H));
    p.self.resize(static_cast<std::size_t>(H));
    for (std::int64_t h = 0; h < H; ++h) {
      auto& z = z_.row(h);
      const auto n = static_cast<std::int64_t>(z.size());  // slots before this step's token
      const float w = omega[static_cast<std::size_t>(h)];
      const bool merge = n >= 1 && alpha[static_cast<std::size_t>(h)] > 0.5f;
      auto& keep = p.keep.heads[static_cast<std::size_t>(h)];
      keep.resize(static_cast<std::size_t>(merge ? n : n + 1));
      std::iota(keep.begin(), keep.end(), std::int64_t{0});
      auto& self = p.self[static_cast<std::size_t>(h)];
      self.assign(keep.size(), 1.0f);
      if (merge) {
        self.back() = z.back();  // (z_last k_last + omega k_t) / (z_last + omega)
        p.folds[static_cast<std::size_t>(h)].push_back({n, n - 1, w});
        z.back() += w;
      } else {
        z.push_back(w);
      }
    }
    return p;
  }

  // Keeps the selected slots (when the cache is compacted by another policy too).
  void compact(const selection& sel) { z_.compact(sel); }

 private:
  slot_state<float> z_;
};

}  // namespace mnemo::kvcache::policies

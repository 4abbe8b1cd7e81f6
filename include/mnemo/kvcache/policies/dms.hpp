// mnemo/kvcache/policies/dms.hpp — DMS: learned per-token eviction decisions, executed after a
// delay of w steps.
//
// Łańcucki et al., "Inference-Time Hyper-Scaling with KV Cache Compression" (2025), Dynamic Memory
// Sparsification. The model is retrofitted to predict, for every token t and kv head, an eviction
// decision alpha_t in {0, 1} (trained through a Gumbel-sigmoid relaxation, rounded at
// inference). Eviction is delayed: a token marked at step t stays readable for the next w
// steps (a sliding window over the marked tokens, which lets the model fold their content into
// the newer ones) and leaves at step t + w + 1. With z_t the decision's logit (the input here; the
// model computes it) and theta = threshold:
//
//   alpha_t = [z_t > theta]                                   (theta = 0: sigmoid(z_t) > 1/2)
//   at step T (the newest token's step), slot t is readable  iff  alpha_t = 0  or  T - t <= w
//
// So the cache holds the unmarked tokens plus the tokens marked in the last w steps: its size
// follows the content (the paper's compression ratio is trained, not set). A budget b is a cap on
// top of that: when more than b readable slots remain, the slots with the highest logits leave
// first (the marked ones before any unmarked, since they score above theta; ties: the newer slot
// leaves).
//
//   prefill  select(o, b): logits [Hkv, L] (field `logits`), T = L - 1, slot j's step = j
//   decode   dms::decoder: append(h, z) per new slot (its step is the head's append count),
//            select(b) applies the rule at the newest step, compact(sel) follows the cache;
//            observe(probs) does nothing (DMS reads no attention; kept for the tracker's shape).
//            Per step O(1) per new slot; select is O(L) plus a selection when over b.
// Calling select + compact every step removes each marked token at step t + w + 1, after exactly w
// more readable steps (should_compress says whether a step's select would drop anything).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct dms {
  static constexpr std::string_view name = "dms";

  std::int64_t window = 256;      // w: steps a marked token stays readable
  float threshold = 0.0f;         // theta: z > theta marks a token for eviction
  view<const float, 2> logits = {};  // prefill: z [Hkv, L], the eviction logits of the observed slots

  // scores [Hkv, L]: -z for a readable slot (higher = keep), -inf for a marked slot older than w.
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::dms::scores";
    const obs_dims d = check_obs(fn, o);
    detail::check_scores(fn, out, d.Hkv, d.L);
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = 0; j < d.L; ++j) out(h, j) = score(logits(h, j), d.L - 1 - j);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::dms::select";
    const obs_dims d = check_obs(fn, o);
    detail::check_budget(fn, budget);
    std::vector<float> z(static_cast<std::size_t>(d.L));
    std::vector<std::int64_t> age(static_cast<std::size_t>(d.L));
    selection sel;
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      for (std::int64_t j = 0; j < d.L; ++j) {
        z[static_cast<std::size_t>(j)] = logits(h, j);
        age[static_cast<std::size_t>(j)] = d.L - 1 - j;
      }
      sel.heads.push_back(keep_row(z.data(), age.data(), d.L, budget));
    }
    return sel;
  }

  // Whether a slot with logit z and age T - t is still readable.
  bool readable(float z, std::int64_t age) const { return !(z > threshold) || age <= window; }

  class decoder;  // decode-time state, below

 private:
  float score(float z, std::int64_t age) const { return readable(z, age) ? -z : -std::numeric_limits<float>::infinity(); }

  void check_params(const char* fn) const {
    detail::require(window >= 0, fn, ": window must be >= 0, got ", window);
    detail::require(std::isfinite(threshold), fn, ": threshold must be finite, got ", threshold);
  }

  obs_dims check_obs(const char* fn, const observation& o) const {
    const obs_dims d = detail::check(fn, o, false, false);
    check_params(fn);
    detail::require(!logits.empty(), fn, ": logits [Hkv, L] (the eviction logits of the observed slots) must be a non-empty view");
    detail::require_shape(fn, "logits", logits, {d.Hkv, d.L}, " [Hkv, L]");
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = 0; j < d.L; ++j)
        detail::require(std::isfinite(logits(h, j)), fn, ": logits must be finite, got ", logits(h, j), " at [", h, ", ", j, "]");
    return d;
  }

  // The kept slots of one head: the readable ones, and of those the `budget` lowest logits (ties:
  // the older slot stays), ascending.
  std::vector<std::int64_t> keep_row(const float* z, const std::int64_t* age, std::int64_t n, std::int64_t budget) const {
    std::vector<float> s(static_cast<std::size_t>(n));
    std::int64_t live = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      s[static_cast<std::size_t>(j)] = score(z[j], age[j]);
      live += readable(z[j], age[j]) ? 1 : 0;
    }
    return detail::top_row(s.data(), n, std::min(budget, live));
  }
};

// Decode-time state: every slot's eviction logit and the step it was appended at.
class dms::decoder {
 public:
  decoder(std::int64_t Hkv, const dms& p) : p_(p), z_(heads(Hkv)), born_(Hkv), steps_(static_cast<std::size_t>(Hkv), 0) {
    p_.check_params("kvcache::policies::dms::decoder");
  }

  std::int64_t num_heads() const { return z_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return z_.length(h); }
  std::vector<std::int64_t> lengths() const { return z_.lengths(); }
  const std::vector<float>& logits(std::int64_t h) const { return z_.row(h); }
  // Steps since slot j of head h was appended (0 for the newest).
  std::int64_t age(std::int64_t h, std::int64_t j) const {
    detail::require(j >= 0 && j < length(h), "kvcache::policies::dms::decoder::age: slot must be in [0, ", length(h), "), got ", j);
    return steps_[static_cast<std::size_t>(h)] - 1 - born_.row(h)[static_cast<std::size_t>(j)];
  }

  // A new slot of head h (one decode step of that head) with its eviction logit z.
  void append(std::int64_t h, float z) {
    detail::require(std::isfinite(z), "kvcache::policies::dms::decoder::append: the eviction logit must be finite, got ", z);
    z_.row(h).push_back(z);
    born_.row(h).push_back(steps_[static_cast<std::size_t>(h)]++);
  }

  // DMS reads no attention: nothing to do (the trackers' common shape).
  void observe(view<const float, 2>) {}

  // Whether select would drop anything: a head over `budget`, or a marked slot older than w.
  bool should_compress(std::int64_t budget) const {
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      if (length(h) > budget) return true;
      for (std::int64_t j = 0; j < length(h); ++j)
        if (!p_.readable(z_.row(h)[static_cast<std::size_t>(j)], age(h, j))) return true;
    }
    return false;
  }

  // Per head: the readable slots at the newest step, at most `budget` (highest logits leave first).
  selection select(std::int64_t budget) const {
    detail::check_budget("kvcache::policies::dms::decoder::select", budget);
    selection sel;
    std::vector<std::int64_t> ages;
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      ages.resize(static_cast<std::size_t>(length(h)));
      for (std::int64_t j = 0; j < length(h); ++j) ages[static_cast<std::size_t>(j)] = age(h, j);
      sel.heads.push_back(p_.keep_row(z_.row(h).data(), ages.data(), length(h), budget));
    }
    return sel;
  }

  // Keeps the selected slots (the cache's compaction, applied to the state).
  void compact(const selection& sel) {
    z_.compact(sel);
    born_.compact(sel);
  }

 private:
  static std::int64_t heads(std::int64_t Hkv) {
    detail::require(Hkv >= 1, "kvcache::policies::dms::decoder: Hkv must be >= 1, got ", Hkv);
    return Hkv;
  }

  dms p_;
  slot_state<float> z_;
  slot_state<std::int64_t> born_;
  std::vector<std::int64_t> steps_;  // [Hkv] slots appended so far per head
};

}  // namespace mnemo::kvcache::policies

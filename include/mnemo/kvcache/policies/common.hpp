// mnemo/kvcache/policies/common.hpp — what every KV-cache policy shares: the observation it
// decides from, argument checks, the kept-set rule with forced slots, and the per-slot state of
// the decode-time trackers.
//
// A policy only decides what to keep (DESIGN.md, "KV cache and policies"). It reads an
// observation and a budget and returns a kvcache::selection (kept slots per kv head, ascending);
// the cache applies it with layer_cache::compact. Nothing here touches the cache or a kernel, so
// any policy composes with any storage and any attention kernel.
//
//   observation.k     [Hkv, L, D]   the cached keys (post-RoPE), in slot order
//   observation.v     [Hkv, L, Dv]  the cached values (only FastGen-style checks use them)
//   observation.q     [Hq, Lw, D]   the last Lw queries (the observation window; post-RoPE)
//   observation.attn  [Hq, L]       column sums of the attention probabilities of those Lw rows:
//                                   attention::column_sums of flash/decode/reference, i.e. the
//                                   side output of the attention pass itself (no second pass)
//
// Query head h belongs to kv head h / (Hq / Hkv). Scores are [Hkv, L], higher means keep; a
// prefill selection is top_budget(scores, budget) (selection.hpp: ties to the lower slot).
//
// Decoding. A policy that evicts while decoding has a `decoder`: per-slot state that follows the
// cache (append one slot per new token, observe the step's attention if the policy needs it,
// select when the cache overflows or every N steps, then compact the state with the same
// selection as the cache). The step's probabilities come from the decode kernel's side output:
// attention::column_sums of attention::decode, or kvcache::column_sums of kvcache::decode (any
// storage kind, ragged heads, indexed by cache slot). Per step its cost is O(1) per new token
// (key-only and position policies) or one pass over the head's slots (attention-accumulating
// policies: the kernel itself reads D + Dv elements per slot, so the pass is ~1/(D + Dv) of the
// kernel's traffic). Measured at Lk = 32768, Hq = 32, Hkv = 8, D = 128 (bench/kvpolicy_rows.cpp,
// kvpolicy_step rows, one run, against attention::decode with column sums; AMD EPYC Zen 1, AVX2,
// 1 thread, 40 ms a step, every tracker through the list's erased pol::tracker): H2O 1.6%,
// Scissorhands 1.4%, TOVA 1.8%, Keyformer 2.5%, SnapKV's window ring 4.1%, AdaKV 6.4%, ALISA's
// history ring 8.9%, SimLayerKV 0.8%, DuoAttention 0.4%, FastGen, DMS, KNorm, Q-Filters < 0.3%.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "mnemo/core/error.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/selection.hpp"

namespace mnemo::kvcache::policies {

struct observation {
  view<const float, 3> k;     // [Hkv, L, D]
  view<const float, 3> v;     // [Hkv, L, Dv] or empty
  view<const float, 3> q;     // [Hq, Lw, D] or empty
  view<const float, 2> attn;  // [Hq, L] or empty: column sums of the probabilities of the Lw rows
  // What some policies read beside the tensors; the defaults describe one causal layer, no flags.
  std::span<const std::uint8_t> special = {};  // [L] or empty: 1 = a special token (FastGen)
  std::span<const std::uint8_t> punct = {};    // [L] or empty: 1 = a punctuation token (FastGen)
  std::int64_t layer = 0;                 // this layer's index in [0, layers) (PyramidKV, SimLayerKV)
  std::int64_t layers = 1;                // the model's number of layers
  // Whether the rows behind q and attn were causal: the Lw window rows are the last Lw positions
  // of the context and row i saw keys [0, L - Lw + i]. false: every row saw every key (a
  // non-causal encoder, or held-out queries that come after the context).
  bool causal = true;
};

// The sizes of an observation, validated once.
struct obs_dims {
  std::int64_t Hkv = 0, L = 0, D = 0, Hq = 0, Lw = 0;
  std::int64_t group() const { return Hq / Hkv; }
};

namespace detail {

using mnemo::detail::fail;
using mnemo::detail::require;
using mnemo::detail::require_shape;

inline constexpr float keep_always = std::numeric_limits<float>::infinity();

// Checks what a policy needs: keys always (their shape gives Hkv, L, D); queries and/or the
// attention sums when asked for.
inline obs_dims check(const char* fn, const observation& o, bool need_q, bool need_attn) {
  require(!o.k.empty(), fn, ": observation.k [Hkv, L, D] must be a non-empty view");
  obs_dims d{o.k.extent(0), o.k.extent(1), o.k.extent(2), 0, 0};
  require(d.Hkv >= 1 && d.D >= 1, fn, ": observation.k must have Hkv >= 1 and D >= 1, got ", shape_string(o.k.shape()));
  if (need_q) {
    require(!o.q.empty(), fn, ": observation.q [Hq, Lw, D] (the observation window) must be a non-empty view");
    d.Hq = o.q.extent(0);
    d.Lw = o.q.extent(1);
    require(o.q.extent(2) == d.D, fn, ": observation.q.shape[2] must equal D = ", d.D, " (from k), got ", o.q.extent(2));
    require(d.Hq >= 1 && d.Hq % d.Hkv == 0, fn, ": observation.q.shape[0] (Hq) must be a positive multiple of Hkv = ",
            d.Hkv, ", got ", d.Hq);
    require(d.Lw >= 1 && d.Lw <= d.L, fn, ": observation.q.shape[1] (Lw) must be in [1, L = ", d.L, "], got ", d.Lw);
  }
  if (need_attn) {
    require(!o.attn.empty(), fn,
            ": observation.attn [Hq, L] (attention::column_sums of the attention pass) must be a non-empty view");
    if (d.Hq == 0) d.Hq = o.attn.extent(0);
    require(d.Hq >= 1 && d.Hq % d.Hkv == 0, fn, ": observation.attn.shape[0] (Hq) must be a positive multiple of Hkv = ",
            d.Hkv, ", got ", o.attn.extent(0));
    require_shape(fn, "observation.attn", o.attn, {d.Hq, d.L}, " [Hq, L]");
  }
  if (!o.v.empty())
    require(o.v.extent(0) == d.Hkv && o.v.extent(1) == d.L, fn, ": observation.v must have shape [Hkv = ", d.Hkv,
            ", L = ", d.L, ", Dv], got ", shape_string(o.v.shape()));
  return d;
}

inline void check_budget(const char* fn, std::int64_t budget, std::int64_t at_least = 0, const char* why = "") {
  require(budget >= at_least, fn, ": budget must be >= ", at_least, why, ", got ", budget);
}

// Checks a decode step's probabilities probs [Hq, >= max length] (attention::column_sums of the
// step, rows = 1) against a decoder of Hkv heads whose head h holds length(h) slots, before the
// decoder changes anything; returns the group size G = Hq / Hkv.
template <class Length>
std::int64_t check_step_probs(const char* fn, const view<const float, 2>& probs, std::int64_t Hkv, Length&& length) {
  mnemo::detail::require_data(fn, "probs", probs, " [Hq, L]");
  require(probs.extent(0) >= 1 && probs.extent(0) % Hkv == 0, fn, ": probs [Hq, L] must have Hq a positive multiple of Hkv = ",
          Hkv, ", got ", shape_string(probs.shape()));
  for (std::int64_t h = 0; h < Hkv; ++h)
    require(length(h) <= probs.extent(1), fn, ": probs.shape[1] must be >= length(", h, ") = ", length(h), ", got ",
            probs.extent(1));
  return probs.extent(0) / Hkv;
}

inline void check_scores(const char* fn, const view<float, 2>& scores, std::int64_t Hkv, std::int64_t L) {
  require(!scores.empty(), fn, ": scores [Hkv, L] must be a non-empty view");
  require_shape(fn, "scores", scores, {Hkv, L}, " [Hkv, L]");
}

// Slots [j0, j1) of every head forced into the kept set: their scores become the maximum over the
// other slots + 1 (kvpress's window fill), or 1 when no other slot has a score.
inline void force_slots(const view<float, 2>& scores, std::int64_t j0, std::int64_t j1) {
  float top = -std::numeric_limits<float>::infinity();
  for (std::int64_t h = 0; h < scores.extent(0); ++h)
    for (std::int64_t j = 0; j < scores.extent(1); ++j)
      if (j < j0 || j >= j1) top = std::max(top, scores(h, j));
  const bool scored = j1 - j0 < scores.extent(1);
  const float fill = scored ? top + 1.0f : 1.0f;
  for (std::int64_t h = 0; h < scores.extent(0); ++h)
    for (std::int64_t j = j0; j < j1; ++j) scores(h, j) = fill;
}

// The kept slots of one head: the `keep` highest of s[0, L) (top_budget's rule), ascending.
inline std::vector<std::int64_t> top_row(const float* s, std::int64_t L, std::int64_t keep) {
  selection one = top_budget(view<const float, 2>(s, {1, L}), keep);
  return std::move(one.heads[0]);
}

// As top_row, but the first `sinks` and last `recent` slots are kept before any other
// (sinks + recent must be <= keep). `scratch` is resized to L.
inline std::vector<std::int64_t> top_row_forced(const float* s, std::int64_t L, std::int64_t keep, std::int64_t sinks,
                                                std::int64_t recent, std::vector<float>& scratch) {
  scratch.assign(s, s + L);
  for (std::int64_t j = 0; j < std::min(sinks, L); ++j) scratch[static_cast<std::size_t>(j)] = keep_always;
  for (std::int64_t j = std::max<std::int64_t>(0, L - recent); j < L; ++j) scratch[static_cast<std::size_t>(j)] = keep_always;
  return top_row(scratch.data(), L, keep);
}

// mean over the query heads of each kv group: out[hk, j] = mean_{h in group hk} a[h, j].
inline void group_mean(view<const float, 2> a, std::int64_t Hkv, view<float, 2> out) {
  const std::int64_t Hq = a.extent(0), L = a.extent(1), G = Hq / Hkv;
  for (std::int64_t hk = 0; hk < Hkv; ++hk)
    for (std::int64_t j = 0; j < L; ++j) {
      double acc = 0;
      for (std::int64_t g = 0; g < G; ++g) acc += a(hk * G + g, j);
      out(hk, j) = static_cast<float>(acc / static_cast<double>(G));
    }
}

}  // namespace detail

// Per-slot decode state of every kv head (ragged: each head has its own number of slots),
// aligned with the cache's slots: append with the cache, compact with the cache.
template <class T = float>
class slot_state {
 public:
  explicit slot_state(std::int64_t Hkv = 0) : rows_(static_cast<std::size_t>(Hkv)) {}

  std::int64_t num_heads() const { return static_cast<std::int64_t>(rows_.size()); }
  std::int64_t length(std::int64_t h) const { return static_cast<std::int64_t>(rows_[index(h)].size()); }
  std::vector<std::int64_t> lengths() const {
    std::vector<std::int64_t> n;
    for (const auto& r : rows_) n.push_back(static_cast<std::int64_t>(r.size()));
    return n;
  }
  std::vector<T>& row(std::int64_t h) { return rows_[index(h)]; }
  const std::vector<T>& row(std::int64_t h) const { return rows_[index(h)]; }

  // Keeps the selected slots of every head, in order (the cache's compaction rule).
  void compact(const selection& sel) {
    validate("kvcache::policies::slot_state::compact", sel, lengths());
    for (std::size_t h = 0; h < rows_.size(); ++h) {
      auto& r = rows_[h];
      std::int64_t n = 0;
      for (std::int64_t j : sel.heads[h]) r[static_cast<std::size_t>(n++)] = r[static_cast<std::size_t>(j)];
      r.resize(static_cast<std::size_t>(n));
    }
  }

 private:
  std::size_t index(std::int64_t h) const {
    mnemo::detail::require(h >= 0 && h < num_heads(), "kvcache::policies::slot_state: head must be in [0, ",
                           num_heads(), "), got ", h);
    return static_cast<std::size_t>(h);
  }
  std::vector<std::vector<T>> rows_;
};

// One float score per slot and the decode-time keep rule: per head, the first `sinks` and the
// last `recent` slots, then the highest scores, `budget` slots in all. The base of every
// score-keeping decoder.
class scored_slots {
 public:
  explicit scored_slots(std::int64_t Hkv = 0) : s_(Hkv) {}

  std::int64_t num_heads() const { return s_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return s_.length(h); }
  std::vector<std::int64_t> lengths() const { return s_.lengths(); }
  const std::vector<float>& scores(std::int64_t h) const { return s_.row(h); }

  selection select(std::int64_t budget, std::int64_t sinks = 0, std::int64_t recent = 0) const {
    detail::require(sinks >= 0 && recent >= 0, "kvcache::policies::select: sinks and recent must be >= 0, got ", sinks,
                    " and ", recent);
    detail::check_budget("kvcache::policies::select", budget, sinks + recent, " (sinks + recent are always kept)");
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < num_heads(); ++h)
      sel.heads.push_back(detail::top_row_forced(s_.row(h).data(), length(h), budget, sinks, recent, scratch));
    return sel;
  }
  void compact(const selection& sel) { s_.compact(sel); }

 protected:
  std::vector<float>& mutable_scores(std::int64_t h) { return s_.row(h); }

  // Calls f(h, p, n) for every kv head with p[0, n) = the sum over the head's query heads of
  // this step's probabilities over its n = length(h) slots. probs [Hq, >= max length] holds per
  // query head the probabilities over its kv head's slots (attention::column_sums of the decode
  // step, rows = 1), so ragged heads read a prefix of their row.
  template <class F>
  void for_each_head(const char* fn, view<const float, 2> probs, F&& f) {
    const std::int64_t G = detail::check_step_probs(fn, probs, num_heads(), [this](std::int64_t h) { return length(h); });
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      const std::int64_t n = length(h);
      group_.assign(static_cast<std::size_t>(n), 0.0f);
      for (std::int64_t g = 0; g < G; ++g) {
        const float* p = probs.ptr(h * G + g);  // not ptr(.., 0): every head may hold no slot
        for (std::int64_t j = 0; j < n; ++j) group_[static_cast<std::size_t>(j)] += p[j];
      }
      f(h, group_.data(), n);
    }
  }

  slot_state<float> s_;
  std::vector<float> group_;  // scratch of for_each_head
};

// Whether a decoder should compress now: some head holds more than `budget` slots (overflow),
// or `every` > 0 steps have passed since the last compression.
inline bool should_compress(const std::vector<std::int64_t>& lengths, std::int64_t budget, std::int64_t step = 0,
                            std::int64_t every = 0) {
  for (std::int64_t n : lengths)
    if (n > budget) return true;
  return every > 0 && step > 0 && step % every == 0;
}

}  // namespace mnemo::kvcache::policies

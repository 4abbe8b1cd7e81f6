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
//
// Decoding (snapkv::decoder): the observation window slides with generation. The decoder keeps a
// ring of the last w steps' probabilities per slot (attention::column_sums / kvcache::column_sums
// of each decode step, rows = 1, summed over the group's query heads) and their running sum, which
// is exactly the window's column sums a prefill of the same tokens would see (step t's query saw
// the slots present at step t: the causal rule). On overflow, select() scores the running sums as
// above and keeps the newest w slots. Per step: one add and one subtract per slot (O(L), the
// running sum re-added from the ring once per w steps so rounding never builds up); memory
// w + 1 floats per slot; select O(L log L) on overflow only.
// Golden: kv_snapkv, kv_snapkv_b2_gqa4 (kvpress's SnapKVPress; the window fill is the max over the
// whole score tensor + 1, which for a batch means over every batch element: the golden runner
// applies that across the batch).
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

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
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = 0; j < n; ++j) {
        double acc = 0;
        for (std::int64_t g = 0; g < G; ++g)
          for (std::int64_t t = j - half; t <= j + half; ++t)
            if (t >= 0 && t < n) acc += o.attn(hk * G + g, t);
        out(hk, j) = static_cast<float>(acc / static_cast<double>(window * kernel_size * G));
      }
    detail::force_slots(out, n, d.L);
  }

  // Pooled scores of one head from its window sums a[0, n) (any positive scale: the ranking is
  // what matters), the last `window` slots set to `fill`; the decode-time form of scores().
  void pool(const float* a, std::int64_t n, double norm, float* out) const {
    const std::int64_t m = n - window, half = kernel_size / 2;
    for (std::int64_t j = 0; j < m; ++j) {
      double acc = 0;
      for (std::int64_t t = std::max<std::int64_t>(0, j - half); t <= std::min(m - 1, j + half); ++t) acc += a[t];
      out[j] = static_cast<float>(acc / norm);
    }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::snapkv::select";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

  class decoder;  // decode-time state, below

 private:
  void check(const char* fn, const obs_dims& d) const {
    detail::require(window >= 1 && window <= d.L, fn, ": window must be in [1, L = ", d.L, "], got ", window);
    detail::require(kernel_size >= 1 && kernel_size % 2 == 1, fn, ": kernel_size must be odd and >= 1, got ",
                    kernel_size);
  }
};

// Decode-time state: the last `window` steps' group probabilities per slot and their sum.
class snapkv::decoder {
 public:
  decoder(std::int64_t Hkv, const snapkv& p) : p_(p), sum_(Hkv) {
    constexpr const char* fn = "kvcache::policies::snapkv::decoder";
    detail::require(Hkv >= 1, fn, ": Hkv must be >= 1, got ", Hkv);
    detail::require(p.window >= 1, fn, ": window must be >= 1, got ", p.window);
    detail::require(p.kernel_size >= 1 && p.kernel_size % 2 == 1, fn, ": kernel_size must be odd and >= 1, got ",
                    p.kernel_size);
    ring_.assign(static_cast<std::size_t>(p.window), slot_state<float>(Hkv));
  }

  std::int64_t num_heads() const { return sum_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return sum_.length(h); }
  std::vector<std::int64_t> lengths() const { return sum_.lengths(); }
  // The window sums of head h's slots (attention of the last `window` steps, group-summed).
  const std::vector<float>& window_sums(std::int64_t h) const { return sum_.row(h); }

  // A new slot of head h (the step's own token; append before observing the step).
  void append(std::int64_t h) {
    sum_.row(h).push_back(0.0f);
    for (auto& r : ring_) r.row(h).push_back(0.0f);
  }

  // This step's probabilities, probs [Hq, >= max length] (column sums of the step, rows = 1):
  // they replace the oldest ring entry.
  void observe(view<const float, 2> probs) {
    constexpr const char* fn = "kvcache::policies::snapkv::decoder::observe";
    const std::int64_t H = num_heads();
    const std::int64_t G = detail::check_step_probs(fn, probs, H, [this](std::int64_t h) { return length(h); });
    const std::int64_t w = p_.window;
    slot_state<float>& oldest = ring_[static_cast<std::size_t>(steps_ % w)];
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t n = length(h);
      float* r = oldest.row(h).data();
      float* s = sum_.row(h).data();
      for (std::int64_t j = 0; j < n; ++j) {
        float a = 0;
        for (std::int64_t g = 0; g < G; ++g) a += probs(h * G + g, j);
        s[j] += a - r[j];
        r[j] = a;
      }
    }
    if (++steps_ % w == 0) resum();
  }

  // Scores [Hkv][length(h)]: the pooled window sums, the newest `window` slots of every head
  // set above every other score (max over all heads + 1, as snapkv::scores; AdaKV compares
  // scores across heads).
  std::vector<std::vector<float>> scores() const {
    const std::int64_t H = num_heads();
    const double norm = static_cast<double>(p_.window * p_.kernel_size);
    std::vector<std::vector<float>> out(static_cast<std::size_t>(H));
    float top = -std::numeric_limits<float>::infinity();
    for (std::int64_t h = 0; h < H; ++h) {
      auto& row = out[static_cast<std::size_t>(h)];
      row.resize(static_cast<std::size_t>(length(h)));
      p_.pool(sum_.row(h).data(), length(h), norm, row.data());
      for (std::int64_t j = 0; j < length(h) - p_.window; ++j) top = std::max(top, row[static_cast<std::size_t>(j)]);
    }
    const float fill = top > -std::numeric_limits<float>::infinity() ? top + 1.0f : 1.0f;
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t j = std::max<std::int64_t>(0, length(h) - p_.window); j < length(h); ++j)
        out[static_cast<std::size_t>(h)][static_cast<std::size_t>(j)] = fill;
    return out;
  }

  // Per head the `budget` best slots by scores() (the newest `window` first), ascending.
  selection select(std::int64_t budget) const {
    detail::check_budget("kvcache::policies::snapkv::decoder::select", budget);
    const std::vector<std::vector<float>> s = scores();
    selection sel;
    for (std::int64_t h = 0; h < num_heads(); ++h)
      sel.heads.push_back(detail::top_row(s[static_cast<std::size_t>(h)].data(), length(h), budget));
    return sel;
  }

  // Keeps the selected slots (the cache's compaction, applied to the state).
  void compact(const selection& sel) {
    sum_.compact(sel);
    for (auto& r : ring_) r.compact(sel);
  }

 private:
  // sum = the ring's rows added in ring order (exact up to one rounding per step).
  void resum() {
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      auto& s = sum_.row(h);
      std::fill(s.begin(), s.end(), 0.0f);
      for (const auto& r : ring_)
        for (std::size_t j = 0; j < s.size(); ++j) s[j] += r.row(h)[j];
    }
  }

  snapkv p_;
  slot_state<float> sum_;
  std::vector<slot_state<float>> ring_;  // [window]; entry steps_ % window is the oldest
  std::int64_t steps_ = 0;
};

}  // namespace mnemo::kvcache::policies

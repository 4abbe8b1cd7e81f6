// mnemo/kvcache/policies/fastgen.hpp — FastGen-style adaptive per-head choice.
//
// Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs" (ICLR
// 2024). Profiling the prompt's attention, each head gets the cheapest of a few structural
// policies that still recovers a fraction T of its attention mass:
//
//   C_special        special tokens (e.g. BOS, role markers)
//   C_punct          C_special + punctuation
//   C_local          C_punct + the `local` most recent tokens
//   C_frequency      C_local + the highest accumulated attention up to the budget
//   recovery(C)      = sum_{j in C} a_j / sum_j a_j,     a = the head's attention column sums
//   choice(h)        = the first C in that order with recovery >= T (C_frequency if none does)
//
// Every set is capped at the budget (special tokens first, then punctuation, then the newest,
// then the most attended), so heads keep different numbers of slots (ragged) and a head whose
// attention is structural keeps few. a = observation.attn summed over the group (column sums of
// all prompt rows: attention::column_sums with rows = 0).
//
// Decoding (fastgen::decoder): each head keeps the choice its prefill profile gave (the paper
// fixes the per-head policy at prefill) and applies it on overflow to the slots it holds then:
// the flags of generated tokens come with append, the attention of the frequency stage accumulates
// each step's column sums (one add per slot and query head, as H2O). The kept set of a head is
// exactly what select() builds for the same choice from the same attention sums.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct fastgen {
  static constexpr std::string_view name = "fastgen";
  enum class choice { special, punct, local, frequency };

  double recovery = 0.95;     // T
  double local_fraction = 0.5;  // the local window as a fraction of the budget

  struct plan {
    selection kept;
    std::vector<choice> per_head;  // [Hkv]
  };

  // The per-head choices and kept slots. The token flags come with the observation:
  // o.special, o.punct = [L] flags of the prompt's tokens (1 = special / punctuation), may be empty.
  plan profile(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::fastgen::profile";
    const std::span<const std::uint8_t> special = o.special, punct = o.punct;
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    check(fn);
    for (auto [flags, name] : {std::pair{special, "special"}, std::pair{punct, "punct"}})
      detail::require(flags.empty() || static_cast<std::int64_t>(flags.size()) == d.L, fn, ": ", name,
                      " must be empty or hold L = ", d.L, " flags, got ", flags.size());
    plan out;
    std::vector<double> a(static_cast<std::size_t>(d.L));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      for (std::int64_t j = 0; j < d.L; ++j) {
        double s = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) s += o.attn(hk * d.group() + g, j);
        a[static_cast<std::size_t>(j)] = s;
      }
      head_set set(*this, a, budget, special, punct);
      choice c = choice::special;
      set.stage(c);
      for (choice next : {choice::punct, choice::local, choice::frequency}) {
        if (set.enough()) break;
        set.stage(c = next);
      }
      out.kept.heads.push_back(set.slots());
      out.per_head.push_back(c);
    }
    return out;
  }

  // The kept slots of profile(o, budget).
  selection select(const observation& o, std::int64_t budget) const { return profile(o, budget).kept; }

  class decoder;  // decode-time state, below

 private:
  void check(const char* fn) const {
    detail::require(recovery > 0 && recovery <= 1, fn, ": recovery must be in (0, 1], got ", recovery);
    detail::require(local_fraction >= 0 && local_fraction <= 1, fn, ": local_fraction must be in [0, 1], got ",
                    local_fraction);
  }

  // The kept set of one head, built stage by stage (the stages of choice c are those <= c), capped
  // at min(budget, L); a = the head's attention column sums [L].
  class head_set {
   public:
    head_set(const fastgen& p, const std::vector<double>& a, std::int64_t budget, std::span<const std::uint8_t> special,
             std::span<const std::uint8_t> punct)
        : p_(p), a_(a), L_(static_cast<std::int64_t>(a.size())), keep_(std::min(budget, L_)),
          special_(special), punct_(punct), in_(a.size(), 0) {
      for (double x : a_) total_ += x;
    }
    // Whether the kept slots recover the fraction `recovery` of the head's attention.
    bool enough() const { return total_ <= 0 || got_ >= p_.recovery * total_; }
    void stage(choice c) {
      switch (c) {
        case choice::special: add_flagged(special_); break;
        case choice::punct: add_flagged(punct_); break;
        case choice::local: {
          const auto local = static_cast<std::int64_t>(p_.local_fraction * static_cast<double>(keep_));
          for (std::int64_t j = std::max<std::int64_t>(0, L_ - local); j < L_; ++j) add(j);
          break;
        }
        case choice::frequency: {
          std::vector<std::int64_t> order(static_cast<std::size_t>(L_));
          for (std::int64_t j = 0; j < L_; ++j) order[static_cast<std::size_t>(j)] = j;
          std::stable_sort(order.begin(), order.end(), [&](std::int64_t x, std::int64_t y) {
            return a_[static_cast<std::size_t>(x)] > a_[static_cast<std::size_t>(y)];
          });
          for (std::int64_t j : order) {
            if (count_ >= keep_ || enough()) break;
            add(j);
          }
          break;
        }
      }
    }
    std::vector<std::int64_t> slots() const {
      std::vector<std::int64_t> row;
      for (std::int64_t j = 0; j < L_; ++j)
        if (in_[static_cast<std::size_t>(j)]) row.push_back(j);
      return row;
    }

   private:
    void add(std::int64_t j) {
      if (count_ >= keep_ || in_[static_cast<std::size_t>(j)]) return;
      in_[static_cast<std::size_t>(j)] = 1;
      ++count_;
      got_ += a_[static_cast<std::size_t>(j)];
    }
    void add_flagged(std::span<const std::uint8_t> flags) {
      for (std::int64_t j = 0; j < L_ && !flags.empty(); ++j)
        if (flags[static_cast<std::size_t>(j)]) add(j);
    }
    const fastgen& p_;
    const std::vector<double>& a_;
    std::int64_t L_, keep_;
    std::span<const std::uint8_t> special_, punct_;
    std::vector<std::uint8_t> in_;
    std::int64_t count_ = 0;
    double total_ = 0, got_ = 0;
  };
};

// Decode-time state: each head keeps its prefill choice; every slot has its special / punct
// flags and its accumulated attention (H2O-style, from each step's column sums). On overflow a
// head keeps the set of its choice built from those, as at prefill (special tokens, then
// punctuation, then the newest slots, then the most attended, capped at the budget).
class fastgen::decoder {
 public:
  decoder(const fastgen& p, std::vector<choice> per_head)
      : p_(p), choice_(std::move(per_head)), attn_(static_cast<std::int64_t>(choice_.size())),
        special_(static_cast<std::int64_t>(choice_.size())), punct_(static_cast<std::int64_t>(choice_.size())) {
    detail::require(!choice_.empty(), "kvcache::policies::fastgen::decoder: per_head must hold one choice per kv head");
    p_.check("kvcache::policies::fastgen::decoder");
  }

  std::int64_t num_heads() const { return attn_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return attn_.length(h); }
  std::vector<std::int64_t> lengths() const { return attn_.lengths(); }
  choice head_choice(std::int64_t h) const { return choice_[static_cast<std::size_t>(h)]; }
  const std::vector<float>& attention(std::int64_t h) const { return attn_.row(h); }

  // A new slot of head h: its flags and initial attention (0, or its prefill column sum).
  void append(std::int64_t h, bool special, bool punct, float initial = 0.0f) {
    attn_.row(h).push_back(initial);
    special_.row(h).push_back(special ? 1 : 0);
    punct_.row(h).push_back(punct ? 1 : 0);
  }

  // This step's probabilities, probs [Hq, >= max length] (column sums of the step, rows = 1).
  void observe(view<const float, 2> probs) {
    constexpr const char* fn = "kvcache::policies::fastgen::decoder::observe";
    const std::int64_t H = num_heads();
    const std::int64_t G = detail::check_step_probs(fn, probs, H, [this](std::int64_t h) { return length(h); });
    for (std::int64_t h = 0; h < H; ++h) {
      const std::int64_t n = length(h);
      float* s = attn_.row(h).data();
      for (std::int64_t g = 0; g < G; ++g)
        for (std::int64_t j = 0; j < n; ++j) s[j] += probs(h * G + g, j);
    }
  }

  // Per head the set of its choice over its current slots, capped at `budget` (ragged).
  selection select(std::int64_t budget) const {
    detail::check_budget("kvcache::policies::fastgen::decoder::select", budget);
    selection sel;
    std::vector<double> a;
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      a.assign(attn_.row(h).begin(), attn_.row(h).end());
      head_set set(p_, a, budget, special_.row(h), punct_.row(h));
      for (choice c : {choice::special, choice::punct, choice::local, choice::frequency})
        if (c <= choice_[static_cast<std::size_t>(h)]) set.stage(c);
      sel.heads.push_back(set.slots());
    }
    return sel;
  }

  void compact(const selection& sel) {
    attn_.compact(sel);
    special_.compact(sel);
    punct_.compact(sel);
  }

 private:
  fastgen p_;
  std::vector<choice> choice_;
  slot_state<float> attn_;
  slot_state<std::uint8_t> special_, punct_;
};

}  // namespace mnemo::kvcache::policies

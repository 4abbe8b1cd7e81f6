// mnemo/kvcache/policies/fastgen.hpp — FastGen-style adaptive per-head choice.
//
// Ge et al., "Model Tells You What to Discard: Adaptive KV Cache Compression for LLMs" (ICLR
// 2024). Profiling the prompt's attention, each head gets the cheapest of a few compositions of
// structural policies that still recovers a fraction T of its attention. The paper's
// compositions, in its order (each one adds to the one before):
//
//   special     C_special                        special tokens (BOS, [CLS], [SEP], role markers)
//   punct       C_special + C_punct              + punctuation
//   frequency   C_special + C_punct + C_frequent + the most attended tokens (a fraction r_f)
//   local       ... + C_frequent + C_local       + the most recent tokens (a fraction r_l)
//   recovery(C) = sum_{j in C} a_j / sum_j a_j,  a = the head's attention column sums
//   choice      = argmin_C |C|  subject to  recovery(C) >= T
//
// The paper has no budget: the cache size of a head follows from its choice. Here a budget B caps
// every head, and two things change so that the cap neither starves a composition nor hides the
// choice (on all-MiniLM-L6-v2's attention the position-order cap filled a 10% budget with the
// first punctuation tokens, and every head fell through to the last composition):
//
//   kept set    K_C = the members of C, at most B' = min(B, L) of them: the special tokens first
//               (the most attended of them if there are more than B'), then for `local` the
//               newest r_l B' slots, then the other members by attention (ties to the lower
//               slot). C_frequent is the r_f B' most attended slots that are neither special nor
//               punctuation; C_local the newest r_l B' slots. So punctuation never takes a slot a
//               better attended member of the same composition could have.
//   recovery    measured on the kept set, against the best any B' slots can do:
//                 R* = recovery(the B' most attended slots)
//   choice      the composition with the fewest kept slots among those with
//               recovery(K_C) >= T R* (ties to the earlier one); if none reaches it, the one with
//               the highest recovery (ties to the fewer slots, then the earlier one).
//
// With a budget that holds the paper's sets, R* = 1 and this is the paper's rule. With a small
// one, a head whose attention sits on its special tokens keeps just those, a head on special and
// punctuation tokens keeps the most attended of them, a head with scattered heavy hitters keeps
// them (frequency), and a head whose attention spreads over the recent tokens keeps the newest
// slots (local). Heads keep different numbers of slots (ragged). a = observation.attn summed
// over the group (the column sums of the observed rows: attention::column_sums).
//
// Decoding (fastgen::decoder): each head keeps the choice its prefill profile gave (the paper
// fixes the per-head policy at prefill) and applies it on overflow to the slots it holds then:
// the flags of generated tokens come with append, the attention of the frequency stage accumulates
// each step's column sums (one add per slot and query head, as H2O). The kept set of a head is
// exactly what profile() builds for the same choice from the same attention sums.
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
  // The paper's compositions, cheapest first (each adds to the one before; see the file comment).
  enum class choice { special, punct, frequency, local };
  static constexpr choice choices[] = {choice::special, choice::punct, choice::frequency, choice::local};

  double recovery = 0.95;           // T, against the best recovery of the budget (R*)
  double local_fraction = 0.5;      // r_l: the local window as a fraction of the budget
  double frequency_fraction = 0.5;  // r_f: the frequent tokens as a fraction of the budget

  struct plan {
    selection kept;
    std::vector<choice> per_head;  // [Hkv]
  };

  // The per-head choices and kept slots. The token flags come with the observation:
  // o.special, o.punct = [L] flags of the prompt's tokens (1 = special / punctuation), may be empty.
  plan profile(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::fastgen::profile";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_budget(fn, budget);
    check(fn);
    for (auto [flags, name] : {std::pair{o.special, "special"}, std::pair{o.punct, "punct"}})
      detail::require(flags.empty() || static_cast<std::int64_t>(flags.size()) == d.L, fn, ": observation.", name,
                      " must be empty or hold L = ", d.L, " flags, got ", flags.size());
    plan out;
    std::vector<double> a(static_cast<std::size_t>(d.L));
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      for (std::int64_t j = 0; j < d.L; ++j) {
        double s = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) s += o.attn(hk * d.group() + g, j);
        a[static_cast<std::size_t>(j)] = s;
      }
      const head h(*this, a, budget, o.special, o.punct);
      const choice c = h.choose();
      out.kept.heads.push_back(h.kept(c));
      out.per_head.push_back(c);
    }
    return out;
  }

  // The kept slots of profile(o, budget).
  selection select(const observation& o, std::int64_t budget) const { return profile(o, budget).kept; }

  class decoder;  // decode-time state, below
  // The decoder that continues this policy's prefill of `o` at `budget` (policies/list.hpp's trackers).
  decoder make_decoder(const observation& o, std::int64_t budget) const;

 private:
  void check(const char* fn) const {
    detail::require(recovery > 0 && recovery <= 1, fn, ": recovery must be in (0, 1], got ", recovery);
    detail::require(local_fraction >= 0 && local_fraction <= 1, fn, ": local_fraction must be in [0, 1], got ",
                    local_fraction);
    detail::require(frequency_fraction >= 0 && frequency_fraction <= 1, fn,
                    ": frequency_fraction must be in [0, 1], got ", frequency_fraction);
  }

  // One head's compositions over its slots: a = the head's attention [L], flags [L] or empty.
  class head {
   public:
    head(const fastgen& p, const std::vector<double>& a, std::int64_t budget, std::span<const std::uint8_t> special,
         std::span<const std::uint8_t> punct)
        : p_(p), a_(a), L_(static_cast<std::int64_t>(a.size())), keep_(std::min(budget, L_)), special_(special),
          punct_(punct), order_(a.size()) {
      for (std::int64_t j = 0; j < L_; ++j) order_[static_cast<std::size_t>(j)] = j;
      // Most attended first, ties to the lower slot: every "by attention" below walks this order.
      std::stable_sort(order_.begin(), order_.end(), [&](std::int64_t x, std::int64_t y) {
        return a_[static_cast<std::size_t>(x)] > a_[static_cast<std::size_t>(y)];
      });
      for (double x : a_) total_ += x;
    }

    // The kept set of composition c (ascending slots), per the file comment.
    std::vector<std::int64_t> kept(choice c) const {
      std::vector<std::uint8_t> in(static_cast<std::size_t>(L_), 0);
      std::int64_t count = 0;
      auto take = [&](std::int64_t j) {
        if (count < keep_ && !in[static_cast<std::size_t>(j)]) {
          in[static_cast<std::size_t>(j)] = 1;
          ++count;
        }
      };
      for (std::int64_t j : order_)
        if (flag(special_, j)) take(j);
      if (c == choice::local)
        for (std::int64_t j = std::max<std::int64_t>(0, L_ - slots(p_.local_fraction)); j < L_; ++j) take(j);
      // The other members, by attention: punctuation (from `punct` on) and the r_f B' most
      // attended unflagged slots (from `frequency` on).
      std::int64_t frequent = c >= choice::frequency ? slots(p_.frequency_fraction) : 0;
      for (std::int64_t j : order_) {
        const bool is_punct = flag(punct_, j) && !flag(special_, j);
        const bool plain = !flag(punct_, j) && !flag(special_, j);
        if (is_punct && c >= choice::punct) take(j);
        else if (plain && frequent > 0) {
          --frequent;
          take(j);
        }
      }
      std::vector<std::int64_t> row;
      for (std::int64_t j = 0; j < L_; ++j)
        if (in[static_cast<std::size_t>(j)]) row.push_back(j);
      return row;
    }

    // The recovery of a set: its share of the head's attention (1 for a head with none).
    double recovery_of(const std::vector<std::int64_t>& row) const {
      if (!(total_ > 0)) return 1.0;
      double got = 0;
      for (std::int64_t j : row) got += a_[static_cast<std::size_t>(j)];
      return got / total_;
    }

    // The rule of the file comment: the fewest kept slots with recovery >= T R*, else the best.
    choice choose() const {
      std::vector<std::int64_t> best_slots(order_.begin(), order_.begin() + keep_);
      const double target = p_.recovery * recovery_of(best_slots);
      choice pick = choice::special, best = choice::special;
      std::int64_t pick_size = -1, best_size = 0;
      double best_rec = -1;
      for (choice c : choices) {
        const std::vector<std::int64_t> row = kept(c);
        const auto n = static_cast<std::int64_t>(row.size());
        const double r = recovery_of(row);
        if (r >= target && (pick_size < 0 || n < pick_size)) {
          pick = c;
          pick_size = n;
        }
        if (r > best_rec || (r == best_rec && n < best_size)) {
          best = c;
          best_rec = r;
          best_size = n;
        }
      }
      return pick_size >= 0 ? pick : best;
    }

   private:
    static bool flag(std::span<const std::uint8_t> f, std::int64_t j) {
      return !f.empty() && f[static_cast<std::size_t>(j)] != 0;
    }
    std::int64_t slots(double fraction) const { return static_cast<std::int64_t>(fraction * static_cast<double>(keep_)); }

    const fastgen& p_;
    const std::vector<double>& a_;
    std::int64_t L_, keep_;
    std::span<const std::uint8_t> special_, punct_;
    std::vector<std::int64_t> order_;
    double total_ = 0;
  };
};

// Decode-time state: each head keeps its prefill choice; every slot has its special / punct
// flags and its accumulated attention (H2O-style, from each step's column sums). On overflow a
// head keeps the kept set of its choice built from those, by the prefill's rule (special tokens,
// then for `local` the newest slots, then the composition's other members by attention).
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

  // Per head the kept set of its choice over its current slots, capped at `budget` (ragged).
  selection select(std::int64_t budget) const {
    detail::check_budget("kvcache::policies::fastgen::decoder::select", budget);
    selection sel;
    std::vector<double> a;
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      a.assign(attn_.row(h).begin(), attn_.row(h).end());
      sel.heads.push_back(head(p_, a, budget, special_.row(h), punct_.row(h)).kept(choice_[static_cast<std::size_t>(h)]));
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

// Each head keeps the choice its prefill profile gave.
inline fastgen::decoder fastgen::make_decoder(const observation& o, std::int64_t budget) const {
  return decoder(*this, profile(o, budget).per_head);
}

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/policies/interface.hpp — what a KV policy is, as C++20 concepts, and the erased
// forms the policy list (policies/list.hpp) holds.
//
// A prefill policy reads an observation (common.hpp) and a budget and returns a selection:
//
//   prefill_policy<P>:  p.select(const observation&, std::int64_t budget) -> selection
//
// Everything a policy needs beyond the four tensors travels in the observation: FastGen's token
// flags (o.special, o.punct), PyramidKV's layer (o.layer of o.layers: `budget` is the average over
// the layers), whether the window rows were causal (o.causal). So per-layer budgets, per-head
// plans and channel selections all go through the same call: PyramidKV reads its layer's share of
// the average, FastGen's per-head choice stays behind select (fastgen::profile returns it), and
// ThinK selects key channels instead of slots (its `budget` is channels per head; the list marks
// it `axis::channels`).
//
// A decode tracker follows the cache while decoding (common.hpp, "Decoding"):
//
//   decode_tracker<T>:  t.append(const new_slot&)    one new slot of one kv head
//                       t.observe(probs [Hq, >= L])  the step's attention (a no-op for key-only
//                                                     and position policies)
//                       t.select(budget) -> selection
//                       t.compact(selection)          the cache's compaction, followed
//                       t.lengths() -> slots per head
//
// The trackers of the policy headers keep their own, narrower signatures (h2o::decoder::append(h),
// qfilter::decoder::append(h, k), ...); `as_tracker` adapts any of them to the concept, and
// `tracker` erases the type (std::function, no virtual calls) so one list can hold them all.
#pragma once

#include <concepts>
#include <cstdint>
#include <functional>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

template <class P>
concept prefill_policy = requires(const P& p, const observation& o, std::int64_t budget) {
  { p.select(o, budget) } -> std::same_as<selection>;
};

// What a tracker is told about a new slot: its kv head, its key (post-RoPE, D floats) and the
// token's flags. Trackers read what they need and ignore the rest.
struct new_slot {
  std::int64_t head = 0;
  const float* k = nullptr;  // [D]; key-scoring trackers (KNorm, Q-Filters) need it
  std::int64_t D = 0;
  bool special = false;  // FastGen
  bool punct = false;    // FastGen
  float score = 0;       // a per-token score the model gives: DMS's eviction logit; the initial
                         // accumulated score of H2O-style trackers (0 for a new token)
};

template <class T>
concept decode_tracker = requires(T& t, const T& ct, const new_slot& s, view<const float, 2> probs,
                                  const selection& sel, std::int64_t budget) {
  t.append(s);
  t.observe(probs);
  { ct.select(budget) } -> std::same_as<selection>;
  t.compact(sel);
  { ct.lengths() } -> std::convertible_to<std::vector<std::int64_t>>;
};

// Whether a policy selects cache slots (every token policy) or key channels (ThinK).
enum class axis { slots, channels };

// Which query rows the observation's attn must sum for a policy: the Lw window rows (SnapKV and
// most), every prompt row (H2O, FastGen: Lw = L), or the newest row alone (TOVA).
enum class attn_rows { window, all, last };

// A policy's own tracker seen through decode_tracker: append(new_slot) calls the tracker's own
// append with what it takes, observe is a no-op for trackers that read no attention, and a
// tracker whose budget is fixed at construction (PyramidKV's layer budget) ignores select's.
template <class D>
class as_tracker {
 public:
  explicit as_tracker(D d) : d_(std::move(d)) {}

  void append(const new_slot& s) {
    // The flags first: a pointer and an integer convert to bool, so (head, k, D) would also call
    // an append(head, bool special, bool punct).
    if constexpr (requires { d_.append(s.head, s.special, s.punct); }) {
      d_.append(s.head, s.special, s.punct);
    } else if constexpr (requires { d_.append(s.head, s.k, s.D); }) {
      d_.append(s.head, require_key(s), s.D);
    } else if constexpr (requires { d_.append(s.head, s.k); }) {
      d_.append(s.head, require_key(s));
    } else if constexpr (requires { d_.append(s.head, s.score); }) {
      d_.append(s.head, s.score);
    } else {
      d_.append(s.head);
    }
  }
  void observe(view<const float, 2> probs) {
    if constexpr (requires { d_.observe(probs); }) d_.observe(probs);
  }
  selection select(std::int64_t budget) const {
    if constexpr (requires { d_.select(budget); }) {
      return d_.select(budget);
    } else {
      return d_.select();
    }
  }
  void compact(const selection& sel) { d_.compact(sel); }
  std::vector<std::int64_t> lengths() const { return d_.lengths(); }

  // Whether observe reads the step's probabilities (the decode kernel's column sums are needed).
  static constexpr bool observes = requires(D& d, view<const float, 2> p) { d.observe(p); };

  D& get() { return d_; }
  const D& get() const { return d_; }

 private:
  static const float* require_key(const new_slot& s) {
    detail::require(s.k != nullptr && s.D >= 1, "kvcache::policies::tracker::append: this tracker scores keys: new_slot.k "
                    "must point to the slot's D >= 1 key values, got ", s.k == nullptr ? "a null key" : "D < 1");
    return s.k;
  }
  D d_;
};

// Any decode tracker behind one type (the list's trackers).
class tracker {
 public:
  tracker() = default;
  template <decode_tracker T>
  tracker(T t, bool observes) : observes_(observes) {
    auto p = std::make_shared<T>(std::move(t));
    append_ = [p](const new_slot& s) { p->append(s); };
    observe_ = [p](view<const float, 2> probs) { p->observe(probs); };
    select_ = [p](std::int64_t budget) { return p->select(budget); };
    compact_ = [p](const selection& sel) { p->compact(sel); };
    lengths_ = [p] { return std::vector<std::int64_t>(p->lengths()); };
  }

  explicit operator bool() const { return static_cast<bool>(append_); }
  bool observes() const { return observes_; }
  void append(const new_slot& s) { append_(s); }
  void observe(view<const float, 2> probs) { observe_(probs); }
  selection select(std::int64_t budget) const { return select_(budget); }
  void compact(const selection& sel) { compact_(sel); }
  std::vector<std::int64_t> lengths() const { return lengths_(); }

 private:
  bool observes_ = false;
  std::function<void(const new_slot&)> append_;
  std::function<void(view<const float, 2>)> observe_;
  std::function<selection(std::int64_t)> select_;
  std::function<void(const selection&)> compact_;
  std::function<std::vector<std::int64_t>()> lengths_;
};

template <class D>
tracker erase(D d) {
  return tracker(as_tracker<D>(std::move(d)), as_tracker<D>::observes);
}

}  // namespace mnemo::kvcache::policies

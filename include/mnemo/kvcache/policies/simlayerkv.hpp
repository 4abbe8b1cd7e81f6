// mnemo/kvcache/policies/simlayerkv.hpp — SimLayerKV: lazy layers keep only the initial and
// recent tokens.
//
// Zhang et al., "SimLayerKV: A Simple Framework for Layer-Level KV Cache Reduction" (2024). Some
// layers of a long-context model are "lazy": the attention of their last tokens concentrates on
// the first few tokens and the recent ones, and stays so while generating. A lazy layer keeps only
// those; the others keep everything. With I = {j < n_initial}, R = {j >= L - recent} and P the
// attention probabilities of the last tokens (query heads h, rows i),
//
//   share = (1 / (Hq n_rows)) sum_h sum_i sum_{j in I u R} P[h, i, j]          (mean over heads and rows)
//   lazy  = share > delta                                                      (delta = threshold)
//
// The reference code (sail-sg/SimLayerKV, SimLayerKV-decode) takes the first generated token's row
// (n_rows = 1), n_initial = 4, recent = 1024 and delta = 0.9 (Llama-3), 0.65 (Llama-2), 0.8
// (Mistral), 0.85 (Qwen); kvpress's SimLayerKVPress takes the last n_last prompt rows and the same
// sum. Here the rows are the observation window's: observation.attn holds the column sums of the
// last Lw rows, so share = sum_{h, j in I u R} attn[h, j] / sum_{h, j} attn[h, j] (the denominator
// is Hq Lw when every row's probabilities sum to 1, i.e. without learned sink logits; I and R as a
// union, so no slot is counted twice when L < n_initial + recent). The reference code never marks
// Qwen's last layer lazy: `keep_last_layers` = k marks layers >= layers - k active whatever their
// share (observation.layer / layers; 0 by default, so the rule needs no layer index).
//
// Kept set, with b the budget (slots per kv head):
//
//   lazy layer     I u R for every kv head                    (min(L, n_initial + recent) slots)
//   active layer   everything when b >= L (the paper), else I u R and then the highest group
//                  attention sums (attn summed over each kv head's query heads), b slots
//
// b must be >= min(L, n_initial + recent) (an active layer never keeps less than a lazy one).
// scores() gives the active layer's ranking (group sums, I u R set to +inf).
//
// Decoding (simlayerkv::decoder): the layer's laziness is decided once, from the prefill (set_lazy)
// or else from the first observed step (the reference code's SimLayerKV-decode), and kept; the
// decoder accumulates each step's attention (as H2O, one add per slot and query head) for the
// active layer's ranking and applies the rule above to the slots every head holds on overflow.
#pragma once

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct simlayerkv {
  static constexpr std::string_view name = "simlayerkv";

  std::int64_t n_initial = 4;         // |I|: the first tokens
  std::int64_t recent = 1024;         // |R|: the recent window
  double threshold = 0.9;             // delta (Llama-3; see the header for other models)
  std::int64_t keep_last_layers = 0;  // the last k layers are never lazy

  // The share of the window's attention on I u R (over every query head).
  double lazy_share(const observation& o) const {
    constexpr const char* fn = "kvcache::policies::simlayerkv::lazy_share";
    const obs_dims d = detail::check(fn, o, false, true);
    check_params(fn);
    double in = 0, all = 0;
    for (std::int64_t h = 0; h < d.Hq; ++h)
      for (std::int64_t j = 0; j < d.L; ++j) {
        const double a = o.attn(h, j);
        all += a;
        if (forced(j, d.L)) in += a;
      }
    return all > 0 ? in / all : 1.0;
  }

  // Whether the observed layer is lazy: share > threshold, unless it is one of the last
  // keep_last_layers layers.
  bool is_lazy(const observation& o) const {
    constexpr const char* fn = "kvcache::policies::simlayerkv::is_lazy";
    detail::require(o.layers >= 1 && o.layer >= 0 && o.layer < o.layers, fn, ": observation.layer must be in [0, layers = ",
                    o.layers, "), got ", o.layer);
    return !always_active(o.layer, o.layers) && lazy_share(o) > threshold;
  }

  // The active layer's ranking [Hkv, L]: group sums of observation.attn, I u R set to +inf.
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::simlayerkv::scores";
    const obs_dims d = detail::check(fn, o, false, true);
    check_params(fn);
    detail::check_scores(fn, out, d.Hkv, d.L);
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      for (std::int64_t j = 0; j < d.L; ++j) {
        double a = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) a += o.attn(h * d.group() + g, j);
        out(h, j) = forced(j, d.L) ? detail::keep_always : static_cast<float>(a);
      }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::simlayerkv::select";
    const obs_dims d = detail::check(fn, o, false, true);
    check_budget(fn, budget, d.L);
    if (d.L == 0 || is_lazy(o)) return keep_lazy(std::vector<std::int64_t>(static_cast<std::size_t>(d.Hkv), d.L));
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    return top_budget(s, budget);
  }

  // A lazy layer's kept set on heads of the given lengths: I u R of each.
  selection keep_lazy(const std::vector<std::int64_t>& lengths) const {
    selection sel;
    for (std::int64_t n : lengths) {
      std::vector<std::int64_t> row;
      for (std::int64_t j = 0; j < n; ++j)
        if (forced(j, n)) row.push_back(j);
      sel.heads.push_back(std::move(row));
    }
    return sel;
  }

  class decoder;  // decode-time state, below
  // The decoder that continues this policy's prefill of `o` at `budget` (policies/list.hpp's trackers).
  decoder make_decoder(const observation& o, std::int64_t budget) const;

 private:
  friend class decoder;

  bool forced(std::int64_t j, std::int64_t L) const { return j < n_initial || j >= L - recent; }
  bool always_active(std::int64_t layer, std::int64_t layers) const { return layer >= layers - keep_last_layers; }

  void check_params(const char* fn) const {
    detail::require(n_initial >= 0 && recent >= 0, fn, ": n_initial and recent must be >= 0, got ", n_initial, " and ", recent);
    detail::require(threshold >= 0 && threshold <= 1, fn, ": threshold must be in [0, 1], got ", threshold);
    detail::require(keep_last_layers >= 0, fn, ": keep_last_layers must be >= 0, got ", keep_last_layers);
  }
  void check_budget(const char* fn, std::int64_t budget, std::int64_t Lmax) const {
    check_params(fn);
    detail::check_budget(fn, budget, std::min(Lmax, n_initial + recent), " (n_initial + recent: a lazy layer's slots)");
  }
};

// Decode-time state: the layer's laziness (decided once) and the accumulated attention per slot.
class simlayerkv::decoder : public scored_slots {
 public:
  // The state of layer `layer` of `layers` over Hkv kv heads; undecided until set_lazy or the
  // first observe.
  decoder(std::int64_t Hkv, const simlayerkv& p, std::int64_t layer = 0, std::int64_t layers = 1)
      : scored_slots(heads(Hkv)), p_(p) {
    constexpr const char* fn = "kvcache::policies::simlayerkv::decoder";
    detail::require(layers >= 1 && layer >= 0 && layer < layers, fn, ": layer must be in [0, layers = ", layers, "), got ", layer);
    p_.check_params(fn);
    active_only_ = p_.always_active(layer, layers);
  }

  // The prefill's decision (simlayerkv::is_lazy); the last keep_last_layers layers stay active.
  void set_lazy(bool lazy) { lazy_ = lazy && !active_only_; }
  std::optional<bool> lazy() const { return lazy_; }

  // A new slot of head h, with an initial score (0, or its prefill attention sum).
  void append(std::int64_t h, float initial = 0.0f) { mutable_scores(h).push_back(initial); }

  // This step's probabilities, probs [Hq, >= max length] (attention::column_sums, rows = 1): added
  // to the slots' sums; the first observed step decides the laziness if nothing has yet.
  void observe(view<const float, 2> probs) {
    double in = 0, all = 0;
    for_each_head("kvcache::policies::simlayerkv::decoder::observe", probs, [&](std::int64_t h, const float* a, std::int64_t n) {
      float* s = mutable_scores(h).data();
      for (std::int64_t j = 0; j < n; ++j) {
        s[j] += a[j];
        all += a[j];
        if (p_.forced(j, n)) in += a[j];
      }
    });
    if (!lazy_) set_lazy((all > 0 ? in / all : 1.0) > p_.threshold);
  }

  // The layer's kept set: I u R of every head when lazy, else the budget rule of an active layer
  // (an undecided layer counts as active).
  selection select(std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::simlayerkv::decoder::select";
    const std::vector<std::int64_t> n = lengths();
    p_.check_budget(fn, budget, *std::max_element(n.begin(), n.end()));
    if (lazy_.value_or(false)) return p_.keep_lazy(n);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < num_heads(); ++h)
      sel.heads.push_back(detail::top_row_forced(scores(h).data(), length(h), budget, p_.n_initial, p_.recent, scratch));
    return sel;
  }

 private:
  static std::int64_t heads(std::int64_t Hkv) {
    detail::require(Hkv >= 1, "kvcache::policies::simlayerkv::decoder: Hkv must be >= 1, got ", Hkv);
    return Hkv;
  }

  simlayerkv p_;
  bool active_only_ = false;
  std::optional<bool> lazy_;
};

// The layer's laziness is decided once, from the prefill.
inline simlayerkv::decoder simlayerkv::make_decoder(const observation& o, std::int64_t /*budget*/) const {
  decoder d(o.k.extent(0), *this, o.layer, o.layers);
  d.set_lazy(is_lazy(o));
  return d;
}

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/policies/alisa.hpp — ALISA: sparse window attention (local + dynamic global).
//
// Zhao et al., "ALISA: Accelerating Large Language Model Inference via Sparsity-Aware KV
// Caching" (ISCA 2024), Sparse Window Attention: keep the locally recent tokens, and pick the
// globally important ones by the attention they received from the most recent queries only (a
// short history, so the choice follows the generation instead of the prompt):
//
//   local   the `local_fraction` x budget newest slots
//   global  the highest s_j = sum over the last `history` queries (and the group's query heads)
//           of p_i,j, filling the rest of the budget
//
// prefill: s = observation.attn (column sums of the last `history` rows: attention::column_sums);
// decoding: a ring of the last `history` steps' probabilities per slot; one step writes one
// entry per slot (O(L)), compression sums the ring (O(L history)).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct alisa {
  double local_fraction = 0.5;
  std::int64_t history = 8;

  std::int64_t local_slots(std::int64_t budget) const {
    return static_cast<std::int64_t>(local_fraction * static_cast<double>(budget));
  }

  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::alisa::scores";
    const obs_dims d = detail::check(fn, o, false, true);
    detail::check_scores(fn, out, d.Hkv, d.L);
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = 0; j < d.L; ++j) {
        double s = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) s += o.attn(hk * d.group() + g, j);
        out(hk, j) = static_cast<float>(s);
      }
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::alisa::select";
    const obs_dims d = detail::check(fn, o, false, true);
    check(fn, budget);
    tensor<float, 2> s({d.Hkv, d.L});
    scores(o, s);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < d.Hkv; ++h)
      sel.heads.push_back(detail::top_row_forced(s.as_view().ptr(h), d.L, budget, 0, local_slots(budget), scratch));
    return sel;
  }

  class decoder;  // decode-time state, defined below

 private:
  void check(const char* fn, std::int64_t budget) const {
    detail::require(local_fraction >= 0 && local_fraction <= 1, fn, ": local_fraction must be in [0, 1], got ",
                    local_fraction);
    detail::check_budget(fn, budget);
  }
};

// Decode-time state: per slot, its probabilities of the last `history` steps (a ring).
class alisa::decoder {
 public:
  decoder(std::int64_t Hkv, const alisa& p) : p_(p), ring_(Hkv) {
    detail::require(p.history >= 1, "kvcache::policies::alisa::decoder: history must be >= 1, got ", p.history);
  }
  std::int64_t num_heads() const { return ring_.num_heads(); }
  std::int64_t length(std::int64_t h) const { return ring_.length(h) / p_.history; }
  std::vector<std::int64_t> lengths() const {
    std::vector<std::int64_t> n;
    for (std::int64_t h = 0; h < num_heads(); ++h) n.push_back(length(h));
    return n;
  }
  void append(std::int64_t h) { ring_.row(h).resize(ring_.row(h).size() + static_cast<std::size_t>(p_.history), 0.0f); }
  void observe(view<const float, 2> probs) {
    constexpr const char* fn = "kvcache::policies::alisa::decoder::observe";
    const std::int64_t G = detail::check_step_probs(fn, probs, num_heads(), [this](std::int64_t h) { return length(h); });
    const std::int64_t t = step_++ % p_.history;
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      const std::int64_t n = length(h);
      // The group's sum in a contiguous pass per query head, then one strided write per slot (the
      // ring is [slot][history]: strided passes per query head cost 5x the bookkeeping).
      group_.assign(static_cast<std::size_t>(n), 0.0f);
      float* __restrict a = group_.data();
      for (std::int64_t g = 0; g < G; ++g) {
        const float* __restrict p = probs.ptr(h * G + g);
        for (std::int64_t j = 0; j < n; ++j) a[j] += p[j];
      }
      float* r = ring_.row(h).data();
      for (std::int64_t j = 0; j < n; ++j) r[j * p_.history + t] = a[j];
    }
  }
  selection select(std::int64_t budget) const {
    p_.check("kvcache::policies::alisa::decoder::select", budget);
    selection sel;
    std::vector<float> s, scratch;
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      const std::int64_t n = length(h);
      s.assign(static_cast<std::size_t>(n), 0.0f);
      const float* r = ring_.row(h).data();
      for (std::int64_t j = 0; j < n; ++j)
        for (std::int64_t t = 0; t < p_.history; ++t) s[static_cast<std::size_t>(j)] += r[j * p_.history + t];
      sel.heads.push_back(detail::top_row_forced(s.data(), n, budget, 0, p_.local_slots(budget), scratch));
    }
    return sel;
  }
  void compact(const selection& sel) {
    validate("kvcache::policies::alisa::decoder::compact", sel, lengths());
    for (std::int64_t h = 0; h < num_heads(); ++h) {
      auto& r = ring_.row(h);
      std::int64_t n = 0;
      for (std::int64_t j : sel.heads[static_cast<std::size_t>(h)]) {
        std::copy_n(r.begin() + j * p_.history, p_.history, r.begin() + n * p_.history);
        ++n;
      }
      r.resize(static_cast<std::size_t>(n * p_.history));
    }
  }

 private:
  alisa p_;
  slot_state<float> ring_;  // [Hkv][length * history]
  std::int64_t step_ = 0;
  std::vector<float> group_;  // scratch of observe
};

}  // namespace mnemo::kvcache::policies

// mnemo/kvcache/policies/duo_attention.hpp — DuoAttention: retrieval heads keep the context,
// streaming heads keep sinks + recent tokens.
//
// Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval and Streaming
// Heads" (2024). Only some heads ("retrieval heads") need the whole context; the others
// ("streaming heads") attend to the first tokens and a recent window. The paper learns a gate
// alpha_{l,h} in [0, 1] per layer l and kv head h, mixing the two attentions during training,
//
//   attn_{l,h} = alpha_{l,h} full_attn + (1 - alpha_{l,h}) streaming_attn     (sinks + recent only)
//
// and at deployment clips the gates to [0, 1] and thresholds them (duo_attn/utils.py,
// sparsify_attention_heads):
//
//   retrieval(l, h)  =  clip(alpha_{l,h}, 0, 1) >= tau                        (tau = threshold)
//
// Given gates: `gates` [layers, Hkv] (one row per layer, observation.layer picks the row; flags
// 0 / 1 work with tau = 0.5). Without gates, an on-the-fly estimate from the observation (not the
// paper's training; kvpress's DuoAttentionPress has its own experimental estimate, the area under
// the cumulated attention of a mean query): the share of head h's window attention that the
// streaming set S = {j < n_sink} u {j >= L - recent} already recovers,
//
//   r_h = sum_{g in group h} sum_{j in S} attn[g, j]  /  sum_{g in group h} sum_j attn[g, j]
//   retrieval(h) = r_h < recovery          (r_h >= recovery: streaming loses little; r_h = 1 when
//                                           the group's sums are all 0)
//
// with attn = observation.attn, the column sums of the last Lw rows (any Lw; the ratio does not
// depend on how many rows were summed).
//
// The budget (b slots per kv head on average, the layer keeps at most Hkv b slots):
//
//   streaming head   keeps S: its first n_sink and last `recent` slots, s = min(L, n_sink + recent)
//   retrieval heads  share the rest: pool = Hkv b - n_streaming s, each min(L, pool / n_retrieval)
//                    slots (the remainder of the division to the lower heads, one each); a head
//                    that cannot keep all L keeps S and then the highest group attention sums
//                    (attn summed over its query heads), or the newest slots when attn is empty
//
// b must be >= min(L, n_sink + recent), so every retrieval head keeps at least b >= s slots and
// the kept set is ragged (selection.hpp). With b >= L retrieval heads keep everything and only the
// streaming heads are compressed: the paper's deployment.
//
// Decoding (duo_attention::decoder): each head keeps the role its prefill gave (the paper fixes
// the roles offline); it accumulates every step's attention as H2O does (one add per slot and
// query head), and on overflow applies the same budget rule to the slots it holds then.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/common.hpp"

namespace mnemo::kvcache::policies {

struct duo_attention {
  static constexpr std::string_view name = "duo_attention";

  std::int64_t n_sink = 64;     // sinks kept by a streaming head (duo_attn's default; 128 in its Llama-3.1 pattern)
  std::int64_t recent = 256;    // recent window kept by a streaming head (duo_attn's default)
  view<const float, 2> gates = {};  // [layers, Hkv] learned gates alpha, or empty: estimate from observation.attn
  double threshold = 0.5;       // tau: gate >= tau -> retrieval head (duo_attn's default)
  double recovery = 0.9;        // estimate: r_h >= recovery -> streaming head

  // r_h per kv head [Hkv]: the share of the group's window attention on S (see the header).
  std::vector<double> streaming_share(const observation& o) const {
    constexpr const char* fn = "kvcache::policies::duo_attention::streaming_share";
    const obs_dims d = detail::check(fn, o, false, true);
    check_params(fn);
    return shares(o, d);
  }

  // Per kv head: 1 = retrieval head, 0 = streaming head [Hkv] (from the gates when given).
  std::vector<std::uint8_t> retrieval_heads(const observation& o) const {
    constexpr const char* fn = "kvcache::policies::duo_attention::retrieval_heads";
    return roles(o, check_obs(fn, o));
  }

  // Per head, how many slots it keeps when head h holds lengths[h] slots (see the header).
  std::vector<std::int64_t> head_budgets(const std::vector<std::uint8_t>& retrieval, const std::vector<std::int64_t>& lengths,
                                         std::int64_t budget) const {
    return budgets("kvcache::policies::duo_attention::head_budgets", retrieval, lengths, budget);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::duo_attention::select";
    const obs_dims d = check_obs(fn, o);
    const std::vector<std::uint8_t> retrieval = roles(o, d);
    const std::vector<std::int64_t> keep =
        budgets(fn, retrieval, std::vector<std::int64_t>(static_cast<std::size_t>(d.Hkv), d.L), budget);
    std::vector<float> rank(static_cast<std::size_t>(d.L));
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      for (std::int64_t j = 0; j < d.L && !o.attn.empty(); ++j) {
        double a = 0;
        for (std::int64_t g = 0; g < d.group(); ++g) a += o.attn(h * d.group() + g, j);
        rank[static_cast<std::size_t>(j)] = static_cast<float>(a);
      }
      sel.heads.push_back(keep_row(o.attn.empty() ? nullptr : rank.data(), d.L, keep[static_cast<std::size_t>(h)],
                                   retrieval[static_cast<std::size_t>(h)] != 0, scratch));
    }
    return sel;
  }

  class decoder;  // decode-time state, below
  // The decoder that continues this policy's prefill of `o` at `budget` (policies/list.hpp's trackers).
  decoder make_decoder(const observation& o, std::int64_t budget) const;

 private:
  friend class decoder;

  std::vector<std::int64_t> budgets(const char* fn, const std::vector<std::uint8_t>& retrieval,
                                    const std::vector<std::int64_t>& lengths, std::int64_t budget) const {
    check_params(fn);
    detail::require(retrieval.size() == lengths.size(), fn, ": retrieval must hold one flag per kv head (", lengths.size(),
                    "), got ", retrieval.size());
    std::int64_t Lmax = 0;
    for (std::int64_t n : lengths) Lmax = std::max(Lmax, n);
    detail::check_budget(fn, budget, std::min(Lmax, n_sink + recent), " (a streaming head's n_sink + recent slots)");
    const auto H = static_cast<std::int64_t>(lengths.size());
    std::int64_t pool = H * budget, n_retrieval = 0;
    std::vector<std::int64_t> out(lengths.size());
    for (std::size_t h = 0; h < lengths.size(); ++h) {
      if (retrieval[h]) {
        ++n_retrieval;
        continue;
      }
      out[h] = std::min(lengths[h], n_sink + recent);
      pool -= out[h];
    }
    std::int64_t i = 0;
    for (std::size_t h = 0; h < lengths.size(); ++h) {
      if (!retrieval[h]) continue;
      const std::int64_t share = pool / n_retrieval + (i++ < pool % n_retrieval ? 1 : 0);
      out[h] = std::min(lengths[h], share);
    }
    return out;
  }

  void check_params(const char* fn) const {
    detail::require(n_sink >= 0 && recent >= 0, fn, ": n_sink and recent must be >= 0, got ", n_sink, " and ", recent);
    detail::require(recovery >= 0 && recovery <= 1, fn, ": recovery must be in [0, 1], got ", recovery);
  }

  obs_dims check_obs(const char* fn, const observation& o) const {
    const obs_dims d = detail::check(fn, o, false, gates.empty() || !o.attn.empty());
    check_params(fn);
    if (!gates.empty()) {
      detail::require(o.layers >= 1 && o.layer >= 0 && o.layer < o.layers, fn, ": observation.layer must be in [0, layers = ",
                      o.layers, "), got ", o.layer);
      detail::require_shape(fn, "gates", gates, {o.layers, d.Hkv}, " [layers, Hkv]");
    }
    return d;
  }

  std::vector<double> shares(const observation& o, const obs_dims& d) const {
    std::vector<double> r;
    for (std::int64_t h = 0; h < d.Hkv; ++h) {
      double in = 0, all = 0;
      for (std::int64_t g = 0; g < d.group(); ++g)
        for (std::int64_t j = 0; j < d.L; ++j) {
          const double a = o.attn(h * d.group() + g, j);
          all += a;
          if (j < n_sink || j >= d.L - recent) in += a;
        }
      r.push_back(all > 0 ? in / all : 1.0);
    }
    return r;
  }

  std::vector<std::uint8_t> roles(const observation& o, const obs_dims& d) const {
    std::vector<std::uint8_t> out;
    if (!gates.empty()) {
      for (std::int64_t h = 0; h < d.Hkv; ++h)
        out.push_back(std::clamp(static_cast<double>(gates(o.layer, h)), 0.0, 1.0) >= threshold ? 1 : 0);
    } else {
      for (double r : shares(o, d)) out.push_back(r < recovery ? 1 : 0);
    }
    return out;
  }

  // The kept slots of one head of n slots: a streaming head its sinks and recent window, a
  // retrieval head `keep` slots, S first, then the highest `rank` (rank null: the newest).
  std::vector<std::int64_t> keep_row(const float* rank, std::int64_t n, std::int64_t keep, bool retrieval,
                                     std::vector<float>& scratch) const {
    if (retrieval && rank) return detail::top_row_forced(rank, n, keep, n_sink, recent, scratch);
    const std::int64_t window = retrieval ? keep - std::min(n_sink, keep) : recent;
    std::vector<std::int64_t> row;
    for (std::int64_t j = 0; j < n; ++j)
      if (j < n_sink || j >= n - window) row.push_back(j);
    return row;
  }
};

// Decode-time state: every head's role (fixed at prefill) and the accumulated attention of its
// slots, the rank of a retrieval head that must drop slots.
class duo_attention::decoder : public scored_slots {
 public:
  // retrieval: [Hkv] roles, e.g. duo_attention::retrieval_heads of the prefill.
  decoder(const duo_attention& p, std::vector<std::uint8_t> retrieval)
      : scored_slots(static_cast<std::int64_t>(retrieval.size())), p_(p), retrieval_(std::move(retrieval)) {
    constexpr const char* fn = "kvcache::policies::duo_attention::decoder";
    detail::require(!retrieval_.empty(), fn, ": retrieval must hold one flag per kv head (Hkv >= 1), got 0");
    p_.check_params(fn);
  }

  bool is_retrieval(std::int64_t h) const {
    detail::require(h >= 0 && h < num_heads(), "kvcache::policies::duo_attention::decoder: head must be in [0, ", num_heads(),
                    "), got ", h);
    return retrieval_[static_cast<std::size_t>(h)] != 0;
  }

  // A new slot of head h, with an initial score (0, or its prefill attention sum).
  void append(std::int64_t h, float initial = 0.0f) { mutable_scores(h).push_back(initial); }

  // This step's probabilities, probs [Hq, >= max length] (attention::column_sums, rows = 1).
  void observe(view<const float, 2> probs) {
    for_each_head("kvcache::policies::duo_attention::decoder::observe", probs, [&](std::int64_t h, const float* a, std::int64_t n) {
      float* s = mutable_scores(h).data();
      for (std::int64_t j = 0; j < n; ++j) s[j] += a[j];
    });
  }

  // The prefill's budget rule on the slots every head holds now (ragged).
  selection select(std::int64_t budget) const {
    const std::vector<std::int64_t> keep = p_.budgets("kvcache::policies::duo_attention::decoder::select", retrieval_, lengths(), budget);
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t h = 0; h < num_heads(); ++h)
      sel.heads.push_back(p_.keep_row(scores(h).data(), length(h), keep[static_cast<std::size_t>(h)], is_retrieval(h), scratch));
    return sel;
  }

 private:
  duo_attention p_;
  std::vector<std::uint8_t> retrieval_;
};

// Each head keeps the role its prefill gave.
inline duo_attention::decoder duo_attention::make_decoder(const observation& o, std::int64_t /*budget*/) const {
  return decoder(*this, retrieval_heads(o));
}

}  // namespace mnemo::kvcache::policies

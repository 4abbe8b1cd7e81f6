// mnemo/kvcache/policies/criticalkv.hpp — CriticalKV and CriticalAdaKV: attention alone does not
// say how much dropping a slot changes the layer's output; the value, carried through the head's
// output projection, does too.
//
// Feng, Lv, Cao, Xie & Zhou, "Identify Critical KV Cache in LLM Inference from an Output
// Perturbation Perspective" (2025, arXiv 2502.03805; kvpress's CriticalKVPress /
// CriticalAdaKVPress). Head h's contribution to the layer output is
// o_h W_o^h = sum_j a_h,j v_j W_o^h, so the L1 perturbation of the output when slots are evicted is
// bounded through the per-slot terms a_h,j ||v_j W_o^h||_1 (the paper's upper bound, with the
// renormalisation of the kept attention). The paper's selection is a two-stage greedy under that
// bound: a first share of the budget by attention alone, the rest by the per-slot term:
//
//   n_j      = mean over the query heads h of group hk of ||v_j W_o^h||_1     (L1, as the paper)
//   s_j      = the base policy's score (SnapKV's window attention by default)
//   stage 1  the floor(first_stage * b) slots of highest s_j               (b = min(budget, L))
//   stage 2  the rest of the b slots by the highest (s_j + epsilon) * n_j
//
// scores() returns the stage-2 score (s_j + epsilon) n_j; select() adds stage 1, so it is not
// top_budget(scores) in general.
//
// W_o: the policy holds the layer's output projection as a view w_o [Hq, Dv, Dmodel]: element
// (h, c, m) multiplies channel c of head h's attention output into model channel m, i.e. W_o^h is
// w_o[h] and the layer output is sum_h o_h w_o[h] (PyTorch's o_proj.weight is [Dmodel, Hq Dv]:
// w_o = o_proj.weight.T viewed as [Hq, Dv, Dmodel], kvpress's layout). Per query head, not per kv
// head: the heads of a GQA group share v_j but not W_o^h, so n_j is the group mean of the
// per-head norms (kvpress's rule).
//
// CriticalAdaKV (critical_adakv): AdaKV's head-adaptive allocation (adakv.hpp, adakv::allocate
// over the base scores: a per-head floor of floor(alpha b), the rest of the layer's Hkv b slots
// to the highest base scores of all heads) gives head hk its budget b_hk; then the two stages
// above run inside each head with b = b_hk, stage 1 taking max(floor(first_stage b_hk), the
// floor) slots (kvpress protects the floor's slots through both stages).
//
// Needs observation.v [Hkv, L, Dv] and what the base policy reads (SnapKV: observation.attn).
// Cost beyond the base: O(Hq L Dv Dmodel) for the projected norms; memory O(L + Dmodel).
// Numerics: the norms in double, scores stored as float.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string_view>
#include <vector>

#include "mnemo/kvcache/policies/adakv.hpp"
#include "mnemo/kvcache/policies/common.hpp"
#include "mnemo/kvcache/policies/snapkv.hpp"

namespace mnemo::kvcache::policies {

namespace critical_detail {

// n [Hkv, L]: the group mean over query heads h of ||v_j w_o[h]||_1 (see the header).
inline void projected_norms(const char* fn, const observation& o, view<const float, 3> w_o, view<float, 2> n) {
  const obs_dims d = detail::check(fn, o, false, false);
  detail::require(!o.v.empty(), fn, ": observation.v [Hkv, L, Dv] must be a non-empty view");
  detail::require(!w_o.empty(), fn, ": w_o [Hq, Dv, Dmodel] (the output projection) must be a non-empty view");
  const std::int64_t Hq = w_o.extent(0), Dv = o.v.extent(2), Dm = w_o.extent(2);
  detail::require(Hq >= 1 && Hq % d.Hkv == 0, fn, ": w_o.shape[0] (Hq) must be a positive multiple of Hkv = ", d.Hkv,
                  ", got ", Hq);
  if (!o.attn.empty())
    detail::require(o.attn.extent(0) == Hq, fn, ": w_o.shape[0] (Hq) must equal observation.attn.shape[0] = ",
                    o.attn.extent(0), ", got ", Hq);
  if (!o.q.empty())
    detail::require(o.q.extent(0) == Hq, fn, ": w_o.shape[0] (Hq) must equal observation.q.shape[0] = ", o.q.extent(0),
                    ", got ", Hq);
  detail::require(w_o.extent(1) == Dv && Dm >= 1, fn, ": w_o must have shape [Hq, Dv = ", Dv,
                  " (from observation.v), Dmodel >= 1], got ", shape_string(w_o.shape()));
  detail::check_scores(fn, n, d.Hkv, d.L);
  const std::int64_t G = Hq / d.Hkv;
  std::vector<double> y(static_cast<std::size_t>(Dm));
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
    for (std::int64_t j = 0; j < d.L; ++j) {
      double acc = 0;
      for (std::int64_t g = 0; g < G; ++g) {
        std::fill(y.begin(), y.end(), 0.0);
        for (std::int64_t c = 0; c < Dv; ++c) {
          const double vc = o.v(hk, j, c);
          const float* w = w_o.ptr(hk * G + g, c);
          for (std::int64_t m = 0; m < Dm; ++m) y[static_cast<std::size_t>(m)] += vc * w[m];
        }
        for (double ym : y) acc += std::abs(ym);
      }
      n(hk, j) = static_cast<float>(acc / static_cast<double>(G));
    }
}

// The two stages in one head: the `first` best of base[0, L), then the best of
// (base + epsilon) * norm up to `keep` slots, ascending.
inline std::vector<std::int64_t> two_stage(const float* base, const float* norm, std::int64_t L, std::int64_t first,
                                           std::int64_t keep, float epsilon, std::vector<float>& scratch) {
  scratch.resize(static_cast<std::size_t>(L));
  for (std::int64_t j = 0; j < L; ++j) scratch[static_cast<std::size_t>(j)] = (base[j] + epsilon) * norm[j];
  for (std::int64_t j : detail::top_row(base, L, first)) scratch[static_cast<std::size_t>(j)] = detail::keep_always;
  return detail::top_row(scratch.data(), L, keep);
}

inline void check_params(const char* fn, double first_stage, float epsilon) {
  detail::require(first_stage >= 0.0 && first_stage <= 1.0, fn, ": first_stage must be in [0, 1], got ", first_stage);
  detail::require(epsilon >= 0.0f, fn, ": epsilon must be >= 0, got ", epsilon);
}

}  // namespace critical_detail

template <class Base = snapkv>
struct criticalkv {
  static constexpr std::string_view name = "criticalkv";

  Base base{};                    // stage-1 scorer: anything with scores(observation, view<float, 2>)
  view<const float, 3> w_o{};     // [Hq, Dv, Dmodel] the layer's output projection, per query head
  double first_stage = 0.5;       // share of the budget chosen by the base score alone
  float epsilon = 1e-4f;          // added to the base score before the projected norm

  // The group mean of ||v_j w_o[h]||_1, n [Hkv, L].
  void projected_norms(const observation& o, view<float, 2> n) const {
    critical_detail::projected_norms("kvcache::policies::criticalkv::projected_norms", o, w_o, n);
  }

  // The stage-2 score (s_j + epsilon) n_j, out [Hkv, L].
  void scores(const observation& o, view<float, 2> out) const {
    constexpr const char* fn = "kvcache::policies::criticalkv::scores";
    const obs_dims d = detail::check(fn, o, false, false);
    critical_detail::check_params(fn, first_stage, epsilon);
    detail::check_scores(fn, out, d.Hkv, d.L);
    tensor<float, 2> n({d.Hkv, d.L});
    critical_detail::projected_norms(fn, o, w_o, view<float, 2>(n.data(), {d.Hkv, d.L}));
    base.scores(o, out);
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      for (std::int64_t j = 0; j < d.L; ++j) out(hk, j) = (out(hk, j) + epsilon) * n(hk, j);
  }

  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::criticalkv::select";
    const obs_dims d = detail::check(fn, o, false, false);
    critical_detail::check_params(fn, first_stage, epsilon);
    detail::check_budget(fn, budget);
    if (d.L == 0) return selection{std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(d.Hkv))};
    tensor<float, 2> s({d.Hkv, d.L}), n({d.Hkv, d.L});
    const view<float, 2> sv(s.data(), {d.Hkv, d.L}), nv(n.data(), {d.Hkv, d.L});
    critical_detail::projected_norms(fn, o, w_o, nv);
    base.scores(o, sv);
    const std::int64_t keep = std::min(budget, d.L);
    const auto first = static_cast<std::int64_t>(std::floor(first_stage * static_cast<double>(keep)));
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk)
      sel.heads.push_back(critical_detail::two_stage(sv.ptr(hk), nv.ptr(hk), d.L, first, keep, epsilon, scratch));
    return sel;
  }
};

template <class Base = snapkv>
struct critical_adakv {
  static constexpr std::string_view name = "critical_adakv";

  Base base{};                    // the scorer both the allocation and stage 1 read
  view<const float, 3> w_o{};     // [Hq, Dv, Dmodel] the layer's output projection, per query head
  double alpha = 0.2;             // AdaKV's per-head floor, a fraction of the average budget
  double first_stage = 0.5;       // share of each head's budget chosen by the base score alone
  float epsilon = 1e-4f;

  // The stage-2 score (s_j + epsilon) n_j, out [Hkv, L] (as criticalkv::scores).
  void scores(const observation& o, view<float, 2> out) const {
    criticalkv<Base>{base, w_o, first_stage, epsilon}.scores(o, out);
  }

  // budget: the average number of kept slots per kv head (the layer keeps Hkv min(budget, L)).
  selection select(const observation& o, std::int64_t budget) const {
    constexpr const char* fn = "kvcache::policies::critical_adakv::select";
    const obs_dims d = detail::check(fn, o, false, false);
    critical_detail::check_params(fn, first_stage, epsilon);
    detail::check_budget(fn, budget);
    if (d.L == 0) return selection{std::vector<std::vector<std::int64_t>>(static_cast<std::size_t>(d.Hkv))};
    tensor<float, 2> s({d.Hkv, d.L}), n({d.Hkv, d.L});
    const view<float, 2> sv(s.data(), {d.Hkv, d.L}), nv(n.data(), {d.Hkv, d.L});
    critical_detail::projected_norms(fn, o, w_o, nv);
    base.scores(o, sv);
    const selection alloc = adakv{snapkv{}, alpha}.allocate(sv, budget);  // checks alpha
    const auto floor = static_cast<std::int64_t>(std::floor(alpha * static_cast<double>(std::min(budget, d.L))));
    selection sel;
    std::vector<float> scratch;
    for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
      const std::int64_t b = alloc.kept(hk);
      const auto staged = static_cast<std::int64_t>(std::floor(first_stage * static_cast<double>(b)));
      const std::int64_t first = std::max(staged, std::min(floor, b));
      sel.heads.push_back(critical_detail::two_stage(sv.ptr(hk), nv.ptr(hk), d.L, first, b, epsilon, scratch));
    }
    return sel;
  }
};

}  // namespace mnemo::kvcache::policies

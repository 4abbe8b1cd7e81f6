// mnemo/linear/gated_delta_rule.hpp — Gated DeltaNet (Yang, Kautz & Hatamizadeh, "Gated Delta
// Networks: Improving Mamba2 with Delta Rule", ICLR 2025): the delta rule with a scalar log-gate
// per head and step, applied to the state before the correction.
//
//   S'  = exp(g_t) S_{t-1}                             decay first (g_t <= 0)
//   u_t = beta_t (v_t - S'^T k_t)
//   S_t = S' + k_t u_t^T                               S [Dk, Dv], S_0 = state
//   o_t = (scale q_t)^T S_t                            read after the write
//
// i.e. S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. beta in [0, 2] and
// options.use_qk_l2norm as for delta_rule.hpp, whose WY / UT-transform chunk kernel runs this
// with the decay tables of common.hpp (exact range sums, so g = -inf resets the state exactly).
//
// Decoding: gated_delta_rule_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], g [B, H, L], beta [B, H, L], o [B, H, L, Dv],
// state [B, H, Dk, Dv].
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/linear/common.hpp"
#include "mnemo/linear/delta_rule.hpp"

namespace mnemo::linear {

namespace reference {

// Gated DeltaNet, one token at a time in double.
template <class Q, class K, class V>
void gated_delta_rule(const Q& q,                 // [B, H, L, Dk]
                      const K& k,                 // [B, H, L, Dk]
                      const V& v,                 // [B, H, L, Dv]
                      view<const float, 3> g,     // [B, H, L] log-decays <= 0
                      view<const float, 3> beta,  // [B, H, L] in [0, 2]
                      view<float, 4> o,           // [B, H, L, Dv]
                      view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
                      const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::gated_delta_rule";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_scalar_gate(fn, g, d);
  detail::check_beta(fn, beta, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    std::vector<double> s = detail::reference_load_state(hv.state, d), u(d.Dv);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      const double decay = std::exp(static_cast<double>(g(b, h, t)));
      for (double& e : s) e *= decay;            // S' = exp(g) S
      for (std::int64_t c = 0; c < d.Dv; ++c) {  // u = beta (v - S'^T k)
        double sk = 0;
        for (std::int64_t i = 0; i < d.Dk; ++i) sk += s[i * d.Dv + c] * kt[i];
        u[c] = beta(b, h, t) * (vt[c] - sk);
      }
      for (std::int64_t i = 0; i < d.Dk; ++i)
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] += kt[i] * u[c];  // S = S' + k u^T
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

// Gated DeltaNet; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gated_delta_rule(const Q& q,                 // [B, H, L, Dk]
                      const K& k,                 // [B, H, L, Dk]
                      const V& v,                 // [B, H, L, Dv]
                      view<const float, 3> g,     // [B, H, L] log-decays <= 0
                      view<const float, 3> beta,  // [B, H, L] in [0, 2]
                      view<float, 4> o,           // [B, H, L, Dv]
                      view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
                      const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::gated_delta_rule";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_scalar_gate(fn, g, d);
  detail::check_beta(fn, beta, d);
  detail::run_delta<true, Arch, T>(d, cview(q), cview(k), cview(v), g, beta, o, state, opt);
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv], g and beta [B, H]; continues `state`.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gated_delta_rule_step(const Q& q, const K& k, const V& v,
                           view<const float, 2> g,     // [B, H]
                           view<const float, 2> beta,  // [B, H]
                           view<float, 3> o,           // [B, H, Dv]
                           view<float, 4> state,       // [B, H, Dk, Dv] in and out
                           options opt = {}) {
  opt.path = form::recurrent;
  gated_delta_rule<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)), detail::token_view(g),
      detail::token_view(beta), detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, the same view (in place) or
// disjoint, e.g. the slots of a linear::state_ring (state_ring.hpp); bit for bit the in-place step.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gated_delta_rule_step(const Q& q, const K& k, const V& v,
                           view<const float, 2> g,         // [B, H]
                           view<const float, 2> beta,      // [B, H]
                           view<float, 3> o,               // [B, H, Dv]
                           view<const float, 4> state_in,  // [B, H, Dk, Dv]
                           view<float, 4> state_out,       // [B, H, Dk, Dv]
                           options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::gated_delta_rule_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto g3 = detail::token_view(g);
  const auto beta3 = detail::token_view(beta);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, false);
  detail::check_scalar_gate(fn, g3, d);
  detail::check_beta(fn, beta3, d);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t b, std::int64_t h, const view<const float, 2>& src) {
                                  detail::delta_recurrent_head<true, Arch, true>(d, hv, g3.ptr(b, h),
                                                                                 beta3.ptr(b, h), src);
                                });
}

}  // namespace mnemo::linear

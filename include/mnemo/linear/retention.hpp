// mnemo/linear/retention.hpp — retention (Sun et al., "Retentive Network: A Successor to
// Transformer for Large Language Models", 2023): linear attention with a fixed decay per head.
//
//   S_t = gamma_h S_{t-1} + k_t v_t^T                  S [Dk, Dv], S_0 = state
//   o_t = (scale q_t)^T S_t                            read after the write
//
// gamma [H] in (0, 1]; RetNet's choice is gamma_h = 1 - 2^(-5-h) (retnet_gamma). This is the
// scalar-decay chunk kernel of linear_attn.hpp with the constant log-gate log(gamma_h) per step:
// the chunk's decay table is D_tj = gamma_h^(t-j), RetNet's chunkwise form. RetNet's group norm,
// swish gate and xPos rotation are not part of the op (they act on q, k and o outside it).
//
// Decoding: retention_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], gamma [H], o [B, H, L, Dv], state [B, H, Dk, Dv].
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/linear/common.hpp"
#include "mnemo/linear/linear_attn.hpp"

namespace mnemo::linear {

// RetNet's per-head decays: gamma_h = 1 - 2^(-5-h).
inline tensor<float, 1> retnet_gamma(std::int64_t H) {
  tensor<float, 1> gamma({H});
  for (std::int64_t h = 0; h < H; ++h) gamma(h) = static_cast<float>(1.0 - std::exp2(-5.0 - static_cast<double>(h)));
  return gamma;
}

namespace detail {

inline void check_gamma(const char* fn, const view<const float, 1>& gamma, const dims& d) {
  mnemo::detail::require_data(fn, "gamma", gamma, " [H]");
  mnemo::detail::require_shape(fn, "gamma", gamma, {d.H}, " [H]");
  for (std::int64_t h = 0; h < d.H; ++h)
    mnemo::detail::require(gamma(h) > 0.0f && gamma(h) <= 1.0f, fn, ": gamma must be in (0, 1], got gamma[", h,
                           "] = ", gamma(h));
}

}  // namespace detail

namespace reference {

// Retention, one token at a time in double.
template <class Q, class K, class V>
void retention(const Q& q,                  // [B, H, L, Dk]
               const K& k,                  // [B, H, L, Dk]
               const V& v,                  // [B, H, L, Dv]
               view<const float, 1> gamma,  // [H]
               view<float, 4> o,            // [B, H, L, Dv]
               view<float, 4> state = {},    // [B, H, Dk, Dv] in and out, or empty
               const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::retention";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_gamma(fn, gamma, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, bh / d.H, h);
    const double decay = gamma(h);
    std::vector<double> s = detail::reference_load_state(hv.state, d);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t i = 0; i < d.Dk; ++i)
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] = decay * s[i * d.Dv + c] + kt[i] * vt[c];
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

// Retention; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void retention(const Q& q,                  // [B, H, L, Dk]
               const K& k,                  // [B, H, L, Dk]
               const V& v,                  // [B, H, L, Dv]
               view<const float, 1> gamma,  // [H]
               view<float, 4> o,            // [B, H, L, Dv]
               view<float, 4> state = {},    // [B, H, Dk, Dv] in and out, or empty
               const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::retention";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_gamma(fn, gamma, d);
  detail::run_scalar_decay<Arch, T>(d, cview(q), cview(k), cview(v), o, state, opt, [&](std::int64_t, std::int64_t h) {
    return detail::scalar_gate{nullptr, std::log(gamma(h))};
  });
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv]; continues `state` exactly.
template <class Q, class K, class V, class Arch = simd::default_arch>
void retention_step(const Q& q, const K& k, const V& v, view<const float, 1> gamma,
                    view<float, 3> o,      // [B, H, Dv]
                    view<float, 4> state,  // [B, H, Dk, Dv] in and out
                    options opt = {}) {
  opt.path = form::recurrent;
  retention<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)), gamma,
      detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, the same view (in place) or
// disjoint, e.g. the slots of a linear::state_ring (state_ring.hpp); bit for bit the in-place step.
template <class Q, class K, class V, class Arch = simd::default_arch>
void retention_step(const Q& q, const K& k, const V& v, view<const float, 1> gamma,
                    view<float, 3> o,               // [B, H, Dv]
                    view<const float, 4> state_in,  // [B, H, Dk, Dv]
                    view<float, 4> state_out,       // [B, H, Dk, Dv]
                    options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::retention_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, false);
  detail::check_gamma(fn, gamma, d);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t, std::int64_t h, const view<const float, 2>& src) {
                                  detail::scalar_decay_recurrent_head<Arch, true>(
                                      d, hv, detail::scalar_gate{nullptr, std::log(gamma(h))}, src);
                                });
}

}  // namespace mnemo::linear

// mnemo/linear/simple_gla.hpp — linear attention with a scalar data-dependent decay per head and
// step (fla's simple_gla; the state-space-duality special case of Mamba-2, Dao & Gu, "Transformers
// are SSMs", ICML 2024, with its A_t = exp(g_t) scalar times identity).
//
//   S_t = exp(g_t) S_{t-1} + k_t v_t^T                 S [Dk, Dv], S_0 = state, g_t <= 0
//   o_t = (scale q_t)^T S_t                            read after the write
//
// The scalar-decay chunk kernel of linear_attn.hpp runs it: D_tj = exp(g_{j+1} + ... + g_t) for
// j <= t, summed over the exact range (common.hpp), so g = -inf (a full reset) gives exact zeros.
//
// Decoding: simple_gla_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], g [B, H, L], o [B, H, L, Dv], state [B, H, Dk, Dv].
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "mnemo/linear/common.hpp"
#include "mnemo/linear/linear_attn.hpp"

namespace mnemo::linear {

namespace reference {

// Simple gated linear attention, one token at a time in double.
template <class Q, class K, class V>
void simple_gla(const Q& q,              // [B, H, L, Dk]
                const K& k,              // [B, H, L, Dk]
                const V& v,              // [B, H, L, Dv]
                view<const float, 3> g,  // [B, H, L] log-decays <= 0
                view<float, 4> o,        // [B, H, L, Dv]
                view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
                const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::simple_gla";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_scalar_gate(fn, g, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    std::vector<double> s = detail::reference_load_state(hv.state, d);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      const double decay = std::exp(static_cast<double>(g(b, h, t)));
      for (std::int64_t i = 0; i < d.Dk; ++i)
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] = decay * s[i * d.Dv + c] + kt[i] * vt[c];
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

// Simple gated linear attention; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void simple_gla(const Q& q,              // [B, H, L, Dk]
                const K& k,              // [B, H, L, Dk]
                const V& v,              // [B, H, L, Dv]
                view<const float, 3> g,  // [B, H, L] log-decays <= 0
                view<float, 4> o,        // [B, H, L, Dv]
                view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
                const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::simple_gla";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_scalar_gate(fn, g, d);
  detail::run_scalar_decay<Arch, T>(d, cview(q), cview(k), cview(v), o, state, opt, [&](std::int64_t b, std::int64_t h) {
    return detail::scalar_gate{g.ptr(b, h), 0.0f};
  });
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv], g [B, H]; continues `state` exactly.
template <class Q, class K, class V, class Arch = simd::default_arch>
void simple_gla_step(const Q& q, const K& k, const V& v,
                     view<const float, 2> g,  // [B, H]
                     view<float, 3> o,        // [B, H, Dv]
                     view<float, 4> state,    // [B, H, Dk, Dv] in and out
                     options opt = {}) {
  opt.path = form::recurrent;
  simple_gla<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)), detail::token_view(g),
      detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, the same view (in place) or
// disjoint, e.g. the slots of a linear::state_ring (state_ring.hpp); bit for bit the in-place step.
template <class Q, class K, class V, class Arch = simd::default_arch>
void simple_gla_step(const Q& q, const K& k, const V& v,
                     view<const float, 2> g,         // [B, H]
                     view<float, 3> o,               // [B, H, Dv]
                     view<const float, 4> state_in,  // [B, H, Dk, Dv]
                     view<float, 4> state_out,       // [B, H, Dk, Dv]
                     options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::simple_gla_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto g3 = detail::token_view(g);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, false);
  detail::check_scalar_gate(fn, g3, d);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t b, std::int64_t h, const view<const float, 2>& src) {
                                  detail::scalar_decay_recurrent_head<Arch, true>(
                                      d, hv, detail::scalar_gate{g3.ptr(b, h), 0.0f}, src);
                                });
}

}  // namespace mnemo::linear

// mnemo/linear/linear_attn.hpp — linear attention (Katharopoulos et al., "Transformers are RNNs",
// ICML 2020), recurrent and chunkwise-parallel, and the scalar-decay chunk kernel that retention
// and simple_gla reuse.
//
//   S_t = S_{t-1} + phi(k_t) v_t^T                    S [Df, Dv], S_0 = state
//   o_t = (scale phi(q_t))^T S_t                       read after the write
//
// phi is options.map (identity, elu+1, relu, Based's taylor2; see common.hpp), Df = feature_dim.
// With options.normalize the output is divided by the running key sum z_t = z_0 + sum phi(k_j):
//   o_t = (scale phi(q_t))^T S_t / ((scale phi(q_t))^T z_t + 1e-6)
// and z rides along as one more value column: the state is then [B, H, Df, Dv + 1], its last
// column z (so normalisation is exact across pieces too). Normalisation is meant for positive maps
// (elu_plus_one, taylor2), whose denominators are > 0.
//
// Chunked form (the GEMM-shaped fast path; Yang et al., "Gated Linear Attention Transformers with
// Hardware-Efficient Training", ICML 2024, section 3). A chunk of n tokens with rows Q, K, V and the
// state S at its start, and a scalar log-gate g per token (0 for linear attention) with the
// decay tables of common.hpp (prefix Gamma_t, suffix R_j, decay D_tj for j <= t):
//   O     = diag(Gamma) Q S + ((Q K^T) o D) V          (o: element-wise, lower triangle incl. diagonal)
//   S_new = Gamma_{n-1} S + (diag(R) K)^T V
// Cost per token: 4 Df Ds (the two state GEMMs) + about n (Df + Ds) (the triangle) multiply-adds.
//
// Decoding: linear_attn_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], o [B, H, L, Dv], state [B, H, Df, Dv (+1)].
// Numerics: f32, accumulated by the SIMD micro-kernels (chunked: common.hpp chunk_products, with
// Eigen's GEMM where Ds is not a multiple of the vector width or SIMD is off; recurrent:
// common.hpp recurrent_token); the reference in double.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "mnemo/linear/common.hpp"

namespace mnemo::linear {

namespace reference {

// Linear attention, one token at a time in double.
template <class Q, class K, class V>
void linear_attn(const Q& q,                // [B, H, L, Dk]
                 const K& k,                // [B, H, L, Dk]
                 const V& v,                // [B, H, L, Dv]
                 view<float, 4> o,          // [B, H, L, Dv]
                 view<float, 4> state = {},  // [B, H, Df, Dv (+1)] in and out, or empty
                 const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const auto d = detail::check_common<T>("linear::reference::linear_attn", cview(q), cview(k), cview(v), o, state, opt, true);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, bh / d.H, bh % d.H);
    std::vector<double> s = detail::reference_load_state(hv.state, d);  // S [Df, Ds]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t i = 0; i < d.Df; ++i)
        for (std::int64_t c = 0; c < d.Ds; ++c) s[i * d.Ds + c] += kt[i] * vt[c];  // S += phi(k) v^T
      detail::reference_read(qt, s, d, hv.o.ptr(t));                                // o = (scale phi(q))^T S
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

namespace detail {

// The log-gate source of one head for the scalar-decay members: per step (g[t]) or constant.
struct scalar_gate {
  const float* g = nullptr;  // [L], or null: every step has log-gate `constant`
  float constant = 0;        // 0: no decay (linear attention)
  bool decays() const { return g != nullptr || constant != 0.0f; }
  float at(std::int64_t t) const { return g ? g[t] : constant; }
};

// Recurrent form, one head: per token one pass over the state (common.hpp, recurrent_token),
//   S_i = a S_i + k_i v ;  o += q_i S_i.
// FromSrc (an out-of-place step): the first token reads src and writes hv.state.
template <class Arch, bool FromSrc = false, class T>
void scalar_decay_recurrent_head(const dims& d, const head_views<T>& hv, scalar_gate gate,
                                 const view<const float, 2>& src = {}) {
  matrix zero;
  state_map s = map_state(hv.state, d.Df, d.Ds, zero);
  std::vector<float> q(d.Df), k(d.Df), v(d.Ds), acc(d.Ds), scratch(d.Dk);
  for (std::int64_t t = 0; t < d.L; ++t) {
    prepare_row<Arch>(hv.q.ptr(t), d, d.scale, q.data(), scratch.data());
    prepare_row<Arch>(hv.k.ptr(t), d, 1.0f, k.data(), scratch.data());
    simd::convert<Arch>(hv.v.ptr(t), v.data(), d.Dv);
    if (d.normalize) v[d.Dv] = 1.0f;
    const float a = gate.decays() ? simd::exp<Arch>(gate.at(t)) : 1.0f;
    const bool from_src = FromSrc && t == 0;
    recurrent_token<Arch>(s.data(), s.outerStride(), d.Df, d.Ds, q.data(), k.data(), v.data(), nullptr, {a, nullptr},
                          acc.data(), nullptr, from_src ? src.data() : nullptr, from_src ? src.stride(0) : 0);
    store_output(acc.data(), d, hv.o.ptr(t));
  }
}

// One chunk of the chunked form (see the header comment for the equations). Q [n, Df], K [n, Df],
// V [n, Ds], O [n, Ds]; Q is scaled by `qscale` here (1 when it was scaled on loading). With
// Decays, K is scaled in place by the suffix decays (so it must be a writable copy).
template <bool Decays, class QM, class KM, class VM, class OM>
void scalar_decay_chunk(const QM& Q, KM&& K, const VM& V, OM&& O, state_map& s, matrix& a, const matrix& decay,
                        const float* prefix, const float* suffix, float qscale) {
  const std::int64_t n = Q.rows();
  auto A = a.topLeftCorner(n, n);
  // Inter-chunk: O = diag(Gamma) Q S.
  gemm<false>(O, Q, s);
  // Intra-chunk: A = (Q K^T) o D on the lower triangle, O += A V.
  A.template triangularView<Eigen::Lower>() = Q * K.transpose();
  if (Decays || qscale != 1.0f) {
    for (std::int64_t t = 0; t < n; ++t) {
      O.row(t) *= Decays ? qscale * prefix[t] : qscale;
      float* at = &A(t, 0);
      const float* dt = &decay(t, 0);
      for (std::int64_t j = 0; j <= t; ++j) at[j] *= Decays ? qscale * dt[j] : qscale;
    }
  }
  O.noalias() += A.template triangularView<Eigen::Lower>() * V;
  // State: S = Gamma_{n-1} S + (diag(R) K)^T V.
  if constexpr (Decays) {
    s *= prefix[n - 1];
    for (std::int64_t j = 0; j < n; ++j) K.row(j) *= suffix[j];
  }
  gemm<true>(s, K.transpose(), V);
}

// Rows [t0, t0 + n) of a [L, D] head view of f32, read in place through an Eigen map.
using const_rows = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
using rows_map = Eigen::Map<matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

template <class X>
auto rows_of(const view<X, 2>& x, std::int64_t t0, std::int64_t n) {
  using map = std::conditional_t<std::is_const_v<X>, const_rows, rows_map>;
  return map(x.ptr(t0), n, x.extent(1), Eigen::OuterStride<>(x.stride(0)));
}

// One chunk on the SIMD products (common.hpp, chunk_products): Q [n, Df], K [n, Df], V [n, Ds],
// O [n, Ds] as row blocks; Q is scaled by `qscale` through the row factors of O and the scores.
// kw [C, Df] receives the suffix-decayed K (Decays); alpha_o [C], alpha_s [Df] are scratch.
template <bool Decays, class Arch>
void scalar_decay_chunk_simd(std::int64_t n, std::int64_t Df, std::int64_t Ds, crows q, crows k, crows v, rows o,
                             state_map& s, matrix& kw, matrix& a, const matrix& decay, const float* prefix,
                             const float* suffix, float qscale, float* alpha_o, float* alpha_s) {
  using cmap = Eigen::Map<const matrix, Eigen::Unaligned, Eigen::OuterStride<>>;
  const cmap Q(q.p, n, Df, Eigen::OuterStride<>(q.ld)), K(k.p, n, Df, Eigen::OuterStride<>(k.ld));
  a.topLeftCorner(n, n).template triangularView<Eigen::Lower>() = Q * K.transpose();
  for (std::int64_t t = 0; t < n; ++t) {  // A = qscale (Q K^T o D), zero above the diagonal
    float* at = &a(t, 0);
    const float* dt = &decay(t, 0);
    for (std::int64_t j = 0; j <= t; ++j) at[j] *= Decays ? qscale * dt[j] : qscale;
    std::fill(at + t + 1, at + n, 0.0f);
    alpha_o[t] = Decays ? qscale * prefix[t] : qscale;
  }
  crows kwr = k;
  if constexpr (Decays) {
    for (std::int64_t j = 0; j < n; ++j) kw.row(j) = K.row(j) * suffix[j];
    std::fill(alpha_s, alpha_s + Df, prefix[n - 1]);
    kwr = {kw.data(), Df};
  }
  chunk_products<Arch>(n, Df, Ds, q, {a.data(), a.cols()}, kwr, v, o, s.data(), s.outerStride(), alpha_o,
                       Decays ? alpha_s : nullptr);
}

// Chunked form, one head. f32 inputs that need no preparation (identity map, no L2 norm, no
// normalisation) are read in place and the output is written in place, with the scale applied to
// the products instead of to q: about 5% faster at H = 8, L = 8192, Dk = Dv = 128 than copying.
template <class Arch, class T>
void scalar_decay_chunked_head(const dims& d, const head_views<T>& hv, scalar_gate gate, std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  matrix zero;
  state_map s = map_state(hv.state, d.Df, d.Ds, zero);
  matrix q(C, d.Df), k(C, d.Df), v(C, d.Ds), out(C, d.Ds), a(C, C), decay(C, C);
  matrix kin;  // the prepared K of the SIMD path (k holds its decayed copy)
  if (simd_chunks<Arch>(d.Ds) && !(std::is_same_v<T, float> && d.map == feature_map::identity && !d.l2norm && !d.normalize))
    kin.resize(C, d.Df);
  std::vector<float> g(C), prefix(C), suffix(C), scratch(d.Dk);
  const bool decays = gate.decays();
  constexpr bool f32 = std::is_same_v<T, float>;
  const bool in_place = f32 && d.map == feature_map::identity && !d.l2norm && !d.normalize;
  const bool fast = simd_chunks<Arch>(d.Ds);
  std::vector<float> alpha_o(fast ? C : 0), alpha_s(fast ? d.Df : 0);
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    if (decays) {
      for (std::int64_t t = 0; t < n; ++t) g[t] = gate.at(t0 + t);
      scalar_decay_tables<Arch>(g.data(), n, decay, prefix.data(), suffix.data());
    }
    if (fast) {
      auto run = [&](crows qr, crows kr, crows vr, rows orow, float qscale) {
        if (decays)
          scalar_decay_chunk_simd<true, Arch>(n, d.Df, d.Ds, qr, kr, vr, orow, s, k, a, decay, prefix.data(),
                                              suffix.data(), qscale, alpha_o.data(), alpha_s.data());
        else
          scalar_decay_chunk_simd<false, Arch>(n, d.Df, d.Ds, qr, kr, vr, orow, s, k, a, decay, prefix.data(),
                                               suffix.data(), qscale, alpha_o.data(), alpha_s.data());
      };
      if constexpr (f32) {
        if (in_place) {
          run({hv.q.ptr(t0), hv.q.stride(0)}, {hv.k.ptr(t0), hv.k.stride(0)}, {hv.v.ptr(t0), hv.v.stride(0)},
              {hv.o.ptr(t0), hv.o.stride(0)}, d.scale);
          continue;
        }
      }
      prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, scratch.data());
      prepare_rows<Arch>(hv.k, t0, n, d, 1.0f, kin, scratch.data());
      load_values<Arch>(hv.v, t0, n, d, v);
      run({q.data(), d.Df}, {kin.data(), d.Df}, {v.data(), d.Ds}, {out.data(), d.Ds}, 1.0f);
      for (std::int64_t t = 0; t < n; ++t) store_output(out.row(t).data(), d, hv.o.ptr(t0 + t));
      continue;
    }
    if constexpr (f32) {
      if (in_place) {
        if (decays) {  // K is copied: the suffix decays scale it
          auto K = k.topRows(n);
          K = rows_of(hv.k, t0, n);
          scalar_decay_chunk<true>(rows_of(hv.q, t0, n), K, rows_of(hv.v, t0, n), rows_of(hv.o, t0, n), s, a, decay,
                                   prefix.data(), suffix.data(), d.scale);
        } else {
          scalar_decay_chunk<false>(rows_of(hv.q, t0, n), rows_of(hv.k, t0, n), rows_of(hv.v, t0, n),
                                    rows_of(hv.o, t0, n), s, a, decay, prefix.data(), suffix.data(), d.scale);
        }
        continue;
      }
    }
    prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, scratch.data());
    prepare_rows<Arch>(hv.k, t0, n, d, 1.0f, k, scratch.data());
    load_values<Arch>(hv.v, t0, n, d, v);
    if (decays) {
      scalar_decay_chunk<true>(q.topRows(n), k.topRows(n), v.topRows(n), out.topRows(n), s, a, decay, prefix.data(),
                               suffix.data(), 1.0f);
    } else {
      scalar_decay_chunk<false>(q.topRows(n), k.topRows(n), v.topRows(n), out.topRows(n), s, a, decay,
                                prefix.data(), suffix.data(), 1.0f);
    }
    for (std::int64_t t = 0; t < n; ++t) store_output(out.row(t).data(), d, hv.o.ptr(t0 + t));
  }
}

// Every (batch, head) through the form choose_form() picks. gate_of(b, h) -> scalar_gate.
template <class Arch, class T, class GateOf>
void run_scalar_decay(const dims& d, const view<const T, 4>& q, const view<const T, 4>& k, const view<const T, 4>& v,
                      const view<float, 4>& o, const view<float, 4>& state, const options& opt, GateOf&& gate_of) {
  if (d.L == 0) return;
  const form f = choose_form(opt, d.L);
  for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const head_views<T> hv(q, k, v, o, state, b, h);
    if (f == form::chunked) {
      scalar_decay_chunked_head<Arch>(d, hv, gate_of(b, h), chunk_size(opt, default_chunk_size));
    } else {
      scalar_decay_recurrent_head<Arch>(d, hv, gate_of(b, h));
    }
  });
}

}  // namespace detail

// Linear attention; see the header comment. q, k, v: tensors or views of float, f16 or bf16.
template <class Q, class K, class V, class Arch = simd::default_arch>
void linear_attn(const Q& q,                // [B, H, L, Dk]
                 const K& k,                // [B, H, L, Dk]
                 const V& v,                // [B, H, L, Dv]
                 view<float, 4> o,          // [B, H, L, Dv]
                 view<float, 4> state = {},  // [B, H, Df, Dv (+1)] in and out, or empty
                 const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const auto d = detail::check_common<T>("linear::linear_attn", cview(q), cview(k), cview(v), o, state, opt, true);
  detail::run_scalar_decay<Arch, T>(d, cview(q), cview(k), cview(v), o, state, opt,
                                    [](std::int64_t, std::int64_t) { return detail::scalar_gate{}; });
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv]; continues `state` exactly.
template <class Q, class K, class V, class Arch = simd::default_arch>
void linear_attn_step(const Q& q, const K& k, const V& v,
                      view<float, 3> o,       // [B, H, Dv]
                      view<float, 4> state,   // [B, H, Df, Dv (+1)] in and out
                      options opt = {}) {
  opt.path = form::recurrent;
  linear_attn<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)),
      detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, which are the same view (in
// place) or disjoint; e.g. the two slots of linear::state_ring::advance() (state_ring.hpp), whose
// rollback(n) then returns to the state of n tokens ago. Bit for bit the in-place step's result.
template <class Q, class K, class V, class Arch = simd::default_arch>
void linear_attn_step(const Q& q, const K& k, const V& v,
                      view<float, 3> o,                // [B, H, Dv]
                      view<const float, 4> state_in,   // [B, H, Df, Dv (+1)]
                      view<float, 4> state_out,        // [B, H, Df, Dv (+1)]
                      options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::linear_attn_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, true);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t, std::int64_t, const view<const float, 2>& src) {
                                  detail::scalar_decay_recurrent_head<Arch, true>(d, hv, detail::scalar_gate{}, src);
                                });
}

}  // namespace mnemo::linear

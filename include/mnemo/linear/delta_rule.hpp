// mnemo/linear/delta_rule.hpp — DeltaNet: linear attention with the delta rule (Schlag et al.,
// "Linear Transformers Are Secretly Fast Weight Programmers", ICML 2021), chunked as in Yang et
// al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length", NeurIPS 2024.
// The chunk kernel here also runs Gated DeltaNet (gated_delta_rule.hpp).
//
//   u_t = beta_t (v_t - S_{t-1}^T k_t)                 what the memory gets wrong about v_t
//   S_t = S_{t-1} + k_t u_t^T                          S [Dk, Dv], S_0 = state
//   o_t = (scale q_t)^T S_t                            read after the write
//
// i.e. S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T. q and k are used as given, or
// L2-normalised first with options.use_qk_l2norm. beta [B, H, L] must lie in [0, 2]: for a unit
// k, I - beta k k^T has eigenvalues 1 and 1 - beta, so every beta in [0, 2] keeps the transition a
// non-expansion; beta in (1, 2] (a negative eigenvalue, Grazzi et al., "Unlocking State-Tracking
// in Linear RNNs Through Negative Eigenvalues", 2024) is allowed, beyond 2 the state can grow
// without bound, and beta = 0 leaves the state unchanged.
//
// Chunked form (WY / UT transform). A chunk of n tokens, the state S at its start; with a gate
// (Gated DeltaNet) also the decay tables Gamma (prefix), R (suffix), D (lower) of common.hpp,
// all 1 without one. The pseudo-values u_t of the chunk satisfy
//   (I + A) U = diag(beta) (V - diag(Gamma) K S),       A_tj = beta_t D_tj k_t.k_j for j < t
// i.e. U = W_v - W_k S with the WY factors W_v = (I + A)^-1 diag(beta) V and
// W_k = (I + A)^-1 diag(beta Gamma) K of the paper. Applying (I + A)^-1 after the product with S
// (one unit lower-triangular solve per chunk on Dv columns, the UT transform) is the same result
// without forming W_k. Then, as for linear attention,
//   O     = diag(Gamma) Q S + ((Q K^T) o D) U          (lower triangle incl. the diagonal)
//   S_new = Gamma_{n-1} S + (diag(R) K)^T U
// K S and Q S are one GEMM ([K; Q] stacked, 2n x Dk times Dk x Dv). Against forming W_k and W_v
// (one solve on Dk + Dv columns) this is 1.15x faster at H = 8, Dk = Dv = 128, chunk 64, and as
// fast as inverting (I + A) explicitly and multiplying.
//
// Where simd_chunks() holds (common.hpp), [K; Q] S, P U and the state update run on the SIMD
// micro-kernels without packing; the triangles and the solve stay Eigen's.
//
// Decoding: delta_rule_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], beta [B, H, L], o [B, H, L, Dv], state [B, H, Dk, Dv].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <Eigen/Core>

#include "mnemo/linear/common.hpp"

namespace mnemo::linear {

namespace reference {

// DeltaNet, one token at a time in double.
template <class Q, class K, class V>
void delta_rule(const Q& q,                 // [B, H, L, Dk]
                const K& k,                 // [B, H, L, Dk]
                const V& v,                 // [B, H, L, Dv]
                view<const float, 3> beta,  // [B, H, L] in [0, 2]
                view<float, 4> o,           // [B, H, L, Dv]
                view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
                const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::delta_rule";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_beta(fn, beta, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    std::vector<double> s = detail::reference_load_state(hv.state, d), u(d.Dv);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t c = 0; c < d.Dv; ++c) {  // u = beta (v - S^T k)
        double sk = 0;
        for (std::int64_t i = 0; i < d.Dk; ++i) sk += s[i * d.Dv + c] * kt[i];
        u[c] = beta(b, h, t) * (vt[c] - sk);
      }
      for (std::int64_t i = 0; i < d.Dk; ++i)
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] += kt[i] * u[c];  // S += k u^T
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

namespace detail {

// Recurrent form, one head: per token (common.hpp, recurrent_token)
//   w = S^T k ;  u = beta (v - a w) ;  S_i = a S_i + k_i u ; o += q_i S_i      (a = exp(g_t) or 1)
// FromSrc (an out-of-place step): the first token reads src and writes hv.state.
template <bool Gated, class Arch, bool FromSrc = false, class T>
void delta_recurrent_head(const dims& d, const head_views<T>& hv, const float* g, const float* beta,
                          const view<const float, 2>& src = {}) {
  matrix zero;
  state_map s = map_state(hv.state, d.Dk, d.Dv, zero);
  std::vector<float> q(d.Dk), k(d.Dk), v(d.Dv), acc(d.Dv);
  for (std::int64_t t = 0; t < d.L; ++t) {
    prepare_row<Arch>(hv.q.ptr(t), d, d.scale, q.data(), nullptr);
    prepare_row<Arch>(hv.k.ptr(t), d, 1.0f, k.data(), nullptr);
    simd::convert<Arch>(hv.v.ptr(t), v.data(), d.Dv);
    const float a = Gated ? simd::exp<Arch>(g[t]) : 1.0f;
    const bool from_src = FromSrc && t == 0;
    recurrent_token<Arch>(s.data(), s.outerStride(), d.Dk, d.Dv, q.data(), k.data(), v.data(), beta + t, {a, nullptr},
                          acc.data(), nullptr, from_src ? src.data() : nullptr, from_src ? src.stride(0) : 0);
    std::copy(acc.begin(), acc.end(), hv.o.ptr(t));
  }
}

// Chunked form (WY / UT transform), one head; see the header comment.
template <bool Gated, class Arch, class T>
void delta_chunked_head(const dims& d, const head_views<T>& hv, const float* g, const float* beta, std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  const std::int64_t Dk = d.Dk;
  matrix zero;
  state_map s = map_state(hv.state, Dk, d.Dv, zero);
  matrix v(C, d.Dv), out(C, d.Dv);
  matrix kq(2 * C, Dk);    // [K ; Q]: one GEMM reads the state for both
  matrix ks(2 * C, d.Dv);  // [K S ; Q S]
  matrix a(C, C);          // A, strictly lower (the solve reads it as unit lower triangular)
  matrix p(C, C);          // (Q K^T) o D, lower
  matrix decay(C, C);
  std::vector<float> prefix(C, 1.0f), suffix(C, 1.0f);
  const bool fast = simd_chunks<Arch>(d.Dv);
  std::vector<float> alpha_s(fast && Gated ? Dk : 0);
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    for (std::int64_t i = 0; i < n; ++i) {
      prepare_row<Arch>(hv.k.ptr(t0 + i), d, 1.0f, kq.row(i).data(), nullptr);
      prepare_row<Arch>(hv.q.ptr(t0 + i), d, d.scale, kq.row(n + i).data(), nullptr);
    }
    load_values<Arch>(hv.v, t0, n, d, v);
    const float* bt = beta + t0;
    if constexpr (Gated) scalar_decay_tables<Arch>(g + t0, n, decay, prefix.data(), suffix.data());
    auto K = kq.topRows(n);
    auto Q = kq.middleRows(n, n);
    auto U = v.topRows(n);  // V, then the right-hand side, then U, in place
    auto A = a.topLeftCorner(n, n);
    auto P = p.topLeftCorner(n, n);

    // A_tj = beta_t D_tj k_t.k_j (j < t) and P_tj = D_tj q_t.k_j (j <= t).
    A.template triangularView<Eigen::Lower>() = K * K.transpose();
    P.template triangularView<Eigen::Lower>() = Q * K.transpose();
    for (std::int64_t t = 0; t < n; ++t) {
      float* at = &A(t, 0);
      float* pt = &P(t, 0);
      const float* dt = &decay(t, 0);
      for (std::int64_t j = 0; j < t; ++j) at[j] *= Gated ? bt[t] * dt[j] : bt[t];
      if constexpr (Gated)
        for (std::int64_t j = 0; j <= t; ++j) pt[j] *= dt[j];
    }
    // [K S ; Q S] in one GEMM; the right-hand side beta (V - diag(Gamma) K S); the UT transform
    // (I + A) U = rhs as one unit lower-triangular solve.
    if (fast) {
      simd::gemm<simd::a_order::row_major, Arch>(2 * n, d.Dv, Dk, kq.data(), Dk, s.data(), s.outerStride(), ks.data(),
                                                 d.Dv, simd::c_mode::overwrite);
    } else {
      gemm<false>(ks.topRows(2 * n), kq.topRows(2 * n), s);
    }
    for (std::int64_t t = 0; t < n; ++t) U.row(t) = bt[t] * (U.row(t) - prefix[t] * ks.row(t));
    A.template triangularView<Eigen::UnitLower>().solveInPlace(U);
    if (fast) {
      // O = diag(Gamma) Q S + P U in place of Q S, S = Gamma_{n-1} S + (diag(R) K)^T U, on the
      // SIMD products (common.hpp).
      for (std::int64_t t = 0; t + 1 < n; ++t) std::fill(&P(t, t + 1), &P(t, 0) + n, 0.0f);
      lower_product<Arch>(n, d.Dv, {p.data(), p.cols()}, {U.data(), d.Dv}, {ks.row(n).data(), d.Dv}, prefix.data());
      if constexpr (Gated) {
        std::fill(alpha_s.begin(), alpha_s.end(), prefix[n - 1]);
        for (std::int64_t j = 0; j < n; ++j) K.row(j) *= suffix[j];
      }
      simd::gemm<simd::a_order::col_major, Arch>(Dk, d.Dv, n, kq.data(), Dk, U.data(), d.Dv, s.data(), s.outerStride(),
                                                 Gated ? simd::c_mode::rescale : simd::c_mode::accumulate,
                                                 Gated ? alpha_s.data() : nullptr);
      for (std::int64_t t = 0; t < n; ++t) store_output(ks.row(n + t).data(), d, hv.o.ptr(t0 + t));
      continue;
    }
    // O = diag(Gamma) Q S + P U.
    auto O = out.topRows(n);
    for (std::int64_t t = 0; t < n; ++t) O.row(t) = prefix[t] * ks.row(n + t);
    O.noalias() += P.template triangularView<Eigen::Lower>() * U;
    // State: S = Gamma_{n-1} S + (diag(R) K)^T U.
    if constexpr (Gated) {
      s *= prefix[n - 1];
      for (std::int64_t j = 0; j < n; ++j) K.row(j) *= suffix[j];
    }
    gemm<true>(s, K.transpose(), U);
    for (std::int64_t t = 0; t < n; ++t) store_output(O.row(t).data(), d, hv.o.ptr(t0 + t));
  }
}

// Every (batch, head) of DeltaNet (g empty) or Gated DeltaNet.
template <bool Gated, class Arch, class T>
void run_delta(const dims& d, const view<const T, 4>& q, const view<const T, 4>& k, const view<const T, 4>& v,
               const view<const float, 3>& g, const view<const float, 3>& beta, const view<float, 4>& o,
               const view<float, 4>& state, const options& opt) {
  if (d.L == 0) return;
  const form f = choose_form(opt, d.L);
  for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const head_views<T> hv(q, k, v, o, state, b, h);
    const float* gh = Gated ? g.ptr(b, h) : nullptr;
    if (f == form::chunked) {
      delta_chunked_head<Gated, Arch>(d, hv, gh, beta.ptr(b, h), chunk_size(opt, delta_default_chunk_size));
    } else {
      delta_recurrent_head<Gated, Arch>(d, hv, gh, beta.ptr(b, h));
    }
  });
}

}  // namespace detail

// DeltaNet; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void delta_rule(const Q& q,                 // [B, H, L, Dk]
                const K& k,                 // [B, H, L, Dk]
                const V& v,                 // [B, H, L, Dv]
                view<const float, 3> beta,  // [B, H, L] in [0, 2]
                view<float, 4> o,           // [B, H, L, Dv]
                view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
                const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::delta_rule";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_beta(fn, beta, d);
  detail::run_delta<false, Arch, T>(d, cview(q), cview(k), cview(v), {}, beta, o, state, opt);
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv], beta [B, H]; continues `state` exactly.
template <class Q, class K, class V, class Arch = simd::default_arch>
void delta_rule_step(const Q& q, const K& k, const V& v,
                     view<const float, 2> beta,  // [B, H]
                     view<float, 3> o,           // [B, H, Dv]
                     view<float, 4> state,       // [B, H, Dk, Dv] in and out
                     options opt = {}) {
  opt.path = form::recurrent;
  delta_rule<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)),
      detail::token_view(beta), detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, the same view (in place) or
// disjoint, e.g. the slots of a linear::state_ring (state_ring.hpp); bit for bit the in-place step.
template <class Q, class K, class V, class Arch = simd::default_arch>
void delta_rule_step(const Q& q, const K& k, const V& v,
                     view<const float, 2> beta,      // [B, H]
                     view<float, 3> o,               // [B, H, Dv]
                     view<const float, 4> state_in,  // [B, H, Dk, Dv]
                     view<float, 4> state_out,       // [B, H, Dk, Dv]
                     options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::delta_rule_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto beta3 = detail::token_view(beta);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, false);
  detail::check_beta(fn, beta3, d);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t b, std::int64_t h, const view<const float, 2>& src) {
                                  detail::delta_recurrent_head<false, Arch, true>(d, hv, nullptr, beta3.ptr(b, h), src);
                                });
}

}  // namespace mnemo::linear

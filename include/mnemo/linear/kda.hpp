// mnemo/linear/kda.hpp — Kimi Delta Attention (KDA; Kimi Team, "Kimi Linear: An Expressive,
// Efficient Attention Architecture", 2025): Gated DeltaNet whose scalar gate is replaced by GLA's
// per-key-channel gate.
//
//   S'  = diag(exp(g_t)) S_{t-1}                        row i of S (key channel i) decays by exp(g_t[i])
//   u_t = beta_t (v_t - S'^T k_t)                       decay first, then the delta-rule correction
//   S_t = S' + k_t u_t^T                                S [Dk, Dv], S_0 = state
//   o_t = (scale q_t)^T S_t                             read after the write
//
// i.e. S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T. g [B, H, L, Dk] are
// log-decays <= 0 (-inf allowed: that channel forgets everything); beta [B, H, L] in [0, 2] and
// options.use_qk_l2norm as for delta_rule.hpp. With g equal across the channels it is
// gated_delta_rule.hpp; with g = 0, delta_rule.hpp.
//
// Chunked form (WY / UT transform, as delta_rule.hpp, with the per-channel decay folded into the
// keys and queries as gla.hpp does). In a chunk of n tokens with initial state S and the in-chunk
// prefix sums b_t = sum_{s <= t} g_s [Dk] (accumulated in order from the chunk start), write
// Gamma_t = exp(b_t) and E(j, t) = exp(b_t - b_j) = exp(sum_{j < s <= t} g_s), the decay from j to t.
// Unrolling the recurrence inside the chunk,
//   S'_t^T k_t = S^T (Gamma_t o k_t) + sum_{j < t} u_j (k_t . (E(j, t) o k_j)),
// so the pseudo-values U of the chunk solve the unit lower-triangular system
//   (I + A) U = diag(beta) (V - Kg S),     Kg = K o Gamma,  A_tj = beta_t sum_c k_t[c] E(j, t)[c] k_j[c]  (j < t)
// (the UT transform: one solve on Dv columns, as for the delta rule), and then
//   O     = Qg S + P U,                    Qg = scale Q o Gamma,  P_tj = sum_c q_t[c] E(j, t)[c] k_j[c]  (j <= t)
//   S_new = diag(Gamma_{n-1}) S + Kd^T U,  Kd = K o E(., n-1)
// [Kg; Qg] S is one GEMM (2n x Dk times Dk x Dv), P U and Kd^T U run on the SIMD micro-kernels
// where simd_chunks() holds (common.hpp), otherwise on Eigen's products.
//
// Numerical range. Kg, Qg and Kd only carry decays <= 1. The intra-chunk matrices A and P need
// E(j, t) = exp(b_t - b_j) for every pair. In a weak chunk they are GEMMs, through a chunk-local
// reference point r [Dk] per channel: E(j, t) = exp(b_t - r) exp(r - b_j), so
//   A = Ks Kr^T,  P = Qs Kr^T,   Ks = K o exp(b - r),  Qs = scale Q o exp(b - r),  Kr = K o exp(r - b)
// (2 n Dk exponentials per chunk), and Kg = Ks o exp(r), Qg = Qs o exp(r), Kd = Kr o exp(b_{n-1} - r).
// r is the middle of the channel's log-decay range in the chunk, r = b_{n-1} / 2 (b_t runs from
// about 0 down to b_{n-1}), so every exponent above lies in [b_{n-1} / 2, -b_{n-1} / 2]: a weak chunk
// is one whose total log-decay b_{n-1} is >= -2 kda_factor_limit = -40 in every channel, and its
// factors lie in [exp(-20), exp(20)] = [2e-9, 5e8], finite and far from the subnormals. (The chunk
// start as reference, as gla.hpp has it, allows half that range: Gamma_j^-1 = exp(-b_j) reaches
// exp(-b_{n-1}).) The price is that of gla.hpp's weak chunks: a decay formed from two exponents up
// to 20 in magnitude carries their rounding, a relative error <= 2 * 20 * 2^-24 = 2.4e-6. Other
// chunks (stronger decay, or -inf in some channel) form each entry of A and P from the exact range
// sums, A_tj = beta_t sum_c k_t[c] exp(sum_{j < s <= t} g_s[c]) k_j[c], accumulated from t down to j
// (n (n - 1) / 2 Dk exponentials): nothing is ever divided by a decay, so exp(+large) never
// appears, decays underflow to 0 as they should, and g = -inf resets the channel exactly (no
// -inf - -inf). The chunk size is kept by both paths. Cost at H = 8, L = 8192, Dk = Dv = 128,
// chunk 16, one thread (AMD EPYC znver1, ad-hoc timing, best of 3): gates in [-0.1, 0] (all chunks
// weak) 328 ms; in [-6, -1] (all strong) 399 ms; in [-3, 0] (chunk totals about -24) 328 ms with
// the mid-range reference point, 398 ms with the chunk start as the reference (limit -20).
//
// NaN: as every member (common.hpp): gates and beta reject NaN with mnemo::error; a NaN in q_t
// reaches o_t only, a NaN in k_t or v_t enters the state and makes o_t and every later output of
// its (batch, head) NaN; the chunked form may also make the earlier outputs of t's own chunk NaN.
//
// Decoding and speculative decoding: kda_step continues a state by one token, in place or out of
// place (read state_in, write state_out: the same memory traffic). Out of place, it runs on the
// slots of a linear::state_ring (state_ring.hpp), which keeps the last `depth` states without a
// copy, so ring.rollback(n) returns to the state of n tokens ago exactly:
//   linear::state_ring<4> ring({B, H, Dk, Dv}, depth);    // ring.state(): fill from the prefill
//   auto [in, out] = ring.advance();  linear::kda_step(q, k, v, g, beta, o, in, out);
//   ring.rollback(rejected);                              // ring.state() is where they began
// A draft verified in one multi-token call instead: keep the state before the call (a checkpoint),
// and after accepting a tokens run kda on those a tokens from it again (recompute).
//
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], g [B, H, L, Dk], beta [B, H, L], o [B, H, L, Dv],
// state [B, H, Dk, Dv].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "mnemo/linear/common.hpp"

namespace mnemo::linear {

// The largest exponent magnitude of a weak chunk's decay factors (header comment): a chunk is weak
// when every channel's total log-decay is >= -2 kda_factor_limit. 20, as gla_factor_limit (gla.hpp).
inline constexpr float kda_factor_limit = 20.0f;

namespace reference {

// Kimi Delta Attention, one token at a time in double.
template <class Q, class K, class V>
void kda(const Q& q,                 // [B, H, L, Dk]
         const K& k,                 // [B, H, L, Dk]
         const V& v,                 // [B, H, L, Dv]
         view<const float, 4> g,     // [B, H, L, Dk] log-decays <= 0
         view<const float, 3> beta,  // [B, H, L] in [0, 2]
         view<float, 4> o,           // [B, H, L, Dv]
         view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
         const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::kda";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_channel_gate(fn, g, d);
  detail::check_beta(fn, beta, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    std::vector<double> s = detail::reference_load_state(hv.state, d), u(d.Dv);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t i = 0; i < d.Dk; ++i) {  // S' = diag(exp(g)) S
        const double decay = std::exp(static_cast<double>(g(b, h, t, i)));
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] *= decay;
      }
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

namespace detail {

// Recurrent form, one head: per token e = exp(g_t), then one pass over the state (common.hpp,
// recurrent_token) with the correction reading kr = e o k:
//   u = beta (v - S^T (e o k)) ;  S_i = e_i S_i + k_i u ;  o += q_i S_i
// src: the state the first token reads when it is not hv.state (an out-of-place step), else empty.
template <class Arch, class T>
void kda_recurrent_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g, const float* beta,
                        const view<const float, 2>& src = {}) {
  matrix zero;
  state_map s = map_state(hv.state, d.Dk, d.Dv, zero);
  std::vector<float> q(d.Dk), k(d.Dk), kr(d.Dk), e(d.Dk), v(d.Dv), acc(d.Dv);
  for (std::int64_t t = 0; t < d.L; ++t) {
    prepare_row<Arch>(hv.q.ptr(t), d, d.scale, q.data(), nullptr);
    prepare_row<Arch>(hv.k.ptr(t), d, 1.0f, k.data(), nullptr);
    simd::convert<Arch>(hv.v.ptr(t), v.data(), d.Dv);
    std::copy(g.ptr(t), g.ptr(t) + d.Dk, e.data());
    simd::exp_sum<Arch>(e.data(), d.Dk, 0.0f);
    for (std::int64_t i = 0; i < d.Dk; ++i) kr[i] = e[i] * k[i];
    const bool out_of_place = t == 0 && !src.empty();
    recurrent_token<Arch>(s.data(), s.outerStride(), d.Dk, d.Dv, q.data(), k.data(), v.data(), beta + t,
                          {1.0f, e.data()}, acc.data(), kr.data(), out_of_place ? src.data() : nullptr,
                          out_of_place ? src.stride(0) : 0);
    std::copy(acc.begin(), acc.end(), hv.o.ptr(t));
  }
}

// Weak chunk, token t: from the prefix log-decay b = b_t, the reference point r and half = exp(r)
// (header comment),
//   ks = k o exp(b - r),  qs = q o exp(b - r),  kr = k o exp(r - b),
//   kg = ks o half,       qg = qs o half,       kd = kr o half          (b_{n-1} - r = r)
// in one pass over the Dk channels.
template <class Arch>
void kda_weak_row(const float* k, const float* q, const float* b, const float* r, const float* half, float* ks,
                  float* qs, float* kr, float* kg, float* qg, float* kd, std::int64_t n) {
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    for (; c + w <= n; c += w) {
      const batch e = simd::load<Arch>(b + c) - simd::load<Arch>(r + c), h = simd::load<Arch>(half + c);
      const batch kc = simd::load<Arch>(k + c), up = simd::exp(e), down = simd::exp(-e);
      const batch kup = kc * up, qup = simd::load<Arch>(q + c) * up, kdown = kc * down;
      simd::store(ks + c, kup);
      simd::store(qs + c, qup);
      simd::store(kr + c, kdown);
      simd::store(kg + c, kup * h);
      simd::store(qg + c, qup * h);
      simd::store(kd + c, kdown * h);
    }
  }
  for (; c < n; ++c) {
    const float e = b[c] - r[c], up = simd::exp<Arch>(e), down = simd::exp<Arch>(-e);
    ks[c] = k[c] * up;
    qs[c] = q[c] * up;
    kr[c] = k[c] * down;
    kg[c] = ks[c] * half[c];
    qg[c] = qs[c] * half[c];
    kd[c] = kr[c] * half[c];
  }
}

// Strong chunk, token t: kg = k o exp(b), qg = q o exp(b) (decays <= 1 only).
template <class Arch>
void kda_prefix_row(const float* k, const float* q, const float* b, float* kg, float* qg, std::int64_t n) {
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    for (; c + w <= n; c += w) {
      const batch up = simd::exp(simd::load<Arch>(b + c));
      simd::store(kg + c, simd::load<Arch>(k + c) * up);
      simd::store(qg + c, simd::load<Arch>(q + c) * up);
    }
  }
  for (; c < n; ++c) {
    const float up = simd::exp<Arch>(b[c]);
    kg[c] = k[c] * up;
    qg[c] = q[c] * up;
  }
}

// Strong chunk, token j walking down from the chunk's end: out = k o exp(acc) with acc =
// sum_{j < s < n} g_s on entry, then acc += g (g = g_j), so the next (earlier) token sees its range.
template <class Arch>
void kda_suffix_row(float* acc, const float* g, const float* k, float* out, std::int64_t n) {
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    for (; c + w <= n; c += w) {
      const batch a = simd::load<Arch>(acc + c);
      simd::store(out + c, simd::load<Arch>(k + c) * simd::exp(a));
      simd::store(acc + c, a + simd::load<Arch>(g + c));
    }
  }
  for (; c < n; ++c) {
    out[c] = k[c] * simd::exp<Arch>(acc[c]);
    acc[c] += g[c];
  }
}

// Strong chunk, pair (t, j), j < t, walking j down from t - 1: acc += g (g = g_{j+1}, so acc =
// sum_{j < s <= t} g_s), e = exp(acc), returns {k_t . (e o k_j), q_t . (e o k_j)}.
template <class Arch>
std::pair<float, float> kda_decayed_dots(float* acc, const float* g, const float* kt, const float* qt, const float* kj,
                                         std::int64_t n) {
  float sk = 0, sq = 0;
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    batch vk(0.0f), vq(0.0f);
    for (; c + w <= n; c += w) {
      const batch a = simd::load<Arch>(acc + c) + simd::load<Arch>(g + c);
      simd::store(acc + c, a);
      const batch ek = simd::exp(a) * simd::load<Arch>(kj + c);
      vk = simd::detail::fmadd(simd::load<Arch>(kt + c), ek, vk);
      vq = simd::detail::fmadd(simd::load<Arch>(qt + c), ek, vq);
    }
    sk = simd::hsum(vk);
    sq = simd::hsum(vq);
  }
  for (; c < n; ++c) {
    acc[c] += g[c];
    const float ek = simd::exp<Arch>(acc[c]) * kj[c];
    sk += kt[c] * ek;
    sq += qt[c] * ek;
  }
  return {sk, sq};
}

// Chunked form (WY / UT transform with per-channel decays), one head; see the header comment.
template <class Arch, class T>
void kda_chunked_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g, const float* beta,
                      std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  const std::int64_t Dk = d.Dk, Dv = d.Dv;
  matrix zero;
  state_map s = map_state(hv.state, Dk, Dv, zero);
  matrix k(C, Dk), q(C, Dk);  // the chunk's prepared rows (q scaled)
  matrix logp(C, Dk);         // b_t, the in-chunk prefix sums of the log-gates
  matrix kq(2 * C, Dk);       // [Kg ; Qg]: one GEMM reads the state for both
  matrix k_up(C, Dk), q_up(C, Dk), k_down(C, Dk);  // weak chunks: K, Q o exp(b - r) and K o exp(r - b)
  matrix kd(C, Dk);           // K o E(., n-1): writes the next state
  matrix u(C, Dv);            // V, then the right-hand side, then U, in place
  matrix ks(2 * C, Dv);       // [Kg S ; Qg S], then O in its lower half
  matrix a(C, C);             // A, strictly lower (the solve reads it as unit lower triangular)
  matrix p(C, C);             // P, lower
  std::vector<float> last(Dk), acc(Dk), ref(Dk), half(Dk);
  const bool fast = simd_chunks<Arch>(Dv);
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    auto gate = [&](std::int64_t t) { return g.ptr(t0 + t); };  // g_t [Dk], t in the chunk
    prepare_rows<Arch>(hv.k, t0, n, d, 1.0f, k, nullptr);
    prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, nullptr);
    load_values<Arch>(hv.v, t0, n, d, u);
    std::copy(gate(0), gate(0) + Dk, logp.row(0).data());
    for (std::int64_t t = 1; t < n; ++t) {
      const float* prev = logp.row(t - 1).data();
      const float* gt = gate(t);
      float* row = logp.row(t).data();
      for (std::int64_t c = 0; c < Dk; ++c) row[c] = prev[c] + gt[c];
    }
    const float* total = logp.row(n - 1).data();  // the most negative row: log-gates are <= 0
    std::copy(total, total + Dk, last.data());
    simd::exp_sum<Arch>(last.data(), Dk, 0.0f);
    auto Kg = kq.topRows(n);
    auto Qg = kq.middleRows(n, n);
    auto U = u.topRows(n);
    auto A = a.topLeftCorner(n, n);
    auto P = p.topLeftCorner(n, n);
    const float* bt = beta + t0;
    if (*std::min_element(total, total + Dk) >= -2 * kda_factor_limit) {
      // Weak chunk: A = Ks Kr^T and P = Qs Kr^T through the reference point r = b_{n-1} / 2.
      for (std::int64_t c = 0; c < Dk; ++c) ref[c] = half[c] = 0.5f * total[c];
      simd::exp_sum<Arch>(half.data(), Dk, 0.0f);
      for (std::int64_t t = 0; t < n; ++t)
        kda_weak_row<Arch>(k.row(t).data(), q.row(t).data(), logp.row(t).data(), ref.data(), half.data(),
                           k_up.row(t).data(), q_up.row(t).data(), k_down.row(t).data(), Kg.row(t).data(),
                           Qg.row(t).data(), kd.row(t).data(), Dk);
      A.template triangularView<Eigen::StrictlyLower>() = k_up.topRows(n) * k_down.topRows(n).transpose();
      P.template triangularView<Eigen::Lower>() = q_up.topRows(n) * k_down.topRows(n).transpose();
    } else {
      // Strong chunk: every entry of A and P from exact range sums, t down to j.
      for (std::int64_t t = 0; t < n; ++t)
        kda_prefix_row<Arch>(k.row(t).data(), q.row(t).data(), logp.row(t).data(), Kg.row(t).data(), Qg.row(t).data(),
                             Dk);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t j = n - 1; j >= 0; --j) kda_suffix_row<Arch>(acc.data(), gate(j), k.row(j).data(), kd.row(j).data(), Dk);
      for (std::int64_t t = 0; t < n; ++t) {
        const float* kt = k.row(t).data();
        const float* qt = q.row(t).data();
        P(t, t) = simd::dot<Arch>(qt, kt, Dk);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = t - 1; j >= 0; --j) {
          const auto [sk, sq] = kda_decayed_dots<Arch>(acc.data(), gate(j + 1), kt, qt, k.row(j).data(), Dk);
          A(t, j) = sk;
          P(t, j) = sq;
        }
      }
    }
    for (std::int64_t t = 1; t < n; ++t) {
      float* at = &A(t, 0);
      for (std::int64_t j = 0; j < t; ++j) at[j] *= bt[t];
    }
    // [Kg S ; Qg S] in one GEMM; the right-hand side beta (V - Kg S); the UT transform
    // (I + A) U = rhs as one unit lower-triangular solve.
    if (fast) {
      simd::gemm<simd::a_order::row_major, Arch>(2 * n, Dv, Dk, kq.data(), Dk, s.data(), s.outerStride(), ks.data(), Dv,
                                                 simd::c_mode::overwrite);
    } else {
      gemm<false>(ks.topRows(2 * n), kq.topRows(2 * n), s);
    }
    for (std::int64_t t = 0; t < n; ++t) U.row(t) = bt[t] * (U.row(t) - ks.row(t));
    A.template triangularView<Eigen::UnitLower>().solveInPlace(U);
    // O = Qg S + P U in place of Qg S; S = diag(Gamma_{n-1}) S + Kd^T U.
    if (fast) {
      for (std::int64_t t = 0; t + 1 < n; ++t) std::fill(&P(t, t + 1), &P(t, 0) + n, 0.0f);
      lower_product<Arch>(n, Dv, {p.data(), p.cols()}, {U.data(), Dv}, {ks.row(n).data(), Dv}, nullptr);
      simd::gemm<simd::a_order::col_major, Arch>(Dk, Dv, n, kd.data(), Dk, U.data(), Dv, s.data(), s.outerStride(),
                                                 simd::c_mode::rescale, last.data());
    } else {
      ks.middleRows(n, n).noalias() += P.template triangularView<Eigen::Lower>() * U;
      for (std::int64_t i = 0; i < Dk; ++i) s.row(i) *= last[i];
      gemm<true>(s, kd.topRows(n).transpose(), U);
    }
    for (std::int64_t t = 0; t < n; ++t) store_output(ks.row(n + t).data(), d, hv.o.ptr(t0 + t));
  }
}

}  // namespace detail

// Kimi Delta Attention; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void kda(const Q& q,                 // [B, H, L, Dk]
         const K& k,                 // [B, H, L, Dk]
         const V& v,                 // [B, H, L, Dv]
         view<const float, 4> g,     // [B, H, L, Dk] log-decays <= 0
         view<const float, 3> beta,  // [B, H, L] in [0, 2]
         view<float, 4> o,           // [B, H, L, Dv]
         view<float, 4> state = {},   // [B, H, Dk, Dv] in and out, or empty
         const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::kda";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_channel_gate(fn, g, d);
  detail::check_beta(fn, beta, d);
  if (d.L == 0) return;
  const form f = detail::choose_form(opt, d.L);
  detail::for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    if (f == form::chunked) {
      detail::kda_chunked_head<Arch>(d, hv, g[b][h], beta.ptr(b, h), detail::chunk_size(opt, delta_default_chunk_size));
    } else {
      detail::kda_recurrent_head<Arch>(d, hv, g[b][h], beta.ptr(b, h));
    }
  });
}

// One decoding step: q, k and g [B, H, Dk], v and o [B, H, Dv], beta [B, H]; continues `state`.
template <class Q, class K, class V, class Arch = simd::default_arch>
void kda_step(const Q& q, const K& k, const V& v,
              view<const float, 3> g,     // [B, H, Dk]
              view<const float, 2> beta,  // [B, H]
              view<float, 3> o,           // [B, H, Dv]
              view<float, 4> state,       // [B, H, Dk, Dv] in and out
              options opt = {}) {
  opt.path = form::recurrent;
  kda<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)), detail::token_view(g),
      detail::token_view(beta), detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, which are the same view (in
// place) or disjoint; e.g. the two slots of linear::state_ring::advance() (state_ring.hpp).
template <class Q, class K, class V, class Arch = simd::default_arch>
void kda_step(const Q& q, const K& k, const V& v,
              view<const float, 3> g,         // [B, H, Dk]
              view<const float, 2> beta,      // [B, H]
              view<float, 3> o,               // [B, H, Dv]
              view<const float, 4> state_in,  // [B, H, Dk, Dv]
              view<float, 4> state_out,       // [B, H, Dk, Dv]
              options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::kda_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto g4 = detail::token_view(g);
  const auto beta3 = detail::token_view(beta);
  const auto o4 = detail::token_view(o);
  mnemo::detail::require_data(fn, "state_out", state_out, " [B, H, Dk, Dv]");
  const auto d = detail::check_common<T>(fn, q4, k4, v4, o4, state_out, opt, false);
  mnemo::detail::require_data(fn, "state_in", state_in, " [B, H, Dk, Dv]");
  mnemo::detail::require_shape(fn, "state_in", state_in, {d.B, d.H, d.Dk, d.Dv}, " [B, H, Dk, Dv] (state_out's)");
  mnemo::detail::require_shape(fn, "state_out", state_out, {d.B, d.H, d.Dk, d.Dv}, " [B, H, Dk, Dv]");
  mnemo::detail::require_disjoint(fn, "o", o4, "state_in", state_in);
  if (!same_view(state_in, state_out))
    mnemo::detail::require_disjoint(fn, "state_out", state_out, "state_in", state_in,
                                    "; they may be the same view (in place)");
  detail::check_channel_gate(fn, g4, d);
  detail::check_beta(fn, beta3, d);
  detail::for_each_head(d.B * d.H, opt.threads, false, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(q4, k4, v4, o4, state_out, b, h);
    detail::kda_recurrent_head<Arch>(d, hv, g4[b][h], beta3.ptr(b, h), state_in[b][h]);
  });
}

}  // namespace mnemo::linear

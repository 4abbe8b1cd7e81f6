// mnemo/linear/gla.hpp — gated linear attention (Yang et al., "Gated Linear Attention
// Transformers with Hardware-Efficient Training", ICML 2024): a log-gate per key channel.
//
//   S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T           S [Dk, Dv], S_0 = state, g_t [Dk] <= 0
//   o_t = (scale q_t)^T S_t                            read after the write
//
// Row i of S (key channel i) decays by exp(g_t[i]).
//
// Chunked form (the paper's section 4, "secondary chunking"). In a chunk of n tokens, with
// E(j, t) = exp(sum_{j < s <= t} g_s) the per-channel decay from token j to token t:
//   o_t   = (E(-1, t) o q_t)^T S  +  sum_{j <= t} (q_t o E(j, t) o k_j) . 1 v_j
//   S_new = diag(E(-1, n-1)) S + sum_j (E(j, n-1) o k_j) v_j^T
// (o: element-wise). The intra-chunk scores A_tj = sum_c q_t[c] E(j, t)[c] k_j[c] are not one
// GEMM in general: E does not factor into a row term times a column term without exp(+large)
// overflowing.
//
// Weak chunks (the chunk's total log-decay >= -gla_factor_limit in every channel, the common case:
// gates of -0.1 per token give -3.2 over 32 tokens) do factor, relative to the chunk start, as in
// the paper's log-space form: with the in-chunk prefix sums b_t = sum_{s <= t} g_s,
//   E(j, t) = exp(b_t) exp(-b_j),  E(j, n-1) = exp(-b_j) exp(b_{n-1}),
// every factor in [exp(-limit), 1] or [1, exp(limit)], so the chunk is three GEMM-shaped products
// (Qg = Q o exp(b), Kinv = K o exp(-b): A = Qg Kinv^T, O = Qg S + A V, S = diag(exp(b_{n-1})) S +
// (Kinv o exp(b_{n-1}))^T V) on the SIMD micro-kernels (common.hpp, chunk_products), with 2 n Dk
// exponentials per chunk instead of about 5 n Dk for the sub-block scheme below. The price is the
// one stated for gla_factor_limit: each decay carries the float rounding of exponents up to 20 in
// magnitude, a relative error <= 20 * 2^-24 = 1.2e-6 (the scheme below forms exp of exact range
// sums). This path runs where simd_chunks() holds (SIMD on, Dv a multiple of the vector width).
//
// Other chunks (strong decay or -inf in some channel, or no SIMD path) are cut into sub-blocks of
// `gla_sub_block` tokens. For a sub-block I starting at
// s_I and the earlier tokens j < s_I, the split point r = s_I - 1 gives
//   E(j, t) = E(r, t) o E(j, r),   both factors <= 1 (no overflow; underflow to 0 is the true limit)
// so A[I, :s_I] = (Q_I o E(r, .)) (K o E(., r))^T is a GEMM; K o E(., r) is carried from one
// sub-block to the next by multiplying with the previous sub-block's total decay. Inside a
// sub-block (j, t both in I) the split point must lie between j and t, so one factor is >= 1:
//   weak decay (the sub-block's total log-decay >= -gla_factor_limit in every channel):
//     E(j, t) = E(r, t) / E(r, j) with factors bounded by exp(gla_factor_limit), and the row block
//     A[I, :s_I + |I|] is one GEMM, diagonal block included;
//   strong decay (or -inf): the scores are summed element-wise with exp of the exact range sums.
// Every other exponent is a sum over its exact token range (common.hpp), so g = -inf is safe.
//
// Decoding: gla_step continues a state by one token, in place or out of place (read state_in,
// write state_out, bit for bit the same result); out of place it runs on the slots of a
// linear::state_ring, whose rollback(n) returns to the state of n tokens ago (speculative
// decoding, state_ring.hpp).
// Shapes: q, k [B, H, L, Dk], v [B, H, L, Dv], g [B, H, L, Dk], o [B, H, L, Dv], state [B, H, Dk, Dv].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "mnemo/linear/common.hpp"

namespace mnemo::linear {

// A sub-block whose total log-decay is >= -gla_factor_limit in every channel takes its diagonal
// block as one GEMM through the factors exp(+-(sum of g from the sub-block start)), which then lie
// in [exp(-20), exp(20)] = [2e-9, 5e8]: finite and far from the subnormals. The price is that a
// decay exp(a - b) is formed from two exponents of magnitude up to 20, whose float rounding (20 *
// 2^-24 = 1.2e-6) bounds its relative error; the element-wise path forms exp of the exact range
// sum instead. Stronger decays (and -inf) take the element-wise path.
inline constexpr float gla_factor_limit = 20.0f;

// Tokens per sub-block of the chunked GLA kernel. At H = 8, L = 8192, Dk = Dv = 128, chunk 32, one
// thread and gates in [-0.1, 0], sub-blocks of 8, 16, 32 and 64 tokens ran within 5% of each
// other; 16 keeps more sub-blocks on the GEMM path than 32 or 64 when the gates are strong.
inline constexpr std::int64_t gla_sub_block = 16;

namespace reference {

// Gated linear attention, one token at a time in double.
template <class Q, class K, class V>
void gla(const Q& q,              // [B, H, L, Dk]
         const K& k,              // [B, H, L, Dk]
         const V& v,              // [B, H, L, Dv]
         view<const float, 4> g,  // [B, H, L, Dk] log-decays <= 0
         view<float, 4> o,        // [B, H, L, Dv]
         view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
         const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::reference::gla";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_channel_gate(fn, g, d);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    std::vector<double> s = detail::reference_load_state(hv.state, d);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t i = 0; i < d.Dk; ++i) {
        const double decay = std::exp(static_cast<double>(g(b, h, t, i)));  // row i of S
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] = decay * s[i * d.Dv + c] + kt[i] * vt[c];
      }
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

namespace detail {

// x[c] *= y[c]
inline void multiply(float* x, const float* y, std::int64_t n) {
  for (std::int64_t c = 0; c < n; ++c) x[c] *= y[c];
}

// One step of a running decay over a row of Dk channels, fused in one pass:
//   before = acc; acc += g; e = AddFirst ? acc : before; out = x o exp(Negate ? -e : e)
template <bool AddFirst, bool Negate, class Arch>
void decay_row(float* acc, const float* g, const float* x, float* out, std::int64_t n) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t c = 0; c < n; ++c) {
      const float before = acc[c];
      acc[c] += g[c];
      const float e = AddFirst ? acc[c] : before;
      out[c] = x[c] * simd::exp<Arch>(Negate ? -e : e);
    }
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    auto step = [](batch before, batch gate, batch xv) {
      const batch after = before + gate;
      const batch e = AddFirst ? after : before;
      return std::pair{after, xv * simd::exp(Negate ? -e : e)};
    };
    std::int64_t c = 0;
    for (; c + w <= n; c += w) {
      const auto [after, y] = step(simd::load<Arch>(acc + c), simd::load<Arch>(g + c), simd::load<Arch>(x + c));
      simd::store(acc + c, after);
      simd::store(out + c, y);
    }
    if (c < n) {
      const std::int64_t r = n - c;
      const auto [after, y] = step(simd::load_partial<Arch>(acc + c, r), simd::load_partial<Arch>(g + c, r),
                                   simd::load_partial<Arch>(x + c, r));
      simd::store_partial(acc + c, after, r);
      simd::store_partial(out + c, y, r);
    }
  }
}

// acc += g, then the decayed score sum_c q[c] exp(acc[c]) k[c], fused in one pass.
template <class Arch>
float decayed_dot(float* acc, const float* g, const float* q, const float* k, std::int64_t n) {
  if constexpr (!simd::vectorized<Arch>) {
    float sum = 0;
    for (std::int64_t c = 0; c < n; ++c) {
      acc[c] += g[c];
      sum += q[c] * simd::exp<Arch>(acc[c]) * k[c];
    }
    return sum;
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    batch sum(0.0f);
    std::int64_t c = 0;
    for (; c + w <= n; c += w) {
      const batch a = simd::load<Arch>(acc + c) + simd::load<Arch>(g + c);
      simd::store(acc + c, a);
      sum += simd::load<Arch>(q + c) * simd::exp(a) * simd::load<Arch>(k + c);
    }
    if (c < n) {  // the lanes past n load 0: q = 0 there, so they add nothing
      const std::int64_t r = n - c;
      const batch a = simd::load_partial<Arch>(acc + c, r) + simd::load_partial<Arch>(g + c, r);
      simd::store_partial(acc + c, a, r);
      sum += simd::load_partial<Arch>(q + c, r) * simd::exp(a) * simd::load_partial<Arch>(k + c, r);
    }
    return xsimd::hadd(sum);
  }
}

// out = mult * x o exp(Negate ? -b : b), element-wise over n channels.
template <bool Negate, class Arch>
void scaled_exp_row(const float* x, const float* b, float mult, float* out, std::int64_t n) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t c = 0; c < n; ++c) out[c] = mult * x[c] * simd::exp<Arch>(Negate ? -b[c] : b[c]);
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    const batch m(mult);
    std::int64_t c = 0;
    for (; c + w <= n; c += w) {
      const batch e = simd::load<Arch>(b + c);
      simd::store(out + c, m * simd::load<Arch>(x + c) * simd::exp(Negate ? -e : e));
    }
    if (c < n) {
      const std::int64_t r = n - c;
      const batch e = simd::load_partial<Arch>(b + c, r);
      simd::store_partial(out + c, m * simd::load_partial<Arch>(x + c, r) * simd::exp(Negate ? -e : e), r);
    }
  }
}

// One weakly decaying chunk (every channel's total log-decay >= -gla_factor_limit) on the SIMD
// products: with the in-chunk prefix sums b_t = sum_{s <= t} g_s (logp [n, Dk]),
//   Qg = scale Q o exp(b),  Kinv = K o exp(-b),  last = exp(b_{n-1}),  Kd = Kinv o last,
//   A = Qg Kinv^T (lower),  O = Qg S + A V,  S = diag(last) S + Kd^T V.
// Every factor lies in [exp(-limit), exp(limit)]; see the header comment for the error bound.
template <class Arch>
void gla_weak_chunk_simd(std::int64_t n, std::int64_t Dk, std::int64_t Dv, crows q, crows k, crows v, rows o, float scale,
                         const matrix& logp, state_map& s, matrix& qg, matrix& kinv, matrix& kd, matrix& a,
                         float* last) {
  for (std::int64_t t = 0; t < n; ++t) {
    scaled_exp_row<false, Arch>(q.p + t * q.ld, logp.row(t).data(), scale, qg.row(t).data(), Dk);
    scaled_exp_row<true, Arch>(k.p + t * k.ld, logp.row(t).data(), 1.0f, kinv.row(t).data(), Dk);
  }
  std::copy(logp.row(n - 1).data(), logp.row(n - 1).data() + Dk, last);
  simd::exp_sum<Arch>(last, Dk, 0.0f);
  for (std::int64_t t = 0; t < n; ++t) {
    float* kt = kd.row(t).data();
    const float* ki = kinv.row(t).data();
    for (std::int64_t c = 0; c < Dk; ++c) kt[c] = ki[c] * last[c];
  }
  auto A = a.topLeftCorner(n, n);
  A.template triangularView<Eigen::Lower>() = qg.topRows(n) * kinv.topRows(n).transpose();
  for (std::int64_t t = 0; t + 1 < n; ++t) std::fill(&A(t, t + 1), &A(t, 0) + n, 0.0f);
  chunk_products<Arch>(n, Dk, Dv, {qg.data(), Dk}, {a.data(), a.cols()}, {kd.data(), Dk}, v, o, s.data(),
                       s.outerStride(), nullptr, last);
}

// Recurrent form, one head: per token, e = exp(g_t), then per row S_i = e_i S_i + k_i v ; o += q_i S_i.
// FromSrc (an out-of-place step): the first token reads src and writes hv.state.
template <class Arch, bool FromSrc = false, class T>
void gla_recurrent_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g,
                        const view<const float, 2>& src = {}) {
  matrix zero;
  state_map s = map_state(hv.state, d.Dk, d.Dv, zero);
  std::vector<float> q(d.Dk), k(d.Dk), v(d.Dv), e(d.Dk), acc(d.Dv);
  for (std::int64_t t = 0; t < d.L; ++t) {
    prepare_row<Arch>(hv.q.ptr(t), d, d.scale, q.data(), nullptr);
    prepare_row<Arch>(hv.k.ptr(t), d, 1.0f, k.data(), nullptr);
    simd::convert<Arch>(hv.v.ptr(t), v.data(), d.Dv);
    std::copy(g.ptr(t), g.ptr(t) + d.Dk, e.data());
    simd::exp_sum<Arch>(e.data(), d.Dk, 0.0f);
    const bool from_src = FromSrc && t == 0;
    recurrent_token<Arch>(s.data(), s.outerStride(), d.Dk, d.Dv, q.data(), k.data(), v.data(), nullptr,
                          {1.0f, e.data()}, acc.data(), nullptr, from_src ? src.data() : nullptr,
                          from_src ? src.stride(0) : 0);
    std::copy(acc.begin(), acc.end(), hv.o.ptr(t));
  }
}

// Chunked form, one head (see the header comment).
template <class Arch, class T>
void gla_chunked_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g, std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  const std::int64_t Dk = d.Dk;
  matrix zero;
  state_map s = map_state(hv.state, Dk, d.Dv, zero);
  matrix q(C, Dk), k(C, Dk), v(C, d.Dv), out(C, d.Dv), a(C, C);
  matrix qg(C, Dk);      // q_t o E(-1, t): reads the chunk's initial state
  matrix kd(C, Dk);      // k_j o E(j, n-1): writes the next state
  matrix qsub(C, Dk);    // q_t o E(s_I - 1, t), t in sub-block I
  matrix ksplit(C, Dk);  // k_j o E(j, s_I - 1), j < s_I
  std::vector<float> acc(Dk), last(Dk);
  const bool fast = simd_chunks<Arch>(d.Dv);
  constexpr bool f32 = std::is_same_v<T, float>;
  matrix logp(fast ? C : 0, Dk);  // in-chunk prefix sums of the log-gates
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    auto gate = [&](std::int64_t t) { return g.ptr(t0 + t); };  // g_t [Dk], t in the chunk
    if (fast) {
      std::copy(gate(0), gate(0) + Dk, logp.row(0).data());
      for (std::int64_t t = 1; t < n; ++t) {
        const float* prev = logp.row(t - 1).data();
        const float* gt = gate(t);
        float* row = logp.row(t).data();
        for (std::int64_t c = 0; c < Dk; ++c) row[c] = prev[c] + gt[c];
      }
      const float* total = logp.row(n - 1).data();  // the most negative row: log-gates are <= 0
      if (*std::min_element(total, total + Dk) >= -gla_factor_limit) {
        // f32 rows are read where they lie (the scale then rides on the decay factors).
        crows qr{q.data(), Dk}, kr{k.data(), Dk}, vr{v.data(), d.Dv};
        float scale = 1.0f;
        bool prepared = true;
        if constexpr (f32) {
          vr = {hv.v.ptr(t0), hv.v.stride(0)};
          if (!d.l2norm) {
            qr = {hv.q.ptr(t0), hv.q.stride(0)};
            kr = {hv.k.ptr(t0), hv.k.stride(0)};
            scale = d.scale;
            prepared = false;
          }
        } else {
          load_values<Arch>(hv.v, t0, n, d, v);
        }
        if (prepared) {
          prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, nullptr);
          prepare_rows<Arch>(hv.k, t0, n, d, 1.0f, k, nullptr);
        }
        gla_weak_chunk_simd<Arch>(n, Dk, d.Dv, qr, kr, vr, {hv.o.ptr(t0), hv.o.stride(0)}, scale, logp, s, qg, ksplit,
                                  kd, a, last.data());
        continue;
      }
    }
    prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, nullptr);
    prepare_rows<Arch>(hv.k, t0, n, d, 1.0f, k, nullptr);
    load_values<Arch>(hv.v, t0, n, d, v);

    // Prefix decays E(-1, t) into qg; their last row decays the state.
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (std::int64_t t = 0; t < n; ++t) decay_row<true, false, Arch>(acc.data(), gate(t), q.row(t).data(), qg.row(t).data(), Dk);
    std::copy(acc.begin(), acc.end(), last.begin());
    simd::exp_sum<Arch>(last.data(), Dk, 0.0f);
    // Suffix decays E(j, n-1) into kd.
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (std::int64_t j = n - 1; j >= 0; --j)
      decay_row<false, false, Arch>(acc.data(), gate(j), k.row(j).data(), kd.row(j).data(), Dk);

    auto O = out.topRows(n);
    gemm<false>(O, qg.topRows(n), s);

    // Intra-chunk scores, sub-block by sub-block.
    const std::int64_t sub = std::min(gla_sub_block, n);
    for (std::int64_t s0 = 0; s0 < n; s0 += sub) {
      const std::int64_t m = std::min(sub, n - s0);
      if (s0 > 0) {
        // Move the split point from the previous sub-block's start - 1 to s0 - 1.
        const std::int64_t p0 = std::max<std::int64_t>(0, s0 - sub);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = s0 - 1; j >= p0; --j)
          decay_row<false, false, Arch>(acc.data(), gate(j), k.row(j).data(), ksplit.row(j).data(), Dk);
        simd::exp_sum<Arch>(acc.data(), Dk, 0.0f);  // E(p0 - 1, s0 - 1): the previous sub-block's total decay
        for (std::int64_t j = 0; j < p0; ++j) multiply(ksplit.row(j).data(), acc.data(), Dk);
      }
      // q_t o E(s0 - 1, t) for t in this sub-block; acc ends as the sub-block's total log-decay.
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (std::int64_t t = s0; t < s0 + m; ++t)
        decay_row<true, false, Arch>(acc.data(), gate(t), q.row(t).data(), qsub.row(t).data(), Dk);
      if (*std::min_element(acc.begin(), acc.end()) >= -gla_factor_limit) {
        // Weak decay inside the sub-block: extend the split to its own rows, k_j o E(s0 - 1, j)^-1
        // (factors <= exp(gla_factor_limit)), and take the whole row block, diagonal included, as
        // one GEMM. Entries above the diagonal are finite (<= exp(limit) |q| |k|) and never read.
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = s0; j < s0 + m; ++j)
          decay_row<true, true, Arch>(acc.data(), gate(j), k.row(j).data(), ksplit.row(j).data(), Dk);
        gemm<false>(a.block(s0, 0, m, s0 + m), qsub.middleRows(s0, m), ksplit.topRows(s0 + m).transpose());
        continue;
      }
      if (s0 > 0) gemm<false>(a.block(s0, 0, m, s0), qsub.middleRows(s0, m), ksplit.topRows(s0).transpose());
      // Strong decay: A_tj = sum_c q_t[c] E(j, t)[c] k_j[c] for j <= t in the sub-block, element-wise.
      for (std::int64_t t = s0; t < s0 + m; ++t) {
        const float* qt = q.row(t).data();
        a(t, t) = simd::dot<Arch>(qt, k.row(t).data(), Dk);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = t - 1; j >= s0; --j)
          a(t, j) = decayed_dot<Arch>(acc.data(), gate(j + 1), qt, k.row(j).data(), Dk);
      }
    }
    O.noalias() += a.topLeftCorner(n, n).template triangularView<Eigen::Lower>() * v.topRows(n);

    // State: S = diag(E(-1, n-1)) S + kd^T V.
    for (std::int64_t i = 0; i < Dk; ++i) s.row(i) *= last[i];
    gemm<true>(s, kd.topRows(n).transpose(), v.topRows(n));
    for (std::int64_t t = 0; t < n; ++t) store_output(O.row(t).data(), d, hv.o.ptr(t0 + t));
  }
}

}  // namespace detail

// Gated linear attention; see the header comment.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gla(const Q& q,              // [B, H, L, Dk]
         const K& k,              // [B, H, L, Dk]
         const V& v,              // [B, H, L, Dv]
         view<const float, 4> g,  // [B, H, L, Dk] log-decays <= 0
         view<float, 4> o,        // [B, H, L, Dv]
         view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
         const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::gla";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::check_channel_gate(fn, g, d);
  if (d.L == 0) return;
  const form f = detail::choose_form(opt, d.L);
  detail::for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const std::int64_t b = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, b, h);
    if (f == form::chunked) {
      detail::gla_chunked_head<Arch>(d, hv, g[b][h], detail::chunk_size(opt, default_chunk_size));
    } else {
      detail::gla_recurrent_head<Arch>(d, hv, g[b][h]);
    }
  });
}

// One decoding step: q, k [B, H, Dk], v and o [B, H, Dv], g [B, H, Dk]; continues `state` exactly.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gla_step(const Q& q, const K& k, const V& v,
              view<const float, 3> g,  // [B, H, Dk]
              view<float, 3> o,        // [B, H, Dv]
              view<float, 4> state,    // [B, H, Dk, Dv] in and out
              options opt = {}) {
  opt.path = form::recurrent;
  gla<view<const element_t<Q>, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, Arch>(
      detail::token_view(cview(q)), detail::token_view(cview(k)), detail::token_view(cview(v)), detail::token_view(g),
      detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, the same view (in place) or
// disjoint, e.g. the slots of a linear::state_ring (state_ring.hpp); bit for bit the in-place step.
template <class Q, class K, class V, class Arch = simd::default_arch>
void gla_step(const Q& q, const K& k, const V& v,
              view<const float, 3> g,         // [B, H, Dk]
              view<float, 3> o,               // [B, H, Dv]
              view<const float, 4> state_in,  // [B, H, Dk, Dv]
              view<float, 4> state_out,       // [B, H, Dk, Dv]
              options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  const char* fn = "linear::gla_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto o4 = detail::token_view(o);
  const auto g4 = detail::token_view(g);
  const auto d = detail::check_step_states<T>(fn, q4, k4, v4, o4, state_in, state_out, opt, false);
  detail::check_channel_gate(fn, g4, d);
  detail::for_each_step_head<T>(d, q4, k4, v4, o4, state_in, state_out, opt.threads,
                                [&](const auto& hv, std::int64_t b, std::int64_t h, const view<const float, 2>& src) {
                                  detail::gla_recurrent_head<Arch, true>(d, hv, g4[b][h], src);
                                });
}

}  // namespace mnemo::linear

// mnemo/linear/rwkv7.hpp — RWKV-7 "Goose" (Peng et al., "RWKV-7 "Goose" with Expressive Dynamic
// State Evolution", 2025): the generalized delta rule, whose transition is diagonal plus rank one.
//
//   u_t = S_{t-1}^T a_t                                 [Dv] what the rank-one term reads (before the decay)
//   S_t = diag(exp(g_t)) S_{t-1} + b_t u_t^T + k_t v_t^T   S [Dk, Dv], S_0 = state
//   o_t = (scale q_t)^T S_t                             read after the write
//
// i.e. S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T with w_t = exp(g_t). This is fla's
// generalized delta rule "dplr" (fla/ops/generalized_delta_rule/dplr/naive.py, dplr_recurrence, with
// alpha = a, beta = b, gk = g), which fla's ops/rwkv7 calls with RWKV-7's a = -kk, b = kk * iclr
// (kk the L2-normalised key, iclr the in-context learning rate in [0, 1]) and scale 1: a user of
// RWKV-7 passes options.scale = 1 (the default here, as for every member, is Dk^-0.5). In RWKV-7's
// own value-major orientation (state [Dv, Dk], state = state * w + state @ (a b^T) + v k^T with
// column vectors a, b, k, v) the same recurrence reads transposed. a and b are data like k (any values; no L2 norm is applied in
// the op, options.use_qk_l2norm is rejected).
//
// KDA (kda.hpp) is the special case b = k, a = -beta (exp(g) o k), with the key beta k:
//   (diag(e) - k beta (e o k)^T) S + beta k v^T = (I - beta k k^T) diag(e) S + beta k v^T.
// (The rank-one term reads the state before the decay, so the decay goes into a.)
//
// Chunked form (UT transform as kda.hpp, two rank-one terms instead of one). In a chunk of n tokens
// with initial state S, the in-chunk prefix sums c_t = sum_{s <= t} g_s [Dk], Gamma_t = exp(c_t),
// the exclusive prefix x_t = c_{t-1} (x_0 = 0) and the decay E(j, t) = exp(sum_{j < s <= t} g_s):
//   S_t   = Gamma_t S + sum_{j <= t} E(j, t) (k_j v_j^T + b_j u_j^T)
//   u_t^T = a_t^T S_{t-1} = (a_t o exp(x_t))^T S + sum_{j < t} a_t^T E(j, t-1) (k_j v_j^T + b_j u_j^T)
// so the chunk's U [n, Dv] solves the unit lower-triangular system
//   (I - A_ab) U = Ag S + A_ak V,   Ag = A o exp(X),  A_ak(t, j) = sum_c a_t[c] E(j, t-1)[c] k_j[c],
//                                    A_ab(t, j) likewise with b_j                       (j < t)
// and then
//   O     = Qg S + P_qk V + P_qb U,  Qg = scale Q o Gamma,  P_qk(t, j) = sum_c q_t[c] E(j, t)[c] k_j[c],
//                                    P_qb(t, j) likewise with b_j                       (j <= t)
//   S_new = diag(Gamma_{n-1}) S + Kd^T V + Bd^T U,   Kd = K o E(., n-1), Bd = B o E(., n-1).
// [Ag; Qg] S is one GEMM (2n x Dk times Dk x Dv), [Kd; Bd]^T [V; U] another (k = 2n). Where
// simd_chunks() holds (common.hpp) everything after the triangles runs on the SIMD micro-kernels,
// column block by column block of the state (the solve is column by column too), otherwise on
// Eigen's products. FLOPs per chunk: 8 n Dk Dv for the two state GEMMs, plus
// 2 n (n + 1) (Dk + Dv) for P_qk and P_qb and their products, plus 2 n (n - 1) (Dk + Dv) for A_ak and
// A_ab, A_ak V and the solve (bench/rwkv7_rows.cpp counts this).
//
// Numerical range: as kda.hpp. In a weak chunk (every channel's total log-decay c_{n-1} >=
// -2 rwkv7_factor_limit = -40) the four triangles are one GEMM through the reference point
// r = c_{n-1} / 2 per channel: E(j, t) = exp(c_t - r) exp(r - c_j), so with up_t = exp(c_t - r) and
// down_j = exp(r - c_j),
//   [A o up_{t-1} ; Q o up_t] [K o down ; B o down]^T = [A_ak  A_ab ; P_qk  P_qb]  (then masked)
// (up_{-1} = exp(-r)), and Ag, Qg, Kd, Bd are those rows times exp(r) (c_{n-1} - r = r). Every
// exponent lies in [c_{n-1} / 2, -c_{n-1} / 2], so every factor is in [exp(-20), exp(20)]; a decay
// formed from two of them carries a relative error <= 2.4e-6 (kda.hpp). Other chunks (a stronger
// decay or -inf in some channel) form every entry of the triangles from exact range sums,
// accumulated from t - 1 down to j (the P entries read q_t o exp(g_t), a factor <= 1, so one exp per
// pair and channel serves all four): nothing is divided by a decay, decays underflow to 0 as they
// should, and g = -inf resets the channel exactly.
//
// NaN: as every member (common.hpp): gates reject NaN with mnemo::error; q, k, v, a and b are data.
// A NaN in q_t reaches o_t only; a NaN in k_t, v_t, a_t or b_t enters the state and makes o_t and
// every later output of its (batch, head) NaN; the chunked form may also make the earlier outputs
// of t's own chunk NaN (0 * NaN in the masked triangles).
//
// Decoding and speculative decoding: rwkv7_step continues a state by one token, in place or out
// of place (read state_in, write state_out: the same memory traffic), on the slots of a
// linear::state_ring (state_ring.hpp) for rollback, exactly as kda_step:
//   auto [in, out] = ring.advance();  linear::rwkv7_step(q, k, v, g, a, b, o, in, out);
//   ring.rollback(rejected);
//
// Shapes: q, k, a, b [B, H, L, Dk] (one element type with v: float, f16 or bf16), v [B, H, L, Dv],
// g [B, H, L, Dk] f32 log-decays <= 0 (-inf allowed), o [B, H, L, Dv], state [B, H, Dk, Dv].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "mnemo/linear/common.hpp"

namespace mnemo::linear {

// The largest exponent magnitude of a weak chunk's decay factors (header comment), as kda_factor_limit.
inline constexpr float rwkv7_factor_limit = 20.0f;

// Tokens per chunk by default: 16, as the delta rules (common.hpp). At H = 8, L = 8192, D = 128, one
// thread, chunks of 8, 24, 32 and 48 took 3-20% more CPU time (ad-hoc timing, loaded machine).
inline constexpr std::int64_t rwkv7_default_chunk_size = delta_default_chunk_size;

namespace detail {

// The element type of a and b must be that of q, k and v.
template <class T, class A, class B>
inline constexpr bool rwkv7_same_type_v = std::is_same_v<T, element_t<A>> && std::is_same_v<T, element_t<B>>;

// What rwkv7 checks beyond check_common: g, a, b and the options it does not take.
template <class T>
void rwkv7_check(const char* fn, const view<const float, 4>& g, const view<const T, 4>& a, const view<const T, 4>& b,
                 const view<float, 4>& o, const view<float, 4>& state, const dims& d, const options& opt) {
  using mnemo::detail::require_disjoint;
  mnemo::detail::require(!opt.use_qk_l2norm, fn,
                         ": options.use_qk_l2norm must be false (RWKV-7 normalises its keys before forming a and b), "
                         "got true");
  check_channel_gate(fn, g, d);
  mnemo::detail::require_data(fn, "a", a, " [B, H, L, Dk]");
  mnemo::detail::require_data(fn, "b", b, " [B, H, L, Dk]");
  mnemo::detail::require_shape(fn, "a", a, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk] (from q)");
  mnemo::detail::require_shape(fn, "b", b, {d.B, d.H, d.L, d.Dk}, " [B, H, L, Dk] (from q)");
  require_disjoint(fn, "o", o, "a", a);
  require_disjoint(fn, "o", o, "b", b);
  require_disjoint(fn, "o", o, "g", g);
  require_disjoint(fn, "state", state, "a", a);
  require_disjoint(fn, "state", state, "b", b);
  require_disjoint(fn, "state", state, "g", g);
}

}  // namespace detail

namespace reference {

// RWKV-7's generalized delta rule, one token at a time in double.
template <class Q, class K, class V, class A, class Bv>
void rwkv7(const Q& q,              // [B, H, L, Dk]
           const K& k,              // [B, H, L, Dk]
           const V& v,              // [B, H, L, Dv]
           view<const float, 4> g,  // [B, H, L, Dk] log-decays <= 0
           const A& a,              // [B, H, L, Dk] the rank-one term's read vector
           const Bv& b,             // [B, H, L, Dk] the rank-one term's write vector
           view<float, 4> o,        // [B, H, L, Dv]
           view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
           const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  static_assert(detail::rwkv7_same_type_v<T, A, Bv>, "linear::rwkv7: a and b must have the element type of q, k and v");
  const char* fn = "linear::reference::rwkv7";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::rwkv7_check<T>(fn, g, cview(a), cview(b), o, state, d, opt);
  parallel_for(d.B * d.H, [&](std::int64_t bh) {
    const std::int64_t bb = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, bb, h);
    const view<const T, 2> ah = cview(a)[bb][h], bh2 = cview(b)[bb][h];
    std::vector<double> s = detail::reference_load_state(hv.state, d), u(d.Dv);  // S [Dk, Dv]
    for (std::int64_t t = 0; t < d.L; ++t) {
      const auto qt = detail::reference_row(hv.q.ptr(t), d, d.scale), kt = detail::reference_row(hv.k.ptr(t), d, 1.0);
      const auto at = detail::reference_row(ah.ptr(t), d, 1.0), bt = detail::reference_row(bh2.ptr(t), d, 1.0);
      const auto vt = detail::reference_values(hv.v.ptr(t), d);
      for (std::int64_t c = 0; c < d.Dv; ++c) {  // u = S^T a, before the decay
        double sa = 0;
        for (std::int64_t i = 0; i < d.Dk; ++i) sa += s[i * d.Dv + c] * at[i];
        u[c] = sa;
      }
      for (std::int64_t i = 0; i < d.Dk; ++i) {  // S = diag(exp(g)) S + b u^T + k v^T
        const double decay = std::exp(static_cast<double>(g(bb, h, t, i)));
        for (std::int64_t c = 0; c < d.Dv; ++c) s[i * d.Dv + c] = decay * s[i * d.Dv + c] + bt[i] * u[c] + kt[i] * vt[c];
      }
      detail::reference_read(qt, s, d, hv.o.ptr(t));
    }
    detail::reference_store_state(s, d, hv.state);
  }, opt.threads);
}

}  // namespace reference

namespace detail {

// ---- recurrent form ---------------------------------------------------------------------------
//
// One token over the state, column block by column block as common.hpp's recurrent_token (which
// has one rank-one term; this one has two): per block of NV vectors, u = S^T a from one pass over
// the block's rows (read again from L1 by the second), then S_i = e_i S_i + b_i u + k_i v and
// out += q_i S_i in one read-modify-write pass. OutOfPlace: read src, write s. Blocks of 4 vectors:
// 2 and 3 were slower at B = 1, H = 32, D = 128 on AVX2 (and so was reading S_{t-1} once for both
// S^T a and the output, o = S^T (q o e) + (q . b) u + (q . k) v, which moves work between the passes
// but saves none).
inline constexpr int rwkv7_token_vecs = 4;

struct rwkv7_token_rows {
  const float *q, *k, *v, *a, *b, *e;  // q scaled; e = exp(g)
};

inline void rwkv7_token_columns(const float* src, std::int64_t ldsrc, float* s, std::int64_t lds, std::int64_t Dk,
                                std::int64_t c0, std::int64_t c1, const rwkv7_token_rows& r, float* out) {
  for (std::int64_t c = c0; c < c1; ++c) {
    float u = 0;
    for (std::int64_t i = 0; i < Dk; ++i) u += src[i * ldsrc + c] * r.a[i];
    float acc = 0;
    for (std::int64_t i = 0; i < Dk; ++i) {
      const float x = r.e[i] * src[i * ldsrc + c] + r.b[i] * u + r.k[i] * r.v[c];
      s[i * lds + c] = x;
      acc += r.q[i] * x;
    }
    out[c] = acc;
  }
}

template <int NV, bool OutOfPlace, class Arch>
void rwkv7_token_block(const float* src, std::int64_t ldsrc, float* s, std::int64_t lds, std::int64_t Dk,
                       std::int64_t c0, const rwkv7_token_rows& r, float* out) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t w = simd::width<Arch>;
  batch u[NV], vv[NV], acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    u[j] = batch(0.0f);
    vv[j] = simd::load<Arch>(r.v + c0 + j * w);
  }
  for (std::int64_t i = 0; i < Dk; ++i) {
    const float* row = OutOfPlace ? src + i * ldsrc + c0 : s + i * lds + c0;
    const batch ai(r.a[i]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) u[j] = simd::detail::fmadd(ai, simd::load<Arch>(row + j * w), u[j]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) acc[j] = batch(0.0f);
  for (std::int64_t i = 0; i < Dk; ++i) {
    float* row = s + i * lds + c0;
    const float* in = OutOfPlace ? src + i * ldsrc + c0 : row;
    const batch ki(r.k[i]), bi(r.b[i]), ei(r.e[i]), qi(r.q[i]);
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const batch x = simd::detail::fmadd(ki, vv[j], simd::detail::fmadd(bi, u[j], ei * simd::load<Arch>(in + j * w)));
      simd::store(row + j * w, x);
      acc[j] = simd::detail::fmadd(qi, x, acc[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) simd::store(out + c0 + j * w, acc[j]);
}

template <bool OutOfPlace, class Arch>
std::int64_t rwkv7_token_blocks(const float* src, std::int64_t ldsrc, float* s, std::int64_t lds, std::int64_t Dk,
                                std::int64_t Dv, const rwkv7_token_rows& r, float* out) {
  constexpr std::int64_t w = simd::width<Arch>;
  std::int64_t c = 0;
  for (; c + rwkv7_token_vecs * w <= Dv; c += rwkv7_token_vecs * w)
    rwkv7_token_block<rwkv7_token_vecs, OutOfPlace, Arch>(src, ldsrc, s, lds, Dk, c, r, out);
  for (; c + w <= Dv; c += w) rwkv7_token_block<1, OutOfPlace, Arch>(src, ldsrc, s, lds, Dk, c, r, out);
  return c;
}

// One token over the whole state s [Dk, Dv] (row stride lds); src (row stride ldsrc): the state it
// reads when that is not s (an out-of-place step), else null.
template <class Arch>
void rwkv7_token(float* s, std::int64_t lds, std::int64_t Dk, std::int64_t Dv, const rwkv7_token_rows& r, float* out,
                 const float* src = nullptr, std::int64_t ldsrc = 0) {
  const bool separate = src != nullptr && src != s;
  if (!separate) {
    src = s;
    ldsrc = lds;
  }
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    c = separate ? rwkv7_token_blocks<true, Arch>(src, ldsrc, s, lds, Dk, Dv, r, out)
                 : rwkv7_token_blocks<false, Arch>(src, ldsrc, s, lds, Dk, Dv, r, out);
  }
  rwkv7_token_columns(src, ldsrc, s, lds, Dk, c, Dv, r, out);
}

// Recurrent form, one head. src: the state the first token reads when it is not hv.state (an
// out-of-place step), else empty.
template <class Arch, class T>
void rwkv7_recurrent_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g,
                          const view<const T, 2>& a, const view<const T, 2>& b, const view<const float, 2>& src = {}) {
  matrix zero;
  state_map s = map_state(hv.state, d.Dk, d.Dv, zero);
  std::vector<float> q(d.Dk), k(d.Dk), av(d.Dk), bv(d.Dk), e(d.Dk), v(d.Dv), acc(d.Dv);
  const rwkv7_token_rows rows{q.data(), k.data(), v.data(), av.data(), bv.data(), e.data()};
  for (std::int64_t t = 0; t < d.L; ++t) {
    prepare_row<Arch>(hv.q.ptr(t), d, d.scale, q.data(), nullptr);
    simd::convert<Arch>(hv.k.ptr(t), k.data(), d.Dk);
    simd::convert<Arch>(a.ptr(t), av.data(), d.Dk);
    simd::convert<Arch>(b.ptr(t), bv.data(), d.Dk);
    simd::convert<Arch>(hv.v.ptr(t), v.data(), d.Dv);
    std::copy(g.ptr(t), g.ptr(t) + d.Dk, e.data());
    simd::exp_sum<Arch>(e.data(), d.Dk, 0.0f);
    const bool out_of_place = t == 0 && !src.empty();
    rwkv7_token<Arch>(s.data(), s.outerStride(), d.Dk, d.Dv, rows, acc.data(), out_of_place ? src.data() : nullptr,
                      out_of_place ? src.stride(0) : 0);
    std::copy(acc.begin(), acc.end(), hv.o.ptr(t));
  }
}

// ---- chunked form -----------------------------------------------------------------------------

// Weak chunk, token t (header comment): from c = c_t, the reference point r, prev = up_{t-1} and
// half = exp(r), writes up = exp(c - r) (the next token's prev) and
//   a_up = a o prev,  q_up = q o up,  k_dn = k o exp(r - c),  b_dn = b o exp(r - c)
//   ag = a_up o half, qg = q_up o half, kd = k_dn o half,  bd = b_dn o half
template <class Arch>
void rwkv7_weak_row(const float* q, const float* k, const float* a, const float* b, const float* c, const float* r,
                    const float* half, const float* prev, float* up, float* a_up, float* q_up, float* k_dn,
                    float* b_dn, float* ag, float* qg, float* kd, float* bd, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    for (; i + w <= n; i += w) {
      const batch e = simd::load<Arch>(c + i) - simd::load<Arch>(r + i), h = simd::load<Arch>(half + i);
      const batch u = simd::exp(e), dn = simd::exp(-e);
      const batch au = simd::load<Arch>(a + i) * simd::load<Arch>(prev + i), qu = simd::load<Arch>(q + i) * u;
      const batch kn = simd::load<Arch>(k + i) * dn, bn = simd::load<Arch>(b + i) * dn;
      simd::store(up + i, u);
      simd::store(a_up + i, au);
      simd::store(q_up + i, qu);
      simd::store(k_dn + i, kn);
      simd::store(b_dn + i, bn);
      simd::store(ag + i, au * h);
      simd::store(qg + i, qu * h);
      simd::store(kd + i, kn * h);
      simd::store(bd + i, bn * h);
    }
  }
  for (; i < n; ++i) {
    const float e = c[i] - r[i], u = simd::exp<Arch>(e), dn = simd::exp<Arch>(-e);
    const float au = a[i] * prev[i];
    up[i] = u;
    a_up[i] = au;
    q_up[i] = q[i] * u;
    k_dn[i] = k[i] * dn;
    b_dn[i] = b[i] * dn;
    ag[i] = au * half[i];
    qg[i] = q_up[i] * half[i];
    kd[i] = k_dn[i] * half[i];
    bd[i] = b_dn[i] * half[i];
  }
}

// out = x o exp(y), elementwise (strong chunks: y a sum of log-gates, so the factor is <= 1).
template <class Arch>
void rwkv7_times_exp(const float* x, const float* y, float* out, std::int64_t n) {
  std::int64_t i = 0;
  if constexpr (simd::vectorized<Arch>) {
    constexpr std::int64_t w = simd::width<Arch>;
    for (; i + w <= n; i += w) simd::store(out + i, simd::load<Arch>(x + i) * simd::exp(simd::load<Arch>(y + i)));
  }
  for (; i < n; ++i) out[i] = x[i] * simd::exp<Arch>(y[i]);
}

// Strong chunk, pair (t, j), j < t, walking j down from t - 1: with acc = sum_{j < s <= t-1} g_s on
// entry and e = exp(acc), returns {a_t . (e o k_j), a_t . (e o b_j), qw_t . (e o k_j), qw_t . (e o b_j)}
// (qw_t = q_t o exp(g_t)), then acc += g_j for the next (earlier) j.
struct rwkv7_pair_dots {
  float ak, ab, qk, qb;
};

template <class Arch>
rwkv7_pair_dots rwkv7_decayed_dots(float* acc, const float* gj, const float* at, const float* qw, const float* kj,
                                   const float* bj, std::int64_t n) {
  rwkv7_pair_dots r{0, 0, 0, 0};
  std::int64_t i = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = simd::width<Arch>;
    batch ak(0.0f), ab(0.0f), qk(0.0f), qb(0.0f);
    for (; i + w <= n; i += w) {
      const batch x = simd::load<Arch>(acc + i), e = simd::exp(x);
      simd::store(acc + i, x + simd::load<Arch>(gj + i));
      const batch ek = e * simd::load<Arch>(kj + i), eb = e * simd::load<Arch>(bj + i);
      const batch av = simd::load<Arch>(at + i), qv = simd::load<Arch>(qw + i);
      ak = simd::detail::fmadd(av, ek, ak);
      ab = simd::detail::fmadd(av, eb, ab);
      qk = simd::detail::fmadd(qv, ek, qk);
      qb = simd::detail::fmadd(qv, eb, qb);
    }
    r = {simd::hsum(ak), simd::hsum(ab), simd::hsum(qk), simd::hsum(qb)};
  }
  for (; i < n; ++i) {
    const float e = simd::exp<Arch>(acc[i]);
    acc[i] += gj[i];
    const float ek = e * kj[i], eb = e * bj[i];
    r.ak += at[i] * ek;
    r.ab += at[i] * eb;
    r.qk += qw[i] * ek;
    r.qb += qw[i] * eb;
  }
  return r;
}

// (I - N) X = X0 in place on w columns: X_t = X0_t + sum_{j < t} N(t, j) X_j for t ascending, the
// chunk's unit lower-triangular solve (N strictly lower [n, n], row stride nm.ld; X row stride x.ld).
template <class Arch>
void rwkv7_forward_solve(std::int64_t n, std::int64_t w, crows nm, rows x) {
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t vw = simd::width<Arch>;
    for (; c + 2 * vw <= w; c += 2 * vw)
      for (std::int64_t t = 1; t < n; ++t) {
        const float* nt = nm.p + t * nm.ld;
        float* xt = x.p + t * x.ld + c;
        batch x0 = simd::load<Arch>(xt), x1 = simd::load<Arch>(xt + vw);
        for (std::int64_t j = 0; j < t; ++j) {
          const batch f(nt[j]);
          const float* xj = x.p + j * x.ld + c;
          x0 = simd::detail::fmadd(f, simd::load<Arch>(xj), x0);
          x1 = simd::detail::fmadd(f, simd::load<Arch>(xj + vw), x1);
        }
        simd::store(xt, x0);
        simd::store(xt + vw, x1);
      }
  }
  for (; c < w; ++c)
    for (std::int64_t t = 1; t < n; ++t) {
      float acc = x.p[t * x.ld + c];
      for (std::int64_t j = 0; j < t; ++j) acc += nm.p[t * nm.ld + j] * x.p[j * x.ld + c];
      x.p[t * x.ld + c] = acc;
    }
}

// The SIMD products of one chunk (simd_chunks() holds), column block by column block of the state
// so a block of S stays in cache from its read to its update (common.hpp's chunk_products does the
// same for the members without a solve; the solve is column by column, so it splits the same way):
//   [U ; O] = [Ag ; Qg] S,  U += A_ak V,  (I - A_ab) U = U,  O += P_qk V + P_qb U,
//   S = diag(last) S + [Kd ; Bd]^T [V ; U]
// aq = [Ag ; Qg] and kb = [Kd ; Bd] (2n rows of Dk), tri = [A_ak A_ab ; P_qk P_qb] (row stride ldt,
// zero above the diagonals), vuo = [V ; U ; O] (3n rows of Dv), s [Dk, Dv] with row stride lds.
template <class Arch>
void rwkv7_chunk_products(std::int64_t n, std::int64_t Dk, std::int64_t Dv, const float* aq, const float* kb,
                          const float* tri, std::int64_t ldt, float* vuo, float* s, std::int64_t lds,
                          const float* last) {
  using simd::a_order;
  using simd::c_mode;
  constexpr std::int64_t cb = simd::gemm_blocking<Arch>::nv * simd::width<Arch>;
  float* v = vuo;
  float* u = vuo + n * Dv;
  float* o = vuo + 2 * n * Dv;
  for (std::int64_t j0 = 0; j0 < Dv; j0 += cb) {
    const std::int64_t w = std::min(cb, Dv - j0);
    simd::gemm<a_order::row_major, Arch>(2 * n, w, Dk, aq, Dk, s + j0, lds, u + j0, Dv, c_mode::overwrite);
    lower_product<Arch>(n, w, {tri, ldt}, {v + j0, Dv}, {u + j0, Dv}, nullptr);
    rwkv7_forward_solve<Arch>(n, w, {tri + n, ldt}, {u + j0, Dv});
    lower_product<Arch>(n, w, {tri + n * ldt, ldt}, {v + j0, Dv}, {o + j0, Dv}, nullptr);
    lower_product<Arch>(n, w, {tri + n * ldt + n, ldt}, {u + j0, Dv}, {o + j0, Dv}, nullptr);
    simd::gemm<a_order::col_major, Arch>(Dk, w, 2 * n, kb, Dk, v + j0, Dv, s + j0, lds, c_mode::rescale, last);
  }
}

// Chunked form, one head; see the header comment.
template <class Arch, class T>
void rwkv7_chunked_head(const dims& d, const head_views<T>& hv, const view<const float, 2>& g,
                        const view<const T, 2>& av, const view<const T, 2>& bv, std::int64_t chunk) {
  const std::int64_t C = std::min(chunk, d.L);
  const std::int64_t Dk = d.Dk, Dv = d.Dv;
  matrix zero;
  state_map s = map_state(hv.state, Dk, Dv, zero);
  matrix q(C, Dk), k(C, Dk), a(C, Dk), b(C, Dk);  // the chunk's rows (q scaled)
  matrix logp(C, Dk);                              // c_t, the in-chunk prefix sums of the log-gates
  matrix aq(2 * C, Dk);                            // [Ag ; Qg]: one GEMM reads the state for both
  matrix kb(2 * C, Dk);                            // [Kd ; Bd]: one GEMM writes the next state
  matrix up_rows(2 * C, Dk), dn_rows(2 * C, Dk);   // weak chunks: [A o up_{t-1} ; Q o up], [K o down ; B o down]
  matrix vuo(3 * C, Dv);                           // [V ; U ; O]: U from Ag S to the solution, O from Qg S
  matrix tri(2 * C, 2 * C);                        // [A_ak  A_ab ; P_qk  P_qb], zero above the (strict) diagonals
  std::vector<float> last(Dk), acc(Dk), ref(Dk), half(Dk), up(2 * Dk), qw(Dk);
  const bool fast = simd_chunks<Arch>(Dv);
  for (std::int64_t t0 = 0; t0 < d.L; t0 += C) {
    const std::int64_t n = std::min(C, d.L - t0);
    auto gate = [&](std::int64_t t) { return g.ptr(t0 + t); };  // g_t [Dk], t in the chunk
    prepare_rows<Arch>(hv.q, t0, n, d, d.scale, q, nullptr);
    for (std::int64_t t = 0; t < n; ++t) {
      simd::convert<Arch>(hv.k.ptr(t0 + t), k.row(t).data(), Dk);
      simd::convert<Arch>(av.ptr(t0 + t), a.row(t).data(), Dk);
      simd::convert<Arch>(bv.ptr(t0 + t), b.row(t).data(), Dk);
    }
    load_values<Arch>(hv.v, t0, n, d, vuo);
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
    auto Ag = aq.topRows(n);
    auto Qg = aq.middleRows(n, n);
    auto Kd = kb.topRows(n);
    auto Bd = kb.middleRows(n, n);
    auto M = tri.topLeftCorner(2 * n, 2 * n);
    if (*std::min_element(total, total + Dk) >= -2 * rwkv7_factor_limit) {
      // Weak chunk: the four triangles in one product through the reference point r = c_{n-1} / 2.
      for (std::int64_t c = 0; c < Dk; ++c) {
        ref[c] = half[c] = 0.5f * total[c];
        up[c] = -ref[c];  // up_{-1} = exp(-r)
      }
      simd::exp_sum<Arch>(half.data(), Dk, 0.0f);
      simd::exp_sum<Arch>(up.data(), Dk, 0.0f);
      for (std::int64_t t = 0; t < n; ++t) {
        float* prev = up.data() + (t % 2) * Dk;
        float* next = up.data() + ((t + 1) % 2) * Dk;
        rwkv7_weak_row<Arch>(q.row(t).data(), k.row(t).data(), a.row(t).data(), b.row(t).data(), logp.row(t).data(),
                             ref.data(), half.data(), prev, next, up_rows.row(t).data(), up_rows.row(n + t).data(),
                             dn_rows.row(t).data(), dn_rows.row(n + t).data(), Ag.row(t).data(), Qg.row(t).data(),
                             Kd.row(t).data(), Bd.row(t).data(), Dk);
      }
      gemm<false>(M, up_rows.topRows(2 * n), dn_rows.topRows(2 * n).transpose());
      for (std::int64_t t = 0; t < n; ++t) {  // the masks: strict for A_ak, A_ab; with the diagonal for P
        float* top = &M(t, 0);
        float* bottom = &M(n + t, 0);
        std::fill(top + t, top + n, 0.0f);
        std::fill(top + n + t, top + 2 * n, 0.0f);
        std::fill(bottom + t + 1, bottom + n, 0.0f);
        std::fill(bottom + n + t + 1, bottom + 2 * n, 0.0f);
      }
    } else {
      // Strong chunk: every entry from exact range sums, t - 1 down to j.
      M.setZero();
      std::fill(acc.begin(), acc.end(), 0.0f);  // x_0 = 0
      for (std::int64_t t = 0; t < n; ++t) {
        rwkv7_times_exp<Arch>(a.row(t).data(), t > 0 ? logp.row(t - 1).data() : acc.data(), Ag.row(t).data(), Dk);
        rwkv7_times_exp<Arch>(q.row(t).data(), logp.row(t).data(), Qg.row(t).data(), Dk);
      }
      for (std::int64_t j = n - 1; j >= 0; --j) {  // acc = sum_{j < s < n} g_s
        rwkv7_times_exp<Arch>(k.row(j).data(), acc.data(), Kd.row(j).data(), Dk);
        rwkv7_times_exp<Arch>(b.row(j).data(), acc.data(), Bd.row(j).data(), Dk);
        const float* gj = gate(j);
        for (std::int64_t c = 0; c < Dk; ++c) acc[c] += gj[c];
      }
      for (std::int64_t t = 0; t < n; ++t) {
        const float* at = a.row(t).data();
        const float* qt = q.row(t).data();
        M(n + t, t) = simd::dot<Arch>(qt, k.row(t).data(), Dk);
        M(n + t, n + t) = simd::dot<Arch>(qt, b.row(t).data(), Dk);
        rwkv7_times_exp<Arch>(qt, gate(t), qw.data(), Dk);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (std::int64_t j = t - 1; j >= 0; --j) {
          const rwkv7_pair_dots p =
              rwkv7_decayed_dots<Arch>(acc.data(), gate(j), at, qw.data(), k.row(j).data(), b.row(j).data(), Dk);
          M(t, j) = p.ak;
          M(t, n + j) = p.ab;
          M(n + t, j) = p.qk;
          M(n + t, n + j) = p.qb;
        }
      }
    }
    if (fast) {
      rwkv7_chunk_products<Arch>(n, Dk, Dv, aq.data(), kb.data(), tri.data(), tri.cols(), vuo.data(), s.data(),
                                 s.outerStride(), last.data());
    } else {
      // [Ag S ; Qg S] into [U ; O] in one GEMM; U += A_ak V; (I - A_ab) U = U as one unit
      // lower-triangular solve; O += P_qk V + P_qb U; S = diag(Gamma_{n-1}) S + [Kd ; Bd]^T [V ; U].
      auto V = vuo.topRows(n);
      auto U = vuo.middleRows(n, n);
      gemm<false>(vuo.middleRows(n, 2 * n), aq.topRows(2 * n), s);
      U.noalias() += M.topLeftCorner(n, n).template triangularView<Eigen::StrictlyLower>() * V;
      for (std::int64_t t = 1; t < n; ++t) {
        float* row = &M(t, n);
        for (std::int64_t j = 0; j < t; ++j) row[j] = -row[j];
      }
      M.block(0, n, n, n).template triangularView<Eigen::UnitLower>().solveInPlace(U);
      vuo.middleRows(2 * n, n).noalias() += M.block(n, 0, n, n).template triangularView<Eigen::Lower>() * V;
      vuo.middleRows(2 * n, n).noalias() += M.block(n, n, n, n).template triangularView<Eigen::Lower>() * U;
      for (std::int64_t i = 0; i < Dk; ++i) s.row(i) *= last[i];
      gemm<true>(s, kb.topRows(2 * n).transpose(), vuo.topRows(2 * n));
    }
    for (std::int64_t t = 0; t < n; ++t) store_output(vuo.row(2 * n + t).data(), d, hv.o.ptr(t0 + t));
  }
}

}  // namespace detail

// RWKV-7's generalized delta rule; see the header comment.
template <class Q, class K, class V, class A, class Bv, class Arch = simd::default_arch>
void rwkv7(const Q& q,              // [B, H, L, Dk]
           const K& k,              // [B, H, L, Dk]
           const V& v,              // [B, H, L, Dv]
           view<const float, 4> g,  // [B, H, L, Dk] log-decays <= 0
           const A& a,              // [B, H, L, Dk] the rank-one term's read vector
           const Bv& b,             // [B, H, L, Dk] the rank-one term's write vector
           view<float, 4> o,        // [B, H, L, Dv]
           view<float, 4> state = {},  // [B, H, Dk, Dv] in and out, or empty
           const options& opt = {}) {
  using T = detail::input_t<Q, K, V>;
  static_assert(detail::rwkv7_same_type_v<T, A, Bv>, "linear::rwkv7: a and b must have the element type of q, k and v");
  const char* fn = "linear::rwkv7";
  const auto d = detail::check_common<T>(fn, cview(q), cview(k), cview(v), o, state, opt, false);
  detail::rwkv7_check<T>(fn, g, cview(a), cview(b), o, state, d, opt);
  if (d.L == 0) return;
  const form f = detail::choose_form(opt, d.L);
  detail::for_each_head(d.B * d.H, opt.threads, f == form::chunked, [&](std::int64_t bh) {
    const std::int64_t bb = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(cview(q), cview(k), cview(v), o, state, bb, h);
    if (f == form::chunked) {
      detail::rwkv7_chunked_head<Arch>(d, hv, g[bb][h], cview(a)[bb][h], cview(b)[bb][h],
                                       detail::chunk_size(opt, rwkv7_default_chunk_size));
    } else {
      detail::rwkv7_recurrent_head<Arch>(d, hv, g[bb][h], cview(a)[bb][h], cview(b)[bb][h]);
    }
  });
}

// One decoding step: q, k, g, a and b [B, H, Dk], v and o [B, H, Dv]; continues `state`.
template <class Q, class K, class V, class A, class Bv, class Arch = simd::default_arch>
void rwkv7_step(const Q& q, const K& k, const V& v,
                view<const float, 3> g,  // [B, H, Dk]
                const A& a,              // [B, H, Dk]
                const Bv& b,             // [B, H, Dk]
                view<float, 3> o,        // [B, H, Dv]
                view<float, 4> state,    // [B, H, Dk, Dv] in and out
                options opt = {}) {
  opt.path = form::recurrent;
  using T = element_t<Q>;
  rwkv7<view<const T, 4>, view<const element_t<K>, 4>, view<const element_t<V>, 4>, view<const element_t<A>, 4>,
        view<const element_t<Bv>, 4>, Arch>(detail::token_view(cview(q)), detail::token_view(cview(k)),
                                            detail::token_view(cview(v)), detail::token_view(g),
                                            detail::token_view(cview(a)), detail::token_view(cview(b)),
                                            detail::token_view(o), state, opt);
}

// One decoding step out of place: reads state_in, writes state_out, which are the same view (in
// place) or disjoint; e.g. the two slots of linear::state_ring::advance() (state_ring.hpp).
template <class Q, class K, class V, class A, class Bv, class Arch = simd::default_arch>
void rwkv7_step(const Q& q, const K& k, const V& v,
                view<const float, 3> g,         // [B, H, Dk]
                const A& a,                     // [B, H, Dk]
                const Bv& b,                    // [B, H, Dk]
                view<float, 3> o,               // [B, H, Dv]
                view<const float, 4> state_in,  // [B, H, Dk, Dv]
                view<float, 4> state_out,       // [B, H, Dk, Dv]
                options opt = {}) {
  using T = detail::input_t<Q, K, V>;
  static_assert(detail::rwkv7_same_type_v<T, A, Bv>, "linear::rwkv7: a and b must have the element type of q, k and v");
  const char* fn = "linear::rwkv7_step";
  opt.path = form::recurrent;
  const auto q4 = detail::token_view(cview(q)), k4 = detail::token_view(cview(k));
  const auto v4 = detail::token_view(cview(v));
  const auto g4 = detail::token_view(g);
  const auto a4 = detail::token_view(cview(a)), b4 = detail::token_view(cview(b));
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
  detail::rwkv7_check<T>(fn, g4, a4, b4, o4, state_out, d, opt);
  detail::for_each_head(d.B * d.H, opt.threads, false, [&](std::int64_t bh) {
    const std::int64_t bb = bh / d.H, h = bh % d.H;
    const detail::head_views<T> hv(q4, k4, v4, o4, state_out, bb, h);
    detail::rwkv7_recurrent_head<Arch>(d, hv, g4[bb][h], a4[bb][h], b4[bb][h], state_in[bb][h]);
  });
}

}  // namespace mnemo::linear

// mnemo/attention/sigmoid.hpp — sigmoid attention (Ramapuram et al., "Theory, Analysis, and Best
// Practices for Sigmoid Self-Attention", 2024; their kernel is FlashSigmoid): every weight is an
// elementwise sigmoid, with no row normaliser.
//
//   x_ij  = mods(scale * q_i . k_j) + b        score mods (softcap, ALiBi, ...) first, then the bias
//   out_i = sum_{j visible to i} sigmoid(x_ij) v_j,     sigmoid(x) = 1 / (1 + exp(-x))
//
// b is one scalar for the whole call; the paper's default is b = -log(n) with n the sequence
// length, here -log(Lk) for every row, also under a causal mask (sigmoid_default_bias). The bias
// is added after the scale and after the score mods (golden README, choice 12: "bias is added
// after scale"; with softcap the cap bounds the score, not the bias). Masked keys contribute 0 and
// a row that sees no key gives out = 0. There is no lse (nothing normalises) and no attention
// sinks (options.sinks must be empty: a sink only joins a softmax denominator).
//
// Backward (of sum(out * dout)), with s' = sigmoid(x) (1 - sigmoid(x)) and f' the derivative of
// the score mods (mods.hpp: score_derivative):
//
//   dP_ij = dout_i . v_j,   dS_ij = scale * dP_ij * s'_ij * f'_ij
//   dq_i  = sum_j dS_ij k_j,   dk_j = sum_i dS_ij q_i,   dv_j = sum_i sigmoid(x_ij) dout_i
//
// dk and dv are summed over the query heads of each kv head's group (GQA). Unlike softmax, no
// statistic of the forward is needed: the backward recomputes x from q and k alone.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv]; dq like
// q, dk like k, dv like v. Query head h reads kv head h / (Hq / Hkv); causal masks are bottom-right
// aligned (query row i sits at key position i + Lk - Lq), as everywhere (DESIGN.md).
//
// How it runs. On flash's key-major tiles (tiles.hpp, simd/gemm.hpp): S^T = K (scale Q)^T, the
// score mods and the mask over the tile, then P^T = sigmoid(S^T + b) in place, then O += P V
// (c_mode::accumulate: with no running maximum there is nothing to rescale). Work items are
// (batch, kv head, query tile), each key tile loaded once for the whole GQA group, as in flash.
// Empty tiles (mods' block()) are skipped. The backward runs the two passes of flash_backward
// (dK, dV per key tile; dQ per query tile) on the same recomputed tiles, so no two threads add
// into the same gradient and results do not depend on the thread count.
//
// Numerics: f32 products and sums with fused multiply-adds. sigmoid is computed from
// e = exp(-|x|) in (0, 1]: sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) below, and
// s' = e / (1 + e)^2, so nothing overflows and s' keeps its relative accuracy where sigmoid is
// close to 1 (1 - sigmoid would cancel). e is flushed to 0 below exp's normal range
// (|x| > 87.3), as the softmax kernels flush p: such a weight is < 1.2e-38. A masked score
// (-inf) gives weight 0 and s' = 0; a NaN in q, k or v gives NaN. A row whose f32 result is not
// finite (|v| near FLT_MAX) is computed again in double, as flash does. The readable
// double-precision references are reference_sigmoid_attention and
// reference_sigmoid_attention_backward (below): swap the name to check a surprising result.
// (They are not in a namespace `reference`: attention::reference is already the softmax
// reference function, so the family's names carry the prefix, as reference_backward does.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/dispatch.hpp"
#include "mnemo/simd/gemm.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::attention {

// The paper's bias for Lk keys: -log(Lk) (0 for Lk <= 1, where no key or one key is seen).
inline float sigmoid_default_bias(std::int64_t Lk) {
  return Lk > 1 ? static_cast<float>(-std::log(static_cast<double>(Lk))) : 0.0f;
}

namespace sigmoid_detail {

// sigmoid(x) and sigmoid'(x) from e = exp(-|x|), in double (the references).
struct sigmoid_pair {
  double value, slope;
};
inline sigmoid_pair sigmoid_and_slope(double x) {
  const double e = std::exp(-std::abs(x)), r = 1.0 / (1.0 + e);
  if (std::isnan(x)) return {x, x};
  return {x >= 0 ? r : e * r, e * r * r};
}

// The bias of a call: the caller's, else -log(Lk); it must be finite.
inline float resolve_bias(const char* fn, std::optional<float> bias, std::int64_t Lk) {
  const float b = bias ? *bias : sigmoid_default_bias(Lk);
  mnemo::detail::require(std::isfinite(b), fn, ": bias must be finite, got ", b);
  return b;
}

// The checks every sigmoid entry point adds to check_args: no sinks.
inline void check_no_sinks(const char* fn, const options& opt) {
  mnemo::detail::require(opt.sinks.empty(), fn,
                         ": options.sinks must be empty: sigmoid attention has no softmax denominator for a sink "
                         "to join, got sinks of shape ",
                         shape_string(opt.sinks.shape()));
}

// dout [B, Hq, Lq, Dv] from q and v, named as itself (check_args then sees it as the `out` whose
// shape it checks).
inline void check_dout(const char* fn, const view<const float, 4>& q, const view<const float, 4>& v,
                       const view<const float, 4>& dout) {
  mnemo::detail::require_data(fn, "dout", dout, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_shape(fn, "dout", dout, {q.extent(0), q.extent(1), q.extent(2), v.extent(3)},
                               " [B, Hq, Lq, Dv] (from q and v)");
}

// Shapes and aliasing of the gradients against the validated dims of a backward call.
inline void check_grads(const char* fn, const dims& d, const view<const float, 4>& q, const view<const float, 4>& k,
                        const view<const float, 4>& v, const view<const float, 4>& dout, const view<float, 4>& dq,
                        const view<float, 4>& dk, const view<float, 4>& dv) {
  using mnemo::detail::require_disjoint;
  using mnemo::detail::require_shape;
  mnemo::detail::require_data(fn, "dq", dq, " [B, Hq, Lq, D]");
  mnemo::detail::require_data(fn, "dk", dk, " [B, Hkv, Lk, D]");
  mnemo::detail::require_data(fn, "dv", dv, " [B, Hkv, Lk, Dv]");
  require_shape(fn, "dq", dq, {d.B, d.Hq, d.Lq, d.D}, " [B, Hq, Lq, D]");
  require_shape(fn, "dk", dk, {d.B, d.Hkv, d.Lk, d.D}, " [B, Hkv, Lk, D]");
  require_shape(fn, "dv", dv, {d.B, d.Hkv, d.Lk, d.Dv}, " [B, Hkv, Lk, Dv]");
  // Every gradient is written while all of q, k, v and dout are still read.
  const char* names[] = {"dq", "dk", "dv"};
  const view<float, 4> grads[] = {dq, dk, dv};
  for (int a = 0; a < 3; ++a) {
    require_disjoint(fn, names[a], grads[a], "q", q);
    require_disjoint(fn, names[a], grads[a], "k", k);
    require_disjoint(fn, names[a], grads[a], "v", v);
    require_disjoint(fn, names[a], grads[a], "dout", dout);
    for (int b = a + 1; b < 3; ++b) require_disjoint(fn, names[a], grads[a], names[b], grads[b]);
  }
}

// Row i of head h in double: out_i = sum_j sigmoid(x_ij) v_j. `acc` is a scratch row of Dv doubles.
template <class KV, class Mod>
void reference_row(const dims& d, const float* qi, view<const KV, 4> k, view<const KV, 4> v, const Mod& mod,
                   double bias, std::int64_t b, std::int64_t h, std::int64_t i, double* acc, float* oi) {
  const std::int64_t hk = h / d.group(), qp = i + d.offset();
  std::fill(acc, acc + d.Dv, 0.0);
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    if (!mods::visible(mod, h, qp, j)) continue;
    const KV* kj = k.ptr(b, hk, j);
    double dot = 0;
    for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(qi[c]) * static_cast<double>(to_float(kj[c]));
    const double p = sigmoid_and_slope(mods::score(mod, static_cast<double>(d.scale) * dot, h, qp, j) + bias).value;
    const KV* vj = v.ptr(b, hk, j);
    for (std::int64_t c = 0; c < d.Dv; ++c) acc[c] += p * static_cast<double>(to_float(vj[c]));
  }
  for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = static_cast<float>(acc[c]);
}

// The backward of one (batch, kv head) in double: dq of the group's query heads, dk and dv of the
// kv head summed over them.
template <class Mod>
void reference_backward_group(const dims& d, view<const float, 4> q, view<const float, 4> k, view<const float, 4> v,
                              view<const float, 4> dout, view<float, 4> dq, view<float, 4> dk, view<float, 4> dv,
                              const Mod& mod, double bias, std::int64_t b, std::int64_t hk) {
  const std::int64_t Lk = d.Lk, D = d.D, Dv = d.Dv;
  std::vector<double> dq_row(static_cast<std::size_t>(D)), dk_acc(static_cast<std::size_t>(Lk * D), 0.0),
      dv_acc(static_cast<std::size_t>(Lk * Dv), 0.0);
  for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
    for (std::int64_t i = 0; i < d.Lq; ++i) {
      const std::int64_t qp = i + d.offset();
      const float* qi = q.ptr(b, h, i);
      const float* gi = dout.ptr(b, h, i);
      std::fill(dq_row.begin(), dq_row.end(), 0.0);
      for (std::int64_t j = 0; j < Lk; ++j) {
        if (!mods::visible(mod, h, qp, j)) continue;
        double dot = 0, dp = 0;
        for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(qi[c]) * static_cast<double>(k(b, hk, j, c));
        for (std::int64_t c = 0; c < Dv; ++c) dp += static_cast<double>(gi[c]) * static_cast<double>(v(b, hk, j, c));
        const double s = static_cast<double>(d.scale) * dot;
        const auto [p, slope] = sigmoid_and_slope(mods::score(mod, s, h, qp, j) + bias);
        const double dx = dp * slope * mods::score_derivative(mod, s, h, qp, j) * static_cast<double>(d.scale);
        for (std::int64_t c = 0; c < D; ++c) {
          dq_row[static_cast<std::size_t>(c)] += dx * static_cast<double>(k(b, hk, j, c));
          dk_acc[static_cast<std::size_t>(j * D + c)] += dx * static_cast<double>(qi[c]);
        }
        for (std::int64_t c = 0; c < Dv; ++c) dv_acc[static_cast<std::size_t>(j * Dv + c)] += p * static_cast<double>(gi[c]);
      }
      for (std::int64_t c = 0; c < D; ++c) dq(b, h, i, c) = static_cast<float>(dq_row[static_cast<std::size_t>(c)]);
    }
  }
  for (std::int64_t j = 0; j < Lk; ++j) {
    for (std::int64_t c = 0; c < D; ++c) dk(b, hk, j, c) = static_cast<float>(dk_acc[static_cast<std::size_t>(j * D + c)]);
    for (std::int64_t c = 0; c < Dv; ++c) dv(b, hk, j, c) = static_cast<float>(dv_acc[static_cast<std::size_t>(j * Dv + c)]);
  }
}

}  // namespace sigmoid_detail

// ---------------------------------------------------------------------------------------------
// References: double precision, one row at a time, written like the maths.

// out = sigmoid attention of q, k, v (see the header). bias: empty for -log(Lk).
template <class KV, class Mod = mods::none>
void reference_sigmoid_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                 view<const KV, 4> k,     // [B, Hkv, Lk, D]
                                 view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                                 view<float, 4> out,      // [B, Hq, Lq, Dv]
                                 const Mod& mod = {}, const options& opt = {}, std::optional<float> bias = {}) {
  constexpr const char* fn = "attention::reference_sigmoid_attention";
  const dims d = detail::check_args(fn, q, k, v, out, view<float, 3>{}, mod, opt);
  sigmoid_detail::check_no_sinks(fn, opt);
  const double b = sigmoid_detail::resolve_bias(fn, bias, d.Lk);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t bb = bh / d.Hq, h = bh % d.Hq;
        std::vector<double> acc(static_cast<std::size_t>(d.Dv));
        std::vector<float> qi(static_cast<std::size_t>(d.D));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          std::copy_n(q.ptr(bb, h, i), d.D, qi.data());  // out may be q itself
          sigmoid_detail::reference_row(d, qi.data(), k, v, mod, b, bb, h, i, acc.data(), out.ptr(bb, h, i));
        }
      },
      opt.threads);
}

template <class K, class V, class Mod = mods::none>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void reference_sigmoid_attention(view<const float, 4> q, const K& k, const V& v, view<float, 4> out,
                                 const Mod& mod = {}, const options& opt = {}, std::optional<float> bias = {}) {
  reference_sigmoid_attention<element_t<K>, Mod>(q, cview(k), cview(v), out, mod, opt, bias);
}

// Gradients of sum(out * dout) for out = sigmoid attention (see the header), in double. dk and dv
// are summed over the query heads of each kv head's group. Every score mod needs a derivative.
template <class Mod = mods::none>
void reference_sigmoid_attention_backward(view<const float, 4> q,     // [B, Hq, Lq, D]
                                          view<const float, 4> k,     // [B, Hkv, Lk, D]
                                          view<const float, 4> v,     // [B, Hkv, Lk, Dv]
                                          view<const float, 4> dout,  // [B, Hq, Lq, Dv]
                                          view<float, 4> dq,          // [B, Hq, Lq, D]
                                          view<float, 4> dk,          // [B, Hkv, Lk, D]
                                          view<float, 4> dv,          // [B, Hkv, Lk, Dv]
                                          const Mod& mod = {}, const options& opt = {},
                                          std::optional<float> bias = {}) {
  static_assert(has_known_derivative<Mod>,
                "attention::reference_sigmoid_attention_backward: every score mod needs a derivative: softcap, "
                "alibi, all_of of them, or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::reference_sigmoid_attention_backward";
  sigmoid_detail::check_dout(fn, q, v, dout);
  const dims d = detail::check_args(fn, q, k, v, dout, view<float, 3>{}, mod, opt);
  sigmoid_detail::check_no_sinks(fn, opt);
  sigmoid_detail::check_grads(fn, d, q, k, v, dout, dq, dk, dv);
  const double b = sigmoid_detail::resolve_bias(fn, bias, d.Lk);
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bh) {
        sigmoid_detail::reference_backward_group(d, q, k, v, dout, dq, dk, dv, mod, b, bh / d.Hkv, bh % d.Hkv);
      },
      opt.threads);
}

// ---------------------------------------------------------------------------------------------
// Tiles.

namespace sigmoid_detail {

// s = sigmoid(s + bias) over a key-major tile (keys j < kn, queries i < n; n a multiple of the
// SIMD width of Arch unless it runs scalar loops). -inf gives 0.
template <class Arch>
void sigmoid_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, float bias) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        float& x = s[j * lds + i];
        const float y = x + bias, a = -std::abs(y);
        const float e = a < simd::min_normal_exp_arg ? 0.0f : simd::exp<Arch>(a), r = 1.0f / (1.0f + e);
        x = y >= 0 ? r : e * r;
        if (std::isnan(y)) x = y;
      }
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = batch::size;
    constexpr int U = simd::softmax_interleave<Arch>;  // keys per exp step, as the online softmax
    const batch b(bias), zero(0.0f), one(1.0f), min_arg(simd::min_normal_exp_arg);
    auto keys = [&]<int N>(std::int64_t j0, std::int64_t i, std::integral_constant<int, N>) {
      batch y[N], e[N];
      decltype(y[0] < min_arg) under[N];
      for (int u = 0; u < N; ++u) {
        y[u] = batch::load_unaligned(s + (j0 + u) * lds + i) + b;
        e[u] = -xsimd::abs(y[u]);
        under[u] = e[u] < min_arg;  // exp never sees an argument whose result is flushed (gemm.hpp)
        e[u] = xsimd::select(under[u], zero, e[u]);
      }
      simd::exp_nonpositive_n<N>(e);
      for (int u = 0; u < N; ++u) {
        const batch ev = xsimd::select(under[u], zero, e[u]), r = one / (one + ev);
        xsimd::select(y[u] >= zero, r, ev * r).store_unaligned(s + (j0 + u) * lds + i);
      }
    };
    for (std::int64_t i = 0; i < n; i += w) {
      std::int64_t j = 0;
      for (; j + U <= kn; j += U) keys(j, i, std::integral_constant<int, U>{});
      for (; j < kn; ++j) keys(j, i, std::integral_constant<int, 1>{});
    }
  }
}

// The backward's tile step: with x = s + bias, s becomes sigmoid(x) (for dV) and
// dp becomes scale * dp * sigmoid'(x) [* g] (dS, for dQ and dK); g may be null.
template <class Arch>
void sigmoid_grad_columns(float* s, float* dp, const float* g, std::int64_t lds, std::int64_t kn, std::int64_t n,
                          float bias, float scale) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t o = j * lds + i;
        const float y = s[o] + bias, a = -std::abs(y);
        const float e = a < simd::min_normal_exp_arg ? 0.0f : simd::exp<Arch>(a), r = 1.0f / (1.0f + e);
        s[o] = std::isnan(y) ? y : y >= 0 ? r : e * r;
        float ds = scale * dp[o] * (std::isnan(y) ? y : e * r * r);
        if (g) ds *= g[o];
        dp[o] = ds;
      }
  } else {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t w = batch::size;
    const batch b(bias), sc(scale), zero(0.0f), one(1.0f), min_arg(simd::min_normal_exp_arg);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += w) {
        const std::int64_t o = j * lds + i;
        const batch y = batch::load_unaligned(s + o) + b, a = -xsimd::abs(y);
        const auto under = a < min_arg;
        const batch e = xsimd::select(under, zero, simd::exp_nonpositive(xsimd::select(under, zero, a)));
        const batch r = one / (one + e), er = e * r;
        xsimd::select(y >= zero, r, er).store_unaligned(s + o);
        batch ds = sc * batch::load_unaligned(dp + o) * (er * r);
        if (g) ds *= batch::load_unaligned(g + o);
        ds.store_unaligned(dp + o);
      }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward.

template <class KV, class Mod, class Arch>
struct forward_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k, v;
  view<float, 4> out;
  const Mod& mod;
  float bias;

  std::int64_t G = d.group(), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk;
  // V rows feed whole vectors of B: in place when they are f32 and a multiple of the width.
  bool v_direct = std::is_same_v<KV, float> && d.Dv % w == 0;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(G * d.D * bq), at_o = ws.take(G * bq * dvp), at_s = ws.take(bk * bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D), at_v = v_direct ? 0 : ws.take(bk * dvp);

  std::int64_t items() const { return d.B * d.Hkv * n_qt; }

  // Item -> (b, kv head, query tile), the last query tile first (causal tiles grow with it).
  void run(std::int64_t item, float* work) const {
    const std::int64_t qt = n_qt - 1 - item % n_qt, hk = item / n_qt % d.Hkv, b = item / n_qt / d.Hkv;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    float* s = work + at_s;
    for (std::int64_t g = 0; g < G; ++g) {
      tiles::pack_transposed(q.ptr(b, hk * G + g, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt + g * d.D * bq,
                             bq);
      std::fill_n(work + at_o + g * bq * dvp, qn * dvp, 0.0f);
    }
    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;
      const float* kp;
      std::int64_t ldk;
      if constexpr (std::is_same_v<KV, float>) {
        kp = k.ptr(b, hk, k0);
        ldk = k.stride(2);
      } else {
        for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(k.ptr(b, hk, k0 + j), work + at_k + j * d.D, d.D);
        kp = work + at_k;
        ldk = d.D;
      }
      const float* vp = work + at_v;
      std::int64_t ldv = dvp;
      if constexpr (std::is_same_v<KV, float>) {
        if (v_direct) {
          vp = v.ptr(b, hk, k0);
          ldv = v.stride(2);
        }
      }
      if (!v_direct)  // the padding columns [Dv, dvp) stay 0 from the zeroed workspace
        for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(v.ptr(b, hk, k0 + j), work + at_v + j * dvp, d.Dv);
      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h = hk * G + g;
        simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, work + at_qt + g * d.D * bq, bq, s, bq,
                                                   simd::c_mode::overwrite);
        tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
        tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
        sigmoid_columns<Arch>(s, bq, kn, nq, bias);
        simd::gemm<simd::a_order::col_major, Arch>(qn, dvp, kn, s, bq, vp, ldv, work + at_o + g * bq * dvp, dvp,
                                                   simd::c_mode::accumulate);
      }
    }
    std::vector<double> acc;
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      for (std::int64_t i = 0; i < qn; ++i) {
        const float* oi = work + at_o + g * bq * dvp + i * dvp;
        if (std::all_of(oi, oi + d.Dv, [](float x) { return std::isfinite(x); })) {
          std::copy_n(oi, d.Dv, out.ptr(b, h, q0 + i));
          continue;
        }
        // f32 overflow (a score's partial sums, or |v| near FLT_MAX times up to Lk weights of <= 1)
        // or a NaN input: the row again in double (the reference's row). Checked before out row i
        // is written, so q row i is intact when out is q.
        acc.resize(static_cast<std::size_t>(d.Dv));
        std::vector<float> qi(q.ptr(b, h, q0 + i), q.ptr(b, h, q0 + i) + d.D);
        reference_row(d, qi.data(), k, v, mod, static_cast<double>(bias), b, h, q0 + i, acc.data(),
                      out.ptr(b, h, q0 + i));
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Backward.

template <class Mod, class Arch>
struct backward_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q, k, v, dout;
  view<float, 4> dq, dk, dv;
  const Mod& mod;
  float bias;

  std::int64_t G = d.group(), dp = tiles::round_up(d.D, w), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk, lq_pad = n_qt * bq;
  // Rows that feed whole vectors of B (Q and dO for dK/dV, K for dQ) are used in place when their
  // width is a multiple of the SIMD width, else copied once with zero padding.
  bool q_direct = d.D % w == 0, do_direct = d.Dv % w == 0;

  // Written by the preparation pass: per (b, h, query tile) the packed scale * Q^T and dO^T.
  tensor<float, 1> qt_all{{d.B * d.Hq * lq_pad * d.D}}, dot_all{{d.B * d.Hq * lq_pad * d.Dv}};
  tensor<float, 1> q_rows{{q_direct ? 0 : d.B * d.Hq * d.Lq * dp}}, do_rows{{do_direct ? 0 : d.B * d.Hq * d.Lq * dvp}},
      k_rows{{q_direct ? 0 : d.B * d.Hkv * d.Lk * dp}};

  tiles::workspace_layout ws_kv{}, ws_q{};
  std::int64_t kv_dk = ws_kv.take(bk * dp), kv_dv = ws_kv.take(bk * dvp), kv_s = ws_kv.take(bk * bq),
               kv_dp = ws_kv.take(bk * bq), kv_g = ws_kv.take(has_score<Mod> ? bk * bq : 0);
  std::int64_t q_dq = ws_q.take(bq * dp), q_s = ws_q.take(bk * bq), q_dp = ws_q.take(bk * bq),
               q_g = ws_q.take(has_score<Mod> ? bk * bq : 0);

  std::int64_t tile_index(std::int64_t b, std::int64_t h, std::int64_t qt) const { return (b * d.Hq + h) * n_qt + qt; }

  std::pair<const float*, std::int64_t> q_rows_at(std::int64_t b, std::int64_t h, std::int64_t i) const {
    if (q_direct) return {q.ptr(b, h, i), q.stride(2)};
    return {q_rows.data() + ((b * d.Hq + h) * d.Lq + i) * dp, dp};
  }
  std::pair<const float*, std::int64_t> do_rows_at(std::int64_t b, std::int64_t h, std::int64_t i) const {
    if (do_direct) return {dout.ptr(b, h, i), dout.stride(2)};
    return {do_rows.data() + ((b * d.Hq + h) * d.Lq + i) * dvp, dvp};
  }
  std::pair<const float*, std::int64_t> k_rows_at(std::int64_t b, std::int64_t hk, std::int64_t j) const {
    if (q_direct) return {k.ptr(b, hk, j), k.stride(2)};
    return {k_rows.data() + ((b * d.Hkv + hk) * d.Lk + j) * dp, dp};
  }

  // Preparation, one (b, h, query tile) per item: packed Q^T and dO^T, padded row copies.
  void prepare(std::int64_t item) {
    const std::int64_t qt = item % n_qt, h = item / n_qt % d.Hq, b = item / n_qt / d.Hq;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), ti = tile_index(b, h, qt);
    tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, bq, d.D, d.scale, qt_all.data() + ti * d.D * bq, bq);
    tiles::pack_transposed(dout.ptr(b, h, q0), dout.stride(2), qn, bq, d.Dv, 1.0f, dot_all.data() + ti * d.Dv * bq, bq);
    for (std::int64_t i = 0; i < qn; ++i) {
      if (!q_direct) std::copy_n(q.ptr(b, h, q0 + i), d.D, q_rows.data() + ((b * d.Hq + h) * d.Lq + q0 + i) * dp);
      if (!do_direct)
        std::copy_n(dout.ptr(b, h, q0 + i), d.Dv, do_rows.data() + ((b * d.Hq + h) * d.Lq + q0 + i) * dvp);
    }
  }

  // K rows with zero padding, one (b, kv head) per item (only when D is not a multiple of w).
  void prepare_k(std::int64_t item) {
    const std::int64_t hk = item % d.Hkv, b = item / d.Hkv;
    for (std::int64_t j = 0; j < d.Lk; ++j)
      std::copy_n(k.ptr(b, hk, j), d.D, k_rows.data() + ((b * d.Hkv + hk) * d.Lk + j) * dp);
  }

  // For keys [k0, k0 + kn) of kv head hk and query tile qt of head h: on return s holds
  // P^T = sigmoid(f(scale K Q^T) + b) (0 where masked) and dpt holds dS^T (key-major, ld bq).
  void tile_grads(std::int64_t b, std::int64_t h, std::int64_t hk, std::int64_t qt, std::int64_t k0, std::int64_t kn,
                  tile t, float* s, float* dpt, float* g) const {
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    const std::int64_t ti = tile_index(b, h, qt);
    simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, k.ptr(b, hk, k0), k.stride(2),
                                               qt_all.data() + ti * d.D * bq, bq, s, bq, simd::c_mode::overwrite);
    if constexpr (has_score<Mod>) {
      for (std::int64_t j = 0; j < kn; ++j) std::fill_n(g + j * bq, nq, 1.0f);
      tiles::apply_score<Arch>(mod, s, g, bq, kn, qn, nq, k0, qp0, h);
    }
    tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
    simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.Dv, v.ptr(b, hk, k0), v.stride(2),
                                               dot_all.data() + ti * d.Dv * bq, bq, dpt, bq, simd::c_mode::overwrite);
    sigmoid_grad_columns<Arch>(s, dpt, has_score<Mod> ? g : nullptr, bq, kn, nq, bias, d.scale);
  }

  std::int64_t kv_items() const { return d.B * d.Hkv * n_kt; }
  std::int64_t q_items() const { return d.B * d.Hq * n_qt; }

  // dK, dV of one (b, kv head, key tile), summed over the group's query heads and all query tiles.
  void run_kv(std::int64_t item, float* work) const {
    const std::int64_t kt = item % n_kt, hk = item / n_kt % d.Hkv, b = item / n_kt / d.Hkv;
    const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
    float* dk_acc = work + kv_dk;
    float* dv_acc = work + kv_dv;
    std::fill_n(dk_acc, bk * dp, 0.0f);
    std::fill_n(dv_acc, bk * dvp, 0.0f);
    for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) {
      for (std::int64_t qt = 0; qt < n_qt; ++qt) {
        const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), qp0 = q0 + d.offset();
        const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
        if (t == tile::empty) continue;
        float* s = work + kv_s;
        float* dst = work + kv_dp;
        tile_grads(b, h, hk, qt, k0, kn, t, s, dst, work + kv_g);
        const auto [dop, lddo] = do_rows_at(b, h, q0);
        simd::gemm<simd::a_order::row_major, Arch>(kn, dvp, qn, s, bq, dop, lddo, dv_acc, dvp,
                                                   simd::c_mode::accumulate);  // dV += P^T dO
        const auto [qp, ldq] = q_rows_at(b, h, q0);
        simd::gemm<simd::a_order::row_major, Arch>(kn, dp, qn, dst, bq, qp, ldq, dk_acc, dp,
                                                   simd::c_mode::accumulate);  // dK += dS^T Q
      }
    }
    for (std::int64_t j = 0; j < kn; ++j) {
      std::copy_n(dk_acc + j * dp, d.D, dk.ptr(b, hk, k0 + j));
      std::copy_n(dv_acc + j * dvp, d.Dv, dv.ptr(b, hk, k0 + j));
    }
  }

  // dQ of one (b, query head, query tile), summed over all key tiles.
  void run_q(std::int64_t item, float* work) const {
    const std::int64_t qt = n_qt - 1 - item % n_qt, h = item / n_qt % d.Hq, b = item / n_qt / d.Hq;
    const std::int64_t hk = h / G, q0 = qt * bq, qn = std::min(bq, d.Lq - q0), qp0 = q0 + d.offset();
    float* dq_acc = work + q_dq;
    std::fill_n(dq_acc, bq * dp, 0.0f);
    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;
      float* s = work + q_s;
      float* dst = work + q_dp;
      tile_grads(b, h, hk, qt, k0, kn, t, s, dst, work + q_g);
      const auto [kp, ldk] = k_rows_at(b, hk, k0);
      simd::gemm<simd::a_order::col_major, Arch>(qn, dp, kn, dst, bq, kp, ldk, dq_acc, dp,
                                                 simd::c_mode::accumulate);  // dQ += dS K
    }
    for (std::int64_t i = 0; i < qn; ++i) std::copy_n(dq_acc + i * dp, d.D, dq.ptr(b, h, q0 + i));
  }
};

}  // namespace sigmoid_detail

// ---------------------------------------------------------------------------------------------
// Fast paths.

// Sigmoid attention forward (see the header), tiled; K/V elements float, f16 or bf16. bias:
// empty for the paper's -log(Lk). out may be q itself (in place). Runs at the ISA level opt.isa
// asks for (simd/dispatch.hpp).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void sigmoid_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                       view<const KV, 4> k,     // [B, Hkv, Lk, D]
                       view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                       view<float, 4> out,      // [B, Hq, Lq, Dv]
                       const Mod& mod = {}, const options& opt = {}, std::optional<float> bias = {}) {
  constexpr const char* fn = "attention::sigmoid_attention";
  const dims d = detail::check_args(fn, q, k, v, out, view<float, 3>{}, mod, opt);
  sigmoid_detail::check_no_sinks(fn, opt);
  const float b = sigmoid_detail::resolve_bias(fn, bias, d.Lk);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    const sigmoid_detail::forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, mod, b};
    tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run(item, work); });
  });
}

template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void sigmoid_attention(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, const Mod& mod = {},
                       const options& opt = {}, std::optional<float> bias = {}) {
  sigmoid_attention<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, mod, opt, bias);
}

// Sigmoid attention backward (see the header): the gradients of sum(out * dout) with respect to
// q, k and v (f32), tiled. Needs no output of the forward. dk and dv are summed over each kv
// head's group. Every score mod needs a known derivative (mods.hpp: score_derivative).
template <class Mod = mods::none, class TuArch = simd::default_arch>
void sigmoid_attention_backward(view<const float, 4> q,     // [B, Hq, Lq, D]
                                view<const float, 4> k,     // [B, Hkv, Lk, D]
                                view<const float, 4> v,     // [B, Hkv, Lk, Dv]
                                view<const float, 4> dout,  // [B, Hq, Lq, Dv]
                                view<float, 4> dq,          // [B, Hq, Lq, D]
                                view<float, 4> dk,          // [B, Hkv, Lk, D]
                                view<float, 4> dv,          // [B, Hkv, Lk, Dv]
                                const Mod& mod = {}, const options& opt = {}, std::optional<float> bias = {}) {
  static_assert(has_known_derivative<Mod>,
                "attention::sigmoid_attention_backward: every score mod needs a derivative: softcap, alibi, "
                "all_of of them, or a mod with `S score_derivative(S s, int64 h, int64 qp, int64 kp) const`");
  constexpr const char* fn = "attention::sigmoid_attention_backward";
  sigmoid_detail::check_dout(fn, q, v, dout);
  const dims d = detail::check_args(fn, q, k, v, dout, view<float, 3>{}, mod, opt);
  sigmoid_detail::check_no_sinks(fn, opt);
  sigmoid_detail::check_grads(fn, d, q, k, v, dout, dq, dk, dv);
  const float b = sigmoid_detail::resolve_bias(fn, bias, d.Lk);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    sigmoid_detail::backward_plan<Mod, Arch> plan{d, q, k, v, dout, dq, dk, dv, mod, b};
    parallel_for(d.B * d.Hq * plan.n_qt, [&](std::int64_t item) { plan.prepare(item); }, opt.threads);
    if (!plan.q_direct) parallel_for(d.B * d.Hkv, [&](std::int64_t item) { plan.prepare_k(item); }, opt.threads);
    tiles::run_items(plan.kv_items(), plan.ws_kv.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run_kv(item, work); });
    tiles::run_items(plan.q_items(), plan.ws_q.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run_q(item, work); });
  });
}

}  // namespace mnemo::attention

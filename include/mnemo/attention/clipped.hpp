// mnemo/attention/clipped.hpp — the two attention changes of Bondarenko, Nagel and Blankevoort,
// "Quantizable Transformers: Removing Outliers by Helping Attention Heads Do Nothing" (NeurIPS
// 2023): clipped softmax and gated attention. Both let a head output exactly nothing without
// pushing its logits (and so its activations) to extreme values, which is what makes the
// outliers that break 8-bit quantization.
//
// Clipped softmax, forward:
//
//   s_ij  = mods(scale * q_i . k_j)                       score mods, then the mask
//   P_ij  = softmax_j(s_ij)  over the keys visible to i  (lse_i = log sum_j exp(s_ij))
//   C_ij  = clip((zeta - gamma) P_ij + gamma, 0, 1)      zeta >= 1, gamma <= 0
//   out_i = sum_j C_ij v_j
//
// A weight below -gamma / (zeta - gamma) becomes exactly 0 and one above (1 - gamma) / (zeta -
// gamma) exactly 1, so a head can give a key weight 0 (or 1) with finite logits. The weights no
// longer sum to 1. zeta = 1, gamma = 0 is ordinary softmax attention. gamma is passed as it is:
// the paper's runs mostly keep zeta = 1 and write the stretch as gamma = -alpha / T, with T the
// sequence length and alpha a hyper-parameter (so the clip threshold stays a fixed multiple of
// the uniform weight 1 / T); pass -alpha / T yourself (for T take your training length: the kernel
// does not guess it from Lk). Masked keys have P = 0, hence C = clip(gamma, 0, 1) = 0: they
// contribute nothing, and a row that sees no key gets out = 0 and lse = -inf. lse (optional) is
// the ordinary softmax lse, before the clip. Forward only. No attention sinks (options.sinks must
// be empty: the paper's clip is its alternative to a sink).
//
// How it runs. The clip needs each row's final normaliser before any weight can be used, so the
// tiled path (flash's key-major tiles, tiles.hpp and simd/gemm.hpp) makes two passes over the key
// tiles of each (batch, kv head, query tile) item: a statistics pass (S^T = K (scale Q)^T, mods,
// mask, online_softmax_columns for the running max and sum: lse = m + log l), then an accumulate
// pass (the same S^T, P^T = exp(S^T - lse) by probs_from_lse_columns, the clip, O += C V). Cost:
// two score GEMMs and one value GEMM per tile, about 1.5x a flash forward.
//
// Gated attention (the paper's second fix): each head's output row is scaled by a gate computed
// by the caller's own layer (the paper's G(x) = Linear(x), one logit per head and token):
//
//   out[b, h, i, :] *= sigmoid(gate_logits[b, h, i])
//
// output_gate applies it in place after any attention output (flash, decode, clipped softmax,
// sigmoid attention, ...); reference_output_gate is the same in double.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq], gate_logits [B, Hq, Lq]. GQA, bottom-right causal masks and every mod of
// mods.hpp as in flash.
//
// Numerics: f32 products and sums with fused multiply-adds; exp as the softmax kernels (p below
// 2^-126 of the row's largest flushed to 0, which the clip maps to 0 anyway for any gamma < 0).
// A row whose f32 result is not finite is computed again in double. The readable double-precision
// references are reference_clipped_softmax_attention and reference_output_gate (below).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
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

namespace mnemo::attention {

// The clip of clipped softmax: C = clip((zeta - gamma) P + gamma, 0, 1).
struct clipped_softmax {
  float zeta = 1.0f;   // stretch at the top, >= 1
  float gamma = 0.0f;  // stretch at the bottom, <= 0 (the paper's -alpha / T)

  template <class S>
  S operator()(S p) const {
    const S x = (static_cast<S>(zeta) - static_cast<S>(gamma)) * p + static_cast<S>(gamma);
    return std::min(std::max(x, S(0)), S(1));
  }
};

namespace clipped_detail {

inline void check_clip(const char* fn, const clipped_softmax& c) {
  mnemo::detail::require(std::isfinite(c.zeta) && c.zeta >= 1.0f, fn, ": clipped_softmax.zeta must be finite and >= 1, got ",
                         c.zeta);
  mnemo::detail::require(std::isfinite(c.gamma) && c.gamma <= 0.0f, fn,
                         ": clipped_softmax.gamma must be finite and <= 0, got ", c.gamma);
}

inline void check_no_sinks(const char* fn, const options& opt) {
  mnemo::detail::require(opt.sinks.empty(), fn,
                         ": options.sinks must be empty: clipped softmax takes no attention sinks, got sinks of shape ",
                         shape_string(opt.sinks.shape()));
}

// Row i of head h in double: scores, softmax, clip and output; out and lse (may be null) written.
// `s` is a scratch row of Lk doubles, `acc` one of Dv.
template <class KV, class Mod>
void reference_row(const dims& d, const float* qi, view<const KV, 4> k, view<const KV, 4> v, const Mod& mod,
                   const clipped_softmax& clip, std::int64_t b, std::int64_t h, std::int64_t i, double* s, double* acc,
                   float* oi, float* lse_i) {
  constexpr double minus_inf = -std::numeric_limits<double>::infinity();
  const std::int64_t hk = h / d.group(), qp = i + d.offset();
  double m = minus_inf;
  bool nan = false;
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    s[j] = minus_inf;
    if (!mods::visible(mod, h, qp, j)) continue;
    const KV* kj = k.ptr(b, hk, j);
    double dot = 0;
    for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(qi[c]) * static_cast<double>(to_float(kj[c]));
    s[j] = mods::score(mod, static_cast<double>(d.scale) * dot, h, qp, j);
    m = std::max(m, s[j]);
    nan = nan || std::isnan(s[j]);
  }
  if (nan) {  // NaN in q, k or a mod: the row is NaN, never a clean-looking one
    std::fill(oi, oi + d.Dv, std::numeric_limits<float>::quiet_NaN());
    if (lse_i) *lse_i = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (m == minus_inf) {  // no visible key
    std::fill(oi, oi + d.Dv, 0.0f);
    if (lse_i) *lse_i = -std::numeric_limits<float>::infinity();
    return;
  }
  double sum = 0;
  for (std::int64_t j = 0; j < d.Lk; ++j)
    if (s[j] != minus_inf) sum += std::exp(s[j] - m);
  std::fill(acc, acc + d.Dv, 0.0);
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    if (s[j] == minus_inf) continue;
    const double c = clip(std::exp(s[j] - m) / sum);
    if (c == 0) continue;
    const KV* vj = v.ptr(b, hk, j);
    for (std::int64_t cc = 0; cc < d.Dv; ++cc) acc[cc] += c * static_cast<double>(to_float(vj[cc]));
  }
  for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = static_cast<float>(acc[c]);
  if (lse_i) *lse_i = static_cast<float>(m + std::log(sum));
}

}  // namespace clipped_detail

// ---------------------------------------------------------------------------------------------
// Reference: double precision, one row at a time.

template <class KV, class Mod = mods::none>
void reference_clipped_softmax_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                                         view<const KV, 4> k,      // [B, Hkv, Lk, D]
                                         view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
                                         view<float, 4> out,       // [B, Hq, Lq, Dv]
                                         view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                                         const clipped_softmax& clip = {}, const Mod& mod = {},
                                         const options& opt = {}) {
  constexpr const char* fn = "attention::reference_clipped_softmax_attention";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  clipped_detail::check_clip(fn, clip);
  clipped_detail::check_no_sinks(fn, opt);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq;
        std::vector<double> s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
        std::vector<float> qi(static_cast<std::size_t>(d.D));
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          std::copy_n(q.ptr(b, h, i), d.D, qi.data());  // out may be q itself
          clipped_detail::reference_row(d, qi.data(), k, v, mod, clip, b, h, i, s.data(), acc.data(), out.ptr(b, h, i),
                                        lse.empty() ? nullptr : lse.ptr(b, h, i));
        }
      },
      opt.threads);
}

template <class K, class V, class Mod = mods::none>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void reference_clipped_softmax_attention(view<const float, 4> q, const K& k, const V& v, view<float, 4> out,
                                         view<float, 3> lse = {}, const clipped_softmax& clip = {},
                                         const Mod& mod = {}, const options& opt = {}) {
  reference_clipped_softmax_attention<element_t<K>, Mod>(q, cview(k), cview(v), out, lse, clip, mod, opt);
}

// ---------------------------------------------------------------------------------------------
// Tiled path.

namespace clipped_detail {

// C = clip((zeta - gamma) P + gamma, 0, 1) in place over a key-major tile (keys j < kn, queries
// i < n; n a multiple of the SIMD width unless Arch runs scalar loops).
template <class Arch>
void clip_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, const clipped_softmax& clip) {
  const float stretch = clip.zeta - clip.gamma, lo = clip.gamma;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        float& x = s[j * lds + i];
        x = std::min(std::max(stretch * x + lo, 0.0f), 1.0f);
      }
  } else {
    using batch = simd::fbatch<Arch>;
    const batch a(stretch), c(lo), zero(0.0f), one(1.0f);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += static_cast<std::int64_t>(batch::size)) {
        float* p = s + j * lds + i;
        xsimd::min(xsimd::max(simd::detail::fmadd(a, batch::load_unaligned(p), c), zero), one).store_unaligned(p);
      }
  }
}

template <class KV, class Mod, class Arch>
struct forward_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k, v;
  view<float, 4> out;
  view<float, 3> lse;
  const Mod& mod;
  clipped_softmax clip;

  std::int64_t G = d.group(), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk;
  bool v_direct = std::is_same_v<KV, float> && d.Dv % w == 0;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(G * d.D * bq), at_o = ws.take(G * bq * dvp), at_m = ws.take(G * bq),
               at_l = ws.take(G * bq), at_s = ws.take(bk * bq), at_alpha = ws.take(bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D), at_v = v_direct ? 0 : ws.take(bk * dvp);

  std::int64_t items() const { return d.B * d.Hkv * n_qt; }

  // K rows of key tile [k0, k0 + kn) as f32 (in place or converted into the workspace).
  std::pair<const float*, std::int64_t> keys(std::int64_t b, std::int64_t hk, std::int64_t k0, std::int64_t kn,
                                             float* work) const {
    if constexpr (std::is_same_v<KV, float>) {
      return {k.ptr(b, hk, k0), k.stride(2)};
    } else {
      for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(k.ptr(b, hk, k0 + j), work + at_k + j * d.D, d.D);
      return {work + at_k, d.D};
    }
  }

  // S^T of query tile head h against the key tile, score mods and mask applied, into s.
  void scores(const float* kp, std::int64_t ldk, std::int64_t kn, std::int64_t k0, std::int64_t qn, std::int64_t nq,
              std::int64_t qp0, std::int64_t h, tile t, const float* qt, float* s) const {
    simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, qt, bq, s, bq, simd::c_mode::overwrite);
    tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
    tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
  }

  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t qt = n_qt - 1 - item % n_qt, hk = item / n_qt % d.Hkv, b = item / n_qt / d.Hkv;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    float* s = work + at_s;
    float* alpha = work + at_alpha;
    for (std::int64_t g = 0; g < G; ++g) {
      tiles::pack_transposed(q.ptr(b, hk * G + g, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt + g * d.D * bq,
                             bq);
      std::fill_n(work + at_o + g * bq * dvp, qn * dvp, 0.0f);
      std::fill_n(work + at_m + g * bq, nq, neg_inf);
      std::fill_n(work + at_l + g * bq, nq, 0.0f);
    }
    // Pass 1: the running max m and sum l of every row (the probabilities are discarded).
    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;
      const auto [kp, ldk] = keys(b, hk, k0, kn, work);
      for (std::int64_t g = 0; g < G; ++g) {
        scores(kp, ldk, kn, k0, qn, nq, qp0, hk * G + g, t, work + at_qt + g * d.D * bq, s);
        simd::online_softmax_columns<Arch>(s, bq, kn, nq, work + at_m + g * bq, work + at_l + g * bq, alpha);
      }
    }
    // lse = m + log l in place of m (-inf for a row that saw nothing: its probabilities are 0).
    for (std::int64_t g = 0; g < G; ++g) {
      float* m = work + at_m + g * bq;
      const float* l = work + at_l + g * bq;
      for (std::int64_t i = 0; i < nq; ++i) m[i] = l[i] > 0.0f ? m[i] + std::log(l[i]) : neg_inf;
    }
    // Pass 2: P = exp(S - lse), the clip, O += C V.
    for (std::int64_t kt = 0; kt < n_kt; ++kt) {
      const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
      const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
      if (t == tile::empty) continue;
      const auto [kp, ldk] = keys(b, hk, k0, kn, work);
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
        scores(kp, ldk, kn, k0, qn, nq, qp0, hk * G + g, t, work + at_qt + g * d.D * bq, s);
        simd::probs_from_lse_columns<Arch>(s, bq, kn, nq, work + at_m + g * bq);
        clip_columns<Arch>(s, bq, kn, nq, clip);
        simd::gemm<simd::a_order::col_major, Arch>(qn, dvp, kn, s, bq, vp, ldv, work + at_o + g * bq * dvp, dvp,
                                                   simd::c_mode::accumulate);
      }
    }
    std::vector<double> srow, acc;
    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      const float* lse_g = work + at_m + g * bq;
      for (std::int64_t i = 0; i < qn; ++i) {
        const float* oi = work + at_o + g * bq * dvp + i * dvp;
        const bool finite = (std::isfinite(lse_g[i]) || lse_g[i] == neg_inf) &&
                            std::all_of(oi, oi + d.Dv, [](float x) { return std::isfinite(x); });
        if (finite) {
          std::copy_n(oi, d.Dv, out.ptr(b, h, q0 + i));
          if (!lse.empty()) lse(b, h, q0 + i) = lse_g[i];
          continue;
        }
        // f32 overflow or a NaN input: the row again in double, before out row i is written (so q
        // row i is intact when out is q).
        srow.resize(static_cast<std::size_t>(d.Lk));
        acc.resize(static_cast<std::size_t>(d.Dv));
        std::vector<float> qi(q.ptr(b, h, q0 + i), q.ptr(b, h, q0 + i) + d.D);
        reference_row(d, qi.data(), k, v, mod, clip, b, h, q0 + i, srow.data(), acc.data(), out.ptr(b, h, q0 + i),
                      lse.empty() ? nullptr : lse.ptr(b, h, q0 + i));
      }
    }
  }
};

}  // namespace clipped_detail

// Clipped softmax attention (see the header), tiled, two passes; K/V elements float, f16 or bf16.
// lse (optional) is the ordinary softmax lse before the clip. out may be q itself. Runs at the ISA
// level opt.isa asks for (simd/dispatch.hpp).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void clipped_softmax_attention(view<const float, 4> q,   // [B, Hq, Lq, D]
                               view<const KV, 4> k,      // [B, Hkv, Lk, D]
                               view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
                               view<float, 4> out,       // [B, Hq, Lq, Dv]
                               view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                               const clipped_softmax& clip = {}, const Mod& mod = {}, const options& opt = {}) {
  constexpr const char* fn = "attention::clipped_softmax_attention";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  clipped_detail::check_clip(fn, clip);
  clipped_detail::check_no_sinks(fn, opt);
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    const clipped_detail::forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, lse, mod, clip};
    tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run(item, work); });
  });
}

template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void clipped_softmax_attention(view<const float, 4> q, const K& k, const V& v, view<float, 4> out,
                               view<float, 3> lse = {}, const clipped_softmax& clip = {}, const Mod& mod = {},
                               const options& opt = {}) {
  clipped_softmax_attention<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, lse, clip, mod, opt);
}

// ---------------------------------------------------------------------------------------------
// Gated attention: out[b, h, i, :] *= sigmoid(gate_logits[b, h, i]), in place.

namespace clipped_detail {

inline void check_gate(const char* fn, const view<float, 4>& out, const view<const float, 3>& gate_logits) {
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_data(fn, "gate_logits", gate_logits, " [B, Hq, Lq]");
  mnemo::detail::require_shape(fn, "gate_logits", gate_logits, {out.extent(0), out.extent(1), out.extent(2)},
                               " [B, Hq, Lq] (from out)");
  mnemo::detail::require_disjoint(fn, "out", out, "gate_logits", gate_logits);
}

// sigmoid(x) without overflow: exp of a non-positive argument only.
template <class S>
S sigmoid(S x) {
  const S e = std::exp(-std::abs(x)), r = S(1) / (S(1) + e);
  return x >= 0 ? r : e * r;  // NaN: both branches NaN
}

}  // namespace clipped_detail

// The paper's per-head output gate, in f32. Rows of a head with logit -inf become 0 (a NaN logit
// makes its row NaN).
inline void output_gate(view<float, 4> out,                    // [B, Hq, Lq, Dv]
                        view<const float, 3> gate_logits,      // [B, Hq, Lq]
                        int threads = 0) {
  constexpr const char* fn = "attention::output_gate";
  clipped_detail::check_gate(fn, out, gate_logits);
  const std::int64_t B = out.extent(0), H = out.extent(1), L = out.extent(2), Dv = out.extent(3);
  parallel_for(
      B * H,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / H, h = bh % H;
        for (std::int64_t i = 0; i < L; ++i) {
          const float g = clipped_detail::sigmoid(gate_logits(b, h, i));
          float* o = out.ptr(b, h, i);
          for (std::int64_t c = 0; c < Dv; ++c) o[c] *= g;
        }
      },
      threads);
}

// The same in double (the gate and the product), rounded once.
inline void reference_output_gate(view<float, 4> out,                // [B, Hq, Lq, Dv]
                                  view<const float, 3> gate_logits,  // [B, Hq, Lq]
                                  int threads = 0) {
  constexpr const char* fn = "attention::reference_output_gate";
  clipped_detail::check_gate(fn, out, gate_logits);
  const std::int64_t B = out.extent(0), H = out.extent(1), L = out.extent(2), Dv = out.extent(3);
  parallel_for(
      B * H,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / H, h = bh % H;
        for (std::int64_t i = 0; i < L; ++i) {
          const double g = clipped_detail::sigmoid(static_cast<double>(gate_logits(b, h, i)));
          float* o = out.ptr(b, h, i);
          for (std::int64_t c = 0; c < Dv; ++c) o[c] = static_cast<float>(g * static_cast<double>(o[c]));
        }
      },
      threads);
}

}  // namespace mnemo::attention

// mnemo/attention/flash.hpp — tiled attention with online softmax (FlashAttention-2), forward
// (and the column-sums side output), without any Lq x Lk buffer. The backward is in
// flash_backward.hpp; the tile helpers shared with sparse::attention in tiles.hpp.
//
// Forward (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
// Partitioning", 2023, Algorithm 1). For one query tile Q_t (Bq rows) and every key tile
// K_j, V_j (Bk keys) the tile's mods leave non-empty:
//
//   S   = mods(scale * Q_t K_j^T)            score mods, then the mask (-inf)     [Bq, Bk]
//   m'  = max(m, rowmax S)
//   P   = exp(S - m')
//   l   = exp(m - m') l + rowsum P
//   O   = diag(exp(m - m')) O + P V_j        the accumulator is rescaled once per tile
//
// and at the end out_t = O / l, lse_t = m + log l. A row that never saw a key keeps l = 0 and
// gets out = 0, lse = -inf.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq]. Any outer strides ([B, L, H, D] buffers through view::permute) are read in
// place.
//
// How it runs. Scores are computed key-major, S^T = K Q^T, so that each query is one SIMD lane
// of the score tile and the online softmax is purely vertical (simd/gemm.hpp): Q^T is packed
// once per query tile (with the scale folded in), K and V rows are used where they lie (f32) or
// converted once per key tile (f16/bf16, or a Dv that is not a multiple of the SIMD width).
// Work items are (batch, kv head, query tile): each key tile is loaded once and used by every
// query head of its GQA group. Items are taken from a shared counter, last query tile first
// (causal tiles grow with the query index, so the longest go first); each item is computed the
// same way whichever thread takes it, so results do not depend on the thread count.
//
// Side output (column_sums, reference.hpp): the column sums of the final probabilities over the
// last `rows` query rows. The online softmax only knows a row's normaliser after its last key
// tile, so the sums are a second sweep over the query tiles that hold summed rows, with the lse
// of the first: P^T = exp(f(scale K Q^T) - lse) per tile (the backward's recompute), summed over
// the tile's summed queries. Work items are (batch, kv head, key tile), so every item owns its
// slice of sums (no atomics, thread-count independent). Cost: one extra K Q^T GEMM per tile of
// summed rows, i.e. about 1/Lq-tiles of the forward for a SnapKV window of <= 64 rows and half a
// forward when every row is summed (H2O); nothing at all when the side output is not wanted.
//
// Numerics: f32 products and sums with fused multiply-adds, exp from simd/math.hpp (1 ulp);
// the forward rescales the accumulator by exp(m - m'), which is exact when the max does not
// change. The readable double-precision reference is attention::reference (reference.hpp):
// swap `flash` for `reference` to check a surprising result.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/prebuilt.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/gemm.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Forward.

namespace flash_detail {

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
  view<const float, 1> sinks;  // [Hq] or empty (options.sinks)

  std::int64_t G = d.group(), dvp = tiles::round_up(d.Dv, w);
  std::int64_t n_qt = (d.Lq + bq - 1) / bq, n_kt = (d.Lk + bk - 1) / bk;
  // V rows feed whole vectors of B: in place when they are f32 and a multiple of the width.
  bool v_direct = std::is_same_v<KV, float> && d.Dv % w == 0;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(G * d.D * bq), at_o = ws.take(G * bq * dvp), at_m = ws.take(G * bq),
               at_l = ws.take(G * bq), at_s = ws.take(bk * bq), at_alpha = ws.take(bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D), at_v = v_direct ? 0 : ws.take(bk * dvp);

  std::int64_t items() const { return d.B * d.Hkv * n_qt; }

  // Row i of head h in double (the reference's row), for rows whose f32 result is not finite.
  void exact_row(std::int64_t b, std::int64_t h, std::int64_t i, float sink) const {
    std::vector<double> s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
    std::vector<float> qi(q.ptr(b, h, i), q.ptr(b, h, i) + d.D);  // out may alias q
    reference_detail::row(d, qi.data(), k, v, mod, sink, b, h, i, s.data(), acc.data(), out.ptr(b, h, i),
                          lse.empty() ? nullptr : lse.ptr(b, h, i));
  }

  // Item -> (b, kv head, query tile), the last query tile first.
  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t qt = n_qt - 1 - item % n_qt, hk = item / n_qt % d.Hkv, b = item / n_qt / d.Hkv;
    const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w), qp0 = q0 + d.offset();
    float* s = work + at_s;
    float* alpha = work + at_alpha;

    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt + g * d.D * bq, bq);
      std::fill_n(work + at_o + g * bq * dvp, qn * dvp, 0.0f);
      std::fill_n(work + at_m + g * bq, nq, neg_inf);
      std::fill_n(work + at_l + g * bq, nq, 0.0f);
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
      if (!v_direct) {  // the padding columns [Dv, dvp) stay 0 from the zeroed workspace
        for (std::int64_t j = 0; j < kn; ++j) tiles::to_f32<Arch>(v.ptr(b, hk, k0 + j), work + at_v + j * dvp, d.Dv);
      }

      for (std::int64_t g = 0; g < G; ++g) {
        const std::int64_t h = hk * G + g;
        simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, work + at_qt + g * d.D * bq, bq, s, bq,
                                                   simd::c_mode::overwrite);
        tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
        tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
        simd::online_softmax_columns<Arch>(s, bq, kn, nq, work + at_m + g * bq, work + at_l + g * bq, alpha);
        simd::gemm<simd::a_order::col_major, Arch>(qn, dvp, kn, s, bq, vp, ldv, work + at_o + g * bq * dvp, dvp,
                                                   simd::c_mode::rescale, alpha);
      }
    }

    for (std::int64_t g = 0; g < G; ++g) {
      const std::int64_t h = hk * G + g;
      const float* o = work + at_o + g * bq * dvp;
      const float* m = work + at_m + g * bq;
      const float* l = work + at_l + g * bq;
      const float sink = sinks.empty() ? neg_inf : sinks(h);
      for (std::int64_t i = 0; i < qn; ++i) {
        float* oi = out.ptr(b, h, q0 + i);
        if (l[i] == 0.0f) {  // no visible key: out 0, lse = the sink (-inf without one)
          std::fill_n(oi, d.Dv, 0.0f);
          if (!lse.empty()) lse(b, h, q0 + i) = sink;
          continue;
        }
        // The sink joins the denominator: with top = max(m, sink), l' = l e^(m - top) + e^(sink - top)
        // and the accumulator (relative to m) scales by e^(m - top) / l'.
        float mi = m[i], li = l[i], rescale = 1.0f;
        if (sink != neg_inf) {
          const float top = std::max(mi, sink);
          rescale = std::exp(mi - top);
          li = li * rescale + std::exp(sink - top);
          mi = top;
        }
        const float inv = rescale / li;
        bool finite = std::isfinite(mi) && std::isfinite(li);
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          oi[c] = o[i * dvp + c] * inv;
          finite = finite && std::isfinite(oi[c]);
        }
        if (!lse.empty()) lse(b, h, q0 + i) = mi + std::log(li);
        // f32 overflow: a score's partial sums (|q| |k| near FLT_MAX, the score itself finite) or
        // the accumulator (|v| near FLT_MAX times up to Lk weights of <= 1). The row is computed
        // again in double (reference.hpp), which also gives NaN inputs their reference result.
        // q row i is still intact when out aliases q: only row i's out is written so far.
        if (!finite) exact_row(b, h, q0 + i, sink);
      }
    }
  }
};

// The side output: column sums of P over the summed rows [first, Lq), from the forward's lse.
template <class KV, class Mod, class Arch>
struct column_sums_plan {
  using traits = flash_traits<Arch>;
  static constexpr std::int64_t bq = traits::block_q, bk = traits::block_k, w = traits::lanes;

  const dims& d;
  view<const float, 4> q;
  view<const KV, 4> k;
  view<const float, 3> lse;  // [B, Hq, Lq] of the forward
  const Mod& mod;
  view<float, 3> sums;  // [B, Hq, Lk]
  std::int64_t first;   // first summed query row

  std::int64_t n_kt = (d.Lk + bk - 1) / bk, qt_first = first / bq, n_qt = (d.Lq + bq - 1) / bq;
  tiles::workspace_layout ws{};
  std::int64_t at_qt = ws.take(d.D * bq), at_s = ws.take(bk * bq), at_lse = ws.take(bq),
               at_k = std::is_same_v<KV, float> ? 0 : ws.take(bk * d.D);

  std::int64_t items() const { return d.B * d.Hkv * n_kt; }

  void run(std::int64_t item, float* work) const {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    const std::int64_t kt = item % n_kt, hk = item / n_kt % d.Hkv, b = item / n_kt / d.Hkv;
    const std::int64_t k0 = kt * bk, kn = std::min(bk, d.Lk - k0);
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
    float* s = work + at_s;
    float* lse_t = work + at_lse;
    for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) {
      float* out = sums.ptr(b, h, k0);
      std::fill_n(out, kn, 0.0f);
      for (std::int64_t qt = qt_first; qt < n_qt; ++qt) {
        const std::int64_t q0 = qt * bq, qn = std::min(bq, d.Lq - q0), nq = tiles::round_up(qn, w);
        const std::int64_t qp0 = q0 + d.offset();
        const tile t = mods::classify(mod, qp0, qp0 + qn, k0, k0 + kn);
        if (t == tile::empty) continue;
        // Rows before `first` and the padding get lse = -inf, hence p = 0.
        for (std::int64_t i = 0; i < nq; ++i) lse_t[i] = i < qn && q0 + i >= first ? lse(b, h, q0 + i) : neg_inf;
        tiles::pack_transposed(q.ptr(b, h, q0), q.stride(2), qn, nq, d.D, d.scale, work + at_qt, bq);
        simd::gemm<simd::a_order::row_major, Arch>(kn, nq, d.D, kp, ldk, work + at_qt, bq, s, bq,
                                                   simd::c_mode::overwrite);
        tiles::apply_score<Arch>(mod, s, nullptr, bq, kn, qn, nq, k0, qp0, h);
        tiles::apply_mask(s, bq, kn, qn, k0, qp0, mod, t, h);
        simd::probs_from_lse_columns<Arch>(s, bq, kn, nq, lse_t);
        for (std::int64_t j = 0; j < kn; ++j) out[j] += simd::reduce_sum<Arch>(s + j * bq, nq);
      }
    }
  }
};

// The forward (and the column sums when wanted) for one Arch, on validated arguments.
template <class KV, class Mod, class Arch>
void forward(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
             view<float, 3> lse, const Mod& mod, const options& opt, const column_sums& cs) {
  if (!cs.wanted()) {
    const forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, lse, mod, opt.sinks};
    tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                     [&](std::int64_t item, float* work) { plan.run(item, work); });
    return;
  }
  // The sums need every summed row's lse: the caller's, or one of our own.
  tensor<float, 3> own_lse(lse.empty() ? shape_t<3>{d.B, d.Hq, d.Lq} : shape_t<3>{0, 0, 0});
  const view<float, 3> lse_used = lse.empty() ? own_lse.as_view() : lse;
  const forward_plan<KV, Mod, Arch> plan{d, q, k, v, out, lse_used, mod, opt.sinks};
  tiles::run_items(plan.items(), plan.ws.total, opt.threads,
                   [&](std::int64_t item, float* work) { plan.run(item, work); });
  const column_sums_plan<KV, Mod, Arch> sums_plan{d, q, k, lse_used, mod, cs.sums, cs.first_row(d.Lq)};
  tiles::run_items(sums_plan.items(), sums_plan.ws.total, opt.threads,
            [&](std::int64_t item, float* work) { sums_plan.run(item, work); });
  // A head whose sums overflowed in f32 (the forward's exact_row case) gets them in double: the
  // reference's head, which writes the same out and lse again (out is not q here).
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq;
        const float* sums = cs.sums.ptr(b, h, 0);
        if (std::all_of(sums, sums + d.Lk, [](float x) { return std::isfinite(x); })) return;
        std::vector<double> s(static_cast<std::size_t>(d.Lk));
        reference_detail::heads(d, q, k, v, out, lse_used, mod, opt, b, h, s, cs);
      },
      opt.threads);
}

}  // namespace flash_detail

// FlashAttention-2 forward. K/V elements may be float, f16 or bf16; out and lse as in
// attention::reference, to float32 accuracy. `cs`: the optional column sums of the probabilities
// (reference.hpp); not wanted by default, and then nothing of it runs. Runs at the ISA level
// opt.isa asks for (simd/dispatch.hpp: by default $MNEMO_ISA or the best the CPU has).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void flash(view<const float, 4> q,   // [B, Hq, Lq, D]
           view<const KV, 4> k,      // [B, Hkv, Lk, D]
           view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
           view<float, 4> out,       // [B, Hq, Lq, Dv]
           view<float, 3> lse = {},  // [B, Hq, Lq] or empty
           const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  constexpr const char* fn = "attention::flash";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  detail::check_column_sums(fn, d, cs, q, k, v, out, lse);
  if constexpr (prebuilt::covers<KV, Mod>) {  // a program built below the CPU's level (prebuilt.hpp)
    const simd::level want = simd::resolve_level(opt.isa);
    if (prebuilt::above<TuArch>(want))
      return prebuilt::at_level(want, [&]<class Arch>() {
        prebuilt::flash_forward<Arch, KV, Mod>(d, q, k, v, out, lse, mod, opt, cs);
      });
  }
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() { flash_detail::forward<KV, Mod, Arch>(d, q, k, v, out, lse, mod, opt, cs); });
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void flash(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
           const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  flash<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, lse, mod, opt, cs);
}

}  // namespace mnemo::attention

// mnemo/attention/self_extend.hpp — Self-Extend (Jin et al. 2024, "LLM Maybe LongLM: Self-Extend
// LLM Context Window Without Tuning"): a RoPE model attends beyond its training context by giving
// far keys grouped (floor-divided) positions while neighbour keys keep their own.
//
// Positions (the paper, Section 3 and its Eq. for the merged relative position; G = group size,
// W = neighbour window): query row i sits at qp = i + (Lk - Lq), key j at kp = j (the library's
// bottom-right convention), and the attention is causal. With d = qp - kp >= 0:
//   neighbour   d <  W:   q rotated to qp, k rotated to kp              relative position d
//   grouped     d >= W:   q rotated to floor(qp / G) + W - floor(W / G), k to floor(kp / G)
//                         relative position floor(qp / G) - floor(kp / G) + W - floor(W / G)
// The shift W - floor(W / G) makes the grouped distances continue from the window: at d = W the
// grouped distance is in [W, W + 1], and it never exceeds (Lk - 1) / G + W, so a model trained on
// O positions reaches (O - W) G + W tokens. G = 1 (or W >= Lk) is plain causal RoPE attention.
//   s_ij = scale * (neighbour ? q^n_i . k^n_j : q^g_i . k^g_j),  P = softmax over kp <= qp,
//   out_i = sum_j P_ij v_j, lse_i = log sum_j exp(s_ij)   (+ exp(sink_h) with options.sinks).
//
// The exact one-call form (no Lq x Lk buffer): the neighbour keys and the grouped keys are
// disjoint sets of every row's keys, so
//   (out_n, lse_n) = flash(q^n, k^n, v, sliding_window{W})        the band of the last W keys
//   (out_g, lse_g) = flash(q^g, k^g, v, beyond_window{W})         the complement under causal
//   out, lse       = merge((out_n, lse_n), (out_g, lse_g))        (merge.hpp, exact)
// The two passes visit disjoint tiles except on the band's edge, so the cost is one causal flash
// plus about W / Lk of one (tiles crossing d = W are computed twice, once per rotation); a one-pass
// kernel would compute the same two GEMMs on those edge tiles and save only the merge, O(Lq Dv).
// Rows with Lq <= decode_max_rows (decode steps) use the split-KV decode engine for both passes.
// Sinks join the neighbour pass only (merge then counts them once). The rotations are
// kvcache::apply_rope with the given rope (any frequency scheme and layout; dynamic / longrope
// with seq_len 0 take seq_len = Lk); the attention factor af of YaRN / LongRoPE is applied to q
// and k once each, in both sets.
//
// Keys already rotated (keys_rotated = true: k is rotated to kp, e.g. gathered from a cache):
// k^n = k as given, and k^g = k rotated once more by floor(kp / G) - kp with af = 1 (R composes;
// the key already carries af, which must not be applied twice).
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] (all f32; q and k un-rotated
// unless keys_rotated), out [B, Hq, Lq, Dv], lse [B, Hq, Lq] or empty.
//
// Numerics: rotations as kvcache::apply_rope (f32 rotation of double angles), attention as flash /
// decode (f32, 1 ulp exp), merge in double. The reference rotates in double and chooses each
// element's score from the two rotations before one softmax in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/rope.hpp"
#include "mnemo/simd/arch.hpp"

namespace mnemo::attention {

namespace mods {

// Causal keys at distance >= size from the query: qp - kp >= size, the complement of
// sliding_window{size} among the causal keys. Self-Extend's grouped keys.
struct beyond_window {
  std::int64_t size = 1;

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const { return qp - kp >= size; }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    if ((q1 - 1) - k0 < size) return tile::empty;  // the farthest pair is inside the window
    if (q0 - (k1 - 1) >= size) return tile::full;  // the nearest pair is beyond it
    return tile::partial;
  }
  // Per key row kp the queries qp < kp + size are masked (size <= Lk + 1: no overflow).
  void mask_tile(float* s, std::int64_t ld, std::int64_t, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    for (std::int64_t j = 0; j < kn; ++j) fill_masked(s + j * ld, 0, clamp_to(k0 + j + size - qp0, 0, qn));
  }
  void validate(const char* fn, std::int64_t, std::int64_t, std::int64_t Lk) const {
    mnemo::detail::require(size >= 1 && size <= Lk + 1, fn, ": beyond_window.size must be in [1, Lk + 1 = ", Lk + 1,
                    "], got ", size);
  }
};

}  // namespace mods

struct self_extend_options {
  std::int64_t window = 512;  // W: keys at distance < W keep their own positions
  std::int64_t group = 8;     // G: the far keys' positions are floor(pos / G)
  kvcache::rope rope = {};    // frequencies and layout of the rotation
  bool keys_rotated = false;  // k is already rotated to its own positions kp (a cache's keys)
};

namespace self_extend_detail {

inline std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  const std::int64_t q = a / b;
  return (a % b != 0 && (a < 0) != (b < 0)) ? q - 1 : q;
}

// The grouped query position of qp (the paper's shift W - floor(W / G)).
inline std::int64_t grouped_query(std::int64_t qp, std::int64_t W, std::int64_t G) {
  return floor_div(qp, G) + W - W / G;
}

// Validated Self-Extend parameters; returns the rope with seq_len resolved to Lk when 0.
inline kvcache::rope check(const char* fn, const dims& d, const self_extend_options& se) {
  using mnemo::detail::require;
  require(se.window >= 1, fn, ": self_extend_options.window must be >= 1, got ", se.window);
  require(se.group >= 1, fn, ": self_extend_options.group must be >= 1, got ", se.group);
  kvcache::rope r = se.rope;
  if (r.seq_len == 0) r.seq_len = std::max<std::int64_t>(d.Lk, 1);
  (void)kvcache::rotary_dim(r, d.D, fn);
  return r;
}

}  // namespace self_extend_detail

// Self-Extend in double: each element's score from the neighbour or the grouped rotation, then
// one softmax (see the header).
inline void reference_self_extend(view<const float, 4> q,   // [B, Hq, Lq, D]
                                  view<const float, 4> k,   // [B, Hkv, Lk, D]
                                  view<const float, 4> v,   // [B, Hkv, Lk, Dv]
                                  view<float, 4> out,       // [B, Hq, Lq, Dv]
                                  view<float, 3> lse,       // [B, Hq, Lq] or empty
                                  const self_extend_options& se, const options& opt = {}) {
  constexpr const char* fn = "attention::reference_self_extend";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mods::causal{}, opt);
  const kvcache::rope r = self_extend_detail::check(fn, d, se);
  const kvcache::rope_frequencies f = kvcache::frequencies(r, d.D);
  const std::int64_t W = se.window, G = se.group, half = f.dim / 2;
  // x rotated by angle p f_i times `scale` on its pairs, in double.
  const auto rotate = [&](const float* x, double p, double scale, double* y) {
    for (std::int64_t c = 0; c < d.D; ++c) y[c] = x[c];
    for (std::int64_t i = 0; i < half; ++i) {
      const auto [a, b] = kvcache::rope_channels(r.layout, f.dim, i);
      const double ang = p * f.inv_freq[static_cast<std::size_t>(i)], xa = x[a], xb = x[b];
      y[a] = scale * (xa * std::cos(ang) - xb * std::sin(ang));
      y[b] = scale * (xb * std::cos(ang) + xa * std::sin(ang));
    }
  };
  constexpr double minus_inf = -std::numeric_limits<double>::infinity();
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        const float sink = sink_of(opt, h);
        std::vector<double> kn(static_cast<std::size_t>(d.Lk * d.D)), kg(kn.size()), qn(static_cast<std::size_t>(d.D)),
            qg(qn.size()), s(static_cast<std::size_t>(d.Lk)), acc(static_cast<std::size_t>(d.Dv));
        for (std::int64_t j = 0; j < d.Lk; ++j) {
          double* knj = kn.data() + j * d.D;
          double* kgj = kg.data() + j * d.D;
          const double gk = static_cast<double>(self_extend_detail::floor_div(j, G));
          if (se.keys_rotated) {
            rotate(k.ptr(b, hk, j), 0.0, 1.0, knj);
            rotate(k.ptr(b, hk, j), gk - static_cast<double>(j), 1.0, kgj);
          } else {
            rotate(k.ptr(b, hk, j), static_cast<double>(j), f.attention_factor, knj);
            rotate(k.ptr(b, hk, j), gk, f.attention_factor, kgj);
          }
        }
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t qp = i + d.offset();
          rotate(q.ptr(b, h, i), static_cast<double>(qp), f.attention_factor, qn.data());
          rotate(q.ptr(b, h, i), static_cast<double>(self_extend_detail::grouped_query(qp, W, G)), f.attention_factor,
                 qg.data());
          double m = minus_inf;
          for (std::int64_t j = 0; j < d.Lk; ++j) {
            s[static_cast<std::size_t>(j)] = minus_inf;
            if (j > qp) continue;
            const bool near = qp - j < W;
            const double* qx = near ? qn.data() : qg.data();
            const double* kx = (near ? kn.data() : kg.data()) + j * d.D;
            double dot = 0;
            for (std::int64_t c = 0; c < d.D; ++c) dot += qx[c] * kx[c];
            s[static_cast<std::size_t>(j)] = static_cast<double>(d.scale) * dot;
            m = std::max(m, s[static_cast<std::size_t>(j)]);
          }
          float* oi = out.ptr(b, h, i);
          if (m == minus_inf) {  // no key (qp < 0): out 0, lse = the sink (-inf without one)
            std::fill_n(oi, d.Dv, 0.0f);
            if (!lse.empty()) lse(b, h, i) = sink;
            continue;
          }
          m = std::max(m, static_cast<double>(sink));
          double sum = std::exp(static_cast<double>(sink) - m);
          std::fill(acc.begin(), acc.end(), 0.0);
          for (std::int64_t j = 0; j <= std::min(qp, d.Lk - 1); ++j) {
            const double p = std::exp(s[static_cast<std::size_t>(j)] - m);
            sum += p;
            for (std::int64_t c = 0; c < d.Dv; ++c) acc[static_cast<std::size_t>(c)] += p * v(b, hk, j, c);
          }
          for (std::int64_t c = 0; c < d.Dv; ++c) oi[c] = static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
          if (!lse.empty()) lse(b, h, i) = static_cast<float>(m + std::log(sum));
        }
      },
      opt.threads);
}

// Self-Extend attention, exact (see the header): two attention passes over differently rotated
// copies of q and k with complementary masks, merged. q and k are not modified. The double
// reference is reference_self_extend above.
template <class TuArch = simd::default_arch>
void self_extend(view<const float, 4> q,   // [B, Hq, Lq, D]
                 view<const float, 4> k,   // [B, Hkv, Lk, D]
                 view<const float, 4> v,   // [B, Hkv, Lk, Dv]
                 view<float, 4> out,       // [B, Hq, Lq, Dv]
                 view<float, 3> lse,       // [B, Hq, Lq] or empty
                 const self_extend_options& se, const options& opt = {}) {
  constexpr const char* fn = "attention::self_extend";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mods::causal{}, opt);
  const kvcache::rope r = self_extend_detail::check(fn, d, se);
  if (d.B == 0 || d.Lq == 0) return;
  const std::int64_t W = se.window, G = se.group;
  // q^n and q^g, k^n (unless given) and k^g: contiguous copies, rotated per [B * H] row block.
  const auto copy = [&](view<const float, 4> x) {
    tensor<float, 4> t(x.shape());
    parallel_for(
        x.extent(0) * x.extent(1) * x.extent(2),
        [&](std::int64_t row) {
          const std::int64_t L = x.extent(2), H = x.extent(1);
          const float* src = x.ptr(row / (H * L), row / L % H, row % L);
          std::copy(src, src + x.extent(3), t.data() + row * x.extent(3));
        },
        opt.threads);
    return t;
  };
  const auto rotate = [&](tensor<float, 4>& t, const kvcache::rope& rr, const std::vector<std::int64_t>& pos) {
    if (t.size() == 0) return;
    const view<float, 3> rows(t.data(), {t.extent(0) * t.extent(1), t.extent(2), t.extent(3)});
    kvcache::apply_rope<TuArch>(rr, rows, pos, opt.threads);
  };
  std::vector<std::int64_t> qpos(static_cast<std::size_t>(d.Lq)), gqpos(qpos.size()),
      kpos(static_cast<std::size_t>(d.Lk)), gkpos(kpos.size());
  for (std::int64_t i = 0; i < d.Lq; ++i) {
    qpos[static_cast<std::size_t>(i)] = i + d.offset();
    gqpos[static_cast<std::size_t>(i)] = self_extend_detail::grouped_query(i + d.offset(), W, G);
  }
  for (std::int64_t j = 0; j < d.Lk; ++j) {
    kpos[static_cast<std::size_t>(j)] = j;
    gkpos[static_cast<std::size_t>(j)] = self_extend_detail::floor_div(j, G) - (se.keys_rotated ? j : 0);
  }
  kvcache::rope delta = r;  // keys already carry af: the extra rotation has af = 1
  delta.attention_factor = 1.0;
  tensor<float, 4> qn = copy(q), qg = copy(q), kg = copy(k), kn;
  rotate(qn, r, qpos);
  rotate(qg, r, gqpos);
  rotate(kg, se.keys_rotated ? delta : r, gkpos);
  if (!se.keys_rotated) {
    kn = copy(k);
    rotate(kn, r, kpos);
  }
  const view<const float, 4> kn_view = se.keys_rotated ? k : cview(kn);
  const bool far = W <= d.Lk - 1;  // the largest distance is Lk - 1 (query Lk - 1, key 0)
  options near_opt = opt, far_opt = opt;
  far_opt.sinks = {};  // the sink joins one pass only
  tensor<float, 3> lse_n({d.B, d.Hq, d.Lq});
  const bool small = d.Lq <= decode_max_rows;
  const auto attend = [&](const tensor<float, 4>& qx, view<const float, 4> kx, view<float, 4> o, view<float, 3> l,
                          const auto& mod, const options& o_opt) {
    using M = std::decay_t<decltype(mod)>;
    if (small) decode<float, M, TuArch>(cview(qx), kx, v, o, l, mod, o_opt);
    else flash<float, M, TuArch>(cview(qx), kx, v, o, l, mod, o_opt);
  };
  if (!far) {
    attend(qn, kn_view, out, lse, mods::sliding_window{W}, near_opt);
    return;
  }
  attend(qn, kn_view, out, lse_n, mods::sliding_window{W}, near_opt);
  tensor<float, 4> out_g({d.B, d.Hq, d.Lq, d.Dv});
  tensor<float, 3> lse_g({d.B, d.Hq, d.Lq});
  attend(qg, cview(kg), out_g, lse_g, mods::beyond_window{W}, far_opt);
  merge<TuArch>(cview(out), cview(lse_n), cview(out_g), cview(lse_g), out, lse, opt.threads);
}

// Convenience: tensors or views of any constness.
template <class Q, class K, class V>
  requires(!std::is_same_v<K, view<const float, 4>>)
void reference_self_extend(const Q& q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse,
                           const self_extend_options& se, const options& opt = {}) {
  reference_self_extend(cview(q), cview(k), cview(v), out, lse, se, opt);
}

template <class Q, class K, class V, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const float, 4>>)
void self_extend(const Q& q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse,
                 const self_extend_options& se, const options& opt = {}) {
  self_extend<TuArch>(cview(q), cview(k), cview(v), out, lse, se, opt);
}

}  // namespace mnemo::attention

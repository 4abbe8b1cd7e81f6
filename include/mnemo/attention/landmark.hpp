// mnemo/attention/landmark.hpp — landmark attention (Mohtashami & Jaggi, "Landmark Attention:
// Random-Access Infinite Context Length for Transformers", NeurIPS 2023).
//
// A landmark token closes every block of regular tokens (is_mem [L] marks them). Training /
// prefill form, the grouped softmax ("mem_opt" of epfml/landmark-attention lm_benchmark, and the
// golden README's landmark_attention), causal with Lq = Lk = L:
//   blk(j) = number of landmarks at positions < j;  cur = blk(i) for query i
//   top group T_i = { regular j <= i : blk(j) = cur } u { landmark j < i : blk(j) < cur }
//             (the landmark of the current block is excluded, even when it is the query)
//   P_top = softmax over T_i of s_ij = scale q_i . k_j
//   w_ij  = P_top(j)                                        regular j of the current block
//         = P_top(lm_b) softmax_{regular j' : blk(j') = b}(s_ij')[j]   regular j of block b < cur
//         = 0                                               landmarks
//   out_i = sum_j w_ij v_j
// A query that sees no key of T (a landmark at position 0) gets out = 0; an earlier block with no
// regular token passes its landmark's probability to nobody (its mass is dropped).
//
// Inference form (landmark_decode, one step q [B, Hq, 1, D]): a cache of regular keys/values
// [B, Hkv, Lk, D|Dv] in blocks of `block` tokens and the landmark key of each complete block
// [B, Hkv, n_blocks, D]. Each query head scores block b by s_b = scale q . lm_b, retrieves the
// top `blocks` blocks (that start before Lk - window; simd::top_k_indices, ties to the lower block,
// NaN last) and attends exactly to their regular tokens below Lk - window together with the window
// [Lk - window, Lk): exact attention over the union of the two key sets, which is what
// reference_landmark_decode (attention::reference with that key set as the mask) computes. It is
// quest.hpp's selected-block decode (selection, then the split-KV engine over the gathered keys),
// with the landmark score in place of Quest's bound.
//
// Shapes: q, k [B, H, L, D], v [B, H, L, Dv], is_mem [L] int64 (0 or 1), out [B, H, L, Dv],
// weights [B, H, L, L] (optional). Numerics: the reference in double; the fast path computes each
// row's scores once in f32 (simd::dot), the per-block and top-group softmax with simd::exp_sum,
// and out by axpy over the row's weights; rows are independent (parallel over (b, h, row)).
// It is O(L^2 D) like the reference (the grouped softmax needs every score of the row), not tiled.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/quest.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention {

using landmark_options = block_select_options;

namespace landmark_detail {

// The block structure of is_mem: blk[j] (landmarks before j), lm[b] (position of landmark b) and
// start[b] (first position of block b, one more entry than lm for the open last block).
struct layout {
  std::vector<std::int64_t> blk, lm, start;
  // Regular keys of block b visible to a query at position i: [start[b], end).
  std::int64_t end(std::int64_t b, std::int64_t i) const {
    const std::int64_t stop = b < static_cast<std::int64_t>(lm.size()) ? lm[static_cast<std::size_t>(b)] : i + 1;
    return std::min(stop, i + 1);
  }
};

inline layout make_layout(view<const std::int64_t, 1> is_mem) {
  layout lo;
  const std::int64_t L = is_mem.extent(0);
  lo.blk.resize(static_cast<std::size_t>(L));
  lo.start.push_back(0);
  std::int64_t count = 0;
  for (std::int64_t j = 0; j < L; ++j) {
    lo.blk[static_cast<std::size_t>(j)] = count;
    if (is_mem(j) != 0) {
      lo.lm.push_back(j);
      lo.start.push_back(j + 1);
      ++count;
    }
  }
  return lo;
}

struct landmark_dims {
  std::int64_t B, H, L, D, Dv;
  float scale;
};

inline landmark_dims check_landmark(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                                    const view<const float, 4>& v, const view<const std::int64_t, 1>& is_mem,
                                    const view<float, 4>& out, const view<float, 4>& weights, float scale, int threads) {
  using mnemo::detail::require;
  require(!q.empty() && !k.empty() && !v.empty() && !is_mem.empty() && !out.empty(), fn,
          ": q, k, v, is_mem and out must be non-empty views");
  const std::int64_t B = q.extent(0), H = q.extent(1), L = q.extent(2), D = q.extent(3), Dv = v.extent(3);
  require(D >= 1 && Dv >= 1, fn, ": head dims must be >= 1, got D=", D, ", Dv=", Dv);
  mnemo::detail::require_shape(fn, "k", k, {B, H, L, D}, " [B, H, L, D] (from q)");
  mnemo::detail::require_shape(fn, "v", v, {B, H, L, Dv}, " [B, H, L, Dv] (B, H, L from q)");
  mnemo::detail::require_shape(fn, "is_mem", is_mem, {L}, " [L]");
  for (std::int64_t j = 0; j < L; ++j)
    if (is_mem(j) != 0 && is_mem(j) != 1) mnemo::detail::fail(fn, ": is_mem must hold 0 or 1, got is_mem[", j, "]=", is_mem(j));
  mnemo::detail::require_shape(fn, "out", out, {B, H, L, Dv}, " [B, H, L, Dv]");
  if (!weights.empty()) mnemo::detail::require_shape(fn, "weights", weights, {B, H, L, L}, " [B, H, L, L]");
  require(std::isfinite(scale), fn, ": scale must be finite, got ", scale);
  require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const float s = scale != 0 ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {B, H, L, D, Dv, s};
}

}  // namespace landmark_detail

// The grouped softmax in double, exactly as the header's equations. scale 0: 1 / sqrt(D).
inline void reference_landmark_attention(view<const float, 4> q,             // [B, H, L, D]
                               view<const float, 4> k,             // [B, H, L, D]
                               view<const float, 4> v,             // [B, H, L, Dv]
                               view<const std::int64_t, 1> is_mem, // [L]
                               view<float, 4> out,                 // [B, H, L, Dv]
                               view<float, 4> weights = {},        // [B, H, L, L] or empty
                               float scale = 0) {
  const auto d = landmark_detail::check_landmark("attention::reference_landmark_attention", q, k, v, is_mem, out,
                                                 weights, scale, 0);
  const auto lo = landmark_detail::make_layout(is_mem);
  const double minus_inf = -std::numeric_limits<double>::infinity();
  std::vector<double> s(static_cast<std::size_t>(d.L)), w(static_cast<std::size_t>(d.L));
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.H; ++h)
      for (std::int64_t i = 0; i < d.L; ++i) {
        for (std::int64_t j = 0; j <= i; ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(q(b, h, i, c)) * k(b, h, j, c);
          s[static_cast<std::size_t>(j)] = d.scale * dot;
        }
        const std::int64_t cur = lo.blk[static_cast<std::size_t>(i)];
        auto regular = [&](std::int64_t j) { return is_mem(j) == 0; };
        auto in_top = [&](std::int64_t j) {
          const std::int64_t bj = lo.blk[static_cast<std::size_t>(j)];
          return regular(j) ? bj == cur : (j < i && bj < cur);
        };
        double m = minus_inf, z = 0;
        for (std::int64_t j = 0; j <= i; ++j)
          if (in_top(j)) m = std::max(m, s[static_cast<std::size_t>(j)]);
        for (std::int64_t j = 0; j <= i; ++j)
          if (in_top(j)) z += std::exp(s[static_cast<std::size_t>(j)] - m);
        std::fill(w.begin(), w.end(), 0.0);
        for (std::int64_t j = 0; j <= i && z > 0; ++j) {
          if (!regular(j)) continue;
          const std::int64_t bj = lo.blk[static_cast<std::size_t>(j)];
          if (bj == cur) {
            w[static_cast<std::size_t>(j)] = std::exp(s[static_cast<std::size_t>(j)] - m) / z;
            continue;
          }
          // Earlier block bj: its landmark's top-group probability times the in-block softmax.
          double mb = minus_inf, zb = 0;
          for (std::int64_t t = lo.start[static_cast<std::size_t>(bj)]; t < lo.lm[static_cast<std::size_t>(bj)]; ++t)
            mb = std::max(mb, s[static_cast<std::size_t>(t)]);
          for (std::int64_t t = lo.start[static_cast<std::size_t>(bj)]; t < lo.lm[static_cast<std::size_t>(bj)]; ++t)
            zb += std::exp(s[static_cast<std::size_t>(t)] - mb);
          const double p_lm = std::exp(s[static_cast<std::size_t>(lo.lm[static_cast<std::size_t>(bj)])] - m) / z;
          w[static_cast<std::size_t>(j)] = p_lm * std::exp(s[static_cast<std::size_t>(j)] - mb) / zb;
        }
        for (std::int64_t c = 0; c < d.Dv; ++c) {
          double acc = 0;
          for (std::int64_t j = 0; j <= i; ++j) acc += w[static_cast<std::size_t>(j)] * v(b, h, j, c);
          out(b, h, i, c) = static_cast<float>(acc);
        }
        if (!weights.empty())
          for (std::int64_t j = 0; j < d.L; ++j) weights(b, h, i, j) = static_cast<float>(w[static_cast<std::size_t>(j)]);
      }
}


// The grouped softmax, fast path (row-wise f32 SIMD, parallel over rows). scale 0: 1 / sqrt(D).
template <class Arch = simd::default_arch>
void landmark_attention(view<const float, 4> q,             // [B, H, L, D]
                        view<const float, 4> k,             // [B, H, L, D]
                        view<const float, 4> v,             // [B, H, L, Dv]
                        view<const std::int64_t, 1> is_mem, // [L]
                        view<float, 4> out,                 // [B, H, L, Dv]
                        view<float, 4> weights = {},        // [B, H, L, L] or empty
                        float scale = 0, int threads = 0) {
  const auto d = landmark_detail::check_landmark("attention::landmark_attention", q, k, v, is_mem, out, weights, scale,
                                                 threads);
  const auto lo = landmark_detail::make_layout(is_mem);
  constexpr float minus_inf = -std::numeric_limits<float>::infinity();
  parallel_for_dynamic(
      d.B * d.H * d.L,
      [&](std::int64_t row) {
        const std::int64_t b = row / (d.H * d.L), h = row / d.L % d.H, i = row % d.L;
        std::vector<float> qs(static_cast<std::size_t>(d.D)), s(static_cast<std::size_t>(i + 1));
        for (std::int64_t c = 0; c < d.D; ++c) qs[static_cast<std::size_t>(c)] = d.scale * q(b, h, i, c);
        for (std::int64_t j = 0; j <= i; ++j) s[static_cast<std::size_t>(j)] = simd::dot<Arch>(qs.data(), k.ptr(b, h, j), d.D);
        const std::int64_t cur = lo.blk[static_cast<std::size_t>(i)];
        const std::int64_t c0 = lo.start[static_cast<std::size_t>(cur)], c1 = lo.end(cur, i);  // current block
        // Top group: the current block's regular keys and the landmarks of blocks 0 .. cur-1.
        float m = simd::reduce_max<Arch>(s.data() + c0, c1 - c0);
        for (std::int64_t bb = 0; bb < cur; ++bb) m = std::max(m, s[static_cast<std::size_t>(lo.lm[static_cast<std::size_t>(bb)])]);
        float* o = out.ptr(b, h, i);
        std::fill(o, o + d.Dv, 0.0f);
        if (m == minus_inf) {  // nothing in the top group
          std::fill(s.begin(), s.end(), 0.0f);
        } else {
          std::vector<float> p_lm(static_cast<std::size_t>(cur));
          float z = simd::exp_sum<Arch>(s.data() + c0, c1 - c0, m);
          for (std::int64_t bb = 0; bb < cur; ++bb) {
            const float x = s[static_cast<std::size_t>(lo.lm[static_cast<std::size_t>(bb)])];
            p_lm[static_cast<std::size_t>(bb)] = x == minus_inf ? 0.0f : simd::exp<Arch>(x - m);
            z += p_lm[static_cast<std::size_t>(bb)];
          }
          const float inv_z = 1.0f / z;
          simd::scale<Arch>(inv_z, s.data() + c0, c1 - c0);
          for (std::int64_t bb = 0; bb < cur; ++bb) {
            const std::int64_t b0 = lo.start[static_cast<std::size_t>(bb)], b1 = lo.lm[static_cast<std::size_t>(bb)];
            s[static_cast<std::size_t>(b1)] = 0.0f;  // landmarks carry no value weight
            const float mb = simd::reduce_max<Arch>(s.data() + b0, b1 - b0);
            const float zb = mb == minus_inf ? 0.0f : simd::exp_sum<Arch>(s.data() + b0, b1 - b0, mb);
            const float f = zb > 0 ? p_lm[static_cast<std::size_t>(bb)] * inv_z / zb : 0.0f;
            simd::scale<Arch>(f, s.data() + b0, b1 - b0);
          }
          if (c1 <= i) s[static_cast<std::size_t>(i)] = 0.0f;  // the query is the current block's landmark
          for (std::int64_t j = 0; j <= i; ++j)
            if (s[static_cast<std::size_t>(j)] != 0) simd::axpy<Arch>(s[static_cast<std::size_t>(j)], v.ptr(b, h, j), o, d.Dv);
        }
        if (!weights.empty()) {
          float* w = weights.ptr(b, h, i);
          std::copy(s.begin(), s.end(), w);
          std::fill(w + i + 1, w + d.L, 0.0f);
        }
      },
      threads);
}

// Convenience: tensors for the inputs.
template <class Q, class K, class V, class M, class Arch = simd::default_arch>
  requires(!std::is_same_v<Q, view<const float, 4>>)
void landmark_attention(const Q& q, const K& k, const V& v, const M& is_mem, view<float, 4> out,
                        view<float, 4> weights = {}, float scale = 0, int threads = 0) {
  landmark_attention<Arch>(cview(q), cview(k), cview(v), cview(is_mem), out, weights, scale, threads);
}

namespace detail {

template <class KV>
void check_landmarks(const char* fn, const view<const KV, 4>& landmarks, std::int64_t block, const dims& d) {
  using mnemo::detail::require;
  require(block >= 1, fn, ": block must be >= 1, got ", block);
  require(!landmarks.empty(), fn, ": landmarks must be a non-empty view");
  const std::int64_t n_blocks = landmarks.extent(2);
  mnemo::detail::require_shape(fn, "landmarks", landmarks, {d.B, d.Hkv, n_blocks, d.D},
                               " [B, Hkv, n_blocks, D] (B, Hkv, D from k)");
  require(n_blocks * block <= d.Lk, fn, ": landmarks close complete blocks only: n_blocks * block must be <= Lk = ",
          d.Lk, ", got ", n_blocks, " * ", block, " = ", n_blocks * block);
}

}  // namespace detail

// Landmark decode in double: blocks scored by q . lm_b, the top `blocks` (ties: the lower block),
// attention::reference over their keys below Lk - window plus the window. `selected`
// [B, Hq, blocks] (or empty) receives the blocks, as landmark_decode's.
template <class KV>
void reference_landmark_decode(view<const float, 4> q,          // [B, Hq, 1, D]
                     view<const KV, 4> k,             // [B, Hkv, Lk, D]
                     view<const KV, 4> v,             // [B, Hkv, Lk, Dv]
                     view<const KV, 4> landmarks,     // [B, Hkv, n_blocks, D]
                     std::int64_t block, view<float, 4> out, view<float, 3> lse,
                     view<std::int64_t, 3> selected, const landmark_options& opt = {}) {
  constexpr const char* fn = "attention::reference_landmark_decode";
  mnemo::detail::require(block >= 1, fn, ": block must be >= 1, got ", block);
  const auto bd = sparse_decode_detail::check_block_decode(fn, q, k, v, out, lse, block, landmarks.extent(2), opt);
  const dims& d = bd.d;
  detail::check_landmarks(fn, landmarks, block, d);
  if (!selected.empty()) mnemo::detail::require_shape(fn, "selected", selected, {d.B, d.Hq, opt.blocks}, " [B, Hq, blocks]");
  for (std::int64_t b = 0; b < d.B; ++b)
    for (std::int64_t h = 0; h < d.Hq; ++h) {
      const std::int64_t hk = h / d.group();
      std::vector<double> score(static_cast<std::size_t>(bd.n_cand));
      for (std::int64_t p = 0; p < bd.n_cand; ++p) {
        double dot = 0;
        for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(q(b, h, 0, c)) * to_float(landmarks(b, hk, p, c));
        score[static_cast<std::size_t>(p)] = d.scale * dot;
      }
      sparse_decode_detail::reference_blocks(bd, q, k, v, out, lse, selected, opt.blocks, b, h, score);
    }
}


// Landmark decode (see the header): the top `opt.blocks` blocks per query head by their landmark
// key's score, exact attention over their regular tokens plus the window. `selected`
// [B, Hq, blocks] (or empty) receives each head's blocks (ascending, -1 padded).
template <class KV, class TuArch = simd::default_arch>
void landmark_decode(view<const float, 4> q,          // [B, Hq, 1, D]
                     view<const KV, 4> k,             // [B, Hkv, Lk, D]   regular tokens
                     view<const KV, 4> v,             // [B, Hkv, Lk, Dv]
                     view<const KV, 4> landmarks,     // [B, Hkv, n_blocks, D]  key of block b's landmark
                     std::int64_t block, view<float, 4> out,  // [B, Hq, 1, Dv]
                     view<float, 3> lse = {},                 // [B, Hq, 1] or empty
                     const landmark_options& opt = {}, view<std::int64_t, 3> selected = {}) {
  constexpr const char* fn = "attention::landmark_decode";
  mnemo::detail::require(block >= 1, fn, ": block must be >= 1, got ", block);
  const auto bd = sparse_decode_detail::check_block_decode(fn, q, k, v, out, lse, block, landmarks.extent(2), opt);
  detail::check_landmarks(fn, landmarks, block, bd.d);
  if (!selected.empty())
    mnemo::detail::require_shape(fn, "selected", selected, {bd.d.B, bd.d.Hq, opt.blocks}, " [B, Hq, blocks]");
  const std::int64_t G = bd.d.group(), D = bd.d.D, n = bd.n_cand;
  simd::dispatch<TuArch>(simd::level::automatic, [&]<class Arch>() {
    sparse_decode_detail::block_decode<Arch>(
        bd, q, k, v, out, lse, selected, opt.blocks, opt.threads,
        [&](std::int64_t b, std::int64_t hk, const float* qs, float* bs) {
          for (std::int64_t p = 0; p < n; ++p)
            for (std::int64_t g = 0; g < G; ++g) bs[g * n + p] = simd::dot<Arch>(qs + g * D, landmarks.ptr(b, hk, p), D);
        });
  });
}

}  // namespace mnemo::attention

// mnemo/attention/approx/combiner.hpp — Combiner: direct attention within a query's own block,
// plus attention to one summary of every other block, in one softmax.
//
// Ren, Dai, Dai, Yang, Leskovec, Schuurmans, Dai, "Combiner: Full Attention Transformer with
// Sparse Computational Cost", NeurIPS 2021. Combiner writes attention as a conditional
// expectation and factorises the probability of a key outside the direct support Omega_i^0
// through the region Omega^r that holds it: p(j | i) = p(Omega^r | i) q(j | Omega^r). This is
// the Combiner-Fixed variant (the fixed block partition of Sparse Transformer's fixed pattern)
// with mean-pooled summaries, i.e. the parameter-free choice q(j | Omega^r) = 1 / |Omega^r|:
//
//   keys are cut into blocks Omega^r of `block` positions (the last one may be shorter);
//   query i at position p_i = i + Lk - Lq belongs to block t_i = floor(p_i / block)
//   Omega_i^0  = the keys of block t_i           (j <= p_i when causal)
//   summaries  r != t_i                          (r < t_i when causal: only complete past blocks)
//   k^_r = mean_{j in Omega^r} k_j,  v^_r = mean_{j in Omega^r} v_j,  n_r = |Omega^r|
//
//   Z_i   = sum_{j in Omega_i^0} exp(s_ij) + sum_r n_r exp(scale q_i . k^_r)      s_ij = scale q_i . k_j
//   out_i = ( sum_{j in Omega_i^0} exp(s_ij) v_j + sum_r n_r exp(scale q_i . k^_r) v^_r ) / Z_i
//   lse_i = log Z_i
//
// One normaliser over direct keys and summaries. The summary's probability p(Omega^r | i) =
// n_r exp(scale q_i . k^_r) / Z_i is shared by the block's n_r keys, 1 / n_r each, every key of
// the block scored as the block's mean key: the summary logit carries log n_r. So a block whose
// keys are all equal is attended exactly, and with one block (block >= Lk) Combiner is exact
// attention.
//
// Shapes: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv], out [B, Hq, Lq, Dv],
// lse [B, Hq, Lq]; Lq <= Lk (queries are the last Lq positions). K/V are float.
//
// Fast path: the summaries (double sums, rounded once) are written in front of a copy of the
// keys and values, [B, Hkv, nb + Lk, *] with nb = ceil(Lk / block), and attention::flash runs
// once over that with combiner_mask: summaries first, log n_r added as a score mod, and a tile
// classifier that skips every key tile outside a query tile's blocks. Work per query: about
// block + Lk / block keys instead of Lk (block = sqrt(Lk) minimises it).
//
// Numerics: f32 flash over f32 summaries against the double reference (double summaries).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention::approx {

struct combiner_options {
  std::int64_t block = 64;  // keys per block
  bool causal = false;
};

// The mask and summary bias over the augmented keys [nb summaries | Lk keys] (see the header).
// Query position qp of the augmented call is p = qp - nb on the original axis.
struct combiner_mask {
  std::int64_t nb = 0, size = 1;  // summaries, keys per block
  bool causal = false;
  const float* log_count = nullptr;  // [nb]: log n_r

  bool visible(std::int64_t, std::int64_t qp, std::int64_t kp) const {
    const std::int64_t p = qp - nb, t = p / size;
    if (kp < nb) return causal ? kp < t : kp != t;
    const std::int64_t j = kp - nb;
    return j / size == t && (!causal || j <= p);
  }
  template <class S>
  S score(S s, std::int64_t, std::int64_t, std::int64_t kp) const {
    return kp < nb ? s + static_cast<S>(log_count[kp]) : s;
  }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    const std::int64_t p0 = q0 - nb, p1 = q1 - 1 - nb, t0 = p0 / size, t1 = p1 / size;
    if (k1 <= nb) {  // summaries r in [k0, k1)
      if (causal) return k0 >= t1 ? tile::empty : k1 - 1 < t0 ? tile::full : tile::partial;
      if (k1 - 1 < t0 || k0 > t1) return tile::full;
      return t0 == t1 && k0 == t0 && k1 == k0 + 1 ? tile::empty : tile::partial;
    }
    if (k0 < nb) return tile::partial;
    const std::int64_t j0 = k0 - nb, j1 = k1 - 1 - nb, b0 = j0 / size, b1 = j1 / size;
    if (b1 < t0 || b0 > t1 || (causal && j0 > p1)) return tile::empty;
    if (b0 == b1 && t0 == t1 && b0 == t0 && (!causal || j1 <= p0)) return tile::full;
    return tile::partial;
  }
};

namespace combiner_detail {

inline dims check(const char* fn, const view<const float, 4>& q, const view<const float, 4>& k,
                  const view<const float, 4>& v, const view<float, 4>& out, const view<float, 3>& lse,
                  const combiner_options& p, const options& opt) {
  const dims d = attention::detail::check_args(fn, q, k, v, out, lse, mods::none{}, opt);
  mnemo::detail::require(p.block >= 1, fn, ": combiner_options.block must be >= 1, got ", p.block);
  mnemo::detail::require(d.Lq <= d.Lk, fn, ": Lq (q.shape[2]) must be <= Lk (k.shape[2]), got Lq=", d.Lq, ", Lk=", d.Lk);
  mnemo::detail::require(opt.sinks.empty(), fn, ": options.sinks are not supported by Combiner attention");
  return d;
}

inline std::int64_t blocks(std::int64_t Lk, std::int64_t block) { return (Lk + block - 1) / block; }

// Mean of rows [r * block, min(Lk, (r + 1) * block)) of x [Lk, width] (row stride ld), in double.
inline void block_mean(const float* x, std::int64_t ld, std::int64_t width, std::int64_t Lk, std::int64_t block,
                       std::int64_t r, double* mean) {
  const std::int64_t j0 = r * block, j1 = std::min(Lk, j0 + block);
  std::fill_n(mean, width, 0.0);
  for (std::int64_t j = j0; j < j1; ++j)
    for (std::int64_t c = 0; c < width; ++c) mean[c] += x[j * ld + c];
  for (std::int64_t c = 0; c < width; ++c) mean[c] /= static_cast<double>(j1 - j0);
}

}  // namespace combiner_detail

// Combiner attention in double (summaries in double, one softmax per row).
inline void reference_combiner_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                         view<const float, 4> k,  // [B, Hkv, Lk, D]
                                         view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                         const combiner_options& p,
                                         view<float, 4> out,       // [B, Hq, Lq, Dv]
                                         view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                                         const options& opt = {}) {
  constexpr const char* fn = "approx::reference_combiner_attention";
  const dims d = combiner_detail::check(fn, q, k, v, out, lse, p, opt);
  const std::int64_t nb = combiner_detail::blocks(d.Lk, p.block);
  parallel_for(
      d.B * d.Hq,
      [&](std::int64_t bh) {
        const std::int64_t b = bh / d.Hq, h = bh % d.Hq, hk = h / d.group();
        std::vector<double> kbar(static_cast<std::size_t>(nb * d.D)), vbar(static_cast<std::size_t>(nb * d.Dv));
        for (std::int64_t r = 0; r < nb; ++r) {
          combiner_detail::block_mean(k.ptr(b, hk, 0), k.stride(2), d.D, d.Lk, p.block, r, kbar.data() + r * d.D);
          combiner_detail::block_mean(v.ptr(b, hk, 0), v.stride(2), d.Dv, d.Lk, p.block, r, vbar.data() + r * d.Dv);
        }
        std::vector<double> s, acc(static_cast<std::size_t>(d.Dv));
        std::vector<const double*> vals;
        for (std::int64_t i = 0; i < d.Lq; ++i) {
          const std::int64_t pi = i + d.offset(), t = pi / p.block;
          const float* qi = q.ptr(b, h, i);
          s.clear();
          std::vector<std::int64_t> direct;
          std::vector<std::int64_t> summ;
          for (std::int64_t r = 0; r < nb; ++r) {
            if (p.causal ? r >= t : r == t) continue;
            double dot = 0;
            for (std::int64_t c = 0; c < d.D; ++c) dot += static_cast<double>(qi[c]) * kbar[static_cast<std::size_t>(r * d.D + c)];
            const double n_r = static_cast<double>(std::min(d.Lk, (r + 1) * p.block) - r * p.block);
            s.push_back(d.scale * dot + std::log(n_r));
            summ.push_back(r);
          }
          for (std::int64_t j = t * p.block; j < std::min(d.Lk, (t + 1) * p.block); ++j) {
            if (p.causal && j > pi) break;
            s.push_back(d.scale * simd::reference::dot(qi, k.ptr(b, hk, j), d.D));
            direct.push_back(j);
          }
          const double top = s.empty() ? -std::numeric_limits<double>::infinity() : *std::max_element(s.begin(), s.end());
          std::fill(acc.begin(), acc.end(), 0.0);
          double sum = 0;
          for (std::size_t e = 0; e < s.size(); ++e) {
            const double w = std::exp(s[e] - top);
            sum += w;
            if (e < summ.size())
              for (std::int64_t c = 0; c < d.Dv; ++c) acc[static_cast<std::size_t>(c)] += w * vbar[static_cast<std::size_t>(summ[e] * d.Dv + c)];
            else
              for (std::int64_t c = 0; c < d.Dv; ++c) acc[static_cast<std::size_t>(c)] += w * v(b, hk, direct[e - summ.size()], c);
          }
          float* o = out.ptr(b, h, i);
          for (std::int64_t c = 0; c < d.Dv; ++c) o[c] = s.empty() ? 0.0f : static_cast<float>(acc[static_cast<std::size_t>(c)] / sum);
          if (!lse.empty())
            lse(b, h, i) = s.empty() ? -std::numeric_limits<float>::infinity() : static_cast<float>(top + std::log(sum));
        }
      },
      opt.threads);
}

// Combiner attention, fast path (see the header).
inline void combiner_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                               view<const float, 4> k,  // [B, Hkv, Lk, D]
                               view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                               const combiner_options& p,
                               view<float, 4> out,       // [B, Hq, Lq, Dv]
                               view<float, 3> lse = {},  // [B, Hq, Lq] or empty
                               const options& opt = {}) {
  constexpr const char* fn = "approx::combiner_attention";
  const dims d = combiner_detail::check(fn, q, k, v, out, lse, p, opt);
  if (d.B == 0 || d.Lq == 0) return;
  const std::int64_t nb = combiner_detail::blocks(d.Lk, p.block), La = nb + d.Lk;
  tensor<float, 4> ka({d.B, d.Hkv, La, d.D}), va({d.B, d.Hkv, La, d.Dv});
  std::vector<float> log_count(static_cast<std::size_t>(nb));
  for (std::int64_t r = 0; r < nb; ++r)
    log_count[static_cast<std::size_t>(r)] =
        static_cast<float>(std::log(static_cast<double>(std::min(d.Lk, (r + 1) * p.block) - r * p.block)));
  parallel_for(
      d.B * d.Hkv,
      [&](std::int64_t bhk) {
        const std::int64_t b = bhk / d.Hkv, hk = bhk % d.Hkv;
        std::vector<double> mean(static_cast<std::size_t>(std::max(d.D, d.Dv)));
        auto fill = [&](const view<const float, 4>& x, tensor<float, 4>& a, std::int64_t width) {
          float* dst = a.as_view().ptr(b, hk, 0);
          for (std::int64_t r = 0; r < nb; ++r) {
            combiner_detail::block_mean(x.ptr(b, hk, 0), x.stride(2), width, d.Lk, p.block, r, mean.data());
            for (std::int64_t c = 0; c < width; ++c) dst[r * width + c] = static_cast<float>(mean[static_cast<std::size_t>(c)]);
          }
          for (std::int64_t j = 0; j < d.Lk; ++j) std::copy_n(x.ptr(b, hk, j), width, dst + (nb + j) * width);
        };
        fill(k, ka, d.D);
        fill(v, va, d.Dv);
      },
      opt.threads);
  options inner = opt;
  inner.scale = d.scale;
  const combiner_mask mask{nb, p.block, p.causal, log_count.data()};
  attention::flash<float, combiner_mask>(q, cview(ka), cview(va), out, lse, mask, inner);
}

}  // namespace mnemo::attention::approx

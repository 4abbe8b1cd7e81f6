// mnemo/attention/score_terms.hpp — score terms from the seed papers, written as mods (the mod
// contract of mods.hpp), so reference, flash, flash_backward, sparse::attention and the split-KV
// engine (decode and everything on it) run them without a change to any kernel.
//
// Positions are those of every mod: query row i sits at qp = i + (Lk - Lq) on the key axis, keys
// at kp = j, so decode (Lq = 1, qp = Lk - 1) and prefill obey the same rule. s below is the scaled
// score scale * q_i . k_j the kernels hand to a mod.
//
//   mods::forgetting       Forgetting attention (FoX; Lin, Nikishin, He, Courville, "Forgetting
//                          Transformer: Softmax Attention with a Forget Gate", ICLR 2025):
//                              s_ij += F_qp - F_kp,   F_p = sum_{l <= p} log f_l   (causal)
//                          so F_qp - F_kp = sum_{l = kp+1 .. qp} log f_l <= 0: the product of the
//                          forget gates between key and query. log f [Hq, Lk] per query head, one
//                          batch entry (see "Batches" below). The mod carries the causal mask.
//                          Backward: forgetting_backward (below) returns d log f as well.
//   mods::query_temperature  Selective attention's per-query temperature (Zhang, Deng, Lin,
//                          Zhou, "Selective Attention: Enhancing Transformer through Principled
//                          Context Control", NeurIPS 2024): s_ij *= t_h(x_i), the temperature
//                          computed by the caller from the query token, t [Hq, Lq].
//   mods::head_temperature   per-head temperature (Wang et al., "Length Generalization of Causal
//                          Transformers without Position Encoding", 2024: a scale per head
//                          sharpens NoPE attention at long L): s_ij *= t_h, t [Hq].
//                          Both temperatures: d s / d s_in = t (forward and backward).
//   mods::relative_position  relative position terms (Shaw, Uszkoreit, Vaswani, "Self-Attention with
//                          Relative Position Representations", 2018; Dai et al., "Transformer-XL",
//                          2019, eq. (2); GTrXL, Parisotto et al. 2020, uses the same scores):
//                              s_ij = scale (q_i.k_j + q_i.r_d + u.k_j + v.r_d),  d = qp - kp
//                          r_d a table of relative embeddings R [Hr, N, D] (Hr = 1: shared by the
//                          heads, as in Shaw; Hr = Hq: per head, Transformer-XL's W_{k,R} R); row
//                          n holds distance min_distance + n, distances outside the table clamp
//                          to its ends (Shaw's clip(j - i, k) is min_distance = -k, N = 2k + 1
//                          with row n = distance n - k in qp - kp, i.e. Shaw's row k - n;
//                          Transformer-XL is min_distance = 0, N = Lk, with a causal mask);
//                          u, v [Hq, D] the global content and position biases (empty: 0).
//                          Forward only (see "Left out").
//   mods::alibi_two_sided  non-causal ALiBi (Press, Smith, Lewis, "Train Short, Test Long", 2022;
//                          its encoder variant): s_ij -= slope_h (qp - kp) for keys behind the
//                          query and ahead_h (kp - qp) for keys ahead of it. With ahead empty
//                          (one slope per head) it is the symmetric -slope_h |qp - kp|, which is
//                          exactly mods::alibi (mods.hpp), whose distance is already |qp - kp|,
//                          flash-attention's non-causal convention. Additive: derivative 1.
//
// How each runs in the tiled kernels (score_tile, on a key-major tile s[j * ld + i]):
//   forgetting      s += a_i + b_j with a_i = F_qp - F_A, b_j = F_A - F_kp around an anchor A at the
//                   tile's first query (F kept in double, a and b rounded to f32 per tile): a
//                   rounding error proportional to |F_qp - F_kp|, not to |F| (which grows with
//                   the position: F ~ -4000 at L = 4096 with log f = -1 would cost 5e-4 in every
//                   score as plain f32 F). One vector add per element.
//   temperatures    one vector multiply per element (and g *= t in the backward).
//   relative        the tile's band of q_i . r_d is one small GEMM of the clamped distance rows
//                   the tile needs (at most qn + kn - 1, at most N) against the tile's packed
//                   queries; u.k_j [Hq, Lk] and v.r_d [Hq, N] are tables made at construction.
//                   No Lq x Lk x D tensor, no Lq x Lk table: per tile O((qn + kn) qn D) flops
//                   and (qn + kn) qn floats of per-thread scratch (thread_local, grown once).
//                   The split-KV engine calls score() per element: a D-long dot per score there.
//   alibi_two_sided one vector pass like alibi_columns.
//
// Batches. A mod sees (h, qp, kp), never the batch entry, so a term whose tensors differ per
// sequence (FoX's gate, SSA's temperature, the relative terms' q and k) is one mod per batch entry.
// attend_per_batch (below) runs attention::attend on each batch entry with make_mod(b): the
// kernels' own parallelism works inside every entry (B x Hkv x tiles items becomes Hkv x tiles).
// forgetting_attention / forgetting_backward / relative_position_attention are that loop for their
// tensors ([B, ...] leading dimensions).
//
// FoX backward. With dS_ij = d loss / d s_ij (the softmax gradient P o (dP - D)):
//     d loss / d F_p = sum_j dS_pj (p as a query) - sum_i dS_ip (p as a key),
//     d loss / d log f_l = sum_{p >= l} d loss / d F_p     (a reverse cumulative sum)
// The row sums are known in closed form: sum_j P_ij = 1 - exp(sink - lse_i), so sum_j dS_ij =
// exp(sink_h - lse_i) (dO_i . O_i), 0 without attention sinks. The column sums come out of
// flash_backward unchanged: q gets one more channel holding 1 / scale and k one holding 0, so no
// score changes and dK's extra channel is scale * sum_i dS_ij / scale. dK is summed over a GQA
// group while F is per query head, so the call runs with the keys and values expanded per query
// head (Hkv' = Hq) and the group sums are taken afterwards. Cost: one flash_backward at head dim
// D + 1 (padded to the SIMD width: D = 64 runs at 80 on AVX-512) plus O(B Hq (Lq + Lk) D) copies.
// The double reference is reference_forgetting_backward: the chain rule written out.
//
// Left out: the backward of relative_position (dq and dk through q.r and u.k, dR, du, dv need the
// tile's dS and a relative scatter, which flash_backward does not expose; the mod has no
// score_derivative, so flash_backward refuses it at compile time instead of returning gradients
// that treat the terms as constants). Shaw's value term (sum_j P_ij a^V_{ij}) is not a score
// term and is not here. FoX's "Pro" block (output gate, QK-norm, data-dependent shift) lives
// outside attention.
//
// Numerics: the references (score<double>) compute every term in double from the inputs; the
// f32 paths as described above. Every score_tile leaves masked and padding elements finite, and
// reads positions clamped into its tables, so a tile's padding or masked pairs (qp < 0, qp >= Lk,
// kp > qp) never index outside them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "mnemo/attention/attention.hpp"
#include "mnemo/attention/common.hpp"
#include "mnemo/attention/flash_backward.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/tiles.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/gemm.hpp"

namespace mnemo::attention {

namespace score_terms_detail {

// Queries handled per pass of the per-query buffers (on the stack): a multiple of every SIMD width.
inline constexpr std::int64_t query_chunk = 256;

// s[j * ld + i] += a[i] + b[j], keys j < kn, queries i < n (n a multiple of the SIMD width of Arch).
template <class Arch>
void add_outer_sum(float* s, std::int64_t ld, std::int64_t kn, std::int64_t n, const float* a, const float* b) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) s[j * ld + i] += a[i] + b[j];
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    for (std::int64_t i = 0; i < n; i += w) {
      const batch ai = batch::load_unaligned(a + i);
      for (std::int64_t j = 0; j < kn; ++j) {
        float* p = s + j * ld + i;
        (batch::load_unaligned(p) + (ai + batch(b[j]))).store_unaligned(p);
      }
    }
  }
}

// s[j * ld + i] *= t[i] (and g likewise when not null), keys j < kn, queries i < n (any n).
template <class Arch>
void scale_columns(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t n, const float* t) {
  std::int64_t i0 = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    for (; i0 + w <= n; i0 += w) {
      const batch ti = batch::load_unaligned(t + i0);
      for (std::int64_t j = 0; j < kn; ++j) {
        float* p = s + j * ld + i0;
        (batch::load_unaligned(p) * ti).store_unaligned(p);
        if (g) {
          float* q = g + j * ld + i0;
          (batch::load_unaligned(q) * ti).store_unaligned(q);
        }
      }
    }
  }
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = i0; i < n; ++i) {
      s[j * ld + i] *= t[i];
      if (g) g[j * ld + i] *= t[i];
    }
}

// s[j * ld + i] *= c (and g), queries i < n (a multiple of the SIMD width of Arch).
template <class Arch>
void scale_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t n, float c) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        s[j * ld + i] *= c;
        if (g) g[j * ld + i] *= c;
      }
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    const batch cb(c);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += w) {
        float* p = s + j * ld + i;
        (batch::load_unaligned(p) * cb).store_unaligned(p);
        if (g) {
          float* q = g + j * ld + i;
          (batch::load_unaligned(q) * cb).store_unaligned(q);
        }
      }
  }
}

// s[j * ld + i] -= behind * max(d, 0) + ahead * max(-d, 0), d = qp0 + i - (k0 + j), i < n (a
// multiple of the SIMD width of Arch); distances as floats, exact below 2^24.
template <class Arch>
void two_sided_alibi_columns(float* s, std::int64_t ld, std::int64_t kn, std::int64_t n, float behind, float ahead,
                             std::int64_t qp0, std::int64_t k0) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t d = qp0 + i - (k0 + j);
        s[j * ld + i] -= d >= 0 ? behind * static_cast<float>(d) : ahead * static_cast<float>(-d);
      }
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    alignas(Arch::alignment()) float lane[w];
    for (std::int64_t i = 0; i < w; ++i) lane[i] = static_cast<float>(i);
    const batch iota = batch::load_aligned(lane), sb(behind), sa(ahead), zero(0.0f);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += w) {
        float* p = s + j * ld + i;
        const batch d = batch(static_cast<float>(qp0 + i - (k0 + j))) + iota;
        (batch::load_unaligned(p) - (sb * xsimd::max(d, zero) + sa * xsimd::max(-d, zero))).store_unaligned(p);
      }
  }
}

// Every value of a rank-R view finite (and, with nonpositive, <= 0); returns the flat index of the
// first that is not, or -1.
template <int R>
std::int64_t first_bad(const view<const float, R>& t, bool nonpositive, bool positive) {
  std::int64_t flat = 0, bad = -1;
  auto check = [&](float x) {
    const bool ok = std::isfinite(x) && (!nonpositive || x <= 0.0f) && (!positive || x > 0.0f);
    if (!ok && bad < 0) bad = flat;
    ++flat;
  };
  if constexpr (R == 1) {
    for (std::int64_t a = 0; a < t.extent(0); ++a) check(t(a));
  } else {
    for (std::int64_t a = 0; a < t.extent(0); ++a)
      for (std::int64_t c = 0; c < t.extent(1); ++c) check(t(a, c));
  }
  return bad;
}

}  // namespace score_terms_detail

namespace mods {

// ---------------------------------------------------------------------------------------------
// Forgetting attention (FoX): s += F_qp - F_kp, causal. One batch entry's log f [Hq, Lk].

struct forgetting {
  view<const float, 2> log_f;                   // [Hq, Lk] log forget gates, <= 0
  std::shared_ptr<const std::vector<double>> F;  // [Hq * Lk] F[h, p] = sum_{l <= p} log f[h, l]

  forgetting() = default;
  explicit forgetting(view<const float, 2> log_f_) : log_f(log_f_) {
    const std::int64_t H = log_f.extent(0), L = log_f.extent(1);
    auto f = std::make_shared<std::vector<double>>(static_cast<std::size_t>(H * L));
    for (std::int64_t h = 0; h < H; ++h) {
      double acc = 0;
      for (std::int64_t p = 0; p < L; ++p) (*f)[static_cast<std::size_t>(h * L + p)] = acc += log_f(h, p);
    }
    F = std::move(f);
  }

  std::int64_t length() const { return log_f.extent(1); }
  // F at position p clamped into [0, Lk) (masked and padding pairs only ever ask outside).
  double cum(std::int64_t h, std::int64_t p) const {
    const std::int64_t L = length();
    return (*F)[static_cast<std::size_t>(h * L + std::clamp<std::int64_t>(p, 0, L - 1))];
  }

  // The causal mask (mods::causal's members).
  bool visible(std::int64_t h, std::int64_t qp, std::int64_t kp) const { return causal{}.visible(h, qp, kp); }
  tile block(std::int64_t q0, std::int64_t q1, std::int64_t k0, std::int64_t k1) const {
    return causal{}.block(q0, q1, k0, k1);
  }
  void mask_tile(float* s, std::int64_t ld, std::int64_t h, std::int64_t qp0, std::int64_t qn, std::int64_t k0,
                 std::int64_t kn) const {
    causal{}.mask_tile(s, ld, h, qp0, qn, k0, kn);
  }

  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    return s + static_cast<S>(cum(h, qp) - cum(h, kp));
  }
  template <class S>
  S score_derivative(S, std::int64_t, std::int64_t, std::int64_t) const {
    return S(1);
  }
  template <class Arch>
  void score_tile(float* s, float*, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t h,
                  std::int64_t qp0, std::int64_t k0) const {
    constexpr std::int64_t chunk = score_terms_detail::query_chunk;
    const double anchor = cum(h, qp0);
    float a[chunk];
    float b[chunk];
    for (std::int64_t j0 = 0; j0 < kn; j0 += chunk) {
      const std::int64_t jn = std::min(chunk, kn - j0);
      for (std::int64_t j = 0; j < jn; ++j) b[j] = static_cast<float>(anchor - cum(h, k0 + j0 + j));
      for (std::int64_t i0 = 0; i0 < nq; i0 += chunk) {
        const std::int64_t in = std::min(chunk, nq - i0);
        for (std::int64_t i = 0; i < in; ++i) a[i] = static_cast<float>(cum(h, qp0 + i0 + i) - anchor);
        score_terms_detail::add_outer_sum<Arch>(s + j0 * ld + i0, ld, jn, in, a, b);
      }
    }
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t, std::int64_t Lk) const {
    mnemo::detail::require(!log_f.empty() && F != nullptr, fn,
                    ": forgetting.log_f must be a [Hq, Lk] view given to the constructor, got an empty one");
    mnemo::detail::require(log_f.extent(0) == Hq && log_f.extent(1) == Lk, fn, ": forgetting.log_f must have shape [Hq, Lk] = [",
                    Hq, ", ", Lk, "], got [", log_f.extent(0), ", ", log_f.extent(1), "]");
    const std::int64_t bad = score_terms_detail::first_bad(log_f, true, false);
    mnemo::detail::require(bad < 0, fn, ": forgetting.log_f must be finite and <= 0 (log of a gate in (0, 1]), got ",
                    bad < 0 ? 0.0f : log_f(bad / Lk, bad % Lk), " at [", bad / std::max<std::int64_t>(Lk, 1), ", ",
                    bad % std::max<std::int64_t>(Lk, 1), "]");
  }
};

// ---------------------------------------------------------------------------------------------
// Temperatures: s *= t.

// Per query: t [Hq, Lq] (one batch entry), row i = qp - offset; offset = Lk - Lq (0 for
// self-attention, Lk - 1 for one decode step), checked against the call.
struct query_temperature {
  view<const float, 2> t;   // [Hq, Lq]
  std::int64_t offset = 0;  // Lk - Lq of the calls this mod is for

  float at(std::int64_t h, std::int64_t qp) const {
    return t(h, std::clamp<std::int64_t>(qp - offset, 0, t.extent(1) - 1));
  }
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t) const {
    return s * static_cast<S>(at(h, qp));
  }
  template <class S>
  S score_derivative(S, std::int64_t h, std::int64_t qp, std::int64_t) const {
    return static_cast<S>(at(h, qp));
  }
  // Real queries only (i < qn): their temperatures are contiguous in t's row h.
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t, std::int64_t h,
                  std::int64_t qp0, std::int64_t) const {
    score_terms_detail::scale_columns<Arch>(s, g, ld, kn, qn, t.ptr(h, qp0 - offset));
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    mnemo::detail::require(!t.empty() && t.extent(0) == Hq && t.extent(1) == Lq, fn,
                    ": query_temperature.t must have shape [Hq, Lq] = [", Hq, ", ", Lq, "], got [", t.extent(0), ", ",
                    t.extent(1), "]");
    mnemo::detail::require(offset == Lk - Lq, fn, ": query_temperature.offset must be Lk - Lq = ", Lk - Lq, ", got ", offset);
    const std::int64_t bad = score_terms_detail::first_bad(t, false, true);
    mnemo::detail::require(bad < 0, fn, ": query_temperature.t must be finite and > 0, got ",
                    bad < 0 ? 0.0f : t(bad / Lq, bad % Lq), " at [", bad / std::max<std::int64_t>(Lq, 1), ", ",
                    bad % std::max<std::int64_t>(Lq, 1), "]");
  }
};

// Per head: t [Hq].
struct head_temperature {
  view<const float, 1> t;  // [Hq]

  template <class S>
  S score(S s, std::int64_t h, std::int64_t, std::int64_t) const {
    return s * static_cast<S>(t(h));
  }
  template <class S>
  S score_derivative(S, std::int64_t h, std::int64_t, std::int64_t) const {
    return static_cast<S>(t(h));
  }
  template <class Arch>
  void score_tile(float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t h,
                  std::int64_t, std::int64_t) const {
    score_terms_detail::scale_tile<Arch>(s, g, ld, kn, nq, t(h));
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t, std::int64_t) const {
    mnemo::detail::require(!t.empty() && t.extent(0) == Hq, fn, ": head_temperature.t must have shape [Hq] = [", Hq,
                    "], got [", t.extent(0), "]");
    const std::int64_t bad = score_terms_detail::first_bad(t, false, true);
    mnemo::detail::require(bad < 0, fn, ": head_temperature.t must be finite and > 0, got ", bad < 0 ? 0.0f : t(bad),
                    " at [", bad, "]");
  }
};

// ---------------------------------------------------------------------------------------------
// Two-sided (non-causal) ALiBi: s -= slopes[h] (qp - kp) behind the query, ahead[h] (kp - qp)
// ahead of it; ahead empty: the symmetric slopes[h] |qp - kp| (= mods::alibi).

struct alibi_two_sided {
  view<const float, 1> slopes;  // [Hq] keys at or behind the query
  view<const float, 1> ahead;   // [Hq] keys ahead of the query, or empty: slopes

  float ahead_of(std::int64_t h) const { return ahead.empty() ? slopes(h) : ahead(h); }
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    return qp >= kp ? s - static_cast<S>(slopes(h)) * static_cast<S>(qp - kp)
                    : s - static_cast<S>(ahead_of(h)) * static_cast<S>(kp - qp);
  }
  template <class S>
  S score_derivative(S, std::int64_t, std::int64_t, std::int64_t) const {
    return S(1);
  }
  template <class Arch>
  void score_tile(float* s, float*, std::int64_t ld, std::int64_t kn, std::int64_t, std::int64_t nq, std::int64_t h,
                  std::int64_t qp0, std::int64_t k0) const {
    score_terms_detail::two_sided_alibi_columns<Arch>(s, ld, kn, nq, slopes(h), ahead_of(h), qp0, k0);
  }
  void validate(const char* fn, std::int64_t Hq, std::int64_t, std::int64_t) const {
    mnemo::detail::require(!slopes.empty() && slopes.extent(0) == Hq, fn, ": alibi_two_sided.slopes must have shape [Hq] = [",
                    Hq, "], got [", slopes.extent(0), "]");
    mnemo::detail::require(ahead.empty() || ahead.extent(0) == Hq, fn,
                    ": alibi_two_sided.ahead must be empty or have shape [Hq] = [", Hq, "], got [", ahead.extent(0),
                    "]");
    std::int64_t bad = score_terms_detail::first_bad(slopes, false, false);
    mnemo::detail::require(bad < 0, fn, ": alibi_two_sided.slopes must be finite, got ", bad < 0 ? 0.0f : slopes(bad), " at [",
                    bad, "]");
    if (!ahead.empty()) bad = score_terms_detail::first_bad(ahead, false, false);
    mnemo::detail::require(bad < 0, fn, ": alibi_two_sided.ahead must be finite, got ", bad < 0 ? 0.0f : ahead(bad), " at [",
                    bad, "]");
  }
};

// ---------------------------------------------------------------------------------------------
// Relative position terms (Shaw et al.; Transformer-XL): s = scale (q_i.k_j + q_i.r_d + u.k_j +
// v.r_d), d = qp - kp clamped to [min_distance, min_distance + N - 1]. One batch entry's q and k.

class relative_position {
 public:
  relative_position() = default;
  // q [Hq, Lq, D], k [Hkv, Lk, D] (the batch entry's), r [Hr, N, D] with Hr = 1 or Hq, u and v
  // [Hq, D] or empty, scale the call's (0: 1 / sqrt(D)). Makes the u.k_j and v.r_d tables.
  relative_position(view<const float, 3> q, view<const float, 3> k, view<const float, 3> r, view<const float, 2> u,
                    view<const float, 2> v, std::int64_t min_distance, float scale = 0)
      : q_(q), k_(k), r_(r), u_(u), v_(v), min_distance_(min_distance) {
    const std::int64_t D = q.extent(2);
    scale_ = scale != 0 ? scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max<std::int64_t>(D, 1))));
    offset_ = k.extent(1) - q.extent(1);
    // Tables only when the shapes fit (validate reports them otherwise, at the call).
    if (!shapes_ok()) return;
    const std::int64_t Hq = q.extent(0), Lk = k.extent(1), N = r.extent(1), G = Hq / k.extent(0);
    auto t = std::make_shared<tables>();
    t->uk.assign(static_cast<std::size_t>(Hq * Lk), 0.0f);
    t->vr.assign(static_cast<std::size_t>(Hq * N), 0.0f);
    for (std::int64_t h = 0; h < Hq; ++h) {
      if (!u.empty())
        for (std::int64_t j = 0; j < Lk; ++j)
          t->uk[static_cast<std::size_t>(h * Lk + j)] = static_cast<float>(scale_ * dot(u.ptr(h, 0), k.ptr(h / G, j), D));
      if (!v.empty())
        for (std::int64_t n = 0; n < N; ++n)
          t->vr[static_cast<std::size_t>(h * N + n)] = static_cast<float>(scale_ * dot(v.ptr(h, 0), r_row(h, n), D));
    }
    tables_ = std::move(t);
  }

  std::int64_t min_distance() const { return min_distance_; }
  std::int64_t distances() const { return r_.extent(1); }
  float scale() const { return scale_; }

  // The table row of distance qp - kp (clamped to the table's ends).
  std::int64_t row_of(std::int64_t qp, std::int64_t kp) const {
    return std::clamp<std::int64_t>(qp - kp - min_distance_, 0, distances() - 1);
  }

  // double: every term from the inputs in double (the reference); float: the tables and an f32 dot.
  template <class S>
  S score(S s, std::int64_t h, std::int64_t qp, std::int64_t kp) const {
    const std::int64_t D = q_.extent(2), i = std::clamp<std::int64_t>(qp - offset_, 0, q_.extent(1) - 1);
    const std::int64_t n = row_of(qp, kp), kc = std::clamp<std::int64_t>(kp, 0, k_.extent(1) - 1);
    const float* rn = r_row(h, n);
    if constexpr (std::is_same_v<S, double>) {
      double extra = dot(q_.ptr(h, i, 0), rn, D);
      if (!u_.empty()) extra += dot(u_.ptr(h, 0), k_.ptr(h / group(), kc, 0), D);
      if (!v_.empty()) extra += dot(v_.ptr(h, 0), rn, D);
      return s + static_cast<double>(scale_) * extra;
    } else {
      const float* qi = q_.ptr(h, i, 0);
      float qr = 0;
      for (std::int64_t c = 0; c < D; ++c) qr += qi[c] * rn[c];
      return s + scale_ * qr + uk(h, kc) + vr(h, n);
    }
  }

  template <class Arch>
  void score_tile(float* s, float*, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq, std::int64_t h,
                  std::int64_t qp0, std::int64_t k0) const {
    const std::int64_t D = q_.extent(2), i0 = qp0 - offset_;
    // Rows [lo, hi] of the table cover every pair of the tile (distances fall as the key grows).
    const std::int64_t lo = row_of(qp0, k0 + kn - 1), hi = row_of(qp0 + qn - 1, k0), nb = hi - lo + 1;
    thread_local std::vector<float> scratch;
    const std::size_t need = static_cast<std::size_t>((D + nb) * nq);
    if (scratch.size() < need) scratch.resize(need);
    float* qt = scratch.data();         // [D, nq]  scale * q^T of the tile's queries, zero padded
    float* band = qt + D * nq;          // [nb, nq] scale * q_i . r_(lo + n) + scale * v . r_(lo + n)
    tiles::pack_transposed(q_.ptr(h, i0, 0), q_.stride(1), qn, nq, D, scale_, qt, nq);
    const float* r0 = r_row(h, lo);
    simd::gemm<simd::a_order::row_major, Arch>(nb, nq, D, r0, r_.stride(1), qt, nq, band, nq, simd::c_mode::overwrite);
    for (std::int64_t n = 0; n < nb; ++n) {
      const float add = vr(h, lo + n);
      float* row = band + n * nq;
      for (std::int64_t i = 0; i < qn; ++i) row[i] += add;
    }
    // s[j, i] += band[row_of(qp0 + i, k0 + j) - lo, i] + u.k_j: the row rises by one per query
    // inside the table and stays at an end outside it.
    const std::int64_t last = distances() - 1;
    for (std::int64_t j = 0; j < kn; ++j) {
      float* sj = s + j * ld;
      const float ukj = uk(h, k0 + j);
      const std::int64_t base = qp0 - (k0 + j) - min_distance_;  // raw row of query 0
      for (std::int64_t i = 0; i < qn; ++i) {
        const std::int64_t n = std::clamp<std::int64_t>(base + i, 0, last) - lo;
        sj[i] += band[n * nq + i] + ukj;
      }
    }
  }

  void validate(const char* fn, std::int64_t Hq, std::int64_t Lq, std::int64_t Lk) const {
    using mnemo::detail::require;
    require(!q_.empty() && !k_.empty() && !r_.empty(), fn,
            ": relative_position needs q [Hq, Lq, D], k [Hkv, Lk, D] and r [Hr, N, D] (constructor), got an empty view");
    const std::int64_t D = q_.extent(2);
    require(q_.extent(0) == Hq && q_.extent(1) == Lq, fn, ": relative_position.q must have shape [Hq, Lq, D] = [", Hq,
            ", ", Lq, ", D], got [", q_.extent(0), ", ", q_.extent(1), ", ", D, "]");
    require(k_.extent(0) >= 1 && Hq % k_.extent(0) == 0 && k_.extent(1) == Lk && k_.extent(2) == D, fn,
            ": relative_position.k must have shape [Hkv, Lk, D] = [Hkv, ", Lk, ", ", D, "] with Hq = ", Hq,
            " a multiple of Hkv, got [", k_.extent(0), ", ", k_.extent(1), ", ", k_.extent(2), "]");
    require((r_.extent(0) == 1 || r_.extent(0) == Hq) && r_.extent(1) >= 1 && r_.extent(2) == D, fn,
            ": relative_position.r must have shape [1 or Hq = ", Hq, ", N >= 1, D = ", D, "], got [", r_.extent(0),
            ", ", r_.extent(1), ", ", r_.extent(2), "]");
    require(u_.empty() || (u_.extent(0) == Hq && u_.extent(1) == D), fn,
            ": relative_position.u must be empty or have shape [Hq, D] = [", Hq, ", ", D, "], got [", u_.extent(0),
            ", ", u_.extent(1), "]");
    require(v_.empty() || (v_.extent(0) == Hq && v_.extent(1) == D), fn,
            ": relative_position.v must be empty or have shape [Hq, D] = [", Hq, ", ", D, "], got [", v_.extent(0),
            ", ", v_.extent(1), "]");
    require(std::isfinite(scale_), fn, ": relative_position.scale must be finite, got ", scale_);
  }

 private:
  struct tables {
    std::vector<float> uk;  // [Hq, Lk] scale * u_h . k_j
    std::vector<float> vr;  // [Hq, N]  scale * v_h . r_n
  };

  template <class B>
  static double dot(const float* a, const B* b, std::int64_t n) {
    double acc = 0;
    for (std::int64_t c = 0; c < n; ++c) acc += static_cast<double>(a[c]) * static_cast<double>(b[c]);
    return acc;
  }
  bool shapes_ok() const {
    const std::int64_t Hq = q_.extent(0), D = q_.extent(2);
    return !q_.empty() && !k_.empty() && !r_.empty() && k_.extent(0) >= 1 && Hq % k_.extent(0) == 0 &&
           k_.extent(2) == D && (r_.extent(0) == 1 || r_.extent(0) == Hq) && r_.extent(1) >= 1 && r_.extent(2) == D &&
           (u_.empty() || (u_.extent(0) == Hq && u_.extent(1) == D)) &&
           (v_.empty() || (v_.extent(0) == Hq && v_.extent(1) == D));
  }
  std::int64_t group() const { return q_.extent(0) / k_.extent(0); }
  const float* r_row(std::int64_t h, std::int64_t n) const { return r_.ptr(r_.extent(0) == 1 ? 0 : h, n, 0); }
  float uk(std::int64_t h, std::int64_t j) const {
    return tables_ ? tables_->uk[static_cast<std::size_t>(h * k_.extent(1) + j)] : 0.0f;
  }
  float vr(std::int64_t h, std::int64_t n) const {
    return tables_ ? tables_->vr[static_cast<std::size_t>(h * r_.extent(1) + n)] : 0.0f;
  }

  view<const float, 3> q_, k_, r_;
  view<const float, 2> u_, v_;
  std::int64_t min_distance_ = 0, offset_ = 0;
  float scale_ = 0;
  std::shared_ptr<const tables> tables_;
};

}  // namespace mods

// ---------------------------------------------------------------------------------------------
// Batches: one mod per batch entry.

namespace score_terms_detail {

template <class T, int R>
view<T, R> entry(const view<T, R>& x, std::int64_t b) {
  return x.empty() ? x : x.narrow(0, b, 1);
}

inline void require_batch(const char* fn, const char* name, std::int64_t got, std::int64_t B) {
  mnemo::detail::require(got == B, fn, ": ", name, ".shape[0] must be the batch size B = ", B, " (from q), got ", got);
}

}  // namespace score_terms_detail

// attention::attend (attention.hpp: path chooses reference, flash or decode) on every batch entry
// b with the mod make_mod(b), for mods whose tensors differ per sequence.
template <class KV, class MakeMod>
void attend_per_batch(view<const float, 4> q,  // [B, Hq, Lq, D]
                      view<const KV, 4> k,     // [B, Hkv, Lk, D]
                      view<const KV, 4> v,     // [B, Hkv, Lk, Dv]
                      view<float, 4> out,      // [B, Hq, Lq, Dv]
                      view<float, 3> lse,      // [B, Hq, Lq] or empty
                      MakeMod&& make_mod, const options& opt = {}, path p = path::automatic) {
  constexpr const char* fn = "attention::attend_per_batch";
  using score_terms_detail::entry;
  const std::int64_t B = q.extent(0);
  score_terms_detail::require_batch(fn, "k", k.extent(0), B);
  score_terms_detail::require_batch(fn, "v", v.extent(0), B);
  score_terms_detail::require_batch(fn, "out", out.extent(0), B);
  if (!lse.empty()) score_terms_detail::require_batch(fn, "lse", lse.extent(0), B);
  for (std::int64_t b = 0; b < B; ++b)
    attend<KV>(entry(q, b), entry(k, b), entry(v, b), entry(out, b), entry(lse, b), make_mod(b), opt, p);
}

// FoX forward over a batch: log_f [B, Hq, Lk].
template <class KV>
void forgetting_attention(view<const float, 4> q,      // [B, Hq, Lq, D]
                          view<const KV, 4> k,         // [B, Hkv, Lk, D]
                          view<const KV, 4> v,         // [B, Hkv, Lk, Dv]
                          view<const float, 3> log_f,  // [B, Hq, Lk] log forget gates, <= 0
                          view<float, 4> out,          // [B, Hq, Lq, Dv]
                          view<float, 3> lse = {},     // [B, Hq, Lq] or empty
                          const options& opt = {}, path p = path::automatic) {
  mnemo::detail::require(!log_f.empty() || q.extent(0) == 0, "attention::forgetting_attention",
                         ": log_f must be a [B, Hq, Lk] view, got an empty one");
  score_terms_detail::require_batch("attention::forgetting_attention", "log_f", log_f.extent(0), q.extent(0));
  attend_per_batch<KV>(q, k, v, out, lse, [&](std::int64_t b) { return mods::forgetting(log_f[b]); }, opt, p);
}

// Relative position attention over a batch (q and k per entry; r, u, v shared), with an extra
// mask mod (mods::causal{} for Transformer-XL, mods::none{} for Shaw's encoder).
template <class Mask = mods::none>
void relative_position_attention(view<const float, 4> q,  // [B, Hq, Lq, D]
                                 view<const float, 4> k,  // [B, Hkv, Lk, D]
                                 view<const float, 4> v,  // [B, Hkv, Lk, Dv]
                                 view<const float, 3> r,  // [Hr, N, D], Hr = 1 or Hq
                                 view<const float, 2> u,  // [Hq, D] or empty
                                 view<const float, 2> v_bias,  // [Hq, D] or empty
                                 std::int64_t min_distance,    // distance qp - kp of r's row 0
                                 view<float, 4> out,           // [B, Hq, Lq, Dv]
                                 view<float, 3> lse = {},      // [B, Hq, Lq] or empty
                                 const Mask& mask = {}, const options& opt = {}, path p = path::automatic) {
  score_terms_detail::require_batch("attention::relative_position_attention", "k", k.extent(0), q.extent(0));
  attend_per_batch<float>(
      q, k, v, out, lse,
      [&](std::int64_t b) {
        return mods::all_of(mods::relative_position(q[b], k[b], r, u, v_bias, min_distance, opt.scale), mask);
      },
      opt, p);
}

// ---------------------------------------------------------------------------------------------
// FoX backward.

// The chain rule in double: dq, dk, dv (dk, dv summed over each GQA group) and d log f of
// sum(out * dout) for out = forgetting attention (lse not differentiated), with options.sinks.
inline void reference_forgetting_backward(view<const float, 4> q,      // [B, Hq, Lq, D]
                                          view<const float, 4> k,      // [B, Hkv, Lk, D]
                                          view<const float, 4> v,      // [B, Hkv, Lk, Dv]
                                          view<const float, 3> log_f,  // [B, Hq, Lk]
                                          view<const float, 4> dout,   // [B, Hq, Lq, Dv]
                                view<float, 4> dq,           // [B, Hq, Lq, D]
                                view<float, 4> dk,           // [B, Hkv, Lk, D]
                                view<float, 4> dv,           // [B, Hkv, Lk, Dv]
                                view<float, 3> dlog_f,       // [B, Hq, Lk]
                                const options& opt = {}) {
  constexpr const char* fn = "attention::reference_forgetting_backward";
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  const std::int64_t B = q.extent(0), Hq = q.extent(1), Lq = q.extent(2), D = q.extent(3);
  const std::int64_t Hkv = k.extent(1), Lk = k.extent(2), Dv = v.extent(3);
  mnemo::detail::require(!log_f.empty(), fn, ": log_f must be a [B, Hq, Lk] view, got an empty one");
  score_terms_detail::require_batch(fn, "log_f", log_f.extent(0), B);
  // shapes as the forward checks them (dout stands in for out), the gate of every batch entry
  const dims dd = detail::check_args(fn, q, k, v, dout, view<float, 3>{}, mods::none{}, opt);
  for (std::int64_t b = 0; b < B; ++b) mods::validate(mods::forgetting(log_f[b]), fn, Hq, Lq, Lk);
  flash_backward_detail::check_grads(fn, dd, dout, dq, dk, dv);
  mnemo::detail::require_shape(fn, "dlog_f", dlog_f, {B, Hq, Lk}, " [B, Hq, Lk]");
  const double scale = opt.scale != 0 ? opt.scale : 1.0 / std::sqrt(static_cast<double>(D));
  const std::int64_t G = Hq / Hkv, off = Lk - Lq;
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t hk = 0; hk < Hkv; ++hk) {
      std::vector<double> dk_acc(static_cast<std::size_t>(Lk * D), 0.0), dv_acc(static_cast<std::size_t>(Lk * Dv), 0.0);
      for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        std::vector<double> F(static_cast<std::size_t>(Lk)), dF(static_cast<std::size_t>(Lk), 0.0);
        double acc = 0;
        for (std::int64_t p = 0; p < Lk; ++p) F[static_cast<std::size_t>(p)] = acc += log_f(b, h, p);
        const double sink = sink_of(opt, h);
        std::vector<double> s(static_cast<std::size_t>(Lk)), pr(static_cast<std::size_t>(Lk)),
            dp(static_cast<std::size_t>(Lk));
        for (std::int64_t i = 0; i < Lq; ++i) {
          const std::int64_t qp = i + off;
          double m = neg_inf;
          for (std::int64_t j = 0; j < Lk; ++j) {
            s[j] = neg_inf;
            if (j > qp) continue;
            double dot = 0;
            for (std::int64_t c = 0; c < D; ++c) dot += static_cast<double>(q(b, h, i, c)) * k(b, hk, j, c);
            s[j] = scale * dot + F[static_cast<std::size_t>(qp)] - F[static_cast<std::size_t>(j)];
            m = std::max(m, s[j]);
          }
          if (m == neg_inf) {
            for (std::int64_t c = 0; c < D; ++c) dq(b, h, i, c) = 0.0f;
            continue;
          }
          m = std::max(m, sink);
          double sum = std::exp(sink - m);
          for (std::int64_t j = 0; j < Lk; ++j) sum += pr[j] = s[j] == neg_inf ? 0.0 : std::exp(s[j] - m);
          double delta = 0;
          for (std::int64_t j = 0; j < Lk; ++j) {
            pr[j] /= sum;
            dp[j] = 0;
            for (std::int64_t c = 0; c < Dv && pr[j] != 0; ++c) dp[j] += static_cast<double>(dout(b, h, i, c)) * v(b, hk, j, c);
            delta += pr[j] * dp[j];
          }
          std::vector<double> dq_row(static_cast<std::size_t>(D), 0.0);
          for (std::int64_t j = 0; j < Lk; ++j) {
            if (pr[j] == 0) continue;
            const double ds = pr[j] * (dp[j] - delta);  // d loss / d s_ij
            dF[static_cast<std::size_t>(qp)] += ds;
            dF[static_cast<std::size_t>(j)] -= ds;
            for (std::int64_t c = 0; c < D; ++c) {
              dq_row[c] += scale * ds * k(b, hk, j, c);
              dk_acc[j * D + c] += scale * ds * q(b, h, i, c);
            }
            for (std::int64_t c = 0; c < Dv; ++c) dv_acc[j * Dv + c] += pr[j] * dout(b, h, i, c);
          }
          for (std::int64_t c = 0; c < D; ++c) dq(b, h, i, c) = static_cast<float>(dq_row[c]);
        }
        double rev = 0;  // d log f_l = sum_{p >= l} dF_p
        for (std::int64_t l = Lk - 1; l >= 0; --l) dlog_f(b, h, l) = static_cast<float>(rev += dF[l]);
      }
      for (std::int64_t j = 0; j < Lk; ++j) {
        for (std::int64_t c = 0; c < D; ++c) dk(b, hk, j, c) = static_cast<float>(dk_acc[j * D + c]);
        for (std::int64_t c = 0; c < Dv; ++c) dv(b, hk, j, c) = static_cast<float>(dv_acc[j * Dv + c]);
      }
    }
}

// FoX backward on flash_backward (see the header): dq, dk, dv (summed over each GQA group), d log f,
// and the sinks' gradient when wanted, from the forward's out and lse (forgetting_attention).
inline void forgetting_backward(view<const float, 4> q,      // [B, Hq, Lq, D]
                                view<const float, 4> k,      // [B, Hkv, Lk, D]
                                view<const float, 4> v,      // [B, Hkv, Lk, Dv]
                                view<const float, 3> log_f,  // [B, Hq, Lk]
                                view<const float, 4> out,    // [B, Hq, Lq, Dv]  the forward's
                                view<const float, 3> lse,    // [B, Hq, Lq]      the forward's
                                view<const float, 4> dout,   // [B, Hq, Lq, Dv]
                                view<float, 4> dq,           // [B, Hq, Lq, D]
                                view<float, 4> dk,           // [B, Hkv, Lk, D]
                                view<float, 4> dv,           // [B, Hkv, Lk, Dv]
                                view<float, 3> dlog_f,       // [B, Hq, Lk]
                                const options& opt = {},
                                view<float, 1> dsinks = {}) {  // [Hq] or empty
  constexpr const char* fn = "attention::forgetting_backward";
  const std::int64_t B = q.extent(0), Hq = q.extent(1), Lq = q.extent(2), D = q.extent(3);
  const std::int64_t Hkv = k.extent(1), Lk = k.extent(2), Dv = v.extent(3);
  mnemo::detail::require(!log_f.empty(), fn, ": log_f must be a [B, Hq, Lk] view, got an empty one");
  score_terms_detail::require_batch(fn, "log_f", log_f.extent(0), B);
  mnemo::detail::require(!lse.empty(), fn, ": lse must be the forward's lse [B, Hq, Lq], got an empty view");
  const dims d = detail::check_args(fn, q, k, v, out, view<float, 3>{}, mods::none{}, opt);
  mnemo::detail::require_shape(fn, "lse", lse, {B, Hq, Lq}, " [B, Hq, Lq]");
  flash_backward_detail::check_grads(fn, d, dout, dq, dk, dv);
  flash_backward_detail::check_dsinks(fn, d, opt, dsinks);
  mnemo::detail::require_shape(fn, "dlog_f", dlog_f, {B, Hq, Lk}, " [B, Hq, Lk]");
  for (std::int64_t b = 0; b < B; ++b) mods::validate(mods::forgetting(log_f[b]), fn, Hq, Lq, Lk);
  if (B == 0) return;
  const std::int64_t G = Hq / Hkv, Da = D + 1, off = Lk - Lq;
  // Per batch entry: q with a channel 1 / scale, k per query head with a channel 0, v per query head.
  tensor<float, 4> qa({1, Hq, Lq, Da}), ka({1, Hq, Lk, Da}), ve({1, G > 1 ? Hq : 0, Lk, Dv});
  tensor<float, 4> dqa({1, Hq, Lq, Da}), dka({1, Hq, Lk, Da}), dve({1, G > 1 ? Hq : 0, Lk, Dv});
  tensor<float, 1> ds({dsinks.empty() ? 0 : Hq});
  options o = opt;
  o.scale = d.scale;  // the head dim grows by one; the scale stays the call's
  if (!dsinks.empty())
    for (std::int64_t h = 0; h < Hq; ++h) dsinks(h) = 0.0f;
  for (std::int64_t b = 0; b < B; ++b) {
    const mods::forgetting mod(log_f[b]);
    parallel_for(
        Hq,
        [&](std::int64_t h) {
          for (std::int64_t i = 0; i < Lq; ++i) {
            std::copy_n(q.ptr(b, h, i), D, qa.data() + (h * Lq + i) * Da);
            qa.data()[(h * Lq + i) * Da + D] = 1.0f / d.scale;
          }
          for (std::int64_t j = 0; j < Lk; ++j) {
            std::copy_n(k.ptr(b, h / G, j), D, ka.data() + (h * Lk + j) * Da);
            ka.data()[(h * Lk + j) * Da + D] = 0.0f;
            if (G > 1) std::copy_n(v.ptr(b, h / G, j), Dv, ve.data() + (h * Lk + j) * Dv);
          }
        },
        opt.threads);
    const view<const float, 4> vb = G > 1 ? cview(ve) : v.narrow(0, b, 1);
    const view<float, 4> dvb = G > 1 ? dve.as_view() : dv.narrow(0, b, 1);
    flash_backward(cview(qa), cview(ka), vb, out.narrow(0, b, 1), lse.narrow(0, b, 1), dout.narrow(0, b, 1),
                   dqa.as_view(), dka.as_view(), dvb, mod, o, dsinks.empty() ? view<float, 1>{} : ds.as_view());
    if (!dsinks.empty())
      for (std::int64_t h = 0; h < Hq; ++h) dsinks(h) += ds(h);
    parallel_for(
        Hq,
        [&](std::int64_t h) {
          for (std::int64_t i = 0; i < Lq; ++i) std::copy_n(dqa.data() + (h * Lq + i) * Da, D, dq.ptr(b, h, i));
          // dF_p = (row sum of dS at query p) - (column sum of dS at key p); d log f: reverse cumsum.
          const float sink = sink_of(opt, h);
          double rev = 0;
          for (std::int64_t p = Lk - 1; p >= 0; --p) {
            double dF = -static_cast<double>(dka.data()[(h * Lk + p) * Da + D]);
            const std::int64_t i = p - off;
            if (i >= 0 && i < Lq && sink != -std::numeric_limits<float>::infinity() &&
                lse(b, h, i) != -std::numeric_limits<float>::infinity()) {
              double od = 0;
              for (std::int64_t c = 0; c < Dv; ++c) od += static_cast<double>(dout(b, h, i, c)) * out(b, h, i, c);
              dF += std::exp(static_cast<double>(sink) - lse(b, h, i)) * od;
            }
            dlog_f(b, h, p) = static_cast<float>(rev += dF);
          }
        },
        opt.threads);
    // dk (and dv) summed over each group's query heads, in head order.
    parallel_for(
        Hkv,
        [&](std::int64_t hk) {
          for (std::int64_t j = 0; j < Lk; ++j) {
            float* dkj = dk.ptr(b, hk, j);
            std::fill_n(dkj, D, 0.0f);
            for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h)
              for (std::int64_t c = 0; c < D; ++c) dkj[c] += dka.data()[(h * Lk + j) * Da + c];
            if (G == 1) continue;
            float* dvj = dv.ptr(b, hk, j);
            std::fill_n(dvj, Dv, 0.0f);
            for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h)
              for (std::int64_t c = 0; c < Dv; ++c) dvj[c] += dve.data()[(h * Lk + j) * Dv + c];
          }
        },
        opt.threads);
  }
}

}  // namespace mnemo::attention

// mnemo/simd/gemm.hpp — small GEMM micro-kernels and column-wise softmax steps for attention
// tiles (the building blocks of attention/flash.hpp).
//
//   gemm:  C[m x n] = A[m x kc] B[kc x n]                      (c_mode::overwrite)
//          C[m x n] += A B                                     (c_mode::accumulate)
//          C[m x n] = diag(alpha) C + A B                      (c_mode::rescale, FlashAttention-2's
//                                                               once-per-tile accumulator rescale)
//   A is read one element at a time (broadcast), in either order:
//          a_order::row_major  A(i, k) = a[i * lda + k]        (K rows, dS^T, P^T stored key-major)
//          a_order::col_major  A(i, k) = a[k * lda + i]        (P or dS stored key-major, read per query)
//   B rows are contiguous: B(k, j) = b[k * ldb + j]; C(i, j) = c[i * ldc + j].
//   n must be a multiple of width<Arch> (callers pad their buffers); nothing outside
//   A[0..m) x [0..kc), B[0..kc) x [0..n) and C[0..m) x [0..n) is read or written.
//
// The micro-kernel keeps an MR x (NV * width) block of C in registers and, for every k, loads NV
// vectors of B's row k and broadcasts MR elements of A's column k into MR * NV fused
// multiply-adds (the register blocking of Goto & van de Geijn, "Anatomy of high-performance
// matrix multiplication", TOMS 2008). B is used where it lies: attention tiles pack it once per
// tile (K^T is never formed: scores are computed key-major, S^T = K Q^T, with Q^T packed once
// per query tile), so the kernel needs no packing of its own.
//
// Column-wise softmax. Attention score tiles are stored key-major, s[j * lds + i] for key j and
// query i, so every softmax statistic of a query (running max m_i, running sum l_i, the rescale
// factor alpha_i) is one lane of a vector and the whole online-softmax step is vertical: no
// horizontal reductions, no per-row calls.
//
//   online_softmax_columns:  m'_i = max(m_i, max_j s_ji);  p_ji = exp(s_ji - m'_i);
//                            alpha_i = exp(m_i - m'_i);    l_i = alpha_i l_i + sum_j p_ji
//   probs_from_lse_columns:  p_ji = exp(s_ji - lse_i)                      (backward recompute)
//   softmax_grad_columns:    ds_ji = scale * p_ji * (dp_ji - delta_i) [* g_ji]   (FA2 backward)
//   softcap_columns:         s_ji = c tanh(s_ji / c)        [g_ji *= 1 - tanh^2(s_ji / c)]
//   alibi_columns:           s_ji -= slope |qp0 + i - (k0 + j)|
//
// tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2|x|) from simd/math.hpp: e in (0, 1], so
// nothing overflows, and the absolute error stays within a few float ulps of 1 (a relative
// error ~1e-7 / |x| for tiny |x|, i.e. an absolute score error of a few ulps of c, which is
// what a softmax is sensitive to).
//
// Subnormals: p = exp(x) for x < ln(FLT_MIN) ~ -87.3 would be subnormal. Such a p is flushed to
// 0: it is below 2^-126 times the row's largest p (which is 1), so it changes no float32 sum,
// and left in place it costs a microcode assist in every FMA that reads it (measured: flash with
// ALiBi and no causal mask, where far keys score -100 or less, took 67.6 ms instead of 27.6 ms
// at H = 2, L = 2048, D = 128 on one core). The rescale factor alpha is flushed the same way.
//
// -inf: a masked score is -inf and gives p = 0. A column whose running max is still -inf (it has
// seen no visible key) shifts by 0 instead, so p = exp(-inf) = 0, alpha = 0 and l = 0 stay
// NaN-free; lse_i = -inf likewise gives p = 0.
//
// Numerics: f32 everywhere, fused multiply-add where the ISA has one (simd::detail::fmadd: xsimd
// 8.1 has no AVX-512 fma kernel). MNEMO_NO_SIMD builds run the readable loops in
// `simd::reference` instead, which are also what the tests compare against.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/isa_traits.hpp"
#include "mnemo/simd/math.hpp"

namespace mnemo::simd {

enum class a_order { row_major, col_major };

// min_normal_exp_arg (math.hpp): below it p is flushed to 0.
enum class c_mode { overwrite, accumulate, rescale };

// Register blocking of the micro-kernel for one architecture: MR rows of C times NV vectors
// (isa_traits.hpp says why each family gets its sizes).
template <class Arch = default_arch>
struct gemm_blocking {
  static constexpr int mr = isa_traits<Arch>::gemm_mr;
  static constexpr int nv = isa_traits<Arch>::gemm_nv;
  static_assert(mr >= 1 && nv >= 1, "gemm_blocking: the micro-kernel needs at least one row and one vector");
};

namespace reference {

// The plain triple loop: the scalar fallback and what the tests hold the micro-kernels to.
template <a_order AO>
void gemm(std::int64_t m, std::int64_t n, std::int64_t kc, const float* a, std::int64_t lda, const float* b,
          std::int64_t ldb, float* c, std::int64_t ldc, c_mode mode, const float* alpha = nullptr) {
  for (std::int64_t i = 0; i < m; ++i) {
    float* ci = c + i * ldc;
    for (std::int64_t j = 0; j < n; ++j) {
      float acc = mode == c_mode::overwrite ? 0.0f : mode == c_mode::accumulate ? ci[j] : alpha[i] * ci[j];
      for (std::int64_t k = 0; k < kc; ++k) {
        const float aik = AO == a_order::row_major ? a[i * lda + k] : a[k * lda + i];
        acc += aik * b[k * ldb + j];
      }
      ci[j] = acc;
    }
  }
}

template <class Arch = default_arch>
void online_softmax_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, float* m, float* l,
                            float* alpha) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (std::int64_t i = 0; i < n; ++i) {
    float mt = neg_inf;
    for (std::int64_t j = 0; j < kn; ++j) mt = std::max(mt, s[j * lds + i]);
    const float m_new = std::max(m[i], mt);
    const float shift = m_new == neg_inf ? 0.0f : m_new;
    float sum = 0;
    for (std::int64_t j = 0; j < kn; ++j) {
      const float x = s[j * lds + i] - shift;
      const float p = x < min_normal_exp_arg ? 0.0f : simd::exp<Arch>(x);
      s[j * lds + i] = p;
      sum += p;
    }
    alpha[i] = m[i] - shift < min_normal_exp_arg ? 0.0f : simd::exp<Arch>(m[i] - shift);
    l[i] = alpha[i] * l[i] + sum;
    m[i] = m_new;
  }
}

template <class Arch = default_arch>
void probs_from_lse_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, const float* lse) {
  constexpr float neg_inf = -std::numeric_limits<float>::infinity();
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) {
      const float x = s[j * lds + i] - lse[i];
      s[j * lds + i] = lse[i] == neg_inf || x < min_normal_exp_arg ? 0.0f : simd::exp<Arch>(x);
    }
}

inline void softmax_grad_columns(const float* p, float* dp, std::int64_t lds, std::int64_t kn, std::int64_t n,
                                 const float* delta, float scale, const float* g = nullptr) {
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) {
      float ds = scale * p[j * lds + i] * (dp[j * lds + i] - delta[i]);
      if (g) ds *= g[j * lds + i];
      dp[j * lds + i] = ds;
    }
}

inline void softcap_columns(float* s, float* g, std::int64_t lds, std::int64_t kn, std::int64_t n, float cap) {
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) {
      const float t = std::tanh(s[j * lds + i] / cap);
      s[j * lds + i] = cap * t;
      if (g) g[j * lds + i] *= 1.0f - t * t;
    }
}

inline void alibi_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, float slope, std::int64_t qp0,
                          std::int64_t k0) {
  for (std::int64_t j = 0; j < kn; ++j)
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t d = qp0 + i - (k0 + j);
      s[j * lds + i] -= slope * static_cast<float>(d >= 0 ? d : -d);
    }
}

}  // namespace reference

namespace detail {

// One MR x NV block of C over the whole reduction kc, accumulators in registers.
template <int MR, int NV, a_order AO, class Arch>
inline void gemm_micro(std::int64_t kc, const float* a, std::int64_t lda, const float* b, std::int64_t ldb,
                       float* c, std::int64_t ldc, c_mode mode, const float* alpha) {
  using batch = xsimd::batch<float, Arch>;
  constexpr std::int64_t w = batch::size;
  batch acc[MR][NV];
  if (mode == c_mode::overwrite) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = batch(0.0f);
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const batch s(mode == c_mode::rescale ? alpha[i] : 1.0f);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] = batch::load_unaligned(c + i * ldc + v * w) * s;
    }
  }
  if constexpr (AO == a_order::row_major) {
    const float* ai[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) ai[i] = a + i * lda;
    for (std::int64_t k = 0; k < kc; ++k) {
      batch bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = batch::load_unaligned(b + v * w);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const batch x(ai[i][k]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = fmadd(x, bv[v], acc[i][v]);
      }
      b += ldb;
    }
  } else {
    for (std::int64_t k = 0; k < kc; ++k) {
      batch bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = batch::load_unaligned(b + v * w);
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const batch x(a[i]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = fmadd(x, bv[v], acc[i][v]);
      }
      a += lda;
      b += ldb;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v].store_unaligned(c + i * ldc + v * w);
}

// Picks the micro-kernel for a block of `rows` <= MR rows and `vecs` <= NV vectors.
template <int MR, int NV, a_order AO, class Arch>
inline void gemm_block(int rows, int vecs, std::int64_t kc, const float* a, std::int64_t lda, const float* b,
                       std::int64_t ldb, float* c, std::int64_t ldc, c_mode mode, const float* alpha) {
  if constexpr (MR > 1) {
    if (rows < MR) return gemm_block<MR - 1, NV, AO, Arch>(rows, vecs, kc, a, lda, b, ldb, c, ldc, mode, alpha);
  }
  if constexpr (NV > 1) {
    if (vecs < NV) return gemm_block<MR, NV - 1, AO, Arch>(rows, vecs, kc, a, lda, b, ldb, c, ldc, mode, alpha);
  }
  gemm_micro<MR, NV, AO, Arch>(kc, a, lda, b, ldb, c, ldc, mode, alpha);
}

}  // namespace detail

// C (mode)= A B; see the header comment for layouts. n % width<Arch> == 0 unless SIMD is off.
// `alpha` [m] is read only in c_mode::rescale.
template <a_order AO, class Arch = default_arch, class Blocking = gemm_blocking<Arch>>
void gemm(std::int64_t m, std::int64_t n, std::int64_t kc, const float* a, std::int64_t lda, const float* b,
          std::int64_t ldb, float* c, std::int64_t ldc, c_mode mode, const float* alpha = nullptr) {
  if constexpr (!vectorized<Arch>) {
    reference::gemm<AO>(m, n, kc, a, lda, b, ldb, c, ldc, mode, alpha);
  } else {
    constexpr int mr = Blocking::mr, nv = Blocking::nv;
    constexpr std::int64_t w = width<Arch>;
    // Column blocks outside, row blocks inside: one block of B (kc x nv vectors) stays in L1
    // while every row block of A streams past it.
    for (std::int64_t j0 = 0; j0 < n; j0 += nv * w) {
      const int vecs = static_cast<int>(std::min<std::int64_t>(nv, (n - j0) / w));
      for (std::int64_t i0 = 0; i0 < m; i0 += mr) {
        const int rows = static_cast<int>(std::min<std::int64_t>(mr, m - i0));
        const float* ai = AO == a_order::row_major ? a + i0 * lda : a + i0;
        detail::gemm_block<mr, nv, AO, Arch>(rows, vecs, kc, ai, lda, b + j0, ldb, c + i0 * ldc + j0, ldc, mode,
                                             alpha ? alpha + i0 : nullptr);
      }
    }
  }
}

// Keys per step of the online softmax's exp (exp_nonpositive_n, math.hpp). Flash f32, L = 4096,
// H = 8, non-causal, 1 thread, AMD EPYC Zen 1 (AVX2), GFLOP/s at D = 64 / 128 against sgemm's
// 42-44 in the same runs: one key at a time 32.0 / 34.5, two 33.6 / 37.4, four 35.8 / 38.1, six
// 35.9 / 38.7 (the masks and chains of six no longer fit 16 registers).
template <class Arch>
inline constexpr int softmax_interleave = 4;

// One online-softmax step over a key-major score tile s[j * lds + i], keys j < kn, queries
// i < n (n % width<Arch> == 0 unless SIMD is off): s becomes p, m, l are updated, alpha [n]
// receives the factor the query's accumulator row must be rescaled by.
template <class Arch = default_arch>
void online_softmax_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, float* m, float* l,
                            float* alpha) {
  if constexpr (!vectorized<Arch>) {
    reference::online_softmax_columns<Arch>(s, lds, kn, n, m, l, alpha);
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    const batch neg_inf(-std::numeric_limits<float>::infinity()), min_arg(min_normal_exp_arg);
    for (std::int64_t i = 0; i < n; i += w) {
      const batch m_old = batch::load_unaligned(m + i);
      // Four running maxima (max is exact, so any order gives the same bits): one max chain
      // waits 3 cycles a key on its own latency.
      batch mx[4] = {neg_inf, neg_inf, neg_inf, neg_inf};
      std::int64_t j = 0;
      for (; j + 4 <= kn; j += 4)
        for (int u = 0; u < 4; ++u) mx[u] = xsimd::max(mx[u], batch::load_unaligned(s + (j + u) * lds + i));
      for (; j < kn; ++j) mx[0] = xsimd::max(mx[0], batch::load_unaligned(s + j * lds + i));
      const batch m_new = xsimd::max(m_old, xsimd::max(xsimd::max(mx[0], mx[1]), xsimd::max(mx[2], mx[3])));
      const batch shift = xsimd::select(m_new == neg_inf, batch(0.0f), m_new);
      batch sum(0.0f);
      // exp of an argument below min_arg is set to 0; the argument exp sees is 0 there, because
      // exp(-inf) computes through subnormals, which take a microcode assist on x86: a tile of
      // masked scores ran 2-3x slower than a dense one (block-sparse Longformer at L=8192:
      // 0.32 of dense flash before, 0.14 after). Keys go softmax_interleave at a time through
      // exp_nonpositive_n (math.hpp); the sum still adds them in key order.
      auto keys = [&]<int U>(std::int64_t j0, std::integral_constant<int, U>) {
        batch x[U];
        decltype(x[0] < min_arg) under[U];
        for (int u = 0; u < U; ++u) {
          x[u] = batch::load_unaligned(s + (j0 + u) * lds + i) - shift;
          under[u] = x[u] < min_arg;
          x[u] = xsimd::select(under[u], batch(0.0f), x[u]);
        }
        exp_nonpositive_n<U>(x);
        for (int u = 0; u < U; ++u) {
          const batch p = xsimd::select(under[u], batch(0.0f), x[u]);
          p.store_unaligned(s + (j0 + u) * lds + i);
          sum += p;
        }
      };
      constexpr int U = softmax_interleave<Arch>;
      for (j = 0; j + U <= kn; j += U) keys(j, std::integral_constant<int, U>{});
      for (; j < kn; ++j) keys(j, std::integral_constant<int, 1>{});
      const batch da = m_old - shift;
      const auto a_under = da < min_arg;  // first tile of a row: m_old = -inf (no subnormals, as above)
      const batch a = xsimd::select(a_under, batch(0.0f), simd::exp_nonpositive(xsimd::select(a_under, batch(0.0f), da)));
      a.store_unaligned(alpha + i);
      detail::fmadd(a, batch::load_unaligned(l + i), sum).store_unaligned(l + i);
      m_new.store_unaligned(m + i);
    }
  }
}

// p = exp(s - lse) in place over a key-major tile (keys j < kn, queries i < n); lse = -inf gives 0.
template <class Arch = default_arch>
void probs_from_lse_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, const float* lse) {
  if constexpr (!vectorized<Arch>) {
    reference::probs_from_lse_columns<Arch>(s, lds, kn, n, lse);
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    const batch neg_inf(-std::numeric_limits<float>::infinity()), min_arg(min_normal_exp_arg);
    for (std::int64_t i = 0; i < n; i += w) {
      const batch x = batch::load_unaligned(lse + i);
      const auto empty = x == neg_inf;
      const batch shift = xsimd::select(empty, batch(0.0f), x);
      for (std::int64_t j = 0; j < kn; ++j) {
        const batch y = batch::load_unaligned(s + j * lds + i) - shift;
        const auto zero = empty || y < min_arg;  // exp never sees the masked arguments (as above)
        xsimd::select(zero, batch(0.0f), simd::exp(xsimd::select(zero, batch(0.0f), y))).store_unaligned(s + j * lds + i);
      }
    }
  }
}

// dS = scale * P o (dP - delta) [o G], in place over dp (keys j < kn, queries i < n); g may be null.
template <class Arch = default_arch>
void softmax_grad_columns(const float* p, float* dp, std::int64_t lds, std::int64_t kn, std::int64_t n,
                          const float* delta, float scale, const float* g = nullptr) {
  if constexpr (!vectorized<Arch>) {
    reference::softmax_grad_columns(p, dp, lds, kn, n, delta, scale, g);
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    const batch sc(scale);
    for (std::int64_t i = 0; i < n; i += w) {
      const batch di = batch::load_unaligned(delta + i);
      for (std::int64_t j = 0; j < kn; ++j) {
        const std::int64_t o = j * lds + i;
        batch ds = sc * batch::load_unaligned(p + o) * (batch::load_unaligned(dp + o) - di);
        if (g) ds *= batch::load_unaligned(g + o);
        ds.store_unaligned(dp + o);
      }
    }
  }
}

// Softcap over a key-major tile: s = cap * tanh(s / cap); g (may be null) *= 1 - tanh^2.
template <class Arch = default_arch>
void softcap_columns(float* s, float* g, std::int64_t lds, std::int64_t kn, std::int64_t n, float cap) {
  if constexpr (!vectorized<Arch>) {
    reference::softcap_columns(s, g, lds, kn, n, cap);
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    const batch c(cap), one(1.0f), minus_two(-2.0f);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += w) {
        const std::int64_t o = j * lds + i;
        const batch x = batch::load_unaligned(s + o) / c;
        const batch e = simd::exp(minus_two * xsimd::abs(x));
        const batch t = xsimd::copysign((one - e) / (one + e), x);
        (c * t).store_unaligned(s + o);
        if (g) (batch::load_unaligned(g + o) * (one - t * t)).store_unaligned(g + o);
      }
  }
}

// ALiBi over a key-major tile: s -= slope * |qp0 + i - (k0 + j)| (distances as floats, exact
// below 2^24).
template <class Arch = default_arch>
void alibi_columns(float* s, std::int64_t lds, std::int64_t kn, std::int64_t n, float slope, std::int64_t qp0,
                   std::int64_t k0) {
  if constexpr (!vectorized<Arch>) {
    reference::alibi_columns(s, lds, kn, n, slope, qp0, k0);
  } else {
    using batch = xsimd::batch<float, Arch>;
    constexpr std::int64_t w = batch::size;
    alignas(Arch::alignment()) float lane[w];
    for (std::int64_t i = 0; i < w; ++i) lane[i] = static_cast<float>(i);
    const batch iota = batch::load_aligned(lane), sl(slope);
    for (std::int64_t j = 0; j < kn; ++j)
      for (std::int64_t i = 0; i < n; i += w) {
        const std::int64_t o = j * lds + i;
        const batch dist = xsimd::abs(batch(static_cast<float>(qp0 + i - (k0 + j))) + iota);
        (batch::load_unaligned(s + o) - sl * dist).store_unaligned(s + o);
      }
  }
}

}  // namespace mnemo::simd

// mnemo/kvcache/decode.hpp — decode attention straight from a kvcache::layer_cache, in every
// storage kind, with ragged per-head lengths and GQA, without a full-precision copy of the cache.
//
// Query head h (of Hq) reads kv head hk = h / (Hq / Hkv) and attends to every slot of that head:
//   s_j = scale q . k_j,   p = softmax(s),   out = sum_j p_j v_j,   lse = log sum_j exp(s_j)
// over j in [0, length(hk)) (a head with no slot gives out = 0, lse = -inf). There is no mask: the
// cache holds exactly what the query may see (append the step's own key first).
//
// Quantized storage is read as codes and dequantized inside the dot products (KIVI, Liu et al.
// 2024, kvcache/quant.hpp). For a key group with per-channel scale a and minimum m,
//   q . k_j = sum_c q_c (m_c + a_c code_jc) = (q * a) . code_j + q . m
// so each group costs one elementwise q * a and one q . m per query row, then every key is one dot
// product of f32 with codes converted on load. For values with per-token groups (scale b_jg,
// minimum n_jg over the channels of group g),
//   sum_j p_j v_jc = sum_j (p_j b_jg) code_jc + sum_j p_j n_jg
// so the value pass is an axpy over codes with coefficient p_j b_jg, and the minimum term is one
// scalar per (row, group) added at the end. The residual window is f32 and read as such.
//
// Split over key chunks exactly like attention::decode (attention/decode.hpp, whose tiles and merge
// this reuses): a work item is (kv head, chunk of attention::decode_chunk slots), with the
// quantized slots and the residual window in separate chunks; every row's partial results merge in
// chunk order (attention::decode_detail::merge_row), so the result is bit-identical for every
// thread count. Chunk boundaries are fixed by the head's lengths, never by the thread count.
//
// Memory traffic per step: codes (1 or 1/2 byte per element), per-token value scales and mins,
// per-group key scales and mins, the residual window in f32: about 0.53 x (int8) and 0.28 x (int4)
// of the f16 bytes at D = 128 with the default groups.
//
// Side output (kvcache::column_sums): the column sums of the final probabilities over the last
// `rows` query rows, per query head and cache slot, sums [Hq, >= max_length()] with
//   sums[h, j] = sum_{i = Lq - rows}^{Lq - 1} P[h, i, j]     j < length(hk), hk = h / (Hq / Hkv)
// and 0 for length(hk) <= j < max_length() (ragged heads); columns past max_length() are not
// touched. It is what the attention-tracking policies observe each step (H2O, TOVA, Scissorhands,
// SnapKV/PyramidKV/AdaKV windows, FastGen; kvcache/policies/), so they run on any storage kind
// without a second pass. As in attention::decode: each item copies its chunk probabilities
// p_c = exp(s - lse_c) (already in its score block after the softmax) to a per-item buffer, and the
// merging thread adds them scaled by the chunk's merge weight w_c = exp(lse_c - lse), which
// merge_row computes anyway. Cost: two passes over R x length floats beside the kernel's
// length x (D + Dv) elements; nothing of it runs when the side output is not wanted.
//
// NaN: a NaN in q (or in f32 / f16 / bf16 keys; quantized appends reject non-finite input) makes
// its rows NaN (out and lse), as in the reference, never a clean-looking or an empty row: a chunk
// with a NaN score gets a NaN partial lse and the merge propagates it. Such rows add nothing to
// the column sums.
//
// The readable reference is kvcache::reference::decode (double accumulation over the dequantized
// cache, as gathered by layer_cache::gather); the tests hold the kernel to it.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/decode.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/kvcache/cache.hpp"
#include "mnemo/kvcache/quant.hpp"
#include "mnemo/prebuilt.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::kvcache {

// Optional side output of decode, see the header. Default: not wanted.
struct column_sums {
  view<float, 2> sums;    // [Hq, >= max_length()]; empty: not wanted
  std::int64_t rows = 0;  // the last `rows` query rows contribute; 0: all Lq rows

  bool wanted() const { return !sums.empty(); }
  // The first query row that contributes.
  std::int64_t first_row(std::int64_t Lq) const { return rows == 0 ? 0 : Lq - rows; }
};

namespace decode_detail {

// The sizes of one call, validated once.
inline attention::dims check_args(const char* fn, const layer_cache& c, view<const float, 3> q, view<float, 3> out,
                                  view<float, 2> lse, const attention::options& opt, const column_sums& cs) {
  using mnemo::detail::require;
  require(c.capacity() >= 1, fn, ": the cache is not configured (default-constructed layer_cache)");
  mnemo::detail::require_data(fn, "q", q, " [Hq, Lq, D]");
  mnemo::detail::require_data(fn, "out", out, " [Hq, Lq, Dv]");
  const std::int64_t Hq = q.extent(0), Lq = q.extent(1), Hkv = c.num_heads(), D = c.head_dim(), Dv = c.value_dim();
  require(q.extent(2) == D, fn, ": q.shape[2] must be the cache's D = ", D, ", got ", q.extent(2));
  require(Hq >= 1 && Hq % Hkv == 0, fn, ": q.shape[0] (Hq) must be a positive multiple of the cache's Hkv = ", Hkv,
          ", got ", Hq);
  require(Lq <= attention::decode_max_rows, fn, ": q.shape[1] (Lq) must be <= ", attention::decode_max_rows,
          " (attention::decode_max_rows), got ", Lq);
  mnemo::detail::require_shape(fn, "out", out, {Hq, Lq, Dv}, " [Hq, Lq, Dv]");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, {Hq, Lq}, " [Hq, Lq]");
  require(std::isfinite(opt.scale), fn, ": options.scale must be finite, got ", opt.scale);
  require(opt.threads >= 0, fn, ": options.threads must be >= 0, got ", opt.threads);
  if (cs.wanted()) {
    require(cs.sums.extent(0) == Hq && cs.sums.extent(1) >= c.max_length(), fn,
            ": column_sums.sums must have shape [Hq = ", Hq, ", >= max_length() = ", c.max_length(), "], got ",
            shape_string(cs.sums.shape()));
    require(cs.rows >= 0 && cs.rows <= Lq, fn, ": column_sums.rows must be in [0, Lq = ", Lq, "] (0: all rows), got ",
            cs.rows);
  }
  // Aliasing (docs/errors.md): no output overlaps q or another output.
  using mnemo::detail::require_disjoint;
  require_disjoint(fn, "out", out, "q", q);
  require_disjoint(fn, "lse", lse, "q", q);
  require_disjoint(fn, "lse", lse, "out", out);
  require_disjoint(fn, "column_sums.sums", cs.sums, "q", q);
  require_disjoint(fn, "column_sums.sums", cs.sums, "out", out);
  require_disjoint(fn, "column_sums.sums", cs.sums, "lse", lse);
  const float scale = opt.scale != 0 ? opt.scale : static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  return {1, Hq, Hkv, Lq, c.max_length(), D, Dv, scale};
}

}  // namespace decode_detail

namespace reference {

// Double-precision decode over the dequantized cache: q [Hq, Lq, D], out [Hq, Lq, Dv], lse [Hq, Lq]
// (may be empty). The scale defaults to 1 / sqrt(D), as in the kernel.
// cs: the optional column sums (see the header).
inline void decode(const layer_cache& c, view<const float, 3> q, view<float, 3> out, view<float, 2> lse = {},
                   const attention::options& opt = {}, const column_sums& cs = {}) {
  const attention::dims d = decode_detail::check_args("kvcache::reference::decode", c, q, out, lse, opt, cs);
  const std::int64_t G = d.group(), first_summed = cs.first_row(d.Lq);
  if (cs.wanted())
    for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(h, 0), c.max_length(), 0.0f);
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
    const std::int64_t n = c.length(hk);
    std::vector<std::int64_t> slots(static_cast<std::size_t>(n));
    for (std::int64_t j = 0; j < n; ++j) slots[static_cast<std::size_t>(j)] = j;
    tensor<float, 2> k({n, d.D}), v({n, d.Dv});
    if (n > 0) c.gather(hk, slots, k, v);
    for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h)
      for (std::int64_t i = 0; i < d.Lq; ++i) {
        std::vector<double> s(static_cast<std::size_t>(n));
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (std::int64_t e = 0; e < d.D; ++e) dot += static_cast<double>(q(h, i, e)) * k(j, e);
          s[static_cast<std::size_t>(j)] = dot * d.scale;
          m = std::max(m, s[static_cast<std::size_t>(j)]);
          if (std::isnan(dot)) m = dot;  // std::max drops NaN; a NaN score makes the row NaN
        }
        if (std::isnan(m)) {
          for (std::int64_t e = 0; e < d.Dv; ++e) out(h, i, e) = std::numeric_limits<float>::quiet_NaN();
          if (!lse.empty()) lse(h, i) = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        double l = 0;
        for (double& x : s) l += (x = std::exp(x - m));
        if (cs.wanted() && i >= first_summed)
          for (std::int64_t j = 0; j < n; ++j) cs.sums(h, j) += static_cast<float>(s[static_cast<std::size_t>(j)] / l);
        for (std::int64_t e = 0; e < d.Dv; ++e) {
          double o = 0;
          for (std::int64_t j = 0; j < n; ++j) o += s[static_cast<std::size_t>(j)] * v(j, e);
          out(h, i, e) = n > 0 ? static_cast<float>(o / l) : 0.0f;
        }
        if (!lse.empty())
          lse(h, i) = n > 0 ? static_cast<float>(m + std::log(l)) : -std::numeric_limits<float>::infinity();
      }
  }
}

}  // namespace reference

namespace decode_detail {

using attention::decode_chunk;
using attention::decode_detail::haddp_source;
using attention::decode_detail::lanes;
using attention::decode_detail::minus_inf;
using attention::decode_detail::plan;
using attention::decode_detail::prefetch;
using attention::decode_detail::prefetch_keys;
using attention::decode_detail::round_up;
using attention::decode_detail::score_tile;
using attention::decode_detail::unroll;
using attention::decode_detail::value_key_block;
using attention::decode_detail::value_tile;

// Which part of a head a work item reads.
enum class part { dense, quantized, residual };

struct item {
  std::int64_t hk, j0, n;  // kv head, first slot (residual: first residual row), slots
  part what;
};

// Where the fused kernels read codes in the pair order of quant::load_code_pair (a permutation
// inside each block of 2W channels): keys over [0, key_pairs), values over [0, value_pairs); the
// channels after that in natural order. Values of int4 use the pair order only when no 2W block
// straddles two value groups.
template <class Arch>
std::int64_t key_pairs(std::int64_t D) {
  constexpr std::int64_t W = lanes<Arch>;
  return simd::vectorized<Arch> ? D / (2 * W) * (2 * W) : 0;
}
template <class Arch, int Bits>
std::int64_t value_pairs(std::int64_t Dv, std::int64_t VG) {
  constexpr std::int64_t W = lanes<Arch>, tile = value_tile<Arch>::slices * W;
  static_assert(value_tile<Arch>::slices % 2 == 0, "value_pairs: a value tile must hold whole pairs of batches");
  if (!simd::vectorized<Arch> || (Bits == 4 && VG % (2 * W) != 0 && VG < Dv)) return 0;
  return Dv / tile * tile;
}

// Index, inside its 2W block, where channel offset i of the block is stored in pair order.
template <int Bits>
constexpr std::int64_t pair_slot(std::int64_t i, std::int64_t W) {
  if constexpr (Bits == 8) return i;
  else return i % 2 == 0 ? i / 2 : W + i / 2;
}

// s[r * decode_chunk + j] = qk_r . code_j + bias_r for rows [0, Rpad) and the n keys whose code
// rows start at k0 (row stride ks bytes): the tile loop of attention's score pass with codes
// converted on load; qk is in pair order over [0, key_pairs(D)).
template <class Arch, int RowTile, int Bits>
void qscores(const plan& pl, const float* qk, const float* bias, const std::uint8_t* k0, std::int64_t ks,
             std::int64_t n, float* s) {
  const std::int64_t D = pl.d.D;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < pl.R; ++r)
        s[r * decode_chunk + j] = quant::dot_codes<Arch, Bits>(qk + r * pl.Dpad, k0 + j * ks, D) + bias[r];
  } else {
    using batch = simd::fbatch<Arch>;
    using tile = score_tile<Arch, RowTile>;
    constexpr int RT = tile::row_tile, KB = tile::key_tile;
    constexpr std::int64_t W = simd::width<Arch>;
    const std::int64_t Dfull = D / W * W, P = key_pairs<Arch>(D);
    const auto& source = haddp_source<Arch>();
    for (std::int64_t j = 0; j < n; j += KB) {
      const std::uint8_t* kr[KB];
      unroll<KB>([&](auto kk) { kr[kk] = k0 + std::min<std::int64_t>(j + kk, n - 1) * ks; });
      const std::int64_t valid = std::min<std::int64_t>(KB, n - j);
      for (std::int64_t kk = j + prefetch_keys; kk < std::min(n, j + prefetch_keys + KB); ++kk) prefetch(k0 + kk * ks, ks);
      for (std::int64_t r0 = 0; r0 < pl.Rpad; r0 += RT) {
        const float* q0 = qk + r0 * pl.Dpad;
        batch acc[W];
        for (auto& a : acc) a = batch(0.0f);
        std::int64_t c = 0;
        for (; c < P; c += 2 * W) {
          batch k1[KB], k2[KB];
          unroll<KB>([&](auto kk) { quant::load_code_pair<Arch, Bits>(kr[kk], c, k1[kk], k2[kk]); });
          unroll<RT>([&](auto r) {
            const batch q1 = batch::load_aligned(q0 + r * pl.Dpad + c), q2 = batch::load_aligned(q0 + r * pl.Dpad + c + W);
            unroll<KB>([&](auto kk) {
              acc[r * KB + kk] = simd::detail::fmadd(q2, k2[kk], simd::detail::fmadd(q1, k1[kk], acc[r * KB + kk]));
            });
          });
        }
        auto step = [&](auto load_k) {
          batch kb[KB];
          unroll<KB>([&](auto kk) { kb[kk] = load_k(kr[kk]); });
          unroll<RT>([&](auto r) {
            const batch qb = batch::load_aligned(q0 + r * pl.Dpad + c);
            unroll<KB>([&](auto kk) { acc[r * KB + kk] = simd::detail::fmadd(qb, kb[kk], acc[r * KB + kk]); });
          });
        };
        for (; c < Dfull; c += W) step([&](const std::uint8_t* p) { return quant::load_codes<Arch, Bits>(p, c); });
        if (c < D) step([&](const std::uint8_t* p) { return quant::load_codes_partial<Arch, Bits>(p, c, D - c); });
        batch rows[W];  // a copy keeps `acc` in registers (see attention::decode_detail::scores)
        unroll<W>([&](auto a) { rows[a] = acc[a]; });
        alignas(64) float sums[W];
        xsimd::haddp(rows).store_aligned(sums);
        for (std::int64_t l = 0; l < W; ++l) {
          const int a = source[l], r = a / KB, kk = a % KB;
          if (a < tile::accumulators && kk < valid) s[(r0 + r) * decode_chunk + j + kk] = sums[l] + bias[r0 + r];
        }
      }
    }
  }
}

// Rows [0, RT) x channels [c, c + U W) of the quantized value pass over keys [0, nk):
// acc[r * Dvpad + c'] += sum_j coef[(r * NG + g(c')) * decode_chunk + j] code_jc', with g(c') = c' / VG.
// Pair: codes and acc in pair order (U even). OneGroup: the tile lies in one value group, so one
// broadcast of the coefficient serves all U batches of a row. Partial: U = 1, `tail` lanes.
template <class Arch, int RT, int U, bool Partial, bool Pair, bool OneGroup, int Bits>
void qvalue_tile_pass(const float* coef, std::int64_t NG, std::int64_t VG, const std::uint8_t* v, std::int64_t vs,
                      std::int64_t c, std::int64_t nk, float* acc, std::int64_t Dvpad, std::int64_t tail) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t W = simd::width<Arch>;
  static_assert(!Partial || U == 1, "qvalue_tile_pass: only a single-batch tile may be partial");
  static_assert(!Pair || U % 2 == 0, "qvalue_tile_pass: the pair order needs an even number of batches");
  const float* cp[RT * U];
  unroll<RT>([&](auto r) {
    unroll<U>([&](auto u) { cp[r * U + u] = coef + (r * NG + (OneGroup ? c : c + u * W) / VG) * decode_chunk; });
  });
  batch a[RT * U];
  unroll<RT>([&](auto r) { unroll<U>([&](auto u) { a[r * U + u] = batch::load_aligned(acc + r * Dvpad + c + u * W); }); });
  for (std::int64_t j = 0; j < nk; ++j) {
    const std::uint8_t* vj = v + j * vs;
    batch vb[U];
    if constexpr (Pair) {
      unroll<U / 2>([&](auto u) { quant::load_code_pair<Arch, Bits>(vj, c + 2 * u * W, vb[2 * u], vb[2 * u + 1]); });
    } else {
      unroll<U>([&](auto u) {
        if constexpr (Partial) vb[u] = quant::load_codes_partial<Arch, Bits>(vj, c, tail);
        else vb[u] = quant::load_codes<Arch, Bits>(vj, c + u * W);
      });
    }
    unroll<RT>([&](auto r) {
      if constexpr (OneGroup) {
        const batch pb(cp[r * U][j]);
        unroll<U>([&](auto u) { a[r * U + u] = simd::detail::fmadd(pb, vb[u], a[r * U + u]); });
      } else {
        unroll<U>([&](auto u) { a[r * U + u] = simd::detail::fmadd(batch(cp[r * U + u][j]), vb[u], a[r * U + u]); });
      }
    });
  }
  unroll<RT>([&](auto r) { unroll<U>([&](auto u) { a[r * U + u].store_aligned(acc + r * Dvpad + c + u * W); }); });
}

// acc[r * Dvpad + c] += sum_j coef[(r * NG + c / VG) * decode_chunk + j] code_jc for rows [0, R)
// and keys [0, n) with code rows at v0 (stride vs bytes); acc in pair order over [0, value_pairs).
template <class Arch, int Bits>
void qvalues(const plan& pl, const float* coef, std::int64_t NG, std::int64_t VG, const std::uint8_t* v0,
             std::int64_t vs, std::int64_t n, float* acc) {
  const std::int64_t Dv = pl.d.Dv;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < pl.R; ++r)
        for (std::int64_t c = 0; c < Dv; ++c)
          acc[r * pl.Dvpad + c] += coef[(r * NG + c / VG) * decode_chunk + j] * static_cast<float>(quant::get_code(v0 + j * vs, Bits, c));
  } else {
    constexpr std::int64_t W = simd::width<Arch>;
    constexpr int RT = value_tile<Arch>::row_tile, U = value_tile<Arch>::slices;
    const std::int64_t Dvfull = Dv / W * W, P = value_pairs<Arch, Bits>(Dv, VG);
    auto rows = [&]<int Rows>(std::int64_t r0, std::int64_t j0, std::int64_t nk, std::integral_constant<int, Rows>) {
      const float* cr = coef + r0 * NG * decode_chunk + j0;
      const std::uint8_t* vr = v0 + j0 * vs;
      float* ar = acc + r0 * pl.Dvpad;
      std::int64_t c = 0;
      for (; c < P; c += U * W) {
        if (c / VG == (c + U * W - 1) / VG) qvalue_tile_pass<Arch, Rows, U, false, true, true, Bits>(cr, NG, VG, vr, vs, c, nk, ar, pl.Dvpad, W);
        else qvalue_tile_pass<Arch, Rows, U, false, true, false, Bits>(cr, NG, VG, vr, vs, c, nk, ar, pl.Dvpad, W);
      }
      for (; c < Dvfull; c += W) qvalue_tile_pass<Arch, Rows, 1, false, false, true, Bits>(cr, NG, VG, vr, vs, c, nk, ar, pl.Dvpad, W);
      if (c < Dv) qvalue_tile_pass<Arch, Rows, 1, true, false, true, Bits>(cr, NG, VG, vr, vs, c, nk, ar, pl.Dvpad, Dv - c);
    };
    for (std::int64_t j0 = 0; j0 < n; j0 += value_key_block) {
      const std::int64_t nk = std::min(value_key_block, n - j0);
      for (std::int64_t j = j0 + value_key_block; j < std::min(n, j0 + 2 * value_key_block); ++j) prefetch(v0 + j * vs, vs);
      std::int64_t r0 = 0;
      for (; r0 + RT <= pl.R; r0 += RT) rows(r0, j0, nk, std::integral_constant<int, RT>{});
      switch (pl.R - r0) {
        case 3: rows(r0, j0, nk, std::integral_constant<int, 3>{}); break;
        case 2: rows(r0, j0, nk, std::integral_constant<int, 2>{}); break;
        case 1: rows(r0, j0, nk, std::integral_constant<int, 1>{}); break;
        default: break;
      }
    }
  }
}

// Where an item copies its probabilities for the column sums: pp [R, decode_chunk] (null: not
// wanted); rows r with r % Lq >= first are the summed ones.
struct prob_copy {
  float* pp = nullptr;
  std::int64_t first = 0;
};

// Softmax of the score rows [0, R) over n keys, in place (p = exp(s - m) / l), lse_at(r) = m + log l;
// a row with a NaN score gets lse NaN (see the header). The summed rows are copied to cp.pp.
template <class Arch, class LseAt>
void softmax_rows(const plan& pl, float* s, std::int64_t n, LseAt&& lse_at, const prob_copy& cp) {
  for (std::int64_t r = 0; r < pl.R; ++r) {
    float* sr = s + r * decode_chunk;
    float m = simd::reduce_max<Arch>(sr, n);
    // x86 max drops NaN, so m alone cannot tell; a finite m puts every NaN score into the sum of
    // exps (exp(NaN - m) = NaN). Only m = -inf, where exp_sum would zero the row, needs a look at
    // the scores (every slot is visible here, so m = -inf means non-finite input anyway).
    if (m == minus_inf && std::any_of(sr, sr + n, [](float x) { return std::isnan(x); }))
      m = std::numeric_limits<float>::quiet_NaN();
    const float l = simd::exp_sum<Arch>(sr, n, m);
    if (l > 0) {
      simd::scale<Arch>(1.0f / l, sr, n);
      lse_at(r) = m + std::log(l);
    } else if (std::isnan(l)) {  // the merge turns a NaN partial lse into a NaN row (out and lse)
      lse_at(r) = std::numeric_limits<float>::quiet_NaN();
    } else {
      lse_at(r) = minus_inf;
    }
    if (cp.pp && r % pl.d.Lq >= cp.first) std::copy_n(sr, n, cp.pp + r * decode_chunk);
  }
}

// Per-slot scratch of the quantized items.
struct qscratch {
  float* qk;    // [Rpad, Dpad] q * key scale of the current group, pair order (padding stays zero)
  float* bias;  // [Rpad] q . key min of the current group (padding rows zero)
  float* coef;  // [R, NG, decode_chunk] p * value scale
  float* msum;  // [R, NG] sum_j p * value min
  float* row;   // [Dvpad] one output row while it is put back in channel order
};

// One quantized item: slots [j0, j0 + n) of head hk (all below quantized_length(hk)).
template <class Arch, int RowTile, int Bits, class LseAt>
void qchunk(const plan& pl, const layer_cache& c, const std::vector<std::int64_t>& start, const float* qs,
            std::int64_t hk, std::int64_t j0, std::int64_t n, float* s, float* po, const qscratch& w, LseAt&& lse_at,
            const prob_copy& cp) {
  constexpr std::int64_t W = lanes<Arch>;
  const std::int64_t D = pl.d.D, Dv = pl.d.Dv, Pk = key_pairs<Arch>(D);
  const std::uint8_t* kc = c.key_codes().ptr(hk, 0);
  const std::int64_t ks = c.key_codes().stride(1);
  const float* kscale = c.key_scales(hk).data();
  const float* kmin = c.key_mins(hk).data();
  // Scores, one key group piece at a time: qk = q * scale (pair order), bias = q . min.
  std::int64_t g = static_cast<std::int64_t>(std::upper_bound(start.begin(), start.end(), j0) - start.begin()) - 1;
  for (std::int64_t a = j0; a < j0 + n; ++g) {
    const std::int64_t b = std::min(j0 + n, start[static_cast<std::size_t>(g) + 1]);
    const float* sc = kscale + g * D;
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const float* qr = qs + r * pl.Dpad;
      float* out = w.qk + r * pl.Dpad;
      for (std::int64_t e0 = 0; e0 < Pk; e0 += 2 * W)
        for (std::int64_t i = 0; i < 2 * W; ++i) out[e0 + pair_slot<Bits>(i, W)] = qr[e0 + i] * sc[e0 + i];
      for (std::int64_t e = Pk; e < D; ++e) out[e] = qr[e] * sc[e];
      w.bias[r] = simd::dot<Arch>(qr, kmin + g * D, D);
    }
    qscores<Arch, RowTile, Bits>(pl, w.qk, w.bias, kc + a * ks, ks, b - a, s + (a - j0));
    a = b;
  }
  softmax_rows<Arch>(pl, s, n, lse_at, cp);
  // Values: coefficients p * scale and the minimum sums per (row, group), then the axpy over codes.
  const std::int64_t NG = c.value_groups(), VG = c.config().quant.value_group, Pv = value_pairs<Arch, Bits>(Dv, VG);
  for (std::int64_t r = 0; r < pl.R; ++r) {
    const float* p = s + r * decode_chunk;
    for (std::int64_t gg = 0; gg < NG; ++gg) {
      const float* vscale = c.value_scales().ptr(hk, gg, j0);
      float* cr = w.coef + (r * NG + gg) * decode_chunk;
      for (std::int64_t j = 0; j < n; ++j) cr[j] = p[j] * vscale[j];
      w.msum[r * NG + gg] = simd::dot<Arch>(p, c.value_mins().ptr(hk, gg, j0), n);
    }
  }
  std::fill(po, po + pl.R * pl.Dvpad, 0.0f);
  qvalues<Arch, Bits>(pl, w.coef, NG, VG, c.value_codes().ptr(hk, j0), c.value_codes().stride(1), n, po);
  for (std::int64_t r = 0; r < pl.R; ++r) {
    float* o = po + r * pl.Dvpad;
    if (Bits == 4 && Pv > 0) {  // pair order -> channel order
      std::copy(o, o + Pv, w.row);
      for (std::int64_t e0 = 0; e0 < Pv; e0 += 2 * W)
        for (std::int64_t i = 0; i < 2 * W; ++i) o[e0 + i] = w.row[e0 + pair_slot<Bits>(i, W)];
    }
    for (std::int64_t e = 0; e < Dv; ++e) o[e] += w.msum[r * NG + e / VG];
  }
}

// One dense item (f32 / f16 / bf16 storage, or the f32 residual window): keys at k0, values at v0.
template <class Arch, int RowTile, class KV, class LseAt>
void dchunk(const plan& pl, const float* qs, const KV* k0, std::int64_t ks, const KV* v0, std::int64_t vs,
            std::int64_t n, float* s, float* po, LseAt&& lse_at, const prob_copy& cp) {
  attention::decode_detail::scores<Arch, RowTile>(pl, qs, k0, ks, n, s);
  softmax_rows<Arch>(pl, s, n, lse_at, cp);
  std::fill(po, po + pl.R * pl.Dvpad, 0.0f);
  attention::decode_detail::values<Arch>(pl, s, v0, vs, n, po);
}

template <class Arch, int RowTile>
void run(const attention::dims& d, const layer_cache& c, view<const float, 3> q, view<float, 3> out,
         view<float, 2> lse, int threads, attention::decode_workspace& ws, const column_sums& cs) {
  constexpr std::int64_t W = lanes<Arch>;
  constexpr std::int64_t align = 64 / sizeof(float);
  plan pl{d, 0, 0, 0, 0, 0};
  pl.R = d.group() * d.Lq;
  pl.Rpad = round_up(pl.R, RowTile);
  pl.Dpad = round_up(d.D, W);
  pl.Dvpad = round_up(d.Dv, W);
  const storage kind = c.kind();
  const bool quantized = is_quantized(kind);
  const std::int64_t NG = quantized ? c.value_groups() : 0;

  // Work items in (head, chunk) order; each head's items are contiguous.
  std::vector<item> items;
  std::vector<std::int64_t> base(static_cast<std::size_t>(d.Hkv) + 1, 0);
  std::vector<std::vector<std::int64_t>> starts(static_cast<std::size_t>(d.Hkv));
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk) {
    const std::int64_t len = c.length(hk), nq = quantized ? c.quantized_length(hk) : 0;
    const part first = quantized ? part::quantized : part::dense;
    for (std::int64_t j0 = 0; j0 < (quantized ? nq : len); j0 += decode_chunk)
      items.push_back({hk, j0, std::min(decode_chunk, (quantized ? nq : len) - j0), first});
    if (quantized) {
      for (std::int64_t j0 = 0; j0 < len - nq; j0 += decode_chunk)
        items.push_back({hk, j0, std::min(decode_chunk, len - nq - j0), part::residual});
      auto& st = starts[static_cast<std::size_t>(hk)];
      st.assign(1, 0);
      for (std::int64_t l : c.key_group_lengths(hk)) st.push_back(st.back() + l);
    }
    base[static_cast<std::size_t>(hk) + 1] = static_cast<std::int64_t>(items.size());
  }
  const std::int64_t n_items = static_cast<std::int64_t>(items.size());
  auto count = [&](std::int64_t hk) { return base[static_cast<std::size_t>(hk) + 1] - base[static_cast<std::size_t>(hk)]; };

  // Workspace: partial outputs [items, R, Dvpad], partial lse (per head [R, items of head]), and
  // per thread slot: scaled q [Rpad, Dpad], scores [Rpad, decode_chunk], then for quantized kinds
  // qk [Rpad, Dpad], bias [Rpad], coef [R, NG, decode_chunk], msum [R, NG], row [Dvpad].
  const std::int64_t slots = std::clamp<std::int64_t>(resolve_threads(threads), 1, std::max<std::int64_t>(n_items, 1));
  const std::int64_t po_size = round_up(n_items * pl.R * pl.Dvpad, align);
  const std::int64_t pl_size = round_up(n_items * pl.R, align);
  const std::int64_t q_size = round_up(pl.Rpad * pl.Dpad, align);
  const std::int64_t s_size = round_up(pl.Rpad * decode_chunk, align);
  const std::int64_t bias_size = round_up(pl.Rpad, align);
  const std::int64_t coef_size = round_up(pl.R * decode_chunk * NG, align);
  const std::int64_t msum_size = round_up(pl.R * NG, align);
  const std::int64_t row_size = round_up(pl.Dvpad, align);
  const std::int64_t slot_size = q_size + s_size + (quantized ? q_size + bias_size + coef_size + msum_size + row_size : 0);
  const std::int64_t pp_size = cs.wanted() ? round_up(n_items * pl.R * decode_chunk, align) : 0;  // [items, R, chunk]
  float* po = ws.reserve(po_size + pl_size + slots * slot_size + pp_size);
  float* plse = po + po_size;
  float* scratch = plse + pl_size;
  float* pp_all = cs.wanted() ? scratch + slots * slot_size : nullptr;
  const std::int64_t first_summed = cs.first_row(d.Lq), Lmax = c.max_length();

  // After merge_row, w[p] holds the merge weight exp(lse_p - lse) of the head's item p, which
  // turns the item's chunk probabilities into final ones (NaN or -inf when the row is NaN or empty).
  auto merge_head = [&](std::int64_t hk) {
    const std::int64_t nh = count(hk), b0 = base[static_cast<std::size_t>(hk)];
    const std::int64_t nq = quantized ? c.quantized_length(hk) : 0;
    if (cs.wanted())
      for (std::int64_t h = hk * d.group(); h < (hk + 1) * d.group(); ++h) std::fill_n(cs.sums.ptr(h, 0), Lmax, 0.0f);
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const std::int64_t h = hk * d.group() + r / d.Lq, i = r % d.Lq;
      float* w = plse + b0 * pl.R + r * nh;
      const float* parts = po + (b0 * pl.R + r) * pl.Dvpad;
      attention::decode_detail::merge_row<Arch>(
          nh, [&](std::int64_t p) { return parts + p * pl.R * pl.Dvpad; }, [&](std::int64_t p) { return w[p]; }, w,
          d.Dv, out.ptr(h, i), lse.empty() ? nullptr : lse.ptr(h, i));
      if (!cs.wanted() || i < first_summed) continue;
      for (std::int64_t p = 0; p < nh; ++p) {
        if (!(w[p] > 0)) continue;
        const item& x = items[static_cast<std::size_t>(b0 + p)];
        const std::int64_t slot0 = x.j0 + (x.what == part::residual ? nq : 0);
        simd::axpy<Arch>(w[p], pp_all + ((b0 + p) * pl.R + r) * decode_chunk, cs.sums.ptr(h, slot0), x.n);
      }
    }
  };
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk)  // heads without a slot: out = 0, lse = -inf
    if (count(hk) == 0) merge_head(hk);
  if (n_items == 0) return;

  const std::unique_ptr<std::atomic<std::int64_t>[]> pending(new std::atomic<std::int64_t>[static_cast<std::size_t>(d.Hkv)]);
  for (std::int64_t hk = 0; hk < d.Hkv; ++hk) pending[hk].store(count(hk), std::memory_order_relaxed);

  // Items handed out from a shared counter, the last finisher of a head merges it (as in
  // attention::decode_detail::run).
  std::atomic<std::int64_t> next{0};
  parallel_for(
      slots,
      [&](std::int64_t t) {
        float* qs = scratch + t * slot_size;
        float* s = qs + q_size;
        qscratch w{s + s_size, nullptr, nullptr, nullptr, nullptr};
        if (quantized) {
          w.bias = w.qk + q_size;
          w.coef = w.bias + bias_size;
          w.msum = w.coef + coef_size;
          w.row = w.msum + msum_size;
          std::fill(w.qk, w.qk + q_size + bias_size, 0.0f);
        }
        std::int64_t loaded = -1;
        for (std::int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
          const item& x = items[static_cast<std::size_t>(it)];
          if (x.hk != loaded) {
            std::fill(qs, qs + pl.Rpad * pl.Dpad, 0.0f);
            for (std::int64_t r = 0; r < pl.R; ++r) {
              const float* src = q.ptr(x.hk * d.group() + r / d.Lq, r % d.Lq);
              for (std::int64_t e = 0; e < d.D; ++e) qs[r * pl.Dpad + e] = d.scale * src[e];
            }
            loaded = x.hk;
          }
          const std::int64_t b0 = base[static_cast<std::size_t>(x.hk)], nh = count(x.hk), local = it - b0;
          float* lse_h = plse + b0 * pl.R;
          auto lse_at = [&](std::int64_t r) -> float& { return lse_h[r * nh + local]; };
          float* pout = po + it * pl.R * pl.Dvpad;
          const prob_copy cp{pp_all ? pp_all + it * pl.R * decode_chunk : nullptr, first_summed};
          switch (kind) {
            case storage::f32: {
              const auto k = c.dense_keys<float>(), v = c.dense_values<float>();
              dchunk<Arch, RowTile>(pl, qs, k.ptr(x.hk, x.j0), k.stride(1), v.ptr(x.hk, x.j0), v.stride(1), x.n, s, pout, lse_at, cp);
              break;
            }
            case storage::f16: {
              const auto k = c.dense_keys<f16>(), v = c.dense_values<f16>();
              dchunk<Arch, RowTile>(pl, qs, k.ptr(x.hk, x.j0), k.stride(1), v.ptr(x.hk, x.j0), v.stride(1), x.n, s, pout, lse_at, cp);
              break;
            }
            case storage::bf16: {
              const auto k = c.dense_keys<bf16>(), v = c.dense_values<bf16>();
              dchunk<Arch, RowTile>(pl, qs, k.ptr(x.hk, x.j0), k.stride(1), v.ptr(x.hk, x.j0), v.stride(1), x.n, s, pout, lse_at, cp);
              break;
            }
            default:
              if (x.what == part::residual) {
                const auto k = c.residual_keys(), v = c.residual_values();
                dchunk<Arch, RowTile>(pl, qs, k.ptr(x.hk, x.j0), k.stride(1), v.ptr(x.hk, x.j0), v.stride(1), x.n, s, pout,
                                      lse_at, cp);
              } else if (kind == storage::int8) {
                qchunk<Arch, RowTile, 8>(pl, c, starts[static_cast<std::size_t>(x.hk)], qs, x.hk, x.j0, x.n, s, pout, w, lse_at, cp);
              } else {
                qchunk<Arch, RowTile, 4>(pl, c, starts[static_cast<std::size_t>(x.hk)], qs, x.hk, x.j0, x.n, s, pout, w, lse_at, cp);
              }
          }
          if (pending[x.hk].fetch_sub(1, std::memory_order_acq_rel) == 1) merge_head(x.hk);
        }
      },
      static_cast<int>(slots));
}

}  // namespace decode_detail

// Decode from a cache: q [Hq, Lq] rows (Lq <= attention::decode_max_rows) against every slot of
// their kv head, in any storage kind; the result agrees with kvcache::reference::decode to f32
// rounding and is bit-identical for every options.threads. Reads options.scale, .threads and .isa.
// cs: the optional column sums per cache slot (see the header).
template <class TuArch = simd::default_arch>
void decode(const layer_cache& c,
            view<const float, 3> q,   // [Hq, Lq, D]
            view<float, 3> out,       // [Hq, Lq, Dv]
            view<float, 2> lse,       // [Hq, Lq] or empty
            const attention::options& opt, attention::decode_workspace& ws,
            const column_sums& cs = {}) {  // sums [Hq, >= max_length()] or empty
  const attention::dims d = decode_detail::check_args("kvcache::decode", c, q, out, lse, opt, cs);
  if (d.Lq == 0) {  // no row: nothing attended
    if (cs.wanted())
      for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(h, 0), c.max_length(), 0.0f);
    return;
  }
  if constexpr (prebuilt::linked) {  // a program built below the CPU's level (prebuilt.hpp)
    const simd::level want = simd::resolve_level(opt.isa);
    if (prebuilt::above<TuArch>(want))
      return prebuilt::at_level(want, [&]<class Arch>() { prebuilt::cache_decode<Arch>(d, c, q, out, lse, opt.threads, ws, cs); });
  }
  const std::int64_t R = d.group() * d.Lq;
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    if (R == 1) decode_detail::run<Arch, 1>(d, c, q, out, lse, opt.threads, ws, cs);
    else if (R == 2) decode_detail::run<Arch, 2>(d, c, q, out, lse, opt.threads, ws, cs);
    else decode_detail::run<Arch, 4>(d, c, q, out, lse, opt.threads, ws, cs);
  });
}

// As above, with a workspace of its own.
template <class TuArch = simd::default_arch>
void decode(const layer_cache& c,
            view<const float, 3> q,       // [Hq, Lq, D]
            view<float, 3> out,           // [Hq, Lq, Dv]
            view<float, 2> lse = {},      // [Hq, Lq] or empty
            const attention::options& opt = {},
            const column_sums& cs = {}) {  // sums [Hq, >= max_length()] or empty
  attention::decode_workspace ws;
  decode<TuArch>(c, q, out, lse, opt, ws, cs);
}

}  // namespace mnemo::kvcache

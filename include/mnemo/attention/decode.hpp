// mnemo/attention/decode.hpp — split-KV decode (a few queries against a long K/V cache) and the
// exact merge of partial attention results over disjoint key sets.
//
// Merge. A partial result over a key set X is (o_X, lse_X) with
//   lse_X = log sum_{j in X} exp(s_j),   o_X = sum_{j in X} exp(s_j - lse_X) v_j.
// For disjoint parts X_1 .. X_N of the keys (any N, any split, parts may be empty):
//   m   = max_p lse_p,   w_p = exp(lse_p - m)
//   lse = m + log(sum_p w_p)
//   o   = sum_p w_p o_p / sum_p w_p
// which is exactly attention over the union (Milakov & Gimelshein 2018, "Online normalizer
// calculation for softmax"; the combine step of Flash-Decoding, Dao et al. 2023). An empty part
// has lse = -inf and gets weight 0 (its out is never read); if every part is empty the result is
// out = 0, lse = -inf, never NaN. Parts are combined in index order, so the result does not depend
// on who computed which part.
//
// Split-KV decode. Lq <= 16 query rows (one decode step, or the draft tokens of speculative
// verification) against Lk keys. The keys are cut into chunks of `decode_chunk` keys — a fixed
// number, never derived from the thread count. Each (batch, kv head, chunk) is one work item:
//   1. stream the chunk's K once, computing the scores of all G * Lq rows that read this kv head
//      (G = Hq / Hkv query heads of the group x Lq rows), with k converted to f32 once per load;
//   2. apply the mods (score mods, then the mask), softmax within the chunk: p = exp(s - m) / l;
//   3. stream the chunk's V once: o_chunk = sum_j p_j v_j; lse_chunk = m + log(l).
// Then every row merges its chunks' partials in chunk order (the N-way merge above), done by the
// thread that finishes the group's last chunk. Items are handed out dynamically, but no value
// depends on which thread computed it and the merge order is fixed, so the result is
// bit-identical for every thread count. Chunks the mod classifies as empty for every row
// (sliding windows, mods::classify) are neither read nor merged.
//
// Side output (column_sums, reference.hpp): the column sums of the final probabilities over the
// last `rows` query rows. A chunk's probabilities p_c = exp(s - lse_c) are already in its score
// block after step 2; when the side output is wanted they are also copied to a per-item buffer,
// and the merging thread scales them by the merge weight of their chunk, w_c = exp(lse_c - lse)
// (the weights the N-way merge computes anyway), summing over the summed rows of each head. The
// copy and the rescale are one pass over R x Lk floats each, beside the kernel's Lk x (D + Dv)
// K/V elements (under 1% at Lk = 32768, D = 128); with the side output not wanted nothing of it
// runs.
//
// The readable reference is attention::reference (reference.hpp): decode takes the same arguments
// and must agree with it to f32 rounding, so a surprising result is checked by calling it instead.
//
// Shapes: q [B, Hq, Lq, D] f32, k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] in f32, f16 or bf16,
// out [B, Hq, Lq, Dv], lse [B, Hq, Lq] (optional). Only the innermost dimension must be
// contiguous: K/V may be a cache [Hkv, capacity, D] narrowed to its first Lk slots and viewed as
// [1, Hkv, Lk, D] — nothing is copied. Positions, masks and score pipeline are those of
// attention::reference (mods.hpp): query row i sits at key position i + Lk - Lq.
//
// Numerics: scores, softmax and outputs accumulate in f32 (the reference is double); the scale
// is folded into q once (s = (scale q) . k), exp is simd::exp (1 ulp). f16/bf16 K/V are
// converted to f32 on load and never rounded again. NaN in q, k or a score mod makes its row NaN
// (out and lse), as in the reference: a chunk whose scores hold a NaN gets a NaN partial lse, and
// the merge propagates it (checked once per row and chunk, on the sum of exps, not per score).
//
// Memory traffic: K and V are read once (the bandwidth cost of decode); per item the partial
// results are G * Lq * (Dv + 1) floats, about G * Lq / (2 * decode_chunk) of the item's K/V bytes
// at D = Dv in f32 (0.4% for the standard G = 4, Lq = 1).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/error.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/prebuilt.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/load.hpp"
#include "mnemo/simd/math.hpp"
#include "mnemo/simd/vec.hpp"

namespace mnemo::attention {

// Keys per split-KV chunk. Fixed, so results never depend on the thread count. 512: at the
// standard decode shape (Lk = 32768, Hq = 32, Hkv = 8, D = 128, 1 thread, best of 4) f32 K/V took
// 29.0 / 26.8 / 25.5 / 25.6 ms with chunks of 128 / 256 / 512 / 1024 keys (f16: 17.3 / 14.4 /
// 13.6 / 13.6 ms); 512 still gives 64 work items at Lk = 4096 with 8 kv heads.
inline constexpr std::int64_t decode_chunk = 512;

// The most query rows (Lq) decode accepts: one step plus speculative draft tokens.
inline constexpr std::int64_t decode_max_rows = 16;

// Scratch memory of decode (queries, partial results, score rows), kept by a caller that
// decodes many steps so the memory is allocated once. Grows to the largest call; never shrinks.
// One workspace per concurrent caller: two decode calls running at once must not share one.
class decode_workspace {
 public:
  // At least n floats, 64-byte aligned; contents unspecified.
  float* reserve(std::int64_t n) {
    if (buffer_.size() < n) buffer_ = tensor<float, 1>({n});
    return buffer_.data();
  }
  std::int64_t capacity() const { return buffer_.size(); }

 private:
  tensor<float, 1> buffer_;
};

namespace decode_detail {

inline constexpr float minus_inf = -std::numeric_limits<float>::infinity();

inline std::int64_t round_up(std::int64_t n, std::int64_t m) { return (n + m - 1) / m * m; }

// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N-1, unrolled at compile time, so that
// small arrays of batches indexed by I stay in registers.
template <int N, class F>
inline void unroll(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f(std::integral_constant<int, I>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// Floats per batch on the path that runs (1 when the scalar path runs).
template <class Arch>
inline constexpr std::int64_t lanes = simd::lanes<Arch>;

// ---------------------------------------------------------------------------------------------
// The merge of one row.

// out[0 .. Dv) = sum_p w_p part_out(p)[0 .. Dv) / sum_p w_p with w_p = exp(part_lse(p) - m), and
// *lse = m + log(sum_p w_p) (lse may be null). `w` [n] is scratch; it may be the storage of the
// part lse values themselves (w[p] is written only after part_lse(p) is read). `out` may be one of
// the part rows: each element is written after every part's element at that index was read.
template <class Arch, class PartOut, class PartLse>
void merge_row(std::int64_t n, PartOut&& part_out, PartLse&& part_lse, float* w, std::int64_t Dv, float* out,
               float* lse) {
  float m = minus_inf;
  bool nan = false;
  for (std::int64_t p = 0; p < n; ++p) {
    const float l = part_lse(p);
    m = std::max(m, l);
    nan = nan || std::isnan(l);
  }
  if (nan) {  // a NaN part (NaN in its q, k or v) makes the row NaN; std::max alone would drop it
    for (std::int64_t p = 0; p < n; ++p) w[p] = std::numeric_limits<float>::quiet_NaN();
    std::fill(out, out + Dv, std::numeric_limits<float>::quiet_NaN());
    if (lse) *lse = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (m == minus_inf) {  // every part empty (or no parts)
    std::fill(out, out + Dv, 0.0f);
    if (lse) *lse = minus_inf;
    return;
  }
  float sum = 0;
  for (std::int64_t p = 0; p < n; ++p) {
    const float l = part_lse(p);
    w[p] = l == minus_inf ? 0.0f : simd::exp<Arch>(l - m);
    sum += w[p];
  }
  const float inv = 1.0f / sum;  // sum >= 1: the largest part has weight exp(0)
  for (std::int64_t p = 0; p < n; ++p) w[p] *= inv;
  std::int64_t c = 0;
  if constexpr (simd::vectorized<Arch>) {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    for (; c + W <= Dv; c += W) {
      batch acc(0.0f);
      for (std::int64_t p = 0; p < n; ++p)
        if (w[p] != 0) acc = simd::detail::fmadd(batch(w[p]), batch::load_unaligned(part_out(p) + c), acc);
      acc.store_unaligned(out + c);
    }
  }
  for (; c < Dv; ++c) {
    float acc = 0;
    for (std::int64_t p = 0; p < n; ++p)
      if (w[p] != 0) acc = simd::detail::fmadd<Arch>(w[p], part_out(p)[c], acc);
    out[c] = acc;
  }
  if (lse) *lse = m + std::log(sum);
}

// ---------------------------------------------------------------------------------------------
// The decode kernel.

// Tile sizes of the score pass for Arch and `row_tile` query rows. The K block of `key_tile` keys
// is loaded (and converted) once per D slice and multiplied with row_tile q rows, giving
// row_tile * key_tile <= W accumulators, all reduced by one haddp. row_tile 4 x key_tile 4 on
// AVX-512 (16 accumulators + 4 k + 1 q = 21 of 32 registers), 4 x 2 on AVX2 (11 of 16), 4 x 1 on
// SSE. One haddp for all sums instead of one hadd each: score pass in L2 at D = 128, 4 rows,
// AVX-512, per key: f16 K 14.4 ns instead of 20.4, f32 K 13.3 instead of 12.2 (f16, with half the
// bytes per key, is the one that needs the compute to stay below the memory time).
template <class Arch, int RowTile>
struct score_tile {
  static constexpr int row_tile = RowTile;
  static constexpr int key_tile = static_cast<int>(std::clamp<std::int64_t>(lanes<Arch> / RowTile, 1, 4));
  static constexpr int accumulators = row_tile * key_tile;
  static_assert(RowTile == 1 || RowTile == 2 || RowTile == 4, "score_tile: row_tile must be 1, 2 or 4");
  static_assert(accumulators <= lanes<Arch>, "score_tile: one haddp reduces at most one accumulator per lane");
};

// Which input batch each lane of xsimd::haddp sums: lane l of haddp(rows) is the sum of
// rows[haddp_source<Arch>()[l]]. Probed once per Arch rather than assumed, because xsimd 8.1's
// avx512f haddp returns the sums of rows 0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15
// (checked against hadd of each row), while its SSE and AVX versions keep the order.
template <class Arch>
const std::array<int, lanes<Arch>>& haddp_source() {
  static const std::array<int, lanes<Arch>> source = [] {
    using batch = simd::fbatch<Arch>;
    constexpr std::int64_t W = simd::width<Arch>;
    batch rows[W];
    for (std::int64_t i = 0; i < W; ++i) rows[i] = batch(static_cast<float>(i));
    alignas(64) float sums[W];
    xsimd::haddp(rows).store_aligned(sums);
    std::array<int, lanes<Arch>> src{};
    for (std::int64_t l = 0; l < W; ++l) src[l] = static_cast<int>(sums[l]) / static_cast<int>(W);  // W * i, exact
    return src;
  }();
  return source;
}

// Tile of the value pass: the f32 accumulators of `row_tile` rows x `slices` batches of Dv stay in
// registers while a block of keys streams through (per key: `slices` V loads, row_tile broadcasts
// of p, row_tile * slices FMAs; no accumulator loads or stores). AVX-512: 4 x 4 = 16 accumulators
// + 4 v + 1 p = 21 of 32 registers; AVX2 and SSE: 4 x 2 = 8 + 2 + 1 = 11 of 16.
template <class Arch>
struct value_tile {
  static constexpr int row_tile = 4;
  static constexpr int slices = lanes<Arch> >= 16 ? 4 : 2;
};

// Keys per block of the value pass: every (row tile, Dv tile) pass goes over the block, so its V
// rows (16 x 512 B = 8 KiB at Dv = 128 in f32) must stay in L1 between the passes.
inline constexpr std::int64_t value_key_block = 16;

// Software prefetch distance of the score pass, in keys (16 keys = 8 KiB of f32 K at D = 128); the
// value pass prefetches the next key block. With them, Lk = 32768 (standard shape, 1 thread, best
// of 4) took 26.1 ms instead of 30.4 for f32 K/V and 14.0 instead of 19.7 for f16: the hardware
// prefetchers alone leave the loads waiting while the kernel computes.
inline constexpr std::int64_t prefetch_keys = 16;

// Asks for the cache lines of bytes [p, p + n) (a hint: never faults, never changes a result).
inline void prefetch(const void* p, std::int64_t n) {
  constexpr std::int64_t line = 64;
  const char* c = static_cast<const char*>(p);
  for (std::int64_t b = 0; b < n; b += line) __builtin_prefetch(c + b);
}

// The fixed sizes of one decode call, derived once from the validated dims.
struct plan {
  dims d;
  std::int64_t R;      // rows per kv head: G * Lq, row r = g * Lq + i (query head hk * G + g)
  std::int64_t Rpad;   // R rounded up to the score row tile (padding rows are zero queries)
  std::int64_t Dpad;   // D rounded up to the batch width (zero padding)
  std::int64_t Dvpad;  // Dv rounded up to the batch width
  std::int64_t live;   // chunks that are not empty for the mod
};

// s[r * decode_chunk + j] = qs_r . k_j for rows [0, Rpad) and keys j in [0, n).
template <class Arch, int RowTile, class KV>
void scores(const plan& pl, const float* qs, const KV* k0, std::int64_t ks, std::int64_t n, float* s) {
  const std::int64_t D = pl.d.D;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < pl.R; ++r) s[r * decode_chunk + j] = simd::dot<Arch>(qs + r * pl.Dpad, k0 + j * ks, D);
  } else {
    using batch = simd::fbatch<Arch>;
    using tile = score_tile<Arch, RowTile>;
    constexpr int RT = tile::row_tile, KB = tile::key_tile;
    constexpr std::int64_t W = simd::width<Arch>;
    const std::int64_t Dfull = D / W * W;
    const std::array<int, W>& source = haddp_source<Arch>();
    for (std::int64_t j = 0; j < n; j += KB) {
      const KV* kr[KB];
      unroll<KB>([&](auto kk) { kr[kk] = k0 + std::min<std::int64_t>(j + kk, n - 1) * ks; });  // tail: repeat the last key
      const std::int64_t valid = std::min<std::int64_t>(KB, n - j);
      for (std::int64_t kk = j + prefetch_keys; kk < std::min(n, j + prefetch_keys + KB); ++kk)
        prefetch(k0 + kk * ks, D * static_cast<std::int64_t>(sizeof(KV)));
      for (std::int64_t r0 = 0; r0 < pl.Rpad; r0 += RT) {
        const float* q0 = qs + r0 * pl.Dpad;
        batch acc[W];
        for (auto& a : acc) a = batch(0.0f);
        auto step = [&](std::int64_t c, auto load_k) {
          batch kb[KB];
          unroll<KB>([&](auto kk) { kb[kk] = load_k(kr[kk] + c); });
          unroll<RT>([&](auto r) {
            const batch qb = batch::load_aligned(q0 + r * pl.Dpad + c);
            unroll<KB>([&](auto kk) { acc[r * KB + kk] = simd::detail::fmadd(qb, kb[kk], acc[r * KB + kk]); });
          });
        };
        std::int64_t c = 0;
        for (; c < Dfull; c += W) step(c, [](const KV* p) { return simd::load<Arch>(p); });
        if (c < D) step(c, [&](const KV* p) { return simd::load_partial<Arch>(p, D - c); });
        // haddp takes the batches through a pointer: handing it a copy keeps `acc` itself in
        // registers through the D loop (with acc passed directly, GCC 12 kept every accumulator in
        // memory and a K-only decode ran 1.5x slower in cache).
        batch rows[W];
        unroll<W>([&](auto a) { rows[a] = acc[a]; });
        alignas(64) float sums[W];
        xsimd::haddp(rows).store_aligned(sums);
        for (std::int64_t l = 0; l < W; ++l) {
          const int a = source[l], r = a / KB, kk = a % KB;
          if (a < tile::accumulators && kk < valid) s[(r0 + r) * decode_chunk + j + kk] = sums[l];
        }
      }
    }
  }
}

// Rows [0, RT) x Dv columns [0, U W) of the value pass over keys [0, nk): acc[r * Dvpad + c] +=
// sum_j p[r * decode_chunk + j] v_j[c]. Partial: U = 1 and only `tail` lanes of v are read.
template <class Arch, int RT, int U, bool Partial, class KV>
void value_tile_pass(const float* p, const KV* v, std::int64_t vs, std::int64_t nk, float* acc, std::int64_t Dvpad,
                     std::int64_t tail) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t W = simd::width<Arch>;
  static_assert(!Partial || U == 1, "value_tile_pass: only a single-batch tile may be partial");
  batch a[RT * U];
  unroll<RT>([&](auto r) { unroll<U>([&](auto u) { a[r * U + u] = batch::load_aligned(acc + r * Dvpad + u * W); }); });
  for (std::int64_t j = 0; j < nk; ++j) {
    const KV* vj = v + j * vs;
    batch vb[U];
    unroll<U>([&](auto u) {
      if constexpr (Partial) vb[u] = simd::load_partial<Arch>(vj, tail);
      else vb[u] = simd::load<Arch>(vj + u * W);
    });
    unroll<RT>([&](auto r) {
      const batch pb(p[r * decode_chunk + j]);
      unroll<U>([&](auto u) { a[r * U + u] = simd::detail::fmadd(pb, vb[u], a[r * U + u]); });
    });
  }
  unroll<RT>([&](auto r) { unroll<U>([&](auto u) { a[r * U + u].store_aligned(acc + r * Dvpad + u * W); }); });
}

// acc[r * Dvpad + c] += sum_j p[r * decode_chunk + j] * v_j[c] for rows [0, R) and keys [0, n).
template <class Arch, class KV>
void values(const plan& pl, const float* p, const KV* v0, std::int64_t vs, std::int64_t n, float* acc) {
  const std::int64_t Dv = pl.d.Dv;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < pl.R; ++r) simd::axpy<Arch>(p[r * decode_chunk + j], v0 + j * vs, acc + r * pl.Dvpad, Dv);
  } else {
    constexpr std::int64_t W = simd::width<Arch>;
    constexpr int RT = value_tile<Arch>::row_tile, U = value_tile<Arch>::slices;
    const std::int64_t Dvfull = Dv / W * W;
    // Rows [r0, r0 + Rows) over the key block [j0, j0 + nk), Dv in tiles of U batches.
    auto rows = [&]<int Rows>(std::int64_t r0, std::int64_t j0, std::int64_t nk, std::integral_constant<int, Rows>) {
      const float* pr = p + r0 * decode_chunk + j0;
      const KV* vr = v0 + j0 * vs;
      float* ar = acc + r0 * pl.Dvpad;
      std::int64_t c = 0;
      for (; c + U * W <= Dvfull; c += U * W) value_tile_pass<Arch, Rows, U, false>(pr, vr + c, vs, nk, ar + c, pl.Dvpad, W);
      for (; c < Dvfull; c += W) value_tile_pass<Arch, Rows, 1, false>(pr, vr + c, vs, nk, ar + c, pl.Dvpad, W);
      if (c < Dv) value_tile_pass<Arch, Rows, 1, true>(pr, vr + c, vs, nk, ar + c, pl.Dvpad, Dv - c);
    };
    for (std::int64_t j0 = 0; j0 < n; j0 += value_key_block) {
      const std::int64_t nk = std::min(value_key_block, n - j0);
      for (std::int64_t j = j0 + value_key_block; j < std::min(n, j0 + 2 * value_key_block); ++j)
        prefetch(v0 + j * vs, Dv * static_cast<std::int64_t>(sizeof(KV)));
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

// One work item: the partial result of kv head hk of batch b over the keys [j0, j0 + n).
// po [R, Dvpad] partial outputs, lse_at(r) the partial lse of row r, s [Rpad, decode_chunk] scratch,
// pp [R, decode_chunk] the chunk's probabilities of rows [first_summed, R) for the side output
// (null: not wanted).
template <class Arch, int RowTile, class KV, class Mod, class LseAt>
void chunk(const plan& pl, const float* qs, view<const KV, 4> k, view<const KV, 4> v, std::int64_t b,
           std::int64_t hk, std::int64_t j0, std::int64_t n, tile cls, const Mod& mod, float* s, float* po,
           LseAt&& lse_at, float* pp, std::int64_t first_summed) {
  const dims& d = pl.d;
  scores<Arch, RowTile>(pl, qs, k.ptr(b, hk, j0), k.stride(2), n, s);
  for (std::int64_t r = 0; r < pl.R; ++r) {
    float* sr = s + r * decode_chunk;
    const std::int64_t h = hk * d.group() + r / d.Lq;
    const std::int64_t qp = r % d.Lq + d.offset();
    if constexpr (has_score<Mod>)
      for (std::int64_t j = 0; j < n; ++j) sr[j] = mods::score(mod, sr[j], h, qp, j0 + j);
    if (cls == tile::partial)
      for (std::int64_t j = 0; j < n; ++j)
        if (!mods::visible(mod, qp, j0 + j)) sr[j] = minus_inf;
    float m = simd::reduce_max<Arch>(sr, n);
    // NaN scores (NaN in q, k or a score mod) must make the row NaN, never fully masked. x86 max
    // drops NaN, so m alone cannot tell; but a finite m puts every NaN score into the sum of exps
    // (exp(NaN - m) = NaN), and a NaN m into every term. Only m = -inf, where exp_sum would zero
    // the row, needs a look at the scores: one compare per score, on rows the chunk hides anyway.
    // Standard decode shape (Lk = 32768, Hq = 32, Hkv = 8, D = 128, 1 thread, least CPU time of 8
    // alternated runs): f32 K/V 23.9 ms with these checks, 24.2 ms without; f16 9.4 and 9.7 ms.
    if (m == minus_inf && std::any_of(sr, sr + n, [](float x) { return std::isnan(x); }))
      m = std::numeric_limits<float>::quiet_NaN();
    const float l = simd::exp_sum<Arch>(sr, n, m);  // zero (and sr zeroed) for a row with nothing visible
    if (l > 0) {
      simd::scale<Arch>(1.0f / l, sr, n);
      lse_at(r) = m + std::log(l);
    } else if (std::isnan(l)) {  // the merge turns a NaN partial lse into a NaN row (out and lse)
      lse_at(r) = std::numeric_limits<float>::quiet_NaN();
    } else {
      lse_at(r) = minus_inf;
    }
    if (pp && r % d.Lq >= first_summed) std::copy_n(sr, n, pp + r * decode_chunk);
  }
  std::fill(po, po + pl.R * pl.Dvpad, 0.0f);
  values<Arch>(pl, s, v.ptr(b, hk, j0), v.stride(2), n, po);
}

template <class Arch, int RowTile, class KV, class Mod>
void run(const dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v, view<float, 4> out,
         view<float, 3> lse, const Mod& mod, int threads, decode_workspace& ws, const column_sums& cs) {
  constexpr std::int64_t W = lanes<Arch>;
  constexpr std::int64_t align = 64 / sizeof(float);
  plan pl{d, 0, 0, 0, 0, 0};
  pl.R = d.group() * d.Lq;
  pl.Rpad = round_up(pl.R, RowTile);
  pl.Dpad = round_up(d.D, W);
  pl.Dvpad = round_up(d.Dv, W);

  // The chunks some row can see, classified once for all heads (a mask depends on positions only).
  const std::int64_t n_chunks = (d.Lk + decode_chunk - 1) / decode_chunk;
  std::vector<std::int64_t> live_start;
  std::vector<tile> live_class;
  for (std::int64_t c = 0; c < n_chunks; ++c) {
    const std::int64_t j0 = c * decode_chunk, j1 = std::min(d.Lk, j0 + decode_chunk);
    const tile t = mods::classify(mod, d.offset(), d.offset() + d.Lq, j0, j1);
    if (t == tile::empty) continue;
    live_start.push_back(j0);
    live_class.push_back(t);
  }
  pl.live = static_cast<std::int64_t>(live_start.size());

  const std::int64_t groups = d.B * d.Hkv;
  const std::int64_t items = groups * pl.live;
  const std::int64_t first_summed = cs.first_row(d.Lq);
  float* pp_all = nullptr;  // side output: per item [R, decode_chunk] chunk probabilities

  // Every row of (b, hk) merges its chunks in chunk order. After merge_row, w[c] holds the merge
  // weight exp(lse_c - lse) of chunk c, which turns the chunk's probabilities into final ones.
  auto merge_group = [&](std::int64_t g, float* po, float* plse) {
    const std::int64_t b = g / d.Hkv;
    if (cs.wanted() && d.Lk > 0)
      for (std::int64_t h = (g % d.Hkv) * d.group(); h < (g % d.Hkv + 1) * d.group(); ++h)
        std::fill_n(cs.sums.ptr(b, h, 0), d.Lk, 0.0f);
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const std::int64_t h = (g % d.Hkv) * d.group() + r / d.Lq, i = r % d.Lq;
      float* w = pl.live ? plse + (g * pl.R + r) * pl.live : nullptr;
      const float* parts = pl.live ? po + (g * pl.live * pl.R + r) * pl.Dvpad : nullptr;
      merge_row<Arch>(
          pl.live, [&](std::int64_t p) { return parts + p * pl.R * pl.Dvpad; }, [&](std::int64_t p) { return w[p]; },
          w, d.Dv, out.ptr(b, h, i), lse.empty() ? nullptr : lse.ptr(b, h, i));
      if (!cs.wanted() || i < first_summed) continue;
      for (std::int64_t c = 0; c < pl.live; ++c) {
        if (!(w[c] > 0)) continue;  // an empty chunk; -inf (every chunk empty: merge_row left w as lse)
        const std::int64_t j0 = live_start[static_cast<std::size_t>(c)], n = std::min(decode_chunk, d.Lk - j0);
        simd::axpy<Arch>(w[c], pp_all + ((g * pl.live + c) * pl.R + r) * decode_chunk, cs.sums.ptr(b, h, j0), n);
      }
    }
  };
  if (pl.live == 0) {  // no key visible to any row: every row is 0 / -inf
    for (std::int64_t g = 0; g < groups; ++g) merge_group(g, nullptr, nullptr);
    return;
  }

  // Workspace: partial outputs [B, Hkv, live, R, Dvpad], partial lse [B, Hkv, R, live] (each row's
  // lse contiguous: the merge turns them into weights in place), and per thread slot the scaled
  // queries of its current group [Rpad, Dpad] and one score block [Rpad, decode_chunk].
  const std::int64_t slots = std::clamp<std::int64_t>(resolve_threads(threads), 1, items);
  const std::int64_t po_size = round_up(items * pl.R * pl.Dvpad, align);
  const std::int64_t pl_size = round_up(items * pl.R, align);
  const std::int64_t q_size = round_up(pl.Rpad * pl.Dpad, align);
  const std::int64_t s_size = round_up(pl.Rpad * decode_chunk, align);
  const std::int64_t pp_size = cs.wanted() ? round_up(items * pl.R * decode_chunk, align) : 0;
  float* po = ws.reserve(po_size + pl_size + slots * (q_size + s_size) + pp_size);
  float* plse = po + po_size;
  float* scratch = plse + pl_size;
  if (cs.wanted()) pp_all = scratch + slots * (q_size + s_size);

  // Chunks still to be computed per group: the thread that finishes a group's last chunk merges
  // that group, so one parallel region does everything (a second region would wait for the
  // slowest thread once more). The acq_rel fetch_sub makes every partial of the group visible to
  // the merging thread.
  const std::unique_ptr<std::atomic<std::int64_t>[]> pending(new std::atomic<std::int64_t>[groups]);
  for (std::int64_t g = 0; g < groups; ++g) pending[g].store(pl.live, std::memory_order_relaxed);

  // Work items in (b, hk, chunk) order are handed out one at a time from a shared counter, so a
  // thread that starts late (its core busy with another process) simply takes fewer. With fixed
  // ranges instead, 2 threads took 7.6 ms at Lk = 4096 where 1 thread took 1.4 ms on this shared
  // 2-core machine. Each slot has its own scratch; no result depends on which thread ran an item.
  std::atomic<std::int64_t> next{0};
  parallel_for(
      slots,
      [&](std::int64_t t) {
        float* qs = scratch + t * (q_size + s_size);  // q of group `loaded`, scaled, zero padded
        float* s = qs + q_size;
        std::int64_t loaded = -1;
        for (std::int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < items;) {
          const std::int64_t g = it / pl.live, c = it % pl.live, b = g / d.Hkv, hk = g % d.Hkv;
          if (g != loaded) {
            std::fill(qs, qs + pl.Rpad * pl.Dpad, 0.0f);
            for (std::int64_t r = 0; r < pl.R; ++r) {
              const float* src = q.ptr(b, hk * d.group() + r / d.Lq, r % d.Lq);
              for (std::int64_t e = 0; e < d.D; ++e) qs[r * pl.Dpad + e] = d.scale * src[e];
            }
            loaded = g;
          }
          const std::int64_t j0 = live_start[static_cast<std::size_t>(c)];
          float* lse_g = plse + g * pl.R * pl.live;
          chunk<Arch, RowTile>(pl, qs, k, v, b, hk, j0, std::min(decode_chunk, d.Lk - j0),
                               live_class[static_cast<std::size_t>(c)], mod, s, po + it * pl.R * pl.Dvpad,
                               [&](std::int64_t r) -> float& { return lse_g[r * pl.live + c]; },
                               pp_all ? pp_all + it * pl.R * decode_chunk : nullptr, first_summed);
          if (pending[g].fetch_sub(1, std::memory_order_acq_rel) == 1) merge_group(g, po, plse);
        }
      },
      static_cast<int>(slots));
}

}  // namespace decode_detail

// ---------------------------------------------------------------------------------------------
// Public API.

// Split-KV decode: attention of Lq <= decode_max_rows query rows against Lk keys, the same result
// as attention::reference (to f32 rounding) and bit-identical for every options.threads.
// K/V elements may be float, f16 or bf16; any view with a contiguous innermost dimension works.
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void decode(view<const float, 4> q,   // [B, Hq, Lq, D]
            view<const KV, 4> k,      // [B, Hkv, Lk, D]
            view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
            view<float, 4> out,       // [B, Hq, Lq, Dv]
            view<float, 3> lse,       // [B, Hq, Lq] or empty
            const Mod& mod, const options& opt, decode_workspace& ws,
            const column_sums& cs = {}) {  // optional side output, see the header
  constexpr const char* fn = "attention::decode";
  const dims d = detail::check_args(fn, q, k, v, out, lse, mod, opt);
  mnemo::detail::require(d.Lq <= decode_max_rows, fn, ": q.shape[2] (Lq) must be <= ", decode_max_rows,
                         " (decode_max_rows; use a prefill kernel for more rows), got ", d.Lq);
  detail::check_column_sums(fn, d, cs, q, k, v, out, lse);
  if (d.B == 0 || d.Lq == 0) {  // no row: nothing attended
    if (cs.wanted() && d.Lk > 0)
      for (std::int64_t b = 0; b < d.B; ++b)
        for (std::int64_t h = 0; h < d.Hq; ++h) std::fill_n(cs.sums.ptr(b, h, 0), d.Lk, 0.0f);
    return;
  }
  if constexpr (prebuilt::covers<KV, Mod>) {  // a program built below the CPU's level (prebuilt.hpp)
    const simd::level want = simd::resolve_level(opt.isa);
    if (prebuilt::above<TuArch>(want))
      return prebuilt::at_level(want, [&]<class Arch>() {
        prebuilt::decode<Arch, KV, Mod>(d, q, k, v, out, lse, mod, opt.threads, ws, cs);
      });
  }
  const std::int64_t R = d.group() * d.Lq;
  simd::dispatch<TuArch>(opt.isa, [&]<class Arch>() {
    if (R == 1) decode_detail::run<Arch, 1>(d, q, k, v, out, lse, mod, opt.threads, ws, cs);
    else if (R == 2) decode_detail::run<Arch, 2>(d, q, k, v, out, lse, mod, opt.threads, ws, cs);
    else decode_detail::run<Arch, 4>(d, q, k, v, out, lse, mod, opt.threads, ws, cs);
  });
}

// As above, with a workspace of its own (allocated for this call).
template <class KV, class Mod = mods::none, class TuArch = simd::default_arch>
void decode(view<const float, 4> q,   // [B, Hq, Lq, D]
            view<const KV, 4> k,      // [B, Hkv, Lk, D]
            view<const KV, 4> v,      // [B, Hkv, Lk, Dv]
            view<float, 4> out,       // [B, Hq, Lq, Dv]
            view<float, 3> lse = {},  // [B, Hq, Lq] or empty
            const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  decode_workspace ws;
  decode<KV, Mod, TuArch>(q, k, v, out, lse, mod, opt, ws, cs);
}

// Convenience: tensors or views of any constness for k and v.
template <class K, class V, class Mod = mods::none, class TuArch = simd::default_arch>
  requires(!std::is_same_v<K, view<const element_t<K>, 4>>)
void decode(view<const float, 4> q, const K& k, const V& v, view<float, 4> out, view<float, 3> lse = {},
            const Mod& mod = {}, const options& opt = {}, const column_sums& cs = {}) {
  decode<element_t<K>, Mod, TuArch>(q, cview(k), cview(v), out, lse, mod, opt, cs);
}

// Exact merge of two partial results over disjoint key sets (see the header): out and lse may be
// the same views as out_a/lse_a or out_b/lse_b (in place); other overlaps are not allowed. lse
// may be empty when the merged lse is not wanted.
template <class Arch = simd::default_arch>
void merge(view<const float, 4> out_a,  // [B, Hq, Lq, Dv]
           view<const float, 3> lse_a,  // [B, Hq, Lq]
           view<const float, 4> out_b,  // [B, Hq, Lq, Dv]
           view<const float, 3> lse_b,  // [B, Hq, Lq]
           view<float, 4> out,          // [B, Hq, Lq, Dv]
           view<float, 3> lse,          // [B, Hq, Lq] or empty
           int threads = 0) {
  constexpr const char* fn = "attention::merge";
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "out_a", out_a, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_data(fn, "lse_a", lse_a, " [B, Hq, Lq]");
  mnemo::detail::require_data(fn, "out_b", out_b, " [B, Hq, Lq, Dv]");
  mnemo::detail::require_data(fn, "lse_b", lse_b, " [B, Hq, Lq]");
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const shape_t<4> os = out_a.shape();
  const shape_t<3> ls{os[0], os[1], os[2]};
  mnemo::detail::require_shape(fn, "lse_a", lse_a, ls, " [B, Hq, Lq] (from out_a)");
  mnemo::detail::require_shape(fn, "out_b", out_b, os, " [B, Hq, Lq, Dv] (from out_a)");
  mnemo::detail::require_shape(fn, "lse_b", lse_b, ls, " [B, Hq, Lq] (from out_a)");
  mnemo::detail::require_shape(fn, "out", out, os, " [B, Hq, Lq, Dv] (from out_a)");
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, ls, " [B, Hq, Lq] (from out_a)");
  const std::int64_t Hq = os[1], Lq = os[2], Dv = os[3];
  parallel_for(
      os[0] * Hq * Lq,
      [&](std::int64_t row) {
        const std::int64_t b = row / (Hq * Lq), h = row / Lq % Hq, i = row % Lq;
        const float* parts[2] = {out_a.ptr(b, h, i), out_b.ptr(b, h, i)};
        const float lses[2] = {lse_a(b, h, i), lse_b(b, h, i)};
        float w[2];
        decode_detail::merge_row<Arch>(
            2, [&](std::int64_t p) { return parts[p]; }, [&](std::int64_t p) { return lses[p]; }, w, Dv,
            out.ptr(b, h, i), lse.empty() ? nullptr : lse.ptr(b, h, i));
      },
      threads);
}

// Exact N-way merge: parts combined in index order, so the result depends only on the parts and
// their order. outs[p] [B, Hq, Lq, Dv] and lses[p] [B, Hq, Lq]; out may be the same view as one of
// the outs and lse as one of the lses. No parts: out = 0, lse = -inf.
template <class Arch = simd::default_arch>
void merge(std::span<const view<const float, 4>> outs,  // N x [B, Hq, Lq, Dv]
           std::span<const view<const float, 3>> lses,  // N x [B, Hq, Lq]
           view<float, 4> out,                          // [B, Hq, Lq, Dv]
           view<float, 3> lse,                          // [B, Hq, Lq] or empty
           int threads = 0) {
  constexpr const char* fn = "attention::merge";
  using mnemo::detail::require;
  mnemo::detail::require_data(fn, "out", out, " [B, Hq, Lq, Dv]");
  require(outs.size() == lses.size(), fn, ": outs and lses must have the same number of parts, got ", outs.size(),
          " and ", lses.size());
  require(threads >= 0, fn, ": threads must be >= 0, got ", threads);
  const shape_t<4> os = out.shape();
  const shape_t<3> ls{os[0], os[1], os[2]};
  for (std::size_t p = 0; p < outs.size(); ++p) {
    const bool null_out = outs[p].empty() && outs[p].size() != 0, null_lse = lses[p].empty() && lses[p].size() != 0;
    if (null_out || null_lse)
      mnemo::detail::fail(fn, ": ", null_out ? "outs[" : "lses[", p, "] must be a view of memory, got a null view of shape ",
                          null_out ? shape_string(outs[p].shape()) : shape_string(lses[p].shape()));
    if (outs[p].shape() != os)
      mnemo::detail::fail(fn, ": outs[", p, "] must have shape ", shape_string(os), " [B, Hq, Lq, Dv] (from out), got ",
                          shape_string(outs[p].shape()));
    if (lses[p].shape() != ls)
      mnemo::detail::fail(fn, ": lses[", p, "] must have shape ", shape_string(ls), " [B, Hq, Lq] (from out), got ",
                          shape_string(lses[p].shape()));
  }
  if (!lse.empty()) mnemo::detail::require_shape(fn, "lse", lse, ls, " [B, Hq, Lq] (from out)");
  const std::int64_t n = static_cast<std::int64_t>(outs.size());
  const std::int64_t Hq = os[1], Lq = os[2], Dv = os[3], rows = os[0] * Hq * Lq;
  std::vector<float> weights(static_cast<std::size_t>(rows * n));
  parallel_for(
      rows,
      [&](std::int64_t row) {
        const std::int64_t b = row / (Hq * Lq), h = row / Lq % Hq, i = row % Lq;
        decode_detail::merge_row<Arch>(
            n, [&](std::int64_t p) { return outs[static_cast<std::size_t>(p)].ptr(b, h, i); },
            [&](std::int64_t p) { return lses[static_cast<std::size_t>(p)](b, h, i); }, weights.data() + row * n, Dv,
            out.ptr(b, h, i), lse.empty() ? nullptr : lse.ptr(b, h, i));
      },
      threads);
}

}  // namespace mnemo::attention

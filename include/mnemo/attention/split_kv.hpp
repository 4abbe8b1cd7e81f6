// mnemo/attention/split_kv.hpp — the split-KV engine: a few query rows against many keys, read
// through a KV source. attention::decode (strided views), kvcache::decode (the cache's dense and
// KIVI stores) and the selecting decodes (top-k, Loki, Quest, landmark, retrieval: gathered key
// sets) all run on it; a new storage format is a new source, not a new kernel.
//
// The work. A call has B x Hkv groups; group (b, hk) has the R = G * Lq rows that read kv head hk
// (G = Hq / Hkv query heads x Lq query rows; row r = g * Lq + i is query head hk * G + g, row i).
// The source cuts the keys of a group into at most max_key_parts parts (KIVI: the quantized codes,
// then the f32 residual window); the engine cuts every part into chunks of decode_chunk keys — a
// fixed number, never derived from the thread count. Each (b, hk, chunk) is one work item:
//   1. the source writes the scores s = (scale q_r) . k_j of all R rows for the chunk's keys into
//      the engine's score rows (reading each key once for all R rows);
//   2. the engine applies the mod (score mods, then the mask), and the softmax within the chunk:
//      p = exp(s - m) / l, lse_chunk = m + log(l);
//   3. the source accumulates o_chunk = sum_j p_j v_j into the item's partial output.
// Then every row merges its chunks' partials in chunk order (merge_row, merge.hpp), done by the
// thread that finishes the group's last chunk. Items are handed out dynamically, but no value
// depends on which thread computed it and the merge order is fixed, so the result is
// bit-identical for every thread count. Chunks the mod classifies as empty for every row
// (sliding windows, mods::classify) are neither read nor merged.
//
// KV sources. A source S is a small value type that knows where the keys and values of a call
// are and how they are stored:
//   S::per_row_keys          false: every row of a group reads the same keys (a key's position
//                            is its part's offset + its index); true: row r reads its own list
//                            (gathered key sets), s.row_keys(b, hk, r) -> span of key positions.
//   S::row_tiled             whether the score pass tiles rows (the engine pads R to the tile).
//   s.parts(b, hk)           the key counts of the parts of group (b, hk) (key_parts).
//   s.scratch_floats(plan)   floats of per-slot scratch it needs, sized once per call and zeroed
//                            once per slot (thread) before its first item.
//   s.scores<Arch, RowTile>(plan, block, qs, s, scratch)   step 1 for a key_block;
//   s.values<Arch>(plan, block, p, acc, scratch)           step 3 (acc starts at 0); it runs
//                            right after scores() of the same block on the same scratch, so a
//                            source may keep what its scores() found there (row tables).
//   s.query_offset(b)        optional: the position of query row 0 of batch entry b, when the
//                            entries have different key counts (default d.Lk - d.Lq for all).
// Scores are written as s[r * decode_chunk + j]; qs holds the scaled queries [Rpad, Dpad], zero
// padded; acc is [R, Dvpad]. A per-row source writes only the first row_keys(...).size() - j0
// entries of row r; the engine masks the rest. The tile loops a source needs (score_pass,
// value_pass over rows of f32/f16/bf16 elements or of int8/int4 codes) are below; sources only
// say how their rows are found and loaded.
//
// Side output (column sums, reference.hpp): the column sums of the final probabilities over the
// summed query rows. A chunk's probabilities p_c = exp(s - lse_c) are already in its score block
// after step 2; when the side output is wanted they are also copied to a per-item buffer, and the
// merging thread scales them by the merge weight of their chunk, w_c = exp(lse_c - lse) (the
// weights the N-way merge computes anyway), summing over the summed rows of each head at the
// keys' positions. The copy and the rescale are one pass over R x Lk floats each, beside the
// kernel's Lk x (D + Dv) K/V elements (under 1% at Lk = 32768, D = 128); with the side output not
// wanted nothing of it runs.
//
// Numerics: scores, softmax and outputs accumulate in f32; the scale is folded into q once
// (s = (scale q) . k), exp is simd::exp (1 ulp). f16/bf16 K/V are converted to f32 on load and
// never rounded again. NaN in q, k or a score mod makes its row NaN (out and lse), as in the
// reference: a chunk whose scores hold a NaN gets a NaN partial lse and the merge propagates it
// (checked once per row and chunk, on the sum of exps, not per score). A row with no visible key
// gets out = 0, lse = -inf.
//
// Memory traffic: K and V are read once (the bandwidth cost of decode); per item the partial
// results are R * (Dv + 1) floats, about R / (2 * decode_chunk) of the item's K/V bytes at
// D = Dv in f32 (0.4% for the standard G = 4, Lq = 1).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/merge.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
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

// The most query rows (Lq) the decode entry points accept: one step plus speculative draft tokens.
inline constexpr std::int64_t decode_max_rows = 16;

// Scratch memory of the engine (queries, partial results, score rows), kept by a caller that
// decodes many steps so the memory is allocated once. Grows to the largest call; never shrinks.
// One workspace per concurrent caller: two calls running at once must not share one.
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

namespace split_kv {

inline constexpr float minus_inf = -std::numeric_limits<float>::infinity();

inline std::int64_t round_up(std::int64_t n, std::int64_t m) { return (n + m - 1) / m * m; }

// Calls f(std::integral_constant<int, I>{}) for I = 0 .. N-1, unrolled at compile time, so that
// small arrays of batches indexed by I stay in registers.
template <class F, int... I>
[[gnu::always_inline]] inline void unroll_each(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, class F>
[[gnu::always_inline]] inline void unroll(F&& f) {
  unroll_each(f, std::make_integer_sequence<int, N>{});
}

// Floats per batch on the path that runs (1 when the scalar path runs).
template <class Arch>
inline constexpr std::int64_t lanes = simd::lanes<Arch>;

// The fixed sizes of one call, derived once from the validated dims.
struct plan {
  dims d;
  std::int64_t R;      // rows per group: G * Lq, row r = g * Lq + i (query head hk * G + g)
  std::int64_t Rpad;   // R rounded up to the score row tile (padding rows are zero queries)
  std::int64_t Dpad;   // D rounded up to the batch width (zero padding)
  std::int64_t Dvpad;  // Dv rounded up to the batch width
};

template <class Arch>
plan make_plan(const dims& d, int row_tile) {
  const std::int64_t R = d.group() * d.Lq;
  return {d, R, round_up(R, row_tile), round_up(d.D, lanes<Arch>), round_up(d.Dv, lanes<Arch>)};
}

// The keys of one work item, as the engine hands them to a source.
struct key_block {
  std::int64_t b, hk;  // batch, kv head
  int part;            // which part of the group's keys
  std::int64_t j0, n;  // keys [j0, j0 + n) of that part
  std::int64_t pos0;   // position of key j0: the lengths of the earlier parts + j0
};

// The parts a source cuts the keys of one group into, each chunked on its own.
inline constexpr int max_key_parts = 2;
struct key_parts {
  int count = 0;
  std::array<std::int64_t, max_key_parts> length{};
};

template <class S>
concept kv_source = requires(const S& s, const plan& pl, const key_block& kb, const float* in, float* io,
                             std::int64_t i) {
  { S::per_row_keys } -> std::convertible_to<bool>;
  { S::row_tiled } -> std::convertible_to<bool>;
  { s.parts(i, i) } -> std::same_as<key_parts>;
  { s.scratch_floats(pl) } -> std::convertible_to<std::int64_t>;
  s.template scores<simd::scalar_arch, 1>(pl, kb, in, io, io);
  s.template values<simd::scalar_arch>(pl, kb, in, io, io);
} && (!S::per_row_keys || requires(const S& s, std::int64_t i) {
  { s.row_keys(i, i, i) } -> std::same_as<std::span<const std::int64_t>>;
});

// The position of query row 0 of batch entry b: d.offset() = Lk - Lq for every b, unless the source
// has its own (s.query_offset(b): a batch of sequences of different lengths in one call, each
// with its queries at its own end, as attention::paged runs them).
template <class S>
std::int64_t query_offset(const S& s, const dims& d, std::int64_t b) {
  if constexpr (requires { { s.query_offset(b) } -> std::convertible_to<std::int64_t>; }) return s.query_offset(b);
  else return d.offset();
}

// ---------------------------------------------------------------------------------------------
// Tiles of the score and value passes.

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
// rows[haddp_order<Arch>[l]]. xsimd 8.1's avx512f haddp returns the sums of rows 0, 1, 4, 5, 2, 3,
// 6, 7, 8, 9, 12, 13, 10, 11, 14, 15; its SSE and AVX versions keep the order. A compile-time
// table, so the score pass can hand haddp its accumulators pre-permuted (a register renaming) and
// store the sums in row order; haddp_order_probed computes the same from haddp itself, and the
// split-KV test holds the table to it at every level.
template <class Arch>
inline constexpr std::array<int, lanes<Arch>> haddp_order = [] {
  std::array<int, lanes<Arch>> order{};
  if constexpr (lanes<Arch> == 16) {
    order = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
  } else {
    for (std::size_t l = 0; l < order.size(); ++l) order[l] = static_cast<int>(l);
  }
  return order;
}();

template <class Arch>
std::array<int, lanes<Arch>> haddp_order_probed() {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t W = simd::width<Arch>;
  batch rows[W];
  for (std::int64_t i = 0; i < W; ++i) rows[i] = batch(static_cast<float>(i));
  alignas(64) float sums[W];
  xsimd::haddp(rows).store_aligned(sums);
  std::array<int, lanes<Arch>> order{};
  for (std::int64_t l = 0; l < W; ++l) order[static_cast<std::size_t>(l)] = static_cast<int>(sums[l]) / static_cast<int>(W);  // W * i, exact
  return order;
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

// Asks for the cache lines of bytes [p, p + n) in L2 (a hint: never faults, never changes a
// result). L2, not L1 (prefetcht1, not prefetcht0): an L1 prefetch holds one of the core's few L1
// miss buffers for the whole memory latency, which capped a pass at about half the read bandwidth.
// AMD EPYC Zen 4, standard decode shape, f32, 1 thread, best of 30: the score pass alone (V not
// read) 16.3 ms into L1, 11.4 ms into L2; the whole decode 31.5 -> 24.2 ms.
inline void prefetch(const void* p, std::int64_t n) {
  constexpr std::int64_t line = 64;
  const char* c = static_cast<const char*>(p);
  for (std::int64_t b = 0; b < n; b += line) __builtin_prefetch(c + b, 0, 2);
}

// "Nothing else to prefetch" for the score pass's `also` rows (below).
struct no_rows {};

// Rows of f32 / f16 / bf16 elements (keys or values), `stride` elements apart, `len` used per row.
template <class Arch, class T>
struct element_rows {
  using elem = T;
  static constexpr bool has_pairs = false;  // no pair order: pair_end() is 0, load_pair never runs
  const T* base;
  std::int64_t stride;
  std::int64_t len;

  const T* row(std::int64_t j) const { return base + j * stride; }
  element_rows from(std::int64_t j) const { return {row(j), stride, len}; }  // rows j, j + 1, ...
  std::int64_t row_bytes() const { return len * static_cast<std::int64_t>(sizeof(T)); }
  std::int64_t pair_end() const { return 0; }  // no pair order
  simd::fbatch<Arch> load(const T* p, std::int64_t c) const { return simd::load<Arch>(p + c); }
  simd::fbatch<Arch> load_partial(const T* p, std::int64_t c, std::int64_t n) const {
    return simd::load_partial<Arch>(p + c, n);
  }
  void load_pair(const T*, std::int64_t, simd::fbatch<Arch>&, simd::fbatch<Arch>&) const {}
  float dot(const float* q, const T* p, std::int64_t n) const { return simd::dot<Arch>(q, p, n); }
  void axpy(float a, const T* p, std::int64_t c0, std::int64_t c1, float* acc) const {
    simd::axpy<Arch>(a, p + c0, acc + c0, c1 - c0);
  }
};

// Rows of f32 / f16 / bf16 elements found through a table of row pointers (rows[j]: row j), for
// sources whose rows are not evenly spaced (the pages of attention::paged): the tile loops run over
// a whole chunk at once instead of once per run of rows in one page.
template <class Arch, class T>
struct pointer_rows : element_rows<Arch, T> {
  const T* const* rows;

  pointer_rows(const T* const* rows_, std::int64_t len_) : element_rows<Arch, T>{nullptr, 0, len_}, rows(rows_) {}
  const T* row(std::int64_t j) const { return rows[j]; }
  pointer_rows from(std::int64_t j) const { return {rows + j, this->len}; }
};

// The score pass: s[r * lds + j] = qs_r . key_j (+ bias[r], unless bias is nullptr) for rows
// [0, Rpad) (R real ones: the scalar path computes only those) and keys j in [0, n) of `keys`
// (element_rows, or code rows in kvcache/decode.hpp: channels [0, pair_end()) are read two batches
// at a time in the loader's pair order, which qs must follow there). qs rows are qstride floats
// apart, 64-byte aligned and zero padded to whole batches. Whether there is a bias is a
// compile-time fact: with a run-time test in the store loop below, the f32 decode at the standard
// shape (1 thread) took 1.35x as long (the loop of 16 stores per tile no longer vectorized).
// `also` (any rows type, or no_rows) is prefetched in step with the keys: the values of the same
// keys, which the value pass reads next. The memory then streams K and V during the score pass,
// and the value pass finds V in L2 (standard decode shape, f32, 1 thread: 24.2 -> 20.0 ms).
template <class Arch, int RowTile, class Rows, class Bias = std::nullptr_t, class Also = no_rows>
void score_pass(std::int64_t R, std::int64_t Rpad, const float* qs, std::int64_t qstride, std::int64_t D,
                const Rows& keys, std::int64_t n, Bias bias, float* s, std::int64_t lds, const Also& also = {}) {
  constexpr bool biased = !std::is_same_v<Bias, std::nullptr_t>;
  using elem = typename Rows::elem;
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < R; ++r)
        if constexpr (biased) s[r * lds + j] = keys.dot(qs + r * qstride, keys.row(j), D) + bias[r];
        else s[r * lds + j] = keys.dot(qs + r * qstride, keys.row(j), D);
  } else {
    using batch = simd::fbatch<Arch>;
    using tile = score_tile<Arch, RowTile>;
    constexpr int RT = tile::row_tile, KB = tile::key_tile;
    constexpr std::int64_t W = simd::width<Arch>;
    const std::int64_t Dfull = D / W * W, P = keys.pair_end();
    constexpr std::array<int, W> order = haddp_order<Arch>;
    for (std::int64_t j = 0; j < n; j += KB) {
      const elem* kr[KB];
      unroll<KB>([&](auto kk) { kr[kk] = keys.row(std::min<std::int64_t>(j + kk, n - 1)); });  // tail: repeat the last key
      const std::int64_t valid = std::min<std::int64_t>(KB, n - j);
      for (std::int64_t kk = j + prefetch_keys; kk < std::min(n, j + prefetch_keys + KB); ++kk) {
        prefetch(keys.row(kk), keys.row_bytes());
        if constexpr (!std::is_same_v<Also, no_rows>) prefetch(also.row(kk), also.row_bytes());
      }
      for (std::int64_t r0 = 0; r0 < Rpad; r0 += RT) {
        const float* q0 = qs + r0 * qstride;
        batch acc[W];
        for (auto& a : acc) a = batch(0.0f);
        // One D slice of the tile: acc[r * KB + kk] += q_r . k_kk over [c, c + W).
        auto step = [&](std::int64_t c, auto load_k) {
          batch kb[KB];
          unroll<KB>([&](auto kk) { kb[kk] = load_k(kr[kk]); });
          unroll<RT>([&](auto r) {
            batch qb = batch::load_aligned(q0 + r * qstride + c);
            simd::detail::in_register(qb);  // one load for the KB FMAs, not one each (see below)
            unroll<KB>([&](auto kk) { acc[r * KB + kk] = simd::detail::fmadd(qb, kb[kk], acc[r * KB + kk]); });
          });
        };
        std::int64_t c = 0;
        if constexpr (Rows::has_pairs) {
          for (; c < P; c += 2 * W) {  // two batches of channels per load, in the loader's pair order
            batch k1[KB], k2[KB];
            unroll<KB>([&](auto kk) { keys.load_pair(kr[kk], c, k1[kk], k2[kk]); });
            unroll<RT>([&](auto r) {
              batch q1 = batch::load_aligned(q0 + r * qstride + c), q2 = batch::load_aligned(q0 + r * qstride + c + W);
              simd::detail::in_register(q1);
              simd::detail::in_register(q2);
              unroll<KB>([&](auto kk) {
                acc[r * KB + kk] = simd::detail::fmadd(q2, k2[kk], simd::detail::fmadd(q1, k1[kk], acc[r * KB + kk]));
              });
            });
          }
        }
        for (; c < Dfull; c += W) step(c, [&](const elem* p) { return keys.load(p, c); });
        if (c < D) step(c, [&](const elem* p) { return keys.load_partial(p, c, D - c); });
        // haddp takes the batches through a pointer: handing it a copy keeps `acc` itself in
        // registers through the D loop (with acc passed directly, GCC 12 kept every accumulator in
        // memory and a K-only decode ran 1.5x slower in cache). The copy is in haddp's order, so
        // lane a of the sums is accumulator a = r * KB + kk: each row's KB scores are adjacent.
        batch rows[W];
        unroll<W>([&](auto l) { rows[order[l]] = acc[l]; });
        alignas(64) float sums[W];
        xsimd::haddp(rows).store_aligned(sums);
        // Each row's KB sums are adjacent: one copy per row (a 16-byte move on AVX-512), not KB
        // scalar stores. With q kept in registers above (in_register), the cache decode at the
        // standard shape (1 thread, Zen 4, Lk = 32768, best of 20) went f16 12.2 -> 11.0 ms, int8
        // 10.9 -> 9.6, int4 10.4 -> 9.4, f32 20.3 -> 19.8.
        if constexpr (biased) for (std::int64_t a = 0; a < RT * KB; ++a) sums[a] += bias[r0 + a / KB];
        unroll<RT>([&](auto r) {
          float* row = s + (r0 + r) * lds + j;
          const float* from = sums + r * KB;
          if (valid == KB) std::memcpy(row, from, KB * sizeof(float));
          else std::memcpy(row, from, static_cast<std::size_t>(valid) * sizeof(float));
        });
      }
    }
  }
}

// Rows [0, RT) x channels [c, c + U W) of the value pass over keys [0, nk) of v:
// acc[r * Dvpad + c'] += sum_j coef[(r * NG + g(c')) * lds + j] v_j[c'], g(c') = c' / VG.
// Pair: channels (and acc) in the loader's pair order (U even). OneGroup: the tile lies in one
// group, so one broadcast of the coefficient serves all U batches of a row. Partial: U = 1 and
// only `tail` lanes of v are read.
template <class Arch, int RT, int U, bool Partial, bool Pair, bool OneGroup, class Rows>
[[gnu::flatten]] void value_tile_pass(const float* coef, std::int64_t NG, std::int64_t VG, std::int64_t lds, const Rows& v,
                     std::int64_t c, std::int64_t nk, float* acc, std::int64_t Dvpad, std::int64_t tail) {
  using batch = simd::fbatch<Arch>;
  constexpr std::int64_t W = simd::width<Arch>;
  static_assert(!Partial || U == 1, "value_tile_pass: only a single-batch tile may be partial");
  static_assert(!Pair || U % 2 == 0, "value_tile_pass: the pair order needs an even number of batches");
  // The group of channel c; one group (plain attention) needs no division (AVX2 f32 decode: the two
  // divisions per tile cost 8% at the standard shape).
  auto group = [&](std::int64_t ch) { return NG == 1 ? 0 : ch / VG; };
  const float* cp[RT * U];
  unroll<RT>([&](auto r) {
    unroll<U>([&](auto u) { cp[r * U + u] = coef + (r * NG + group(OneGroup ? c : c + u * W)) * lds; });
  });
  batch a[RT * U];
  unroll<RT>([&](auto r) { unroll<U>([&](auto u) { a[r * U + u] = batch::load_aligned(acc + r * Dvpad + c + u * W); }); });
  for (std::int64_t j = 0; j < nk; ++j) {
    const auto* vj = v.row(j);
    batch vb[U];
    if constexpr (Pair) {
      unroll<U / 2>([&](auto u) { v.load_pair(vj, c + 2 * u * W, vb[2 * u], vb[2 * u + 1]); });
    } else {
      unroll<U>([&](auto u) {
        if constexpr (Partial) vb[u] = v.load_partial(vj, c, tail);
        else vb[u] = v.load(vj, c + u * W);
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

// The value pass: acc[r * Dvpad + c] += sum_j coef[(r * NG + c / VG) * lds + j] v_j[c] for rows
// [0, R), channels [0, Dv) and keys [0, n) of `v`. Plain attention has one group (NG = 1,
// VG >= Dv) and coef = p; KIVI values have per-token groups of VG channels. Channels
// [0, v.pair_end()) are read and accumulated in the loader's pair order.
template <class Arch, class Rows>
void value_pass(std::int64_t R, const float* coef, std::int64_t NG, std::int64_t VG, std::int64_t lds, std::int64_t Dv,
                std::int64_t Dvpad, const Rows& v, std::int64_t n, float* acc) {
  if constexpr (!simd::vectorized<Arch>) {
    for (std::int64_t j = 0; j < n; ++j)
      for (std::int64_t r = 0; r < R; ++r)
        for (std::int64_t g = 0; g < NG; ++g)
          v.axpy(coef[(r * NG + g) * lds + j], v.row(j), g * VG, std::min(Dv, (g + 1) * VG), acc + r * Dvpad);
  } else {
    constexpr std::int64_t W = simd::width<Arch>;
    constexpr int RT = value_tile<Arch>::row_tile, U = value_tile<Arch>::slices;
    const std::int64_t Dvfull = Dv / W * W, P = v.pair_end();
    // Rows [r0, r0 + Rows) over the key block [j0, j0 + nk), Dv in tiles of U batches.
    auto rows = [&]<int N>(std::int64_t r0, std::int64_t j0, std::int64_t nk, std::integral_constant<int, N>) {
      const float* cr = coef + r0 * NG * lds + j0;
      const Rows vr = v.from(j0);
      float* ar = acc + r0 * Dvpad;
      std::int64_t c = 0;
      auto wide = [&]<bool Pair>(std::bool_constant<Pair>) {
        if (NG == 1 || c / VG == (c + U * W - 1) / VG) value_tile_pass<Arch, N, U, false, Pair, true>(cr, NG, VG, lds, vr, c, nk, ar, Dvpad, W);
        else value_tile_pass<Arch, N, U, false, Pair, false>(cr, NG, VG, lds, vr, c, nk, ar, Dvpad, W);
      };
      for (; c < P; c += U * W) wide(std::true_type{});
      for (; c + U * W <= Dvfull; c += U * W) wide(std::false_type{});
      for (; c < Dvfull; c += W) value_tile_pass<Arch, N, 1, false, false, true>(cr, NG, VG, lds, vr, c, nk, ar, Dvpad, W);
      if (c < Dv) value_tile_pass<Arch, N, 1, true, false, true>(cr, NG, VG, lds, vr, c, nk, ar, Dvpad, Dv - c);
    };
    for (std::int64_t j0 = 0; j0 < n; j0 += value_key_block) {
      const std::int64_t nk = std::min(value_key_block, n - j0);
      for (std::int64_t j = j0 + value_key_block; j < std::min(n, j0 + 2 * value_key_block); ++j)
        prefetch(v.row(j), v.row_bytes());
      std::int64_t r0 = 0;
      for (; r0 + RT <= R; r0 += RT) rows(r0, j0, nk, std::integral_constant<int, RT>{});
      switch (R - r0) {
        case 3: rows(r0, j0, nk, std::integral_constant<int, 3>{}); break;
        case 2: rows(r0, j0, nk, std::integral_constant<int, 2>{}); break;
        case 1: rows(r0, j0, nk, std::integral_constant<int, 1>{}); break;
        default: break;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// The engine.

// Where the column sums go: sums [B, Hq, >= width], the query rows i >= first_row summed, columns
// [0, width) of every head zeroed first (key positions no row reads stay 0).
struct sums_out {
  view<float, 3> sums;  // empty: not wanted
  std::int64_t first_row = 0;
  std::int64_t width = 0;
  bool wanted() const { return !sums.empty(); }
};

namespace detail {

// One work item: keys [j0, j0 + n) of part `part` of group g, classified by the mod.
struct item {
  std::int64_t g, j0, n, pos0;
  int part;
  tile cls;
};

// Steps 2 of one item for rows [0, R): per-row key counts (gathered sources), the mod, the
// softmax in place (p = exp(s - m) / l) with lse_at(r) = m + log l (NaN for a row with a NaN
// score, -inf for a row with nothing visible), and the copy of the summed rows to pp.
template <class Arch, class Source, class Mod, class LseAt>
void softmax_rows(const plan& pl, const Source& src, const key_block& kb, tile cls, const Mod& mod, float* s,
                  LseAt&& lse_at, float* pp, std::int64_t first_summed) {
  const dims& d = pl.d;
  for (std::int64_t r = 0; r < pl.R; ++r) {
    float* sr = s + r * decode_chunk;
    const std::int64_t h = kb.hk * d.group() + r / d.Lq, qp = r % d.Lq + query_offset(src, d, kb.b);
    std::int64_t n = kb.n;
    const std::int64_t* keys = nullptr;  // per-row sources: row r's key positions from j0
    if constexpr (Source::per_row_keys) {
      const std::span<const std::int64_t> all = src.row_keys(kb.b, kb.hk, r);
      n = std::clamp<std::int64_t>(static_cast<std::int64_t>(all.size()) - kb.j0, 0, kb.n);
      keys = all.data() + kb.j0;
      std::fill(sr + n, sr + kb.n, minus_inf);
    }
    auto pos = [&](std::int64_t j) { return Source::per_row_keys ? keys[j] : kb.pos0 + j; };
    if constexpr (has_score<Mod>)
      for (std::int64_t j = 0; j < n; ++j) sr[j] = mods::score(mod, sr[j], h, qp, pos(j));
    if (cls == tile::partial)
      for (std::int64_t j = 0; j < n; ++j)
        if (!mods::visible(mod, h, qp, pos(j))) sr[j] = minus_inf;
    float m = simd::reduce_max<Arch>(sr, kb.n);
    // NaN scores (NaN in q, k or a score mod) must make the row NaN, never fully masked. x86 max
    // drops NaN, so m alone cannot tell; but a finite m puts every NaN score into the sum of exps
    // (exp(NaN - m) = NaN), and a NaN m into every term. Only m = -inf, where exp_sum would zero
    // the row, needs a look at the scores: one compare per score, on rows the chunk hides anyway.
    // Standard decode shape (Lk = 32768, Hq = 32, Hkv = 8, D = 128, 1 thread, least CPU time of 8
    // alternated runs): f32 K/V 23.9 ms with these checks, 24.2 ms without; f16 9.4 and 9.7 ms.
    if (m == minus_inf && std::any_of(sr, sr + kb.n, [](float x) { return std::isnan(x); }))
      m = std::numeric_limits<float>::quiet_NaN();
    const float l = simd::exp_sum<Arch>(sr, kb.n, m);  // zero (and sr zeroed) for a row with nothing visible
    if (l > 0) {
      simd::scale<Arch>(1.0f / l, sr, kb.n);
      lse_at(r) = m + std::log(l);
    } else if (std::isnan(l)) {  // the merge turns a NaN partial lse into a NaN row (out and lse)
      lse_at(r) = std::numeric_limits<float>::quiet_NaN();
    } else {
      lse_at(r) = minus_inf;
    }
    if (pp && r % d.Lq >= first_summed) std::copy_n(sr, kb.n, pp + r * decode_chunk);
  }
}

// Whether any of the R partial lse values lse_at(r) is NaN.
template <class LseAt>
bool any_nan(std::int64_t R, LseAt&& lse_at) {
  for (std::int64_t r = 0; r < R; ++r)
    if (std::isnan(lse_at(r))) return true;
  return false;
}

}  // namespace detail

// The engine for one row tile (see the header): q [B, Hq, Lq, D] (only the rows of the call),
// out [B, Hq, Lq, Dv], lse [B, Hq, Lq] or empty. d holds the validated sizes; d.Lk is the key
// position range the mod sees (query row i sits at position i + d.Lk - d.Lq).
template <class Arch, int RowTile, kv_source Source, class Mod>
void run(const dims& d, const Source& src, view<const float, 4> q, view<float, 4> out, view<float, 3> lse,
         const Mod& mod, int threads, decode_workspace& ws, const sums_out& cs, view<const float, 1> sinks = {}) {
  constexpr std::int64_t align = 64 / sizeof(float);
  const plan pl = make_plan<Arch>(d, RowTile);
  const std::int64_t groups = d.B * d.Hkv, G = d.group();

  // Work items in (b, hk, part, chunk) order; each group's items are contiguous. Chunks the mod
  // hides from every row are left out (a per-row source is classified over all positions).
  std::vector<detail::item> items;
  std::vector<std::int64_t> base(static_cast<std::size_t>(groups) + 1, 0);
  for (std::int64_t g = 0; g < groups; ++g) {
    const key_parts parts = src.parts(g / d.Hkv, g % d.Hkv);
    const std::int64_t q_pos = query_offset(src, d, g / d.Hkv);
    std::int64_t pos = 0;
    for (int p = 0; p < parts.count; ++p) {
      const std::int64_t len = parts.length[static_cast<std::size_t>(p)];
      for (std::int64_t j0 = 0; j0 < len; j0 += decode_chunk) {
        const std::int64_t n = std::min(decode_chunk, len - j0);
        const tile t = Source::per_row_keys ? mods::classify(mod, q_pos, q_pos + d.Lq, 0, d.Lk)
                                            : mods::classify(mod, q_pos, q_pos + d.Lq, pos + j0, pos + j0 + n);
        if (t != tile::empty) items.push_back({g, j0, n, pos + j0, p, t});
      }
      pos += len;
    }
    base[static_cast<std::size_t>(g) + 1] = static_cast<std::int64_t>(items.size());
  }
  const std::int64_t n_items = static_cast<std::int64_t>(items.size());
  auto count = [&](std::int64_t g) { return base[static_cast<std::size_t>(g) + 1] - base[static_cast<std::size_t>(g)]; };

  // Workspace: partial outputs [items, R, Dvpad], partial lse (per group [R, items of the group],
  // each row's lse contiguous: the merge turns them into weights in place), per thread slot the
  // scaled queries of its current group [Rpad, Dpad], one score block [Rpad, decode_chunk] and the
  // source's scratch, and for the side output the items' probabilities [items, R, decode_chunk].
  const std::int64_t slots = std::clamp<std::int64_t>(resolve_threads(threads), 1, std::max<std::int64_t>(n_items, 1));
  const std::int64_t po_size = round_up(n_items * pl.R * pl.Dvpad, align);
  const std::int64_t pl_size = round_up(n_items * pl.R, align);
  const std::int64_t q_size = round_up(pl.Rpad * pl.Dpad, align);
  const std::int64_t s_size = round_up(pl.Rpad * decode_chunk, align);
  const std::int64_t src_size = round_up(src.scratch_floats(pl), align);
  const std::int64_t slot_size = q_size + s_size + src_size;
  const std::int64_t pp_size = cs.wanted() ? round_up(n_items * pl.R * decode_chunk, align) : 0;
  float* po = ws.reserve(po_size + pl_size + slots * slot_size + pp_size);
  float* plse = po + po_size;
  float* scratch = plse + pl_size;
  float* pp_all = cs.wanted() ? scratch + slots * slot_size : nullptr;
  const std::int64_t first_summed = cs.first_row;

  // Every row of group g merges its items in order. After merge_row, w[p] holds the merge weight
  // exp(lse_p - lse) of the group's item p, which turns the item's chunk probabilities into final
  // ones (NaN when the row is NaN, the partial lse -inf when every item is empty).
  auto merge_group = [&](std::int64_t g) {
    const std::int64_t b = g / d.Hkv, hk = g % d.Hkv, nh = count(g), b0 = base[static_cast<std::size_t>(g)];
    if (cs.wanted() && cs.width > 0)
      for (std::int64_t h = hk * G; h < (hk + 1) * G; ++h) std::fill_n(cs.sums.ptr(b, h, 0), cs.width, 0.0f);
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const std::int64_t h = hk * G + r / d.Lq, i = r % d.Lq;
      float* w = plse + b0 * pl.R + r * nh;
      const float* parts = po + (b0 * pl.R + r) * pl.Dvpad;
      float row_lse;
      merge_row<Arch>(
          nh, [&](std::int64_t p) { return parts + p * pl.R * pl.Dvpad; }, [&](std::int64_t p) { return w[p]; }, w,
          d.Dv, out.ptr(b, h, i), &row_lse);
      if (!sinks.empty()) {
        // The sink joins the denominator (options.sinks): lse' = log(e^lse + e^sink), and the row
        // and every chunk's merge weight scale by e^(lse - lse') (0 for a row that saw nothing,
        // whose lse' is the sink).
        const float sink = sinks(h);
        const float top = std::max(row_lse, sink);
        if (top != minus_inf && !std::isnan(row_lse)) {
          const float merged = top + std::log(std::exp(row_lse - top) + std::exp(sink - top));
          const float f = row_lse == minus_inf ? 0.0f : std::exp(row_lse - merged);
          if (f != 1.0f) {
            simd::scale<Arch>(f, out.ptr(b, h, i), d.Dv);
            for (std::int64_t p = 0; p < nh; ++p) w[p] *= f;
          }
          row_lse = merged;
        }
      }
      if (!lse.empty()) lse(b, h, i) = row_lse;
      if (!cs.wanted() || i < first_summed) continue;
      float* sums = cs.sums.ptr(b, h, 0);
      for (std::int64_t p = 0; p < nh; ++p) {
        if (!(w[p] > 0)) continue;  // an empty item; NaN or -inf (the row is NaN or empty)
        const detail::item& x = items[static_cast<std::size_t>(b0 + p)];
        const float* prob = pp_all + ((b0 + p) * pl.R + r) * decode_chunk;
        if constexpr (Source::per_row_keys) {
          const std::span<const std::int64_t> keys = src.row_keys(b, hk, r);
          const std::int64_t n = std::clamp<std::int64_t>(static_cast<std::int64_t>(keys.size()) - x.j0, 0, x.n);
          for (std::int64_t j = 0; j < n; ++j) sums[keys[static_cast<std::size_t>(x.j0 + j)]] += w[p] * prob[j];
        } else {
          simd::axpy<Arch>(w[p], prob, sums + x.pos0, x.n);
        }
      }
    }
  };
  for (std::int64_t g = 0; g < groups; ++g)  // groups without an item: out = 0, lse = -inf
    if (count(g) == 0) merge_group(g);
  if (n_items == 0) return;

  // Items still to be computed per group: the thread that finishes a group's last item merges that
  // group, so one parallel region does everything (a second region would wait for the slowest
  // thread once more). The acq_rel fetch_sub makes every partial of the group visible to the
  // merging thread.
  const std::unique_ptr<std::atomic<std::int64_t>[]> pending(new std::atomic<std::int64_t>[static_cast<std::size_t>(groups)]);
  for (std::int64_t g = 0; g < groups; ++g) pending[g].store(count(g), std::memory_order_relaxed);

  // Items are handed out one at a time from a shared counter, so a thread that starts late (its
  // core busy with another process) simply takes fewer. With fixed ranges instead, 2 threads took
  // 7.6 ms at Lk = 4096 where 1 thread took 1.4 ms on this shared 2-core machine. Each slot has its
  // own scratch; no result depends on which thread ran an item.
  std::atomic<std::int64_t> next{0};
  parallel_for(
      slots,
      [&](std::int64_t t) {
        float* qs = scratch + t * slot_size;  // q of group `loaded`, scaled, zero padded
        float* s = qs + q_size;
        float* own = s + s_size;  // the source's scratch
        std::fill(own, own + src_size, 0.0f);
        std::int64_t loaded = -1;
        for (std::int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
          const detail::item& x = items[static_cast<std::size_t>(it)];
          const std::int64_t b = x.g / d.Hkv, hk = x.g % d.Hkv;
          // qs = the group's queries times d.scale * f, zero padded.
          auto load_queries = [&](float f) {
            std::fill(qs, qs + pl.Rpad * pl.Dpad, 0.0f);
            for (std::int64_t r = 0; r < pl.R; ++r) {
              const float* src_q = q.ptr(b, hk * G + r / d.Lq, r % d.Lq);
              for (std::int64_t e = 0; e < d.D; ++e) qs[r * pl.Dpad + e] = d.scale * src_q[e] * f;
            }
          };
          if (x.g != loaded) {
            load_queries(1.0f);
            loaded = x.g;
          }
          const std::int64_t b0 = base[static_cast<std::size_t>(x.g)], nh = count(x.g), local = it - b0;
          float* lse_g = plse + b0 * pl.R;
          float* pout = po + it * pl.R * pl.Dvpad;
          const key_block kb{b, hk, x.part, x.j0, x.n, x.pos0};
          auto lse_at = [&](std::int64_t r) -> float& { return lse_g[r * nh + local]; };
          float* pp = pp_all ? pp_all + it * pl.R * decode_chunk : nullptr;
          src.template scores<Arch, RowTile>(pl, kb, qs, s, own);
          detail::softmax_rows<Arch>(pl, src, kb, x.cls, mod, s, lse_at, pp, first_summed);
          // A NaN partial lse is NaN in q, k or a mod, or an f32 overflow inside a dot product
          // whose score is finite (|q| |k| near FLT_MAX with cancelling terms): the chunk's scores
          // are computed again from q scaled by 2^-64, then 2^-128 (exact powers of two), and
          // scaled back. A NaN input stays NaN; finite inputs with finite scores come out finite.
          for (int e = 64; e <= 128 && detail::any_nan(pl.R, lse_at); e += 64) {
            const float up = std::ldexp(1.0f, e / 2);
            load_queries(std::ldexp(1.0f, -e));
            src.template scores<Arch, RowTile>(pl, kb, qs, s, own);
            for (std::int64_t r = 0; r < pl.R; ++r)
              for (std::int64_t j = 0; j < kb.n; ++j) s[r * decode_chunk + j] = s[r * decode_chunk + j] * up * up;
            detail::softmax_rows<Arch>(pl, src, kb, x.cls, mod, s, lse_at, pp, first_summed);
            loaded = -1;  // qs holds scaled queries now
          }
          std::fill(pout, pout + pl.R * pl.Dvpad, 0.0f);
          src.template values<Arch>(pl, kb, s, pout, own);
          if (pending[x.g].fetch_sub(1, std::memory_order_acq_rel) == 1) merge_group(x.g);
        }
      },
      static_cast<int>(slots));
}

// The engine with the score row tile chosen for R = G * Lq rows (1, 2, or 4 and more).
template <class Arch, kv_source Source, class Mod>
void attend(const dims& d, const Source& src, view<const float, 4> q, view<float, 4> out, view<float, 3> lse,
            const Mod& mod, int threads, decode_workspace& ws, const sums_out& cs = {},
            view<const float, 1> sinks = {}) {
  const std::int64_t R = d.group() * d.Lq;
  if constexpr (!Source::row_tiled) run<Arch, 1>(d, src, q, out, lse, mod, threads, ws, cs, sinks);
  else if (R == 1) run<Arch, 1>(d, src, q, out, lse, mod, threads, ws, cs, sinks);
  else if (R == 2) run<Arch, 2>(d, src, q, out, lse, mod, threads, ws, cs, sinks);
  else run<Arch, 4>(d, src, q, out, lse, mod, threads, ws, cs, sinks);
}

// ---------------------------------------------------------------------------------------------
// Sources over views.

// Keys and values of every group in strided views, f32 / f16 / bf16: attention::decode's K/V,
// the cache's dense stores ([Hkv, capacity, D] viewed as [1, Hkv, capacity, D], with each head's
// length) and the f32 residual window of its KIVI stores.
template <class KV>
struct strided_source {
  static constexpr bool per_row_keys = false;
  static constexpr bool row_tiled = true;

  view<const KV, 4> k;                     // [B, Hkv, >= Lk, D]
  view<const KV, 4> v;                     // [B, Hkv, >= Lk, Dv]
  std::span<const std::int64_t> lengths;   // [Hkv] keys per kv head; empty: k.shape[2] for every head

  key_parts parts(std::int64_t, std::int64_t hk) const {
    return {1, {lengths.empty() ? k.extent(2) : lengths[static_cast<std::size_t>(hk)]}};
  }
  std::int64_t scratch_floats(const plan&) const { return 0; }

  template <class Arch, int RowTile>
  void scores(const plan& pl, const key_block& kb, const float* qs, float* s, float*) const {
    const element_rows<Arch, KV> rows{k.ptr(kb.b, kb.hk, kb.j0), k.stride(2), pl.d.D};
    const element_rows<Arch, KV> next{v.ptr(kb.b, kb.hk, kb.j0), v.stride(2), pl.d.Dv};  // prefetched beside K
    score_pass<Arch, RowTile>(pl.R, pl.Rpad, qs, pl.Dpad, pl.d.D, rows, kb.n, nullptr, s, decode_chunk, next);
  }
  template <class Arch>
  void values(const plan& pl, const key_block& kb, const float* p, float* acc, float*) const {
    const element_rows<Arch, KV> rows{v.ptr(kb.b, kb.hk, kb.j0), v.stride(2), pl.d.Dv};
    value_pass<Arch>(pl.R, p, 1, pl.d.Dv, decode_chunk, pl.d.Dv, pl.Dvpad, rows, kb.n, acc);
  }
};

// Gathered key sets: row r of group (b, hk) attends to the keys keys(b, hk, r, 0 .. count(b, hk, r))
// of k / v (any order, no repeats) — top-k and Loki selections, Quest pages, landmark blocks,
// retrieved keys. Their scores are computed as (scale q_r) . k_j, or taken from `given` (the
// selection already computed them exactly: top-k, Loki, retrieval). Every row reads its own keys,
// so there is no row tiling: a key costs one dot product and one axpy per row that reads it.
template <class KV>
struct gathered_source {
  static constexpr bool per_row_keys = true;
  static constexpr bool row_tiled = false;

  view<const KV, 4> k;                  // [B, Hkv, Lk, D]; may be empty when `given` is not
  view<const KV, 4> v;                  // [B, Hkv, Lk, Dv]
  view<const std::int64_t, 4> keys;     // [B, Hkv, R, >= counts] key indices per row
  view<const std::int64_t, 3> counts;   // [B, Hkv, R]
  view<const float, 4> given = {};      // [B, Hkv, R, >= counts] scaled scores, or empty

  std::span<const std::int64_t> row_keys(std::int64_t b, std::int64_t hk, std::int64_t r) const {
    return {keys.ptr(b, hk, r), static_cast<std::size_t>(counts(b, hk, r))};
  }
  key_parts parts(std::int64_t b, std::int64_t hk) const {
    std::int64_t n = 0;
    for (std::int64_t r = 0; r < counts.extent(2); ++r) n = std::max(n, counts(b, hk, r));
    return {1, {n}};
  }
  std::int64_t scratch_floats(const plan&) const { return 0; }

  // Keys [j0, j0 + n) of row r that exist.
  std::int64_t row_n(const key_block& kb, std::int64_t r) const {
    return std::clamp<std::int64_t>(counts(kb.b, kb.hk, r) - kb.j0, 0, kb.n);
  }

  template <class Arch, int RowTile>
  void scores(const plan& pl, const key_block& kb, const float* qs, float* s, float*) const {
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const std::int64_t n = row_n(kb, r);
      const std::int64_t* idx = keys.ptr(kb.b, kb.hk, r) + kb.j0;
      float* sr = s + r * decode_chunk;
      if (!given.empty()) std::copy_n(given.ptr(kb.b, kb.hk, r) + kb.j0, n, sr);
      else
        for (std::int64_t j = 0; j < n; ++j) sr[j] = simd::dot<Arch>(qs + r * pl.Dpad, k.ptr(kb.b, kb.hk, idx[j]), pl.d.D);
    }
  }
  template <class Arch>
  void values(const plan& pl, const key_block& kb, const float* p, float* acc, float*) const {
    for (std::int64_t r = 0; r < pl.R; ++r) {
      const std::int64_t n = row_n(kb, r);
      const std::int64_t* idx = keys.ptr(kb.b, kb.hk, r) + kb.j0;
      for (std::int64_t j = 0; j < n; ++j)
        if (p[r * decode_chunk + j] != 0)
          simd::axpy<Arch>(p[r * decode_chunk + j], v.ptr(kb.b, kb.hk, idx[j]), acc + r * pl.Dvpad, pl.d.Dv);
    }
  }
};

}  // namespace split_kv
}  // namespace mnemo::attention

// mnemo/attention/tiles.hpp — the key-major tile helpers of the tiled prefill kernels: flash
// (flash.hpp), its backward (flash_backward.hpp) and the layout-driven sparse::attention
// (sparse.hpp).
//
// Those kernels compute scores key-major, S^T = K Q^T: s[j * ld + i] holds key k0 + j against
// the query at position qp0 + i, so the queries of a tile are the SIMD lanes of its score vectors
// and the online softmax is purely vertical (simd/gemm.hpp). Here:
//
//   flash_traits      queries and keys per tile, per ISA family (simd/isa_traits.hpp)
//   workspace_layout  the 64-byte aligned pieces of one worker's workspace
//   run_items         work items over a shared counter, each worker with its own workspace
//   pack_transposed   a query tile as scale * Q^T, zero-padded to whole SIMD vectors
//   to_f32            K/V rows of any storage type to f32
//   apply_score       the mod's score mods over a tile (mods.hpp: score_tile), with derivative
//   apply_mask        the mod's mask over a partial tile (mods.hpp: mask_tile)
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "mnemo/attention/mods.hpp"
#include "mnemo/core/parallel.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/isa_traits.hpp"
#include "mnemo/simd/load.hpp"

namespace mnemo::attention {

// ---------------------------------------------------------------------------------------------
// Tile sizes.

template <class Arch = simd::default_arch>
struct flash_traits {
  // Queries are the SIMD lanes of a score tile; without SIMD the "vector" is one float.
  static constexpr std::int64_t lanes = simd::isa_traits<Arch>::lanes;
  // Queries and keys per tile, per ISA family (simd/isa_traits.hpp has the measurements). At 64 x 64
  // the f32 score tile is 16 KiB and, at D = 128, Q^T and a K tile are 32 KiB each, so the operands
  // of one tile GEMM stay in L1/L2.
  static constexpr std::int64_t block_q = simd::isa_traits<Arch>::flash_block_q;
  static constexpr std::int64_t block_k = simd::isa_traits<Arch>::flash_block_k;

  static_assert(block_q % lanes == 0,
                "flash_traits: block_q must be a multiple of the SIMD width, because the queries of a tile are "
                "the lanes of its score vectors");
  static_assert(block_k >= 1, "flash_traits: a key tile needs at least one key");
  static constexpr std::size_t score_tile_budget = 64 * 1024;  // bytes
  static_assert(block_q * block_k * sizeof(float) <= score_tile_budget,
                "flash_traits: the Bq x Bk f32 score tile must fit in 64 KiB so it stays in L1/L2 between the "
                "two tile GEMMs");
};

namespace tiles {

// x rounded up to a multiple of m.
inline std::int64_t round_up(std::int64_t x, std::int64_t m) { return (x + m - 1) / m * m; }

// Offsets (in floats, 64-byte aligned) of the pieces of one worker's workspace.
struct workspace_layout {
  std::int64_t total = 0;
  std::int64_t take(std::int64_t floats) {
    const std::int64_t at = total;
    constexpr std::int64_t aligned_floats = tensor<float, 1>::alignment / sizeof(float);  // 64 bytes
    total += round_up(floats, aligned_floats);
    return at;
  }
};

// Runs body(item, worker_workspace) for every item in [0, n_items), over up to `threads` workers
// that each own `per_worker` floats of one zeroed allocation and take items from a shared
// counter (dynamic balance for uneven causal tiles; no thread-index lookups).
template <class Body>
void run_items(std::int64_t n_items, std::int64_t per_worker, int threads, Body&& body) {
  if (n_items <= 0) return;
  const std::int64_t workers = std::min<std::int64_t>(resolve_threads(threads), n_items);
  tensor<float, 1> ws({workers * per_worker});
  std::atomic<std::int64_t> next{0};
  parallel_for(
      workers,
      [&](std::int64_t w) {
        float* mine = ws.data() + w * per_worker;
        for (std::int64_t item = next.fetch_add(1); item < n_items; item = next.fetch_add(1)) body(item, mine);
      },
      static_cast<int>(workers));
}

// Packs rows [0, qn) of a query tile as Q^T: qt[c * ld + i] = scale * q_i[c]; columns [qn, nq) = 0.
inline void pack_transposed(const float* q, std::int64_t ldq, std::int64_t qn, std::int64_t nq, std::int64_t D,
                            float scale, float* qt, std::int64_t ld) {
  for (std::int64_t c = 0; c < D; ++c) {
    float* row = qt + c * ld;
    for (std::int64_t i = 0; i < qn; ++i) row[i] = scale * q[i * ldq + c];
    for (std::int64_t i = qn; i < nq; ++i) row[i] = 0.0f;
  }
}

// n contiguous elements of any K/V type to f32.
template <class Arch, class T>
void to_f32(const T* src, float* dst, std::int64_t n) {
  if constexpr (std::is_same_v<T, float>) std::copy_n(src, n, dst);
  else simd::convert<Arch>(src, dst, n);
}

// The score mods over a key-major tile s[j * ld + i] (keys k0 + j, query positions qp0 + i of
// head h), through the mod's score_tile (mods.hpp); g: null in the forward, else g *= d score / d s
// (the chain rule of the backward pass). softcap and alibi run as whole-tile vector loops over all
// nq columns (the padding queries [qn, nq) hold finite scores that are never used); a score mod
// without score_tile is called per element for the real queries only.
template <class Arch, class M>
void apply_score(const M& m, float* s, float* g, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t nq,
                 std::int64_t k0, std::int64_t qp0, std::int64_t h) {
  mods::score_tile<Arch>(m, s, g, ld, kn, qn, nq, h, qp0, k0);
}

// The mask over a key-major tile of head h: -inf where a query may not see a key (partial tiles
// only), through the mod's mask_tile (mods.hpp), which writes the -inf runs itself; a mod without
// one is asked visible() per element (measured, Longformer at density 0.13, L = 8192, D = 64:
// 0.25 - 0.27 x dense flash per element, 0.137 with mask_tile, both with the exp-underflow fix
// described in sparse.hpp).
template <class Mod>
void apply_mask(float* s, std::int64_t ld, std::int64_t kn, std::int64_t qn, std::int64_t k0, std::int64_t qp0,
                const Mod& mod, tile t, std::int64_t h) {
  if (t != tile::partial) return;
  mods::mask_tile(mod, s, ld, h, qp0, qn, k0, kn);
}

}  // namespace tiles
}  // namespace mnemo::attention

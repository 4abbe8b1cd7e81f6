// mnemo/simd/isa_traits.hpp — per-ISA tile sizes and register blocking, in one place.
//
// Every tiled kernel reads its sizes from isa_traits<Arch>; no kernel holds an #ifdef or an ISA
// switch of its own. An ISA family is what decides them: how many vector registers there are
// and how wide they are.
//
//   family    registers   gemm micro-kernel (mr x nv vectors)   flash tile (queries x keys)
//   avx512    32 zmm      6 x 4 = 24 accumulators               64 x 64
//   avx2      16 ymm      6 x 2 = 12 accumulators               48 x 72
//   simd128   16 xmm      4 x 3 = 12 accumulators               64 x 64
//   scalar    -           (the reference triple loop)           64 x 64
//
// Why these (measured on one core of an AMD EPYC Zen 4, L = 4096, H = 8, flash f32, forced to the
// family's kernels; GFLOP/s at D = 64 / D = 128):
// - AVX2 4 x 3 (the SSE blocking) on 64 x 64 tiles: 78 / 81. 64 query lanes are 8 ymm vectors and a
//   128-wide V row 16, neither a multiple of 3, so a quarter of the micro-kernel calls ran the 2- or
//   1-vector remainder. 6 x 2 divides both: 86 / 94 on 64 x 64 tiles. 48 x 72 tiles make both GEMMs'
//   row counts (72 keys, 48 queries) multiples of 6 as well: 88 / 97; 48 x 48 87 / 93,
//   48 x 96 86 / 97, 32 x 72 85 / 91, 96 x 96 76 / 71 (the score tile leaves L1).
// - AVX-512 6 x 4: 24 accumulators + 4 B vectors + 1 broadcast of 32 registers, 0.42 loads per FMA;
//   64 x 64 tiles: every block_q, block_k in 48 .. 128 ran within +-5% on an AVX-512 Xeon.
#pragma once

#include <cstdint>
#include <type_traits>

#include "mnemo/simd/arch.hpp"

namespace mnemo::simd {

enum class isa_family { scalar, simd128, avx2, avx512 };

template <class Arch>
constexpr isa_family family_of() {
  if constexpr (!vectorized<Arch>) return isa_family::scalar;
  else if constexpr (detail::is_avx512<Arch>) return isa_family::avx512;
  else if constexpr (detail::is_avx2<Arch>) return isa_family::avx2;
  else return isa_family::simd128;
}

template <isa_family F>
struct family_traits;

template <>
struct family_traits<isa_family::avx512> {
  static constexpr int registers = 32;
  static constexpr int gemm_mr = 6, gemm_nv = 4;
  static constexpr std::int64_t flash_block_q = 64, flash_block_k = 64;
};

template <>
struct family_traits<isa_family::avx2> {
  static constexpr int registers = 16;
  static constexpr int gemm_mr = 6, gemm_nv = 2;
  static constexpr std::int64_t flash_block_q = 48, flash_block_k = 72;
};

template <>
struct family_traits<isa_family::simd128> {
  static constexpr int registers = 16;
  static constexpr int gemm_mr = 4, gemm_nv = 3;
  static constexpr std::int64_t flash_block_q = 64, flash_block_k = 64;
};

template <>
struct family_traits<isa_family::scalar> {
  static constexpr int registers = 0;  // the reference loops hold nothing in vector registers
  static constexpr int gemm_mr = 1, gemm_nv = 1;
  static constexpr std::int64_t flash_block_q = 64, flash_block_k = 64;
};

// The traits of the family Arch belongs to, plus its lane count.
template <class Arch>
struct isa_traits : family_traits<family_of<Arch>()> {
  static constexpr isa_family family = family_of<Arch>();
  static constexpr std::int64_t lanes = simd::lanes<Arch>;

  static_assert(family == isa_family::scalar ||
                    isa_traits::gemm_mr * isa_traits::gemm_nv + isa_traits::gemm_nv + 1 <= isa_traits::registers,
                "isa_traits: mr * nv accumulators + nv B vectors + 1 broadcast must fit the vector registers");
  static_assert(isa_traits::flash_block_q % lanes == 0,
                "isa_traits: flash_block_q must be a multiple of the SIMD width, because the queries of a tile are "
                "the lanes of its score vectors");
};

}  // namespace mnemo::simd

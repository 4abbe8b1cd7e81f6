// mnemo/prebuilt.hpp — the kernels of the optional mnemo::prebuilt library, for programs that are
// not compiled for the machine they run on.
//
// mnemo is header-only: a kernel runs at the best ISA its translation unit is compiled for, and
// dispatch (simd/dispatch.hpp) chooses among the levels that TU can compile. A program built for
// a baseline such as -march=x86-64-v2 (one binary for every x86 CPU) therefore has no AVX2 or
// AVX-512 code of its own. Linking the CMake target mnemo::prebuilt adds those: a small static
// library whose translation units are compiled with -mavx2 -mfma -mf16c and with the AVX-512
// flags, instantiating the common entry points for each, and the definition MNEMO_PREBUILT, which
// makes the header entry points below call into it when the CPU (or options.isa / $MNEMO_ISA)
// asks for a level above the caller's own.
//
// Covered (every other mod, and every other kernel, runs at the caller's compiled level):
//   attention::flash            K/V f32, f16, bf16; mods::none, mods::causal; with column sums
//   attention::decode           K/V f32, f16, bf16; mods::none, mods::causal
//   kvcache::decode             every storage kind
//
// The library's functions are templates on the xsimd arch, declared here and explicitly
// instantiated in src/prebuilt/ (one TU per level), so a caller's TU never instantiates AVX2 code. Code
// shared by the library's TUs and the caller's (validation, std:: containers) is compiled in
// both; the caller's copy is the one the linker keeps (its objects come before the static
// library's), and the library's kernels are templates on their xsimd arch, so no AVX-512
// instruction reaches code that a non-AVX-512 CPU runs.
#pragma once

#include <type_traits>

#include "mnemo/attention/common.hpp"
#include "mnemo/attention/mods.hpp"
#include "mnemo/attention/reference.hpp"
#include "mnemo/core/dtype.hpp"
#include "mnemo/core/tensor.hpp"
#include "mnemo/simd/dispatch.hpp"

namespace mnemo {

namespace attention {
class decode_workspace;
}  // namespace attention

namespace kvcache {
class layer_cache;
struct column_sums;
}  // namespace kvcache

namespace prebuilt {

// The levels the library is built for.
inline constexpr simd::level levels[] = {simd::level::avx2, simd::level::avx512};

template <class KV>
inline constexpr bool covers_kv = std::is_same_v<KV, float> || std::is_same_v<KV, f16> || std::is_same_v<KV, bf16>;
template <class Mod>
inline constexpr bool covers_mod = std::is_same_v<Mod, attention::mods::none> || std::is_same_v<Mod, attention::mods::causal>;

// Whether the library is linked (CMake target mnemo::prebuilt defines MNEMO_PREBUILT).
#if defined(MNEMO_PREBUILT)
inline constexpr bool linked = true;
#else
inline constexpr bool linked = false;
#endif

template <class KV, class Mod>
inline constexpr bool covers = linked && covers_kv<KV> && covers_mod<Mod>;

// Whether a covered call of TuArch's translation unit at level `want` goes to the library: the
// level is one the library has and above the caller's own.
template <class TuArch>
constexpr bool above(simd::level want) {
  return static_cast<int>(want) > static_cast<int>(simd::level_of<TuArch>()) &&
         static_cast<int>(want) >= static_cast<int>(simd::level::avx2);
}

// The library's functions: templates on the xsimd arch of the level, declared here and defined
// (identically) in src/prebuilt/kernels.inc, which each of the library's TUs explicitly
// instantiates for its own arch only. A caller's TU only names the arch tags (xsimd declares every
// tag in every build); it never instantiates their kernels.

// attention::flash_detail::forward (validated arguments).
template <class Arch, class KV, class Mod>
void flash_forward(const attention::dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v,
                   view<float, 4> out, view<float, 3> lse, const Mod& mod, const attention::options& opt,
                   const attention::column_sums& cs);

// attention::decode's kernel (validated arguments, B and Lq > 0).
template <class Arch, class KV, class Mod>
void decode(const attention::dims& d, view<const float, 4> q, view<const KV, 4> k, view<const KV, 4> v,
            view<float, 4> out, view<float, 3> lse, const Mod& mod, const attention::options& opt,
            attention::decode_workspace& ws, const attention::column_sums& cs);

// kvcache::decode's kernel (validated arguments, Lq > 0).
template <class Arch>
void cache_decode(const attention::dims& d, const kvcache::layer_cache& c, view<const float, 3> q,
                  view<float, 3> out, view<float, 2> lse, const attention::options& opt,
                  attention::decode_workspace& ws, const kvcache::column_sums& cs);

// The arch tags of the library's levels.
using avx2_arch = xsimd::fma3<xsimd::avx2>;
using avx512_arch = xsimd::avx512bw;

// Calls f.template operator()<Arch>() with the library's arch for `want` (avx2 or avx512: what
// above() sends here).
template <class F>
decltype(auto) at_level(simd::level want, F&& f) {
  if (want == simd::level::avx512) return f.template operator()<avx512_arch>();
  return f.template operator()<avx2_arch>();
}

}  // namespace prebuilt
}  // namespace mnemo

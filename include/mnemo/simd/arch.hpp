// mnemo/simd/arch.hpp — what every simd/ header shares: the on/off switch, the default
// architecture, the float batch type and a few compile-time facts about an xsimd arch.
//
// Every function in simd/ that touches a batch is a template on `Arch` (defaulting to
// `default_arch`, the best ISA the translation unit is compiled for). Two TUs compiled with
// different -m flags therefore instantiate differently-mangled functions, and the linker cannot
// silently keep the AVX-512 copy of an inline function for a TU that must run on AVX2.
//
// MNEMO_NO_SIMD (CMake: -DMNEMO_SIMD=OFF) makes `enabled` false: vec.hpp then runs plain scalar
// loops, and the batch-level functions (exp, load, store) go lane by lane through the scalar
// code, so the scalar path is what the tests of that build exercise.
#pragma once

#include <cstdint>
#include <type_traits>

// GCC 12's AVX-512 intrinsics initialise their pass-through operand with _mm512_undefined_*(),
// which raises false -Wuninitialized / -Wmaybe-uninitialized warnings at every inlined use
// (GCC bug 105593, fixed in GCC 13). Silence them for the intrinsic headers only; this works when
// this is the translation unit's first include of <immintrin.h>.
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include <xsimd/xsimd.hpp>

namespace mnemo::simd {

#ifdef MNEMO_NO_SIMD
inline constexpr bool enabled = false;
#else
inline constexpr bool enabled = true;
#endif

using default_arch = xsimd::default_arch;

// The scalar level as an architecture tag: a kernel instantiated for it runs its plain loops (the
// same code a MNEMO_NO_SIMD build runs), so runtime dispatch (dispatch.hpp) can pick it like any
// ISA. It is not an xsimd arch: no batch type exists for it, and every vector body in mnemo sits
// behind `if constexpr (vectorized<Arch>)`.
struct scalar_arch {
  static constexpr const char* name() { return "scalar"; }
};

// Whether kernels instantiated for Arch run vector code: false for scalar_arch, and for every arch
// in a MNEMO_NO_SIMD build.
template <class Arch>
inline constexpr bool vectorized = enabled && !std::is_same_v<Arch, scalar_arch>;

template <class Arch = default_arch>
using fbatch = xsimd::batch<float, Arch>;

namespace detail {
// True for the tags that have xsimd batch types. Overloads taking a batch carry it as a constraint,
// so a call with Arch = scalar_arch never names xsimd::batch<float, scalar_arch> (a hard error).
template <class Arch>
concept is_batch_arch = !std::is_same_v<Arch, scalar_arch>;

template <class Arch>
struct batch_width {
  static constexpr std::int64_t value = static_cast<std::int64_t>(xsimd::batch<float, Arch>::size);
};
template <>
struct batch_width<scalar_arch> {
  static constexpr std::int64_t value = 1;
};
}  // namespace detail

// Lanes of a float batch, as the int64 the rest of mnemo counts in (1 for scalar_arch).
template <class Arch = default_arch>
inline constexpr std::int64_t width = detail::batch_width<Arch>::value;

// Floats a kernel instantiated for Arch handles per step: the batch width when it runs vector
// code, 1 when it runs the scalar loops.
template <class Arch = default_arch>
inline constexpr std::int64_t lanes = vectorized<Arch> ? width<Arch> : 1;

namespace detail {

template <class Arch>
using ibatch = xsimd::batch<std::int32_t, Arch>;

// Architecture families the hand-written paths in load.hpp and math.hpp recognise. In xsimd 8.1
// the x86 tags form two chains: sse2 <- sse3 <- ssse3 <- sse4_1 <- sse4_2 (<- fma3<sse4_2>), and
// avx <- avx2 (<- fma3<avx2>) and avx512f <- avx512cd <- avx512dq <- avx512bw, each rooted at
// `generic`, so is_base_of tells the family.
template <class Arch>
inline constexpr bool is_avx512 = std::is_base_of_v<xsimd::avx512f, Arch>;
template <class Arch>
inline constexpr bool is_avx512bw = std::is_base_of_v<xsimd::avx512bw, Arch>;
template <class Arch>
inline constexpr bool is_avx2 = std::is_base_of_v<xsimd::avx2, Arch>;
template <class Arch>
inline constexpr bool is_sse2 = std::is_base_of_v<xsimd::sse2, Arch>;
template <class Arch>
inline constexpr bool is_sse4_1 = std::is_base_of_v<xsimd::sse4_1, Arch>;

// Whether simd::detail::fmadd is fused for Arch in this translation unit. It is whenever the
// hardware has FMA: on the fma3/fma4/AVX-512/NEON64 tags, and on every x86 tag (sse2, avx2, ...)
// once the TU is compiled with -mfma, where fmadd calls the FMA intrinsic directly. Only a build
// without FMA hardware multiplies and adds separately, so the compiler's -ffp-contract never gets
// a mul + add it could fuse in one place and not in another, and the scalar and batch versions of
// a function (exp) round identically.
template <class Arch>
inline constexpr bool has_fma =
    is_avx512<Arch> || std::is_base_of_v<xsimd::fma3<xsimd::sse4_2>, Arch> ||
    std::is_base_of_v<xsimd::fma3<xsimd::avx>, Arch> || std::is_base_of_v<xsimd::fma3<xsimd::avx2>, Arch> ||
    std::is_base_of_v<xsimd::fma4, Arch> || std::is_base_of_v<xsimd::neon64, Arch>
#if defined(__FMA__)
    || is_sse2<Arch> || std::is_base_of_v<xsimd::avx, Arch>
#endif
    ;

}  // namespace detail
}  // namespace mnemo::simd

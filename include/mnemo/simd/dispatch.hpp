// mnemo/simd/dispatch.hpp — runtime choice of the ISA a kernel runs on.
//
// A dispatching kernel is instantiated once per architecture in `dispatch_arches` (the ones this
// translation unit can compile: its own best ISA, AVX2 below AVX-512, and the scalar loops) and
// picks one per call:
//
//   requested  = options.isa, else $MNEMO_ISA, else the best level          (scalar|sse|avx2|avx512)
//   running    = the highest compiled level <= min(requested, what the CPU supports)
//
// The CPU's level comes once from CPUID (with the OS support of the wider registers, as GCC's and
// Clang's __builtin_cpu_supports check it). So a build with -march=native on an AVX-512 machine
// runs AVX-512, and MNEMO_ISA=avx2 (or options.isa = level::avx2) runs the AVX2 kernels of the
// same binary: tests and benchmarks compare the paths without a second build. A level the CPU
// lacks cannot be forced (mnemo::error), since its instructions would fault.
//
// Dispatch selects among instantiations: every function that touches a batch is a template on
// Arch (arch.hpp), so the AVX2 and AVX-512 copies of a kernel are different functions, never one
// header compiled twice under different flags in one target.
//
// Cost: one switch per call; each dispatching kernel is compiled once per level in
// dispatch_arches (three in a native AVX-512 build).
//
// MNEMO_DISPATCH_NATIVE_ONLY (defined for a whole target, never for one TU of it) compiles the
// translation unit's own arch only: every call runs it, whatever the requested level. The test
// suite builds the executables that do not compare ISA paths this way (a third less compile time
// for a kernel-heavy test on AVX-512), and the sanitizer build builds every executable this way; a
// library user has no reason to.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>
#include <type_traits>

#include "mnemo/core/error.hpp"
#include "mnemo/simd/arch.hpp"
#include "mnemo/simd/isa_traits.hpp"

namespace mnemo::simd {

// Instruction-set levels, lowest first. `automatic` (the default of every options struct) means:
// $MNEMO_ISA if set, else the best the CPU and the build allow. `sse` stands for any 128-bit SIMD
// level a build's baseline gives (SSE2 .. SSE4.2, or NEON).
enum class level : int { automatic = 0, scalar = 1, sse = 2, avx2 = 3, avx512 = 4 };

inline const char* level_name(level l) {
  switch (l) {
    case level::automatic: return "automatic";
    case level::scalar: return "scalar";
    case level::sse: return "sse";
    case level::avx2: return "avx2";
    case level::avx512: return "avx512";
  }
  return "unknown";
}

// "scalar", "sse", "avx2", "avx512" (or "auto"/"automatic"/"" for automatic); throws otherwise.
inline level parse_level(std::string_view name, const char* what = "MNEMO_ISA") {
  if (name.empty() || name == "auto" || name == "automatic") return level::automatic;
  if (name == "scalar") return level::scalar;
  if (name == "sse" || name == "sse2" || name == "neon") return level::sse;
  if (name == "avx2") return level::avx2;
  if (name == "avx512") return level::avx512;
  mnemo::detail::fail(what, ": expected one of scalar, sse, avx2, avx512 or auto, got '", std::string(name), "'");
}

// The level of an arch tag.
template <class Arch>
constexpr level level_of() {
  switch (family_of<Arch>()) {
    case isa_family::scalar: return level::scalar;
    case isa_family::simd128: return level::sse;
    case isa_family::avx2: return level::avx2;
    case isa_family::avx512: return level::avx512;
  }
  return level::scalar;
}

// The highest level this CPU (and its OS) can run, from CPUID, read once.
inline level cpu_level() {
  static const level l = [] {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma"))
      return level::avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return level::avx2;
    return level::sse;  // x86-64 always has SSE2
#else
    return level_of<default_arch>();  // elsewhere: what the build targets
#endif
  }();
  return l;
}

// $MNEMO_ISA, read once (automatic when unset or empty).
inline level env_level() {
  static const level l = [] {
    const char* env = std::getenv("MNEMO_ISA");
    return env == nullptr ? level::automatic : parse_level(env, "environment variable MNEMO_ISA");
  }();
  return l;
}

namespace detail {

// Arch tags a dispatching kernel is compiled for, highest first.
template <class... A>
struct arch_list {};

#if defined(MNEMO_DISPATCH_NATIVE_ONLY)
template <class Best>
using dispatch_list_for = arch_list<Best>;
#else
template <class Best>
using dispatch_list_for = std::conditional_t<
    !enabled || std::is_same_v<Best, scalar_arch>, arch_list<scalar_arch>,
    std::conditional_t<
#if XSIMD_WITH_AVX512BW && XSIMD_WITH_FMA3_AVX2
        is_avx512bw<Best>, arch_list<Best, xsimd::fma3<xsimd::avx2>, scalar_arch>,
#else
        false, arch_list<Best, scalar_arch>,
#endif
        arch_list<Best, scalar_arch>>>;
#endif

}  // namespace detail

using dispatch_arches = detail::dispatch_list_for<default_arch>;

// The best level compiled into this translation unit's dispatching kernels.
inline constexpr level compiled_level = level_of<default_arch>();

// The level a call with `requested` runs at; throws when the CPU cannot run the level asked for.
inline level resolve_level(level requested) {
  const level cpu = cpu_level();
  level want = requested != level::automatic ? requested : env_level();
  if (want == level::automatic) want = cpu;
  mnemo::detail::require(static_cast<int>(want) <= static_cast<int>(cpu), "mnemo: ISA level '", level_name(want),
                  "' was requested (options.isa or MNEMO_ISA) but this CPU supports at most '", level_name(cpu), "'");
  return want;
}

namespace detail {

template <class F, class First, class... Rest>
decltype(auto) dispatch_to(level want, F&& f, arch_list<First, Rest...>) {
  if constexpr (sizeof...(Rest) == 0) {
    return f.template operator()<First>();
  } else {
    if (static_cast<int>(level_of<First>()) <= static_cast<int>(want)) return f.template operator()<First>();
    return dispatch_to(want, std::forward<F>(f), arch_list<Rest...>{});
  }
}

}  // namespace detail

// Calls f.template operator()<Arch>() for the highest Arch of the dispatch list whose level is at
// most resolve_level(requested): `dispatch<TuArch>(opt.isa, [&]<class Arch>() { kernel<Arch>(...); })`.
//
// TuArch is the translation unit's own arch (default_arch). Every public entry point that
// dispatches carries it as a defaulted template parameter, `template <..., class TuArch =
// simd::default_arch>`, so the entry point compiled in an AVX-512 TU and in an x86-64-v2 TU are
// differently mangled functions: the linker can never keep one TU's copy (with its AVX-512 glue
// code) for the other (the ODR rule of arch.hpp, applied to the code around the kernels).
template <class TuArch = default_arch, class F>
decltype(auto) dispatch(level requested, F&& f) {
  return detail::dispatch_to(resolve_level(requested), std::forward<F>(f), detail::dispatch_list_for<TuArch>{});
}

// The level the dispatching kernels run at when called from a translation unit compiled for
// TuArch: what dispatch() picks, or, with the mnemo::prebuilt library linked (prebuilt.hpp), the
// requested level when it is above the TU's own (for the kernels the library covers).
template <class TuArch = default_arch>
level active_level(level requested = level::automatic) {
  const level here = dispatch<TuArch>(requested, []<class Arch>() { return level_of<Arch>(); });
#if defined(MNEMO_PREBUILT)
  const level want = resolve_level(requested);
  if (static_cast<int>(want) > static_cast<int>(here) && static_cast<int>(want) >= static_cast<int>(level::avx2))
    return want;
#endif
  return here;
}

}  // namespace mnemo::simd

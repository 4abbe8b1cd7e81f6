# Settings for mnemo's own tests, benchmarks and examples (never applied to consumers).
#
#   MNEMO_ARCH      native (default) | avx512 | avx2 | baseline   ISA of our own binaries
#   MNEMO_SIMD      ON (default) | OFF                             OFF: scalar loops only (MNEMO_NO_SIMD)
#   MNEMO_OPENMP    ON (default) | OFF                             threads through OpenMP when found
#   MNEMO_SANITIZE  "" | "address,undefined" | "thread"            sanitizer build
set(MNEMO_ARCH "native" CACHE STRING "ISA for mnemo's own tests and benchmarks: native, avx512, avx2, baseline")
set_property(CACHE MNEMO_ARCH PROPERTY STRINGS native avx512 avx2 baseline)
option(MNEMO_SIMD "Use the xsimd code paths (OFF: scalar fallback everywhere)" ON)
option(MNEMO_OPENMP "Use OpenMP threads when available" ON)
set(MNEMO_SANITIZE "" CACHE STRING "Sanitizers for mnemo's own targets, e.g. address,undefined")

add_library(mnemo_dev INTERFACE)
target_link_libraries(mnemo_dev INTERFACE mnemo::mnemo)
target_compile_options(mnemo_dev INTERFACE -Wall -Wextra -Wno-unused-parameter)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  # GCC 12 reports hundreds of false -Wmaybe-uninitialized inside Eigen's AVX-512 GEMM kernels.
  target_compile_options(mnemo_dev INTERFACE -Wno-maybe-uninitialized)
  if(CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13)
    # GCC bug 105593: false -Wuninitialized on AVX-512 intrinsics from <immintrin.h>.
    target_compile_options(mnemo_dev INTERFACE -Wno-uninitialized)
  endif()
endif()

if(MNEMO_ARCH STREQUAL "native")
  target_link_libraries(mnemo_dev INTERFACE mnemo::native)
elseif(MNEMO_ARCH STREQUAL "avx512")
  target_compile_options(mnemo_dev INTERFACE -mavx512f -mavx512bw -mavx512dq -mavx512vl -mavx512cd -mfma -mf16c)
elseif(MNEMO_ARCH STREQUAL "avx2")
  target_compile_options(mnemo_dev INTERFACE -mavx2 -mfma -mf16c)  # x86-64-v3 has F16C: f16 K/V convert in hardware
elseif(MNEMO_ARCH STREQUAL "baseline")
  # the compiler's default x86-64 target: SSE2 only
else()
  message(FATAL_ERROR "MNEMO_ARCH must be native, avx512, avx2 or baseline, got '${MNEMO_ARCH}'")
endif()

if(NOT MNEMO_SIMD)
  target_compile_definitions(mnemo_dev INTERFACE MNEMO_NO_SIMD=1)
endif()

if(MNEMO_OPENMP)
  find_package(OpenMP COMPONENTS CXX)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(mnemo_dev INTERFACE OpenMP::OpenMP_CXX)
  endif()
endif()

if(MNEMO_SANITIZE)
  # A target may compile with fewer sanitizers through its property MNEMO_TARGET_SANITIZE (the
  # unit tests: address alone, tests/CMakeLists.txt); everything links the whole set's runtimes.
  string(REPLACE "," "$<COMMA>" mnemo_sanitize_all "${MNEMO_SANITIZE}")
  set(mnemo_sanitize_own "$<TARGET_PROPERTY:MNEMO_TARGET_SANITIZE>")
  target_compile_options(mnemo_dev INTERFACE
                         "-fsanitize=$<IF:$<BOOL:${mnemo_sanitize_own}>,${mnemo_sanitize_own},${mnemo_sanitize_all}>"
                         -fno-omit-frame-pointer -fno-sanitize-recover=all)
  target_link_options(mnemo_dev INTERFACE -fsanitize=${MNEMO_SANITIZE})
endif()

message(STATUS "mnemo: arch=${MNEMO_ARCH} simd=${MNEMO_SIMD} openmp=${OpenMP_CXX_FOUND} sanitize='${MNEMO_SANITIZE}'")

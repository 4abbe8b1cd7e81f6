#!/usr/bin/env bash
# Builds and runs mnemo's whole test suite (README command (b); .ci/run runs this).
#
#   scripts/test.sh               native build (-march=native), the Python package's tests
#                                 (scripts/python.sh) + AddressSanitizer/UBSan build (the
#                                 fuzz targets' regressions and corpus replayed under it)
#   scripts/test.sh --all-builds  also the AVX2-only (-mavx2 -mfma -mf16c) and the no-SIMD builds and
#                                 the libFuzzer smoke (scripts/fuzz.sh --smoke: clang, coverage-guided)
#   scripts/test.sh --quick       the native build only
#
# Installs missing Debian packages itself (as root or with sudo). Build trees go to build/test-*.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
mnemo_install_deps

mode=default
case "${1:-}" in
  "") ;;
  --all-builds) mode=all ;;
  --quick) mode=quick ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "scripts/test.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

jobs=$(nproc 2>/dev/null || echo 2)

# run_build NAME CMAKE_ARGS...: configure, build, ctest.
run_build() {
  local name=$1; shift
  local dir="build/test-$name"
  echo "=== mnemo tests: $name build ($*) ==="
  # mnemo::prebuilt is built (and its -march=x86-64-v2 consumer run) by the packaging test.
  # A tree an older version configured with Makefiles cannot switch generator: start it again.
  if [ -f "$dir/CMakeCache.txt" ] && ! grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja$' "$dir/CMakeCache.txt"; then
    rm -rf "$dir"
  fi
  # Ninja: its .ninja_log in the build tree gives each translation unit's compile time, which
  # is what CI's budget is spent on (`ninja -C build/test-native -t ...`, or read the log).
  cmake -S . -B "$dir" -G Ninja -DMNEMO_BUILD_BENCH=OFF -DMNEMO_BUILD_PREBUILT=OFF "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j"$jobs"
  ctest --test-dir "$dir" -j"$jobs" --output-on-failure --timeout 600
}

mkdir -p build
start=$(date +%s)
# Tests build at -Og: CI's 30 minutes on 2 cores go to compiling, and most of a kernel test's
# compile is GCC's code generation for the kernels it instantiates. tests/attention/decode_test.cpp
# took 63 s of CPU at -O1 and 37 s at -Og (AMD EPYC Zen 1; -O0 29 s, but xsimd's wrappers are then
# real calls and the suite runs several times slower); the native suite had built in 10.7 minutes
# at -O1 against 14.8 at -O2 (Zen 4). Benchmarks keep -O3 (scripts/bench.sh).
release=(-DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-Og -DNDEBUG")
run_build native "${release[@]}" -DMNEMO_ARCH=native
if [ "$mode" != quick ]; then
  # The Python package (python/): built at -Og into build/python-venv (scikit-build-core, numpy and
  # pytest from PyPI), then its pytest suite: every golden case through the Python API, the API tests.
  echo "=== mnemo tests: Python package (scripts/python.sh --test-build) ==="
  bash scripts/python.sh --test-build
fi
if [ "$mode" = all ]; then
  run_build avx2 "${release[@]}" -DMNEMO_ARCH=avx2
  run_build nosimd "${release[@]}" -DMNEMO_ARCH=baseline -DMNEMO_SIMD=OFF
fi
if [ "$mode" != quick ]; then
  # Sanitizers: ASan + UBSan. A Debug build (view bounds asserts on) at -Og without -g. Compile
  # time is what CI's minutes on 2 cores are spent on: tests/attention/flash_test.cpp under ASan
  # took 93 s of CPU at -O1 and 42 s at -Og, and ran in 33 s instead of 27 s. -O0 does not build:
  # without __OPTIMIZE__ GCC 12 defines the AVX-512BW blend intrinsics as macros whose casts
  # reject xsimd's batch types (xsimd 8.1's avx512bw select). Stack traces still name functions.
  # The examples run in the native build only: they call kernels the tests already run here, and
  # compiling all 16 again under the sanitizers costs CI minutes it does not have.
  # The unit tests compile with ASan alone and the fuzz targets with ASan + UBSan (UBSan added 43%
  # to a kernel test's compile; tests/CMakeLists.txt). UBSan runs every check except null, nonnull-attribute, returns-nonnull-attribute, alignment,
  # pointer-overflow and vptr: those instrument every member access and pointer step and cost a
  # quarter of the compile time (tests/attention/topk_test.cpp: 27.4 s of CPU with them, 20.6 s
  # without). A null dereference still faults under ASan, ASan still catches every out-of-bounds
  # access, and mnemo has no virtual calls; the integer, shift, bounds, float-cast and enum checks
  # that matter for index arithmetic stay.
  # The fuzz targets join this build as fuzz_replay.<target> tests (tests/CMakeLists.txt): their
  # regressions, seed corpus and 16 mutations of each input, under both sanitizers. The golden
  # runner, the bad-input test and the tests of kernels a fuzz target drives are left out here.
  mnemo_install_fuzz_header_deps
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  run_build asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-Og -DMNEMO_ARCH=native \
    -DMNEMO_SANITIZE=address,undefined -DMNEMO_BUILD_EXAMPLES=OFF \
    -DCMAKE_CXX_FLAGS=-fno-sanitize=null,nonnull-attribute,returns-nonnull-attribute,alignment,pointer-overflow,vptr
fi
if [ "$mode" = all ]; then
  # The libFuzzer smoke (issue #8): the targets built with clang, regressions replayed, then every
  # target fuzzed from the committed corpus for a few seconds. Not in the default run (CI's): its
  # clang build of every kernel took 325 s of CI's 42 minutes on 2 Zen 1 cores, and the sanitizer
  # build above already replays each target's regressions and corpus (fuzz_replay.<target>).
  echo "=== mnemo tests: fuzz smoke (scripts/fuzz.sh --smoke) ==="
  bash scripts/fuzz.sh --smoke
fi
echo "mnemo tests: all builds passed in $(( $(date +%s) - start )) s"

#!/usr/bin/env bash
# Builds and runs mnemo's whole test suite (README command (b); .ci/run runs this).
#
#   scripts/test.sh               native build (-march=native) + AddressSanitizer/UBSan build
#   scripts/test.sh --all-builds  also the AVX2-only (-mavx2 -mfma) and the no-SIMD builds
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
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "scripts/test.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
esac

jobs=$(nproc 2>/dev/null || echo 2)

# run_build NAME CMAKE_ARGS...: configure, build, ctest.
run_build() {
  local name=$1; shift
  local dir="build/test-$name"
  echo "=== mnemo tests: $name build ($*) ==="
  cmake -S . -B "$dir" -DMNEMO_BUILD_BENCH=OFF "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j"$jobs"
  ctest --test-dir "$dir" -j"$jobs" --output-on-failure --timeout 600
}

mkdir -p build
start=$(date +%s)
run_build native -DCMAKE_BUILD_TYPE=Release -DMNEMO_ARCH=native
if [ "$mode" = all ]; then
  run_build avx2 -DCMAKE_BUILD_TYPE=Release -DMNEMO_ARCH=avx2
  run_build nosimd -DCMAKE_BUILD_TYPE=Release -DMNEMO_ARCH=baseline -DMNEMO_SIMD=OFF
fi
if [ "$mode" != quick ]; then
  # Sanitizers: ASan + UBSan. A Debug build (view bounds asserts on) at -O1 without -g: -O2 -g
  # made the compile alone take longer than CI's 15-minute budget on 2 cores (flash_test.cpp:
  # 2.5 min of CPU at -O2 -g, 1.2 min at -O1); ASan still symbolises stack traces by function.
  export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
  run_build asan -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O1 -DMNEMO_ARCH=native \
    -DMNEMO_SANITIZE=address,undefined
fi
echo "mnemo tests: all builds passed in $(( $(date +%s) - start )) s"

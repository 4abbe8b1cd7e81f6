#!/usr/bin/env bash
# ThreadSanitizer run of the concurrency test (tests/reliability/concurrency_test.cpp): several
# std::threads call every family at once; TSan reports any data race between them.
#
#   scripts/tsan.sh
#
# OpenMP is off in this build (-DMNEMO_OPENMP=OFF): Debian's libgomp is not built with TSan, so
# its barriers are invisible to TSan and every parallel_for would be reported as a race (false
# positives). Each kernel then runs its items serially inside each calling thread, which is
# exactly what the reentrancy question is about: no shared mutable state between concurrent calls.
# Thread-count determinism (1 to 4 OpenMP threads) is checked by the same test in the ordinary
# builds. Build tree: build/tsan.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
mnemo_install_deps

dir=build/tsan
start=$(date +%s)
cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
  -DMNEMO_SANITIZE=thread -DMNEMO_OPENMP=OFF -DMNEMO_BUILD_BENCH=OFF -DMNEMO_BUILD_EXAMPLES=OFF \
  >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" --target reliability_concurrency_test -j"$(nproc 2>/dev/null || echo 2)"
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" "$dir/tests/reliability_concurrency_test"
echo "mnemo tsan: no race reported ($(( $(date +%s) - start )) s)"

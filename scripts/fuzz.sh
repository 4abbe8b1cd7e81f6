#!/usr/bin/env bash
# Builds mnemo's libFuzzer targets (fuzz/*_fuzz.cpp, clang, -fsanitize=fuzzer,address,undefined)
# and runs them from the committed seed corpus (fuzz/corpus/<target>/).
#
#   scripts/fuzz.sh --smoke            CI: build, replay fuzz/regressions/, then fuzz every target
#                                      for MNEMO_FUZZ_SMOKE_SECONDS (default 10) seconds
#   scripts/fuzz.sh --long [seconds]   fuzz every target for `seconds` (default 600) each, keeping
#                                      the grown corpus in build/fuzz/corpus-<target>/ across runs
#   scripts/fuzz.sh --long 600 attention_fuzz    one target only
#
# A crash leaves its input in build/fuzz/artifacts/ and fails the script; replay it with
#   build/fuzz/<target> build/fuzz/artifacts/<target>-crash-<sha1>
# Every run prints libFuzzer's execution count and the per-outcome counts of each target
# (MNEMO_FUZZ_STATS=1: inputs compared against the reference vs rejected with mnemo::error).
# To keep a newly found interesting input as a seed: copy it into fuzz/corpus/<target>/ (small
# files only); a crash, once its fix is in, goes to fuzz/regressions/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/deps.sh
mnemo_install_fuzz_deps

mode="${1:-}"
case "$mode" in
  --smoke) seconds="${MNEMO_FUZZ_SMOKE_SECONDS:-10}"; only="" ;;
  --long) seconds="${2:-600}"; only="${3:-}" ;;
  -h|--help|"") sed -n '2,17p' "$0"; exit 0 ;;
  *) echo "scripts/fuzz.sh: unknown option '$mode' (see --help)" >&2; exit 2 ;;
esac

start=$(date +%s)
dir=build/fuzz
# -O1 without -g: the four targets compile in ~1.6 min of CPU (-O2 -g roughly doubles it) and
# still run a few hundred inputs per second under ASan.
CC=clang CXX=clang++ cmake -S fuzz -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 >"$dir.configure.log" 2>&1 || { cat "$dir.configure.log"; exit 1; }
cmake --build "$dir" -j"$(nproc 2>/dev/null || echo 2)"
built=$(date +%s)
echo "mnemo fuzz: built in $((built - start)) s"

export MNEMO_FUZZ_STATS=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
mkdir -p "$dir/artifacts"
status=0
for src in fuzz/*_fuzz.cpp; do
  target=$(basename "$src" .cpp)
  [ -n "$only" ] && [ "$only" != "$target" ] && continue
  # Regressions: inputs that once crashed, replayed one by one before fuzzing.
  if [ -d "fuzz/regressions/$target" ] && [ -n "$(ls -A "fuzz/regressions/$target")" ]; then
    echo "=== $target: replaying fuzz/regressions/$target"
    "$dir/$target" "fuzz/regressions/$target"/* >"$dir/$target.regressions.log" 2>&1 ||
      { tail -30 "$dir/$target.regressions.log"; echo "mnemo fuzz: $target FAILED on a regression input"; status=1; }
  fi
  # New units go to a scratch corpus (smoke) or a kept one (long); the seed corpus is only read.
  if [ "$mode" = --smoke ]; then work="$dir/smoke-corpus-$target"; rm -rf "$work"; else work="$dir/corpus-$target"; fi
  mkdir -p "$work"
  echo "=== $target: fuzzing for $seconds s"
  if "$dir/$target" "$work" "fuzz/corpus/$target" -max_total_time="$seconds" -print_final_stats=1 \
       -artifact_prefix="$dir/artifacts/$target-" >"$dir/$target.log" 2>&1; then
    grep -E "^stat::number_of_executed_units|^mnemo fuzz stats" "$dir/$target.log" || true
  else
    tail -40 "$dir/$target.log"
    echo "mnemo fuzz: $target FAILED (input saved in $dir/artifacts/)"
    status=1
  fi
done
echo "mnemo fuzz: done in $(( $(date +%s) - start )) s (build $((built - start)) s)"
exit $status

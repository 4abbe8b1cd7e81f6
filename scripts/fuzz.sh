#!/usr/bin/env bash
# Builds mnemo's libFuzzer targets (fuzz/*_fuzz.cpp, clang, -fsanitize=fuzzer,address + UBSan)
# and runs them from the committed seed corpus (fuzz/corpus/<target>/).
#
#   scripts/fuzz.sh --smoke            scripts/test.sh --all-builds: build (-O1, ASan + core UBSan, see
#                                      fuzz/CMakeLists.txt), replay fuzz/regressions/, then fuzz
#                                      every target for MNEMO_FUZZ_SMOKE_SECONDS (default 8) s
#   scripts/fuzz.sh --long [seconds]   fuzz every target for `seconds` (default 600) each, with every
#                                      UBSan check, keeping the grown corpus in
#                                      build/fuzz/corpus-<target>/ across runs
#   scripts/fuzz.sh --long 600 attention_fuzz    one target only
#
# MNEMO_FUZZ_JOBS (default 2): targets fuzzed at the same time (each fuzzer is one process on one
# core); MNEMO_FUZZ_DIR: the build folder (default build/fuzz-smoke or build/fuzz). The smoke run
# on 2 nearly idle cores: 41 s of build (from scratch), then 5 targets x 10 s two at a time in 34 s,
# 75 s in all; hence 8 s per target by default.
# A crash leaves its input in <build>/artifacts/ and fails the script; replay it with
#   build/fuzz/<target> build/fuzz/artifacts/<target>-crash-<sha1>
# Every run prints each target's libFuzzer execution count and per-outcome counts (inputs compared
# against the reference vs rejected with mnemo::error), then the total line
#   fuzz smoke: N executions, C crashes          (fuzz long: ... for --long)
# To keep a newly found interesting input as a seed: copy it into fuzz/corpus/<target>/ (small
# files only); a crash, once its fix is in, goes to fuzz/regressions/<target>/.
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-}"
case "$mode" in
  --smoke) seconds="${MNEMO_FUZZ_SMOKE_SECONDS:-8}"; only=""; ubsan=core; dir=build/fuzz-smoke ;;
  --long) seconds="${2:-600}"; only="${3:-}"; ubsan=full; dir=build/fuzz ;;
  -h|--help|"") sed -n '2,23p' "$0"; exit 0 ;;
  *) echo "scripts/fuzz.sh: unknown option '$mode' (see --help)" >&2; exit 2 ;;
esac
jobs="${MNEMO_FUZZ_JOBS:-2}"
dir="${MNEMO_FUZZ_DIR:-$dir}"

source scripts/deps.sh
mnemo_install_fuzz_deps

start=$(date +%s)
mkdir -p "$dir"
# -O1 without -g: the debug info and -O2 roughly double the build; UBSan's alignment, null and
# vptr checks nearly double it again (fuzz/CMakeLists.txt), so the smoke run leaves them to ASan.
CC=clang CXX=clang++ cmake -S fuzz -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -DMNEMO_FUZZ_UBSAN="$ubsan" >"$dir/configure.log" 2>&1 ||
  { cat "$dir/configure.log"; exit 1; }
cmake --build "$dir" -j2 >"$dir/build.log" 2>&1 || { tail -60 "$dir/build.log"; exit 1; }
built=$(date +%s)
echo "mnemo fuzz: built in $((built - start)) s"

export MNEMO_FUZZ_STATS=1
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
mkdir -p "$dir/artifacts"

# One target: replay its regressions, then fuzz it. Writes <target>.status (0: clean).
run_target() {
  local target=$1 status=0 work
  # Regressions: inputs that once crashed, replayed one by one before fuzzing.
  if [ -d "fuzz/regressions/$target" ] && [ -n "$(ls -A "fuzz/regressions/$target")" ]; then
    "$dir/$target" "fuzz/regressions/$target"/* >"$dir/$target.regressions.log" 2>&1 || status=1
  fi
  # New units go to a scratch corpus (smoke) or a kept one (long); the seed corpus is only read.
  if [ "$mode" = --smoke ]; then work="$dir/smoke-corpus-$target"; rm -rf "$work"; else work="$dir/corpus-$target"; fi
  mkdir -p "$work"
  "$dir/$target" "$work" "fuzz/corpus/$target" -max_total_time="$seconds" -print_final_stats=1 \
    -artifact_prefix="$dir/artifacts/$target-" >"$dir/$target.log" 2>&1 || status=$((status + 2))
  echo "$status" >"$dir/$target.status"
}

targets=()
for src in fuzz/*_fuzz.cpp; do
  target=$(basename "$src" .cpp)
  [ -n "$only" ] && [ "$only" != "$target" ] && continue
  targets+=("$target")
done
[ ${#targets[@]} -gt 0 ] || { echo "scripts/fuzz.sh: no target named '$only'" >&2; exit 2; }

echo "mnemo fuzz: ${#targets[@]} targets, $seconds s each, $jobs at a time"
running=0
for target in "${targets[@]}"; do
  if [ "$running" -ge "$jobs" ]; then wait -n || true; running=$((running - 1)); fi
  rm -f "$dir/$target.status"
  run_target "$target" &
  running=$((running + 1))
done
wait || true

status=0 total=0 crashes=0
for target in "${targets[@]}"; do
  s=$(cat "$dir/$target.status" 2>/dev/null || echo 4)
  n=$(grep -m1 "^stat::number_of_executed_units:" "$dir/$target.log" 2>/dev/null | awk '{print $2}' || true)
  n=${n:-0}
  total=$((total + n))
  echo "=== $target: $n executions"
  grep "^mnemo fuzz stats" "$dir/$target.log" | sed 's/^mnemo fuzz stats: /    /' || true
  if [ $((s & 1)) -ne 0 ]; then
    tail -30 "$dir/$target.regressions.log"
    echo "mnemo fuzz: $target FAILED on a regression input (fuzz/regressions/$target/)"
    crashes=$((crashes + 1)); status=1
  fi
  if [ $((s & 2)) -ne 0 ]; then
    tail -40 "$dir/$target.log"
    echo "mnemo fuzz: $target FAILED (input saved in $dir/artifacts/)"
    crashes=$((crashes + 1)); status=1
  fi
  if [ "$s" -ge 4 ]; then echo "mnemo fuzz: $target did not run"; status=1; fi
done
echo "mnemo fuzz: done in $(( $(date +%s) - start )) s (build $((built - start)) s)"
echo "fuzz ${mode#--}: $total executions, $crashes crashes"
exit $status

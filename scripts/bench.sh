#!/usr/bin/env bash
# Builds mnemo_bench and runs the benchmark comparison (README command (a), the main job).
#
#   scripts/bench.sh                   small size (a couple of minutes on 2 cores): prints the table,
#                                      writes bench.json and PNG charts to results/<date>_<time>/
#   scripts/bench.sh --full            the standard shapes of DESIGN.md (prefill L 1024 and 4096, decode Lk 4096 and 32768)
#   scripts/bench.sh --filter REGEX    only rows whose name matches REGEX (Google Benchmark's --benchmark_filter)
#   scripts/bench.sh --out DIR         write bench.json and the charts to DIR instead
#   scripts/bench.sh --baseline IMPL   the impl the table compares against (default: openblas)
#   scripts/bench.sh ... -- ARGS       pass ARGS to mnemo_bench (e.g. -- --benchmark_repetitions=3)
#
# Installs missing Debian packages itself (as root or with sudo). Build tree: build/bench (Release,
# -march=native). Row names, counters and sizes: bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

size=small
filter=""
out=""
baseline=openblas
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) size=full ;;
    --small) size=small ;;
    --filter) [ $# -ge 2 ] || { echo "scripts/bench.sh: --filter needs a REGEX" >&2; exit 2; }; filter=$2; shift ;;
    --filter=*) filter=${1#--filter=} ;;
    --out) [ $# -ge 2 ] || { echo "scripts/bench.sh: --out needs a DIR" >&2; exit 2; }; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --baseline) [ $# -ge 2 ] || { echo "scripts/bench.sh: --baseline needs an IMPL" >&2; exit 2; }; baseline=$2; shift ;;
    --baseline=*) baseline=${1#--baseline=} ;;
    -h|--help) usage; exit 0 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "scripts/bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

source scripts/deps.sh
mnemo_install_deps

start=$(date +%s)
jobs=$(nproc 2>/dev/null || echo 2)
build=build/bench
mkdir -p "$build"

echo "=== mnemo bench: configure + build ($build, Release, -march=native) ==="
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMNEMO_ARCH=native \
  -DMNEMO_BUILD_BENCH=ON -DMNEMO_BUILD_TESTS=OFF -DMNEMO_BUILD_EXAMPLES=OFF >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; echo "scripts/bench.sh: configure failed (log: $build/configure.log)" >&2; exit 1; }
# The compiler's output goes to a log (GCC 12 prints false -Wmaybe-uninitialized warnings from inside
# Eigen's AVX-512 GEMM); it is shown in full only when the build fails.
cmake --build "$build" --target mnemo_bench -j"$jobs" >"$build/build.log" 2>&1 ||
  { cat "$build/build.log"; echo "scripts/bench.sh: build failed (log: $build/build.log)" >&2; exit 1; }
build_done=$(date +%s)

[ -n "$out" ] || out="results/$(date +%Y-%m-%d_%H%M%S)"
mkdir -p "$out"
json="$out/bench.json"

# The machine may be shared: every row runs as 5 repetitions of >= 0.1 s, randomly interleaved with
# the other rows' repetitions, so a burst of outside load spreads over all rows instead of landing
# on one; the table uses each row's median (and shows the spread). Flags after -- override these.
args=(--benchmark_out="$json" --benchmark_out_format=json
      --benchmark_enable_random_interleaving=true --benchmark_repetitions=5 --benchmark_min_time=0.1
      --benchmark_display_aggregates_only=true)
[ -z "$filter" ] || args+=(--benchmark_filter="$filter")
echo "=== mnemo bench: running mnemo_bench (MNEMO_BENCH_SIZE=$size) -> $json ==="
echo "    load average before the run: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)" \
  "(rows share the machine with anything else running: ratios within one run are what counts)"
MNEMO_BENCH_SIZE=$size "$build/bench/mnemo_bench" "${args[@]}" ${bench_args[@]+"${bench_args[@]}"}
run_done=$(date +%s)

echo
echo "=== mnemo bench: table and charts ($out) ==="
/usr/bin/python3 bench/plot "$json" --out "$out" --baseline "$baseline"

echo
echo "mnemo bench: done in $(( $(date +%s) - start )) s (build $(( build_done - start )) s," \
  "run $(( run_done - build_done )) s); results in $out/"

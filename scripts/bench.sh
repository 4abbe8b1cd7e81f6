#!/usr/bin/env bash
# Builds mnemo_bench and runs the whole benchmark comparison (README command (a), the main job).
#
#   scripts/bench.sh                   small size: every row of mnemo_bench (the oneDNN peer too if
#                                      libdnnl-dev is there) as 3 repetitions of >= 0.03 s, a peak-memory
#                                      pass, the table + headline, the figures fig_a..fig_e + per-family
#                                      charts (run 2 to 3 min on 2 cores; first build 4 to 5 min)
#   scripts/bench.sh --full            the standard shapes of DESIGN.md (prefill L 1024 and 4096, decode
#                                      Lk 4096 and 32768), 5 repetitions of >= 0.1 s, with the external
#                                      peers (takes much longer: an hour or more on 2 cores)
#   scripts/bench.sh --peers           also run the external peers: PyTorch SDPA (bench/peers/torch_sdpa.sh;
#                                      the first time it installs torch into build/peer-venv) and ggml
#                                      (bench/peers/ggml_attn.sh; the first time it builds ggml-python into
#                                      build/peer-venv-ggml); --no-peers: never
#   scripts/bench.sh --filter REGEX    only rows whose name matches REGEX (Google Benchmark's --benchmark_filter)
#   scripts/bench.sh --out DIR         results in DIR instead of results/<date>_<time>/
#   scripts/bench.sh --baseline IMPL   the impl the table compares against (default: openblas)
#   scripts/bench.sh --no-memory       skip the peak-memory pass
#   scripts/bench.sh --quick           1 repetition of >= 0.02 s per row (a smoke run; figures are rough)
#   scripts/bench.sh --publish DIR     after the run, copy its figures (fig_*.png), headline.txt and
#                                      table.txt to DIR (docs/bench for bench/README.md's "Latest figures")
#   scripts/bench.sh ... -- ARGS       pass ARGS to mnemo_bench (e.g. -- --benchmark_repetitions=9)
#
# Writes to the results folder (git-ignored): bench.json (Google Benchmark JSON), memory.json
# (the memory pass), torch_sdpa.json and ggml_attn.json (the peers), table.txt (the table printed at the end),
# headline.txt (the headline ratios) and the PNGs. Installs missing Debian packages itself (as
# root or with sudo). Build tree: build/bench (Release, -march=native). Rows, counters, figures:
# bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }

size=small
filter=""
out=""
baseline=openblas
peers=auto
memory=1
quick=0
publish=""
bench_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --full) size=full ;;
    --small) size=small ;;
    --peers) peers=1 ;;
    --no-peers) peers=0 ;;
    --no-memory) memory=0 ;;
    --quick) quick=1 ;;
    --filter) [ $# -ge 2 ] || { echo "scripts/bench.sh: --filter needs a REGEX" >&2; exit 2; }; filter=$2; shift ;;
    --filter=*) filter=${1#--filter=} ;;
    --out) [ $# -ge 2 ] || { echo "scripts/bench.sh: --out needs a DIR" >&2; exit 2; }; out=$2; shift ;;
    --out=*) out=${1#--out=} ;;
    --baseline) [ $# -ge 2 ] || { echo "scripts/bench.sh: --baseline needs an IMPL" >&2; exit 2; }; baseline=$2; shift ;;
    --baseline=*) baseline=${1#--baseline=} ;;
    --publish) [ $# -ge 2 ] || { echo "scripts/bench.sh: --publish needs a DIR" >&2; exit 2; }; publish=$2; shift ;;
    --publish=*) publish=${1#--publish=} ;;
    -h|--help) usage; exit 0 ;;
    --) shift; bench_args=("$@"); break ;;
    *) echo "scripts/bench.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[ "$peers" != auto ] || { [ "$size" = full ] && peers=1 || peers=0; }

source scripts/deps.sh
mnemo_install_bench_deps

start=$(date +%s)
jobs=$(nproc 2>/dev/null || echo 2)
build=build/bench
mkdir -p "$build"

echo "=== mnemo bench: configure + build ($build, Release, -march=native) ==="
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release -DMNEMO_ARCH=native \
  -DMNEMO_BUILD_BENCH=ON -DMNEMO_BUILD_TESTS=OFF -DMNEMO_BUILD_EXAMPLES=OFF \
  -DMNEMO_BENCH_ONEDNN="${MNEMO_BENCH_ONEDNN:-ON}" >"$build/configure.log" 2>&1 ||
  { cat "$build/configure.log"; echo "scripts/bench.sh: configure failed (log: $build/configure.log)" >&2; exit 1; }
grep -E "mnemo bench:" "$build/configure.log" | sed 's/^-- /    /' || true
# The compiler's output goes to a log (GCC 12 prints false -Wmaybe-uninitialized warnings from inside
# Eigen's AVX-512 GEMM); it is shown in full only when the build fails.
cmake --build "$build" --target mnemo_bench -j"$jobs" >"$build/build.log" 2>&1 ||
  { cat "$build/build.log"; echo "scripts/bench.sh: build failed (log: $build/build.log)" >&2; exit 1; }
build_done=$(date +%s)

[ -n "$out" ] || out="results/$(date +%Y-%m-%d_%H%M%S)"
mkdir -p "$out"
json="$out/bench.json"

# The machine may be shared: every row runs as several repetitions, randomly interleaved with the
# other rows' repetitions, so a burst of outside load spreads over all rows instead of landing on
# one; the table uses each row's median (and shows the spread). Full: 5 repetitions of >= 0.1 s.
# Small: 3 of >= 0.03 s (580 rows in 2 min 10 s on the 2-core Xeon, 2026-11-24, load average 6;
# bench/common.hpp also runs the double-precision references and the KV-policy rows once there).
# Flags after -- override these.
if [ "$quick" = 1 ]; then reps=1; min_time=0.02
elif [ "$size" = full ]; then reps=5; min_time=0.1
else reps=3; min_time=0.03; fi
args=(--benchmark_out="$json" --benchmark_out_format=json
      --benchmark_enable_random_interleaving=true --benchmark_repetitions=$reps --benchmark_min_time=$min_time
      --benchmark_display_aggregates_only=true)
[ -z "$filter" ] || args+=(--benchmark_filter="$filter")
echo "=== mnemo bench: running mnemo_bench (MNEMO_BENCH_SIZE=$size) -> $json ==="
echo "    load average before the run: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo unknown)" \
  "(rows share the machine with anything else running: ratios within one run are what counts)"
MNEMO_BENCH_SIZE=$size "$build/bench/mnemo_bench" "${args[@]}" ${bench_args[@]+"${bench_args[@]}"}
run_done=$(date +%s)

files=("$json")
if [ "$memory" = 1 ]; then
  # Peak memory (figure (a)): every prefill row once more, one iteration, with the peak-RSS probe
  # of bench/peak_memory.cpp on (max_bytes_used). Times of this pass are not used.
  mem_filter='^prefill/'
  case "$filter" in
    -*) ;;  # a negative filter (Google Benchmark's "-REGEX": all rows but those): every prefill row
    ?*) mem_filter="($filter)" ;;
  esac
  echo "=== mnemo bench: peak-memory pass over the prefill rows -> $out/memory.json ==="
  MNEMO_BENCH_SIZE=$size MNEMO_BENCH_MEMORY=1 "$build/bench/mnemo_bench" --benchmark_filter="$mem_filter" \
    --benchmark_min_time=0 --benchmark_out="$out/memory.json" --benchmark_out_format=json >/dev/null ||
    echo "scripts/bench.sh: the memory pass failed; the figures go without memory" >&2
  [ ! -s "$out/memory.json" ] || files+=("$out/memory.json")
fi

if [ "$peers" = 1 ]; then
  # The external peers, each a separate process right after mnemo_bench, at the same size,
  # repetitions and thread counts (MNEMO_BENCH_THREADS). A peer that fails leaves its rows out; the
  # ggml peer writes the rows that passed its reference check and exits non-zero if any did not.
  peer_args=(--size "$size" --repetitions "$reps" --min-time "$min_time")
  case "$filter" in -*|"") ;; *) peer_args+=(--filter "$filter") ;; esac  # the peers have no negative filters
  for peer in "torch_sdpa:PyTorch scaled_dot_product_attention" \
              "ggml_attn:ggml flash_attn_ext and mul_mat-soft_max-mul_mat"; do
    name=${peer%%:*} what=${peer#*:}
    echo "=== mnemo bench: external peer: $what -> $out/$name.json ==="
    rm -f "$out/$name.json"
    if "bench/peers/$name.sh" "${peer_args[@]}" --out "$out/$name.json"; then files+=("$out/$name.json")
    elif [ -s "$out/$name.json" ]; then
      echo "scripts/bench.sh: the $name peer left some rows out (above); the others are in" >&2
      files+=("$out/$name.json")
    else echo "scripts/bench.sh: the $name peer failed; its rows are left out" >&2; fi
  done
fi
peers_done=$(date +%s)

echo
echo "=== mnemo bench: table and figures ($out) ==="
/usr/bin/python3 bench/plot "${files[@]}" --out "$out" --baseline "$baseline" | tee "$out/table.txt"

if [ -n "$publish" ]; then
  mkdir -p "$publish"
  cp "$out"/fig_*.png "$out/headline.txt" "$out/table.txt" "$publish"/
  echo "mnemo bench: figures, headline.txt and table.txt copied to $publish/"
fi

echo
echo "mnemo bench: done in $(( $(date +%s) - start )) s (build $(( build_done - start )) s," \
  "run $(( run_done - build_done )) s, memory and peers $(( peers_done - run_done )) s); results in $out/"

# Sourced by scripts/test.sh and scripts/bench.sh: installs the Debian packages mnemo's own
# builds need, if any are missing (as root, or through sudo).
#   mnemo_install_deps [extra packages...]   what the tests need (and any extra packages)
#   mnemo_install_bench_deps                 that plus the benchmarks' external peers: oneDNN
#                                            (libdnnl-dev, the prefill/onednn and decode/onednn
#                                            rows) and python3-venv (bench/peers/torch_sdpa.sh)
mnemo_install_deps() {
  local pkgs=(build-essential cmake ninja-build libeigen3-dev libxsimd-dev libgtest-dev libbenchmark-dev
              libopenblas-dev nlohmann-json3-dev python3-matplotlib libopenmpi-dev openmpi-bin "$@")
  local missing=()
  for p in "${pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "mnemo: installing missing Debian packages: ${missing[*]}"
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then sudo=(sudo); else
      echo "mnemo: missing packages (${missing[*]}) and neither root nor sudo: install them first" >&2
      return 1
    fi
  fi
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q &&
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

mnemo_install_bench_deps() {
  mnemo_install_deps libdnnl-dev python3-venv "$@"
}

# scripts/fuzz.sh: clang and its compiler-rt (libFuzzer, ASan, UBSan runtimes) on top of the above.
# Debian packages the runtimes per clang major version (libclang-rt-<major>-dev): the one matching
# the installed clang, or clang 14's (Debian 12's default clang) when clang is still missing.
#   mnemo_install_fuzz_deps
mnemo_install_fuzz_deps() {
  mnemo_install_deps clang || return 1
  local major
  major=$(clang -dumpversion 2>/dev/null | cut -d. -f1)
  mnemo_install_deps "libclang-rt-${major:-14}-dev"
}

# The sanitizer build's fuzz_replay tests (tests/CMakeLists.txt): libFuzzer's FuzzedDataProvider.h
# only, from the compiler-rt package of the installed clang (clang 14's when there is none).
#   mnemo_install_fuzz_header_deps
mnemo_install_fuzz_header_deps() {
  local major=""
  command -v clang >/dev/null 2>&1 && major=$(clang -dumpversion 2>/dev/null | cut -d. -f1)
  mnemo_install_deps "libclang-rt-${major:-14}-dev"
}

#!/usr/bin/env bash
# Builds mnemo's Python package (python/) into a virtual environment and runs its pytest suite.
#
#   scripts/python.sh              the CI run: venv build/python-venv, the build and test deps from
#                                  PyPI (scikit-build-core, numpy, pytest), `pip install ./python`
#                                  built for this machine (-march=native, without mnemo::prebuilt:
#                                  the quick build), then pytest python/tests (every golden case of
#                                  ../shared/golden through the Python API, the API tests; the
#                                  PyTorch comparison runs only if torch is already in the venv)
#   scripts/python.sh --portable   build the package as `pip install ./python` does by default: the
#                                  extension for x86-64-v2 plus mnemo::prebuilt (AVX2 / AVX-512
#                                  flash, decode and cache decode; ~5 more minutes of compile on 2 cores)
#   scripts/python.sh --test-build the extension at -Og (what scripts/test.sh runs: the build is
#                                  most of the time; not for measuring speed)
#   scripts/python.sh --no-test    install only
#   scripts/python.sh -- ARGS      pass ARGS to pytest (e.g. -- -k golden -x)
#
# $MNEMO_PYTHON_VENV (default build/python-venv), $MNEMO_PYTHON (default python3: any Python >= 3.9
# with its headers and venv module). The extension's build tree is build/python-ext (kept, so a
# second run only recompiles what changed). Installs pybind11-dev and the other Debian packages
# scripts/deps.sh lists when missing. Nothing else is downloaded: torch is never installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
venv=${MNEMO_PYTHON_VENV:-$root/build/python-venv}
python=${MNEMO_PYTHON:-python3}

portable=0
quick_build=0
test=1
pytest_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --portable) portable=1 ;;
    --test-build) quick_build=1 ;;
    --no-test) test=0 ;;
    -h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "scripts/python.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

source scripts/deps.sh
mnemo_install_deps pybind11-dev

start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  echo "=== mnemo python: creating the virtual environment $venv ==="
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import scikit_build_core, numpy, pytest' 2>/dev/null; then
  echo "=== mnemo python: installing scikit-build-core, numpy, pytest from PyPI into $venv ==="
  "$venv/bin/python" -m pip install --quiet --progress-bar off 'scikit-build-core>=0.8' numpy pytest
fi

if [ "$portable" = 1 ]; then
  defines=(-Ccmake.define.MNEMO_PY_ARCH=x86-64-v2 -Ccmake.define.MNEMO_PY_PREBUILT=ON)
  build_dir=$root/build/python-ext-portable
else
  defines=(-Ccmake.define.MNEMO_PY_ARCH=native -Ccmake.define.MNEMO_PY_PREBUILT=OFF)
  build_dir=$root/build/python-ext
fi
if [ "$quick_build" = 1 ]; then
  # The test suite's build (scripts/test.sh): -Og, as the C++ tests, since compiling the extension
  # is most of this script's time (738 s of CPU at -O2 on 2 Zen 1 cores); not for measuring speed.
  defines+=(-Ccmake.define.MNEMO_PY_OPT=-Og)
  build_dir=$build_dir-test
fi
echo "=== mnemo python: pip install ./python (${defines[*]}) ==="
# --no-build-isolation: build with the venv's scikit-build-core (no second download).
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc 2>/dev/null || echo 2)} \
  "$venv/bin/python" -m pip install --quiet --progress-bar off --no-build-isolation \
  -Cbuild-dir="$build_dir" "${defines[@]}" ./python
built=$(date +%s)
echo "=== mnemo python: installed in $((built - start)) s ==="

if [ "$test" = 1 ]; then
  echo "=== mnemo python: pytest ==="
  # From the root: in python/ the source folder mnemo/ (without the extension) would shadow the installed package.
  "$venv/bin/python" -m pytest -q -rs python/tests "${pytest_args[@]}"
  echo "=== mnemo python: tests ran in $(($(date +%s) - built)) s ==="
fi

#!/usr/bin/env bash
# Runs the ggml peer (bench/peers/ggml_attn.py) from its own virtual environment.
#
#   bench/peers/ggml_attn.sh --out results/<run>/ggml_attn.json [--size small|full] [--threads 1,2] ...
#
# The first run creates the environment ($MNEMO_GGML_VENV, default build/peer-venv-ggml) and
# installs ggml-python into it from PyPI, the only package index used, as its source
# distribution (--no-binary): pip builds ggml's CPU library with CMake for this machine
# (GGML_NATIVE, OpenMP) and the package exposes ggml's C API through ctypes. The build takes a
# few minutes on 2 cores; it runs under nice with one compile job ($MNEMO_GGML_BUILD_JOBS, default
# 1) so that it does not disturb a benchmark running beside it. $MNEMO_GGML_PYTHON_SPEC picks the
# version (default ggml-python==0.0.45: ggml 0.15.3, the one the peer was written and checked
# against; the reference check guards any other). Later runs reuse the environment. Nothing here
# is needed by the library, its tests or the small default scripts/bench.sh run. Arguments go to
# ggml_attn.py (--help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${MNEMO_GGML_VENV:-$root/build/peer-venv-ggml}
python=${MNEMO_PEER_PYTHON:-/usr/bin/python3}
spec=${MNEMO_GGML_PYTHON_SPEC:-ggml-python==0.0.45}
jobs=${MNEMO_GGML_BUILD_JOBS:-1}

source "$root/scripts/deps.sh"
mnemo_install_deps python3-venv cmake g++

if [ ! -x "$venv/bin/python" ]; then
  echo "ggml_attn: creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import ggml, numpy' 2>/dev/null; then
  echo "ggml_attn: building $spec from its PyPI source distribution into $venv (a few minutes)"
  CMAKE_BUILD_PARALLEL_LEVEL=$jobs MAKEFLAGS=-j$jobs nice -n 19 \
    "$venv/bin/python" -m pip install --quiet --progress-bar off --no-binary ggml-python "$spec" numpy
fi
exec "$venv/bin/python" "$here/ggml_attn.py" "$@"

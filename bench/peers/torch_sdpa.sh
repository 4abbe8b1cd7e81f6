#!/usr/bin/env bash
# Runs the PyTorch peer (bench/peers/torch_sdpa.py) from its own virtual environment.
#
#   bench/peers/torch_sdpa.sh --out results/<run>/torch_sdpa.json [--size small|full] [--threads 1,2] ...
#
# The first run creates the environment ($MNEMO_PEER_VENV, default build/peer-venv) and installs a
# current torch 2.x into it from PyPI, the only package index used: a plain `pip install torch`.
# PyPI has no CPU-only build of torch for Linux, so its default wheel comes with the CUDA
# libraries (several GiB) that a CPU run never loads. Later runs reuse the environment. Nothing
# here is needed by the library, its tests or the small default scripts/bench.sh run. Arguments
# go to torch_sdpa.py (--help lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${MNEMO_PEER_VENV:-$root/build/peer-venv}
python=${MNEMO_PEER_PYTHON:-/usr/bin/python3}

source "$root/scripts/deps.sh"
mnemo_install_deps python3-venv

if [ ! -x "$venv/bin/python" ]; then
  echo "torch_sdpa: creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, sys; sys.exit(0 if int(torch.__version__.split(".")[0]) >= 2 else 1)' 2>/dev/null; then
  echo "torch_sdpa: installing torch 2.x from PyPI into $venv (several GiB with its CUDA libraries)"
  "$venv/bin/python" -m pip install --quiet --progress-bar off 'torch>=2'
fi
exec "$venv/bin/python" "$here/torch_sdpa.py" "$@"

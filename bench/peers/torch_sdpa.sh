#!/usr/bin/env bash
# Runs the PyTorch peer (bench/peers/torch_sdpa.py) from its own virtual environment.
#
#   bench/peers/torch_sdpa.sh --out results/<run>/torch_sdpa.json [--size small|full] [--threads 1,2] ...
#
# The first run creates the environment ($MNEMO_PEER_VENV, default build/peer-venv) and installs a
# current torch 2.x into it: the CPU-only wheel from download.pytorch.org/whl/cpu where that index
# is reachable, else PyPI's default wheel (which also pulls CUDA libraries it never uses on a CPU:
# several GiB). Later runs reuse it. Nothing here is needed by the library, its tests or the
# small default scripts/bench.sh run. Arguments go to torch_sdpa.py (--help lists them).
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
  echo "torch_sdpa: installing torch 2.x into $venv"
  pip=("$venv/bin/python" -m pip install --quiet --progress-bar off)
  if ! "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu 'torch>=2' 2>/dev/null; then
    echo "torch_sdpa: the CPU wheel index is not reachable; installing torch from PyPI"
    "${pip[@]}" 'torch>=2'
  fi
fi
exec "$venv/bin/python" "$here/torch_sdpa.py" "$@"

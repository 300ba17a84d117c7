#!/usr/bin/env bash
# Quick start on a fresh machine (CPU is enough): create .venv, install the package, write a small synthetic
# dataset, train the tiny model on it, and print where the TensorBoard logs are.
#
#   bash scripts/quickstart.sh            (re-running it reuses .venv and the data, and resumes the run)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3}"
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || { echo "quickstart.sh: Python >= 3.11 needed ($("$python" --version 2>&1))" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "+ $python -m venv .venv"
  "$python" -m venv .venv
fi
echo "+ .venv/bin/pip install -e .[dev]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"

export TF_CPP_MIN_LOG_LEVEL=2
if [ ! -f data/tiny/manifest.json ]; then
  echo "+ python -m data_pipeline generate --out data/tiny ..."
  .venv/bin/python -m data_pipeline generate --out data/tiny --examples 4000 --features 64 --labels 16 \
    --shards 4 --seed 0 --split-eval 0.2
fi
echo "+ python -m trainer train --config configs/tiny.yaml --data data/tiny --model-dir runs/tiny"
.venv/bin/python -m trainer train --config configs/tiny.yaml --data data/tiny --model-dir runs/tiny
echo "+ python -m trainer evaluate --model-dir runs/tiny --data data/tiny --split eval"
.venv/bin/python -m trainer evaluate --model-dir runs/tiny --data data/tiny --split eval
echo
echo "TensorBoard: .venv/bin/tensorboard --logdir runs/tiny/logs   (or scripts/tensorboard.sh runs/tiny)"

#!/usr/bin/env bash
# Train on one device (the CPU, or one GPU when TensorFlow sees one).
#
# Usage: scripts/train_local.sh DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_local.sh data/tiny runs/tiny --config configs/tiny.yaml --epochs 2
# Env:   PYTHON (default: .venv/bin/python in the repo, else python3)
# Trainer args are passed to `python -m trainer train`; --config defaults to configs/default.yaml.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
[ $# -ge 2 ] || die "usage: $0 DATA_DIR MODEL_DIR [TRAINER ARGS...]"
data="$1" model_dir="$2"; shift 2

pick_python
check_data "$data"
default_config configs/default.yaml "$@"

cmd=("$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution one_device "${config[@]}" "$@")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

#!/usr/bin/env bash
# Train on one device (the CPU, or one GPU when TensorFlow sees one).
#
# Usage: scripts/train_local.sh DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_local.sh data/tiny runs/tiny --config configs/tiny.yaml --epochs 2
# Env:   PYTHON (default: .venv/bin/python in the repo, else python3)
# Trainer args are passed to `python -m trainer train`; --config defaults to configs/default.yaml.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 DATA_DIR MODEL_DIR [TRAINER ARGS...]"
data="$1" model_dir="$2"; shift 2

python="${PYTHON:-}"
[ -n "$python" ] || { [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python" || python=python3; }
case "$data" in
  *://*) ;;  # gs://, s3://: TensorFlow opens it, nothing to check here
  *) [ -f "$data/manifest.json" ] || die "no data at $data (no manifest.json): run python -m data_pipeline generate --out $data --examples 4000 --features 64 --labels 16 --shards 4 --seed 0 --split-eval 0.2" ;;
esac
config=(--config "$repo/configs/default.yaml")
# A --config among the trainer args replaces the default one.
for arg in "$@"; do case "$arg" in --config|--config=*) config=() ;; esac; done

# Run from any directory: the repo's packages come first on the import path.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution one_device "${config[@]}" "$@")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

#!/usr/bin/env bash
# Train on all GPUs of this machine with MirroredStrategy (NCCL all-reduce).
#
# Usage: scripts/train_multigpu.sh DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_multigpu.sh data/big runs/big --epochs 10
# Env:   PYTHON (default: .venv/bin/python in the repo, else python3)
#        CUDA_VISIBLE_DEVICES limits the GPUs used, as usual.
# Trainer args are passed to `python -m trainer train`; --config defaults to configs/multi_gpu.yaml.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
[ $# -ge 2 ] || die "usage: $0 DATA_DIR MODEL_DIR [TRAINER ARGS...]"
data="$1" model_dir="$2"; shift 2

# Fail before TensorFlow starts (and silently falls back to the CPU).
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here; use scripts/train_local.sh on the CPU"
gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
[ "${gpus:-0}" -ge 1 ] || die "nvidia-smi -L shows no GPU; use scripts/train_local.sh on the CPU"
[ "$gpus" -ge 2 ] || echo "$(basename "$0"): only 1 GPU: MirroredStrategy runs, but train_local.sh is as fast" >&2

python="${PYTHON:-}"
[ -n "$python" ] || { [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python" || python=python3; }
case "$data" in
  *://*) ;;
  *) [ -f "$data/manifest.json" ] || die "no data at $data (no manifest.json): run python -m data_pipeline generate --out $data --examples 100000 --features 256 --labels 512 --shards 16 --seed 0 --split-eval 0.1" ;;
esac
config=(--config "$repo/configs/multi_gpu.yaml")
# A --config among the trainer args replaces the default one.
for arg in "$@"; do case "$arg" in --config|--config=*) config=() ;; esac; done

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
cmd=("$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution mirrored "${config[@]}" "$@")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

#!/usr/bin/env bash
# Train on all GPUs of this machine with MirroredStrategy (NCCL all-reduce).
#
# Usage: scripts/train_multigpu.sh DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_multigpu.sh data/big runs/big --epochs 10
# Env:   PYTHON (default: .venv/bin/python in the repo, else python3)
#        CUDA_VISIBLE_DEVICES limits the GPUs used, as usual.
# Trainer args are passed to `python -m trainer train`; --config defaults to configs/multi_gpu.yaml.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
[ $# -ge 2 ] || die "usage: $0 DATA_DIR MODEL_DIR [TRAINER ARGS...]"
data="$1" model_dir="$2"; shift 2

# Fail before TensorFlow starts (and silently falls back to the CPU).
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here; use scripts/train_local.sh on the CPU"
gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
[ "${gpus:-0}" -ge 1 ] || die "nvidia-smi -L shows no GPU; use scripts/train_local.sh on the CPU"
[ "$gpus" -ge 2 ] || echo "$(basename "$0"): only 1 GPU: MirroredStrategy runs, but train_local.sh is as fast" >&2

pick_python
check_data "$data"
default_config configs/multi_gpu.yaml "$@"

cmd=("$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution mirrored "${config[@]}" "$@")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

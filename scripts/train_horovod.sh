#!/usr/bin/env bash
# Train with Horovod (Gloo) through horovodrun, in the environment scripts/install_horovod.sh builds.
#
# Usage: scripts/train_horovod.sh [-np N] [-H HOSTS | --hostfile FILE] DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_horovod.sh -np 2 data/tiny runs/hvd --config configs/tiny.yaml --max-steps 50
#        scripts/train_horovod.sh -np 8 -H node1:4,node2:4 /shared/data /shared/runs/exp1
# -np defaults to the number of GPUs (2 on a CPU-only machine); -H defaults to localhost:NP.
# Env:   HOROVODRUN (default: .venv-horovod/bin/horovodrun in the repo, else horovodrun on PATH)
# Trainer args are passed to `python -m trainer train`; --config defaults to configs/horovod.yaml.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"

np="" hosts=()
while [ $# -gt 0 ]; do
  case "$1" in
    -np|-n) [ $# -ge 2 ] || die "$1 needs a value"; np="$2"; shift 2 ;;
    -H|--hosts|--hostfile) [ $# -ge 2 ] || die "$1 needs a value"; hosts=("$1" "$2"); shift 2 ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || die "usage: $0 [-np N] [-H HOSTS | --hostfile FILE] DATA_DIR MODEL_DIR [TRAINER ARGS...]"
data="$1" model_dir="$2"; shift 2

horovodrun="${HOROVODRUN:-}"
if [ -z "$horovodrun" ]; then
  if [ -x "$repo/.venv-horovod/bin/horovodrun" ]; then horovodrun="$repo/.venv-horovod/bin/horovodrun"
  else horovodrun="$(command -v horovodrun || true)"; fi
fi
[ -n "$horovodrun" ] && [ -x "$horovodrun" ] || die "horovodrun not found: build the Horovod environment with scripts/install_horovod.sh (Horovod needs TensorFlow <= 2.18) or set HOROVODRUN=/path/to/horovodrun"
# The ranks must run the interpreter Horovod was built against, not whatever python is first on PATH.
python="$(dirname "$horovodrun")/python"
[ -x "$python" ] || python=python3

if [ -z "$np" ]; then
  np="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
  [ "${np:-0}" -ge 1 ] || np=2
fi
[[ "$np" =~ ^[1-9][0-9]*$ ]] || die "-np must be a positive integer, got '$np'"
[ ${#hosts[@]} -gt 0 ] || hosts=(-H "localhost:$np")
check_data "$data"
default_config configs/horovod.yaml "$@"

cmd=("$horovodrun" --gloo -np "$np" "${hosts[@]}"
     "$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution horovod "${config[@]}" "$@")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

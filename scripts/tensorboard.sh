#!/usr/bin/env bash
# Open TensorBoard on a model dir (train/ and eval/ summaries of one run, or a dir of runs).
#
# Usage: scripts/tensorboard.sh MODEL_DIR [PORT]      (default port 6006)
# Env:   TB_HOST (default 127.0.0.1; 0.0.0.0 to reach it from other machines)
# On Kubernetes use the TensorBoard Deployment instead (README.md, "Run on Kubernetes").
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "$(basename "$0"): $*" >&2; exit 1; }
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 MODEL_DIR [PORT]"
model_dir="$1" port="${2:-6006}"
[[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
case "$model_dir" in
  *://*) ;;
  *) [ -d "$model_dir" ] || die "no model dir at $model_dir: train first, e.g. scripts/train_local.sh DATA_DIR $model_dir" ;;
esac

tensorboard="$repo/.venv/bin/tensorboard"
[ -x "$tensorboard" ] || tensorboard="$(command -v tensorboard || true)"
[ -n "$tensorboard" ] || die "tensorboard not found: pip install -e '.[cpu]' (it comes with the package)"

cmd=("$tensorboard" --logdir "$model_dir" --port "$port" --host "${TB_HOST:-127.0.0.1}")
printf '+'; printf ' %q' "${cmd[@]}"; echo
exec "${cmd[@]}"

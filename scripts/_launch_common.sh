# Shared by the train_*.sh launchers (sourced, not run). Defines:
#   repo            the repository root
#   die MSG         print "<script>: MSG" and exit 1
#   pick_python     sets $python: $PYTHON, else the repo's .venv, else python3
#   check_data DIR  fails early, with the command that makes data, when DIR has no manifest.json
#   default_config FILE ARGS...  sets the array $config to (--config FILE) unless ARGS has a --config
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { echo "$(basename "$0"): $*" >&2; exit 1; }

pick_python() {
  python="${PYTHON:-}"
  [ -n "$python" ] || { [ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python" || python=python3; }
}

check_data() {
  case "$1" in
    *://*) ;;  # gs://, s3://: TensorFlow opens it, nothing to check here
    *) [ -f "$1/manifest.json" ] || die "no data at $1 (no manifest.json): run python -m data_pipeline generate --out $1 --examples 4000 --features 64 --labels 16 --shards 4 --seed 0 --split-eval 0.2" ;;
  esac
}

default_config() {
  config=(--config "$repo/$1"); shift
  # A --config among the trainer args replaces the default one.
  for arg in "$@"; do case "$arg" in --config|--config=*) config=() ;; esac; done
}

# Run from any directory: the repo's packages come first on the import path.
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

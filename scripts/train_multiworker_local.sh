#!/usr/bin/env bash
# Run N MultiWorkerMirroredStrategy workers on this machine (a local rehearsal of the
# Kubernetes Indexed Job: same env contract, 127.0.0.1 and free ports instead of pod DNS).
#
# Usage: scripts/train_multiworker_local.sh NUM_WORKERS DATA_DIR MODEL_DIR [TRAINER ARGS...]
#   e.g. scripts/train_multiworker_local.sh 2 data/tiny runs/mw --config configs/tiny.yaml --max-steps 50
# Env:   PYTHON (default: .venv/bin/python in the repo, else python3)
# Each worker gets JOB_COMPLETION_INDEX=i and MLT_HOSTS=127.0.0.1:p0,...; the trainer turns
# them into TF_CONFIG (trainer/cluster.py). Output lines are prefixed with [worker i].
# Exit status: 0 when every worker exits 0; otherwise the others are stopped and it is 1.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/_launch_common.sh"
[ $# -ge 3 ] || die "usage: $0 NUM_WORKERS DATA_DIR MODEL_DIR [TRAINER ARGS...]"
workers="$1" data="$2" model_dir="$3"; shift 3
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "NUM_WORKERS must be a positive integer, got '$workers'"

pick_python
check_data "$data"
default_config configs/default.yaml "$@"

# Free ports: bind to port 0 and read back what the kernel chose. They are released before
# the workers bind them, so another process could take one in between (rare; just rerun).
hosts="$("$python" - "$workers" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(",".join(f"127.0.0.1:{s.getsockname()[1]}" for s in socks))
PY
)"

pids=()
stop_all() { for p in "${pids[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap 'stop_all; exit 130' INT TERM
for ((i = 0; i < workers; i++)); do
  # TF_CONFIG from the caller's shell would win over the Indexed-Job env: drop it.
  cmd=(env -u TF_CONFIG JOB_COMPLETION_INDEX="$i" MLT_NUM_WORKERS="$workers" MLT_HOSTS="$hosts"
       "$python" -m trainer train --data "$data" --model-dir "$model_dir" --distribution multi_worker
       "${config[@]}" "$@")
  printf '+'; printf ' %q' "${cmd[@]}"; echo
  "${cmd[@]}" > >(sed -u "s/^/[worker $i] /") 2>&1 &
  pids+=("$!")
done

# Poll rather than wait in order: a failed worker leaves the others blocked in a collective
# forever, so stop them as soon as any worker fails.
status=0 running="$workers"
while [ "$running" -gt 0 ]; do
  for i in "${!pids[@]}"; do
    pid="${pids[$i]}"
    [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null || continue
    rc=0; wait "$pid" || rc=$?
    pids[$i]="" running=$((running - 1))
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
      echo "$(basename "$0"): worker $i exited with status $rc; stopping the others" >&2
      status=1
      stop_all
    fi
  done
  sleep 0.5
done
[ "$status" -eq 0 ] && echo "$(basename "$0"): all $workers workers finished"
exit "$status"

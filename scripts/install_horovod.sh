#!/usr/bin/env bash
# Build the pinned Horovod environment: its own virtualenv with the newest TensorFlow that
# Horovod 0.28.1 (the last release, 2023) still compiles against, then Horovod from source with
# Gloo (and NCCL when CUDA is present), then this package. Last line printed: path of horovodrun.
#
# Usage: scripts/install_horovod.sh [ENV_DIR]        (default: .venv-horovod in the repo root)
# Env:   PYTHON (interpreter to create the env from, default python3)
#        HOROVOD_TF_VERSION (default 2.18.1; 2.19+ fails to compile, see README "Backends and TF versions")
#        HOROVOD_CUDA (auto | 1 | 0: build for CUDA + NCCL; auto = when nvcc is present and nvidia-smi lists a
#        GPU; set 1 where no GPU is visible at build time, e.g. in `docker build`)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
env_dir="${1:-$repo/.venv-horovod}"
python="${PYTHON:-python3}"
tf_version="${HOROVOD_TF_VERSION:-2.18.1}"
horovod_version="0.28.1"

die() { echo "install_horovod.sh: $*" >&2; exit 1; }

command -v "$python" >/dev/null || die "no '$python' interpreter on PATH (set PYTHON=...)"
command -v cmake >/dev/null || die "cmake is missing: Horovod compiles from source (apt-get install cmake)"
command -v g++ >/dev/null || die "g++ is missing: Horovod compiles from source (apt-get install g++)"

cuda="${HOROVOD_CUDA:-auto}"
if [ "$cuda" = auto ]; then
  cuda=0
  if command -v nvcc >/dev/null && command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then cuda=1; fi
fi
if [ "$cuda" = 1 ]; then
  command -v nvcc >/dev/null || die "HOROVOD_CUDA=1 but nvcc is missing (use a CUDA devel image)"
  tf_pkg="tensorflow[and-cuda]==$tf_version"
  export HOROVOD_GPU_OPERATIONS=NCCL
  echo "install_horovod.sh: CUDA found: TensorFlow with CUDA, Horovod with NCCL"
else
  tf_pkg="tensorflow-cpu==$tf_version"
  echo "install_horovod.sh: no CUDA: CPU TensorFlow, Horovod with Gloo"
fi

echo "+ $python -m venv $env_dir"
[ -x "$env_dir/bin/python" ] || "$python" -m venv "$env_dir"
pip=("$env_dir/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip setuptools wheel
echo "+ pip install $tf_pkg"
"${pip[@]}" install -q "$tf_pkg"

if "$env_dir/bin/python" -c "import horovod.tensorflow" 2>/dev/null; then
  echo "install_horovod.sh: horovod already built in $env_dir"
else
  echo "+ building horovod==$horovod_version from source (several minutes)"
  HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
  HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1 \
    "${pip[@]}" install -q --no-build-isolation --no-cache-dir "horovod==$horovod_version" \
    || die "horovod build failed against $tf_pkg (see the compiler output above)"
fi

# The package itself and its test tools, resolved together with the pinned TensorFlow: pip checks only the
# requirements of what one command installs, so installing the package alone let its dependencies upgrade
# protobuf past what this TensorFlow allows.
echo "+ pip install $tf_pkg -e $repo[horovod]"
"${pip[@]}" install -q "$tf_pkg" -e "$repo[horovod]"
"${pip[@]}" check || die "pip check: the environment's dependencies conflict (see above)"

"$env_dir/bin/horovodrun" --check-build | tee /tmp/horovod-check-build.$$
grep -q "\[X\] TensorFlow" /tmp/horovod-check-build.$$ || die "horovodrun --check-build: TensorFlow not built in"
grep -q "\[X\] Gloo" /tmp/horovod-check-build.$$ || die "horovodrun --check-build: Gloo not built in"
rm -f /tmp/horovod-check-build.$$
echo "$env_dir/bin/horovodrun"

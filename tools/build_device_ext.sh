#!/usr/bin/env bash
# Builds streamkern._C for a lent GPU machine on this GPU-less one, so that no device time is spent compiling:
# against the device's exact torch (a CUDA build from the registry, in a venv of its own) with this machine's nvcc,
# for the device's architecture only, then strips its debug sections (48 -> 5.5 MB).
#   tools/build_device_ext.sh [TORCH_VERSION] [ARCH]     defaults: 2.11.0 and 9.0 (the H200 image: torch 2.11 + cu130)
# Writes streamkern/_C<the device Python's extension suffix>.so in place (git-ignored): name it in the device call's
# carry; bench/gpu_session.sh's build phase then only installs the package. DEVICE_PYTHON (default python3.12, the
# image's) and DEVICE_VENV (default .venv-device) override the interpreter and the venv; CUDA_HOME the toolkit
# (default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:-2.11.0} ARCH=${2:-9.0}
PY=${DEVICE_PYTHON:-python3.12} VENV=${DEVICE_VENV:-.venv-device}
# the toolkit's root (nvcc may be a wrapper outside it, e.g. /usr/local/bin/nvcc): CUDA_HOME, else /usr/local/cuda
CUDA_ROOT=${CUDA_HOME:-/usr/local/cuda}
[ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "no nvcc under $CUDA_ROOT: set CUDA_HOME to the CUDA toolkit" >&2; exit 2; }
if ! [ -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')"; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q "torch==$TORCH" numpy setuptools ninja wheel   # about 5 GB with its CUDA wheels
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
CPATH=$(ls -d "$SITE"/nvidia/cu*/include 2>/dev/null | head -1)   # the CUDA headers torch's wheels bring
CUDA_HOME=$CUDA_ROOT PATH=$CUDA_ROOT/bin:$PATH TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=${MAX_JOBS:-2} CPATH=$CPATH \
  "$VENV/bin/python" setup.py -q build_ext --inplace --build-temp "build/device-$ARCH"
SO=streamkern/_C$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
strip --strip-debug "$SO"
"$VENV/bin/python" - "$SO" <<'PY'
import importlib.util, sys
import torch  # noqa: F401  (the extension links against it)
spec = importlib.util.spec_from_file_location("streamkern._C", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
assert module.cuda_built(), f"{sys.argv[1]} was built without its CUDA kernels"
print(f"{sys.argv[1]}: CUDA kernels built; carry it in the device call")
PY

#!/usr/bin/env bash
# One GPU session (run by the device tool from the repo root; results land in $OUT):
#   bash bench/gpu_session.sh [build] [test] [sanitize] [bench]      (default: all four, in that order)
# build:    the CUDA extension against the machine's torch/triton (no internet: --no-build-isolation --no-deps)
# test:     every test case on CUDA tensors (-k cuda: CUDA and Triton parity; the CPU tier runs in CI), JUnit XML
# sanitize: compute-sanitizer memcheck over every CUDA-backend test, with torch's caching allocator off so that
#           an out-of-bounds access leaves its own allocation
# bench:    python -m streamkern.bench on the GPU, JSON + PNG under $OUT
set -uo pipefail
OUT=${OUT:-out}; mkdir -p "$OUT"
stages=${*:-build test sanitize bench}
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
status=0
log() { echo "== $* ($(date -u +%H:%M:%S))"; }

for stage in $stages; do
  case $stage in
    build)
      log build
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
        python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
      } | tee "$OUT/env.txt"
      python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
        || { tail -50 "$OUT/build.log"; exit 1; }
      python3 -c "import streamkern, torch; from streamkern import _C; assert _C.cuda_built(); print('backends', streamkern.available_backends())"
      ;;
    test)
      log test
      timeout 300 python3 -m pytest -q --timeout=120 -p no:cacheprovider tests -k "cuda" --junitxml="$OUT/junit.xml" \
        >"$OUT/test.log" 2>&1; rc=$?
      tail -25 "$OUT/test.log"; [ $rc -eq 0 ] || status=1
      ;;
    sanitize)
      log sanitize
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 \
        --target-processes all python3 -m pytest -q -p no:cacheprovider tests -k "cuda-cuda" \
        >"$OUT/sanitize.log" 2>&1; rc=$?
      grep -E "ERROR SUMMARY|passed|failed" "$OUT/sanitize.log" | tail -5; [ $rc -eq 0 ] || status=1
      ;;
    bench)
      log bench
      timeout 330 python3 -m streamkern.bench --device cuda --out "$OUT" >"$OUT/bench.log" 2>&1 || status=1
      tail -60 "$OUT/bench.log"
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
log "done (status $status)"
exit $status

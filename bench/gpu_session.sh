#!/usr/bin/env bash
# One GPU session in at most ~9 minutes (the device tool allows 10 per call), run from the repo root:
#   bash bench/gpu_session.sh [--dry-run] [PHASE ...]      phases: env build smoke test sanitize bench (default: all)
# Each phase has its own time cap and writes its results under $OUT as soon as it ends, so a later timeout loses
# nothing earlier; at most 8 files come back, so results are packed:
#   env.txt      device, driver, torch/triton/nvcc/compute-sanitizer versions              (env)
#   session.log  every phase's log, appended                                                (all)
#   summary.txt  one line per phase: exit status and seconds                                (all)
#   smoke.json   each op once per accelerated backend vs torch, under sync debug mode "error", replayed from a
#                CUDA graph; the verify threshold for every n in 1..1024                    (smoke)
#   junit.xml    the CUDA and Triton-on-CUDA parity tests (ids *-cuda-cuda, *-triton-cuda; not the torch-on-CUDA
#                duplicates), tests/test_gpu.py and the CUDA-graph replays of tests/test_step_graph.py and
#                tests/test_pipeline_graphs.py, in parallel processes with per-test timeouts, merged     (test)
#   sanitize.txt compute-sanitizer memcheck over the op cases on the cuda backend, racecheck on the gate   (sanitize)
#   bench.json   python -m streamkern.bench, one op per process with a short budget, merged            (bench)
# build installs against the machine's own torch and triton (no internet there): pip install --no-build-isolation
# --no-deps -e ., TORCH_CUDA_ARCH_LIST of the device found, all cores.
# --dry-run: every phase's logic on this CPU without a device, skipping (and saying so) what needs one; CI runs it
# through tests/test_gpu_session.py. PYTHON overrides the interpreter (default python3).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
phases=${*:-env build smoke test sanitize bench}
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
NPROC=$(nproc)
# caps in seconds: 30 + 150 + 40 + 110 + 75 + 135 = 540 of the ~540 available (CAP_ENV only guards a hang)
CAP_ENV=30 CAP_BUILD=150 CAP_SMOKE=40 CAP_TEST=110 CAP_MEMCHECK=45 CAP_RACECHECK=30 CAP_BENCH_OP=15 CAP_BENCH_FRAME=45
BENCH_OPS="consensus verify scale_attention drift_gate kv_ring,bank_insert bank_evict,pose_topk frame_attention"
# a,b: one capped run; frame_attention (MemFlow's shape, with torch.compile and FlexAttention rows) gets CAP_BENCH_FRAME
GPU_K="cuda-cuda or triton-cuda"
if [ $DRY = 1 ]; then   # tiny, quick stand-ins of the same commands
  export TRITON_INTERPRET=1
  CAP_SMOKE=60 CAP_TEST=90 CAP_BENCH_OP=60 BENCH_OPS="bank_evict"
  GPU_K="grid_limits or device_start_equals_host_start or positions_follow"
fi
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/session.log"; }
capped() { local cap=$1; shift; timeout -k 5 -s INT "$cap" "$@"; }
skip() { echo "skipped: $* (dry run: no CUDA device on this machine)" | tee -a "$OUT/session.log"; }
has_cuda() { [ $DRY = 0 ] && $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
status=0

phase_env() {
  { date -u; uname -srm; echo "cores: $NPROC"
    capped $CAP_ENV nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv \
      2>&1 | head -5
    capped $CAP_ENV $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    command -v nvcc >/dev/null && nvcc --version | tail -1
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -1
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt" >>"$OUT/session.log"
}

phase_build() {
  if [ $DRY = 1 ]; then
    skip "pip install --no-build-isolation --no-deps -e . (the extension here is built by make ext)"
  else
    local arch
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    echo "TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC" >>"$OUT/session.log"
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC capped $CAP_BUILD $PY -m pip install --no-build-isolation \
      --no-deps -e . >"$WORK/build.log" 2>&1; local rc=$?
    tail -40 "$WORK/build.log" >>"$OUT/session.log"; [ $rc = 0 ] || return $rc
  fi
  $PY -c "import streamkern; from streamkern import _C; print('cuda built', _C.cuda_built(),
'backends', streamkern.available_backends())" 2>&1 | tee -a "$OUT/session.log"
}

phase_smoke() {
  if has_cuda; then
    capped $CAP_SMOKE $PY -m streamkern.bench.gpu_smoke --out "$OUT/smoke.json" >>"$OUT/session.log" 2>&1
  else
    skip "the CUDA checks of the smoke run; its eager part runs on the cpu backend"
    capped $CAP_SMOKE $PY -m streamkern.bench.gpu_smoke --device cpu --backends cpu --out "$OUT/smoke.json" \
      >>"$OUT/session.log" 2>&1
  fi
}

phase_test() {
  local timeout_opt="" pids="" files procs=3
  $PY -c "import pytest_timeout" 2>/dev/null && timeout_opt="--timeout=60"
  files=$(ls tests/test_*.py | grep -v -e test_gpu.py -e test_triton_lowering.py -e test_gpu_session.py \
    -e test_step_graph.py -e test_pipeline_graphs.py)
  [ $DRY = 1 ] && files="tests/test_kv_ring.py tests/test_gpu_readiness.py" procs=1
  # $procs processes over the parity files (round-robin), one more on tests/test_gpu.py
  for n in $(seq 0 $((procs - 1))); do
    local part
    part=$(echo "$files" | tr ' ' '\n' | awk -v n=$n -v p=$procs 'NF && (NR - 1) % p == n')
    [ -n "$part" ] || continue
    # shellcheck disable=SC2086
    capped $CAP_TEST $PY -m pytest -q -p no:cacheprovider $timeout_opt -k "$GPU_K" --junitxml="$WORK/junit-$n.xml" \
      $part >"$WORK/test-$n.log" 2>&1 &
    pids="$pids $!"
  done
  # shellcheck disable=SC2046
  capped $CAP_TEST $PY -m pytest -q -p no:cacheprovider $timeout_opt -k "not cpu" tests/test_gpu.py \
    $(ls tests/test_step_graph.py tests/test_pipeline_graphs.py 2>/dev/null) \
    --junitxml="$WORK/junit-gpu.xml" >"$WORK/test-gpu.log" 2>&1 &
  pids="$pids $!"
  local rc=0
  for pid in $pids; do wait "$pid" || rc=1; done
  for f in "$WORK"/test-*.log; do echo "-- $(basename "$f")"; tail -15 "$f"; done >>"$OUT/session.log"
  $PY -m streamkern.bench.gpu_pack junit "$OUT/junit.xml" "$WORK"/junit-*.xml 2>&1 | tee -a "$OUT/session.log"
  return $rc
}

phase_sanitize() {
  if ! has_cuda || ! command -v compute-sanitizer >/dev/null; then
    skip "compute-sanitizer memcheck and racecheck"; echo "skipped (no device)" >"$OUT/sanitize.txt"; return 0
  fi
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 capped $CAP_MEMCHECK compute-sanitizer --tool memcheck --error-exitcode 9 \
    --target-processes all $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "test_op_on_cuda and cuda-cuda" \
    >"$WORK/memcheck.log" 2>&1; local m=$?
  capped $CAP_RACECHECK compute-sanitizer --tool racecheck --report-api-errors no --error-exitcode 9 \
    --target-processes all $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "test_op_on_cuda and drift_gate" \
    >"$WORK/racecheck.log" 2>&1; local r=$?
  { echo "memcheck rc=$m"; grep -E "ERROR SUMMARY|passed|failed|error" "$WORK/memcheck.log" | tail -20
    echo "racecheck rc=$r"; grep -E "RACECHECK SUMMARY|ERROR SUMMARY|hazard|passed|failed" "$WORK/racecheck.log" | tail -20
  } >"$OUT/sanitize.txt"
  cat "$OUT/sanitize.txt" >>"$OUT/session.log"
  [ $m = 0 ] && [ $r = 0 ]
}

phase_bench() {
  local device=cuda budget=0.3 rc=0 quick=""
  has_cuda || { device=cpu budget=0.01 quick=--smoke; skip "the GPU benchmarks; one op on the CPU instead"; }
  for op in $BENCH_OPS; do
    local cap=$CAP_BENCH_OP
    [ "$op" = frame_attention ] && [ $DRY = 0 ] && cap=$CAP_BENCH_FRAME
    # shellcheck disable=SC2086
    capped $cap $PY -m streamkern.bench --device $device --ops ${op//,/ } --budget $budget $quick \
      --out "$WORK/bench-$op" >"$WORK/bench-$op.log" 2>&1 || rc=1
    tail -12 "$WORK/bench-$op.log" >>"$OUT/session.log"
    $PY -m streamkern.bench.gpu_pack bench "$OUT/bench.json" "$WORK" >>"$OUT/session.log" 2>&1
  done
  return $rc
}

for p in $phases; do
  case $p in env|build|smoke|test|sanitize|bench) ;; *) echo "unknown phase $p"; exit 2 ;; esac
  log "$p"
  t0=$(date +%s)
  "phase_$p"; rc=$?
  echo "$p rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt" >>"$OUT/session.log"
  [ $rc = 0 ] || status=1
  if [ "$p" = build ] && [ $rc != 0 ]; then log "build failed: later phases skipped"; break; fi
done
log "done (status $status)"
exit $status

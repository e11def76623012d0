#!/usr/bin/env bash
# One GPU session, every number in one device call of about 7 minutes, run from the repo root:
#   bash bench/gpu_session.sh [--dry-run] [PHASE ...]
#   phases: env build smoke test sanitize demo bench fastvideo (the default, in this order; name one or more to
#   rerun them alone) and tune, which takes a device call of its own (`bash bench/gpu_session.sh env build tune`,
#   CAP_TUNE: tune_attention's 3 minutes). Each phase has its own time cap (CAP_* below: 400 s for the default
#   phases, under the 420 s the session may take) and writes its results under $OUT as it goes, so a cap or a kill
#   loses only what was not yet done.
# What comes back ($OUT, 8 files):
#   env.txt      device, driver, torch/triton/nvcc/compute-sanitizer versions, the interpreter's packages  (env)
#   session.log  every phase's log, appended                                                               (all)
#   summary.txt  "phase rc=N Ns" per phase, then the one-screen summary that is also printed last            (all)
#   smoke.jsonl  bench/gpu_smoke.py: each op once per GPU backend vs torch, under sync debug mode "error",
#                replayed from a CUDA graph; the verify threshold for every n in 1..1024; 3 processes  (smoke)
#   junit.xml    the GPU test tier (pytest -m gpu_tier: tests/conftest.py GPU_TIER), in two capped chunks (op
#                parity; graph replays, NCCL and CUDA-only checks), each on all cores (pytest-xdist), per-test
#                timeouts (pytest-timeout), merged; a chunk killed before writing its junit is read from its log (test)
#   sanitize.txt compute-sanitizer memcheck over the op cases on the cuda backend, racecheck on the gate  (sanitize)
#   demo.json    python -m streamkern.demo: the streamed pipelines at real shapes, bf16 and fp32, warm, and the
#                capturable steps replayed from CUDA graphs                                                 (demo)
#   bench.jsonl  every benchmark row, one JSON line appended the moment it is measured: the demo's rows, then
#                frame_attention at the GPU shapes, the KV writes against copy bandwidth, the other ops (no
#                torch.compile rows: --no-compile), then tune_attention's and bench_fastvideo's rows  (demo bench tune
#                fastvideo)
# build: with the prebuilt streamkern/_C<this Python's extension suffix>.so in the tree (carried in), only
# `STREAMKERN_NO_EXT=1 pip install --no-build-isolation --no-deps -e .`; without it a real build (CAP_BUILD_FULL,
# far over the session's budget: a fallback). Then `_C` must import and, on a GPU, have its CUDA kernels.
# fastvideo: FastVideo is not on the device; its wheels travel in .whl/ (tools/fetch_device_wheels.sh) and are
# installed into a folder of this session (pip --no-index --no-deps --target) put first on PYTHONPATH for the phase.
# Triton compiles into one cache for the whole session (TRITON_CACHE_DIR, under the session's work folder unless
# set): the smoke run warms it for the tests, the tests for the benchmarks.
# --dry-run: every phase's logic on this CPU without a device, skipping (and saying so) what needs one; CI runs it
# through tests/test_gpu_session.py. PYTHON overrides the interpreter (default python3).
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
ALL="env build smoke test sanitize demo bench fastvideo"
phases=${*:-$ALL}
OUT=${OUT:-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 FASTVIDEO_LOGGING_LEVEL=WARNING
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$WORK/triton-cache}
NPROC=$(nproc)
# caps in seconds, per default phase: 10 + 30 + 35 + (70 + 40) + (12 + 18) + 50 + (35 + 20 + 20 + 20) + 40 = 400;
# CAP_TUNE (a call of its own) and CAP_BUILD_FULL (a fallback) stand apart
CAP_ENV=10 CAP_BUILD=30 CAP_BUILD_FULL=300 CAP_SMOKE=35 CAP_TEST_OPS=70 CAP_TEST_GRAPHS=40 CAP_MEMCHECK=12
CAP_RACECHECK=18 CAP_DEMO=50 CAP_BENCH_ATTENTION=35 CAP_BENCH_FP32=20 CAP_BENCH_WRITES=20 CAP_BENCH_OTHERS=20
CAP_TUNE=190 CAP_FASTVIDEO=40
BENCH_WRITES="frame_write ring_write bank_insert"
BENCH_OTHERS="consensus_frame_scores verify_scales frame_topk pose_topk bank_evict_select block_masked_attention drift_gate"
GRAPH_TESTS="tests/test_pipeline_graphs.py tests/test_step_graph.py tests/test_gpu.py tests/test_distributed.py"
SMOKE_PARTS=3
if [ $DRY = 1 ]; then   # the same commands, on this CPU, small
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  CAP_SMOKE=60 SMOKE_PARTS=2 CAP_TEST_OPS=120 CAP_TEST_GRAPHS=120 CAP_DEMO=120 CAP_BENCH_WRITES=120
  BENCH_WRITES="frame_write bank_evict_select" BENCH_OTHERS=""
fi
log() { echo "== $* ($(date -u +%H:%M:%S))" | tee -a "$OUT/session.log"; }
capped() { local cap=$1; shift; timeout -k 15 -s INT "$cap" "$@"; }
say() { echo "$*" | tee -a "$OUT/session.log"; }
skip() { say "skipped: $* (dry run: no CUDA device on this machine)"; }
has_cuda() { [ $DRY = 0 ] && $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; }
has_module() { $PY -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }
status=0

phase_env() {
  { date -u; uname -srm; echo "cores: $NPROC"
    capped $CAP_ENV nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv \
      2>&1 | head -5
    capped $CAP_ENV $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
triton.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
    command -v nvcc >/dev/null && nvcc --version | tail -1
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -1
    echo "packages:"; capped $CAP_ENV $PY -m pip list --format=freeze 2>/dev/null | tr '\n' ' '; echo
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt" >>"$OUT/session.log"
}

phase_build() {
  local so
  so=streamkern/_C$($PY -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  if [ $DRY = 1 ]; then
    skip "pip install -e . (this checkout's venv has the package and make ext built $so)"
  elif [ -f "$so" ]; then
    say "prebuilt $so: installing the package without compiling"
    STREAMKERN_NO_EXT=1 capped $CAP_BUILD $PY -m pip install --no-build-isolation --no-deps -e . \
      >"$WORK/build.log" 2>&1; local rc=$?
    tail -5 "$WORK/build.log" >>"$OUT/session.log"; [ $rc = 0 ] || return $rc
  else
    local arch
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    say "no $so in the tree: building it (TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC, cap ${CAP_BUILD_FULL}s)"
    TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$NPROC capped $CAP_BUILD_FULL $PY -m pip install --no-build-isolation \
      --no-deps -e . >"$WORK/build.log" 2>&1; local rc=$?
    tail -40 "$WORK/build.log" >>"$OUT/session.log"; [ $rc = 0 ] || return $rc
  fi
  $PY -c "import sys, torch, streamkern; from streamkern import _C
print('streamkern._C', _C.__file__, 'cuda built', _C.cuda_built(), 'backends', streamkern.available_backends())
sys.exit(torch.cuda.is_available() and not _C.cuda_built())" 2>&1 | tee -a "$OUT/session.log"
}

phase_smoke() {   # SMOKE_PARTS processes at once, each every SMOKE_PARTS-th check (they share Triton's compiling)
  local args="" pids="" rc=0
  has_cuda || { args="--device cpu --backends cpu"
                skip "the CUDA checks of the smoke run; its eager part and the threshold check run on the cpu backend"; }
  : >"$OUT/smoke.jsonl"
  for i in $(seq 0 $((SMOKE_PARTS - 1))); do
    # shellcheck disable=SC2086
    capped $CAP_SMOKE $PY -m streamkern.bench.gpu_smoke $args --part "$i/$SMOKE_PARTS" --out "$OUT/smoke.jsonl" \
      >"$WORK/smoke-$i.log" 2>&1 &
    pids="$pids $!"
  done
  for pid in $pids; do wait "$pid" || rc=1; done
  for i in $(seq 0 $((SMOKE_PARTS - 1))); do grep -v '^{' "$WORK/smoke-$i.log" | tail -5; done >>"$OUT/session.log"
  say "smoke: $(grep -c '"ok": true' "$OUT/smoke.jsonl") checks passed, $(grep -c '"ok": false' "$OUT/smoke.jsonl") failed"
  return $rc
}

test_chunk() {   # name cap pytest-args...: one capped pytest of the tier, its junit and its verbose log in $WORK
  local name=$1 cap=$2; shift 2
  # shellcheck disable=SC2086
  capped "$cap" $PY -m pytest -v -p no:cacheprovider -m gpu_tier $TEST_OPTS --junitxml="$WORK/junit-$name.xml" "$@" \
    >"$WORK/junit-$name.log" 2>&1; local rc=$?
  { echo "-- $name (rc=$rc)"; grep -E "^(FAILED|ERROR) " "$WORK/junit-$name.log" | head -20
    tail -3 "$WORK/junit-$name.log"; } >>"$OUT/session.log"
  return $rc
}

phase_test() {
  TEST_OPTS="-rfE"
  has_module pytest_timeout && TEST_OPTS="$TEST_OPTS --timeout=60"
  has_module xdist && TEST_OPTS="$TEST_OPTS -n $NPROC --dist load"
  [ $DRY = 1 ] || has_cuda || say "no CUDA device: every test of the tier will be skipped"
  local rc=0 ignore=""
  for f in $GRAPH_TESTS; do ignore="$ignore --ignore=$f"; done
  # shellcheck disable=SC2086
  test_chunk ops $CAP_TEST_OPS tests $ignore --ignore=tests/integrations || rc=1
  # shellcheck disable=SC2086
  test_chunk graphs $CAP_TEST_GRAPHS $GRAPH_TESTS || rc=1
  $PY -m streamkern.bench.gpu_pack junit "$OUT/junit.xml" "$WORK/junit-ops.xml" "$WORK/junit-graphs.xml" 2>&1 \
    | tee -a "$OUT/session.log"
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

phase_demo() {   # the streamed pipelines at real shapes first: StreamingGenerator bf16 and fp32, MemoryWorldModel
  local args="--device cuda --dtype bf16 fp32"
  has_cuda || { args="--device cpu --tiny --repeats 1 --pipelines MemoryBank"; skip "the demo on CUDA; tiny, on CPU"; }
  # shellcheck disable=SC2086
  capped $CAP_DEMO $PY -m streamkern.demo $args --out "$WORK/demo" --jsonl "$OUT/bench.jsonl" \
    >"$WORK/demo.log" 2>&1; local rc=$?
  grep -v "step/s\|it/s" "$WORK/demo.log" | tail -40 >>"$OUT/session.log"
  cp "$WORK"/demo/demo*.json "$OUT/demo.json" 2>/dev/null
  return $rc
}

bench_run() {   # cap module args...: one capped benchmark run, its rows appended to bench.jsonl as measured
  local cap=$1 module=$2; shift 2
  capped "$cap" $PY -m "$module" --device $BENCH_DEVICE --no-compile --budget $BENCH_BUDGET \
    --jsonl "$OUT/bench.jsonl" --out "$WORK/bench" "$@" >"$WORK/bench.log" 2>&1; local rc=$?
  grep -v "^ " "$WORK/bench.log" | tail -8 >>"$OUT/session.log"
  say "$module $* rc=$rc, $(grep -c '"kind": "row"' "$OUT/bench.jsonl") rows in bench.jsonl so far"
  return $rc
}

phase_bench() {   # the attention over the streaming memory (bf16 at every shape, then fp32), the KV writes, the rest
  BENCH_DEVICE=cuda BENCH_BUDGET=0.2
  local rc=0 quick=""
  has_cuda || { BENCH_DEVICE=cpu BENCH_BUDGET=0.01 quick=--smoke; skip "the GPU benchmarks; quick, on CPU"; }
  if [ $DRY = 0 ]; then
    bench_run $CAP_BENCH_ATTENTION streamkern.bench.bench_frame_attention --shapes memflow mg2 wan14b oneframe \
      --dtypes bf16 || rc=1
    bench_run $CAP_BENCH_FP32 streamkern.bench.bench_frame_attention --shapes memflow --dtypes fp32 || rc=1
  fi
  # shellcheck disable=SC2086
  bench_run $CAP_BENCH_WRITES streamkern.bench $quick --ops $BENCH_WRITES || rc=1
  if [ -n "$BENCH_OTHERS" ]; then
    # shellcheck disable=SC2086
    bench_run $CAP_BENCH_OTHERS streamkern.bench $quick --ops $BENCH_OTHERS || rc=1
  fi
  return $rc
}

phase_tune() {
  has_cuda || { skip "tune_attention"; return 0; }
  capped $CAP_TUNE $PY -m streamkern.bench.tune_attention --budget $((CAP_TUNE - 20)) --jsonl "$OUT/bench.jsonl" \
    >"$WORK/tune.log" 2>&1; local rc=$?
  tail -30 "$WORK/tune.log" >>"$OUT/session.log"
  return $rc
}

phase_fastvideo() {
  (   # a subshell: PYTHONPATH only for this phase
    if [ $DRY = 1 ]; then
      skip "installing .whl/ (the device's CPython 3.12 wheels)"
    elif ls .whl/*.whl >/dev/null 2>&1; then
      $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$WORK/site" .whl/*.whl \
        >>"$OUT/session.log" 2>&1 || { say "installing .whl/ failed"; exit 1; }
      export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
      say "installed $(ls .whl/*.whl | wc -l) wheels from .whl/ into the session's site folder"
    fi
    if ! has_module fastvideo; then
      say "skipped: fastvideo is not importable (no .whl/: run tools/fetch_device_wheels.sh before the session)"
      exit 0
    fi
    has_cuda || { skip "bench_fastvideo on CUDA"; exit 0; }
    capped $CAP_FASTVIDEO $PY -m streamkern.bench.bench_fastvideo --device cuda --jsonl "$OUT/bench.jsonl" \
      --out "$WORK/fastvideo" >"$WORK/fastvideo.log" 2>&1; rc=$?
    grep -v "^\[rank" "$WORK/fastvideo.log" | tail -20 >>"$OUT/session.log"
    exit $rc
  )
}

for p in $phases; do
  case " $ALL " in *" $p "*) ;; *) echo "unknown phase $p (phases: $ALL)"; exit 2 ;; esac
done
for p in $phases; do
  log "$p"
  t0=$(date +%s)
  "phase_$p"; rc=$?
  echo "$p rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT/summary.txt" >>"$OUT/session.log"
  [ $rc = 0 ] || status=1
  if [ "$p" = build ] && [ $rc != 0 ]; then log "build failed: later phases skipped"; break; fi
done
log "done (status $status)"
$PY -m streamkern.bench.gpu_pack summary "$OUT" 2>&1 | tee -a "$OUT/session.log"
exit $status

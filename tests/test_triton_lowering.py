"""Every Triton kernel of streamkern lowers to sm_90 and sm_89 cubin, on a machine without a GPU.

How: the ``"triton"`` backend of every public op runs once on small inputs (under the interpreter here) and every
launch is recorded as the specialisation Triton's JIT would make of it on a GPU
(``streamkern.testing.triton_specialisation``, Triton's own binder: tensors ``*<dtype>``; ints ``i32``/``i64``,
with ``1`` made the constexpr ``1`` and multiples of 16 and 16-byte aligned pointers given the divisibility hint,
except where the kernel's ``do_not_specialize`` lists say not; floats ``fp32``; bools ``u1``), the constexpr values
and ``num_warps``/``num_stages``. One subprocess without ``TRITON_INTERPRET`` (so ``triton.jit`` gives real
JITFunctions) compiles each distinct specialisation with ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` and
``GPUTarget("cuda", 89, 32)`` into an empty cache, and checks the kernel's shared memory against the per-block
limit of the arch (227 KiB on sm_90, 99 KiB on sm_89). The scale-attention and frame-attention launchers are
recorded with the kernels, tiles, dot dtypes and precisions they pick on each arch (sm_89: the pointer kernels,
fp16/bf16 64×64 and 128×64 tiles, fp32 with 3×TF32 and TF32 dots; sm_90: the Hopper kernels for fp16/bf16 with
their committed configs and every candidate config, the pointer kernels for fp32 with 128-row tiles and for rows
that are not 16-byte multiples), not the interpreter's, and each is compiled for its arch; ptxas's registers,
spills and shared memory of each are printed, and for the Hopper kernels what the PTX, TTGIR and SASS hold (TMA
copies, wgmma, warp specialisation).

What it proves: each recorded specialisation lowers through Triton's passes and ptxas to a cubin for its
targets: no Triton-to-PTX type errors, no op the backend cannot lower for that arch, no layout or shared-memory
allocation that fails, no shared-memory overflow (found at compile time instead of at the first launch); no
pointer-kernel attention tile spills more than ``SPILL_BUDGET`` bytes a thread and no Hopper one spills at all,
the Hopper ones load by TMA into wgmma (and warp-specialise where configured); and every kernel launched from the
host (a ``triton.jit`` function no other kernel calls) is launched by the calls below. What it does not prove: runtime
correctness on a GPU (results, races, the drift gate's last-block hand-off), speed or occupancy, or
specialisations not recorded here (other dtypes, shapes that pick other block sizes).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import KernelInterface  # noqa: E402

import streamkern as sk  # noqa: E402
import streamkern.kernels as kernels_pkg  # noqa: E402
from streamkern._backend import triton_interpreting  # noqa: E402
from streamkern.testing import triton_launches_wrapped, triton_specialisation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"sm90": 90, "sm89": 89}
SHARED_MEMORY = {90: 227 * 1024, 89: 99 * 1024}      # bytes of shared memory one block may use
DEVICE = "cpu" if triton_interpreting() else "cuda"
_TL_DTYPES = ("float16", "bfloat16", "float32", "float64", "int1", "int8", "int16", "int32", "int64", "uint8")


# --- the kernels: every triton.jit function of streamkern.kernels that no other kernel calls ---------------------


def _entry_kernels() -> list[tuple[str, str]]:
    """``(module, kernel)`` of each kernel launched from the host, found by reading the kernels package."""
    sources = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        module = importlib.import_module(f"{kernels_pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, KernelInterface) and obj.fn.__module__ == module.__name__:
                sources[(module.__name__, name)] = inspect.getsource(obj.fn)
    called = {name for (_, name) in sources for (_, other), src in sources.items()
              if other != name and re.search(rf"\b{name}\s*\(", src)}
    return sorted(key for key in sources if key[1] not in called)


ENTRY_KERNELS = _entry_kernels()


# --- recording the launches --------------------------------------------------------------------------------------


def _constexpr_value(value):
    if isinstance(value, tl.dtype):
        return {"dtype": next(f"tl.{n}" for n in _TL_DTYPES if getattr(tl, n) == value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} cannot be passed to the compiler process")


def _spec(kernel: KernelInterface, args: tuple, kwargs: dict) -> dict:
    """The specialisation of one launch as Triton's JIT makes it (see the module doc), JSON-ready."""
    names = list(inspect.signature(kernel.fn).parameters)
    specialisation, options = triton_specialisation(kernel, args, kwargs)
    signature, constexprs, divisible = {}, {}, []
    for name, (ty, key) in zip(names, specialisation):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = _constexpr_value(key)
        elif key == "D":
            divisible.append(name)
    return dict(module=kernel.fn.__module__, kernel=kernel.fn.__name__, signature=signature, constexprs=constexprs,
                divisible=divisible, options=options)


def _launches_recorded(specs: dict, archs: tuple[int, ...]):
    """Record the specialisation of every Triton launch into ``specs`` (keyed by its JSON: identical ones once),
    to be compiled for ``archs`` (added to those of an identical one recorded before)."""
    def record(kernel, launch, args, kwargs):
        spec = _spec(kernel, args, kwargs)
        kept = specs.setdefault(json.dumps(spec, sort_keys=True), dict(spec, archs=[]))
        kept["archs"] = sorted(set(kept["archs"]) | set(archs))
        return launch(*args, **kwargs)

    return triton_launches_wrapped(record)


# --- one small call of the "triton" backend of every public op ---------------------------------------------------

FLOATS = (torch.float32, torch.bfloat16)
FP32_MATMUL_PRECISIONS = ("highest", "high")
TRITON = dict(backend="triton")


def _randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def _mask(*shape, seed=0):
    return (torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) < 0.5).to(DEVICE)


def _consensus(dtype):
    chunk, text, w = _randn(3, 2, 8, 2, 4, dtype=dtype), _randn(3, 2, 5, 2, 4, dtype=dtype), _randn(5).abs()
    sk.consensus_frame_scores(chunk, text, w, 4, (0, 2), (0.5, 0.5), **TRITON)
    strided = _randn(3, 2, 8, 4, 2, dtype=dtype).transpose(3, 4)          # [H, D] rows not flat
    sk.consensus_frame_scores(strided, text, w[None].expand(2, 5), 4, (1,), (1.0,), **TRITON)


def _bank_evict(dtype):
    sk.bank_evict_select(_randn(5, dtype=dtype), _mask(5, 7), _mask(5, seed=1), **TRITON)


def _pose_topk(dtype):
    sk.pose_topk(_randn(9, 4, dtype=dtype), _mask(9), _randn(4, dtype=dtype, seed=1), 3, **TRITON)


def _image(dtype, seed=0):
    if dtype == torch.uint8:
        return torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(seed),
                             dtype=torch.uint8).to(DEVICE)
    return _randn(2, 3, 16, 16, dtype=dtype, seed=seed).abs()


def _drift_gate(image_dtype, state_dtype, attn_dtype):
    """``should_recompute`` on a first frame, ``update`` (patch_importance), ``should_recompute`` again (drift and
    state guard)."""
    gate = sk.DriftGate(pool=4, dilation=3, layer_range=(0, 2), num_vision_tokens=16, action_tokens=2, grid=(4, 4),
                        **TRITON)
    state = _randn(3, 7, dtype=state_dtype)
    image = _image(image_dtype)
    gate.should_recompute(image, state)
    gate.update(image, _randn(2, 2, 2, 18, 18, dtype=attn_dtype).softmax(-1), state, None)
    gate.should_recompute(_image(image_dtype, seed=1), state + 0.01)


def _drift(dtype):
    """attention_weighted_drift (patch_importance runs in the drift gate's ``update``)."""
    small = _image(dtype, seed=1)[..., ::4, ::4].to(torch.float32 if dtype == torch.uint8 else dtype)
    sk.attention_weighted_drift(_image(dtype), small, _randn(2, 3, 5).abs(), 4, 3, **TRITON)


def _ring_write(dtype):
    ring = sk.KVRing(2, 1, 2, 4, window=4, sink=1, dtype=dtype, device=DEVICE, backend="triton")
    for seed in range(2):                                                   # the second append wraps
        ring.append(_randn(2, 1, 3, 2, 4, dtype=dtype, seed=seed), _randn(2, 1, 3, 2, 4, dtype=dtype, seed=9))


def _bank_insert(dtype):
    bank = [_randn(2, 2, 6, 2, 4, dtype=dtype, seed=s) for s in (0, 1)]
    chunk = [_randn(2, 2, 4, 2, 4, dtype=dtype, seed=s) for s in (2, 3)]
    frame = torch.tensor([1, 0], device=DEVICE)
    sk.bank_insert(*bank, *chunk, frame, torch.tensor(2, device=DEVICE), 2, **TRITON)


def _verify(dtype):
    layout = sk.scale_layout((1, 2, 3))
    B, T, V = 2, layout.total, 37
    draft = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    probs = _randn(B, T, V, seed=1).softmax(-1).to(dtype)
    for cfg in (None, [1.0, 2.0, 0.5]):
        logits = _randn(2 * B if cfg else B, T, V, dtype=dtype)
        sk.verify_scales(logits, draft, layout, 0, 3, mode="greedy", cfg=cfg, **TRITON)
        sk.verify_scales(logits, draft, layout, 0, 3, mode="sample", draft_probs=probs, cfg=cfg, temperature=0.7,
                         generator=torch.Generator(DEVICE).manual_seed(2), **TRITON)


def _attention(dtype):
    """Lq 40 with D 16 (fp16/bf16 64×64 tiles, fp32 64×32), 512 with D 64 (128×64 tiles, fp32 128×32) and 96 with D
    80 (head dim padded to 128; fp32 128×32), without and with self-attention, int64/int32 ids; on sm_90 fp16/bf16
    run the Hopper kernel, and q rows of an odd stride (not 16-byte multiples) the pointer kernel."""
    allow = sk.scale_allow(4, "var", device=DEVICE)
    for L, D, self_attend, id_dtype in ((40, 16, False, torch.int64), (512, 64, True, torch.int32),
                                        (96, 80, False, torch.int64)):
        q, k, v = (_randn(1, 2, L, D, dtype=dtype, seed=s) for s in range(3))
        ids = (torch.arange(L) * 4 // L).to(DEVICE, id_dtype)
        sk.block_masked_attention(q, k, v, ids, ids, allow, self_attend=self_attend, **TRITON)
    strided = _randn(1, 2, 40, 17, dtype=dtype)[..., :16]
    sk.block_masked_attention(strided, *(_randn(1, 2, 40, 16, dtype=dtype, seed=s) for s in (1, 2)), ids[:40],
                              ids[:40], allow, **TRITON)


def _frame_ops(dtype):
    """frame_write and frame_topk (shared and per head) on a tiny pool, frame_attention with and without the new
    chunk and gate (per-head and stride-0 shared tables; run under the GPU tiles: Lq 40 with D 16 and 80, Lq 96
    with D 128, so fp32 runs 64×32 and 128×32 tiles)."""
    pool = sk.FramePool(2, 2, 4, 5, 2, 16, dtype=dtype, device=DEVICE, backend="triton")
    pool.write(_randn(2, 2, 10, 2, 16, dtype=dtype), _randn(2, 2, 10, 2, 16, dtype=dtype, seed=1),
               torch.tensor([3, 0], device=DEVICE))
    q = _randn(2, 3, 2, 16, dtype=dtype, seed=2)
    cand = torch.tensor([[0, 3, -1], [2, 3, 1]], device=DEVICE)
    for per_head in (True, False):
        sk.frame_topk(q, pool.k_mean[0], cand, 2, per_head=per_head, **TRITON)
    for Lq, D in ((40, 16), (40, 80), (96, 128)):
        q, new_k, new_v = (_randn(2, Lq, 2, D, dtype=dtype, seed=s) for s in range(3))
        pages = [_randn(2, 4, 5, 2, D, dtype=dtype, seed=s) for s in (3, 4)]
        table = torch.tensor([[[0, -1, 3], [2, 2, 1]], [[1, 0, -1], [3, 3, 3]]], device=DEVICE)
        sk.frame_attention(q, *pages, table, new_k=new_k, new_v=new_v, gate=torch.tensor([True, False],
                                                                                        device=DEVICE), **TRITON)
        sk.frame_attention(q, *pages, table[:, 0], **TRITON)
    strided = _randn(2, 40, 2, 17, dtype=dtype)[..., :16]               # rows of 34 bytes: the pointer kernel
    sk.frame_attention(strided, *(_randn(2, 4, 5, 2, 16, dtype=dtype, seed=s) for s in (3, 4)), table,
                       new_k=strided, new_v=strided, **TRITON)


def _hopper_configs():
    """Every candidate config of the Hopper kernels (sm_90), each launched once through its launcher: frame
    attention over pages only (so warp-specialised configs apply), bf16 D = 128, 200 queries over 100-token pages;
    block-masked attention bf16 D = 64, 300 tokens of 4 scales with self-attention."""
    from streamkern.kernels import frame_attention as frame
    from streamkern.kernels import block_masked_attention as scale
    q = _randn(1, 200, 2, 128, dtype=torch.bfloat16)
    pages = [_randn(1, 4, 100, 2, 128, dtype=torch.bfloat16, seed=s) for s in (1, 2)]
    table = torch.tensor([[[0, -1, 3], [2, 2, 1]]], device=DEVICE)
    for config in frame.CONFIGS:
        frame.frame_attention(q, *pages, table, None, None, None, 0.1, config=config)
    q, k, v = (_randn(1, 2, 300, 64, dtype=torch.bfloat16, seed=s) for s in range(3))
    ids = (torch.arange(300) * 4 // 300).to(DEVICE)
    for config in scale.CONFIGS:
        scale.block_masked_attention(q, k, v, ids, ids, sk.scale_allow(4, "var", device=DEVICE), True, 1.0,
                                     config=config)


@contextlib.contextmanager
def _gpu_tiles(arch: int):
    """Make the scale-attention and frame-attention launchers pick the tiles, dot dtypes and precisions they pick
    on a GPU of ``arch`` (``tile_config`` of kernels/attention_tile.py, which reads the device's shared memory per
    block, and ``tma_capable``: the Hopper kernels from sm_90; the interpreter runs them too, the values it
    computes are not looked at here)."""
    from streamkern.kernels import attention_tile as tiles
    with mock.patch.object(tiles, "triton_interpreting", lambda: False), \
            mock.patch.object(tiles, "tma_capable", lambda device: arch >= 90), \
            mock.patch.object(tiles, "shared_memory_per_block", lambda device: SHARED_MEMORY[arch]):
        yield


@contextlib.contextmanager
def _matmul_precision(precision: str):
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved)


def _run_every_op():
    for dtype in FLOATS:
        _consensus(dtype)
        _bank_evict(dtype)
        _pose_topk(dtype)
        _drift(dtype)
        _ring_write(dtype)
        _bank_insert(dtype)
        _verify(dtype)
    _drift(torch.uint8)
    _drift_gate(torch.float32, torch.float32, torch.float32)
    _drift_gate(torch.bfloat16, torch.bfloat16, torch.bfloat16)
    _drift_gate(torch.uint8, torch.float64, torch.float32)


def _run_attention_ops(arch: int):
    """The ops whose tiles depend on the GPU (run once per target, under ``_gpu_tiles``)."""
    if arch >= 90:
        _hopper_configs()
    for dtype in (torch.float16, torch.bfloat16):
        _attention(dtype)
        _frame_ops(dtype)
    for precision in FP32_MATMUL_PRECISIONS:      # fp32 dots: 3xTF32 ("highest"), TF32 ("high")
        with _matmul_precision(precision):
            _attention(torch.float32)
            _frame_ops(torch.float32)


# --- compiling in a process where triton.jit gives JITFunctions ------------------------------------------------

_CHILD = r"""
import contextlib, importlib, io, json, os, re, subprocess, sys, tempfile
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

knobs.nvidia.dump_ptxas_log = True                    # ptxas -v's log, printed by triton: registers and spills
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def sass(cubin):                                      # cuobjdump -sass (shipped with triton), None without it
    if not os.path.exists(CUOBJDUMP):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def value(v):
    return getattr(tl, v["dtype"][3:]) if isinstance(v, dict) else v


def resources(log):
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(regs.group(1)) if regs else None,
            int(spills.group(1)) + int(spills.group(2)) if spills else None)


request = json.load(sys.stdin)
for i, spec in enumerate(request["specs"]):
    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    index = {name: (fn.arg_names.index(name),) for name in spec["signature"]}
    constexprs = {index[n]: value(v) for n, v in spec["constexprs"].items()}
    attrs = {index[n]: [["tt.divisibility", 16]] for n in spec["divisible"]}
    for arch in spec["archs"]:
        row = {"spec": i, "arch": arch, "error": None}
        try:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                out = triton.compile(ASTSource(fn, spec["signature"], constexprs=constexprs, attrs=attrs),
                                     target=GPUTarget("cuda", arch, 32), options=spec["options"])
            row["registers"], row["spill_bytes"] = resources(log.getvalue())
            row["shared"] = out.metadata.shared
            if spec["kernel"].endswith("_tma_kernel") and "cubin" in out.asm:
                code = sass(out.asm["cubin"])
                ptx, ttgir = out.asm["ptx"], out.asm["ttgir"]
                row["asm"] = dict(
                    ptx_bulk_tensor="cp.async.bulk.tensor" in ptx, ptx_wgmma="wgmma.mma_async" in ptx,
                    ptx_setmaxnreg="setmaxnreg" in ptx, ttgir_warp_specialize="ttg.warp_specialize" in ttgir,
                    sass_utmaldg=None if code is None else len(re.findall(r"\bUTMALDG\b", code)),
                    sass_hgmma=None if code is None else len(re.findall(r"\bHGMMA\b", code)))
            if "cubin" not in out.asm:
                row["error"] = "no cubin produced"
            elif out.metadata.shared > request["shared_memory"][str(arch)]:
                row["error"] = (f"needs {out.metadata.shared} bytes of shared memory, sm_{arch} allows "
                                f"{request['shared_memory'][str(arch)]}")
        except Exception as e:  # the compiler's message is the test's failure message
            row["error"] = f"{type(e).__name__}: {e}"
        print(json.dumps(row), flush=True)
"""


def _why_no_compiler() -> str:
    """Why the NVIDIA backend cannot compile here ("" when it can)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as e:  # noqa: BLE001 - any import failure means no NVIDIA backend
        return f"triton's NVIDIA backend cannot be imported: {e}"
    try:
        for arch in TARGETS.values():
            get_ptxas(arch).path
    except RuntimeError as e:
        return f"ptxas is missing: {e}"
    return ""


def _describe(spec: dict) -> str:
    pointers = ",".join(t for t in spec["signature"].values() if t.startswith("*"))
    constexprs = ", ".join(f"{k}={v['dtype'] if isinstance(v, dict) else v}" for k, v in spec["constexprs"].items())
    options = ", ".join(f"{k}={v}" for k, v in spec["options"].items())
    return f"{spec['kernel']}({pointers}; {constexprs}{'; ' + options if options else ''})"


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    """``[(spec, {arch: result})]`` for every distinct specialisation launched by the calls above, compiled for
    each arch in ``spec["archs"]`` (the attention kernels' tiles depend on the arch); a result has
    ``error`` (None when it compiled) and, when it compiled, ``registers``, ``spill_bytes`` (ptxas's spill stores
    plus loads) and ``shared`` (bytes of shared memory per block)."""
    why = _why_no_compiler()
    if why:
        pytest.skip(why)
    recorded: dict = {}
    with _launches_recorded(recorded, tuple(TARGETS.values())):
        _run_every_op()
    for arch in TARGETS.values():
        with _launches_recorded(recorded, (arch,)), _gpu_tiles(arch):
            _run_attention_ops(arch)
    specs = list(recorded.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, never a cache hit
    request = json.dumps({"specs": specs, "shared_memory": SHARED_MEMORY})
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=request, capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    results = [{} for _ in specs]
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["spec"]][r["arch"]] = r
    died = f"the compiler process exited with status {proc.returncode} first:\n{proc.stderr[-4000:]}"
    for spec, r in zip(specs, results):
        for arch in spec["archs"]:
            r.setdefault(arch, {"error": died})
    return list(zip(specs, results))


# launched from sm_90 only
HOPPER_KERNELS = {"_frame_attention_tma_kernel": "streamkern.kernels.frame_attention",
                  "_block_masked_attention_tma_kernel": "streamkern.kernels.block_masked_attention"}


@pytest.mark.parametrize("module,kernel,target", [
    pytest.param(m, k, target, id=f"{m.rsplit('.', 1)[1]}.{k}-{target}")
    for m, k in ENTRY_KERNELS for target in TARGETS if not (k in HOPPER_KERNELS and TARGETS[target] < 90)])
def test_kernel_lowers(lowered, module, kernel, target):
    """Every recorded specialisation of the kernel for the target compiles to a cubin for it (the Hopper kernels
    for sm_90 only)."""
    arch = TARGETS[target]
    mine = [(spec, result[arch]["error"]) for spec, result in lowered
            if (spec["module"], spec["kernel"]) == (module, kernel) and arch in spec["archs"]]
    assert mine, f"no launch of {module}.{kernel} recorded: add a call of its op to _run_every_op"
    failures = [f"{_describe(spec)}:\n{error}" for spec, error in mine if error]
    if failures:
        pytest.fail(f"{len(failures)} of {len(mine)} specialisations of {kernel} do not lower for {target}:\n\n"
                    + "\n\n".join(failures), pytrace=False)


def test_every_launch_is_an_entry_kernel(lowered):
    """The kernels found by reading the package are the ones launched (none launched that is also called as a
    helper, so each test above sees every launch)."""
    launched = {(spec["module"], spec["kernel"]) for spec, _ in lowered}
    assert launched <= set(ENTRY_KERNELS), sorted(launched - set(ENTRY_KERNELS))


ATTENTION_KERNELS = ("_frame_attention_kernel", "_block_masked_attention_kernel")
# Register spill a thread may have (ptxas's spill stores + loads, bytes). The chosen tiles spill at most ~350 on
# sm_90 and ~250 on sm_89 with triton 3.9 (the landed bf16 64x64 tiles at head dim 128: 40-110); a tile too large
# for the register file spills kilobytes (3xTF32 at head dim 128: 64x32 with 4 warps 1.0-1.7 KB, 128x32 with 8
# warps 0.5-0.8 KB).
SPILL_BUDGET = 512


@pytest.mark.parametrize("target", TARGETS, ids=list(TARGETS))
def test_attention_tiles_spill_little(lowered, target):
    """The registers, spills and shared memory ptxas reports for each GPU tile of the attention kernels (every
    dtype; fp32 with 3xTF32 and TF32 dots) are printed (``pytest -s``), and none spills more than
    ``SPILL_BUDGET`` bytes a thread."""
    arch = TARGETS[target]
    rows = []
    for spec, result in lowered:
        if spec["kernel"] not in ATTENTION_KERNELS or arch not in spec["archs"] or result[arch]["error"]:
            continue
        c, r = spec["constexprs"], result[arch]
        rows.append((spec["kernel"], spec["signature"]["Q"][1:], c["DOT_DTYPE"]["dtype"][3:], c["PRECISION"],
                     f"{c['BLOCK_M']}x{c['BLOCK_N']}", c["BLOCK_D"], spec["options"]["num_warps"],
                     spec["options"]["num_stages"], r["registers"], r["spill_bytes"], r["shared"]))
    assert rows, "no attention kernel compiled"
    head = ("kernel", "inputs", "dots", "precision", "tile", "BLOCK_D", "warps", "stages", "registers",
            "spill bytes", "shared bytes")
    table = "\n".join(" | ".join(str(x) for x in row) for row in [head, *sorted(set(rows))])
    print(f"\n{target}:\n{table}")
    unread = [row for row in rows if row[8] is None or row[9] is None]
    assert not unread, f"ptxas's log gave no register or spill count for:\n{unread}"
    spilling = [row for row in rows if row[9] > SPILL_BUDGET]
    assert not spilling, (f"{len(spilling)} attention tiles spill over {SPILL_BUDGET} bytes a thread on {target}:"
                          f"\n{table}")


def test_hopper_kernels_copy_by_tma_into_wgmma(lowered):
    """The Hopper attention kernels run only from sm_90, and each of their sm_90 specialisations (every candidate
    config, and the committed ones at the recorded shapes) spills no register, copies its tiles by TMA
    (``cp.async.bulk.tensor`` in the PTX, UTMALDG in the SASS) for the tensor cores' wgmma (``wgmma.mma_async``,
    HGMMA); a warp-specialised config is really specialised (Triton's ``ttg.warp_specialize`` in the TTGIR,
    ``setmaxnreg`` in the PTX), the others are not. Printed with ``pytest -s``."""
    from streamkern.kernels import attention_tile as tiles
    rows, seen = [], {kernel: set() for kernel in HOPPER_KERNELS}
    for spec, result in lowered:
        if spec["kernel"] not in HOPPER_KERNELS:
            continue
        assert spec["archs"] == [90], f"{_describe(spec)} was launched for {spec['archs']}"
        r = result[90]
        if r["error"]:
            continue                                                  # test_kernel_lowers reports it
        c, o = spec["constexprs"], spec["options"]
        config = tiles.HopperConfig(c["BLOCK_M"], c["BLOCK_N"], o["num_warps"], o["num_stages"],
                                    c.get("WARP_SPECIALIZE", False), c["LAZY_RESCALE"])
        seen[spec["kernel"]].add(config)
        rows.append((spec["kernel"], spec["signature"]["Q"][1:], c["D"], c.get("HAS_NEW", "-"), config.name,
                     r["registers"], r["spill_bytes"], r["shared"], *r["asm"].values()))
    assert rows, "no Hopper kernel compiled"
    head = ("kernel", "inputs", "D", "new", "config", "registers", "spill bytes", "shared bytes",
            *lowered_asm_keys(lowered))
    table = "\n".join(" | ".join(str(x) for x in row) for row in [head, *sorted(set(rows), key=str)])
    print(f"\nsm90 Hopper kernels:\n{table}")
    for kernel, module in HOPPER_KERNELS.items():
        missing = set(importlib.import_module(module).CONFIGS) - seen[kernel]
        assert not missing, f"{kernel}: candidate configs never compiled: {sorted(c.name for c in missing)}"
    bad = []
    for row in rows:
        asm = dict(zip(head, row))
        ws = row[4].endswith("-ws") or "-ws-" in row[4]
        if (asm["spill bytes"] != 0 or not asm["ptx_bulk_tensor"] or not asm["ptx_wgmma"]
                or asm["ttgir_warp_specialize"] != ws or asm["ptx_setmaxnreg"] != ws):
            bad.append(row)
        if asm["sass_utmaldg"] is not None and not (asm["sass_utmaldg"] > 0 and asm["sass_hgmma"] > 0):
            bad.append(row)
    assert not bad, f"Hopper kernels that spill, miss TMA or wgmma, or are not specialised as configured:\n{bad}" \
                    f"\n{table}"
    if any(dict(zip(head, row))["sass_utmaldg"] is None for row in rows):
        pytest.skip("cuobjdump is not shipped with this triton: the SASS was not read (the PTX was)")


def lowered_asm_keys(lowered) -> tuple:
    """The names of the assembly facts the compiler process read of the Hopper kernels."""
    return next(tuple(r[90]["asm"]) for spec, r in lowered
                if spec["kernel"] in HOPPER_KERNELS and not r[90]["error"])

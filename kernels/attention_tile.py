"""What the Triton flash-attention kernels share (``kernels/frame_attention.py``, ``kernels/block_masked_attention.py``):
the host's choice of tiles and dot precision for a launch, and the online-softmax update of one key tile; for the
Hopper (sm_90+) kernels also the rule that picks them, their configs and the tensor-descriptor scratch allocator.

Dot precision (docs/contract.md §4.5): fp16/bf16 tiles go to the tensor cores as they are (fp32 accumulation). fp32 tiles
go to the tensor cores too, never through IEEE fp32 dot loops (0.7 TFLOP/s on an H200 against 33.5 for fp32 SDPA):
as split-precision 3×TF32 products (``input_precision="tf32x3"``, a = a_hi + a_lo in TF32, three products; 6.7e-7
relative error on an H200, inside the fp32 bound) while ``torch.get_float32_matmul_precision()`` is "highest" (the
default), and as plain TF32 (≈1e-3, the bf16 bound) when it is "high" or "medium", as torch's own fp32 matmuls.
"""
from __future__ import annotations

import contextvars
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from streamkern._backend import triton_interpreting

LOG2E = 1.4426950408889634


class TileConfig(NamedTuple):
    """One launch's tiles and dots: ``BLOCK_M`` query rows and ``BLOCK_N`` keys per tile, ``num_warps``,
    ``num_stages``, the dots' operand type ``dot_dtype`` and ``precision`` (Triton's ``input_precision``)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    dot_dtype: tl.dtype
    precision: str


def fp32_dot_precision() -> str:
    """``input_precision`` of fp32 dots: "tf32x3" while torch's float32 matmul precision is "highest", else "tf32"
    (read on the host at each launch; a change of the setting compiles the other variant once)."""
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.lru_cache(maxsize=None)
def shared_memory_per_block(device: torch.device) -> int:
    """Bytes of shared memory one block may use on the CUDA ``device`` (the opt-in limit: 227 KiB on sm_90 and
    sm_100, 163 KiB on sm_80, 99 KiB on sm_86, sm_89 and sm_120), read once per device."""
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


LARGE_SHARED_MEMORY = 200 * 1024   # fp32 tiles of 128 query rows fit (sm_90, sm_100)


def tile_config(Lq: int, D: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """Tiles and dots of an attention launch of ``Lq`` queries with head dim ``D`` in ``dtype`` on ``device``.

    GPU tiles (2 pipeline stages; tests/test_triton_lowering.py compiles each for sm_90 and sm_89 and prints the
    registers, spills and shared memory ptxas reports):

    * fp16/bf16: 64×64, 4 warps; 128×64 with 8 warps when ``D <= 64`` and ``Lq >= 512`` (enough query tiles to
      keep every SM busy); 32-key tiles for K/V rows over 256 bytes (``D > 128``).
    * fp32 where a block may use over 200 KiB of shared memory (sm_90, sm_100): 128 query rows with 8 warps (the
      best measured for tf32x3 on an H200: 21 TFLOP/s against 17 with 64 rows and 4 warps), 64 rows with 4 warps
      when ``Lq <= 64``; 32-key tiles, 16 for 3×TF32 with head dims over 64 (at D = 128 ptxas spills 490–770
      bytes a thread with 32 keys, 90–110 with 16; triton 3.9).
    * fp32 elsewhere (99 KiB on sm_89): 64×16 tiles with 4 warps, 32×16 for head dims over 64 (at D = 128 the
      128-row tiles need 144–160 KiB of shared memory, 64×16 spills 2–3 KB a thread).

    Under ``TRITON_INTERPRET=1`` (the CPU tests): 16×16 tiles, and the interpreter computes every dot in fp32
    with numpy whatever ``input_precision`` says, so the CPU tests see fp32 products for every setting; bf16 tiles
    are widened to fp32 first there, since the interpreter multiplies bf16 operands wrongly (it reads their raw
    bits)."""
    precision = fp32_dot_precision() if dtype == torch.float32 else "tf32"   # ignored for 16-bit operands
    if triton_interpreting():                 # numpy's fp32 dots, whatever the precision says (see above)
        dot_dtype = tl.float32 if dtype in (torch.float32, torch.bfloat16) else tl.float16
        return TileConfig(16, 16, 1, 1, dot_dtype, precision)
    block_d = max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        if shared_memory_per_block(device) < LARGE_SHARED_MEMORY:
            return TileConfig(64 if block_d <= 64 else 32, 16, 4, 2, tl.float32, precision)
        block_n = 16 if precision == "tf32x3" and block_d > 64 else 32
        return TileConfig(64, block_n, 4, 2, tl.float32, precision) if Lq <= 64 else \
            TileConfig(128, block_n, 8, 2, tl.float32, precision)
    dot_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]
    if D <= 64 and Lq >= 512:
        return TileConfig(128, 64, 8, 2, dot_dtype, precision)
    return TileConfig(64, 32 if block_d * 2 > 256 else 64, 4, 2, dot_dtype, precision)


RESCALE_THRESHOLD = tl.constexpr(8.0)   # log2 units: a row's reference max moves only when a score exceeds it by 2^8


@triton.jit
def online_softmax_update(s, keep, v, acc, m_i, l_i, qk_scale, LAZY_RESCALE: tl.constexpr, PRECISION: tl.constexpr,
                          DOT_DTYPE: tl.constexpr):
    """One key tile of flash attention, the update every attention kernel runs (pointer and Hopper kernels of both
    ops): ``s [BLOCK_M, BLOCK_N]`` the raw fp32 scores ``q·kᵀ`` of the caller's dot (at the caller's precision),
    ``keep`` (broadcastable to ``s``) the (query, key) pairs that count, ``v [BLOCK_N, BLOCK_D]`` in ``DOT_DTYPE``;
    ``acc [BLOCK_M, BLOCK_D]``, the reference max ``m_i`` (log2 units) and the sum ``l_i [BLOCK_M]`` in fp32.
    With ``qk_scale = sm_scale·log2 e`` (> 0) and scores -inf where not kept: ``p = 2^(s·qk_scale − m')`` (the scale
    folded into the exponent's FMA), ``l' = l·2^(m−m') + Σ p``, ``acc' = acc·2^(m−m') + p·v`` (one dot accumulating
    into the rescaled ``acc`` at ``input_precision=PRECISION``: the pointer kernels pass theirs, 3×TF32 for fp32
    while torch's matmul precision is "highest"; the Hopper kernels' fp16/bf16 dots pass None); returns
    ``(acc', m', l')``.

    ``LAZY_RESCALE=False``: ``m' = max(m, rowmax s·qk_scale)`` (flash attention 2). ``True``: a row's ``m`` moves
    only when the tile's max exceeds it by more than ``RESCALE_THRESHOLD`` (= 8), and ``acc`` is rescaled only
    when some row moved. Exact: out = acc / l and lse = m + log2 l hold for any reference m with the same m in both,
    and every p ≤ 2^8 (fp32 l and acc cannot overflow below 2^120 keys; bf16/fp16 p keep their relative precision);
    a row that did not move has ``2^(m−m') = 2^0 = 1`` exactly, so skipping its multiply changes no bit. A row that
    has kept no key keeps ``m = -inf`` (its exponent base is taken as 0, so no NaN) and ``l = 0``."""
    s = tl.where(keep, s, float("-inf"))
    m_tile = tl.max(s, 1) * qk_scale
    if LAZY_RESCALE:
        moved = m_tile > m_i + RESCALE_THRESHOLD
        m_new = tl.where(moved, m_tile, m_i)
    else:
        m_new = tl.maximum(m_i, m_tile)
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - base[:, None])
    alpha = tl.exp2(m_i - base)
    l_i = l_i * alpha + tl.sum(p, 1)
    if LAZY_RESCALE:
        if tl.max(moved.to(tl.int32), 0) > 0:
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(DOT_DTYPE), v, acc, input_precision=PRECISION)
    return acc, m_new, l_i


# --- the Hopper kernels (tensor-memory-accelerator loads) -------------------------------------------------------
#
# Each attention op has a second kernel for sm_90 and later whose tiles arrive by TMA: every program makes device
# side tensor descriptors (``tl.make_tensor_descriptor``) over its (b, h) slices, rows of D contiguous elements, so
# a key tile is one bulk copy into shared memory (no per-element pointers or masks), Triton pipelines those copies
# ``num_stages`` deep and the dots read the tiles from shared memory (wgmma). The descriptors' bounds do the masking
# of the pointer kernels: rows past a page, a chunk or the queries and columns past D read as zeros, and so does a
# whole tile at an out-of-range coordinate (how a page id outside [0, P) is skipped without a branch).

class HopperConfig(NamedTuple):
    """One launch of a Hopper kernel: ``BLOCK_M`` query rows and ``BLOCK_N`` keys per tile, ``num_warps`` (Triton's;
    warp specialisation adds the warps of its partitions to them), ``num_stages`` of the TMA pipeline,
    ``warp_specialize`` (Triton's automatic warp specialisation of the key loop: a producer warp issues the copies,
    consumer warp groups the dots and softmax) and ``lazy_rescale`` (``LAZY_RESCALE`` of ``online_softmax_update``)."""
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool
    lazy_rescale: bool

    def meta(self, with_warp_specialize: bool) -> dict:
        """The kernel's constexprs of this config (``WARP_SPECIALIZE`` only for kernels that have it)."""
        meta = dict(BLOCK_M=self.block_m, BLOCK_N=self.block_n, LAZY_RESCALE=self.lazy_rescale)
        return dict(meta, WARP_SPECIALIZE=self.warp_specialize) if with_warp_specialize else meta

    @property
    def tiles(self) -> tuple[int, int]:
        return self.block_m, self.block_n

    @property
    def name(self) -> str:
        return (f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"
                f"{'-ws' if self.warp_specialize else ''}{'-lazy' if self.lazy_rescale else ''}")


TMA_DTYPES = (torch.float16, torch.bfloat16)
INTERPRETER_CONFIG = HopperConfig(16, 16, 1, 1, False, True)
WS_MAX_PAGES = 64     # page ids a warp-specialised launch holds in registers (the table's K)


@functools.lru_cache(maxsize=None)
def device_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` compute capability of the CUDA ``device``, read once per device."""
    return torch.cuda.get_device_capability(device)


def tma_capable(device: torch.device) -> bool:
    """The device has tensor-memory-accelerator copies: CUDA sm_90 or later, or the CPU interpreter."""
    if device.type == "cuda":
        return device_capability(device) >= (9, 0)
    return triton_interpreting()


def _strides_fit(t: torch.Tensor, descriptor_dims: tuple[int, ...]) -> bool:
    """``t`` can be read through tensor descriptors: its last dim is contiguous, its address and every stride a
    descriptor holds (``descriptor_dims``) are multiples of 16 bytes, and so is every other stride of a dim longer
    than 1 (those only move a program's base address)."""
    size = t.element_size()
    if t.stride(-1) != 1 or t.data_ptr() % 16:
        return False
    return all((t.stride(d) * size) % 16 == 0 for d in range(t.dim() - 1)
               if d in descriptor_dims or t.shape[d] > 1)


def tma_unsupported(q: torch.Tensor, descriptor_tensors: dict, head_dim: int) -> str:
    """Why the Hopper kernel cannot take a launch ("" when it can): the tensors ``descriptor_tensors`` (name ->
    ``(tensor or None, dims its descriptor strides over)``) are read by TMA, so the rule is

    * the device is sm_90 or later (or the CPU interpreter, which runs tensor descriptors too); sm_80/sm_89 keep
      the pointer kernel,
    * fp16/bf16 inputs (fp32 stays on the pointer kernel's 3×TF32 dots),
    * a head dim whose padded tile ``next_pow2(D)`` is at most 128 and whose rows are 16-byte multiples,
    * each tensor's last dim contiguous, its address and strides multiples of 16 bytes (``_strides_fit``),
    * Triton has ``tl.make_tensor_descriptor`` (3.4 and later).

    Anything else runs the pointer kernel: both are exact, this is a choice of speed, never of results."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return "triton has no tl.make_tensor_descriptor"
    if not tma_capable(q.device):
        return f"{q.device} has no TMA"
    if q.dtype not in TMA_DTYPES:
        return f"{q.dtype} inputs (fp16/bf16 only)"
    if triton.next_power_of_2(head_dim) > 128 or (head_dim * q.element_size()) % 16:
        return f"head dim {head_dim}"
    for name, (t, dims) in descriptor_tensors.items():
        if t is not None and not _strides_fit(t, dims):
            return (f"{name}'s strides {tuple(t.stride())} or address are not 16-byte multiples with a contiguous "
                    f"last dim")
    return ""


def pointer_kernel_reason(config, q: torch.Tensor, descriptor_tensors: dict, head_dim: int, limit: str = "") -> str:
    """Why a launch runs the pointer kernel ("" when the Hopper kernel runs): ``config="pointer"`` forces it,
    else :func:`tma_unsupported`, else ``limit`` (a launcher's own bound on the Hopper kernel). A ``HopperConfig``
    asked for where the Hopper kernel cannot run is a ``ValueError`` naming ``config``."""
    why = "config='pointer'" if config == "pointer" else (tma_unsupported(q, descriptor_tensors, head_dim) or limit)
    if why and config not in (None, "pointer"):
        raise ValueError(f"config: {config} is a Hopper config, and the Hopper kernel cannot take these inputs: {why}")
    return why


class _ScratchAllocator:
    """Global memory for the kernels' device-side tensor descriptors (128 bytes each per program), from torch's
    caching allocator on the launch's stream (so a CUDA-graph capture takes it from the graph's pool)."""

    def __call__(self, size: int, alignment: int, stream):
        return torch.empty(size, dtype=torch.int8, device="cuda")


_SCRATCH = _ScratchAllocator()


def launch_with_descriptor_scratch(launch, *args, **kwargs):
    """``launch(*args, **kwargs)`` with ``triton.set_allocator`` pointing at torch's allocator inside a copy of the
    current context, so the allocator a user set (a ContextVar in triton 3.6-3.9) is not replaced."""
    def run():
        triton.set_allocator(_SCRATCH)
        return launch(*args, **kwargs)
    return contextvars.copy_context().run(run)


def autotune_enabled() -> bool:
    """``STREAMKERN_AUTOTUNE=1``: the Hopper kernels' config is measured (``triton.autotune``) at the first call of
    each key instead of read from the committed table (see ``HopperKernel``)."""
    return os.environ.get("STREAMKERN_AUTOTUNE", "0") == "1"


def _bench_briefly(kernel_call, quantiles):
    """The autotuner's timing of one config: 5 ms of warm-up, 20 ms of repeats (Triton's default 25 + 100 ms per
    config would make a first call of eight configs last seconds)."""
    from triton.testing import do_bench

    return do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


class HopperKernel:
    """A Hopper kernel, its candidate ``configs`` and the choice of one per launch.

    By default the config is ``choose(key, Lq)``, a table committed from ``bench/tune_attention.py``'s measurements
    (one compiled binary per key, no timing, no host sync: safe in a CUDA-graph capture and under sync debug mode
    "error"). With ``STREAMKERN_AUTOTUNE=1`` (CUDA only) the kernel runs through ``triton.autotune`` over the
    configs keyed on ``autotune_key`` (the head dim and table kind; Triton adds every tensor's dtype): the first
    call of a key times every config — it synchronises and takes seconds — and the process keeps the winner (and
    Triton's cache keeps the timings for later processes, ``cache_results``). A process's first call of a key must
    be an eager one: inside a CUDA-graph capture or under sync debug mode "error" it raises RuntimeError instead of
    tuning (make one eager call with the same head dim, dtypes and table kind first).

    Warp-specialised configs take only the launches the launcher allows (``ws_ok``: Triton 3.6-3.9 specialise one
    key loop without branches, see the kernels). A launcher whose host work depends on the tiles (the visit lists
    of ``block_masked_attention``) fixes them with ``tiles``: the autotuner then chooses among the configs with
    those tiles."""

    def __init__(self, kernel, configs: tuple[HopperConfig, ...], choose, autotune_key: list[str]):
        self.kernel = kernel
        self.configs = configs
        self.choose = choose
        self.autotune_key = autotune_key
        self.with_warp_specialize = any(c.warp_specialize for c in configs)
        self.autotuners: dict = {}
        self.tuned: set = set()

    def _autotuner(self, ws_ok: bool, tiles):
        picked = (ws_ok, tiles)
        if picked not in self.autotuners:
            configs = [triton.Config(c.meta(self.with_warp_specialize), num_warps=c.num_warps,
                                     num_stages=c.num_stages)
                       for c in self.configs if (ws_ok or not c.warp_specialize) and tiles in (None, c.tiles)]
            self.autotuners[picked] = triton.autotune(configs, key=self.autotune_key, do_bench=_bench_briefly,
                                                      cache_results=True)(self.kernel)
        return self.autotuners[picked]

    def config(self, key: tuple, Lq: int, ws_ok: bool, config: HopperConfig | None) -> HopperConfig | None:
        """The config a launch runs: ``config``, else None when the autotuner will choose, else the interpreter's
        or the committed one."""
        if config is not None:
            if config.warp_specialize and not ws_ok:
                raise ValueError(f"config: {config.name} is warp-specialised, which this launch cannot take")
            return config
        if autotune_enabled() and not triton_interpreting():
            return None
        return INTERPRETER_CONFIG if triton_interpreting() else self.choose(key, Lq, ws_ok)

    def launch(self, grid, key: tuple, Lq: int, ws_ok: bool, config: HopperConfig | None, *args, tiles=None,
               **kwargs) -> None:
        """Launch over ``grid(block_m)`` with ``config``, else the one chosen for ``key`` (the launch's head dim,
        dtypes, table kind and optional inputs: what tells Triton's autotuner keys apart), ``Lq`` and ``ws_ok``."""
        chosen = self.config(key, Lq, ws_ok, config)
        if chosen is not None:
            launch_with_descriptor_scratch(self.kernel[grid(chosen.block_m)], *args, **kwargs,
                                           **chosen.meta(self.with_warp_specialize), num_warps=chosen.num_warps,
                                           num_stages=chosen.num_stages)
            return
        key = (*key, ws_ok, tiles)
        if key not in self.tuned:
            why = ("inside a CUDA-graph capture" if torch.cuda.is_current_stream_capturing() else
                   "under torch.cuda.set_sync_debug_mode('error')" if torch.cuda.get_sync_debug_mode() == 2 else "")
            if why:
                raise RuntimeError(
                    f"{self.kernel.fn.__name__}: STREAMKERN_AUTOTUNE=1 would time its configs at this first call of "
                    f"{key} {why}; make one eager call with the same head dim, dtypes and table kind first")
        launch_with_descriptor_scratch(self._autotuner(ws_ok, tiles)[lambda meta: grid(meta["BLOCK_M"])], *args,
                                       **kwargs)
        self.tuned.add(key)


def tma_dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Hopper kernels' dot operand type: the inputs' own (fp16/bf16); under the interpreter bf16 tiles are
    widened to fp32, as in ``tile_config``."""
    if triton_interpreting() and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]

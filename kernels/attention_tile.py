"""What the Triton flash-attention kernels share (``kernels/frame_attention.py``, ``kernels/scale_attention.py``):
the host's choice of tiles and dot precision for a launch, and the online-softmax update of one key tile.

Dot precision (DESIGN.md §4.5): fp16/bf16 tiles go to the tensor cores as they are (fp32 accumulation). fp32 tiles
go to the tensor cores too, never through IEEE fp32 dot loops (0.7 TFLOP/s on an H200 against 33.5 for fp32 SDPA):
as split-precision 3×TF32 products (``input_precision="tf32x3"``, a = a_hi + a_lo in TF32, three products; 6.7e-7
relative error on an H200, inside the fp32 bound) while ``torch.get_float32_matmul_precision()`` is "highest" (the
default), and as plain TF32 (≈1e-3, the bf16 bound) when it is "high" or "medium", as torch's own fp32 matmuls.
"""
from __future__ import annotations

import functools
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


@triton.jit
def online_softmax_tile(q, kT, v, keep, acc, m_i, l_i, qk_scale, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One key tile of flash attention: ``q [BLOCK_M, BLOCK_D]`` and ``kT [BLOCK_D, BLOCK_N]``, ``v [BLOCK_N,
    BLOCK_D]`` in ``DOT_DTYPE``, ``keep [BLOCK_M, BLOCK_N]`` the (query, key) pairs that count. With scores
    ``S = q·kT · qk_scale`` in log2 units (``qk_scale = sm_scale·log2 e``), -inf where not kept:
    ``m' = max(m, rowmax S)``, ``l' = l·2^(m−m') + Σ 2^(S−m')``, ``acc' = acc·2^(m−m') + 2^(S−m')·v``; returns
    ``(acc', m', l')``, all fp32. A row that has kept no key keeps ``m = −inf`` (its exponent base is taken as 0,
    so no NaN) and ``l = 0``."""
    s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    base = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - base)
    p = tl.exp2(s - base[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=PRECISION)
    return acc, m_new, l_i

"""Triton flash attention under a scale-block mask (streamkern.block_masked_attention, backend "triton").

Launch structure:

1. A preparatory kernel, grid ``(nQ,)``, reads only the scale ids and ``allow``: for its q tile it classifies
   every k tile as skip / partial / full (``tile_classes`` in streamkern.ops.block_masked_attention is the torch twin the
   tests compare against) and appends the non-skipped ones to a compacted visit list ``visit [nQ, nK]`` with
   their classes ``vcls`` and their count ``n_visit [nQ]``. It depends only on the scale layout, so one list
   serves every (batch, head); nothing is read back to the host.
2. One kernel, grid ``(nQ, B * heads)``: a program keeps its ``BLOCK_M × D`` queries in registers and walks its
   visit list only, so skipped tiles never load K/V. Per visited tile: the element-wise scale mask, applied only
   on partial tiles (key scale ids + a gather from ``allow``; an id outside ``[0, NS)`` allows nothing), the
   key-length bound on every tile, then the online-softmax update ``online_softmax_update`` of
   ``kernels/attention_tile.py`` (which also picks the tiles and the dots' precision). A row that has seen no
   allowed key ends with ``l = 0`` and output 0.

On sm_90 and later, fp16/bf16 q, k, v whose rows are 16-byte aligned (and at most ``MAX_TMA_SCALES`` scales) run
``_block_masked_attention_tma_kernel`` in step 2: the same visit lists, its tiles copied by TMA
(docs/frame_attention.md, "The Hopper kernels").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._grid import grid as launch_grid
from .attention_tile import (LOG2E, HopperConfig, HopperKernel, online_softmax_update, pointer_kernel_reason,
                             tile_config, tma_dot_dtype)
from .tile_classes import TILE_FULL, TILE_PARTIAL

MAX_TMA_SCALES = tl.constexpr(32)   # scales the Hopper kernel's per-row bit sets hold


@triton.jit
def _scale_ids(IDS, offs, n, stride, NS):
    """``(ids clamped into [0, NS), valid)``: positions past ``n`` and ids outside ``[0, NS)`` are not valid."""
    in_range = offs < n
    ids = tl.load(IDS + offs * stride, mask=in_range, other=0)
    ok = in_range & (ids >= 0) & (ids < NS)
    return tl.where(ok, ids, 0).to(tl.int64), ok


@triton.jit
def _allowed(ALLOW, qs, q_ok, ks, k_ok, sa0, sa1):
    """``[BLOCK_M, BLOCK_N]`` bool: ``allow[q_scale[i], k_scale[j]]``, False for invalid ids and padding."""
    a = tl.load(ALLOW + qs[:, None] * sa0 + ks[None, :] * sa1) != 0
    return a & q_ok[:, None] & k_ok[None, :]


@triton.jit
def _visit_list_kernel(QS, KS, ALLOW, VISIT, VCLS, NVISIT, Lq, Lk, NS, n_ktiles, row_stride, sqs, sks, sa0, sa1,
                       SELF: tl.constexpr, PARTIAL: tl.constexpr, FULL: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per q tile: classify every k tile from the scale ids, append the non-skipped ones
    (index and class) to this q tile's row of ``VISIT``/``VCLS``, and store their count in ``NVISIT``."""
    pid_m = tl.program_id(0).to(tl.int64)  # every element offset in int64: strides arrive as i32
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    qs, q_ok = _scale_ids(QS, offs_m, Lq, sqs, NS)
    m_real = offs_m < Lq
    count = tl.full([], 0, tl.int32)
    for kt in range(0, n_ktiles):
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        ks, k_ok = _scale_ids(KS, offs_n, Lk, sks, NS)
        real = m_real[:, None] & (offs_n < Lk)[None, :]
        ok = _allowed(ALLOW, qs, q_ok, ks, k_ok, sa0, sa1)
        if SELF:
            ok = ok | (real & (offs_m[:, None] == offs_n[None, :]))
        n_ok = tl.sum(tl.sum(ok.to(tl.int32), 1), 0)
        n_real = tl.sum(tl.sum(real.to(tl.int32), 1), 0)
        cls = tl.where(n_ok == n_real, FULL, PARTIAL).to(tl.int8)
        visit = n_ok > 0
        tl.store(VISIT + pid_m * row_stride + count, kt, mask=visit)
        tl.store(VCLS + pid_m * row_stride + count, cls, mask=visit)
        count += visit.to(tl.int32)
    tl.store(NVISIT + pid_m, count)


@triton.jit
def _block_masked_attention_kernel(Q, K, V, O, QS, KS, ALLOW, VISIT, VCLS, NVISIT,
                            Lq, Lk, H, NS, row_stride, qk_scale, sqs, sks, sa0, sa1,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                            SELF: tl.constexpr, PARTIAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)  # every element offset in int64: strides arrive as i32
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    qs, q_ok = _scale_ids(QS, offs_m, Lq, sqs, NS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = pid_m * row_stride
    n_visit = tl.load(NVISIT + pid_m)
    for it in range(0, n_visit):
        kt = tl.load(VISIT + row + it).to(tl.int64)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(DOT_DTYPE)
        vt = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        keep = n_ok[None, :] & (offs_m >= 0)[:, None]
        if tl.load(VCLS + row + it) == PARTIAL:
            ks, k_ok = _scale_ids(KS, offs_n, Lk, sks, NS)
            ok = _allowed(ALLOW, qs, q_ok, ks, k_ok, sa0, sa1)
            if SELF:
                ok = ok | (offs_m[:, None] == offs_n[None, :])
            keep = keep & ok
        acc, m_i, l_i = online_softmax_update(tl.dot(q, kT, input_precision=PRECISION), keep, vt, acc, m_i, l_i,
                                              qk_scale, False, PRECISION, DOT_DTYPE)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _block_masked_attention_tma_kernel(Q, K, V, O, QS, KS, ALLOW, VISIT, VCLS, NVISIT,
                                Lq, Lk, H, NS, row_stride, qk_scale, sqs, sks, sa0, sa1,
                                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                                SELF: tl.constexpr, PARTIAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LAZY_RESCALE: tl.constexpr,
                                DOT_DTYPE: tl.constexpr):
    """The attention of ``_block_masked_attention_kernel`` (the same visit lists and tile classes) with q, k and v read
    by TMA through descriptors over this program's (b, h) ``[L, D]`` slices: rows past Lq or Lk and columns past D
    read as zeros. The element-wise mask of a partial tile is ``(bits[i] >> k_scale[j]) & 1``: each query row's
    allowed key scales as one int32 bit set, gathered from ``allow`` once per program (``NS <= MAX_TMA_SCALES``),
    instead of a gather from ``allow`` per (query, key) pair. ``out`` is contiguous (the launcher's)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_desc = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[Lq, D], strides=[sqm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    k_desc = tl.make_tensor_descriptor(K + b * skb + h * skh, shape=[Lk, D], strides=[skn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(V + b * svb + h * svh, shape=[Lk, D], strides=[svn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = q_desc.load([pid_m * BLOCK_M, 0]).to(DOT_DTYPE)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # read and stored through pointers: int64
    qs, q_ok = _scale_ids(QS, offs_m, Lq, sqs, NS)
    offs_s = tl.arange(0, MAX_TMA_SCALES)
    allowed = tl.load(ALLOW + qs[:, None] * sa0 + offs_s[None, :] * sa1,
                      mask=q_ok[:, None] & (offs_s < NS)[None, :], other=0) != 0
    bits = tl.sum(tl.where(allowed, 1 << offs_s[None, :], 0), 1)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = pid_m.to(tl.int64) * row_stride
    for it in range(0, tl.load(NVISIT + pid_m)):
        kt = tl.load(VISIT + row + it)
        k = k_desc.load([kt * BLOCK_N, 0]).to(DOT_DTYPE)
        v = v_desc.load([kt * BLOCK_N, 0]).to(DOT_DTYPE)
        offs_n = kt.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = (offs_n < Lk)[None, :] & (offs_m >= 0)[:, None]
        if tl.load(VCLS + row + it) == PARTIAL:
            ks, k_ok = _scale_ids(KS, offs_n, Lk, sks, NS)
            ok = (((bits[:, None] >> ks.to(tl.int32)[None, :]) & 1) != 0) & k_ok[None, :]
            if SELF:
                ok = ok | (offs_m[:, None] == offs_n[None, :])
            keep = keep & ok
        acc, m_i, l_i = online_softmax_update(tl.dot(q, tl.trans(k)), keep, v, acc, m_i, l_i, qk_scale, LAZY_RESCALE,
                                              None, DOT_DTYPE)
    offs_d = tl.arange(0, BLOCK_D)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m < Lq)[:, None] & (offs_d < D)[None, :])


# Candidate configs per tile pair (the visit lists are built for the tiles first, so the autotuner varies the rest).
# Each compiles for sm_90 with triton 3.6 and 3.9 without spilling (tests/test_triton_lowering.py). No warp
# specialisation: the mask of a partial tile loads key scale ids through pointers inside the key loop, which
# Triton's Hopper warp specialisation cannot place in its producer warp.
TILE_128x64 = HopperConfig(128, 64, 8, 3, False, True)
SMALL_L = HopperConfig(64, 64, 4, 3, False, True)
CONFIGS = (
    HopperConfig(128, 64, 8, 3, False, False),
    TILE_128x64,
    HopperConfig(128, 64, 8, 4, False, True),
    HopperConfig(128, 128, 8, 2, False, True),
    SMALL_L,
)


def _choose(key, Lq: int, ws_ok: bool) -> HopperConfig:
    """The committed config for a launch's key ``(D, dtype, self_attend)`` and ``Lq``: provisional until a GPU
    session's ``bench/tune_attention.py`` table replaces it — 128×64 tiles (VAR's scales are 1-256 tokens: wider
    key tiles straddle more mask edges) with the lazy rescale, 64-row tiles below 512 queries."""
    return SMALL_L if Lq < 512 else TILE_128x64


HOPPER = HopperKernel(_block_masked_attention_tma_kernel, CONFIGS, _choose, ["D", "SELF"])


def visit_lists(q_scale, k_scale, allow, self_attend: bool, block_m: int, block_n: int):
    """``(visit [nQ, max(nK, 1)] int32, vcls int8, n_visit [nQ] int32)``: for q tile t, ``visit[t, :n_visit[t]]``
    are the k tiles not skipped, in increasing order, and ``vcls`` their classes (TILE_PARTIAL / TILE_FULL).
    Entries past ``n_visit[t]`` are never written nor read. One launch, no host sync."""
    Lq, Lk = q_scale.numel(), k_scale.numel()
    n_qtiles, n_ktiles = triton.cdiv(Lq, block_m), triton.cdiv(Lk, block_n)
    visit = torch.empty(n_qtiles, max(n_ktiles, 1), dtype=torch.int32, device=q_scale.device)
    vcls = torch.empty(n_qtiles, max(n_ktiles, 1), dtype=torch.int8, device=q_scale.device)
    n_visit = torch.empty(n_qtiles, dtype=torch.int32, device=q_scale.device)
    allow_u8 = allow.view(torch.uint8)
    _visit_list_kernel[(n_qtiles,)](
        q_scale, k_scale, allow_u8, visit, vcls, n_visit, Lq, Lk, allow.shape[0], n_ktiles, visit.stride(0),
        q_scale.stride(0), k_scale.stride(0), *allow_u8.stride(),
        SELF=self_attend, PARTIAL=TILE_PARTIAL, FULL=TILE_FULL, BLOCK_M=block_m, BLOCK_N=block_n)
    return visit, vcls, n_visit


def block_masked_attention(q, k, v, q_scale, k_scale, allow, self_attend: bool, sm_scale: float,
                           config=None) -> torch.Tensor:
    """Host launcher: ``out [B, H, Lq, D]`` in q's dtype (every element written, zeros for rows with no key).
    Two launches (visit lists, attention), no host synchronisation; any strides.

    The Hopper kernel runs where ``tma_unsupported`` (kernels/attention_tile.py) allows it — sm_90+, fp16/bf16,
    16-byte aligned rows of D contiguous elements in q, k and v — with ``config`` (a ``HopperConfig``) or the one
    ``HOPPER`` chooses; anything else runs the pointer kernel, and ``config="pointer"`` forces it."""
    B, H, Lq, D = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_d = max(16, triton.next_power_of_2(D))
    allow_u8 = allow.view(torch.uint8)
    too_many = allow.shape[0] > MAX_TMA_SCALES.value
    why_not = pointer_kernel_reason(config, q, {"q": (q, (2,)), "k": (k, (2,)), "v": (v, (2,))}, D,
                                    f"{allow.shape[0]} scales (at most {MAX_TMA_SCALES.value})" if too_many else "")
    if why_not:
        cfg = tile_config(Lq, D, q.dtype, q.device)
        tiles = (cfg.block_m, cfg.block_n)
    else:
        key = (D, q.dtype, self_attend)
        chosen = HOPPER.config(key, Lq, False, config)
        tiles = (chosen or HOPPER.choose(key, Lq, False)).tiles
    visit, vcls, n_visit = visit_lists(q_scale, k_scale, allow, self_attend, *tiles)
    launch = launch_grid("block_masked_attention", (visit.shape[0], "query tiles"), (B * H, "B*H"))
    args = (q, k, v, out, q_scale, k_scale, allow_u8, visit, vcls, n_visit,
            Lq, k.shape[2], H, allow.shape[0], visit.stride(0), sm_scale * LOG2E,
            q_scale.stride(0), k_scale.stride(0), *allow_u8.stride())
    if why_not:
        _block_masked_attention_kernel[launch](
            *args, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            SELF=self_attend, PARTIAL=TILE_PARTIAL, D=D, BLOCK_D=block_d,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=cfg.precision, DOT_DTYPE=cfg.dot_dtype,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out
    HOPPER.launch(lambda block_m: launch, key, Lq, False, chosen, *args, *q.stride()[:3], *k.stride()[:3],
                  *v.stride()[:3], *out.stride()[:3], tiles=tiles, SELF=self_attend, PARTIAL=TILE_PARTIAL, D=D,
                  BLOCK_D=block_d, DOT_DTYPE=tma_dot_dtype(q.dtype))
    return out

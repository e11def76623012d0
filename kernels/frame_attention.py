"""Triton flash attention over frame pages (streamkern.frame_attention, backend "triton").

One launch, grid ``(ceil(Lq / BLOCK_M), B * H)``. A program keeps its ``BLOCK_M × D`` queries of one (b, h) in
registers and first reads ``gate[b]``: a closed gate sets the page count and the new-chunk length to 0, so no page
and no ``new_k`` is read. It then walks its row of the page table (``table[b, h, :]``; a shared table has stride 0
over heads): each entry is a page id read in the kernel; an id outside ``[0, P)`` (-1) runs no tile, a valid one
runs ``ceil(F / BLOCK_N)`` key tiles of that page, the tail tile masked inside the page (F need not be a multiple of
the tile). The new chunk is a last segment of ``ceil(Ln / BLOCK_N)`` tiles. Every tile does the online-softmax
update ``online_softmax_update`` of ``kernels/attention_tile.py`` (scores in log2 units, fp32 accumulation; that
module also picks the tiles and the dots' precision: 3×TF32 for fp32 inputs unless torch's float32 matmul precision
allows TF32); at the end ``out = acc / l`` and ``lse = (m + log2 l)·ln 2``, with out 0 and lse -inf where no key
was seen (``l = 0``). Page offsets are int64 (a layer of a pool may exceed 2³¹ elements).

On sm_90 and later, fp16/bf16 inputs whose rows are 16-byte aligned run ``_frame_attention_tma_kernel`` instead: the
same program and the same results, its tiles copied by TMA through tensor descriptors (docs/frame_attention.md,
"The Hopper kernels"; the rule and the configs in ``kernels/attention_tile.py``). Either way one launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import (LOG2E, HopperConfig, HopperKernel, online_softmax_update, pointer_kernel_reason,
                             WS_MAX_PAGES, tile_config, tma_dot_dtype)

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _open_counts(GATE, b, sg, K, Ln, HAS_GATE: tl.constexpr):
    """``(pages, chunk tokens)`` row ``b`` attends: ``(K, Ln)``, or ``(0, 0)`` where its gate is closed, so that
    nothing of the row's pages or chunk is read."""
    n_pages = K
    n_new = Ln
    if HAS_GATE:
        open_ = tl.load(GATE + b * sg) != 0
        n_pages = tl.where(open_, K, 0)
        n_new = tl.where(open_, Ln, 0)
    return n_pages, n_new


@triton.jit
def _attend(q, acc, m_i, l_i, K, V, offs_n, n_lim, skn, svn, offs_d, d_ok, skd, svd, qk_scale,
            PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One key tile (keys ``offs_n < n_lim`` of the segment at ``K``/``V``) loaded and attended."""
    n_ok = offs_n < n_lim
    kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                 other=0.0).to(DOT_DTYPE)
    vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                 other=0.0).to(DOT_DTYPE)
    return online_softmax_update(tl.dot(q, kT, input_precision=PRECISION), n_ok[None, :], vt, acc, m_i, l_i, qk_scale,
                                 False, PRECISION, DOT_DTYPE)


# Not specialisation keys (Triton would compile a kernel per value 1 / multiple of 16 / 16-byte alignment): what
# changes from call to call while a stream's window and bank fill, the page count, the chunk length and the table
# (strides, address); all are loop bounds, masks or scalar loads, so no vector load loses its alignment.
@triton.jit(do_not_specialize=["TABLE", "K", "Ln", "stb", "sth", "stk"])
def _frame_attention_kernel(Q, KP, VP, TABLE, NK, NV, GATE, O, LSE, Lq, H, P, F, K, Ln, qk_scale,
                            sqb, sql, sqh, sqd, skb, skp, skt, skh, skd, svb, svp, svt, svh, svd,
                            stb, sth, stk, snb, snl, snh, snd, sub, sul, suh, sud, sg,
                            sob, sol, soh, sod, slb, slh, slm,
                            HAS_NEW: tl.constexpr, HAS_GATE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)  # every element offset in int64: strides arrive as i32
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    n_pages, n_new = _open_counts(GATE, b, sg, K, Ln, HAS_GATE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(0, n_pages):
        page = tl.load(TABLE + b * stb + h * sth + j * stk)
        listed = (page >= 0) & (page < P)
        page = tl.where(listed, page, 0).to(tl.int64)
        k_seg = KP + b * skb + page * skp + h * skh
        v_seg = VP + b * svb + page * svp + h * svh
        for t in range(0, tl.where(listed, tl.cdiv(F, BLOCK_N), 0)):
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_seg, v_seg, t * BLOCK_N + offs_n, F, skt, svt, offs_d,
                                    d_ok, skd, svd, qk_scale, PRECISION, DOT_DTYPE)
    if HAS_NEW:
        k_seg = NK + b * snb + h * snh
        v_seg = NV + b * sub + h * suh
        for t in range(0, tl.cdiv(n_new, BLOCK_N)):
            acc, m_i, l_i = _attend(q, acc, m_i, l_i, k_seg, v_seg, t * BLOCK_N + offs_n, n_new, snl, sul, offs_d,
                                    d_ok, snd, sud, qk_scale, PRECISION, DOT_DTYPE)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=m_ok)


# The Hopper kernel (kernels/attention_tile.py: where it runs, its configs). Page ids and the chunk length are
# loop bounds and coordinates here, so they and the table are not specialisation keys either.
@triton.jit(do_not_specialize=["TABLE", "K", "Ln", "stb", "sth", "stk", "per_head"])
def _frame_attention_tma_kernel(Q, KP, VP, TABLE, NK, NV, GATE, O, LSE, Lq, H, P, F, K, Ln, qk_scale, per_head,
                                sqb, sql, sqh, skb, skp, skt, skh, svb, svp, svt, svh, stb, sth, stk,
                                snb, snl, snh, sub, sul, suh, sg, sob, sol, soh, slb, slh, slm,
                                HAS_NEW: tl.constexpr, HAS_GATE: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                                LAZY_RESCALE: tl.constexpr, DOT_DTYPE: tl.constexpr, MAX_PAGES: tl.constexpr):
    """The attention of ``_frame_attention_kernel`` with every tile read by TMA, through descriptors over this
    program's (b, h): queries ``[Lq, D]``, each pool layer ``[P, F, D]`` (a key tile is the box ``[page,
    t·BLOCK_N : +BLOCK_N, :]``) and the chunk ``[Ln, D]``; rows past F, Ln or Lq and columns past D read as zeros.
    The pages are one flat loop of ``K·ceil(F / BLOCK_N)`` tiles (page ``j`` and tile ``t`` carried), so the
    pipeline does not drain at the end of each page; an id outside ``[0, P)`` is read at coordinate P, wholly out
    of bounds: zeros, every key masked. ``out`` is contiguous (the launcher's). ``per_head`` (the table kind, 0 or
    1) only keys the autotuner: an int, not a constexpr, so a table that looks shared while it is empty (K = 0)
    compiles nothing more."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    q_desc = tl.make_tensor_descriptor(Q + b * sqb + h * sqh, shape=[Lq, D], strides=[sql, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    q = q_desc.load([pid_m * BLOCK_M, 0]).to(DOT_DTYPE)
    offs_n = tl.arange(0, BLOCK_N)
    n_pages, n_new = _open_counts(GATE, b, sg, K, Ln, HAS_GATE)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_desc = tl.make_tensor_descriptor(KP + b * skb + h * skh, shape=[P, F, D], strides=[skp, skt, 1],
                                       block_shape=[1, BLOCK_N, BLOCK_D])
    v_desc = tl.make_tensor_descriptor(VP + b * svb + h * svh, shape=[P, F, D], strides=[svp, svt, 1],
                                       block_shape=[1, BLOCK_N, BLOCK_D])
    tiles_per_page = tl.cdiv(F, BLOCK_N)
    if WARP_SPECIALIZE:   # the producer warp may not load through pointers: the table row waits in registers
        tl.static_assert(not HAS_NEW and not LAZY_RESCALE, "warp specialisation: one key loop, no branch in it")
        offs_k = tl.arange(0, MAX_PAGES)
        ids = tl.load(TABLE + b * stb + h * sth + offs_k.to(tl.int64) * stk, mask=offs_k < n_pages, other=-1)
        ids = tl.where((ids >= 0) & (ids < P), ids, P).to(tl.int32)
    j = 0
    t = 0
    for _ in tl.range(0, n_pages * tiles_per_page, warp_specialize=WARP_SPECIALIZE):
        if WARP_SPECIALIZE:
            page = tl.sum(tl.where(offs_k == j, ids, 0))
        else:
            page = tl.load(TABLE + b * stb + h * sth + j.to(tl.int64) * stk)
            page = tl.where((page >= 0) & (page < P), page, P).to(tl.int32)
        k = k_desc.load([page, t * BLOCK_N, 0]).reshape([BLOCK_N, BLOCK_D]).to(DOT_DTYPE)
        v = v_desc.load([page, t * BLOCK_N, 0]).reshape([BLOCK_N, BLOCK_D]).to(DOT_DTYPE)
        keep = (offs_n < F - t * BLOCK_N)[None, :] & (page < P)
        acc, m_i, l_i = online_softmax_update(tl.dot(q, tl.trans(k)), keep, v, acc, m_i, l_i, qk_scale, LAZY_RESCALE,
                                              None, DOT_DTYPE)
        t += 1
        page_done = t == tiles_per_page
        j = tl.where(page_done, j + 1, j)
        t = tl.where(page_done, 0, t)
    if HAS_NEW:
        nk_desc = tl.make_tensor_descriptor(NK + b * snb + h * snh, shape=[Ln, D], strides=[snl, 1],
                                            block_shape=[BLOCK_N, BLOCK_D])
        nv_desc = tl.make_tensor_descriptor(NV + b * sub + h * suh, shape=[Ln, D], strides=[sul, 1],
                                            block_shape=[BLOCK_N, BLOCK_D])
        for t in range(0, tl.cdiv(n_new, BLOCK_N)):
            k = nk_desc.load([t * BLOCK_N, 0]).to(DOT_DTYPE)
            v = nv_desc.load([t * BLOCK_N, 0]).to(DOT_DTYPE)
            keep = (offs_n < n_new - t * BLOCK_N)[None, :]
            acc, m_i, l_i = online_softmax_update(tl.dot(q, tl.trans(k)), keep, v, acc, m_i, l_i, qk_scale,
                                                  LAZY_RESCALE, None, DOT_DTYPE)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)   # stored through pointers: int64 offsets
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("-inf"))
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & (offs_d < D)[None, :])
    tl.store(LSE + b * slb + h * slh + offs_m * slm, lse, mask=m_ok)


# Candidate configs: each compiles for sm_90 with triton 3.6 and 3.9 without spilling (tests/test_triton_lowering.py
# checks it and the TMA copies and wgmma in its SASS; 128x128 tiles take 2 stages at D = 128, 160 KiB of shared
# memory, 3 would need 224); bench/tune_attention.py times each against cuDNN.
TILE_128x128 = HopperConfig(128, 128, 8, 2, False, True)
SMALL_LQ = HopperConfig(64, 128, 4, 3, False, True)
CONFIGS = (
    HopperConfig(128, 128, 8, 2, False, False),
    TILE_128x128,
    HopperConfig(128, 64, 8, 3, False, True),
    HopperConfig(128, 64, 8, 4, False, True),
    SMALL_LQ,
    HopperConfig(128, 128, 4, 2, True, False),
    HopperConfig(128, 64, 4, 4, True, False),
)


def _choose(key, Lq: int, ws_ok: bool) -> HopperConfig:
    """The committed config for a launch's key ``(D, dtype, table dtype, per_head, has_new, has_gate)`` and ``Lq``:
    provisional until a GPU session's ``bench/tune_attention.py`` table replaces it — 128×128 tiles (the pointer
    kernel's best tile on the H200) with the lazy rescale, 64-row tiles for short chunks."""
    return SMALL_LQ if Lq <= 64 else TILE_128x128


HOPPER = HopperKernel(_frame_attention_tma_kernel, CONFIGS, _choose, ["D", "per_head"])


def frame_attention(q, k_pages, v_pages, page_table, new_k, new_v, gate, sm_scale: float, config=None):
    """Host launcher: ``(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32)``, every element written, one
    launch (none when the output is empty), no host synchronisation; any strides; ``page_table`` is
    ``[B, H, K]``, ``gate`` ``[B]`` bool or None.

    The Hopper kernel runs where ``tma_unsupported`` (kernels/attention_tile.py) allows it — sm_90+, fp16/bf16,
    16-byte aligned rows of D contiguous elements in q, the pages and the chunk — with ``config`` (a
    ``HopperConfig``) or the one ``HOPPER`` chooses; anything else runs the pointer kernel, and ``config="pointer"``
    forces it."""
    B, Lq, H, D = q.shape
    P, F, K = k_pages.shape[1], k_pages.shape[2], page_table.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    Ln = 0 if new_k is None else new_k.shape[1]
    no_new = (0, 0, 0, 0)
    gate_u8 = None if gate is None else gate.view(torch.uint8)
    block_d = max(16, triton.next_power_of_2(D))
    args = (q, k_pages, v_pages, page_table, new_k, new_v, gate_u8, out, lse, Lq, H, P, F, K, Ln, sm_scale * LOG2E)
    if pointer_kernel_reason(config, q, {"q": (q, (1,)), "k_pages": (k_pages, (1, 2)), "v_pages": (v_pages, (1, 2)),
                                         "new_k": (new_k, (1,)), "new_v": (new_v, (1,))}, D):
        cfg = tile_config(Lq, D, q.dtype, q.device)
        _frame_attention_kernel[(triton.cdiv(Lq, cfg.block_m), B * H)](
            *args, *q.stride(), *k_pages.stride(), *v_pages.stride(), *page_table.stride(),
            *(no_new if new_k is None else new_k.stride()), *(no_new if new_v is None else new_v.stride()),
            0 if gate is None else gate.stride(0), *out.stride(), *lse.stride(),
            HAS_NEW=new_k is not None, HAS_GATE=gate is not None, D=D, BLOCK_D=block_d,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=cfg.precision, DOT_DTYPE=cfg.dot_dtype,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out, lse
    per_head = int(page_table.stride(1) != 0 and H > 1)
    key = (D, q.dtype, page_table.dtype, per_head, new_k is not None, gate is not None)
    HOPPER.launch(lambda block_m: (triton.cdiv(Lq, block_m), B * H), key, Lq,
                  new_k is None and K <= WS_MAX_PAGES, config, *args, per_head, *q.stride()[:3],
                  *k_pages.stride()[:4], *v_pages.stride()[:4], *page_table.stride(),
                  *(no_new if new_k is None else new_k.stride())[:3],
                  *(no_new if new_v is None else new_v.stride())[:3], 0 if gate is None else gate.stride(0),
                  *out.stride()[:3], *lse.stride(), HAS_NEW=new_k is not None, HAS_GATE=gate is not None, D=D,
                  BLOCK_D=block_d, DOT_DTYPE=tma_dot_dtype(q.dtype), MAX_PAGES=WS_MAX_PAGES)
    return out, lse

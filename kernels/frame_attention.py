"""Triton flash attention over frame pages (streamkern.frame_attention, backend "triton").

One launch, grid ``(ceil(Lq / BLOCK_M), B * H)``. A program keeps its ``BLOCK_M × D`` queries of one (b, h) in
registers and first reads ``gate[b]``: a closed gate sets the page count and the new-chunk length to 0, so no page
and no ``new_k`` is read. It then walks its row of the page table (``table[b, h, :]``; a shared table has stride 0
over heads): each entry is a page id read in the kernel; an id outside ``[0, P)`` (-1) runs no tile, a valid one
runs ``ceil(F / BLOCK_N)`` key tiles of that page, the tail tile masked inside the page (F need not be a multiple of
the tile). The new chunk is a last segment of ``ceil(Ln / BLOCK_N)`` tiles. Every tile does the online-softmax
update ``online_softmax_tile`` of ``kernels/attention_tile.py`` (scores in log2 units, fp32 accumulation; that
module also picks the tiles and the dots' precision: 3×TF32 for fp32 inputs unless torch's float32 matmul precision
allows TF32); at the end ``out = acc / l`` and ``lse = (m + log2 l)·ln 2``, with out 0 and lse -inf where no key
was seen (``l = 0``). Page offsets are int64 (a layer of a pool may exceed 2³¹ elements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_tile import LOG2E, online_softmax_tile, tile_config

LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _attend(q, acc, m_i, l_i, K, V, offs_n, n_lim, skn, svn, offs_d, d_ok, skd, svd, qk_scale,
            PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One key tile (keys ``offs_n < n_lim`` of the segment at ``K``/``V``) loaded and attended."""
    n_ok = offs_n < n_lim
    kT = tl.load(K + offs_n[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None],
                 other=0.0).to(DOT_DTYPE)
    vt = tl.load(V + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :],
                 other=0.0).to(DOT_DTYPE)
    return online_softmax_tile(q, kT, vt, n_ok[None, :], acc, m_i, l_i, qk_scale, PRECISION, DOT_DTYPE)


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
    n_pages = K
    n_new = Ln
    if HAS_GATE:
        open_ = tl.load(GATE + b * sg) != 0
        n_pages = tl.where(open_, K, 0)
        n_new = tl.where(open_, Ln, 0)
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


def frame_attention(q, k_pages, v_pages, page_table, new_k, new_v, gate, sm_scale: float):
    """Host launcher: ``(out [B, Lq, H, D] in q's dtype, lse [B, H, Lq] float32)``, every element written, one
    launch (none when the output is empty), no host synchronisation; any strides; ``page_table`` is
    ``[B, H, K]``, ``gate`` ``[B]`` bool or None."""
    B, Lq, H, D = q.shape
    P, F, K = k_pages.shape[1], k_pages.shape[2], page_table.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    Ln = 0 if new_k is None else new_k.shape[1]
    cfg = tile_config(Lq, D, q.dtype, q.device)
    no_new = (0, 0, 0, 0)
    gate_u8 = None if gate is None else gate.view(torch.uint8)
    _frame_attention_kernel[(triton.cdiv(Lq, cfg.block_m), B * H)](
        q, k_pages, v_pages, page_table, new_k, new_v, gate_u8, out, lse, Lq, H, P, F, K, Ln, sm_scale * LOG2E,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *page_table.stride(),
        *(no_new if new_k is None else new_k.stride()), *(no_new if new_v is None else new_v.stride()),
        0 if gate is None else gate.stride(0), *out.stride(), *lse.stride(),
        HAS_NEW=new_k is not None, HAS_GATE=gate is not None, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PRECISION=cfg.precision, DOT_DTYPE=cfg.dot_dtype,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse

"""Triton flash attention under a scale-block mask (streamkern.block_masked_attention, backend "triton").

Launch structure:

1. A preparatory step on the device (a few tiny torch ops, no host sync): ``tile_classes`` gives each
   (q tile, k tile) pair a class skip / partial / full from the per-tile scale-presence matrices, then each q tile
   gets its compacted visit list ``visit [nQ, nK]`` (the k tiles not skipped, in order), their classes and their
   count ``n_visit [nQ]``. The table depends only on the scale layout, so one serves every (batch, head).
2. One kernel, grid ``(nQ, B * heads)``: a program keeps its ``BLOCK_M × D`` queries in registers and walks its
   visit list only, so skipped tiles never load K/V. Per visited tile: ``S = Q·Kᵀ`` (fp32 accumulation, scores in
   log2 units), the element-wise scale mask applied only on partial tiles (key scale ids + a gather from the
   padded ``allow``), the key-length bound on every tile, then the online softmax update
   ``m' = max(m, rowmax S)``, ``l' = l·2^(m−m') + Σ 2^(S−m')``, ``acc' = acc·2^(m−m') + 2^(S−m')·V``. A row that
   has seen no allowed key keeps ``m = −inf`` (its exponent base is taken as 0, so no NaN), and ends with
   ``l = 0`` and output 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamkern._backend import triton_interpreting
from streamkern.scale_attention import TILE_PARTIAL, TILE_SKIP, _valid_ids, tile_classes

LOG2E = 1.4426950408889634


@triton.jit
def _scale_attention_kernel(Q, K, V, O, QS, KS, ALLOW, VISIT, VCLS, NVISIT,
                            Lq, Lk, H, NS, n_ktiles, qk_scale,
                            sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                            SELF: tl.constexpr, PARTIAL: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                            DOT_DTYPE: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Lq
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
    qs = tl.load(QS + offs_m, mask=m_ok, other=NS)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    row = pid_m * n_ktiles
    n_visit = tl.load(NVISIT + pid_m)
    for it in range(0, n_visit):
        kt = tl.load(VISIT + row + it)
        offs_n = kt * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        kT = tl.load(K + b * skb + h * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, kT, input_precision=PRECISION) * qk_scale
        keep = n_ok[None, :] & (offs_m >= 0)[:, None]
        if tl.load(VCLS + row + it) == PARTIAL:
            ks = tl.load(KS + offs_n, mask=n_ok, other=NS)
            ok = tl.load(ALLOW + qs[:, None] * (NS + 1) + ks[None, :]) != 0
            if SELF:
                ok = ok | (offs_m[:, None] == offs_n[None, :])
            keep = keep & ok
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - base)
        p = tl.exp2(s - base[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(DOT_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), vt, input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod, out.to(O.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])


def _blocks(Lq: int, Lk: int, D: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages)``: small tiles for the interpreter (tests), 64×64 on GPU
    (128 query rows when the head dim is small and the sequence long enough to keep every SM busy)."""
    if triton_interpreting():
        return 16, 16, 1, 1
    if D <= 64 and Lq >= 512:
        return 128, 64, 8, 2
    return 64, 64, 4, 2


def _dot_dtype(dtype: torch.dtype):
    """Operand type of the two dots: the input type (fp32 accumulation either way). The Triton interpreter
    multiplies bf16 operands wrongly (it reads their raw bits), so there bf16 tiles are widened to fp32 first."""
    if dtype == torch.bfloat16 and triton_interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def visit_lists(q_scale, k_scale, allow, block_m, block_n, self_attend):
    """``(visit [nQ, nK] int32, visit_cls [nQ, nK] int8, n_visit [nQ] int32)``: per q tile, the k tiles to visit
    (the non-skipped ones first, in increasing order), their classes and how many there are. Device-only."""
    cls = tile_classes(q_scale, k_scale, allow, block_m, block_n, self_attend)
    skip = cls == TILE_SKIP
    order = torch.sort(skip.to(torch.int8), dim=1, stable=True).indices
    return order.to(torch.int32), cls.gather(1, order), (~skip).sum(1, dtype=torch.int32)


def block_masked_attention(q, k, v, q_scale, k_scale, allow, self_attend: bool, sm_scale: float) -> torch.Tensor:
    """Host launcher: ``out [B, H, Lq, D]`` in q's dtype (every element written, zeros for rows with no key)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    ns = allow.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_m, block_n, warps, stages = _blocks(Lq, Lk, D)
    n_qtiles, n_ktiles = triton.cdiv(Lq, block_m), max(triton.cdiv(Lk, block_n), 1)
    if Lk == 0:
        visit = torch.zeros(n_qtiles, 1, dtype=torch.int32, device=q.device)
        vcls, n_visit = visit.to(torch.int8), visit[:, 0]
    else:
        visit, vcls, n_visit = visit_lists(q_scale, k_scale, allow, block_m, block_n, self_attend)
    allow_pad = torch.zeros(ns + 1, ns + 1, dtype=torch.int8, device=q.device)
    allow_pad[:ns, :ns] = allow
    qs = _valid_ids(q_scale, ns).to(torch.int32)  # ids outside [0, NS) index the padded all-False row/column
    ks = _valid_ids(k_scale, ns).to(torch.int32)
    grid = (n_qtiles, B * H)
    dot_dtype = _dot_dtype(q.dtype)
    _scale_attention_kernel[grid](
        q, k, v, out, qs, ks, allow_pad, visit, vcls, n_visit,
        Lq, Lk, H, ns, n_ktiles, sm_scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        SELF=self_attend, PARTIAL=TILE_PARTIAL, D=D, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        DOT_DTYPE=dot_dtype, num_warps=warps, num_stages=stages)
    return out

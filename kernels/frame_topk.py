"""Triton ``frame_topk``: one program per (batch row, head) — per (batch row) for the head-averaged ranking. It
averages the row's queries over ``Lq`` in float32 (``BLOCK_L × D`` tiles), scores every candidate against its page's
``k_mean`` (summed over the program's heads, then averaged), and picks the ``k`` best by repeated arg-max over the
candidates not yet taken: the largest score, the lowest position among equal scores. Ids outside ``[0, P)`` are
never chosen; picks past the valid candidates are -1."""
from __future__ import annotations

import triton
import triton.language as tl


# Not specialisation keys: the candidate list (a slice of a page table whose offset and row stride change while a
# stream's window fills) and its length; read once per program.
@triton.jit(do_not_specialize=["CAND", "C", "scb", "scc"])
def _frame_topk_kernel(Q, KM, CAND, OUT, Lq, H, D, P, C, k, inv_lq, inv_heads,
                       sqb, sql, sqh, sqd, smb, smp, smh, smd, scb, scc, sob, soh, sok,
                       PER_HEAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    first_head = tl.program_id(1)
    offs_l = tl.arange(0, BLOCK_L).to(tl.int64)  # every element offset in int64: strides arrive as i32
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    d_ok = offs_d < D
    cand = tl.load(CAND + b * scb + offs_c.to(tl.int64) * scc, mask=offs_c < C, other=-1)
    valid = (cand >= 0) & (cand < P)
    page = tl.where(valid, cand, 0).to(tl.int64)
    score = tl.zeros([BLOCK_C], tl.float32)
    if PER_HEAD:
        last_head = first_head + 1
    else:
        last_head = H
    for h32 in range(first_head, last_head):
        h = tl.cast(h32, tl.int64)
        qsum = tl.zeros([BLOCK_D], tl.float32)
        for l0 in range(0, Lq, BLOCK_L):
            rows = l0 + offs_l
            qt = tl.load(Q + b * sqb + rows[:, None] * sql + h * sqh + offs_d[None, :] * sqd,
                         mask=(rows < Lq)[:, None] & d_ok[None, :], other=0.0)
            qsum += tl.sum(qt.to(tl.float32), 0)
        means = tl.load(KM + b * smb + page[:, None] * smp + h * smh + offs_d[None, :] * smd,
                        mask=valid[:, None] & d_ok[None, :], other=0.0)
        score += tl.sum(means * (qsum * inv_lq)[None, :], 1)
    if not PER_HEAD:
        score = score * inv_heads
    score = tl.where(valid, score, float("-inf"))
    free = valid
    for j in range(0, k):
        best = tl.max(tl.where(free, score, float("-inf")), 0)
        pos = tl.min(tl.where(free & (score == best), offs_c, BLOCK_C), 0)
        pick = tl.sum(tl.where(offs_c == pos, cand, 0), 0)
        tl.store(OUT + b * sob + tl.cast(first_head, tl.int64) * soh + j * sok, tl.where(pos < BLOCK_C, pick, -1))
        free = free & (offs_c != pos)


def frame_topk(q, k_mean, candidates, k: int, per_head: bool):
    """Host launcher: ``out [B, H, k]`` (per_head) or ``[B, k]`` int64, one launch (none when it is empty)."""
    B, Lq, H, D = q.shape
    C = candidates.shape[1]
    out = candidates.new_empty((B, H, k) if per_head else (B, k))
    if out.numel() == 0:
        return out
    strides = out.stride() if per_head else (out.stride(0), 0, out.stride(1))
    block_d = triton.next_power_of_2(D)
    _frame_topk_kernel[(B, H if per_head else 1)](
        q, k_mean, candidates, out, Lq, H, D, k_mean.shape[1], C, k, 1.0 / Lq, 1.0 / H,
        *q.stride(), *k_mean.stride(), *candidates.stride(), *strides,
        PER_HEAD=per_head, BLOCK_L=max(1, min(triton.next_power_of_2(Lq), 2048 // block_d)), BLOCK_D=block_d,
        BLOCK_C=triton.next_power_of_2(max(C, 1)))
    return out

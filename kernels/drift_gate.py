"""Triton kernels of the drift gate (DESIGN.md §4.3).

``weighted_drift``: one program per batch row (camera), one launch. The program walks the ``h·w`` pooled cells in
tiles of ``BLOCK`` cells; for each channel it loads a ``[BLOCK, pool²]`` gather of the image, pools it, stores
``small`` and accumulates ``|small − prev_small|``; the cell's weight is the max over the ``dilation²`` window
(in-range taps only, i.e. -inf padding) of the bilinear up-sampled importance (align_corners=False taps).
A fixed-order ``tl.sum`` gives ``drift[b]``: no atomics, no zeroed buffer.

``patch_importance``: grid ``(B, splits)`` sums ``[BLOCK_R, BLOCK_V]`` gathers of the (layer, head, action row)
rows of its share into ``workspace[b, split, :]``; a second launch (grid ``B``) sums the splits, scales by
``1/(L·H·A)`` and normalises each row by its sum + 1e-8. Only the sliced rows/columns are read.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _weighted_drift_kernel(drift_ptr, small_ptr, img_ptr, prev_ptr, imp_ptr, C, h, w, gh, gw,
                           si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                           POOL: tl.constexpr, DIL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    hw = h * w
    k = tl.arange(0, BLOCK_PP)
    r = k // POOL
    s = k % POOL
    kmask = k < POOL * POOL
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, hw, BLOCK):
        e = start + tl.arange(0, BLOCK)
        mask = e < hw
        y = e // w
        x = e % w
        diff = tl.zeros([BLOCK], dtype=tl.float32)
        for c in range(C):
            base = img_ptr + b * si0 + c * si1
            ptrs = base + (y * POOL)[:, None] * si2 + r[None, :] * si2 + ((x * POOL)[:, None] + s[None, :]) * si3
            v = tl.load(ptrs, mask=mask[:, None] & kmask[None, :], other=0).to(tl.float32)
            pooled = tl.sum(v, axis=1) * inv
            tl.store(small_ptr + (b * C + c) * hw + e, pooled.to(small_ptr.dtype.element_ty), mask=mask)
            prev = tl.load(prev_ptr + b * sp0 + c * sp1 + y * sp2 + x * sp3, mask=mask, other=0).to(tl.float32)
            diff += tl.abs(pooled - prev)
        weight = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for dy in tl.static_range(DIL):
            for dx in tl.static_range(DIL):
                yy = y + (dy - DIL // 2)
                xx = x + (dx - DIL // 2)
                ok = mask & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                fy = tl.maximum(scale_y * (yy.to(tl.float32) + 0.5) - 0.5, 0.0)
                fx = tl.maximum(scale_x * (xx.to(tl.float32) + 0.5) - 0.5, 0.0)
                y0 = fy.to(tl.int32)
                x0 = fx.to(tl.int32)
                y1 = y0 + (y0 < gh - 1).to(tl.int32)
                x1 = x0 + (x0 < gw - 1).to(tl.int32)
                ly1 = fy - y0.to(tl.float32)
                lx1 = fx - x0.to(tl.float32)
                row0 = imp_ptr + b * sq0 + y0 * sq1
                row1 = imp_ptr + b * sq0 + y1 * sq1
                a00 = tl.load(row0 + x0 * sq2, mask=ok, other=0.0)
                a01 = tl.load(row0 + x1 * sq2, mask=ok, other=0.0)
                a10 = tl.load(row1 + x0 * sq2, mask=ok, other=0.0)
                a11 = tl.load(row1 + x1 * sq2, mask=ok, other=0.0)
                val = (1.0 - ly1) * ((1.0 - lx1) * a00 + lx1 * a01) + ly1 * ((1.0 - lx1) * a10 + lx1 * a11)
                take = ok & ((val > weight) | (val != val))
                weight = tl.where(take & (weight == weight), val, weight)
        total += tl.where(mask, diff / C * weight, 0.0)
    tl.store(drift_ptr + b, tl.sum(total, axis=0))


def _f32_ratio(a: int, b: int) -> float:
    """``float(a) / float(b)`` rounded as float32 arithmetic rounds it (PyTorch's bilinear source scale)."""
    return float(np.float32(a) / np.float32(b))


def weighted_drift(drift: torch.Tensor, small: torch.Tensor, image: torch.Tensor, prev_small: torch.Tensor,
                   importance: torch.Tensor, pool: int, dilation: int) -> None:
    """Fill ``drift [B]`` and contiguous ``small [B, C, h, w]`` (see the module doc); one launch."""
    B, C, H, W = image.shape
    if B == 0:
        return
    h, w = H // pool, W // pool
    scale = 1.0 / 255.0 if image.dtype == torch.uint8 else 1.0
    block_pp = triton.next_power_of_2(pool * pool)
    block = max(1, min(triton.next_power_of_2(h * w), 4096 // block_pp, 256))
    _weighted_drift_kernel[(B,)](
        drift, small, image, prev_small, importance, C, h, w, importance.shape[1], importance.shape[2],
        *image.stride(), *prev_small.stride(), *importance.stride(), scale / (pool * pool),
        _f32_ratio(importance.shape[1], h), _f32_ratio(importance.shape[2], w),
        POOL=pool, DIL=dilation, BLOCK=block, BLOCK_PP=block_pp)


@triton.jit
def _importance_partial_kernel(ws_ptr, attn_ptr, H, S, V, A, start, rows, splits, s0, s1, s2, s3, s4,
                               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    r0 = rows * split // splits
    r1 = rows * (split + 1) // splits
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < V
        acc = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
        for rb in range(r0, r1, BLOCK_R):
            rr = rb + tl.arange(0, BLOCK_R)
            rmask = rr < r1
            layer = start + rr // (H * A)
            head = (rr // A) % H
            q = S - A + rr % A
            off = layer.to(tl.int64) * s0 + head.to(tl.int64) * s2 + q.to(tl.int64) * s3
            x = tl.load(attn_ptr + b * s1 + off[:, None] + v[None, :] * s4, mask=rmask[:, None] & vmask[None, :],
                        other=0.0)
            acc += x.to(tl.float32)
        tl.store(ws_ptr + (b * splits + split) * V + v, tl.sum(acc, axis=0), mask=vmask)


@triton.jit
def _importance_finish_kernel(out_ptr, ws_ptr, V, splits, inv, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    total = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < V
        m = tl.zeros([BLOCK_V], dtype=tl.float32)
        for k in range(splits):
            m += tl.load(ws_ptr + (b * splits + k) * V + v, mask=vmask, other=0.0)
        m = m * inv
        tl.store(out_ptr + b * V + v, m, mask=vmask)
        total += m
    denom = tl.sum(total, axis=0) + 1e-8
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V)
        vmask = v < V
        m = tl.load(out_ptr + b * V + v, mask=vmask, other=0.0)
        tl.store(out_ptr + b * V + v, m / denom, mask=vmask)


def patch_importance(attn: torch.Tensor, layer_range, num_vision_tokens: int, action_tokens: int,
                     grid) -> torch.Tensor:
    """``[B, gh, gw]`` float32 normalised action→vision importance (see the module doc); two launches."""
    NL, B, H, S, _ = attn.shape
    start, end = layer_range
    V, A = num_vision_tokens, action_tokens
    out = torch.empty(B, *grid, dtype=torch.float32, device=attn.device)
    if B == 0:
        return out
    rows = (end - start) * H * A
    sms = torch.cuda.get_device_properties(attn.device).multi_processor_count if attn.is_cuda else 2
    splits = max(1, min(rows // 16, 2 * sms // B))
    ws = torch.empty(B, splits, V, dtype=torch.float32, device=attn.device)
    block_v = min(triton.next_power_of_2(V), 256)
    _importance_partial_kernel[(B, splits)](ws, attn, H, S, V, A, start, rows, splits, *attn.stride(),
                                            BLOCK_R=16, BLOCK_V=block_v)
    _importance_finish_kernel[(B,)](out, ws, V, splits, 1.0 / rows, BLOCK_V=block_v)
    return out

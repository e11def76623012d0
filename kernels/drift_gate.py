"""Triton kernels of the drift gate (docs/contract.md §4.3).

``attention_weighted_drift``: one program per batch row (camera), one launch. The program walks the ``h·w`` pooled
cells in tiles of ``BLOCK`` cells; for each channel it loads a ``[BLOCK, pool²]`` gather of the image, pools it, stores
``small`` and accumulates ``|small − prev_small|``; the cell's weight is the max over the ``dilation²`` window
(in-range taps only, i.e. -inf padding) of the bilinear up-sampled importance (align_corners=False taps).
A fixed-order ``tl.sum`` gives ``drift[b]``: no atomics, no zeroed buffer.

``drift_gate_step``: the same tiles, one per program over a ``(B, tiles)`` grid, then the last program to arrive takes
the state guard, the batch mean and the decision of ``DriftGate.should_recompute``: one launch per step.

``patch_importance``: grid ``(B, splits)`` sums ``[BLOCK_R, BLOCK_V]`` gathers of the (layer, head, action row)
rows of its share into ``workspace[b, split, :]``; a second launch (grid ``B``) sums the splits, scales by
``1/(L·H·A)`` and normalises each row by its sum + 1e-8. Only the sliced rows/columns are read.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from ._grid import grid as launch_grid


@triton.jit
def _drift_tile(b, start, small_ptr, img_ptr, prev_ptr, imp_ptr, C, h, w, gh, gw,
                si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                HAS_PREV: tl.constexpr, POOL: tl.constexpr, DIL: tl.constexpr, BLOCK: tl.constexpr,
                BLOCK_PP: tl.constexpr):
    """Pools cells ``[start, start + BLOCK)`` of camera ``b`` into ``small``; with ``HAS_PREV`` returns their
    ``Σ mean_c|small − prev_small| · dilated weight``, else 0."""
    hw = h * w
    k = tl.arange(0, BLOCK_PP).to(tl.int64)
    r = k // POOL
    s = k % POOL
    kmask = k < POOL * POOL
    e = start + tl.arange(0, BLOCK).to(tl.int64)  # int64 element offsets: strides arrive as i32
    mask = e < hw
    y = e // w
    x = e % w
    diff = tl.zeros([BLOCK], dtype=tl.float32)
    img_c = img_ptr + b * si0        # channel c's planes: the pointers step by a channel stride per channel
    small_c = small_ptr + b * C * hw
    prev_c = prev_ptr + b * sp0
    for c in range(C):
        ptrs = img_c + (y * POOL)[:, None] * si2 + r[None, :] * si2 + ((x * POOL)[:, None] + s[None, :]) * si3
        v = tl.load(ptrs, mask=mask[:, None] & kmask[None, :], other=0).to(tl.float32)
        pooled = tl.sum(v, axis=1) * inv
        tl.store(small_c + e, pooled.to(small_ptr.dtype.element_ty), mask=mask)
        if HAS_PREV:
            prev = tl.load(prev_c + y * sp2 + x * sp3, mask=mask, other=0).to(tl.float32)
            diff += tl.abs(pooled - prev)
        img_c += si1
        small_c += hw
        prev_c += sp1
    total = 0.0
    if HAS_PREV:
        weight = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
        for dy in tl.static_range(DIL):
            for dx in tl.static_range(DIL):
                yy = y + (dy - DIL // 2)
                xx = x + (dx - DIL // 2)
                ok = mask & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
                fy = tl.maximum(scale_y * (yy.to(tl.float32) + 0.5) - 0.5, 0.0)
                fx = tl.maximum(scale_x * (xx.to(tl.float32) + 0.5) - 0.5, 0.0)
                y0 = fy.to(tl.int64)
                x0 = fx.to(tl.int64)
                y1 = y0 + (y0 < gh - 1).to(tl.int64)
                x1 = x0 + (x0 < gw - 1).to(tl.int64)
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
        total = tl.sum(diff / C * tl.where(mask, weight, 0.0), axis=0)
    return total


@triton.jit
def _weighted_drift_kernel(drift_ptr, small_ptr, img_ptr, prev_ptr, imp_ptr, C, h, w, gh, gw,
                           si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                           POOL: tl.constexpr, DIL: tl.constexpr, BLOCK: tl.constexpr, BLOCK_PP: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    total = 0.0
    for start in range(0, h * w, BLOCK):
        total += _drift_tile(b, start, small_ptr, img_ptr, prev_ptr, imp_ptr, C, h, w, gh, gw,
                             si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                             True, POOL, DIL, BLOCK, BLOCK_PP)
    tl.store(drift_ptr + b, total)


@triton.jit
def _gate_kernel(run_ptr, reason_ptr, out_ptr, partial_ptr, counter_ptr, small_ptr, img_ptr, prev_ptr, imp_ptr,
                 C, h, w, gh, gw, si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                 state_ptr, prev_state_ptr, n_state, state_cols, ss0, ss1,
                 DRIFT_THRESHOLD: tl.constexpr, STATE_THRESHOLD: tl.constexpr, HAS_PREV: tl.constexpr,
                 HAS_STATE: tl.constexpr, STATE_WIDE: tl.constexpr, POOL: tl.constexpr, DIL: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_PP: tl.constexpr, BLOCK_S: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    B = tl.num_programs(0)
    tile = tl.program_id(1)
    tiles = tl.num_programs(1)
    part = _drift_tile(b, tile * BLOCK, small_ptr, img_ptr, prev_ptr, imp_ptr, C, h, w, gh, gw,
                       si0, si1, si2, si3, sp0, sp1, sp2, sp3, sq0, sq1, sq2, inv, scale_y, scale_x,
                       HAS_PREV, POOL, DIL, BLOCK, BLOCK_PP)
    tl.store(partial_ptr + b * tiles + tile, part)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
    if arrived == B * tiles - 1:
        tl.atomic_xchg(counter_ptr, 0)
        total = 0.0
        for cam in range(B):
            d = 0.0
            for t in range(tiles):
                d += tl.load(partial_ptr + cam * tiles + t, volatile=True)
            total += d
        mean = tl.math.div_rn(total, B.to(tl.float32))  # '/' is approximate on GPU; the mean feeds the decision
        state_diff = tl.full([], float("-inf"), tl.float64)
        state_run = tl.full([], 0, tl.int1)
        if HAS_STATE:
            nan_seen = 0
            for s0 in range(0, n_state, BLOCK_S):
                i = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
                smask = i < n_state
                cur = tl.load(state_ptr + (i // state_cols) * ss0 + (i % state_cols) * ss1, mask=smask, other=0)
                prev = tl.load(prev_state_ptr + i, mask=smask, other=0)
                d = tl.abs((cur.to(STATE_WIDE) - prev.to(STATE_WIDE)).to(cur.dtype).to(tl.float64))
                nan_seen = tl.maximum(nan_seen, tl.max((d != d).to(tl.int32), axis=0))
                state_diff = tl.maximum(state_diff, tl.max(tl.where(d != d, 0.0, d), axis=0))
            state_diff = tl.where(nan_seen > 0, float("nan"), state_diff)
            state_run = ~(state_diff <= tl.full([], STATE_THRESHOLD, tl.float64))
        # the decision of gate_decision() in drift_gate_math.h; a NaN exceeds every threshold
        if HAS_PREV:
            vision_run = ~(mean.to(tl.float64) <= tl.full([], DRIFT_THRESHOLD, tl.float64))
            vision_reason = tl.where(vision_run, 2, 0)
            vision_drift = mean
        else:
            vision_run = tl.full([], 1, tl.int1)
            vision_reason = 3
            vision_drift = 100.0
        tl.store(run_ptr, (state_run | vision_run).to(tl.int1))
        tl.store(reason_ptr, tl.where(state_run, 1, vision_reason).to(tl.int64))
        tl.store(out_ptr, tl.where(state_run, state_diff.to(tl.float32), vision_drift))


def _f32_ratio(a: int, b: int) -> float:
    """``float(a) / float(b)`` rounded as float32 arithmetic rounds it (PyTorch's bilinear source scale)."""
    return float(np.float32(a) / np.float32(b))


def _frame_args(small, image, prev_small, importance, pool, dilation):
    """Launch arguments of :func:`_drift_tile` from ``small_ptr`` on, and its constexprs. Without a previous frame
    ``small`` stands in for the pointers that are never read."""
    B, C, H, W = image.shape
    h, w = H // pool, W // pool
    scale = 1.0 / 255.0 if image.dtype == torch.uint8 else 1.0
    if prev_small is None:
        prev_small, importance, sp, sq, gh, gw = small, small, (0,) * 4, (0,) * 3, 1, 1
    else:
        sp, sq, (_, gh, gw) = prev_small.stride(), importance.stride(), importance.shape
    block_pp = triton.next_power_of_2(pool * pool)
    block = max(1, min(triton.next_power_of_2(h * w), 4096 // block_pp, 256))
    args = (small, image, prev_small, importance, C, h, w, gh, gw, *image.stride(), *sp, *sq,
            scale / (pool * pool), _f32_ratio(gh, h), _f32_ratio(gw, w))
    return args, dict(POOL=pool, DIL=dilation, BLOCK=block, BLOCK_PP=block_pp)


def attention_weighted_drift(drift: torch.Tensor, small: torch.Tensor, image: torch.Tensor, prev_small: torch.Tensor,
                             importance: torch.Tensor, pool: int, dilation: int) -> None:
    """Fill ``drift [B]`` and contiguous ``small [B, C, h, w]`` (see the module doc); one launch."""
    if image.shape[0] == 0:
        return
    args, meta = _frame_args(small, image, prev_small, importance, pool, dilation)
    _weighted_drift_kernel[(image.shape[0],)](drift, *args, **meta)


def drift_gate_step(recompute: torch.Tensor, reason: torch.Tensor, drift: torch.Tensor, small: torch.Tensor,
                    counter: torch.Tensor, image: torch.Tensor, prev_small: torch.Tensor | None,
                    importance: torch.Tensor | None, state: torch.Tensor, prev_state: torch.Tensor | None, pool: int,
                    dilation: int, drift_threshold: float, state_threshold: float) -> None:
    """``DriftGate.should_recompute`` in one launch: fills the 0-d ``recompute``/``reason``/``drift`` and ``small``.

    Grid ``(B, tiles)``: each program pools one tile of one camera and stores its partial drift; the last program
    to arrive (``counter``, one int32 that is 0 between launches and reset by that program) sums the partials in
    a fixed order, applies the state guard (``state [R, K]`` strided, ``prev_state`` contiguous) and decides.
    The thresholds are compile-time constants, compared in float64 as in the seed."""
    args, meta = _frame_args(small, image, prev_small, importance, pool, dilation)
    B = image.shape[0]
    tiles = triton.cdiv(small.shape[2] * small.shape[3], meta["BLOCK"])
    partial = torch.empty(B * tiles, dtype=torch.float32, device=image.device)
    has_state = prev_state is not None
    _gate_kernel[launch_grid("DriftGate.should_recompute", (B, "cameras"), (tiles, "pooled-pixel tiles"))](
        recompute, reason, drift, partial, counter, *args, state, prev_state if has_state else state,
        state.numel(), state.shape[1], *state.stride(),
        DRIFT_THRESHOLD=float(drift_threshold), STATE_THRESHOLD=float(state_threshold),
        HAS_PREV=prev_small is not None, HAS_STATE=has_state,
        STATE_WIDE=tl.float64 if state.dtype == torch.float64 else tl.float32,
        BLOCK_S=min(triton.next_power_of_2(state.numel()), 1024), **meta)


@triton.jit
def _importance_partial_kernel(ws_ptr, attn_ptr, H, S, V, A, start, rows, splits, s0, s1, s2, s3, s4,
                               BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    r0 = rows * split // splits
    r1 = rows * (split + 1) // splits
    for v0 in range(0, V, BLOCK_V):
        v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
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
    launch = launch_grid("patch_importance", (B, "batch"), (splits, "row splits"))
    _importance_partial_kernel[launch](ws, attn, H, S, V, A, start, rows, splits, *attn.stride(),
                                       BLOCK_R=16, BLOCK_V=block_v)
    _importance_finish_kernel[(B,)](out, ws, V, splits, 1.0 / rows, BLOCK_V=block_v)
    return out

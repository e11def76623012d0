"""Triton kernels of ``verify_scales`` (docs/contract.md §4.4; formulas in ``streamkern/ops/reference/verify_scales.py``).

Three launches, all on the device, no host sync:

1. ``_rows``, one program per token row (b, t): CFG combine ``(1 + w)·cond − w·uncond`` on the fly, one pass over
   V in ``BLOCK_V`` tiles with an online max (and lowest-index argmax, greedy) or online max/Σexp (sample),
   then the draft token's p(x) and q(x): the match bit, a provisional token, the row's (max, Σexp).
2. ``_scales``, one program per batch row: per-scale match ratios, the leading accepted run, the final tokens of
   every scale but the first rejected one.
3. ``_redraw`` (sample mode), one program per row; only the rejected rows of the first rejected scale do work:
   Σ max(0, p − q), then an inverse-CDF scan with ``uniforms[b, t, 1]`` (tile-wise cumsum).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._constants import DeviceConstants, to_device


def _build_window(key, device):
    offsets, cfg = key
    sizes = [offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)]
    scale_of = [s for s, n in enumerate(sizes) for _ in range(n)]
    return (to_device(offsets, torch.int32, device), to_device(scale_of, torch.int32, device),
            to_device(cfg if cfg is not None else [0.0] * len(sizes), torch.float32, device))


_WINDOWS = DeviceConstants("verify_scales window table", _build_window)


def window_constants(offsets, cfg, device):
    """Device tensors ``offsets [NS + 1]`` int32, ``scale_of [T]`` int32, ``cfg [NS]`` float32 of one window, built
    once (outside CUDA-graph capture, see ``_constants``)."""
    return _WINDOWS.get((tuple(offsets), None if cfg is None else tuple(cfg)), device)


@triton.jit
def _logit(cond_ptr, uncond_ptr, offs, stride_v, mask, w, HAS_CFG: tl.constexpr):
    x = tl.load(cond_ptr + offs * stride_v, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        u = tl.load(uncond_ptr + offs * stride_v, mask=mask, other=0.0).to(tl.float32)
        x = (1.0 + w) * x - w * u
    return tl.where(mask, x, float("-inf"))


@triton.jit
def _positive_part(d):
    """max(0, d) with NaN → 0 (the rule every backend follows for unchecked draft probabilities)."""
    return tl.where(d > 0, d, 0.0)


@triton.jit
def _rows(logits_ptr, draft_ptr, q_ptr, u_ptr, scale_of_ptr, cfg_ptr, match_ptr, tokens_ptr, stats_ptr,
          B, T, V, sl0, sl1, sl2, sd0, sd1, sq0, sq1, sq2, su0, su1, inv_temp,
          HAS_CFG: tl.constexpr, GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    w = tl.load(cfg_ptr + tl.load(scale_of_ptr + t))
    cond = logits_ptr + b * sl0 + t * sl1
    uncond = logits_ptr + (b + B) * sl0 + t * sl1
    x_tok = tl.load(draft_ptr + b * sd0 + t * sd1)
    offs0 = tl.arange(0, BLOCK_V).to(tl.int64)  # int64 element offsets: strides arrive as i32
    bad = tl.zeros([], dtype=tl.int32)
    best = tl.full([], float("-inf"), tl.float32)
    arg = tl.full([], -1, tl.int64)
    total = tl.zeros([], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + offs0
        mask = offs < V
        x = _logit(cond, uncond, offs, sl2, mask, w, HAS_CFG)
        if GREEDY:
            bad = tl.maximum(bad, tl.max(tl.where(mask & ~(x < float("inf")), 1, 0), 0))
            bm = tl.max(x, 0)
            bi = tl.min(tl.where(x == bm, offs, V), 0).to(tl.int64)
            arg = tl.where(bm > best, bi, arg)
            best = tl.maximum(best, bm)
        else:
            z = x * inv_temp  # sample mode: validity of l / temperature
            bad = tl.maximum(bad, tl.max(tl.where(mask & ~(z < float("inf")), 1, 0), 0))
            new = tl.maximum(best, tl.max(z, 0))
            safe = tl.where(new == float("-inf"), 0.0, new)
            total = total * tl.exp(best - safe) + tl.sum(tl.exp(z - safe), 0)
            best = new
    bad = bad | (best == float("-inf"))
    if GREEDY:
        hit = (bad == 0) & (arg == x_tok)
        tl.store(tokens_ptr + row, tl.where(bad != 0, -1, arg))
    else:
        in_vocab = (x_tok >= 0) & (x_tok < V)  # out-of-vocabulary ids (unchecked on GPU) never read out of bounds
        xx = _logit(cond, uncond, x_tok, sl2, in_vocab, w, HAS_CFG)
        px = tl.exp(xx * inv_temp - best) / total
        qx = tl.load(q_ptr + b * sq0 + t * sq1 + x_tok * sq2, mask=in_vocab, other=0).to(tl.float32)
        u0 = tl.load(u_ptr + b * su0 + t * su1)
        hit = (bad == 0) & (qx > 0) & (u0 * qx < px)
        tl.store(tokens_ptr + row, tl.where(hit, x_tok, -1))
        tl.store(stats_ptr + 2 * row, tl.where(bad != 0, float("nan"), best))
        tl.store(stats_ptr + 2 * row + 1, total)
    tl.store(match_ptr + row, hit.to(tl.int8))


@triton.jit
def _scales(match_ptr, draft_ptr, tokens_ptr, offsets_ptr, scale_of_ptr, ratio_ptr, accepted_ptr,
            T, NS, sd0, sd1, threshold, GREEDY: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    offs0 = tl.arange(0, BLOCK_T).to(tl.int64)
    run = tl.zeros([], dtype=tl.int64)
    open_ = tl.full([], 1, tl.int64)
    for s in range(0, NS):
        lo = tl.load(offsets_ptr + s)
        hi = tl.load(offsets_ptr + s + 1)
        hits = tl.zeros([], dtype=tl.int32)
        for t0 in range(lo, hi, BLOCK_T):
            offs = t0 + offs0
            hits += tl.sum(tl.load(match_ptr + b * T + offs, mask=offs < hi, other=0).to(tl.int32), 0)
        r = tl.math.div_rn(hits.to(tl.float32), (hi - lo).to(tl.float32))  # '/' is approximate on GPU
        tl.store(ratio_ptr + b * NS + s, r)
        if GREEDY:
            ok = r >= threshold
        else:
            ok = hits == hi - lo
        open_ = open_ & ok.to(tl.int64)
        run += open_
    tl.store(accepted_ptr + b, run)
    for t0 in range(0, T, BLOCK_T):
        offs = t0 + offs0
        mask = offs < T
        sid = tl.load(scale_of_ptr + offs, mask=mask, other=0).to(tl.int64)
        draft = tl.load(draft_ptr + b * sd0 + offs * sd1, mask=mask, other=0)
        tl.store(tokens_ptr + b * T + offs, tl.where(sid < run, draft, -1), mask=mask & (sid != run))


@triton.jit
def _redraw(logits_ptr, q_ptr, u_ptr, scale_of_ptr, cfg_ptr, match_ptr, accepted_ptr, stats_ptr, tokens_ptr,
            B, T, V, sl0, sl1, sl2, sq0, sq1, sq2, su0, su1, su2, inv_temp,
            HAS_CFG: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    sid = tl.load(scale_of_ptr + t)
    todo = (sid == tl.load(accepted_ptr + b)) & (tl.load(match_ptr + row) == 0)
    if todo:
        m = tl.load(stats_ptr + 2 * row)
        total = tl.load(stats_ptr + 2 * row + 1)
        w = tl.load(cfg_ptr + sid)
        cond = logits_ptr + b * sl0 + t * sl1
        uncond = logits_ptr + (b + B) * sl0 + t * sl1
        q_row = q_ptr + b * sq0 + t * sq1
        offs0 = tl.arange(0, BLOCK_V).to(tl.int64)  # int64 element offsets: strides arrive as i32
        residual = tl.zeros([], dtype=tl.float32)
        mass = tl.zeros([], dtype=tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + offs0
            mask = offs < V
            p = tl.exp(_logit(cond, uncond, offs, sl2, mask, w, HAS_CFG) * inv_temp - m) / total
            q = tl.load(q_row + offs * sq2, mask=mask, other=0).to(tl.float32)
            residual += tl.sum(tl.where(mask, _positive_part(p - q), 0.0), 0)
            mass += tl.sum(tl.where(mask, p, 0.0), 0)
        use_p = ~(residual > 0)
        target = tl.load(u_ptr + b * su0 + t * su1 + su2) * tl.where(use_p, mass, residual)
        cum = tl.zeros([], dtype=tl.float32)
        found = tl.full([], V, tl.int64)
        last = tl.full([], -1, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + offs0
            mask = offs < V
            p = tl.exp(_logit(cond, uncond, offs, sl2, mask, w, HAS_CFG) * inv_temp - m) / total
            q = tl.load(q_row + offs * sq2, mask=mask, other=0).to(tl.float32)
            wgt = tl.where(mask, tl.where(use_p, p, _positive_part(p - q)), 0.0)
            c = cum + tl.cumsum(wgt, 0)
            pos = wgt > 0
            found = tl.minimum(found, tl.min(tl.where(pos & (c > target), offs, V), 0).to(tl.int64))
            last = tl.maximum(last, tl.max(tl.where(pos, offs, -1), 0).to(tl.int64))
            cum += tl.sum(wgt, 0)
        tok = tl.where(found < V, found, last)
        tl.store(tokens_ptr + row, tl.where(m == m, tok, -1))


def _block_v(V: int) -> tuple[int, int]:
    block = min(triton.next_power_of_2(V), 4096)
    return block, 4 if block <= 1024 else 8


def verify_scales(accepted, match, ratio, tokens, stats, logits, draft, draft_probs, uniforms, offsets, cfg, greedy,
                  threshold, temperature):
    """Fill ``accepted [B]``, ``match [B, T]``, ``ratio [B, NS]``, ``tokens [B, T]`` (contiguous outputs) and the
    sample-mode scratch ``stats [B, T, 2]``. Inputs may have any strides."""
    B, T = draft.shape
    V = logits.shape[-1]
    NS = len(offsets) - 1
    if B == 0:
        return
    off_t, scale_of, cfg_t = window_constants(offsets, cfg, logits.device)
    match_i8 = match.view(torch.int8)
    q = logits if greedy else draft_probs
    u = logits if greedy else uniforms  # unread placeholders in greedy mode
    block_v, warps = _block_v(V)
    inv_temp = 1.0 / temperature
    _rows[(B * T,)](logits, draft, q, u, scale_of, cfg_t, match_i8, tokens, stats, B, T, V, *logits.stride(),
                    *draft.stride(), *q.stride(), u.stride(0), u.stride(1), inv_temp, HAS_CFG=cfg is not None,
                    GREEDY=greedy, BLOCK_V=block_v, num_warps=warps)
    _scales[(B,)](match_i8, draft, tokens, off_t, scale_of, ratio, accepted, T, NS, *draft.stride(), threshold,
                  GREEDY=greedy, BLOCK_T=min(triton.next_power_of_2(T), 1024))
    if not greedy:
        _redraw[(B * T,)](logits, q, u, scale_of, cfg_t, match_i8, accepted, stats, tokens, B, T, V,
                          *logits.stride(), *q.stride(), *u.stride(), inv_temp, HAS_CFG=cfg is not None,
                          BLOCK_V=block_v, num_warps=warps)

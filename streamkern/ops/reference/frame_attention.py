"""Attention over KV pages in eager PyTorch: the ``"torch"`` backend of ``frame_attention`` (docs/contract.md §4.5).

``q [B, Lq, H, D]``, ``k_pages/v_pages [B, P, F, H, D]``, ``table [B, H, K]`` int64 (entries in ``[0, P)`` or -1),
``new_k/new_v [B, Ln, H, D]`` or None, ``gate [B]`` bool or None. For every (b, h) the keys are, in order,

    keys(b, h) = cat(k_pages[b, table[b, h, 0], :, h], ..., k_pages[b, table[b, h, K-1], :, h], new_k[b, :, h])

with the entries -1 dropped (and nothing at all when ``gate[b]`` is False), and

    out[b, :, h] = softmax(sm_scale · q[b, :, h] · keys(b, h)ᵀ) · values(b, h)        (softmax in float32)
    lse[b, h, i] = log Σ_j exp(sm_scale · q[b, i, h] · keys(b, h)_j)                 (natural log)

A (b, h) with no key gives out 0 and lse -inf. Nothing outside the listed pages and the chunk reaches the output,
whatever bits it holds (a pool made with ``torch.empty``, the padding of padded pages, the pages of a closed row):
the gathered tokens that are not listed are zeroed before any product, since a masked score or a zero weight would
still turn a NaN or an infinity into NaN (``0 · NaN``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_values(page_table: torch.Tensor, num_pages: int) -> None:
    """Every entry of ``page_table`` is -1 or a page id in ``[0, P)`` (reads the tensor: ``"torch"``/``"cpu"``
    backends, GPU backends with ``STREAMKERN_DEBUG=1``)."""
    if page_table.numel() and (int(page_table.min()) < -1 or int(page_table.max()) >= num_pages):
        raise ValueError(f"page_table: expected page ids in [0, {num_pages}) or -1, got min "
                         f"{int(page_table.min())}, max {int(page_table.max())}")


def _gather(pages: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """``[B, H, K·F, D]``: the tokens of page ``table[b, h, k]`` (clamped into range) of head h, in table order."""
    B, P, Fl, H, D = pages.shape
    per_head = pages.permute(0, 3, 1, 2, 4)                                        # [B, H, P, F, D]
    rows = torch.arange(B, device=table.device)[:, None, None]
    heads = torch.arange(H, device=table.device)[None, :, None]
    return per_head[rows, heads, table.clamp(0, P - 1)].reshape(B, H, -1, D)


def frame_attention(q, k_pages, v_pages, page_table, new_k, new_v, gate, sm_scale: float):
    """The ``"torch"`` backend: gather the listed pages, append the new chunk, zero the tokens not listed (-1
    entries, closed rows), one masked ``scaled_dot_product_attention`` in float32 (float64 for float64 inputs).
    Returns ``(out, lse)``."""
    B, Lq, H, D = q.shape
    P, Fl = k_pages.shape[1], k_pages.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    table = page_table.expand(B, H, page_table.shape[-1])
    keys, values = _gather(k_pages.to(work), table), _gather(v_pages.to(work), table)
    listed = ((table >= 0) & (table < P)).repeat_interleave(Fl, dim=-1)             # [B, H, K·F]
    if new_k is not None:
        keys = torch.cat([keys, new_k.to(work).transpose(1, 2)], dim=2)
        values = torch.cat([values, new_v.to(work).transpose(1, 2)], dim=2)
        listed = torch.cat([listed, listed.new_ones(B, H, new_k.shape[1])], dim=2)
    if gate is not None:
        listed = listed & gate.expand(B)[:, None, None]
    keys, values = keys.where(listed[..., None], 0.0), values.where(listed[..., None], 0.0)
    mask = listed[:, :, None, :].expand(B, H, Lq, listed.shape[-1])               # [B, H, Lq, Lk]
    queries = q.to(work).transpose(1, 2)                                           # [B, H, Lq, D]
    scores = torch.where(mask, sm_scale * queries @ keys.transpose(-1, -2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                          # [B, H, Lq]
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=sm_scale)
    out = torch.where(torch.isfinite(lse)[..., None], out, 0.0)                   # rows with no key: SDPA gives NaN
    return out.transpose(1, 2).to(q.dtype).contiguous(), lse.to(torch.float32 if q.dtype != torch.float64 else q.dtype)

"""Memory-bank frame insertion in eager PyTorch: the ``"torch"`` backend and the seed's per-layer form
(seed 000 §2; docs/contract.md §4.2).

``bank_k/v [NL, B, M*fsl, H, D]``, ``chunk_k/v [NL, B, F*fsl, H, D]``, ``frame_idx``/``slot`` int64 ``[B]`` or ``[]``::

    bank[l, b, slot[b]*fsl + t] = chunk[l, b, frame_idx[b]*fsl + t]     for every l, 0 <= t < fsl, k and v
"""
from __future__ import annotations

import torch


def bank_insert(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len: int) -> None:
    """The ``"torch"`` backend: one gather and one scatter per tensor, indices used on the device.
    (Index ranges are checked by the caller before this runs.)"""
    B = bank_k.shape[1]
    t = torch.arange(frame_seq_len, device=bank_k.device)
    rows = torch.arange(B, device=bank_k.device).unsqueeze(1)                       # [B, 1]
    src = frame_idx.expand(B).unsqueeze(1) * frame_seq_len + t                      # [B, fsl]
    dst = slot.expand(B).unsqueeze(1) * frame_seq_len + t                           # [B, fsl]
    for bank, chunk in ((bank_k, chunk_k), (bank_v, chunk_v)):
        bank[:, rows, dst] = chunk[:, rows, src]


def seed_bank_insert(kv_bank, chunk_kv, frame_idx, slot, frame_seq_len: int) -> None:
    """The source pipeline's form: the chosen frame and slot read back with ``.item()``, then a per-layer copy.
    ``kv_bank``/``chunk_kv``: lists (one per block) of ``{"k": [B, *, H, D], "v": ...}`` dicts; batch row 0's
    indices are used for the whole batch, as in the seed (B = 1 there). The benchmark's eager baseline."""
    f = int(frame_idx.reshape(-1)[0].item())
    s = int(slot.reshape(-1)[0].item())
    for bank_block, chunk_block in zip(kv_bank, chunk_kv):
        for name in ("k", "v"):
            frame = chunk_block[name][:, f * frame_seq_len:(f + 1) * frame_seq_len]
            bank_block[name][:, s * frame_seq_len:(s + 1) * frame_seq_len].copy_(frame)

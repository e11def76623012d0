"""Triton ``bank_insert``: the token-row copy of ``kernels/token_copy.py`` with the chunk frame and bank slot read on
the device (``src token = frame_idx[b]*fsl + t``, ``dst token = slot[b]*fsl + t``); rows with an out-of-range index
are skipped."""
from __future__ import annotations

from .token_copy import token_copy


def bank_insert(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len: int) -> None:
    token_copy(bank_k, bank_v, chunk_k, chunk_v, frame_seq_len, src_index=frame_idx, dst_index=slot,
               src_limit=chunk_k.shape[2] // frame_seq_len, dst_limit=bank_k.shape[2] // frame_seq_len,
               scale=frame_seq_len)

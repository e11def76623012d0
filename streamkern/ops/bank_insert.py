"""Memory-bank frame insertion (seed 000 §2; docs/contract.md §4.2).

``bank[l, b, slot[b]*fsl + t] = chunk[l, b, frame_idx[b]*fsl + t]`` for every layer l, token ``0 <= t < fsl``,
k and v, in one launch, with ``frame_idx``/``slot`` read on the device, so ``select_frame`` →
``bank_evict_select`` → ``bank_insert`` runs without a host sync.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import cxx, define_op, triton
from .reference import bank_insert as ref


def _check(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len):
    for name, t in (("bank_k", bank_k), ("bank_v", bank_v), ("chunk_k", chunk_k), ("chunk_v", chunk_v)):
        check.tensor(name, t, ndim=5, dtypes=check.FLOATS)
    check.tensor("frame_idx", frame_idx, ndim=(0, 1), dtypes=check.INDEX)
    check.tensor("slot", slot, ndim=(0, 1), dtypes=check.INDEX)
    check.same_device(bank_k=bank_k, bank_v=bank_v, chunk_k=chunk_k, chunk_v=chunk_v, frame_idx=frame_idx,
                      slot=slot)
    check.same_dtype(bank_k=bank_k, bank_v=bank_v, chunk_k=chunk_k, chunk_v=chunk_v)
    NL, B, ML, H, D = bank_k.shape
    check.shape("bank_v", bank_v, tuple(bank_k.shape), ("NL", "B", "M*fsl", "H", "D"))
    check.shape("chunk_k", chunk_k, (NL, B, None, H, D), ("NL", "B", "F*fsl", "H", "D"))
    check.shape("chunk_v", chunk_v, tuple(chunk_k.shape), ("NL", "B", "F*fsl", "H", "D"))
    for name, idx in (("frame_idx", frame_idx), ("slot", slot)):
        if idx.dim() == 1:
            check.shape(name, idx, (B,), ("B",))
    check.rows_contiguous("bank_k", bank_k)
    check.rows_contiguous("bank_v", bank_v)
    check.integer("frame_seq_len", frame_seq_len, low=1)
    for name, length in (("bank_k", ML), ("chunk_k", chunk_k.shape[2])):
        if length % frame_seq_len or length == 0:
            raise ValueError(f"frame_seq_len: expected a divisor of {name}'s token count {length} (dim 2, "
                             f"at least one frame), got {frame_seq_len}")
    check.no_internal_overlap("bank_k", bank_k)
    check.no_internal_overlap("bank_v", bank_v)
    check.no_overlap("bank_k", bank_k, bank_v=bank_v, chunk_k=chunk_k, chunk_v=chunk_v, frame_idx=frame_idx,
                     slot=slot)
    check.no_overlap("bank_v", bank_v, chunk_k=chunk_k, chunk_v=chunk_v, frame_idx=frame_idx, slot=slot)


def _check_ranges(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len):
    check.index_range("frame_idx", frame_idx, chunk_k.shape[2] // frame_seq_len)
    check.index_range("slot", slot, bank_k.shape[2] // frame_seq_len)


bank_insert_op = define_op(
    "bank_insert", "(Tensor(a!) bank_k, Tensor(b!) bank_v, Tensor chunk_k, Tensor chunk_v, Tensor frame_idx, "
    "Tensor slot, int frame_seq_len) -> ()",
    {"torch": ref.bank_insert, "cpu": cxx("bank_insert_"), "triton": triton("bank_insert:bank_insert"),
     "cuda": cxx("bank_insert_")},
    check=_check, values=_check_ranges)


def bank_insert(bank_k: torch.Tensor, bank_v: torch.Tensor, chunk_k: torch.Tensor, chunk_v: torch.Tensor,
                frame_idx: torch.Tensor, slot: torch.Tensor, frame_seq_len: int, *,
                backend: str | None = None) -> None:
    """Copy frame ``frame_idx[b]`` of a chunk into bank slot ``slot[b]``, every layer, k and v, in place.

    Args:
        bank_k, bank_v: ``[NL, B, M * frame_seq_len, H, D]`` bank storage (fp32/fp16/bf16); any strides over
            ``NL, B, tokens`` but each token's ``[H, D]`` block contiguous.
        chunk_k, chunk_v: ``[NL, B, F * frame_seq_len, H, D]``, same dtype, any strides.
        frame_idx, slot: int64 device tensors ``[B]`` or ``[]`` (broadcast over the batch), values in
            ``[0, F)`` and ``[0, M)``; read on the device.
        frame_seq_len: tokens per frame; divides both token counts.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    The banks must not overlap themselves nor each other, and no input may share memory with a bank:
    ``ValueError`` naming the argument, nothing written.
    Out-of-range indices: the ``"torch"`` and ``"cpu"`` backends raise ``ValueError`` naming ``frame_idx``/``slot``
    before anything is written. The GPU backends (``"triton"``, ``"cuda"``) do the same with ``STREAMKERN_DEBUG=1``
    (this synchronises); otherwise they skip the batch rows whose frame or slot index is out of range (nothing is
    written for that row, nothing is read or written out of bounds) and never synchronise.
    """
    bank_insert_op(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, frame_seq_len, backend=backend)

"""Sparse memory activation (MemFlow): the top-k memory pages per head by mean-query · mean-key (docs/contract.md §4.5).

``qbar[b, h]`` (the mean query of the chunk) is scored against ``k_mean`` of each candidate page (kept current by
``frame_write``); the page ids of the ``k`` best come back as a device tensor that is a ready ``page_table`` for
``frame_attention``. The formula is in ``streamkern/ops/reference/frame_topk.py``.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, outputs_last, triton
from .reference import frame_topk as ref


def _check(q, k_mean, candidates, k, per_head) -> None:
    check.tensor("q", q, ndim=4, dtypes=check.FLOATS)
    check.tensor("k_mean", k_mean, ndim=4, dtypes=(torch.float32,))
    check.tensor("candidates", candidates, ndim=2, dtypes=check.INDEX)
    check.same_device(q=q, k_mean=k_mean, candidates=candidates)
    B, Lq, H, D = q.shape
    check.shape("k_mean", k_mean, (B, None, H, D), ("B", "P", "H", "D"))
    check.shape("candidates", candidates, (B, None), ("B", "C"))
    check.integer("k", k, low=0)
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head: expected a bool, got {type(per_head).__name__} {per_head!r}")
    if Lq == 0:
        raise ValueError(f"q: expected at least one query (Lq >= 1, dim 1), got shape {list(q.shape)}")


def _values(q, k_mean, candidates, k, per_head):
    ref.check_values(candidates, k_mean.shape[1])


TRITON_MAX_CANDIDATES = 4096   # one program holds a row's candidates in registers


def _triton_supports(q, k_mean, candidates, k, per_head) -> str:
    C = candidates.shape[1]
    return "" if C <= TRITON_MAX_CANDIDATES else (f"takes at most {TRITON_MAX_CANDIDATES} candidates per row (one "
                                                   f"program holds them on chip), got C={C}")


def _alloc(q, k_mean, candidates, k, per_head):
    B, _, H, _ = q.shape
    return torch.empty((B, H, k) if per_head else (B, k), dtype=torch.int64, device=candidates.device)


_EXTENSION = cxx("frame_topk_", outputs_last)
frame_topk_op = define_op(
    "frame_topk", "(Tensor q, Tensor k_mean, Tensor candidates, int k, bool per_head) -> Tensor", {
        "torch": ref.frame_topk, "cpu": Kernel(_EXTENSION, out=True),
        "triton": Kernel(triton("frame_topk:frame_topk"), supports=_triton_supports),
        "cuda": Kernel(_EXTENSION, out=True),
    }, check=_check, values=_values, alloc=_alloc)


def frame_topk(q: torch.Tensor, k_mean: torch.Tensor, candidates: torch.Tensor, k: int, *, per_head: bool = True,
               backend: str | None = None) -> torch.Tensor:
    """The page ids of the ``k`` candidates whose mean key best matches the mean query, best first.

    Args:
        q: ``[B, Lq, H, D]`` queries of the current chunk (fp32/fp16/bf16, any strides), ``Lq >= 1``.
        k_mean: ``[B, P, H, D]`` float32 mean key of each page (one layer of ``FramePool.k_mean``).
        candidates: int64 ``[B, C]`` page ids or -1 (never chosen); an id listed twice is two candidates.
        k: how many to keep, ``k >= 0`` (may exceed C: the result is padded with -1).
        per_head: one ranking per head (``[B, H, k]``) or one of the head-averaged scores (``[B, k]``).
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Returns:
        int64 ``[B, H, k]`` (per_head) or ``[B, k]``: ``score = qbar · k_mean[candidate]`` with
        ``qbar = mean over Lq of q`` in float32; ties go to the lower candidate position; -1 pads.

    Ids outside ``[0, P)`` other than -1: the ``"torch"`` and ``"cpu"`` backends raise ``ValueError`` naming
    ``candidates``; GPU backends treat them as -1 (and raise with ``STREAMKERN_DEBUG=1``).
    """
    return frame_topk_op(q, k_mean, candidates, k, per_head, backend=backend)

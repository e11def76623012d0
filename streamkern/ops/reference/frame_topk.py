"""Sparse memory activation (MemFlow) in eager PyTorch: the ``"torch"`` backend of ``frame_topk`` (docs/contract.md §4.5).

``q [B, Lq, H, D]``, ``k_mean [B, P, H, D]`` float32, ``candidates [B, C]`` int64 page ids or -1::

    qbar[b, h]      = (1/Lq) Σ_i float32(q[b, i, h])
    score[b, h, c]  = qbar[b, h] · k_mean[b, candidates[b, c], h]          (per_head=False: mean over h)

The result lists the page ids of the k best candidates, best first, ties to the lower candidate position, -1
candidates never chosen, padded with -1 when fewer than k are valid.
"""
from __future__ import annotations

import torch


def check_values(candidates: torch.Tensor, num_pages: int) -> None:
    """Every candidate is -1 or a page id in ``[0, P)`` (reads the tensor: ``"torch"``/``"cpu"`` backends, GPU
    backends with ``STREAMKERN_DEBUG=1``)."""
    if candidates.numel() and (int(candidates.min()) < -1 or int(candidates.max()) >= num_pages):
        raise ValueError(f"candidates: expected page ids in [0, {num_pages}) or -1, got min "
                         f"{int(candidates.min())}, max {int(candidates.max())}")


def scores(q, k_mean, candidates, per_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(score, valid)``: ``[B, H, C]`` (``[B, C]`` when not per head) in float32 (float64 for float64 inputs)
    and whether each candidate is a page id."""
    B, P, H, D = k_mean.shape
    work = torch.promote_types(q.dtype, torch.float32)
    qbar = q.to(work).mean(dim=1)                                                   # [B, H, D]
    valid = (candidates >= 0) & (candidates < P)                                    # [B, C]
    rows = torch.arange(B, device=candidates.device)[:, None]
    means = k_mean.to(work)[rows, candidates.clamp(0, max(P - 1, 0))]               # [B, C, H, D]
    score = torch.einsum("bhd,bchd->bhc", qbar, means)
    if not per_head:
        return score.mean(dim=1), valid
    return score, valid[:, None, :].expand_as(score)


def frame_topk(q, k_mean, candidates, k: int, per_head: bool) -> torch.Tensor:
    """The ``"torch"`` backend: stable sort of the scores (valid candidates first), the first ``k`` kept."""
    score, valid = scores(q, k_mean, candidates, per_head)
    by_score = score.sort(dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, (~valid.gather(-1, by_score)).to(torch.int8).sort(dim=-1, stable=True).indices)
    ids = candidates if not per_head else candidates[:, None, :].expand_as(score)
    chosen = torch.where(valid.gather(-1, order), ids.gather(-1, order), -1)[..., :k]
    pad = chosen.new_full((*chosen.shape[:-1], k - chosen.shape[-1]), -1)
    return torch.cat([chosen, pad], dim=-1)

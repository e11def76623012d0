"""Pose-similarity top-k retrieval in eager PyTorch (the ``"torch"`` backend) and the seed's original loop.

Seed 004 (``MemoryBuffer.get_relevant_frames``), docs/contract.md §4.2. ``poses [N, P]`` (P >= 3, only x, y, z are
read), ``valid [N]``, ``current [P]``::

    sim[i] = exp(-‖poses[i, :3] − current[:3]‖₂ / scale)

The result holds the k valid entries of largest ``sim`` in descending order, ties to the lowest index, then
``idx = -1, sim = 0`` padding when fewer than k entries are valid. An entry whose sim is NaN ranks below every
valid number (it is returned, with its NaN, only when fewer than k valid entries have a number).

Every backend evaluates the distance, the square root, the division and the exponential in float64 and ranks
the float32-rounded value: so they agree bit for bit on ``sim`` and hence exactly on the order (float32
exponentials differ between libraries by an ulp, enough to swap near-ties). Inputs are read in their dtype.
"""
from __future__ import annotations

import torch


def similarities(poses: torch.Tensor, current: torch.Tensor, scale: float) -> torch.Tensor:
    """``[N]`` float64 ``exp(-‖poses[:, :3] − current[:3]‖ / scale)``."""
    d = poses[:, :3].double() - current[:3].double()
    return torch.exp(-torch.sqrt((d[:, 0] * d[:, 0] + d[:, 1] * d[:, 1]) + d[:, 2] * d[:, 2]) / scale)


def pose_topk(poses: torch.Tensor, valid: torch.Tensor, current: torch.Tensor, k: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [k] int64, sim [k])`` by a stable descending sort; sim float32 (float64 for float64 poses)."""
    sim = similarities(poses, current, scale)
    out_dtype = torch.float64 if poses.dtype == torch.float64 else torch.float32
    rank = sim.float() if out_dtype == torch.float32 else sim
    rank = torch.where(valid, torch.nan_to_num(rank, nan=-1.0), -2.0)    # NaN below numbers, invalid below NaN
    order = torch.sort(rank, descending=True, stable=True).indices[:k]
    chosen = valid[order]
    pad = k - order.numel()  # k > N: a buffer that is still filling
    idx = torch.nn.functional.pad(torch.where(chosen, order, -1), (0, pad), value=-1)
    return idx, torch.nn.functional.pad(torch.where(chosen, sim[order], 0.0).to(out_dtype), (0, pad), value=0.0)


def seed_get_relevant_frames(poses, current_pose: torch.Tensor, k: int = 8, scale: float = 10.0) -> torch.Tensor:
    """Seed 004's ``get_relevant_frames``, transcribed: a Python loop over the buffer's poses (a list of ``[P]``
    tensors, every entry valid), one ``torch.norm`` each, then ``torch.topk`` of the stacked similarities (the
    seed passes the list itself, which ``torch.topk`` rejects; stacking is the smallest fix)."""
    similarities = []
    current_pos = current_pose[:3]
    for pose in poses:
        dist = torch.norm(current_pos - pose[:3])
        similarity = torch.exp(-dist / scale)
        similarities.append(similarity)
    top_k_indices = torch.topk(torch.stack(similarities), k).indices
    return top_k_indices

"""Pose-similarity top-k retrieval (seed 004's memory buffer; DESIGN.md §4.2).

``sim[i] = exp(-‖poses[i, :3] − current[:3]‖₂ / scale)``; the k valid entries of largest sim in descending
order, ties to the lowest index, padded with ``idx = -1, sim = 0`` when fewer than k entries are valid. NaN
similarities rank below every number; see ``streamkern/reference/pose_topk.py`` for why every backend evaluates
sim in float64 and ranks its float32 rounding. The accelerated backends are one launch of one program (a sort
of N packed keys on chip) instead of the seed's per-frame Python loop.

Limit: ``N <= 4096`` entries and ``k <= 4096`` (one program sorts them all on chip); more raise ``ValueError`` on
every backend. ``k > N`` is allowed (DESIGN.md §4.2): rows past the valid entries are padding.
"""
from __future__ import annotations

import torch

from . import _checks as check
from ._backend import OpBackends
from .reference import pose_topk as ref

MAX_ENTRIES = 4096


def _extension(poses, valid, current, k, scale):
    """``"cpu"`` and ``"cuda"``: one C++ op, dispatched on the tensors' device."""
    idx = torch.empty(k, dtype=torch.int64, device=poses.device)
    sim = torch.empty(k, dtype=torch.float32, device=poses.device)
    torch.ops.streamkern_C.pose_topk_(idx, sim, poses, valid, current, scale)
    return idx, sim


def _triton(poses, valid, current, k, scale):
    from streamkern.kernels.pose_topk import pose_topk

    return pose_topk(poses, valid, current, k, scale)


BACKENDS = OpBackends("pose_topk", {
    "torch": ref.pose_topk, "cpu": _extension, "triton": _triton, "cuda": _extension,
})


@torch.library.custom_op("streamkern::pose_topk", mutates_args=())
def _pose_topk_op(poses: torch.Tensor, valid: torch.Tensor, current: torch.Tensor, k: int, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return BACKENDS(backend)(poses, valid, current, k, scale)


@_pose_topk_op.register_fake
def _(poses, valid, current, k, scale, backend):
    return poses.new_empty(k, dtype=torch.int64), poses.new_empty(k, dtype=torch.float32)


def _check(poses, valid, current, k, scale):
    check.tensor("poses", poses, ndim=2, dtypes=check.FLOATS)
    check.tensor("valid", valid, ndim=1, dtypes=(torch.bool,))
    check.tensor("current", current, ndim=1, dtypes=check.FLOATS)
    check.same_device(poses=poses, valid=valid, current=current)
    check.same_dtype(poses=poses, current=current)
    N, P = poses.shape
    if P < 3:
        raise ValueError(f"poses: expected at least 3 columns (x, y, z), got shape {list(poses.shape)}")
    if N > MAX_ENTRIES:
        raise ValueError(f"poses: expected at most {MAX_ENTRIES} entries (one program sorts them on chip), got N={N}")
    check.shape("valid", valid, (N,), ("N",))
    check.shape("current", current, (P,), ("P",))
    check.integer("k", k, low=0, high=MAX_ENTRIES)
    return check.number("scale", scale, low=0.0, open_low=True)


def pose_topk(poses: torch.Tensor, valid: torch.Tensor, current: torch.Tensor, k: int, scale: float = 10.0, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k stored frames nearest to the current camera position.

    Args:
        poses: ``[N, P]`` fp32/fp16/bf16 poses (``P >= 3``; x, y, z first), any strides, ``N <= 4096``.
        valid: ``[N]`` bool, which entries hold a frame (invalid ones are never chosen).
        current: ``[P]`` the current pose, same dtype as ``poses``.
        k: how many to return, ``0 <= k <= 4096``; k may exceed N (a buffer still filling): the tail is padding.
        scale: positive distance scale of ``sim = exp(-dist / scale)``.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Returns:
        ``(idx [k] int64, sim [k] float32)``: descending sim, ties to the lowest index, ``-1`` / ``0`` padding.
    """
    scale = _check(poses, valid, current, k, scale)
    name = BACKENDS.resolve(backend, poses.device)
    return BACKENDS.run(_pose_topk_op, name, poses, valid, current, k, scale)

"""Pose-similarity top-k retrieval (seed 004's memory buffer; docs/contract.md §4.2).

``sim[i] = exp(-‖poses[i, :3] − current[:3]‖₂ / scale)``; the k valid entries of largest sim in descending
order, ties to the lowest index, padded with ``idx = -1, sim = 0`` when fewer than k entries are valid. NaN
similarities rank below every number; see ``streamkern/ops/reference/pose_topk.py`` for why every backend evaluates
sim in float64 and ranks its float32 rounding. The accelerated backends are one launch of one program (a sort
of N packed keys on chip) instead of the seed's per-frame Python loop.

Limits, declared per backend (``"auto"`` passes over a backend that cannot take the inputs, a request by name
raises ``BackendUnavailable`` saying why): ``"triton"`` and ``"cuda"`` take ``N <= 4096`` entries (one program
sorts them all on chip), ``"cpu"`` ``N < 65536`` (16 index bits in each packed key), ``"torch"`` any N. Every
backend takes ``k <= 4096``; ``k > N`` is allowed (docs/contract.md §4.2): rows past the valid entries are padding.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from .reference import pose_topk as ref

MAX_ENTRIES = 4096             # "triton" and "cuda"
MAX_CPU_ENTRIES = (1 << 16) - 1  # "cpu"


def _check(poses, valid, current, k, scale):
    check.tensor("poses", poses, ndim=2, dtypes=check.FLOATS)
    check.tensor("valid", valid, ndim=1, dtypes=(torch.bool,))
    check.tensor("current", current, ndim=1, dtypes=check.FLOATS)
    check.same_device(poses=poses, valid=valid, current=current)
    check.same_dtype(poses=poses, current=current)
    N, P = poses.shape
    if P < 3:
        raise ValueError(f"poses: expected at least 3 columns (x, y, z), got shape {list(poses.shape)}")
    check.shape("valid", valid, (N,), ("N",))
    check.shape("current", current, (P,), ("P",))
    check.integer("k", k, low=0, high=MAX_ENTRIES)
    return poses, valid, current, k, check.number("scale", scale, low=0.0, open_low=True)


def _entries_at_most(limit: int, why: str):
    def supports(poses, *args) -> str:
        return "" if poses.shape[0] <= limit else f"takes at most {limit} entries ({why}), got N={poses.shape[0]}"
    return supports


def _alloc(poses, valid, current, k, scale):
    return (torch.empty(k, dtype=torch.int64, device=poses.device),
            torch.empty(k, dtype=torch.float32, device=poses.device))


def _extension_args(out, poses, valid, current, k, scale) -> tuple:
    """The C++ kernel fills ``k = len(out[0])`` outputs."""
    return (*out, poses, valid, current, scale)


_EXTENSION = cxx("pose_topk_", _extension_args)
_ON_CHIP = _entries_at_most(MAX_ENTRIES, "one program sorts them all on chip")
pose_topk_op = define_op(
    "pose_topk", "(Tensor poses, Tensor valid, Tensor current, int k, float scale) -> (Tensor, Tensor)", {
        "torch": ref.pose_topk,
        "cpu": Kernel(_EXTENSION, out=True,
                      supports=_entries_at_most(MAX_CPU_ENTRIES, "16 index bits in each packed key")),
        "triton": Kernel(triton("pose_topk:pose_topk"), supports=_ON_CHIP),
        "cuda": Kernel(_EXTENSION, out=True, supports=_ON_CHIP),
    }, check=_check, alloc=_alloc)


def pose_topk(poses: torch.Tensor, valid: torch.Tensor, current: torch.Tensor, k: int, scale: float = 10.0, *,
              backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k stored frames nearest to the current camera position.

    Args:
        poses: ``[N, P]`` fp32/fp16/bf16 poses (``P >= 3``; x, y, z first), any strides (N: see the limits).
        valid: ``[N]`` bool, which entries hold a frame (invalid ones are never chosen).
        current: ``[P]`` the current pose, same dtype as ``poses``.
        k: how many to return, ``0 <= k <= 4096``; k may exceed N (a buffer still filling): the tail is padding.
        scale: positive distance scale of ``sim = exp(-dist / scale)``.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Returns:
        ``(idx [k] int64, sim [k] float32)``: descending sim, ties to the lowest index, ``-1`` / ``0`` padding.
    """
    return pose_topk_op(poses, valid, current, k, scale, backend=backend)

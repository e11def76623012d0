"""Frame-paged KV pool writes in eager PyTorch: the ``"torch"`` backend of ``frame_write`` (docs/contract.md §4.5).

``pool_k/v [NL, B, P, F, H, D]``, ``k_mean [NL, B, P, H, D]`` float32, ``k_new/v_new [NL, B, n·F, H, D]``,
``pages [B, n]`` int64::

    pool[l, b, pages[b, i], t] = new[l, b, i·F + t]                      for every l, 0 <= t < F, k and v
    k_mean[l, b, pages[b, i]]  = (1/F) Σ_t float32(k_new[l, b, i·F + t])
"""
from __future__ import annotations

import torch

from ... import _checks as check


def check_values(pages: torch.Tensor, num_pages: int) -> None:
    """Every id of ``pages [B, n]`` lies in ``[0, P)`` and no id repeats within a batch row (reads the tensor:
    ``"torch"``/``"cpu"`` backends, GPU backends with ``STREAMKERN_DEBUG=1``)."""
    check.index_range("pages", pages, num_pages)
    if pages.shape[-1] > 1:
        ordered = pages.sort(dim=-1).values
        repeats = ordered[..., 1:] == ordered[..., :-1]
        if bool(repeats.any()):
            row = int(repeats.any(dim=-1).nonzero()[0, 0])
            page = int(ordered[row, 1:][repeats[row]][0])
            raise ValueError(f"pages: expected distinct page ids within each batch row, row {row} lists page "
                             f"{page} more than once")


def frame_write(pool_k, pool_v, k_mean, k_new, v_new, pages) -> None:
    """The ``"torch"`` backend: one scatter per tensor (ids already checked, ``pages`` is ``[B, n]``)."""
    NL, B, P, F, H, D = pool_k.shape
    n = pages.shape[1]
    rows = torch.arange(B, device=pages.device).unsqueeze(1)                     # [B, 1]
    frames_k = k_new.reshape(NL, B, n, F, H, D)
    pool_k[:, rows, pages] = frames_k
    pool_v[:, rows, pages] = v_new.reshape(NL, B, n, F, H, D)
    k_mean[:, rows, pages] = frames_k.to(torch.promote_types(k_new.dtype, torch.float32)).mean(dim=3).to(k_mean.dtype)

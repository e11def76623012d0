"""A frame-paged KV pool: one latent frame per page (DESIGN.md §4.5)."""
from __future__ import annotations

import torch

from . import _checks as check
from .frame_write import frame_write


class FramePool:
    """KV storage of ``pages`` latent frames for every layer, written whole frames at a time.

    ``.k``, ``.v``: ``[NL, B, P, frame_len, H, D]`` (zeros until written); ``.k_mean``: ``[NL, B, P, H, D]``
    float32, the mean key of each page over its ``frame_len`` tokens, kept current by :meth:`write`.
    ``pool.k[l]`` / ``pool.v[l]`` / ``pool.k_mean[l]`` are what ``frame_attention`` and ``frame_topk`` read.
    Which page holds which frame is the caller's bookkeeping (lists of page ids, e.g. :class:`StreamingKV`).
    """

    def __init__(self, num_layers: int, batch: int, pages: int, frame_len: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("pages", pages),
                            ("frame_len", frame_len), ("heads", heads), ("head_dim", head_dim)):
            check.integer(name, value, low=1)
        if dtype not in check.FLOATS:
            raise TypeError(f"dtype: expected {'/'.join(check.dtype_name(d) for d in check.FLOATS)}, got {dtype}")
        shape = (num_layers, batch, pages, frame_len, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.k_mean = torch.zeros(num_layers, batch, pages, heads, head_dim, dtype=torch.float32,
                                  device=self.k.device)
        self.frame_len = frame_len
        self.backend = backend

    @property
    def num_pages(self) -> int:
        return self.k.shape[2]

    def write(self, k_new: torch.Tensor, v_new: torch.Tensor, pages: torch.Tensor) -> None:
        """Write ``n`` frames of every layer: ``k_new``/``v_new`` ``[NL, B, n·frame_len, H, D]``, ``pages`` int64
        ``[n]`` or ``[B, n]`` (frame i of row b to page ``pages[b, i]``). One ``frame_write`` launch, no host
        sync on GPU backends."""
        frame_write(self.k, self.v, self.k_mean, k_new, v_new, pages, backend=self.backend)

"""Writes of whole latent frames into a frame-paged KV pool, and the pool itself (:class:`FramePool`) (docs/contract.md §4.5).

Frame i of the new tokens (tokens ``[i·F, (i+1)·F)``) goes to page ``pages[b, i]`` of every layer, k and v, and
``k_mean`` of that page becomes the float32 mean of its F keys, in one launch with the page ids read on the
device. The formula is in ``streamkern/ops/reference/frame_write.py``.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import cxx, define_op, triton
from .reference import frame_write as ref


def _check(pool_k, pool_v, k_mean, k_new, v_new, pages):
    """The argument checks; returns the arguments with ``pages`` as ``[B, n]`` (a ``[n]`` list expanded over the
    batch)."""
    for name, t in (("pool_k", pool_k), ("pool_v", pool_v)):
        check.tensor(name, t, ndim=6, dtypes=check.FLOATS)
    check.tensor("k_mean", k_mean, ndim=5, dtypes=(torch.float32,))
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check.tensor(name, t, ndim=5, dtypes=check.FLOATS)
    check.tensor("pages", pages, ndim=(1, 2), dtypes=check.INDEX)
    check.same_device(pool_k=pool_k, pool_v=pool_v, k_mean=k_mean, k_new=k_new, v_new=v_new, pages=pages)
    check.same_dtype(pool_k=pool_k, pool_v=pool_v, k_new=k_new, v_new=v_new)
    NL, B, P, F, H, D = pool_k.shape
    check.shape("pool_v", pool_v, tuple(pool_k.shape), ("NL", "B", "P", "frame_len", "H", "D"))
    check.shape("k_mean", k_mean, (NL, B, P, H, D), ("NL", "B", "P", "H", "D"))
    n = pages.shape[-1]
    if pages.dim() == 2:
        check.shape("pages", pages, (B, n), ("B", "n"))
    check.shape("k_new", k_new, (NL, B, n * F, H, D), ("NL", "B", "n*frame_len", "H", "D"))
    check.shape("v_new", v_new, tuple(k_new.shape), ("NL", "B", "n*frame_len", "H", "D"))
    if F == 0:
        raise ValueError(f"pool_k: expected frame_len >= 1 (dim 3), got shape {list(pool_k.shape)}")
    for name, t in (("pool_k", pool_k), ("pool_v", pool_v), ("k_mean", k_mean)):
        check.no_internal_overlap(name, t)
    check.no_overlap("pool_k", pool_k, pool_v=pool_v, k_mean=k_mean, k_new=k_new, v_new=v_new, pages=pages)
    check.no_overlap("pool_v", pool_v, k_mean=k_mean, k_new=k_new, v_new=v_new, pages=pages)
    check.no_overlap("k_mean", k_mean, k_new=k_new, v_new=v_new, pages=pages)
    return pool_k, pool_v, k_mean, k_new, v_new, pages.expand(B, n)


def _values(pool_k, pool_v, k_mean, k_new, v_new, pages):
    ref.check_values(pages, pool_k.shape[2])


# "auto" on CUDA tensors, from H200 measurements of MemFlow's chunk write (30 layers, 3 frames of 1560 tokens,
# 12x128 bf16): "cuda" first. The first GPU run (2026-12-04, streamkern.bench) had the Triton kernel at 82.7 % of
# copy bandwidth and the first CUDA kernel at 29.8 %; the rewritten CUDA kernel (csrc/cuda/frame_write.cu) measured
# 90.8 % against Triton's 80.5 % in the same run (its launcher called directly, not yet through this op's bench).
frame_write_op = define_op(
    "frame_write", "(Tensor(a!) pool_k, Tensor(b!) pool_v, Tensor(c!) k_mean, Tensor k_new, Tensor v_new, "
    "Tensor pages) -> ()",
    {"torch": ref.frame_write, "cpu": cxx("frame_write_"), "triton": triton("frame_write:frame_write"),
     "cuda": cxx("frame_write_")},
    check=_check, values=_values, auto_order={"cuda": ("cuda", "triton", "torch")})


def frame_write(pool_k: torch.Tensor, pool_v: torch.Tensor, k_mean: torch.Tensor, k_new: torch.Tensor,
                v_new: torch.Tensor, pages: torch.Tensor, *, backend: str | None = None) -> None:
    """Write ``n`` new frames of every layer into their pages, in place, in one launch.

    Args:
        pool_k, pool_v: ``[NL, B, P, F, H, D]`` page storage (fp32/fp16/bf16), any strides.
        k_mean: ``[NL, B, P, H, D]`` float32 mean key of each page, any strides.
        k_new, v_new: ``[NL, B, n·F, H, D]``, the pool's dtype, any strides.
        pages: int64 ``[n]`` (the same pages for every batch row) or ``[B, n]``: frame i of row b goes to page
            ``pages[b, i]``; ids in ``[0, P)``, distinct within a row.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    ``pool_k``, ``pool_v`` and ``k_mean`` must not overlap themselves (no ``expand``ed dims) nor each other, and
    no input may share memory with them: ``ValueError`` naming the argument, nothing written.
    Bad ids: the ``"torch"`` and ``"cpu"`` backends raise ``ValueError`` naming ``pages`` (out of range, or an id
    repeated within a row) before anything is written; the GPU backends do the same with ``STREAMKERN_DEBUG=1``,
    otherwise they skip the frames whose id is out of range (the others are written) and never synchronise.
    """
    frame_write_op(pool_k, pool_v, k_mean, k_new, v_new, pages, backend=backend)


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

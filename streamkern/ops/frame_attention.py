"""Attention over frame pages read in place (docs/contract.md §4.5).

Sinks, the local window, the memory bank and retrieved memory frames are lists of page ids into one
``[B, P, F, H, D]`` layer of a :class:`~streamkern.FramePool`; ``frame_attention`` attends the listed pages (in
table order, -1 entries skipped) followed by the current chunk's own keys, without gathering, concatenating or
copying the pool. A per-row ``gate`` turns the whole attention off on the device (output 0, lse -inf, no page read).
The formula is in ``streamkern/ops/reference/frame_attention.py``.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, outputs_last, triton
from .reference import frame_attention as ref


def _check(q, k_pages, v_pages, page_table, new_k, new_v, gate, sm_scale):
    """The argument checks; returns the arguments with ``page_table`` as ``[B, H, K]``, ``gate`` as ``[B]`` (or
    None) and ``sm_scale`` a number."""
    check.tensor("q", q, ndim=4, dtypes=check.FLOATS)
    check.tensor("k_pages", k_pages, ndim=5, dtypes=check.FLOATS)
    check.tensor("v_pages", v_pages, ndim=5, dtypes=check.FLOATS)
    check.tensor("page_table", page_table, ndim=(2, 3), dtypes=check.INDEX)
    if (new_k is None) != (new_v is None):
        raise ValueError(f"new_k, new_v: expected both or neither, got new_k={'None' if new_k is None else 'a tensor'}"
                         f", new_v={'None' if new_v is None else 'a tensor'}")
    if new_k is not None:
        check.tensor("new_k", new_k, ndim=4, dtypes=check.FLOATS)
        check.tensor("new_v", new_v, ndim=4, dtypes=check.FLOATS)
    gate = check.gate("gate", gate, q.shape[0])
    check.same_device(q=q, k_pages=k_pages, v_pages=v_pages, page_table=page_table, new_k=new_k, new_v=new_v,
                      gate=gate)
    check.same_dtype(q=q, k_pages=k_pages, v_pages=v_pages, new_k=new_k, new_v=new_v)
    B, Lq, H, D = q.shape
    check.shape("k_pages", k_pages, (B, None, None, H, D), ("B", "P", "frame_len", "H", "D"))
    check.shape("v_pages", v_pages, tuple(k_pages.shape), ("B", "P", "frame_len", "H", "D"))
    K = page_table.shape[-1]
    if page_table.dim() == 2:
        check.shape("page_table", page_table, (B, K), ("B", "K"))
    else:
        check.shape("page_table", page_table, (B, H, K), ("B", "H", "K"))
    if new_k is not None:
        check.shape("new_k", new_k, (B, None, H, D), ("B", "Ln", "H", "D"))
        check.shape("new_v", new_v, tuple(new_k.shape), ("B", "Ln", "H", "D"))
    if D == 0:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {list(q.shape)}")
    scale = D ** -0.5 if sm_scale is None else check.number("sm_scale", sm_scale, low=0.0, open_low=True)
    table = page_table if page_table.dim() == 3 else page_table[:, None, :].expand(B, H, K)
    return q, k_pages, v_pages, table, new_k, new_v, gate, scale


def _values(q, k_pages, v_pages, page_table, *args):
    ref.check_values(page_table, k_pages.shape[1])


def _alloc(q, *args):
    B, Lq, H, _ = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, H, Lq), dtype=torch.float32, device=q.device))


frame_attention_op = define_op(
    "frame_attention", "(Tensor q, Tensor k_pages, Tensor v_pages, Tensor page_table, Tensor? new_k, Tensor? new_v, "
    "Tensor? gate, float sm_scale) -> (Tensor, Tensor)",
    {"torch": ref.frame_attention, "cpu": Kernel(cxx("frame_attention_", outputs_last), out=True),
     "triton": triton("frame_attention:frame_attention")}, check=_check, values=_values,
    alloc=_alloc, missing={
        "cuda": "no CUDA C++ kernel: the Triton kernel is the GPU path; a CUDA C++ kernel is added only where it "
                "measurably beats Triton",
    })


def frame_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor, page_table: torch.Tensor, *,
                    new_k: torch.Tensor | None = None, new_v: torch.Tensor | None = None,
                    gate: torch.Tensor | None = None, sm_scale: float | None = None, return_lse: bool = False,
                    backend: str | None = None):
    """Softmax attention of ``q`` over the tokens of the listed pages and the new chunk, pages read in place.

    Args:
        q: ``[B, Lq, H, D]`` queries (fp32/fp16/bf16, any strides).
        k_pages, v_pages: ``[B, P, F, H, D]``, one layer of a pool (e.g. ``pool.k[l]``), q's dtype, any strides
            (a pool of padded pages sliced to ``F`` tokens is fine).
        page_table: int64 ``[B, K]`` (one list for every head) or ``[B, H, K]`` (a list per head); entries in
            ``[0, P)`` or -1 (skipped); a page may be listed more than once (its tokens then count twice).
            ``K = 0`` is allowed.
        new_k, new_v: ``[B, Ln, H, D]`` the current chunk's own keys and values, attended after the pages and
            written nowhere (both or neither).
        gate: bool ``[B]`` or ``[]`` on the device: rows whose gate is False get zeros (lse -inf) without reading
            any page or ``new_k``.
        sm_scale: softmax scale, ``D**-0.5`` when ``None``.
        return_lse: also return ``lse``.
        backend: ``"torch" | "cpu" | "triton" | "auto"``, or ``None`` for the current default.

    Returns:
        ``out [B, Lq, H, D]`` in q's dtype, and with ``return_lse`` ``lse [B, H, Lq]`` float32,
        ``lse = log Σ_j exp(sm_scale · q·k_j)`` (natural log). A (b, h) with no key gives zeros and lse -inf.

    Ids outside ``[0, P)`` other than -1: the ``"torch"`` and ``"cpu"`` backends raise ``ValueError`` naming
    ``page_table``; GPU backends skip them (and raise with ``STREAMKERN_DEBUG=1``).
    """
    out, lse = frame_attention_op(q, k_pages, v_pages, page_table, new_k, new_v, gate, sm_scale, backend=backend)
    return (out, lse) if return_lse else out

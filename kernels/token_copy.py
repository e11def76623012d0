"""Triton token-row copy, the shared kernel of ``ring_write`` (``kernels/ring_write.py``) and ``bank_insert``
(``kernels/bank_insert.py``) (docs/contract.md §4.2; the C++/CUDA twin is ``csrc/include/streamkern/token_copy.h``).

For layer l, batch row b, token t: the ``H*D`` values of ``src[l, b, src_base(b) + t]`` go to
``dst[l, b, dst_token]`` with ``dst_token = dst_base(b) + t`` minus ``wrap_by`` once it reaches ``wrap_at``.
A base is a constant or ``index[b] * scale`` read on the device; a row whose index is out of ``[0, limit)`` is
masked out (nothing read or written). Grid: ``(NL*B*T, cdiv(H*D, BLOCK))``, each program copies one block of one
token row of k and of v, so one launch covers both tensors of every layer.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._grid import grid as launch_grid


@triton.jit
def _token_base(index_ptr, b, stride, limit, scale, offset, HAS_INDEX: tl.constexpr):
    """``(base, ok)``: the row's first token, and 1 if its index is in range else 0."""
    if HAS_INDEX:
        i = tl.load(index_ptr + b * stride)
        ok = tl.where((i >= 0) & (i < limit), 1, 0)
        return tl.where(ok == 1, i, 0) * scale + offset, ok
    return offset + b * 0, 1


# Not specialisation keys: the token count of a call, the first slot (a host-int ring cursor moves every call),
# the source frame count, and the source's layer and batch strides (they scale with the token count; the loads
# go through h = e // D, d = e % D and compile to scalar loads with or without their divisibility).
@triton.jit(do_not_specialize=["T", "src_limit", "dst_offset", "ssk_l", "ssk_b", "ssv_l", "ssv_b"])
def _token_copy_kernel(src_k, src_v, dst_k, dst_v, src_index, dst_index,
                       B, T, H, D,
                       ssk_l, ssk_b, ssk_t, ssk_h, ssk_d, ssv_l, ssv_b, ssv_t, ssv_h, ssv_d,
                       dsk_l, dsk_b, dsk_t, dsv_l, dsv_b, dsv_t,
                       src_stride, src_limit, src_scale, src_offset,
                       dst_stride, dst_limit, dst_scale, dst_offset, wrap_at, wrap_by,
                       SRC_INDEX: tl.constexpr, DST_INDEX: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    t = row % T
    b = (row // T) % B
    layer = row // (T * B)
    e = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    sb, ok_s = _token_base(src_index, b, src_stride, src_limit, src_scale, src_offset, SRC_INDEX)
    db, ok_d = _token_base(dst_index, b, dst_stride, dst_limit, dst_scale, dst_offset, DST_INDEX)
    mask = e < H * D * ok_s * ok_d  # a row with an out-of-range index copies nothing
    st = sb + t
    dt = db + t
    dt = tl.where(dt >= wrap_at, dt - wrap_by, dt)
    h = e // D
    d = e % D
    xk = tl.load(src_k + layer * ssk_l + b * ssk_b + st * ssk_t + h * ssk_h + d * ssk_d, mask=mask)
    tl.store(dst_k + layer * dsk_l + b * dsk_b + dt * dsk_t + e, xk, mask=mask)
    xv = tl.load(src_v + layer * ssv_l + b * ssv_b + st * ssv_t + h * ssv_h + d * ssv_d, mask=mask)
    tl.store(dst_v + layer * dsv_l + b * dsv_b + dt * dsv_t + e, xv, mask=mask)


def token_copy(dst_k, dst_v, src_k, src_v, T, *, src_index=None, dst_index=None, src_limit=0, dst_limit=0,
               scale=1, dst_offset=0, wrap_at=2 ** 62, wrap_by=0):
    """Launch the copy of ``T`` tokens per (layer, batch row). ``dst_*`` ``[NL, B, *, H, D]`` with ``[H, D]``
    contiguous; ``src_*`` any strides; indices int64 ``[B]`` or ``[]`` (then ``base = index * scale``)."""
    NL, B, _, H, D = dst_k.shape
    rows = NL * B * T
    if rows == 0 or H * D == 0:
        return
    block = min(triton.next_power_of_2(H * D), 1024)
    grid = launch_grid("token copy", (rows, "NL*B*T token rows"), (triton.cdiv(H * D, block), "H*D blocks"))

    def index_args(index, limit):
        if index is None:
            return dst_k, 0, limit
        return index, (index.stride(0) if index.dim() == 1 else 0), limit

    si, s_stride, s_limit = index_args(src_index, src_limit)
    di, d_stride, d_limit = index_args(dst_index, dst_limit)
    _token_copy_kernel[grid](
        src_k, src_v, dst_k, dst_v, si, di, B, T, H, D,
        *src_k.stride(), *src_v.stride(), *dst_k.stride()[:3], *dst_v.stride()[:3],
        s_stride, s_limit, scale, 0, d_stride, d_limit, scale, dst_offset, wrap_at, wrap_by,
        SRC_INDEX=src_index is not None, DST_INDEX=dst_index is not None, BLOCK=block, num_warps=4)

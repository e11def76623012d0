"""Dense attention over a contiguous view of the streaming memory, and the merge of two partial attentions.

When every head attends the same frames and they sit in one contiguous range of pages (:class:`StreamingKV`'s
layout), the keys are a plain ``[B, L, H, D]`` view of the pool, and the fastest kernel of the device reads it in
place: torch's ``scaled_dot_product_attention`` (cuDNN / flash on GPUs; on an H200 cuDNN ran MemFlow's
4680 × 28080 step at 518 TFLOP/s where the paged Triton kernel reached 297). No gather, no cat, no copy.

``view_attention(q, k, v, sm_scale=, return_lse=)``::

    out[b, :, h] = softmax(sm_scale · q[b, :, h] · k[b, :, h]ᵀ) · v[b, :, h]
    lse[b, h, i] = log Σ_j exp(sm_scale · q[b, i, h] · k[b, j, h])                   (natural log, float32)

``merge_attention(out_a, lse_a, out_b, lse_b)`` combines the attention of the same queries over two disjoint key
sets into the attention over their union (the flash-decoding merge)::

    lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a − lse)·out_a + exp(lse_b − lse)·out_b

(a side with ``lse = −inf`` has weight 0; both ``−inf`` give ``out = 0``, ``lse = −inf``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _checks as check

# torch's SDPA backend ids (``torch._fused_sdp_choice``): the kernel SDPA itself would pick for these inputs.
_MATH, _FLASH, _EFFICIENT, _CUDNN = 0, 1, 2, 3


def _check(q, k, v):
    check.tensor("q", q, ndim=4, dtypes=check.FLOATS)
    check.tensor("k", k, ndim=4, dtypes=check.FLOATS)
    check.tensor("v", v, ndim=4, dtypes=check.FLOATS)
    check.same_device(q=q, k=k, v=v)
    check.same_dtype(q=q, k=k, v=v)
    B, _, H, D = q.shape
    check.shape("k", k, (B, None, H, D), ("B", "L", "H", "D"))
    check.shape("v", v, tuple(k.shape), ("B", "L", "H", "D"))


def _with_lse(q, k, v, scale: float):
    """``(out [B, H, Lq, D], lse [B, H, Lq])`` of ``[B, H, L, D]`` inputs through the kernel SDPA would choose."""
    B, H, Lq, _ = q.shape
    choice = torch.ops.aten._fused_sdp_choice(q, k, v, scale=scale) if k.shape[2] else _MATH
    if q.device.type == "cpu" and choice == _FLASH:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    elif choice == _CUDNN:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=scale)[:2]
    elif choice == _FLASH:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[:2]
    elif choice == _EFFICIENT:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
    else:                       # the math formula, in float32 (an empty key set gives out 0, lse -inf)
        s = scale * q.float() @ k.float().transpose(-1, -2)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        return (p @ v.float()).to(q.dtype), lse
    return out, lse.reshape(B, H, -1)[..., :Lq].float()   # cuDNN: [B, H, Lq, 1]; efficient: Lq padded to 32


def view_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sm_scale: float | None = None,
                   return_lse: bool = False):
    """Softmax attention of ``q [B, Lq, H, D]`` over ``k``/``v`` ``[B, L, H, D]`` (tokens before heads, any strides
    with a contiguous last dim, e.g. ``pool.k[l, :, :n].flatten(1, 2)``), read in place by SDPA.

    Returns ``out [B, Lq, H, D]`` in q's dtype, and with ``return_lse`` ``lse [B, H, Lq]`` float32 (natural log;
    ``L = 0`` gives out 0, lse -inf). Without ``return_lse`` this is exactly
    ``F.scaled_dot_product_attention`` on the transposed views; with it, the aten kernel SDPA would pick, asked
    for its log-sum-exp. No host sync."""
    _check(q, k, v)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else check.number("sm_scale", sm_scale, low=0.0, open_low=True)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if not return_lse:
        if k.shape[1] == 0:
            return torch.zeros_like(q)
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    out, lse = _with_lse(qt, kt, vt, scale)
    return out.transpose(1, 2), lse


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """The attention over the union of two disjoint key sets from the two partial ones: ``out_*`` ``[B, Lq, H, D]``,
    ``lse_*`` ``[B, H, Lq]`` float32 (natural log, ``-inf`` for an empty side). Returns ``(out, lse)``, out in
    ``out_a``'s dtype; the weights are computed in float32."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    w_a = torch.where(finite, torch.exp(lse_a - safe), 0.0).transpose(1, 2)[..., None]   # [B, Lq, H, 1]
    w_b = torch.where(finite, torch.exp(lse_b - safe), 0.0).transpose(1, 2)[..., None]
    out = torch.where(w_a > 0, out_a.float() * w_a, 0.0) + torch.where(w_b > 0, out_b.float() * w_b, 0.0)
    return out.to(out_a.dtype), lse

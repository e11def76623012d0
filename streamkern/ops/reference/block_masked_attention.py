"""Scale-block-masked attention in eager PyTorch: the ``"torch"`` backend and the seed's dense-bias form.

Seed 003 (SDVAR over VAR). Tokens are grouped into scales; ``q_scale [Lq]`` / ``k_scale [Lk]`` hold each token's
scale id and ``allow [NS, NS]`` says which scale may attend which. With ``q, k, v [B, H, L, D]``::

    M[i, j]   = allow[q_scale[i], k_scale[j]]  or  (self_attend and i == j)
    out[i, :] = softmax_j(sm_scale · q_i · k_j  over the j with M[i, j]) · V      (zeros when no j is allowed)

The seed (VAR's ``attn_bias_for_masking`` and its eager ``slow_attn``) instead builds a dense ``[L, L]`` bias of
0 / −inf and runs full attention over it; :func:`seed_var_bias`, :func:`seed_bias` and :func:`seed_attention`
transcribe that form for the tests and as the benchmark's eager baseline.
"""
from __future__ import annotations

import torch


def dense_mask(q_scale: torch.Tensor, k_scale: torch.Tensor, allow: torch.Tensor, self_attend: bool) -> torch.Tensor:
    """``M [Lq, Lk]`` bool: ``allow[q_scale[i], k_scale[j]]``, or ``i == j`` when ``self_attend``."""
    mask = allow[q_scale.long()[:, None], k_scale.long()[None, :]]
    if self_attend:
        mask = mask | torch.eye(mask.shape[0], mask.shape[1], dtype=torch.bool, device=mask.device)
    return mask


def block_masked_attention(q, k, v, q_scale, k_scale, allow, self_attend, sm_scale):
    """The ``"torch"`` backend: the softmax over the allowed keys written out, in float32 (float64 for float64
    inputs), returned in the dtype of ``q``. Masked scores are replaced (not offset) by −inf, so a masked-out key
    never touches a row whatever its value (SDPA adds a −inf bias instead, which turns a +inf score into NaN);
    a row whose allowed scores are all −inf, or that has none, is zero, as in the kernels' online softmax."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if k.shape[2] == 0:
        return torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    mask = dense_mask(q_scale, k_scale, allow, self_attend)
    s = (q.to(acc) @ k.to(acc).transpose(-2, -1) * sm_scale).masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0))
    l = p.sum(dim=-1, keepdim=True)
    return (p @ v.to(acc) / l.masked_fill(l == 0, 1.0)).to(q.dtype)


def seed_var_bias(patch_nums, device=None, dtype=torch.float32) -> torch.Tensor:
    """VAR's block-causal bias ``[1, 1, L, L]``: 0 where the key's scale is at most the query's, −inf elsewhere
    (``attn_bias_for_masking``: a level id per token, compared as a column against a row)."""
    level = torch.cat([torch.full((pn * pn,), si, device=device) for si, pn in enumerate(patch_nums)])
    col, row = level.view(-1, 1), level.view(1, -1)
    return torch.where(col >= row, 0.0, -torch.inf).to(dtype).reshape(1, 1, level.numel(), level.numel())


def seed_bias(q_scale, k_scale, allow, self_attend=False, dtype=torch.float32) -> torch.Tensor:
    """The seed's way for any scale-level mask (SDVAR's verification masks): a dense ``[1, 1, Lq, Lk]``
    additive bias, 0 where allowed, −inf elsewhere."""
    keep = dense_mask(q_scale, k_scale, allow, self_attend)
    return torch.where(keep, 0.0, -torch.inf).to(dtype)[None, None]


def seed_attention(q, k, v, attn_bias, scale):
    """VAR's eager attention as the seed runs it: full ``[L, L]`` scores in the input dtype, the bias added,
    softmax, times V. Rows whose bias is all −inf come out NaN, as in the source."""
    attn = q.mul(scale) @ k.transpose(-2, -1)
    attn = attn + attn_bias
    return attn.softmax(dim=-1) @ v

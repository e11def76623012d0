"""Benchmark of block_masked_attention at VAR shapes (docs/contract.md §6, issue 5).

Cases: VAR-d16/d20/d24/d30 (heads = depth, D = 64, the full 680-token sequence of patch_nums 1..16, batch 2 × 8
with CFG, block-causal ``"var"`` mask, ``sm_scale = 1`` as VAR's L2-normalised attention uses) and speculative
verification windows (the last two / three scales, 425 / 525 queries, attending the full 680-token prefix under
the same scale mask). Implementations: the seed's eager attention over a dense −inf bias (baseline),
``torch.compile`` of it, SDPA with the dense boolean mask, FlexAttention with a BlockMask built from the same scale
mask (compiled), and each streamkern backend. TFLOP/s count only the allowed (query, key) pairs
(``4·D`` flops each); ``extra`` records the share of allowed pairs and of skipped 64×64 tiles.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from streamkern import scale_allow, scale_layout, skipped_tile_fraction
from streamkern.ops.reference import block_masked_attention as ref
from streamkern.ops.block_masked_attention import block_masked_attention, block_masked_attention_op

OP = "block_masked_attention"


def _flex(q_scale, k_scale, allow, B, H, Lq, Lk, device):
    """``fn(q, k, v)``: compiled FlexAttention with a BlockMask from the scale mask (the usual way today)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return allow[q_scale[q_idx], k_scale[kv_idx]]

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=Lq, KV_LEN=Lk, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=1.0)


def _case(bench, case, B, H, layout, window, dtype):
    dev = bench.device
    ids = layout.scale_of_token.to(dev)
    qs, ks = ids[window], ids
    allow = scale_allow(layout.num_scales, device=dev)
    Lq, Lk, D = qs.numel(), ks.numel(), 64
    mask = ref.dense_mask(qs, ks, allow, False)
    bias = ref.seed_bias(qs, ks, allow, dtype=dtype)
    pairs = int(mask.sum())
    set_bytes = (2 * B * H * Lq * D + 2 * B * H * Lk * D) * dtype.itemsize
    sets = []
    for _ in range(bench.input_sets(set_bytes, limit=4)):
        q = F.normalize(torch.randn(B, H, Lq, D, device=dev), dim=-1).to(dtype)  # VAR: L2-normalised q/k
        k = F.normalize(torch.randn(B, H, Lk, D, device=dev), dim=-1).to(dtype)
        sets.append((q, k, torch.randn(B, H, Lk, D, device=dev, dtype=dtype)))
    extra = {"allowed_pairs": pairs / (Lq * Lk), "skipped_tiles_64x64": skipped_tile_fraction(qs, ks, allow, 64, 64),
             "B": B, "H": H, "Lq": Lq, "Lk": Lk, "D": D, "dtype": str(dtype)}
    common = dict(bytes=set_bytes, flops=4 * B * H * D * pairs, extra=extra)

    def seed(q, k, v):
        return ref.seed_attention(q, k, v, bias, 1.0)

    yield bench.case(OP, case, "eager-seed", seed, sets, baseline=None, **common)
    yield bench.case(OP, case, "compile-seed", bench.compiled(seed), sets, **common)
    yield bench.case(OP, case, "sdpa-mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                                           scale=1.0), sets, **common)
    if bench.compile:
        try:
            flex, unavailable = _flex(qs, ks, allow, B, H, Lq, Lk, dev), None
        except Exception as exc:  # a failed row in a report, a skipped test under pytest
            flex, unavailable = None, f"{type(exc).__name__}: {exc}"
        yield bench.case(OP, case, "flex-attention", flex, sets, unavailable=unavailable, **common)
    for name in bench.backends(block_masked_attention_op):
        yield bench.case(OP, case, name, lambda q, k, v, name=name: block_masked_attention(
            q, k, v, qs, ks, allow, sm_scale=1.0, backend=name), sets, **common)


def cases(bench):
    layout = scale_layout()
    full = slice(0, layout.total)
    dtype = torch.bfloat16
    if bench.quick:  # CPU: the seed shape once (VAR-d16, batch 2 x 8), the verification window at batch 2
        yield from _case(bench, "VAR-d16-L680-B16", 16, 16, layout, full, dtype)
        yield from _case(bench, "verify-last3-d16-B2", 2, 16, layout, layout.window(7, 3), dtype)
        return
    for depth in (16, 20, 24, 30):
        yield from _case(bench, f"VAR-d{depth}-L680-B16", 16, depth, layout, full, dtype)
    for n in (2, 3):
        yield from _case(bench, f"verify-last{n}-d16-B16", 16, 16, layout, layout.window(10 - n, n), dtype)
        yield from _case(bench, f"verify-last{n}-d30-B16", 16, 30, layout, layout.window(10 - n, n), dtype)

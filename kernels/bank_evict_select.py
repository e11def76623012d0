"""Triton kernel of bank_evict_select (docs/contract.md §4.2): one program holds the whole ``[M, E]`` mask.

Per slot the packed key of ``csrc/include/streamkern/rank_keys.h`` (``evict_key``): an invalid slot keys by its
index alone, a valid one by ``(1, !redundant, isnan(score), ordered(score), slot)``; the slot of the smallest key
is the answer (first invalid slot, else the lowest-score redundant slot, else the lowest-score slot; ties to the
lowest index; NaN above +inf). One launch, one program, no host sync.
"""
import torch
import triton
import triton.language as tl

from .ordered_bits import ordered_bits


@triton.jit
def _bank_evict_select_kernel(scores_ptr, mask_ptr, valid_ptr, out_ptr, M, E, s_s, s_m0, s_m1, s_v,
                       BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    i = tl.arange(0, BLOCK_M).to(tl.int64)  # int64 element offsets: strides arrive as i32
    e = tl.arange(0, BLOCK_E).to(tl.int64)
    in_m = i < M
    mask = tl.load(mask_ptr + i[:, None] * s_m0 + e[None, :] * s_m1, mask=in_m[:, None] & (e[None, :] < E),
                   other=0) != 0
    coverage = tl.sum(mask.to(tl.int32), axis=0)                                   # [BLOCK_E]
    lonely = (mask & (coverage[None, :] < 2)).to(tl.int64)
    not_redundant = tl.max(lonely, axis=1)                                         # [BLOCK_M]
    s = tl.load(scores_ptr + i * s_s, mask=in_m, other=0.0).to(tl.float32)
    ok = tl.load(valid_ptr + i * s_v, mask=in_m, other=0) != 0
    nan = (s != s).to(tl.int64)
    key = (1 << 41) | (not_redundant << 40) | (nan << 39) | (tl.where(nan != 0, 0, ordered_bits(s)) << 7) | i
    key = tl.where(ok, key, i)
    key = tl.where(in_m, key, 1 << 62)
    tl.store(out_ptr, tl.min(key, axis=0) & 127)


def bank_evict_select(scores: torch.Tensor, entity_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Launch one program; ``scores [M]`` fp32/fp16/bf16, ``entity_mask [M, E]`` / ``valid [M]`` bool, any
    strides (bools are read as bytes through uint8 views), ``M <= 64``, ``E <= 256`` (checked by the caller)."""
    M, E = entity_mask.shape
    out = torch.empty((), dtype=torch.int64, device=scores.device)
    mask_u8, valid_u8 = entity_mask.view(torch.uint8), valid.view(torch.uint8)
    _bank_evict_select_kernel[(1,)](scores, mask_u8, valid_u8, out, M, E, scores.stride(0), mask_u8.stride(0),
                             mask_u8.stride(1), valid_u8.stride(0),
                             BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_E=max(16, triton.next_power_of_2(E)),
                             num_warps=4)
    return out

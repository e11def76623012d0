"""Triton kernel of pose_topk (docs/contract.md §4.2): one program computes every similarity and sorts N packed keys.

``sim = exp(-sqrt((dx² + dy²) + dz²) / scale)`` in float64 rounded to float32 (as every backend, see
``streamkern/ops/reference/pose_topk.py``); key (``rank_keys.h``, ``pose_key``) = ``(invalid, isnan, ~ordered(sim),
index)``, padding the largest int64; ``tl.sort`` ascending; the first k keys decode to ``(idx, sim)``, or
``(-1, 0)`` for invalid ones. ``scale`` travels as the int64 bit pattern of the float64 (a Python float would be
passed as float32; a float64 device scalar would cost a fill per call). One program, N <= 4096, no host sync, one
launch.
"""
import struct

import torch
import triton
import triton.language as tl

from .ordered_bits import ordered_bits


# Not specialisation keys: the pose count, which grows with a caller's buffer (BLOCK, its power of two, does), and
# the scale's bit pattern.
@triton.jit(do_not_specialize=["N", "scale_bits"])
def _pose_topk_kernel(poses_ptr, valid_ptr, cur_ptr, scale_bits, idx_ptr, sim_ptr, N, k, s_p0, s_p1, s_c, s_v,
                      BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK).to(tl.int64)  # int64 element offsets: strides arrive as i32
    in_n = i < N
    row = poses_ptr + i * s_p0
    dx = tl.load(row, mask=in_n, other=0.0).to(tl.float64) - tl.load(cur_ptr).to(tl.float64)
    dy = tl.load(row + s_p1, mask=in_n, other=0.0).to(tl.float64) - tl.load(cur_ptr + s_c).to(tl.float64)
    dz = tl.load(row + 2 * s_p1, mask=in_n, other=0.0).to(tl.float64) - tl.load(cur_ptr + 2 * s_c).to(tl.float64)
    d2 = (dx * dx + dy * dy) + dz * dz
    scale = scale_bits.to(tl.int64).to(tl.float64, bitcast=True)
    sim = tl.exp(-tl.sqrt(d2) / scale).to(tl.float32)
    ok = tl.load(valid_ptr + i * s_v, mask=in_n, other=0) != 0
    nan = (sim != sim).to(tl.int64)
    desc = tl.where(nan != 0, 0, (~ordered_bits(sim)) & 0xFFFFFFFF)
    key = tl.where(ok, (nan << 61) | (desc << 16) | i, (1 << 62) | i)
    key = tl.where(in_n, key, 0x7FFFFFFFFFFFFFFF)
    key = tl.sort(key)
    chosen = (key >> 62) == 0
    bits = ((~(key >> 16)) & 0x7FFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
    value = tl.where(((key >> 61) & 1) != 0, float("nan"), bits)
    r = tl.arange(0, BLOCK)
    tl.store(idx_ptr + r, tl.where(chosen, key & 0xFFFF, -1), mask=r < k)
    tl.store(sim_ptr + r, tl.where(chosen, value, 0.0), mask=r < k)


def pose_topk(poses: torch.Tensor, valid: torch.Tensor, current: torch.Tensor, k: int, scale: float):
    """Launch one program; shapes checked by the caller (``poses [N, P>=3]``, ``N <= 4096``, ``k <= 4096``; the
    block covers max(N, k) keys, so rows past N decode as padding)."""
    N = poses.shape[0]
    idx = torch.empty(k, dtype=torch.int64, device=poses.device)
    sim = torch.empty(k, dtype=torch.float32, device=poses.device)
    if k == 0:
        return idx, sim
    block = max(16, triton.next_power_of_2(max(N, k)))
    valid_u8 = valid.view(torch.uint8)
    scale_bits = struct.unpack("<q", struct.pack("<d", scale))[0]
    _pose_topk_kernel[(1,)](poses, valid_u8, current, scale_bits, idx, sim, N, k, poses.stride(0), poses.stride(1),
                            current.stride(0), valid_u8.stride(0), BLOCK=block, num_warps=8 if block >= 1024 else 4)
    return idx, sim

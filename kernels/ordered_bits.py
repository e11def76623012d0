"""Ordered float bits (Triton): float32 -> int64 keys whose integer order is the float order, so that one integer
min or sort ranks floats; packed into the keys of bank_evict_select and pose_topk (the CUDA/C++ twin is
``csrc/include/streamkern/rank_keys.h``)."""
import triton
import triton.language as tl


@triton.jit
def ordered_bits(x):
    """float32 -> int64 in [0, 2^32), monotone in x (-0.0 and +0.0 alike)."""
    x = tl.where(x == 0.0, 0.0, x)
    b = x.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return tl.where(b >= 0x80000000, b ^ 0xFFFFFFFF, b | 0x80000000)

"""streamkern: fused kernels for the hot paths of streaming generative models.

Every op takes ``backend=None`` ("torch", "cpu", "triton", "cuda" or "auto"); see docs/contract.md and README.md.
"""
from ._backend import BackendUnavailable, available_backends, backend, current_backend, set_backend
from .ops.consensus_frame_scores import consensus_frame_scores, select_frame
from .ops.bank_evict_select import bank_evict_select
from .ops.pose_topk import pose_topk
from .ops.drift_gate import DriftGate, GateReason, attention_weighted_drift, patch_importance
from .ops.ring_write import KVRing, ring_write
from .ops.bank_insert import bank_insert
from .ops.verify_scales import VerifyResult, verify_scales
from .ops.block_masked_attention import (ScaleLayout, block_masked_attention, scale_allow, scale_layout,
                                         skipped_tile_fraction)
from .ops.frame_attention import frame_attention
from .ops.frame_topk import frame_topk
from .ops.frame_write import FramePool, frame_write
from .streaming_kv import StreamingKV

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable", "available_backends", "backend", "current_backend", "set_backend",
    "consensus_frame_scores", "select_frame",
    "bank_evict_select", "pose_topk",
    "patch_importance", "attention_weighted_drift", "DriftGate", "GateReason",
    "KVRing", "ring_write", "bank_insert",
    "verify_scales", "VerifyResult",
    "scale_layout", "ScaleLayout", "scale_allow", "block_masked_attention", "skipped_tile_fraction",
    "FramePool", "frame_write", "frame_attention", "frame_topk", "StreamingKV",
]

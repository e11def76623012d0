"""streamkern: fused kernels for the hot paths of streaming generative models.

Every op takes ``backend=None`` ("torch", "cpu", "triton", "cuda" or "auto"); see DESIGN.md and README.md.
"""
from ._backend import BackendUnavailable, available_backends, backend, current_backend, set_backend
from .consensus import consensus_frame_scores, select_frame
from .bank_evict import bank_evict_select
from .pose_topk import pose_topk
from .drift_gate import DriftGate, GateReason, attention_weighted_drift, patch_importance
from .kv_ring import KVRing, ring_write
from .bank_insert import bank_insert
from .verify import VerifyResult, verify_scales
from .scale_attention import ScaleLayout, block_masked_attention, scale_allow, scale_layout, skipped_tile_fraction
from .frame_write import frame_write
from .frame_attention import frame_attention
from .frame_topk import frame_topk
from .frame_pool import FramePool
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

"""Every public name and argument list of docs/contract.md exists exactly as written (tests outside the project rely on it)."""
import inspect

import pytest
import torch

import streamkern

# name -> the parameters docs/contract.md gives, in order (keyword-only ones after "*"); extra trailing
# keyword-only parameters are allowed ("add freely"), missing or renamed ones are not.
CONTRACT = {
    "consensus_frame_scores": "chunk_k text_k entity_weights frame_seq_len layers layer_weights * backend",
    "select_frame": "chunk_k text_k entity_weights frame_seq_len layers layer_weights * backend",
    "ring_write": "cache_k cache_v k_new v_new start * backend",
    "bank_evict_select": "scores entity_mask valid * backend",
    "bank_insert": "bank_k bank_v chunk_k chunk_v frame_idx slot frame_seq_len * backend",
    "pose_topk": "poses valid current k scale * backend",
    "patch_importance": "attn layer_range num_vision_tokens action_tokens grid * backend",
    "attention_weighted_drift": "image prev_small prev_importance pool dilation * backend",
    "scale_layout": "patch_nums",
    "scale_allow": "num_scales preset",
    "block_masked_attention": "q k v q_scale k_scale allow * self_attend sm_scale backend",
    "verify_scales": ("target_logits draft_tokens layout first_scale num_scales * mode threshold draft_probs uniforms "
                      "cfg temperature backend"),
    "KVRing": "num_layers batch heads head_dim window sink dtype device backend",
    "DriftGate": ("drift_threshold state_threshold dilation pool layer_range num_vision_tokens action_tokens grid "
                  "backend"),
    "FramePool": "num_layers batch pages frame_len heads head_dim dtype device backend",
    "frame_write": "pool_k pool_v k_mean k_new v_new pages * backend",
    "frame_attention": "q k_pages v_pages page_table * new_k new_v gate sm_scale return_lse backend",
    "frame_topk": "q k_mean candidates k * per_head backend",
    "set_backend": "name",
    "backend": "name",
}
DEFAULTS = {
    "consensus_frame_scores": {"layers": (0, 15, 29), "layer_weights": (0.2, 0.3, 0.5), "backend": None},
    "pose_topk": {"scale": 10.0, "backend": None},
    "patch_importance": {"layer_range": (14, 18), "num_vision_tokens": 256, "action_tokens": 50, "grid": (16, 16)},
    "attention_weighted_drift": {"pool": 8, "dilation": 5},
    "scale_layout": {"patch_nums": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)},
    "scale_allow": {"preset": "var"},
    "block_masked_attention": {"self_attend": False, "sm_scale": None},
    "verify_scales": {"mode": "greedy", "threshold": 0.5, "draft_probs": None, "uniforms": None, "cfg": None,
                      "temperature": 1.0},
    "KVRing": {"sink": 0, "dtype": torch.bfloat16, "device": None, "backend": None},
    "FramePool": {"dtype": torch.bfloat16, "device": None, "backend": None},
    "frame_attention": {"new_k": None, "new_v": None, "gate": None, "sm_scale": None, "return_lse": False,
                        "backend": None},
    "frame_topk": {"per_head": True, "backend": None},
    "DriftGate": {"drift_threshold": 0.5, "state_threshold": 0.05, "dilation": 5, "pool": 8, "layer_range": (14, 18),
                  "num_vision_tokens": 256, "action_tokens": 50, "grid": (16, 16), "backend": None},
}
METHODS = {
    "KVRing": ["append", "ordered", "length", "positions"],
    "DriftGate": ["should_recompute", "update", "cached_kv", "reset"],
    "FramePool": ["write"],
}


def _params(obj):
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    return [p for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_public_signature(name):
    assert hasattr(streamkern, name), f"streamkern.{name} is missing (docs/contract.md §4)"
    obj = getattr(streamkern, name)
    params = _params(obj)
    names = [p.name for p in params]
    want = CONTRACT[name].split()
    positional = want[: want.index("*")] if "*" in want else want
    keyword = want[want.index("*") + 1:] if "*" in want else []
    assert names[: len(positional)] == positional, f"{name}: parameters {names}, docs/contract.md gives {want}"
    for kw in keyword:
        assert kw in names, f"{name}: keyword {kw!r} missing from {names}"
        assert params[names.index(kw)].kind in (inspect.Parameter.KEYWORD_ONLY,
                                                inspect.Parameter.POSITIONAL_OR_KEYWORD)
    for extra in params[len(want) - ("*" in want):]:
        assert extra.default is not inspect.Parameter.empty, f"{name}: added parameter {extra.name} needs a default"
    for arg, default in DEFAULTS.get(name, {}).items():
        got = params[names.index(arg)].default
        assert got == default or (isinstance(got, (tuple, list)) and tuple(got) == tuple(default)), \
            f"{name}({arg}=...) defaults to {got!r}, docs/contract.md gives {default!r}"


@pytest.mark.parametrize("cls", sorted(METHODS))
def test_public_methods(cls):
    obj = getattr(streamkern, cls)
    for attr in METHODS[cls]:
        assert hasattr(obj, attr), f"{cls}.{attr} is missing (docs/contract.md §4)"


def test_other_public_names():
    for name in ("BackendUnavailable", "available_backends", "GateReason", "VerifyResult", "ScaleLayout",
                 "StreamingKV"):
        assert hasattr(streamkern, name), f"streamkern.{name} is missing"
    assert issubclass(streamkern.BackendUnavailable, RuntimeError)
    reasons = streamkern.GateReason
    assert (int(reasons.REUSE), int(reasons.STATE), int(reasons.VISION), int(reasons.FIRST)) == (0, 1, 2, 3)
    result = streamkern.VerifyResult
    fields = getattr(result, "_fields", None) or getattr(result, "__dataclass_fields__", None) or result.__annotations__
    for field in ("accepted", "match", "ratio", "tokens"):
        assert field in fields, f"VerifyResult.{field} is missing"


def test_ring_storage_shape():
    ring = streamkern.KVRing(2, 1, 3, 4, window=5, sink=2, dtype=torch.float32)
    assert tuple(ring.k.shape) == tuple(ring.v.shape) == (2, 1, 7, 3, 4)
    assert ring.length == 0
    assert ring.positions.tolist() == [-1] * 7


def test_pipelines_exported():
    from streamkern import pipelines

    for name in ("MemoryBank", "StreamingGenerator", "GatedPolicy", "SpeculativeVAR"):
        assert hasattr(pipelines, name), f"streamkern.pipelines.{name} is missing (docs/contract.md §5)"


OPS = ("consensus_frame_scores", "ring_write", "bank_evict_select", "bank_insert", "pose_topk", "patch_importance",
       "attention_weighted_drift", "block_masked_attention", "verify_scales", "frame_write", "frame_attention",
       "frame_topk")


@pytest.mark.parametrize("op", OPS)
def test_ops_registered_with_torch_library(op):
    """Each op is a torch.library custom op in the streamkern namespace with a fake (meta) kernel."""
    from torch._library.custom_ops import OPDEFS

    assert hasattr(torch.ops.streamkern, op), f"streamkern::{op} is not registered"
    assert f"streamkern::{op}" in OPDEFS, f"streamkern::{op} is not a torch.library.custom_op"
    assert OPDEFS[f"streamkern::{op}"]._abstract_fn is not None, f"streamkern::{op} has no register_fake kernel"

"""Shared fixtures: Triton's interpreter on GPU-less machines, NaN-poisoned allocations, torch's default float32
matmul precision, the backend matrix."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the Triton kernels

import streamkern  # noqa: E402
from streamkern._backend import why_not  # noqa: E402

_ALLOCATORS = ("empty", "empty_like", "empty_strided")
_POISON_INT = {torch.int64: -(2 ** 62) + 7, torch.int32: -(2 ** 30) + 7, torch.int16: -32000, torch.uint8: 0xAB,
               torch.int8: -77}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats), True (bool) or an unlikely sentinel (ints) so unwritten elements fail.
    The fill is not recorded by autograd (an ``empty(..., requires_grad=True)`` leaf, as Inductor's pattern
    passes make, is poisoned too)."""
    if t.numel() == 0:
        return t
    if t.is_floating_point() or t.is_complex():
        value = float("nan")
    elif t.dtype == torch.bool:
        value = True
    else:
        value = _POISON_INT.get(t.dtype, 7)
    with torch.no_grad():
        return t.fill_(value)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every ``torch.empty*`` and ``Tensor.new_empty`` made during a test comes back poisoned."""
    for name in _ALLOCATORS:
        real = getattr(torch, name)

        def poisoned(*args, __real=real, **kwargs):
            return poison_(__real(*args, **kwargs))

        monkeypatch.setattr(torch, name, poisoned)
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison_(real_new_empty(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def fp32_matmul_precision_highest():
    """Every test starts with torch's default float32 matmul precision, "highest" (fp32 attention dots on GPUs then
    use 3xTF32 and meet the fp32 bound), and a test that changes it gets it back afterwards."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture
def one_thread():
    """One intra-op thread: these tiny models' ops are far too small to share, and on a loaded machine spinning
    threads make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Every (backend, device) pair an op's parity tests run on; unavailable pairs are skipped with the reason.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]   # the storage dtypes every op takes
BACKEND_DEVICES = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
                   ("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]


def backend_params(exclude=(), ops=()):
    """``pytest.param((backend, device), id="backend-device")`` for each pair, skipped where it cannot run (or where
    one of ``ops``, the ops declared by ``define_op`` that a test calls, has no such backend)."""
    params = []
    for b, d in BACKEND_DEVICES:
        if (b, d) in exclude or b in exclude:
            continue
        marks = []
        lacking = [op for op in ops if b not in op.backends.impls]
        if lacking:
            marks.append(pytest.mark.skip(reason=f"{lacking[0].name} has no {b!r} backend: "
                                                 f"{lacking[0].backends.missing.get(b, '')}"))
        elif d == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
        else:
            why = why_not(b, torch.device(d))
            if why:
                marks.append(pytest.mark.skip(reason=f"{b} on {d}: {why}"))
        params.append(pytest.param((b, d), id=f"{b}-{d}", marks=marks))
    return params


def assert_raises_untouched(fn, args, exc, match):
    """``fn(*args)`` raises ``exc`` whose message matches ``match``, and every tensor argument is left as it was
    (meta tensors hold no values and are skipped)."""
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else None for a in args]
    with pytest.raises(exc, match=match):
        fn(*args)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b), "inputs must be left untouched"


# --- the GPU tier ------------------------------------------------------------------------------------------------
# ``pytest -m gpu_tier`` (bench/gpu_session.sh runs it on the GPU, one pass, in parallel): each op once on every GPU
# backend and dtype, each pipeline's CUDA-graph replay against eager, the CUDA-only checks. Per test:
# ``(where, per)``: one parametrisation per (backend-device, dtype, *per params) among those whose id contains
# ``where``, on the "triton" and "cuda" backends on CUDA; ``EVERY``: each parametrisation on CUDA (a test without a
# backend-device or device parameter is listed only if it is CUDA-only). tests/test_gpu_session.py checks that the
# tier holds every op on each GPU backend it has, in every dtype.
EVERY = None
GPU_TIER = {
    "test_consensus_frame_scores.py::test_parity_large_on_gpu": ("seed-12x128", ()),
    "test_ring_write.py::test_ring_write_parity": ("wrap-NL3-B2-H3-D5", ()),
    "test_ring_write.py::test_ring_write_device_start_equals_host_start": ("", ()),
    "test_bank_evict_select.py::test_random_against_reference": ("M37-E5", ()),
    "test_bank_insert.py::test_parity": ("NL3-B2-M3-F4-fsl5-D5", ()),
    "test_pose_topk.py::test_against_reference": ("random-N50-P5-k8-", ()),
    "test_drift_gate.py::test_patch_importance_parity": ("strided", ()),
    "test_drift_gate.py::test_drift_parity": ("strided", ()),
    "test_drift_gate.py::test_gate_step_parity": ("strided", ()),
    "test_block_masked_attention.py::test_presets_parity": ("var-self", ()),
    "test_verify_scales.py::test_parity": ("B2-s1x2-V37-cfg-strided", ("mode",)),
    "test_frame_write.py::test_parity": ("P7-F5-rows", ()),
    "test_frame_attention.py::test_parity": ("F7-perhead-holes-gate", ()),
    "test_frame_attention.py::test_hopper_kernel_parity": ("D24-F21-holes-gate", ()),   # sm_90: the Hopper kernel
    "test_frame_attention.py::test_hopper_kernel_replays_in_a_cuda_graph": EVERY,
    "test_block_masked_attention.py::test_hopper_kernel_parity": ("random-layout-self-D64", ()),
    "test_frame_topk.py::test_parity": ("holes-per-head", ()),
    "test_streaming_kv.py::test_long_stream_matches_cat_reference": ("", ()),
    "test_step_graph.py::test_replay_reruns_the_ops_on_the_captured_tensors": EVERY,
    "test_step_graph.py::test_warmup_runs_the_step_eagerly_before_the_capture": EVERY,
    "test_step_graph.py::test_ring_append_replays_only_with_the_device_cursor": EVERY,
    "test_step_graph.py::test_device_branch_replays_both_bodies": EVERY,
    "test_pipeline_graphs.py::test_streaming_generator_block_replays_as_the_next_block_on_cuda_graphs": EVERY,
    "test_pipeline_graphs.py::test_gated_policy_step_replays_both_branches_on_cuda": EVERY,
    "test_pipeline_graphs.py::test_speculative_var_round_replays_on_cuda": EVERY,
    "test_gpu.py::test_ring_append_replays_with_the_device_cursor": EVERY,
    "test_gpu.py::test_gate_hand_off_stress_two_streams": EVERY,
    "test_gpu.py::test_attention_grid_limit_on_cuda": EVERY,
    "test_distributed.py::test_nccl_rank_on_a_gpu_equals_one_device_without_host_syncs": EVERY,
    "test_distributed.py::test_nccl_two_gpus_equal_one_device": EVERY,
}


def _on_cuda(item, backends=None) -> bool:
    """The item runs on CUDA (with one of ``backends`` when it has a backend-device parameter and they are given)."""
    params = item.callspec.params if hasattr(item, "callspec") else {}
    if "bd" in params:
        return params["bd"][1] == "cuda" and (backends is None or params["bd"][0] in backends)
    if "device" in params:
        return params["device"] == "cuda"
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark the GPU tier's items ``gpu_tier`` and the quick tier's ``quick`` (before ``-m`` selects)."""
    _mark_quick_tier(items)
    taken = set()
    for item in items:
        entry = GPU_TIER.get(f"{item.path.name}::{item.originalname}", False)
        if entry is False or not _on_cuda(item, None if entry is EVERY else ("triton", "cuda")):
            continue
        if entry is not EVERY:
            where, per = entry
            params = item.callspec.params if hasattr(item, "callspec") else {}
            key = (item.path.name, item.originalname, str(params.get("bd")), str(params.get("dtype")),
                   *(str(params.get(p)) for p in per))
            if where not in item.name or key in taken:
                continue
            taken.add(key)
        item.add_marker(pytest.mark.gpu_tier)


# --- the quick tier ----------------------------------------------------------------------------------------------
# ``pytest -m quick`` (``make test-oldest-torch`` runs it against the oldest torch the package declares): the imports
# (tests/test_quick_tier.py) and each public op's parity once on each CPU backend ("torch", "cpu", "triton" through
# its interpreter) and dtype. Per test: ``(where, per, names)``: one parametrisation per (backend-device, dtype,
# *per params) on CPU among those whose id contains ``where`` (a test without a backend-device parameter: one per
# dtype); ``names``: what of ``streamkern.__all__`` it checks. tests/test_quick_tier.py checks that the tier holds
# every public op on each CPU backend.
QUICK_TIER = {
    "test_consensus_frame_scores.py::test_parity_with_reference_and_seed_form": ("B1-F3-fsl7-S5-H3-D16", (),
                                                                               ("consensus_frame_scores",)),
    "test_consensus_frame_scores.py::test_select_frame_exact_tie_goes_to_lowest_index": ("", (), ("select_frame",)),
    "test_ring_write.py::test_ring_write_parity": ("wrap-NL3-B2-H3-D5", (), ("ring_write",)),
    "test_ring_write.py::test_device_cursor_ring_follows_the_device_count": ("", (), ("KVRing",)),
    "test_bank_evict_select.py::test_random_against_reference": ("M7-E13", (), ("bank_evict_select",)),
    "test_bank_insert.py::test_parity": ("NL3-B2-M3-F4-fsl5-D5", (), ("bank_insert",)),
    "test_pose_topk.py::test_against_reference": ("random-N7-P5-k3", (), ("pose_topk",)),
    "test_drift_gate.py::test_patch_importance_parity": ("strided", (), ("patch_importance",)),
    "test_drift_gate.py::test_drift_parity": ("strided", (), ("attention_weighted_drift",)),
    "test_drift_gate.py::test_gate_step_parity": ("strided", (), ("DriftGate",)),
    "test_block_masked_attention.py::test_presets_parity": ("var-self", (), ("block_masked_attention",
                                                                            "scale_layout", "scale_allow")),
    "test_block_masked_attention.py::test_skipped_fraction_var_680": ("", (), ("skipped_tile_fraction",)),
    "test_verify_scales.py::test_parity": ("B2-s1x2-V37-cfg-strided", ("mode",), ("verify_scales",)),
    "test_frame_write.py::test_parity": ("P7-F5-rows", (), ("frame_write", "FramePool")),
    "test_frame_attention.py::test_parity": ("F7-perhead-holes-gate", (), ("frame_attention",)),
    "test_frame_topk.py::test_parity": ("holes-per-head", (), ("frame_topk",)),
    "test_streaming_kv.py::test_long_stream_matches_cat_reference": ("", (), ("StreamingKV",)),
}


def _mark_quick_tier(items):
    """Mark the quick tier's items ``quick``."""
    taken = set()
    for item in items:
        entry = QUICK_TIER.get(f"{item.path.name}::{item.originalname}")
        params = item.callspec.params if hasattr(item, "callspec") else {}
        if entry is None or params.get("bd", ("", "cpu"))[1] != "cpu" or entry[0] not in item.name:
            continue
        key = (item.path.name, item.originalname, str(params.get("bd")), str(params.get("dtype")),
               *(str(params.get(p)) for p in entry[1]))
        if key not in taken:
            taken.add(key)
            item.add_marker(pytest.mark.quick)

"""Benchmark of the drift gate (docs/contract.md §6, issue 4; seed 002).

Shapes: pi0 — B = 1 and 2 cameras, images 3×224×224, 16×16 patches, attention stack 18 layers × 8 heads × S = 600
(2×256 image + 50 action + prompt tokens), layers [14, 18), 50 action rows, 256 vision columns.

* ``should_recompute`` (the gate's per-step cost, past the state guard so the image work runs): the seed's eager
  ProAttentionGate (``eager-seed``, three ``.item()`` syncs), ``torch.compile`` of its should_recompute, and
  :class:`streamkern.DriftGate` on each backend. Bytes: the image read, ``prev_small`` read, ``small`` written.
  Also a uint8-frame case (what cameras give), against the ``"torch"`` gate.
* ``patch_importance``: the seed's ``extract_patch_importance`` (averages whole S×S maps), ``torch.compile`` of it and
  each backend. Bytes: the slice that must be read (4 layers × B × 8 heads × 50 × 256) plus the output.
"""
from __future__ import annotations

import torch

from streamkern.ops.drift_gate import DriftGate, drift_gate_step_op, patch_importance, patch_importance_op
from streamkern.ops.reference import drift_gate as ref

NL, HEADS, S, LAYERS, A, V = 18, 8, 600, (14, 18), 50, 256
C, HW, POOL = 3, 224, 8


def _attention(bench, B, dtype):
    """``[NL, B, heads, S, S]`` with only the layers the gate reads written (others' pages stay untouched)."""
    attn = torch.empty(NL, B, HEADS, S, S, dtype=dtype, device=bench.device)
    attn[LAYERS[0]:LAYERS[1]] = torch.rand(LAYERS[1] - LAYERS[0], B, HEADS, S, S, device=bench.device).to(dtype)
    return attn


def _gate_case(bench, B, dtype):
    case = f"B{B}-{C}x{HW}x{HW}-{str(dtype).replace('torch.', '')}"
    dev = bench.device
    image_bytes = B * C * HW * HW * dtype.itemsize
    small_bytes = 2 * B * C * (HW // POOL) ** 2 * ref.small_dtype(torch.empty(0, dtype=dtype)).itemsize
    moved = image_bytes + small_bytes
    make = ((lambda: torch.randint(0, 256, (B, C, HW, HW), dtype=dtype, device=dev)) if dtype == torch.uint8
            else (lambda: torch.rand(B, C, HW, HW, device=dev).to(dtype)))
    state = torch.zeros(1, 8, device=dev)
    sets = [(make(), state) for _ in range(bench.input_sets(moved, limit=8))]
    attn = _attention(bench, B, torch.float32)
    common = dict(bytes=moved, extra={"B": B, "image": [C, HW, HW], "pool": POOL, "dilation": 5})
    baseline = "eager-seed"
    if dtype == torch.float32:
        seed = ref.ProAttentionGate(1.0, 0.23)
        seed.update(sets[0][0], attn, state, None)
        yield bench.case("should_recompute", case, "eager-seed", seed.should_recompute, sets, baseline=None,
                         **common)
        yield bench.case("should_recompute", case, "compile-seed", bench.compiled(seed.should_recompute), sets,
                         **common)
    else:
        baseline = "torch"
    for name in ["torch"] + bench.backends(drift_gate_step_op):
        gate = DriftGate(1.0, 0.23, backend=name)
        gate.update(sets[0][0], attn, state, None)
        yield bench.case("should_recompute", case, name, gate.should_recompute, sets,
                         baseline=None if name == baseline else baseline, **common)


def _importance_case(bench, B, dtype):
    case = f"B{B}-L{NL}xh{HEADS}xS{S}-{str(dtype).replace('torch.', '')}"
    moved = (LAYERS[1] - LAYERS[0]) * B * HEADS * A * V * dtype.itemsize + B * V * 4
    sets = [(_attention(bench, B, dtype),) for _ in range(bench.input_sets(moved, limit=2 if bench.quick else 4))]
    common = dict(bytes=moved, extra={"B": B, "layers": list(LAYERS), "A": A, "V": V})
    seed = ref.ProAttentionGate()
    yield bench.case("patch_importance", case, "eager-seed", seed.extract_patch_importance, sets, baseline=None,
                     **common)
    yield bench.case("patch_importance", case, "compile-seed", bench.compiled(seed.extract_patch_importance), sets,
                     **common)
    for name in ["torch"] + bench.backends(patch_importance_op):
        yield bench.case("patch_importance", case, name, lambda a, _n=name: patch_importance(a, backend=_n), sets,
                         **common)


def cases(bench):
    for B in (1, 2):
        yield from _gate_case(bench, B, torch.float32)
    yield from _gate_case(bench, 2, torch.uint8)
    for B in (1, 2):
        yield from _importance_case(bench, B, torch.bfloat16)
    yield from _importance_case(bench, 2, torch.float32)

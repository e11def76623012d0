"""Drift gate (docs/contract.md §4.3, seed 002): parity of every backend with the float64 torch reference and with the
seed's ProAttentionGate, edge cases, bad input, opcheck, torch.compile, no host sync."""
import pytest
import torch

import streamkern as sk
from conftest import backend_params
from streamkern.ops.reference import drift_gate as ref
from streamkern.testing import assert_parity, count_launches

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.uint8: "u8"}


def _attention(NL, B, heads, S, dtype=torch.float32, device="cpu", seed=0, strided=False):
    """Softmax rows ``[NL, B, heads, S, S]``; ``strided`` gives a non-contiguous view (heads and layers permuted,
    a sliced key axis)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        a = torch.randn(B, heads, NL, S, S + 3, generator=g).mul(3).softmax(-1)
        return a.to(device, dtype).permute(2, 0, 1, 3, 4)[..., 1:S + 1]
    return torch.randn(NL, B, heads, S, S, generator=g).mul(3).softmax(-1).to(device, dtype)


def _image(B, C, H, W, dtype, device="cpu", seed=0, strided=False):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.uint8:
        x = torch.randint(0, 256, (B, H, W, C), generator=g, dtype=torch.uint8)
    else:
        x = torch.rand(B, H, W, C, generator=g).to(dtype)
    x = x.permute(0, 3, 1, 2)                           # channels-last strides: not contiguous
    return x.to(device) if strided else x.contiguous().to(device)


# --- patch_importance --------------------------------------------------------------------------

IMPORTANCE_CASES = [
    pytest.param(dict(NL=5, B=2, heads=3, S=23, layer_range=(1, 4), grid=(3, 4), A=5), id="L5-B2-h3-S23-g3x4"),
    pytest.param(dict(NL=3, B=1, heads=1, S=7, layer_range=(2, 3), grid=(1, 1), A=7), id="L3-B1-h1-S7-g1x1"),
    pytest.param(dict(NL=4, B=3, heads=2, S=41, layer_range=(0, 4), grid=(5, 7), A=1), id="L4-B3-h2-S41-g5x7"),
]


@pytest.mark.parametrize("case", IMPORTANCE_CASES)
@pytest.mark.parametrize("dtype", FLOATS, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("bd", backend_params())
def test_patch_importance_parity(bd, case, dtype, strided):
    b, dev = bd
    attn = _attention(case["NL"], case["B"], case["heads"], case["S"], dtype, dev, strided=strided)
    V = case["grid"][0] * case["grid"][1]
    args = (case["layer_range"], V, case["A"], case["grid"])
    out = sk.patch_importance(attn, *args, backend=b)
    want = ref.patch_importance(attn.double(), *args)
    assert out.dtype == torch.float32 and out.shape == (case["B"], *case["grid"])
    assert_parity(out, want, dtype)


@pytest.mark.parametrize("bd", backend_params())
def test_patch_importance_matches_seed(bd):
    b, dev = bd
    attn = _attention(18, 2, 2, 310, device=dev, strided=True)
    out = sk.patch_importance(attn, backend=b)
    assert_parity(out, ref.ProAttentionGate().extract_patch_importance(attn.cpu().double()), torch.float32)


@pytest.mark.parametrize("bd", backend_params())
def test_patch_importance_zero_rows_and_empty_batch(bd):
    b, dev = bd
    attn = torch.zeros(4, 2, 2, 9, 9, device=dev)
    attn[:, 1, :, :, :4] = 0.25                          # batch 1: uniform over the vision columns
    out = sk.patch_importance(attn, (1, 3), 4, 3, (2, 2), backend=b)
    assert torch.equal(out[0].cpu(), torch.zeros(2, 2))   # rows summing to zero: an all-zero map, no NaN
    assert_parity(out[1], torch.full((2, 2), 0.25 / (1 + 1e-8), dtype=torch.float64), torch.float32)
    empty = sk.patch_importance(attn[:, :0], (1, 3), 4, 3, (2, 2), backend=b)
    assert empty.shape == (0, 2, 2)


# --- attention_weighted_drift ------------------------------------------------------------------

DRIFT_CASES = [  # (B, C, H, W, pool, dilation, grid)
    pytest.param((2, 3, 24, 40, 8, 5, (4, 4)), id="B2-24x40-p8-d5-g4x4"),
    pytest.param((1, 3, 16, 16, 4, 3, (5, 3)), id="B1-16x16-p4-d3-g5x3"),
    pytest.param((3, 1, 32, 16, 16, 1, (1, 1)), id="B3-C1-32x16-p16-d1-g1x1"),
    pytest.param((1, 2, 28, 20, 4, 7, (3, 6)), id="B1-C2-28x20-p4-d7-g3x6"),
    pytest.param((1, 3, 8, 8, 8, 7, (2, 2)), id="B1-8x8-p8-d7-1cell"),
    pytest.param((1, 1, 72, 72, 1, 3, (16, 16)), id="B1-C1-72x72-p1-d3-5184cells"),  # over CUDA's staged 4096
]


def _drift_inputs(shape, dtype, dev, strided, seed=0):
    B, C, H, W, pool, dil, grid = shape
    g = torch.Generator().manual_seed(seed + 1)
    image = _image(B, C, H, W, dtype, dev, seed, strided)
    prev_small = torch.rand(B, C, H // pool, W // pool, generator=g).to(dev, ref.small_dtype(image))
    imp = torch.rand(B, *grid, generator=g).to(dev)
    if strided:
        prev_small = prev_small.transpose(2, 3).contiguous().transpose(2, 3)
        imp = torch.rand(B, grid[1], grid[0], generator=g).to(dev).transpose(1, 2)
    return image, prev_small, imp, pool, dil


def _drift_ref(image, prev_small, imp, pool, dil):
    x = image.double() if image.dtype != torch.uint8 else image
    return ref.attention_weighted_drift(x, prev_small.double(), imp.double(), pool, dil)


@pytest.mark.parametrize("shape", DRIFT_CASES)
@pytest.mark.parametrize("dtype", FLOATS + (torch.uint8,), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("bd", backend_params())
def test_drift_parity(bd, shape, dtype, strided):
    b, dev = bd
    args = _drift_inputs(shape, dtype, dev, strided)
    drift, small = sk.attention_weighted_drift(*args, backend=b)
    want_drift, want_small = _drift_ref(*args)
    assert drift.dtype == torch.float32 and small.dtype == ref.small_dtype(args[0])
    assert_parity(drift, want_drift, dtype, "drift")
    assert_parity(small, want_small, dtype, "small")


@pytest.mark.parametrize("dilation", [1, 3, 5, 7])
@pytest.mark.parametrize("pool", [4, 8, 16])
@pytest.mark.parametrize("bd", backend_params(exclude=("triton",)))
def test_drift_pool_dilation_grid(bd, pool, dilation):
    """Every pool/dilation pair at a 224×160 image, a 16×16 importance grid (up- and down-sampling)."""
    b, dev = bd
    args = _drift_inputs((2, 3, 224, 160, pool, dilation, (16, 16)), torch.float32, dev, False)
    drift, small = sk.attention_weighted_drift(*args, backend=b)
    want_drift, want_small = _drift_ref(*args)
    assert_parity(drift, want_drift, torch.float32, "drift")
    assert_parity(small, want_small, torch.float32, "small")


@pytest.mark.parametrize("bd", backend_params())
def test_drift_matches_seed_formula(bd):
    """At the seed's shapes the drift equals the seed's pooled diff · dilated interpolated importance."""
    b, dev = bd
    image, prev_small, imp, _, _ = _drift_inputs((2, 3, 224, 224, 8, 5, (16, 16)), torch.float32, dev, False)
    seed = ref.ProAttentionGate()
    seed.prev_image_small, seed.prev_attention = prev_small.cpu().double(), imp.cpu().double()
    d = seed.robust_image_diff(image.cpu().double())
    a = seed.dilate_attention(torch.nn.functional.interpolate(
        imp.cpu().double().unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False).squeeze(1))
    drift, _ = sk.attention_weighted_drift(image, prev_small, imp, 8, 5, backend=b)
    assert_parity(drift, (d * a).sum(dim=(1, 2)), torch.float32)


@pytest.mark.parametrize("bd", backend_params())
def test_drift_nan_image_and_empty_batch(bd):
    b, dev = bd
    image, prev_small, imp, pool, dil = _drift_inputs((2, 3, 16, 16, 8, 3, (2, 2)), torch.float32, dev, False)
    image = image.clone()
    image[1, 2, 5, 9] = float("nan")
    drift, small = sk.attention_weighted_drift(image, prev_small, imp, pool, dil, backend=b)
    assert torch.isfinite(drift[0]) and torch.isnan(drift[1])
    assert torch.isnan(small[1, 2, 0, 1]) and torch.isfinite(small[0]).all()
    drift, small = sk.attention_weighted_drift(image[:0], prev_small[:0], imp[:0], pool, dil, backend=b)
    assert drift.shape == (0,) and small.shape == (0, 3, 2, 2)


# --- the gate ----------------------------------------------------------------------------------


def _trajectory(steps, B, H, W, seed, device="cpu"):
    """Random steps: a scene plus small, medium or large noise (bounded values, so fp32 pooling rounding stays far
    below the differences), states that sometimes jump."""
    g = torch.Generator().manual_seed(seed)
    scene = torch.rand(B, 3, H, W, generator=g)
    state = torch.zeros(B, 7)
    for _ in range(steps):
        scale = (0.05, 0.5, 3.0)[int(torch.randint(0, 3, (), generator=g))]
        image = scene + scale * torch.randn(scene.shape, generator=g)
        jump = 0.3 if torch.rand((), generator=g) < 0.2 else 0.02
        state = state + jump * (2 * torch.rand(state.shape, generator=g) - 1)
        yield image.to(device), state.to(device)


def _step_attention(B, seed, device, strided=True):
    return _attention(18, B, 2, 310, device=device, seed=seed, strided=strided)


def _run_gates(gates, steps, B, H, W, device, seed=0):
    """Run gates side by side; returns per-step [(recompute, reason, drift) per gate] as Python values."""
    log = []
    for t, (image, state) in enumerate(_trajectory(steps, B, H, W, seed, device)):
        row = []
        for gate in gates:
            if isinstance(gate, ref.ProAttentionGate):
                run, why, d = gate.should_recompute(image.cpu(), state.cpu())
                row.append((bool(run), ref.seed_reason_code(run, why), float(d)))
            else:
                run, why, d = gate.should_recompute(image, state)
                assert run.shape == why.shape == d.shape == () and d.dtype == torch.float32
                row.append((bool(run), int(why), float(d)))
        log.append(row)
        if row[0][0]:
            attn = _step_attention(B, t, device)
            for gate in gates:
                is_seed = isinstance(gate, ref.ProAttentionGate)
                gate.update(image.cpu() if is_seed else image, attn.cpu() if is_seed else attn,
                            state.cpu() if is_seed else state, ("kv", t))
    return log


def _assert_same_log(log):
    for t, row in enumerate(log):
        for run, why, d in row[1:]:
            assert (run, why) == row[0][:2], f"step {t}: {row}"
            assert_parity(torch.tensor(d), torch.tensor(row[0][2]), torch.float32, f"drift at step {t}")


@pytest.mark.parametrize("bd", backend_params(exclude=(("triton", "cpu"),)))
def test_gate_trajectory_matches_seed(bd):
    """200 steps, two cameras, thresholds at the seed's P75/P90: same decisions and reasons as the seed's class.
    (Triton on CPU would take minutes under the interpreter: test_gate_trajectory_triton runs it smaller.)"""
    b, dev = bd
    gates = [ref.ProAttentionGate(1.0, 0.23), sk.DriftGate(1.0, 0.23, backend=b)]
    log = _run_gates(gates, 200, 2, 224, 224, dev)
    _assert_same_log(log)
    reasons = {row[0][1] for row in log}
    assert reasons == {0, 1, 2, 3}, f"trajectory must exercise every reason, got {reasons}"


@pytest.mark.parametrize("pool,dilation", [pytest.param(8, 3, id="p8-d3-1tile"),
                                           pytest.param(2, 5, id="p2-d5-480cells-2tiles")])
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu", "cuda")))
def test_gate_trajectory_triton(bd, pool, dilation):
    """Triton: 12 steps at 48×40 images against the torch backend; pool 2 spreads each camera over two programs,
    so the last-program hand-off of the decision is exercised."""
    b, dev = bd
    kw = dict(pool=pool, dilation=dilation)
    gates = [sk.DriftGate(1.0, 0.23, backend="torch", **kw), sk.DriftGate(1.0, 0.23, backend=b, **kw)]
    log = _run_gates(gates, 12, 2, 48, 40, dev)
    _assert_same_log(log)
    assert {row[0][1] for row in log} >= {1, 3} and int(gates[1]._counter[0]) == 0


@pytest.mark.parametrize("shape", [pytest.param((3, 3, 20, 28, 4, 3), id="B3-20x28-p4-d3"),
                                   pytest.param((1, 1, 8, 8, 8, 1), id="B1-C1-8x8-p8-1cell")])
@pytest.mark.parametrize("dtype", FLOATS + (torch.uint8,), ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_gate_step_parity(bd, shape, dtype, strided):
    """The fused gate on odd shapes, every image dtype and channels-last images: the first frame's decision and
    pooled frame against the "torch" gate, then a drifted frame's decision against the "torch" gate and its drift
    against the float64 formula applied to the gate's own stored frame and importance (so that the rounding of the
    stored frame, which Triton's interpreter truncates for bf16, is not counted twice)."""
    b, dev = bd
    B, C, H, W, pool, dil = shape
    state = torch.zeros(B, 5, device=dev)
    attn = _attention(18, B, 2, 310, device=dev, strided=True)
    gates = [sk.DriftGate(1e-6, 0.1, pool=pool, dilation=dil, backend=name) for name in ("torch", b)]
    first, second = (_image(B, C, H, W, dtype, dev, seed, strided) for seed in (1, 2))
    for image in (first, second):
        (want_run, want_why, _), (run, why, d) = (g.should_recompute(image, state) for g in gates)
        assert (bool(run), int(why)) == (bool(want_run), int(want_why)) and d.dtype == torch.float32
        assert_parity(gates[1]._pending[1], gates[0]._pending[1], dtype, "small")
        if image is first:
            assert (int(why), float(d)) == (sk.GateReason.FIRST, 100.0)
            for g in gates:
                g.update(image, attn, state, None)
    pixels = second.double() / 255 if dtype == torch.uint8 else second.double()
    want, _ = ref.attention_weighted_drift(pixels, gates[1].prev_small.double(), gates[1].prev_importance.double(),
                                           pool, dil)
    assert int(why) == sk.GateReason.VISION
    assert_parity(d, want.mean(), dtype, "drift")


def _int_view(dtype):
    return {8: torch.int64, 4: torch.int32, 2: torch.int16}[dtype.itemsize]


def _layout(layout, values, dtype, dev):
    """A state holding ``values`` (6 of them, or 1 for "0d") in the given memory layout."""
    if layout == "0d":
        return values[0].to(dev, dtype).reshape(())
    if layout == "contig":
        return values.reshape(2, 3).to(dev, dtype)
    if layout == "column-slice":                        # [2, 3] view into a [2, 5] observation
        out = torch.zeros(2, 5, dtype=dtype, device=dev)[:, 1:4]
        return out.copy_(values.reshape(2, 3))
    out = torch.zeros(3, 1, 2, dtype=dtype, device=dev).permute(2, 0, 1)   # [2, 3, 1], strides that cannot merge
    return out.copy_(values.reshape(2, 3, 1))


@pytest.mark.parametrize("layout", ["contig", "column-slice", "permuted-3d", "0d"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=["f64", "f32", "f16", "bf16"])
@pytest.mark.parametrize("bd", backend_params())
def test_gate_state_guard_at_threshold(bd, dtype, layout):
    """The state guard in every floating dtype and layout, at the threshold 0.05 (not representable in any of
    them): the state's own rounding of the difference and the seed's float64 comparison decide, as in
    ``torch.max(torch.abs(state - prev_state)).item() > 0.05``; a NaN in the state recomputes."""
    b, dev = bd
    gate = sk.DriftGate(drift_threshold=1e9, state_threshold=0.05, pool=4, dilation=1, backend=b)
    image = torch.rand(1, 1, 4, 8, device=dev)
    n = 1 if layout == "0d" else 6
    prev_values = torch.linspace(0.125, 0.75, n, dtype=torch.float64)
    prev = _layout(layout, prev_values, dtype, dev)
    gate.update(image, _attention(18, 1, 1, 310, device=dev), prev, None)
    near = torch.tensor(0.05, dtype=dtype)
    bits = near.view(_int_view(dtype))
    for step in (near, (bits + 1).view(dtype), (bits - 1).view(dtype), torch.tensor(float("nan"), dtype=dtype)):
        values = prev_values.clone()
        values[-1] = prev_values[-1].to(dtype) + step.double()
        state = _layout(layout, values, dtype, dev)
        want = torch.max(torch.abs(state.cpu() - prev.cpu())).item()
        run, why, d = gate.should_recompute(image, state)
        if want > 0.05 or want != want:
            assert (bool(run), int(why)) == (True, sk.GateReason.STATE), (step, want)
            assert float(d) == pytest.approx(want, nan_ok=True) and d.dtype == torch.float32
        else:
            assert (bool(run), int(why)) == (False, sk.GateReason.REUSE), (step, want)


@pytest.mark.parametrize("bd", backend_params())
def test_gate_first_frame_state_guard_and_nan(bd):
    b, dev = bd
    gate = sk.DriftGate(drift_threshold=1.0, state_threshold=0.25, pool=8, dilation=3, backend=b)
    image = torch.rand(1, 3, 16, 24, device=dev)
    state = torch.zeros(1, 4, device=dev)
    run, why, d = gate.should_recompute(image, state)
    assert (bool(run), int(why), float(d)) == (True, sk.GateReason.FIRST, 100.0)
    gate.update(image, _attention(18, 1, 1, 310, device=dev), state, "kv0")
    assert gate.cached_kv() == "kv0"
    at = state.clone()
    at[0, 2] = 0.25                                          # exactly the threshold: no state trigger
    run, why, d = gate.should_recompute(image, at)        # same image: drift 0 up to the pooling's rounding
    assert (bool(run), int(why)) == (False, sk.GateReason.REUSE) and abs(float(d)) < 1e-6
    above = state.clone()
    above[0, 1] = -0.3
    run, why, d = gate.should_recompute(image, above)
    assert (bool(run), int(why)) == (True, sk.GateReason.STATE) and float(d) == pytest.approx(0.3)
    broken = image.clone()
    broken[0, 0, 3, 3] = float("nan")                        # decision: a NaN drift recomputes (seed would reuse)
    run, why, d = gate.should_recompute(broken, state)
    assert (bool(run), int(why)) == (True, sk.GateReason.VISION) and torch.isnan(d)
    seed = ref.ProAttentionGate(1.0, 0.25)                   # the seed reuses such a frame
    seed.prev_state, seed.prev_image_small = state.cpu(), torch.zeros(1, 3, 28, 28)
    seed.prev_attention = torch.full((1, 16, 16), 1 / 256)
    nan_frame = torch.zeros(1, 3, 224, 224)
    nan_frame[0, 0, 3, 3] = float("nan")
    assert seed.should_recompute(nan_frame, state.cpu())[0] is False
    gate.reset()
    assert gate.cached_kv() is None and int(gate.should_recompute(image, state)[1]) == sk.GateReason.FIRST


@pytest.mark.parametrize("bd", backend_params())
def test_gate_zero_attention_reuses(bd):
    """Attention rows summing to zero give a zero importance map: the drift is 0 whatever the image does."""
    b, dev = bd
    gate = sk.DriftGate(backend=b, pool=4, dilation=3)
    image, state = torch.rand(2, 3, 16, 16, device=dev), torch.zeros(2, 3, device=dev)
    gate.update(image, torch.zeros(18, 2, 1, 310, 310, device=dev), state, None)
    run, why, d = gate.should_recompute(torch.rand(2, 3, 16, 16, device=dev) * 50, state)
    assert (bool(run), int(why), float(d)) == (False, sk.GateReason.REUSE, 0.0)


@pytest.mark.parametrize("bd", backend_params())
def test_gate_uint8_cameras(bd):
    """uint8 frames of two cameras batched: pooled as value / 255 in float32, drift averaged over the cameras."""
    b, dev = bd
    frames = [torch.randint(0, 256, (2, 3, 32, 24), dtype=torch.uint8, device=dev) for _ in range(2)]
    attn = _attention(18, 2, 2, 310, device=dev)
    state = torch.zeros(8, device=dev)
    gate = sk.DriftGate(backend=b, pool=8, dilation=3)
    gate.update(frames[0], attn, state, None)
    assert gate.prev_small.dtype == torch.float32
    assert_parity(gate.prev_small, frames[0].double().div(255).reshape(2, 3, 4, 8, 3, 8).mean((3, 5)), torch.uint8)
    drift = gate.should_recompute(frames[1], state)[2]
    importance = ref.patch_importance(attn.double(), (14, 18), 256, 50, (16, 16))
    want, _ = ref.attention_weighted_drift(frames[1].double() / 255, gate.prev_small.double(), importance, 8, 3)
    assert_parity(drift, want.mean(), torch.uint8)


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_gate_is_one_launch(bd, monkeypatch):
    """Accelerated backends: should_recompute is one kernel launch, whichever way it decides (the first call also
    zero-fills the gate's arrival counter); the seed's eager gate, counted the same way, is many."""
    b, dev = bd
    monkeypatch.undo()                                       # poisoned allocations would count as fills
    gate = sk.DriftGate(backend=b, pool=8, dilation=3)
    image, state = torch.rand(2, 3, 16, 24, device=dev), torch.zeros(2, 5, device=dev)
    assert count_launches(gate.should_recompute, image, state, device=dev) == 2
    gate.update(image, _attention(18, 2, 1, 310, device=dev), state, None)
    for args in ((image, state), (image + 0.5, state), (image, state + 1.0)):
        assert count_launches(gate.should_recompute, *args, device=dev) == 1
    assert int(gate._counter[0]) == 0
    seed = ref.ProAttentionGate()
    seed.update(torch.rand(1, 3, 224, 224), _attention(18, 1, 1, 310), torch.zeros(5), None)
    assert count_launches(seed.should_recompute, torch.rand(1, 3, 224, 224), torch.zeros(5)) >= 10


@pytest.mark.parametrize("bd", backend_params())
def test_gate_update_writes_its_buffers_in_place(bd):
    """``update`` stores into the buffers its first call allocated (identity stable across steps, as a replayed
    graph needs), with the same next decision as a gate that saw only the later update; the caller's KV tensors
    are copied, never kept or overwritten; a KV of a new shape gets new buffers."""
    b, dev = bd
    gate, fresh = (sk.DriftGate(1.0, 0.23, pool=8, dilation=3, backend=b) for _ in range(2))
    frames = list(_trajectory(3, 2, 16, 24, seed=4, device=dev))
    kvs = [(torch.rand(2, 5, device=dev), [torch.rand(3, device=dev)]) for _ in range(2)]
    first_kv = [kvs[0][0].clone(), kvs[0][1][0].clone()]
    gate.should_recompute(*frames[0])
    gate.update(frames[0][0], _step_attention(2, 0, dev), frames[0][1], kvs[0])
    held = [gate.prev_small, gate.prev_importance, gate.prev_state, gate.prev_kv, gate.prev_kv[0],
            gate.prev_kv[1][0]]
    assert held[4] is not kvs[0][0] and torch.equal(held[4], kvs[0][0])
    for g in (gate, fresh):
        g.should_recompute(*frames[1])
        g.update(frames[1][0], _step_attention(2, 1, dev), frames[1][1], kvs[1])
    now = [gate.prev_small, gate.prev_importance, gate.prev_state, gate.prev_kv, gate.prev_kv[0],
           gate.prev_kv[1][0]]
    assert all(x is y for x, y in zip(now, held))
    want = [fresh.prev_small, fresh.prev_importance, fresh.prev_state, kvs[1][0], kvs[1][1][0]]
    assert all(torch.equal(x, y) for x, y in zip(now[:3] + now[4:], want))
    assert torch.equal(kvs[0][0], first_kv[0]) and torch.equal(kvs[0][1][0], first_kv[1])
    for x, y in zip(gate.should_recompute(*frames[2]), fresh.should_recompute(*frames[2])):
        assert torch.equal(x, y)
    longer = (torch.rand(2, 6, device=dev), [torch.rand(3, device=dev)])
    gate.update(frames[2][0], _step_attention(2, 2, dev), frames[2][1], longer)
    assert gate.prev_kv[0] is not held[4] and torch.equal(gate.prev_kv[0], longer[0])


def test_first_update_inside_a_capture_raises():
    """The first update allocates the buffers later updates write into: inside a capture they would live in the
    graph's memory, so it must happen eagerly (as the arrival counter's first call)."""
    from streamkern.step_graph import StepGraph

    gate = sk.DriftGate(pool=8, dilation=3, backend="cpu")
    image, state = torch.rand(1, 3, 16, 16), torch.zeros(1, 7)
    gate.should_recompute(image, state)
    with pytest.raises(RuntimeError, match="call it once eagerly before capturing"):
        StepGraph(lambda: gate.update(image, _attention(18, 1, 1, 310), state, None), "cpu")
    assert gate.prev_small is None


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_gate_never_syncs(bd, monkeypatch):
    """Accelerated backends: should_recompute and update read nothing back to the host."""
    b, dev = bd
    gate = sk.DriftGate(backend=b, pool=8, dilation=3)
    image, state, attn = torch.rand(2, 3, 16, 16, device=dev), torch.rand(2, 5, device=dev), _attention(
        18, 2, 1, 310, device=dev)
    gate.update(image, attn, state, None)

    def refuse(*_):
        raise AssertionError("host sync on an accelerated path")

    for name in ("item", "__bool__", "__int__", "__float__", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    new = image + 0.5
    if dev == "cuda":                                        # and CUDA itself raises on any implicit sync
        torch.cuda.set_sync_debug_mode("error")
    try:
        out = gate.should_recompute(new, state)
        gate.update(new, attn, state, None)
    finally:
        if dev == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    monkeypatch.undo()
    assert (bool(out[0]), int(out[1])) in {(True, 2), (False, 0)} and torch.isfinite(out[2])


# --- bad input ---------------------------------------------------------------------------------


def test_bad_drift_inputs_name_the_argument():
    image, prev_small, imp, pool, dil = _drift_inputs((2, 3, 16, 16, 8, 3, (2, 2)), torch.float32, "cpu", False)
    with pytest.raises(ValueError, match="dilation: expected an odd positive int"):
        sk.attention_weighted_drift(image, prev_small, imp, pool, 4)
    with pytest.raises(ValueError, match="dilation: expected an odd positive int"):
        sk.attention_weighted_drift(image, prev_small, imp, pool, 0)
    with pytest.raises(ValueError, match=r"image: expected .* multiples of pool=8, got \[2, 3, 12, 16\]"):
        sk.attention_weighted_drift(image[:, :, :12], prev_small, imp, pool, dil)
    with pytest.raises(ValueError, match=r"prev_small: expected shape \[2, 3, 2, 2\]"):
        sk.attention_weighted_drift(image, prev_small[:1], imp, pool, dil)
    with pytest.raises(ValueError, match=r"prev_importance: expected shape \[2, \*, \*\]"):
        sk.attention_weighted_drift(image, prev_small, imp[:1], pool, dil)
    with pytest.raises(TypeError, match="prev_small: expected dtype float32/float16/bfloat16, got int64"):
        sk.attention_weighted_drift(image, prev_small.long(), imp, pool, dil)
    with pytest.raises(TypeError, match="image: expected dtype"):
        sk.attention_weighted_drift(image.double(), prev_small, imp, pool, dil)


def test_bad_importance_inputs_name_the_argument():
    attn = _attention(4, 2, 2, 9)
    with pytest.raises(ValueError, match="grid: expected gh \\* gw == num_vision_tokens=4"):
        sk.patch_importance(attn, (0, 2), 4, 3, (2, 3))
    with pytest.raises(ValueError, match="layer_range: expected 0 <= start < end"):
        sk.patch_importance(attn, (2, 2), 4, 3, (2, 2))
    with pytest.raises(ValueError, match=r"layer_range\[1\]: expected an int in \[0, 4\]"):
        sk.patch_importance(attn, (0, 5), 4, 3, (2, 2))
    with pytest.raises(ValueError, match=r"action_tokens: expected an int in \[1, 9\]"):
        sk.patch_importance(attn, (0, 2), 4, 10, (2, 2))
    with pytest.raises(ValueError, match="attn: expected shape"):
        sk.patch_importance(attn[..., :8], (0, 2), 4, 3, (2, 2))


def test_bad_gate_inputs_write_nothing():
    gate = sk.DriftGate(pool=8, dilation=3, backend="torch")
    with pytest.raises(ValueError, match="dilation: expected an odd positive int"):
        sk.DriftGate(dilation=2)
    image, state, attn = torch.rand(2, 3, 16, 16), torch.zeros(2, 5), _attention(18, 2, 1, 310)
    gate.update(image, attn, state, "kv")
    before = (gate.prev_small.clone(), gate.prev_importance.clone(), gate.prev_state.clone())
    with pytest.raises(ValueError, match=r"attention: expected batch B=2"):        # camera count mismatch
        gate.update(image, attn[:, :1], state, "new")
    with pytest.raises(ValueError, match=r"image: expected shape \[2, 3, 16, 16\]"):
        gate.should_recompute(torch.rand(3, 3, 16, 16), state)
    with pytest.raises(ValueError, match=r"state: expected shape \[2, 5\]"):
        gate.update(image, attn, torch.zeros(2, 6), "new")
    with pytest.raises(ValueError, match=r"image: expected .* multiples of pool=8"):
        sk.DriftGate(pool=8, backend="torch").update(torch.rand(2, 3, 12, 16), attn, state, None)
    with pytest.raises(ValueError, match=r"image: expected .* multiples of pool=8"):
        sk.DriftGate(pool=8, backend="torch").should_recompute(torch.rand(2, 3, 12, 16), state)
    with pytest.raises(ValueError, match=r"image: expected at least one camera \(B >= 1\)"):
        sk.DriftGate(pool=8, backend="torch").should_recompute(torch.rand(0, 3, 16, 16), state)
    with pytest.raises(TypeError, match=r"image: expected a dtype that pools to float32 as in earlier steps"):
        gate.should_recompute(image.half(), state)
    with pytest.raises(TypeError, match=r"state.*float64"):
        gate.should_recompute(image, state.double())
    assert gate.cached_kv() == "kv"
    for got, want in zip((gate.prev_small, gate.prev_importance, gate.prev_state), before):
        assert torch.equal(got, want)


# --- torch.library / torch.compile -------------------------------------------------------------


@pytest.mark.parametrize("bd", backend_params(exclude=("triton",)))
def test_opcheck(bd):
    b, dev = bd
    from streamkern.ops.drift_gate import attention_weighted_drift_op, drift_gate_step_op, patch_importance_op

    args = _drift_inputs((2, 3, 16, 24, 8, 3, (3, 2)), torch.float32, dev, True)
    torch.library.opcheck(attention_weighted_drift_op.custom_op, args + (b,))

    image, prev_small, imp, pool, dil = args
    state, counter = torch.rand(2, 5, device=dev, dtype=torch.float64)[:, 1:], torch.zeros(1, dtype=torch.int32,
                                                                                            device=dev)
    for frame, prev_state in (((None, None), None), ((prev_small, imp), state.contiguous() + 0.01)):
        torch.library.opcheck(drift_gate_step_op.custom_op,
                              (image, *frame, state, prev_state, counter, pool, dil, 0.5, 0.05, b))
    torch.library.opcheck(patch_importance_op.custom_op,
                          (_attention(4, 2, 2, 9, device=dev, strided=True), [1, 3], 4, 3, [2, 2], b))


@pytest.mark.parametrize("bd", backend_params(exclude=("triton",)))
def test_torch_compile_fullgraph(bd):
    b, dev = bd
    image, prev_small, imp, pool, dil = _drift_inputs((2, 3, 16, 24, 8, 3, (3, 2)), torch.float16, dev, False)
    attn = _attention(4, 2, 2, 15, device=dev)

    def step(image, prev_small, attn):
        importance = sk.patch_importance(attn, (1, 3), 6, 3, (3, 2), backend=b)
        return sk.attention_weighted_drift(image, prev_small, importance, pool, dil, backend=b)

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(image, prev_small, attn)
    want = step(image, prev_small, attn)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    gate = sk.DriftGate(drift_threshold=0.01, pool=8, dilation=3, backend=b)
    gate.update(image, _attention(18, 2, 1, 310, device=dev), torch.zeros(3, device=dev), None)
    new, state = image + 1, torch.full((3,), 0.01, device=dev)
    got = torch.compile(gate.should_recompute, fullgraph=True, backend="aot_eager")(new, state)
    want = gate.should_recompute(new, state)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and int(want[1]) == sk.GateReason.VISION

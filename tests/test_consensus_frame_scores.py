"""consensus_frame_scores / select_frame (docs/contract.md §4.1): every backend against the float64 "torch" reference
and the seed's quadratic form; odd sizes, dtypes, strides, weights, ties, bad inputs, opcheck, torch.compile."""
import pytest
import torch

import streamkern
from streamkern.ops.reference import consensus_frame_scores as ref
from streamkern.testing import assert_parity

from conftest import DTYPES, backend_params


# (NL, B, F, frame_seq_len, S, H, D, layers, layer_weights, weights per batch row)
CASES = [
    pytest.param((4, 1, 3, 7, 5, 3, 16, (0, 2, 3), (0.2, 0.3, 0.5), False), id="B1-F3-fsl7-S5-H3-D16"),
    pytest.param((3, 3, 2, 5, 1, 1, 64, (2, 0), (1.0, -0.5), True), id="B3-F2-fsl5-S1-H1-D64-wBS"),
    pytest.param((2, 2, 1, 13, 9, 2, 128, (1, 1, 0), (0.5, 0.25, 1.0), False), id="B2-F1-fsl13-D128-dup"),
    pytest.param((5, 1, 4, 3, 33, 3, 24, (4, 1), (0.7, 0.3), True), id="B1-F4-fsl3-S33-D24-wBS"),
    pytest.param((2, 1, 37, 1, 4, 1, 16, (1,), (1.0,), False), id="B1-F37-fsl1-D16"),
]
# GPU only (too slow for the interpreter): several token splits and unrolled steps per frame, frames split mid-way.
GPU_CASES = [
    pytest.param((3, 2, 3, 397, 64, 4, 64, (2, 0, 1), (0.2, 0.3, 0.5), True), id="B2-F3-fsl397-S64-H4-D64"),
    pytest.param((30, 1, 3, 1560, 512, 12, 128, (0, 15, 29), (0.2, 0.3, 0.5), False), id="seed-12x128"),
]


def _inputs(case, dtype, device, seed=0):
    NL, B, F, fsl, S, H, D, layers, lw, per_row = case
    g = torch.Generator().manual_seed(seed)
    chunk = torch.randn(NL, B, F * fsl, H, D, generator=g).to(dtype)
    text = torch.randn(NL, B, S, H, D, generator=g).to(dtype)
    w = torch.rand((B, S) if per_row else (S,), generator=g)
    return chunk.to(device), text.to(device), w.to(device), fsl, layers, lw


def _reference64(chunk, text, w, fsl, layers, lw):
    """The "torch" backend on the (already rounded) inputs cast to float64, on the CPU."""
    c, t, ww = (x.detach().to("cpu", torch.float64) for x in (chunk, text, w))
    return ref.consensus_frame_scores(c, t, ww, fsl, layers, lw)


def _run(bd, args):
    b, _ = bd
    return streamkern.consensus_frame_scores(*args, backend=b)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_parity_with_reference_and_seed_form(bd, dtype, case):
    args = _inputs(case, dtype, bd[1])
    out = _run(bd, args)
    assert out.dtype == torch.float32 and out.device.type == bd[1]
    assert out.shape == (case[1], case[2])
    assert_parity(out, _reference64(*args), dtype, "vs float64 reference")
    c, t, w = (x.to("cpu", torch.float64) for x in args[:3])
    assert_parity(out, ref.seed_quadratic_scores(c, t, w, *args[3:]), dtype, "vs seed quadratic form")


@pytest.mark.parametrize("case", GPU_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params(exclude=[(b, "cpu") for b in ("torch", "cpu", "triton")]))
def test_parity_large_on_gpu(bd, dtype, case):
    args = _inputs(case, dtype, bd[1])
    assert_parity(_run(bd, args), _reference64(*args), dtype, "vs float64 reference")


def test_reference_forms_agree():
    """The two float64 formulations of the seed and the "torch" backend coincide (sanity of the references)."""
    for case in CASES:
        c, t, w, fsl, layers, lw = _inputs(case.values[0], torch.float64, "cpu")
        fast = ref.consensus_frame_scores(c, t, w, fsl, layers, lw)
        assert_parity(ref.seed_quadratic_scores(c, t, w, fsl, layers, lw), fast, torch.float64)
        assert_parity(ref.seed_fast_scores(c, t, w, fsl, layers, lw), fast, torch.float32)  # returns float32


def _strided(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``x`` in a non-contiguous layout."""
    if how == "slice":  # every other element of a bigger buffer along D, and an offset along T
        big = torch.zeros(*x.shape[:2], x.shape[2] + 1, x.shape[3], 2 * x.shape[4], dtype=x.dtype, device=x.device)
        big[:, :, 1:, :, ::2] = x
        return big[:, :, 1:, :, ::2]
    if how == "permuted":  # storage ordered [NL, H, D, B, T]
        return x.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)
    if how == "offset":  # contiguous strides, storage starting one element past a 16-byte boundary
        buf = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        view = buf[1:].view(x.shape)
        view.copy_(x)
        return view
    if how == "heads":  # storage ordered [NL, B, T, D, H]: unit stride across heads, not within
        return x.transpose(3, 4).contiguous().transpose(3, 4)
    raise ValueError(how)


@pytest.mark.parametrize("how", ["slice", "permuted", "heads", "offset"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_non_contiguous_inputs(bd, dtype, how):
    chunk, text, w, fsl, layers, lw = _inputs(CASES[0].values[0], dtype, bd[1], seed=1)
    nc_chunk, nc_text = _strided(chunk, how), _strided(text, how)
    w_nc = torch.stack([w, w], -1)[:, 0]  # stride 2
    assert how == "offset" or not (nc_chunk.is_contiguous() or nc_text.is_contiguous())
    assert not w_nc.is_contiguous() and torch.equal(nc_chunk, chunk) and torch.equal(nc_text, text)
    out = _run(bd, (nc_chunk, nc_text, w_nc, fsl, layers, lw))
    assert_parity(out, _reference64(chunk, text, w, fsl, layers, lw), dtype)


@pytest.mark.parametrize("bd", backend_params())
def test_weights_in_another_dtype_and_all_zero(bd):
    chunk, text, w, fsl, layers, lw = _inputs(CASES[1].values[0], torch.bfloat16, bd[1], seed=2)
    out = _run(bd, (chunk, text, w.half(), fsl, layers, lw))
    assert_parity(out, _reference64(chunk, text, w.half(), fsl, layers, lw), torch.bfloat16)
    zero = _run(bd, (chunk, text, torch.zeros_like(w), fsl, layers, lw))
    assert torch.isfinite(zero).all()
    assert torch.equal(zero.cpu(), torch.zeros_like(zero.cpu()))


@pytest.mark.parametrize("bd", backend_params())
def test_empty_inputs(bd):
    dev = bd[1]
    # no batch rows, no frames, no text tokens
    for B, F, S in ((0, 2, 3), (2, 0, 3), (2, 2, 0)):
        chunk = torch.randn(2, B, F * 3, 2, 16, device=dev)
        text = torch.randn(2, B, S, 2, 16, device=dev)
        w = torch.rand(S, device=dev)
        out = _run(bd, (chunk, text, w, 3, (1, 0), (0.5, 0.5)))
        assert out.shape == (B, F) and out.dtype == torch.float32
        assert_parity(out, _reference64(chunk, text, w, 3, (1, 0), (0.5, 0.5)), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_select_frame_exact_tie_goes_to_lowest_index(bd, dtype):
    """Frames 1 and 3 hold the same keys, all 2, the largest value; the other frames hold integers in [-2, 1].
    Every product and sum is exact in float32 and the scale λ/(H·√D·fsl) = 0.5/32 is a power of two, so the two
    frames tie exactly on every backend, and the argmax must be frame 1."""
    dev = bd[1]
    g = torch.Generator().manual_seed(3)
    NL, B, F, fsl, S, H, D = 2, 3, 4, 4, 3, 2, 16
    chunk = torch.randint(-2, 2, (NL, B, F, fsl, H, D), generator=g).float()
    chunk[:, :, 1] = 2.0
    chunk[:, :, 3] = 2.0
    chunk = chunk.reshape(NL, B, F * fsl, H, D)
    text = torch.ones(NL, B, S, H, D)
    w = torch.tensor([1.0, 0.0, 0.0])  # normalised weight 1/(1 + 1e-8) rounds to 1 in float32
    args = (chunk.to(dtype).to(dev), text.to(dtype).to(dev), w.to(dev), fsl, (1, 0), (0.5, 0.5))
    best, scores = streamkern.select_frame(*args, backend=bd[0])
    assert best.dtype == torch.int64 and best.device.type == dev and best.shape == (B,)
    assert torch.equal(scores[:, 1].cpu(), scores[:, 3].cpu()), "identical frames must tie exactly"
    assert (scores[:, 1] > scores[:, 0]).all() and (scores[:, 1] > scores[:, 2]).all()
    assert torch.equal(best.cpu(), torch.ones(B, dtype=torch.int64))
    assert torch.equal(best.cpu(), _reference64(*args).argmax(-1))


# ---- bad inputs ---------------------------------------------------------------------------------------------


def _good(NL=30):
    chunk = torch.randn(NL, 2, 6, 2, 8)
    return dict(chunk_k=chunk, text_k=torch.randn(NL, 2, 4, 2, 8), entity_weights=torch.rand(4), frame_seq_len=3)


BAD = [
    pytest.param(dict(chunk_k=torch.randn(30, 2, 6, 16)), ValueError, "chunk_k: expected a 5-d", id="rank"),
    pytest.param(dict(text_k=torch.randn(29, 2, 4, 2, 8)), ValueError, "text_k: expected shape", id="NL"),
    pytest.param(dict(text_k=torch.randn(30, 1, 4, 2, 8)), ValueError, "text_k: expected shape", id="B"),
    pytest.param(dict(text_k=torch.randn(30, 2, 4, 3, 8)), ValueError, "text_k: expected shape", id="H"),
    pytest.param(dict(text_k=torch.randn(30, 2, 4, 2, 16)), ValueError, "text_k: expected shape", id="D"),
    pytest.param(dict(text_k=torch.randn(30, 2, 4, 2, 8).half()), TypeError, "text_k: expected dtype float32",
                 id="dtype-mismatch"),
    pytest.param(dict(chunk_k=torch.ones(30, 2, 6, 2, 8, dtype=torch.int32)), TypeError, "chunk_k: expected dtype",
                 id="int-keys"),
    pytest.param(dict(entity_weights=torch.ones(4, dtype=torch.int64)), TypeError, "entity_weights: expected dtype",
                 id="int-weights"),
    pytest.param(dict(entity_weights=torch.rand(5)), ValueError, "entity_weights: expected shape [4]",
                 id="weights-S"),
    pytest.param(dict(entity_weights=torch.rand(3, 4)), ValueError, "entity_weights: expected shape [2, 4]",
                 id="weights-B"),
    pytest.param(dict(entity_weights=torch.rand(1, 2, 4)), ValueError, "entity_weights: expected a 1 or 2-d",
                 id="weights-rank"),
    pytest.param(dict(frame_seq_len=4), ValueError, "frame_seq_len: expected a divisor of the chunk length L=6",
                 id="fsl-divides"),
    pytest.param(dict(frame_seq_len=0), ValueError, "frame_seq_len: expected an int in [1", id="fsl-zero"),
    pytest.param(dict(frame_seq_len=3.0), TypeError, "frame_seq_len: expected an int", id="fsl-float"),
    pytest.param(dict(layers=(0, 30, 29)), ValueError, "layers[1]: expected an int in [0, 29], got 30",
                 id="layer-range"),
    pytest.param(dict(layers=(0, -1, 29)), ValueError, "layers[1]: expected an int in [0, 29], got -1",
                 id="layer-negative"),
    pytest.param(dict(layers=(), layer_weights=()), ValueError, "layers: expected at least one layer index",
                 id="no-layers"),
    pytest.param(dict(layer_weights=(0.5, 0.5)), ValueError, "layer_weights: expected 3 values, got 2",
                 id="lw-length"),
    pytest.param(dict(layer_weights=(0.5, float("nan"), 0.1)), ValueError, "layer_weights[1]", id="lw-nan"),
    pytest.param(dict(entity_weights=torch.rand(4, device="meta")), ValueError,
                 "entity_weights: expected a tensor on cpu", id="device"),
]


@pytest.mark.parametrize("bad, exc, msg", BAD)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_inputs_raise_naming_the_argument(backend, bad, exc, msg):
    kwargs = {**_good(), **bad}
    with pytest.raises(exc) as info:
        streamkern.consensus_frame_scores(**kwargs, backend=backend)
    assert msg in str(info.value)


# ---- edge cases: one rule on every backend (issue 11 item 5; README "Error rules") ------------------------

def _small(device, H=2, D=4, L=6, S=3):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(2, 1, L, H, D, generator=g).to(device), torch.randn(2, 1, S, H, D, generator=g).to(device),
            torch.rand(S, generator=g).to(device))


EDGE_RAISES = [
    pytest.param("select_frame", dict(L=0), (0, 1), (0.5, 0.5), "chunk_k: expected at least one frame", id="F0"),
    pytest.param("scores", dict(D=0), (0, 1), (0.5, 0.5), "chunk_k: expected at least one head and a head dim",
                 id="D0"),
    pytest.param("scores", dict(H=0), (0, 1), (0.5, 0.5), "chunk_k: expected at least one head", id="H0"),
    pytest.param("scores", {}, (0, 1), (float("inf"), 0.5), "layer_weights\\[0\\]: expected a finite number",
                 id="weight-inf"),
    pytest.param("scores", {}, (0, 1), (0.5, -float("inf")), "layer_weights\\[1\\]: expected a finite number",
                 id="weight-minus-inf"),
]


@pytest.mark.parametrize("fn, shape, layers, lw, msg", EDGE_RAISES)
@pytest.mark.parametrize("bd", backend_params())
def test_edge_arguments_raise_on_every_backend(bd, fn, shape, layers, lw, msg):
    """Used to be an IndexError (F = 0), a ZeroDivisionError / NaN / 0 by backend (D = 0, H = 0), inf or NaN by
    backend (an infinite layer weight)."""
    op = streamkern.select_frame if fn == "select_frame" else streamkern.consensus_frame_scores
    chunk, text, w = _small(bd[1], **shape)
    with pytest.raises(ValueError, match=f"^{msg}"):
        op(chunk, text, w, 2, layers, lw, backend=bd[0])


@pytest.mark.parametrize("bd", backend_params())
def test_empty_but_meaningful_shapes_agree(bd):
    """No frame: ``[B, 0]`` scores; no text token (S = 0): q = 0, every score 0; no batch row: ``[0, F]``."""
    chunk, text, w = _small(bd[1])
    out = streamkern.consensus_frame_scores(chunk[:, :, :0], text, w, 2, (0, 1), (0.5, 0.5), backend=bd[0])
    assert out.shape == (1, 0)
    out = streamkern.consensus_frame_scores(chunk, text[:, :, :0], w[:0], 2, (0, 1), (0.5, 0.5), backend=bd[0])
    assert torch.equal(out.cpu(), torch.zeros(1, 3))
    out = streamkern.consensus_frame_scores(chunk[:, :0], text[:, :0], w, 2, (0, 1), (0.5, 0.5), backend=bd[0])
    assert out.shape == (0, 3)


NON_FINITE = [  # (tensor, index, value): IEEE over the expanded sum of products k·q, the same on every backend
    pytest.param("chunk_k", (1, 0, 3, 1, 2), float("inf"), id="chunk-inf"),
    pytest.param("chunk_k", (1, 0, 3, 1, 2), float("nan"), id="chunk-nan"),
    pytest.param("text_k", (0, 0, 1, 0, 0), float("inf"), id="text-inf"),  # q inf: per-token products meet ±inf
    pytest.param("entity_weights", (1,), float("inf"), id="weight-inf"),
]


@pytest.mark.parametrize("name, index, value", NON_FINITE)
@pytest.mark.parametrize("bd", backend_params())
def test_non_finite_values_propagate_alike(bd, name, index, value):
    """Triton used to add padding token lanes (key 0 times an infinite q: NaN) and the reference averaged keys
    before the dot, so the same input gave NaN, +inf or -inf by backend."""
    chunk, text, w = _small("cpu")
    args = dict(chunk_k=chunk, text_k=text, entity_weights=w)
    args[name][index] = value
    want = ref.consensus_frame_scores(*(args[n].double() for n in ("chunk_k", "text_k", "entity_weights")), 2,
                                      (0, 1), (0.5, 0.25))
    got = streamkern.consensus_frame_scores(*(args[n].to(bd[1]) for n in ("chunk_k", "text_k", "entity_weights")),
                                            2, (0, 1), (0.5, 0.25), backend=bd[0]).cpu()
    assert not torch.isfinite(want).all()
    for cls in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(cls(got), cls(want)), f"{cls.__name__}: got {got}, want {want}"
    finite = torch.isfinite(want)
    assert_parity(got[finite], want[finite], torch.float32)


def test_default_layers_need_30_blocks():
    """The default layers (0, 15, 29) on a 20-block model: ValueError naming layers[2]."""
    with pytest.raises(ValueError, match=r"layers\[2\]: expected an int in \[0, 19\], got 29"):
        streamkern.select_frame(**_good(NL=20))


def test_extension_op_rejects_direct_misuse():
    """The C++ entry point repeats the checks for direct calls (layer out of range, wrong out shape)."""
    pytest.importorskip("streamkern._C")
    g = _good(NL=3)
    out = torch.zeros(2, 2)
    args = (g["chunk_k"], g["text_k"], g["entity_weights"], 3)
    with pytest.raises(RuntimeError, match="layer 3 out of range"):
        torch.ops.streamkern_C.consensus_frame_scores_(out, *args, [3], [1.0])
    with pytest.raises(RuntimeError, match=r"out must be a contiguous float32 \[B, F\]"):
        torch.ops.streamkern_C.consensus_frame_scores_(torch.zeros(2, 3), *args, [0], [1.0])
    assert torch.equal(out, torch.zeros(2, 2))


# ---- torch.library integration and host syncs -------------------------------------------------------------


@pytest.mark.parametrize("bd", backend_params())
def test_opcheck(bd):
    chunk, text, w, fsl, layers, lw = _inputs(CASES[0].values[0], torch.float32, bd[1])
    torch.library.opcheck(torch.ops.streamkern.consensus_frame_scores.default,
                          (chunk, text, w, fsl, list(layers), list(lw), bd[0]))


def test_torch_compile_fullgraph_select_frame():
    backend = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"

    def pick(chunk, text, w):
        best, scores = streamkern.select_frame(chunk, text, w, 7, (0, 2, 3), (0.2, 0.3, 0.5), backend=backend)
        return best, scores * 2.0

    chunk, text, w, *_ = _inputs(CASES[0].values[0], torch.float32, "cpu")
    best, scores = torch.compile(pick, fullgraph=True, backend="aot_eager")(chunk, text, w)
    ref_scores = _reference64(chunk, text, w, 7, (0, 2, 3), (0.2, 0.3, 0.5))
    assert_parity(scores / 2.0, ref_scores, torch.float32)
    assert torch.equal(best, ref_scores.argmax(-1))


_SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist")


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_no_host_sync(bd, monkeypatch):
    args = _inputs(CASES[0].values[0], torch.bfloat16, bd[1])
    _run(bd, args)  # warm-up: compilation and one-time tables may read host values

    def boom(*_a, **_k):
        raise AssertionError("host sync on an accelerated path")

    with monkeypatch.context() as m:
        for name in _SYNCS:
            m.setattr(torch.Tensor, name, boom)
        best, scores = streamkern.select_frame(*args, backend=bd[0])
    assert_parity(scores, _reference64(*args), torch.bfloat16)
    assert best.shape == (1,)

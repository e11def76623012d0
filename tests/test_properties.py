"""Property-based suite over every public op (issue 11 item 7; the frame ops of docs/contract.md §4.5 have their own).

Each example draws shapes (0, 1 and primes), a dtype, input layouts (contiguous, strided, permuted, and expanded
where an input is only read; torch has no negative strides, so a flip is a copy and adds no layout) and, in about
one example in three, one invalid argument. Every example must either match the ``"torch"`` backend on the same
inputs (docs/contract.md §3 metric: relative error under 1e-5 for float32, 1e-2 for fp16/bf16; indices and booleans
exactly) or raise ``ValueError``/``TypeError`` whose message starts with the name of one of the op's arguments, as
the ``"torch"`` backend does, leaving every input, output and cache bit-identical. Inputs an op only reads are
bit-identical after a successful call too. Hypothesis runs derandomised with a fixed example count per backend
(the Triton interpreter sees a few tiny examples), no deadline and no example database.
"""
from __future__ import annotations

import re

import pytest
import torch
from conftest import backend_params
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import streamkern
from streamkern import scale_layout
from streamkern.testing import TOLERANCE, rel_error

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ["contiguous", "strided", "permuted", "expanded"]
# Written caches need each token's [H, D] contiguous ("outer": leading dims permuted); "strided"/"permuted" break
# that and "expanded" overlaps itself: all three must raise naming the cache.
CACHE_LAYOUTS = ["contiguous", "contiguous", "outer", "outer", "strided", "expanded"]
EXAMPLES = {"cpu": 40, "triton": 6}


def backends(exclude=()):
    """``(backend, examples)`` for the "cpu" and "triton" backends on CPU tensors (skipped where unavailable)."""
    out = []
    for p in backend_params(exclude=("torch", "cuda") + tuple(exclude)):
        backend, device = p.values[0]
        if device == "cpu":
            out.append(pytest.param(backend, EXAMPLES[backend], id=backend, marks=p.marks))
    return out


def prop(examples: int):
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


def property_test(*, exclude=(), scale: float = 1.0, debug_on_triton: bool = False):
    """``@property_test()`` on ``def test_x(data, backend, tiny)``: one test per backend of :func:`backends` that
    runs the body on that backend's derandomised Hypothesis examples (``scale`` times its count, at least 2), with
    ``data`` Hypothesis' draw object and ``tiny`` the Triton interpreter's small sizes; ``debug_on_triton`` sets
    ``STREAMKERN_DEBUG=1`` for the Triton backend (GPU backends check values in tensors only then)."""
    def wrap(body):
        @pytest.mark.parametrize("backend,examples", backends(exclude))
        def test(backend, examples, monkeypatch):
            if debug_on_triton and backend == "triton":
                monkeypatch.setenv("STREAMKERN_DEBUG", "1")
            tiny = backend == "triton"
            prop(max(2, int(examples * scale)))(given(st.data())(lambda data: body(data, backend, tiny)))()
        test.__name__, test.__qualname__, test.__doc__ = body.__name__, body.__qualname__, body.__doc__
        return test
    return wrap


def sizes(tiny: bool, low: int = 0):
    return st.sampled_from([s for s in ((0, 1, 2, 3) if tiny else (0, 1, 2, 3, 5, 7)) if s >= low])


def tensor(shape, dtype, layout: str, seed: int, *, positive=False, read_only=True) -> torch.Tensor:
    """A random tensor of ``shape`` in ``layout`` (``expanded`` only for inputs that are only read)."""
    g = torch.Generator().manual_seed(seed)
    shape = tuple(shape)
    if layout == "expanded" and read_only and len(shape) and shape[0] > 1:
        base = torch.randn((1,) + shape[1:], generator=g)
        t = base.abs() if positive else base
        return t.to(dtype).expand(shape)
    if layout == "strided" and len(shape):
        big = torch.randn(shape[:-1] + (2 * shape[-1] + 1,), generator=g)
        t = (big.abs() if positive else big).to(dtype)[..., 1::2]
    elif layout == "outer" and len(shape) > 3:
        lead = len(shape) - 2
        t = torch.randn(shape[:lead][::-1] + shape[lead:], generator=g).to(dtype)
        t = t.permute(*range(lead - 1, -1, -1), lead, lead + 1)
    elif layout == "permuted" and len(shape) > 1:
        t = torch.randn(shape[::-1], generator=g)
        t = (t.abs() if positive else t).to(dtype).permute(*range(len(shape) - 1, -1, -1))
    else:
        t = torch.randn(shape, generator=g)
        t = (t.abs() if positive else t).to(dtype)
    assert t.shape == shape
    return t


def other_float(dtype):
    return torch.float16 if dtype != torch.float16 else torch.float32


def tensors(a) -> dict:
    return {k: v for k, v in a.items() if isinstance(v, torch.Tensor)}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` in logical order (for bit-identity checks, NaN included)."""
    if t.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8)
    return t.detach().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def arg_name(exc: Exception) -> str:
    """The argument a message names: ``name: ...`` or ``name[i]: ...``."""
    return re.sub(r"\[\d+\]$", "", str(exc).split(":")[0].strip())


def leaves(result):
    if result is None:
        return []
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, (tuple, list)):
        return [t for r in result for t in leaves(r)]
    return [torch.tensor(result)]


def assert_matches(got, exp, dtype, what):
    g, e = leaves(got), leaves(exp)
    assert len(g) == len(e), what
    for i, (a, b) in enumerate(zip(g, e)):
        where = f"{what}: output {i}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{where}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        if a.is_floating_point():
            finite = torch.isfinite(b)
            assert torch.equal(torch.isfinite(a), finite), f"{where}: non-finite entries differ\n{a}\n{b}"
            assert torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()), f"{where}: infinities differ"
            err = rel_error(a[finite], b[finite]) if finite.any() else 0.0
            assert err < TOLERANCE[dtype], f"{where}: relative error {err:.2e} ({dtype})"
        else:
            assert torch.equal(a, b), f"{where}:\n{a}\n{b}"


def outcome(fn):
    try:
        return True, fn()
    except (ValueError, TypeError) as exc:
        return False, exc


def check_case(op, make, backend, names, dtype, *, bad=None, written=(), must_succeed=False, compare=None):
    """Run ``op(backend, **make())`` on ``backend`` and on ``"torch"`` (fresh inputs each) and check the property.

    ``bad``: ``(label, mutate)`` applied to both argument sets (an invalid argument: both must raise);
    ``written``: names of the arguments the op writes; ``must_succeed``: docs/contract.md says these inputs are valid."""
    exp_args, got_args = make(), make()
    if bad is not None:
        bad[1](exp_args)
        bad[1](got_args)
    before = {k: bits(v) for k, v in tensors(got_args).items()}
    e_ok, e = outcome(lambda: op("torch", **exp_args))
    g_ok, g = outcome(lambda: op(backend, **got_args))
    label = f"{backend} vs torch" + (f", invalid {bad[0]}" if bad else "")
    event("matched" if e_ok and g_ok else f"raised naming {arg_name(g) if not g_ok else '?'}")
    if bad is not None or not e_ok:
        assert bad is None or not e_ok, f"{label}: torch accepted it"
        assert not must_succeed, f"{label}: docs/contract.md allows these inputs, got {e!r}"
        assert not g_ok, f"{label}: {backend} accepted what torch rejected ({e!r})"
        assert arg_name(g) in names, f"{label}: message names no argument of {sorted(names)}: {g}"
        assert type(g) is type(e) and arg_name(g) == arg_name(e), f"{label}: {g!r} vs torch's {e!r}"
        unchanged = before
    else:
        assert g_ok, f"{label}: {backend} raised {g!r} where torch returned"
        (compare or assert_matches)(g, e, dtype, label)
        for name in written:
            assert_matches(got_args[name], exp_args[name], dtype, f"{label}: {name} after the write")
        unchanged = {k: v for k, v in before.items() if k not in written}
    for k, v in unchanged.items():
        assert torch.equal(bits(got_args[k]), v), f"{label}: {k} was modified"


def pick_bad(data, mutations):
    """None in about two examples of three, else one of ``mutations`` (``(label, mutate)`` pairs)."""
    return data.draw(st.sampled_from([None] * (2 * len(mutations)) + list(mutations)))


# --- consensus_frame_scores / select_frame ---------------------------------------------------------------------

def consensus_ops(backend, **a):
    scores = streamkern.consensus_frame_scores(**a, backend=backend)
    return scores, streamkern.select_frame(**a, backend=backend)


def best_frame_within_ties(got, exp, dtype, what):
    """Scores must match; the chosen frame may differ from torch's only on a tie within the tolerance."""
    assert_matches(got[0], exp[0], dtype, what)
    assert_matches(got[1][1], exp[1][1], dtype, what)
    best, ref_scores = got[1][0], exp[1][1].double()
    assert best.shape == exp[1][0].shape and best.dtype == torch.int64
    if best.numel():
        chosen = ref_scores.gather(1, best[:, None])[:, 0]
        top = ref_scores.amax(1)
        assert bool(((top - chosen).abs() <= 2 * TOLERANCE[dtype] * top.abs().clamp_min(1e-3)).all()), what


@property_test()
def test_consensus_frame_scores_properties(data, backend, tiny):
    NL = data.draw(st.integers(1, 3))
    B, F, H = data.draw(sizes(tiny)), data.draw(sizes(tiny)), data.draw(sizes(tiny, 1))
    fsl, S, D = data.draw(st.sampled_from([1, 2, 3])), data.draw(sizes(tiny, 1)), data.draw(sizes(tiny, 1))
    dtype = data.draw(st.sampled_from(FLOATS))
    layers = data.draw(st.lists(st.integers(0, NL - 1), min_size=1, max_size=3))
    lw = data.draw(st.lists(st.floats(0, 1, width=32), min_size=len(layers), max_size=len(layers)))
    w_rows = data.draw(st.booleans())
    lay = [data.draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    seed = data.draw(st.integers(0, 10_000))

    def make():
        return dict(chunk_k=tensor((NL, B, F * fsl, H, D), dtype, lay[0], seed),
                    text_k=tensor((NL, B, S, H, D), dtype, lay[1], seed + 1),
                    entity_weights=tensor((B, S) if w_rows else (S,), dtype, lay[2], seed + 2, positive=True),
                    frame_seq_len=fsl, layers=list(layers), layer_weights=list(lw))

    bad = pick_bad(data, [
        ("chunk_k rank", lambda a: a.update(chunk_k=a["chunk_k"].flatten(0, 1))),
        ("text_k dtype", lambda a: a.update(text_k=a["text_k"].to(other_float(dtype)))),
        ("frame_seq_len", lambda a: a.update(frame_seq_len=0)),
        ("layers", lambda a: a.update(layers=[NL])),
        ("layer_weights", lambda a: a.update(layer_weights=lw + [0.5])),
        ("entity_weights", lambda a: a.update(entity_weights=a["entity_weights"].long())),
    ])
    check_case(consensus_ops, make, backend,
               {"chunk_k", "text_k", "entity_weights", "frame_seq_len", "layers", "layer_weights"}, dtype,
               bad=bad, compare=best_frame_within_ties)


# --- ring_write / KVRing -----------------------------------------------------------------------------------------

def ring_op(backend, **a):
    streamkern.ring_write(a["cache_k"], a["cache_v"], a["k_new"], a["v_new"], a["start"], sink=a["sink"],
                          backend=backend)


@property_test()
def test_ring_write_properties(data, backend, tiny):
    NL, B, H, D = (data.draw(sizes(tiny, 1)) for _ in range(4))
    sink, window = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 7))
    T = data.draw(st.integers(0, window))
    start = data.draw(st.integers(0, sink + window - 1))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = [data.draw(st.sampled_from(CACHE_LAYOUTS))] + [data.draw(st.sampled_from(LAYOUTS)) for _ in range(2)]
    seed = data.draw(st.integers(0, 10_000))
    S = sink + window

    def make():
        cache = tensor((NL, B, S, H, D), dtype, lay[0], seed)
        return dict(cache_k=cache, cache_v=tensor((NL, B, S, H, D), dtype, "outer", seed + 3),
                    k_new=tensor((NL, B, T, H, D), dtype, lay[1], seed + 1),
                    v_new=tensor((NL, B, T, H, D), dtype, lay[2], seed + 2), start=start, sink=sink)

    bad = pick_bad(data, [
        ("k_new too long", lambda a: a.update(k_new=torch.zeros(NL, B, window + 1, H, D, dtype=dtype),
                                              v_new=torch.zeros(NL, B, window + 1, H, D, dtype=dtype))),
        ("start", lambda a: a.update(start=S)),
        ("sink", lambda a: a.update(sink=S)),
        ("v_new dtype", lambda a: a.update(v_new=a["v_new"].to(other_float(dtype)))),
        ("cache_v shape", lambda a: a.update(cache_v=a["cache_v"][:, :, :-1])),
        ("v_new aliases cache_v", lambda a: a.update(v_new=a["cache_v"][:, :, :T]) if T else a.update(start=-1)),
    ])
    check_case(ring_op, make, backend, {"cache_k", "cache_v", "k_new", "v_new", "start", "sink"}, dtype,
               bad=bad, written=("cache_k", "cache_v"))


def ring_stream(backend, NL, B, H, D, window, sink, dtype, lengths, seed):
    ring = streamkern.KVRing(NL, B, H, D, window, sink=sink, dtype=dtype, backend=backend)
    for i, T in enumerate(lengths):
        ring.append(tensor((NL, B, T, H, D), dtype, "strided", seed + i), tensor((NL, B, T, H, D), dtype, "permuted",
                                                                                  seed + 100 + i))
    return ring.k, ring.v, ring.positions, ring.length, ring.ordered()


@property_test()
def test_ring_properties(data, backend, tiny):
    """Any sequence of appends leaves the same storage, positions and logical order as the "torch" ring; an
    append of 0 or more than ``window`` tokens raises naming ``k_new`` and changes nothing."""
    NL, B, H, D = (data.draw(sizes(tiny, 1)) for _ in range(4))
    sink, window = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 5))
    lengths = data.draw(st.lists(st.integers(1, window), min_size=1, max_size=2 if tiny else 6))
    dtype = data.draw(st.sampled_from(FLOATS))
    seed = data.draw(st.integers(0, 10_000))
    got = ring_stream(backend, NL, B, H, D, window, sink, dtype, lengths, seed)
    exp = ring_stream("torch", NL, B, H, D, window, sink, dtype, lengths, seed)
    assert_matches(got, exp, dtype, f"KVRing {backend} after appends {lengths}")
    ring = streamkern.KVRing(NL, B, H, D, window, sink=sink, dtype=dtype, backend=backend)
    before = (bits(ring.k), bits(ring.positions))
    for T in (0, window + 1):
        with pytest.raises(ValueError, match="k_new"):
            ring.append(torch.zeros(NL, B, T, H, D, dtype=dtype), torch.zeros(NL, B, T, H, D, dtype=dtype))
    assert torch.equal(bits(ring.k), before[0]) and torch.equal(bits(ring.positions), before[1])
    assert ring.length == 0


# --- bank_evict_select / bank_insert -----------------------------------------------------------------------------

@property_test()
def test_bank_evict_select_properties(data, backend, tiny):
    M, E = data.draw(sizes(tiny, 1)), data.draw(sizes(tiny))
    dtype = data.draw(st.sampled_from(FLOATS))
    scores = data.draw(st.lists(st.sampled_from([-1.0, 0.0, 0.5, 2.0]), min_size=M, max_size=M))  # ties
    mask = data.draw(st.lists(st.booleans(), min_size=M * E, max_size=M * E))
    valid = data.draw(st.lists(st.booleans(), min_size=M, max_size=M))
    strided = data.draw(st.booleans())

    def make():
        s = torch.tensor(scores, dtype=dtype)
        m = torch.tensor(mask, dtype=torch.bool).reshape(M, E)
        if strided:
            s = torch.stack([s, s]).T[:, 0]
            m = m.T.contiguous().T
        return dict(scores=s, entity_mask=m, valid=torch.tensor(valid))

    bad = pick_bad(data, [
        ("scores empty", lambda a: a.update(scores=a["scores"][:0])),
        ("entity_mask rows", lambda a: a.update(entity_mask=torch.zeros(M + 1, E, dtype=torch.bool))),
        ("valid dtype", lambda a: a.update(valid=a["valid"].long())),
        ("scores dtype", lambda a: a.update(scores=a["scores"].long())),
    ])
    check_case(lambda b, **a: streamkern.bank_evict_select(**a, backend=b), make, backend,
               {"scores", "entity_mask", "valid"}, dtype, bad=bad)


def insert_op(backend, **a):
    streamkern.bank_insert(a["bank_k"], a["bank_v"], a["chunk_k"], a["chunk_v"], a["frame_idx"], a["slot"],
                           a["frame_seq_len"], backend=backend)


@property_test(debug_on_triton=True)
def test_bank_insert_properties(data, backend, tiny):
    NL, B, H, D = (data.draw(sizes(tiny, 1)) for _ in range(4))
    M, F, fsl = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 2, 3]))
    per_row = data.draw(st.booleans())
    n = B if per_row else 1
    fidx = data.draw(st.lists(st.integers(0, F - 1), min_size=n, max_size=n))
    slots = data.draw(st.lists(st.integers(0, M - 1), min_size=n, max_size=n))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = [data.draw(st.sampled_from(CACHE_LAYOUTS)), data.draw(st.sampled_from(LAYOUTS))]
    seed = data.draw(st.integers(0, 10_000))

    def make():
        bank = tensor((NL, B, M * fsl, H, D), dtype, lay[0], seed)
        index = (lambda v: torch.tensor(v)) if per_row else (lambda v: torch.tensor(v[0]))
        return dict(bank_k=bank, bank_v=tensor((NL, B, M * fsl, H, D), dtype, "outer", seed + 3), chunk_k=tensor((NL, B, F * fsl, H, D), dtype, lay[1],
                                                                         seed + 1),
                    chunk_v=tensor((NL, B, F * fsl, H, D), dtype, lay[1], seed + 2), frame_idx=index(fidx),
                    slot=index(slots), frame_seq_len=fsl)

    bad = pick_bad(data, [
        ("frame_idx range", lambda a: a.update(frame_idx=torch.tensor(F))),
        ("slot range", lambda a: a.update(slot=torch.tensor(-1))),
        ("slot dtype", lambda a: a.update(slot=a["slot"].int())),
        ("frame_seq_len", lambda a: a.update(frame_seq_len=fsl * M * F + 1)),
        ("chunk_v shape", lambda a: a.update(chunk_v=a["chunk_v"][..., :-1])),
        ("bank_v is bank_k", lambda a: a.update(bank_v=a["bank_k"])),
    ])
    check_case(insert_op, make, backend, {"bank_k", "bank_v", "chunk_k", "chunk_v", "frame_idx", "slot",
                                          "frame_seq_len"}, dtype, bad=bad, written=("bank_k", "bank_v"))


# --- pose_topk ---------------------------------------------------------------------------------------------------

@property_test()
def test_pose_topk_properties(data, backend, tiny):
    N, P = data.draw(sizes(tiny)), data.draw(st.integers(3, 7))
    k = data.draw(st.integers(0, N + 3))            # docs/contract.md: k may exceed N (padding idx -1, sim 0)
    valid = data.draw(st.lists(st.booleans(), min_size=N, max_size=N))
    scale = data.draw(st.sampled_from([0.5, 1.0, 10.0]))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = data.draw(st.sampled_from(LAYOUTS))
    seed = data.draw(st.integers(0, 10_000))

    def make():
        return dict(poses=tensor((N, P), dtype, lay, seed), valid=torch.tensor(valid, dtype=torch.bool),
                    current=tensor((P,), dtype, "strided", seed + 1), k=k, scale=scale)

    bad = pick_bad(data, [
        ("poses columns", lambda a: a.update(poses=a["poses"][:, :2])),
        ("k negative", lambda a: a.update(k=-1)),
        ("scale", lambda a: a.update(scale=0.0)),
        ("current dtype", lambda a: a.update(current=a["current"].to(other_float(dtype)))),
        ("valid shape", lambda a: a.update(valid=torch.ones(N + 1, dtype=torch.bool))),
    ])
    check_case(lambda b, **a: streamkern.pose_topk(**a, backend=b), make, backend,
               {"poses", "valid", "current", "k", "scale"}, dtype, bad=bad, must_succeed=bad is None)


# --- patch_importance / attention_weighted_drift / DriftGate -----------------------------------------------------

@property_test()
def test_patch_importance_properties(data, backend, tiny):
    NL, B, heads = data.draw(st.integers(1, 3)), data.draw(sizes(tiny)), data.draw(st.integers(1, 2))
    gh, gw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    S = gh * gw + data.draw(st.integers(0, 4))
    start = data.draw(st.integers(0, NL - 1))
    end = data.draw(st.integers(start + 1, NL))
    actions = data.draw(st.integers(1, S))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = data.draw(st.sampled_from(LAYOUTS))
    seed = data.draw(st.integers(0, 10_000))

    def make():
        return dict(attn=tensor((NL, B, heads, S, S), dtype, lay, seed, positive=True), layer_range=(start, end),
                    num_vision_tokens=gh * gw, action_tokens=actions, grid=(gh, gw))

    bad = pick_bad(data, [
        ("layer_range", lambda a: a.update(layer_range=(end, start))),
        ("grid", lambda a: a.update(grid=(gh + 1, gw))),
        ("action_tokens", lambda a: a.update(action_tokens=S + 1)),
        ("attn rank", lambda a: a.update(attn=a["attn"].flatten(0, 1))),
    ])
    check_case(lambda b, **a: streamkern.patch_importance(**a, backend=b), make, backend,
               {"attn", "layer_range", "num_vision_tokens", "action_tokens", "grid"}, dtype, bad=bad)


def image(shape, dtype, layout, seed):
    if dtype == torch.uint8:
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2) if layout == "permuted" else t
    return tensor(shape, dtype, layout, seed, positive=True)


@property_test()
def test_attention_weighted_drift_properties(data, backend, tiny):
    B, C = data.draw(sizes(tiny)), data.draw(st.integers(1, 3))
    pool = data.draw(st.sampled_from([1, 2, 3]))
    h, w = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    gh, gw = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 3))
    dilation = data.draw(st.sampled_from([1, 3, 5]))
    dtype = data.draw(st.sampled_from(FLOATS + [torch.uint8]))
    small_dtype = torch.float32 if dtype == torch.uint8 else dtype
    lay = [data.draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    seed = data.draw(st.integers(0, 10_000))

    def make():
        return dict(image=image((B, C, h * pool, w * pool), dtype, lay[0], seed),
                    prev_small=tensor((B, C, h, w), small_dtype, lay[1], seed + 1, positive=True),
                    prev_importance=tensor((B, gh, gw), torch.float32, lay[2], seed + 2, positive=True),
                    pool=pool, dilation=dilation)

    bad = pick_bad(data, [
        ("dilation even", lambda a: a.update(dilation=2)),
        ("pool", lambda a: a.update(pool=pool * (h * w + 1) + 1)),
        ("prev_small shape", lambda a: a.update(prev_small=a["prev_small"][:, :, :, :0])),
        ("image rank", lambda a: a.update(image=a["image"].flatten(0, 1))),
    ])
    check_case(lambda b, **a: streamkern.attention_weighted_drift(**a, backend=b), make, backend,
               {"image", "prev_small", "prev_importance", "pool", "dilation"},
               torch.float32 if dtype == torch.uint8 else dtype, bad=bad)


def gate_episode(backend, frames, states, attns, config):
    gate = streamkern.DriftGate(**config, backend=backend)
    out = []
    for img, state, attn in zip(frames, states, attns):
        out.append(gate.should_recompute(img, state))
        gate.update(img, attn, state, None)
    return out


@property_test(scale=0.5)
def test_drift_gate_properties(data, backend, tiny):
    """Episodes of a few frames give the "torch" gate's decisions, reasons and drifts; a frame of another shape
    or a state of another dtype mid-episode raises naming ``image``/``state`` and leaves the gate as it was."""
    B, C, pool = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3)), data.draw(st.sampled_from([1, 2]))
    gh, gw = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    S, heads, NL = gh * gw + 2, 1, 2
    steps = data.draw(st.integers(1, 2 if tiny else 4))
    dtype = data.draw(st.sampled_from(FLOATS + [torch.uint8]))
    state_dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    thresholds = data.draw(st.sampled_from([(0.0, 0.0), (0.05, 0.5), (10.0, 10.0)]))
    seed = data.draw(st.integers(0, 10_000))
    config = dict(drift_threshold=thresholds[1], state_threshold=thresholds[0], dilation=3, pool=pool,
                  layer_range=(0, NL), num_vision_tokens=gh * gw, action_tokens=1, grid=(gh, gw))
    frames = [image((B, C, 2 * pool, 3 * pool), dtype, "permuted", seed + i) for i in range(steps)]
    states = [0.1 * tensor((2, 3), state_dtype, "strided", seed + 50 + i) for i in range(steps)]
    attns = [tensor((NL, B, heads, S, S), torch.float32, "contiguous", seed + 90 + i, positive=True)
             for i in range(steps)]
    got = gate_episode(backend, frames, states, attns, config)
    exp = gate_episode("torch", frames, states, attns, config)
    assert_matches(got, exp, torch.float32 if dtype == torch.uint8 else dtype, f"DriftGate {backend}")
    gate = streamkern.DriftGate(**config, backend=backend)
    gate.should_recompute(frames[0], states[0])
    gate.update(frames[0], attns[0], states[0], None)
    kept = (bits(gate.prev_small), bits(gate.prev_state))
    for img, state, name in ((frames[0][:, :, :pool], states[0], "image"),
                             (frames[0], states[0].to(torch.float16), "state")):
        with pytest.raises((ValueError, TypeError), match=f"^{name}"):
            gate.should_recompute(img, state)
    assert torch.equal(bits(gate.prev_small), kept[0]) and torch.equal(bits(gate.prev_state), kept[1])


# --- scale_allow / block_masked_attention ------------------------------------------------------------------------

@prop(40)
@given(st.integers(-1, 9), st.sampled_from(["var", "strict", "full", "diagonal", "causal", 3]))
def test_scale_allow_properties(num_scales, preset):
    ok, allow = outcome(lambda: streamkern.scale_allow(num_scales, preset))
    if num_scales < 1 or preset not in ("var", "strict", "full", "diagonal"):
        assert not ok and arg_name(allow) in {"num_scales", "preset"}, allow
        return
    i, j = torch.arange(num_scales)[:, None], torch.arange(num_scales)[None, :]
    want = {"var": j <= i, "strict": j < i, "full": torch.ones_like(i == j), "diagonal": i == j}[preset]
    assert ok and allow.dtype == torch.bool and torch.equal(allow, want)


@property_test(debug_on_triton=True)
def test_block_masked_attention_properties(data, backend, tiny):
    B, H = data.draw(sizes(tiny)), data.draw(sizes(tiny, 1))
    Lq, Lk, D = data.draw(sizes(tiny)), data.draw(sizes(tiny)), data.draw(sizes(tiny, 1))
    NS = data.draw(st.integers(1, 4))
    q_ids = data.draw(st.lists(st.integers(0, NS - 1), min_size=Lq, max_size=Lq))
    k_ids = data.draw(st.lists(st.integers(0, NS - 1), min_size=Lk, max_size=Lk))
    allow = data.draw(st.lists(st.booleans(), min_size=NS * NS, max_size=NS * NS))
    self_attend = data.draw(st.booleans()) and Lq == Lk
    sm_scale = data.draw(st.sampled_from([None, 1.0, 0.3]))
    id_dtype = data.draw(st.sampled_from([torch.int64, torch.int32]))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = [data.draw(st.sampled_from(LAYOUTS)) for _ in range(3)]
    seed = data.draw(st.integers(0, 10_000))

    def make():
        return dict(q=tensor((B, H, Lq, D), dtype, lay[0], seed), k=tensor((B, H, Lk, D), dtype, lay[1], seed + 1),
                    v=tensor((B, H, Lk, D), dtype, lay[2], seed + 2), q_scale=torch.tensor(q_ids, dtype=id_dtype),
                    k_scale=torch.tensor(k_ids, dtype=id_dtype),
                    allow=torch.tensor(allow, dtype=torch.bool).reshape(NS, NS), self_attend=self_attend,
                    sm_scale=sm_scale)

    bad = pick_bad(data, [
        ("scale id range", lambda a: a.update(q_scale=torch.full((Lq,), NS, dtype=id_dtype)) if Lq
         else a.update(k_scale=torch.full((Lk,), -1, dtype=id_dtype)) if Lk else a.update(allow=a["allow"][0])),
        ("allow shape", lambda a: a.update(allow=a["allow"][:, :0])),
        ("self_attend lengths", lambda a: a.update(self_attend=True, k=a["k"][:, :, :0], v=a["v"][:, :, :0],
                                                   k_scale=a["k_scale"][:0]) if Lq else a.update(sm_scale=-1.0)),
        ("sm_scale", lambda a: a.update(sm_scale=0.0)),
        ("v dtype", lambda a: a.update(v=a["v"].to(other_float(dtype)))),
    ])
    check_case(lambda b, **a: streamkern.block_masked_attention(**a, backend=b), make, backend,
               {"q", "k", "v", "q_scale", "k_scale", "allow", "self_attend", "sm_scale"}, dtype, bad=bad)


# --- verify_scales -----------------------------------------------------------------------------------------------

def verify_op(backend, **a):
    a = dict(a)
    logits, draft, layout = a.pop("target_logits"), a.pop("draft_tokens"), a.pop("layout")
    return streamkern.verify_scales(logits, draft, layout, a.pop("first_scale"), a.pop("num_scales"), **a,
                                    backend=backend)


@property_test(debug_on_triton=True)
def test_verify_scales_properties(data, backend, tiny):
    pns = data.draw(st.lists(st.integers(1, 2 if tiny else 3), min_size=1, max_size=3))
    layout = scale_layout(pns)
    first = data.draw(st.integers(0, len(pns) - 1))
    num = data.draw(st.integers(1, len(pns) - first))
    T = layout.end[first + num - 1] - layout.begin[first]
    B, V = data.draw(sizes(tiny)), data.draw(sizes(tiny, 1))
    sample = data.draw(st.booleans())
    cfg = data.draw(st.none() | st.lists(st.sampled_from([0.0, 0.5, 2.0]), min_size=num, max_size=num))
    threshold = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    dtype = data.draw(st.sampled_from(FLOATS))
    lay = [data.draw(st.sampled_from(LAYOUTS)) for _ in range(2)]
    seed = data.draw(st.integers(0, 10_000))

    def make():
        g = torch.Generator().manual_seed(seed)
        logits = tensor((2 * B if cfg else B, T, V), dtype, lay[0], seed)
        a = dict(target_logits=logits, draft_tokens=torch.randint(0, V, (B, T), generator=g), layout=layout,
                 first_scale=first, num_scales=num, threshold=threshold, cfg=cfg)
        if sample:
            q = torch.softmax(tensor((B, T, V), torch.float32, lay[1], seed + 1), -1)
            a.update(mode="sample", draft_probs=q.to(dtype) if dtype == torch.float32 else q,
                     uniforms=torch.rand(B, T, 2, generator=g))
        return a

    bad = pick_bad(data, [
        ("draft_tokens range", lambda a: a.update(draft_tokens=torch.full_like(a["draft_tokens"], V)) if B
         else a.update(first_scale=-1)),
        ("num_scales", lambda a: a.update(num_scales=len(pns) - first + 1)),
        ("cfg", lambda a: a.update(cfg=[-1.0] * num)),
        ("threshold", lambda a: a.update(threshold=float("nan"))),
        ("draft_tokens T", lambda a: a.update(draft_tokens=a["draft_tokens"][:, :0])),
        ("draft_probs", lambda a: a.update(mode="sample", draft_probs=-torch.ones(B, T, V),
                                           uniforms=torch.zeros(B, T, 2)) if B else a.update(mode="beam")),
    ])
    check_case(verify_op, make, backend,
               {"target_logits", "draft_tokens", "layout", "first_scale", "num_scales", "mode", "threshold",
                "draft_probs", "uniforms", "cfg", "temperature"}, dtype, bad=bad,
               must_succeed=bad is None)

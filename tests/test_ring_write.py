"""KVRing / ring_write: the random-append property test against the source pipelines' cat-and-slice caches,
parity of ring_write with the float64 torch reference, odd shapes and strides, bad inputs, opcheck, compile, syncs."""
import random

import pytest
import torch
from conftest import DTYPES, assert_raises_untouched, backend_params

import streamkern
from streamkern.ops.reference import ring_write as ref
from streamkern.testing import assert_parity

STEPS = {"torch": 10_000, "cpu": 10_000, "triton": 300, "cuda": 3_000}
CONFIGS = [(sink, window, dtype) for sink, window in ((0, 5), (1, 7), (7, 11)) for dtype in (torch.float32,
                                                                                         torch.bfloat16)]


def _attention64(q, k, v):
    """softmax(q·kᵀ/√D)·v over the token dim in float64; q [B, H, D], k/v [NL, B, N, H, D] -> [NL, B, H, D]."""
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("bhd,lbnhd->lbhn", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("lbhn,lbnhd->lbhd", s.softmax(-1), v)


def _ring_attention(q, ring):
    """Attention over the ring's valid slots, in physical slot order, float32."""
    valid = ring.positions >= 0
    k, v = ring.k[:, :, valid].float(), ring.v[:, :, valid].float()
    s = torch.einsum("bhd,lbnhd->lbhn", q.float(), k) * q.shape[-1] ** -0.5
    return torch.einsum("lbhn,lbnhd->lbhd", s.softmax(-1), v)


def _new_tokens(T, dtype, device, gen):
    """Random [NL=2, B=1, T, H=2, D=4] keys/values; every other draw a non-contiguous view."""
    if torch.randint(2, (1,), generator=gen).item():
        return torch.randn(2, 1, T, 4, 2, generator=gen).to(device, dtype).transpose(3, 4)
    return torch.randn(2, 1, T, 2, 4, generator=gen).to(device, dtype)


@pytest.mark.parametrize("bd", backend_params())
def test_random_appends_match_reference_caches(bd):
    """STEPS[backend] appends in all, spread over sinks 0/1/7, prime windows, fp32/bf16; each config wraps many
    times. After every append: the (position, k, v) of the valid slots equal the reference cache bit for bit,
    attention of random queries agrees (parity metric), and slots not written are bit-identical."""
    backend, device = bd
    gen = torch.Generator().manual_seed(3)
    rng = random.Random(3)
    rings = [(streamkern.KVRing(2, 1, 2, 4, window, sink, dtype, device, backend=backend),
              (ref.CatCache if i % 2 else ref.ShiftCache)(2, 1, 2, 4, window, sink, dtype, device))
             for i, (sink, window, dtype) in enumerate(CONFIGS)]
    for step in range(STEPS[backend]):
        ring, cache = rings[step % len(rings)]
        T = rng.randint(1, ring.window)
        k_new, v_new = _new_tokens(T, ring.k.dtype, device, gen), _new_tokens(T, ring.k.dtype, device, gen)
        before_k, before_v, before_pos = ring.k.clone(), ring.v.clone(), ring.positions.clone()
        ring.append(k_new, v_new)
        cache.append(k_new, v_new)
        ck, cv, cpos = cache.valid()
        valid = ring.positions >= 0
        order = ring.positions[valid].argsort()
        slots = valid.nonzero().squeeze(1)[order]
        assert ring.length == ck.shape[2] == slots.numel(), f"step {step}"
        assert torch.equal(ring.positions[slots], cpos), f"step {step}: positions"
        assert torch.equal(ring.k[:, :, slots], ck) and torch.equal(ring.v[:, :, slots], cv), f"step {step}"
        written = torch.zeros_like(valid)
        for slot, _, n in ref.ring_slices(ring.slot_of(ring.count - T), T, ring.size, ring.sink):
            written[slot:slot + n] = True
        kept = ~written
        assert torch.equal(ring.k[:, :, kept], before_k[:, :, kept]), f"step {step}: untouched k slots changed"
        assert torch.equal(ring.v[:, :, kept], before_v[:, :, kept]), f"step {step}: untouched v slots changed"
        assert torch.equal(ring.positions[kept], before_pos[kept])
        if step % 7 == 0:
            q = torch.randn(1, 2, 4, generator=gen).to(device)
            assert_parity(_ring_attention(q, ring), _attention64(q, ck, cv), ring.k.dtype, f"attention, step {step}")
    for ring, cache in rings:
        assert ring.count > 10 * ring.size  # every config wrapped many times
        ok, ov = ring.ordered()
        assert torch.equal(ok, cache.valid()[0]) and torch.equal(ov, cache.valid()[1])


def test_reference_caches_agree():
    gen = torch.Generator().manual_seed(0)
    shift = ref.ShiftCache(3, 2, 2, 3, 6, 2, torch.float32)
    cat = ref.CatCache(3, 2, 2, 3, 6, 2, torch.float32)
    for T in (1, 6, 3, 4, 2, 5, 6, 1, 1):
        k, v = torch.randn(3, 2, T, 2, 3, generator=gen), torch.randn(3, 2, T, 2, 3, generator=gen)
        shift.append(k, v)
        cat.append(k, v)
        for a, b in zip(shift.valid(), cat.valid()):
            assert torch.equal(a, b)


# ---- ring_write against the float64 reference -----------------------------------------------------------------

CASES = [  # NL, B, sink, window, H, D, T, start
    pytest.param((1, 1, 0, 1, 1, 1, 1, 0), id="all-ones"),
    pytest.param((3, 2, 2, 7, 3, 5, 4, 7), id="wrap-NL3-B2-H3-D5"),
    pytest.param((2, 3, 0, 13, 2, 7, 13, 5), id="T=window-wrap-D7"),
    pytest.param((2, 1, 5, 11, 1, 8, 3, 1), id="sink-phase-D8"),
    pytest.param((1, 2, 3, 5, 4, 16, 2, 3), id="start-at-sink-D16"),
    pytest.param((2, 1, 1, 3, 2, 4, 0, 2), id="empty-T0"),
]


def _case(case, dtype, device, how="contiguous"):
    NL, B, sink, window, H, D, T, start = case
    gen = torch.Generator().manual_seed(sum(case))
    S = sink + window
    if how == "strided-cache":  # storage [B, NL, S+2, H, D], viewed as [NL, B, S, H, D]
        base = torch.randn(B, NL, S + 2, H, D, generator=gen).to(device, dtype)
        cache_k = base.transpose(0, 1)[:, :, 1:S + 1]
        cache_v = torch.randn(B, NL, S + 2, H, D, generator=gen).to(device, dtype).transpose(0, 1)[:, :, 1:S + 1]
    else:
        cache_k = torch.randn(NL, B, S, H, D, generator=gen).to(device, dtype)
        cache_v = torch.randn(NL, B, S, H, D, generator=gen).to(device, dtype)
    if how == "contiguous":
        k_new = torch.randn(NL, B, T, H, D, generator=gen).to(device, dtype)
        v_new = torch.randn(NL, B, T, H, D, generator=gen).to(device, dtype)
    else:  # k_new permuted, v_new every other token of a longer tensor
        k_new = torch.randn(D, T, B, NL, H, generator=gen).to(device, dtype).permute(3, 2, 1, 4, 0)
        v_new = torch.randn(NL, B, 2 * T, H, D, generator=gen).to(device, dtype)[:, :, ::2]
    return cache_k, cache_v, k_new, v_new, start, sink


def _check_against_reference64(bd, cache_k, cache_v, k_new, v_new, start, sink):
    want_k, want_v = cache_k.double(), cache_v.double()
    ref.ring_write(want_k, want_v, k_new.double(), v_new.double(), start, sink)  # the "torch" backend in float64
    streamkern.ring_write(cache_k, cache_v, k_new, v_new, start, sink=sink, backend=bd[0])
    assert torch.equal(cache_k.double(), want_k) and torch.equal(cache_v.double(), want_v)
    assert_parity(cache_k, want_k, cache_k.dtype, "cache_k")
    assert_parity(cache_v, want_v, cache_v.dtype, "cache_v")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_ring_write_parity(bd, dtype, case):
    _check_against_reference64(bd, *_case(case, dtype, bd[1]))


@pytest.mark.parametrize("how", ["strided-new", "strided-cache"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", backend_params())
def test_ring_write_non_contiguous(bd, dtype, how):
    _check_against_reference64(bd, *_case(CASES[1].values[0], dtype, bd[1], how))


def test_ring_slots_follow_the_formula():
    ring = streamkern.KVRing(1, 1, 1, 1, window=4, sink=2, dtype=torch.float32, backend="torch")
    for T in (3, 2, 4):  # tokens 0..8
        ring.append(torch.zeros(1, 1, T, 1, 1), torch.zeros(1, 1, T, 1, 1))
    # slots 0, 1: sinks; token n >= 2 in slot 2 + (n - 2) % 4, the last writer wins -> 6, 7, 8, 5
    assert ring.positions.tolist() == [0, 1, 6, 7, 8, 5]
    assert ring.length == 6
    ring.reset()
    assert ring.length == 0 and ring.positions.tolist() == [-1] * 6
    assert ring.ordered()[0].shape == (1, 1, 0, 1, 1)


# ---- KVRing.over (existing storage), rewrite, seek -------------------------------------------------------------

OVER_STEPS = {"torch": 60, "cpu": 60, "triton": 16, "cuda": 60}


def _expected_ordered(stream, sink, window):
    """The ordered (k, v) a ring holds after a logical stream of ``[NL, B, 1, H, D]`` token pairs: sinks, then the
    newest ``window`` others."""
    kept = stream[:sink] + stream[max(sink, len(stream) - window):]
    return tuple(torch.cat([t[i] for t in kept], dim=2) for i in (0, 1))


@pytest.mark.parametrize("device_cursor", [False, True], ids=["host-cursor", "device-cursor"])
@pytest.mark.parametrize("bd", backend_params())
def test_ring_over_storage_appends_and_rewrites_in_place(bd, device_cursor):
    """``KVRing.over`` a strided view of a bigger buffer ([B, NL, S + 2, H, D] storage, one padding slot at each
    end): random appends and rewrites of the newest tokens (as a streamed block's denoising steps write its keys
    again) leave the ring holding the logical stream's sinks and newest window tokens bit for bit, ``positions``
    follow the count alone, every write lands in the buffer, and the padding slots are never touched."""
    backend, device = bd
    gen = torch.Generator().manual_seed(17)
    rng = random.Random(17)
    for sink, window in ((0, 5), (2, 4)):
        S = sink + window
        base_k = torch.randn(1, 2, S + 2, 2, 4, generator=gen).to(device)
        base_v = torch.randn(1, 2, S + 2, 2, 4, generator=gen).to(device)
        pads = [b[:, :, [0, S + 1]].clone() for b in (base_k, base_v)]
        ring = streamkern.KVRing.over(base_k.transpose(0, 1)[:, :, 1:S + 1], base_v.transpose(0, 1)[:, :, 1:S + 1],
                                      sink=sink, backend=backend, device_cursor=device_cursor)
        assert ring.k.data_ptr() == base_k[0, 0, 1].data_ptr() and ring.size == S and ring.count == 0
        stream = []   # the logical stream: (k, v) [2, 1, 1, 2, 4] per token
        for step in range(OVER_STEPS[backend]):
            T = rng.randint(1, window)
            kn, vn = _new_tokens(T, torch.float32, device, gen), _new_tokens(T, torch.float32, device, gen)
            tokens = [(kn[:, :, i:i + 1], vn[:, :, i:i + 1]) for i in range(T)]
            if stream and T <= len(stream) and rng.random() < 0.5:
                ring.rewrite(kn, vn)
                stream[len(stream) - T:] = tokens
            else:
                ring.append(kn, vn)
                stream += tokens
            assert ring.count == len(stream), f"step {step}"
            ok, ov = ring.ordered()
            want_k, want_v = _expected_ordered(stream, sink, window)
            assert torch.equal(ok, want_k) and torch.equal(ov, want_v), f"step {step}"
            assert torch.equal(ring.positions, ref.ring_positions(len(stream), S, sink, device)), f"step {step}"
            if device_cursor:
                assert int(ring.cursor) == len(stream)
        assert len(stream) > 2 * S   # wrapped
        assert torch.equal(base_k[:, :, [0, S + 1]], pads[0]) and torch.equal(base_v[:, :, [0, S + 1]], pads[1])


@pytest.mark.parametrize("device_cursor", [False, True], ids=["host-cursor", "device-cursor"])
def test_seek_takes_prefilled_storage_as_a_stream(device_cursor):
    """A ring over storage that another ring filled with n tokens, after ``seek(n)``, has the same positions,
    length and ordered tokens, and the same appends and rewrites then leave both identical."""
    gen = torch.Generator().manual_seed(23)
    for sink, window, n in ((0, 4, 3), (2, 5, 19), (3, 3, 3)):
        filled = streamkern.KVRing(2, 1, 2, 4, window, sink, torch.float32, backend="torch")
        for T in [window] * (n // window) + [n % window] * bool(n % window):
            filled.append(_new_tokens(T, torch.float32, "cpu", gen), _new_tokens(T, torch.float32, "cpu", gen))
        ring = streamkern.KVRing.over(filled.k.clone(), filled.v.clone(), sink=sink, backend="torch",
                                      device_cursor=device_cursor)
        ring.seek(n)
        assert ring.count == filled.count == n and ring.length == filled.length
        assert torch.equal(ring.positions, filled.positions)
        assert all(torch.equal(a, b) for a, b in zip(ring.ordered(), filled.ordered()))
        if device_cursor:
            assert int(ring.cursor) == n
        for T, again in ((2, False), (2, True), (1, False), (1, True)):
            kn, vn = _new_tokens(T, torch.float32, "cpu", gen), _new_tokens(T, torch.float32, "cpu", gen)
            for r in (ring, filled):
                (r.rewrite if again else r.append)(kn, vn)
            assert torch.equal(ring.k, filled.k) and torch.equal(ring.v, filled.v), (sink, window, n, T, again)
            assert torch.equal(ring.positions, filled.positions)


def _storage():
    return torch.zeros(2, 1, 6, 2, 4), torch.zeros(2, 1, 6, 2, 4)


BAD_OVER = [
    pytest.param(lambda k, v: (k[0], v), {}, ValueError, "^k: expected a 5-d", id="rank"),
    pytest.param(lambda k, v: (k, v[:, :, :5]), {}, ValueError, "^v: expected shape", id="shape"),
    pytest.param(lambda k, v: (k, v.double()), {}, TypeError, "^v: expected dtype", id="dtype-float64"),
    pytest.param(lambda k, v: (k, v.half()), {}, TypeError, "^v: .*dtype", id="dtype-mismatch"),
    pytest.param(lambda k, v: (k.int(), v.int()), {}, TypeError, "^k: expected dtype", id="dtype-int"),
    pytest.param(lambda k, v: (k.transpose(3, 4).contiguous().transpose(3, 4), v), {}, ValueError,
                 "^k: expected the last two dims", id="rows-strided"),
    pytest.param(lambda k, v: (k[:1].expand(2, 1, 6, 2, 4), v), {}, ValueError, "^k: ", id="expanded"),
    pytest.param(lambda k, v: (k, k), {}, ValueError, "^v: .*share memory with k", id="v-is-k"),
    pytest.param(lambda k, v: (k, v), {"sink": 6}, ValueError, "^sink: expected an int in \\[0, 5\\]", id="sink"),
    pytest.param(lambda k, v: (k.numpy(), v), {}, TypeError, "^k: expected a torch.Tensor", id="numpy"),
]


@pytest.mark.parametrize("bad, kwargs, exc, msg", BAD_OVER)
def test_kvring_over_rejects_bad_storage(bad, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        streamkern.KVRing.over(*bad(*_storage()), **kwargs)


def test_rewrite_and_seek_reject_bad_arguments_and_write_nothing():
    ring = streamkern.KVRing.over(*_storage(), sink=1, backend="torch")
    with pytest.raises(ValueError, match="k_new: expected 1 <= T <= min\\(count=0, window=5\\)"):
        ring.rewrite(torch.ones(2, 1, 1, 2, 4), torch.ones(2, 1, 1, 2, 4))   # nothing appended yet
    ring.append(torch.ones(2, 1, 3, 2, 4), torch.ones(2, 1, 3, 2, 4))
    k, v = ring.k.clone(), ring.v.clone()
    for T in (0, 4):
        with pytest.raises(ValueError, match=f"k_new: expected 1 <= T <= min\\(count=3, window=5\\) .* got {T}"):
            ring.rewrite(torch.full((2, 1, T, 2, 4), 2.0), torch.full((2, 1, T, 2, 4), 2.0))
    with pytest.raises(ValueError, match="^v_new: expected shape"):
        ring.rewrite(torch.ones(2, 1, 2, 2, 4), torch.ones(2, 1, 1, 2, 4))
    for bad, exc in ((-1, ValueError), (2.0, TypeError)):
        with pytest.raises(exc, match="^count: expected an int"):
            ring.seek(bad)
    assert ring.count == 3 and torch.equal(ring.k, k) and torch.equal(ring.v, v)


# ---- bad inputs ---------------------------------------------------------------------------------------------

def _good():
    return (torch.zeros(2, 1, 6, 2, 4), torch.zeros(2, 1, 6, 2, 4), torch.ones(2, 1, 3, 2, 4),
            torch.ones(2, 1, 3, 2, 4), 1)


BAD = [
    pytest.param(lambda a: (a[0][0],) + a[1:], {}, ValueError, "cache_k: expected a 5-d", id="cache-rank"),
    pytest.param(lambda a: a[:2] + (a[2].half(),) + a[3:], {}, TypeError, "k_new: expected dtype", id="dtype"),
    pytest.param(lambda a: a[:3] + (a[3][:, :, :2],) + a[4:], {}, ValueError, "v_new: expected shape", id="v-shape"),
    pytest.param(lambda a: (a[0][:, :, :5],) + a[1:], {}, ValueError, "cache_v: expected shape", id="cache-shape"),
    pytest.param(lambda a: a[:2] + (a[2][:, :, :, :1],) + a[3:], {}, ValueError, "k_new: expected shape",
                 id="heads"),
    pytest.param(lambda a: a[:4] + (6,), {}, ValueError, "start: expected an int in \\[0, 5\\]", id="start-high"),
    pytest.param(lambda a: a[:4] + (-1,), {}, ValueError, "start", id="start-negative"),
    pytest.param(lambda a: a[:4] + (1.0,), {}, TypeError, "start: expected an int", id="start-float"),
    pytest.param(lambda a: a, {"sink": 6}, ValueError, "sink: expected an int in \\[0, 5\\]", id="sink"),
    pytest.param(lambda a: a, {"sink": 4}, ValueError, "k_new: expected at most window=2", id="T>window"),
    pytest.param(lambda a: (torch.zeros(2, 1, 6, 4, 2).transpose(3, 4),) + a[1:], {}, ValueError,
                 "cache_k: expected the last two dims", id="cache-rows-strided"),
    pytest.param(lambda a: (a[0].numpy(),) + a[1:], {}, TypeError, "cache_k: expected a torch.Tensor", id="numpy"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("bad, kwargs, exc, msg", BAD)
def test_bad_inputs_raise_before_writing(backend, bad, kwargs, exc, msg):
    args = bad(_good())
    snapshot = [a.clone() for a in args[:2] if isinstance(a, torch.Tensor)]
    with pytest.raises(exc, match=msg):
        streamkern.ring_write(*args, backend=backend, **kwargs)
    for a, s in zip([a for a in args[:2] if isinstance(a, torch.Tensor)], snapshot):
        assert torch.equal(a, s)


# Issue 11 item 2: an output that overlaps itself or an input used to be written silently (cpu, triton) or give a
# backend-dependent cache. Every backend now raises, naming the argument, before writing.
def _overlapping(which, device):
    ck, cv, kn, vn, start = (a.to(device) if isinstance(a, torch.Tensor) else a for a in _good())
    if which == "k_new":
        kn = ck[:, :, 0:3]                                   # the case, with start=1
    elif which == "v_new":
        vn = cv.view(-1)[5:5 + vn.numel()].view(vn.shape)    # partial overlap, unaligned
    elif which == "cache_k":
        ck = ck[:1].expand(2, 1, 6, 2, 4)                    # one layer's storage expanded over NL (stride 0)
    elif which == "cache_v":
        cv = ck                                              # k and v caches in the same memory
    elif which == "start":
        ck.view(torch.int64)[0, 0, 0, 0, 0] = 1              # the int64 1 in the cache's first bytes
        start = ck.view(torch.int64)[0, 0, 0, 0, 0]          # a device start read from the cache's own bytes
    return ck, cv, kn, vn, start


@pytest.mark.parametrize("which", ["k_new", "v_new", "cache_k", "cache_v", "start"])
@pytest.mark.parametrize("bd", backend_params())
def test_overlapping_arguments_raise_before_writing(bd, which):
    args = _overlapping(which, bd[1])
    assert_raises_untouched(lambda *a: streamkern.ring_write(*a, backend=bd[0]), args, ValueError, f"^{which}: ")


@pytest.mark.parametrize("bd", backend_params())
def test_append_rejects_new_tokens_that_alias_the_ring(bd):
    ring = streamkern.KVRing(2, 1, 2, 4, window=5, sink=1, dtype=torch.float32, device=bd[1], backend=bd[0])
    ring.append(torch.randn(2, 1, 4, 2, 4, device=bd[1]), torch.randn(2, 1, 4, 2, 4, device=bd[1]))
    k, v, pos = ring.k.clone(), ring.v.clone(), ring.positions.clone()
    with pytest.raises(ValueError, match="^k_new: .*share memory with cache_k"):
        ring.append(ring.k[:, :, 0:3], torch.zeros(2, 1, 3, 2, 4, device=bd[1]))
    assert ring.count == 4 and torch.equal(ring.positions, pos)
    assert torch.equal(ring.k, k) and torch.equal(ring.v, v)


@pytest.mark.parametrize("bd", backend_params())
def test_interleaved_k_and_v_caches_are_not_overlap(bd):
    """k and v of each token side by side in one buffer share no element: accepted, and written correctly."""
    buf = torch.randn(3, 2, 9, 2, 3, 5).to(bd[1])
    _, _, k_new, v_new, start, sink = _case(CASES[1].values[0], torch.float32, bd[1])
    _check_against_reference64(bd, buf[:, :, :, 0], buf[:, :, :, 1], k_new, v_new, start, sink)


def test_kvring_rejects_bad_arguments():
    with pytest.raises(ValueError, match="window: expected an int in \\[1"):
        streamkern.KVRing(1, 1, 1, 1, window=0)
    with pytest.raises(TypeError, match="dtype"):
        streamkern.KVRing(1, 1, 1, 1, window=2, dtype=torch.int32)
    ring = streamkern.KVRing(1, 1, 1, 2, window=2, dtype=torch.float32)
    with pytest.raises(ValueError, match="k_new: expected 1 <= T <= window=2"):
        ring.append(torch.zeros(1, 1, 0, 1, 2), torch.zeros(1, 1, 0, 1, 2))
    with pytest.raises(ValueError, match="k_new: expected at most window=2"):
        ring.append(torch.zeros(1, 1, 3, 1, 2), torch.zeros(1, 1, 3, 1, 2))
    assert ring.count == 0 and ring.positions.tolist() == [-1, -1]


def test_extension_op_rejects_direct_misuse():
    if "cpu" not in streamkern.available_backends("cpu"):
        pytest.skip("extension not built")
    a = _good()
    with pytest.raises(ValueError, match="start"):
        torch.ops.streamkern_C.ring_write_(a[0], a[1], a[2], a[3], 9, 0)
    assert not a[0].any()


# ---- torch.library integration and host syncs -----------------------------------------------------------------

@pytest.mark.parametrize("bd", backend_params())
def test_opcheck(bd):
    ck, cv, kn, vn, start, sink = _case(CASES[1].values[0], torch.float32, bd[1])
    torch.library.opcheck(torch.ops.streamkern.ring_write.default, (ck, cv, kn, vn, start, sink, bd[0]))
    start_t = torch.tensor(start, device=bd[1])
    torch.library.opcheck(torch.ops.streamkern.ring_write_at.default, (ck, cv, kn, vn, start_t, sink, bd[0]))


def test_torch_compile_fullgraph():
    backend = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"

    def step(ck, cv, kn, vn):
        streamkern.ring_write(ck, cv, kn * 2.0, vn, 7, sink=2, backend=backend)
        return ck.sum(2)

    args = _case(CASES[1].values[0], torch.float32, "cpu")[:4]
    want = [a.clone() for a in args]
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    ref.ring_write(want[0], want[1], want[2] * 2.0, want[3], 7, 2)
    assert torch.equal(args[0], want[0]) and torch.equal(args[1], want[1])
    assert_parity(out, want[0].double().sum(2), torch.float32)


_SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu")


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_append_never_syncs(bd, monkeypatch):
    ring = streamkern.KVRing(2, 1, 2, 4, window=5, sink=1, dtype=torch.bfloat16, device=bd[1], backend=bd[0])
    new = torch.randn(2, 1, 4, 2, 4, dtype=torch.bfloat16, device=bd[1])
    ring.append(new, new)  # warm-up: compilation may read host values

    def boom(*_a, **_k):
        raise AssertionError("host sync on an accelerated path")

    with monkeypatch.context() as m:
        for name in _SYNCS:
            m.setattr(torch.Tensor, name, boom)
        for _ in range(3):
            ring.append(new, new)
        k, _ = ring.ordered()
    assert ring.count == 16 and k.shape[2] == 6
    assert torch.equal(k[:, :, 1:], torch.cat([new[:, :, 3:], new], dim=2)[:, :, -5:])


# ---- device-side write cursor (CUDA graphs) and threads -----------------------------------------------------

@pytest.mark.parametrize("bd", backend_params())
def test_ring_write_device_start_equals_host_start(bd):
    """``start`` as an int64 [] device tensor writes exactly what the host int does, wrap included."""
    backend, device = bd
    gen = torch.Generator().manual_seed(5)
    for start, T in ((0, 3), (4, 5), (8, 1), (6, 4)):  # S = 9, sink = 2, window = 7: (4, 5) and (6, 4) wrap
        ck = torch.randn(2, 1, 9, 2, 4, generator=gen).to(device)
        cv, kn, vn = torch.randn_like(ck), _new_tokens(T, torch.float32, device, gen), _new_tokens(T, torch.float32,
                                                                                                   device, gen)
        want_k, want_v = ck.clone(), cv.clone()
        ref.ring_write(want_k, want_v, kn, vn, start, 2)
        streamkern.ring_write(ck, cv, kn, vn, torch.tensor(start, device=device), sink=2, backend=backend)
        assert torch.equal(ck, want_k) and torch.equal(cv, want_v), (start, T)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("start, exc, msg", [
    (torch.tensor(6), ValueError, "start: expected values in \\[0, 6\\)"),
    (torch.tensor(-1), ValueError, "start: expected values in"),
    (torch.tensor([1]), ValueError, "start: expected a 0-d"),
    (torch.tensor(1, dtype=torch.int32), TypeError, "start: expected dtype"),
], ids=["high", "negative", "1-d", "int32"])
def test_device_start_bad_values_raise_before_writing(backend, start, exc, msg):
    a = _good()
    with pytest.raises(exc, match=msg):
        streamkern.ring_write(*a[:4], start, backend=backend)
    assert not a[0].any() and not a[1].any()


def test_device_start_out_of_range_writes_nothing_unchecked():
    """GPU backends do not read the start back (no sync); out of range, their kernels write nothing. The CPU
    extension op and the Triton kernel (interpreter) called directly show it."""
    a = _good()
    if "cpu" in streamkern.available_backends("cpu"):
        torch.ops.streamkern_C.ring_write_at_(a[0], a[1], a[2], a[3], torch.tensor(6), 0)
        assert not a[0].any() and not a[1].any()
    if "triton" in streamkern.available_backends("cpu"):
        from streamkern.kernels.ring_write import ring_write as launch
        launch(a[0], a[1], a[2], a[3], torch.tensor(-1), 0)
        assert not a[0].any() and not a[1].any()


DEVICE_CURSOR_STEPS = {"torch": 60, "cpu": 60, "triton": 12, "cuda": 60}


@pytest.mark.parametrize("bd", backend_params())
def test_device_cursor_ring_follows_the_device_count(bd):
    """``KVRing(device_cursor=True)`` equals the host-cursor ring after every append, including when the host's
    count is frozen before each append, as in CUDA-graph replays (the host code of a captured append does not run
    again): the slots come from ``.cursor`` alone, and ``.positions`` follows it."""
    backend, device = bd
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    for sink, window in ((0, 5), (3, 4)):
        host = streamkern.KVRing(2, 1, 2, 4, window, sink, torch.float32, device, backend=backend)
        dev = streamkern.KVRing(2, 1, 2, 4, window, sink, torch.float32, device, backend=backend,
                                device_cursor=True)
        for step in range(DEVICE_CURSOR_STEPS[backend]):
            T = rng.randint(1, window)
            kn, vn = _new_tokens(T, torch.float32, device, gen), _new_tokens(T, torch.float32, device, gen)
            host.append(kn, vn)
            if step % 2:
                dev.count = 0  # a replay: the host never learns of it
            dev.append(kn, vn)
            assert torch.equal(dev.k, host.k) and torch.equal(dev.v, host.v), f"step {step}"
            assert torch.equal(dev.positions, host.positions), f"step {step}"
            assert int(dev.cursor) == host.count
        assert dev.sync_count() == host.count and dev.length == host.length
        assert torch.equal(dev.ordered()[0], host.ordered()[0])
        dev.reset()
        assert int(dev.cursor) == 0 and dev.positions.tolist() == [-1] * dev.size


def test_sync_count_needs_a_device_cursor():
    with pytest.raises(ValueError, match="device_cursor=True"):
        streamkern.KVRing(1, 1, 1, 1, window=2, dtype=torch.float32).sync_count()


def test_positions_follow_the_formula_for_every_count():
    """``ring_positions(count)`` (host int or device tensor) equals the positions that the appends leave."""
    for sink, window in ((0, 1), (0, 4), (2, 3), (5, 2)):
        ring = streamkern.KVRing(1, 1, 1, 1, window, sink, torch.float32, backend="torch")
        slots = [-1] * ring.size
        for n in range(3 * ring.size + 1):
            assert ring.positions.tolist() == slots, (sink, window, n)
            assert ref.ring_positions(torch.tensor(n), ring.size, sink, "cpu").tolist() == slots
            ring.append(torch.zeros(1, 1, 1, 1, 1), torch.zeros(1, 1, 1, 1, 1))
            slots[ring.slot_of(n)] = n


@pytest.mark.parametrize("device_cursor", [False, True], ids=["host-cursor", "device-cursor"])
@pytest.mark.parametrize("bd", backend_params())
def test_appends_from_several_threads(bd, device_cursor):
    """Four threads append 8 tokens each, one at a time, to one ring: all 32 land, in distinct slots, and each
    thread's tokens keep their order (appends are serialised by the ring's lock)."""
    import threading

    backend, device = bd
    ring = streamkern.KVRing(1, 1, 1, 2, window=32, dtype=torch.float32, device=device, backend=backend,
                             device_cursor=device_cursor)
    barrier = threading.Barrier(4)
    errors = []

    def worker(w):
        try:
            barrier.wait()
            for i in range(8):
                tok = torch.tensor([w, i], dtype=torch.float32, device=device).view(1, 1, 1, 1, 2)
                ring.append(tok, tok + 100)
        except Exception as exc:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert ring.count == 32 and sorted(ring.positions.tolist()) == list(range(32))
    if device_cursor:
        assert int(ring.cursor) == 32
    k, v = ring.ordered()
    k = k.reshape(32, 2).cpu()
    assert torch.equal(v.reshape(32, 2).cpu(), k + 100)
    assert sorted(map(tuple, k.long().tolist())) == [(w, i) for w in range(4) for i in range(8)]
    for w in range(4):
        assert k[k[:, 0] == w, 1].tolist() == list(range(8)), f"thread {w}: its tokens out of order"

"""bank_insert: the target slot equals the chunk frame bit for bit and every other byte of the bank is unchanged
(vs the float64 torch reference and the seed's per-layer form), odd shapes, strides, broadcast indices, out-of-range
indices (raise on torch/cpu before writing; skipped rows on GPU backends), bad inputs, opcheck, compile, syncs."""
import pytest
import torch
from conftest import DTYPES, assert_raises_untouched, backend_params

import streamkern
from streamkern.ops.reference import bank_insert as ref
from streamkern.testing import assert_parity

CASES = [  # NL, B, M, F, fsl, H, D, broadcast
    pytest.param((1, 1, 1, 1, 1, 1, 1, False), id="all-ones"),
    pytest.param((3, 2, 3, 4, 5, 3, 5, False), id="NL3-B2-M3-F4-fsl5-D5"),
    pytest.param((2, 3, 6, 3, 7, 2, 8, True), id="broadcast-M6-F3-fsl7-D8"),
    pytest.param((2, 1, 2, 3, 13, 1, 16, False), id="fsl13-D16"),
    pytest.param((1, 0, 2, 2, 3, 2, 4, False), id="empty-B0"),
]


def _case(case, dtype, device, strided=False):
    NL, B, M, F, fsl, H, D, broadcast = case
    gen = torch.Generator().manual_seed(sum(case))
    bank_k = torch.randn(NL, B, M * fsl, H, D, generator=gen).to(device, dtype)
    bank_v = torch.randn(NL, B, M * fsl, H, D, generator=gen).to(device, dtype)
    if strided:  # chunk_k permuted storage, chunk_v every other token of a longer tensor
        chunk_k = torch.randn(D, B, F * fsl, NL, H, generator=gen).to(device, dtype).permute(3, 1, 2, 4, 0)
        chunk_v = torch.randn(NL, B, 2 * F * fsl, H, D, generator=gen).to(device, dtype)[:, :, ::2]
    else:
        chunk_k = torch.randn(NL, B, F * fsl, H, D, generator=gen).to(device, dtype)
        chunk_v = torch.randn(NL, B, F * fsl, H, D, generator=gen).to(device, dtype)
    shape = () if broadcast else (B,)
    frame_idx = torch.randint(F, shape, generator=gen).to(device)
    slot = torch.randint(M, shape, generator=gen).to(device)
    return bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl


def _check(bd, bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl):
    want_k, want_v = bank_k.double(), bank_v.double()
    ref.bank_insert(want_k, want_v, chunk_k.double(), chunk_v.double(), frame_idx, slot, fsl)  # float64 "torch"
    before_k = bank_k.clone()
    streamkern.bank_insert(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl, backend=bd[0])
    assert torch.equal(bank_k.double(), want_k) and torch.equal(bank_v.double(), want_v)
    assert_parity(bank_k, want_k, bank_k.dtype, "bank_k")
    B = bank_k.shape[1]
    for b in range(B):  # the target slot is the chunk frame bit for bit, every other token unchanged
        f, s = int(frame_idx.expand(B)[b]), int(slot.expand(B)[b])
        assert torch.equal(bank_k[:, b, s * fsl:(s + 1) * fsl], chunk_k[:, b, f * fsl:(f + 1) * fsl])
        assert torch.equal(bank_v[:, b, s * fsl:(s + 1) * fsl], chunk_v[:, b, f * fsl:(f + 1) * fsl])
        other = torch.ones(bank_k.shape[2], dtype=torch.bool)
        other[s * fsl:(s + 1) * fsl] = False
        assert torch.equal(bank_k[:, b, other.to(bank_k.device)], before_k[:, b, other.to(bank_k.device)])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_parity(bd, dtype, case):
    _check(bd, *_case(case, dtype, bd[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", backend_params())
def test_non_contiguous_chunk_and_bank(bd, dtype):
    bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl = _case(CASES[1].values[0], dtype, bd[1], strided=True)
    bank_k = torch.cat([bank_k, bank_k], dim=2)[:, :, 1:1 + bank_v.shape[2]]  # strided over tokens, rows contiguous
    _check(bd, bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl)


def test_matches_seed_per_layer_copy():
    bank_k, bank_v, chunk_k, chunk_v, _, _, fsl = _case((3, 1, 4, 3, 5, 2, 4, False), torch.float32, "cpu")
    frame_idx, slot = torch.tensor([2]), torch.tensor([1])
    kv_bank = [{"k": bank_k[l].clone(), "v": bank_v[l].clone()} for l in range(3)]
    ref.seed_bank_insert(kv_bank, [{"k": chunk_k[l], "v": chunk_v[l]} for l in range(3)], frame_idx, slot, fsl)
    streamkern.bank_insert(bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl, backend="torch")
    assert torch.equal(torch.stack([b["k"] for b in kv_bank]), bank_k)
    assert torch.equal(torch.stack([b["v"] for b in kv_bank]), bank_v)


# ---- out-of-range indices ---------------------------------------------------------------------------------------

OUT_OF_RANGE = [
    pytest.param(("frame_idx", [0, 4]), id="frame-high"),
    pytest.param(("frame_idx", [-1, 0]), id="frame-negative"),
    pytest.param(("slot", [3, 0]), id="slot-high"),
    pytest.param(("slot", [0, -2]), id="slot-negative"),
]


@pytest.mark.parametrize("bad", OUT_OF_RANGE)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_out_of_range_raises_before_writing_on_cpu(backend, bad):
    if backend not in streamkern.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    args = list(_case(CASES[1].values[0], torch.float32, "cpu"))
    name, values = bad
    args[4 if name == "frame_idx" else 5] = torch.tensor(values)
    before = args[0].clone(), args[1].clone()
    with pytest.raises(ValueError, match=f"{name}: expected values in"):
        streamkern.bank_insert(*args, backend=backend)
    assert torch.equal(args[0], before[0]) and torch.equal(args[1], before[1])


@pytest.mark.parametrize("bad", OUT_OF_RANGE)
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu")))
def test_gpu_backends_skip_out_of_range_rows(bd, bad, monkeypatch):
    """Without STREAMKERN_DEBUG the batch row with a bad index is left untouched, the other row is written;
    with STREAMKERN_DEBUG=1 the call raises before writing."""
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    args = list(_case(CASES[1].values[0], torch.float32, bd[1]))
    name, values = bad
    args[4 if name == "frame_idx" else 5] = torch.tensor(values, device=bd[1])
    bad_row = 0 if (values[0] < 0 or values[0] >= 3) else 1
    want_k, want_v = args[0].clone(), args[1].clone()
    good = [a[bad_row ^ 1:(bad_row ^ 1) + 1] if i in (4, 5) else a for i, a in enumerate(args)]
    streamkern.bank_insert(want_k[:, bad_row ^ 1:(bad_row ^ 1) + 1], want_v[:, bad_row ^ 1:(bad_row ^ 1) + 1],
                           good[2][:, bad_row ^ 1:(bad_row ^ 1) + 1], good[3][:, bad_row ^ 1:(bad_row ^ 1) + 1],
                           good[4], good[5], good[6], backend="torch")
    streamkern.bank_insert(*args, backend=bd[0])
    assert torch.equal(args[0], want_k) and torch.equal(args[1], want_v)
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    snapshot = args[0].clone()
    args[0].copy_(torch.zeros_like(snapshot))
    with pytest.raises(ValueError, match=f"{name}: expected values in"):
        streamkern.bank_insert(*args, backend=bd[0])
    assert not args[0].any()


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _good():
    return [torch.zeros(2, 2, 6, 2, 4), torch.zeros(2, 2, 6, 2, 4), torch.ones(2, 2, 9, 2, 4),
            torch.ones(2, 2, 9, 2, 4), torch.tensor([0, 1]), torch.tensor(1), 3]


def _with(i, value):
    def make():
        a = _good()
        a[i] = value(a[i]) if callable(value) else value
        return a
    return make


BAD = [
    pytest.param(_with(0, lambda t: t[0]), ValueError, "bank_k: expected a 5-d", id="bank-rank"),
    pytest.param(_with(2, lambda t: t.half()), TypeError, "chunk_k: expected dtype float32", id="chunk-dtype"),
    pytest.param(_with(3, lambda t: t[:, :, :6]), ValueError, "chunk_v: expected shape", id="chunk-v-shape"),
    pytest.param(_with(2, lambda t: t[:, :1]), ValueError, "chunk_k: expected shape", id="chunk-batch"),
    pytest.param(_with(1, lambda t: t[..., :2]), ValueError, "bank_v: expected shape", id="bank-v-shape"),
    pytest.param(_with(4, lambda t: t.int()), TypeError, "frame_idx: expected dtype int64", id="frame-int32"),
    pytest.param(_with(5, torch.tensor([0, 1, 2])), ValueError, "slot: expected shape \\[2\\]", id="slot-shape"),
    pytest.param(_with(5, torch.zeros(2, 1, dtype=torch.long)), ValueError, "slot: expected a 0 or 1-d",
                 id="slot-rank"),
    pytest.param(_with(6, 4), ValueError, "frame_seq_len: expected a divisor", id="fsl-not-divisor"),
    pytest.param(_with(6, 0), ValueError, "frame_seq_len: expected an int in \\[1", id="fsl-zero"),
    pytest.param(_with(6, 3.0), TypeError, "frame_seq_len: expected an int", id="fsl-float"),
    pytest.param(_with(0, torch.zeros(2, 2, 6, 4, 2).transpose(3, 4)), ValueError,
                 "bank_k: expected the last two dims", id="bank-rows-strided"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("make, exc, msg", BAD)
def test_bad_inputs_raise_before_writing(backend, make, exc, msg):
    args = make()
    banks = [a.clone() for a in args[:2]]
    with pytest.raises(exc, match=msg):
        streamkern.bank_insert(*args, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args[:2], banks))


def _overlapping(which, device):
    """Issue 11 item 2: arguments that overlap a bank bank_insert writes (or a bank that overlaps itself)."""
    bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl = (t.to(device) if isinstance(t, torch.Tensor) else t
                                                             for t in _good())
    chunk_k, chunk_v, frame_idx = chunk_k[:, :, :3], chunk_v[:, :, :3], torch.tensor(0, device=device)
    if which == "chunk_k":
        chunk_k = bank_k[:, :, 3:6]
    elif which == "chunk_v":
        chunk_v = bank_v[:, :, 2:5]
    elif which == "slot":
        slot = bank_k.view(torch.int64)[0, 0, 0, 0]           # int64 view of the bank's first bytes (zeros)
    elif which == "bank_k":
        bank_k = bank_k[:, :1].expand(2, 2, 6, 2, 4)
    elif which == "bank_v":
        bank_v = bank_k
    return bank_k, bank_v, chunk_k, chunk_v, frame_idx, slot, fsl


@pytest.mark.parametrize("which", ["chunk_k", "chunk_v", "slot", "bank_k", "bank_v"])
@pytest.mark.parametrize("bd", backend_params())
def test_overlapping_arguments_raise_before_writing(bd, which):
    args = _overlapping(which, bd[1])
    assert_raises_untouched(lambda *a: streamkern.bank_insert(*a, backend=bd[0]), args, ValueError, f"^{which}: ")


def test_extension_op_skips_rows_it_cannot_write():
    """The C++ op itself never writes out of bounds, even when called directly with a bad index."""
    if "cpu" not in streamkern.available_backends("cpu"):
        pytest.skip("extension not built")
    a = _good()
    torch.ops.streamkern_C.bank_insert_(a[0], a[1], a[2], a[3], torch.tensor([0, 7]), torch.tensor(1), 3)
    assert torch.equal(a[0][:, 0, 3:], torch.ones(2, 3, 2, 4)) and not a[0][:, 0, :3].any()
    assert not a[0][:, 1].any() and not a[1][:, 1].any()  # row 1's frame 7 is out of range: skipped
    torch.ops.streamkern_C.bank_insert_(a[0], a[1], a[2], a[3], torch.tensor([0, 1]), torch.tensor(2), 3)
    assert not a[0][:, 1].any() and not a[0][:, 0, :3].any()  # slot 2 of 2 is out of range: nothing written


# ---- torch.library integration and host syncs -----------------------------------------------------------------

@pytest.mark.parametrize("bd", backend_params())
def test_opcheck(bd):
    args = _case(CASES[1].values[0], torch.float32, bd[1])
    torch.library.opcheck(torch.ops.streamkern.bank_insert.default, (*args, bd[0]))


def test_torch_compile_fullgraph_select_then_insert():
    backend = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"
    bank_k, bank_v, chunk_k, chunk_v, _, slot, fsl = _case(CASES[1].values[0], torch.float32, "cpu")

    def step(bank_k, bank_v, chunk_k, chunk_v, slot):
        best = chunk_k[0].reshape(2, 4, fsl, -1).mean((2, 3)).argmax(-1)  # a device-side frame choice
        streamkern.bank_insert(bank_k, bank_v, chunk_k, chunk_v, best, slot, fsl, backend=backend)
        return best

    want_k, want_v = bank_k.clone(), bank_v.clone()
    best = torch.compile(step, fullgraph=True, backend="aot_eager")(bank_k, bank_v, chunk_k, chunk_v, slot)
    ref.bank_insert(want_k, want_v, chunk_k, chunk_v, best, slot, fsl)
    assert torch.equal(bank_k, want_k) and torch.equal(bank_v, want_v)


_SYNCS = ("item", "__bool__", "__int__", "__float__", "tolist", "cpu")


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu")))
def test_no_host_sync(bd, monkeypatch):
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    args = _case(CASES[2].values[0], torch.bfloat16, bd[1])
    streamkern.bank_insert(*args, backend=bd[0])  # warm-up

    def boom(*_a, **_k):
        raise AssertionError("host sync on an accelerated path")

    args2 = _case(CASES[1].values[0], torch.bfloat16, bd[1])
    want = [a.clone() for a in args2[:2]]
    ref.bank_insert(*want, *args2[2:])
    with monkeypatch.context() as m:
        for name in _SYNCS:
            m.setattr(torch.Tensor, name, boom)
        streamkern.bank_insert(*args2, backend=bd[0])
    assert torch.equal(args2[0], want[0]) and torch.equal(args2[1], want[1])

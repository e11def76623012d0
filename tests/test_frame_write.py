"""frame_write and FramePool (docs/contract.md §4.5): every backend against the float64 "torch" reference and a per-frame
loop; the written pages equal the new frames bit for bit, every other page is unchanged; odd sizes (frame_len 1 and
primes, one page), every dtype, [n] and [B, n] pages, non-contiguous inputs, bad ids (raise on torch/cpu, skipped
frames on GPU backends), bad inputs, empty writes, opcheck, compile, host syncs (launches per call: the op's case in
streamkern.bench.gpu_cases, tests/test_gpu.py and tests/test_gpu_readiness.py)."""
import importlib

import pytest
import torch
from conftest import DTYPES, backend_params

import streamkern
from streamkern.ops.reference import frame_write as ref
from streamkern.testing import assert_parity

fw = importlib.import_module("streamkern.ops.frame_write")   # the module (streamkern.frame_write is the op)
ALL = backend_params(ops=[fw.frame_write_op])
GPU = backend_params(exclude=("torch", "cpu"), ops=[fw.frame_write_op])

CASES = [  # NL, B, P, F, H, D, n, shared pages
    pytest.param((1, 1, 1, 1, 1, 1, 1, True), id="all-ones"),
    pytest.param((2, 2, 7, 5, 3, 4, 3, False), id="P7-F5-rows"),
    pytest.param((3, 3, 5, 13, 2, 8, 2, True), id="F13-shared"),
    pytest.param((1, 2, 4, 1, 2, 16, 4, False), id="F1-every-page"),
    pytest.param((2, 1, 6, 3, 1, 5, 0, True), id="n0"),
    pytest.param((1, 1, 2, 70, 1, 64, 1, True), id="F70-D64-tiles-per-frame"),
    # rows of 200 values: several column groups of the CUDA kernel, the last one partial, F not a multiple of its
    # token lanes
    pytest.param((2, 1, 3, 37, 5, 40, 2, False), id="F37-rows-of-200"),
]


def _case(case, dtype, device, seed=0):
    NL, B, P, F, H, D, n, shared = case
    gen = torch.Generator().manual_seed(seed + sum(case[:7]))
    pool_k, pool_v = (torch.randn(NL, B, P, F, H, D, generator=gen).to(device, dtype) for _ in range(2))
    k_mean = torch.randn(NL, B, P, H, D, generator=gen).to(device)
    k_new, v_new = (torch.randn(NL, B, n * F, H, D, generator=gen).to(device, dtype) for _ in range(2))
    pages = (torch.randperm(P, generator=gen)[:n] if shared else
             torch.stack([torch.randperm(P, generator=gen)[:n] for _ in range(B)])).to(device)
    return pool_k, pool_v, k_mean, k_new, v_new, pages


def _loop(pool_k, pool_v, k_mean, k_new, v_new, pages):
    """Frame by frame, row by row, in float64."""
    out = [t.double().clone() for t in (pool_k, pool_v, k_mean)]
    NL, B, P, F = pool_k.shape[:4]
    rows = pages.expand(B, pages.shape[-1])
    for b in range(B):
        for i, page in enumerate(rows[b].tolist()):
            out[0][:, b, page] = k_new[:, b, i * F:(i + 1) * F].double()
            out[1][:, b, page] = v_new[:, b, i * F:(i + 1) * F].double()
            out[2][:, b, page] = k_new[:, b, i * F:(i + 1) * F].double().mean(dim=1)
    return out


def _check(bd, pool_k, pool_v, k_mean, k_new, v_new, pages):
    want = _loop(pool_k, pool_v, k_mean, k_new, v_new, pages)
    streamkern.frame_write(pool_k, pool_v, k_mean, k_new, v_new, pages, backend=bd[0])
    assert torch.equal(pool_k.double(), want[0]) and torch.equal(pool_v.double(), want[1])
    assert_parity(k_mean, want[2], torch.float32, "k_mean")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_parity(bd, dtype, case):
    _check(bd, *_case(case, dtype, bd[1]))


def test_reference_in_float64_matches_loop():
    args = [t.double() if t.is_floating_point() else t for t in _case(CASES[1].values[0], torch.float32, "cpu")]
    want = _loop(*args)
    ref.frame_write(*args)
    assert all(torch.equal(a, w) for a, w in zip(args[:3], want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", ALL)
def test_non_contiguous(bd, dtype):
    pool_k, pool_v, k_mean, k_new, v_new, pages = _case(CASES[1].values[0], dtype, bd[1])
    NL, B, P, F, H, D = pool_k.shape
    big = torch.zeros(NL, B, P, F + 2, H, D + 3, dtype=dtype, device=bd[1])
    big[:, :, :, :F, :, :D] = pool_k
    pool_k = big[:, :, :, :F, :, :D]                                         # padded pages, sliced
    pool_v = pool_v.transpose(3, 4).contiguous().transpose(3, 4)
    k_mean = k_mean.transpose(0, 1).contiguous().transpose(0, 1)
    k_new = torch.stack([k_new, k_new], dim=-1)[..., 1]
    v_new = v_new.permute(4, 3, 2, 1, 0).contiguous().permute(4, 3, 2, 1, 0)
    pages = torch.stack([pages, pages], dim=-1)[..., 0]
    assert not any(t.is_contiguous() for t in (pool_k, pool_v, k_mean, k_new, v_new, pages))
    _check(bd, pool_k, pool_v, k_mean, k_new, v_new, pages)


@pytest.mark.parametrize("bd", ALL)
def test_frame_pool_write_and_same_id_in_two_rows(bd):
    pool = streamkern.FramePool(2, 2, 4, 3, 2, 5, dtype=torch.float32, device=bd[1], backend=bd[0])
    assert pool.k.shape == pool.v.shape == (2, 2, 4, 3, 2, 5) and pool.k_mean.shape == (2, 2, 4, 2, 5)
    assert pool.k_mean.dtype == torch.float32 and pool.num_pages == 4 and pool.frame_len == 3
    k_new, v_new = torch.randn(2, 2, 6, 2, 5, device=bd[1]), torch.randn(2, 2, 6, 2, 5, device=bd[1])
    pages = torch.tensor([[2, 0], [0, 2]], device=bd[1])
    want = _loop(pool.k, pool.v, pool.k_mean, k_new, v_new, pages)
    pool.write(k_new, v_new, pages)
    assert torch.equal(pool.k.double(), want[0]) and torch.equal(pool.v.double(), want[1])
    assert_parity(pool.k_mean, want[2], torch.float32)
    assert not pool.k[:, :, [1, 3]].any()


# ---- bad ids ------------------------------------------------------------------------------------------------------

BAD_IDS = [
    pytest.param([[0, 7, 1], [1, 2, 3]], "pages: expected values in \\[0, 7\\)", id="high"),
    pytest.param([[0, 1, 2], [-1, 2, 3]], "pages: expected values in \\[0, 7\\)", id="negative"),
    pytest.param([[0, 1, 2], [3, 5, 3]], "pages: expected distinct page ids within each batch row, row 1 lists "
                 "page 3", id="duplicate"),
]


@pytest.mark.parametrize("pages, msg", BAD_IDS)
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bad_ids_raise_before_writing(backend, pages, msg):
    if backend not in streamkern.available_backends("cpu") or backend not in fw.frame_write_op.backends.impls:
        pytest.skip(f"{backend} not available")
    args = list(_case(CASES[1].values[0], torch.float32, "cpu"))
    args[5] = torch.tensor(pages)
    before = [a.clone() for a in args[:3]]
    with pytest.raises(ValueError, match=msg):
        streamkern.frame_write(*args, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before))


@pytest.mark.parametrize("bd", GPU)
def test_gpu_backends_skip_out_of_range_frames(bd, monkeypatch):
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    args = list(_case(CASES[1].values[0], torch.float32, bd[1]))
    args[5] = torch.tensor([[0, 7, 1], [-3, 2, 3]], device=bd[1])
    want = [a.clone() for a in args[:3]]
    good = [(0, 0, 0), (0, 2, 1), (1, 1, 2), (1, 2, 3)]                    # (row, frame, page) of the valid ids
    F = args[0].shape[3]
    for b, i, page in good:
        want[0][:, b, page] = args[3][:, b, i * F:(i + 1) * F]
        want[1][:, b, page] = args[4][:, b, i * F:(i + 1) * F]
        want[2][:, b, page] = args[3][:, b, i * F:(i + 1) * F].mean(dim=1)
    streamkern.frame_write(*args, backend=bd[0])
    assert torch.equal(args[0], want[0]) and torch.equal(args[1], want[1])
    assert_parity(args[2], want[2], torch.float32)
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="pages: expected values in"):
        streamkern.frame_write(*args, backend=bd[0])


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _with(i, change):
    def make():
        args = list(_case(CASES[1].values[0], torch.float32, "cpu"))
        args[i] = change(args[i])
        return args
    return make


BAD = [
    pytest.param(_with(0, lambda t: t[0]), ValueError, "pool_k: expected a 6-d", id="pool-rank"),
    pytest.param(_with(1, lambda t: t.half()), TypeError, "pool_v: expected dtype float32 like pool_k",
                 id="pool-v-dtype"),
    pytest.param(_with(1, lambda t: t[:, :, :3]), ValueError, "pool_v: expected shape", id="pool-v-shape"),
    pytest.param(_with(2, lambda t: t.half()), TypeError, "k_mean: expected dtype float32", id="mean-dtype"),
    pytest.param(_with(2, lambda t: t[:, :, :2]), ValueError, "k_mean: expected shape", id="mean-shape"),
    pytest.param(_with(3, lambda t: t[:, :, 1:]), ValueError, "k_new: expected shape", id="k-new-not-frames"),
    pytest.param(_with(4, lambda t: t[:, :1]), ValueError, "v_new: expected shape", id="v-new-batch"),
    pytest.param(_with(5, lambda t: t.int()), TypeError, "pages: expected dtype int64", id="pages-int32"),
    pytest.param(_with(5, lambda t: t[:1]), ValueError, "pages: expected shape \\[2, 3\\]", id="pages-rows"),
    pytest.param(_with(5, lambda t: t[None]), ValueError, "pages: expected a 1 or 2-d", id="pages-rank"),
    pytest.param(_with(5, lambda t: t.to("meta")), ValueError, "pages: expected a tensor on cpu like pool_k",
                 id="pages-device"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])   # argument checks run before dispatch
@pytest.mark.parametrize("make, exc, msg", BAD)
def test_bad_inputs_raise_before_writing(backend, make, exc, msg):
    args = make()
    before = [a.clone() for a in args[:3] if a.device.type != "meta"]
    with pytest.raises(exc, match=msg):
        streamkern.frame_write(*args, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(args[:3], before))


OVERLAPS = [  # (what is changed, the argument the error names)
    pytest.param("expanded-pool", "pool_k", id="pool-expanded"),
    pytest.param("v-is-k", "pool_v", id="pool-v-is-pool-k"),
    pytest.param("k-new-in-pool", "k_new", id="k-new-inside-pool"),
    pytest.param("v-new-in-mean", "v_new", id="v-new-overlaps-k-mean"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("what, name", OVERLAPS)
def test_overlapping_outputs_raise_before_writing(backend, what, name):
    pool_k, pool_v, k_mean, k_new, v_new, pages = _case(CASES[1].values[0], torch.float32, "cpu")
    if what == "expanded-pool":
        pool_k = pool_k[:, :1].expand(pool_k.shape)
    if what == "v-is-k":
        pool_v = pool_k[:]
    if what == "k-new-in-pool":
        k_new = pool_k.reshape(-1)[3:3 + k_new.numel()].view(k_new.shape)
    if what == "v-new-in-mean":
        flat = torch.zeros(k_mean.numel() + v_new.numel())
        k_mean, v_new = flat[:k_mean.numel()].view(k_mean.shape), flat[5:5 + v_new.numel()].view(v_new.shape)
    before = [t.clone() for t in (pool_k, pool_v, k_mean)]
    with pytest.raises(ValueError, match=f"{name}: expected a tensor"):
        streamkern.frame_write(pool_k, pool_v, k_mean, k_new, v_new, pages, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((pool_k, pool_v, k_mean), before))


def test_frame_pool_bad_arguments():
    with pytest.raises(ValueError, match="frame_len: expected an int in \\[1"):
        streamkern.FramePool(1, 1, 2, 0, 1, 4)
    with pytest.raises(TypeError, match="dtype: expected"):
        streamkern.FramePool(1, 1, 2, 3, 1, 4, dtype=torch.float64)
    with pytest.raises(TypeError, match="pages: expected an int"):
        streamkern.FramePool(1, 1, 2.0, 3, 1, 4)


# ---- torch.library integration, launches and host syncs ----------------------------------------------------------

@pytest.mark.parametrize("bd", ALL)
def test_opcheck(bd):
    args = _case(CASES[1].values[0], torch.float32, bd[1])
    torch.library.opcheck(fw.frame_write_op.custom_op, (*args, bd[0]))
    shared = _case(CASES[2].values[0], torch.float32, bd[1])
    torch.library.opcheck(fw.frame_write_op.custom_op, (*shared[:5], shared[5].expand(3, -1), bd[0]))


@pytest.mark.parametrize("bd", ALL)
def test_compile_fullgraph(bd):
    args = _case(CASES[1].values[0], torch.float32, bd[1])

    def step(pool_k, pool_v, k_mean, k_new, v_new, pages):
        streamkern.frame_write(pool_k, pool_v, k_mean, k_new * 2, v_new, pages.flip(-1), backend=bd[0])

    want = [a.clone() for a in args[:3]]
    streamkern.frame_write(*want, args[3] * 2, args[4], args[5].flip(-1), backend="torch")
    torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    assert torch.equal(args[0], want[0]) and torch.equal(args[1], want[1])
    assert_parity(args[2], want[2], torch.float32)


@pytest.mark.parametrize("bd", GPU)
def test_no_host_sync(bd, monkeypatch):
    from streamkern.capture import count_host_syncs

    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    args = _case(CASES[1].values[0], torch.float32, bd[1])
    want = _loop(*args)
    with count_host_syncs(forbid=True):
        streamkern.frame_write(*args, backend=bd[0])
    assert torch.equal(args[0].double(), want[0]) and torch.equal(args[1].double(), want[1])

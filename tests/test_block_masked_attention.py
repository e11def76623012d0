"""block_masked_attention, scale_layout, scale_allow, tile classes (docs/contract.md §4.4): every backend against the
float64 "torch" reference, against SDPA with an independently built dense boolean mask, and against the seed's
dense −inf bias form; skipping proven by NaN-poisoned keys in skipped tiles."""


import pytest
import torch
import torch.nn.functional as F

import streamkern
from streamkern.ops import block_masked_attention as sa
from streamkern.ops.reference import block_masked_attention as ref
from streamkern.testing import assert_parity, rel_error, triton_launches_wrapped

from conftest import DTYPES, backend_params

ALL = backend_params(exclude=("cuda",))  # no "cuda" backend: Triton is the GPU path (see test_cuda_backend_...)
SMALL = (1, 2, 3, 4, 5)  # 55 tokens: scales straddle the interpreter's 16-token tiles


def _qkv(B, H, Lq, Lk, D, dtype, device, gain=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g) for n in (Lq, Lk, Lk))
    return (q * gain).to(device, dtype), (k * gain).to(device, dtype), v.to(device, dtype)


def _ids_from_sizes(sizes, device):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).to(device)


def _run(bd, q, k, v, qs, ks, allow, **kw):
    backend, device = bd
    return streamkern.block_masked_attention(q, k, v, qs.to(device), ks.to(device), allow.to(device),
                                             backend=backend, **kw)


def _reference(q, k, v, qs, ks, allow, self_attend=False, sm_scale=None):
    sm = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    return ref.block_masked_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), qs.cpu(), ks.cpu(),
                                      allow.cpu(), self_attend, sm)


def _check(bd, dtype, q, k, v, qs, ks, allow, self_attend=False, sm_scale=None, bound=None):
    """Parity with the float64 reference at the bound of ``dtype`` (or of the dtype ``bound``)."""
    out = _run(bd, q, k, v, qs, ks, allow, self_attend=self_attend, sm_scale=sm_scale)
    assert out.dtype == dtype and out.shape == q.shape and out.device.type == bd[1]
    assert_parity(out, _reference(q, k, v, qs, ks, allow, self_attend, sm_scale), bound or dtype)
    return out


# --- layout and presets ------------------------------------------------------------------------


def test_scale_layout_var_256_and_512():
    lay = streamkern.scale_layout()
    assert lay.total == 680 and lay.num_scales == 10
    assert lay.begin[:4] == (0, 1, 5, 14) and lay.end[-2:] == (424, 680)
    assert torch.equal(lay.scale_of_token, _ids_from_sizes([p * p for p in lay.patch_nums], "cpu"))
    assert streamkern.scale_layout((1, 2, 3, 4, 6, 9, 13, 18, 24, 32)).total == 2240
    assert lay.window(7, 3) == slice(155, 680)
    with pytest.raises(ValueError, match="num_scales"):
        lay.window(8, 3)
    with pytest.raises(ValueError, match="patch_nums"):
        streamkern.scale_layout((1, 0, 2))


@pytest.mark.parametrize("preset,rule", [("var", lambda i, j: j <= i), ("strict", lambda i, j: j < i),
                                         ("full", lambda i, j: True), ("diagonal", lambda i, j: i == j)])
def test_scale_allow_presets(preset, rule):
    allow = streamkern.scale_allow(7, preset)
    want = torch.tensor([[rule(i, j) for j in range(7)] for i in range(7)])
    assert allow.dtype == torch.bool and torch.equal(allow, want)


def test_scale_allow_bad_preset():
    with pytest.raises(ValueError, match="preset"):
        streamkern.scale_allow(4, "causal")


@pytest.mark.parametrize("self_attend", [False, True], ids=["plain", "self"])
@pytest.mark.parametrize("block_q,block_k", [(16, 16), (7, 13), (64, 32)])
def test_tile_classes_match_brute_force(block_q, block_k, self_attend):
    g = torch.Generator().manual_seed(block_q * block_k)
    sizes = [1, 17, 1, 5, 16, 9, 30]
    ids = _ids_from_sizes(sizes, "cpu")
    allow = torch.rand(len(sizes), len(sizes), generator=g) < 0.4
    mask = ref.dense_mask(ids, ids, allow, self_attend)
    cls = sa.tile_classes(ids, ids, allow, block_q, block_k, self_attend)
    for tq in range(cls.shape[0]):
        for tk in range(cls.shape[1]):
            tile = mask[tq * block_q:(tq + 1) * block_q, tk * block_k:(tk + 1) * block_k]
            want = sa.TILE_FULL if tile.all() else sa.TILE_PARTIAL if tile.any() else sa.TILE_SKIP
            assert cls[tq, tk] == want, (tq, tk)
    skipped = sa.skipped_tile_fraction(ids, ids, allow, block_q, block_k, self_attend)
    assert skipped == pytest.approx((cls == sa.TILE_SKIP).float().mean().item())


@pytest.mark.parametrize("self_attend", [False, True], ids=["plain", "self"])
def test_triton_visit_lists_match_tile_classes(self_attend):
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    from streamkern.kernels.block_masked_attention import visit_lists

    sizes = [1, 17, 1, 5, 16, 9, 30]
    ids = _ids_from_sizes(sizes, "cpu")
    qs = torch.stack([ids[20:], ids[20:]], 1).int()[:, 0]  # int32 ids, a strided view
    allow = (torch.rand(7, 7, generator=torch.Generator().manual_seed(4)) < 0.4).T  # non-contiguous allow
    cls = sa.tile_classes(qs, ids, allow, 16, 32, False)
    if self_attend:
        qs, cls = ids, sa.tile_classes(ids, ids, allow, 16, 32, True)
    visit, vcls, n_visit = visit_lists(qs, ids, allow, self_attend, 16, 32)
    for t in range(cls.shape[0]):
        want = torch.nonzero(cls[t]).flatten()
        n = int(n_visit[t])
        assert n == want.numel() and torch.equal(visit[t, :n].long(), want), t
        assert torch.equal(vcls[t, :n], cls[t, want])


def test_skipped_fraction_var_680():
    ids = streamkern.scale_layout().scale_of_token
    frac = streamkern.skipped_tile_fraction(ids, ids, streamkern.scale_allow(10), 64, 64)
    mask = ref.dense_mask(ids, ids, streamkern.scale_allow(10), False)
    mask = F.pad(mask, (0, 24, 0, 24)).reshape(11, 64, 11, 64)  # 680 = 10 * 64 + 40
    assert frac == pytest.approx((~mask.any(3).any(1)).float().mean().item())
    assert frac == pytest.approx(36 / 121)  # the tiles above the block-causal staircase
    assert streamkern.skipped_tile_fraction(ids, ids, streamkern.scale_allow(10, "full")) == 0.0


# --- parity ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("self_attend", [False, True], ids=["plain", "self"])
@pytest.mark.parametrize("preset", sa.PRESETS)
@pytest.mark.parametrize("bd", ALL)
def test_presets_parity(bd, preset, self_attend, dtype):
    ids = streamkern.scale_layout(SMALL).scale_of_token
    q, k, v = _qkv(1, 2, 55, 55, 32, dtype, bd[1])
    _check(bd, dtype, q, k, v, ids, ids, streamkern.scale_allow(5, preset), self_attend)


CASES = [
    # sizes of the scales, which of them are queries (a window: the last n scales), D, sm_scale, self_attend
    pytest.param(([1, 17, 1, 5, 16, 9], 6, 64, None, True), id="random-layout-self-D64"),
    pytest.param(([3, 1, 29, 14, 1], 2, 32, 1.0, False), id="window2-of-5-sm1-D32"),
    pytest.param(([1, 4, 9, 16], 3, 128, 0.2, False), id="window3-D128"),
    pytest.param(([7, 1, 1, 11], 4, 16, 1.0, True), id="tiny-scales-self-D16"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bd", ALL)
def test_random_allow_parity(bd, case, dtype):
    sizes, n_window, D, sm_scale, self_attend = case
    ids = _ids_from_sizes(sizes, "cpu")
    qs = ids[sum(sizes[:-n_window]):]
    allow = torch.rand(len(sizes), len(sizes), generator=torch.Generator().manual_seed(D)) < 0.5
    q, k, v = _qkv(2, 3, qs.numel(), ids.numel(), D, dtype, bd[1], seed=D)
    _check(bd, dtype, q, k, v, qs, ids, allow, self_attend, sm_scale)


# fp32 dots (docs/contract.md §4.5): 3xTF32 while torch's float32 matmul precision is "highest" (the fp32 bound), plain TF32
# when it is "high" or "medium" (the bf16 bound): (setting, the kernel's input_precision, the bound that applies)
FP32_PRECISIONS = [pytest.param("highest", "tf32x3", torch.float32, id="highest"),
                   pytest.param("high", "tf32", torch.bfloat16, id="high"),
                   pytest.param("medium", "tf32", torch.bfloat16, id="medium")]
# VAR at 256 px (680 tokens, head dim 64): the GPU's fp32 tiles of 128 query rows; only on CUDA
VAR_256 = pytest.param(((1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 64), id="var256-D64",
                       marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                reason="no CUDA device on this machine (the interpreter runs "
                                                       "16x16 tiles)"))


@pytest.mark.parametrize("case", [pytest.param((SMALL, 32), id="small-D32"), VAR_256])
@pytest.mark.parametrize("setting, precision, bound", FP32_PRECISIONS)
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu", "cuda")))
def test_fp32_precision_follows_torch_matmul_precision(bd, setting, precision, bound, case):
    """The launch's dot precision follows ``torch.get_float32_matmul_precision()``, and fp32 outputs meet the bound
    that precision carries (on CUDA; Triton's interpreter computes dots in fp32 under every setting)."""
    torch.set_float32_matmul_precision(setting)      # conftest restores "highest"
    patch_nums, D = case
    ids = streamkern.scale_layout(patch_nums).scale_of_token
    q, k, v = _qkv(1, 2, ids.numel(), ids.numel(), D, torch.float32, bd[1])
    launched = []

    def record(kernel, launch, args, kwargs):
        if "PRECISION" in kwargs:                    # the attention kernel, not the visit lists
            launched.append(kwargs["PRECISION"])
        return launch(*args, **kwargs)

    with triton_launches_wrapped(record):
        _check(bd, torch.float32, q, k, v, ids, ids, streamkern.scale_allow(len(patch_nums)), bound=bound)
    assert launched == [precision]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_against_sdpa_dense_bool_mask(bd, dtype):
    sizes = [1, 4, 9, 16, 2]
    ids = _ids_from_sizes(sizes, "cpu")
    allow = torch.rand(5, 5, generator=torch.Generator().manual_seed(3)) < 0.5
    allow |= torch.eye(5, dtype=torch.bool)  # every query has a key: SDPA is then defined everywhere
    mask = torch.from_numpy(allow.numpy()[ids.numpy()][:, ids.numpy()])
    q, k, v = _qkv(2, 2, 32, 32, 32, dtype, bd[1], seed=5)
    want = F.scaled_dot_product_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), attn_mask=mask,
                                          scale=1.0)
    assert_parity(_run(bd, q, k, v, ids, ids, allow, sm_scale=1.0), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_against_seed_var_bias(bd, dtype):
    pns = (1, 2, 3, 4, 5)
    ids = streamkern.scale_layout(pns).scale_of_token
    q, k, v = _qkv(1, 2, 55, 55, 32, dtype, bd[1], seed=9)
    want = ref.seed_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(),
                              ref.seed_var_bias(pns, dtype=torch.float64), 32 ** -0.5)
    assert_parity(_run(bd, q, k, v, ids, ids, streamkern.scale_allow(5)), want, dtype)


def test_seed_bias_matches_seed_var_bias():
    pns = (1, 2, 3, 4)
    ids = streamkern.scale_layout(pns).scale_of_token
    assert torch.equal(ref.seed_bias(ids, ids, streamkern.scale_allow(4)), ref.seed_var_bias(pns))


@pytest.mark.parametrize("bd", ALL)
def test_non_contiguous_inputs(bd):
    ids = _ids_from_sizes([1, 4, 9, 16, 7], "cpu")
    L = ids.numel()
    base = torch.randn(2, L, 3, 80, generator=torch.Generator().manual_seed(1)).to(bd[1])
    q = base[..., :32].transpose(1, 2)            # VAR's [B, L, H, D] viewed as [B, H, L, D]
    k = base[..., 40:72].transpose(1, 2)
    v = base.flip(1)[..., 1:65:2].transpose(1, 2)  # negative token stride, D stride 2
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    _check(bd, torch.float32, q, k, v, ids, ids, streamkern.scale_allow(5), True, 0.7)


@pytest.mark.parametrize("bd", ALL)
def test_rows_with_no_allowed_key_are_zero(bd):
    ids = _ids_from_sizes([1, 4, 20, 3], "cpu")
    allow = streamkern.scale_allow(4)
    allow[2] = False  # the 20 queries of scale 2 see nothing
    q, k, v = _qkv(1, 2, 28, 28, 32, torch.float32, bd[1])
    out = _check(bd, torch.float32, q, k, v, ids, ids, allow)
    assert torch.equal(out[:, :, 5:25].cpu(), torch.zeros(1, 2, 20, 32))
    assert (out[:, :, 25:].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_large_logits_stay_finite(bd, dtype):
    ids = _ids_from_sizes([1, 4, 9, 16, 3], "cpu")
    gain = 30.0 if dtype == torch.float16 else 100.0  # logits ~1e5..1e6: exp overflows without rescaling
    q, k, v = _qkv(1, 2, 33, 33, 32, dtype, bd[1], gain=gain, seed=2)
    out = _check(bd, dtype, q, k, v, ids, ids, streamkern.scale_allow(5), sm_scale=1.0)
    assert torch.isfinite(out).all()


# --- non-finite values and scales (issue 11 item 5; README "Error rules") ------------------------------------
# Scales [2, 3] with the "var" rule: queries 0-1 (scale 0) see keys 0-1 only, queries 2-4 see every key.
# Queries are positive, so a key row of +inf gives scores of +inf and a key row of -inf scores of -inf.


def _poisoned(value, key, device):
    ids = _ids_from_sizes([2, 3], "cpu")
    q, k, v = _qkv(1, 2, 5, 5, 16, torch.float32, "cpu", seed=5)
    q = q.abs() + 0.1
    k_bad = k.clone()
    k_bad[:, :, key, 3] = value
    return ids, q.to(device), k_bad.to(device), v.to(device), k


@pytest.mark.parametrize("value", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("bd", ALL)
def test_non_finite_key_reaches_only_the_rows_that_may_see_it(bd, value):
    """A key masked out for a row never touches it, whatever its value (the torch reference used to add a −inf
    bias, so +inf − inf gave NaN rows that cannot see the key); a row that sees a +inf or NaN score is NaN."""
    ids, q, k_bad, v, k = _poisoned(value, 2, bd[1])  # key 2 has scale 1: only queries 2-4 see it
    out = _run(bd, q, k_bad, v, ids, ids, streamkern.scale_allow(2)).cpu()
    assert out[:, :, 2:].isnan().all()
    assert_parity(out[:, :, :2], _reference(q, k, v, ids, ids, streamkern.scale_allow(2))[:, :, :2], torch.float32)


@pytest.mark.parametrize("bd", ALL)
def test_row_whose_allowed_scores_are_all_minus_inf_is_zero(bd):
    """Query 0 (scale 0) sees keys 0-1, both with a −inf score: zeros, like a row with no allowed key (a −inf
    score is an additively masked key); queries 2-4 give those keys weight 0."""
    ids, q, k_bad, v, _ = _poisoned(float("-inf"), slice(0, 2), bd[1])
    out = _run(bd, q, k_bad, v, ids, ids, streamkern.scale_allow(2)).cpu()
    assert torch.equal(out[:, :, :2], torch.zeros(1, 2, 2, 16))
    want = F.scaled_dot_product_attention(q[:, :, 2:].cpu().double(), k_bad[:, :, 2:].cpu().double(),
                                          v[:, :, 2:].cpu().double(), scale=16 ** -0.5)
    assert_parity(out[:, :, 2:], want, torch.float32)


@pytest.mark.parametrize("sm_scale", [float("inf"), float("nan"), -1.0, 0.0])
@pytest.mark.parametrize("bd", ALL)
def test_sm_scale_must_be_finite_and_positive(bd, sm_scale):
    args = _good()
    args = (args["q"].to(bd[1]), args["k"].to(bd[1]), args["v"].to(bd[1]), args["q_scale"].to(bd[1]),
            args["k_scale"].to(bd[1]), args["allow"].to(bd[1]))
    with pytest.raises(ValueError, match="^sm_scale: expected a finite number in \\(0"):
        streamkern.block_masked_attention(*args, sm_scale=sm_scale, backend=bd[0])


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cuda")))
def test_skipped_tiles_never_read(bd):
    """Keys/values of a scale no query may see fill whole tiles (128-aligned, the largest block of any backend)
    and hold NaN: a kernel that computed and masked those tiles would return NaN (NaN·0), one that skips them
    does not."""
    ids = _ids_from_sizes([1, 15, 48, 64, 128], "cpu")
    qs = ids[128:]
    q, k, v = _qkv(1, 2, 128, 256, 32, torch.float32, bd[1])
    allow = streamkern.scale_allow(5, "strict")
    want = _reference(q, k[:, :, :128], v[:, :, :128], qs, ids[:128], allow)
    k[:, :, 128:] = float("nan")
    v[:, :, 128:] = float("nan")
    assert sa.skipped_tile_fraction(qs, ids, allow, 64, 64) == 0.5
    assert_parity(_run(bd, q, k, v, qs, ids, allow), want, torch.float32)


@pytest.mark.parametrize("bd", ALL)
@pytest.mark.parametrize("Lq,Lk,B", [(0, 9, 1), (5, 0, 1), (5, 5, 0)], ids=["Lq0", "Lk0", "B0"])
def test_empty(bd, Lq, Lk, B):
    qs, ks = torch.zeros(Lq, dtype=torch.long), torch.zeros(Lk, dtype=torch.long)
    q, k, v = _qkv(B, 2, Lq, Lk, 16, torch.float32, bd[1])
    out = _run(bd, q, k, v, qs, ks, streamkern.scale_allow(1))
    assert out.shape == (B, 2, Lq, 16) and torch.equal(out.cpu(), torch.zeros(B, 2, Lq, 16))


def test_triton_never_syncs(monkeypatch):
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    ids = _ids_from_sizes([1, 4, 9, 16], "cpu")
    q, k, v = _qkv(1, 1, 30, 30, 16, torch.float32, "cpu")
    want = _reference(q, k, v, ids, ids, streamkern.scale_allow(4))
    allow = streamkern.scale_allow(4)

    def no_sync(*_):
        raise AssertionError("host synchronisation on an accelerated path")

    for name in ("item", "__bool__", "tolist", "__int__", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    out = streamkern.block_masked_attention(q, k, v, ids, ids, allow, backend="triton")
    monkeypatch.undo()
    assert_parity(out, want, torch.float32)


def test_triton_bad_ids_attend_nothing_without_debug(monkeypatch):
    """Without STREAMKERN_DEBUG the GPU path does not read the ids back; an id outside [0, NS) then allows
    nothing (never an out-of-bounds read). With STREAMKERN_DEBUG=1 it raises like the CPU backends."""
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    ids = _ids_from_sizes([1, 4, 9, 16], "cpu")
    bad = ids.clone()
    bad[10:14] = 99
    q, k, v = _qkv(1, 1, 30, 30, 16, torch.float32, "cpu")
    monkeypatch.setenv("STREAMKERN_DEBUG", "0")
    out = streamkern.block_masked_attention(q, k, v, bad, ids, streamkern.scale_allow(4), backend="triton")
    assert torch.equal(out[0, 0, 10:14], torch.zeros(4, 16)) and torch.isfinite(out).all()
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match=r"q_scale: expected values in \[0, 4\)"):
        streamkern.block_masked_attention(q, k, v, bad, ids, streamkern.scale_allow(4), backend="triton")


# --- bad input -----------------------------------------------------------------------------------


def _good():
    ids = _ids_from_sizes([1, 4, 9], "cpu")
    q, k, v = _qkv(1, 2, 14, 14, 16, torch.float32, "cpu")
    return dict(q=q, k=k, v=v, q_scale=ids, k_scale=ids, allow=streamkern.scale_allow(3))


BAD = [
    pytest.param(lambda a: a.update(q_scale=a["q_scale"] + 1), ValueError, r"q_scale: expected values in \[0, 3\)",
                 id="q-id-out-of-range"),
    pytest.param(lambda a: a.update(k_scale=a["k_scale"] - 1), ValueError, r"k_scale: expected values in \[0, 3\)",
                 id="k-id-negative"),
    pytest.param(lambda a: a.update(allow=torch.ones(3, 4, dtype=torch.bool)), ValueError, "allow: expected a square",
                 id="allow-not-square"),
    pytest.param(lambda a: a.update(allow=streamkern.scale_allow(2)), ValueError,
                 r"q_scale: expected values in \[0, 2\)", id="allow-too-few-scales"),
    pytest.param(lambda a: a.update(allow=a["allow"].int()), TypeError, "allow: expected dtype bool", id="allow-int"),
    pytest.param(lambda a: a.update(q_scale=a["q_scale"].float()), TypeError, "q_scale: expected dtype",
                 id="ids-float"),
    pytest.param(lambda a: a.update(q_scale=a["q_scale"][:-1]), ValueError, r"q_scale: expected shape \[14\]",
                 id="q-ids-short"),
    pytest.param(lambda a: a.update(k=a["k"][..., :8]), ValueError, r"k: expected shape \[1, 2, \*, 16\]",
                 id="k-head-dim"),
    pytest.param(lambda a: a.update(v=a["v"][:, :, :-1]), ValueError, r"v: expected shape \[1, 2, 14, 16\]",
                 id="v-length"),
    pytest.param(lambda a: a.update(q=a["q"][0]), ValueError, "q: expected a 4-d tensor", id="q-rank"),
    pytest.param(lambda a: a.update(v=a["v"].half()), TypeError, "v: expected dtype float32", id="v-dtype"),
    pytest.param(lambda a: a.update(q=a["q"].double()), TypeError, "q: expected dtype", id="q-float64"),
    pytest.param(lambda a: a.update(self_attend=True, q=a["q"][:, :, :5], q_scale=a["q_scale"][:5]), ValueError,
                 "self_attend: expected Lq == Lk", id="self-attend-window"),
    pytest.param(lambda a: a.update(sm_scale=0.0), ValueError, "sm_scale", id="sm-scale-zero"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("edit,exc,msg", BAD)
def test_bad_input(backend, edit, exc, msg):
    if backend not in streamkern.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    args = _good()
    edit(args)
    before = {n: t.clone() for n, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=msg):
        streamkern.block_masked_attention(**args, backend=backend)
    assert all(torch.equal(args[n], t) for n, t in before.items())  # inputs are left untouched


def test_cuda_backend_reports_why_missing():
    args = _good()
    with pytest.raises(streamkern.BackendUnavailable, match="Triton flash kernel is the GPU path"):
        streamkern.block_masked_attention(**args, backend="cuda")


# --- torch.library / torch.compile -----------------------------------------------------------


def test_triton_declares_its_head_dim_limit():
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton cannot run on CPU tensors here")
    D = sa.MAX_TRITON_HEAD_DIM + 1
    q = torch.randn(1, 1, 3, D)
    ids = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(streamkern.BackendUnavailable, match=f"takes head dims D <= {D - 1}.*got D={D}"):
        streamkern.block_masked_attention(q, q, q, ids, ids, sa.scale_allow(1), backend="triton")


@pytest.mark.parametrize("bd", ALL)
def test_opcheck(bd):
    ids = _ids_from_sizes([1, 4, 11], bd[1])
    q, k, v = _qkv(1, 2, 16, 16, 16, torch.float32, bd[1])
    allow = streamkern.scale_allow(3, device=bd[1])
    torch.library.opcheck(sa.block_masked_attention_op.custom_op, (q, k, v, ids, ids, allow, True, 0.5, bd[0]))


@pytest.mark.parametrize("bd", ALL)
def test_compile_fullgraph(bd):
    ids = _ids_from_sizes([1, 4, 9, 2], bd[1])
    allow = streamkern.scale_allow(4, device=bd[1])
    q, k, v = _qkv(1, 2, 16, 16, 16, torch.float32, bd[1])

    def layer(q, k, v):
        return streamkern.block_masked_attention(q * 2.0, k, v, ids, ids, allow, sm_scale=1.0, backend=bd[0]) + 1.0

    # aot_eager traces the op through its fake implementation (inductor's own allocations trip the poison fixture)
    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
    assert_parity(out - 1.0, _reference(q * 2.0, k, v, ids, ids, allow, sm_scale=1.0), torch.float32)
    assert rel_error(out, layer(q, k, v)) < 1e-6


# --- the Hopper kernel (kernels/block_masked_attention.py; where it runs: kernels/attention_tile.py) ---------------------

from streamkern.kernels import block_masked_attention as ksa
from streamkern.kernels import attention_tile as tiles
HOPPER, POINTER = "_block_masked_attention_tma_kernel", "_block_masked_attention_kernel"
INTERPRETED = [tiles.HopperConfig(16, 16, 1, 1, False, False), tiles.HopperConfig(32, 16, 1, 2, False, True)]
HOPPER_CONFIGS = [pytest.param(c, id=c.name) for c in (ksa.CONFIGS if torch.cuda.is_available() else INTERPRETED)]
TRITON = [p for p in backend_params(exclude=("torch", "cpu", "cuda"))
          if p.id == ("triton-cuda" if torch.cuda.is_available() else "triton-cpu")]


def _needs_hopper(bd):
    if bd[1] == "cuda" and not tiles.tma_capable(torch.device("cuda")):
        pytest.skip("the Hopper kernel needs sm_90 or later")


def _launched(*args, config, **kwargs):
    """``(ksa.block_masked_attention(*args, config=config), names of the attention kernels it launched)``."""
    names = []

    def record(kernel, launch, a, k):
        names.append(kernel.fn.__name__)
        return launch(*a, **k)

    with triton_launches_wrapped(record):
        out = ksa.block_masked_attention(*args, config=config, **kwargs)
    return out, [n for n in names if n != "_visit_list_kernel"]


@pytest.mark.parametrize("config", HOPPER_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES + [pytest.param(((1, 2, 3, 4, 5), 5, 24, 1.0, True), id="var-self-D24")])
@pytest.mark.parametrize("bd", TRITON)
def test_hopper_kernel_parity(bd, case, dtype, config):
    """The Hopper kernel at each config and the pointer kernel against the float64 reference: random scale masks
    (partial tiles), windows of query scales, self-attention, head dims 16-128 (24 padded to 32 columns)."""
    _needs_hopper(bd)
    sizes, n_window, D, sm_scale, self_attend = case
    ids = _ids_from_sizes(sizes, bd[1])
    qs = ids[sum(sizes[:-n_window]):]
    allow = (torch.rand(len(sizes), len(sizes), generator=torch.Generator().manual_seed(D)) < 0.5).to(bd[1])
    q, k, v = _qkv(2, 3, qs.numel(), ids.numel(), D, dtype, bd[1], seed=D)
    want = _reference(q, k, v, qs, ids, allow, self_attend, sm_scale)
    for chosen in (config, "pointer"):
        out, names = _launched(q, k, v, qs, ids, allow, self_attend, sm_scale or D ** -0.5, config=chosen)
        assert names == [POINTER if chosen == "pointer" else HOPPER]
        assert_parity(out, want, dtype, f"out ({chosen})")


@pytest.mark.parametrize("config", HOPPER_CONFIGS)
@pytest.mark.parametrize("bd", TRITON)
def test_hopper_kernel_reads_only_its_rows_and_columns(bd, config):
    """q, k and v sliced from storage whose rows past L and columns past D hold NaN and inf, key tiles of a scale
    no query sees NaN (skipped), and scores rising by far more than the lazy rescale's threshold from scale to
    scale (fp16): the output is finite and at its bound."""
    _needs_hopper(bd)
    sizes = [1, 15, 48, 64, 128]
    ids = _ids_from_sizes(sizes, bd[1])
    L, D = ids.numel(), 24
    gen = torch.Generator().manual_seed(2)
    store = torch.randn(3, 1, 2, L + 9, D + 8, generator=gen)
    store[1, :, :, :L] *= torch.repeat_interleave(torch.tensor([0.1, 1.0, 4.0, 0.5, 8.0]), torch.tensor(sizes))[
        :, None]
    store[:, :, :, L:] = float("inf")
    store[..., D:] = float("nan")
    store = store.to(bd[1], torch.float16)
    q, k, v = (store[i, :, :, :L, :D] for i in range(3))
    allow = streamkern.scale_allow(5, "var").to(bd[1])
    allow[:, 4] = False                                  # scale 4 (tokens 128-255): no query sees it
    finite = [torch.nan_to_num(t, nan=0.0, posinf=0.0) for t in (q, k, v)]
    want = _reference(*finite, ids, ids, allow, False, 1.0)
    k[:, :, 128:], v[:, :, 128:] = float("nan"), float("nan")
    out, names = _launched(q, k, v, ids, ids, allow, False, 1.0, config=config)
    assert names == [HOPPER]
    assert bool(torch.isfinite(out).all())
    assert_parity(out, want, torch.float16)


@pytest.mark.parametrize("layout, takes", [("contiguous", True), ("fp32", False), ("33-scales", False),
                                           ("odd-row-stride", False), ("heads-last", True)])
@pytest.mark.parametrize("bd", TRITON)
def test_kernel_choice_follows_strides_dtype_and_scales(bd, layout, takes):
    """The Hopper kernel takes fp16/bf16 q, k, v with 16-byte rows and strides (any order of the B, H, L dims) and
    at most 32 scales; the pointer kernel takes the rest, both exact."""
    _needs_hopper(bd)
    ns = 33 if layout == "33-scales" else 4
    ids = (torch.arange(40) * ns // 40).to(bd[1])
    q, k, v = _qkv(1, 2, 40, 40, 16, torch.float32 if layout == "fp32" else torch.bfloat16, bd[1])
    if layout == "odd-row-stride":
        q = torch.randn(1, 2, 40, 17).to(bd[1], torch.bfloat16)[..., :16]
    if layout == "heads-last":                                 # [B, L, H, D] storage seen as [B, H, L, D]
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
    allow = streamkern.scale_allow(ns, "var").to(bd[1])
    out, names = _launched(q, k, v, ids, ids, allow, False, 0.25, config=None)
    assert names == [HOPPER if takes else POINTER]
    assert_parity(out, _reference(q, k, v, ids, ids, allow, False, 0.25), q.dtype)

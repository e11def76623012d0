"""verify_scales (docs/contract.md §4.4): every backend against the float64 "torch" reference and the SDVAR-style eager
check, losslessness of sample mode (χ² with power), edge cases, bad input, opcheck, torch.compile, no host sync."""
from types import SimpleNamespace

import pytest
import torch
from conftest import DTYPES, backend_params

import streamkern
from streamkern import scale_layout
from streamkern.pipelines import count_host_syncs
from streamkern.ops.reference import verify_scales as ref
from streamkern.testing import assert_parity
from streamkern.ops.verify_scales import verify_scales, verify_scales_op


LAYOUT = scale_layout((1, 2, 3, 4))


def window(first, num):
    return LAYOUT.end[first + num - 1] - LAYOUT.begin[first]


def _sample_window(B: int, T: int, V: int, seed: int):
    """``(logits [B, T, V], q = softmax(logits), draft tokens drawn from q, uniforms [B, T, 2] in [0, 0.99))``: a
    sample-mode window whose draft probabilities are the target's."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    q = torch.softmax(logits.double(), -1).float()
    draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, T)
    return logits, q, draft, torch.rand(B, T, 2, generator=g) * 0.99


def combined(logits, first, num, cfg):
    offsets = [LAYOUT.begin[s] - LAYOUT.begin[first] for s in range(first, first + num)] + [window(first, num)]
    return ref.combined_logits(logits, offsets, cfg, torch.float64)


def make_case(B, first, num, V, dtype, *, cfg=None, hit=0.8, seed=0, device="cpu", noncontig=False, sample=False):
    """Random logits (``[2B, T, V]`` with cfg), draft tokens equal to the target's argmax with probability ``hit``,
    and in sample mode draft probabilities close to the target's softmax with fixed uniforms."""
    g = torch.Generator().manual_seed(seed)
    T = window(first, num)
    rows = 2 * B if cfg is not None else B
    logits = (2 * torch.randn(rows, T, V + 3 if noncontig else V, generator=g)).to(dtype)
    if noncontig:
        logits = logits[..., 1:V + 1]
    x = combined(logits, first, num, cfg)
    keep = torch.rand(B, T, generator=g) < hit
    draft = torch.where(keep, x.argmax(-1), torch.randint(0, V, (B, T), generator=g))
    kw = dict(cfg=cfg)
    if sample:
        q = torch.softmax(x + 0.3 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).float()
        draft = torch.multinomial(q.reshape(-1, V), 1, generator=g).reshape(B, T)
        kw.update(mode="sample", draft_probs=q, uniforms=torch.rand(B, T, 2, generator=g))
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return to(logits), to(draft), {k: to(v) for k, v in kw.items()}


def reference(logits, draft, first, num, **kw):
    """The float64 "torch" reference."""
    kw = dict(kw)
    if kw.get("draft_probs") is not None:
        kw["draft_probs"] = kw["draft_probs"].double()
    mode = kw.pop("mode", "greedy")
    offsets = [LAYOUT.begin[s] - LAYOUT.begin[first] for s in range(first, first + num)] + [window(first, num)]
    return ref.verify_scales(logits.cpu().double(), draft.cpu(), offsets, mode == "greedy", kw.get("threshold", 0.5),
                             None if kw.get("draft_probs") is None else kw["draft_probs"].cpu(),
                             None if kw.get("uniforms") is None else kw["uniforms"].cpu(), kw.get("cfg"),
                             kw.get("temperature", 1.0))


def assert_same(res, exp, dtype):
    accepted, match, ratio, tokens = (t.cpu() for t in res)
    assert torch.equal(match, exp[1])
    assert torch.equal(accepted, exp[0])
    assert torch.equal(tokens, exp[3])
    assert ratio.dtype == torch.float32
    assert_parity(ratio, exp[2], dtype, "ratio")


SHAPES = [  # (B, first, num, V, cfg, non-contiguous logits)
    pytest.param(1, 0, 1, 1, None, False, id="B1-s0-V1"),
    pytest.param(2, 1, 2, 37, [0.5, 1.25], True, id="B2-s1x2-V37-cfg-strided"),
    pytest.param(3, 2, 2, 128, None, False, id="B3-s2x2-V128"),
    pytest.param(2, 2, 2, 64, [1.0, 3.0], False, id="B2-s2x2-V64-cfg"),
    pytest.param(1, 0, 4, 13, [0.0, 0.5, 1.0, 4.0], True, id="B1-s0x4-V13-cfg-strided"),
]


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("B,first,num,V,cfg,strided", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params())
def test_parity(bd, dtype, B, first, num, V, cfg, strided, mode):
    backend, device = bd
    logits, draft, kw = make_case(B, first, num, V, dtype, cfg=cfg, device=device, noncontig=strided,
                                  sample=mode == "sample", seed=V + B)
    res = verify_scales(logits, draft, LAYOUT, first, num, backend=backend, threshold=0.6, **kw)
    exp = reference(logits, draft, first, num, threshold=0.6, **kw)
    if mode == "sample":
        x = combined(logits.cpu(), first, num, cfg)
        res = res._replace(tokens=snap_to_reference_draws(res.tokens.cpu(), exp[3], x, kw["draft_probs"].cpu(),
                                                          kw["uniforms"][..., 1].cpu()))
    assert_same(res, exp, dtype)


GPU_SHAPES = [  # (B, patch_nums, first, num, V, cfg): the CUDA launcher's warp-, 256- and 1024-thread row groups
    pytest.param(12, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 8, 2, 4096, True, id="warp-rows-V4096-cfg"),
    pytest.param(2, (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), 8, 2, 4099, True, id="block256-V4099-cfg"),
    pytest.param(3, (1, 1, 1, 1, 1), 0, 5, 40000, False, id="block1024-V40000-chain"),
]
TILED = pytest.param(1, (1, 1, 2), 2, 1, 9000, True, id="V9000-three-tiles-cfg")  # several V tiles per row


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("B,patch_nums,first,num,V,cfg", GPU_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", ("triton", "cpu"), ("cpu", "cpu"))))
def test_parity_gpu_shapes(bd, dtype, B, patch_nums, first, num, V, cfg, mode):
    """VAR / LLM-sized rows on the GPU backends (too slow for the Triton interpreter)."""
    check_large_rows(bd, dtype, B, patch_nums, first, num, V, cfg, mode)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("B,patch_nums,first,num,V,cfg", [TILED])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_parity_multi_tile_rows(bd, dtype, B, patch_nums, first, num, V, cfg, mode):
    check_large_rows(bd, dtype, B, patch_nums, first, num, V, cfg, mode)


def check_large_rows(bd, dtype, B, patch_nums, first, num, V, cfg, mode):
    backend, device = bd
    lay = scale_layout(patch_nums)
    T = lay.end[first + num - 1] - lay.begin[first]
    g = torch.Generator().manual_seed(V)
    ratios = [1.25, 1.5][:num] if cfg else None  # exact in float32: fp16 ties stay ties after the combine
    logits = torch.randn(2 * B if cfg else B, T, V, generator=g).to(dtype)
    offsets = [lay.begin[s] - lay.begin[first] for s in range(first, first + num)] + [T]
    x = ref.combined_logits(logits, offsets, ratios, torch.float64)
    draft = torch.where(torch.rand(B, T, generator=g) < 0.9, x.argmax(-1), torch.randint(0, V, (B, T), generator=g))
    kw = dict(cfg=ratios, threshold=0.8)
    if mode == "sample":
        q = torch.softmax(x + 0.1 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1).float()
        kw.update(mode=mode, draft_probs=q, uniforms=torch.rand(B, T, 2, generator=g))
    res = verify_scales(logits.to(device), draft.to(device), lay, first, num, backend=backend,
                        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    mode = kw.pop("mode", "greedy")
    exp = ref.verify_scales(logits.double(), draft, offsets, mode == "greedy", 0.8,
                            None if mode == "greedy" else kw["draft_probs"].double(), kw.get("uniforms"), ratios, 1.0)
    if mode == "sample":  # float32 CDFs over thousands of entries: a draw may sit on a bucket edge
        res = res._replace(tokens=snap_to_reference_draws(res.tokens.cpu(), exp[3], x, kw["draft_probs"],
                                                          kw["uniforms"][..., 1]))
    assert_same(res, exp, dtype)


def snap_to_reference_draws(tokens, expected, x, q, u, rel=1e-5):
    """``tokens`` with each redrawn token that differs from the float64 reference replaced by the reference's,
    provided the float64 CDF puts the draw ``u · Σ r`` within ``rel · Σ r`` of the edge between the two buckets
    (rounding, not a wrong draw); any other difference is left for the caller's equality check."""
    tokens = tokens.clone()
    p = torch.softmax(x, -1)
    for b, t in (tokens != expected).nonzero().tolist():
        r = (p[b, t] - q[b, t].double()).clamp_min(0)
        cdf = (r if r.sum() > 0 else p[b, t]).cumsum(-1)
        draw, lo = float(u[b, t]) * float(cdf[-1]), min(int(tokens[b, t]), int(expected[b, t]))
        if 0 <= lo and abs(float(cdf[lo]) - draw) <= rel * float(cdf[-1]):
            tokens[b, t] = expected[b, t]
    return tokens


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("bd", backend_params())
def test_argmax_ties_go_to_lowest_index(bd, mode):
    backend, device = bd
    g = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 2, (4, 4, 9), generator=g).float()  # many tied maxima, exact under CFG 0.5
    draft = torch.randint(0, 9, (2, 4), generator=g)
    first_max = combined(logits, 1, 1, [0.5]).argmax(-1)
    kw = dict(cfg=[0.5])
    if mode == "sample":  # temperature → 0: p splits evenly over the tied maxima; redraw from p - q
        kw.update(mode=mode, temperature=1e-4, draft_probs=torch.full((2, 4, 9), 1 / 9),
                  uniforms=torch.zeros(2, 4, 2))
    res = verify_scales(logits.to(device), draft.to(device),
                        LAYOUT, 1, 1, backend=backend, threshold=1.0, **{k: v.to(device) if isinstance(v, torch.Tensor)
                                                                          else v for k, v in kw.items()})
    exp = reference(logits, draft, 1, 1, threshold=1.0, **kw)
    assert_same(res, exp, torch.float32)
    if mode == "greedy":
        rejected = res.accepted.cpu() == 0
        assert torch.equal(res.tokens.cpu()[rejected], first_max[rejected])
        assert rejected.any()


@pytest.mark.parametrize("B", [1, 3])
def test_matches_sdvar_eager_check(B):
    logits, draft, kw = make_case(B, 0, 4, 50, torch.float32, cfg=[0.0, 0.5, 1.0, 1.5], hit=0.9, seed=11)
    draft[:, 5:] = combined(logits, 0, 4, kw["cfg"]).argmax(-1)[:, 5:]  # all rows pass scales 2..3 alike
    res = verify_scales(logits, draft, LAYOUT, 0, 4, threshold=0.5, backend="cpu" if "cpu" in
                        streamkern.available_backends("cpu") else "torch", **kw)
    accepted, tokens = ref.sdvar_greedy_check(logits, draft, [0, 1, 5, 14, 30], kw["cfg"], 0.5)
    if bool((res.accepted == res.accepted[0]).all()):  # the seed verifies the batch as one
        assert int(res.accepted[0]) == accepted
        assert torch.equal(res.tokens, tokens)
    assert B == 1 or not bool((res.ratio[:, 0] >= 0.5).all()) or int(res.accepted.min()) >= 1


def lossless_trials(backend, n=200_000, V=8, seed=5):
    """n independent one-token trials batched as B: target p, draft q, draft token x ~ q."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(torch.randn(V, generator=g, dtype=torch.float64) * 1.5, -1)
    draft = torch.multinomial(q.float(), n, replacement=True, generator=g).reshape(n, 1)
    uniforms = torch.rand(n, 1, 2, generator=g)
    logits = p.log().float().reshape(1, 1, V).expand(n, 1, V)
    res = verify_scales(logits, draft, scale_layout((1,)), 0, 1, mode="sample", draft_probs=q.float().expand(n, 1, V),
                        uniforms=uniforms, backend=backend)
    return p, q, draft[:, 0], uniforms[:, 0], res


def chi2_pvalue(tokens, p):
    from scipy.stats import chisquare

    counts = torch.bincount(tokens, minlength=len(p)).double()
    return chisquare(counts.numpy(), (p * len(tokens)).numpy()).pvalue


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_sample_mode_is_lossless(backend):
    if backend not in streamkern.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    p, q, draft, u, res = lossless_trials(backend)
    assert (res.tokens >= 0).all()
    assert 0.2 < res.match.float().mean() < 0.95  # both branches are exercised
    assert chi2_pvalue(res.tokens[:, 0], p) > 1e-3
    # The same trials without the residual redraw (rejected tokens drawn from p itself) are biased: must fail.
    broken = torch.where(res.match[:, 0], draft, ref.inverse_cdf(p.expand(len(draft), -1), u[:, 1].double()))
    assert chi2_pvalue(broken, p) < 1e-3


@pytest.mark.parametrize("bd", backend_params())
def test_edge_cases(bd):
    backend, device = bd
    V, T = 11, window(0, 3)
    logits = torch.randn(3, T, V, generator=torch.Generator().manual_seed(2))
    amax = logits.argmax(-1)
    run = lambda draft, **kw: verify_scales(logits.to(device), draft.to(device), LAYOUT, 0, 3,  # noqa: E731
                                            backend=backend, **kw)
    # rows with different outcomes: all accepted / scale 1 rejected / scale 0 rejected
    draft = amax.clone()
    draft[1, 1:5] = (amax[1, 1:5] + 1) % V
    draft[2, 0] = (amax[2, 0] + 1) % V
    res = run(draft, threshold=0.5)
    assert res.accepted.tolist() == [3, 1, 0]
    assert torch.equal(res.tokens[0].cpu(), draft[0])
    assert torch.equal(res.tokens[1].cpu(), torch.cat([draft[1, :1], amax[1, 1:5], torch.full((9,), -1)]))
    assert torch.equal(res.tokens[2].cpu(), torch.cat([amax[2, :1], torch.full((13,), -1)]))
    # thresholds 0 (everything passes) and 1 (one miss rejects)
    draft[0, 7] = (amax[0, 7] + 1) % V
    assert run(draft, threshold=0.0).accepted.tolist() == [3, 3, 3]
    assert run(draft, threshold=1.0).accepted.tolist() == [2, 1, 0]


@pytest.mark.parametrize("bd", backend_params())
def test_sample_edge_cases(bd):
    backend, device = bd
    V, T, B = 7, window(0, 3), 2
    logits, q, draft, u = _sample_window(B, T, V, seed=4)
    run = lambda **kw: verify_scales(logits.to(device), draft.to(device), LAYOUT, 0, 3, mode="sample",  # noqa: E731
                                     backend=backend, uniforms=u.to(device), **{k: v.to(device) for k, v in kw.items()})
    res = run(draft_probs=q)  # p = q: always accept
    assert res.accepted.tolist() == [3, 3] and bool(res.match.all())
    q0 = q.clone()  # q(x) = 0 for the draft token of (0, 2) -> rejected there, redrawn in scale 1
    q0[0, 2, draft[0, 2]] = 0
    q0[0, 2] /= q0[0, 2].sum()
    res = run(draft_probs=q0)
    assert res.accepted.tolist() == [1, 3] and not bool(res.match[0, 2])
    assert 0 <= int(res.tokens[0, 2]) < V
    assert (res.tokens[0, 5:] == -1).all()


@pytest.mark.parametrize("bd", backend_params())
def test_low_temperature_sampling_is_greedy(bd):
    """temperature → 0 with one-hot draft probabilities = greedy mode with threshold 1 (documented)."""
    backend, device = bd
    V, T = 9, window(0, 3)
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(2, T, V, generator=g)
    amax = logits.argmax(-1)
    logits.scatter_add_(-1, amax[..., None], torch.ones(2, T, 1))  # a clear gap to the runner-up
    draft = amax.clone()
    draft[1, 3] = (amax[1, 3] + 2) % V
    one_hot = torch.nn.functional.one_hot(draft, V).float()
    kw = dict(backend=backend)
    greedy = verify_scales(logits.to(device), draft.to(device), LAYOUT, 0, 3, threshold=1.0, **kw)
    sample = verify_scales(logits.to(device), draft.to(device), LAYOUT, 0, 3, mode="sample", temperature=1e-3,
                           draft_probs=one_hot.to(device), uniforms=torch.rand(2, T, 2, generator=g).to(device), **kw)
    for a, b in zip(greedy, sample):
        assert torch.equal(a, b)
    assert greedy.accepted.tolist() == [3, 1]


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("bd", backend_params())
def test_nan_rows_never_match_and_give_minus_one(bd, mode):
    backend, device = bd
    logits, draft, kw = make_case(2, 0, 3, 10, torch.float32, hit=1.0, sample=mode == "sample", seed=8)
    if mode == "sample":
        kw["draft_probs"] = torch.softmax(logits.double(), -1).float()
        kw["uniforms"] = kw["uniforms"] * 0.99
    logits[0, 3, 4] = float("nan")
    logits[1, 0] = float("-inf")
    res = verify_scales(logits.to(device), draft.to(device), LAYOUT, 0, 3, backend=backend, threshold=1.0,
                        **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    assert_same(res, reference(logits, draft, 0, 3, threshold=1.0, **kw), torch.float32)
    assert not bool(res.match[0, 3]) and not bool(res.match[1, 0])
    assert res.accepted.tolist() == [1, 0]
    assert int(res.tokens[0, 3]) == -1 and int(res.tokens[1, 0]) == -1


@pytest.mark.parametrize("bd", backend_params())
def test_invalid_rows_from_infinities_cfg_and_temperature(bd):
    """+inf entries, all-NaN rows, CFG's inf − inf and l / temperature overflowing to +inf make a row invalid
    (never matches, target/draw −1); a row with some −inf entries stays valid (those entries have p = 0).
    Compared with the "torch" formulas at the kernels' float32 precision (overflow is precision-specific)."""
    backend, device = bd
    B, T, V, cfg = 2, window(0, 2), 6, [0.5, 1.0]
    g = torch.Generator().manual_seed(21)
    logits = torch.randn(2 * B, T, V, generator=g)
    logits[0, 0, 2] = float("inf")                                         # +inf entry
    logits[1, 1] = float("nan")                                            # all-NaN row
    logits[0, 2, 1] = logits[B, 2, 1] = float("inf")                       # (1 + t)·inf − t·inf = NaN
    logits[1, 0, :3] = float("-inf")                                       # partly −inf: valid
    logits[0, 1] = logits[B, 1] = 1e38                                     # finite; l / 0.25 = +inf in float32
    x = combined(logits, 0, 2, cfg)
    draft = torch.nan_to_num(x, nan=0.0).argmax(-1)
    q = torch.full((B, T, V), 1.0 / V)
    u = torch.rand(B, T, 2, generator=g) * 0.99
    to = lambda t: t.to(device)  # noqa: E731
    greedy = verify_scales(to(logits), to(draft), LAYOUT, 0, 2, cfg=cfg, threshold=1.0, backend=backend)
    sample = verify_scales(to(logits), to(draft.clamp(max=0)), LAYOUT, 0, 2, cfg=cfg, mode="sample",
                           temperature=0.25, draft_probs=to(q), uniforms=to(u), backend=backend)
    offsets = [0, 1, T]
    assert_same(greedy, ref.verify_scales(logits, draft, offsets, True, 1.0, None, None, cfg, 1.0), torch.float32)
    assert_same(sample, ref.verify_scales(logits, draft.clamp(max=0), offsets, False, 0.5, q, u, cfg, 0.25),
                torch.float32)
    assert greedy.accepted.tolist() == [0, 1] and greedy.match[:, :3].tolist() == [[False, True, False],
                                                                                  [True, False, True]]
    assert greedy.tokens[0, 0].item() == -1 and greedy.tokens[1, 1].item() == -1
    assert sample.accepted.tolist() == [0, 0] and sample.tokens[0, 0].item() == -1
    assert not sample.match[0, 1] and not sample.match[1, 0]               # overflowed row; a −inf token (x = 0)
    assert 3 <= sample.tokens[1, 0].item() < V                             # redrawn where p > 0 only


def _unchecked_probs_case(kind):
    """A window where row 0 passes scale 0 (q = p) and two of its scale-1 rows hold uniform draft probabilities
    that break the rules in one way (the value checks reject them), so that they are used as given."""
    B, T, V = 2, window(0, 3), 7
    logits, q, draft, u = _sample_window(B, T, V, seed=31)
    q[0, 1:3] = 1.0 / V                    # rows under test: a residual p − q well above rounding
    x0, x1 = draft[0, 1].item(), draft[0, 2].item()
    if kind == "nan":
        q[0, 1, x0] = q[0, 2, (x1 + 1) % V] = float("nan")
    elif kind == "negative":
        q[0, 1, x0] = -0.25
        q[0, 2, (x1 + 2) % V] = -1.0
    elif kind == "minus-inf":              # r = +inf: Σ r = +inf, u1·Σ r = +inf (and NaN with u1 = 0)
        q[0, 1, x0] = q[0, 2, x1] = float("-inf")
        u[0, 2, 1] = 0.0
    elif kind == "plus-inf":               # u0·q(x) = +inf never below p(x); r = −inf → 0
        q[0, 1, x0] = q[0, 2, (x1 + 3) % V] = float("inf")
    elif kind == "unnormalised":           # rows summing to 3 and to 0
        q[0, 1] *= 3
        q[0, 2] = 0
    return logits, draft, q, u


UNCHECKED = ["nan", "negative", "minus-inf", "plus-inf", "unnormalised"]


@pytest.mark.parametrize("kind", UNCHECKED)
@pytest.mark.parametrize("bd", backend_params())
def test_bad_draft_probs_raise_or_follow_the_ieee_rule(bd, kind, monkeypatch):
    """"torch"/"cpu" (and GPU backends under STREAMKERN_DEBUG=1) raise naming draft_probs; unchecked (GPU
    backends, and the C++ kernel behind "cpu" with the check switched off) every backend computes the reference's
    formulas with IEEE arithmetic: identical tokens, match and accepted counts."""
    backend, device = bd
    logits, draft, q, u = _unchecked_probs_case(kind)
    args = [t.to(device) for t in (logits, draft, q, u)]
    before = [a.clone() for a in args]
    run = lambda: verify_scales(args[0], args[1], LAYOUT, 0, 3, mode="sample", draft_probs=args[2],  # noqa: E731
                                uniforms=args[3], backend=backend)
    if backend in ("triton", "cuda"):
        monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="draft_probs"):
        run()
    assert all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(args, before))
    if backend == "torch":
        return
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    if backend == "cpu":
        monkeypatch.setattr(ref, "check_values", lambda *a: None)
    res = run()
    exp = ref.verify_scales(logits.double(), draft, [0, 1, 5, 14], False, 0.5, q.double(), u, None, 1.0)
    assert_same(res, exp, torch.float32)
    assert res.accepted[0].item() == 1 and not res.match[0, 1]              # the rows under test were redrawn
    assert (res.tokens[0, 1:5] >= 0).all()


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("cfg", [None, [0.5]], ids=["nocfg", "cfg"])
@pytest.mark.parametrize("bd", backend_params())
def test_empty_batch(bd, cfg, mode):
    backend, device = bd
    rows = 0
    kw = dict(mode=mode, cfg=cfg)
    if mode == "sample":
        kw.update(draft_probs=torch.zeros(0, 4, 5, device=device))
    res = verify_scales(torch.zeros(rows, 4, 5, device=device), torch.zeros(0, 4, dtype=torch.long, device=device),
                        LAYOUT, 1, 1, backend=backend, **kw)
    assert [tuple(t.shape) for t in res] == [(0,), (0, 4), (0, 1), (0, 4)]
    assert [t.dtype for t in res] == [torch.int64, torch.bool, torch.float32, torch.int64]


def test_generator_draws_uniforms():
    logits, draft, kw = make_case(2, 0, 3, 6, torch.float32, sample=True, seed=9)
    kw.pop("uniforms")
    runs = [verify_scales(logits, draft, LAYOUT, 0, 3, backend="torch", generator=torch.Generator().manual_seed(1),
                          **kw) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


BAD = [  # (mutation, error type, words the message must hold)
    pytest.param(lambda a: a.update(draft=a["draft"][:, :-1]), ValueError, "T=13", id="wrong-T"),
    pytest.param(lambda a: a.update(cfg=[1.0]), ValueError, "cfg", id="cfg-length"),
    pytest.param(lambda a: a.update(logits=a["logits"][:2]), ValueError, "2B", id="cfg-rows"),
    pytest.param(lambda a: a.update(draft=a["draft"].int()), TypeError, "int64", id="draft-dtype"),
    pytest.param(lambda a: a.update(logits=a["logits"].double()), TypeError, "float32", id="logits-dtype"),
    pytest.param(lambda a: a.update(mode="beam"), ValueError, "mode", id="mode"),
    pytest.param(lambda a: a.update(threshold=1.5), ValueError, "threshold", id="threshold"),
    pytest.param(lambda a: a.update(temperature=0.0), ValueError, "temperature", id="temperature"),
    pytest.param(lambda a: a.update(num=9), ValueError, "num_scales", id="num-scales"),
    pytest.param(lambda a: a.update(draft_probs=None), ValueError, "draft_probs", id="no-draft-probs"),
    pytest.param(lambda a: a.update(uniforms=a["uniforms"][..., :1]), ValueError, "uniforms", id="uniforms-shape"),
    pytest.param(lambda a: a.update(cfg=[float("nan"), 1.0]), ValueError, r"cfg\[0\]", id="cfg-nan"),
    pytest.param(lambda a: a.update(cfg=[1.0, -0.5]), ValueError, r"cfg\[1\].*>= 0", id="cfg-negative"),
    pytest.param(lambda a: a.update(cfg=[float("inf"), 1.0]), ValueError, r"cfg\[0\].*finite", id="cfg-inf"),
    pytest.param(lambda a: a.update(cfg=torch.ones(1, 2)), ValueError, "cfg", id="cfg-2d-tensor"),
    pytest.param(lambda a: a.update(temperature=float("inf")), ValueError, "temperature", id="temperature-inf"),
    pytest.param(lambda a: a.update(temperature=float("nan")), ValueError, "temperature", id="temperature-nan"),
    pytest.param(lambda a: a.update(logits=a["logits"][..., :0], draft_probs=a["draft_probs"][..., :0]),
                 ValueError, "target_logits.*V=0", id="V0"),
    pytest.param(lambda a: a.update(draft=a["draft"][:, :0]), ValueError, "draft_tokens.*got 0", id="T0"),
    pytest.param(lambda a: a.update(layout=SimpleNamespace(begin=(0, 1, 1), end=(1, 1, 5))), ValueError,
                 "layout.*non-empty", id="empty-scale"),
]


def _bad_args():
    logits, draft, kw = make_case(2, 1, 2, 6, torch.float32, cfg=[1.0, 2.0], sample=True, seed=12)
    return dict(logits=logits, draft=draft, num=2, **kw)


def _call(a, backend):
    a = dict(a)
    return verify_scales(a.pop("logits"), a.pop("draft"), a.pop("layout", LAYOUT), 1, a.pop("num"),
                         backend=backend, **a)


@pytest.mark.parametrize("mutate,exc,words", BAD)
def test_bad_input(mutate, exc, words):
    a = _bad_args()
    mutate(a)
    before = {k: v.clone() for k, v in a.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(exc, match=words):
        _call(a, "torch")
    assert all(torch.equal(before[k], a[k]) for k in before)


def _value_mutations():
    def oov(a):
        a["draft"][1, 2] = 6

    def unnormalised(a):
        a["draft_probs"][0, 1] *= 1.5

    return [pytest.param(oov, "draft_tokens", id="token-out-of-vocab"),
            pytest.param(unnormalised, "draft_probs", id="probs-not-summing-to-1")]


@pytest.mark.parametrize("mutate,words", _value_mutations())
@pytest.mark.parametrize("bd", backend_params())
def test_bad_values(bd, mutate, words, monkeypatch):
    backend, device = bd
    if backend in ("triton", "cuda"):
        monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    a = _bad_args()
    mutate(a)
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    with pytest.raises(ValueError, match=words):
        _call(a, backend)


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_no_host_sync(bd):
    """No host read but the value check ("cpu" checks token values on purpose, booked apart)."""
    backend, device = bd
    a = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in _bad_args().items()}
    with count_host_syncs(forbid=True):
        res = _call(a, backend)
    assert_same(res, reference(**{"logits": a["logits"].cpu(), "draft": a["draft"].cpu(), "first": 1, "num": 2},
                               **{k: a[k] for k in ("mode", "draft_probs", "uniforms", "cfg")}), torch.float32)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_opcheck(backend, mode):
    if backend not in streamkern.available_backends("cpu"):
        pytest.skip(f"{backend} not built")
    logits, draft, kw = make_case(2, 1, 2, 6, torch.float32, cfg=[1.0, 2.0], sample=mode == "sample", seed=13)
    torch.library.opcheck(verify_scales_op.custom_op, (logits, draft, [0, 4, 13], mode == "greedy", 0.5,
                                                       kw.get("draft_probs"), kw.get("uniforms"), kw["cfg"], 1.0,
                                                       backend))


def test_torch_compile_fullgraph():
    backend = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"
    logits, draft, kw = make_case(2, 1, 2, 6, torch.float32, cfg=[1.0, 2.0], sample=True, seed=14)

    def step(logits, draft, q, u):
        res = streamkern.verify_scales(logits, draft, LAYOUT, 1, 2, mode="sample", draft_probs=q, uniforms=u,
                                       cfg=[1.0, 2.0], backend=backend)
        return res.tokens, res.accepted + 1

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    exp = step(logits, draft, kw["draft_probs"], kw["uniforms"])
    got = compiled(logits, draft, kw["draft_probs"], kw["uniforms"])
    assert all(torch.equal(a, b) for a, b in zip(got, exp))

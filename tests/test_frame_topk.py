"""frame_topk (docs/contract.md §4.5): every backend against the float64 "torch" reference (indices equal exactly) and
the reference against a per-(b, h) scoring loop with a ranking by (score, position); per-head and shared rankings,
-1 candidates, duplicates, ties, k = 0 and k > C, every dtype, non-contiguous q, means of unlisted pages holding
NaN/inf; bad input, opcheck, compile, host syncs (launches per call: tests/test_gpu.py, tests/test_gpu_readiness.py)."""

import pytest
import torch
from conftest import DTYPES, backend_params

import streamkern
from streamkern.ops.reference import frame_topk as ref

from streamkern.ops import frame_topk as ft
ALL = backend_params(ops=[ft.frame_topk_op])
GPU = backend_params(exclude=("torch", "cpu"), ops=[ft.frame_topk_op])

CASES = [  # B, Lq, H, D, P, C, k, holes
    pytest.param((1, 1, 1, 1, 1, 1, 1, False), id="all-ones"),
    pytest.param((2, 5, 3, 8, 9, 6, 3, True), id="holes"),
    pytest.param((3, 7, 2, 5, 4, 4, 6, True), id="k-over-C"),
    pytest.param((2, 3, 4, 16, 11, 11, 0, False), id="k0"),
    pytest.param((1, 13, 2, 12, 6, 9, 9, False), id="dups-all-chosen"),
    pytest.param((1, 40, 1, 64, 3, 3, 2, False), id="Lq40-D64-query-tiles"),
]


def _case(case, dtype, device, seed=0):
    B, Lq, H, D, P, C, k, holes = case
    gen = torch.Generator().manual_seed(seed + sum(case[:7]))
    q = torch.randn(B, Lq, H, D, generator=gen).to(device, dtype)
    k_mean = torch.randn(B, P, H, D, generator=gen).to(device)
    cand = torch.randint(P, (B, C), generator=gen)
    if holes:
        cand = torch.where(torch.rand(B, C, generator=gen) < 0.4, -1, cand)
    return q, k_mean, cand.to(device), k


def _loop(q, k_mean, cand, k, per_head):
    """Per (b, h): score every candidate in float64, rank by (-score, position)."""
    B, _, H, _ = q.shape
    qbar = q.double().mean(dim=1)
    out = torch.full((B, H, k) if per_head else (B, k), -1, dtype=torch.int64)
    for b in range(B):
        s = torch.stack([torch.stack([qbar[b, h] @ k_mean[b, max(int(c), 0), h].double() for c in cand[b]])
                         if cand.shape[1] else torch.zeros(0, dtype=torch.float64) for h in range(H)])
        for h, row in enumerate(s if per_head else s.mean(0, keepdim=True)):
            ranked = sorted((-float(row[c]), c) for c in range(cand.shape[1]) if int(cand[b, c]) >= 0)[:k]
            ids = torch.tensor([int(cand[b, c]) for _, c in ranked], dtype=torch.int64)
            (out[b, h] if per_head else out[b])[:len(ids)] = ids
    return out


def _reference(q, k_mean, cand, k, per_head):
    return ref.frame_topk(q.cpu().double(), k_mean.cpu().double(), cand.cpu(), k, per_head)


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "shared"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_parity(bd, dtype, case, per_head):
    q, k_mean, cand, k = _case(case, dtype, bd[1])
    out = streamkern.frame_topk(q, k_mean, cand, k, per_head=per_head, backend=bd[0])
    B, _, H, _ = q.shape
    assert out.dtype == torch.int64 and out.shape == ((B, H, k) if per_head else (B, k))
    assert torch.equal(out.cpu(), _reference(q, k_mean, cand, k, per_head))


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "shared"])
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop(case, per_head):
    q, k_mean, cand, k = _case(case, torch.float32, "cpu")
    assert torch.equal(_reference(q, k_mean, cand, k, per_head), _loop(q, k_mean, cand, k, per_head))


@pytest.mark.parametrize("bd", ALL)
def test_ties_go_to_the_lower_position_and_duplicates_count_twice(bd):
    q = torch.ones(1, 2, 2, 3, device=bd[1])
    k_mean = torch.zeros(1, 5, 2, 3, device=bd[1])
    k_mean[0, 1] = 1.0                                              # pages 1 and 3 tie, page 4 is best
    k_mean[0, 3] = 1.0
    k_mean[0, 4] = 2.0
    cand = torch.tensor([[0, 3, -1, 1, 4, 3]], device=bd[1])
    out = streamkern.frame_topk(q, k_mean, cand, 5, per_head=True, backend=bd[0])
    assert out.tolist() == [[[4, 3, 1, 3, 0]] * 2]


@pytest.mark.parametrize("bd", ALL)
def test_non_contiguous_q_and_k_mean(bd):
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, bd[1])
    q2 = q.transpose(1, 2).contiguous().transpose(1, 2)
    km2 = torch.stack([k_mean, k_mean], dim=-1)[..., 1]
    out = streamkern.frame_topk(q2, km2, cand.t().contiguous().t(), k, backend=bd[0])
    assert torch.equal(out.cpu(), _reference(q, k_mean, cand, k, True))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "shared"])
@pytest.mark.parametrize("bd", ALL)
def test_means_of_pages_not_listed_never_count(bd, per_head, value):
    """``k_mean`` of every page a row does not list (page 0 among them, the clamp target of -1; pages the other
    row lists) holds ``value`` (a pool made with torch.empty): the ranking equals the one over a clean k_mean."""
    gen = torch.Generator().manual_seed(3)
    q, k_mean = torch.randn(2, 3, 2, 8, generator=gen), torch.randn(2, 6, 2, 8, generator=gen)
    cand = torch.tensor([[3, -1, 5, 1], [-1, 2, 4, -1]])
    want = _reference(q, k_mean, cand, 4, per_head)
    unlisted = torch.ones(2, 6, dtype=torch.bool)
    for b, row in enumerate(cand.tolist()):
        unlisted[b, [c for c in row if c >= 0]] = False
    poisoned = k_mean.masked_fill(unlisted[:, :, None, None], value)
    out = streamkern.frame_topk(q.to(bd[1]), poisoned.to(bd[1]), cand.to(bd[1]), 4, per_head=per_head,
                                backend=bd[0])
    assert torch.equal(out.cpu(), want)


# ---- bad input ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [9, -2], ids=["high", "below-minus-one"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_out_of_range_candidates_raise_on_torch_and_cpu(backend, bad):
    if backend not in streamkern.available_backends("cpu") or backend not in ft.frame_topk_op.backends.impls:
        pytest.skip(f"{backend} not available")
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, "cpu")
    cand[1, 2] = bad
    with pytest.raises(ValueError, match="candidates: expected page ids in \\[0, 9\\) or -1"):
        streamkern.frame_topk(q, k_mean, cand, k, backend=backend)


@pytest.mark.parametrize("bd", GPU)
def test_gpu_backends_treat_out_of_range_as_missing(bd, monkeypatch):
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, bd[1])
    bad = torch.where(cand < 0, 9, cand)
    assert torch.equal(streamkern.frame_topk(q, k_mean, bad, k, backend=bd[0]).cpu(),
                       _reference(q, k_mean, cand, k, True))
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="candidates: expected page ids"):
        streamkern.frame_topk(q, k_mean, bad, k, backend=bd[0])


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu", "cuda"), ops=[ft.frame_topk_op]))
def test_triton_candidate_limit(bd):
    q, k_mean, _, _ = _case(CASES[1].values[0], torch.float32, bd[1])
    cand = torch.full((q.shape[0], ft.TRITON_MAX_CANDIDATES + 1), -1, device=bd[1])
    with pytest.raises(streamkern.BackendUnavailable, match="takes at most 4096 candidates per row"):
        streamkern.frame_topk(q, k_mean, cand, 1, backend=bd[0])


def _good():
    return list(_case(CASES[1].values[0], torch.float32, "cpu"))


BAD = [
    pytest.param(0, lambda t: t[0], ValueError, "q: expected a 4-d", id="q-rank"),
    pytest.param(0, lambda t: t[:, :0], ValueError, "q: expected at least one query", id="q-empty"),
    pytest.param(1, lambda t: t.half(), TypeError, "k_mean: expected dtype float32", id="mean-dtype"),
    pytest.param(1, lambda t: t[:, :, :1], ValueError, "k_mean: expected shape", id="mean-heads"),
    pytest.param(2, lambda t: t.int(), TypeError, "candidates: expected dtype int64", id="cand-int32"),
    pytest.param(2, lambda t: t[:1], ValueError, "candidates: expected shape", id="cand-batch"),
    pytest.param(3, lambda t: -1, ValueError, "k: expected an int in \\[0", id="k-negative"),
    pytest.param(3, lambda t: 2.0, TypeError, "k: expected an int", id="k-float"),
]


@pytest.mark.parametrize("i, change, exc, msg", BAD)
def test_bad_inputs(i, change, exc, msg):
    args = _good()
    args[i] = change(args[i])
    with pytest.raises(exc, match=msg):
        streamkern.frame_topk(*args, backend="torch")
    with pytest.raises(TypeError, match="per_head: expected a bool"):
        streamkern.frame_topk(*_good(), per_head=1, backend="torch")


# ---- torch.library integration, launches and host syncs ----------------------------------------------------------

@pytest.mark.parametrize("bd", ALL)
def test_opcheck(bd):
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, bd[1])
    for per_head in (True, False):
        torch.library.opcheck(ft.frame_topk_op.custom_op, (q, k_mean, cand, k, per_head, bd[0]))


@pytest.mark.parametrize("bd", ALL)
def test_compile_fullgraph(bd):
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, bd[1])

    def select(q, k_mean, cand):
        return streamkern.frame_topk(q * 2, k_mean, cand, k, backend=bd[0]) + 1

    out = torch.compile(select, fullgraph=True, backend="aot_eager")(q, k_mean, cand)
    assert torch.equal(out, streamkern.frame_topk(q * 2, k_mean, cand, k, backend=bd[0]) + 1)


@pytest.mark.parametrize("bd", GPU)
def test_no_host_sync(bd, monkeypatch):
    from streamkern.capture import count_host_syncs

    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    q, k_mean, cand, k = _case(CASES[1].values[0], torch.float32, bd[1])
    with count_host_syncs(forbid=True):
        out = streamkern.frame_topk(q, k_mean, cand, k, backend=bd[0])
    assert torch.equal(out.cpu(), _reference(q, k_mean, cand, k, True))

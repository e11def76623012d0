"""The shared memory-overlap checks (issue 11 item 2): exact on every layout, fast paths included, and checked
against a brute-force count of shared element addresses."""
import pytest
import torch

from streamkern import _checks as check


def _addresses(t: torch.Tensor) -> set[int]:
    """Byte addresses of every element of ``t`` (brute force, small tensors only)."""
    offs = torch.zeros((), dtype=torch.int64)
    for d, (n, s) in enumerate(zip(t.shape, t.stride())):
        shape = [1] * t.dim()
        shape[d] = n
        offs = offs + (torch.arange(n) * s).reshape(shape)
    return {t.data_ptr() + int(o) * t.element_size() + b for o in offs.reshape(-1) for b in range(t.element_size())}


def _internally_overlaps(t: torch.Tensor) -> bool:
    return len(_addresses(t)) < t.numel() * t.element_size()


BASE = torch.zeros(4 * 5 * 6 * 2)
LAYOUTS = {
    "contiguous": BASE.view(4, 5, 6, 2),
    "sliced": BASE.view(4, 5, 6, 2)[:, 1:4],
    "transposed": BASE.view(4, 5, 6, 2).transpose(1, 2),
    "every-other": BASE.view(4, 5, 12)[:, :, ::2],
    "expanded": BASE[:12].view(6, 2).expand(3, 6, 2),
    "size-1-stride-0": BASE[:12].view(1, 6, 2).expand(1, 6, 2),
    "interleaved-no-overlap": BASE.as_strided((3, 2), (2, 3)),        # offsets 0 2 4 3 5 7: no nesting, disjoint
    "interleaved-overlap": BASE.as_strided((4, 3), (2, 3)),           # offset 6 twice (3*2 == 2*3)
    "gapped": BASE.as_strided((2, 3, 2), (40, 7, 3)),
    "sliding-window": BASE.as_strided((5, 4), (1, 1)),
    "empty": BASE[:0].view(0, 3),
    "scalar": BASE[3],
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_no_internal_overlap_is_exact(name):
    t = LAYOUTS[name]
    if t.numel() and _internally_overlaps(t):
        with pytest.raises(ValueError, match="^cache_k: expected a tensor whose elements do not share memory"):
            check.no_internal_overlap("cache_k", t)
    else:
        check.no_internal_overlap("cache_k", t)


def test_no_internal_overlap_names_the_issues_expanded_cache():
    cache = torch.zeros(1, 2, 8, 3, 4).expand(5, 2, 8, 3, 4)  # one layer's storage expanded over NL
    with pytest.raises(ValueError, match="cache_v: .*strides \\(0, 96, 12, 4, 1\\)"):
        check.no_internal_overlap("cache_v", cache)


PARENT = torch.zeros(3, 2, 10, 2, 4)  # [NL, B, S, H, D] cache
PAIRS = {
    "issue-slice-of-cache": (PARENT, PARENT[:, :, 0:3]),
    "disjoint-slices": (PARENT[:, :, 0:4], PARENT[:, :, 4:7]),
    "touching-by-one-element": (PARENT.view(-1)[:10], PARENT.view(-1)[9:20]),
    "adjacent": (PARENT.view(-1)[:10], PARENT.view(-1)[10:20]),
    "same-tensor": (PARENT, PARENT),
    "interleaved-k-v": (PARENT[..., 0, :], PARENT[..., 1, :]),         # k and v of one token interleaved: disjoint
    "interleaved-partial": (PARENT[..., 0, :], PARENT.view(-1)[6:10]),
    "strided-hit": (PARENT[:, :, ::3], PARENT[:, :, 3:4]),
    "strided-miss": (PARENT[:, :, ::3], PARENT[:, :, 4:6]),
    "broadcast-input-miss": (PARENT[0, 0, 0], PARENT[1, 1, 9, 1].expand(7, 4)),
    "broadcast-input-hit": (PARENT[0, 0, 0], PARENT[0, 0, 0, 1, 2:3].expand(7, 1)),
    "other-storage": (PARENT, torch.zeros(3, 2, 10, 2, 4)),
    "reinterpreted-dtype": (PARENT[:, :, :2], PARENT.view(torch.int16)[:, :, 1, 0, :4]),
    "empty-input": (PARENT, PARENT[:, :, 0:0]),
}


@pytest.mark.parametrize("name", PAIRS)
def test_no_overlap_is_exact(name):
    out, inp = PAIRS[name]
    shares = bool(inp.numel()) and bool(_addresses(out) & _addresses(inp))
    if shares:
        with pytest.raises(ValueError, match="^k_new: expected a tensor that does not share memory with cache_k"):
            check.no_overlap("cache_k", out, v_new=torch.zeros(2), k_new=inp)
    else:
        check.no_overlap("cache_k", out, v_new=torch.zeros(2), k_new=inp)


def test_no_overlap_names_the_first_overlapping_input_and_skips_none():
    check.no_overlap("bank_k", PARENT[:, :, :5], chunk_k=None, chunk_v=PARENT[:, :, 5:])
    with pytest.raises(ValueError, match="^chunk_v: "):
        check.no_overlap("bank_k", PARENT[:, :, :5], chunk_k=None, chunk_v=PARENT[:, :, 4:])


def test_meta_tensors_compare_by_storage():
    meta = torch.zeros(4, 6, device="meta")
    check.no_overlap("out", meta[:2], x=meta[2:], y=torch.zeros(4, 6, device="meta"))
    with pytest.raises(ValueError, match="^x: "):
        check.no_overlap("out", meta[:3], x=meta[2:])
    with pytest.raises(ValueError, match="^out: "):
        check.no_internal_overlap("out", meta[0].expand(3, 6))


def test_overlap_checks_read_no_values_and_leave_memory_alone():
    """Only shapes, strides and addresses are used: a NaN-filled view is handled like any other."""
    t = torch.full((4, 6), float("nan"))
    check.no_overlap("out", t[:2], x=t[2:])
    assert torch.isnan(t).all()


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan"), 10 ** 400])
def test_number_rejects_non_finite(value):
    """README "Error rules": a non-finite scalar argument is a ValueError naming it (it used to pass for ±inf)."""
    with pytest.raises(ValueError, match="^sm_scale: expected a finite number"):
        check.number("sm_scale", value)
    with pytest.raises(ValueError, match="^layer_weights\\[1\\]: expected a finite number"):
        check.float_tuple("layer_weights", (0.5, value))
    assert check.number("sm_scale", 3) == 3.0

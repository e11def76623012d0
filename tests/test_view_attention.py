"""view_attention (SDPA over a view, with the log-sum-exp of the kernel SDPA picks) and merge_attention, against a
float64 softmax on every device here and on CUDA (where cuDNN, flash and efficient attention each give the lse)."""
import pytest
import torch

from conftest import DTYPES
from streamkern.testing import assert_parity
from streamkern.ops.view_attention import merge_attention, view_attention

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _reference(q, k, v, scale):
    """``(out [B, Lq, H, D], lse [B, H, Lq])`` in float64."""
    s = scale * torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double())
    lse = torch.logsumexp(s, dim=-1)
    out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.double())
    return out, lse


def _pool(B, P, F, H, D, dtype, device, gen):
    """A pool layer ``[B, P, F, H, D]`` (with padding pages) and its view over the first ``P - 1`` pages."""
    pool = torch.randn(B, P, F, H, D, generator=gen).to(dtype).to(device)
    return pool, pool[:, :P - 1].flatten(1, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [64, 128])
def test_out_and_lse_match_the_float64_softmax(device, dtype, D):
    gen = torch.Generator().manual_seed(D)
    B, H, F = 2, 3, 37
    q = torch.randn(B, 45, H, D, generator=gen).to(dtype).to(device)[:, 2:]        # Lq = 43, a sliced view
    pool_k, k = _pool(B, 5, F, H, D, dtype, device, gen)
    pool_v, v = _pool(B, 5, F, H, D, dtype, device, gen)
    for scale in (None, 1.0):
        s = D ** -0.5 if scale is None else scale
        ref_out, ref_lse = _reference(q.cpu(), k.cpu(), v.cpu(), s)
        plain = view_attention(q, k, v, sm_scale=scale)
        out, lse = view_attention(q, k, v, sm_scale=scale, return_lse=True)
        assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (B, H, 43)
        assert_parity(plain, ref_out, dtype, "out")
        assert_parity(out, ref_out, dtype, "out with lse")
        assert_parity(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "lse")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_of_two_parts_is_the_attention_over_their_union(device, dtype):
    gen = torch.Generator().manual_seed(1)
    B, H, D = 2, 2, 64
    q = torch.randn(B, 20, H, D, generator=gen).to(dtype).to(device)
    k = torch.randn(B, 90, H, D, generator=gen).to(dtype).to(device)
    v = torch.randn(B, 90, H, D, generator=gen).to(dtype).to(device)
    ref_out, ref_lse = _reference(q.cpu(), k.cpu(), v.cpu(), D ** -0.5)
    a = view_attention(q, k[:, :33], v[:, :33], return_lse=True)
    b = view_attention(q, k[:, 33:], v[:, 33:], return_lse=True)
    out, lse = merge_attention(*a, *b)
    assert_parity(out, ref_out, dtype, "merged out")
    assert_parity(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "merged lse")


@pytest.mark.parametrize("device", DEVICES)
def test_an_empty_side_has_weight_zero(device):
    q = torch.randn(1, 4, 2, 16, device=device)
    k, v = torch.randn(1, 7, 2, 16, device=device), torch.randn(1, 7, 2, 16, device=device)
    empty = torch.zeros(1, 0, 2, 16, device=device)
    out0, lse0 = view_attention(q, empty, empty, return_lse=True)
    assert torch.equal(out0, torch.zeros_like(q)) and bool((lse0 == float("-inf")).all())
    assert torch.equal(view_attention(q, empty, empty), torch.zeros_like(q))
    full = view_attention(q, k, v, return_lse=True)
    for out, lse in (merge_attention(*full, out0, lse0), merge_attention(out0, lse0, *full)):
        assert torch.allclose(out, full[0], rtol=0, atol=1e-6) and torch.equal(lse, full[1])
    out, lse = merge_attention(out0, lse0, out0, lse0)
    assert torch.equal(out, torch.zeros_like(q)) and bool((lse == float("-inf")).all())


def test_bad_arguments():
    q = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="k: expected"):
        view_attention(q, torch.zeros(1, 5, 3, 16), torch.zeros(1, 5, 3, 16))
    with pytest.raises(TypeError, match="v: expected dtype"):
        view_attention(q, torch.zeros(1, 5, 2, 16), torch.zeros(1, 5, 2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="sm_scale"):
        view_attention(q, torch.zeros(1, 5, 2, 16), torch.zeros(1, 5, 2, 16), sm_scale=float("nan"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_never_syncs_and_replays_in_a_graph(dtype):
    """At MemFlow's head dim, under sync debug mode "error", and captured once then replayed on new inputs."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(1, 300, 4, 128, generator=gen, device="cuda").to(dtype)
    k = torch.randn(1, 900, 4, 128, generator=gen, device="cuda").to(dtype)
    v = torch.randn(1, 900, 4, 128, generator=gen, device="cuda").to(dtype)
    torch.cuda.set_sync_debug_mode("error")
    try:
        view_attention(q, k, v, return_lse=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = view_attention(q, k, v, return_lse=True)
    q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
    graph.replay()
    ref_out, ref_lse = _reference(q.cpu(), k.cpu(), v.cpu(), 128 ** -0.5)
    assert_parity(out, ref_out, dtype, "replayed out")
    assert_parity(lse, ref_lse, torch.float32 if dtype == torch.float32 else dtype, "replayed lse")

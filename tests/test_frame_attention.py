"""frame_attention (docs/contract.md §4.5): every backend against the float64 "torch" reference; the reference against a
plain per-(b, h) gather + cat + softmax formula and against FlexAttention; odd sizes (frame_len 1 and primes, one
page, Lq = 1), every dtype, non-contiguous q and padded-then-sliced pages, -1 entries, per-head and shared tables,
duplicate ids, gates, rows with no key, lse, empty tables, NaN/inf in everything not listed; bad input, opcheck,
compile, host syncs (launches per call: tests/test_gpu.py, tests/test_gpu_readiness.py)."""

import pytest
import torch
from conftest import DTYPES, backend_params

import streamkern
from streamkern.ops.reference import frame_attention as ref
from streamkern.testing import assert_parity, triton_launches_wrapped

from streamkern.ops import frame_attention as fa
# no "cuda" backend: the Triton kernel is the GPU path
ALL = backend_params(exclude=("cuda",), ops=[fa.frame_attention_op])
GPU = backend_params(exclude=("torch", "cpu", "cuda"), ops=[fa.frame_attention_op])

# B, Lq, H, D, P, F, K, Ln, per_head, gate ("none", "all", "mixed"), table pattern
CASES = [
    pytest.param((1, 1, 1, 1, 1, 1, 1, 0, False, "none", "plain"), id="all-ones"),
    pytest.param((2, 5, 3, 8, 6, 7, 4, 3, True, "mixed", "holes"), id="F7-perhead-holes-gate"),
    pytest.param((2, 1, 2, 16, 4, 1, 5, 0, False, "all", "dups"), id="F1-Lq1-dups"),
    pytest.param((1, 3, 2, 5, 1, 13, 1, 2, True, "none", "plain"), id="one-page-F13-D5"),
    pytest.param((3, 4, 2, 4, 5, 3, 3, 0, True, "none", "nokey"), id="rows-with-no-key"),
    pytest.param((2, 6, 1, 12, 7, 5, 0, 4, False, "mixed", "plain"), id="K0-new-only"),
    pytest.param((1, 17, 2, 16, 3, 11, 2, 19, False, "none", "plain"), id="Lq17-F11-Ln19"),
    pytest.param((1, 2, 1, 4, 2, 37, 3, 0, True, "none", "dups"), id="F37-tiles-per-page"),
]


def _table(B, H, K, P, per_head, pattern, gen):
    shape = (B, H, K) if per_head else (B, K)
    table = torch.stack([torch.randperm(P, generator=gen)[:K] for _ in range(B * (H if per_head else 1))])
    if K > P:
        table = torch.randint(P, (table.shape[0], K), generator=gen)
    table = table.reshape(shape)
    if pattern == "holes":
        table = torch.where(torch.rand(shape, generator=gen) < 0.4, -1, table)
    if pattern == "dups":
        table = torch.randint(min(P, 2), shape, generator=gen)
    if pattern == "nokey":
        table[0] = -1                                       # batch row 0: every head has no key
        if per_head:
            table[1, 0] = -1                                # row 1, head 0 has no key
    return table


def _case(case, dtype, device, seed=0):
    B, Lq, H, D, P, F, K, Ln, per_head, gate, pattern = case
    gen = torch.Generator().manual_seed(seed + sum(case[:8]))
    q = torch.randn(B, Lq, H, D, generator=gen).to(device, dtype)
    kp, vp = (torch.randn(B, P, F, H, D, generator=gen).to(device, dtype) for _ in range(2))
    new = [torch.randn(B, Ln, H, D, generator=gen).to(device, dtype) for _ in range(2)] if Ln else [None, None]
    table = _table(B, H, K, P, per_head, pattern, gen).to(device)
    g = None if gate == "none" else torch.ones(B, dtype=torch.bool, device=device)
    if gate == "mixed":
        g[0] = False
    return q, kp, vp, table, new[0], new[1], g


def _reference(q, kp, vp, table, new_k, new_v, gate, sm_scale=None):
    """The float64 "torch" reference (on the CPU)."""
    B, _, H, D = q.shape
    table = table.cpu() if table.dim() == 3 else table.cpu()[:, None].expand(B, H, table.shape[-1])
    d = [None if t is None else t.cpu().double() for t in (q, kp, vp, new_k, new_v)]
    return ref.frame_attention(d[0], d[1], d[2], table, d[3], d[4], None if gate is None else gate.cpu(),
                               D ** -0.5 if sm_scale is None else sm_scale)


def _check(bd, dtype, q, kp, vp, table, new_k, new_v, gate, sm_scale=None, bound=None, want=None):
    """The op on ``bd`` against the float64 reference of the same arguments (or ``want``, ``(out, lse)`` of
    others): out at the bound of ``dtype``, lse at the fp32 bound, or both at the bound of the dtype ``bound``."""
    out, lse = streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate,
                                          sm_scale=sm_scale, return_lse=True, backend=bd[0])
    want, want_lse = want or _reference(q, kp, vp, table, new_k, new_v, gate, sm_scale)
    assert out.dtype == dtype and out.shape == q.shape and out.device.type == bd[1]
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_parity(out, want, bound or dtype, "out")
    empty = torch.isinf(want_lse)
    assert torch.equal(torch.isinf(lse).cpu(), empty) and bool((lse.cpu()[empty] < 0).all())
    assert_parity(torch.where(empty, 0.0, lse.cpu().double()), torch.where(empty, 0.0, want_lse),
                  bound or torch.float32, "lse")
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bd", ALL)
def test_parity(bd, dtype, case):
    _check(bd, dtype, *_case(case, dtype, bd[1]))


# fp32 dots (docs/contract.md §4.5): 3xTF32 while torch's float32 matmul precision is "highest" (the fp32 bound), plain TF32
# when it is "high" or "medium" (the bf16 bound): (setting, the kernel's input_precision, the bound that applies)
FP32_PRECISIONS = [pytest.param("highest", "tf32x3", torch.float32, id="highest"),
                   pytest.param("high", "tf32", torch.bfloat16, id="high"),
                   pytest.param("medium", "tf32", torch.bfloat16, id="medium")]
# the GPU's fp32 tiles: 128 query rows (Lq > 64), head dim 128 (16-key tiles with 3xTF32); only on CUDA
GPU_TILES = pytest.param((2, 130, 2, 128, 5, 37, 4, 40, True, "mixed", "holes"), id="Lq130-D128-F37-Ln40",
                         marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="no CUDA device on this machine (the interpreter runs "
                                                         "16x16 tiles)"))


@pytest.mark.parametrize("case", [CASES[6], GPU_TILES])
@pytest.mark.parametrize("setting, precision, bound", FP32_PRECISIONS)
@pytest.mark.parametrize("bd", GPU)
def test_fp32_precision_follows_torch_matmul_precision(bd, setting, precision, bound, case):
    """The launch's dot precision follows ``torch.get_float32_matmul_precision()``, and fp32 out and lse meet the
    bound that precision carries (on CUDA; Triton's interpreter computes dots in fp32 under every setting)."""
    torch.set_float32_matmul_precision(setting)      # conftest restores "highest"
    launched = []

    def record(kernel, launch, args, kwargs):
        launched.append(kwargs["PRECISION"])
        return launch(*args, **kwargs)

    with triton_launches_wrapped(record):
        _check(bd, torch.float32, *_case(case, torch.float32, bd[1]), bound=bound)
    assert launched == [precision]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", ALL)
def test_non_contiguous_q_and_padded_pages(bd, dtype):
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], dtype, bd[1])
    B, Lq, H, D = q.shape
    q = q.transpose(1, 2).contiguous().transpose(1, 2)                         # [B, Lq, H, D] over [B, H, Lq, D]
    padded = torch.randn(B, kp.shape[1], kp.shape[2] + 3, H, D + 2).to(bd[1], dtype)
    padded[:, :, :kp.shape[2], :, :D] = kp
    kp = padded[:, :, :kp.shape[2], :, :D]                                       # pages padded, then sliced
    vp = vp.permute(0, 1, 3, 2, 4).contiguous().permute(0, 1, 3, 2, 4)
    new_k = torch.stack([new_k, torch.zeros_like(new_k)], dim=-1)[..., 0]       # stride 2 over D
    assert not (q.is_contiguous() or kp.is_contiguous() or vp.is_contiguous() or new_k.is_contiguous())
    _check(bd, dtype, q, kp, vp, table, new_k, new_v, gate)


@pytest.mark.parametrize("bd", ALL)
def test_sm_scale_one_and_shared_table_broadcast_gate(bd):
    q, kp, vp, table, new_k, new_v, _ = _case(CASES[2].values[0], torch.float32, bd[1])
    _check(bd, torch.float32, q, kp, vp, table, new_k, new_v, torch.tensor(True, device=bd[1]), sm_scale=1.0)
    out = streamkern.frame_attention(q, kp, vp, table, gate=torch.tensor(False, device=bd[1]), backend=bd[0])
    assert not out.any()


@pytest.mark.parametrize("bd", ALL)
def test_shared_table_equals_per_head_copy(bd):
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[6].values[0], torch.float32, bd[1])
    shared = streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, backend=bd[0])
    per_head = table[:, None].expand(-1, q.shape[2], -1).contiguous()
    assert torch.equal(shared, streamkern.frame_attention(q, kp, vp, per_head, new_k=new_k, new_v=new_v,
                                                          backend=bd[0]))


# Rows of the poisoned-pool case: row 0's gate is closed; row 1 reaches page 0 only as the clamp target of its -1
# entries, and head 0 lists pages 1, 2 that head 1 does not (and head 1 pages 3, 4); row 2's head 1 lists nothing.
POISON_TABLES = {
    "per-head": [[[1, -1, 2], [3, 0, -1]], [[1, -1, 2], [3, 4, -1]], [[4, -1, -1], [-1, -1, -1]]],
    "shared": [[1, -1, 2], [3, -1, 4], [-1, 2, -1]],
}


def _unlisted(table, gate, P):
    """``[B, P, H]`` bool: page p of row b is read by none of head h's entries (or row b's gate is closed)."""
    B, H = gate.shape[0], 2
    full = table if table.dim() == 3 else table[:, None].expand(B, H, table.shape[-1])
    listed = torch.zeros(B, P, H, dtype=torch.bool)
    b, h, _ = torch.meshgrid(*(torch.arange(n) for n in full.shape), indexing="ij")
    keep = full >= 0
    listed[b[keep], full[keep], h[keep]] = True
    return ~(listed & gate[:, None, None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)   # bf16: the Hopper kernel on sm_90
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("kind", list(POISON_TABLES))
@pytest.mark.parametrize("bd", ALL)
def test_nothing_unlisted_reaches_the_output(bd, kind, value, dtype):
    """Whatever bits lie outside the listed pages and the chunk (a pool made with torch.empty) never reach out or
    lse: every token of each (row, page, head) not listed for that head, the page that -1 is clamped to, the pages
    and the chunk of a row whose gate is closed, and the padding tokens of pages allocated padded then sliced to
    frame_len hold ``value``; the result equals the reference on a clean pool."""
    B, Lq, H, D, P, F, Ln = 3, 4, 2, 8, 5, 3, 2
    gen = torch.Generator().manual_seed(7)
    q, new_k, new_v = (torch.randn(B, n, H, D, generator=gen).to(dtype) for n in (Lq, Ln, Ln))
    kp, vp = (torch.randn(B, P, F, H, D, generator=gen).to(dtype) for _ in range(2))
    table, gate = torch.tensor(POISON_TABLES[kind]), torch.tensor([False, True, True])
    want = _reference(q, kp, vp, table, new_k, new_v, gate)
    unlisted = _unlisted(table, gate, P)[:, :, None, :, None]
    pages = []
    for clean in (kp, vp):
        padded = torch.full((B, P, F + 2, H, D), value, dtype=dtype)
        padded[:, :, :F] = clean.masked_fill(unlisted, value)
        pages.append(padded[:, :, :F].to(bd[1]))
    new_k, new_v = (t.clone() for t in (new_k, new_v))
    new_k[0], new_v[0] = value, value
    out = _check(bd, dtype, q.to(bd[1]), *pages, table.to(bd[1]), new_k.to(bd[1]), new_v.to(bd[1]),
                 gate.to(bd[1]), want=want)
    assert torch.isfinite(out).all() and not out[0].any()


# ---- the reference against independent formulas -------------------------------------------------------------------

def _formula(q, kp, vp, table, new_k, new_v, gate, sm_scale):
    """Per (b, h): cat the listed pages' tokens and the new chunk, softmax in float64."""
    B, Lq, H, D = q.shape
    out = torch.zeros(B, Lq, H, D, dtype=torch.float64)
    lse = torch.full((B, H, Lq), float("-inf"), dtype=torch.float64)
    for b in range(B):
        if gate is not None and not bool(gate.expand(B)[b]):
            continue
        for h in range(H):
            ids = table[b, h] if table.dim() == 3 else table[b]
            ks = [kp[b, int(p), :, h] for p in ids if int(p) >= 0] + ([new_k[b, :, h]] if new_k is not None else [])
            vs = [vp[b, int(p), :, h] for p in ids if int(p) >= 0] + ([new_v[b, :, h]] if new_v is not None else [])
            keys = torch.cat(ks).double() if ks else torch.zeros(0, D, dtype=torch.float64)
            if keys.shape[0] == 0:
                continue
            s = sm_scale * q[b, :, h].double() @ keys.T
            out[b, :, h] = torch.softmax(s, dim=-1) @ torch.cat(vs).double()
            lse[b, h] = torch.logsumexp(s, dim=-1)
    return out, lse


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_gather_cat_softmax(case):
    args = _case(case, torch.float32, "cpu")
    want, want_lse = _formula(*args, 0.7)
    out, lse = _reference(*args, sm_scale=0.7)
    assert out.dtype == torch.float64
    assert_parity(out, want, torch.float64, "out")
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    assert_parity(lse[finite], want_lse[finite], torch.float64, "lse")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_reference_matches_flex_attention():
    """FlexAttention expresses a shared table as a mask over the gathered pages (a key is kept when its page's
    table entry is not -1) followed by the new chunk."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    B, Lq, H, D, P, F, K, Ln = 2, 5, 2, 8, 6, 3, 4, 2
    q, kp, vp, table, new_k, new_v, _ = _case((B, Lq, H, D, P, F, K, Ln, False, "none", "holes"), torch.float64,
                                               "cpu")
    table[:, 0] = 2                                                   # at least one listed page per row
    rows = torch.arange(B)[:, None]
    keys = torch.cat([kp[rows, table.clamp(0)].reshape(B, K * F, H, D), new_k], 1).transpose(1, 2)
    values = torch.cat([vp[rows, table.clamp(0)].reshape(B, K * F, H, D), new_v], 1).transpose(1, 2)
    listed = torch.cat([(table >= 0).repeat_interleave(F, 1), torch.ones(B, Ln, dtype=torch.bool)], 1)

    def mask_mod(b, h, q_idx, kv_idx):
        return listed[b, kv_idx]

    block_mask = flex.create_block_mask(mask_mod, B, None, Lq, K * F + Ln, device="cpu")
    want, aux = flex.flex_attention(q.transpose(1, 2), keys, values, block_mask=block_mask, scale=0.5,
                                    return_aux=flex.AuxRequest(lse=True))
    want_lse = aux.lse
    out, lse = _reference(q, kp, vp, table, new_k, new_v, None, sm_scale=0.5)
    assert_parity(out, want.transpose(1, 2), torch.float64, "out")
    assert_parity(lse, want_lse, torch.float64, "lse")


# ---- ids out of range -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [7, -2], ids=["high", "below-minus-one"])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_out_of_range_ids_raise_on_torch_and_cpu(backend, bad):
    if backend not in streamkern.available_backends("cpu") or backend not in fa.frame_attention_op.backends.impls:
        pytest.skip(f"{backend} not available")
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], torch.float32, "cpu")
    table[1, 1, 2] = bad
    with pytest.raises(ValueError, match="page_table: expected page ids in \\[0, 6\\) or -1"):
        streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, backend=backend)


@pytest.mark.parametrize("bd", GPU)
def test_gpu_backends_skip_out_of_range_ids(bd, monkeypatch):
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], torch.float32, bd[1])
    want = streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, backend="torch")
    bad = torch.where(table < 0, torch.where(torch.arange(table.numel(), device=bd[1]).reshape(table.shape) % 2 == 0,
                                             -5, 6), table)              # every -1 becomes an id out of range
    assert_parity(streamkern.frame_attention(q, kp, vp, bad, new_k=new_k, new_v=new_v, backend=bd[0]), want,
                  torch.float32)
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="page_table: expected page ids"):
        streamkern.frame_attention(q, kp, vp, bad, new_k=new_k, new_v=new_v, backend=bd[0])


# ---- bad inputs -------------------------------------------------------------------------------------------------

def _good():
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], torch.float32, "cpu")
    return dict(q=q, k_pages=kp, v_pages=vp, page_table=table, new_k=new_k, new_v=new_v, gate=gate)


BAD = [
    pytest.param("q", lambda a: a["q"][0], ValueError, "q: expected a 4-d", id="q-rank"),
    pytest.param("q", lambda a: a["q"].double(), TypeError, "q: expected dtype", id="q-float64"),
    pytest.param("k_pages", lambda a: a["k_pages"].half(), TypeError, "k_pages: expected dtype float32",
                 id="pages-dtype"),
    pytest.param("k_pages", lambda a: a["k_pages"][..., :4], ValueError, "k_pages: expected shape", id="pages-D"),
    pytest.param("v_pages", lambda a: a["v_pages"][:, :3], ValueError, "v_pages: expected shape", id="v-pages-P"),
    pytest.param("page_table", lambda a: a["page_table"].int(), TypeError, "page_table: expected dtype int64",
                 id="table-int32"),
    pytest.param("page_table", lambda a: a["page_table"][:, :1], ValueError, "page_table: expected shape",
                 id="table-heads"),
    pytest.param("page_table", lambda a: a["page_table"][0, 0], ValueError, "page_table: expected a 2 or 3-d",
                 id="table-rank"),
    pytest.param("new_v", lambda a: None, ValueError, "new_k, new_v: expected both or neither", id="new-v-missing"),
    pytest.param("new_v", lambda a: a["new_v"][:, :2], ValueError, "new_v: expected shape", id="new-v-shape"),
    pytest.param("new_k", lambda a: a["new_k"][:, :, :1], ValueError, "new_k: expected shape", id="new-k-heads"),
    pytest.param("new_k", lambda a: a["new_k"].bfloat16(), TypeError, "new_k: expected dtype float32",
                 id="new-k-dtype"),
    pytest.param("gate", lambda a: a["gate"].long(), TypeError, "gate: expected dtype bool", id="gate-int"),
    pytest.param("gate", lambda a: a["gate"][:1], ValueError, "gate: expected shape \\[2\\]", id="gate-shape"),
    pytest.param("sm_scale", lambda a: 0.0, ValueError, "sm_scale: expected a finite number in \\(0",
                 id="scale-zero"),
    pytest.param("sm_scale", lambda a: "1", TypeError, "sm_scale: expected a number", id="scale-str"),
    pytest.param("k_pages", lambda a: a["k_pages"].to("meta"), ValueError, "k_pages: expected a tensor on cpu like q",
                 id="pages-device"),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])   # argument checks run before dispatch
@pytest.mark.parametrize("arg, change, exc, msg", BAD)
def test_bad_inputs(backend, arg, change, exc, msg):
    kwargs = _good()
    kwargs[arg] = change(kwargs)
    q, kp, vp, table = (kwargs.pop(k) for k in ("q", "k_pages", "v_pages", "page_table"))
    with pytest.raises(exc, match=msg):
        streamkern.frame_attention(q, kp, vp, table, **kwargs, backend=backend)


def test_cuda_backend_is_missing_with_the_reason():
    q, kp, vp, table, *_ = _case(CASES[0].values[0], torch.float32, "cpu")
    with pytest.raises(streamkern.BackendUnavailable, match="the Triton kernel is the GPU path"):
        streamkern.frame_attention(q, kp, vp, table, backend="cuda")


# ---- torch.library integration, launches and host syncs ----------------------------------------------------------

@pytest.mark.parametrize("bd", ALL)
def test_opcheck(bd):
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], torch.float32, bd[1])
    torch.library.opcheck(fa.frame_attention_op.custom_op, (q, kp, vp, table, new_k, new_v, gate, 0.5, bd[0]))
    shared = _case(CASES[2].values[0], torch.float32, bd[1])
    table = shared[3][:, None].expand(-1, shared[0].shape[2], -1)               # a shared table arrives expanded
    torch.library.opcheck(fa.frame_attention_op.custom_op, (*shared[:3], table, None, None, None, 1.0, bd[0]))


@pytest.mark.parametrize("bd", ALL)
def test_compile_fullgraph(bd):
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], torch.float32, bd[1])

    def layer(q, kp, vp, table, new_k, new_v, gate):
        out, lse = streamkern.frame_attention(q * 2, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate,
                                              return_lse=True, backend=bd[0])
        return out + 1, lse

    out, lse = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, kp, vp, table, new_k, new_v, gate)
    want, want_lse = streamkern.frame_attention(q * 2, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate,
                                                return_lse=True, backend=bd[0])
    assert torch.equal(out, want + 1) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)   # pointer / Hopper kernel (sm_90)
@pytest.mark.parametrize("bd", GPU)
def test_no_host_sync(bd, dtype, monkeypatch):
    from streamkern.capture import count_host_syncs

    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    q, kp, vp, table, new_k, new_v, gate = _case(CASES[1].values[0], dtype, bd[1])
    want = streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate, backend=bd[0])
    with count_host_syncs(forbid=True):
        out = streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate, backend=bd[0])
    assert torch.equal(out, want)


# ---- the Hopper kernel (kernels/frame_attention.py; where it runs: kernels/attention_tile.py) ---------------------

from streamkern.kernels import frame_attention as kfa
from streamkern.kernels import attention_tile as tiles
HOPPER = "_frame_attention_tma_kernel"
POINTER = "_frame_attention_kernel"
# the interpreter's configs (small tiles); on CUDA the candidate configs themselves
INTERPRETED = [tiles.HopperConfig(16, 16, 1, 1, False, False), tiles.HopperConfig(16, 16, 1, 1, False, True),
               tiles.HopperConfig(32, 16, 1, 2, True, False)]
HOPPER_CONFIGS = [pytest.param(c, id=c.name) for c in (kfa.CONFIGS if torch.cuda.is_available() else INTERPRETED)]
TRITON = [p for p in GPU if p.id == "triton-cuda"] if torch.cuda.is_available() else \
    [p for p in backend_params(exclude=("torch", "cpu", "cuda"), ops=[fa.frame_attention_op]) if p.id == "triton-cpu"]
# B, Lq, H, D, P, F, K, Ln, per_head, gate, table pattern: rows of D contiguous 16-bit elements (D·2 bytes a
# multiple of 16); D 24 pads to 32 columns, F 21 ends in a partial tile, ids 6 and 7 (>= P) read nothing
HOPPER_CASES = [
    pytest.param((2, 37, 3, 24, 6, 21, 5, 13, True, "mixed", "holes"), id="D24-F21-holes-gate"),
    pytest.param((1, 20, 2, 16, 4, 16, 6, 0, False, "none", "dups"), id="F16-dups-no-new"),
    pytest.param((3, 4, 2, 8, 5, 3, 3, 0, True, "none", "nokey"), id="rows-with-no-key"),
    pytest.param((2, 6, 1, 32, 7, 5, 0, 4, False, "mixed", "plain"), id="K0-new-only"),
]


def _hopper_table(table, P):
    """Some -1 entries made ids past the pool (both are skipped)."""
    return torch.where((table < 0) & (torch.arange(table.numel()).reshape(table.shape) % 2 == 0).to(table.device),
                       P + 1, table)


def _launched(fn, *args, **kwargs):
    """``(fn's result, names of the Triton kernels it launched)``."""
    names = []

    def record(kernel, launch, a, k):
        names.append(kernel.fn.__name__)
        return launch(*a, **k)

    with triton_launches_wrapped(record):
        return fn(*args, **kwargs), names


def _needs_hopper(bd):
    if bd[1] == "cuda" and not tiles.tma_capable(torch.device("cuda")):
        pytest.skip("the Hopper kernel needs sm_90 or later")


@pytest.mark.parametrize("config", HOPPER_CONFIGS)
@pytest.mark.parametrize("case", HOPPER_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", TRITON)
def test_hopper_kernel_parity(bd, dtype, case, config):
    """The Hopper kernel at each config against the float64 reference (out at the dtype's bound, lse at fp32's),
    and the pointer kernel on the same inputs; per-head and shared tables, skipped ids, gates, rows with no key."""
    _needs_hopper(bd)
    q, kp, vp, table, new_k, new_v, gate = _case(case, dtype, bd[1])
    B, Lq, H, D = q.shape
    table = _hopper_table(table, kp.shape[1])
    full = table if table.dim() == 3 else table[:, None].expand(B, H, -1)
    want, want_lse = _reference(q, kp, vp, torch.where(full >= kp.shape[1], -1, full), new_k, new_v, gate)
    empty = torch.isinf(want_lse)
    for chosen in (config, "pointer"):
        if chosen != "pointer" and chosen.warp_specialize and new_k is not None:
            with pytest.raises(ValueError, match="warp-specialised"):
                kfa.frame_attention(q, kp, vp, full, new_k, new_v, gate, D ** -0.5, config=chosen)
            continue
        (out, lse), names = _launched(kfa.frame_attention, q, kp, vp, full, new_k, new_v, gate, D ** -0.5,
                                      config=chosen)
        assert names == [POINTER if chosen == "pointer" else HOPPER]
        assert_parity(out, want, dtype, f"out ({chosen})")
        assert torch.equal(torch.isinf(lse).cpu(), empty)
        assert_parity(torch.where(empty, 0.0, lse.cpu().double()), torch.where(empty, 0.0, want_lse),
                      torch.float32, f"lse ({chosen})")


@pytest.mark.parametrize("config", HOPPER_CONFIGS)
@pytest.mark.parametrize("bd", TRITON)
def test_hopper_kernel_reads_only_listed_rows(bd, config):
    """NaN and inf wherever the Hopper kernel must not read never reach the output: pages not listed, page 0 when
    only -1 entries and ids past the pool point near it, the padding rows of pages sliced to F tokens, the columns
    of a head dim padded to the tile, and the rows past the chunk in its storage."""
    _needs_hopper(bd)
    B, Lq, H, D, P, F, Ln = 2, 19, 2, 24, 5, 9, 7
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, Lq, H, D, generator=gen).to(bd[1], torch.bfloat16)
    store = torch.randn(2, B, P, F + 3, H, D + 8, generator=gen).to(bd[1], torch.bfloat16)
    store[:, :, 0] = float("nan")                                 # page 0: never listed
    store[:, :, :, F:] = float("inf")                             # each page's padding rows
    store[..., D:] = float("nan")                                 # the columns past D
    kp, vp = store[0, :, :, :F, :, :D], store[1, :, :, :F, :, :D]
    chunk = torch.randn(2, B, Ln + 5, H, D, generator=gen).to(bd[1], torch.bfloat16)
    chunk[:, :, Ln:] = float("nan")
    new_k, new_v = chunk[0, :, :Ln], chunk[1, :, :Ln]
    table = torch.tensor([[[3, -1, 1], [P, 2, 4]], [[-1, 4, 4], [1, 2, P + 7]]], device=bd[1])
    clean = torch.where((table <= 0) | (table >= P), -1, table)
    finite = [torch.nan_to_num(t, nan=0.0, posinf=0.0) for t in (kp, vp, new_k, new_v)]   # for the reference
    want, _ = _reference(q, finite[0], finite[1], clean, finite[2], finite[3], None)
    for has_new in (True, False):
        if config.warp_specialize and has_new:
            continue
        chunk_args = (new_k, new_v) if has_new else (None, None)
        (out, _), names = _launched(kfa.frame_attention, q, kp, vp, table, *chunk_args, None, D ** -0.5,
                                    config=config)
        assert names == [HOPPER]
        ref_out = want if has_new else _reference(q, finite[0], finite[1], clean, None, None, None)[0]
        assert bool(torch.isfinite(out).all())
        assert_parity(out, ref_out, torch.bfloat16)


@pytest.mark.parametrize("config", HOPPER_CONFIGS)
@pytest.mark.parametrize("bd", TRITON)
def test_hopper_kernel_rescales_when_scores_rise(bd, config):
    """Scores that rise by far more than the lazy rescale's threshold (2^8) from page to page and fall again, with
    a tile whose rows are all below the running max: the reference max moves, acc is rescaled, and out and lse stay
    at their bounds (fp16, whose p·v products would overflow without the rescale)."""
    _needs_hopper(bd)
    B, Lq, H, D, P, F = 1, 20, 2, 16, 5, 24
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(B, Lq, H, D, generator=gen)
    kp = torch.randn(B, P, F, H, D, generator=gen) * torch.tensor([0.1, 1.0, 3.0, 6.0, 0.5]).view(1, P, 1, 1, 1)
    vp = torch.randn(B, P, F, H, D, generator=gen)
    q, kp, vp = (t.to(bd[1], torch.float16) for t in (q, kp, vp))
    table = torch.tensor([[0, 1, 4, 2, 3, 0]], device=bd[1]).expand(B, H, -1)
    want, want_lse = _reference(q, kp, vp, table, None, None, None, sm_scale=2.0)
    (out, lse), names = _launched(kfa.frame_attention, q, kp, vp, table, None, None, None, 2.0, config=config)
    assert names == [HOPPER]
    assert float(want_lse.max() - want_lse.min()) > 8 and bool(torch.isfinite(out).all())
    assert_parity(out, want, torch.float16)
    assert_parity(lse.cpu().double(), want_lse, torch.float32, "lse")


def _rule_case(layout, device):
    """Inputs of one layout and whether the Hopper kernel takes them (``tma_unsupported``'s rule)."""
    B, Lq, H, D, P, F = 2, 9, 2, 16, 3, 5
    gen = torch.Generator().manual_seed(1)
    dtype = torch.float32 if layout == "fp32" else torch.bfloat16
    dim = {"D12": 12, "D256": 256}.get(layout, D)
    q = torch.randn(B, Lq, H, dim, generator=gen).to(device, dtype)
    kp, vp = (torch.randn(B, P, F, H, dim, generator=gen).to(device, dtype) for _ in range(2))
    new_k = new_v = None
    if layout == "q-last-dim-strided":
        q = torch.randn(B, Lq, H, dim, 2, generator=gen).to(device, dtype)[..., 0]
    if layout == "q-odd-row-stride":
        q = torch.randn(B, Lq, H * dim + 1, generator=gen).to(device, dtype)[..., :H * dim].view(B, Lq, H, dim)
    if layout == "pages-misaligned":
        flat = torch.randn(kp.numel() + 1, generator=gen).to(device, dtype)
        kp = flat[1:].view(kp.shape)
    if layout == "padded-pages":
        kp = torch.randn(B, P, F + 3, H, dim, generator=gen).to(device, dtype)[:, :, :F]
    if layout in ("new-odd-stride", "contiguous-with-new"):
        new_k = torch.randn(B, 4, H, dim + (1 if layout == "new-odd-stride" else 0), generator=gen).to(device, dtype)
        new_k, new_v = new_k[..., :dim], new_k[..., :dim].clone()
    table = torch.tensor([[0, 2], [1, -1]], device=device)
    takes = layout in ("contiguous", "padded-pages", "contiguous-with-new")
    return (q, kp, vp, table, new_k, new_v), takes


RULE_LAYOUTS = ["contiguous", "padded-pages", "contiguous-with-new", "fp32", "D12", "D256", "q-last-dim-strided",
                "q-odd-row-stride", "pages-misaligned", "new-odd-stride"]


@pytest.mark.parametrize("layout", RULE_LAYOUTS)
@pytest.mark.parametrize("bd", TRITON)
def test_kernel_choice_follows_strides_dtype_and_head_dim(bd, layout):
    """The launcher runs the Hopper kernel exactly where ``tma_unsupported`` allows it (fp16/bf16, a head dim of at
    most 128 whose rows are 16-byte multiples, last dims contiguous, addresses and strides multiples of 16 bytes;
    padded pages are fine) and the pointer kernel elsewhere, both exact."""
    _needs_hopper(bd)
    (q, kp, vp, table, new_k, new_v), takes = _rule_case(layout, bd[1])
    out, names = _launched(streamkern.frame_attention, q, kp, vp, table, new_k=new_k, new_v=new_v, backend=bd[0])
    assert names == [HOPPER if takes else POINTER]
    assert_parity(out, _reference(q, kp, vp, table, new_k, new_v, None)[0], q.dtype)


@pytest.mark.parametrize("capability, takes", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_hopper_kernel_from_sm90(capability, takes, monkeypatch):
    """A CUDA device runs the Hopper kernel from compute capability 9.0; sm_80/sm_89 keep the pointer kernel."""
    monkeypatch.setattr(tiles, "device_capability", lambda device: capability)
    assert tiles.tma_capable(torch.device("cuda")) is takes


def test_hopper_config_refused_where_it_cannot_run():
    """An explicit Hopper config for inputs the Hopper kernel cannot take is a ValueError, not a silent switch."""
    (q, kp, vp, table, *_), _ = _rule_case("fp32", "cpu")
    with pytest.raises(ValueError, match="the Hopper kernel cannot take these inputs: torch.float32"):
        kfa.frame_attention(q, kp, vp, table[:, None].expand(-1, 2, -1), None, None, None, 0.5,
                            config=kfa.TILE_128x128)


def test_autotune_refuses_to_tune_inside_a_capture(monkeypatch):
    """With STREAMKERN_AUTOTUNE=1 the first call of a key would time configs (syncs): inside a CUDA-graph capture or
    under sync debug mode "error" it raises RuntimeError before launching anything; a key tuned before is not
    refused."""
    monkeypatch.setenv("STREAMKERN_AUTOTUNE", "1")
    monkeypatch.setattr(tiles, "triton_interpreting", lambda: False)
    kernel = tiles.HopperKernel(kfa._frame_attention_tma_kernel, kfa.CONFIGS, kfa._choose, ["D", "per_head"])
    launched = []
    monkeypatch.setattr(tiles, "launch_with_descriptor_scratch", lambda *a, **k: launched.append(a))
    for capturing, mode, why in ((True, 0, "inside a CUDA-graph capture"), (False, 2, "sync_debug_mode")):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode)
        with pytest.raises(RuntimeError, match=f"STREAMKERN_AUTOTUNE=1 would time its configs.*{why}"):
            kernel.launch(lambda block_m: (1, 1), ("key",), 100, True, None)
    assert launched == []
    kernel.tuned.add(("key", True, None))
    kernel.launch(lambda block_m: (1, 1), ("key",), 100, True, None)
    assert len(launched) == 1 and len(kernel.autotuners[(True, None)].configs) == len(kfa.CONFIGS)
    kernel.tuned.add(("key", False, None))                 # a launch that cannot take warp specialisation
    kernel.launch(lambda block_m: (1, 1), ("key",), 100, False, None)
    assert [c.kwargs["WARP_SPECIALIZE"] for c in kernel.autotuners[(False, None)].configs] == \
        [False] * sum(not c.warp_specialize for c in kfa.CONFIGS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_hopper_kernel_replays_in_a_cuda_graph(monkeypatch):
    """On sm_90: the Hopper kernel's descriptor scratch comes from torch's allocator inside a capture, the replay
    equals the eager call; with STREAMKERN_AUTOTUNE=1 a first call inside the capture is refused, and after one
    eager (tuning) call the capture and its replay work."""
    if not tiles.tma_capable(torch.device("cuda")):
        pytest.skip("the Hopper kernel needs sm_90 or later")
    monkeypatch.undo()
    q, kp, vp, table, new_k, new_v, gate = _case(HOPPER_CASES[0].values[0], torch.bfloat16, "cuda")
    for autotune in ("0", "1"):
        monkeypatch.setenv("STREAMKERN_AUTOTUNE", autotune)
        kfa.HOPPER.tuned.clear()
        call = (lambda: streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, gate=gate,
                                                   backend="triton"))
        graph = torch.cuda.CUDAGraph()
        if autotune == "1":
            with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
                with torch.cuda.graph(graph):
                    call()
            graph = torch.cuda.CUDAGraph()
        want = call()
        with torch.cuda.graph(graph):
            out = call()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)

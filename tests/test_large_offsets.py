"""Element offsets past 2^31 (issue 11 item 1): one representative op of every kernel family reads (and, for the
token copy, writes) ``as_strided`` views whose last elements lie beyond element 2^31 of one ~4 GiB buffer, on the
"cpu" and "triton" (interpreter) backends, against the "torch" backend on compact copies.

Each case runs in a subprocess: an int32 offset overflow makes a wild address, and the segfault it causes then
fails this test instead of killing the suite (block_masked_attention on Triton used to exit with 139 here). The
buffer is virtual memory: only the pages the views touch become resident (a few MiB), so the cases are cheap, but
they are marked ``bigmem`` (``-m "not bigmem"`` deselects them) because the address space they reserve is shared.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import backend_params

TESTS = os.path.dirname(os.path.abspath(__file__))

# Runs in the child: NaN-poisoned allocations as in conftest, the big buffer, and view helpers.
PRELUDE = r"""
import sys
sys.path.insert(0, {tests!r})
import torch
import streamkern as sk
from conftest import poison_
from streamkern.testing import assert_parity

for _name in ("empty", "empty_like", "empty_strided"):
    _real = getattr(torch, _name)
    setattr(torch, _name, lambda *a, __real=_real, **k: poison_(__real(*a, **k)))
_real_new_empty = torch.Tensor.new_empty
torch.Tensor.new_empty = lambda self, *a, **k: poison_(_real_new_empty(self, *a, **k))

BACKEND = {backend!r}
STEP = 2 ** 30                      # outer stride: the third outer index starts at element 2^31
BUF = torch.tensor([], dtype=torch.bfloat16).set_(torch.UntypedStorage(2 * (2 ** 31 + 2 ** 16)))  # never filled
GEN = torch.Generator().manual_seed(0)


def view(dtype, shape, first):
    '''[3, *shape] view of BUF (as dtype), outer stride STEP elements, the rest contiguous, starting at `first`,
    filled with random values (only these pages are touched).'''
    buf = BUF.view(dtype)
    inner = torch.zeros(shape).stride()
    v = buf.as_strided((3, *shape), (STEP, *inner), first)
    assert v.storage_offset() + 2 * STEP >= 2 ** 31
    if dtype == torch.bool:
        v.copy_(torch.rand(v.shape, generator=GEN) < 0.5)
    elif dtype == torch.uint8:
        v.copy_(torch.randint(0, 256, v.shape, generator=GEN))
    else:
        v.copy_(torch.randn(v.shape, generator=GEN))
    return v
"""

CASES = {
    "block_masked_attention": """
        q, k, v = (view(torch.bfloat16, (1, 16, 16), first) for first in (0, 256, 512))   # [3, 1, 16, 16]
        ids = torch.zeros(16, dtype=torch.long)
        allow = sk.scale_allow(1)
        out = sk.block_masked_attention(q, k, v, ids, ids, allow, backend=BACKEND)
        want = sk.block_masked_attention(q.clone(), k.clone(), v.clone(), ids, ids, allow, backend="torch")
        assert_parity(out, want, torch.bfloat16)
    """,
    "consensus_frame_scores": """
        chunk = view(torch.bfloat16, (4, 2, 8), 0).unsqueeze(0)                            # [1, 3, 4, 2, 8]
        text = view(torch.bfloat16, (3, 2, 8), 4096).unsqueeze(0)
        w = torch.rand(3, generator=GEN)
        out = sk.consensus_frame_scores(chunk, text, w, 2, (0,), (1.0,), backend=BACKEND)
        want = sk.consensus_frame_scores(chunk.clone(), text.clone(), w, 2, (0,), (1.0,), backend="torch")
        assert_parity(out, want, torch.bfloat16)
    """,
    "ring_write": """
        cache_k = view(torch.bfloat16, (6, 2, 8), 0).unsqueeze(0)                          # [1, 3, 6, 2, 8]
        cache_v = view(torch.bfloat16, (6, 2, 8), 8192).unsqueeze(0)
        k_new, v_new = (torch.randn(1, 3, 3, 2, 8, generator=GEN).bfloat16() for _ in range(2))
        want_k, want_v = cache_k.clone(), cache_v.clone()
        sk.ring_write(want_k, want_v, k_new, v_new, 4, sink=1, backend="torch")
        sk.ring_write(cache_k, cache_v, k_new, v_new, 4, sink=1, backend=BACKEND)
        assert torch.equal(cache_k, want_k) and torch.equal(cache_v, want_v)
    """,
    "pose_topk": """
        poses = view(torch.bfloat16, (3,), 0)                                              # [3, 3]
        valid = torch.ones(3, dtype=torch.bool)
        current = torch.zeros(3, dtype=torch.bfloat16)
        idx, sim = sk.pose_topk(poses, valid, current, 5, backend=BACKEND)
        want_idx, want_sim = sk.pose_topk(poses.clone(), valid, current, 5, backend="torch")
        assert torch.equal(idx, want_idx) and torch.equal(sim, want_sim)
    """,
    "bank_evict_select": """
        mask = view(torch.bool, (5,), 0)                                                   # [3, 5]
        scores = torch.rand(3, generator=GEN)
        valid = torch.ones(3, dtype=torch.bool)
        got = sk.bank_evict_select(scores, mask, valid, backend=BACKEND)
        assert int(got) == int(sk.bank_evict_select(scores, mask.clone(), valid, backend="torch"))
    """,
    "attention_weighted_drift": """
        image = view(torch.uint8, (1, 16, 16), 0).transpose(0, 1)        # [1, 3, 16, 16], channel stride 2^30
        prev_small = torch.rand(1, 3, 2, 2, generator=GEN)
        importance = torch.rand(1, 4, 4, generator=GEN)
        drift, small = sk.attention_weighted_drift(image, prev_small, importance, pool=8, dilation=3,
                                                   backend=BACKEND)
        want_drift, want_small = sk.attention_weighted_drift(image.clone(), prev_small, importance, pool=8,
                                                             dilation=3, backend="torch")
        assert_parity(drift, want_drift, torch.float32)
        assert_parity(small, want_small, torch.float32)
    """,
    "verify_scales": """
        logits = view(torch.bfloat16, (1, 5), 0).permute(1, 2, 0)            # [1, 5, 3], vocab stride 2^30
        draft = torch.randint(0, 3, (1, 5), generator=GEN)
        layout = sk.scale_layout((1, 2))
        got = sk.verify_scales(logits, draft, layout, 0, 2, backend=BACKEND)
        want = sk.verify_scales(logits.clone(), draft, layout, 0, 2, backend="torch")
        for a, b in zip(got, want):
            assert torch.equal(a, b), (got, want)
    """,
    "frame_attention": """
        q = view(torch.bfloat16, (1, 1, 16), 0).transpose(0, 1)                 # [1, 3, 1, 16], query stride 2^30
        k_pages, v_pages = (torch.randn(1, 2, 4, 1, 16, generator=GEN).bfloat16() for _ in range(2))
        table = torch.tensor([[0, 1]])
        out = sk.frame_attention(q, k_pages, v_pages, table, backend=BACKEND)
        want = sk.frame_attention(q.clone(), k_pages, v_pages, table, backend="torch")
        assert_parity(out, want, torch.bfloat16)
    """,
    "frame_write": """
        pool_k = view(torch.bfloat16, (), 0).view(1, 1, 1, 1, 1, 3)                       # D stride 2^30
        pool_v = view(torch.bfloat16, (), 4096).view(1, 1, 1, 1, 1, 3)
        k_mean = torch.zeros(1, 1, 1, 1, 3)
        k_new, v_new = (torch.randn(1, 1, 1, 1, 3, generator=GEN).bfloat16() for _ in range(2))
        want = [t.clone() for t in (pool_k, pool_v, k_mean)]
        sk.frame_write(*want, k_new, v_new, torch.tensor([0]), backend="torch")
        sk.frame_write(pool_k, pool_v, k_mean, k_new, v_new, torch.tensor([0]), backend=BACKEND)
        assert torch.equal(pool_k, want[0]) and torch.equal(pool_v, want[1])
        assert_parity(k_mean, want[2], torch.bfloat16)
    """,
    "frame_topk": """
        q = view(torch.bfloat16, (1, 1, 16), 0).transpose(0, 1)                 # [1, 3, 1, 16], query stride 2^30
        k_mean = torch.randn(1, 4, 1, 16, generator=GEN)
        candidates = torch.tensor([[0, 1, 2, 3]])
        got = sk.frame_topk(q, k_mean, candidates, 3, backend=BACKEND)
        assert torch.equal(got, sk.frame_topk(q.clone(), k_mean, candidates, 3, backend="torch"))
    """,
}


@pytest.mark.bigmem
@pytest.mark.parametrize("op", CASES)
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cuda", ("triton", "cuda"))))
def test_offsets_past_2_31(bd, op):
    body = textwrap.indent(textwrap.dedent(CASES[op]), "    ")
    code = (PRELUDE.format(tests=TESTS, backend=bd[0]) + "try:\n" + body +
            "except sk.BackendUnavailable as exc:\n    print('unavailable:', str(exc).splitlines()[0])\n"
            "else:\n    print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")})
    if proc.returncode == 0 and "unavailable:" in proc.stdout:
        pytest.skip(f"{op} on {bd[0]}: {proc.stdout.split('unavailable:', 1)[1].strip()}")
    crashed = f" (killed by signal {-proc.returncode})" if proc.returncode < 0 else ""
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (
        f"{op} on {bd[0]} exited with {proc.returncode}{crashed}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


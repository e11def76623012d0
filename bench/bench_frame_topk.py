"""Benchmark of frame_topk (docs/contract.md §4.5, §6): MemFlow's sparse memory activation, the bank frames each head
attends, at one transformer block's shapes.

Shapes: 12 heads × 128, 1560-token frames, q = a 3-frame chunk (Lq = 4680), the top 3 of a 6-frame bank per head,
bf16 queries; on a CPU (``bench.quick``) a 1-frame chunk and the top 1 of 2.

Implementations:
  ``eager-memflow``   MemFlow's selection: the mean query and each bank frame's mean key computed from the bank's
                      keys ``[B, M·F, H, D]``, their dot products, ``topk`` per head (the baseline);
  ``compile-memflow`` ``torch.compile`` of it;
  ``torch`` / ``cpu`` / ``triton`` / ``cuda``  ``frame_topk`` over the pages' mean keys that ``frame_write`` keeps.
Bytes: what ``frame_topk`` must read (q once, the candidates' mean keys) and write (the ids); the eager code also
reads the bank's keys, counted in ``extra.eager_bytes``.
"""
from __future__ import annotations

import torch

from streamkern import frame_topk
from streamkern.ops.frame_topk import frame_topk_op

from .bench_frame_attention import D, FRAME, H   # one transformer block of Wan2.1-1.3B as MemFlow runs it

OP = "frame_topk"
DTYPE = torch.bfloat16
FULL = dict(chunk=3, bank=6, topk=3)
QUICK = dict(chunk=1, bank=2, topk=1)


def memflow_select(q, bank_k, topk: int):
    """Per head, the ``topk`` bank frames of ``bank_k [B, M·F, H, D]`` whose mean key best matches the mean query
    of ``q [B, Lq, H, D]``: frame indices ``[B, H, topk]``."""
    B, T, Hh, Dd = bank_k.shape
    means = bank_k.view(B, T // FRAME, FRAME, Hh, Dd).float().mean(2)                   # [B, M, H, D]
    score = torch.einsum("bhd,bmhd->bhm", q.float().mean(1), means)
    return score.topk(topk, dim=-1).indices


def cases(bench):
    shape = QUICK if bench.quick else FULL
    n, M, k = shape["chunk"], shape["bank"], shape["topk"]
    dev, es = bench.device, DTYPE.itemsize
    moved = n * FRAME * H * D * es + M * H * D * 4 + M * 8 + H * k * 8
    eager_bytes = n * FRAME * H * D * es + M * FRAME * H * D * es
    g = torch.Generator(device="cpu").manual_seed(0)
    sets = []
    for _ in range(bench.input_sets(eager_bytes, limit=3)):
        q = torch.randn(1, n * FRAME, H, D, generator=g).to(DTYPE).to(dev)
        bank_k = torch.randn(1, M * FRAME, H, D, generator=g).to(DTYPE).to(dev)
        k_mean = bank_k.view(1, M, FRAME, H, D).float().mean(2)
        sets.append((q, bank_k, k_mean, torch.arange(M, device=dev)[None]))
    label = f"H{H}-D{D}-F{FRAME}-Lq{n * FRAME}-top{k}of{M}-bf16"
    common = dict(bytes=moved, baseline="eager-memflow", extra={"H": H, "D": D, "frame": FRAME, "Lq": n * FRAME, "bank": M, "topk": k,
                                      "eager_bytes": eager_bytes})

    def eager(q, bank_k, k_mean, candidates):
        return memflow_select(q, bank_k, k)

    yield bench.case(OP, label, "eager-memflow", eager, sets, **{**common, "baseline": None})
    yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), sets, **common)
    for b in ["torch"] + bench.backends(frame_topk_op):
        def select(q, bank_k, k_mean, candidates, _b=b):
            return frame_topk(q, k_mean, candidates, k, per_head=True, backend=_b)
        yield bench.case(OP, label, b, select, sets, **common)

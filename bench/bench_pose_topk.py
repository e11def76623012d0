"""Benchmark of pose_topk, a latency-bound bank decision (docs/contract.md §6, issue 3).

N = 50 (seed 004's buffer) and 1000 / 4096 (WorldMem), k = 8: ``eager-seed`` the seed's per-frame loop +
``torch.topk``, ``torch`` the sort-based reference, its compile, then each backend. Bytes: the inputs read once
and the outputs written once (tiny: these rows are about µs).
"""
from __future__ import annotations

import torch

from streamkern import pose_topk
from streamkern.ops.pose_topk import pose_topk_op
from streamkern.ops.reference import pose_topk as ref

OP = "pose_topk"


def _inputs(bench, N, n=4):
    gen = torch.Generator().manual_seed(N)
    return [((torch.randn(N, 5, generator=gen) * 10).to(bench.device),
             (torch.rand(N, generator=gen) < 0.9).to(bench.device),
             (torch.randn(5, generator=gen) * 10).to(bench.device)) for _ in range(n)]


def cases(bench):
    k = 8
    for N in (50, 1000, 4096):
        case = f"N{N}-k{k}"
        inputs = _inputs(bench, N)
        nbytes = N * 3 * 4 + N + 3 * 4 + k * 12
        seed_inputs = [(list(p), c) for p, _, c in inputs]
        yield bench.case(OP, case, "eager-seed", lambda poses, c: ref.seed_get_relevant_frames(poses, c, k),
                         seed_inputs, bytes=nbytes)
        yield bench.case(OP, case, "torch", lambda p, v, c: ref.pose_topk(p, v, c, k, 10.0), inputs, bytes=nbytes)
        yield bench.case(OP, case, "compile-seed", bench.compiled(lambda p, v, c: ref.pose_topk(p, v, c, k, 10.0)),
                         inputs, bytes=nbytes)
        for b in bench.backends(pose_topk_op):
            yield bench.case(OP, case, b, lambda p, v, c, b=b: pose_topk(p, v, c, k, backend=b), inputs,
                             bytes=nbytes)

"""Benchmark of bank_evict_select, a latency-bound bank decision (docs/contract.md §6, issue 3).

M = 6 (seed 000) and 64 slots, E = 16 / 256 entities: ``eager-seed`` is the seed's ``_select_frame_to_evict``
including the ``.tolist()`` that builds its lists from the device tensors (as the source pipelines must),
``torch`` the tensor-op reference (no sync), ``compile-seed`` torch.compile of the reference, then each backend.
Bytes: the inputs read once and the output written once (tiny: these rows are about µs).
"""
from __future__ import annotations

import torch

from streamkern import bank_evict_select
from streamkern.ops.bank_evict_select import bank_evict_select_op
from streamkern.ops.reference import bank_evict_select as ref

OP = "bank_evict_select"


def _inputs(bench, M, E, n=4):
    gen = torch.Generator().manual_seed(M * E)
    sets = []
    for _ in range(n):
        scores = torch.rand(M, generator=gen)
        mask = torch.rand(M, E, generator=gen) < 2.0 / E
        sets.append((scores.to(bench.device), mask.to(bench.device), torch.ones(M, dtype=torch.bool,
                                                                                device=bench.device)))
    return sets


def cases(bench):
    for M, E in [(6, 16), (6, 256), (64, 16), (64, 256)]:
        case = f"M{M}-E{E}"
        inputs = _inputs(bench, M, E)
        nbytes = M * 4 + M * E + M + 8
        yield bench.case(OP, case, "eager-seed", ref.seed_select_frame_to_evict, inputs, bytes=nbytes)
        yield bench.case(OP, case, "torch", ref.bank_evict_select, inputs, bytes=nbytes)
        yield bench.case(OP, case, "compile-seed", bench.compiled(ref.bank_evict_select), inputs, bytes=nbytes)
        for b in bench.backends(bank_evict_select_op):
            yield bench.case(OP, case, b, lambda s, m, v, b=b: bank_evict_select(s, m, v, backend=b), inputs,
                             bytes=nbytes)

"""Benchmark of the latency-bound bank decisions: bank_evict_select and pose_topk (DESIGN.md §6, issue 3).

bank_evict_select at M = 6 (seed 000) and 64 slots, E = 16 / 256 entities: ``eager-seed`` is the seed's
``_select_frame_to_evict`` including the ``.tolist()`` that builds its lists from the device tensors (as the
source pipelines must), ``torch`` the tensor-op reference (no sync), ``compile-seed`` torch.compile of the
reference, then each backend. pose_topk at N = 50 (seed 004's buffer) and 1000 / 4096 (WorldMem), k = 8:
``eager-seed`` the seed's per-frame loop + ``torch.topk``, ``torch`` the sort-based reference, its compile, then
each backend. Bytes: the inputs read once and the outputs written once (tiny: these rows are about µs).
"""
from __future__ import annotations

import torch

from streamkern import bank_evict_select, pose_topk
from streamkern.bank_evict import BACKENDS as EVICT_BACKENDS
from streamkern.pose_topk import BACKENDS as POSE_BACKENDS
from streamkern.reference import bank_evict as evict_ref
from streamkern.reference import pose_topk as pose_ref


def _evict_inputs(report, M, E, n=4):
    gen = torch.Generator().manual_seed(M * E)
    sets = []
    for _ in range(n):
        scores = torch.rand(M, generator=gen)
        mask = torch.rand(M, E, generator=gen) < 2.0 / E
        sets.append((scores.to(report.device), mask.to(report.device), torch.ones(M, dtype=torch.bool,
                                                                                   device=report.device)))
    return sets


def _pose_inputs(report, N, n=4):
    gen = torch.Generator().manual_seed(N)
    return [((torch.randn(N, 5, generator=gen) * 10).to(report.device),
             (torch.rand(N, generator=gen) < 0.9).to(report.device),
             (torch.randn(5, generator=gen) * 10).to(report.device)) for _ in range(n)]


def _bench_evict(report):
    for M, E in [(6, 16), (6, 256), (64, 16), (64, 256)]:
        case = f"M{M}-E{E}"
        inputs = _evict_inputs(report, M, E)
        nbytes = M * 4 + M * E + M + 8
        report.add("bank_evict_select", case, "eager-seed", evict_ref.seed_select_frame_to_evict, inputs,
                   bytes=nbytes)
        report.add("bank_evict_select", case, "torch", evict_ref.bank_evict_select, inputs, bytes=nbytes)
        report.add("bank_evict_select", case, "compile-seed", report.compiled(evict_ref.bank_evict_select), inputs,
                   bytes=nbytes)
        for b in report.backends(EVICT_BACKENDS):
            report.add("bank_evict_select", case, b, lambda s, m, v, b=b: bank_evict_select(s, m, v, backend=b),
                       inputs, bytes=nbytes)


def _bench_pose(report):
    k = 8
    for N in (50, 1000, 4096):
        case = f"N{N}-k{k}"
        inputs = _pose_inputs(report, N)
        nbytes = N * 3 * 4 + N + 3 * 4 + k * 12
        seed_inputs = [(list(p), c) for p, _, c in inputs]
        report.add("pose_topk", case, "eager-seed", lambda poses, c: pose_ref.seed_get_relevant_frames(poses, c, k),
                   seed_inputs, bytes=nbytes)
        report.add("pose_topk", case, "torch", lambda p, v, c: pose_ref.pose_topk(p, v, c, k, 10.0), inputs,
                   bytes=nbytes)
        report.add("pose_topk", case, "compile-seed",
                   report.compiled(lambda p, v, c: pose_ref.pose_topk(p, v, c, k, 10.0)), inputs, bytes=nbytes)
        for b in report.backends(POSE_BACKENDS):
            report.add("pose_topk", case, b, lambda p, v, c, b=b: pose_topk(p, v, c, k, backend=b), inputs,
                       bytes=nbytes)


def run(report) -> None:
    _bench_evict(report)
    _bench_pose(report)

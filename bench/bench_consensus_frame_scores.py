"""Benchmark of consensus_frame_scores (docs/contract.md §6, issue 2).

Shapes: Wan2.1-1.3B as used by MemFlow: 30 blocks, B = 1, a chunk of 3 latent frames × 1560 tokens, text cache
S = 512, bf16, layers (0, 15, 29); heads × head_dim 24 × 64 (as seed 000 quotes) and 12 × 128 (the public code),
the same bytes. Implementations: the seed's eager fast form (``eager-seed``, the baseline), its quadratic original
(``eager-quadratic``, where one call takes under ~2 s), ``torch.compile`` of the fast form, the ``"torch"``
backend, and each streamkern backend on the device. Bytes: the selected layers' chunk and text keys read once,
the weights read, the ``[B, F]`` scores written.
"""
from __future__ import annotations

import torch

from streamkern.ops.consensus_frame_scores import (DEFAULT_LAYER_WEIGHTS, DEFAULT_LAYERS, consensus_frame_scores,
                                  consensus_frame_scores_op)
from streamkern.ops.reference import consensus_frame_scores as ref

OP = "consensus_frame_scores"
NL, B, F, FSL, S = 30, 1, 3, 1560, 512


def _sets(bench, H, D, dtype=torch.bfloat16):
    """Input sets rotated by the harness. Only the selected layers are written (and so made resident on a CPU):
    the other blocks' pages of the ``[NL, ...]`` stacks are never touched by any implementation."""
    moved = len(DEFAULT_LAYERS) * B * (F * FSL + S) * H * D * dtype.itemsize + S * 4 + B * F * 4
    sets = []
    for _ in range(bench.input_sets(moved, limit=4)):
        chunk = torch.empty(NL, B, F * FSL, H, D, dtype=dtype, device=bench.device)
        text = torch.empty(NL, B, S, H, D, dtype=dtype, device=bench.device)
        for layer in DEFAULT_LAYERS:
            chunk[layer].normal_()
            text[layer].normal_()
        sets.append((chunk, text, torch.rand(S, device=bench.device)))
    return sets, moved


def _case(bench, H, D, quadratic):
    case = f"seed-{H}x{D}-bf16"
    sets, moved = _sets(bench, H, D)
    common = dict(bytes=moved, extra={"NL": NL, "B": B, "F": F, "frame_seq_len": FSL, "S": S, "H": H, "D": D})

    def form(fn):
        return lambda c, t, w: fn(c, t, w, FSL, DEFAULT_LAYERS, DEFAULT_LAYER_WEIGHTS)

    yield bench.case(OP, case, "eager-seed", form(ref.seed_fast_scores), sets, baseline=None, **common)
    if quadratic:
        yield bench.case(OP, case, "eager-quadratic", form(ref.seed_quadratic_scores), sets, warmup=1, max_reps=3,
                         **common)
    yield bench.case(OP, case, "compile-seed", bench.compiled(form(ref.seed_fast_scores)), sets, **common)
    for name in ["torch"] + bench.backends(consensus_frame_scores_op):
        fn = (lambda c, t, w, _n=name: consensus_frame_scores(c, t, w, FSL, DEFAULT_LAYERS, DEFAULT_LAYER_WEIGHTS,
                                                              backend=_n))
        yield bench.case(OP, case, name, fn, sets, **common)


def cases(bench):
    # The quadratic form takes ~1.2 s per call on a 2-core CPU: once there, on every case on a GPU.
    yield from _case(bench, 24, 64, quadratic=True)
    yield from _case(bench, 12, 128, quadratic=bench.device.type == "cuda")

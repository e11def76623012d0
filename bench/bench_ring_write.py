"""Benchmark of the ring KV window append (KVRing / ring_write) (docs/contract.md §6, issue 3).

Cases (bf16, B = 1, 3-frame chunks): the seed's shape, 30 blocks × 24 heads × 64, 1560 tokens per frame, window
15 frames; MemFlow (12 × 128, sink 3 frames, window 12); Matrix-Game 2.0 (12 × 128, 880 tokens per frame, window
6 frames, no sink). On a CPU (``bench.quick``) the caches of 30 blocks do not fit next to each other in this
machine's memory, so the CPU run uses 4 blocks (same per-block shapes), and only one cache implementation is alive
at a time. ``bench_bank_insert.py`` takes its shapes from here.

Steady state (window full): ``eager-seed`` is the Self-Forcing shift-by-copy (the whole non-sink window moved left,
layer by layer, then the new tokens written), ``eager-cat`` the MemFlow/LongLive ``torch.cat`` rebuild,
``compile-seed`` torch.compile of the shift (``shift_write``), then ``KVRing.append`` on each backend. Bytes: the
bytes that must move, the new tokens of k and v read once and written once.
"""
from __future__ import annotations

import gc

import torch

from streamkern import KVRing
from streamkern.ops.ring_write import ring_write_op
from streamkern.ops.reference import ring_write as ring_ref

DTYPE = torch.bfloat16
CASES = [  # name, H, D, tokens per frame, window frames, sink frames, bank frames
    ("seed-24x64", 24, 64, 1560, 15, 0, 6),
    ("memflow-12x128", 12, 128, 1560, 12, 3, 3),
    ("matrixgame-12x128", 12, 128, 880, 6, 0, None),
]
CHUNK_FRAMES = 3


def _new_tokens(bench, NL, T, H, D, moved):
    return [(torch.randn(NL, 1, T, H, D, dtype=DTYPE, device=bench.device),
             torch.randn(NL, 1, T, H, D, dtype=DTYPE, device=bench.device))
            for _ in range(bench.input_sets(moved, limit=3))]


def _filled(cache, sets, T):
    """Append until the window is full (steady state), then hand the cache back."""
    for i in range((cache.window if hasattr(cache, "window") else cache.size) // T + 2):
        cache.append(*sets[i % len(sets)])
    return cache


def _ring(bench, NL, name, H, D, fsl, window, sink):
    op, T = "ring_append", CHUNK_FRAMES * fsl
    moved = 2 * 2 * NL * T * H * D * DTYPE.itemsize
    sets = _new_tokens(bench, NL, T, H, D, moved)
    common = dict(bytes=moved, extra={"NL": NL, "H": H, "D": D, "T": T, "window": window * fsl, "sink": sink * fsl})
    shape = (NL, 1, H, D, window * fsl, sink * fsl, DTYPE, bench.device)
    impls = [("eager-seed", lambda: ring_ref.ShiftCache(*shape), False),
             ("eager-cat", lambda: ring_ref.CatCache(*shape), False),
             ("compile-seed", lambda: ring_ref.ShiftCache(*shape), True)]
    impls += [(b, lambda _b=b: KVRing(*shape, backend=_b), False)
              for b in ["torch"] + bench.backends(ring_write_op)]
    for impl, make, compile_it in impls:
        cache = _filled(make(), sets, T)
        fn = cache.append
        if compile_it:  # the steady-state shift itself (fill == S), so that no host counter changes between calls
            shift = bench.compiled(ring_ref.shift_write)
            fn = (lambda k, v, _c=cache: shift(_c.k, _c.v, k, v, _c.size, _c.sink))
            fn.inductor = shift.inductor   # a compiled row (left out by --smoke and --no-compile)
        yield bench.case(op, name, impl, fn, sets, **common)
        del cache, fn
        gc.collect()


def layers(bench) -> int:
    return 4 if bench.quick else 30


def cases(bench):
    NL = layers(bench)
    for name, H, D, fsl, window, sink, _ in CASES[:1] if bench.quick else CASES:
        yield from _ring(bench, NL, f"{name}-NL{NL}-bf16", H, D, fsl, window, sink)
        gc.collect()

"""Benchmark of the ring KV window append (KVRing / ring_write) and bank_insert (DESIGN.md §6, issue 3).

Cases (bf16, B = 1, 3-frame chunks): the seed's shape, 30 blocks × 24 heads × 64, 1560 tokens per frame, window
15 frames, bank 6 frames; MemFlow (12 × 128, sink 3 frames, window 12, bank 3); Matrix-Game 2.0 (12 × 128,
880 tokens per frame, window 6 frames, no sink). On a CPU (``report.quick``) the caches of 30 blocks do not fit
next to each other in this machine's memory, so the CPU run uses 4 blocks (same per-block shapes), and only one
cache implementation is alive at a time.

Ring append, steady state (window full): ``eager-seed`` is the Self-Forcing shift-by-copy (the whole non-sink window
moved left, layer by layer, then the new tokens written), ``eager-cat`` the MemFlow/LongLive ``torch.cat`` rebuild,
``compile-seed`` torch.compile of the shift (``shift_write``), then ``KVRing.append`` on each backend. Bank insert: ``eager-seed`` is
the seed's per-layer frame copy after ``.item()``, ``compile-seed`` its torch.compile, then ``bank_insert`` on each
backend. Bytes: the bytes that must move, the new tokens (or the frame) of k and v read once and written once.
"""
from __future__ import annotations

import gc

import torch

from streamkern import KVRing, bank_insert
from streamkern.bank_insert import BACKENDS as BANK_BACKENDS
from streamkern.kv_ring import BACKENDS as RING_BACKENDS
from streamkern.reference import bank_insert as bank_ref
from streamkern.reference import kv_ring as ring_ref

DTYPE = torch.bfloat16
CASES = [  # name, H, D, tokens per frame, window frames, sink frames, bank frames
    ("seed-24x64", 24, 64, 1560, 15, 0, 6),
    ("memflow-12x128", 12, 128, 1560, 12, 3, 3),
    ("matrixgame-12x128", 12, 128, 880, 6, 0, None),
]
CHUNK_FRAMES = 3


def _new_tokens(report, NL, T, H, D, moved):
    return [(torch.randn(NL, 1, T, H, D, dtype=DTYPE, device=report.device),
             torch.randn(NL, 1, T, H, D, dtype=DTYPE, device=report.device))
            for _ in range(report.input_sets(moved, limit=3))]


def _filled(cache, sets, T):
    """Append until the window is full (steady state), then hand the cache back."""
    for i in range((cache.window if hasattr(cache, "window") else cache.size) // T + 2):
        cache.append(*sets[i % len(sets)])
    return cache


def _ring(report, NL, name, H, D, fsl, window, sink):
    op, T = "ring_append", CHUNK_FRAMES * fsl
    moved = 2 * 2 * NL * T * H * D * DTYPE.itemsize
    sets = _new_tokens(report, NL, T, H, D, moved)
    common = dict(bytes=moved, extra={"NL": NL, "H": H, "D": D, "T": T, "window": window * fsl, "sink": sink * fsl})
    shape = (NL, 1, H, D, window * fsl, sink * fsl, DTYPE, report.device)
    impls = [("eager-seed", lambda: ring_ref.ShiftCache(*shape), False),
             ("eager-cat", lambda: ring_ref.CatCache(*shape), False),
             ("compile-seed", lambda: ring_ref.ShiftCache(*shape), True)]
    impls += [(b, lambda _b=b: KVRing(*shape, backend=_b), False)
              for b in ["torch"] + report.backends(RING_BACKENDS)]
    for impl, make, compile_it in impls:
        cache = _filled(make(), sets, T)
        fn = cache.append
        if compile_it:  # the steady-state shift itself (fill == S), so that no host counter changes between calls
            shift = report.compiled(ring_ref.shift_write)
            fn = (lambda k, v, _c=cache: shift(_c.k, _c.v, k, v, _c.size, _c.sink))
        report.add(op, name, impl, fn, sets, **common)
        del cache, fn
        gc.collect()


def _bank(report, NL, name, H, D, fsl, frames):
    op = "bank_insert"
    moved = 2 * 2 * NL * fsl * H * D * DTYPE.itemsize
    dev = report.device
    bank_k = torch.zeros(NL, 1, frames * fsl, H, D, dtype=DTYPE, device=dev)
    bank_v = torch.zeros_like(bank_k)
    sets = [(torch.randn(NL, 1, CHUNK_FRAMES * fsl, H, D, dtype=DTYPE, device=dev),
             torch.randn(NL, 1, CHUNK_FRAMES * fsl, H, D, dtype=DTYPE, device=dev),
             torch.tensor([i % CHUNK_FRAMES], device=dev), torch.tensor([i % frames], device=dev))
            for i in range(report.input_sets(moved, limit=3))]
    common = dict(bytes=moved, extra={"NL": NL, "H": H, "D": D, "frame_seq_len": fsl, "bank_frames": frames})
    kv_bank = [{"k": bank_k[layer], "v": bank_v[layer]} for layer in range(NL)]

    def seed(ck, cv, f, s):
        chunk = [{"k": ck[layer], "v": cv[layer]} for layer in range(NL)]
        bank_ref.seed_bank_insert(kv_bank, chunk, f, s, fsl)

    report.add(op, name, "eager-seed", seed, sets, baseline=None, **common)
    report.add(op, name, "compile-seed", report.compiled(seed), sets, **common)
    for b in ["torch"] + report.backends(BANK_BACKENDS):
        fn = (lambda ck, cv, f, s, _b=b: bank_insert(bank_k, bank_v, ck, cv, f, s, fsl, backend=_b))
        report.add(op, name, b, fn, sets, **common)


def run(report) -> None:
    NL = 4 if report.quick else 30
    cases = CASES[:1] if report.quick else CASES
    for name, H, D, fsl, window, sink, bank in cases:
        label = f"{name}-NL{NL}-bf16"
        _ring(report, NL, label, H, D, fsl, window, sink)
        if bank:
            _bank(report, NL, label, H, D, fsl, bank)
        gc.collect()

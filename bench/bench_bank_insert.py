"""Benchmark of bank_insert (docs/contract.md §6, issue 3), at the ring benchmark's model shapes (``bench_ring_write.py``:
the seed's 24 × 64 heads with a 6-frame bank, MemFlow's 12 × 128 with 3 frames; 4 blocks on a CPU, 30 on a GPU).

``eager-seed`` is the seed's per-layer frame copy after ``.item()``, ``compile-seed`` its torch.compile, then
``bank_insert`` on each backend. Bytes: the frame of k and v read once and written once.
"""
from __future__ import annotations

import gc

import torch

from streamkern import bank_insert
from streamkern.ops.bank_insert import bank_insert_op
from streamkern.ops.reference import bank_insert as bank_ref

from .bench_ring_write import CASES, CHUNK_FRAMES, DTYPE, layers


def _bank(bench, NL, name, H, D, fsl, frames):
    op = "bank_insert"
    moved = 2 * 2 * NL * fsl * H * D * DTYPE.itemsize
    dev = bench.device
    bank_k = torch.zeros(NL, 1, frames * fsl, H, D, dtype=DTYPE, device=dev)
    bank_v = torch.zeros_like(bank_k)
    sets = [(torch.randn(NL, 1, CHUNK_FRAMES * fsl, H, D, dtype=DTYPE, device=dev),
             torch.randn(NL, 1, CHUNK_FRAMES * fsl, H, D, dtype=DTYPE, device=dev),
             torch.tensor([i % CHUNK_FRAMES], device=dev), torch.tensor([i % frames], device=dev))
            for i in range(bench.input_sets(moved, limit=3))]
    common = dict(bytes=moved, extra={"NL": NL, "H": H, "D": D, "frame_seq_len": fsl, "bank_frames": frames})
    kv_bank = [{"k": bank_k[layer], "v": bank_v[layer]} for layer in range(NL)]

    def seed(ck, cv, f, s):
        chunk = [{"k": ck[layer], "v": cv[layer]} for layer in range(NL)]
        bank_ref.seed_bank_insert(kv_bank, chunk, f, s, fsl)

    yield bench.case(op, name, "eager-seed", seed, sets, baseline=None, **common)
    yield bench.case(op, name, "compile-seed", bench.compiled(seed), sets, **common)
    for b in ["torch"] + bench.backends(bank_insert_op):
        fn = (lambda ck, cv, f, s, _b=b: bank_insert(bank_k, bank_v, ck, cv, f, s, fsl, backend=_b))
        yield bench.case(op, name, b, fn, sets, **common)


def cases(bench):
    NL = layers(bench)
    for name, H, D, fsl, _, _, frames in CASES[:1] if bench.quick else CASES:
        if frames:
            yield from _bank(bench, NL, f"{name}-NL{NL}-bf16", H, D, fsl, frames)
            gc.collect()

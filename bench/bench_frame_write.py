"""Benchmark of frame_write (docs/contract.md §4.5, §6): one block's clean chunk written into its frame pages, every layer,
k and v, with each new page's mean key.

Shapes: MemFlow's Wan2.1-1.3B per block (30 layers, 12 heads × 128, 1560-token frames, a 3-frame chunk) into a
pool of 3 sink + 9 window + 3 bank + 3 free pages, bf16; on a CPU (``bench.quick``) 4 layers and a 1-frame chunk
into 1 + 2 + 1 + 1 pages.

Implementations:
  ``eager-memflow``   MemFlow's cache update: per layer, the chunk's k and v copied into the cache slice
                      (``cache[:, a:b] = k``), and the per-frame mean key its sparse memory activation computes
                      from the bank frames (the baseline);
  ``compile-memflow`` ``torch.compile`` of it;
  ``torch`` / ``cpu`` / ``triton`` / ``cuda``  ``frame_write`` on each backend (one launch for every layer).
Bytes: k and v of the chunk read once and written once, the means written once (float32).
"""
from __future__ import annotations

import gc

import torch

from streamkern import frame_write
from streamkern.ops.frame_write import frame_write_op

from .bench_frame_attention import D, FRAME, H   # one transformer block of Wan2.1-1.3B as MemFlow runs it

OP = "frame_write"
DTYPE = torch.bfloat16
FULL = dict(layers=30, chunk=3, pages=3 + 9 + 3 + 3)
QUICK = dict(layers=4, chunk=1, pages=1 + 2 + 1 + 1)


def memflow_write(cache_k, cache_v, k_mean, k_new, v_new, first: int):
    """Per layer: the chunk ``k_new/v_new [NL, B, n·F, H, D]`` into the contiguous caches ``[NL, B, P·F, H, D]``
    from frame ``first`` on, and its per-frame mean keys into ``k_mean [NL, B, P, H, D]``."""
    NL, B, T, Hh, Dd = k_new.shape
    n = T // FRAME
    for layer in range(NL):
        cache_k[layer][:, first * FRAME:first * FRAME + T] = k_new[layer]
        cache_v[layer][:, first * FRAME:first * FRAME + T] = v_new[layer]
        k_mean[layer][:, first:first + n] = k_new[layer].view(B, n, FRAME, Hh, Dd).float().mean(2)


def cases(bench):
    shape = QUICK if bench.quick else FULL
    NL, n, P = shape["layers"], shape["chunk"], shape["pages"]
    dev, es = bench.device, DTYPE.itemsize
    moved = 2 * 2 * NL * n * FRAME * H * D * es + NL * n * H * D * 4
    g = torch.Generator(device="cpu").manual_seed(0)
    pool_k = torch.zeros(NL, 1, P, FRAME, H, D, dtype=DTYPE, device=dev)
    pool_v, k_mean = torch.zeros_like(pool_k), torch.zeros(NL, 1, P, H, D, dtype=torch.float32, device=dev)
    sets = []
    for _ in range(bench.input_sets(moved, limit=3)):
        k_new, v_new = (torch.randn(NL, 1, n * FRAME, H, D, generator=g).to(DTYPE).to(dev) for _ in range(2))
        first = P - n   # the free pages (a fixed target: torch.compile specialises on it)
        sets.append((k_new, v_new, first, torch.arange(first, first + n, device=dev)[None]))
    label = f"NL{NL}-H{H}-D{D}-F{FRAME}-n{n}-bf16"
    common = dict(bytes=moved, baseline="eager-memflow", extra={"NL": NL, "H": H, "D": D, "frame": FRAME, "chunk": n, "pages": P})
    flat_k, flat_v = pool_k.view(NL, 1, P * FRAME, H, D), pool_v.view(NL, 1, P * FRAME, H, D)

    def eager(k_new, v_new, first, pages):
        memflow_write(flat_k, flat_v, k_mean, k_new, v_new, first)

    yield bench.case(OP, label, "eager-memflow", eager, sets, **{**common, "baseline": None})
    yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), sets, **common)
    for b in ["torch"] + bench.backends(frame_write_op):
        def write(k_new, v_new, first, pages, _b=b):
            frame_write(pool_k, pool_v, k_mean, k_new, v_new, pages, backend=_b)
        yield bench.case(OP, label, b, write, sets, **common)
    gc.collect()

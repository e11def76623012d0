"""Benchmark of one step of memory attention + cache handling at MemFlow's shapes (DESIGN.md §4.5, §6; issue 13).

Shapes (one transformer block; the heads, head dim and page size of Wan2.1-1.3B as MemFlow uses it): 12 heads ×
128, pages of 1560 tokens, q = one 3-frame chunk (Lq = 4680) attending 3 sink + 9 window + 3 bank frames and its
own 3 frames (28 080 keys); the sparse case keeps the top 3 of a 6-frame bank per head (MemFlow's sparse memory
activation). ``--quick`` (or ``quick=True``) shrinks the memory to 1 sink + 2 window + 1 bank frame (sparse: top 1
of 2) and the chunk to one frame, same heads, head dim and page size. On CUDA (``GPU_SHAPES``) the dense step is
also timed at Matrix-Game 2.0's (880-token frames, a 3-frame chunk over the 12 frames before it: FastVideo's
15-frame window with ``local_attn_size=-1``, Lq 2640 × Lk 13200), at Wan2.1-14B's 40 heads with MemFlow's memory,
and with a one-frame chunk (Lq 1560 × Lk 24960); bf16 everywhere, fp32 at MemFlow's shape.

Implementations, per dtype (bf16, fp32):
  ``eager-memflow``  MemFlow's code: clone the ring cache, ``torch.cat`` sink + bank + window + the chunk (sparse:
                     mean-query · mean-key scores, ``topk`` and a ``gather`` of the chosen bank frames per head
                     first), then SDPA (the baseline);
  ``compile-memflow`` ``torch.compile`` of it;
  ``sdpa-precat``     SDPA over the same keys already concatenated (the floor without copies; dense only); on CUDA
                     also with the cuDNN (``sdpa-precat-cudnn``) and the flash (``sdpa-precat-flash``) kernel forced
                     (fp16/bf16: neither takes fp32);
  ``flex+mask``       compiled FlexAttention over the pool (chunk already written to its pages) with a BlockMask of the
                     listed pages, the mask built inside the step; ``flex`` the same with the mask prebuilt, and
                     ``flex-mask-build`` the mask build alone (dense only; none of the compiled rows without
                     ``bench.compile``);
  ``cpu`` / ``cuda`` ``frame_attention`` on the pool pages in place (sparse: ``frame_topk`` on ``k_mean`` first).
The ``triton`` backend is not timed on CPU: under the interpreter it is a correctness tool, far too slow at these
shapes (it is timed on GPUs). ``extra.cache_bytes`` counts the bytes the step's cache handling moves (clone, cat
and gather: each read once and written once); FLOP counts ``4·Lq·Lk·D`` per (b, h). Run alone:
``python -m streamkern.bench.bench_frame_attention [--quick] [--budget S] [--dtypes bf16 fp32]``.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from streamkern import frame_attention, frame_topk
from streamkern.frame_attention import frame_attention_op

OP = "frame_attention_step"
H, D, FRAME = 12, 128, 1560   # Wan2.1-1.3B's heads and head dim, MemFlow's latent frame (a shape's default)
FULL = dict(chunk=3, sink=3, window=9, bank=3, sparse_bank=6, topk=3)
QUICK = dict(chunk=1, sink=1, window=2, bank=1, sparse_bank=2, topk=1)
# CUDA: (label, shape, dtypes, sparse) of the first H200 run (gpu-runs/2026-12-04-h200), most important first
GPU_SHAPES = [
    ("memflow", FULL, ("bf16", "fp32"), True),
    ("matrixgame2", dict(chunk=3, sink=0, window=12, bank=0, frame=880), ("bf16",), False),
    ("wan14b-memflow", dict(FULL, heads=40), ("bf16",), False),
    ("memflow-1frame", dict(FULL, chunk=1), ("bf16",), False),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Step:
    """One block's memory: MemFlow's ring cache (sink + window) and bank as contiguous ``[1, T, H, D]`` tensors,
    and the same frames as pages of one pool layer ``[1, P, F, H, D]`` (pages: sink, window, bank, the chunk)."""

    def __init__(self, shape: dict, bank: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.bank, self.dtype = shape, bank, dtype
        self.heads, self.frame = shape.get("heads", H), shape.get("frame", FRAME)
        ring, chunk, hh, fr = shape["sink"] + shape["window"], shape["chunk"], self.heads, self.frame
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*s):
            return torch.randn(*s, generator=g).to(dtype).to(device)

        self.q = rnd(1, chunk * fr, hh, D)
        self.new_k, self.new_v = rnd(1, chunk * fr, hh, D), rnd(1, chunk * fr, hh, D)
        self.pool_k, self.pool_v = rnd(1, ring + bank + chunk, fr, hh, D), rnd(1, ring + bank + chunk, fr, hh, D)
        self.pool_k[:, ring + bank:] = self.new_k.view(1, chunk, fr, hh, D)   # the chunk's pages (flex reads them)
        self.pool_v[:, ring + bank:] = self.new_v.view(1, chunk, fr, hh, D)
        self.k_mean = self.pool_k.float().mean(2)
        self.cache_k = self.pool_k[:, :ring].reshape(1, ring * fr, hh, D).clone()
        self.cache_v = self.pool_v[:, :ring].reshape(1, ring * fr, hh, D).clone()
        self.bank_k = self.pool_k[:, ring:ring + bank].reshape(1, bank * fr, hh, D).clone()
        self.bank_v = self.pool_v[:, ring:ring + bank].reshape(1, bank * fr, hh, D).clone()
        self.ring_ids = torch.arange(ring, device=device)
        self.bank_ids = torch.arange(ring, ring + bank, device=device)
        self.sink = shape["sink"] * fr

    def keys(self) -> int:
        bank = self.shape["topk"] if self.bank > self.shape["bank"] else self.bank
        return (self.shape["sink"] + self.shape["window"] + bank + self.shape["chunk"]) * self.frame

    def extra(self) -> dict:
        return {"H": self.heads, "D": D, "frame": self.frame, "Lq": self.q.shape[1], "Lk": self.keys(),
                "dtype": str(self.dtype), **self.shape}

    def timing(self, device: torch.device) -> dict:
        """Few calls (one shape's step takes milliseconds on a GPU, up to seconds on a CPU or in fp32)."""
        reps = 20 if device.type == "cuda" and self.dtype != torch.float32 else 3
        return dict(flops=4 * self.heads * self.q.shape[1] * self.keys() * D, max_reps=reps, warmup=1)


def memflow_dense(q, cache_k, cache_v, bank_k, bank_v, new_k, new_v, sink: int):
    """MemFlow's step: clone the cache, cat sink + bank + window + chunk, SDPA (layout ``[B, T, H, D]``)."""
    k, v = cache_k.clone(), cache_v.clone()
    k_all = torch.cat([k[:, :sink], bank_k, k[:, sink:], new_k], dim=1)
    v_all = torch.cat([v[:, :sink], bank_v, v[:, sink:], new_v], dim=1)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k_all.transpose(1, 2), v_all.transpose(1, 2)).transpose(1, 2)


def memflow_sparse(q, cache_k, cache_v, bank_k, bank_v, new_k, new_v, sink: int, topk: int):
    """MemFlow's sparse memory activation: top-k bank frames per head by mean query · mean key, gathered, then the
    dense step's clone + cat + SDPA in ``[B, H, T, D]``."""
    B, T, Hh, Dd = bank_k.shape
    frames = T // FRAME
    bk = bank_k.view(B, frames, FRAME, Hh, Dd).permute(0, 3, 1, 2, 4)               # [B, H, frames, F, D]
    bv = bank_v.view(B, frames, FRAME, Hh, Dd).permute(0, 3, 1, 2, 4)
    score = torch.einsum("bhd,bhnd->bhn", q.float().mean(1), bk.float().mean(3))
    idx = score.topk(topk, dim=-1).indices[..., None, None].expand(B, Hh, topk, FRAME, Dd)
    sel_k = bk.gather(2, idx).reshape(B, Hh, topk * FRAME, Dd)
    sel_v = bv.gather(2, idx).reshape(B, Hh, topk * FRAME, Dd)
    k, v = cache_k.clone().transpose(1, 2), cache_v.clone().transpose(1, 2)
    k_all = torch.cat([k[:, :, :sink], sel_k, k[:, :, sink:], new_k.transpose(1, 2)], dim=2)
    v_all = torch.cat([v[:, :, :sink], sel_v, v[:, :, sink:], new_v.transpose(1, 2)], dim=2)
    return F.scaled_dot_product_attention(q.transpose(1, 2), k_all, v_all).transpose(1, 2)


def _flex(s: Step, device):
    """``(build, attend)``: the BlockMask of the listed pages over the pool, and compiled FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    P, fr = s.pool_k.shape[1], s.frame
    allowed = torch.zeros(P, dtype=torch.bool, device=device)
    allowed[torch.cat([s.ring_ids, s.bank_ids, torch.arange(P - s.shape["chunk"], P, device=device)])] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[kv_idx // fr]

    def build():
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=s.q.shape[1], KV_LEN=P * fr, device=device)

    flex = torch.compile(flex_attention, dynamic=False)
    k = s.pool_k.view(1, P * fr, s.heads, D).transpose(1, 2)
    v = s.pool_v.view(1, P * fr, s.heads, D).transpose(1, 2)
    return build, lambda q, mask: flex(q.transpose(1, 2), k, v, block_mask=mask).transpose(1, 2)


def _sdpa_forced(kernel):
    """SDPA over ``[B, T, H, D]`` tensors with one of torch's kernels forced (``SDPBackend`` name)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, kernel)

    def attend(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return attend


def _dense(bench, label, s: Step):
    es = s.dtype.itemsize
    ring_t, keys = s.cache_k.shape[1], s.keys()
    row_bytes = s.heads * D * es
    cache_bytes = 2 * 2 * (ring_t + keys) * row_bytes   # clone of k, v + cat of k, v (read + write)
    base = s.timing(bench.device)
    extra = {**s.extra(), "bank_attended": s.bank}
    args = (s.q, s.cache_k, s.cache_v, s.bank_k, s.bank_v, s.new_k, s.new_v)

    def eager(*a):
        return memflow_dense(*a, s.sink)

    yield bench.case(OP, label, "eager-memflow", eager, [args], baseline=None,
                     extra={**extra, "cache_bytes": cache_bytes}, **base)
    yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), [args],
                     extra={**extra, "cache_bytes": cache_bytes}, baseline="eager-memflow", **base)
    k_all = torch.cat([s.cache_k[:, :s.sink], s.bank_k, s.cache_k[:, s.sink:], s.new_k], 1)
    v_all = torch.cat([s.cache_v[:, :s.sink], s.bank_v, s.cache_v[:, s.sink:], s.new_v], 1)
    yield bench.case(OP, label, "sdpa-precat",
                     lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2)),
                     [(s.q, k_all, v_all)], baseline="eager-memflow", extra={**extra, "cache_bytes": 0}, **base)
    if bench.device.type == "cuda" and s.dtype != torch.float32:
        for kernel in ("CUDNN_ATTENTION", "FLASH_ATTENTION"):
            yield bench.case(OP, label, f"sdpa-precat-{kernel.split('_')[0].lower()}", _sdpa_forced(kernel),
                             [(s.q, k_all, v_all)], baseline="eager-memflow", extra={**extra, "cache_bytes": 0},
                             **base)
    del k_all, v_all
    table = torch.cat([s.ring_ids, s.bank_ids])[None]
    for b in bench.backends(frame_attention_op):
        fn = (lambda q, kp, vp, nk, nv, _b=b: frame_attention(q, kp, vp, table, new_k=nk, new_v=nv, backend=_b))
        yield bench.case(OP, label, b, fn, [(s.q, s.pool_k, s.pool_v, s.new_k, s.new_v)], baseline="eager-memflow",
                         extra={**extra, "cache_bytes": 0}, **base)
    if not bench.compile:
        return
    build, attend = _flex(s, bench.device)
    flex_extra = {**extra, "cache_bytes": 0, "chunk_in_pool": True}
    yield bench.case(OP, label, "flex+mask", lambda q: attend(q, build()), [(s.q,)], baseline="eager-memflow",
                     extra=flex_extra, **base)
    masks = {}

    def prebuilt(q):   # the mask is built at the first (warm-up) call: a failing build is a failed row
        if "mask" not in masks:
            masks["mask"] = build()
        return attend(q, masks["mask"])

    yield bench.case(OP, label, "flex", prebuilt, [(s.q,)], baseline="eager-memflow", extra=flex_extra, **base)
    yield bench.case(OP, label, "flex-mask-build", build, [()], baseline=None, extra=flex_extra, max_reps=5,
                     warmup=1)


def _sparse(bench, label, s: Step):
    es, topk = s.dtype.itemsize, s.shape["topk"]
    ring_t, keys = s.cache_k.shape[1], s.keys()
    row_bytes = s.heads * D * es
    cache_bytes = 2 * 2 * (topk * s.frame + ring_t + keys) * row_bytes   # gather + clone + cat of k and v
    base = s.timing(bench.device)
    extra = {**s.extra(), "bank_pool": s.bank}
    args = (s.q, s.cache_k, s.cache_v, s.bank_k, s.bank_v, s.new_k, s.new_v)

    def eager(*a):
        return memflow_sparse(*a, s.sink, topk)

    yield bench.case(OP, label, "eager-memflow", eager, [args], baseline=None,
                     extra={**extra, "cache_bytes": cache_bytes}, **base)
    yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), [args],
                     extra={**extra, "cache_bytes": cache_bytes}, baseline="eager-memflow", **base)
    ring = s.ring_ids[None, None].expand(1, s.heads, -1)
    candidates = s.bank_ids[None]
    for b in bench.backends(frame_attention_op):
        def step(q, kp, vp, km, nk, nv, _b=b):
            chosen = frame_topk(q, km, candidates, topk, backend=_b)
            table = torch.cat([ring, chosen], dim=2)
            return frame_attention(q, kp, vp, table, new_k=nk, new_v=nv, backend=_b)
        yield bench.case(OP, label, b, step, [(s.q, s.pool_k, s.pool_v, s.k_mean, s.new_k, s.new_v)],
                         baseline="eager-memflow", extra={**extra, "cache_bytes": 0}, **base)


def cases(bench, dtypes: tuple[str, ...] = ("bf16", "fp32"), sparse: bool = True):
    """The full MemFlow shapes (on CUDA the whole ``GPU_SHAPES`` set, each shape in its own dtypes among
    ``dtypes``), or the quick ones when ``bench.frame_quick`` is set (this module's ``--quick``)."""
    quick = getattr(bench, "frame_quick", False)
    if quick:
        shapes = [("quick", QUICK, dtypes, sparse)]
    elif bench.device.type == "cuda":
        shapes = [(tag, shape, [d for d in dts if d in dtypes], sp and sparse) for tag, shape, dts, sp in GPU_SHAPES]
    else:
        shapes = [("memflow", FULL, dtypes, sparse)]
    for name in dtypes:   # one dtype at a time over the shapes: bf16 rows of every shape come before fp32
        dtype = DTYPES[name]
        for tag, shape, shape_dtypes, shape_sparse in shapes:
            if name not in shape_dtypes:
                continue
            yield from _dense(bench, f"{tag}-dense-{name}", Step(shape, shape["bank"], dtype, bench.device))
            gc.collect()
            if shape_sparse:
                yield from _sparse(bench, f"{tag}-sparse{shape['topk']}of{shape['sparse_bank']}-{name}",
                                   Step(shape, shape["sparse_bank"], dtype, bench.device))
                gc.collect()


def main(argv: list[str] | None = None):
    from .harness import Report

    parser = argparse.ArgumentParser(prog="python -m streamkern.bench.bench_frame_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1 sink + 2 window + 1 bank frames, a 1-frame chunk")
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--no-sparse", action="store_true", help="the dense case only")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per implementation")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    report = Report(args.device, budget_s=args.budget)
    report.frame_quick = args.quick
    report.run(cases(report, tuple(args.dtypes), not args.no_sparse))
    print("\n" + report.table())
    suffix = "-frame_attention" + ("-quick" if args.quick else "")
    with tempfile.TemporaryDirectory() as tmp:   # <device>-<date><suffix>.json (+ .png) beside the other results
        for path in report.save(tmp):
            if path:
                stem, ext = os.path.splitext(os.path.basename(path))
                dest = os.path.join(args.out, stem + suffix + ext)
                shutil.move(path, dest)
                print(f"wrote {dest}")
    return report


if __name__ == "__main__":
    main()

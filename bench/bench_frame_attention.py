"""Benchmark of one step of memory attention + cache handling at MemFlow's shapes (docs/contract.md §4.5, §6; issue 13).

Shapes (one transformer block): ``memflow``, the heads, head dim and page size of Wan2.1-1.3B as MemFlow uses it:
12 heads × 128, pages of 1560 tokens, q = one 3-frame chunk (Lq = 4680) attending 3 sink + 9 window + 3 bank frames
and its own 3 frames (28 080 keys); the sparse case keeps the top 3 of a 6-frame bank per head (MemFlow's sparse
memory activation). ``mg2`` Matrix-Game 2.0 (880-token frames, a 3-frame chunk over a 12-frame window: 2640 ×
13 200), ``wan14b`` Wan2.1-14B's 40 heads × 128 over MemFlow's memory, ``oneframe`` MemFlow with a 1-frame chunk
(1560 × 24 960). ``--quick`` (or ``quick=True``) shrinks the memory to 1 sink + 2 window + 1 bank frame (sparse:
top 1 of 2) and the chunk to one frame, same heads, head dim and page size.

Implementations, per dtype (bf16, fp32):
  ``eager-memflow``  MemFlow's code: clone the ring cache, ``torch.cat`` sink + bank + window + the chunk (sparse:
                     mean-query · mean-key scores, ``topk`` and a ``gather`` of the chosen bank frames per head
                     first), then SDPA (the baseline);
  ``compile-memflow`` ``torch.compile`` of it (left out with ``--no-compile``);
  ``sdpa-precat``     SDPA over the same keys already concatenated (the floor without copies; dense only);
                     on CUDA also ``sdpa-precat-{cudnn,flash,efficient}``, each kernel forced;
  ``view-sdpa``      what ``StreamingKV`` does: the chunk written into its pages (``frame_write``), then SDPA over
                     the contiguous range of pages as one view of the pool (sparse: the sinks + window + chunk view
                     merged by lse with ``frame_attention`` over the ``frame_topk`` bank pages);
  ``flex+mask``       compiled FlexAttention over the pool (chunk already written to its pages) with a BlockMask of the
                     listed pages, the mask built inside the step; ``flex`` the same with the mask prebuilt, and
                     ``flex-mask-build`` the mask build alone (dense, ``memflow`` shapes only; not with
                     ``--no-compile``);
  ``cpu`` / ``triton`` ``frame_attention`` on the pool pages in place (sparse: ``frame_topk`` on ``k_mean`` first).
The ``triton`` backend is not timed on CPU: under the interpreter it is a correctness tool, far too slow at these
shapes (it is timed on GPUs). ``extra.cache_bytes`` counts the bytes the step's cache handling moves (clone, cat
and gather: each read once and written once); FLOP counts ``4·Lq·Lk·D`` per (b, h). Run alone:
``python -m streamkern.bench.bench_frame_attention [--quick] [--shapes memflow mg2 ...] [--budget S]
[--dtypes bf16 fp32] [--no-compile] [--jsonl PATH]`` (``--jsonl``: each row appended as a JSON line when measured).
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from streamkern import frame_attention, frame_topk, frame_write
from streamkern.ops.frame_attention import frame_attention_op
from streamkern.ops.view_attention import merge_attention, view_attention

OP = "frame_attention_step"
H, D, FRAME = 12, 128, 1560
SHAPES = {
    "memflow": dict(heads=12, frame=1560, chunk=3, sink=3, window=9, bank=3, sparse_bank=6, topk=3),
    "mg2": dict(heads=12, frame=880, chunk=3, sink=0, window=12, bank=0, sparse_bank=0, topk=0),
    "wan14b": dict(heads=40, frame=1560, chunk=3, sink=3, window=9, bank=3, sparse_bank=6, topk=3),
    "oneframe": dict(heads=12, frame=1560, chunk=1, sink=3, window=9, bank=3, sparse_bank=6, topk=3),
}
FULL = SHAPES["memflow"]
QUICK = dict(heads=12, frame=1560, chunk=1, sink=1, window=2, bank=1, sparse_bank=2, topk=1)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class Step:
    """One block's memory: MemFlow's ring cache (sink + window) and bank as contiguous ``[1, T, H, D]`` tensors,
    and the same frames as pages of one pool layer ``[1, P, F, H, D]`` laid out as ``StreamingKV`` does: sink and
    window pages, the chunk's pages (the end of the window ring), then the bank pages."""

    def __init__(self, shape: dict, bank: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.bank, self.dtype = shape, bank, dtype
        self.heads, self.frame = shape["heads"], shape["frame"]
        ring, chunk, heads, frame = shape["sink"] + shape["window"], shape["chunk"], self.heads, self.frame
        g = torch.Generator(device="cpu").manual_seed(0)

        def rnd(*s):
            return torch.randn(*s, generator=g).to(dtype).to(device)

        self.q = rnd(1, chunk * frame, heads, D)
        self.new_k, self.new_v = rnd(1, chunk * frame, heads, D), rnd(1, chunk * frame, heads, D)
        self.pool_k, self.pool_v = (rnd(1, ring + chunk + bank, frame, heads, D) for _ in range(2))
        self.pool_k[:, ring:ring + chunk] = self.new_k.view(1, chunk, frame, heads, D)   # flex reads them there
        self.pool_v[:, ring:ring + chunk] = self.new_v.view(1, chunk, frame, heads, D)
        self.k_mean = self.pool_k.float().mean(2)
        self.cache_k = self.pool_k[:, :ring].reshape(1, ring * frame, heads, D).clone()
        self.cache_v = self.pool_v[:, :ring].reshape(1, ring * frame, heads, D).clone()
        self.bank_k = self.pool_k[:, ring + chunk:].reshape(1, bank * frame, heads, D).clone()
        self.bank_v = self.pool_v[:, ring + chunk:].reshape(1, bank * frame, heads, D).clone()
        self.ring_ids = torch.arange(ring, device=device)
        self.chunk_ids = torch.arange(ring, ring + chunk, device=device)[None]
        self.bank_ids = torch.arange(ring + chunk, ring + chunk + bank, device=device)
        self.sink = shape["sink"] * frame

    def keys(self) -> int:
        bank = self.shape["topk"] if self.bank > self.shape["bank"] else self.bank
        return (self.shape["sink"] + self.shape["window"] + bank + self.shape["chunk"]) * self.frame

    def write_chunk(self, nk, nv):
        """``StreamingKV.attend``'s first half: the chunk's keys and values into its pages (means included)."""
        frame_write(self.pool_k[None], self.pool_v[None], self.k_mean[None], nk[None], nv[None], self.chunk_ids)


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

    P, frame = s.pool_k.shape[1], s.frame
    allowed = torch.zeros(P, dtype=torch.bool, device=device)
    allowed[torch.cat([s.ring_ids, s.bank_ids, s.chunk_ids[0]])] = True

    def mask_mod(b, h, q_idx, kv_idx):
        return allowed[kv_idx // frame]

    def build():
        return create_block_mask(mask_mod, B=None, H=None, Q_LEN=s.q.shape[1], KV_LEN=P * frame, device=device)

    flex = torch.compile(flex_attention, dynamic=False)
    k = s.pool_k.view(1, P * frame, s.heads, D).transpose(1, 2)
    v = s.pool_v.view(1, P * frame, s.heads, D).transpose(1, 2)
    return build, lambda q, mask: flex(q.transpose(1, 2), k, v, block_mask=mask).transpose(1, 2)


def _sdpa_forced(backend: str):
    """SDPA with one kernel forced (CUDA), or None when torch has no such kernel choice."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]

    def run(q, k, v):
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return run


def _dense(bench, label, s: Step, compile_rows: bool, flex_rows: bool):
    es, heads = s.dtype.itemsize, s.heads
    ring_t, keys = s.cache_k.shape[1], s.keys()
    row_bytes = heads * D * es
    cache_bytes = 2 * 2 * (ring_t + keys) * row_bytes   # clone of k, v + cat of k, v (read + write)
    base = dict(flops=4 * heads * s.q.shape[1] * keys * D, max_reps=3, warmup=1)
    extra = {"H": heads, "D": D, "frame": s.frame, "Lq": s.q.shape[1], "Lk": keys, "dtype": str(s.dtype), **s.shape,
             "bank_attended": s.bank}
    args = (s.q, s.cache_k, s.cache_v, s.bank_k, s.bank_v, s.new_k, s.new_v)

    def eager(*a):
        return memflow_dense(*a, s.sink)

    yield bench.case(OP, label, "eager-memflow", eager, [args], baseline=None,
                     extra={**extra, "cache_bytes": cache_bytes}, **base)
    if compile_rows:
        yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), [args],
                         extra={**extra, "cache_bytes": cache_bytes}, baseline="eager-memflow", **base)
    k_all = torch.cat([s.cache_k[:, :s.sink], s.bank_k, s.cache_k[:, s.sink:], s.new_k], 1)
    v_all = torch.cat([s.cache_v[:, :s.sink], s.bank_v, s.cache_v[:, s.sink:], s.new_v], 1)
    precat = dict(baseline="eager-memflow", extra={**extra, "cache_bytes": 0}, **base)
    yield bench.case(OP, label, "sdpa-precat",
                     lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                    v.transpose(1, 2)),
                     [(s.q, k_all, v_all)], **precat)
    if bench.device.type == "cuda":   # cuDNN's and flash's SDPA kernels take fp16/bf16 only
        for kernel in ("cudnn", "flash", "efficient") if s.dtype != torch.float32 else ("efficient",):
            yield bench.case(OP, label, f"sdpa-precat-{kernel}", _sdpa_forced(kernel), [(s.q, k_all, v_all)],
                             **precat)
    del k_all, v_all
    pages = s.pool_k.shape[1]

    def view_step(q, nk, nv):
        s.write_chunk(nk, nv)
        return view_attention(q, s.pool_k[:, :pages].flatten(1, 2), s.pool_v[:, :pages].flatten(1, 2))

    yield bench.case(OP, label, "view-sdpa", view_step, [(s.q, s.new_k, s.new_v)], baseline="eager-memflow",
                     extra={**extra, "cache_bytes": 0, "chunk_write_bytes": 4 * s.new_k.numel() * es}, **base)
    if flex_rows:
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
    table = torch.cat([s.ring_ids, s.bank_ids])[None]
    for b in bench.backends(frame_attention_op):
        fn = (lambda q, kp, vp, nk, nv, _b=b: frame_attention(q, kp, vp, table, new_k=nk, new_v=nv, backend=_b))
        yield bench.case(OP, label, b, fn, [(s.q, s.pool_k, s.pool_v, s.new_k, s.new_v)], baseline="eager-memflow",
                         extra={**extra, "cache_bytes": 0}, **base)


def _sparse(bench, label, s: Step, compile_rows: bool):
    es, topk, heads = s.dtype.itemsize, s.shape["topk"], s.heads
    ring_t, keys = s.cache_k.shape[1], s.keys()
    row_bytes = heads * D * es
    cache_bytes = 2 * 2 * (topk * s.frame + ring_t + keys) * row_bytes   # gather + clone + cat of k and v
    base = dict(flops=4 * heads * s.q.shape[1] * keys * D, max_reps=3, warmup=1)
    extra = {"H": heads, "D": D, "frame": s.frame, "Lq": s.q.shape[1], "Lk": keys, "dtype": str(s.dtype),
             **s.shape, "bank_pool": s.bank}
    args = (s.q, s.cache_k, s.cache_v, s.bank_k, s.bank_v, s.new_k, s.new_v)

    def eager(*a):
        return memflow_sparse(*a, s.sink, topk)

    yield bench.case(OP, label, "eager-memflow", eager, [args], baseline=None,
                     extra={**extra, "cache_bytes": cache_bytes}, **base)
    if compile_rows:
        yield bench.case(OP, label, "compile-memflow", bench.compiled(eager), [args],
                         extra={**extra, "cache_bytes": cache_bytes}, baseline="eager-memflow", **base)
    ring = s.ring_ids[None, None].expand(1, heads, -1)
    candidates = s.bank_ids[None]
    recent = s.ring_ids.numel() + s.chunk_ids.numel()

    def view_step(q, nk, nv):
        s.write_chunk(nk, nv)
        chosen = frame_topk(q, s.k_mean, candidates, topk)
        dense = view_attention(q, s.pool_k[:, :recent].flatten(1, 2), s.pool_v[:, :recent].flatten(1, 2),
                               return_lse=True)
        return merge_attention(*dense, *frame_attention(q, s.pool_k, s.pool_v, chosen, return_lse=True))[0]

    yield bench.case(OP, label, "view-sdpa", view_step, [(s.q, s.new_k, s.new_v)], baseline="eager-memflow",
                     extra={**extra, "cache_bytes": 0}, **base)
    for b in bench.backends(frame_attention_op):
        def step(q, kp, vp, km, nk, nv, _b=b):
            chosen = frame_topk(q, km, candidates, topk, backend=_b)
            table = torch.cat([ring, chosen], dim=2)
            return frame_attention(q, kp, vp, table, new_k=nk, new_v=nv, backend=_b)
        yield bench.case(OP, label, b, step, [(s.q, s.pool_k, s.pool_v, s.k_mean, s.new_k, s.new_v)],
                         baseline="eager-memflow", extra={**extra, "cache_bytes": 0}, **base)


def cases(bench, dtypes: tuple[str, ...] = ("bf16", "fp32"), sparse: bool = True, shapes: tuple[str, ...] = ("memflow",),
          compile_rows: bool | None = None):
    """The shapes named (``SHAPES``), or the quick ones when ``bench.frame_quick`` is set (this module's
    ``--quick``). ``compile_rows`` (default: ``bench.compile``, off with ``--no-compile`` and ``--smoke``) adds the
    torch.compile and FlexAttention rows."""
    if compile_rows is None:
        compile_rows = bench.compile
    named = [("quick", QUICK)] if getattr(bench, "frame_quick", False) else [(n, SHAPES[n]) for n in shapes]
    for tag, shape in named:
        for name in dtypes:
            dtype = DTYPES[name]
            yield from _dense(bench, f"{tag}-dense-{name}", Step(shape, shape["bank"], dtype, bench.device),
                              compile_rows, compile_rows and tag in ("memflow", "quick"))
            gc.collect()
            if sparse and shape["topk"]:
                yield from _sparse(bench, f"{tag}-sparse{shape['topk']}of{shape['sparse_bank']}-{name}",
                                   Step(shape, shape["sparse_bank"], dtype, bench.device), compile_rows)
                gc.collect()


def main(argv: list[str] | None = None):
    from .harness import Report

    parser = argparse.ArgumentParser(prog="python -m streamkern.bench.bench_frame_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1 sink + 2 window + 1 bank frames, a 1-frame chunk")
    parser.add_argument("--dtypes", nargs="*", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--no-sparse", action="store_true", help="the dense case only")
    parser.add_argument("--shapes", nargs="*", default=["memflow"], choices=list(SHAPES))
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile / FlexAttention rows")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per implementation")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as a JSON line when measured")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    report = Report(args.device, budget_s=args.budget, compile=not args.no_compile, jsonl=args.jsonl)
    report.frame_quick = args.quick
    report.run(cases(report, tuple(args.dtypes), not args.no_sparse, tuple(args.shapes), not args.no_compile))
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

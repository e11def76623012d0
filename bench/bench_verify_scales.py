"""Benchmark of verify_scales (docs/contract.md §6, issue 6).

VAR cases: V = 4096, fp32 logits ``[2B, T, V]`` (CFG doubles the batch, guidance t = 1.5·si/9 as VAR's), windows of
the last 2/3/4 scales of patch_nums 1..16 (T = 425/525/589), B = 1/8/16, greedy mode (SDVAR) and sample mode.
LLM-like cases: V = 32,000 and 128,000, T = 5 single-token "scales" (chain speculative decoding), B = 64, no CFG.
Implementations: the SDVAR-style eager check with host syncs (greedy baseline), ``torch.compile`` of it, the
``"torch"`` reference (the eager baseline of sample mode), each streamkern backend, and on GPU FlashInfer's
chain_speculative_sampling for the LLM sample cases where it is installed. Bytes count the logits read
once (the floor of the op's traffic); ``extra`` records the shape and mode.
"""
from __future__ import annotations

import torch

from streamkern import scale_layout
from streamkern.ops.reference import verify_scales as ref
from streamkern.ops.verify_scales import verify_scales, verify_scales_op

OP = "verify_scales"
VAR = scale_layout()


def _sets(bench, B, T, V, cfg, sample, hit=0.7):
    dev = bench.device
    rows = 2 * B if cfg else B
    set_bytes = rows * T * V * 4 + (B * T * V * 4 if sample else 0)
    sets = []
    for _ in range(bench.input_sets(set_bytes, limit=4)):
        logits = torch.randn(rows, T, V, device=dev)
        amax = logits[:B].argmax(-1)
        draft = torch.where(torch.rand(B, T, device=dev) < hit, amax, torch.randint(0, V, (B, T), device=dev))
        q = torch.softmax(logits[:B] + 0.5 * torch.randn(B, T, V, device=dev), -1) if sample else None
        sets.append((logits, draft, q, torch.rand(B, T, 2, device=dev) if sample else None))
    return sets, rows * T * V * 4


def _case(bench, case, B, layout, first, num, V, cfg, mode):
    T = layout.end[first + num - 1] - layout.begin[first]
    sample = mode == "sample"
    sets, logit_bytes = _sets(bench, B, T, V, cfg, sample)
    offsets = [layout.begin[s] - layout.begin[first] for s in range(first, first + num)] + [T]
    common = dict(bytes=logit_bytes, extra={"B": B, "T": T, "V": V, "cfg": bool(cfg), "mode": mode})

    def ours(name):
        return lambda lg, d, q, u: verify_scales(lg, d, layout, first, num, mode=mode, threshold=0.5, cfg=cfg,
                                                 draft_probs=q, uniforms=u, backend=name)

    if sample:
        yield bench.case(OP, case, "torch", ours("torch"), sets, baseline=None, **common)
    else:
        def seed(lg, d, q, u):
            return ref.sdvar_greedy_check(lg, d, offsets, cfg, 0.5)

        yield bench.case(OP, case, "eager-seed", seed, sets, baseline=None, **common)
        yield bench.case(OP, case, "compile-seed", bench.compiled(seed), sets, **common)
        yield bench.case(OP, case, "torch", ours("torch"), sets, **common)
    for name in bench.backends(verify_scales_op):
        yield bench.case(OP, case, name, ours(name), sets, baseline="torch" if sample else "eager-seed", **common)
    if sample and not cfg and bench.device.type == "cuda":
        fn, unavailable = _flashinfer()
        yield bench.case(OP, case, "flashinfer", fn, sets, baseline="torch", unavailable=unavailable, **common)


def _flashinfer():
    """``(fn, None)``: FlashInfer's chain_speculative_sampling where it is installed, else ``(None, why)``. It takes
    target probabilities with one extra bonus slot, so the softmax of the target logits is part of its time."""
    try:
        from flashinfer.sampling import chain_speculative_sampling
    except Exception as exc:  # not installed, or its import fails on this machine
        return None, f"flashinfer is unavailable: {exc}"

    def fn(lg, d, q, u):
        target = torch.softmax(torch.cat([lg, lg[:, -1:]], 1), -1)
        return chain_speculative_sampling(q, d, target)
    return fn, None


def cases(bench):
    last = VAR.num_scales
    batches = (1, 8) if bench.quick else (1, 8, 16)
    windows = (2,) if bench.quick else (2, 3, 4)
    for num in windows:
        first = last - num
        cfg = [1.5 * si / (last - 1) for si in range(first, last)]
        T = VAR.end[-1] - VAR.begin[first]
        for B in batches:
            for mode in ("greedy", "sample"):
                yield from _case(bench, f"var-{mode[0]}-B{B}-T{T}-cfg", B, VAR, first, num, 4096, cfg, mode)
    chain = scale_layout((1,) * 5)
    for V in ((32000,) if bench.quick else (32000, 128000)):
        for mode in ("greedy", "sample"):
            yield from _case(bench, f"llm-{mode[0]}-B64-T5-V{V}", 64, chain, 0, 5, V, None, mode)

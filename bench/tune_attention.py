"""Tuning of the paged and block-masked attention kernels (issue 21): every kernel and config, in one process.

``python -m streamkern.bench.tune_attention [--budget S] [--flex-budget S] [--no-flex] [--jsonl PATH] [--shapes ...]
[--dry-run]`` times, per shape, bf16:

* ``frame_attention``: the pointer kernel (``triton-pointer``) and the Hopper kernel at every candidate config
  (``triton-<config>``, kernels/frame_attention.py ``CONFIGS``; on GPUs without TMA only the pointer kernel), the
  pages read in place as ``StreamingKV`` does (the chunk already written to its pages, no ``new_k``), against cuDNN's
  SDPA over the same keys concatenated beforehand (``cudnn-sdpa-precat``, the baseline of the ratio column) and, at
  MemFlow's dense shape, compiled FlexAttention with its BlockMask (``flex``, ``flex+mask-build``). Shapes (docs/contract.md
  §6): ``memflow`` (12×128 heads, 1560-token pages, a 3-frame chunk over 3 sink + 9 window + 3 chunk + 3 bank
  pages: 4680 × 28080), ``memflow-sparse`` (the same pages with the bank's 3 per head out of 6, a per-head table),
  ``mg2`` (Matrix-Game 2.0: 880-token pages, 2640 × 13200), ``wan14b`` (40×128 heads over MemFlow's memory),
  ``oneframe`` (a 1-frame chunk, 1560 × 24960) and ``cdit`` (CDiT-L/2 retrieval: 16×64 heads, one 196-token frame
  over the 8 retrieved frames and itself);
* ``block_masked_attention`` at SDVAR's scale masks (VAR's block-causal mask, head dim 64, ``sm_scale`` 1, batch 2 ×
  8 with CFG): ``var256-d16`` and ``var256-d30`` (680 tokens, 16 and 30 heads), ``var512-d16`` (2240 tokens, batch
  4): the kernels as above against compiled FlexAttention including its BlockMask build (``flex+mask-build``, the
  baseline of the ratio column) and without it (``flex``), and cuDNN's SDPA over all pairs without a mask
  (``cudnn-sdpa-unmasked``, what the mask saves).

TFLOP/s count ``4·D`` per attended (query, key) pair (all pairs of the listed pages; the allowed pairs of a scale
mask). Relative error ‖out − ref‖ / ‖ref‖ against fp32 SDPA over the same keys (with the boolean mask for scale
masks). Each row is printed as measured and, with ``--jsonl PATH``, appended to PATH as one JSON object and
flushed (``"source": "tune"``, which bench/gpu_pack.py's summary counts; the first, ``"kind": "info"``, names the
device); one table is printed at the end with, per shape, the fastest Hopper config (what the committed choices of
kernels/frame_attention.py and kernels/block_masked_attention.py should say).

Budget: ``--budget`` seconds for the whole run (default 170, inside the 3 minutes a GPU session gives it); work is done
in order of importance — per shape the baseline, the pointer kernel and the committed config, then every other
config at MemFlow's and VAR's shapes, then at the others, FlexAttention last — and what the budget leaves out is a
row saying so. Interrupted (SIGINT, as a session's ``timeout -s INT`` cap does), it prints the table of what it
measured and returns. FlexAttention compiles with Inductor at its first call of each shape (the H200 session's 15 s
bench caps were spent there): it has its own cap (``--flex-budget``, default 45 s, enforced by an alarm that
interrupts a compilation in progress) and ``--no-flex`` leaves it out.

``--dry-run``: on this CPU in seconds, tiny shapes (2×16 heads, pages of 5-9 tokens), the Triton kernels under
Triton's interpreter (``TRITON_INTERPRET=1``, set here before the kernels are imported) at every config, the float64
torch reference as the baseline; cuDNN and FlexAttention rows are skipped, saying so. Timings of a dry run mean
nothing; it checks that every path of the script runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# name: heads, head dim, page tokens, query pages (the chunk), pages attended, bank pages (per-head choice), batch
FRAME_SHAPES = {
    "memflow": dict(heads=12, dim=128, frame=1560, chunk=3, pages=18, bank=0),
    "memflow-sparse": dict(heads=12, dim=128, frame=1560, chunk=3, pages=18, bank=6),
    "mg2": dict(heads=12, dim=128, frame=880, chunk=3, pages=15, bank=0),
    "wan14b": dict(heads=40, dim=128, frame=1560, chunk=3, pages=18, bank=0),
    "oneframe": dict(heads=12, dim=128, frame=1560, chunk=1, pages=16, bank=0),
    "cdit": dict(heads=16, dim=64, frame=196, chunk=1, pages=9, bank=0),
}
# name: batch, heads, patch_nums (scales)
SCALE_SHAPES = {
    "var256-d16": dict(batch=16, heads=16, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var256-d30": dict(batch=16, heads=30, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16)),
    "var512-d16": dict(batch=4, heads=16, patch_nums=(1, 2, 3, 4, 6, 9, 13, 18, 24, 32)),
}
DRY_FRAME = {"memflow": dict(heads=2, dim=16, frame=9, chunk=1, pages=4, bank=0),
             "memflow-sparse": dict(heads=2, dim=16, frame=9, chunk=1, pages=4, bank=3),
             "cdit": dict(heads=2, dim=16, frame=5, chunk=1, pages=3, bank=0)}
DRY_SCALE = {"var256-d16": dict(batch=1, heads=2, patch_nums=(1, 2, 3, 4))}
SCALE_DIM = 64
PRIORITY_SHAPES = ("memflow", "memflow-sparse", "var256-d16")   # every config runs here first


@dataclass
class Result:
    shape: str
    impl: str
    ms: float | None = None
    tflops: float | None = None
    ratio: float | None = None
    base: str | None = None
    rel_err: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class BudgetExceeded(Exception):
    """The alarm of ``--flex-budget`` (or of the run's budget) rang during a FlexAttention compilation."""


class Tuner:
    """Times implementations, writes each row as it is measured and keeps them for the table."""

    def __init__(self, device: torch.device, budget: float, flex_budget: float | None, jsonl: str | None,
                 dry: bool):
        self.device, self.dry, self.flex = device, dry, flex_budget is not None
        self.deadline = time.monotonic() + budget
        self.flex_left = flex_budget or 0.0
        self.jsonl = jsonl
        self.rows: list[Result] = []
        self.base_ms: dict[str, tuple[str, float]] = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write(self, row: Result) -> None:
        self.rows.append(row)
        print(_line(row), flush=True)
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"source": "tune", "kind": "row", **vars(row)}) + "\n")
                f.flush()

    def skip(self, shape: str, impl: str, why: str) -> None:
        self.write(Result(shape, impl, note=f"skipped: {why}"))

    def time(self, shape: str, impl: str, fn, flops: int, ref: torch.Tensor | None, *, base: bool = False,
             reps: int = 10, extra: dict | None = None) -> float | None:
        """Run ``fn()`` once (compiling), then time it; a row with ms, TFLOP/s, the ratio to the shape's baseline
        and the relative error of the first call's output against ``ref``. Returns the median ms (None if it
        failed or the budget is spent)."""
        if self.left() <= 0:
            self.skip(shape, impl, "over the run's --budget")
            return None
        row = Result(shape, impl, extra=extra or {})
        try:
            out = fn()
            if ref is not None:
                row.rel_err = _rel_error(out, ref)
            times = _timed(fn, self.device, 1 if self.dry else reps, min(1.0, max(self.left(), 0.0)))
        except BudgetExceeded:
            raise
        except Exception as exc:  # a failing implementation is a row, the others still run
            row.note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self.write(row)
            return None
        row.ms = sorted(times)[len(times) // 2]
        row.tflops = flops / row.ms / 1e9
        if base:
            self.base_ms[shape] = (impl, row.ms)
        if shape in self.base_ms:
            row.base, base_ms = self.base_ms[shape]
            row.ratio = base_ms / row.ms
        self.write(row)
        return row.ms

    @contextlib.contextmanager
    def flex_cap(self):
        """Run the block under what is left of ``--flex-budget`` (and of the run): an alarm interrupts it."""
        cap = min(self.flex_left, self.left())
        if cap <= 0:
            raise BudgetExceeded(f"{max(self.flex_left, 0):.0f} s of --flex-budget and {max(self.left(), 0):.0f} s "
                                 f"of --budget left")

        def ring(*_):
            raise BudgetExceeded(f"interrupted after {cap:.1f} s (--flex-budget / --budget)")

        previous = signal.signal(signal.SIGALRM, ring)
        start = time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, cap)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            self.flex_left -= time.monotonic() - start


def _timed(fn, device: torch.device, reps: int, budget_s: float) -> list[float]:
    """Milliseconds of up to ``reps`` calls (at least one), CUDA events on a GPU."""
    times = []
    deadline = time.monotonic() + budget_s
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        n = 0
        while n < reps and (n == 0 or time.monotonic() < deadline):
            events[n][0].record()
            fn()
            events[n][1].record()
            n += 1
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in events[:n]]
    while len(times) < reps and (not times or time.monotonic() < deadline):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = out.double() - ref.double()
    return float(diff.norm() / ref.double().norm())


def _line(r: Result) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    return (f"| {r.shape} | {r.impl} | {f(r.ms, '.3f')} | {f(r.tflops, '.1f')} | {f(r.ratio, '.2f')} | "
            f"{r.base or '-'} | {f(r.rel_err, '.1e')} | {r.note} |")


def table(rows: list[Result]) -> str:
    """The rows as one markdown table, grouped by shape (in the order the shapes were first measured)."""
    order = {shape: i for i, shape in reversed(list(enumerate(r.shape for r in rows)))}
    head = "| shape | impl | ms | TFLOP/s | × base | base | rel. error | note |\n|---|---|---|---|---|---|---|---|"
    return "\n".join([head, *(_line(r) for r in sorted(rows, key=lambda r: order[r.shape]))])


def best_configs(rows: list[Result]) -> dict[str, str]:
    """Per shape, the fastest Hopper config measured (``triton-<config>``)."""
    best: dict[str, Result] = {}
    for r in rows:
        if r.impl.startswith("triton-") and r.impl != "triton-pointer" and r.ms is not None:
            if r.shape not in best or r.ms < best[r.shape].ms:
                best[r.shape] = r
    return {shape: r.impl[len("triton-"):] for shape, r in best.items()}


# --- frame_attention --------------------------------------------------------------------------------------------

def _frame_inputs(shape: dict, device: torch.device, dtype: torch.dtype):
    """``(q [1, chunk·F, H, D], k_pages, v_pages [1, P, F, H, D], table, k_cat, v_cat [1, K·F, H, D])``: a pool
    layer holding the shape's ``pages`` (with a bank: its first ``pages - 3`` and a bank of ``bank`` pages, 3 of
    them picked at random per head), the page table (shared ``[1, K]``, or per head ``[1, H, K]`` with a bank) and
    the keys and values it lists concatenated per head."""
    H, D, frame, pages, bank = shape["heads"], shape["dim"], shape["frame"], shape["pages"], shape["bank"]
    g = torch.Generator().manual_seed(0)
    P = pages + (bank - 3 if bank else 0)
    kp, vp = (torch.randn(1, P, frame, H, D, generator=g).to(device, dtype) for _ in range(2))
    q = torch.randn(1, shape["chunk"] * frame, H, D, generator=g).to(device, dtype)
    if bank:
        fixed = pages - 3
        picks = torch.stack([fixed + torch.randperm(bank, generator=g)[:3] for _ in range(H)])    # [H, 3]
        table = torch.cat([torch.arange(fixed).expand(H, -1), picks], 1)[None].to(device)        # [1, H, K]
    else:
        table = torch.arange(pages)[None].to(device)                                               # [1, K]
    heads = table[0] if table.dim() == 3 else table[0].expand(H, -1)
    k_cat = torch.stack([kp[0, heads[h], :, h].reshape(-1, D) for h in range(H)], 1)[None]         # [1, Lk, H, D]
    v_cat = torch.stack([vp[0, heads[h], :, h].reshape(-1, D) for h in range(H)], 1)[None]
    return q, kp, vp, table, k_cat, v_cat


def _sdpa(q, k, v, kernel: str | None = None, mask=None, scale=None):
    """SDPA in ``[B, L, H, D]`` layouts (``[B, H, L, D]`` for a mask), with one CUDA kernel forced when named."""
    if kernel is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    forced = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]
    with sdpa_kernel([forced]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _kernel_rows(tuner: Tuner, name: str, stage: int, triton, committed, configs: list, flops: int, ref, extra: dict):
    """The Triton rows of a shape: stage 0 the pointer kernel and the committed Hopper config (``committed`` None
    where the device or the layout takes no TMA), stage 1 every other Hopper config."""
    if stage == 0:
        tuner.time(name, "triton-pointer", triton("pointer"), flops, ref, extra=extra)
        if committed is None:
            tuner.skip(name, "triton-<hopper configs>", "no TMA on this device (sm_90 and later)")
        else:
            tuner.time(name, f"triton-{committed.name}", triton(committed), flops, ref,
                       extra={**extra, "committed": True})
    elif committed is not None:
        for config in configs:
            if config != committed:
                tuner.time(name, f"triton-{config.name}", triton(config), flops, ref, extra=extra)


def _frame_shape(tuner: Tuner, name: str, shape: dict, configs: list, dtype, stage: int) -> None:
    """Stage 0: baseline, pointer kernel and the committed config; stage 1: the other configs; stage 2: FlexAttention
    (MemFlow's dense shape)."""
    from streamkern.kernels import attention_tile as tiles
    from streamkern.kernels import frame_attention as kfa

    q, kp, vp, table, k_cat, v_cat = _frame_inputs(shape, tuner.device, dtype)
    B, Lq, H, D = q.shape
    Lk = k_cat.shape[1]
    flops = 4 * B * H * Lq * Lk * D
    scale = D ** -0.5
    full = table if table.dim() == 3 else table[:, None].expand(B, H, -1)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k_cat, v_cat))
    ref_kernel = None if tuner.dry else "efficient"
    ref = _sdpa(qt.float(), kt.float(), vt.float(), ref_kernel).transpose(1, 2)
    extra = dict(B=B, H=H, D=D, Lq=Lq, Lk=Lk, frame=shape["frame"], per_head=table.dim() == 3, dtype=str(dtype))
    hopper = not tiles.tma_unsupported(q, {"q": (q, (1,)), "k_pages": (kp, (1, 2)), "v_pages": (vp, (1, 2))}, D)
    committed = kfa.HOPPER.choose((D, dtype, table.dtype, int(table.dim() == 3), False, False), Lq, True) \
        if hopper else None

    def triton(config):
        return lambda: kfa.frame_attention(q, kp, vp, full, None, None, None, scale, config=config)[0]

    if stage == 0:
        if tuner.dry:
            tuner.skip(name, "cudnn-sdpa-precat", "cuDNN needs CUDA (dry run on the CPU)")
            tuner.time(name, "torch-reference", lambda: _sdpa(qt.double(), kt.double(), vt.double()).transpose(1, 2),
                       flops, ref, base=True, extra=extra)
        else:
            tuner.time(name, "cudnn-sdpa-precat", lambda: _sdpa(qt, kt, vt, "cudnn").transpose(1, 2), flops, ref,
                       base=True, extra=extra)
        _kernel_rows(tuner, name, 0, triton, committed, configs, flops, ref, extra)
    elif stage == 1:
        _kernel_rows(tuner, name, 1, triton, committed, configs, flops, ref, extra)
    elif stage == 2:
        _flex_rows(tuner, name, flops, ref, extra,
                   lambda: _frame_flex(kp, vp, table, q, shape["frame"], tuner.device))


def _frame_flex(kp, vp, table, q, frame: int, device):
    """``(build, attend)``: the BlockMask of the listed pages over the whole pool, compiled FlexAttention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    P, H, D = kp.shape[1], kp.shape[3], kp.shape[4]
    listed = torch.zeros(P, dtype=torch.bool, device=device)
    listed[table.reshape(-1)] = True

    def build():
        return create_block_mask(lambda b, h, qi, ki: listed[ki // frame], B=None, H=None, Q_LEN=q.shape[1],
                                 KV_LEN=P * frame, device=device)

    flex = torch.compile(flex_attention, dynamic=False)
    k, v = (t.view(1, P * frame, H, D).transpose(1, 2) for t in (kp, vp))
    return build, lambda mask: flex(q.transpose(1, 2), k, v, block_mask=mask).transpose(1, 2)


def _flex_rows(tuner: Tuner, name: str, flops: int, ref, extra: dict, make, base: bool = False) -> None:
    """``flex+mask-build`` (the mask built in each call) and ``flex`` (prebuilt), ``(build, attend) = make()``,
    under the FlexAttention cap."""
    if tuner.dry:
        tuner.skip(name, "flex", "FlexAttention is compiled for CUDA here (dry run on the CPU)")
        return
    if not tuner.flex:
        tuner.skip(name, "flex", "--no-flex")
        return
    try:
        with tuner.flex_cap():
            build, attend = make()
            mask = build()
            tuner.time(name, "flex+mask-build", lambda: attend(build()), flops, ref, base=base, extra=extra)
            tuner.time(name, "flex", lambda: attend(mask), flops, ref, extra=extra)
    except BudgetExceeded as exc:
        tuner.skip(name, "flex", str(exc))


# --- block_masked_attention -------------------------------------------------------------------------------------

def _scale_shape(tuner: Tuner, name: str, shape: dict, configs: list, dtype, stage: int) -> None:
    """Stage 0: unmasked cuDNN, the pointer kernel and the committed config; stage 1: the other configs; stage 2:
    FlexAttention with its mask build (the baseline of the ratios) and without."""
    import streamkern
    from streamkern.kernels import attention_tile as tiles
    from streamkern.kernels import block_masked_attention as ksa
    from streamkern.ops.reference import block_masked_attention as ref_sa

    layout = streamkern.scale_layout(shape["patch_nums"])
    ids = layout.scale_of_token.to(tuner.device)
    allow = streamkern.scale_allow(layout.num_scales, "var", device=tuner.device)
    B, H, L = shape["batch"], shape["heads"], layout.total
    D = 16 if tuner.dry else SCALE_DIM
    g = torch.Generator().manual_seed(1)
    q, k = (F.normalize(torch.randn(B, H, L, D, generator=g), dim=-1).to(tuner.device, dtype) for _ in range(2))
    v = torch.randn(B, H, L, D, generator=g).to(tuner.device, dtype)
    mask = ref_sa.dense_mask(ids, ids, allow, False)
    pairs = int(mask.sum())
    flops = 4 * B * H * D * pairs
    ref = _sdpa(q.float(), k.float(), v.float(), None if tuner.dry else "efficient", mask=mask, scale=1.0)
    extra = dict(B=B, H=H, D=D, L=L, allowed_pairs=pairs / L ** 2, dtype=str(dtype))
    hopper = not tiles.tma_unsupported(q, {"q": (q, (2,)), "k": (k, (2,)), "v": (v, (2,))}, D)
    committed = ksa.HOPPER.choose((D, dtype, False), L, False) if hopper else None

    def triton(config):
        return lambda: ksa.block_masked_attention(q, k, v, ids, ids, allow, False, 1.0, config=config)

    if stage == 0:
        if tuner.dry:
            tuner.time(name, "torch-reference", lambda: _sdpa(q.double(), k.double(), v.double(), mask=mask,
                                                              scale=1.0), flops, ref, base=True, extra=extra)
            tuner.skip(name, "cudnn-sdpa-unmasked", "cuDNN needs CUDA (dry run on the CPU)")
        else:
            tuner.time(name, "cudnn-sdpa-unmasked", lambda: _sdpa(q, k, v, "cudnn", scale=1.0), flops, None,
                       extra={**extra, "note": "all pairs, no mask: what the mask saves, not the same result"})
        _kernel_rows(tuner, name, 0, triton, committed, configs, flops, ref, extra)
    elif stage == 1:
        _kernel_rows(tuner, name, 1, triton, committed, configs, flops, ref, extra)
    elif stage == 2:
        def make():
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def build():
                return create_block_mask(lambda b, h, qi, ki: allow[ids[qi], ids[ki]], B=None, H=None, Q_LEN=L,
                                         KV_LEN=L, device=tuner.device)

            flex = torch.compile(flex_attention, dynamic=False)
            return build, lambda m: flex(q, k, v, block_mask=m, scale=1.0)

        _flex_rows(tuner, name, flops, ref, extra, make, base=True)


def run(device: torch.device, budget: float, flex_budget: float, jsonl: str | None, frame_shapes: dict,
        scale_shapes: dict, flex: bool, dry: bool) -> Tuner:
    from streamkern.bench.harness import device_info
    from streamkern.kernels import frame_attention as kfa
    from streamkern.kernels import block_masked_attention as ksa

    tuner = Tuner(device, budget, flex_budget if flex else None, jsonl, dry)
    info = device_info(device)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps({"source": "tune", "kind": "info", "dry_run": dry, **info}) + "\n")
    print(f"tune_attention on {info['name']} (torch {info['torch']}, triton {info['triton']}, commit "
          f"{info['commit']}){' — dry run: the interpreter, tiny shapes; timings mean nothing' if dry else ''}")
    dtype = torch.bfloat16
    ordered = [n for n in PRIORITY_SHAPES if n in frame_shapes or n in scale_shapes]
    ordered += [n for n in (*frame_shapes, *scale_shapes) if n not in ordered]

    def stage(n: int, names):
        for name in names:
            if name in frame_shapes:
                _frame_shape(tuner, name, frame_shapes[name], list(kfa.CONFIGS), dtype, n)
            else:
                _scale_shape(tuner, name, scale_shapes[name], list(ksa.CONFIGS), dtype, n)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    try:
        stage(0, ordered)
        stage(1, [n for n in ordered if n in PRIORITY_SHAPES])
        stage(1, [n for n in ordered if n not in PRIORITY_SHAPES])
        stage(2, [n for n in ("memflow", *scale_shapes) if n in frame_shapes or n in scale_shapes])
    except KeyboardInterrupt:   # a session's cap (timeout -s INT): keep what was measured, print it
        tuner.skip("-", "-", "interrupted (SIGINT): the rows above are what was measured")
    for r in tuner.rows:                         # rows measured before their shape's baseline (FlexAttention's)
        if r.ms is not None and r.ratio is None and r.shape in tuner.base_ms:
            r.base, base_ms = tuner.base_ms[r.shape]
            r.ratio = base_ms / r.ms
    print("\n" + table(tuner.rows))
    best = best_configs(tuner.rows)
    if best:
        print("\nfastest Hopper config per shape (for the committed choices of kernels/frame_attention.py and "
              "kernels/block_masked_attention.py): " + ", ".join(f"{k}: {v}" for k, v in best.items()))
    return tuner


def main(argv: list[str] | None = None) -> Tuner:
    parser = argparse.ArgumentParser(prog="python -m streamkern.bench.tune_attention", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=170.0, help="seconds for the whole run (default 170)")
    parser.add_argument("--flex-budget", type=float, default=45.0,
                        help="seconds for FlexAttention's compilations and rows (default 45)")
    parser.add_argument("--no-flex", action="store_true", help="no FlexAttention rows")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as one JSON object")
    parser.add_argument("--shapes", nargs="*", default=None, choices=[*FRAME_SHAPES, *SCALE_SHAPES],
                        help="the shapes to run (default: all)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU in seconds: tiny shapes, the interpreter, no cuDNN or FlexAttention")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"            # before the first import of the Triton kernels
        if "streamkern.kernels.frame_attention" in sys.modules and not _interpreted():
            parser.error("--dry-run: the Triton kernels were imported without TRITON_INTERPRET=1 in this process")
        device, frames, scales = torch.device("cpu"), DRY_FRAME, DRY_SCALE
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run it on a GPU, or --dry-run on the CPU")
        device, frames, scales = torch.device("cuda"), FRAME_SHAPES, SCALE_SHAPES
    if args.shapes is not None:
        frames = {k: v for k, v in frames.items() if k in args.shapes}
        scales = {k: v for k, v in scales.items() if k in args.shapes}
    return run(device, args.budget, args.flex_budget, args.jsonl, frames, scales, not args.no_flex, args.dry_run)


def _interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from streamkern.kernels import frame_attention as kfa
    return isinstance(kfa.HOPPER.kernel, InterpretedFunction)


if __name__ == "__main__":
    main()

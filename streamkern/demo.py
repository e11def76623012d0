"""``python -m streamkern.demo``: every reference pipeline, eager source code vs each accelerated backend.

For each pipeline (``MemoryBank``, ``StreamingGenerator`` with and without sparse memory activation,
``MemoryWorldModel``, ``GatedPolicy``, ``SpeculativeVAR`` greedy and sample) it runs the eager baseline
(``backend="torch"``, the source pipeline's own code) and then the same streamed run on streamkern's ops with every
accelerated backend available on the device, and prints one table: outputs identical (tokens/indices equal and
tensors within the parity metric of DESIGN.md §3) with the largest relative error, median latency per step (best of
``--repeats`` rounds), speed-up over eager, host syncs per step; then the parts of a step that streamkern replaces
(cache handling, scoring, eviction, retrieval, gating, verification, the attention over the streaming memory),
timed alone in one more run (each part between device synchronisations), eager vs accelerated, with the bytes they
read and write per step. The table is also written as JSON and a PNG chart (both measures) under ``--out``.

``--shapes real`` runs ``StreamingGenerator`` at the Wan2.1 per-block shapes of DESIGN.md §6 (12 heads × 128,
1560-token frames; one transformer block and one-frame chunks on a CPU) and ``MemoryWorldModel`` at the CDiT-L/2
shapes (16 heads × 64, 196-token frames, buffer 50, k = 8; 4 blocks, the later two with memory), one round with the
parts timed within it, so the parts' share reflects real proportions, not only the tiny models' matmuls.

Triton runs on CPU tensors only through its interpreter, far too slow for a demo: ``--triton`` adds it anyway.
``--reference-ops`` adds the op path on the ops' own ``"torch"`` references (the structure without the kernels).
On CUDA an ``auto`` row runs every op on its fastest GPU backend (a backend an op lacks fails its row, by name).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

# (pipeline label, class, constructor kwargs, run args) at the default and at the --tiny smoke-test size.
DEFAULT = [
    ("MemoryBank", "MemoryBank", dict(num_layers=4, batch=1, heads=4, head_dim=32, frame_seq_len=64),
     (16,)),
    ("StreamingGenerator", "StreamingGenerator", {}, (16,)),
    ("StreamingGenerator sparse", "StreamingGenerator", {"sparse_bank": 3}, (16,)),
    ("MemoryWorldModel", "MemoryWorldModel", {}, (72,)),
    ("GatedPolicy", "GatedPolicy", {}, (20,)),
    ("SpeculativeVAR greedy", "SpeculativeVAR", {"mode": "greedy"}, (2,)),
    ("SpeculativeVAR sample", "SpeculativeVAR", {"mode": "sample"}, (2,)),
]
_TINY_STREAM = dict(num_layers=2, heads=2, head_dim=8, frame_seq_len=4, window_frames=6, bank_size=2, text_len=8,
                    text_dim=16, steps=1, switch_every=2)
TINY = [
    ("MemoryBank", "MemoryBank", dict(num_layers=3, batch=1, heads=2, head_dim=8, frame_seq_len=4, bank_size=2),
     (4,)),
    ("StreamingGenerator", "StreamingGenerator", _TINY_STREAM, (8,)),
    ("StreamingGenerator sparse", "StreamingGenerator", dict(_TINY_STREAM, sparse_bank=1), (8,)),
    ("MemoryWorldModel", "MemoryWorldModel", dict(depth=2, heads=2, head_dim=8, frame_len=4, buffer_size=6, k=4,
                                                  steps=1, trajectory_period=8), (10,)),
    ("GatedPolicy", "GatedPolicy", dict(heads=1, head_dim=8, text_tokens=2, denoise_steps=1), (6,)),
    ("SpeculativeVAR greedy", "SpeculativeVAR", dict(mode="greedy", patch_nums=(1, 2, 3), vocab=8, depth=2,
                                                     draft_depth=1), (2,)),
    ("SpeculativeVAR sample", "SpeculativeVAR", dict(mode="sample", patch_nums=(1, 2, 3), vocab=8, depth=2,
                                                     draft_depth=1), (2,)),
]
# DESIGN.md §6 shapes. Wan2.1-1.3B per block (12 × 128 heads, 1560-token frames, 512 text tokens, MemFlow's 3-frame
# bank) with one transformer block, one-frame chunks and a 2-frame window, so that a 2-core CPU streams 5 chunks
# (2 evicted into the bank) in seconds; seed 004's CDiT-L/2 (16 × 64 heads, 196-token frames, buffer 50, k = 8)
# with 4 blocks, memory in the later two.
REAL = [
    ("StreamingGenerator", "StreamingGenerator",
     dict(num_layers=1, heads=12, head_dim=128, frame_seq_len=1560, frames_per_block=1, window_frames=2,
          sink_frames=1, bank_size=3, text_len=512, text_dim=64, steps=1, switch_every=2), (5,)),
    ("MemoryWorldModel", "MemoryWorldModel",
     dict(depth=4, heads=16, head_dim=64, frame_len=196, buffer_size=50, k=8, steps=1, trajectory_period=8),
     (10,)),
]


@dataclass
class Row:
    pipeline: str
    backend: str
    identical: bool | None = None
    max_error: float | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    syncs_per_step: float | None = None
    notes: str = ""
    error: str | None = None
    parts_ms: float | None = None          # the replaced parts alone: median over steps of their total ms
    parts_speedup: float | None = None     # eager parts_ms / this row's parts_ms
    parts_mb: float | None = None          # MB the replaced parts read and write per step
    parts: dict = field(default_factory=dict)   # part -> {"ms": mean per step, "mb": per step}


class Progress:
    """tqdm when installed, else a one-line counter on stderr."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, unit="step", file=sys.stderr)
        except ImportError:
            self._bar, self.n, self.total = None, 0, total
        self.label = ""

    def describe(self, label: str) -> None:
        self.label = label
        if self._bar is not None:
            self._bar.set_description(label)

    def __call__(self) -> None:
        if self._bar is not None:
            self._bar.update()
            return
        self.n += 1
        print(f"\r[{self.n:4d}/{self.total}] {self.label:48s}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            print(file=sys.stderr)


def compare(outputs: dict, reference: dict) -> tuple[bool, float]:
    """Integer outputs equal exactly; float outputs within the float32 parity tolerance. ``(identical, max rel
    error over the float outputs)``."""
    from streamkern.testing import TOLERANCE, rel_error

    ok, worst = True, 0.0
    for name, ref in reference.items():
        out = outputs[name]
        if ref.is_floating_point():
            err = rel_error(out, ref) if out.shape == ref.shape else float("inf")
            worst = max(worst, err)
            ok &= err < TOLERANCE[torch.float32]
        else:
            ok &= out.shape == ref.shape and torch.equal(out.cpu(), ref.cpu())
    return bool(ok), worst


def notes(run) -> str:
    info = run.info
    if "reuse_rate" in info:
        return f"reuse {info['reuse_rate']:.0%} " + " ".join(f"{k}:{v}" for k, v in sorted(info["reasons"].items()))
    if "target_calls_per_image" in info:
        return (f"target calls/image {info['target_calls_per_image']:.1f} vs plain "
                f"{info['plain_target_calls_per_image']}")
    if "memory_on" in info:
        return f"memory on {info['memory_on']} steps, buffer {info['buffer_count']} frames"
    if "bank_count" in info:
        sparse = f", top-{info['sparse_bank']} per head" if info.get("sparse_bank") else ""
        return (f"bank {info['bank_count']} frames{sparse}" +
                (f", windows {info['windows']}" if info.get("windows") else ""))
    return ""


def backends_for(device: torch.device, triton: bool, reference_ops: bool) -> list[tuple[str, str]]:
    """``(label, backend)`` of the accelerated runs on ``device``."""
    from streamkern._backend import why_not

    chosen = [("torch-ops", "torch")] if reference_ops else []
    for name in ("cpu", "triton", "cuda"):
        if name == "triton" and device.type == "cpu" and not triton:
            continue
        if not why_not(name, device):
            chosen.append((name, name))
    if device.type == "cuda":   # each op's fastest GPU backend (block_masked_attention has Triton only)
        chosen.append(("auto", "auto"))
    return chosen


def measured(make, args, progress, parts: bool):
    """``(run, parts)``: a run of a pipeline and, with ``parts``, its replaced parts timed alone: the median over
    steps of their total ms, and ``{part: {"ms", "mb"}}`` means per step (else ``None``)."""
    from streamkern.pipelines._runtime import measure_parts

    if not parts:
        return make().run(*args, progress=progress), None
    with measure_parts() as times:
        run = make().run(*args, progress=progress)
    steps = sorted(times.step_seconds)
    n = max(1, len(steps))
    return run, (steps[len(steps) // 2] * 1e3, {name: {"ms": times.seconds[name] / n * 1e3,
                                                       "mb": times.bytes.get(name, 0) / n / 1e6}
                                                for name in sorted(times.seconds)})


def run_demo(device: torch.device, configs, accelerated, progress, repeats: int = 2,
             parts_in_run: bool = False) -> list[Row]:
    """Each pipeline: the eager run, then every accelerated backend, the whole round ``repeats`` times (the
    best median per backend is kept: a shared machine's bursts of load hit one round, rarely all); then one run
    per path with the replaced parts timed alone (``parts_in_run``: timed within the single round instead, whose
    end-to-end times then include the parts' synchronisations; for the slow ``--shapes real`` runs)."""
    import streamkern.pipelines as pipelines

    rows = []
    for label, cls_name, kwargs, args in configs:
        cls = getattr(pipelines, cls_name)
        best: dict[str, Row] = {}
        makers = {"eager": lambda: cls(backend="torch", device=device, **kwargs)}
        makers.update({name: (lambda backend=backend: cls(backend=backend, eager=False, device=device, **kwargs))
                       for name, backend in accelerated})
        parts = {}
        for _ in range(repeats):
            progress.describe(f"{label} eager")
            eager, parts["eager"] = measured(makers["eager"], args, progress, parts_in_run)
            row = best.setdefault("eager", Row(label, "torch (eager)", True, 0.0, float("inf"), 1.0,
                                               eager.syncs_per_step, notes(eager)))
            row.latency_ms = min(row.latency_ms, eager.latency * 1e3)
            for name, _ in accelerated:
                progress.describe(f"{label} {name}")
                if name in best and best[name].error:
                    continue
                try:
                    run, parts[name] = measured(makers[name], args, progress, parts_in_run)
                except Exception as exc:  # recorded in the table, never dropped
                    best[name] = Row(label, name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                    traceback.print_exc(limit=2, file=sys.stderr)
                    continue
                identical, err = compare(run.outputs, eager.outputs)
                row = best.setdefault(name, Row(label, name, True, 0.0, float("inf"), None, run.syncs_per_step,
                                                notes(run)))
                row.identical &= identical
                row.max_error = max(row.max_error, err)
                row.latency_ms = min(row.latency_ms, run.latency * 1e3)
                row.syncs_per_step = max(row.syncs_per_step, run.syncs_per_step)
        for name, row in best.items():
            if row.error:
                continue
            if not parts_in_run:
                progress.describe(f"{label} {name} parts")
                parts[name] = measured(makers[name], args, progress, True)[1]
            row.parts_ms, row.parts = parts[name]
            row.parts_mb = sum(p["mb"] for p in row.parts.values())
            row.speedup = best["eager"].latency_ms / row.latency_ms
            row.parts_speedup = best["eager"].parts_ms / row.parts_ms if row.parts_ms else None
        rows += best.values()
    return rows


def format_table(rows: list[Row]) -> str:
    head = (f"{'pipeline':26s} {'backend':13s} {'identical':9s} {'max rel err':>11s} {'ms/step':>9s} "
            f"{'speed-up':>8s} {'syncs/step':>10s} {'parts ms':>9s} {'parts x':>7s} {'parts MB':>9s}  notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.pipeline:26s} {r.backend:13s} {'FAILED':9s} {r.error}")
            continue
        px = f"{r.parts_speedup:6.2f}x" if r.parts_speedup else f"{'-':>7s}"
        lines.append(f"{r.pipeline:26s} {r.backend:13s} {'yes' if r.identical else 'NO':9s} {r.max_error:11.1e} "
                     f"{r.latency_ms:9.1f} {r.speedup:7.2f}x {r.syncs_per_step:10.2f} {r.parts_ms:9.2f} {px} "
                     f"{r.parts_mb:9.3f}  {r.notes}")
    return "\n".join(lines)


def closing_note(rows: list[Row]) -> str:
    """Per pipeline and accelerated backend: the replaced parts' ratio and the end-to-end ratio."""
    lines = ["where streamkern pays (eager / accelerated; parts = the replaced parts timed alone):"]
    for r in rows:
        if r.error or r.backend == "torch (eager)":
            continue
        eager = next(e for e in rows if e.pipeline == r.pipeline and e.backend == "torch (eager)")
        lines.append(f"  {r.pipeline:26s} {r.backend:9s} parts {eager.parts_ms:8.2f} -> {r.parts_ms:8.2f} ms/step "
                     f"({r.parts_speedup:5.2f}x), {eager.parts_mb:8.3f} -> {r.parts_mb:8.3f} MB/step; "
                     f"end to end {r.speedup:5.2f}x" + ("" if r.identical else "  (outputs DIFFER)"))
    return "\n".join(lines)


def write_chart(rows: list[Row], path: str, device: torch.device) -> str | None:
    """Grouped bars per pipeline and backend: end-to-end ms/step, and the replaced parts' ms/step; returns why not
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: matplotlib missing ({exc})"
    pipes = list(dict.fromkeys(r.pipeline for r in rows))
    backs = list(dict.fromkeys(r.backend for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(2.2 * len(pipes) + 2, 7))
    width = 0.8 / len(backs)
    for ax, attr, what in ((axes[0], "latency_ms", "end to end, median ms per step"),
                           (axes[1], "parts_ms", "replaced parts alone, ms per step")):
        for j, b in enumerate(backs):
            ys = [next((getattr(r, attr) or 0.0 for r in rows if r.pipeline == p and r.backend == b and not r.error),
                       0.0) for p in pipes]
            ax.bar([i + j * width for i in range(len(pipes))], ys, width, label=b)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pipes))], pipes, fontsize=7)
        ax.set_ylabel(what, fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    axes[0].set_title(f"streamkern pipelines on {device.type}: eager source code vs accelerated backends")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def machine() -> str:
    """The CPU model (and GPU name) of this machine, for the stored results."""
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = os.cpu_count()
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{name} ({cores} cores){gpu}"


def commit() -> str:
    """``git describe --always --dirty`` of the source tree, or ``unknown`` outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(saved: dict) -> str:
    """The README / docs table of a stored ``demo.json``: every number comes from the file."""
    def fmt(v, spec, suffix=""):
        return "—" if v is None else f"{v:{spec}}{suffix}"

    lines = ["| pipeline | backend | identical | max rel err | ms/step | speed-up | host syncs/step | parts ms/step | "
             "parts speed-up | parts MB/step | notes |", "|---" * 11 + "|"]
    for r in saved["rows"]:
        if r["error"]:
            lines.append(f"| {r['pipeline']} | {r['backend']} | FAILED | | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['pipeline']} | {r['backend']} | {'yes' if r['identical'] else 'NO'} | "
                     f"{fmt(r['max_error'], '.1e')} | {fmt(r['latency_ms'], '.1f')} | {fmt(r['speedup'], '.2f', '×')} | "
                     f"{fmt(r['syncs_per_step'], '.2f')} | {fmt(r['parts_ms'], '.2f')} | "
                     f"{fmt(r['parts_speedup'], '.2f', '×')} | {fmt(r['parts_mb'], '.3f')} | {r['notes']} |")
    return "\n".join(lines)


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m streamkern.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out", help="folder for demo.json and demo.png (default: out/)")
    parser.add_argument("--triton", action="store_true", help="also run Triton on CPU through its interpreter")
    parser.add_argument("--reference-ops", action="store_true", help="also run the op path on the torch references")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--shapes", choices=("tiny", "real"), default="tiny",
                        help="'real': StreamingGenerator and MemoryWorldModel at DESIGN.md §6 shapes (one round)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per pipeline; the best median is kept (default 2, 1 with --shapes real)")
    parser.add_argument("--markdown", metavar="JSON", help="print the table of a stored demo.json and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return []
    device = torch.device(args.device)
    if args.triton and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    configs = REAL if args.shapes == "real" else TINY if args.tiny else DEFAULT
    repeats = args.repeats or (1 if args.shapes == "real" else 2)
    accelerated = backends_for(device, args.triton, args.reference_ops)
    real = args.shapes == "real"
    steps = sum(a[0] for *_, a in configs) * (1 + len(accelerated)) * (repeats + (0 if real else 1))
    progress = Progress(steps)
    start = time.perf_counter()
    try:
        rows = run_demo(device, configs, accelerated, progress, repeats, parts_in_run=real)
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    where = machine()
    print(f"streamkern demo on {device} ({torch.get_num_threads()} threads, {where}), shapes {args.shapes}, "
          f"{seconds:.0f} s\n{format_table(rows)}\n\n{closing_note(rows)}")
    os.makedirs(args.out, exist_ok=True)
    name = "demo-real" if args.shapes == "real" else "demo"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "tiny": args.tiny, "shapes": args.shapes,
                   "commit": commit(), "machine": where, "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(seconds, 1),
                   "rows": [r.__dict__ for r in rows]}, f, indent=1)
    why = write_chart(rows, os.path.join(args.out, f"{name}.png"), device)
    print(why or f"wrote {args.out}/{name}.json and {args.out}/{name}.png")
    return rows


if __name__ == "__main__":
    main()

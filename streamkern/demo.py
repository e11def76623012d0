"""``python -m streamkern.demo``: every reference pipeline, eager source code vs each accelerated backend.

For each pipeline (``StreamingGenerator``, ``GatedPolicy``, ``SpeculativeVAR`` greedy and sample) it runs the eager
baseline (``backend="torch"``, the source pipeline's own code) and then the same streamed run on streamkern's ops
with every accelerated backend available on the device, and prints one table: outputs identical (tokens/indices
equal and tensors within the parity metric of DESIGN.md §3) with the largest relative error, median latency per
step (best of ``--repeats`` rounds), speed-up over eager, host syncs per step. The table is also written as JSON
and a PNG chart under ``--out``.

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
from dataclasses import dataclass

import torch

# (pipeline label, class, constructor kwargs, run args) at the default and at the --tiny smoke-test size.
DEFAULT = [
    ("StreamingGenerator", "StreamingGenerator", {}, (16,)),
    ("GatedPolicy", "GatedPolicy", {}, (20,)),
    ("SpeculativeVAR greedy", "SpeculativeVAR", {"mode": "greedy"}, (2,)),
    ("SpeculativeVAR sample", "SpeculativeVAR", {"mode": "sample"}, (2,)),
]
TINY = [
    ("StreamingGenerator", "StreamingGenerator",
     dict(num_layers=2, heads=2, head_dim=8, frame_seq_len=4, window_frames=6, bank_size=2, text_len=8,
          text_dim=16, steps=1, switch_every=2), (8,)),
    ("GatedPolicy", "GatedPolicy", dict(heads=1, head_dim=8, text_tokens=2, denoise_steps=1), (6,)),
    ("SpeculativeVAR greedy", "SpeculativeVAR", dict(mode="greedy", patch_nums=(1, 2, 3), vocab=8, depth=2,
                                                     draft_depth=1), (2,)),
    ("SpeculativeVAR sample", "SpeculativeVAR", dict(mode="sample", patch_nums=(1, 2, 3), vocab=8, depth=2,
                                                     draft_depth=1), (2,)),
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
    if "bank_count" in info:
        return f"bank {info['bank_count']} frames" + (f", windows {info['windows']}" if info.get("windows") else "")
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


def run_demo(device: torch.device, configs, accelerated, progress, repeats: int = 2) -> list[Row]:
    """Each pipeline: the eager run, then every accelerated backend, the whole round ``repeats`` times (the
    best median per backend is kept: a shared machine's bursts of load hit one round, rarely all)."""
    import streamkern.pipelines as pipelines

    rows = []
    for label, cls_name, kwargs, args in configs:
        cls = getattr(pipelines, cls_name)
        best: dict[str, Row] = {}
        for _ in range(repeats):
            progress.describe(f"{label} eager")
            eager = cls(backend="torch", device=device, **kwargs).run(*args, progress=progress)
            row = best.setdefault("eager", Row(label, "torch (eager)", True, 0.0, float("inf"), 1.0,
                                               eager.syncs_per_step, notes(eager)))
            row.latency_ms = min(row.latency_ms, eager.latency * 1e3)
            for name, backend in accelerated:
                progress.describe(f"{label} {name}")
                if name in best and best[name].error:
                    continue
                try:
                    run = cls(backend=backend, eager=False, device=device, **kwargs).run(*args, progress=progress)
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
        for row in best.values():
            if not row.error:
                row.speedup = best["eager"].latency_ms / row.latency_ms
        rows += best.values()
    return rows


def format_table(rows: list[Row]) -> str:
    head = (f"{'pipeline':22s} {'backend':13s} {'identical':9s} {'max rel err':>11s} {'ms/step':>9s} "
            f"{'speed-up':>8s} {'syncs/step':>10s}  notes")
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.error:
            lines.append(f"{r.pipeline:22s} {r.backend:13s} {'FAILED':9s} {r.error}")
            continue
        lines.append(f"{r.pipeline:22s} {r.backend:13s} {'yes' if r.identical else 'NO':9s} {r.max_error:11.1e} "
                     f"{r.latency_ms:9.1f} {r.speedup:7.2f}x {r.syncs_per_step:10.2f}  {r.notes}")
    return "\n".join(lines)


def write_chart(rows: list[Row], path: str, device: torch.device) -> str | None:
    """Grouped bar chart of ms/step per pipeline and backend; returns why not when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no chart: matplotlib missing ({exc})"
    pipes = list(dict.fromkeys(r.pipeline for r in rows))
    backs = list(dict.fromkeys(r.backend for r in rows))
    fig, ax = plt.subplots(figsize=(2.2 * len(pipes) + 2, 4))
    width = 0.8 / len(backs)
    for j, b in enumerate(backs):
        ys = [next((r.latency_ms or 0.0 for r in rows if r.pipeline == p and r.backend == b and not r.error), 0.0)
              for p in pipes]
        ax.bar([i + j * width for i in range(len(pipes))], ys, width, label=b)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(pipes))], pipes, fontsize=8)
    ax.set_ylabel("median ms per step")
    ax.set_title(f"streamkern pipelines on {device.type}: eager source code vs accelerated backends")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(prog="python -m streamkern.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="out", help="folder for demo.json and demo.png (default: out/)")
    parser.add_argument("--triton", action="store_true", help="also run Triton on CPU through its interpreter")
    parser.add_argument("--reference-ops", action="store_true", help="also run the op path on the torch references")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per pipeline; the best median is kept")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.triton and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    configs = TINY if args.tiny else DEFAULT
    accelerated = backends_for(device, args.triton, args.reference_ops)
    steps = sum(a[0] for *_, a in configs) * (1 + len(accelerated)) * args.repeats
    progress = Progress(steps)
    start = time.perf_counter()
    try:
        rows = run_demo(device, configs, accelerated, progress, args.repeats)
    finally:
        progress.close()
    table = format_table(rows)
    print(f"streamkern demo on {device} ({torch.get_num_threads()} threads), "
          f"{time.perf_counter() - start:.0f} s\n{table}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "tiny": args.tiny,
                   "rows": [r.__dict__ for r in rows]}, f, indent=1)
    why = write_chart(rows, os.path.join(args.out, "demo.png"), device)
    print(why or f"wrote {args.out}/demo.json and {args.out}/demo.png")
    return rows


if __name__ == "__main__":
    main()

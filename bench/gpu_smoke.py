"""GPU smoke run (seconds): every op once on each accelerated backend against "torch", then the checks of issue 16
on the same cases (under sync debug mode "error", captured in a CUDA graph and replayed), and the verify threshold
for every scale size n in 1..1024. One JSON line per check on stdout and in ``--out``, flushed as it ends, so that a
time cap loses only the checks not reached.

Order (cheap and important first): every case on the ``cuda`` backend (no compilation), the threshold check on
``cuda``, then the ``triton`` cases, which compile each kernel on first use: the streaming memory's ops first
(``frame_attention``, ``frame_write``, ``frame_topk``), verification and its threshold check next, the drift gate's
kernels (the slowest to compile) last.

``python -m streamkern.bench.gpu_smoke --out smoke.jsonl`` on a GPU; ``--device cpu --backends cpu`` runs the eager
part and the threshold check on this CPU (the session script's dry run), skipping what needs CUDA. ``--part I/N``
runs every N-th check of that order from the I-th (0-based), so that N processes started at once share the Triton
compilation (each appends its lines to ``--out`` and ends with its own summary line).
"""
from __future__ import annotations

import argparse
import json
import time
import traceback
from types import SimpleNamespace

import torch

import streamkern as sk

from . import gpu_cases as gc

# the cases by importance; the drift gate's Triton kernels take seconds each to compile, so they come last
ORDER = ("frame_attention", "frame_write", "frame_topk", "verify_scales", "bank_insert", "select_frame",
         "bank_evict_select", "pose_topk", "block_masked_attention", "patch_importance", "attention_weighted_drift",
         "drift_gate")
THRESHOLD = "verify_threshold_every_n"


def threshold_every_n(device: str, backend: str, top: int = 1024) -> None:
    """k = ceil(n/2) of n matches pass at threshold k/n and k − 1 fail, for every n in 1..top (issue 16 item 1).

    Scale 0 holds the n tokens under test; scale 1 pads the window to ``top + 1`` tokens, none matching, so it never
    passes: one window size, hence one kernel variant, for every n. Row 0 of the draft matches k tokens of scale 0
    (accepted 1), row 1 matches k − 1 (accepted 0). The verdicts stay on the device; one comparison at the end."""
    T = top + 1
    logits = torch.zeros(2, T, 2, device=device)
    logits[..., 0] = 1.0                                                   # the target's argmax is token 0
    n = torch.arange(1, top + 1, device=device)
    k = (n + 1) // 2
    col = torch.arange(T, device=device)
    matches = torch.stack([k, k - 1], 1)                                   # [top, 2] matching tokens per row
    drafts = (col[None, None, :] >= matches[..., None]).long()             # [top, 2, T]: 0 (a match) first
    accepted = []
    for i in range(top):
        nn = i + 1
        layout = SimpleNamespace(begin=(0, nn), end=(nn, T))
        kk = (nn + 1) // 2
        res = sk.verify_scales(logits, drafts[i], layout, 0, 2, threshold=kk / nn, backend=backend)
        accepted.append(res.accepted)
    got = torch.stack(accepted).cpu()
    wrong = (got != torch.tensor([1, 0])).any(1).nonzero().flatten().tolist()
    assert not wrong, (f"{len(wrong)} scale sizes fail, first n={wrong[0] + 1} (k={(wrong[0] + 2) // 2}): "
                       f"accepted {got[wrong[0]].tolist()}, expected [1, 0]")


def plan(backends: tuple[str, ...], on_gpu: bool) -> list[tuple[str, str]]:
    """``(case, backend)`` in run order: ``cuda`` first, then the other backends; cases by :data:`ORDER`, the
    threshold check right after ``verify_scales`` (its kernel is then compiled)."""
    rank = {b: i for i, b in enumerate(sorted(backends, key=lambda b: b != "cuda"))}
    steps = []
    for backend in sorted(backends, key=rank.get):
        for case in ORDER:
            if gc.has_backend(case, backend):
                steps.append((case, backend))
            if case == "verify_scales" and gc.has_backend(case, backend):
                steps.append((THRESHOLD, backend))
    assert {c for c, _ in steps} - {THRESHOLD} <= set(gc.CASES) and set(ORDER) == set(gc.CASES), \
        "gpu_smoke.ORDER must list every case of gpu_cases.CASES"
    return steps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="*", default=["triton", "cuda"])
    parser.add_argument("--out", default=None, help="JSON lines file (appended row by row)")
    parser.add_argument("--part", default="0/1", help="I/N: every N-th (case, backend) of the run order from the I-th")
    args = parser.parse_args(argv)
    index, parts = (int(x) for x in args.part.split("/"))
    on_gpu = args.device.startswith("cuda")
    checks = [("eager", gc.check_eager)] + ([("no_sync", gc.check_no_sync), ("graph", gc.check_graph)]
                                            if on_gpu else [])
    failures = 0
    out = open(args.out, "a") if args.out else None

    def record(**row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()   # a later timeout keeps what is written

    for name, backend in plan(tuple(args.backends), on_gpu)[index::parts]:
        if name == THRESHOLD:
            todo = [("eager", lambda: threshold_every_n(args.device, backend))]
        else:
            todo = [(what, lambda check=check: check(gc.CASES[name](args.device, backend))) for what, check in checks]
        for what, run in todo:
            t0 = time.perf_counter()
            try:
                run()
                record(case=name, backend=backend, check=what, ok=True, s=round(time.perf_counter() - t0, 3),
                       part=args.part)
            except Exception as exc:  # one failing check must not hide the others
                failures += 1
                record(case=name, backend=backend, check=what, ok=False, error=f"{type(exc).__name__}: {exc}",
                       trace=traceback.format_exc(limit=3), s=round(time.perf_counter() - t0, 3), part=args.part)
    record(summary=True, part=args.part, failures=failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

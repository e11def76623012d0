"""GPU smoke run (a few seconds): every op once on each accelerated backend against "torch", then the checks of
issue 16 on the same cases: under sync debug mode "error", captured in a CUDA graph and replayed, and the verify
threshold for every scale size n in 1..1024. One JSON line per check on stdout and in ``--out``.

``python -m streamkern.bench.gpu_smoke --out smoke.json`` on a GPU; ``--device cpu --backends cpu`` runs the eager
part on this CPU (the session script's dry run), skipping what needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import math
import time
import traceback
from types import SimpleNamespace

import torch

import streamkern as sk

from . import gpu_cases as gc


def threshold_every_n(device: str, backend: str) -> None:
    """k of n matches at threshold k/n pass and k - 1 fail, n in 1..1024 (issue 16 item 1)."""
    for n in range(1, 1025):
        k = math.ceil(n / 2)
        logits = torch.zeros(2, n, 2, device=device)
        logits[..., 0] = 1.0
        draft = torch.ones(2, n, dtype=torch.int64, device=device)
        draft[0, :k] = 0
        draft[1, :k - 1] = 0
        res = sk.verify_scales(logits, draft, SimpleNamespace(begin=(0,), end=(n,)), 0, 1, threshold=k / n,
                               backend=backend)
        assert res.accepted.tolist() == [1, 0], f"n={n}, k={k}: accepted {res.accepted.tolist()}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", nargs="*", default=["triton", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    checks = [("eager", gc.check_eager)] + ([("no_sync", gc.check_no_sync), ("graph", gc.check_graph)]
                                            if on_gpu else [])
    failures = 0
    out = open(args.out, "w") if args.out else None

    def record(**row):
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()   # a later timeout keeps what is written

    for name, backend in gc.pairs(tuple(args.backends)):
        for what, check in checks:
            t0 = time.perf_counter()
            try:
                check(gc.CASES[name](args.device, backend))
                record(case=name, backend=backend, check=what, ok=True, s=round(time.perf_counter() - t0, 3))
            except Exception as exc:  # one failing check must not hide the others
                failures += 1
                record(case=name, backend=backend, check=what, ok=False, error=f"{type(exc).__name__}: {exc}",
                       trace=traceback.format_exc(limit=3))
    if on_gpu:
        for backend in args.backends:
            t0 = time.perf_counter()
            try:
                threshold_every_n(args.device, backend)
                record(case="verify_threshold_every_n", backend=backend, check="eager", ok=True,
                       s=round(time.perf_counter() - t0, 3))
            except Exception as exc:
                failures += 1
                record(case="verify_threshold_every_n", backend=backend, check="eager", ok=False, error=str(exc))
    record(summary=True, failures=failures)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

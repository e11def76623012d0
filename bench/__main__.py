"""``python -m streamkern.bench``: every op's microbenchmark on the available device, as a table, JSON and a chart.

Options: ``--device cpu|cuda`` (default: cuda when present), ``--ops name ...`` (default: all),
``--out DIR`` (default ``bench/results``), ``--budget SECONDS`` per timed implementation.
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch

from .harness import Report

BENCHES = ["consensus", "verify", "scale_attention", "drift_gate", "kv_ring", "bank_select", "frame_attention"]


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m streamkern.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ops", nargs="*", default=BENCHES, choices=BENCHES)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per implementation")
    args = parser.parse_args(argv)
    report = Report(args.device, budget_s=args.budget)
    print(f"streamkern bench on {report.info['name']} (torch {report.info['torch']}, triton {report.info['triton']}, "
          f"commit {report.info['commit']}); copy bandwidth {report.copy_bw / 1e9:.1f} GB/s")
    for name in args.ops:
        print(f"[{name}]")
        importlib.import_module(f"streamkern.bench.bench_{name}").run(report)
    print("\n" + report.table())
    json_path, png_path = report.save(args.out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return report


if __name__ == "__main__":
    main()

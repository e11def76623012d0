"""``python -m streamkern.bench``: every op's microbenchmark on the available device, as a table, JSON and a chart.

Options: ``--device cpu|cuda`` (default: cuda when present), ``--ops name ...`` (default: every
``bench/bench_<name>.py``), ``--out DIR`` (default ``bench/results``), ``--budget SECONDS`` per timed implementation,
``--smoke`` (only each op's first case, no torch.compile rows: checks that the benchmark runs), ``--no-compile``
(every case, but no torch.compile'd row: neither Inductor nor FlexAttention is imported or compiled, which takes
tens of seconds per row), ``--jsonl PATH`` (append each row to PATH as one JSON line the moment it is measured, so
that a run stopped by a time cap keeps every row measured so far; the first line is the device info).
"""
from __future__ import annotations

import argparse
import importlib
import os

import torch

from .harness import Report, bench_names


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(prog="python -m streamkern.bench", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    names = bench_names()
    parser.add_argument("--ops", nargs="*", default=names, choices=names)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed calls per implementation")
    parser.add_argument("--smoke", action="store_true",
                        help="only each op's first case, no torch.compile rows (checks the benchmark runs)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile'd rows (Inductor, FlexAttention)")
    parser.add_argument("--jsonl", default=None, help="append each row to this file as a JSON line when measured")
    args = parser.parse_args(argv)
    report = Report(args.device, budget_s=args.budget, smoke=args.smoke, compile=not args.no_compile,
                    jsonl=args.jsonl)
    print(f"streamkern bench on {report.info['name']} (torch {report.info['torch']}, triton {report.info['triton']}, "
          f"commit {report.info['commit']}); copy bandwidth {report.copy_bw / 1e9:.1f} GB/s")
    for name in args.ops:
        print(f"[{name}]")
        report.run(importlib.import_module(f"streamkern.bench.bench_{name}").cases(report))
    print("\n" + report.table())
    json_path, png_path = report.save(args.out)
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    return report


if __name__ == "__main__":
    main()

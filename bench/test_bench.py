"""Every bench case as a pytest-benchmark test: ``pytest bench --benchmark-only`` (``--benchmark-json=PATH`` for
JSON), on CUDA when present, else on the CPU with the quick set, as ``python -m streamkern.bench``.

The tests come from the same ``cases(bench)`` generators of ``bench/bench_<name>.py``: collection walks each
generator once for the case ids; a test then advances its module's generator to its case (cases are built in
order, one at a time, so only one case's inputs are alive). The timed callable runs one call on the next input
set of the case's rotation and, on CUDA, synchronises. ``make test`` runs ``pytest tests`` and never collects this.
"""
from __future__ import annotations

import importlib
import itertools

import pytest
import torch

from streamkern.bench.harness import Bench, bench_names

BENCH = Bench("cuda" if torch.cuda.is_available() else "cpu")


def _cases(name: str):
    return importlib.import_module(f"streamkern.bench.bench_{name}").cases(BENCH)


class _Cursor:
    """The live generator of one bench module and the index of the case it yielded last."""

    def __init__(self, name: str):
        self.name, self.gen, self.index, self.case = name, None, -1, None

    def get(self, index: int):
        if self.gen is None or index < self.index:
            self.gen, self.index, self.case = _cases(self.name), -1, None
        while self.index < index:
            self.case, self.index = next(self.gen), self.index + 1
        return self.case


def _params():
    params = []
    for name in bench_names():
        for index, case in enumerate(_cases(name)):
            params.append(pytest.param(name, index, id=f"{name}:{case.id}"))
    return params


CURSORS: dict[str, _Cursor] = {}


@pytest.mark.parametrize("name,index", _params())
def test_bench(benchmark, name, index):
    case = CURSORS.setdefault(name, _Cursor(name)).get(index)
    if case.unavailable:
        pytest.skip(case.unavailable)
    inputs = itertools.cycle(case.inputs)
    for _ in range(case.options.get("warmup", 3)):  # compilation and caches stay out of the numbers
        case.fn(*next(inputs))
    sync = torch.cuda.synchronize if BENCH.device.type == "cuda" else (lambda: None)

    def call():
        case.fn(*next(inputs))
        sync()

    sync()
    benchmark.group = f"{case.op} {case.case}"
    benchmark.extra_info.update(op=case.op, case=case.case, impl=case.impl, bytes=case.options.get("bytes"))
    if "max_reps" in case.options:   # implementations too slow for the default rounds
        benchmark.pedantic(call, rounds=case.options["max_reps"], iterations=1)
    else:
        benchmark(call)

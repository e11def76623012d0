"""Benchmark harness: bench cases, timing, copy bandwidth, results as JSON, a table and a chart.

Each ``bench/bench_<op>.py`` has ``cases(bench)``, a generator of :class:`Case` (op, case, implementation, the
callable and its input sets), built one at a time so that only one case's inputs are alive. ``python -m
streamkern.bench`` times them with :class:`Report`; ``pytest bench --benchmark-only`` (``bench/test_bench.py``)
runs each as a pytest-benchmark test from the same generators.

Timing: warm-up calls first (compilation, autotuning and caches stay out of the numbers), then repeated calls,
each timed on its own (CUDA events on GPU, ``perf_counter_ns`` on CPU), cycling through several input sets so
that on a GPU the working set exceeds L2; the median is reported with the 10th/90th percentiles and the raw times.
Bandwidth: achieved bytes/s counts the bytes an op must move (each input read once, each output written once) and is
compared with a device-to-device copy measured in the same run (bytes read + bytes written).
Launches and syncs: one more call is profiled for its kernel launches (``streamkern.testing.count_launches``: exact
device activities on CUDA, the working operators on CPU, not counted for torch.compile'd code on CPU) and, on
CUDA, counted for host synchronisations.
"""
from __future__ import annotations

import ast
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch

from streamkern._backend import BACKENDS, Op, why_not
from streamkern.testing import count_launches


@dataclass
class Row:
    op: str
    case: str
    impl: str
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int = 0
    bytes: int | None = None
    flops: int | None = None
    gb_per_s: float | None = None
    pct_copy_bw: float | None = None
    tflop_per_s: float | None = None
    baseline: str | None = None
    speedup: float | None = None
    vs_compile: float | None = None
    syncs_per_call: int | None = None
    launches_per_call: int | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)
    raw_ms: list = field(default_factory=list)


@dataclass
class Case:
    """One timed implementation of one case: ``fn(*inputs[i % len(inputs)])``. ``unavailable`` says why it cannot
    run here (a failed row in a report, a skip under pytest); ``options`` are :meth:`Report.add`'s keywords."""

    op: str
    case: str
    impl: str
    fn: Callable
    inputs: Sequence[tuple]
    options: dict = field(default_factory=dict)
    unavailable: str | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.case}-{self.impl}"


def bench_names() -> list[str]:
    """The benches, in name order: each ``bench_<name>.py`` next to this file that defines ``cases(bench)`` (read,
    not imported: ``bench_fastvideo.py``, a script of its own for the FastVideo venv, has none)."""
    here = os.path.dirname(os.path.abspath(__file__))
    names = []
    for f in sorted(os.listdir(here)):
        if f.startswith("bench_") and f.endswith(".py"):
            with open(os.path.join(here, f)) as src:
                tree = ast.parse(src.read())
            if any(isinstance(n, ast.FunctionDef) and n.name == "cases" for n in tree.body):
                names.append(f[len("bench_"):-3])
    return names


def _git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_info(device: torch.device) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {"device": device.type, "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "python": platform.python_version(), "commit": _git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "cpu": _cpu_name(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        info["name"] = info["cpu"]
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable, inputs: Sequence[tuple], device: torch.device, *, warmup: int, max_reps: int,
               budget_s: float) -> list[float]:
    """Milliseconds of each timed call of ``fn(*inputs[i % len(inputs)])``."""
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
    _sync(device)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    i = 0
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(max_reps)]
        while i < max_reps and (i < 5 or time.perf_counter() < deadline):
            args = inputs[i % len(inputs)]
            starts[i].record()
            fn(*args)
            ends[i].record()
            i += 1
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in zip(starts[:i], ends[:i])]
    else:
        while i < max_reps and (i < 3 or time.perf_counter() < deadline):
            args = inputs[i % len(inputs)]
            t0 = time.perf_counter_ns()
            fn(*args)
            times.append((time.perf_counter_ns() - t0) / 1e6)
            i += 1
    return times


def count_syncs(fn: Callable, args: tuple, device: torch.device) -> int | None:
    """Host synchronisations in one call, counted by CUDA's sync debug mode; ``None`` on CPU."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


class Bench:
    """What a bench module's ``cases`` needs: the device, whether to run the quick (CPU) set, input rotation,
    the op's backends to time, and torch.compile (``compile=False``: no torch.compile'd row is built or timed; a
    bench module builds its other compiled rows, e.g. FlexAttention, only when ``bench.compile``)."""

    def __init__(self, device: str | torch.device = "cpu", quick: bool | None = None, compile: bool = True):
        self.device = torch.device(device)
        self.quick = self.device.type == "cpu" if quick is None else quick
        self.compile = compile

    def input_sets(self, bytes_per_set: int, limit: int = 8) -> int:
        """How many distinct input sets to rotate so the working set is over twice the last-level cache
        (the GPU's L2; 32 MiB assumed for a CPU's L3)."""
        if self.device.type == "cuda":
            cache = getattr(torch.cuda.get_device_properties(self.device), "L2_cache_size", 0) or 50 * 2 ** 20
        else:
            cache = 32 * 2 ** 20
        return max(1, min(limit, math.ceil(2 * cache / max(bytes_per_set, 1))))

    def backends(self, op: Op) -> list[str]:
        """The op's accelerated backends that can run on this device (Triton on CPU only under its interpreter,
        which is a correctness tool, not a speed one: left out)."""
        return [b for b in BACKENDS if b != "torch" and b in op.backends.impls and not why_not(b, self.device)
                and not (b == "triton" and self.device.type == "cpu")]

    def compiled(self, fn: Callable) -> Callable:
        """``torch.compile(fn)``; a compile failure surfaces at the first call (a failed row, a failed test).
        Without ``compile`` a stand-in that is never timed (``Report.run`` leaves its row out)."""
        compiled = torch.compile(fn, dynamic=False) if self.compile else _raiser(RuntimeError("compile=False"))
        compiled.inductor = True   # on CPU its kernels are C++ loops the profiler does not see as operators
        return compiled

    @staticmethod
    def case(op: str, case: str, impl: str, fn: Callable, inputs: Sequence[tuple], *, unavailable: str | None = None,
             **options) -> Case:
        """A :class:`Case`; ``options`` as :meth:`Report.add` takes them (bytes, flops, baseline, warmup, ...)."""
        return Case(op, case, impl, fn, inputs, options, unavailable)


class Report(Bench):
    """Times cases into rows for one device; see the module docstring."""

    def __init__(self, device: str | torch.device = "cpu", quick: bool | None = None, budget_s: float | None = None,
                 smoke: bool = False, compile: bool = True, jsonl: str | None = None):
        super().__init__(device, quick, compile=compile and not smoke)
        self.smoke = smoke   # only each op's first case, no torch.compile rows (their compilation takes minutes)
        self.budget_s = budget_s if budget_s is not None else (0.5 if self.quick else 1.0)
        self.info = device_info(self.device)
        self.rows: list[Row] = []
        self.copy_bw = self._copy_bandwidth()
        self.info["copy_bytes_per_s"] = self.copy_bw
        self.jsonl = jsonl   # each row appended here as one JSON line as soon as it is measured
        self._emit({"kind": "info", **self.info})

    def _emit(self, record: dict) -> None:
        if self.jsonl:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps({"source": "bench", **record}) + "\n")

    def _copy_bandwidth(self) -> float:
        n = (1 << 30 if self.device.type == "cuda" else 1 << 28) // 4
        src = torch.rand(n, device=self.device)
        dst = torch.empty_like(src)
        ms = statistics.median(time_calls(dst.copy_, [(src,)], self.device, warmup=3, max_reps=20,
                                          budget_s=min(1.0, self.budget_s)))
        return 2 * src.numel() * src.element_size() / (ms / 1e3)

    def run(self, cases) -> None:
        """Time every case of a bench module's ``cases(self)``."""
        for c in cases:
            if not self.compile and getattr(c.fn, "inductor", False):
                continue
            fn = c.fn if c.unavailable is None else _raiser(RuntimeError(c.unavailable))
            self.add(c.op, c.case, c.impl, fn, c.inputs, **c.options)

    def add(self, op: str, case: str, impl: str, fn: Callable, inputs: Sequence[tuple], *, bytes: int | None = None,
            flops: int | None = None, baseline: str | None = "eager-seed", warmup: int | None = None,
            max_reps: int | None = None, extra: dict | None = None) -> Row:
        row = Row(op=op, case=case, impl=impl, bytes=bytes, flops=flops, baseline=baseline, extra=extra or {})
        if self.smoke and (getattr(fn, "inductor", False)
                           or any(r.op == op and r.case != case for r in self.rows)):
            return row   # not timed, not recorded
        try:
            times = time_calls(fn, inputs, self.device, warmup=warmup if warmup is not None else 3,
                               max_reps=max_reps or (1000 if self.device.type == "cuda" else 200),
                               budget_s=self.budget_s)
            row.syncs_per_call = count_syncs(fn, inputs[0], self.device)
            if self.device.type == "cuda" or not getattr(fn, "inductor", False):
                row.launches_per_call = count_launches(fn, *inputs[0], device=self.device)
        except Exception as exc:  # an impl that fails is recorded with its error, never dropped
            row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            row.extra["traceback"] = traceback.format_exc(limit=3)[-2000:]
            self._record(row)
            print(f"  {op:28s} {case:26s} {impl:16s} FAILED {row.error}")
            return row
        q = statistics.quantiles(times, n=10) if len(times) >= 2 else [times[0]] * 9
        row.median_ms, row.p10_ms, row.p90_ms, row.reps = statistics.median(times), q[0], q[-1], len(times)
        row.raw_ms = [round(t, 5) for t in times]
        if bytes:
            row.gb_per_s = bytes / (row.median_ms / 1e3) / 1e9
            row.pct_copy_bw = 100.0 * bytes / (row.median_ms / 1e3) / self.copy_bw
        if flops:
            row.tflop_per_s = flops / (row.median_ms / 1e3) / 1e12
        for other in self.rows:  # speed-ups against rows of the same case, whichever was timed first
            if other.op == op and other.case == case and other.median_ms:
                if baseline and other.impl == baseline:
                    row.speedup = other.median_ms / row.median_ms
                if other.impl.startswith("compile-"):   # torch.compile of the seed's (or MemFlow's) eager code
                    row.vs_compile = other.median_ms / row.median_ms
        self._record(row)
        print("  " + self._line(row))
        return row

    def _record(self, row: Row) -> None:
        self.rows.append(row)
        self._emit({"kind": "row", **{k: v for k, v in asdict(row).items() if k != "raw_ms"}})

    @staticmethod
    def _line(r: Row) -> str:
        def f(v, fmt):
            return format(v, fmt) if v is not None else "-"
        if r.error:
            return f"{r.op:28s} {r.case:26s} {r.impl:16s} FAILED {r.error[:60]}"
        return (f"{r.op:28s} {r.case:26s} {r.impl:16s} {f(r.median_ms, '10.4f')} ms {f(r.gb_per_s, '8.1f')} GB/s "
                f"{f(r.pct_copy_bw, '6.1f')} %bw {f(r.speedup, '8.2f')}x eager {f(r.vs_compile, '7.2f')}x compile "
                f"{f(r.syncs_per_call, '>3')} syncs {f(r.launches_per_call, '>4')} launches")

    def table(self) -> str:
        head = (f"{'op':28s} {'case':26s} {'impl':16s} {'median':>13s} {'achieved':>13s} {'of copy':>9s} "
                f"{'vs eager':>15s} {'vs compile':>17s} syncs launches")
        bw = f"copy bandwidth measured in this run: {self.copy_bw / 1e9:.1f} GB/s on {self.info['name']}"
        return "\n".join([bw, head] + [self._line(r) for r in self.rows])

    def save(self, out_dir: str) -> tuple[str, str | None]:
        """Write ``<out_dir>/<device>-<date>.json`` (and a ``.png`` chart when matplotlib is installed)."""
        os.makedirs(out_dir, exist_ok=True)
        slug = "".join(c if c.isalnum() else "-" for c in self.info["name"].lower()).strip("-")
        while "--" in slug:
            slug = slug.replace("--", "-")
        stem = os.path.join(out_dir, f"{slug}-{self.info['date'][:10]}")
        with open(stem + ".json", "w") as f:
            json.dump({"info": self.info, "rows": [asdict(r) for r in self.rows]}, f, indent=1)
        return stem + ".json", self._chart(stem + ".png")

    def _chart(self, path: str) -> str | None:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = [r for r in self.rows if r.speedup and r.impl != r.baseline]
        if not rows:
            return None
        labels = [f"{r.op}\n{r.case}\n{r.impl}" for r in rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(rows)), 5.5))
        ax.bar(range(len(rows)), [r.speedup for r in rows], color=["#3b7dd8" if r.impl in BACKENDS else "#999999"
                                                                   for r in rows])
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_ylabel("speed-up over the seed's eager code (log)")
        ax.set_title(f"streamkern on {self.info['name']} ({self.info['commit']})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def _raiser(exc: Exception) -> Callable:
    def fail(*_):
        raise exc
    return fail

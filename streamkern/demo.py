"""``python -m streamkern.demo``: every reference pipeline, eager source code vs each accelerated backend.

For each pipeline (``MemoryBank``, ``StreamingGenerator`` with and without sparse memory activation,
``MemoryWorldModel``, ``GatedPolicy``, ``SpeculativeVAR`` greedy and sample) it runs the eager baseline
(``backend="torch"``, the source pipeline's own code) and then the same streamed run on streamkern's ops with every
accelerated backend available on the device, and prints one table: outputs identical (tokens/indices equal and
tensors within the parity metric of docs/contract.md §3) with the largest relative error, median latency per step (best of
``--repeats`` rounds), speed-up over eager, host syncs per step; then the parts of a step that streamkern replaces
(cache handling, scoring, eviction, retrieval, gating, verification, the attention over the streaming memory),
timed alone in one more run (each part between device synchronisations), eager vs accelerated, with the bytes they
read and write per step. The table is also written as JSON and a PNG chart (both measures) under ``--out``.

``--shapes real`` runs ``StreamingGenerator`` at the Wan2.1 per-block shapes of docs/contract.md §6 (12 heads × 128,
1560-token frames; one transformer block and one-frame chunks on a CPU) and ``MemoryWorldModel`` at the CDiT-L/2
shapes (16 heads × 64, 196-token frames, buffer 50, k = 8; 4 blocks, the later two with memory), one round with the
parts timed within it, so the parts' share reflects real proportions, not only the tiny models' matmuls.
``--dtype`` (one or more of fp32, bf16, fp16) sets the storage dtype of the pipelines that take one
(``MemoryBank``, ``StreamingGenerator``, ``MemoryWorldModel``; labelled with it unless fp32); outputs are then
compared within that dtype's parity bound.

Rows: a pipeline's accelerated rows are the backends that implement every op it calls on the device (recorded in a
tiny run: :func:`pipeline_ops`; each op's backend table says which backends it has), and on CUDA an ``auto`` row,
every op on its fastest GPU backend. Triton runs on CPU tensors only through its interpreter, far too
slow for a demo: ``--triton`` adds it anyway. ``--reference-ops`` adds the op path on the ops' own ``"torch"``
references (the structure without the kernels).

On CUDA the defaults are ``--shapes real --dtype bf16``, every path first runs one untimed round (Triton's
compilation, cuBLAS and cuDNN set-up stay out of the numbers: ``--warmup``), and a second table times the
pipelines' capturable steady-state steps replayed from a CUDA graph (:class:`~streamkern.step_graph.StepGraph`:
``StreamingGenerator``'s block once its window and bank are full, at the first ``--dtype``, ``GatedPolicy.step``,
``SpeculativeVAR.round``, the latter two at their default sizes), each replay against the same step of an identical pipeline run eagerly on
the same backend (``auto``): outputs within the parity bound, milliseconds per step of both (``--no-graphs`` turns
it off). ``--jsonl PATH`` appends every finished row to PATH as a JSON line (a time cap keeps what is done).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable

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
# docs/contract.md §6 shapes. Wan2.1-1.3B per block (12 × 128 heads, 1560-token frames, 512 text tokens, MemFlow's 3-frame
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


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LABELS = [label for label, *_ in TINY]


@functools.lru_cache(maxsize=None)
def declared_ops() -> dict:
    """Every op declared with ``define_op`` in ``streamkern.ops`` (``Op`` objects, by name)."""
    import pkgutil

    import streamkern.ops
    from streamkern._backend import Op

    ops = {}
    for info in pkgutil.iter_modules(streamkern.ops.__path__):
        for value in vars(importlib.import_module(f"streamkern.ops.{info.name}")).values():
            if isinstance(value, Op):
                ops[value.name] = value
    return ops


@functools.lru_cache(maxsize=None)
def pipeline_ops(label: str, device: str = "cpu") -> tuple:
    """The ops (``Op`` objects) the accelerated path of pipeline ``label`` calls on ``device``, recorded in one run
    of its tiny configuration on the ops' ``"torch"`` references (which ops a path calls does not depend on its
    sizes; where a step picks its kernel by backend, as ``StreamingKV``'s ``attention="auto"`` does, a named backend
    picks an op only where it has it)."""
    import streamkern.pipelines as pipelines
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "streamkern":
                self.names.add(func._schema.name.split("::")[1])
            return func(*args, **(kwargs or {}))

    _, cls_name, kwargs, args = next(c for c in TINY if c[0] == label)
    with Recorder() as rec:
        getattr(pipelines, cls_name)(backend="torch", eager=False, device=device, **kwargs).run(*args)
    return tuple(declared_ops()[name] for name in sorted(rec.names))


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


def compare(outputs: dict, reference: dict, dtype: torch.dtype = torch.float32) -> tuple[bool, float]:
    """Integer outputs equal exactly; float outputs within the parity tolerance of ``dtype`` (the pipeline's
    storage dtype). ``(identical, max rel error over the float outputs)``."""
    from streamkern.testing import TOLERANCE, rel_error

    ok, worst = True, 0.0
    for name, ref in reference.items():
        out = outputs[name]
        if ref.is_floating_point():
            err = rel_error(out, ref) if out.shape == ref.shape else float("inf")
            worst = max(worst, err)
            ok &= err < TOLERANCE[dtype]
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


def backends_for(device: torch.device, triton: bool, reference_ops: bool, ops=()) -> list[tuple[str, str]]:
    """``(label, backend)`` of the accelerated runs on ``device`` of a pipeline calling ``ops``: each backend that
    runs here and that every one of ``ops`` implements, then on CUDA ``auto`` (each op's fastest GPU backend)."""
    chosen = [("torch-ops", "torch")] if reference_ops else []
    for name in ("cpu", "triton", "cuda"):
        if name == "triton" and device.type == "cpu" and not triton:
            continue
        if all(not op.backends.why_not(name, device) for op in ops):
            chosen.append((name, name))
    if device.type == "cuda":
        chosen.append(("auto", "auto"))
    return chosen


def measured(make, args, progress, parts: bool):
    """``(run, parts)``: a run of a pipeline and, with ``parts``, its replaced parts timed alone: the median over
    steps of their total ms, and ``{part: {"ms", "mb"}}`` means per step (else ``None``)."""
    from streamkern.pipelines.runtime import measure_parts

    if not parts:
        return make().run(*args, progress=progress), None
    with measure_parts() as times:
        run = make().run(*args, progress=progress)
    steps = sorted(times.step_seconds)
    n = max(1, len(steps))
    return run, (steps[len(steps) // 2] * 1e3, {name: {"ms": times.seconds[name] / n * 1e3,
                                                       "mb": times.bytes.get(name, 0) / n / 1e6}
                                                for name in sorted(times.seconds)})


def with_dtypes(configs, dtypes) -> list[tuple]:
    """``(label, class, kwargs, args, dtype)`` per config and dtype: pipelines whose constructor takes ``dtype``
    once per dtype (labelled with it unless fp32), the others once, in their own float32."""
    import streamkern.pipelines as pipelines

    out = []
    for label, cls_name, kwargs, args in configs:
        takes = "dtype" in inspect.signature(getattr(pipelines, cls_name).__init__).parameters
        for name in (dtypes if takes else ["fp32"]):
            dtype = DTYPES[name]
            shown = label if dtype == torch.float32 else f"{label} {name}"
            out.append((shown, cls_name, dict(kwargs, dtype=dtype) if takes else kwargs, args, dtype, label))
    return out


def run_demo(device: torch.device, configs, accelerated, progress, repeats: int = 2,
             parts_in_run: bool = False, warmup: int = 0, on_rows=None) -> list[Row]:
    """Each pipeline: ``warmup`` untimed rounds of every path, then the eager run and every accelerated backend
    (``accelerated``: a list, or a function of the pipeline's base label giving its list), the whole round
    ``repeats`` times (the best median per backend is kept: a shared machine's bursts of load hit one round, rarely
    all); then one run per path with the replaced parts timed alone (``parts_in_run``: timed within the single
    round instead, whose end-to-end times then include the parts' synchronisations; for the slow ``--shapes real``
    runs). ``configs`` as :func:`with_dtypes` makes them (plain 4-tuples: float32); ``on_rows(rows)`` is called
    with each pipeline's finished rows."""
    import streamkern.pipelines as pipelines

    rows = []
    for config in configs:
        label, cls_name, kwargs, args = config[:4]
        dtype, base = (config[4], config[5]) if len(config) > 4 else (torch.float32, label)
        paths = accelerated(base) if callable(accelerated) else accelerated
        cls = getattr(pipelines, cls_name)
        best: dict[str, Row] = {}
        makers = {"eager": lambda: cls(backend="torch", device=device, **kwargs)}
        makers.update({name: (lambda backend=backend: cls(backend=backend, eager=False, device=device, **kwargs))
                       for name, backend in paths})
        parts = {}
        for round_ in range(warmup + repeats):
            timed = round_ >= warmup   # the warm-up rounds' results are dropped (a failure is still recorded)
            progress.describe(f"{label} eager" + ("" if timed else " (warm-up)"))
            eager, parts["eager"] = measured(makers["eager"], args, progress, parts_in_run)
            if timed:
                row = best.setdefault("eager", Row(label, "torch (eager)", True, 0.0, float("inf"), 1.0,
                                                   eager.syncs_per_step, notes(eager)))
                row.latency_ms = min(row.latency_ms, eager.latency * 1e3)
            for name, _ in paths:
                progress.describe(f"{label} {name}" + ("" if timed else " (warm-up)"))
                if name in best and best[name].error:
                    continue
                try:
                    run, parts[name] = measured(makers[name], args, progress, parts_in_run)
                except Exception as exc:  # recorded in the table, never dropped
                    best[name] = Row(label, name, error=f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                    traceback.print_exc(limit=2, file=sys.stderr)
                    continue
                if not timed:
                    continue
                identical, err = compare(run.outputs, eager.outputs, dtype)
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
        if on_rows is not None:
            on_rows(list(best.values()))
    return rows


# --- steady-state steps replayed from a CUDA graph -----------------------------------------------------------------

@dataclass
class GraphRow:
    pipeline: str
    step: str
    backend: str
    identical: bool | None = None   # every replay within the parity bound of the eager step (integers: equal)
    max_error: float | None = None
    eager_ms: float | None = None   # median ms of the same steps run eagerly on the same backend
    replay_ms: float | None = None  # median ms of a replay
    speedup: float | None = None    # eager_ms / replay_ms
    replays: int = 0
    error: str | None = None


def _sync_ms(fn, device: torch.device):
    """``(fn(), ms)``: one call between device synchronisations."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


def _stream_pair(kwargs: dict, backend: str, device: torch.device):
    """Two identical accelerated ``StreamingGenerator`` streams run eagerly until the window and the bank are
    full and one block more (every steady-state kernel compiled); ``(refill, eager_step, graphed_step)``."""
    from streamkern.pipelines import StreamingGenerator

    gens = [StreamingGenerator(backend=backend, eager=False, device=device, **kwargs) for _ in range(2)]
    twin, graphed = (g.stream() for g in gens)
    g = gens[0]
    warm = -(-(g.sink + g.window + g.bank_size * g.fsl) // (g.fpb * g.fsl)) + 2
    block = [0]

    def refill(_):
        for s in (twin, graphed):
            s.noise.copy_(s.block_noise(block[0]))
        block[0] += 1

    for _ in range(warm):
        refill(None)
        twin.step()
        graphed.step()
    if graphed.cache.bank_count != g.bank_size:
        raise RuntimeError(f"StreamingGenerator: bank holds {graphed.cache.bank_count} of {g.bank_size} frames "
                           f"after {warm} blocks: not yet in its steady state")
    return refill, lambda: [twin.step()], lambda: [graphed.step()]


def _policy_pair(kwargs: dict, backend: str, device: torch.device, steps: int):
    """Two identical accelerated ``GatedPolicy`` pipelines on :func:`scripted_trajectory`, warmed on its first two
    frames (both branches of the gate taken); static image/state/noise buffers; ``(refill, eager_step,
    graphed_step)``; a step returns the actions, the gate's reason and drift."""
    from streamkern.pipelines import GatedPolicy
    from streamkern.pipelines.tiny import randn
    from streamkern.pipelines.gated_policy import scripted_trajectory

    pipes = [GatedPolicy(backend=backend, eager=False, device=device, **kwargs) for _ in range(2)]
    gates = [p.gate() for p in pipes]
    images, states = scripted_trajectory(steps + 3, pipes[0].batch, pipes[0].seed, device)
    shape = (pipes[0].batch, pipes[0].policy.action_tokens, pipes[0].policy.action_dim)
    noises = [randn(shape, 1000 + t, device) for t in range(steps + 3)]
    inputs = [(images[0].clone(), states[0].clone(), noises[0].clone()) for _ in pipes]
    frame = [0]

    def refill(_):
        t = frame[0]
        for buffers in inputs:
            for buf, value in zip(buffers, (images[t], states[t], noises[t])):
                buf.copy_(value)
        frame[0] += 1

    def stepper(i):
        return lambda: list(pipes[i].step(gates[i], *inputs[i]))

    for _ in range(2):
        refill(None)
        stepper(0)()
        stepper(1)()
    return refill, stepper(0), stepper(1)


def _var_pair(kwargs: dict, backend: str, device: torch.device, pos: int = 1):
    """Two identical accelerated ``SpeculativeVAR`` decoders, one round at scale ``pos`` each warmed; refills
    write fresh prefixes and labels into static token and label buffers; the sample mode draws from generators
    the graph advances; ``(refill, eager_step, graphed_step, generators)``; a step returns the kept count and the
    whole token buffer."""
    from streamkern.pipelines import RoundInputs, SpeculativeVAR

    pipes = [SpeculativeVAR(backend=backend, eager=False, device=device, **kwargs) for _ in range(2)]
    gens = [torch.Generator(device).manual_seed(7) for _ in pipes]
    inputs = RoundInputs(pipes, pos)
    stats = {"draft_calls": 0, "target_calls": 0}

    def refill(_):
        inputs.refill()

    def stepper(i):
        return lambda: [pipes[i].round(*inputs.pairs[i], gens[i], pos, stats), inputs.pairs[i][0]]

    refill(None)
    stepper(0)()
    stepper(1)()
    return refill, stepper(0), stepper(1), (gens[1],)


def graph_row(label: str, step: str, make, device: torch.device, dtype: torch.dtype, replays: int) -> GraphRow:
    """Capture the graphed pipeline's step once (after ``make()`` warmed both twins), then ``replays`` times:
    refill both, replay the graph and run the twin's step eagerly, each timed alone; every output compared."""
    from streamkern.step_graph import StepGraph

    row = GraphRow(label, step, "auto")
    try:
        refill, eager_step, graphed_step, *gens = make()
        refill(0)
        graph = StepGraph(lambda: graphed_step(), device, generators=gens[0] if gens else ())
        eager_ms, replay_ms, worst, same = [], [], 0.0, True

        def check(got, want):
            nonlocal worst, same
            outs = {str(i): g.clone() for i, g in enumerate(got)}
            ok, err = compare(outs, {str(i): w for i, w in enumerate(want)}, dtype)
            same &= ok
            worst = max(worst, err)

        check(graph.outputs, eager_step())
        for i in range(replays):
            refill(i + 1)
            got, ms = _sync_ms(graph.replay, device)
            replay_ms.append(ms)
            got = [g.clone() for g in got]
            want, ms = _sync_ms(eager_step, device)
            eager_ms.append(ms)
            check(got, want)
    except Exception as exc:  # recorded in the table, never dropped
        row.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        traceback.print_exc(limit=3, file=sys.stderr)
        return row
    row.identical, row.max_error, row.replays = bool(same), worst, replays
    row.eager_ms, row.replay_ms = sorted(eager_ms)[len(eager_ms) // 2], sorted(replay_ms)[len(replay_ms) // 2]
    row.speedup = row.eager_ms / row.replay_ms
    return row


GRAPH_REPLAYS = 20


def graph_configs(configs, sizes, replays: int = GRAPH_REPLAYS) -> list[tuple]:
    """``(label, step, make(device), dtype)`` of the capturable steps: ``StreamingGenerator``'s block at its
    config's first dtype in the run (the others would only repeat it slower), ``GatedPolicy.step`` and
    ``SpeculativeVAR.round`` at ``sizes``'s
    kwargs (the default or the tiny set); ``replays`` after the capture (the policy's trajectory has as many
    frames more)."""
    own = {label: kwargs for label, _, kwargs, _ in sizes}
    out = []
    for label, cls_name, kwargs, _, dtype, base in configs:
        if base == "StreamingGenerator" and not any(o[1] == "BlockStream.step" for o in out):
            out.append((label, "BlockStream.step", lambda dev, kw=kwargs: _stream_pair(kw, "auto", dev), dtype))
    out.append(("GatedPolicy", "GatedPolicy.step",
                lambda dev: _policy_pair(own["GatedPolicy"], "auto", dev, steps=replays), torch.float32))
    for label in ("SpeculativeVAR greedy", "SpeculativeVAR sample"):
        out.append((label, "SpeculativeVAR.round", lambda dev, kw=own[label]: _var_pair(kw, "auto", dev),
                    torch.float32))
    return out


def _table(head: str, rows: list, label: Callable, cells: Callable) -> str:
    """``head``, a rule, then per row ``label(r)`` and ``cells(r)``, or FAILED and the error."""
    lines = [head, "-" * len(head)]
    lines += [f"{label(r)} {'FAILED':9s} {r.error}" if r.error else f"{label(r)} {cells(r)}" for r in rows]
    return "\n".join(lines)


def format_graphs(rows: list[GraphRow]) -> str:
    head = (f"{'pipeline':26s} {'step (graph, auto)':24s} {'identical':9s} {'max rel err':>11s} "
            f"{'eager ms':>9s} {'replay ms':>9s} {'speed-up':>8s} replays")
    return _table(head, rows, lambda r: f"{r.pipeline:26s} {r.step:24s}",
                  lambda r: (f"{'yes' if r.identical else 'NO':9s} {r.max_error:11.1e} {r.eager_ms:9.3f} "
                             f"{r.replay_ms:9.3f} {r.speedup:7.2f}x {r.replays:7d}"))


def format_table(rows: list[Row]) -> str:
    head = (f"{'pipeline':26s} {'backend':13s} {'identical':9s} {'max rel err':>11s} {'ms/step':>9s} "
            f"{'speed-up':>8s} {'syncs/step':>10s} {'parts ms':>9s} {'parts x':>7s} {'parts MB':>9s}  notes")

    def cells(r: Row) -> str:
        px = f"{r.parts_speedup:6.2f}x" if r.parts_speedup else f"{'-':>7s}"
        return (f"{'yes' if r.identical else 'NO':9s} {r.max_error:11.1e} {r.latency_ms:9.1f} {r.speedup:7.2f}x "
                f"{r.syncs_per_step:10.2f} {r.parts_ms:9.2f} {px} {r.parts_mb:9.3f}  {r.notes}")
    return _table(head, rows, lambda r: f"{r.pipeline:26s} {r.backend:13s}", cells)


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
    parser.add_argument("--shapes", choices=("tiny", "real"), default=None,
                        help="'real': StreamingGenerator and MemoryWorldModel at docs/contract.md §6 shapes (one round); "
                             "default: real on CUDA, tiny on CPU")
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=None,
                        help="storage dtype(s) of the pipelines that take one (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per pipeline; the best median is kept (default 2, 1 with --shapes real)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed rounds of every path first (default: 1 on CUDA, 0 on CPU)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                        help="time the capturable steps replayed from a CUDA graph (default: on CUDA only; "
                             "on CPU StepGraph's recorded replay)")
    parser.add_argument("--jsonl", default=None, help="append each finished row to this file as a JSON line")
    parser.add_argument("--pipelines", nargs="+", choices=LABELS, default=None,
                        help="run only these pipelines (default: all of the chosen shapes)")
    parser.add_argument("--markdown", metavar="JSON", help="print the table of a stored demo.json and exit")
    args = parser.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return []
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.triton and device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    shapes = args.shapes or ("real" if cuda else "tiny")
    real = shapes == "real"
    sizes = TINY if args.tiny else DEFAULT
    chosen = [c for c in (REAL if real else sizes) if args.pipelines is None or c[0] in args.pipelines]
    configs = with_dtypes(chosen, args.dtype or (["bf16"] if cuda else ["fp32"]))
    repeats = args.repeats or (1 if real else 2)
    warmup = args.warmup if args.warmup is not None else (1 if cuda else 0)
    graphs = cuda if args.graphs is None else args.graphs   # on CPU: StepGraph's recorded replay

    def accelerated(label):
        return backends_for(device, args.triton, args.reference_ops, pipeline_ops(label, str(device)))

    def emit(kind, rows):
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                for r in rows:
                    f.write(json.dumps({"source": "demo", "kind": kind, **asdict(r)}) + "\n")

    steps = sum(c[3][0] * (1 + len(accelerated(c[5]))) for c in configs) * (warmup + repeats + (0 if real else 1))
    progress = Progress(steps)
    start = time.perf_counter()
    try:
        rows = run_demo(device, configs, accelerated, progress, repeats, parts_in_run=real, warmup=warmup,
                        on_rows=lambda done: emit("row", done))
    finally:
        progress.close()
    graph_rows = []
    for label, step, make, dtype in (graph_configs(configs, sizes) if graphs else []):
        if step != "BlockStream.step" and args.pipelines is not None and label not in args.pipelines:
            continue
        graph_rows.append(graph_row(label, step, lambda: make(device), device, dtype, GRAPH_REPLAYS))
        emit("graph", graph_rows[-1:])
    seconds = time.perf_counter() - start
    where = machine()
    dtypes = sorted({str(c[4]).replace("torch.", "") for c in configs})
    print(f"streamkern demo on {device} ({torch.get_num_threads()} threads, {where}), shapes {shapes}, "
          f"{seconds:.0f} s\n{format_table(rows)}\n\n{closing_note(rows)}"
          + (f"\n\n{format_graphs(graph_rows)}" if graph_rows else ""))
    os.makedirs(args.out, exist_ok=True)
    name = "demo-real" if real else "demo"
    with open(os.path.join(args.out, f"{name}.json"), "w") as f:
        json.dump({"device": str(device), "torch": torch.__version__, "tiny": args.tiny, "shapes": shapes,
                   "dtypes": dtypes, "warmup_rounds": warmup,
                   "commit": commit(), "machine": where, "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "seconds": round(seconds, 1),
                   "rows": [r.__dict__ for r in rows], "graphs": [asdict(r) for r in graph_rows]}, f, indent=1)
    why = write_chart(rows, os.path.join(args.out, f"{name}.png"), device)
    print(why or f"wrote {args.out}/{name}.json and {args.out}/{name}.png")
    return rows


if __name__ == "__main__":
    main()

"""What every reference pipeline shares: the host-sync counter, per-step timing, the run record, and the timer of
the parts streamkern replaces.

Host syncs are counted on the CPU by construction: inside :func:`count_host_syncs` every Python-level way of
reading a tensor's value on the host (``Tensor.item``, ``bool(t)``, ``int(t)``, ``float(t)``, ``operator.index``,
``tolist``, ``numpy``, ``cpu``) is wrapped to count (or, with ``forbid=True``, to raise :class:`HostSyncError`).
Reads made by an op's value check (the ``values=`` of its ``define_op``: the checks DESIGN.md §3 lets the
``"torch"`` and ``"cpu"`` backends make, and GPU backends only under ``STREAMKERN_DEBUG=1``) are recorded apart
as ``check:<kind>`` and left out of the total; reads a pipeline declares with :func:`host_read`
are counted as ``decision``. On a CUDA device ``torch.cuda.set_sync_debug_mode("warn")`` (``"error"`` with
``forbid``) is switched on as well and each synchronising CUDA call it reports is counted instead.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .._backend import checking_values

_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__")


class HostSyncError(RuntimeError):
    """A tensor value was read on the host inside a ``count_host_syncs(forbid=True)`` block."""


@dataclass
class SyncCount:
    """Host reads seen so far, by kind (``item``, ``__bool__``, ``cuda-sync``...)."""

    by_kind: dict[str, int] = field(default_factory=dict)
    forbid: bool = False

    @property
    def total(self) -> int:
        return sum(n for kind, n in self.by_kind.items() if not kind.startswith("check:"))


@contextlib.contextmanager
def count_host_syncs(forbid: bool = False, error: type[Exception] = HostSyncError,
                     where: str = "on the accelerated hot loop") -> Iterator[SyncCount]:
    """Count (or with ``forbid`` refuse: raise ``error`` saying ``where``) every host read of a tensor value made
    inside the block."""
    count = SyncCount(forbid=forbid)
    originals = {name: getattr(torch.Tensor, name) for name in _READS}
    own = {name for name in _READS if name in torch.Tensor.__dict__}

    def wrap(name: str, real: Callable) -> Callable:
        def reader(self, *args, **kwargs):
            kind = f"check:{name}" if checking_values() else name
            if forbid and kind == name:
                raise error(f"host sync: Tensor.{name} called {where}")
            if not self.is_cuda:    # a CUDA tensor's read is counted once, by the sync debug mode
                count.by_kind[kind] = count.by_kind.get(kind, 0) + 1
            return real(self, *args, **kwargs)
        return reader

    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    previous_mode = torch.cuda.get_sync_debug_mode() if cuda else None
    try:
        _ACTIVE.append(count)
        for name, real in originals.items():
            setattr(torch.Tensor, name, wrap(name, real))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("error" if forbid else "warn")
            yield count
        syncs = sum("synchroniz" in str(w.message) for w in caught)
        if syncs:
            count.by_kind["cuda-sync"] = syncs
        for w in caught:
            if "synchroniz" not in str(w.message):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    finally:
        _ACTIVE.pop()
        for name, real in originals.items():
            if name in own:
                setattr(torch.Tensor, name, real)
            else:
                delattr(torch.Tensor, name)
        if cuda:
            torch.cuda.set_sync_debug_mode(previous_mode)


_ACTIVE: list[SyncCount] = []


def host_read(t: torch.Tensor):
    """A deliberate host read of a 0-d decision tensor (``t.item()``): counted as ``decision`` (and in the
    total) even inside ``count_host_syncs(forbid=True)``, which only refuses the reads nobody declared."""
    if _ACTIVE:
        _ACTIVE[-1].by_kind["decision"] = _ACTIVE[-1].by_kind.get("decision", 0) + 1
    if t.device.type != "cuda":
        return torch._C.TensorBase.item(t)
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return torch._C.TensorBase.item(t)
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def _sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PipelineRun:
    """One streamed run: its outputs (compared across backends), per-step latency and host syncs."""

    pipeline: str
    backend: str
    outputs: dict[str, torch.Tensor]
    step_seconds: list[float] = field(default_factory=list)
    step_syncs: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def latency(self) -> float:
        """Median seconds per step."""
        s = sorted(self.step_seconds)
        return s[len(s) // 2] if s else float("nan")

    @property
    def syncs_per_step(self) -> float:
        return sum(self.step_syncs) / max(1, len(self.step_syncs))


def timed_step(run: PipelineRun, device: torch.device, step: Callable[[], None], forbid: bool = False) -> None:
    """Run ``step()`` once, recording its wall time (device-synchronised outside the count) and host syncs."""
    if _PARTS:
        _PARTS[-1].step_seconds.append(0.0)
    _sync_device(device)
    start = time.perf_counter()
    with count_host_syncs(forbid=forbid) as count:
        step()
    _sync_device(device)
    run.step_seconds.append(time.perf_counter() - start)
    run.step_syncs.append(count.total)


@dataclass
class PartTimes:
    """Wall time and bytes of each replaced part (cache handling, scoring, eviction, retrieval, gating,
    verification, attention over the streaming memory), summed over a run and per step (``step_seconds``: the
    parts' total of each :func:`timed_step`); ``bytes`` counts what a part reads and writes, from the shapes it
    touches."""

    seconds: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    step_seconds: list[float] = field(default_factory=list)

    def add(self, name: str, seconds: float, nbytes: int) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.bytes[name] = self.bytes.get(name, 0) + nbytes
        if self.step_seconds:
            self.step_seconds[-1] += seconds


_PARTS: list[PartTimes] = []


@contextlib.contextmanager
def measure_parts() -> Iterator[PartTimes]:
    """Inside the block every :func:`part` of a pipeline is timed alone (device-synchronised on both sides)."""
    times = PartTimes()
    _PARTS.append(times)
    try:
        yield times
    finally:
        _PARTS.pop()
        times.bytes = {name: int(n) for name, n in times.bytes.items()}   # device counts read once, at the end


@contextlib.contextmanager
def part(name: str, device: torch.device) -> Iterator[Callable[[int], None]]:
    """Mark a part of a step that streamkern replaces; it yields ``moved(nbytes)`` for the part to declare the bytes
    it reads and writes (an int, or a 0-d device tensor when the count depends on a device decision). Timed only inside :func:`measure_parts` (otherwise free: no synchronisation, nothing
    recorded)."""
    if not _PARTS:
        yield _ignore
        return
    moved = [0]
    _sync_device(device)
    start = time.perf_counter()
    yield lambda n: moved.__setitem__(0, moved[0] + n)
    _sync_device(device)
    _PARTS[-1].add(name, time.perf_counter() - start, moved[0])


def _ignore(n: int) -> None:
    return None


def nbytes(*tensors) -> int:
    """Bytes held by the elements of ``tensors`` (``None`` skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)

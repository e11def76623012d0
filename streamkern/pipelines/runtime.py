"""What every reference pipeline shares: per-step timing (with the host syncs of ``streamkern.capture``), the run
record, and the timer of the parts streamkern replaces.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..capture import count_host_syncs


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

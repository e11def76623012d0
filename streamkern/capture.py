"""The lowest layer of the package: which captures are in progress, and which host reads happen.

Both are bookkeeping of the same rule, that a streamed step must run without the host seeing device values:

* **Captures.** :func:`capturing` tells an op that a step is being captured on a device (a CUDA-graph capture on
  the current stream, or on CPU a ``StepGraph`` recording, pushed with :func:`capture_scope`); the ops then skip
  what a capture cannot hold (a host read, a lazy allocation). :func:`run_value_check` runs an op's value check,
  a host read that docs/contract.md §3 allows on the ``"torch"`` and ``"cpu"`` backends, and skips it while the
  tensors' device is being captured in a CUDA graph; :func:`checking_values` says one is running.
* **Host syncs**, counted on the CPU by construction (the pipelines' counter, and the guard of ``StepGraph``'s CPU
  recording). Inside :func:`count_host_syncs` every Python-level way of reading a tensor's value on the host
  (``Tensor.item``, ``bool(t)``, ``int(t)``, ``float(t)``, ``operator.index``, ``tolist``, ``numpy``, ``cpu``) is
  wrapped to count (or, with ``forbid=True``, to raise :class:`HostSyncError`). Reads made by a value check are
  recorded apart as ``check:<kind>`` and left out of the total; reads a caller declares with :func:`host_read` are
  counted as ``decision``. On a CUDA device ``torch.cuda.set_sync_debug_mode("warn")`` (``"error"`` with
  ``forbid``) is switched on as well and each synchronising CUDA call it reports is counted instead.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ._checks import reading_layout

__all__ = ["HostSyncError", "SyncCount", "capture_scope", "capturing", "checking_values", "count_host_syncs",
           "cuda_capturing", "host_read", "innermost_capture", "run_value_check"]


# --- captures in progress ----------------------------------------------------------------------

_CAPTURES: list = []   # the StepGraph captures in progress, innermost last


@contextlib.contextmanager
def capture_scope(graph: Any) -> Iterator[None]:
    """Marks ``graph`` (an object with a ``.device``, a ``StepGraph``) as capturing for the block."""
    _CAPTURES.append(graph)
    try:
        yield
    finally:
        _CAPTURES.pop()


def innermost_capture(device_type: str) -> Any:
    """The innermost graph in a :func:`capture_scope` on a device of ``device_type``, or ``None``."""
    return next((g for g in reversed(_CAPTURES) if g.device.type == device_type), None)


def cuda_capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream and ``device`` is a CUDA device."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capturing(device: torch.device) -> bool:
    """A step is being captured on ``device``: a CUDA-graph capture on its current stream (a StepGraph's or any
    other), or on CPU a ``StepGraph`` recording."""
    if device.type == "cuda":
        return cuda_capturing(device)
    return device.type == "cpu" and innermost_capture("cpu") is not None


_VALUE_CHECK_DEPTH = [0]


def checking_values() -> bool:
    """Whether an op's value check, or a check of memory layout, may read tensors on the host right now."""
    return _VALUE_CHECK_DEPTH[0] > 0 or reading_layout()


def run_value_check(values: Callable, args: Sequence) -> None:
    """``values(*args)``, a check that reads tensor values on the host, flagged by :func:`checking_values` while it
    runs. Skipped while the tensors' device is being captured in a CUDA graph: a host read there invalidates the
    capture, and the eager call that precedes every capture (the warm-up) has checked the same kind of values."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is not None and cuda_capturing(device):
        return
    _VALUE_CHECK_DEPTH[0] += 1
    try:
        values(*args)
    finally:
        _VALUE_CHECK_DEPTH[0] -= 1


# --- host syncs --------------------------------------------------------------------------------

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

"""Backend registry and dispatch (DESIGN.md §2).

A backend is one of ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``. Each op declares which backends it
implements (an :class:`OpBackends` table); :func:`resolve` picks one for the op's input device:

* an explicit ``backend=`` argument wins, then :func:`backend` / :func:`set_backend`, then the
  ``STREAMKERN_BACKEND`` environment variable, else ``"auto"``;
* ``"auto"`` takes the op's fastest backend that can run on the device (CPU tensors: ``"cpu"`` if the
  extension is built, else ``"torch"``);
* a named backend that cannot run raises :class:`BackendUnavailable` saying why, never falls back.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


# The default set in code, process-wide. A plain module global rather than a ContextVar: torch.compile traces
# reads of it and guards on its value, so compiled code recompiles when the default changes.
_default: dict[str, str | None] = {"name": None}


def _check_name(name: str, allow_auto: bool = True) -> str:
    allowed = BACKENDS + (("auto",) if allow_auto else ())
    if name not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` or ``"auto"`` restores automatic choice)."""
    _default["name"] = None if name is None else _check_name(name)


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Use ``name`` as the default backend inside the ``with`` block."""
    previous = _default["name"]
    _default["name"] = None if name is None else _check_name(name)
    try:
        yield
    finally:
        _default["name"] = previous


def current_backend() -> str:
    """The default in force: context / set_backend, else ``STREAMKERN_BACKEND``, else ``"auto"``."""
    name = _default["name"]
    if name is None:
        name = os.environ.get("STREAMKERN_BACKEND", "").strip() or "auto"
        _check_name(name)
    return name


# --- what is installed -------------------------------------------------------------------------


def _probe_extension() -> tuple[bool, bool, str]:
    """(loaded, built with CUDA, why not loaded)."""
    try:
        from streamkern import _C  # loading it registers torch.ops.streamkern_C
    except ImportError as exc:
        return False, False, f"the C++ extension streamkern._C is not built ({exc}); run `pip install -e .`"
    return True, bool(_C.cuda_built()), ""


def _probe_triton() -> str:
    return "" if importlib.util.find_spec("triton") is not None else "triton is not installed"


# Probed once at import and kept as plain values, so that torch.compile traces dispatch without graph breaks.
_EXTENSION = _probe_extension()
_TRITON_MISSING = _probe_triton()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, device: torch.device) -> str:
    """Empty string when backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "torch":
        return ""
    if name == "cpu":
        loaded, _, why = _EXTENSION
        if not loaded:
            return why
        return "" if device.type == "cpu" else f"runs on CPU tensors only, got {device.type} tensors"
    if name == "triton":
        if _TRITON_MISSING:
            return _TRITON_MISSING
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpreting():
            return ""
        return f"runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device.type} tensors"
    if name == "cuda":
        loaded, cuda_built, why = _EXTENSION
        if not loaded:
            return why
        if not cuda_built:
            return "streamkern._C was built without CUDA (torch is a CPU build or nvcc was missing)"
        if device.type != "cuda":
            return f"runs on CUDA tensors only, got {device.type} tensors"
        return ""
    raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Backends that can run here: on ``device`` if given, else on any device of this machine."""
    if device is not None:
        devices = [torch.device(device)]
    else:
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(not why_not(b, d) for d in devices)]


# --- per-op tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OpBackends:
    """The implementations of one op, by backend name, and why the missing ones are missing."""

    op: str
    impls: Mapping[str, Callable]
    missing: Mapping[str, str] = field(default_factory=dict)  # backend -> why this op has no such implementation

    def resolve(self, requested: str | None, device: torch.device) -> str:
        name = _check_name(requested) if requested is not None else current_backend()
        if name == "auto":
            for cand in _AUTO_ORDER.get(device.type, ("torch",)):
                if cand in self.impls and not why_not(cand, device):
                    return cand
            return "torch"
        if name not in self.impls:
            why = self.missing.get(name, "not implemented")
            raise BackendUnavailable(self._report(name, device, {name: f"{self.op} has no {name!r} backend: {why}"}))
        reason = why_not(name, device)
        if reason:
            raise BackendUnavailable(self._report(name, device, {name: reason}))
        return name

    def _report(self, name: str, device: torch.device, first: dict[str, str]) -> str:
        lines = [f"streamkern.{self.op}: backend {name!r} cannot run on {device.type} tensors here."]
        for b in BACKENDS:
            why = first.get(b) or (
                f"no {b!r} implementation: {self.missing.get(b, 'not implemented')}"
                if b not in self.impls else why_not(b, device)
            )
            lines.append(f"  {b:7s} {'ok' if not why else why}")
        return "\n".join(lines)

    def __call__(self, name: str) -> Callable:
        return self.impls[name]

    def run(self, custom_op: Callable, name: str, *args):
        """``custom_op(*args, name)``, the ``torch.library`` op that wraps this table, or backend ``name`` called
        directly when nothing needs the wrapper: no torch.compile trace, no dispatch mode, no tensor subclass and
        no input that requires grad. Both run the same implementation; the wrapper's Python machinery costs tens
        of microseconds of host time per call (more than a small kernel), so plain eager calls skip it."""
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
                or any(type(t) is not torch.Tensor for t in tensors)
                or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))):
            return custom_op(*args, name)
        return self.impls[name](*args)

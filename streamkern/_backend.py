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
import contextvars
import functools
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

BACKENDS = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


_default: contextvars.ContextVar[str | None] = contextvars.ContextVar("streamkern_backend", default=None)


def _check_name(name: str, allow_auto: bool = True) -> str:
    allowed = BACKENDS + (("auto",) if allow_auto else ())
    if name not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` or ``"auto"`` restores automatic choice)."""
    _default.set(None if name is None else _check_name(name))


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Use ``name`` as the default backend inside the ``with`` block."""
    token = _default.set(None if name is None else _check_name(name))
    try:
        yield
    finally:
        _default.reset(token)


def current_backend() -> str:
    """The default in force: context / set_backend, else ``STREAMKERN_BACKEND``, else ``"auto"``."""
    name = _default.get()
    if name is None:
        name = os.environ.get("STREAMKERN_BACKEND", "").strip() or "auto"
        _check_name(name)
    return name


# --- what is installed -------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _extension() -> tuple[object | None, str]:
    try:
        from streamkern import _C  # noqa: F401  (loading it registers torch.ops.streamkern_C)
    except ImportError as exc:
        return None, f"the C++ extension streamkern._C is not built ({exc}); run `pip install -e .`"
    return _C, ""


@functools.lru_cache(maxsize=None)
def _triton() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, device: torch.device) -> str:
    """Empty string when backend ``name`` can run on ``device``, else the reason it cannot."""
    if name == "torch":
        return ""
    if name == "cpu":
        ext, why = _extension()
        if ext is None:
            return why
        return "" if device.type == "cpu" else f"runs on CPU tensors only, got {device.type} tensors"
    if name == "triton":
        if _triton():
            return _triton()
        if device.type == "cuda":
            return ""
        if device.type == "cpu" and triton_interpreting():
            return ""
        return f"runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1), got {device.type} tensors"
    if name == "cuda":
        ext, why = _extension()
        if ext is None:
            return why
        if not ext.cuda_built():
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
    missing: Mapping[str, str] = None  # backend -> why this op has no such implementation

    def resolve(self, requested: str | None, device: torch.device) -> str:
        name = _check_name(requested) if requested is not None else current_backend()
        if name == "auto":
            for cand in _AUTO_ORDER.get(device.type, ("torch",)):
                if cand in self.impls and not why_not(cand, device):
                    return cand
            return "torch"
        if name not in self.impls:
            why = (self.missing or {}).get(name, "not implemented")
            raise BackendUnavailable(self._report(name, device, {name: f"{self.op} has no {name!r} backend: {why}"}))
        reason = why_not(name, device)
        if reason:
            raise BackendUnavailable(self._report(name, device, {name: reason}))
        return name

    def _report(self, name: str, device: torch.device, first: dict[str, str]) -> str:
        lines = [f"streamkern.{self.op}: backend {name!r} cannot run on {device.type} tensors here."]
        for b in BACKENDS:
            why = first.get(b) or (
                f"no {b!r} implementation: {(self.missing or {}).get(b, 'not implemented')}"
                if b not in self.impls else why_not(b, device)
            )
            lines.append(f"  {b:7s} {'ok' if not why else why}")
        return "\n".join(lines)

    def __call__(self, name: str) -> Callable:
        return self.impls[name]

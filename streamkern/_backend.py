"""Backend registry and dispatch (docs/contract.md §2).

A backend is one of ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``. Each op declares which backends it
implements (an :class:`OpBackends` table); :func:`resolve` picks one for the op's input device:

* an explicit ``backend=`` argument wins, then :func:`backend` / :func:`set_backend`, then the
  ``STREAMKERN_BACKEND`` environment variable, else ``"auto"``;
* ``"auto"`` takes the op's fastest backend that can run on the device: the first of the device's order that can
  take the inputs (CUDA tensors ``"cuda"``, ``"triton"``, ``"torch"``; CPU tensors ``"cpu"`` if the extension is
  built, else ``"torch"``), or of the op's own order where its ``define_op(auto_order=...)`` declares one from
  measurements;
* a named backend that cannot run raises :class:`BackendUnavailable` saying why, never falls back.

:func:`define_op` declares an op once: its schema, argument check, value check, output allocation (also its fake
kernel) and backend implementations (:class:`Kernel`, each with what it supports); it builds the
``torch.library`` custom op, the backend table and the call path (:class:`Op`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ._checks import debug_enabled
from .capture import run_value_check

BACKENDS = ("torch", "cpu", "triton", "cuda")
_AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}   # device type -> "auto"'s order


class BackendUnavailable(RuntimeError):
    """A backend was asked for by name but cannot run here; the message says why."""


# The default set in code, process-wide. A plain module global rather than a ContextVar: torch.compile traces
# reads of it and guards on its value, so compiled code recompiles when the default changes.
_default: dict[str, str | None] = {"name": None}


def check_backend_name(name: str, allow_auto: bool = True) -> str:
    """``name`` if it names a backend (or ``"auto"`` when ``allow_auto``), else a ``ValueError`` naming ``backend``."""
    allowed = BACKENDS + (("auto",) if allow_auto else ())
    if name not in allowed:
        raise ValueError(f"backend: expected one of {allowed}, got {name!r}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` or ``"auto"`` restores automatic choice)."""
    _default["name"] = None if name is None else check_backend_name(name)


@contextlib.contextmanager
def backend(name: str | None) -> Iterator[None]:
    """Use ``name`` as the default backend inside the ``with`` block."""
    previous = _default["name"]
    _default["name"] = None if name is None else check_backend_name(name)
    try:
        yield
    finally:
        _default["name"] = previous


def current_backend() -> str:
    """The default in force: context / set_backend, else ``STREAMKERN_BACKEND``, else ``"auto"``."""
    name = _default["name"]
    if name is None:
        name = os.environ.get("STREAMKERN_BACKEND", "").strip() or "auto"
        check_backend_name(name)
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
    supports: Mapping[str, Callable[..., str]] = field(default_factory=dict)  # backend -> why not these inputs
    auto_order: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # device type -> this op's "auto" order

    def why_not(self, name: str, device: torch.device, args: Sequence = ()) -> str:
        """Empty string when backend ``name`` of this op can take ``args`` on ``device``, else the reason."""
        if name not in self.impls:
            return f"{self.op} has no {name!r} backend: {self.missing.get(name, 'not implemented')}"
        return why_not(name, device) or (self.supports[name](*args) if name in self.supports and args else "")

    def resolve(self, requested: str | None, device: torch.device, args: Sequence = ()) -> str:
        """The backend to run: ``requested``, else the current default; ``"auto"`` takes the first of the device's
        order (the op's own where it declares one) that can take ``args`` (``"torch"`` as the last resort)."""
        name = check_backend_name(requested) if requested is not None else current_backend()
        if name == "auto":
            for cand in self.auto_order.get(device.type) or _AUTO_ORDER.get(device.type, ("torch",)):
                if not self.why_not(cand, device, args):
                    return cand
            return "torch"
        if self.why_not(name, device, args):
            raise BackendUnavailable(self._report(name, device, args))
        return name

    def _report(self, name: str, device: torch.device, args: Sequence) -> str:
        lines = [f"streamkern.{self.op}: backend {name!r} cannot run on {device.type} tensors here."]
        for b in BACKENDS:
            why = self.why_not(b, device, args)
            lines.append(f"  {b:7s} {'ok' if not why else why}")
        return "\n".join(lines)

    def __call__(self, name: str) -> Callable:
        impl = self.impls[name]
        return functools.partial(_on_tensors_device, impl) if name == "triton" else impl

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
        return self(name)(*args)


def device_guard(device: torch.device):
    """The context that makes ``device`` current for a Triton launch: Triton launches on the current CUDA device,
    so tensors on ``cuda:1`` launched from ``cuda:0`` would be read through the wrong context."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _on_tensors_device(impl: Callable, *args):
    """``impl(*args)`` with the device of the first tensor argument current (the ops check that all agree)."""
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
    with device_guard(device):
        return impl(*args)


# --- one declaration per op --------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """One backend's implementation of an op.

    ``fn(*args)`` returns the op's outputs, or with ``out=True`` is called as ``fn(out, *args)`` and fills ``out``,
    the outputs the op's ``alloc`` made (the C++ ops and most Triton launchers work this way).
    ``supports(*args)`` returns why this backend cannot take these (checked) inputs, ``""`` when it can:
    ``"auto"`` then picks another backend and a request by name raises :class:`BackendUnavailable` with the reason.
    """

    fn: Callable
    out: bool = False
    supports: Callable[..., str] | None = None


@dataclass(frozen=True)
class _Forward:
    """Calls ``target`` with an op's arguments, rearranged by ``arrange(*args) -> tuple`` when given."""

    what: str
    resolve: Callable[[], Callable]
    arrange: Callable[..., tuple] | None = None

    def __call__(self, *args):
        return self.resolve()(*(args if self.arrange is None else self.arrange(*args)))

    def __repr__(self) -> str:
        return self.what


def outputs_last(out, *args) -> tuple:
    """``arrange`` for kernels that take the op's arguments first and its outputs (one tensor or a tuple) last."""
    return (*args, *(out if isinstance(out, tuple) else (out,)))


def cxx(name: str, arrange: Callable[..., tuple] | None = None) -> Callable:
    """A backend that is the C++ op ``torch.ops.streamkern_C.<name>`` (one name for the CPU and CUDA kernels,
    dispatched on the tensors' device), called with the op's arguments (``arrange``-d)."""
    return _Forward(f"streamkern_C.{name}", lambda: getattr(torch.ops.streamkern_C, name), arrange)


def triton(path: str, arrange: Callable[..., tuple] | None = None) -> Callable:
    """A backend that is the Triton launcher ``streamkern.kernels.<module>.<function>`` (``path`` is
    ``"module:function"``, imported at the first call: triton is imported only when used), called with the op's
    arguments (``arrange``-d)."""
    module, function = path.split(":")
    return _Forward(f"streamkern.kernels.{path}", lambda: getattr(importlib.import_module(
        f"streamkern.kernels.{module}"), function), arrange)


def _with_backend(schema: str) -> tuple[str, tuple[str, ...]]:
    """``schema`` with a trailing ``str backend`` argument, and the names of the arguments it mutates."""
    params, sep, returns = schema.rpartition(") ->")
    if not sep:
        raise ValueError(f"schema: expected '(args) -> returns', got {schema!r}")
    full = f"{params}{', ' if params.strip() != '(' else ''}str backend{sep}{returns}"
    parsed = torch._C.parse_schema(f"streamkern::op{full}")
    return full, tuple(a.name for a in parsed.arguments if a.alias_info is not None and a.alias_info.is_write)


class Op:
    """An op declared by :func:`define_op`: ``op(*args, backend=None)`` checks, resolves and runs it."""

    def __init__(self, name: str, schema: str, backends: Mapping[str, Callable | Kernel], *,
                 check: Callable | None = None, values: Callable | None = None, alloc: Callable | None = None,
                 fake: Callable | None = None, missing: Mapping[str, str] | None = None,
                 auto_order: Mapping[str, Sequence[str]] | None = None):
        self.name = name
        self._check, self._values, self._alloc = check, values, alloc
        kernels = {b: k if isinstance(k, Kernel) else Kernel(k) for b, k in backends.items()}
        for b, k in kernels.items():
            check_backend_name(b, allow_auto=False)
            if k.out and alloc is None:
                raise ValueError(f"{name}: backend {b!r} fills outputs (out=True) but the op has no alloc")
        order = {dev: tuple(check_backend_name(b, allow_auto=False) for b in names)
                 for dev, names in (auto_order or {}).items()}
        self.backends = OpBackends(name, {b: self._runner(b, k) for b, k in kernels.items()}, dict(missing or {}),
                                   {b: k.supports for b, k in kernels.items() if k.supports is not None}, order)
        full, mutates = _with_backend(schema)
        self.custom_op = torch.library.custom_op(f"streamkern::{name}", self._body, mutates_args=mutates,
                                                 schema=full)
        shape_fn = fake or alloc or (lambda *args: None)
        self.custom_op.register_fake(lambda *args: shape_fn(*args[:-1]))

    def _runner(self, backend_name: str, kernel: Kernel) -> Callable:
        def run(*args):
            if self._values is not None and (backend_name in ("torch", "cpu") or debug_enabled()):
                run_value_check(self._values, args)
            if not kernel.out:
                return kernel.fn(*args)
            out = self._alloc(*args)
            kernel.fn(out, *args)
            return out
        return run

    def _body(self, *args):
        return self.backends(args[-1])(*args[:-1])

    def __call__(self, *args, backend: str | None = None):
        if self._check is not None:
            checked = self._check(*args)
            args = args if checked is None else tuple(checked)
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        name = self.backends.resolve(backend, device, args)
        return self.backends.run(self.custom_op, name, *args)


def define_op(name: str, schema: str, backends: Mapping[str, Callable | Kernel], *, check: Callable | None = None,
              values: Callable | None = None, alloc: Callable | None = None, fake: Callable | None = None,
              missing: Mapping[str, str] | None = None, auto_order: Mapping[str, Sequence[str]] | None = None) -> Op:
    """Declare op ``streamkern::<name>``.

    Args:
        schema: the op's ``torch.library`` schema without the backend, e.g.
            ``"(Tensor(a!) cache, Tensor x, int n) -> ()"``; ``Tensor(a!)`` marks the arguments it mutates.
        backends: backend name -> implementation (a callable returning the outputs, or a :class:`Kernel`).
        check: ``check(*args)`` raises ``TypeError``/``ValueError`` naming a bad argument; it returns ``None``,
            or the arguments normalised (a tuple of them all), which every backend then receives.
        values: ``values(*args)`` checks values held in tensors (index ranges, token ids) and may read them: it
            runs before the ``"torch"`` and ``"cpu"`` backends, and before the GPU ones only with
            ``STREAMKERN_DEBUG=1``; never while the tensors' device is being captured in a CUDA graph (the read
            would invalidate the capture; the eager warm-up call before it checked). The host-sync counter
            (``streamkern.capture``) books its reads as checks.
        alloc: ``alloc(*args)`` allocates the outputs that ``out=True`` kernels fill (also the fake kernel).
        fake: the fake (meta) kernel when it differs from ``alloc``; mutating ops without outputs need neither.
        missing: backend -> why this op has no such implementation.
        auto_order: device type -> the order in which ``"auto"`` tries this op's backends there, where
            measurements show it differs from the default (``"cuda"`` before ``"triton"`` on CUDA tensors);
            declared in the op's module with the figures that justify it.
    """
    return Op(name, schema, backends, check=check, values=values, alloc=alloc, fake=fake, missing=missing,
              auto_order=auto_order)

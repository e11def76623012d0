"""The parity metric of docs/contract.md §3, a kernel-launch counter and Triton's specialisation of a launch, shared by
the tests, the benchmarks and the demo."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Callable

import torch

# Largest relative error allowed for outputs computed from inputs of each dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.uint8: 1e-5,
             torch.float64: 1e-12}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 on the CPU; NaN or Inf anywhere in ``out`` gives ``inf``.
    A zero reference compares the absolute norm instead."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"out: expected shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return num / den if den > 0 else num


def assert_parity(out: torch.Tensor, ref: torch.Tensor, input_dtype: torch.dtype, what: str = "output") -> float:
    """Fail unless ``rel_error(out, ref)`` is under the tolerance for ``input_dtype``; returns the error."""
    err = rel_error(out, ref)
    tol = TOLERANCE[input_dtype]
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} ({input_dtype})"
    return err


# Operators that allocate, alias or only forward to other operators: never a kernel of their own.
_NO_KERNEL = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::new_empty", "aten::new_empty_strided",
    "aten::as_strided", "aten::view", "aten::reshape", "aten::_reshape_alias", "aten::alias", "aten::detach",
    "aten::lift_fresh", "aten::t", "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::slice",
    "aten::select", "aten::permute", "aten::transpose", "aten::flatten", "aten::unflatten", "aten::resize_",
    "aten::scalar_tensor", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::result_type",
})


def _launches(event) -> list[str]:
    """The names of the launches under one CPU profiler event (see :func:`launch_names`)."""
    if event.name.startswith("triton::"):
        return [event.name]
    inner = [name for child in event.cpu_children for name in _launches(child)]
    if inner or event.name in _NO_KERNEL or "::" not in event.name:
        return inner
    return [event.name]


@contextlib.contextmanager
def triton_launches_wrapped(wrap: Callable):
    """While active, every Triton launch ``kernel[grid](*args, **kwargs)`` runs as
    ``wrap(kernel, launch, args, kwargs)``, where ``launch(*args, **kwargs)`` is the launch itself (nothing happens
    without triton)."""
    try:
        from triton.runtime.jit import KernelInterface
    except ImportError:
        yield
        return
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        launch = original(self, grid)
        return lambda *args, **kwargs: wrap(self, launch, args, kwargs)

    KernelInterface.__getitem__ = getitem
    try:
        yield
    finally:
        KernelInterface.__getitem__ = original


_BINDERS: dict = {}


def _binder(kernel, honour_do_not_specialize: bool):
    """Triton's own argument binder for ``kernel`` (the function its JIT builds to specialise a launch), made from
    the kernel's signature and ``do_not_specialize`` lists whether ``triton.jit`` gave a JITFunction or, under
    ``TRITON_INTERPRET=1``, an InterpretedFunction (which keeps the lists in ``kwargs``)."""
    cached = _BINDERS.get((kernel, honour_do_not_specialize))
    if cached is not None:
        return cached
    import inspect

    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import KernelParam, create_function_from_signature

    lists = getattr(kernel, "kwargs", None) or vars(kernel)
    dns = set(lists.get("do_not_specialize") or ()) if honour_do_not_specialize else set()
    dns_oa = set(lists.get("do_not_specialize_on_alignment") or ()) if honour_do_not_specialize else set()
    signature = inspect.signature(kernel.fn)
    params = [KernelParam(i, p, i in dns or p.name in dns, i in dns_oa or p.name in dns_oa)
              for i, p in enumerate(signature.parameters.values())]
    binder = _BINDERS[(kernel, honour_do_not_specialize)] = create_function_from_signature(signature, params,
                                                                                            BaseBackend)
    return binder


def triton_specialisation(kernel, args: tuple, kwargs: dict, *,
                          honour_do_not_specialize: bool = True) -> tuple[list, dict]:
    """``(specialisation, options)`` of the launch ``kernel[grid](*args, **kwargs)`` as Triton's JIT computes them
    on a GPU to look up (or else compile) its kernel: per parameter ``(type, key)`` — ``("constexpr", value)`` for
    constexpr parameters, None and ints equal to 1; ``("i32", "D")`` for an int divisible by 16 and ``("*fp32",
    "D")`` for a 16-byte aligned pointer, ``""`` otherwise, ``None`` where ``do_not_specialize`` drops the key; floats
    ``("fp32", None)``, bools ``("u1", None)`` — and the launch options (``num_warps``, ``num_stages``). Two
    launches of a kernel share a compiled binary exactly when both are equal (Triton's cache key is
    ``str(specialisation) + str(options)``).

    Computed by Triton's own binder (``create_function_from_signature`` over ``native_specialize_impl``, the same
    in triton 3.6 and 3.9) on the actual arguments, so it also works under ``TRITON_INTERPRET=1``, where nothing
    is compiled. ``honour_do_not_specialize=False``: as if the kernel had no ``do_not_specialize`` /
    ``do_not_specialize_on_alignment`` lists (what they save is the difference)."""
    _, specialisation, options = _binder(kernel, honour_do_not_specialize)(*args, **kwargs)
    return specialisation, options


def _in_profiler_range(kernel, launch, args, kwargs):
    """A Triton launch inside a ``triton::<kernel>`` profiler range (the interpreter's own tensor work inside it is
    then not counted)."""
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    with torch.profiler.record_function(f"triton::{name}"):
        return launch(*args, **kwargs)


@contextlib.contextmanager
def _stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def launch_names(fn: Callable, *args, device: torch.device | str = "cpu", warmup: bool = False,
                 **kwargs) -> list[str]:
    """The kernel launches made by one call ``fn(*args, **kwargs)``, by name, in the order recorded.

    On CUDA: the device activities the profiler records (kernels, memsets, copies), not the device-side spans of
    ``record_function`` ranges (user annotations: a range around a kernel is recorded as one more device event,
    which made the H200 run of 2026-12-04 count 2 per Triton launch). On CPU: the operator calls that do work (the
    innermost ATen and extension operators, not allocations, views or operators that only forward to others) plus
    Triton launches (``triton::<kernel>`` ranges, under the interpreter). The CPU count stands for
    what the same code launches on a GPU; a scalar conversion inside an operator can make it differ by one.

    ``warmup=True`` makes one unprofiled call first, so that what is counted is a steady-state call: the first call
    of a freshly specialised Triton kernel compiles and loads it, and the device tables of the launchers and the
    drift gate's counter are made then. "Launches per call" means a call after that first one."""
    device = torch.device(device)
    if warmup:
        fn(*args, **kwargs)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    prof = torch.profiler.profile(activities=activities)
    ranges = triton_launches_wrapped(_in_profiler_range) if device.type == "cpu" else contextlib.nullcontext()
    with ranges:
        with _stderr_silenced():                      # the profiler's start/stop log lines
            prof.__enter__()
        try:
            fn(*args, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            with _stderr_silenced():
                prof.__exit__(None, None, None)
    events = prof.events()
    if device.type == "cuda":   # a record_function range around kernels is a device event too: not a launch
        return [e.name for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                and not getattr(e, "is_user_annotation", False)]
    return [name for e in events if e.cpu_parent is None for name in _launches(e)]


def count_launches(fn: Callable, *args, device: torch.device | str = "cpu", warmup: bool = False, **kwargs) -> int:
    """How many kernel launches one call ``fn(*args, **kwargs)`` makes: ``len(launch_names(...))``."""
    return len(launch_names(fn, *args, device=device, warmup=warmup, **kwargs))

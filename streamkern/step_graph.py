"""Capture one step of a pipeline and replay it: a CUDA graph on CUDA, a recorded op replay on CPU.

``graph = StepGraph(step, device)`` captures ``step()`` (a callable without arguments) and runs it once;
``graph.replay()`` runs the captured step again and returns ``graph.outputs``, the tensors the capture returned,
overwritten in place. Whatever the step computes from host values (Python ints, shapes, which ops it launches) is
frozen at capture, so a step is replayable when, in steady state, every value that changes from step to step lives
in a device tensor updated in place (a write cursor, a block counter) and state carried between steps stays in the
same tensors (``buf.copy_(new)``, never an attribute rebound to a fresh tensor). Inputs are static buffers the
caller refills in place before each replay.

* **CUDA**: a ``torch.cuda.CUDAGraph`` captured on a side stream. Warm-up is the caller's: run the step eagerly
  first (cuBLAS handles, Triton compilation, the constant tables of ``kernels/_constants.py`` are made then).
  ``generators`` are the ``torch.Generator`` objects the step draws from; the graph advances them on each replay.
* **CPU**: the same contract, kept by a recorder (a ``TorchDispatchMode``). Every aten op, streamkern op and
  Triton launch the step makes is recorded with its arguments; ``replay()`` calls exactly those ops on exactly
  those tensors and copies each newly allocated result into the tensor the capture produced (the stand-in for a
  graph's private memory). It proves on a machine without a GPU that a step obeys the rules above: a host int
  that should have been a device counter, or a rebound state tensor, makes the replay differ from eager. A host
  read inside the step (``.item()``, ``bool(t)``, ``torch.equal``) raises :class:`CaptureError`, as a CUDA capture
  fails; the value checks of the ``"torch"``/``"cpu"`` backends may read at capture and are not replayed. An op
  whose output shape depends on values (``nonzero``) raises at replay.

:func:`device_branch` is the one data-dependent branch a step may take: eagerly it reads its predicate once
(a declared host read); under a capture both bodies are captured and the device chooses at each replay (CUDA
conditional nodes, which need CUDA 12.4 or newer; on CPU both bodies are recorded and the writes of the one not
taken are undone). :func:`conditional_nodes_supported` says whether this torch can capture them.

A capturing :class:`StepGraph` enters ``streamkern.capture.capture_scope`` (each graph owns the ``CUDAGraph`` or
the CPU recorder it captures into), so :func:`device_branch` needs no lookup of torch's current graph, and
``streamkern.capture.capturing`` tells the ops (device tables, the drift gate's counter) that a capture is running.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_leaves, tree_structure
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .capture import capture_scope, capturing, checking_values, count_host_syncs, host_read, innermost_capture

__all__ = ["CaptureError", "StepGraph", "conditional_nodes_supported", "device_branch"]


class CaptureError(RuntimeError):
    """A captured step did something a graph cannot replay (a host read, a data-dependent shape)."""


@dataclass
class _Call:
    """One recorded op: ``func(*args, **kwargs)`` gave ``out`` at capture."""

    func: Callable
    args: tuple
    kwargs: dict
    out: Any

    def replay(self) -> None:
        res = self.func(*self.args, **self.kwargs)
        for rec, new in zip(tree_leaves(self.out), tree_leaves(res)):
            if not isinstance(rec, torch.Tensor) or _same_storage(rec, new):
                continue   # an in-place op or a view: it already wrote or aliases the captured tensor
            if new.shape != rec.shape:
                raise CaptureError(f"StepGraph.replay: {_name(self.func)} returned shape {list(new.shape)}, at "
                                   f"capture {list(rec.shape)}: an output shape that depends on values cannot be "
                                   f"replayed")
            rec.copy_(new)


@dataclass
class _Branch:
    """A recorded :func:`device_branch`: the ops of each body; the false body ends with the copy of its outputs
    into the true body's."""

    pred: torch.Tensor
    if_true: list
    if_false: list

    def replay(self) -> None:
        for call in self.if_true if bool(torch._C.TensorBase.item(self.pred)) else self.if_false:
            call.replay()


def _same_storage(a: torch.Tensor, b) -> bool:
    return isinstance(b, torch.Tensor) and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _name(func) -> str:
    return str(func) if isinstance(func, torch._ops.OpOverload) else getattr(func, "__name__", str(func))


def _written(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors ``func`` may write: its schema's ``Tensor(a!)`` arguments; every tensor argument of an op
    without a schema (a Triton launch)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    written = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        written += [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return written


# ops that return host values computed from tensor metadata alone (a CUDA capture allows them)
_LAYOUT_OPS = frozenset({torch.ops.aten._fused_sdp_choice.default})


class _Recorder(TorchDispatchMode):
    """Records the ops of a step on CPU tensors (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.supports_higher_order_operators = True
        self.calls: list = []
        self._undo: list[tuple[torch.Tensor, torch.Tensor]] | None = None   # (tensor, its value before) when dry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._undo is not None:
            self._undo += [(t, t.clone()) for t in _written(func, args, kwargs)]
        out = func(*args, **kwargs)
        if func in _LAYOUT_OPS:
            return out   # decided from sizes, strides and dtypes (no value read), the same at every replay
        if out is not None and not isinstance(out, (torch.Tensor, list, tuple)):
            if checking_values():
                return out   # an op's value check reads at capture; it is not replayed
            raise CaptureError(f"StepGraph: {_name(func)} reads a tensor value on the host inside a captured step "
                               f"(a CUDA capture fails the same way); keep the decision on the device")
        self.calls.append(_Call(func, args, kwargs, out))
        return out

    def branch(self, pred: torch.Tensor, if_true: Callable, if_false: Callable):
        with _disable_current_modes():
            taken = bool(torch._C.TensorBase.item(pred))
        outer, bodies = self.calls, []

        @contextlib.contextmanager
        def recording(is_true: bool):
            """Record one body apart; the writes of the body not taken are undone after it."""
            self.calls, self._undo = [], (None if is_true == taken else [])
            try:
                yield
            finally:
                undo, self._undo = self._undo, None
                bodies.append(self.calls)
                self.calls = outer
                with _disable_current_modes():
                    for t, before in reversed(undo or []):
                        t.copy_(before)

        out = _both_bodies(if_true, if_false, recording)
        self.calls.append(_Branch(pred, *bodies))
        return out

    def replay(self) -> None:
        with _disable_current_modes(), torch.no_grad():   # a graph replays kernels, no autograd record
            for call in self.calls:
                call.replay()


def _check_same_outputs(a, b) -> None:
    if tree_structure(a) != tree_structure(b):
        raise ValueError("device_branch: if_true and if_false must return the same structure of tensors")
    for i, (x, y) in enumerate(zip(tree_leaves(a), tree_leaves(b))):
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            raise ValueError(f"device_branch: output {i} must be a tensor in both bodies, got {type(x).__name__} "
                             f"and {type(y).__name__}")
        if x.shape != y.shape or x.dtype != y.dtype:
            raise ValueError(f"device_branch: output {i} is {x.dtype} {list(x.shape)} in if_true but {y.dtype} "
                             f"{list(y.shape)} in if_false")


_CONDITIONAL_API = ("begin_capture_to_if_node", "end_capture_to_conditional_node")


def conditional_nodes_supported() -> str:
    """``""`` when :func:`device_branch` can capture CUDA conditional nodes with this torch, else why not: it needs
    ``torch.cuda.CUDAGraph.begin_capture_to_if_node`` / ``end_capture_to_conditional_node`` (torch 2.13 has them)
    and CUDA 12.4 or newer, and the message names the torch and CUDA installed."""
    cuda = torch.version.cuda
    installed = f"installed: torch {torch.__version__}, CUDA {cuda or 'none (a CPU build)'}"
    missing = [name for name in _CONDITIONAL_API if not hasattr(torch.cuda.CUDAGraph, name)]
    if missing:
        return (f"device_branch under a CUDA capture needs CUDA graph conditional nodes: a torch whose "
                f"torch.cuda.CUDAGraph has {' and '.join(_CONDITIONAL_API)} (torch 2.13 has them) and CUDA 12.4 or "
                f"newer; {installed}, whose CUDAGraph lacks {' and '.join(missing)}")
    if cuda is None or tuple(int(x) for x in cuda.split(".")[:2]) < (12, 4):
        return f"device_branch under a CUDA capture needs CUDA 12.4 or newer (conditional nodes); {installed}"
    return ""


class StepGraph:
    """``StepGraph(step, device, generators=(), warmup=0)``: ``warmup`` eager steps, then capture ``step()`` on
    ``device`` and run it once.

    Attributes: ``outputs`` (what ``step()`` returned at capture), ``replays`` (how many times it was replayed).
    """

    def __init__(self, step: Callable[[], Any], device, *, generators: Sequence[torch.Generator] = (),
                 warmup: int = 0):
        if not callable(step):
            raise TypeError(f"step: expected a callable without arguments, got {type(step).__name__}")
        if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
            raise ValueError(f"warmup: expected an int >= 0 (eager steps before the capture), got {warmup!r}")
        self.device = torch.device(device)
        if self.device.type not in ("cuda", "cpu"):
            raise ValueError(f"device: expected a cuda or cpu device, got {self.device}")
        self.replays = 0
        _warm_up(step, self.device, warmup)
        if self.device.type == "cuda":
            self._graph = torch.cuda.CUDAGraph()
            for g in generators:
                self._graph.register_generator_state(g)
            capture = torch.cuda.graph(self._graph)
        else:
            self._graph = _Recorder()   # the host-sync guard also sees the reads that bypass dispatch (tolist)
            capture = contextlib.ExitStack()
            capture.enter_context(self._graph)
            capture.enter_context(count_host_syncs(True, CaptureError, "inside a captured step"))
        with capture_scope(self), capture:
            self.outputs = step()
        if self.device.type == "cuda":
            self._graph.replay()

    def replay(self) -> Any:
        """Run the captured step again; returns :attr:`outputs`, overwritten."""
        self._graph.replay()
        self.replays += 1
        return self.outputs


def _warm_up(step: Callable, device: torch.device, n: int) -> None:
    """``n`` eager steps; on CUDA on a side stream, as capture wants (lazy initialisations happen off the
    capturing stream)."""
    if n == 0:
        return
    if device.type != "cuda":
        for _ in range(n):
            step()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(n):
            step()
    torch.cuda.current_stream(device).wait_stream(side)


def device_branch(pred: torch.Tensor, if_true: Callable[[], Any], if_false: Callable[[], Any]) -> Any:
    """``if_true()`` where the 0-d bool tensor ``pred`` holds, else ``if_false()``.

    Eagerly ``pred`` is read once on the host (a declared decision of the pipelines' host-sync counter). Under a
    :class:`StepGraph` capture both bodies are captured, their Python run (true body first), and the device picks
    one at each replay; the result is then ``if_true``'s outputs, into which ``if_false`` copies its own, so both
    bodies must return the same structure of tensors with equal shapes and dtypes."""
    if not isinstance(pred, torch.Tensor) or pred.dtype != torch.bool or pred.dim() != 0:
        got = f"{pred.dtype} of shape {list(pred.shape)}" if isinstance(pred, torch.Tensor) else type(pred).__name__
        raise ValueError(f"pred: expected a 0-d bool tensor, got {got}")
    if capturing(pred.device):
        owner = innermost_capture(pred.device.type)
        if owner is None:
            raise CaptureError("device_branch: a CUDA graph is being captured, but not by a StepGraph; capture the "
                               "step with streamkern.step_graph.StepGraph (the conditional nodes go into its graph)")
        if pred.device.type == "cpu":
            return owner._graph.branch(pred, if_true, if_false)
        return _cuda_branch(owner._graph, pred, if_true, if_false)
    return if_true() if host_read(pred) else if_false()


def _cuda_branch(graph: torch.cuda.CUDAGraph, pred: torch.Tensor, if_true: Callable, if_false: Callable):
    """Both bodies captured into conditional nodes of ``graph`` (two IF nodes, on ``pred`` and on its negation)."""
    why = conditional_nodes_supported()
    if why:
        raise RuntimeError(why)

    @contextlib.contextmanager
    def conditional(is_true: bool):
        graph.begin_capture_to_if_node(pred if is_true else torch.logical_not(pred))
        try:
            yield
        finally:
            graph.end_capture_to_conditional_node()

    return _both_bodies(if_true, if_false, conditional)


def _both_bodies(if_true: Callable, if_false: Callable, around: Callable[[bool], Any]):
    """Run ``if_true`` then ``if_false``, each inside ``around(is_true)``; the false body copies its outputs into
    the true body's, which are returned (the two bodies then share one set of outputs)."""
    outs = []
    for is_true, body in ((True, if_true), (False, if_false)):
        with around(is_true):
            out = body()
            if outs:
                _check_same_outputs(outs[0], out)
                for a, b in zip(tree_leaves(outs[0]), tree_leaves(out)):
                    a.copy_(b)
            outs.append(out)
    return outs[0]

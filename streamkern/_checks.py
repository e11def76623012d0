"""Argument checks shared by every op (docs/contract.md §3).

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong rank, shape,
device, value) whose message names the argument, the expected and the actual value. Ops run all
their checks before allocating or writing anything.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Iterable, Sequence

import torch

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX = (torch.int64,)


def debug_enabled() -> bool:
    """``STREAMKERN_DEBUG=1``: GPU backends also check values held in tensors (this synchronises)."""
    return os.environ.get("STREAMKERN_DEBUG", "0") == "1"


def dtype_name(dtype: torch.dtype) -> str:
    """``float32`` for ``torch.float32``."""
    return str(dtype).replace("torch.", "")


def _dt(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(dtype_name(d) for d in dtypes)


def tensor(name: str, t, *, ndim: int | Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None,
           device: torch.device | None = None) -> torch.Tensor:
    """``t`` is a tensor of one of ``dtypes``, of rank ``ndim`` (or one of several), on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        ranks = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in ranks:
            want = " or ".join(str(r) for r in ranks)
            raise ValueError(f"{name}: expected a {want}-d tensor, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_dt(dtypes)}, got {dtype_name(t.dtype)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got one on {t.device}")
    return t


def shape(name: str, t: torch.Tensor, expected: Sequence[int | None], what: Sequence[str] | None = None) -> None:
    """``t.shape`` equals ``expected`` (``None`` matches any size); ``what`` names each dimension."""
    if t.dim() != len(expected) or any(e is not None and e != s for e, s in zip(expected, t.shape)):
        want = ", ".join("*" if e is None else str(e) for e in expected)
        dims = f" ({', '.join(what)})" if what else ""
        raise ValueError(f"{name}: expected shape [{want}]{dims}, got {list(t.shape)}")


def gate(name: str, g: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """A per-row gate: None, or a bool tensor ``[]`` or ``[batch]``, returned expanded to ``[batch]``."""
    if g is None:
        return None
    tensor(name, g, ndim=(0, 1))
    if g.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype bool, got {dtype_name(g.dtype)}")
    if g.dim() == 1:
        shape(name, g, (batch,), ("B",))
    return g.expand(batch)


def _same(what: str, error: type, tensors: dict, message):
    """The ``what`` (``device`` / ``dtype``) shared by every tensor that is not None; ``error`` names the first
    tensor that differs from the first one, with ``message(expected, first name, got)``."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first = getattr(items[0][1], what)
    for k, v in items[1:]:
        if getattr(v, what) != first:
            raise error(f"{k}: {message(first, items[0][0], getattr(v, what))}")
    return first


def same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors live on one device; returns it."""
    return _same("device", ValueError, tensors, lambda want, like, got: f"expected a tensor on {want} like {like}, "
                                                                         f"got one on {got}")


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All tensors share one dtype; returns it."""
    return _same("dtype", TypeError, tensors, lambda want, like, got: f"expected dtype {dtype_name(want)} like "
                                                                        f"{like}, got {dtype_name(got)}")


def integer(name: str, value, *, low: int | None = None, high: int | None = None) -> int:
    """A Python int (not bool) with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{name}: expected an int in [{lo}, {hi}], got {value}")
    return value


def number(name: str, value, *, low: float | None = None, high: float | None = None,
           open_low: bool = False) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``open_low``): NaN and ±inf are rejected
    (README "Error rules": a non-finite scalar argument makes no sense for any op)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__} {value!r}")
    value = float(value) if not isinstance(value, int) or abs(value) < 2 ** 1023 else math.inf
    bad_low = low is not None and (value <= low if open_low else value < low)
    if not math.isfinite(value) or bad_low or (high is not None and value > high):
        lo = "-inf" if low is None else low
        raise ValueError(f"{name}: expected a finite number in {'(' if open_low else '['}{lo}, "
                         f"{'inf' if high is None else high}], got {value}")
    return value


def int_tuple(name: str, values, *, length: int | None = None, low: int | None = None,
              high: int | None = None) -> tuple[int, ...]:
    """A sequence of ints, each in ``[low, high]``, of ``length`` if given."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of ints, got {type(values).__name__}")
    out = tuple(values)
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} values, got {len(out)}: {out}")
    for i, v in enumerate(out):
        integer(f"{name}[{i}]", v, low=low, high=high)
    return out


def float_tuple(name: str, values, *, length: int | None = None) -> tuple[float, ...]:
    """A sequence of finite numbers, of ``length`` if given."""
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}: expected a sequence of numbers, got {type(values).__name__}")
    out = tuple(values)
    if length is not None and len(out) != length:
        raise ValueError(f"{name}: expected {length} values, got {len(out)}: {out}")
    return tuple(number(f"{name}[{i}]", v) for i, v in enumerate(out))


def index_range(name: str, idx: torch.Tensor, size: int) -> None:
    """Every value of ``idx`` lies in ``[0, size)``. Reads the tensor: call only where a sync is allowed."""
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
        raise ValueError(f"{name}: expected values in [0, {size}), got min {int(idx.min())}, max {int(idx.max())}")


def rows_contiguous(name: str, t: torch.Tensor) -> None:
    """The last two dims ``[H, D]`` of ``t`` are one contiguous run (``stride(-1) == 1``, ``stride(-2) == D``;
    size-1 dims may have any stride), so that each token's ``H * D`` values can be copied as one row."""
    H, D = t.shape[-2], t.shape[-1]
    if (D > 1 and t.stride(-1) != 1) or (H > 1 and t.stride(-2) != D):
        raise ValueError(f"{name}: expected the last two dims [H, D] contiguous (strides ({D}, 1)), "
                         f"got strides {tuple(t.stride()[-2:])}")


# --- memory overlap (issue 11 item 2) ---------------------------------------------------------------------------
# A strided tensor covers ``runs``: equal byte intervals ``[start, start + run)`` where ``run`` is its innermost
# contiguous block. Exact tests below enumerate the runs (on the host, from sizes and strides only; no tensor value
# is read), so they are used only when the cheap stride and extent tests cannot decide.
_MAX_RUNS = 1 << 24


def _layout(t: torch.Tensor, drop_broadcast: bool) -> list[tuple[int, int]]:
    """``(size, stride)`` of the dims that move through memory, smallest stride first (size-1 dims dropped, and
    stride-0 dims with ``drop_broadcast``: they repeat elements already counted)."""
    dims = [(n, s) for n, s in zip(t.shape, t.stride()) if n > 1 and not (drop_broadcast and s == 0)]
    return sorted(dims, key=lambda d: d[1])


def _runs(name: str, t: torch.Tensor, drop_broadcast: bool) -> tuple[torch.Tensor, int]:
    """Sorted byte starts (relative to ``t``'s first element) and byte length of ``t``'s contiguous runs."""
    dims, run = _layout(t, drop_broadcast), 1
    while dims and dims[0][1] == run:
        run *= dims.pop(0)[0]
    count = 1
    for n, _ in dims:
        count *= n
    if count > _MAX_RUNS:
        raise ValueError(f"{name}: cannot verify that a tensor with strides {tuple(t.stride())} and shape "
                         f"{list(t.shape)} does not overlap in memory ({count} separate runs); pass a copy")
    starts = torch.zeros((), dtype=torch.int64, device="cpu")
    for n, s in dims:
        starts = (starts.unsqueeze(-1) + torch.arange(n, dtype=torch.int64, device="cpu") * s).reshape(-1)
    return starts.reshape(-1).sort().values * t.element_size(), run * t.element_size()


def _addressable(t: torch.Tensor) -> bool:
    return t.device.type != "meta" and type(t) is torch.Tensor


def _extent(t: torch.Tensor) -> tuple[object, int, int]:
    """``(memory, first byte, one past the last byte)`` that ``t`` can touch; ``memory`` identifies the address
    space (the device for real tensors, whose data pointers are absolute; the storage for meta and fake ones)."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    if _addressable(t):
        memory, first = t.device, t.data_ptr()
    else:
        memory, first = (t.device, t.untyped_storage()._cdata), t.storage_offset() * t.element_size()
    return memory, first, first + span * t.element_size()


_LAYOUT_READS = [0]


@contextlib.contextmanager
def layout_read():
    """Marks a host read of a tensor the checks built on the host from sizes and strides (never from data): the
    host-sync counter of ``streamkern.pipelines`` books it as a check, not as a read of the device."""
    _LAYOUT_READS[0] += 1
    try:
        yield
    finally:
        _LAYOUT_READS[0] -= 1


def reading_layout() -> bool:
    return _LAYOUT_READS[0] > 0


def no_internal_overlap(name: str, t: torch.Tensor) -> None:
    """Two elements of ``t`` never share memory (so writing ``t`` is well defined): ValueError naming ``name``
    otherwise, e.g. for a cache ``expand``ed with stride 0. Decided from sizes and strides alone where possible
    (a stride-0 dim overlaps, as torch's ``_debug_has_internal_overlap`` says; strides that each exceed the extent
    of all smaller ones do not), else exactly from the runs. Plain Python on sizes and strides, so torch.compile
    traces it; only the exact fallback, for exotic ``as_strided`` layouts, is skipped while tracing."""
    dims = _layout(t, drop_broadcast=False)
    overlap = t.numel() > 1 and any(s == 0 for _, s in dims)
    if not overlap and t.numel() > 1:
        span = 0
        for n, s in dims:
            if s <= span:
                break
            span += (n - 1) * s
        else:
            return
        if torch.compiler.is_compiling():
            return
        starts, run = _runs(name, t, drop_broadcast=False)
        with layout_read():
            overlap = bool((starts[1:] - starts[:-1] < run).any())
    if overlap:
        raise ValueError(f"{name}: expected a tensor whose elements do not share memory (it is written), got shape "
                         f"{list(t.shape)} with strides {tuple(t.stride())} (an expand()ed or as_strided view?); "
                         f"pass a .contiguous() copy")


def no_overlap(out_name: str, out: torch.Tensor, **inputs: torch.Tensor | None) -> None:
    """No input shares memory with the output ``out`` (partial overlap included): ValueError naming the input
    otherwise. ``None`` inputs are skipped. Exact: disjoint memory or byte extents decide at once; otherwise the
    runs of ``out`` and the input are compared. Skipped while torch.compile traces (fake tensors have no
    addresses), like the exact part of ``no_internal_overlap``."""
    if out.numel() == 0 or torch.compiler.is_compiling():
        return
    mem, lo, hi = _extent(out)
    out_runs = None
    for name, t in inputs.items():
        if t is None or t.numel() == 0:
            continue
        t_mem, t_lo, t_hi = _extent(t)
        if t_mem != mem or t_hi <= lo or hi <= t_lo:
            continue
        if out_runs is None:
            out_runs = _runs(out_name, out, drop_broadcast=True)
        starts, run = out_runs
        t_starts, t_run = _runs(name, t, drop_broadcast=True)
        t_starts = t_starts + (t_lo - lo)
        last = torch.searchsorted(starts, t_starts + t_run) - 1  # out's last run starting before each input run ends
        hit = (last >= 0) & (starts[last.clamp(min=0)] + run > t_starts)
        with layout_read():
            overlapping = bool(hit.any())
        if overlapping:
            raise ValueError(f"{name}: expected a tensor that does not share memory with {out_name} (which is "
                             f"written), got an overlapping view; pass a copy (.clone())")

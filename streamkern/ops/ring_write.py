"""Ring-buffer KV window with attention sinks (seeds 000 §2, 001; docs/contract.md §4.2).

``KVRing`` keeps ``[NL, B, sink + window, H, D]`` keys and values. The first ``sink`` tokens ever appended stay in
slots ``[0, sink)``; the n-th later token goes to slot ``sink + n mod window``, overwriting the oldest when full.
``ring_write`` is the kernel under ``append``: one launch writes k and v of every layer, only the new tokens.
The eager cat-and-slice caches of the source pipelines are in ``streamkern/ops/reference/ring_write.py``.

CUDA graphs: a host int ``start`` is baked into a captured launch, so every replay writes the same slots. With
``KVRing(..., device_cursor=True)`` the ring keeps its write cursor in an int64 device tensor and passes the start
slot to ``ring_write`` as a device tensor (the op ``ring_write_at``): a captured ``append`` advances the ring on
every replay.
"""
from __future__ import annotations

import threading

import torch

from .. import _checks as check
from .._backend import cxx, define_op, triton
from .reference import ring_write as ref


def _check_storage(k, v, sink, names=("cache_k", "cache_v")) -> None:
    """What ring storage must be (``names``: how the caller calls ``k`` and ``v``): ``[NL, B, S, H, D]`` k and v of
    one shape, float dtype and device, each token's ``[H, D]`` contiguous, neither overlapping itself nor the
    other, ``0 <= sink < S``."""
    nk, nv = names
    for name, t in ((nk, k), (nv, v)):
        check.tensor(name, t, ndim=5, dtypes=check.FLOATS)
    check.same_device(**{nk: k, nv: v})
    check.same_dtype(**{nk: k, nv: v})
    check.shape(nv, v, tuple(k.shape), ("NL", "B", "sink+window", "H", "D"))
    for name, t in ((nk, k), (nv, v)):
        check.rows_contiguous(name, t)
        check.no_internal_overlap(name, t)
    check.no_overlap(nk, k, **{nv: v})
    check.integer("sink", sink, low=0, high=k.shape[2] - 1)


def _check(cache_k, cache_v, k_new, v_new, start, sink):
    _check_storage(cache_k, cache_v, sink)
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check.tensor(name, t, ndim=5, dtypes=check.FLOATS)
    check.same_device(cache_k=cache_k, k_new=k_new, v_new=v_new)
    check.same_dtype(cache_k=cache_k, k_new=k_new, v_new=v_new)
    NL, B, S, H, D = cache_k.shape
    check.shape("k_new", k_new, (NL, B, None, H, D), ("NL", "B", "T", "H", "D"))
    check.shape("v_new", v_new, tuple(k_new.shape), ("NL", "B", "T", "H", "D"))
    if isinstance(start, torch.Tensor):
        check.tensor("start", start, ndim=0, dtypes=check.INDEX)
        check.same_device(cache_k=cache_k, start=start)
    else:
        check.integer("start", start, low=0, high=S - 1)
    window = S - sink
    if k_new.shape[2] > window:
        raise ValueError(f"k_new: expected at most window={window} new tokens (dim 2), got {k_new.shape[2]}")
    slot = start if isinstance(start, torch.Tensor) else None
    check.no_overlap("cache_k", cache_k, k_new=k_new, v_new=v_new, start=slot)
    check.no_overlap("cache_v", cache_v, k_new=k_new, v_new=v_new, start=slot)


def _start_values(cache_k, cache_v, k_new, v_new, start, sink):
    check.index_range("start", start, cache_k.shape[2])


ring_write_op = define_op(
    "ring_write", "(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, int start, int sink) -> ()",
    {"torch": ref.ring_write, "cpu": cxx("ring_write_"), "triton": triton("ring_write:ring_write"),
     "cuda": cxx("ring_write_")}, check=_check)
# The same copy with ``start`` an int64 [] device tensor read by the kernel (capture-safe for CUDA graphs).
ring_write_at_op = define_op(
    "ring_write_at",
    "(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, Tensor start, int sink) -> ()",
    {"torch": ref.ring_write, "cpu": cxx("ring_write_at_"), "triton": triton("ring_write:ring_write"),
     "cuda": cxx("ring_write_at_")}, check=_check,
    values=_start_values)


def ring_write(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
               start: int, *, sink: int = 0, backend: str | None = None) -> None:
    """Write ``T`` new tokens of every layer into the ring caches, in place, in one launch.

    Args:
        cache_k, cache_v: ``[NL, B, S, H, D]`` ring storage, ``S = sink + window`` (fp32/fp16/bf16); any strides
            over ``NL, B, S`` but each token's ``[H, D]`` block contiguous (``stride(-1) == 1``,
            ``stride(-2) == D``).
        k_new, v_new: ``[NL, B, T, H, D]``, ``0 <= T <= window``, same dtype, any strides.
        start: host int in ``[0, S)``, the slot of the first new token. New token ``i`` goes to slot
            ``start + i`` while that is ``< S``, else to ``start + i - window``: consecutive slots, wrapping
            from the end of the cache back to slot ``sink`` (the sink slots ``[0, sink)`` are never wrapped into).
            Or an int64 ``[]`` tensor on the caches' device, read by the kernel (capture-safe for CUDA graphs);
            its range is checked on ``"torch"``/``"cpu"`` (GPU backends: with ``STREAMKERN_DEBUG=1``; out of
            range, they write nothing).
        sink: number of sink slots at the front of the cache, ``0 <= sink < S``.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Only the ``T`` new tokens are read and written; every other slot is left bit-identical. The caches must not
    overlap themselves (no ``expand``ed dims) nor each other, and no new token may share memory with a cache (e.g.
    ``k_new = cache_k[:, :, 0:3]``): ``ValueError`` naming the argument, nothing written.
    """
    op = ring_write_at_op if isinstance(start, torch.Tensor) else ring_write_op
    op(cache_k, cache_v, k_new, v_new, start, sink, backend=backend)


class KVRing:
    """A stacked ring-buffer KV window with ``sink`` attention sinks.

    ``.k``, ``.v``: ``[NL, B, sink + window, H, D]`` physical storage (zeros until written).
    ``.append(k_new, v_new)``: ``[NL, B, T, H, D]``, ``1 <= T <= window``; one ``ring_write`` launch.
    ``.length``: valid slots, ``min(appended, sink + window)`` (a host int, no sync).
    ``.positions``: ``[sink + window]`` int64 device tensor, the logical index of the token in each slot, -1 if empty.
    ``.ordered()``: ``(k, v)`` of the valid tokens in logical order (sinks first), ``[NL, B, length, H, D]``.
    ``.rewrite(k_new, v_new)``: overwrite the newest ``T`` tokens in place (same slots, the count unchanged).
    ``KVRing.over(k, v, sink=...)``: a ring over storage that exists already (used in place, not copied);
    ``.seek(count)``: take the storage as holding a stream of ``count`` tokens.

    Logical token n sits in slot ``n`` if ``n < sink``, else ``sink + (n - sink) mod window``.

    ``device_cursor=True``: the count of appended tokens also lives on the device (``.cursor``, int64 ``[]``);
    ``append`` computes the start slot from it on the device and advances it there, so an ``append`` captured in a
    CUDA graph writes the next slots on every replay (and ``.positions`` follows the replays). ``.count``,
    ``.length`` and ``ordered()`` count the host's own calls; after replays, ``sync_count()`` reads the cursor back.

    Thread safety: ``append``, ``rewrite``, ``seek``, ``reset`` and ``ordered`` hold a per-ring lock around the
    bookkeeping and the launch, so threads may share a ring (their appends are serialised in some order).
    """

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, window: int, sink: int = 0,
                 dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None, *,
                 device_cursor: bool = False):
        for name, value in (("num_layers", num_layers), ("batch", batch), ("heads", heads),
                            ("head_dim", head_dim)):
            check.integer(name, value, low=1)
        check.integer("window", window, low=1)
        check.integer("sink", sink, low=0)
        if dtype not in check.FLOATS:
            raise TypeError(f"dtype: expected {'/'.join(str(d) for d in check.FLOATS)}, got {dtype}")
        shape = (num_layers, batch, sink + window, heads, head_dim)
        self._hold(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                   sink, backend, device_cursor)

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, *, sink: int = 0, backend: str | None = None,
             device_cursor: bool = False) -> KVRing:
        """A ring whose storage is ``k``, ``v``: ``[NL, B, S, H, D]`` tensors that exist already (e.g. a model's own
        cache, or a view of it), written in place, neither copied nor cleared; ``window = S - sink``.

        ``k`` and ``v`` must be what ``ring_write`` accepts as caches: same shape, dtype (fp32/fp16/bf16) and device,
        each token's ``[H, D]`` contiguous, neither overlapping itself nor the other, and ``0 <= sink < S``
        (``TypeError``/``ValueError`` naming the argument). The ring starts empty (``count = 0``) whatever the
        storage holds; ``seek`` takes it as holding a stream already.
        """
        _check_storage(k, v, sink, names=("k", "v"))
        ring = cls.__new__(cls)
        ring._hold(k, v, sink, backend, device_cursor)
        return ring

    def _hold(self, k: torch.Tensor, v: torch.Tensor, sink: int, backend: str | None, device_cursor: bool) -> None:
        self.k, self.v = k, v
        self.sink, self.window = sink, k.shape[2] - sink
        self.backend = backend
        self.count = 0  # tokens appended so far (host side)
        self.cursor = torch.zeros((), dtype=torch.int64, device=k.device) if device_cursor else None
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.sink + self.window

    @property
    def length(self) -> int:
        return min(self.count, self.size)

    @property
    def positions(self) -> torch.Tensor:
        count = self.count if self.cursor is None else self.cursor
        return ref.ring_positions(count, self.size, self.sink, self.k.device)

    def slot_of(self, n):
        """The slot of logical token ``n`` (a host int, or an int64 tensor: then computed on its device)."""
        if isinstance(n, torch.Tensor):
            return torch.where(n < self.sink, n, self.sink + (n - self.sink).remainder(self.window))
        return n if n < self.sink else self.sink + (n - self.sink) % self.window

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append ``T`` tokens (``1 <= T <= window``) for every layer: one ``ring_write``, no host sync."""
        check.tensor("k_new", k_new, ndim=5)
        T = k_new.shape[2]
        if T < 1:
            raise ValueError(f"k_new: expected 1 <= T <= window={self.window} new tokens (dim 2), got 0")
        with self._lock:
            start = self.slot_of(self.count if self.cursor is None else self.cursor)
            ring_write(self.k, self.v, k_new, v_new, start, sink=self.sink, backend=self.backend)
            if self.cursor is not None:
                self.cursor.add_(T)
            self.count += T

    def rewrite(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Overwrite the newest ``T`` tokens (logical ``[count - T, count)``, ``1 <= T <= min(count, window)``)
        with ``k_new``, ``v_new`` ``[NL, B, T, H, D]``: the slots they were appended to, one ``ring_write``, no host
        sync; the count does not change (e.g. the denoising steps of one streamed block, each writing its keys
        again). With a device cursor the slots come from ``.cursor`` and ``T`` is checked against the host's
        ``.count``."""
        check.tensor("k_new", k_new, ndim=5)
        T = k_new.shape[2]
        with self._lock:
            if not 1 <= T <= min(self.count, self.window):
                raise ValueError(f"k_new: expected 1 <= T <= min(count={self.count}, window={self.window}) tokens "
                                 f"to rewrite (dim 2), got {T}")
            start = self.slot_of((self.count if self.cursor is None else self.cursor) - T)
            ring_write(self.k, self.v, k_new, v_new, start, sink=self.sink, backend=self.backend)

    def seek(self, count: int) -> None:
        """Take the storage as holding a stream of ``count`` appended tokens (token ``n`` in ``slot_of(n)`` for the
        newest ones, as ``count`` appends would have left them; nothing is written): the next ``append`` goes on
        from token ``count``. Sets the device cursor too (a device write, no host sync)."""
        check.integer("count", count, low=0)
        with self._lock:
            if self.cursor is not None:
                self.cursor.fill_(count)
            self.count = count

    def sync_count(self) -> int:
        """Read the device cursor back into ``.count`` (one host sync; for rings advanced by graph replays)."""
        if self.cursor is None:
            raise ValueError("sync_count: this KVRing has no device cursor (construct it with device_cursor=True)")
        with self._lock:
            self.count = int(self.cursor)
            return self.count

    def _ordered_runs(self) -> list[tuple[int, int, int]]:
        sinks = min(self.count, self.sink)
        recent = min(max(self.count - self.sink, 0), self.window)
        runs = [(0, 0, sinks)] if sinks else []
        if recent:
            runs += ref.ring_slices(self.slot_of(self.count - recent), recent, self.size, self.sink)
        return runs

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)`` ``[NL, B, length, H, D]``: sinks, then the window from oldest to newest (a copy)."""
        with self._lock:
            runs = self._ordered_runs()
            return tuple(torch.cat([t[:, :, s:s + n] for s, _, n in runs] or [t[:, :, :0]], dim=2)
                         for t in (self.k, self.v))

    def reset(self) -> None:
        """Forget every token (storage is kept; positions back to -1)."""
        with self._lock:
            if self.cursor is not None:
                self.cursor.zero_()
            self.count = 0

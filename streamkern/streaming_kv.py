"""The streaming memory of a causal video model on one frame-paged pool (docs/contract.md §4.5).

:class:`StreamingKV` lays one :class:`~streamkern.FramePool` out as three fixed regions of pages::

    pages [0, S)            sinks: the first ``sink_frames`` frames ever appended, kept forever
    pages [S, S + W)        the window: a ring of ``window_frames`` slots; the n-th non-sink frame is in slot n mod W
    pages [S + W, S + W + M) the memory bank: ``bank_frames`` slots, filled in slot order (``bank_evict_select``
                            takes the first empty slot), so the valid ones are a prefix

so that everything a dense step attends to is **one contiguous range of pages**: sinks, the whole ring (the current
chunk written into its ring slots before it is attended) and the valid bank prefix. Attention over that range is
one ``[B, n·F, H, D]`` view of the pool, read in place by the device's fastest kernel (:mod:`.view_attention`:
SDPA, cuDNN/flash on GPUs), or by ``frame_attention`` where that measures faster (the ``"cpu"`` backend on CPUs).

Lifecycle of a chunk of ``n`` frames:

1. :meth:`roll` makes room in the window by evicting its oldest frames. With a bank, the evicted frames are offered
   to it the way :class:`~streamkern.pipelines.MemoryBank` does (``select_frame`` scores them on their pages'
   ``k_mean``; the victim slot comes from ``bank_evict_select``) and the kept frame is **copied** into the victim's
   bank page (one ``bank_insert``, every layer, k and v, plus its mean key): once per evicted chunk.
2. :meth:`attend` (per layer, per denoising pass) writes the chunk's keys and values of that layer into the chunk's
   pages (one ``frame_write``; each pass overwrites the last) and attends the query over the range. With ``topk``
   (MemFlow's per-head sparse activation) the bank part is per head: ``frame_topk`` picks the bank pages; the dense
   part (sinks + window) is the view, merged by lse with ``frame_attention`` over the picked pages
   (``attention="sdpa"``), or everything is one ``frame_attention`` call with a per-head table
   (``attention="frame_attention"``).
3. :meth:`append` writes the clean chunk of every layer with one ``frame_write`` and counts it as held.

Where the ring stands lives on the device: ``cursor`` (int64 ``[]``) counts the frames evicted from the window, and
every ring slot (``(cursor + j) mod W``), bank frame id and page table is computed from it there; host ints (sinks
and window frames held, bank slots filled, frames per chunk) only decide shapes, which stop changing once the
window and the bank are full. So no step reads a device value (the ``"torch"``/``"cpu"`` backends' value checks
aside), and a steady-state chunk captured in a CUDA graph (:class:`~streamkern.step_graph.StepGraph`) advances the
ring on every replay.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import _checks as check
from .capture import run_value_check
from .ops.bank_evict_select import bank_evict_select, entity_mask
from .ops.bank_insert import bank_insert
from .ops.consensus_frame_scores import select_frame
from .ops.frame_attention import frame_attention, frame_attention_op
from .ops.frame_write import FramePool
from .ops.frame_topk import frame_topk
from .ops.frame_write import frame_write
from .ops.view_attention import merge_attention, view_attention

ATTENTION = ("auto", "sdpa", "frame_attention")


def view_kernel(device: torch.device | str, backend: str | None = None) -> str:
    """The measured-fastest kernel for dense attention over a contiguous range of pages on ``device``:
    ``"sdpa"`` on GPUs (cuDNN ran MemFlow's step at 1.7× the paged Triton kernel on an H200), ``"frame_attention"``
    on CPUs where it resolves to the ``"cpu"`` backend for ``backend`` (1.14–1.39× SDPA on the 2-core EPYC at
    MemFlow's shapes), else ``"sdpa"``."""
    device = torch.device(device)
    if device.type == "cuda":
        return "sdpa"
    return "frame_attention" if frame_attention_op.backends.resolve(backend, device) == "cpu" else "sdpa"


class StreamingKV:
    """Sinks, a window ring and a memory bank of latent frames on one :class:`FramePool`, laid out so that a dense
    step attends one contiguous range of pages.

    Args:
        num_layers, batch, frame_len, heads, head_dim: the pool's ``NL, B, F, H, D``; one page per latent frame
            (``pool.k/v [NL, B, S + W + M, F, H, D]``).
        sink_frames: ``S >= 0`` frames kept forever (the first ones appended).
        window_frames: ``W >= 1`` most recent non-sink frames, the current chunk's included while it is attended.
        bank_frames: ``M >= 0`` memory slots fed by the frames that leave the window.
        num_entities: ``E``, width of the bank's entity masks (``bank_evict_select``).
        layers, layer_weights: the layers that vote in the consensus score and their weights (default
            ``(0, NL // 2, NL - 1)`` and ``(0.2, 0.3, 0.5)``).
        dtype, device, backend: of the pool; ``backend`` is passed to every op.
        attention: the kernel that reads the contiguous range: ``"sdpa"`` (:func:`view_attention`),
            ``"frame_attention"`` (the paged op, ``backend``'s), or ``"auto"``: :func:`view_kernel` of the device.
        reduce_scores: ``None``, or a function of the ``[B, e]`` float32 consensus scores of the evicted frames
            that returns the scores over every head when this pool holds only some of them (head parallelism:
            :meth:`streamkern.distributed.HeadParallel.reduce_scores`, an all-reduce on the device). The bank keeps
            the argmax of what it returns and records its score, so every rank keeps the same frame.

    State (device tensors unless said): ``pool``; ``sink_pages [S]``, ``window_pages [B, W]`` (ring slot j is page
    ``S + j``), ``bank_pages [B, M]`` (slot i is page ``S + W + i``) int64, fixed; ``bank_valid [M]`` bool,
    ``bank_scores [M]`` float32, ``bank_entities [M, E]`` bool, ``bank_frame_ids [B, M]`` int64 (stream index of the
    frame each slot holds, -1 if empty); ``cursor []`` int64, the frames that left the window (the ring slot of the
    oldest held frame is ``cursor mod W``); host ints ``count`` (frames appended), ``n_sink``, ``n_window`` (frames
    held), ``n_bank`` (bank slots filled), ``n_evicted`` (frames that left the window).

    The host ints count the host's own calls. After a captured chunk is replayed (a graph replay runs no Python),
    ``cursor`` and every device list have advanced while ``count`` and ``n_evicted`` still count the chunk once, at
    capture (``n_sink``, ``n_window`` and ``n_bank`` stay right: a steady-state chunk leaves them unchanged);
    :meth:`sync_count` reads the cursor back into them.
    """

    def __init__(self, num_layers: int, batch: int, frame_len: int, heads: int, head_dim: int, *,
                 sink_frames: int = 0, window_frames: int, bank_frames: int = 0, num_entities: int = 8,
                 layers: Sequence[int] | None = None, layer_weights: Sequence[float] = (0.2, 0.3, 0.5),
                 dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None,
                 attention: str = "auto", reduce_scores: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.S = check.integer("sink_frames", sink_frames, low=0)
        self.W = check.integer("window_frames", window_frames, low=1)
        self.M = check.integer("bank_frames", bank_frames, low=0)
        check.integer("num_entities", num_entities, low=1)
        if attention not in ATTENTION:
            raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
        if reduce_scores is not None and not callable(reduce_scores):
            raise TypeError(f"reduce_scores: expected None or a function of the scores, got "
                            f"{type(reduce_scores).__name__}")
        self.pool = FramePool(num_layers, batch, self.S + self.W + self.M, frame_len, heads, head_dim, dtype=dtype,
                              device=device, backend=backend)
        self.layers = check.int_tuple("layers", (0, num_layers // 2, num_layers - 1) if layers is None else layers,
                                      low=0, high=num_layers - 1)
        self.layer_weights = check.float_tuple("layer_weights", layer_weights, length=len(self.layers))
        self.backend, self.reduce_scores = backend, reduce_scores
        dev = self.pool.k.device
        self.attention = attention if attention != "auto" else view_kernel(dev, backend)
        self.sink_pages = torch.arange(self.S, device=dev)
        self.window_pages = torch.arange(self.S, self.S + self.W, device=dev).repeat(batch, 1)
        self.bank_pages = torch.arange(self.S + self.W, self.S + self.W + self.M, device=dev).repeat(batch, 1)
        self.bank_valid = torch.zeros(self.M, dtype=torch.bool, device=dev)
        self.bank_scores = torch.zeros(self.M, dtype=torch.float32, device=dev)
        self.bank_entities = torch.zeros(self.M, num_entities, dtype=torch.bool, device=dev)
        self.bank_frame_ids = torch.full((batch, self.M), -1, dtype=torch.int64, device=dev)
        self.cursor = torch.zeros((), dtype=torch.int64, device=dev)
        self.count = self.n_sink = self.n_window = self.n_bank = self.n_evicted = 0
        self._tables: dict = {}    # page tables of the current chunk, built once per roll/append

    # --- bookkeeping ---------------------------------------------------------------------------------------------

    def _ring(self, offset: int, n: int) -> torch.Tensor:
        """Ring slots ``[n]`` of the window frames ``offset .. offset + n - 1`` counted from the oldest held one:
        ``(cursor + offset + j) mod W``, on the device."""
        return (self.cursor + torch.arange(offset, offset + n, device=self.cursor.device)) % self.W

    def _split(self, frames: int) -> tuple[int, int]:
        """``(to sinks, to the window)`` of the next ``frames`` frames."""
        to_sink = min(frames, self.S - self.n_sink)
        return to_sink, frames - to_sink

    def _cached(self, key, build):
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = build()
        return table

    def _chunk_pages(self, frames: int) -> torch.Tensor:
        """``[B, frames]`` the pages the next chunk goes to: free sink pages, then the window's next ring slots."""
        def build():
            to_sink, to_window = self._split(frames)
            B = self.window_pages.shape[0]
            ring = self.S + self._ring(self.n_window, to_window)
            return torch.cat([self.sink_pages[self.n_sink:self.n_sink + to_sink], ring]).expand(B, frames)
        return self._cached(("chunk", frames), build)

    def _held(self, staged: int) -> tuple[int, int]:
        """``(sink, window)`` frames attended with ``staged`` frames of the current chunk written."""
        to_sink, to_window = self._split(staged)
        return self.n_sink + to_sink, self.n_window + to_window

    def _dense_pages(self, staged: int, with_bank: bool = True) -> int | None:
        """The length ``n`` of the page range ``[0, n)`` that holds exactly what is attended (sinks, window with
        ``staged`` chunk frames, then the valid bank prefix when ``with_bank``), or None when that is not one range:
        a window that is neither full nor filled from slot 0 (attending after a roll without writing the chunk),
        or bank frames beside a window that is not full."""
        sink, window = self._held(staged)
        bank = self.n_bank if with_bank else 0
        if window == self.W:
            return self.S + self.W + bank
        if bank or (window and self.n_evicted):
            return None
        return sink + window

    # --- the lifecycle -------------------------------------------------------------------------------------------

    def sync_count(self) -> int:
        """Read ``cursor`` back into ``n_evicted`` and ``count`` (one host sync; for chunks advanced by graph
        replays) and return ``count``."""
        self.n_evicted = int(self.cursor)
        self.count = self.n_sink + self.n_window + self.n_evicted
        return self.count

    def roll(self, frames: int, *, text_k: torch.Tensor | None = None, entity_weights: torch.Tensor | None = None,
             entities: Sequence[int] | torch.Tensor = ()) -> int:
        """Make room for the next ``frames`` frames: evict the oldest window frames that would not fit.

        With a bank, the evicted frames are offered to it: ``text_k [NL, B, Ls, H, D]`` and ``entity_weights [Ls]``
        or ``[B, Ls]`` feed ``select_frame`` (scored on the evicted pages' ``k_mean``: a frame's mean key is what
        the consensus score reads), ``entities`` (host ints in ``[0, E)``, or an int64 ``[n]`` tensor on the pool's
        device: ids outside ``[0, E)`` then match no entity, checked only under ``STREAMKERN_DEBUG=1`` since that
        reads them) become the kept frame's entity mask, and the kept frame is copied into the page of the
        ``bank_evict_select`` slot (``bank_insert``, every layer). Returns the number of frames evicted (a host
        int)."""
        check.integer("frames", frames, low=1)
        _, to_window = self._split(frames)
        if to_window > self.W:
            raise ValueError(f"frames: expected at most window_frames={self.W} frames going to the window, got "
                             f"{to_window}")
        evict = max(0, self.n_window + to_window - self.W)
        if evict == 0:
            return 0
        if self.M:
            if text_k is None or entity_weights is None:
                raise ValueError("text_k, entity_weights: expected tensors (the bank scores the evicted frames), "
                                 "got None")
            self._keep(self._ring(0, evict), text_k, entity_weights, self._entity_mask(entities))
            self.n_bank = min(self.n_bank + 1, self.M)
        self.cursor.add_(evict)
        self.n_window -= evict
        self.n_evicted += evict
        self._tables = {}
        return evict

    def _entity_mask(self, entities) -> torch.Tensor:
        """The ``[1, E]`` bool mask of ``entities`` (host ints, range-checked, or an int64 ``[n]`` device tensor)."""
        E, dev = self.bank_entities.shape[1], self.bank_entities.device
        if isinstance(entities, torch.Tensor):
            check.tensor("entities", entities, ndim=1, dtypes=check.INDEX, device=dev)
            if check.debug_enabled():
                run_value_check(check.index_range, ("entities", entities, E))
        else:
            for i, e in enumerate(entities):
                check.integer(f"entities[{i}]", e, low=0, high=E - 1)
        return entity_mask(entities, E, dev)

    def _keep(self, slots: torch.Tensor, text_k, entity_weights, mask: torch.Tensor) -> None:
        """Offer the frames of ring ``slots`` to the bank and copy the kept frame into the victim's bank page."""
        pool, S, W = self.pool, self.S, self.W
        B = self.window_pages.shape[0]
        pages = (S + slots).expand(B, -1)                                                        # [B, e]
        rows = torch.arange(B, device=pages.device)[:, None]
        means = torch.stack([pool.k_mean[layer][rows, pages] for layer in self.layers])          # [nl, B, e, H, D]
        text = torch.stack([text_k[layer] for layer in self.layers]).float()
        best, scores = select_frame(means, text, entity_weights, 1, tuple(range(len(self.layers))),
                                    self.layer_weights, backend=self.backend)
        if self.reduce_scores is not None:   # this pool's heads scored a part of the mean over heads
            scores = self.reduce_scores(scores)
            best = scores.argmax(dim=-1)
        slot = bank_evict_select(self.bank_scores, self.bank_entities, self.bank_valid, backend=self.backend)
        ring = slots.index_select(0, best)                                                       # [B] ring slots
        window = (t[:, :, S:S + W].flatten(2, 3) for t in (pool.k, pool.v))
        bank_k, bank_v = (t[:, :, S + W:].flatten(2, 3) for t in (pool.k, pool.v))
        bank_insert(bank_k, bank_v, *window, ring, slot, pool.frame_len, backend=self.backend)
        slot = slot.reshape(1)
        pool.k_mean[:, rows[:, 0], (S + W + slot).expand(B)] = pool.k_mean[:, rows[:, 0], S + ring]
        self.bank_scores.index_copy_(0, slot, scores.gather(1, best[:, None]).mean().reshape(1))
        self.bank_entities.index_copy_(0, slot, mask)
        self.bank_valid.index_fill_(0, slot, True)
        self.bank_frame_ids.index_copy_(1, slot, self.cursor + (S + best[:, None]))

    def _check_chunk(self, name: str, k: torch.Tensor) -> int:
        """The frames of a chunk of ``k.shape[-3]`` tokens, checked to be whole frames that fit the window."""
        F = self.pool.frame_len
        tokens = k.shape[-3]
        if tokens % F or tokens == 0:
            raise ValueError(f"{name}: expected a positive multiple of frame_len={F} tokens (dim {k.dim() - 3}), "
                             f"got {tokens}")
        n = tokens // F
        _, to_window = self._split(n)
        if self.n_window + to_window > self.W:
            raise ValueError(f"{name}: {to_window} frames do not fit the window ({self.n_window} of {self.W} held);"
                             f" call roll({n}) first")
        return n

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write a clean chunk of ``n`` frames, ``k_new``/``v_new`` ``[NL, B, n·F, H, D]``: the first go to free
        sink pages, the rest to the window's next ring slots (call :meth:`roll` first when the window is full).
        One ``frame_write`` for every layer, k and v (means included)."""
        check.tensor("k_new", k_new, ndim=5)
        n = self._check_chunk("k_new", k_new)
        self.pool.write(k_new, v_new, self._chunk_pages(n))
        to_sink, to_window = self._split(n)
        self.n_sink += to_sink
        self.n_window += to_window
        self.count += n
        self._tables = {}

    # --- attention -----------------------------------------------------------------------------------------------

    def page_table(self, topk: int | None = None, q: torch.Tensor | None = None, layer: int | None = None,
                   staged: int = 0) -> torch.Tensor:
        """The pages attended now, oldest first: ``[B, sinks + window + M]`` (sinks, the window from its oldest
        frame, ``staged`` frames of the current chunk, then the bank slots, -1 where empty) or, with ``topk``,
        ``[B, H, sinks + window + topk]`` whose bank part is ``frame_topk`` of ``q [B, Lq, H, D]`` over the bank's
        pages in ``layer``. Built on the device, once per chunk for the parts that do not depend on the query."""
        def build():
            B = self.window_pages.shape[0]
            sink, window = self._held(staged)
            recent = torch.cat([self.sink_pages[:sink], self.S + self._ring(0, window)]).expand(B, sink + window)
            return recent, torch.cat([recent, self._bank_table()], dim=1)
        recent, shared = self._cached(("table", staged), build)
        if topk is None:
            return shared
        if q is None or layer is None:
            raise ValueError("q, layer: expected the query and its layer to choose the top-k bank frames, got None")
        best = self._bank_topk(q, layer, topk)
        return torch.cat([recent[:, None].expand(-1, best.shape[1], -1), best], dim=2)

    def _bank_topk(self, q: torch.Tensor, layer: int, topk: int) -> torch.Tensor:
        """``[B, H, topk]`` the bank pages whose mean key in ``layer`` best matches each head's mean query (-1 pads)."""
        check.integer("topk", topk, low=0)
        return frame_topk(q, self.pool.k_mean[layer], self._bank_table(), topk, per_head=True, backend=self.backend)

    def _bank_table(self) -> torch.Tensor:
        """``[B, M]`` the bank's pages, -1 where a slot is empty (once per chunk)."""
        return self._cached("bank", lambda: torch.where(self.bank_valid, self.bank_pages, -1))

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor | None = None,
               new_v: torch.Tensor | None = None, *, topk: int | None = None, gate: torch.Tensor | None = None,
               sm_scale: float | None = None, return_lse: bool = False):
        """Attention of ``q [B, Lq, H, D]`` in ``layer`` over sinks, window and bank (all valid slots, or per head
        the ``topk`` best by ``frame_topk``), and the current chunk ``new_k/new_v [B, n·F, H, D]`` (whole frames,
        after :meth:`roll` made room), which is first written into its pages of ``layer``: each call overwrites
        them, :meth:`append` makes them held. ``gate`` bool ``[B]`` or ``[]``: rows whose gate is False give zeros
        (lse -inf). Returns ``out [B, Lq, H, D]`` (and ``lse [B, H, Lq]`` float32)."""
        check.integer("layer", layer, low=0, high=self.pool.k.shape[0] - 1)
        if (new_k is None) != (new_v is None):
            raise ValueError("new_k, new_v: expected both or neither")
        _, B, _, _, H, D = self.pool.k.shape
        check.tensor("q", q, ndim=4)
        check.shape("q", q, (B, None, H, D), ("B", "Lq", "H", "D"))
        gate = check.gate("gate", gate, B)
        if topk is not None:
            check.integer("topk", topk, low=0)
        if sm_scale is not None:
            check.number("sm_scale", sm_scale, low=0.0, open_low=True)
        check.same_device(pool=self.pool.k, q=q, new_k=new_k, new_v=new_v, gate=gate)
        check.same_dtype(pool=self.pool.k, q=q, new_k=new_k, new_v=new_v)
        staged = 0
        if new_k is not None:       # everything is checked before the chunk is written
            check.tensor("new_k", new_k, ndim=4)
            check.shape("new_k", new_k, (B, None, H, D), ("B", "T", "H", "D"))
            check.shape("new_v", new_v, tuple(new_k.shape), ("B", "T", "H", "D"))
            staged = self._check_chunk("new_k", new_k)
            frame_write(self.pool.k[layer:layer + 1], self.pool.v[layer:layer + 1],
                        self.pool.k_mean[layer:layer + 1], new_k[None], new_v[None], self._chunk_pages(staged),
                        backend=self.backend)
        k_pages, v_pages = self.pool.k[layer], self.pool.v[layer]
        dense = self._dense_pages(staged, with_bank=topk is None)
        if self.attention == "sdpa" and dense is not None:
            k, v = k_pages[:, :dense].flatten(1, 2), v_pages[:, :dense].flatten(1, 2)
            if topk is None:
                out, lse = self._gated(view_attention(q, k, v, sm_scale=sm_scale, return_lse=return_lse), gate)
                return (out, lse) if return_lse else out
            picked = self._bank_topk(q, layer, topk)
            out, lse = merge_attention(*view_attention(q, k, v, sm_scale=sm_scale, return_lse=True),
                                       *frame_attention(q, k_pages, v_pages, picked, sm_scale=sm_scale,
                                                        return_lse=True, backend=self.backend))
            out, lse = self._gated((out, lse), gate)
            return (out, lse) if return_lse else out
        if topk is None and dense is not None:
            table = self._cached(("dense", dense), lambda: torch.arange(dense, device=q.device).expand(q.shape[0],
                                                                                                      dense))
        else:
            table = self.page_table(topk, q, layer, staged)
        return frame_attention(q, k_pages, v_pages, table, gate=gate, sm_scale=sm_scale, return_lse=return_lse,
                               backend=self.backend)

    @staticmethod
    def _gated(result, gate: torch.Tensor | None):
        """``(out, lse)`` with the rows whose ``gate [B]`` is False set to 0 and -inf (lse may be None)."""
        out, lse = result if isinstance(result, tuple) else (result, None)
        if gate is None:
            return out, lse
        out = torch.where(gate[:, None, None, None], out, 0.0)
        return out, None if lse is None else torch.where(gate[:, None, None], lse, float("-inf"))

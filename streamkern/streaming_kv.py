"""The streaming memory of a causal video model on one frame-paged pool (DESIGN.md §4.5).

:class:`StreamingKV` keeps three lists of page ids into one :class:`~streamkern.FramePool`, all device tensors:

* ``sink_pages [S]``: the first ``sink_frames`` frames ever appended (pages ``0 .. S-1``, kept forever);
* ``window_pages [B, W]``: a ring of ``window_frames`` slots; the n-th non-sink frame sits in ring slot ``n mod W``;
* ``bank_pages [B, M]``: the ``bank_frames`` memory slots (valid where ``bank_valid``).

Lifecycle of a chunk: :meth:`roll` makes room in the window for the next chunk by evicting its oldest frames; with
a bank, the evicted frames are offered to it the way :class:`~streamkern.pipelines.MemoryBank` does (the consensus
score picks the best evicted frame per row with ``select_frame``, here on the pages' ``k_mean``; the victim slot
comes from ``bank_evict_select``), and the kept frame changes owner by a page-id swap: the bank slot takes the
kept frame's page, the ring slot takes the page the bank slot held (its old frame is dropped and the page is
overwritten by the next chunk). No KV byte moves, where ``bank_insert`` copies a frame. :meth:`attend` runs
``frame_attention`` for one layer over sink ∪ window ∪ bank (all of it, or per head the ``frame_topk`` best bank
frames of the query) ∪ the chunk's own keys; the page table is built on the device. :meth:`append` writes the
clean chunk into its pages with one ``frame_write``.

Where the ring stands lives on the device: ``cursor`` (int64 ``[]``) counts the frames evicted from the window, and
every ring slot (``(cursor + j) mod W``), bank frame id and page table is computed from it there; host ints (sinks
and window frames held, frames evicted per chunk, bank slots) only decide shapes, which stop changing once the
window and the bank are full. So no step reads a device value (the ``"torch"``/``"cpu"`` backends' value checks
aside), and a steady-state chunk captured in a CUDA graph (:class:`~streamkern.step_graph.StepGraph`) advances the
ring on every replay.
"""
from __future__ import annotations

from typing import Sequence

import torch

from . import _checks as check
from ._backend import run_value_check
from .bank_evict import bank_evict_select, entity_mask
from .consensus import select_frame
from .frame_attention import frame_attention
from .frame_pool import FramePool
from .frame_topk import frame_topk


class StreamingKV:
    """Sinks, a window ring and a memory bank of latent frames on one :class:`FramePool`.

    Args:
        num_layers, batch, frame_len, heads, head_dim: the pool's ``NL, B, F, H, D``; one page per latent frame
            (``pool.k/v [NL, B, S + W + M, F, H, D]``).
        sink_frames: ``S >= 0`` frames kept forever (the first ones appended).
        window_frames: ``W >= 1`` most recent non-sink frames.
        bank_frames: ``M >= 0`` memory slots fed by the frames that leave the window.
        num_entities: ``E``, width of the bank's entity masks (``bank_evict_select``).
        layers, layer_weights: the layers that vote in the consensus score and their weights (default
            ``(0, NL // 2, NL - 1)`` and ``(0.2, 0.3, 0.5)``).
        dtype, device, backend: of the pool; ``backend`` is passed to every op.

    State (device tensors unless said): ``pool``; ``sink_pages [S]``, ``window_pages [B, W]``, ``bank_pages [B, M]``
    int64; ``bank_valid [M]`` bool, ``bank_scores [M]`` float32, ``bank_entities [M, E]`` bool, ``bank_frame_ids
    [B, M]`` int64 (stream index of the frame each slot holds, -1 if empty); ``cursor []`` int64, the frames that
    left the window (the ring slot of the oldest held frame is ``cursor mod W``); host ints ``count`` (frames
    appended), ``n_sink``, ``n_window`` (frames held), ``n_evicted`` (frames that left the window).

    The host ints count the host's own calls. After a captured chunk is replayed (a graph replay runs no Python),
    ``cursor`` and every device list have advanced while ``count`` and ``n_evicted`` still count the chunk once, at
    capture (``n_sink`` and ``n_window`` stay right: a steady-state chunk leaves them unchanged); :meth:`sync_count`
    reads the cursor back into them.
    """

    def __init__(self, num_layers: int, batch: int, frame_len: int, heads: int, head_dim: int, *,
                 sink_frames: int = 0, window_frames: int, bank_frames: int = 0, num_entities: int = 8,
                 layers: Sequence[int] | None = None, layer_weights: Sequence[float] = (0.2, 0.3, 0.5),
                 dtype: torch.dtype = torch.bfloat16, device=None, backend: str | None = None):
        self.S = check.integer("sink_frames", sink_frames, low=0)
        self.W = check.integer("window_frames", window_frames, low=1)
        self.M = check.integer("bank_frames", bank_frames, low=0)
        check.integer("num_entities", num_entities, low=1)
        self.pool = FramePool(num_layers, batch, self.S + self.W + self.M, frame_len, heads, head_dim, dtype=dtype,
                              device=device, backend=backend)
        self.layers = check.int_tuple("layers", (0, num_layers // 2, num_layers - 1) if layers is None else layers,
                                      low=0, high=num_layers - 1)
        self.layer_weights = check.float_tuple("layer_weights", layer_weights, length=len(self.layers))
        self.backend = backend
        dev = self.pool.k.device
        self.sink_pages = torch.arange(self.S, device=dev)
        self.window_pages = torch.arange(self.S, self.S + self.W, device=dev).repeat(batch, 1)
        self.bank_pages = torch.arange(self.S + self.W, self.S + self.W + self.M, device=dev).repeat(batch, 1)
        self.bank_valid = torch.zeros(self.M, dtype=torch.bool, device=dev)
        self.bank_scores = torch.zeros(self.M, dtype=torch.float32, device=dev)
        self.bank_entities = torch.zeros(self.M, num_entities, dtype=torch.bool, device=dev)
        self.bank_frame_ids = torch.full((batch, self.M), -1, dtype=torch.int64, device=dev)
        self.cursor = torch.zeros((), dtype=torch.int64, device=dev)
        self.count = self.n_sink = self.n_window = self.n_evicted = 0
        self._tables: tuple[torch.Tensor, torch.Tensor] | None = None   # (recent, shared) until roll/append

    # --- bookkeeping ---------------------------------------------------------------------------------------------

    def _ring(self, offset: int, n: int) -> torch.Tensor:
        """Ring slots ``[n]`` of the window frames ``offset .. offset + n - 1`` counted from the oldest held one:
        ``(cursor + offset + j) mod W``, on the device."""
        return (self.cursor + torch.arange(offset, offset + n, device=self.cursor.device)) % self.W

    def _split(self, frames: int) -> tuple[int, int]:
        """``(to sinks, to the window)`` of the next ``frames`` frames."""
        to_sink = min(frames, self.S - self.n_sink)
        return to_sink, frames - to_sink

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
        reads them) become the kept frame's entity mask, and the kept frame's page swaps owner with the page of the
        ``bank_evict_select`` slot. Returns the number of frames evicted (a host int). No KV byte is read or
        written."""
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
        self.cursor.add_(evict)
        self.n_window -= evict
        self.n_evicted += evict
        self._tables = None
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
        """Offer the frames of ring ``slots`` to the bank and swap the kept frame's page into it."""
        pages = self.window_pages.index_select(1, slots)                                        # [B, e]
        rows = torch.arange(pages.shape[0], device=pages.device)[:, None]
        means = torch.stack([self.pool.k_mean[layer][rows, pages] for layer in self.layers])    # [nl, B, e, H, D]
        text = torch.stack([text_k[layer] for layer in self.layers]).float()
        best, scores = select_frame(means, text, entity_weights, 1, tuple(range(len(self.layers))),
                                    self.layer_weights, backend=self.backend)
        slot = bank_evict_select(self.bank_scores, self.bank_entities, self.bank_valid,
                                 backend=self.backend).reshape(1)
        kept = pages.gather(1, best[:, None])                                                   # [B, 1]
        freed = self.bank_pages.index_select(1, slot)                                           # [B, 1]
        self.bank_pages.index_copy_(1, slot, kept)
        self.window_pages.scatter_(1, slots.index_select(0, best)[:, None], freed)
        self.bank_scores.index_copy_(0, slot, scores.gather(1, best[:, None]).mean().reshape(1))
        self.bank_entities.index_copy_(0, slot, mask)
        self.bank_valid.index_fill_(0, slot, True)
        self.bank_frame_ids.index_copy_(1, slot, self.cursor + (self.S + best[:, None]))

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Write a clean chunk of ``n`` frames, ``k_new``/``v_new`` ``[NL, B, n·F, H, D]``: the first go to free
        sink pages, the rest to the window's next ring slots (call :meth:`roll` first when the window is full).
        One ``frame_write`` for every layer, k and v."""
        check.tensor("k_new", k_new, ndim=5)
        F = self.pool.frame_len
        if k_new.shape[2] % F or k_new.shape[2] == 0:
            raise ValueError(f"k_new: expected a positive multiple of frame_len={F} tokens (dim 2), got "
                             f"{k_new.shape[2]}")
        n = k_new.shape[2] // F
        to_sink, to_window = self._split(n)
        if self.n_window + to_window > self.W:
            raise ValueError(f"k_new: {to_window} frames do not fit the window ({self.n_window} of {self.W} held); "
                             f"call roll({n}) first")
        B = self.window_pages.shape[0]
        sinks = self.sink_pages[self.n_sink:self.n_sink + to_sink].expand(B, to_sink)
        ring = self.window_pages.index_select(1, self._ring(self.n_window, to_window))
        self.pool.write(k_new, v_new, torch.cat([sinks, ring], dim=1))
        self.n_sink += to_sink
        self.n_window += to_window
        self.count += n
        self._tables = None

    # --- attention -----------------------------------------------------------------------------------------------

    def page_table(self, topk: int | None = None, q: torch.Tensor | None = None,
                   layer: int | None = None) -> torch.Tensor:
        """The pages attended now: ``[B, n_sink + n_window + M]`` (bank slots not yet filled are -1) or, with
        ``topk``, ``[B, H, n_sink + n_window + topk]`` whose bank part is ``frame_topk`` of ``q [B, Lq, H, D]``
        over the bank's pages in ``layer``. Built on the device, once per chunk for the parts that do not depend
        on the query."""
        if self._tables is None:
            B = self.window_pages.shape[0]
            live = self.window_pages.index_select(1, self._ring(0, self.n_window))
            recent = torch.cat([self.sink_pages[:self.n_sink].expand(B, self.n_sink), live], dim=1)
            self._tables = recent, torch.cat([recent, torch.where(self.bank_valid, self.bank_pages, -1)], dim=1)
        recent, shared = self._tables
        if topk is None:
            return shared
        check.integer("topk", topk, low=0)
        if q is None or layer is None:
            raise ValueError("q, layer: expected the query and its layer to choose the top-k bank frames, got None")
        bank = shared[:, recent.shape[1]:]
        best = frame_topk(q, self.pool.k_mean[layer], bank, topk, per_head=True, backend=self.backend)
        return torch.cat([recent[:, None].expand(-1, best.shape[1], -1), best], dim=2)

    def attend(self, layer: int, q: torch.Tensor, new_k: torch.Tensor | None = None,
               new_v: torch.Tensor | None = None, *, topk: int | None = None, gate: torch.Tensor | None = None,
               sm_scale: float | None = None, return_lse: bool = False):
        """``frame_attention`` of ``q [B, Lq, H, D]`` in ``layer`` over sinks, window and bank (all slots, or per
        head the ``topk`` best by ``frame_topk``) followed by the chunk's own ``new_k/new_v [B, Ln, H, D]``."""
        check.integer("layer", layer, low=0, high=self.pool.k.shape[0] - 1)
        table = self.page_table(topk, q, layer)
        return frame_attention(q, self.pool.k[layer], self.pool.v[layer], table, new_k=new_k, new_v=new_v,
                               gate=gate, sm_scale=sm_scale, return_lse=return_lse, backend=self.backend)

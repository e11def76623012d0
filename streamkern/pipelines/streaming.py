"""``StreamingGenerator`` (seeds 001 + 000): block-causal streaming with sinks, a local window and a memory bank.

A tiny random causal transformer streams blocks of ``frames_per_block`` latent frames (``frame_seq_len`` tokens
each). Each block is denoised in ``steps`` passes and then cached by one pass over its clean output; every pass
attends to ``[sink frames, bank frames, the last window frames, itself]`` (window counted with the current block,
Self-Forcing style). Frames pushed out of the window are offered to the :class:`MemoryBank`.

Prompt switches follow seed 000 improvement 1: ``distance = 1 − cos(mean(old), mean(new))``,
``window = max(fpb, ⌊(min + clamp(distance, 0, 1)·(max − min)) / fpb⌋·fpb)`` frames, and the cross-attention
context of a block ``f`` frames after the switch is ``(1 − α)·old + α·new`` with the cosine schedule
``α = 0`` for ``f < delay``, else ``(1 − cos(π·min(1, (f − delay)/window)))/2``.

``sparse_bank=k`` adds MemFlow's sparse memory activation: each head of each layer attends only to the ``k`` bank
frames whose mean key best matches its mean query (``qbar · kbar``, docs/contract.md §4.5 ``frame_topk``).

* ``eager=True`` (``backend="torch"``): MemFlow's cache — per-layer tensors shifted by clone + copy when the window is
  full, the sink and window parts cloned and ``torch.cat``-ed with the bank on every pass (the top-k bank frames
  ``gather``-ed per head with sparse activation), the seed's bank (:class:`MemoryBank` eager), a Python scheduler
  fed by ``.item()``.
* ``eager=False``: :class:`~streamkern.StreamingKV`, one ``FramePool`` page per latent frame, laid out as sink
  pages, a ring of window pages and bank pages so that what a pass attends is one contiguous range: each pass writes
  the block's keys and values of a layer into its ring pages (``frame_write``) and attends that range as one view
  of the pool (SDPA, cuDNN/flash on GPUs, or ``frame_attention``: ``attention=``, see ``StreamingKV``); sparse
  activation picks the bank pages per head (``frame_topk``) and merges their ``frame_attention`` by lse. The bank
  keeps a frame leaving the window by copying it into its region (``bank_insert``), its decisions from the same ops
  as :class:`MemoryBank`'s, scored on the pages' mean keys; the schedule is computed on the device: no host sync. The block index is a device counter too, so once the window and the bank
  are full one block (:meth:`BlockStream.step`) can be captured in a graph and replayed as every next block.

``run`` streams through :meth:`StreamingGenerator.stream`, the step API a graph captures: a :class:`BlockStream`
with a static ``noise`` input buffer and ``step()`` returning the block's latent.

``parallel=`` (a :class:`streamkern.distributed.HeadParallel`, accelerated path) runs the stream head-parallel on
its process group (Ulysses): each rank computes its ``T / world`` tokens of a block and keeps the memory of its
``heads / world`` heads; all-to-alls around each attention and before ``append``, the bank's consensus scores
all-reduced, the block gathered at the end (docs/distributed.md).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..streaming_kv import StreamingKV
from .runtime import PipelineRun, nbytes, part, timed_step
from .tiny import Block, randn, sdpa, seeded, sinusoid
from .memory_bank import MemoryBank


class AdaptiveScheduler:
    """Seed 000 §1.1 as written, over a cosine base schedule."""

    def __init__(self, min_window: int = 3, max_window: int = 15, delay_frames: int = 3, chunk: int = 3):
        self.min_window, self.max_window, self.delay_frames, self.chunk = min_window, max_window, delay_frames, chunk
        self.window_frames = max_window

    def update_for_switch(self, semantic_distance: float) -> None:
        t = max(0.0, min(1.0, semantic_distance))
        window = int(self.min_window + t * (self.max_window - self.min_window))
        self.window_frames = max(self.chunk, (window // self.chunk) * self.chunk)

    def get_alpha(self, frames_since_switch: int) -> float:
        if frames_since_switch < self.delay_frames:
            return 0.0
        p = min(1.0, (frames_since_switch - self.delay_frames) / self.window_frames)
        return 0.5 * (1.0 - math.cos(math.pi * p))


def _compute_prompt_distance(cond_old: torch.Tensor, cond_new: torch.Tensor) -> float:
    """Seed 000 §1.2: cosine distance of the mean text embeddings (reads it on the host)."""
    emb_old, emb_new = cond_old.mean(dim=(0, 1)), cond_new.mean(dim=(0, 1))
    return 1.0 - torch.nn.functional.cosine_similarity(emb_old[None], emb_new[None]).item()


def device_alpha(cond_old, cond_new, frames_since_switch: torch.Tensor, sched: AdaptiveScheduler) -> torch.Tensor:
    """The same schedule as :class:`AdaptiveScheduler` evaluated on the device (float64 ``[]``), no host read;
    ``frames_since_switch`` is an int64 ``[]`` device tensor (0 before the delay is chosen by ``torch.where``)."""
    emb_old, emb_new = cond_old.double().mean(dim=(0, 1)), cond_new.double().mean(dim=(0, 1))
    t = (1.0 - torch.nn.functional.cosine_similarity(emb_old[None], emb_new[None])[0]).clamp(0.0, 1.0)
    window = torch.floor(sched.min_window + t * (sched.max_window - sched.min_window))
    window = torch.clamp(torch.floor(window / sched.chunk) * sched.chunk, min=sched.chunk)
    p = torch.clamp((frames_since_switch - sched.delay_frames) / window, max=1.0)
    return torch.where(frames_since_switch < sched.delay_frames, 0.0, 0.5 * (1.0 - torch.cos(math.pi * p)))


class BlockState(NamedTuple):
    """What ``StreamingGenerator.run(observe=...)`` hands over after each block (outside the timed step).

    ``frame [B, fpb * fsl, C]`` the block's latent; ``positions [n]`` int64 the logical indices (n-th token ever
    cached) of the tokens the KV cache holds, ascending; ``cache_k``/``cache_v [NL, B, n, H, D]`` those tokens in
    that order; ``bank_frames [B, count]`` the stream indices of the bank's frames, sorted per row. Every cache
    (eager, paged, or any later one) reports the same state for the same stream, so paths can be compared block by
    block."""

    block: int
    frame: torch.Tensor
    positions: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    bank_frames: torch.Tensor


def _eager_topk_frames(q, bank_k, bank_v, fsl: int, k: int):
    """MemFlow's sparse memory activation, eager: the ``k`` bank frames per head whose mean key best matches the
    mean query, gathered into ``[B, k * fsl, H, D]`` (head h's tokens come from its own frames).

    ``score[b, h, m] = mean_t(q[b, t, h]) · mean_j(bank_k[b, m·fsl + j, h])`` in float32."""
    B, L, H, D = bank_k.shape
    frames_k, frames_v = bank_k.view(B, L // fsl, fsl, H, D), bank_v.view(B, L // fsl, fsl, H, D)
    score = torch.einsum("bhd,bmhd->bhm", q.float().mean(1), frames_k.float().mean(2))
    idx = score.topk(min(k, L // fsl), dim=-1).indices.transpose(1, 2)          # [B, k, H]
    idx = idx[:, :, None, :, None].expand(-1, -1, fsl, -1, D)
    return frames_k.gather(1, idx).reshape(B, -1, H, D), frames_v.gather(1, idx).reshape(B, -1, H, D)


class _ShiftCache:
    """MemFlow's eager cache: per layer ``[B, sink + window, H, D]`` in logical order, shifted by clone + copy when
    full; every pass clones the sink and window parts and ``torch.cat``s them with the bank (its top-k frames
    gathered per head with sparse activation) and the chunk's own keys. The bank is the seed's."""

    def __init__(self, gen: "StreamingGenerator"):
        b, h, d, dtype, device = gen.batch, gen.h, gen.d, gen.dtype, gen.device
        self.k = [torch.zeros(b, gen.sink + gen.window, h, d, dtype=dtype, device=device) for _ in range(gen.nl)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.sink, self.window, self.n_sink, self.n_win = gen.sink, gen.window, 0, 0
        self.fsl, self.sparse, self.device = gen.fsl, gen.sparse_bank, gen.device
        self.bank = MemoryBank(gen.nl, b, h, d, gen.fsl, gen.bank_size, gen.num_entities, dtype=dtype,
                               device=device, backend="torch", eager=True)
        self.e, self.bank_kv, self.count = 0, (None, None), 0

    def held(self):
        """``(positions [n], k, v [NL, B, n, H, D])``: sinks, then the window from oldest to newest."""
        positions = torch.cat([torch.arange(self.n_sink), torch.arange(self.count - self.n_win, self.count)])
        w = slice(self.sink, self.sink + self.n_win)
        k, v = (torch.stack([torch.cat([t[:, :self.n_sink], t[:, w]], dim=1) for t in ts]) for ts in (self.k, self.v))
        return positions, k, v

    def start_block(self, tokens: int, text_k, weights, entities) -> None:
        """Before a block of ``tokens`` new tokens: drop the window tokens it pushes out (the oldest) from attention,
        offering them to the bank first."""
        s_new = min(tokens, self.sink - self.n_sink)
        e = self.e = max(0, self.n_win + tokens - s_new - self.window)
        first_frame = (self.sink + self.count - self.n_sink - self.n_win) // self.fsl
        if e:
            s = slice(self.sink, self.sink + e)
            with part("cache", self.device) as moved:
                chunk_k, chunk_v = torch.stack([k[:, s] for k in self.k]), torch.stack([v[:, s] for v in self.v])
                moved(2 * nbytes(chunk_k, chunk_v))
            self.bank.insert(chunk_k, chunk_v, text_k, weights, entities, first_frame)
        self.bank_kv = self.bank.kv()

    def attend(self, layer: int, q, k, v):
        c_k, c_v = self.k[layer], self.v[layer]
        bank_k, bank_v = (None, None) if self.bank_kv[0] is None else (self.bank_kv[0][layer], self.bank_kv[1][layer])
        if bank_k is not None and self.sparse is not None:
            with part("retrieval", self.device) as moved:
                bank_k, bank_v = _eager_topk_frames(q, bank_k, bank_v, self.fsl, self.sparse)
                moved(nbytes(self.bank_kv[0][layer]) + 2 * nbytes(bank_k, bank_v))
        with part("memory attention", self.device) as moved:
            parts_k = [c_k[:, :self.n_sink].clone(), c_k[:, self.sink + self.e:self.sink + self.n_win].clone()]
            parts_v = [c_v[:, :self.n_sink].clone(), c_v[:, self.sink + self.e:self.sink + self.n_win].clone()]
            keys = torch.cat(parts_k + ([bank_k] if bank_k is not None else []) + [k], dim=1)
            values = torch.cat(parts_v + ([bank_v] if bank_v is not None else []) + [v], dim=1)
            out = sdpa(q, keys, values)
            moved(2 * nbytes(*parts_k, *parts_v) + 3 * nbytes(keys, values) + nbytes(q, out))
            return out

    def append(self, k_new, v_new) -> None:
        e, s_new = self.e, min(k_new.shape[2], self.sink - self.n_sink)
        keep, m = self.n_win - e, k_new.shape[2] - s_new
        with part("cache", self.device) as moved:
            for layer in range(len(self.k)):
                for cache, new in ((self.k[layer], k_new[layer]), (self.v[layer], v_new[layer])):
                    cache[:, self.n_sink:self.n_sink + s_new] = new[:, :s_new]
                    if e:
                        cache[:, self.sink:self.sink + keep] = cache[:, self.sink + e:self.sink + self.n_win].clone()
                    at = self.sink + self.n_win - e
                    cache[:, at:at + m] = new[:, s_new:]
            moved(2 * nbytes(k_new, v_new) + (4 * keep * nbytes(k_new[:, :, :1]) * 2 if e else 0))
        self.n_sink += s_new
        self.n_win += k_new.shape[2] - s_new - e
        self.count += k_new.shape[2]

    @property
    def bank_count(self) -> int:
        return self.bank.count

    def held_frames(self) -> torch.Tensor:
        return self.bank.held_frames()


class _PagedCache:
    """The accelerated cache: :class:`~streamkern.StreamingKV` (sinks, a ring of window pages and bank pages laid
    out as one contiguous range on one ``FramePool``, page ids and ring cursor on the device). :meth:`held` reads
    the host counts: it describes the blocks the host ran, not graph replays."""

    def __init__(self, gen: "StreamingGenerator"):
        self.fsl, self.fpb, self.device, self.sparse = gen.fsl, gen.fpb, gen.device, gen.sparse_bank
        self.parallel = gen.parallel
        make = StreamingKV if gen.parallel is None else gen.parallel.streaming_kv   # this rank's heads
        self.kv = make(gen.nl, gen.batch, gen.fsl, gen.h, gen.d, sink_frames=gen.sink // gen.fsl,
                              window_frames=gen.window // gen.fsl, bank_frames=gen.bank_size,
                              num_entities=gen.num_entities, dtype=gen.dtype, device=gen.device, backend=gen.backend,
                              attention=gen.attention)

    @property
    def bank_count(self) -> int:
        return self.kv.n_bank

    def start_block(self, tokens: int, text_k, weights, entities) -> None:
        """Evict the window frames a block of ``tokens`` new tokens pushes out; the bank copies the one it keeps
        into its region."""
        if self.parallel is not None:
            text_k = self.parallel.heads_of(text_k, dim=3)
        with part("eviction", self.device) as moved:
            evicted = self.kv.roll(self.fpb, text_k=text_k, entity_weights=weights, entities=entities)
            frame = nbytes(self.kv.pool.k[:, :, 0])
            moved(nbytes(self.kv.pool.k_mean[:, :, 0]) * evicted + nbytes(text_k[0]) * len(self.kv.layers)
                  + (4 * frame if evicted and self.kv.M else 0))

    def attend(self, layer: int, q, k, v):
        """This block's attention of layer ``layer``; with ``parallel``, ``q, k, v`` are this rank's tokens and the
        memory holds this rank's heads: Ulysses all-to-alls around the memory's attention."""
        if self.parallel is not None:
            return self.parallel.attention(functools.partial(self._attend, layer), q, k, v)
        return self._attend(layer, q, k, v)

    def _attend(self, layer: int, q, k, v):
        kv = self.kv
        pages = kv.n_sink + kv.n_window + self.fpb + (kv.n_bank if self.sparse is None else
                                                      min(self.sparse, kv.n_bank))
        with part("memory attention", self.device) as moved:
            out = kv.attend(layer, q, k, v, topk=self.sparse)
            moved(2 * pages * nbytes(kv.pool.k[layer, :, 0]) + 2 * nbytes(k, v) + nbytes(q, out)
                  + (nbytes(q, kv.pool.k_mean[layer, :, 0]) * kv.M if self.sparse is not None else 0))
            return out

    def append(self, k_new, v_new) -> None:
        if self.parallel is not None:
            k_new, v_new = self.parallel.seq_to_heads(k_new, v_new)
        with part("cache", self.device) as moved:
            self.kv.append(k_new, v_new)
            moved(2 * nbytes(k_new, v_new) + nbytes(self.kv.pool.k_mean[:, :, 0]) * (k_new.shape[2] // self.fsl))

    def held(self):
        """``(positions [n], k, v [NL, B, n, H, D])`` read from the pool's pages, sinks then the window oldest first
        (with ``parallel``: this rank's heads)."""
        pages = self.kv.page_table()[:, :self.kv.n_sink + self.kv.n_window]
        NL, B, _, F, H, D = self.kv.pool.k.shape
        idx = pages[None, :, :, None, None, None].expand(NL, -1, -1, F, H, D)
        k, v = (t.gather(2, idx).reshape(NL, B, -1, H, D) for t in (self.kv.pool.k, self.kv.pool.v))
        count = self.kv.count * F
        positions = torch.cat([torch.arange(self.kv.n_sink * F), torch.arange(count - self.kv.n_window * F, count)])
        return positions, k, v

    def held_frames(self) -> torch.Tensor:
        """Stream indices of the bank's frames, ``[B, count]`` sorted per row."""
        return self.kv.bank_frame_ids[:, :self.kv.n_bank].sort(dim=1).values.cpu()


def _check_parallel(parallel, backend: str, eager: bool | None, heads: int, block_tokens: int, device) -> None:
    """``StreamingGenerator(parallel=...)``'s arguments, checked before anything is allocated."""
    if eager or (eager is None and backend == "torch"):
        raise ValueError("parallel: head parallelism runs on the accelerated path (eager=False, or an accelerated "
                         "backend); the eager path is MemFlow's single-device cache")
    parallel.local_heads(heads)
    if block_tokens % parallel.world:
        raise ValueError(f"frames_per_block, frame_seq_len: a block of {block_tokens} tokens is split over the "
                         f"sequence; expected a multiple of the world size {parallel.world}")
    device = torch.device(device)
    if device.type != parallel.device.type or device.index not in (None, parallel.device.index):
        raise ValueError(f"device: expected this rank's device {parallel.device} (the parallel group's), got {device}")


class StreamingGenerator(nn.Module):
    """Tiny streaming video generator; ``run(num_blocks)`` returns a :class:`PipelineRun` whose outputs are the
    block latents ``frames [N, B, fpb * fsl, C]`` and the bank's held frame indices ``bank_frames [B, M]``;
    ``stream()`` gives the per-block step API it runs on (:class:`BlockStream`, capturable once steady).

    ``attention`` (accelerated path only): the kernel that reads the memory, ``StreamingKV``'s ``attention=``
    (``"auto"``: SDPA on GPUs, ``frame_attention`` where it resolves to the ``"cpu"`` backend).

    ``parallel`` (accelerated path only): a :class:`streamkern.distributed.HeadParallel` to run the stream head-parallel
    over its process group (Ulysses): every rank builds the same generator (same seed, so the same weights and noise),
    runs everything but attention on its ``T / world`` tokens of a block and keeps the memory of its
    ``heads / world`` heads; ``step()`` returns the whole block on every rank, equal to a single-device run within
    the parity metric, and every rank's bank holds the same frames. ``heads`` and the block's
    ``frames_per_block · frame_seq_len`` tokens must divide by the world size (``ValueError`` before anything is
    allocated)."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, num_layers: int = 4, heads: int = 4,
                 head_dim: int = 32, frame_seq_len: int = 64, frames_per_block: int = 3, window_frames: int = 15,
                 sink_frames: int = 1, bank_size: int = 6, num_entities: int = 8, text_len: int = 16,
                 text_dim: int = 64, batch: int = 1, steps: int = 2, switch_every: int = 4,
                 dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, sparse_bank: int | None = None,
                 attention: str = "auto", parallel=None):
        if parallel is not None:
            _check_parallel(parallel, backend, eager, heads, frames_per_block * frame_seq_len, device)
        super().__init__()
        if sparse_bank is not None and (not isinstance(sparse_bank, int) or sparse_bank < 1):
            raise ValueError(f"sparse_bank: expected None or a positive int (bank frames per head), got {sparse_bank!r}")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected a positive int (denoising passes per block), got {steps!r}")
        self.backend, self.sparse_bank, self.attention, self.parallel = backend, sparse_bank, attention, parallel
        self.eager = backend == "torch" if eager is None else eager
        self.nl, self.h, self.d, self.fsl, self.fpb = num_layers, heads, head_dim, frame_seq_len, frames_per_block
        self.window, self.sink = window_frames * frame_seq_len, sink_frames * frame_seq_len
        self.batch, self.steps, self.switch_every, self.bank_size = batch, steps, switch_every, bank_size
        self.num_entities, self.text_len, self.dtype, self.device, self.seed = (num_entities, text_len, dtype,
                                                                                torch.device(device), seed)
        with seeded(seed):
            self.blocks = nn.ModuleList(Block(heads, head_dim, text_dim) for _ in range(num_layers))
        self.to(device=self.device, dtype=dtype)
        base = randn((batch, text_len, text_dim), seed + 1, self.device, dtype)
        near = base + 0.3 * randn((batch, text_len, text_dim), seed + 2, self.device, dtype)
        far = randn((batch, text_len, text_dim), seed + 3, self.device, dtype)
        self.prompts = torch.stack([base, near, far])     # [P, B, text_len, text_dim], cycled through

    # --- prompts and entities ------------------------------------------------------------------------------

    def _entities(self, segment):
        """Deterministic stand-in for the LLM agent: entity token weights ``[S]`` and entity ids of a segment
        (a host int: a list of ints; an int64 ``[]`` device tensor: an int64 ``[2]`` tensor)."""
        pos = torch.arange(self.text_len, device=self.device)
        focus = (pos - segment * 5) % self.text_len < 4     # 4 entity tokens, on the device (no copy from host)
        w = torch.where(focus, 1.0, 0.1).to(self.dtype)
        ids = [segment % self.num_entities, (segment + 3) % self.num_entities]
        return w, torch.stack(ids) if isinstance(segment, torch.Tensor) else ids

    def _context(self, block, sched: AdaptiveScheduler, state: dict):
        """Cross-attention context of ``block`` (a host int eagerly, else an int64 ``[]`` device tensor): the
        blend of the previous and current prompts, and the block's prompt segment."""
        segment = block // self.switch_every
        since = (block - segment * self.switch_every) * self.fpb
        if not self.eager:
            new, old = (self.prompts.index_select(0, (s % len(self.prompts)).reshape(1))[0]
                        for s in (segment, segment - 1))
            alpha = device_alpha(old, new, since, sched)
            blend = old * (1.0 - alpha).to(self.dtype) + new * alpha.to(self.dtype)
            return torch.where(segment == 0, new, blend), segment
        new = self.prompts[segment % len(self.prompts)]
        if segment == 0:
            return new, segment
        old = self.prompts[(segment - 1) % len(self.prompts)]
        if since == 0:
            sched.update_for_switch(_compute_prompt_distance(old, new))
            state.setdefault("windows", []).append(sched.window_frames)
        alpha = sched.get_alpha(since)
        return old * (1.0 - alpha) + new * alpha, segment

    # --- one block -----------------------------------------------------------------------------------------

    def _forward(self, x, cache, text_kv):
        """One pass over a block ``x [B, T, C]`` → ``(out, k [NL, B, T, H, D], v)``."""
        ks, vs = [], []
        for layer, block in enumerate(self.blocks):
            x, k, v = block(x, lambda q, k, v, layer=layer: cache.attend(layer, q, k, v),
                            (text_kv[0][layer], text_kv[1][layer]))
            ks.append(k)
            vs.append(v)
        return x, torch.stack(ks), torch.stack(vs)

    def _block(self, block, noise, cache, sched, state) -> torch.Tensor:
        """Denoise and cache the next block (``block``: its index, a host int eagerly, else the device block
        counter, from which the positions, the context and the entities are computed) → its latent ``[B, T, C]``."""
        T, C = self.fpb * self.fsl, self.h * self.d
        context, segment = self._context(block, sched, state)
        tk, tv = zip(*(blk.text_kv(context) for blk in self.blocks))
        text_kv = torch.stack(tk), torch.stack(tv)
        weights, entities = self._entities(segment)
        cache.start_block(T, text_kv[0], weights, entities)
        pos = sinusoid(block * self.fpb + torch.arange(self.fpb, device=self.device), C)
        pos = pos.repeat_interleave(self.fsl, dim=0).to(self.dtype)
        if self.parallel is not None:   # this rank's tokens of the block
            noise, pos = self.parallel.shard_seq(noise), self.parallel.shard_seq(pos, dim=0)
        x = noise
        for step in range(self.steps):
            pred, _, _ = self._forward(x + pos, cache, text_kv)
            keep = (step + 1) / (self.steps + 1)
            x = pred if step == self.steps - 1 else keep * pred + (1 - keep) * noise
        _, k_new, v_new = self._forward(x + pos, cache, text_kv)
        cache.append(k_new, v_new)
        return x if self.parallel is None else self.parallel.gather_seq(x)

    def stream(self) -> "BlockStream":
        """A fresh stream of blocks (empty cache, block 0 next): refill ``noise`` and call ``step()`` per block."""
        return BlockStream(self)

    @torch.no_grad()
    def run(self, num_blocks: int, forbid_syncs: bool = False, progress=None,
            observe: Callable[[BlockState], None] | None = None) -> PipelineRun:
        """Stream ``num_blocks`` blocks; ``forbid_syncs`` makes any host read in a block raise; ``observe`` is
        called with a :class:`BlockState` after each block, outside the timed step (it may read the device)."""
        stream, frames = self.stream(), []
        record = PipelineRun("StreamingGenerator", self.backend if not self.eager else "torch (eager)", {})
        for i in range(num_blocks):
            stream.noise.copy_(stream.block_noise(i))                                           # input, untimed
            timed_step(record, self.device, lambda: frames.append(stream.step()), forbid=forbid_syncs)
            if observe is not None:
                observe(BlockState(i, frames[-1], *stream.cache.held(), stream.cache.held_frames()))
            if progress is not None:
                progress()
        record.outputs = {"frames": torch.stack(frames), "bank_frames": stream.cache.held_frames()}
        record.info = {"bank_count": stream.cache.bank_count, "windows": stream.state.get("windows"),
                       "sparse_bank": self.sparse_bank}
        return record


class BlockStream:
    """One stream of :class:`StreamingGenerator` blocks, one :meth:`step` per block: the step API that ``run``
    uses and that :class:`~streamkern.step_graph.StepGraph` can capture.

    ``noise [B, fpb * fsl, C]`` is the static input buffer: refill it in place (``noise.copy_``) before each step;
    :meth:`block_noise` gives ``run``'s noise of a block. ``step()`` denoises and caches the next block and returns
    its latent ``[B, fpb * fsl, C]`` (a fresh tensor eagerly; a graph's replays overwrite the captured one).

    Accelerated (``eager=False``): the block index is the device counter ``block`` (int64 ``[]``, advanced in place
    by each step), and everything that changes per block is computed from it on the device: positions, prompt
    segment and transition ``α``, entity ids, and (in :class:`~streamkern.StreamingKV`, from its ``cursor``) ring
    slots, bank frame ids and page tables. The host ints (``blocks``, the window and bank counts) decide only
    shapes, constant once the window and the bank are full, so a step captured then replays as the next block each
    time. ``blocks`` counts the steps the host ran (a replay does not advance it; ``block`` does). Eager: the seed's
    code, driven by the host count.
    """

    def __init__(self, gen: StreamingGenerator):
        self.gen = gen
        self.cache = _ShiftCache(gen) if gen.eager else _PagedCache(gen)
        self.sched = AdaptiveScheduler(3, 15, 3, gen.fpb)
        self.state = {}
        self.noise = torch.zeros(gen.batch, gen.fpb * gen.fsl, gen.h * gen.d, dtype=gen.dtype, device=gen.device)
        self.blocks = 0
        self.block = None if gen.eager else torch.zeros((), dtype=torch.int64, device=gen.device)

    def block_noise(self, i: int) -> torch.Tensor:
        """``run``'s input noise of block ``i`` (drawn on the CPU from the generator's seed)."""
        g = self.gen
        return randn(tuple(self.noise.shape), g.seed * 1000 + i, g.device, g.dtype)

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Stream the next block; returns its latent ``[B, fpb * fsl, C]`` (no autograd)."""
        x = self.gen._block(self.blocks if self.block is None else self.block, self.noise, self.cache, self.sched,
                            self.state)
        if self.block is not None:
            self.block.add_(1)
        self.blocks += 1
        return x

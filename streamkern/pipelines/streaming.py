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
frames whose mean key best matches its mean query (``qbar · kbar``, DESIGN.md §4.5 ``frame_topk``).

* ``eager=True`` (``backend="torch"``): MemFlow's cache — per-layer tensors shifted by clone + copy when the window is
  full, the sink and window parts cloned and ``torch.cat``-ed with the bank on every pass (the top-k bank frames
  ``gather``-ed per head with sparse activation), the seed's bank (:class:`MemoryBank` eager), a Python scheduler
  fed by ``.item()``.
* ``eager=False``: one ``FramePool`` page per latent frame: sink pages, a ring of window pages and bank pages, whose
  ids live on the device. A clean chunk is written once (``frame_write``, all layers); attention reads sink ∪ window
  ∪ bank (all, or ``frame_topk`` of it) ∪ the chunk in place (``frame_attention``); the bank keeps a frame leaving
  the window by swapping its page id with the victim's (no KV bytes move), its decisions from the op-backed
  :class:`MemoryBank` scored on the pages' mean keys; the schedule is computed on the device: no host sync.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..frame_attention import frame_attention
from ..frame_pool import FramePool
from ..frame_topk import frame_topk
from ._runtime import PipelineRun, nbytes, part, timed_step
from ._tiny import Block, randn, sdpa, seeded, sinusoid
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


def device_alpha(cond_old, cond_new, frames_since_switch: int, sched: AdaptiveScheduler) -> torch.Tensor:
    """The same schedule as :class:`AdaptiveScheduler` evaluated on the device (float64 ``[]``), no host read."""
    emb_old, emb_new = cond_old.double().mean(dim=(0, 1)), cond_new.double().mean(dim=(0, 1))
    t = (1.0 - torch.nn.functional.cosine_similarity(emb_old[None], emb_new[None])[0]).clamp(0.0, 1.0)
    window = torch.floor(sched.min_window + t * (sched.max_window - sched.min_window))
    window = torch.clamp(torch.floor(window / sched.chunk) * sched.chunk, min=sched.chunk)
    if frames_since_switch < sched.delay_frames:
        return torch.zeros((), dtype=torch.float64, device=cond_old.device)
    p = torch.clamp((frames_since_switch - sched.delay_frames) / window, max=1.0)
    return 0.5 * (1.0 - torch.cos(math.pi * p))


def _circular(start: int, length: int, window: int, offset: int) -> list[tuple[int, int]]:
    """Slot ranges ``[a, b)`` of ring indices ``start .. start+length-1`` taken mod ``window``, plus ``offset``."""
    if length <= 0:
        return []
    a = start % window
    if a + length <= window:
        return [(offset + a, offset + a + length)]
    return [(offset + a, offset + window), (offset, offset + a + length - window)]


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

    def start_block(self, e: int, text_k, weights, entities, first_frame: int) -> None:
        """Drop the ``e`` oldest window tokens from attention, offering them to the bank first."""
        self.e = e
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

    def held_frames(self) -> torch.Tensor:
        return self.bank.held_frames()


class _PagedCache:
    """The accelerated cache: one ``FramePool`` page per frame — pages ``[0, sink)`` the sinks, a ring of ``window``
    pages, ``bank`` pages — with the page of each ring position and bank slot held on the device (``ring [B, W]``,
    ``bank [B, M]``: rows own their pages, since each row's bank keeps its own best frame). Counts stay on the
    host; nothing is read back."""

    def __init__(self, gen: "StreamingGenerator"):
        b, self.fsl, self.device, self.backend, self.sparse = gen.batch, gen.fsl, gen.device, gen.backend, gen.sparse_bank
        self.n_sinks, self.W, M = gen.sink // gen.fsl, gen.window // gen.fsl, gen.bank_size
        pages = self.n_sinks + self.W + M
        self.pool = FramePool(gen.nl, b, pages, gen.fsl, gen.h, gen.d, dtype=gen.dtype, device=gen.device,
                              backend=gen.backend)
        ids = torch.arange(pages, device=gen.device).expand(b, pages)
        self.sink_pages = ids[:, :self.n_sinks]
        self.ring = ids[:, self.n_sinks:self.n_sinks + self.W].clone()
        self.bank_pages = ids[:, self.n_sinks + self.W:].clone()
        self.bank = MemoryBank(gen.nl, b, gen.h, gen.d, gen.fsl, M, gen.num_entities, dtype=gen.dtype,
                               device=gen.device, backend=gen.backend, eager=False, storage=False)
        self.n_sink, self.n_total, self.e, self.table = 0, 0, 0, None

    def _ring(self, start: int, count: int) -> torch.Tensor:
        """``[B, count]`` pages of the ring positions ``start .. start + count - 1`` (mod W): slices, no index copy."""
        ranges = _circular(start, count, self.W, 0) or [(0, 0)]
        return torch.cat([self.ring[:, a:b] for a, b in ranges], dim=1)

    def start_block(self, e: int, text_k, weights, entities, first_frame: int) -> None:
        self.e = e = e // self.fsl
        held = min(self.n_total, self.W)
        if e:
            oldest = self.n_total - held
            with part("eviction", self.device) as moved:
                pages = self._ring(oldest, e)                                              # [B, e]
                k_mean = self.pool.k_mean                                                 # [NL, B, P, H, D]
                idx = pages[None, :, :, None, None].expand(k_mean.shape[0], -1, -1, *k_mean.shape[3:])
                chunk = k_mean.gather(2, idx)                                             # frame means [NL, B, e, H, D]
                moved(2 * nbytes(chunk))
            best, victim = self.bank.choose(chunk, text_k.float(), weights.float(), entities, first_frame,
                                            frame_seq_len=1)
            with part("eviction", self.device) as moved:
                slot = victim.expand(self.ring.shape[0], 1)
                kept, freed = pages.gather(1, best[:, None]), self.bank_pages.gather(1, slot)
                self.bank_pages.scatter_(1, slot, kept)
                self.ring.scatter_(1, (best[:, None] + oldest) % self.W, freed)           # page-id swap
                moved(4 * nbytes(kept))
        with part("memory attention", self.device) as moved:
            live = self._ring(self.n_total - held + e, held - e)
            bank = torch.where(self.bank.valid, self.bank_pages, -1)
            self.window_table = torch.cat([self.sink_pages[:, :self.n_sink], live], dim=1)
            self.bank_table = bank
            self.table = torch.cat([self.window_table, bank], dim=1)
            moved(2 * nbytes(self.table))
        self.n_pages = self.n_sink + held - e + self.bank.count

    def attend(self, layer: int, q, k, v):
        table, n_pages = self.table, self.n_pages
        if self.sparse is not None:
            with part("retrieval", self.device) as moved:
                chosen = frame_topk(q, self.pool.k_mean[layer], self.bank_table, self.sparse, backend=self.backend)
                H = q.shape[2]
                table = torch.cat([self.window_table[:, None].expand(-1, H, -1), chosen], dim=2)
                moved(nbytes(q, chosen) + nbytes(self.pool.k_mean[layer, :, 0]) * self.bank_table.shape[1])
            n_pages += min(self.sparse, self.bank.count) - self.bank.count
        with part("memory attention", self.device) as moved:
            out = frame_attention(q, self.pool.k[layer], self.pool.v[layer], table, new_k=k, new_v=v,
                                 backend=self.backend)
            moved(2 * n_pages * nbytes(self.pool.k[layer, :, 0]) + nbytes(q, k, v, out, table))
            return out

    def append(self, k_new, v_new) -> None:
        n = k_new.shape[2] // self.fsl
        s_new = min(n, self.n_sinks - self.n_sink)
        with part("cache", self.device) as moved:
            pages = torch.cat([self.sink_pages[:, self.n_sink:self.n_sink + s_new],
                               self._ring(self.n_total, n - s_new)], dim=1)
            self.pool.write(k_new, v_new, pages)
            moved(2 * nbytes(k_new, v_new) + nbytes(self.pool.k_mean[:, :, 0]) * n)
        self.n_sink += s_new
        self.n_total += n - s_new

    def held(self):
        """``(positions [n], k, v [NL, B, n, H, D])`` read from the pool's pages, sinks then the window oldest first."""
        held = min(self.n_total, self.W)
        pages = torch.cat([self.sink_pages[:, :self.n_sink], self._ring(self.n_total - held, held)], dim=1)
        NL, B, _, F, H, D = self.pool.k.shape
        idx = pages[None, :, :, None, None, None].expand(NL, -1, -1, F, H, D)
        k, v = (t.gather(2, idx).reshape(NL, B, -1, H, D) for t in (self.pool.k, self.pool.v))
        count = (self.n_sink + self.n_total) * F
        positions = torch.cat([torch.arange(self.n_sink * F), torch.arange(count - held * F, count)])
        return positions, k, v

    def held_frames(self) -> torch.Tensor:
        return self.bank.held_frames()


class StreamingGenerator(nn.Module):
    """Tiny streaming video generator; ``run(num_blocks)`` returns a :class:`PipelineRun` whose outputs are the
    block latents ``frames [N, B, fpb * fsl, C]`` and the bank's held frame indices ``bank_frames [B, M]``."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, num_layers: int = 4, heads: int = 4,
                 head_dim: int = 32, frame_seq_len: int = 64, frames_per_block: int = 3, window_frames: int = 15,
                 sink_frames: int = 1, bank_size: int = 6, num_entities: int = 8, text_len: int = 16,
                 text_dim: int = 64, batch: int = 1, steps: int = 2, switch_every: int = 4,
                 dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0, sparse_bank: int | None = None):
        super().__init__()
        if sparse_bank is not None and (not isinstance(sparse_bank, int) or sparse_bank < 1):
            raise ValueError(f"sparse_bank: expected None or a positive int (bank frames per head), got {sparse_bank!r}")
        self.backend, self.sparse_bank = backend, sparse_bank
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
        self.prompts = [base, near, far]

    # --- prompts and entities ------------------------------------------------------------------------------

    def _entities(self, segment: int):
        """Deterministic stand-in for the LLM agent: entity token weights ``[S]`` and entity ids of a segment."""
        pos = torch.arange(self.text_len, device=self.device)
        focus = (pos - segment * 5) % self.text_len < 4     # 4 entity tokens, on the device (no copy from host)
        w = torch.where(focus, 1.0, 0.1).to(self.dtype)
        return w, [segment % self.num_entities, (segment + 3) % self.num_entities]

    def _context(self, block: int, sched: AdaptiveScheduler, state: dict):
        """Cross-attention context of ``block``: the blend of the previous and current prompts."""
        segment = block // self.switch_every
        new = self.prompts[segment % len(self.prompts)]
        if segment == 0:
            return new, segment
        old = self.prompts[(segment - 1) % len(self.prompts)]
        since = (block - segment * self.switch_every) * self.fpb
        if self.eager:
            if since == 0:
                sched.update_for_switch(_compute_prompt_distance(old, new))
                state.setdefault("windows", []).append(sched.window_frames)
            alpha = sched.get_alpha(since)
            return old * (1.0 - alpha) + new * alpha, segment
        alpha = device_alpha(old, new, since, sched)
        return old * (1.0 - alpha).to(self.dtype) + new * alpha.to(self.dtype), segment

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

    def _block(self, i: int, noise, cache, sched, state, frames: list):
        T, C = self.fpb * self.fsl, self.h * self.d
        n_win, n_total = state["n_win"], state["n_total"]
        s_new = min(T, max(0, self.sink - i * T))
        e = max(0, n_win + (T - s_new) - self.window)
        context, segment = self._context(i, sched, state)
        tk, tv = zip(*(blk.text_kv(context) for blk in self.blocks))
        text_kv = torch.stack(tk), torch.stack(tv)
        weights, entities = self._entities(segment)
        cache.start_block(e, text_kv[0], weights, entities, (self.sink + n_total - n_win) // self.fsl)
        pos = sinusoid(torch.arange(i * self.fpb, (i + 1) * self.fpb, device=self.device), C)
        pos = pos.repeat_interleave(self.fsl, dim=0).to(self.dtype)
        x = noise
        for step in range(self.steps):
            pred, _, _ = self._forward(x + pos, cache, text_kv)
            keep = (step + 1) / (self.steps + 1)
            x = pred if step == self.steps - 1 else keep * pred + (1 - keep) * noise
        _, k_new, v_new = self._forward(x + pos, cache, text_kv)
        cache.append(k_new, v_new)
        state["n_win"], state["n_total"] = min(n_win + T - s_new, self.window), n_total + T - s_new
        frames.append(x)

    @torch.no_grad()
    def run(self, num_blocks: int, forbid_syncs: bool = False, progress=None,
            observe: Callable[[BlockState], None] | None = None) -> PipelineRun:
        """Stream ``num_blocks`` blocks; ``forbid_syncs`` makes any host read in a block raise; ``observe`` is
        called with a :class:`BlockState` after each block, outside the timed step (it may read the device)."""
        cache = _ShiftCache(self) if self.eager else _PagedCache(self)
        sched = AdaptiveScheduler(3, 15, 3, self.fpb)
        state, frames = {"n_win": 0, "n_total": 0}, []
        record = PipelineRun("StreamingGenerator", self.backend if not self.eager else "torch (eager)", {})
        T, C = self.fpb * self.fsl, self.h * self.d
        for i in range(num_blocks):
            noise = randn((self.batch, T, C), self.seed * 1000 + i, self.device, self.dtype)   # input, untimed
            timed_step(record, self.device, lambda: self._block(i, noise, cache, sched, state, frames),
                       forbid=forbid_syncs)
            if observe is not None:
                observe(BlockState(i, frames[-1], *cache.held(), cache.held_frames()))
            if progress is not None:
                progress()
        record.outputs = {"frames": torch.stack(frames), "bank_frames": cache.held_frames()}
        record.info = {"bank_count": cache.bank.count, "windows": state.get("windows"),
                       "sparse_bank": self.sparse_bank}
        return record

"""``StreamingGenerator`` (seeds 001 + 000): block-causal streaming with sinks, a local window and a memory bank.

A tiny random causal transformer streams blocks of ``frames_per_block`` latent frames (``frame_seq_len`` tokens
each). Each block is denoised in ``steps`` passes and then cached by one pass over its clean output; every pass
attends to ``[sink frames, bank frames, the last window frames, itself]`` (window counted with the current block,
Self-Forcing style). Frames pushed out of the window are offered to the :class:`MemoryBank`.

Prompt switches follow seed 000 improvement 1: ``distance = 1 − cos(mean(old), mean(new))``,
``window = max(fpb, ⌊(min + clamp(distance, 0, 1)·(max − min)) / fpb⌋·fpb)`` frames, and the cross-attention
context of a block ``f`` frames after the switch is ``(1 − α)·old + α·new`` with the cosine schedule
``α = 0`` for ``f < delay``, else ``(1 − cos(π·min(1, (f − delay)/window)))/2``.

* ``eager=True`` (``backend="torch"``): the source pipelines' cache — per-layer tensors shifted by copy when the
  window is full, ``torch.cat`` of sink + bank + window on every pass, a Python scheduler fed by ``.item()``.
* ``eager=False``: ``KVRing`` (one ``append`` per block for all layers), the op-backed :class:`MemoryBank`,
  and the schedule computed on the device: no host sync in the loop.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

from ..kv_ring import KVRing
from ._runtime import PipelineRun, timed_step
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
    (eager, ring, or any later one) reports the same state for the same stream, so paths can be compared block by
    block."""

    block: int
    frame: torch.Tensor
    positions: torch.Tensor
    cache_k: torch.Tensor
    cache_v: torch.Tensor
    bank_frames: torch.Tensor


class _ShiftCache:
    """The source pipelines' cache: per layer ``[B, sink + window, H, D]`` in logical order, shifted by copy."""

    def __init__(self, nl, b, h, d, sink, window, dtype, device):
        self.k = [torch.zeros(b, sink + window, h, d, dtype=dtype, device=device) for _ in range(nl)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.sink, self.window, self.n_sink, self.n_win, self.count = sink, window, 0, 0, 0

    def held(self):
        """``(positions [n], k, v [NL, B, n, H, D])``: sinks, then the window from oldest to newest."""
        positions = torch.cat([torch.arange(self.n_sink), torch.arange(self.count - self.n_win, self.count)])
        w = slice(self.sink, self.sink + self.n_win)
        k, v = (torch.stack([torch.cat([t[:, :self.n_sink], t[:, w]], dim=1) for t in ts]) for ts in (self.k, self.v))
        return positions, k, v

    def evicted(self, e: int):
        if not e:
            return None
        s = slice(self.sink, self.sink + e)
        return torch.stack([k[:, s] for k in self.k]), torch.stack([v[:, s] for v in self.v])

    def keys(self, layer: int, e: int, bank):
        k, v = self.k[layer], self.v[layer]
        parts_k = [k[:, :self.n_sink].clone(), k[:, self.sink + e:self.sink + self.n_win].clone()]
        parts_v = [v[:, :self.n_sink].clone(), v[:, self.sink + e:self.sink + self.n_win].clone()]
        if bank[0] is not None:
            parts_k.append(bank[0][layer])
            parts_v.append(bank[1][layer])
        return parts_k, parts_v

    def append(self, k_new, v_new, e: int):
        s_new = min(k_new.shape[2], self.sink - self.n_sink)
        for layer in range(len(self.k)):
            for cache, new in ((self.k[layer], k_new[layer]), (self.v[layer], v_new[layer])):
                cache[:, self.n_sink:self.n_sink + s_new] = new[:, :s_new]
                if e:
                    keep = self.n_win - e
                    cache[:, self.sink:self.sink + keep] = cache[:, self.sink + e:self.sink + self.n_win].clone()
                m = new.shape[1] - s_new
                at = self.sink + self.n_win - e
                cache[:, at:at + m] = new[:, s_new:]
        self.n_sink += s_new
        self.n_win += k_new.shape[2] - s_new - e
        self.count += k_new.shape[2]


class _RingCache:
    """The accelerated cache: ``streamkern.KVRing`` plus host-side counts (no reads of device values)."""

    def __init__(self, nl, b, h, d, sink, window, dtype, device, backend):
        self.ring = KVRing(nl, b, h, d, window, sink=sink, dtype=dtype, device=device, backend=backend)
        self.sink, self.window, self.n_sink, self.n_total_win = sink, window, 0, 0

    def held(self):
        """``(positions [n], k, v [NL, B, n, H, D])`` from the ring's own device state, in logical order."""
        positions = self.ring.positions
        k, v = self.ring.ordered()
        return positions[positions >= 0].sort().values.cpu(), k, v

    def _live(self, e: int) -> list[tuple[int, int]]:
        held = min(self.n_total_win, self.window)
        return _circular(self.n_total_win - held + e, held - e, self.window, self.sink)

    def evicted(self, e: int):
        if not e:
            return None
        held = min(self.n_total_win, self.window)
        ranges = _circular(self.n_total_win - held, e, self.window, self.sink)
        return (torch.cat([self.ring.k[:, :, a:b] for a, b in ranges], dim=2),
                torch.cat([self.ring.v[:, :, a:b] for a, b in ranges], dim=2))

    def keys(self, layer: int, e: int, bank):
        ranges = [(0, self.n_sink)] + self._live(e)
        parts_k = [self.ring.k[layer, :, a:b] for a, b in ranges]
        parts_v = [self.ring.v[layer, :, a:b] for a, b in ranges]
        if bank[0] is not None:
            parts_k.append(bank[0][layer])
            parts_v.append(bank[1][layer])
        return parts_k, parts_v

    def append(self, k_new, v_new, e: int):
        self.ring.append(k_new, v_new)
        s_new = min(k_new.shape[2], self.sink - self.n_sink)
        self.n_sink += s_new
        self.n_total_win += k_new.shape[2] - s_new


class StreamingGenerator(nn.Module):
    """Tiny streaming video generator; ``run(num_blocks)`` returns a :class:`PipelineRun` whose outputs are the
    block latents ``frames [N, B, fpb * fsl, C]`` and the bank's held frame indices ``bank_frames [B, M]``."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, num_layers: int = 4, heads: int = 4,
                 head_dim: int = 32, frame_seq_len: int = 64, frames_per_block: int = 3, window_frames: int = 15,
                 sink_frames: int = 1, bank_size: int = 6, num_entities: int = 8, text_len: int = 16,
                 text_dim: int = 64, batch: int = 1, steps: int = 2, switch_every: int = 4,
                 dtype: torch.dtype = torch.float32, device="cpu", seed: int = 0):
        super().__init__()
        self.backend = backend
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

    def _forward(self, x, cache, e, bank, text_kv):
        """One pass over a block ``x [B, T, C]`` → ``(out, k [NL, B, T, H, D], v)``."""
        ks, vs = [], []
        for layer, block in enumerate(self.blocks):
            def attend(q, k, v, layer=layer):
                pk, pv = cache.keys(layer, e, bank)
                return sdpa(q, torch.cat(pk + [k], dim=1), torch.cat(pv + [v], dim=1))
            x, k, v = block(x, attend, (text_kv[0][layer], text_kv[1][layer]))
            ks.append(k)
            vs.append(v)
        return x, torch.stack(ks), torch.stack(vs)

    def _block(self, i: int, noise, cache, bank: MemoryBank, sched, state, frames: list):
        T, C = self.fpb * self.fsl, self.h * self.d
        n_win, n_total = state["n_win"], state["n_total"]
        s_new = min(T, max(0, self.sink - i * T))
        e = max(0, n_win + (T - s_new) - self.window)
        context, segment = self._context(i, sched, state)
        tk, tv = zip(*(blk.text_kv(context) for blk in self.blocks))
        text_kv = torch.stack(tk), torch.stack(tv)
        if e:
            weights, entities = self._entities(segment)
            chunk_k, chunk_v = cache.evicted(e)
            first = (self.sink + n_total - n_win) // self.fsl
            bank.insert(chunk_k, chunk_v, text_kv[0], weights, entities, first)
        bank_kv = bank.kv()
        pos = sinusoid(torch.arange(i * self.fpb, (i + 1) * self.fpb, device=self.device), C)
        pos = pos.repeat_interleave(self.fsl, dim=0).to(self.dtype)
        x = noise
        for step in range(self.steps):
            pred, _, _ = self._forward(x + pos, cache, e, bank_kv, text_kv)
            keep = (step + 1) / (self.steps + 1)
            x = pred if step == self.steps - 1 else keep * pred + (1 - keep) * noise
        _, k_new, v_new = self._forward(x + pos, cache, e, bank_kv, text_kv)
        cache.append(k_new, v_new, e)
        state["n_win"], state["n_total"] = min(n_win + T - s_new, self.window), n_total + T - s_new
        frames.append(x)

    @torch.no_grad()
    def run(self, num_blocks: int, forbid_syncs: bool = False, progress=None,
            observe: Callable[[BlockState], None] | None = None) -> PipelineRun:
        """Stream ``num_blocks`` blocks; ``forbid_syncs`` makes any host read in a block raise; ``observe`` is
        called with a :class:`BlockState` after each block, outside the timed step (it may read the device)."""
        args = (self.nl, self.batch, self.h, self.d, self.sink, self.window, self.dtype, self.device)
        cache = _ShiftCache(*args) if self.eager else _RingCache(*args, self.backend)
        bank = MemoryBank(self.nl, self.batch, self.h, self.d, self.fsl, self.bank_size, self.num_entities,
                          dtype=self.dtype, device=self.device, backend=self.backend, eager=self.eager)
        sched = AdaptiveScheduler(3, 15, 3, self.fpb)
        state, frames = {"n_win": 0, "n_total": 0}, []
        record = PipelineRun("StreamingGenerator", self.backend if not self.eager else "torch (eager)", {})
        T, C = self.fpb * self.fsl, self.h * self.d
        for i in range(num_blocks):
            noise = randn((self.batch, T, C), self.seed * 1000 + i, self.device, self.dtype)   # input, untimed
            timed_step(record, self.device, lambda: self._block(i, noise, cache, bank, sched, state, frames),
                       forbid=forbid_syncs)
            if observe is not None:
                observe(BlockState(i, frames[-1], *cache.held(), bank.held_frames()))
            if progress is not None:
                progress()
        record.outputs = {"frames": torch.stack(frames), "bank_frames": bank.held_frames()}
        record.info = {"bank_count": bank.count, "windows": state.get("windows")}
        return record

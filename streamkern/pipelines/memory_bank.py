"""``MemoryBank`` (seed 000, improvements 2 and 3): a bank of ``bank_size`` latent frames holding every layer's KV.

A chunk of ``F`` frames leaving the attention window is offered to the bank: the three-layer consensus picks its
best frame (``score[b, f] = Σ_l λ_l · mean_h(q_l · kbar_l[f]) / sqrt(D)``), the entity-diversity rule picks the
victim slot (first free slot; else the lowest-score slot whose entities are all covered twice; else the lowest-score
slot), and the frame's KV for all layers is copied into that slot.

* ``eager=True`` (``backend="torch"``): the seed's own code — per-layer ``_compute_frame_scores_fast`` with a Python
  sum, ``argmax().item()``, a dict archive of frames and the Python ``_select_frame_to_evict`` loop, KV concatenated
  with ``torch.cat`` on every read.
* ``eager=False``: ``select_frame`` → ``bank_evict_select`` → ``bank_insert`` on preallocated storage
  ``k, v [NL, B, M * frame_seq_len, H, D]``; every decision stays on the device (no host sync).
  (``StreamingKV`` makes the same decisions on its pages' mean keys and copies the kept frame into its bank region.)

``run(steps)`` streams ``steps`` random evicted chunks through the bank (the demo's ``MemoryBank`` row).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.bank_evict_select import bank_evict_select, entity_mask
from ..ops.bank_insert import bank_insert
from ..ops.consensus_frame_scores import select_frame
from ..ops.reference.consensus_frame_scores import seed_fast_scores
from .runtime import PipelineRun, nbytes, part, timed_step


@dataclass
class FrameInfo:
    """One archived frame as the seed keeps it: score, entities, and its KV ``[NL, B, fsl, H, D]``."""

    frame_id: list[int]
    score: float
    associated_entities: list[int]
    k: torch.Tensor
    v: torch.Tensor


class MemoryBank:
    """Bank of ``bank_size`` frames; see the module docstring. ``frame_id`` numbers a frame in the whole stream."""

    def __init__(self, num_layers: int, batch: int, heads: int, head_dim: int, frame_seq_len: int,
                 bank_size: int = 6, num_entities: int = 8, layers=None, layer_weights=(0.2, 0.3, 0.5), *,
                 dtype: torch.dtype = torch.float32, device=None, backend: str = "torch", eager: bool | None = None):
        self.frame_seq_len, self.max_memory_frames, self.num_entities = frame_seq_len, bank_size, num_entities
        self.batch = batch
        self.layers = list(layers if layers is not None else (0, num_layers // 2, num_layers - 1))
        self.layer_weights = list(layer_weights)
        self.backend = backend
        self.eager = backend == "torch" if eager is None else eager
        self.count = 0  # frames held: the bank fills slots in order, so the valid slots are a prefix
        self.shape = (num_layers, batch, heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device if device is not None else "cpu")
        if self.eager:
            self.frame_archive: dict[int, FrameInfo] = {}
            self.frame_active_memory: list[int] = []
            self._next_id = 0
            return
        shape = (num_layers, batch, bank_size * frame_seq_len, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.scores = torch.zeros(bank_size, dtype=torch.float32, device=device)
        self.entity_mask = torch.zeros(bank_size, num_entities, dtype=torch.bool, device=device)
        self.valid = torch.zeros(bank_size, dtype=torch.bool, device=device)
        self.frame_ids = torch.full((bank_size, batch), -1, dtype=torch.int64, device=device)

    # --- the seed's code (eager) ---------------------------------------------------------------------------

    def _select_frame_to_evict(self):
        """Seed 000 §2.3, as written: prefer the lowest-score frame whose entities are all covered elsewhere."""
        if len(self.frame_active_memory) < self.max_memory_frames:
            return None
        entity_coverage = {}
        for fid in self.frame_active_memory:
            for eid in self.frame_archive[fid].associated_entities:
                entity_coverage.setdefault(eid, []).append(fid)
        candidates = []
        for fid in self.frame_active_memory:
            info = self.frame_archive[fid]
            all_covered = all(len(entity_coverage.get(eid, [])) > 1 for eid in info.associated_entities)
            candidates.append((fid, info.score, all_covered))
        redundant = [c for c in candidates if c[2]]
        if redundant:
            return min(redundant, key=lambda x: x[1])[0]
        return min(candidates, key=lambda x: x[1])[0]

    def _insert_eager(self, chunk_k, chunk_v, text_k, entity_weights, entities, first_frame_id):
        with part("scoring", self.device) as moved:
            final_scores = seed_fast_scores(chunk_k, text_k, entity_weights, self.frame_seq_len, self.layers,
                                            self.layer_weights)
            best = [final_scores[b].argmax().item() for b in range(final_scores.shape[0])]
            score = sum(final_scores[b, f].item() for b, f in enumerate(best)) / len(best)
            moved(nbytes(chunk_k[0], text_k[0]) * len(self.layers))
        with part("eviction", self.device) as moved:
            fsl = self.frame_seq_len
            k = torch.stack([chunk_k[:, b, f * fsl:(f + 1) * fsl] for b, f in enumerate(best)], dim=1)
            v = torch.stack([chunk_v[:, b, f * fsl:(f + 1) * fsl] for b, f in enumerate(best)], dim=1)
            victim = self._select_frame_to_evict()
            if victim is not None:
                self.frame_active_memory.remove(victim)
                del self.frame_archive[victim]
            self.frame_archive[self._next_id] = FrameInfo([first_frame_id + f for f in best], score,
                                                          sorted(entities), k, v)
            self.frame_active_memory.append(self._next_id)
            self._next_id += 1
            self.count = len(self.frame_active_memory)
            moved(2 * nbytes(k, v))

    # --- the ops (accelerated) -----------------------------------------------------------------------------

    def _choose(self, chunk_k, text_k, entity_weights, entities, first_frame_id):
        """The accelerated decisions of :meth:`insert`: ``(best [B], victim [])`` int64 on the device, the slot's
        score, entities, validity and frame ids updated."""
        with part("scoring", self.device) as moved:
            best, scores = select_frame(chunk_k, text_k, entity_weights, self.frame_seq_len, self.layers,
                                        self.layer_weights, backend=self.backend)
            score = scores.gather(1, best[:, None]).mean().reshape(1)
            moved(nbytes(chunk_k[0], text_k[0]) * len(self.layers))
        with part("eviction", self.device) as moved:
            victim = bank_evict_select(self.scores, self.entity_mask, self.valid, backend=self.backend)
            slot = victim.reshape(1)
            mask = entity_mask(entities, self.num_entities, self.valid.device)
            self.scores.index_copy_(0, slot, score)
            self.entity_mask.index_copy_(0, slot, mask)
            self.valid.index_fill_(0, slot, True)
            self.frame_ids.index_copy_(0, slot, (best + first_frame_id)[None])
            moved(nbytes(self.scores, self.entity_mask, self.valid))
        self.count = min(self.count + 1, self.max_memory_frames)
        return best, victim

    def _insert_ops(self, chunk_k, chunk_v, text_k, entity_weights, entities, first_frame_id):
        best, victim = self._choose(chunk_k, text_k, entity_weights, entities, first_frame_id)
        with part("eviction", self.device) as moved:
            bank_insert(self.k, self.v, chunk_k, chunk_v, best, victim, self.frame_seq_len, backend=self.backend)
            moved(4 * nbytes(self.k[:, :, :self.frame_seq_len]))

    # --- public --------------------------------------------------------------------------------------------

    def insert(self, chunk_k: torch.Tensor, chunk_v: torch.Tensor, text_k: torch.Tensor,
               entity_weights: torch.Tensor, entities, first_frame_id: int) -> None:
        """Offer an evicted chunk: ``chunk_k/v [NL, B, F * fsl, H, D]``, ``text_k [NL, B, S, H, D]``, ``entity_weights
        [S]``, ``entities`` the entity ids of the current prompt, ``first_frame_id`` the stream index of frame 0."""
        insert = self._insert_eager if self.eager else self._insert_ops
        insert(chunk_k, chunk_v, text_k, entity_weights, entities, first_frame_id)

    def kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's KV ``[NL, B, count * fsl, H, D]`` (slot order; attention does not depend on it)."""
        if self.eager:
            infos = [self.frame_archive[fid] for fid in self.frame_active_memory]
            if not infos:
                return None, None
            with part("cache", self.device) as moved:
                k, v = torch.cat([i.k for i in infos], dim=2), torch.cat([i.v for i in infos], dim=2)
                moved(2 * nbytes(k, v))
            return k, v
        n = self.count * self.frame_seq_len
        return (self.k[:, :, :n], self.v[:, :, :n]) if n else (None, None)

    def held_frames(self) -> torch.Tensor:
        """Stream indices of the frames held, ``[B, count]`` sorted per row (for comparing backends)."""
        if self.eager:
            ids = [self.frame_archive[fid].frame_id for fid in self.frame_active_memory]
            return torch.tensor(ids, dtype=torch.int64).reshape(len(ids), self.batch).T.sort(dim=1).values
        return self.frame_ids[:self.count].T.sort(dim=1).values.cpu()

    def _by_frame(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank's KV ``[NL, B, count * fsl, H, D]`` ordered by the stream index of row 0's frames."""
        k, v = self.kv()
        if self.eager:
            ids = [self.frame_archive[fid].frame_id[0] for fid in self.frame_active_memory]
        else:
            ids = self.frame_ids[:self.count, 0].tolist()
        fsl, order = self.frame_seq_len, sorted(range(len(ids)), key=ids.__getitem__)
        return (torch.cat([k[:, :, n * fsl:(n + 1) * fsl] for n in order], dim=2).cpu(),
                torch.cat([v[:, :, n * fsl:(n + 1) * fsl] for n in order], dim=2).cpu())

    @torch.no_grad()
    def run(self, steps: int = 16, chunk_frames: int = 3, text_len: int = 16, seed: int = 0,
            forbid_syncs: bool = False, progress=None) -> PipelineRun:
        """Offer ``steps`` random chunks of ``chunk_frames`` frames (drawn untimed) and read the bank's KV after
        each (what an attention pass over it does first). Outputs: ``bank_frames [B, M]`` and the bank's
        ``bank_k``/``bank_v`` ordered by frame."""
        NL, B, H, D = self.shape
        record = PipelineRun("MemoryBank", "torch (eager)" if self.eager else self.backend, {})
        g = torch.Generator().manual_seed(seed)
        for step in range(steps):
            chunk_k, chunk_v = (torch.randn(NL, B, chunk_frames * self.frame_seq_len, H, D, generator=g).to(
                self.device, self.dtype) for _ in range(2))
            text_k = torch.randn(NL, B, text_len, H, D, generator=g).to(self.device, self.dtype)
            weights = torch.rand(text_len, generator=g).to(self.device, self.dtype)
            entities = [step % self.num_entities, (step + 3) % self.num_entities] if step % 3 else []
            timed_step(record, self.device, lambda: (self.insert(chunk_k, chunk_v, text_k, weights, entities,
                                                                 chunk_frames * step), self.kv()),
                       forbid=forbid_syncs)
            if progress is not None:
                progress()
        k, v = self._by_frame()
        record.outputs = {"bank_frames": self.held_frames(), "bank_k": k, "bank_v": v}
        record.info = {"bank_count": self.count}
        return record

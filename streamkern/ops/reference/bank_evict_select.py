"""Memory-bank eviction in eager PyTorch (the ``"torch"`` backend) and the seed's original Python rule.

Seed 000 §2.3, docs/contract.md §4.2. Slots ``i < M`` hold frames with a score ``scores[i]`` and a set of entities
``{e : entity_mask[i, e]}``; ``valid[i]`` says whether slot i holds a frame at all::

    if any slot is invalid:  victim = the first invalid slot
    coverage[e] = Σ_i entity_mask[i, e]
    redundant[i] = every entity e of slot i has coverage[e] >= 2      (true for a slot with no entity)
    candidates   = redundant slots if there is one, else every slot
    victim       = the candidate with the lowest score, ties to the lowest index

NaN scores (not defined by the seed) rank above +inf: a NaN slot is chosen only when every candidate is NaN,
and then the lowest-index candidate. ``-0.0`` and ``+0.0`` are the same score.

Mapping to the seed, whose bank is a list of frame ids that grows to ``max_memory_frames``: a bank that is not full
(the seed returns ``None``, "no eviction") has an empty slot, and the new frame goes into the first one, so the
op returns that slot; a full bank is ``valid`` everywhere, slot i is the seed's i-th active frame, and the op returns
the slot of the frame the seed evicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


def bank_evict_select(scores: torch.Tensor, entity_mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The rule above with tensor ops only (no host sync): ``scores [M]``, ``entity_mask [M, E]``, ``valid [M]``
    -> ``[]`` int64 slot index."""
    M = scores.shape[0]
    slot = torch.arange(M, device=scores.device)
    s = scores.to(torch.float64 if scores.dtype == torch.float64 else torch.float32)
    coverage = entity_mask.sum(0)                                           # [E]
    redundant = ~(entity_mask & (coverage < 2)).any(1)                      # [M]
    cand = torch.where(redundant.any(), redundant, torch.ones_like(redundant))
    finite_cand = cand & ~s.isnan()
    cand = torch.where(finite_cand.any(), finite_cand, cand)               # NaN only when all candidates are NaN
    lowest = torch.where(cand, s, float("inf")).amin()
    best = cand & ((s == lowest) | ~finite_cand.any())                      # all-NaN: every candidate ties
    victim = torch.where(best, slot, M).amin()
    first_invalid = torch.where(valid, M, slot).amin()
    return torch.where(first_invalid < M, first_invalid, victim)


# --- the seed's formulation ----------------------------------------------------------------------------------


@dataclass
class FrameInfo:
    """What the seed's ``frame_archive`` keeps per frame (the fields ``_select_frame_to_evict`` reads)."""

    score: float
    associated_entities: list = field(default_factory=list)


@dataclass
class SeedMemoryBank:
    """The state ``_select_frame_to_evict`` reads: active frame ids in insertion order, the archive, the capacity."""

    frame_active_memory: list
    frame_archive: dict
    max_memory_frames: int

    def _select_frame_to_evict(self):
        """Seed 000 §2.3, transcribed: None while the bank is not full, else the id of the frame to evict."""
        if len(self.frame_active_memory) < self.max_memory_frames:
            return None

        entity_coverage = {}
        for fid in self.frame_active_memory:
            info = self.frame_archive[fid]
            for eid in info.associated_entities:
                entity_coverage.setdefault(eid, []).append(fid)

        candidates = []
        for fid in self.frame_active_memory:
            info = self.frame_archive[fid]
            all_covered = all(
                len(entity_coverage.get(eid, [])) > 1
                for eid in info.associated_entities
            )
            candidates.append((fid, info.score, all_covered))

        redundant = [c for c in candidates if c[2]]
        if redundant:
            return min(redundant, key=lambda x: x[1])[0]
        else:
            return min(candidates, key=lambda x: x[1])[0]


def seed_bank_from_tensors(scores: torch.Tensor, entity_mask: torch.Tensor, valid: torch.Tensor) -> SeedMemoryBank:
    """The seed's state built from the op's tensors with ``.tolist()``, as a source pipeline must: frame id
    ``i`` for each valid slot i, in slot order."""
    s, mask, ok = scores.tolist(), entity_mask.tolist(), valid.tolist()
    active = [i for i in range(len(ok)) if ok[i]]
    archive = {i: FrameInfo(s[i], [e for e, on in enumerate(mask[i]) if on]) for i in active}
    return SeedMemoryBank(active, archive, len(ok))


def seed_select_frame_to_evict(scores: torch.Tensor, entity_mask: torch.Tensor, valid: torch.Tensor) -> int | None:
    """The seed's eager path end to end (tensors -> lists -> ``_select_frame_to_evict``): the slot to evict, or
    ``None`` when the bank is not full (the op then returns the first invalid slot)."""
    return seed_bank_from_tensors(scores, entity_mask, valid)._select_frame_to_evict()

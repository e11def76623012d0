"""Memory-bank eviction on the device (seed 000 §2.3; docs/contract.md §4.2).

``bank_evict_select(scores [M], entity_mask [M, E], valid [M]) -> [] int64``: the first invalid slot if any;
else the lowest-score slot among those whose every entity is covered by another slot too (a slot with no
entity counts as covered), or among all slots when none is; ties to the lowest index; NaN scores rank above
+inf. The rule, its NaN convention and its mapping to the seed's "bank not full -> no eviction" are spelled out in
``streamkern/ops/reference/bank_evict_select.py``. The accelerated backends are one launch of one program that returns the
slot as a device tensor: no ``.item()``, no Python loop over slots.

Limits: ``1 <= M <= 64`` slots and ``E <= 256`` entities (the single-program kernels hold the whole mask on
chip); larger banks raise ``ValueError`` on every backend.
"""
from __future__ import annotations

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from .reference import bank_evict_select as ref

MAX_SLOTS = 64
MAX_ENTITIES = 256


def _check(scores, entity_mask, valid):
    check.tensor("scores", scores, ndim=1, dtypes=check.FLOATS)
    check.tensor("entity_mask", entity_mask, ndim=2, dtypes=(torch.bool,))
    check.tensor("valid", valid, ndim=1, dtypes=(torch.bool,))
    check.same_device(scores=scores, entity_mask=entity_mask, valid=valid)
    M = scores.shape[0]
    if not 1 <= M <= MAX_SLOTS:
        raise ValueError(f"scores: expected 1 to {MAX_SLOTS} slots (the single-program kernels' limit), got M={M}")
    check.shape("entity_mask", entity_mask, (M, None), ("M", "E"))
    if entity_mask.shape[1] > MAX_ENTITIES:
        raise ValueError(f"entity_mask: expected at most {MAX_ENTITIES} entities (the single-program kernels' "
                         f"limit), got E={entity_mask.shape[1]}")
    check.shape("valid", valid, (M,), ("M",))


_EXTENSION = Kernel(cxx("bank_evict_select_"), out=True)
bank_evict_select_op = define_op(
    "bank_evict_select", "(Tensor scores, Tensor entity_mask, Tensor valid) -> Tensor",
    {"torch": ref.bank_evict_select, "cpu": _EXTENSION, "triton": triton("bank_evict_select:bank_evict_select"),
     "cuda": _EXTENSION},
    check=_check, alloc=lambda scores, entity_mask, valid: torch.empty((), dtype=torch.int64, device=scores.device))


def bank_evict_select(scores: torch.Tensor, entity_mask: torch.Tensor, valid: torch.Tensor, *,
                      backend: str | None = None) -> torch.Tensor:
    """The bank slot to write next: the first empty slot, else the entity-redundant frame to evict.

    Args:
        scores: ``[M]`` float32 (fp16/bf16 accepted) relevance of the frame held by each slot.
        entity_mask: ``[M, E]`` bool, ``entity_mask[i, e]`` when the frame of slot i shows entity e.
        valid: ``[M]`` bool, which slots hold a frame.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Returns:
        ``[]`` int64 slot index on the inputs' device (never read back to the host).
    """
    return bank_evict_select_op(scores, entity_mask, valid, backend=backend)


def entity_mask(entities, num_entities: int, device) -> torch.Tensor:
    """One bank slot's row of ``bank_evict_select``'s ``entity_mask``: ``[1, E]`` bool, True at the ids in
    ``entities`` (host ints, built on the device without a host-to-device copy, or an int64 ``[n]`` tensor on
    ``device``); ids outside ``[0, E)`` match nothing (callers check them where they may read them)."""
    ids = torch.arange(num_entities, device=device)
    if isinstance(entities, torch.Tensor):
        return (ids == entities[:, None]).any(0, keepdim=True)
    mask = torch.zeros(1, num_entities, dtype=torch.bool, device=device)
    for e in entities:
        mask |= ids == e
    return mask

"""Multi-layer consensus frame scoring (seed 000, improvement 3; docs/contract.md §4.1).

``score[b, f] = Σ_l λ_l · mean_h(q_l[b,h] · kbar_l[b,f,h]) / sqrt(D)`` where ``q_l`` is the entity-weighted
sum of layer l's text keys and ``kbar_l`` the mean key of frame f: see ``streamkern/ops/reference/consensus_frame_scores.py``.
The accelerated backends read each selected layer's chunk keys and text keys once, in one launch, and write
only ``[B, F]``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from .reference import consensus_frame_scores as ref

DEFAULT_LAYERS = (0, 15, 29)
DEFAULT_LAYER_WEIGHTS = (0.2, 0.3, 0.5)


def _check(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights):
    check.tensor("chunk_k", chunk_k, ndim=5, dtypes=check.FLOATS)
    check.tensor("text_k", text_k, ndim=5, dtypes=check.FLOATS)
    check.tensor("entity_weights", entity_weights, ndim=(1, 2), dtypes=check.FLOATS)
    check.same_device(chunk_k=chunk_k, text_k=text_k, entity_weights=entity_weights)
    check.same_dtype(chunk_k=chunk_k, text_k=text_k)
    NL, B, L, H, D = chunk_k.shape
    S = text_k.shape[2]
    if H == 0 or D == 0:  # the mean over heads and the 1/sqrt(D) scale are undefined
        raise ValueError(f"chunk_k: expected at least one head and a head dim D >= 1, got shape {list(chunk_k.shape)}")
    check.shape("text_k", text_k, (NL, B, None, H, D), ("NL", "B", "S", "H", "D"))
    check.shape("entity_weights", entity_weights, (S,) if entity_weights.dim() == 1 else (B, S))
    check.integer("frame_seq_len", frame_seq_len, low=1)
    if L % frame_seq_len:
        raise ValueError(f"frame_seq_len: expected a divisor of the chunk length L={L}, got {frame_seq_len}")
    layers = check.int_tuple("layers", layers, low=0, high=NL - 1)
    if not layers:
        raise ValueError("layers: expected at least one layer index, got ()")
    layer_weights = check.float_tuple("layer_weights", layer_weights, length=len(layers))
    return chunk_k, text_k, entity_weights, frame_seq_len, list(layers), list(layer_weights)


def _alloc(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights):
    return torch.empty(chunk_k.shape[1], chunk_k.shape[2] // frame_seq_len, dtype=torch.float32,
                       device=chunk_k.device)


_EXTENSION = Kernel(cxx("consensus_frame_scores_"), out=True)
consensus_frame_scores_op = define_op(
    "consensus_frame_scores", "(Tensor chunk_k, Tensor text_k, Tensor entity_weights, int frame_seq_len, "
    "int[] layers, float[] layer_weights) -> Tensor",
    {"torch": ref.consensus_frame_scores, "cpu": _EXTENSION, "triton": triton("consensus_frame_scores:consensus_frame_scores"),
     "cuda": _EXTENSION},
    check=_check, alloc=_alloc)


def consensus_frame_scores(chunk_k: torch.Tensor, text_k: torch.Tensor, entity_weights: torch.Tensor,
                           frame_seq_len: int, layers: Sequence[int] = DEFAULT_LAYERS,
                           layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS, *,
                           backend: str | None = None) -> torch.Tensor:
    """Score each frame of an evicted chunk by its agreement with the entity-weighted text keys.

    Args:
        chunk_k: ``[NL, B, F * frame_seq_len, H, D]`` keys of the chunk for every block (fp32/fp16/bf16).
        text_k: ``[NL, B, S, H, D]`` cross-attention key cache, same dtype.
        entity_weights: ``[S]`` or ``[B, S]`` non-negative token weights (normalised inside).
        frame_seq_len: tokens per latent frame; must divide the chunk length.
        layers, layer_weights: the blocks that vote and their weights λ.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"``, or ``None`` for the current default.

    Returns:
        ``[B, F]`` float32 scores (``[B, 0]`` for an empty chunk).

    Non-finite values in the keys or weights propagate as IEEE arithmetic does over the expanded sum
    ``Σ_l λ_l/(H·√D·fsl) Σ_{t∈f} k_l[b,t,:]·q_l[b,:]`` (every backend sums these products; README "Error rules").
    """
    return consensus_frame_scores_op(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights,
                                     backend=backend)


def select_frame(chunk_k: torch.Tensor, text_k: torch.Tensor, entity_weights: torch.Tensor, frame_seq_len: int,
                 layers: Sequence[int] = DEFAULT_LAYERS, layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS, *,
                 backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The best frame of the chunk: ``(best [B] int64, scores [B, F] float32)``, argmax on the device
    (ties to the lowest frame index), never read back to the host. A chunk of no frame has no best one:
    ``ValueError`` naming ``chunk_k``."""
    if isinstance(chunk_k, torch.Tensor) and chunk_k.dim() == 5 and chunk_k.shape[2] == 0:
        raise ValueError(f"chunk_k: expected at least one frame to select from (L >= frame_seq_len), "
                         f"got shape {list(chunk_k.shape)}")
    scores = consensus_frame_scores(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights,
                                    backend=backend)
    return scores.argmax(dim=-1), scores

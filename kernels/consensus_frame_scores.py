"""Triton kernel for consensus frame scoring (docs/contract.md §4.1), one launch for all selected layers and frames.

Program ``(split, hd_block, b, i)`` owns the ``BLOCK_HD`` slice ``[hd0, hd0 + BLOCK_HD)`` of the flattened
H·D axis of selected layer ``i = layers[i]`` and batch row ``b``, and the token range ``[t0, t1)`` of split
``split``. It

1. computes its slice of ``q = Σ_s w[b, s] · text_k[l, b, s, :] / (Σ_s w[b, s] + 1e-8)`` (tiles of BLOCK_S rows),
2. streams its tokens frame by frame: for each frame f overlapping ``[t0, t1)`` it accumulates the scalar
   ``Σ_t k[l, b, t, slice] · q[slice]`` and adds ``λ_i / (H·√D·fsl)`` times it atomically into ``out[b, f]``.

Every chunk key is read once; each split re-reads the text-key slice once, so the host picks the number of
token splits to give the GPU enough programs while keeping ``splits · S`` small next to ``L``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._constants import DeviceConstants, to_device
from ._grid import grid as launch_grid


# Not specialisation keys: the chunk's token and frame counts (StreamingKV scores the frames it evicts, 1 to a
# chunk's worth); loop bounds and scalar offsets. The chunk strides stay keys: their divisibility lets the
# chunk-key loads vectorise.
@triton.jit(do_not_specialize=["L", "F", "tokens_per_split"])
def _consensus_frame_scores_kernel(out_ptr, chunk_ptr, text_ptr, w_ptr, layer_ptr, lam_ptr,
                      L, S, HD, D, F, fsl, tokens_per_split, n_hd_blocks,
                      sc_l, sc_b, sc_t, sc_h, sc_d,
                      st_l, st_b, st_s, st_h, st_d,
                      sw_b, sw_s, norm,
                      FLAT: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    pid = tl.program_id(0)
    split = pid // n_hd_blocks
    hd_block = pid % n_hd_blocks
    b = tl.program_id(1).to(tl.int64)
    i = tl.program_id(2)
    layer = tl.load(layer_ptr + i).to(tl.int64)
    lam = tl.load(lam_ptr + i)

    hd = hd_block * BLOCK_HD + tl.arange(0, BLOCK_HD)
    hd_ok = hd < HD
    if FLAT:  # both tensors hold each [H, D] row as H·D contiguous elements: contiguous (vector) loads
        text_off = hd.to(tl.int64)
        chunk_off = hd.to(tl.int64)
    else:
        h = (hd // D).to(tl.int64)
        d = (hd % D).to(tl.int64)
        text_off = h * st_h + d * st_d
        chunk_off = h * sc_h + d * sc_d

    # 1. the q slice, float32
    text_row = text_ptr + layer * st_l + b * st_b + text_off
    q = tl.zeros([BLOCK_HD], dtype=tl.float32)
    wsum = tl.zeros([BLOCK_S], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_ok = s < S
        w = tl.load(w_ptr + b * sw_b + s.to(tl.int64) * sw_s, mask=s_ok, other=0.0).to(tl.float32)
        x = tl.load(text_row[None, :] + s.to(tl.int64)[:, None] * st_s, mask=s_ok[:, None] & hd_ok[None, :],
                    other=0.0).to(tl.float32)
        q += tl.sum(x * w[:, None], axis=0)
        wsum += w
    q = q / (tl.sum(wsum, axis=0) + 1e-8)

    # 2. the tokens of this split, frame by frame
    chunk_row = chunk_ptr + layer * sc_l + b * sc_b + chunk_off
    t0 = split * tokens_per_split
    t1 = tl.minimum(t0 + tokens_per_split, L)
    scale = lam * norm
    for f in range(t0 // fsl, (t1 + fsl - 1) // fsl):
        fa = tl.maximum(f * fsl, t0)
        fb = tl.minimum(f * fsl + fsl, t1)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for ta in range(fa, fb, BLOCK_T):
            t = ta + tl.arange(0, BLOCK_T)
            t_ok = t < fb
            ok = t_ok[:, None] & hd_ok[None, :]
            k = tl.load(chunk_row[None, :] + t.to(tl.int64)[:, None] * sc_t, mask=ok, other=0.0).to(tl.float32)
            acc += tl.sum(tl.where(ok, k * q[None, :], 0.0), axis=1)  # padding lanes add 0 even if q is inf
        tl.atomic_add(out_ptr + b * F + f, tl.sum(acc, axis=0) * scale)


_LAYERS = DeviceConstants("consensus layer table",
                          lambda key, device: (to_device(key[0], torch.int64, device),
                                               to_device(key[1], torch.float32, device)))


def layer_table(layers, layer_weights, device: torch.device):
    """Selected layer ids (int64) and weights (float32) on ``device``, built once per distinct selection (outside
    CUDA-graph capture, see ``_constants``)."""
    return _LAYERS.get((tuple(layers), tuple(layer_weights)), device)


def _splits(n_programs_per_split: int, L: int, S: int, device: torch.device) -> int:
    """Number of token splits: enough programs to fill the GPU, but each split at least ~2·S tokens (and 256)
    so that re-reading the text-key slice per split stays well under the chunk-key reads."""
    if device.type != "cuda":
        return max(1, min(2, L))  # interpreter: exercise the multi-split path on tiny shapes
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    wanted = math.ceil(target / max(1, n_programs_per_split))
    return max(1, min(wanted, L // max(2 * S, 256)))


def _flat(x: torch.Tensor) -> bool:
    """Each ``[H, D]`` row of ``x [NL, B, T, H, D]`` is one contiguous run of H·D elements."""
    return x.stride(4) == 1 and (x.stride(3) == x.shape[4] or x.shape[3] == 1)


def consensus_frame_scores(chunk_k: torch.Tensor, text_k: torch.Tensor, weights: torch.Tensor, frame_seq_len: int,
                           layers, layer_weights) -> torch.Tensor:
    """``[B, F]`` float32 consensus scores (docs/contract.md §4.1) in one Triton launch; arguments already checked.

    ``chunk_k [NL, B, L, H, D]`` and ``text_k [NL, B, S, H, D]`` in any strides, ``weights [S]`` or ``[B, S]``.
    """
    _, B, L, H, D = chunk_k.shape
    S = text_k.shape[2]
    F = L // frame_seq_len
    HD = H * D
    out = torch.zeros(B, F, dtype=torch.float32, device=chunk_k.device)
    if out.numel() == 0 or HD == 0:
        return out
    ids, lam = layer_table(layers, layer_weights, chunk_k.device)
    BLOCK_HD = min(64, triton.next_power_of_2(HD))
    n_hd = triton.cdiv(HD, BLOCK_HD)
    splits = _splits(n_hd * B * len(layers), L, S, chunk_k.device)
    tokens_per_split = triton.cdiv(L, splits)
    splits = triton.cdiv(L, tokens_per_split)
    sw_b = weights.stride(0) if weights.dim() == 2 else 0
    launch = launch_grid("consensus_frame_scores", (splits * n_hd, "token splits x H*D blocks"), (B, "batch"),
                  (len(layers), "layers"))
    _consensus_frame_scores_kernel[launch](
        out, chunk_k, text_k, weights, ids, lam,
        L, S, HD, D, F, frame_seq_len, tokens_per_split, n_hd,
        *chunk_k.stride(), *text_k.stride(), sw_b, weights.stride(-1),
        1.0 / (H * math.sqrt(D) * frame_seq_len),
        FLAT=_flat(chunk_k) and _flat(text_k), BLOCK_HD=BLOCK_HD, BLOCK_S=32, BLOCK_T=32,
    )
    return out

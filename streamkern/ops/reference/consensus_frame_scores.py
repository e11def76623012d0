"""Consensus frame scoring in eager PyTorch: the ``"torch"`` backend and the seed's two formulations.

Seed 000, improvement 3. Shapes: ``chunk_k [NL, B, L, H, D]`` with ``L = F * frame_seq_len``,
``text_k [NL, B, S, H, D]``, ``entity_weights [S]`` or ``[B, S]``.

For each chosen layer l with weight λ_l::

    w          = entity_weights / (Σ_s entity_weights + 1e-8)
    q[b,h]     = Σ_s w[s] · text_k[l,b,s,h]                     (the weighted text-key aggregate)
    kbar[b,f,h]= mean over the tokens t of frame f of chunk_k[l,b,t,h]
    score[b,f]+= λ_l · mean_h(q[b,h] · kbar[b,f,h]) / sqrt(D)
               = λ_l / (H·sqrt(D)·fsl) · Σ_{t in f} chunk_k[l,b,t,:,:] · q[b,:,:]      (the order every backend sums)

The last form is the one computed: with a non-finite key its IEEE result (±inf, or NaN once infinities of both
signs meet) is the same on every backend, whereas averaging the keys first could cancel or keep an infinity that
the per-token sums of the kernels do not.
"""
from __future__ import annotations

import torch


def normalized_weights(entity_weights: torch.Tensor, batch: int) -> torch.Tensor:
    """``[B, S]`` float32 weights summing to one per row (``+1e-8`` keeps all-zero rows finite)."""
    w = entity_weights.float()
    if w.dim() == 1:
        w = w.unsqueeze(0).expand(batch, -1)
    return w / (w.sum(-1, keepdim=True) + 1e-8)


def consensus_frame_scores(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights):
    """The ``"torch"`` backend: the fast form of the seed, computed in float32 (float64 for float64 inputs)."""
    acc = torch.float64 if chunk_k.dtype == torch.float64 else torch.float32
    _, B, L, H, D = chunk_k.shape
    F = L // frame_seq_len
    w = normalized_weights(entity_weights, B).to(acc)
    scores = torch.zeros(B, F, dtype=acc, device=chunk_k.device)
    for layer, lam in zip(layers, layer_weights):
        q = torch.einsum("bshd,bs->bhd", text_k[layer].to(acc), w)
        dots = torch.einsum("bthd,bhd->bt", chunk_k[layer].to(acc), q)                 # [B, L] per-token k·q
        scores += dots.reshape(B, F, frame_seq_len).sum(-1) * (lam / (H * D ** 0.5 * frame_seq_len))
    return scores.float() if acc == torch.float32 else scores


def seed_quadratic_scores(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights):
    """The seed's original form (``_compute_frame_scores_with_entity_focus``): per layer,
    ``A = text_k · chunk_kᵀ`` per head ``[B*H, S, L]``, weighted by w over S, summed over S, averaged over
    heads and over the tokens of each frame, scaled by D^-1/2. O(S·L·D): for tests and the benchmark."""
    acc = torch.float64 if chunk_k.dtype == torch.float64 else torch.float32
    _, B, L, H, D = chunk_k.shape
    S = text_k.shape[2]
    F = L // frame_seq_len
    w = normalized_weights(entity_weights, B).to(acc)
    scores = torch.zeros(B, F, dtype=acc, device=chunk_k.device)
    for layer, lam in zip(layers, layer_weights):
        qt = text_k[layer].to(acc).permute(0, 2, 1, 3).reshape(B * H, S, D)
        kt = chunk_k[layer].to(acc).permute(0, 2, 1, 3).reshape(B * H, L, D)
        attn = torch.bmm(qt, kt.transpose(1, 2)) * D ** -0.5                    # [B*H, S, L]
        weighted = attn * w.repeat_interleave(H, dim=0).unsqueeze(-1)          # [B*H, S, L]
        per_token = weighted.sum(1).reshape(B, H, L).mean(1)                   # [B, L]
        scores += lam * per_token.reshape(B, F, frame_seq_len).mean(-1)
    return scores


def seed_fast_scores(chunk_k, text_k, entity_weights, frame_seq_len, layers, layer_weights):
    """The seed's eager fast form as written (one ``_compute_frame_scores_fast`` call per layer, in the
    input dtype, per-layer slicing and a Python sum), kept per batch row. The benchmark's eager baseline."""
    _, B, L, H, D = chunk_k.shape
    F = L // frame_seq_len
    all_scores = []
    for layer, lam in zip(layers, layer_weights):
        w = entity_weights.to(text_k.dtype)
        w = w / (w.sum(-1, keepdim=True) + 1e-8)
        if w.dim() == 1:
            q_agg = torch.einsum("bshd,s->bhd", text_k[layer], w)
        else:
            q_agg = torch.einsum("bshd,bs->bhd", text_k[layer], w)
        k_agg = chunk_k[layer].view(B, F, frame_seq_len, H, D).mean(dim=2)
        s = torch.einsum("bhd,bfhd->bhf", q_agg, k_agg) * (D ** -0.5)
        all_scores.append(s.mean(dim=1).float() * lam)
    return sum(all_scores)

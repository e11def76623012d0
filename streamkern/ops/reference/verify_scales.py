"""Batched scale verification in eager PyTorch: the ``"torch"`` backend and the SDVAR-style eager check.

Seed 003 (SDVAR), docs/contract.md §4.4. The window holds ``NS`` consecutive scales, ``T`` tokens; ``offsets [NS + 1]``
are the window-relative token offsets of its scales (scale s owns tokens ``[offsets[s], offsets[s + 1])``).
For a token row ``(b, t)`` of scale ``s``::

    l      = (1 + cfg[s]) · logits[b, t] − cfg[s] · logits[B + b, t]      (or logits[b, t] without CFG)
    z      = l (greedy) or l / temperature (sample)
    valid  = every z < +inf and max(z) > −inf                              (NaN / +inf / all −inf rows are invalid)
    greedy: target = argmax(l) (lowest index on ties),  match = valid ∧ draft == target
    sample: p = softmax(z),  x = draft,  match = valid ∧ q(x) > 0 ∧ u0 · q(x) < p(x)
            (u0 < min(1, p(x)/q(x)) for u0 ∈ [0, 1); a NaN, negative or infinite q(x) rejects)
    ratio[b, s]  = mean of match over scale s: hits / n correctly rounded to float32
    accepted[b]  = length of the leading run of scales with ratio >= threshold (sample: ratio == 1), compared in
                   float32 (threshold rounded to float32), so k of n matches at threshold k/n always pass
    tokens[b, t] = draft in accepted scales; −1 after the first rejected scale; in the first rejected scale
                   greedy: target, sample: draft where matched, else the inverse-CDF draw with u1 from
                   r = max(0, p − q) (from p when Σ r = 0): the smallest v with r[v] > 0 and
                   cumsum(r)[v] > u1 · Σ r (the last v with r > 0 when rounding leaves none, or when u1 · Σ r
                   is NaN or +inf). Invalid rows give target/draw −1.

Draft probabilities that are NaN, negative or do not sum to 1 are rejected by :func:`check_values` on the
"torch"/"cpu" backends (GPU backends: only with ``STREAMKERN_DEBUG=1``); unchecked, every backend computes the
formulas above with IEEE arithmetic and ``max(0, d)`` read as ``d if d > 0 else 0`` (so a NaN q_v gives r_v = 0,
q_v = −inf gives r_v = +inf).
"""
from __future__ import annotations

import struct

import torch


def scale_ids(offsets, device) -> torch.Tensor:
    """``[T]`` int64: the window-relative scale of each token."""
    sizes = torch.tensor([offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)], device=device)
    return torch.repeat_interleave(torch.arange(len(sizes), device=device), sizes)


def combined_logits(logits, offsets, cfg, acc):
    """``[B, T, V]`` guided logits in ``acc``: ``(1 + t_s)·cond − t_s·uncond`` per scale, or the logits."""
    x = logits.to(acc)
    if cfg is None:
        return x
    B = x.shape[0] // 2
    t = torch.tensor(cfg, dtype=acc, device=x.device)[scale_ids(offsets, x.device)][None, :, None]
    return (1 + t) * x[:B] - t * x[B:]


def invalid_rows(x: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the row holds a NaN or +inf, or is all −inf."""
    return ~(x < float("inf")).all(-1) | (x.amax(-1) == float("-inf"))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row of ``weights [..., V] >= 0``: the smallest v with ``w[v] > 0`` and ``cumsum(w)[v] > u · Σ w``,
    else the last v with ``w[v] > 0`` (−1 if none)."""
    cdf = weights.cumsum(-1)
    positive = weights > 0
    hit = positive & (cdf > u.unsqueeze(-1) * cdf[..., -1:])
    idx = torch.arange(weights.shape[-1], device=weights.device)
    last = torch.where(positive, idx, -1).amax(-1)
    first = torch.where(hit, idx, weights.shape[-1]).amin(-1)
    return torch.where(first < weights.shape[-1], first, last)


def _float32(x: float) -> float:
    """``x`` rounded to the nearest float32, on the host alone (no tensor is made and read back, so the reference
    can be captured in a step graph)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def scale_ratios(match: torch.Tensor, offsets) -> torch.Tensor:
    """``[B, NS]`` float32 share of True per scale, ``hits / n`` correctly rounded: divided in float64 (exact to
    well under half a float32 ulp for n < 2^24), since ``mean`` and division by a scalar multiply by ``1 / n`` on
    CUDA."""
    hits = [match[:, offsets[s]:offsets[s + 1]].sum(-1, dtype=torch.float64) for s in range(len(offsets) - 1)]
    return torch.stack([h / (offsets[s + 1] - offsets[s]) for s, h in enumerate(hits)], -1).float()


def verify_scales(logits, draft_tokens, offsets, greedy, threshold, draft_probs, uniforms, cfg, temperature):
    """The ``"torch"`` backend; float64 inputs are computed in float64. Returns
    ``(accepted [B] int64, match [B, T] bool, ratio [B, NS] float32, tokens [B, T] int64)``."""
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = combined_logits(logits, offsets, cfg, acc)
    draft = draft_tokens.unsqueeze(-1)
    if greedy:
        bad = invalid_rows(x)
        target = torch.where(bad, -1, x.argmax(-1))
        match = ~bad & (draft_tokens == target)
    else:
        z = x / temperature
        bad = invalid_rows(z)
        p = torch.softmax(z, dim=-1)
        q = draft_probs.to(acc)
        px, qx = p.gather(-1, draft).squeeze(-1), q.gather(-1, draft).squeeze(-1)
        match = ~bad & (qx > 0) & (uniforms[..., 0].to(acc) * qx < px)
        d = p - q
        r = torch.where(d > 0, d, 0.0)
        r = torch.where(r.sum(-1, keepdim=True) > 0, r, p)
        target = torch.where(bad, -1, inverse_cdf(r, uniforms[..., 1].to(acc)))
        target = torch.where(match, draft_tokens, target)
    ratio = scale_ratios(match, offsets)
    ok = ratio >= _float32(threshold) if greedy else ratio == 1
    accepted = ok.long().cumprod(-1).sum(-1)
    sid = scale_ids(offsets, logits.device)[None, :]
    first = accepted[:, None]
    tokens = torch.where(sid < first, draft_tokens, torch.where(sid == first, target, -1))
    return accepted, match, ratio, tokens


def check_values(draft_tokens, draft_probs, vocab: int, tol: float = 1e-3) -> None:
    """Value checks that read the tensors (host sync): token ids in ``[0, V)``; draft probabilities
    non-negative with rows summing to 1 within ``tol``."""
    from streamkern import _checks as check

    check.index_range("draft_tokens", draft_tokens, vocab)
    if draft_probs is not None and draft_probs.numel():
        q = draft_probs.double()
        low = float(q.min())
        worst = float((q.sum(-1) - 1).abs().max())
        if low < 0 or worst > tol or worst != worst:
            raise ValueError(f"draft_probs: expected non-negative rows summing to 1 (within {tol}), "
                             f"got min {low:.3g} and largest |row sum - 1| {worst:.3g}")


def sdvar_greedy_check(logits, draft_tokens, offsets, cfg, threshold):
    """The eager check as SDVAR writes it (seed 003: top-1 match + 50 % threshold), one scale at a time
    with host syncs: VAR's CFG combine ``(1 + t)·cond − t·uncond`` on the scale's slice, argmax, match
    ratio read back with ``.item()``, stop at the first scale under the threshold. The benchmark's eager
    baseline. Returns ``(accepted: int, tokens [B, T] int64)`` like the greedy mode, for ``B`` rows that
    the seed verifies together (a scale counts when the batch-mean ratio passes; equal to the per-row
    rule for B = 1)."""
    B = draft_tokens.shape[0]
    tokens = torch.full_like(draft_tokens, -1)
    accepted = 0
    for si in range(len(offsets) - 1):
        a, b = offsets[si], offsets[si + 1]
        logits_BlV = logits[:, a:b].float()
        if cfg is not None:
            t = cfg[si]
            logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
        target_idx = logits_BlV.argmax(dim=-1)
        match_ratio = (target_idx == draft_tokens[:, a:b]).float().mean().item()
        if match_ratio >= threshold:
            tokens[:, a:b] = draft_tokens[:, a:b]
            accepted += 1
        else:
            tokens[:, a:b] = target_idx
            break
    return accepted, tokens

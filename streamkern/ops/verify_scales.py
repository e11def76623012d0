"""Batched scale verification for speculative next-scale decoding (seed 003, SDVAR; docs/contract.md §4.4).

The target model scores a window of ``NS`` scales (``T`` tokens) proposed by a draft model in one forward pass;
``verify_scales`` decides how many scales to keep, in greedy mode (SDVAR's top-1 match with a ratio threshold) or
in sample mode (lossless speculative sampling: the kept and redrawn tokens follow the target distribution).
The formulas are in ``streamkern/ops/reference/verify_scales.py``. The accelerated backends read each logits row once
(CFG combined on the fly, online max/sum/argmax), then a tiny per-batch-row pass finds the first rejected scale,
and, in sample mode only, the rejected rows of that scale are read again for the residual redraw. Every
result stays on the device: no host sync. ``"cpu"``: ``csrc/cpu/verify_scales.cpp`` (at::parallel_for over rows, chunked
float scan). ``"triton"``: ``kernels/verify_scales.py`` (one program per row, V tiles of up to 4096). ``"cuda"``:
``csrc/cuda/verify_scales.cu`` (a warp per row for many small-vocabulary rows, a 256/1024-thread block per row otherwise).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from .reference import verify_scales as ref

MODES = ("greedy", "sample")
MAX_CUDA_SCALES = 64  # the CUDA launcher passes the per-scale offsets and CFG ratios by value


class VerifyResult(NamedTuple):
    """``accepted [B] int64`` leading accepted scales; ``match [B, T] bool`` per-token test; ``ratio [B, NS]
    float32`` share of matches per scale; ``tokens [B, T] int64`` the tokens to keep (−1 after the first
    rejected scale)."""

    accepted: torch.Tensor
    match: torch.Tensor
    ratio: torch.Tensor
    tokens: torch.Tensor


def _outputs(logits, draft_tokens, num_scales, greedy):
    B, T = draft_tokens.shape
    dev = logits.device
    return (torch.empty(B, dtype=torch.int64, device=dev), torch.empty(B, T, dtype=torch.bool, device=dev),
            torch.empty(B, num_scales, dtype=torch.float32, device=dev),
            torch.empty(B, T, dtype=torch.int64, device=dev),
            torch.empty(B, T, 0 if greedy else 2, dtype=torch.float32, device=dev))


def _values(logits, draft_tokens, offsets, greedy, threshold, draft_probs, *config):
    ref.check_values(draft_tokens, draft_probs, logits.shape[-1])


def _torch(*args):
    return tuple(o.contiguous() for o in ref.verify_scales(*args))


def _filling(launch: Callable) -> Callable:
    """A backend whose ``launch`` fills the outputs (a scratch buffer last) with the same argument order."""
    def run(logits, draft_tokens, offsets, greedy, threshold, draft_probs, uniforms, cfg, temperature):
        out = _outputs(logits, draft_tokens, len(offsets) - 1, greedy)
        launch(*out, logits, draft_tokens, draft_probs, uniforms, offsets, cfg, greedy, threshold, temperature)
        return out[:4]
    return run


_EXTENSION = _filling(cxx("verify_scales_"))


def _cuda_supports(logits, draft_tokens, offsets, *config) -> str:
    ns = len(offsets) - 1
    return "" if ns <= MAX_CUDA_SCALES else (
        f"takes at most {MAX_CUDA_SCALES} scales (the launcher passes their offsets by value), got {ns}")


def _fake(logits, draft_tokens, offsets, *config):
    return _outputs(logits, draft_tokens, len(offsets) - 1, True)[:4]


verify_scales_op = define_op(
    "verify_scales", "(Tensor logits, Tensor draft_tokens, int[] offsets, bool greedy, float threshold, "
    "Tensor? draft_probs, Tensor? uniforms, float[]? cfg, float temperature) -> (Tensor, Tensor, Tensor, Tensor)", {
        "torch": _torch, "cpu": _EXTENSION, "triton": _filling(triton("verify_scales:verify_scales")),
        "cuda": Kernel(_EXTENSION, supports=_cuda_supports),
    }, values=_values, fake=_fake)


def _window(begin: tuple, end: tuple, first_scale: int, num_scales: int) -> tuple[int, ...]:
    if len(begin) != len(end):
        raise ValueError(f"layout: expected .begin and .end of one length, got {len(begin)} and {len(end)}")
    check.integer("first_scale", first_scale, low=0, high=len(begin) - 1)
    check.integer("num_scales", num_scales, low=1, high=len(begin) - first_scale)
    scales = range(first_scale, first_scale + num_scales)
    for s in scales:
        if end[s] <= begin[s] or (s > first_scale and begin[s] != end[s - 1]):
            raise ValueError(f"layout: expected non-empty consecutive scales, got scale {s} at "
                             f"[{begin[s]}, {end[s]}) after [{begin[s - 1] if s else 0}, {end[s - 1] if s else 0})")
    base = begin[first_scale]
    return tuple(begin[s] - base for s in scales) + (end[scales[-1]] - base,)


def _cfg_list(cfg, num_scales):
    if cfg is None:
        return None
    if isinstance(cfg, torch.Tensor):
        if cfg.device.type != "cpu" or cfg.dim() != 1:
            raise ValueError(f"cfg: expected a 1-d CPU tensor or a sequence of numbers (host-side ratios), "
                             f"got shape {tuple(cfg.shape)} on {cfg.device}")
        cfg = cfg.tolist()
    cfg = list(check.float_tuple("cfg", cfg, length=num_scales))
    for s, t in enumerate(cfg):
        if t < 0:
            raise ValueError(f"cfg[{s}]: expected a guidance ratio >= 0, got {t}")
    return cfg


def _check(target_logits, draft_tokens, layout, first_scale, num_scales, mode, threshold, draft_probs, uniforms,
           cfg, temperature):
    check.tensor("target_logits", target_logits, ndim=3, dtypes=check.FLOATS)
    check.tensor("draft_tokens", draft_tokens, ndim=2, dtypes=check.INDEX)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    for attr in ("begin", "end"):
        if not hasattr(layout, attr):
            raise TypeError(f"layout: expected a ScaleLayout with .begin and .end, got {type(layout).__name__}")
    offsets = _window(tuple(int(x) for x in layout.begin), tuple(int(x) for x in layout.end), first_scale,
                      num_scales)
    B, T = draft_tokens.shape
    V = target_logits.shape[-1]
    if T != offsets[-1]:
        raise ValueError(f"draft_tokens: expected T={offsets[-1]} tokens for scales [{first_scale}, "
                         f"{first_scale + num_scales}), got {T}")
    cfg = _cfg_list(cfg, num_scales)
    rows = 2 * B if cfg is not None else B
    check.shape("target_logits", target_logits, (rows, T, None), ("2B" if cfg is not None else "B", "T", "V"))
    if V < 1:
        raise ValueError(f"target_logits: expected a vocabulary of at least 1, got V={V}")
    threshold = check.number("threshold", threshold, low=0.0, high=1.0)
    temperature = check.number("temperature", temperature, low=0.0, open_low=True)
    if mode == "sample":
        if draft_probs is None:
            raise ValueError("draft_probs: expected a [B, T, V] tensor in sample mode, got None")
        check.tensor("draft_probs", draft_probs, ndim=3, dtypes=check.FLOATS)
        check.shape("draft_probs", draft_probs, (B, T, V), ("B", "T", "V"))
        if uniforms is not None:
            check.tensor("uniforms", uniforms, ndim=3, dtypes=(torch.float32,))
            check.shape("uniforms", uniforms, (B, T, 2), ("B", "T", "2"))
    check.same_device(target_logits=target_logits, draft_tokens=draft_tokens, draft_probs=draft_probs,
                      uniforms=uniforms)
    return list(offsets), cfg, threshold, temperature


def verify_scales(target_logits: torch.Tensor, draft_tokens: torch.Tensor, layout, first_scale: int,
                  num_scales: int, *, mode: str = "greedy", threshold: float = 0.5,
                  draft_probs: torch.Tensor | None = None, uniforms: torch.Tensor | None = None,
                  cfg: Sequence[float] | torch.Tensor | None = None, temperature: float = 1.0,
                  generator: torch.Generator | None = None, backend: str | None = None) -> VerifyResult:
    """Verify the draft's tokens for scales ``[first_scale, first_scale + num_scales)`` against the target.

    Args:
        target_logits: ``[B, T, V]`` (fp32/fp16/bf16, any strides), or ``[2B, T, V]`` with ``cfg``: rows ``[0, B)``
            conditional, ``[B, 2B)`` unconditional, combined per scale s as ``(1 + cfg[s])·cond − cfg[s]·uncond``
            inside the kernels (never materialised).
        draft_tokens: ``[B, T]`` int64 in ``[0, V)``.
        layout: a ``ScaleLayout`` (``.begin``, ``.end`` token offsets per scale); T must equal the window's size.
        mode: ``"greedy"``: match = draft == argmax (lowest index on ties), a scale passes when its match ratio is
            ``>= threshold``; ``temperature`` is ignored. ``"sample"``: token accepted when
            ``uniforms[b,t,0] < min(1, p(x)/q(x))`` with ``p = softmax(l / temperature)`` and ``q = draft_probs``
            (q(x) = 0 rejects); a scale passes when all its tokens do; rejected tokens of the first rejected scale
            are redrawn by inverse CDF with ``uniforms[b,t,1]`` from ``normalise(max(0, p − q))`` (p if all zero).
            As temperature → 0 with one-hot ``draft_probs``, sample mode becomes greedy mode with threshold 1.
        draft_probs: ``[B, T, V]`` probabilities (rows sum to 1; checked by "torch"/"cpu" and with
            ``STREAMKERN_DEBUG=1``), sample mode only.
        uniforms: ``[B, T, 2]`` float32 in ``[0, 1)``; drawn with ``generator`` on the device when None.
        cfg: ``[num_scales]`` guidance ratios t, finite and ``>= 0`` (a sequence or a CPU tensor: host-side
            hyper-parameters).
        temperature: finite, ``> 0``.
        backend: ``"torch" | "cpu" | "triton" | "cuda" | "auto"`` or None for the current default.

    A row whose combined logits (divided by ``temperature`` in sample mode) hold a NaN or +inf, or are all −inf,
    is invalid: it never matches, and where the rules ask for its target or redrawn token, that token is −1
    (visible on the device, no sync needed). ``B = 0`` returns empty results; ``V = 1`` is a one-word vocabulary;
    ``T`` is never 0 (every scale holds at least one token). Unchecked draft probabilities (GPU backends without
    ``STREAMKERN_DEBUG=1``) follow the IEEE rules of ``streamkern/ops/reference/verify_scales.py`` on every backend.

    Returns:
        :class:`VerifyResult` ``(accepted [B] int64, match [B, T] bool, ratio [B, NS] float32, tokens [B, T] int64)``.
    """
    offsets, cfg, threshold, temperature = _check(target_logits, draft_tokens, layout, first_scale, num_scales,
                                                  mode, threshold, draft_probs, uniforms, cfg, temperature)
    greedy = mode == "greedy"
    if greedy:
        draft_probs = uniforms = None
    elif uniforms is None:
        uniforms = torch.rand(*draft_tokens.shape, 2, generator=generator, device=target_logits.device)
    return VerifyResult(*verify_scales_op(target_logits, draft_tokens, offsets, greedy, threshold, draft_probs,
                                          uniforms, cfg, temperature, backend=backend))

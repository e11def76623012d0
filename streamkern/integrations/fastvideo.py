"""FastVideo's causal self-attention on streamkern's ring cache (DESIGN.md §4.2; issue 15).

``accelerate(model)`` patches every causal self-attention layer of a FastVideo ``CausalWanTransformer3DModel``
(Self-Forcing-style causal Wan) or ``CausalMatrixGame2WanModel`` (Matrix-Game 2.0) in place; the model keeps its
own calling convention (``kv_cache=`` / ``crossattn_cache=`` / ``current_start=`` keywords) and FastVideo's
pipeline stages run it unchanged. fastvideo is imported only when ``accelerate`` is called.

Layer l's cache is FastVideo's own ``kv_cache[l]["k"]``/``["v"]`` ``[B, C, H, D]`` storage, used as a one-layer
``KVRing`` (``S = C`` slots, ``sink = sink_size · frame_seqlen`` tokens): logical token n lives in slot ``n`` if
``n < sink``, else ``sink + (n - sink) mod (C - sink)``. A call with ``T`` new tokens at token ``current_start``

1. applies FastVideo's RoPE to q and k (keys are cached after RoPE, the default ``rope_cache_policy``);
2. writes only the ``T`` new keys/values, with one ``ring_write``, at the slots of tokens
   ``[current_start, current_start + T)`` (repeated calls of a block, denoising steps and the clean pass, overwrite
   the same slots: the clean pass's keys are the ones that stay);
3. attends (softmax, no mask) over slots ``[0, min(current_start + T, C))`` of the storage in place: the sink
   frames, the newest ``C - sink`` tokens, current chunk included, which is the set FastVideo attends to after its
   roll, clone and slice. ``attention="sdpa"``: torch's ``scaled_dot_product_attention`` over those slots (a view);
   ``attention="frame"``: ``frame_attention`` with pages = FastVideo's latent frames (the storage viewed as
   ``[B, C / frame_seqlen, frame_seqlen, H, D]``, table = the valid frames); ``attention="auto"`` (default) takes
   the one measured faster on the device (``streamkern.streaming_kv.view_kernel``: SDPA on GPUs, ``frame`` where
   ``frame_attention`` runs on the ``"cpu"`` backend).

No ``.item()``: the position in the stream is kept on the host per cache tensor (``_STREAMS``), so the
``global_end_index``/``local_end_index`` tensors of the cache dicts are neither read nor updated. Matrix-Game 2.0's
action-module caches (``kv_cache_mouse``/``kv_cache_keyboard``) and the cross-attention caches stay FastVideo's.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._backend import _check_name
from ..ops.frame_attention import frame_attention
from ..ops.ring_write import ring_write
from ..streaming_kv import view_kernel

_WAN_GLOBAL_FRAMES = 21   # causal_wanvideo.GLOBAL_ATTN_COMPAT_MAX_LATENT_FRAMES: the window when local_attn_size=-1
_MG2_GLOBAL_FRAMES = 15   # matrixgame2/causal_model.py: the window when local_attn_size=-1


@dataclass
class _Stream:
    """Where a cache is in its stream (host ints): the token range of the newest block written."""

    start: int = 0
    end: int = 0


_STREAMS: WeakIdKeyDictionary = WeakIdKeyDictionary()   # kv_cache["k"] tensor -> _Stream
_TABLES: dict[tuple[torch.device, int], torch.Tensor] = {}   # (device, K) -> arange(K): the valid pages, in order
ATTENTION = ("auto", "frame", "sdpa")


def _check_order(cache_k: torch.Tensor, start: int, end: int) -> None:
    """A call may write tokens ``[start, end)`` when it starts a new stream (``start == 0``), the next block
    (``start`` = the end of the newest one) or the newest block again; anything else is refused."""
    stream = _STREAMS.get(cache_k)
    if start == 0 or stream is not None and (start == stream.end or (start, end) == (stream.start, stream.end)):
        return
    have = ("a fresh kv_cache" if stream is None
            else f"a kv_cache whose newest block is tokens [{stream.start}, {stream.end})")
    raise ValueError(f"current_start: expected 0, the end of the newest block or its start again (with the same "
                     f"number of tokens), got tokens [{start}, {end}) on {have}; streamkern's ring cache follows "
                     f"FastVideo's streaming order (a new request starts at 0 or on new cache tensors)")


@dataclass(frozen=True)
class _Options:
    backend: str | None
    attention: str


def _attend(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, valid: int, frame_seqlen: int,
            scale: float | None, options: _Options) -> torch.Tensor:
    """Softmax attention of ``q`` ``[B, T, H, D]`` over slots ``[0, valid)`` of the ``[B, C, H, D]`` storage."""
    attention = options.attention
    if attention == "auto":
        attention = "sdpa" if view_kernel(q.device, options.backend) == "sdpa" else "frame"
    if attention == "sdpa":
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), cache_k[:, :valid].transpose(1, 2), cache_v[:, :valid].transpose(1, 2), scale=scale)
        return out.transpose(1, 2)
    B, C, H, D = cache_k.shape
    pages = valid // frame_seqlen
    table = _TABLES.get((q.device, pages))
    if table is None:
        table = _TABLES.setdefault((q.device, pages), torch.arange(pages, device=q.device))
    k_pages, v_pages = (t.view(B, C // frame_seqlen, frame_seqlen, H, D) for t in (cache_k, cache_v))
    return frame_attention(q, k_pages, v_pages, table.expand(B, pages), sm_scale=scale, backend=options.backend)


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: dict, current_start: int,
                    frame_seqlen: int, sink_tokens: int, window_tokens: int, rolls: bool, scale: float | None,
                    options: _Options) -> torch.Tensor:
    """Write the roped ``k`` and ``v`` ``[B, T, H, D]`` into the ring and attend ``q`` ``[B, T, H, D]`` over it.

    ``window_tokens`` is FastVideo's ``max_attention_size``; ``rolls`` False (causal Wan with
    ``local_attn_size=-1``) means FastVideo never evicts, so a stream longer than the cache is refused as it is there.
    """
    cache_k, cache_v = kv_cache["k"], kv_cache["v"]
    if not isinstance(cache_k, torch.Tensor) or not isinstance(cache_v, torch.Tensor) or cache_k.dim() != 4:
        raise TypeError("kv_cache: expected a dict with 'k' and 'v' tensors [B, C, H, D], as FastVideo's stages make")
    if cache_k.dtype != k.dtype:
        raise TypeError(f"kv_cache['k']: expected the model's key dtype {k.dtype}, got {cache_k.dtype}")
    size, count = cache_k.shape[1], k.shape[1]
    end = current_start + count
    if size > window_tokens:
        raise ValueError(f"kv_cache['k']: a cache of {size} tokens is longer than the attention window of "
                         f"{window_tokens} tokens (local_attn_size · frame_seqlen); only caches the size of the "
                         f"window (FastVideo's stages allocate them so) are supported")
    if size % frame_seqlen or count % frame_seqlen or current_start % frame_seqlen:
        raise ValueError(f"kv_cache['k']: expected whole latent frames of {frame_seqlen} tokens (cache of {size}, "
                         f"tokens [{current_start}, {end}))")
    if count > size - sink_tokens:
        raise ValueError(f"q: expected at most {size - sink_tokens} new tokens (cache minus sink), got {count}")
    if not rolls and end > size:
        raise ValueError(f"current_start: tokens up to {end} do not fit the {size}-token cache, which FastVideo "
                         f"does not roll with local_attn_size=-1; set local_attn_size for longer rollouts")
    _check_order(cache_k, current_start, end)
    slot = current_start if current_start < sink_tokens else \
        sink_tokens + (current_start - sink_tokens) % (size - sink_tokens)
    ring_write(cache_k[None], cache_v[None], k[None], v[None], slot, sink=sink_tokens, backend=options.backend)
    _STREAMS[cache_k] = _Stream(current_start, end)
    return _attend(q, cache_k, cache_v, min(end, size), frame_seqlen, scale, options)


def _cached_only(attn) -> None:
    if attn.rope_cache_policy == "relativistic":
        raise ValueError("rope_cache_policy: 'relativistic' caches raw keys and ropes the window per step; "
                         "streamkern.integrations.fastvideo supports only the default 'absolute' policy "
                         "(keys cached after RoPE)")


def _wan_forward(attn, fv, options, q, k, v, freqs_cis, block_mask, kv_cache=None, current_start=0,
                 cache_start=None, frame_seqlen=1560):
    """``CausalWanSelfAttention.forward`` (same arguments) with the cached path on the ring."""
    if kv_cache is None:
        return type(attn).forward(attn, q, k, v, freqs_cis, block_mask, kv_cache, current_start, cache_start,
                                  frame_seqlen=frame_seqlen)
    _cached_only(attn)
    cos, sin = freqs_cis
    q = fv.apply_rotary_emb(q, cos, sin, is_neox_style=False).type_as(v)
    k = fv.apply_rotary_emb(k, cos, sin, is_neox_style=False).type_as(v)
    frames = _WAN_GLOBAL_FRAMES if attn.local_attn_size == -1 else attn.local_attn_size
    return _ring_attention(q, k, v, kv_cache, current_start, frame_seqlen, attn.sink_size * frame_seqlen,
                           frames * frame_seqlen, attn.local_attn_size != -1, attn.attn.softmax_scale, options)


def _matrixgame2_forward(attn, fv, options, q, k, v, freqs_cis, block_mask, grid_sizes, kv_cache=None,
                         current_start=0, cache_start=None):
    """``CausalMatrixGame2SelfAttention.forward`` (same arguments) with the cached path on the ring."""
    if kv_cache is None:
        return type(attn).forward(attn, q, k, v, freqs_cis, block_mask, grid_sizes, kv_cache, current_start,
                                  cache_start)
    _cached_only(attn)
    frame_seqlen = int(grid_sizes[1] * grid_sizes[2])
    if attn._freqs_cache is None or attn._freqs_cache.device != q.device:
        d = attn.head_dim   # the table FastVideo's own forward builds and keeps on the module
        attn._freqs_cache = torch.cat([fv.rope_params(1024, d - 4 * (d // 6)), fv.rope_params(1024, 2 * (d // 6)),
                                       fv.rope_params(1024, 2 * (d // 6))], dim=1).to(q.device)
    start_frame = current_start // frame_seqlen
    q = fv.causal_rope_apply(q, grid_sizes, attn._freqs_cache, start_frame=start_frame).type_as(v)
    k = fv.causal_rope_apply(k, grid_sizes, attn._freqs_cache, start_frame=start_frame).type_as(v)
    frames = _MG2_GLOBAL_FRAMES if attn.local_attn_size == -1 else attn.local_attn_size
    return _ring_attention(q, k, v, kv_cache, current_start, frame_seqlen, attn.sink_size * frame_seqlen,
                           frames * frame_seqlen, True, None, options)


@functools.lru_cache(maxsize=1)
def _fastvideo():
    """FastVideo's attention classes and the RoPE helpers their forwards use (imported on first use)."""
    from fastvideo.layers.rotary_embedding import _apply_rotary_emb
    from fastvideo.models.dits import causal_wanvideo
    from fastvideo.models.dits.matrixgame2 import causal_model

    class FV:
        apply_rotary_emb = staticmethod(_apply_rotary_emb)
        rope_params = staticmethod(causal_model.rope_params)
        causal_rope_apply = staticmethod(causal_model.causal_rope_apply)
        patches = {causal_wanvideo.CausalWanSelfAttention: _wan_forward,
                   causal_model.CausalMatrixGame2SelfAttention: _matrixgame2_forward}
    return FV


def accelerate(model: torch.nn.Module, *, backend: str | None = None, attention: str = "auto") -> torch.nn.Module:
    """Run the causal self-attention of a FastVideo causal Wan / Matrix-Game 2.0 model on streamkern's ring cache.

    Args:
        model: a ``fastvideo`` ``CausalWanTransformer3DModel`` or ``CausalMatrixGame2WanModel`` (or a module that
            holds one); patched in place, every ``CausalWanSelfAttention`` / ``CausalMatrixGame2SelfAttention``
            in it. Calling ``accelerate`` again only changes ``backend`` and ``attention``.
        backend: the backend of ``ring_write`` and ``frame_attention`` (``"torch" | "cpu" | "triton" | "cuda" |
            "auto"``, ``None`` for the default in force at each call), resolved per op as every streamkern op is.
        attention: ``"frame"`` (``frame_attention``, pages = latent frames), ``"sdpa"`` (torch's
            ``scaled_dot_product_attention`` over the same slots, in place) or ``"auto"``: the one measured faster
            on the device of each call (SDPA on GPUs).

    Returns:
        ``model``. Its outputs equal FastVideo's own path (float32 within 1e-5 relative error, bf16 within 1e-2),
        its uncached path (``kv_cache`` not passed) is FastVideo's, and its cached self-attention makes no host sync.

    Raises:
        TypeError: ``model`` holds no causal self-attention layer of either class.
        ValueError: a layer uses ``rope_cache_policy="relativistic"`` (raw keys cached), or ``backend`` or
            ``attention`` is unknown.
    """
    if backend is not None:
        _check_name(backend)
    if attention not in ATTENTION:
        raise ValueError(f"attention: expected one of {ATTENTION}, got {attention!r}")
    fv = _fastvideo()
    layers = [m for m in model.modules() if type(m) in fv.patches]
    if not layers:
        raise TypeError(f"model: expected a FastVideo CausalWanTransformer3DModel or CausalMatrixGame2WanModel "
                        f"(with CausalWanSelfAttention / CausalMatrixGame2SelfAttention layers), got "
                        f"{type(model).__name__} with none")
    for attn in layers:
        _cached_only(attn)
    for attn in layers:
        attn.forward = functools.partial(fv.patches[type(attn)], attn, fv, _Options(backend, attention))
    return model

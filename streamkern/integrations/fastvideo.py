"""FastVideo's causal self-attention on streamkern's ring cache (docs/contract.md §4.2; issue 15).

``accelerate(model)`` patches every causal self-attention layer of a FastVideo ``CausalWanTransformer3DModel``
(Self-Forcing-style causal Wan) or ``CausalMatrixGame2WanModel`` (Matrix-Game 2.0) in place; the model keeps its
own calling convention (``kv_cache=`` / ``crossattn_cache=`` / ``current_start=`` keywords) and FastVideo's
pipeline stages run it unchanged. fastvideo is imported only when ``accelerate`` is called.

Layer l's cache is FastVideo's own ``kv_cache[l]["k"]``/``["v"]`` ``[B, C, H, D]`` storage, used in place as a
one-layer ``KVRing`` (``KVRing.over``; ``S = C`` slots, ``sink = sink_size · frame_seqlen`` tokens), which does the
slot arithmetic: logical token n lives in slot ``n`` if ``n < sink``, else ``sink + (n - sink) mod (C - sink)``.
Each patched layer keeps one :class:`FastVideoStream` per cache it is called with (the ring, the newest block's
first token, the page table of ``attention="frame"``), held weakly by the cache's ``"k"`` tensor, so a request's
streams go with its caches; :func:`stream` returns it (e.g. to ``seek`` a prefilled cache). A call with ``T`` new
tokens at token ``current_start``

1. applies FastVideo's RoPE to q and k (keys are cached after RoPE, the default ``rope_cache_policy``);
2. writes only the ``T`` new keys/values, with one ``ring_write``, at the slots of tokens
   ``[current_start, current_start + T)``: ``KVRing.append`` for the next block (``reset`` first at
   ``current_start = 0``, a new stream), ``KVRing.rewrite`` for the newest block again (denoising steps and the
   clean pass overwrite the same slots: the clean pass's keys are the ones that stay);
3. attends (softmax, no mask) over slots ``[0, min(current_start + T, C))`` (the ring's ``length``) of the storage
   in place: the sink frames, the newest ``C - sink`` tokens, current chunk included, which is the set FastVideo
   attends to after its roll, clone and slice. ``attention="sdpa"``: torch's ``scaled_dot_product_attention`` over
   those slots (a view); ``attention="frame"``: ``frame_attention`` with pages = FastVideo's latent frames (the
   storage viewed as ``[B, C / frame_seqlen, frame_seqlen, H, D]``, table = the valid frames, a prefix of the
   stream's ``table``); ``attention="auto"`` (default) takes
   the one measured faster on the device (``streamkern.streaming_kv.view_kernel``: SDPA on GPUs, ``frame`` where
   ``frame_attention`` runs on the ``"cpu"`` backend).

No ``.item()``: the position in the stream is the ring's host-side count (and the stream's ``start``), so the
``global_end_index``/``local_end_index`` tensors of the cache dicts are neither read nor updated. Matrix-Game 2.0's
action-module caches (``kv_cache_mouse``/``kv_cache_keyboard``) and the cross-attention caches stay FastVideo's.
"""
from __future__ import annotations

import copy
import functools

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._backend import check_backend_name
from ..ops.frame_attention import frame_attention
from ..ops.ring_write import KVRing
from ..ops.view_attention import view_attention
from ..streaming_kv import view_kernel

_WAN_GLOBAL_FRAMES = 21   # causal_wanvideo.GLOBAL_ATTN_COMPAT_MAX_LATENT_FRAMES: the window when local_attn_size=-1
_MG2_GLOBAL_FRAMES = 15   # matrixgame2/causal_model.py: the window when local_attn_size=-1
ATTENTION = ("auto", "frame", "sdpa")


def _cache_tensors(kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
    cache_k, cache_v = kv_cache["k"], kv_cache["v"]
    if not isinstance(cache_k, torch.Tensor) or not isinstance(cache_v, torch.Tensor) or cache_k.dim() != 4:
        raise TypeError("kv_cache: expected a dict with 'k' and 'v' tensors [B, C, H, D], as FastVideo's stages make")
    return cache_k, cache_v


class FastVideoStream:
    """One accelerated layer's stream on one FastVideo ``kv_cache[l]`` dict.

    ``ring``: a one-layer :class:`~streamkern.KVRing` over the dict's ``"k"``/``"v"`` ``[B, C, H, D]`` storage
    (``KVRing.over`` of the two viewed as ``[1, B, C, H, D]``: written in place, ``sink`` = the sink frames' tokens,
    window ``C - sink``). Its ``count`` is the end of the newest block written and ``start`` (a host int) that
    block's first token, so the stream's position costs no device read. ``table``: the ``[C / frame_seqlen]``
    int64 page table of ``attention="frame"`` (latent frame i in page i), built once, on first use.

    Made by the accelerated layer the first time it is called with a cache; :func:`stream` returns it.
    """

    def __init__(self, cache_k: torch.Tensor, cache_v: torch.Tensor, *, frame_seqlen: int, sink: int,
                 backend: str | None = None):
        self.frame_seqlen = frame_seqlen
        # views of detached aliases: the ring must not keep the cache tensors alive (layers hold streams weakly by them)
        self.ring = KVRing.over(cache_k.detach()[None], cache_v.detach()[None], sink=sink, backend=backend)
        self.start = 0

    @property
    def end(self) -> int:
        """One past the last token of the newest block written (the ring's count)."""
        return self.ring.count

    @functools.cached_property
    def table(self) -> torch.Tensor:
        return torch.arange(self.ring.size // self.frame_seqlen, device=self.ring.k.device)

    def seek(self, start: int, end: int) -> None:
        """Take the cache as a stream whose newest block is tokens ``[start, end)``, as a stream that ran would have
        left it (e.g. a cache filled elsewhere); writes nothing. The next call may then start at ``end`` (the next
        block), at ``start`` with ``end - start`` tokens (this block again) or at 0 (a new stream)."""
        if not isinstance(start, int) or not isinstance(end, int) or not 0 <= start <= end:
            raise ValueError(f"start, end: expected ints with 0 <= start <= end, got {start!r}, {end!r}")
        self.ring.seek(end)
        self.start = start

    def check_order(self, start: int, end: int) -> None:
        """A call may write tokens ``[start, end)`` when it starts a new stream (``start == 0``), the next block
        (``start`` = the end of the newest one) or the newest block again; anything else is refused."""
        if start == 0 or start == self.end or (start, end) == (self.start, self.end):
            return
        have = ("a fresh kv_cache" if self.end == 0
                else f"a kv_cache whose newest block is tokens [{self.start}, {self.end})")
        raise ValueError(f"current_start: expected 0, the end of the newest block or its start again (with the same "
                         f"number of tokens), got tokens [{start}, {end}) on {have}; streamkern's ring cache follows "
                         f"FastVideo's streaming order (a new request starts at 0 or on new cache tensors)")

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Write the roped keys and values ``[B, T, H, D]`` of tokens ``[start, start + T)``: one ``ring_write`` at
        their slots (a new stream, the next block or the newest block again, as ``check_order`` allows)."""
        end = start + k.shape[1]
        self.check_order(start, end)
        if start == 0:
            self.ring.reset()
        if start == self.end:
            self.ring.append(k[None], v[None])
        else:
            self.ring.rewrite(k[None], v[None])
        self.start = start

    def attend(self, q: torch.Tensor, scale: float | None, attention: str) -> torch.Tensor:
        """Softmax attention of ``q`` ``[B, T, H, D]`` over the ring's valid slots ``[0, length)``, in place:
        ``attention="sdpa"``: ``view_attention`` (SDPA) over a view of them, ``"frame"``: ``frame_attention`` over
        their latent frames."""
        cache_k, cache_v = self.ring.k[0], self.ring.v[0]
        valid = self.ring.length
        if attention == "sdpa":
            return view_attention(q, cache_k[:, :valid], cache_v[:, :valid], sm_scale=scale)
        B, C, H, D = cache_k.shape
        fs = self.frame_seqlen
        pages = valid // fs
        k_pages, v_pages = (t.view(B, C // fs, fs, H, D) for t in (cache_k, cache_v))
        return frame_attention(q, k_pages, v_pages, self.table[:pages].expand(B, pages), sm_scale=scale,
                               backend=self.ring.backend)


class _Layer:
    """The forward of one patched causal self-attention layer: FastVideo's, with the cached path on the ring, and the
    layer's streams, one per cache it is called with (held weakly by the cache's ``"k"`` tensor, so a request's
    streams go with its caches)."""

    def __init__(self, attn, forward, fv, backend: str | None, attention: str):
        self.attn, self.forward, self.fv = attn, forward, fv
        self.backend, self.attention = backend, attention
        self.streams: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def __call__(self, *args, **kwargs):
        return self.forward(self, *args, **kwargs)

    def __deepcopy__(self, memo):
        """A copied model starts with no streams (its layers have not been called)."""
        layer = memo[id(self)] = _Layer(None, self.forward, self.fv, self.backend, self.attention)
        layer.attn = copy.deepcopy(self.attn, memo)
        return layer

    def configure(self, backend: str | None, attention: str) -> None:
        self.backend, self.attention = backend, attention
        for s in self.streams.values():
            s.ring.backend = backend

    def stream(self, kv_cache: dict, frame_seqlen: int) -> FastVideoStream:
        """The stream on ``kv_cache``, made on first use; remade, at the same position, when the layer's sink or the
        frame length changed since, or ``kv_cache["v"]`` is another tensor."""
        cache_k, cache_v = _cache_tensors(kv_cache)
        sink = self.attn.sink_size * frame_seqlen
        stream = self.streams.get(cache_k)
        if stream is None or (stream.frame_seqlen, stream.ring.sink, stream.ring.v.data_ptr()) != \
                (frame_seqlen, sink, cache_v.data_ptr()):
            made = FastVideoStream(cache_k, cache_v, frame_seqlen=frame_seqlen, sink=sink, backend=self.backend)
            if stream is not None:
                made.seek(stream.start, stream.end)
            self.streams[cache_k] = stream = made
        return stream

    def ring_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: dict, current_start: int,
                       frame_seqlen: int, window_tokens: int, rolls: bool, scale: float | None) -> torch.Tensor:
        """Write the roped ``k`` and ``v`` ``[B, T, H, D]`` into the ring and attend ``q`` ``[B, T, H, D]`` over it.

        ``window_tokens`` is FastVideo's ``max_attention_size``; ``rolls`` False (causal Wan with
        ``local_attn_size=-1``) means FastVideo never evicts, so a stream longer than the cache is refused as it is
        there.
        """
        cache_k, _ = _cache_tensors(kv_cache)
        if cache_k.dtype != k.dtype:
            raise TypeError(f"kv_cache['k']: expected the model's key dtype {k.dtype}, got {cache_k.dtype}")
        sink_tokens = self.attn.sink_size * frame_seqlen
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
        stream = self.stream(kv_cache, frame_seqlen)
        stream.write(k, v, current_start)
        attention = self.attention
        if attention == "auto":
            attention = "sdpa" if view_kernel(q.device, self.backend) == "sdpa" else "frame"
        return stream.attend(q, scale, attention)


def stream(attn: torch.nn.Module, kv_cache: dict, frame_seqlen: int) -> FastVideoStream:
    """The :class:`FastVideoStream` of accelerated layer ``attn`` on ``kv_cache`` (that layer's dict, FastVideo's
    ``kv_cache[l]``), made if the layer has not been called with it; ``frame_seqlen``: tokens per latent frame
    (the ``frame_seqlen`` the model passes the layer: ``height · width`` of the latent after patching).
    E.g. ``stream(model.blocks[l].attn1, kv_cache[l], fs).seek(start, end)`` positions a prefilled cache.

    Raises:
        TypeError: ``attn`` is not a layer that ``accelerate`` patched, or ``kv_cache`` holds no ``'k'``/``'v'``
            tensors ``[B, C, H, D]``.
    """
    layer = vars(attn).get("forward")
    if not isinstance(layer, _Layer):
        raise TypeError(f"attn: expected a causal self-attention layer patched by accelerate, got "
                        f"{type(attn).__name__} without the patch")
    return layer.stream(kv_cache, frame_seqlen)


def _cached_only(attn) -> None:
    if attn.rope_cache_policy == "relativistic":
        raise ValueError("rope_cache_policy: 'relativistic' caches raw keys and ropes the window per step; "
                         "streamkern.integrations.fastvideo supports only the default 'absolute' policy "
                         "(keys cached after RoPE)")


def _wan_forward(layer, q, k, v, freqs_cis, block_mask, kv_cache=None, current_start=0, cache_start=None,
                 frame_seqlen=1560):
    """``CausalWanSelfAttention.forward`` (same arguments) with the cached path on the ring."""
    attn, fv = layer.attn, layer.fv
    if kv_cache is None:
        return type(attn).forward(attn, q, k, v, freqs_cis, block_mask, kv_cache, current_start, cache_start,
                                  frame_seqlen=frame_seqlen)
    _cached_only(attn)
    cos, sin = freqs_cis
    q = fv.apply_rotary_emb(q, cos, sin, is_neox_style=False).type_as(v)
    k = fv.apply_rotary_emb(k, cos, sin, is_neox_style=False).type_as(v)
    frames = _WAN_GLOBAL_FRAMES if attn.local_attn_size == -1 else attn.local_attn_size
    return layer.ring_attention(q, k, v, kv_cache, current_start, frame_seqlen, frames * frame_seqlen,
                                attn.local_attn_size != -1, attn.attn.softmax_scale)


def _matrixgame2_forward(layer, q, k, v, freqs_cis, block_mask, grid_sizes, kv_cache=None, current_start=0,
                         cache_start=None):
    """``CausalMatrixGame2SelfAttention.forward`` (same arguments) with the cached path on the ring."""
    attn, fv = layer.attn, layer.fv
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
    return layer.ring_attention(q, k, v, kv_cache, current_start, frame_seqlen, frames * frame_seqlen, True, None)


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
        check_backend_name(backend)
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
        layer = vars(attn).get("forward")
        if isinstance(layer, _Layer):
            layer.configure(backend, attention)
        else:
            attn.forward = _Layer(attn, fv.patches[type(attn)], fv, backend, attention)
    return model

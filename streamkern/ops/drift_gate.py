"""Dilated attention-weighted drift gate (seed 002; docs/contract.md §4.3).

* :func:`patch_importance` — the action→vision attention of layers ``[start, end)`` as a normalised ``[B, gh, gw]``
  map, reading only the ``action_tokens × num_vision_tokens`` block of each ``[S, S]`` map.
* :func:`attention_weighted_drift` — ``drift[b] = Σ_ij mean_c|avgpool(image) − prev_small| · dilate(upsample(imp))``
  and the pooled image, in one launch.
* :class:`DriftGate` — the seed's ProAttentionGate with every output a device tensor and no host sync.

Formulas: ``streamkern/ops/reference/drift_gate.py``.
"""
from __future__ import annotations

import enum
from functools import partial
from typing import Any, Sequence

import torch
from torch.utils._pytree import tree_leaves, tree_map, tree_structure

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from .reference import drift_gate as ref
from ..capture import capturing

IMAGE_DTYPES = check.FLOATS + (torch.uint8,)


class GateReason(enum.IntEnum):
    """Why :meth:`DriftGate.should_recompute` decided as it did (the ``reason`` tensor holds these codes)."""

    REUSE = ref.REUSE
    STATE = ref.STATE
    VISION = ref.VISION
    FIRST = ref.FIRST


# --- backends ----------------------------------------------------------------------------------


def _alloc_importance(attn, layer_range, num_vision_tokens, action_tokens, grid):
    return torch.empty(attn.shape[1], *grid, dtype=torch.float32, device=attn.device)


def _importance_args(out, attn, layer_range, num_vision_tokens, action_tokens, grid) -> tuple:
    return out, attn, layer_range[0], layer_range[1], num_vision_tokens, action_tokens


def _alloc_drift(image, prev_small, prev_importance, pool, dilation):
    B, C, H, W = image.shape
    drift = torch.empty(B, dtype=torch.float32, device=image.device)
    small = torch.empty(B, C, H // pool, W // pool, dtype=ref.small_dtype(image), device=image.device)
    return drift, small


def _drift_args(out, *args) -> tuple:
    return (*out, *args)


def _alloc_gate(image, prev_small, prev_importance, state, prev_state, counter, pool, *thresholds):
    dev = image.device
    B, C, H, W = image.shape
    return (torch.empty((), dtype=torch.bool, device=dev), torch.empty((), dtype=torch.int64, device=dev),
            torch.empty((), dtype=torch.float32, device=dev),
            torch.empty(B, C, H // pool, W // pool, dtype=ref.small_dtype(image), device=dev))


def _torch_gate(image, prev_small, prev_importance, state, prev_state, counter, pool, dilation, drift_threshold,
                state_threshold):
    return ref.drift_gate_step(image, prev_small, prev_importance, state, prev_state, pool, dilation, drift_threshold,
                               state_threshold)


def _gate_args(out, image, prev_small, prev_importance, state, prev_state, counter, *config) -> tuple:
    """The kernels take the outputs, then the arrival counter, then the inputs."""
    return (*out, counter, image, prev_small, prev_importance, state, prev_state, *config)


# --- checks ------------------------------------------------------------------------------------


def _check_importance(attn, layer_range, num_vision_tokens, action_tokens, grid):
    check.tensor("attn", attn, ndim=5, dtypes=check.FLOATS)
    NL, _, heads, S, S2 = attn.shape
    if S != S2 or heads < 1:
        raise ValueError(f"attn: expected shape [NLayers, B, heads >= 1, S, S], got {list(attn.shape)}")
    start, end = check.int_tuple("layer_range", layer_range, length=2, low=0, high=NL)
    if start >= end:
        raise ValueError(f"layer_range: expected 0 <= start < end <= NLayers={NL}, got ({start}, {end})")
    grid = check.int_tuple("grid", grid, length=2, low=1)
    check.integer("num_vision_tokens", num_vision_tokens, low=1, high=S)
    if grid[0] * grid[1] != num_vision_tokens:
        raise ValueError(f"grid: expected gh * gw == num_vision_tokens={num_vision_tokens}, got {grid}")
    check.integer("action_tokens", action_tokens, low=1, high=S)
    return attn, [start, end], num_vision_tokens, action_tokens, list(grid)


def _check_dilation(dilation) -> int:
    if isinstance(dilation, bool) or not isinstance(dilation, int) or dilation < 1 or dilation % 2 == 0:
        raise ValueError(f"dilation: expected an odd positive int (1, 3, 5, ...), got {dilation!r}")
    return dilation


def _check_image(image, pool) -> None:
    B, C, H, W = image.shape
    check.integer("pool", pool, low=1)
    if C < 1 or H < pool or W < pool or H % pool or W % pool:
        raise ValueError(f"image: expected [B, C >= 1, H, W] with H and W positive multiples of pool={pool}, "
                         f"got {list(image.shape)}")


def _check_drift(image, prev_small, prev_importance, pool, dilation):
    check.tensor("image", image, ndim=4, dtypes=IMAGE_DTYPES)
    check.tensor("prev_small", prev_small, ndim=4, dtypes=check.FLOATS)
    check.tensor("prev_importance", prev_importance, ndim=3, dtypes=check.FLOATS)
    check.same_device(image=image, prev_small=prev_small, prev_importance=prev_importance)
    _check_image(image, pool)
    _check_dilation(dilation)
    B, C, H, W = image.shape
    check.shape("prev_small", prev_small, (B, C, H // pool, W // pool), ("B", "C", "H/pool", "W/pool"))
    check.shape("prev_importance", prev_importance, (B, None, None), ("B", "gh", "gw"))
    if prev_importance.shape[1] < 1 or prev_importance.shape[2] < 1:
        raise ValueError(f"prev_importance: expected a grid of at least 1x1, got {list(prev_importance.shape)}")
    return image, prev_small.to(ref.small_dtype(image)), prev_importance.float(), pool, dilation


_EXT_IMPORTANCE = Kernel(cxx("patch_importance_", _importance_args), out=True)
_EXT_DRIFT = Kernel(cxx("attention_weighted_drift_", _drift_args), out=True)
_EXT_GATE = Kernel(cxx("drift_gate_step_", _gate_args), out=True)
patch_importance_op = define_op(
    "patch_importance", "(Tensor attn, int[] layer_range, int num_vision_tokens, int action_tokens, int[] grid) "
    "-> Tensor",
    {"torch": ref.patch_importance, "cpu": _EXT_IMPORTANCE, "triton": triton("drift_gate:patch_importance"),
     "cuda": _EXT_IMPORTANCE},
    check=_check_importance, alloc=_alloc_importance)
attention_weighted_drift_op = define_op(
    "attention_weighted_drift", "(Tensor image, Tensor prev_small, Tensor prev_importance, int pool, int dilation) "
    "-> (Tensor, Tensor)",
    {"torch": ref.attention_weighted_drift, "cpu": _EXT_DRIFT,
     "triton": Kernel(triton("drift_gate:attention_weighted_drift", _drift_args), out=True), "cuda": _EXT_DRIFT},
    check=_check_drift, alloc=_alloc_drift)
drift_gate_step_op = define_op(
    "drift_gate_step", "(Tensor image, Tensor? prev_small, Tensor? prev_importance, Tensor state, Tensor? prev_state, "
    "Tensor(a!) counter, int pool, int dilation, float drift_threshold, float state_threshold) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    {"torch": _torch_gate, "cpu": _EXT_GATE,
     "triton": Kernel(triton("drift_gate:drift_gate_step", _gate_args), out=True), "cuda": _EXT_GATE},
    alloc=_alloc_gate)


def _state_rows(state: torch.Tensor) -> torch.Tensor:
    """``state`` as ``[R, K]`` (the kernels take two strides): a view, unless a >2-d state's strides cannot be
    merged, which costs one copy."""
    return state.reshape(1, -1) if state.dim() <= 1 else state.reshape(-1, state.shape[-1])


def _tensor_tree(x) -> bool:
    """``x`` is a tensor or a non-empty (nested) tuple/list whose leaves are all tensors."""
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(_tensor_tree(i) for i in x)


def _same_layout(old, new) -> bool:
    """``old`` and ``new`` are tensor trees of one structure whose leaves agree in shape, dtype and device."""
    return tree_structure(old) == tree_structure(new) and all(
        isinstance(o, torch.Tensor) and (o.shape, o.dtype, o.device) == (n.shape, n.dtype, n.device)
        for o, n in zip(tree_leaves(old), tree_leaves(new)))


def _own(x):
    """An op's fresh output, which the gate may keep as it is."""
    return x


def _contiguous_copy(x):
    return x.clone(memory_format=torch.contiguous_format)


def _carry(old, new, allocate):
    """The buffer that carries ``new`` (a tensor tree) to the next step: ``old`` overwritten in place when it has
    ``new``'s structure, shapes, dtypes and devices, else ``allocate(new)`` (the first update, or a new layout)."""
    if _same_layout(old, new):
        for o, n in zip(tree_leaves(old), tree_leaves(new)):
            o.copy_(n)
        return old
    return allocate(new)


# --- public API --------------------------------------------------------------------------------


def patch_importance(attn: torch.Tensor, layer_range: Sequence[int] = (14, 18), num_vision_tokens: int = 256,
                     action_tokens: int = 50, grid: Sequence[int] = (16, 16), *,
                     backend: str | None = None) -> torch.Tensor:
    """Importance of each vision patch for the action queries, as a normalised 2-D map.

    Args:
        attn: ``[NLayers, B, heads, S, S]`` attention probabilities (fp32/fp16/bf16, any strides).
        layer_range: ``(start, end)``, the layers averaged.
        num_vision_tokens: V, the first V key columns (one camera's patches); ``V == gh * gw``.
        action_tokens: A, the last A query rows.
        grid: ``(gh, gw)``.

    Returns:
        ``[B, gh, gw]`` float32: ``m / (Σ m + 1e-8)`` with ``m[v]`` the mean of ``attn[l, b, h, S-A+q, v]`` over
        ``l ∈ [start, end)``, heads and ``q < A``. Only that ``(end-start) × heads × A × V`` slice is read.
    """
    return patch_importance_op(attn, layer_range, num_vision_tokens, action_tokens, grid, backend=backend)


def attention_weighted_drift(image: torch.Tensor, prev_small: torch.Tensor, prev_importance: torch.Tensor,
                             pool: int = 8, dilation: int = 5, *,
                             backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-weighted pixel drift of ``image`` against the previous pooled frame, and the new pooled frame.

    Args:
        image: ``[B, C, H, W]`` fp32/fp16/bf16, or uint8 read as value / 255; H and W multiples of ``pool``.
        prev_small: ``[B, C, H/pool, W/pool]`` the previous call's ``small`` (float32 for uint8 images, else the
            image's dtype).
        prev_importance: ``[B, gh, gw]`` any grid size (e.g. :func:`patch_importance`'s output).
            The kernels read ``prev_small`` in small's dtype and ``prev_importance`` in float32: other float
            dtypes are converted first (one copy each; :class:`DriftGate` always passes matching ones).
        pool: the average-pooling factor; dilation: the odd max-pool window of the dilation.

    Returns:
        ``drift [B]`` float32, ``Σ_ij mean_c|small − prev_small| · a`` with
        ``a = max_pool2d(interpolate(prev_importance, (h, w), bilinear, align_corners=False), dilation, 1,
        dilation // 2)``; and ``small = avg_pool2d(image, pool)`` ``[B, C, h, w]``. The difference is taken from
        the float32 pooled values (before ``small`` is rounded to its dtype). NaN in the image gives a NaN drift.
        Accelerated backends do all of it in one launch.
    """
    return attention_weighted_drift_op(image, prev_small, prev_importance, pool, dilation, backend=backend)


class DriftGate:
    """Frame-level KV reuse gate of a VLA policy: seed 002's ProAttentionGate on device tensors.

    ``should_recompute(image, state)`` decides, in order:

    1. state guard — after an ``update``, ``s = max|state − prev_state|``; ``s > state_threshold`` → recompute,
       reason ``STATE``, drift ``s``;
    2. no previous frame → recompute, reason ``FIRST``, drift 100.0;
    3. ``d = mean_b attention_weighted_drift(image, prev_small, prev_importance)``; ``d > drift_threshold`` →
       recompute, reason ``VISION``, else reuse, reason ``REUSE``; drift ``d``.

    Thresholds compare as the seed's Python floats do (in float64). Departure from the seed, on purpose: a NaN
    state difference or drift (a NaN in the image or the state) counts as exceeding its threshold, so a broken
    frame is recomputed rather than silently reused (the seed's ``NaN > t`` is False and would reuse).

    Images ``[B >= 1, C, H, W]`` (several cameras: stack them along B, the drift is averaged over them), shape and
    dtype fixed across steps; the state is any floating shape and dtype (float64 included), fixed across steps.
    Outputs are 0-d device tensors ``(recompute bool, reason int64, drift float32)``. With the ``"cpu"``,
    ``"triton"`` and ``"cuda"`` backends ``should_recompute`` is one kernel launch (pooling, drift, state guard,
    batch mean and decision; the very first call also zero-fills a 4-byte arrival counter) and reads nothing back
    to the host. A gate serves one stream at a time. ``update`` reuses the pooled image that ``should_recompute``
    computed for the same image tensor, so it pools nothing itself.

    What ``update`` stores lives in buffers the first ``update`` allocates and later ones overwrite in place (the
    pooled frame, the importance, a contiguous copy of the state, and a KV cache that is a tensor or a tuple/list of
    tensors: copied on the first update, then written into), so a step captured in a graph and replayed reads what
    the previous replay stored (``streamkern.step_graph``). A KV cache of another kind is stored as given; one
    whose shapes, dtypes or structure change gets new buffers.
    """

    def __init__(self, drift_threshold: float = 0.5, state_threshold: float = 0.05, dilation: int = 5, pool: int = 8,
                 layer_range: Sequence[int] = (14, 18), num_vision_tokens: int = 256, action_tokens: int = 50,
                 grid: Sequence[int] = (16, 16), backend: str | None = None):
        self.drift_threshold = check.number("drift_threshold", drift_threshold)
        self.state_threshold = check.number("state_threshold", state_threshold)
        self.dilation = _check_dilation(dilation)
        self.pool = check.integer("pool", pool, low=1)
        self.layer_range = check.int_tuple("layer_range", layer_range, length=2, low=0)
        self.num_vision_tokens = check.integer("num_vision_tokens", num_vision_tokens, low=1)
        self.action_tokens = check.integer("action_tokens", action_tokens, low=1)
        self.grid = check.int_tuple("grid", grid, length=2, low=1)
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forget the previous frame, attention, state and KV cache (a new episode)."""
        self.prev_small: torch.Tensor | None = None
        self.prev_importance: torch.Tensor | None = None
        self.prev_state: torch.Tensor | None = None
        self.prev_kv: Any = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None   # (image, its small) from should_recompute
        self._counter: torch.Tensor | None = None   # the fused kernels' arrival counter, 0 between launches

    def cached_kv(self) -> Any:
        """The KV cache stored by the last :meth:`update`."""
        return self.prev_kv

    def _check_frame(self, image: torch.Tensor, state: torch.Tensor) -> None:
        check.tensor("image", image, ndim=4, dtypes=IMAGE_DTYPES)
        check.tensor("state", state)
        check.same_device(image=image, state=state)
        _check_image(image, self.pool)
        if image.shape[0] == 0:
            raise ValueError(f"image: expected at least one camera (B >= 1), got shape {list(image.shape)}")
        if self.prev_small is not None:
            if image.shape != self.image_shape:
                raise ValueError(f"image: expected shape {list(self.image_shape)} as in earlier steps, "
                                 f"got {list(image.shape)}")
            if ref.small_dtype(image) != self.prev_small.dtype:
                raise TypeError(f"image: expected a dtype that pools to {check.dtype_name(self.prev_small.dtype)} "
                                f"as in earlier steps, got {check.dtype_name(image.dtype)}")
            check.same_device(prev_small=self.prev_small, image=image)
        if not state.is_floating_point() or state.numel() == 0:
            raise ValueError(f"state: expected a non-empty floating-point tensor, got {state.dtype} "
                             f"of shape {list(state.shape)}")
        if self.prev_state is not None:
            check.shape("state", state, tuple(self.prev_state.shape))
            check.same_dtype(prev_state=self.prev_state, state=state)
            check.same_device(prev_state=self.prev_state, state=state)

    def should_recompute(self, image: torch.Tensor, state: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(recompute [] bool, reason [] int64, drift [] float32)`` on the image's device (see the class doc)."""
        self._check_frame(image, state)
        if self._counter is None or self._counter.device != image.device:
            if capturing(image.device):  # made in the graph's pool, zeroed only at replay: eager calls would hang
                raise RuntimeError("DriftGate.should_recompute: call it once eagerly before capturing it in a CUDA "
                                   "graph (the first call creates the gate's arrival counter)")
            self._counter = torch.zeros(1, dtype=torch.int32, device=image.device)
        rows = _state_rows(state)
        prev_state = None if self.prev_state is None else self.prev_state.view(rows.shape)
        run, reason, drift, small = drift_gate_step_op(
            image, self.prev_small, self.prev_importance, rows, prev_state, self._counter, self.pool, self.dilation,
            float(self.drift_threshold), float(self.state_threshold), backend=self.backend)
        self._pending = (image, small)
        return run, reason, drift

    def update(self, image: torch.Tensor, attention: torch.Tensor, state: torch.Tensor, kv_cache: Any) -> None:
        """Store the frame after a full pass: its pooled image (from :meth:`should_recompute` when it saw this
        same image tensor, else pooled here), the patch importance of ``attention``, the state and the KV cache."""
        self._check_frame(image, state)
        check.tensor("attention", attention, ndim=5, dtypes=check.FLOATS)
        check.same_device(image=image, attention=attention)
        if image.shape[0] != attention.shape[1]:
            raise ValueError(f"attention: expected batch B={image.shape[0]} (the image's) in dim 1, "
                             f"got shape {list(attention.shape)}")
        if self.prev_small is None and capturing(image.device):   # its buffers would live in the graph's memory
            raise RuntimeError("DriftGate.update: call it once eagerly before capturing it (the first update "
                               "allocates the buffers the gate carries from step to step)")
        importance = patch_importance(attention, self.layer_range, self.num_vision_tokens, self.action_tokens,
                                      self.grid, backend=self.backend)
        if self._pending is not None and self._pending[0] is image:
            small = self._pending[1]
        else:
            small = ref.pooled(image, self.pool).to(ref.small_dtype(image))
        self.prev_small = _carry(self.prev_small, small, _own)
        self.prev_importance = _carry(self.prev_importance, importance, _own)
        self.prev_state = _carry(self.prev_state, state, _contiguous_copy)
        self.prev_kv = _carry(self.prev_kv, kv_cache, partial(tree_map, torch.clone)) if _tensor_tree(kv_cache) else kv_cache
        self._pending = None

    @property
    def image_shape(self) -> torch.Size:
        B, C, h, w = self.prev_small.shape
        return torch.Size((B, C, h * self.pool, w * self.pool))

"""Scale-block-masked attention for next-scale generation (seed 003; docs/contract.md §4.4).

VAR generates an image scale by scale; its attention mask is defined between scales, not tokens: query i may
attend key j when ``allow[q_scale[i], k_scale[j]]`` (VAR: key scale <= query scale), or when ``self_attend`` and
``i == j``. The source builds a dense ``[L, L]`` −inf bias and runs full attention over it. Here the work is
tiled ``block_q × block_k``: a tile pair whose scale pairs are all disallowed is skipped without loading K/V,
a tile pair whose scale pairs are all allowed runs unmasked, and only tiles that straddle a mask edge apply the
element-wise mask. See ``streamkern/ops/reference/block_masked_attention.py`` for the formula.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import _checks as check
from .._backend import Kernel, cxx, define_op, triton
from ..kernels.tile_classes import TILE_FULL, TILE_PARTIAL, TILE_SKIP
from .reference import block_masked_attention as ref

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PRESETS = ("var", "strict", "full", "diagonal")
SCALE_IDS = (torch.int64, torch.int32)
MAX_TRITON_HEAD_DIM = 128


@dataclass(frozen=True, eq=False)
class ScaleLayout:
    """Token offsets of the scales of a next-scale model: scale s holds tokens ``[begin[s], end[s])``,
    ``patch_nums[s]²`` of them; ``scale_of_token [total]`` int64 is each token's scale id."""

    patch_nums: tuple[int, ...]
    begin: tuple[int, ...]
    end: tuple[int, ...]
    total: int
    scale_of_token: torch.Tensor

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    def window(self, first_scale: int, num_scales: int) -> slice:
        """The token slice of scales ``[first_scale, first_scale + num_scales)``."""
        check.integer("first_scale", first_scale, low=0, high=self.num_scales - 1)
        check.integer("num_scales", num_scales, low=1, high=self.num_scales - first_scale)
        return slice(self.begin[first_scale], self.end[first_scale + num_scales - 1])


def scale_layout(patch_nums: Sequence[int] = VAR_PATCH_NUMS) -> ScaleLayout:
    """The layout of ``patch_nums`` (scale s is a ``pn × pn`` token map): VAR's default gives 680 tokens."""
    pns = check.int_tuple("patch_nums", patch_nums, low=1)
    if not pns:
        raise ValueError("patch_nums: expected at least one scale, got ()")
    sizes = [pn * pn for pn in pns]
    end = tuple(itertools.accumulate(sizes))
    begin = (0,) + end[:-1]
    ids = torch.repeat_interleave(torch.arange(len(pns)), torch.tensor(sizes))
    return ScaleLayout(pns, begin, end, end[-1], ids)


def scale_allow(num_scales: int, preset: str = "var", *, device=None) -> torch.Tensor:
    """``allow [NS, NS]`` bool for a preset: ``"var"`` j <= i (VAR's block-causal mask), ``"strict"`` j < i,
    ``"full"`` all True, ``"diagonal"`` j == i (row i = query scale, column j = key scale)."""
    check.integer("num_scales", num_scales, low=1)
    i = torch.arange(num_scales, device=device)[:, None]
    j = torch.arange(num_scales, device=device)[None, :]
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")
    full = torch.ones(num_scales, num_scales, dtype=torch.bool, device=device)
    return {"var": j <= i, "strict": j < i, "full": full, "diagonal": j == i}[preset]


def _valid_ids(ids: torch.Tensor, num_scales: int) -> torch.Tensor:
    """Scale ids with anything outside ``[0, NS)`` mapped to ``NS`` (a scale that may attend nothing)."""
    return torch.where((ids >= 0) & (ids < num_scales), ids, num_scales).long()


def _presence(ids: torch.Tensor, block: int, num_scales: int) -> torch.Tensor:
    """``P [ceil(L / block), NS + 1]`` float: 1 where the tile holds a token of that scale (column NS: bad id)."""
    n_tiles = -(-ids.numel() // block)
    tile = torch.arange(ids.numel(), device=ids.device) // block
    pres = torch.zeros(n_tiles, num_scales + 1, device=ids.device)
    pres.index_put_((tile, _valid_ids(ids, num_scales)), torch.ones((), device=ids.device), accumulate=True)
    return (pres > 0).float()


def tile_classes(q_scale: torch.Tensor, k_scale: torch.Tensor, allow: torch.Tensor, block_q: int, block_k: int,
                 self_attend: bool = False) -> torch.Tensor:
    """``cls [ceil(Lq / block_q), ceil(Lk / block_k)]`` int8 per (q tile, k tile): ``TILE_SKIP`` (0) when no
    (query, key) pair of the tiles is allowed, ``TILE_FULL`` (2) when every pair is, else ``TILE_PARTIAL`` (1).
    Computed on the device from per-tile scale-presence matrices ``Pq``, ``Pk``: any-allowed =
    ``Pq·allow·Pkᵀ > 0``, any-disallowed = ``Pq·(¬allow)·Pkᵀ > 0``; with ``self_attend`` tile pairs whose token
    ranges overlap have an allowed pair too. No host synchronisation."""
    ns = allow.shape[0]
    padded = torch.zeros(ns + 1, ns + 1, device=allow.device)
    padded[:ns, :ns] = allow.float()
    pq, pk = _presence(q_scale, block_q, ns), _presence(k_scale, block_k, ns)
    any_allowed = (pq @ padded @ pk.T) > 0
    any_denied = (pq @ (1.0 - padded) @ pk.T) > 0
    if self_attend:
        q0 = torch.arange(pq.shape[0], device=allow.device)[:, None] * block_q
        k0 = torch.arange(pk.shape[0], device=allow.device)[None, :] * block_k
        any_allowed = any_allowed | ((q0 < k0 + block_k) & (k0 < q0 + block_q))
    cls = torch.where(any_allowed, TILE_PARTIAL, TILE_SKIP)
    return torch.where(any_allowed & ~any_denied, TILE_FULL, cls).to(torch.int8)


def skipped_tile_fraction(q_scale: torch.Tensor, k_scale: torch.Tensor, allow: torch.Tensor, block_q: int = 64,
                          block_k: int = 64, self_attend: bool = False) -> float:
    """Share of the ``(q tile, k tile)`` pairs that the tiled kernels skip entirely (a reporting helper:
    it reads the result back to the host)."""
    _check_layout(q_scale, k_scale, allow)
    check.integer("block_q", block_q, low=1)
    check.integer("block_k", block_k, low=1)
    cls = tile_classes(q_scale, k_scale, allow, block_q, block_k, self_attend)
    return float((cls == TILE_SKIP).float().mean().item()) if cls.numel() else 0.0


def _check_layout(q_scale, k_scale, allow) -> None:
    check.tensor("q_scale", q_scale, ndim=1, dtypes=SCALE_IDS)
    check.tensor("k_scale", k_scale, ndim=1, dtypes=SCALE_IDS)
    check.tensor("allow", allow, ndim=2, dtypes=(torch.bool,))
    check.same_device(q_scale=q_scale, k_scale=k_scale, allow=allow)
    if allow.shape[0] != allow.shape[1]:
        raise ValueError(f"allow: expected a square [NS, NS] matrix, got shape {list(allow.shape)}")


def _check(q, k, v, q_scale, k_scale, allow, self_attend, sm_scale):
    check.tensor("q", q, ndim=4, dtypes=check.FLOATS)
    check.tensor("k", k, ndim=4, dtypes=check.FLOATS)
    check.tensor("v", v, ndim=4, dtypes=check.FLOATS)
    check.same_dtype(q=q, k=k, v=v)
    _check_layout(q_scale, k_scale, allow)
    check.same_device(q=q, k=k, v=v, q_scale=q_scale, k_scale=k_scale, allow=allow)
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    check.shape("k", k, (B, H, None, D), ("B", "heads", "Lk", "D"))
    check.shape("v", v, (B, H, Lk, D), ("B", "heads", "Lk", "D"))
    check.shape("q_scale", q_scale, (Lq,), ("Lq",))
    check.shape("k_scale", k_scale, (Lk,), ("Lk",))
    if not isinstance(self_attend, bool):
        raise TypeError(f"self_attend: expected a bool, got {type(self_attend).__name__} {self_attend!r}")
    if self_attend and Lq != Lk:
        raise ValueError(f"self_attend: expected Lq == Lk (query i is key i), got Lq={Lq}, Lk={Lk}")
    if D == 0:
        raise ValueError(f"q: expected a head dim D >= 1, got shape {list(q.shape)}")
    sm_scale = D ** -0.5 if sm_scale is None else check.number("sm_scale", sm_scale, low=0.0, open_low=True)
    return q, k, v, q_scale, k_scale, allow, self_attend, sm_scale


def _check_ids(q, k, v, q_scale, k_scale, allow, *config) -> None:
    """Scale ids lie in ``[0, NS)`` (reads the tensors)."""
    check.index_range("q_scale", q_scale, allow.shape[0])
    check.index_range("k_scale", k_scale, allow.shape[0])


def _triton_supports(q, *args) -> str:
    D = q.shape[-1]
    return "" if D <= MAX_TRITON_HEAD_DIM else (
        f"takes head dims D <= {MAX_TRITON_HEAD_DIM} (K/V tiles of next_pow2(D) columns in one block's shared "
        f"memory, compiled and checked by tests/test_triton_lowering.py), got D={D}")


block_masked_attention_op = define_op(
    "block_masked_attention", "(Tensor q, Tensor k, Tensor v, Tensor q_scale, Tensor k_scale, Tensor allow, "
    "bool self_attend, float sm_scale) -> Tensor", {
        "torch": ref.block_masked_attention,
        "cpu": Kernel(cxx("block_masked_attention_"), out=True),
        "triton": Kernel(triton("block_masked_attention:block_masked_attention"), supports=_triton_supports),
    }, check=_check, values=_check_ids, alloc=lambda q, *args: torch.empty(q.shape, dtype=q.dtype, device=q.device),
    missing={"cuda": "no CUDA C++ kernel (optional per issue 5): the Triton flash kernel is the GPU path"})


def block_masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_scale: torch.Tensor,
                           k_scale: torch.Tensor, allow: torch.Tensor, *, self_attend: bool = False,
                           sm_scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """Attention of every query over the keys its scale may see, skipping fully masked tiles.

    Args:
        q: ``[B, heads, Lq, D]`` queries (fp32/fp16/bf16, any strides; ``"triton"`` takes ``D <= 128``).
        k, v: ``[B, heads, Lk, D]`` keys and values, same dtype.
        q_scale: ``[Lq]`` int64/int32 scale id of each query; k_scale: ``[Lk]`` of each key; ids in ``[0, NS)``.
        allow: ``[NS, NS]`` bool, ``allow[a, b]``: a query of scale a may attend a key of scale b
            (see :func:`scale_allow`).
        self_attend: also allow ``i == j`` (needs ``Lq == Lk``).
        sm_scale: softmax scale, ``D**-0.5`` when ``None`` (VAR with L2-normalised q/k uses 1.0).
        backend: ``"torch" | "cpu" | "triton" | "auto"`` or ``None`` for the current default.

    Returns:
        ``[B, heads, Lq, D]`` in the dtype of ``q``:
        ``out[i] = Σ_j softmax_j(sm_scale·q_i·k_j | M[i, j]) v_j`` with softmax in float32; zeros for a row
        with no allowed key.
    """
    return block_masked_attention_op(q, k, v, q_scale, k_scale, allow, self_attend, sm_scale, backend=backend)

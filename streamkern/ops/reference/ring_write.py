"""Ring-buffer KV window in eager PyTorch: the ``"torch"`` backend of ``ring_write`` and the source pipelines'
cat-and-slice caches (seeds 000 §2, 001; docs/contract.md §4.2).

Caches are ``[NL, B, S, H, D]`` with ``S = sink + window``; new tokens ``[NL, B, T, H, D]``.

``ring_write`` (the executable specification): new token ``i`` (``0 <= i < T``) goes to slot

    p(i) = start + i            if start + i < S
           start + i - window   otherwise (wrap from the end back to slot ``sink``)

so at most two slice copies per tensor move exactly the ``T`` new tokens.

The two reference caches hold the valid tokens in logical order, the way the source pipelines do:

* :class:`ShiftCache` (Self-Forcing / Matrix-Game): a fixed ``[NL, B, S, H, D]`` buffer filled from the front;
  when the new tokens do not fit, the non-sink part is shifted left by copy, layer by layer, then the new tokens
  are written at the end.
* :class:`CatCache` (MemFlow / LongLive): the cache is rebuilt each step by ``torch.cat`` of the sinks, the
  newest ``window - T`` window tokens and the new tokens.

Both also carry the logical index of every token they hold (``positions``), for the tests.
"""
from __future__ import annotations

import torch


def ring_slices(start: int, count: int, size: int, sink: int) -> list[tuple[int, int, int]]:
    """``(slot, token, n)`` runs: tokens ``[token, token + n)`` go to slots ``[slot, slot + n)``."""
    first = min(count, size - start)
    runs = [(start, 0, first)]
    if count > first:
        runs.append((sink, first, count - first))
    return [r for r in runs if r[2] > 0]


def ring_write(cache_k, cache_v, k_new, v_new, start, sink: int) -> None:
    """The ``"torch"`` backend: copies the ``T`` new tokens into slots ``p(i)`` of both caches. ``start`` is a host
    int, or an int64 ``[]`` tensor on the caches' device (then the slots are computed on the device)."""
    if isinstance(start, torch.Tensor):
        S = cache_k.shape[2]
        slots = start + torch.arange(k_new.shape[2], device=start.device)
        slots = torch.where(slots < S, slots, slots - (S - sink))
        cache_k[:, :, slots] = k_new
        cache_v[:, :, slots] = v_new
        return
    for slot, tok, n in ring_slices(start, k_new.shape[2], cache_k.shape[2], sink):
        cache_k[:, :, slot:slot + n] = k_new[:, :, tok:tok + n]
        cache_v[:, :, slot:slot + n] = v_new[:, :, tok:tok + n]


def ring_positions(count, size: int, sink: int, device) -> torch.Tensor:
    """``[size]`` int64: the logical index of the token in each slot after ``count`` appended tokens, -1 if empty.

    ``count`` is a host int or an int64 ``[]`` device tensor (a device-side cursor). Slot ``s < sink`` holds token
    ``s``; window slot ``s = sink + j`` holds the newest non-sink token ``u < m = max(count - sink, 0)`` with
    ``u mod window = j``, i.e. ``u = j + window·⌊(m - 1 - j) / window⌋`` when ``j < m``.
    """
    s = torch.arange(size, device=device)
    window = size - sink
    j = s - sink
    m = (count - sink).clamp(min=0) if isinstance(count, torch.Tensor) else max(count - sink, 0)
    u = j + window * torch.div(m - 1 - j, window, rounding_mode="floor")
    held = torch.where(s < sink, s < count, j < m)
    return torch.where(held, torch.where(s < sink, s, sink + u), -1)


def shift_write(cache_k, cache_v, k_new, v_new, filled: int, sink: int) -> int:
    """Self-Forcing's cache update on caches holding ``filled`` tokens in slots ``[0, filled)``: if the ``T`` new
    tokens do not fit, shift the newest non-sink tokens left by ``filled + T - S`` (clone and copy, layer by layer),
    then write the new tokens after them. Returns the new fill."""
    S, T = cache_k.shape[2], k_new.shape[2]
    evict = max(0, filled + T - S)
    if evict:
        keep = filled - evict - sink
        src, dst = slice(sink + evict, sink + evict + keep), slice(sink, sink + keep)
        for layer in range(cache_k.shape[0]):
            cache_k[layer, :, dst] = cache_k[layer, :, src].clone()
            cache_v[layer, :, dst] = cache_v[layer, :, src].clone()
    end = filled - evict + T
    for layer in range(cache_k.shape[0]):
        cache_k[layer, :, end - T:end] = k_new[layer]
        cache_v[layer, :, end - T:end] = v_new[layer]
    return end


class ShiftCache:
    """Self-Forcing / Matrix-Game rolling cache: ``filled`` tokens in logical order in slots ``[0, filled)``;
    when ``filled + T > S`` the oldest ``filled + T - S`` non-sink tokens are evicted by shifting the rest
    left (one clone-and-copy per layer, as the source does inside each block), then the new tokens are written."""

    def __init__(self, num_layers, batch, heads, head_dim, window, sink=0, dtype=torch.bfloat16, device=None):
        shape = (num_layers, batch, sink + window, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.pos = torch.full((sink + window,), -1, dtype=torch.int64, device=device)
        self.sink, self.size, self.filled, self.count = sink, sink + window, 0, 0

    def append(self, k_new, v_new) -> None:
        T = k_new.shape[2]
        evict = max(0, self.filled + T - self.size)
        if evict:
            keep = self.filled - evict - self.sink
            src, dst = slice(self.sink + evict, self.sink + evict + keep), slice(self.sink, self.sink + keep)
            self.pos[dst] = self.pos[src].clone()
        end = shift_write(self.k, self.v, k_new, v_new, self.filled, self.sink)
        self.pos[end - T:end] = torch.arange(self.count, self.count + T, device=self.pos.device)
        self.filled, self.count = end, self.count + T

    def valid(self):
        """``(k, v, positions)`` of the valid tokens, in logical order."""
        return self.k[:, :, :self.filled], self.v[:, :, :self.filled], self.pos[:self.filled]


class CatCache:
    """MemFlow / LongLive cache rebuilt by ``torch.cat`` every step: sinks (the first ``sink`` tokens ever),
    then the newest window tokens, then the new ones, keeping at most ``window`` non-sink tokens."""

    def __init__(self, num_layers, batch, heads, head_dim, window, sink=0, dtype=torch.bfloat16, device=None):
        self.k = torch.zeros(num_layers, batch, 0, heads, head_dim, dtype=dtype, device=device)
        self.v = self.k.clone()
        self.pos = torch.zeros(0, dtype=torch.int64, device=device)
        self.sink, self.window, self.count = sink, window, 0

    def append(self, k_new, v_new) -> None:
        T = k_new.shape[2]
        new_pos = torch.arange(self.count, self.count + T, device=self.pos.device)
        k, v, pos = (torch.cat([a, b], dim=d) for a, b, d in ((self.k, k_new, 2), (self.v, v_new, 2),
                                                             (self.pos, new_pos, 0)))
        s = min(self.sink, k.shape[2])
        keep = min(self.window, k.shape[2] - s)
        self.k = torch.cat([k[:, :, :s], k[:, :, k.shape[2] - keep:]], dim=2)
        self.v = torch.cat([v[:, :, :s], v[:, :, v.shape[2] - keep:]], dim=2)
        self.pos = torch.cat([pos[:s], pos[pos.shape[0] - keep:]])
        self.count += T

    def valid(self):
        """``(k, v, positions)`` of the valid tokens, in logical order."""
        return self.k, self.v, self.pos

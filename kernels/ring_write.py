"""Triton ``ring_write``: the token-row copy of ``kernels/token_copy.py`` into consecutive ring slots from
``start``, wrapping from the end of the cache back to slot ``sink``."""
from __future__ import annotations

from .token_copy import token_copy


def ring_write(cache_k, cache_v, k_new, v_new, start, sink: int) -> None:
    """New token i to slot ``start + i``, or ``start + i - window`` once that reaches ``S = sink + window``.
    ``start``: a host int, or an int64 ``[]`` device tensor read by the kernel (out of ``[0, S)``: nothing written)."""
    S = cache_k.shape[2]
    if isinstance(start, int):
        token_copy(cache_k, cache_v, k_new, v_new, k_new.shape[2], dst_offset=start, wrap_at=S, wrap_by=S - sink)
    else:
        token_copy(cache_k, cache_v, k_new, v_new, k_new.shape[2], dst_index=start, dst_limit=S, wrap_at=S,
                   wrap_by=S - sink)

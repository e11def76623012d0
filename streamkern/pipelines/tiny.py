"""Tiny random-weight transformer pieces shared by the reference pipelines (deterministic from a seed)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def seeded(seed: int):
    """A context that makes module construction deterministic without touching the caller's RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randn(shape, seed: int, device, dtype=torch.float32) -> torch.Tensor:
    """Reproducible normal noise, drawn on the CPU (same values on every device and backend)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[..., dim]`` of integer positions."""
    freqs = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * (-9.2103 / dim))
    ang = positions.float()[..., None] * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: self-attention through ``attend``, optional cross-attention, MLP.

    ``attend(q, k, v) -> [B, T, H, D]`` receives this block's ``q, k, v [B, T, H, D]`` and decides which keys
    they see (a KV cache, a mask); the block returns its output and the ``k, v`` it produced (for caching)."""

    def __init__(self, heads: int, head_dim: int, text_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        c = heads * head_dim
        self.norm1, self.qkv, self.proj = nn.LayerNorm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.cross = text_dim is not None
        if self.cross:
            self.norm2, self.q_x, self.kv_text, self.proj2 = (nn.LayerNorm(c), nn.Linear(c, c),
                                                              nn.Linear(text_dim, 2 * c), nn.Linear(c, c))
        self.norm3 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def text_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-attention keys/values ``[B, S, H, D]`` of a text context ``[B, S, text_dim]``."""
        B, S, _ = context.shape
        return self.kv_text(context).view(B, S, 2, self.heads, self.head_dim).unbind(2)

    def forward(self, x, attend, text_kv=None):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, self.head_dim).unbind(2)
        x = x + self.proj(attend(q, k, v).reshape(B, T, C))
        if self.cross:
            qx = self.q_x(self.norm2(x)).view(B, T, self.heads, self.head_dim)
            tk, tv = text_kv
            x = x + self.proj2(sdpa(qx, tk, tv).reshape(B, T, C))
        return x + self.mlp(self.norm3(x)), k, v


def sdpa(q, k, v, mask=None, scale=None):
    """Softmax attention on ``[B, T, H, D]`` tensors (tokens before heads), optional bool/additive mask."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)

"""The drift gate in eager PyTorch: the ``"torch"`` backend and the seed's ProAttentionGate (seed 002).

Shapes: ``attn [NL, B, heads, S, S]``, ``image [B, C, H, W]``, ``small [B, C, h, w]`` with ``h = H / pool``,
``importance [B, gh, gw]``.

    importance[b]  = m / (Σ m + 1e-8),  m[v] = mean over layers [start, end), heads and the last A query rows
                     of attn[l, b, head, q, v], for the first V = gh·gw key columns v, reshaped to the grid
    small          = avg_pool2d(image, pool)                 (uint8 images read as value / 255)
    diff[b, i, j]  = mean_c |small[b, c, i, j] − prev_small[b, c, i, j]|
    a              = max_pool2d(interpolate(prev_importance, (h, w), bilinear, align_corners=False),
                                dilation, stride=1, padding=dilation // 2)
    drift[b]       = Σ_ij diff[b, i, j] · a[b, i, j]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# GateReason codes (streamkern.GateReason).
REUSE, STATE, VISION, FIRST = 0, 1, 2, 3


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def small_dtype(image: torch.Tensor) -> torch.dtype:
    """dtype of the pooled image: float32 for uint8 frames, else the image's dtype."""
    return torch.float32 if image.dtype == torch.uint8 else image.dtype


def pooled(image: torch.Tensor, pool: int) -> torch.Tensor:
    """``avg_pool2d(image, pool)`` accumulated in float32 (float64 for float64), uint8 read as value / 255."""
    x = image.to(_acc(image))
    if image.dtype == torch.uint8:
        x = x / 255.0
    return F.avg_pool2d(x, kernel_size=pool, stride=pool)


def patch_importance(attn, layer_range, num_vision_tokens, action_tokens, grid):
    """The ``"torch"`` backend of ``patch_importance``: slices first, so it reads only the needed block."""
    start, end = layer_range
    block = attn[start:end, :, :, attn.shape[3] - action_tokens:, :num_vision_tokens].to(_acc(attn))
    m = block.mean(dim=(0, 2)).mean(dim=1)                                     # [B, V]
    m = m.reshape(m.shape[0], *grid)
    out = m / (m.sum(dim=(1, 2), keepdim=True) + 1e-8)
    return out if attn.dtype == torch.float64 else out.float()


def dilated_importance(importance: torch.Tensor, size: tuple[int, int], dilation: int) -> torch.Tensor:
    """``max_pool2d(interpolate(importance, size, bilinear), dilation, 1, dilation // 2)``: ``[B, h, w]``."""
    a = F.interpolate(importance.unsqueeze(1), size=size, mode="bilinear", align_corners=False)
    return F.max_pool2d(a, kernel_size=dilation, stride=1, padding=dilation // 2).squeeze(1)


def attention_weighted_drift(image, prev_small, prev_importance, pool, dilation):
    """The ``"torch"`` backend: ``(drift [B] float32, small [B, C, h, w] in small_dtype(image))``.

    The difference uses the unrounded float32 pooled image (as the fused kernels do) against ``prev_small``."""
    acc = _acc(image)
    small = pooled(image, pool).contiguous()
    diff = (small - prev_small.to(acc)).abs().mean(dim=1)
    a = dilated_importance(prev_importance.to(acc), tuple(small.shape[-2:]), dilation)
    drift = (diff * a).sum(dim=(1, 2))
    if acc == torch.float64:
        return drift, small
    return drift.float(), small.to(small_dtype(image))


def drift_gate_step(image, prev_small, prev_importance, state, prev_state, pool, dilation, drift_threshold,
                    state_threshold):
    """The ``"torch"`` backend of ``DriftGate.should_recompute``: ``(recompute, reason, drift, small)``.

    State guard ``s = max|state − prev_state|`` (in the state's dtype) first: ``s > state_threshold`` → STATE, drift
    ``s``; no previous frame → FIRST, drift 100; else the batch mean of :func:`attention_weighted_drift` against
    ``drift_threshold`` → VISION or REUSE. Thresholds compare in float64; a NaN exceeds every threshold."""
    dev = image.device
    if prev_small is None:
        small = pooled(image, pool).to(small_dtype(image)).contiguous()
        run = torch.ones((), dtype=torch.bool, device=dev)
        reason = torch.full((), FIRST, dtype=torch.int64, device=dev)
        drift = torch.full((), 100.0, dtype=torch.float32, device=dev)
    else:
        drifts, small = attention_weighted_drift(image, prev_small, prev_importance, pool, dilation)
        drift = drifts.mean()
        run = ~(drift.double() <= drift_threshold)
        reason = torch.where(run, VISION, REUSE)
    if prev_state is None:
        return run, reason, drift, small
    s = (state - prev_state).abs().amax()
    state_run = ~(s.double() <= state_threshold)
    return state_run | run, torch.where(state_run, STATE, reason), torch.where(state_run, s.float(), drift), small


class ProAttentionGate:
    """Seed 002's ``ProAttentionGate``, transcribed as written (224×224 images, pool 8, 16×16 grid, 50 action
    tokens, string reasons, ``.item()`` syncs). The tests' oracle and the benchmark's eager baseline."""

    def __init__(self, drift_threshold=0.5, state_threshold=0.05, dilation_kernel=5):
        self.drift_threshold = drift_threshold
        self.state_threshold = state_threshold
        self.dilation_kernel = dilation_kernel

        self.prev_image_small = None
        self.prev_attention = None
        self.prev_state = None
        self.prev_kv_cache = None

    def extract_patch_importance(self, full_attention_weights, layer_range=(14, 18)):
        layer_start, layer_end = layer_range
        selected_attn = full_attention_weights[layer_start:layer_end]
        avg_attn = selected_attn.mean(dim=(0, 2))

        num_vision_tokens = 256
        action_start = -50

        action_to_vision = avg_attn[:, action_start:, :num_vision_tokens]
        importance = action_to_vision.mean(dim=1)

        B = importance.shape[0]
        importance_2d = importance.view(B, 16, 16)

        importance_2d = importance_2d / (importance_2d.sum(dim=(1, 2), keepdim=True) + 1e-8)

        return importance_2d

    def dilate_attention(self, attention_map):
        attn_4d = attention_map.unsqueeze(1)
        padding = self.dilation_kernel // 2
        dilated = F.max_pool2d(attn_4d, kernel_size=self.dilation_kernel, stride=1, padding=padding)
        return dilated.squeeze(1)

    def robust_image_diff(self, current_image):
        curr_small = F.avg_pool2d(current_image, kernel_size=8, stride=8)
        if self.prev_image_small is None:
            return None
        diff = torch.abs(curr_small - self.prev_image_small).mean(dim=1)
        return diff

    def should_recompute(self, current_image, current_state):
        if self.prev_state is not None:
            state_diff = torch.max(torch.abs(current_state - self.prev_state)).item()
            if state_diff > self.state_threshold:
                return True, f"State Drift: {state_diff:.4f}", state_diff

        if self.prev_image_small is None or self.prev_attention is None:
            return True, "First Frame", 100.0

        curr_small = F.avg_pool2d(current_image, kernel_size=8, stride=8)
        pixel_diff = torch.abs(curr_small - self.prev_image_small).mean(dim=1)

        attn_resized = F.interpolate(
            self.prev_attention.unsqueeze(1), size=(28, 28), mode="bilinear", align_corners=False
        ).squeeze(1)

        attn_dilated = self.dilate_attention(attn_resized)

        weighted_diff = (pixel_diff * attn_dilated).sum(dim=(1, 2))
        drift_value = weighted_diff.mean().item()

        should_run = drift_value > self.drift_threshold

        return should_run, f"Vision Drift: {drift_value:.4f}", drift_value

    def update(self, current_image, current_attention, current_state, current_kv_cache):
        self.prev_image_small = F.avg_pool2d(current_image, kernel_size=8, stride=8)
        self.prev_attention = self.extract_patch_importance(current_attention)
        self.prev_state = current_state.clone()
        self.prev_kv_cache = current_kv_cache

    def get_cached_kv(self):
        return self.prev_kv_cache

    def reset(self):
        self.prev_image_small = None
        self.prev_attention = None
        self.prev_state = None
        self.prev_kv_cache = None


SEED_REASONS = {"State Drift": STATE, "Vision Drift": VISION, "First Frame": FIRST}


def seed_reason_code(should_run: bool, reason: str) -> int:
    """The ``GateReason`` code of a seed (should_run, reason string) pair: a reused frame is REUSE."""
    return SEED_REASONS[reason.split(":")[0]] if should_run else REUSE

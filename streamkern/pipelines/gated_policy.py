"""``GatedPolicy`` (seed 002): a tiny random VLA policy whose vision KV is reused when the drift gate allows.

The policy (pi0-like, 18 layers) embeds a 3×224×224 camera frame as 16×16 patches, a fixed text prompt, and then
denoises an action chunk of ``action_tokens`` tokens (plus one state token) for ``denoise_steps`` steps against
the cached prefix KV ``[NL, B, P, H, D]``. A full pass returns the actions, the attention maps
``[NL, B, heads, S, S]`` (prefix rows from the prefix pass, suffix rows from the last denoising step) and the KV.

Each step the gate decides (seed 002's three defences: state guard, 8× pooled drift, attention dilated by max
pooling) whether to run the full pass or denoise against the cached KV. Scripted trajectories provide slow camera
motion, lighting noise, a state jump and a hand entering the low-attention blind spot.

* ``eager=True`` (``backend="torch"``): the seed's ``ProAttentionGate`` and ``ProOptimizedInference.infer``.
* ``eager=False``: ``streamkern.DriftGate`` with the backend; its decision stays on the device and picks one of
  the two bodies of a ``device_branch``: read once per step when run eagerly (the branch that skips the vision
  encoder cannot be taken without it), chosen on the device when a step is captured in a ``StepGraph``.
"""
from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from ..ops.drift_gate import DriftGate
from ..ops.reference.drift_gate import ProAttentionGate, seed_reason_code
from ..step_graph import device_branch
from .runtime import PipelineRun, nbytes, part, timed_step
from .tiny import Block, randn, seeded

REASON_NAMES = {0: "reuse", 1: "state drift", 2: "vision drift", 3: "first frame"}


def _attention_with_map(q, k, v):
    """Softmax attention on ``[B, T, H, D]`` tensors that also returns its map ``[B, H, Tq, Tk]``."""
    p = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1]), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", p, v), p


class TinyPolicy(nn.Module):
    """Random-weight pi0-like policy over the seed's shapes (224×224 image, 16×16 patches, 50 action tokens)."""

    def __init__(self, num_layers=18, heads=2, head_dim=32, patch=14, text_tokens=8, action_tokens=50,
                 state_dim=7, action_dim=7, denoise_steps=3, seed=0):
        super().__init__()
        c = heads * head_dim
        self.heads, self.head_dim, self.denoise_steps = heads, head_dim, denoise_steps
        with seeded(seed):
            self.patch_embed = nn.Conv2d(3, c, patch, stride=patch)
            self.text = nn.Parameter(torch.randn(1, text_tokens, c) * 0.5)
            self.state_in, self.action_in = nn.Linear(state_dim, c), nn.Linear(action_dim, c)
            self.action_pos = nn.Parameter(torch.randn(1, action_tokens, c) * 0.5)
            self.blocks = nn.ModuleList(Block(heads, head_dim) for _ in range(num_layers))
            self.action_out = nn.Linear(c, action_dim)
        self.action_tokens, self.action_dim = action_tokens, action_dim

    def _prefix(self, image):
        """Prefix pass: ``(kv (k, v) [NL, B, P, H, D], attention rows [NL, B, heads, P, P])``."""
        x = self.patch_embed(image).flatten(2).transpose(1, 2)
        x = torch.cat([x, self.text.expand(x.shape[0], -1, -1)], dim=1)
        ks, vs, maps = [], [], []
        for block in self.blocks:
            def attend(q, k, v):
                out, p = _attention_with_map(q, k, v)
                maps.append(p)
                return out
            x, k, v = block(x, attend)
            ks.append(k)
            vs.append(v)
        return (torch.stack(ks), torch.stack(vs)), torch.stack(maps)

    def denoise_with_cached_kv(self, kv, state, noise, keep_maps=False):
        """Flow-matching style denoising of the action chunk: suffix ``[state, actions]`` attends to the cached
        prefix and itself. Returns ``actions [B, A, action_dim]`` (and the last step's suffix attention rows)."""
        pk, pv = kv
        actions, maps = noise, []
        for step in range(self.denoise_steps):
            x = torch.cat([self.state_in(state)[:, None], self.action_in(actions) + self.action_pos], dim=1)
            maps.clear()
            for layer, block in enumerate(self.blocks):
                def attend(q, k, v, layer=layer):
                    out, p = _attention_with_map(q, torch.cat([pk[layer], k], dim=1), torch.cat([pv[layer], v], 1))
                    if keep_maps:
                        maps.append(p)
                    return out
                x, _, _ = block(x, attend)
            actions = actions - self.action_out(x[:, 1:]) / self.denoise_steps
        return actions, maps

    def full_forward_with_attention(self, image, state, noise):
        """Full pass: ``(actions, attention [NL, B, heads, S, S], kv)`` with ``S = P + 1 + A``."""
        kv, prefix_maps = self._prefix(image)
        actions, suffix_maps = self.denoise_with_cached_kv(kv, state, noise, keep_maps=True)
        NL, B, Hh, P, _ = prefix_maps.shape
        S = P + 1 + self.action_tokens
        attn = prefix_maps.new_zeros(NL, B, Hh, S, S)
        attn[..., :P, :P] = prefix_maps
        attn[..., P:, :] = torch.stack(suffix_maps)
        return actions, attn, kv


def scripted_trajectory(steps: int, batch: int = 1, seed: int = 0, device="cpu"):
    """Camera frames ``[steps, B, 3, 224, 224]`` in [0, 1] and states ``[steps, B, 7]``.

    A textured scene with a bright object; the camera pans slowly (every 4th step by 2 px), lighting flickers
    (±2 % gain, σ = 0.01 pixel noise), the state drifts slowly except for a 0.2 jump at ``steps // 3``, and a hand
    (a dark block) slides in from the right edge, outside the object's attention, from ``2·steps // 3``."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    scene = 0.4 + 0.1 * torch.sin(xx / 17) * torch.cos(yy / 23) + 0.05 * torch.rand(3, 224, 224, generator=g)
    scene = scene + 0.5 * torch.exp(-((xx - 90) ** 2 + (yy - 110) ** 2) / 400)
    images, states = [], []
    state = torch.rand(batch, 7, generator=g)
    hand_from = 2 * steps // 3
    for t in range(steps):
        frame = torch.roll(scene, shifts=2 * (t // 4), dims=2)
        frame = frame * (1 + 0.02 * (torch.rand(1, generator=g) * 2 - 1))
        frame = frame + 0.01 * torch.randn(batch, 3, 224, 224, generator=g)
        if t >= hand_from:
            reach = min(224, 24 * (t - hand_from + 1))
            frame[..., 150:210, 224 - reach:] = 0.05
        state = state + 0.01 * torch.randn(batch, 7, generator=g).clamp(-1, 1)
        if t == steps // 3:
            state = state + 0.2
        images.append(frame.clamp(0, 1))
        states.append(state.clone())
    return torch.stack(images).to(device), torch.stack(states).to(device)


class GatedPolicy:
    """Runs a :class:`TinyPolicy` over a scripted trajectory behind the drift gate; see the module docstring.

    ``drift_threshold`` defaults to 0.1, calibrated on :func:`scripted_trajectory` (lighting noise and the slow
    pan stay under it, the hand crosses it), as the seed calibrates 1.0 on its recorded LIBERO drifts."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, drift_threshold: float = 0.1,
                 state_threshold: float = 0.05, dilation: int = 5, batch: int = 1, device="cpu", seed: int = 0,
                 **policy_kwargs):
        self.backend = backend
        self.eager = backend == "torch" if eager is None else eager
        self.device, self.batch, self.seed = torch.device(device), batch, seed
        self.policy = TinyPolicy(seed=seed, **policy_kwargs).to(self.device)
        self.thresholds = dict(drift_threshold=drift_threshold, state_threshold=state_threshold)
        self.dilation = dilation

    def gate(self):
        """A fresh gate for :meth:`step`: the seed's ``ProAttentionGate`` (eager), else a :class:`DriftGate` on the
        pipeline's backend (it carries the previous frame, state and KV from step to step)."""
        if self.eager:
            return ProAttentionGate(dilation_kernel=self.dilation, **self.thresholds)
        return DriftGate(dilation=self.dilation, pool=8, layer_range=(14, 18), num_vision_tokens=256,
                               action_tokens=self.policy.action_tokens, grid=(16, 16), backend=self.backend,
                               **self.thresholds)

    def _gate_bytes(self, image, state, attention=None) -> int:
        """Bytes a gate call reads: the image and state; ``update`` also the attention it keeps (the seed's whole
        maps of layers 14-18, the fused gate only their action-to-vision slice)."""
        if attention is None:
            return nbytes(image, state)
        maps = attention[14:18]
        if not self.eager:
            maps = maps[..., -self.policy.action_tokens:, :256]
        return nbytes(image, state, maps)

    def step(self, gate, image, state, noise):
        """One control step: ``(actions [B, A, action_dim], reason [] int64, drift)`` for the frame ``image
        [B, 3, 224, 224]``, the state ``[B, 7]`` and the denoising noise ``[B, A, action_dim]``.

        Accelerated, the full pass + ``gate.update`` and the reuse pass are the two bodies of one
        :func:`~streamkern.step_graph.device_branch` on the gate's decision: read once on the host when run
        eagerly, chosen on the device in a captured step (the gate carries its frame, state and KV in place)."""
        if self.eager:   # ProOptimizedInference.infer, as the seed writes it
            with part("gating", self.device) as moved:
                should_recompute, reason, drift = gate.should_recompute(image, state)
                moved(self._gate_bytes(image, state))
            if not should_recompute:
                actions, _ = self.policy.denoise_with_cached_kv(gate.get_cached_kv(), state, noise)
            else:
                actions, attention, kv = self.policy.full_forward_with_attention(image, state, noise)
                with part("gating", self.device) as moved:
                    gate.update(image, attention, state, kv)
                    moved(self._gate_bytes(image, state, attention))
            return actions, seed_reason_code(should_recompute, reason), drift
        with part("gating", self.device) as moved:
            recompute, reason, drift = gate.should_recompute(image, state)
            moved(self._gate_bytes(image, state))

        def full():
            actions, attention, kv = self.policy.full_forward_with_attention(image, state, noise)
            with part("gating", self.device) as moved:
                gate.update(image, attention, state, kv)
                moved(self._gate_bytes(image, state, attention))
            return actions

        def reuse():
            return self.policy.denoise_with_cached_kv(gate.cached_kv(), state, noise)[0]

        return device_branch(recompute, full, reuse), reason, drift

    @torch.no_grad()
    def run(self, steps: int = 24, forbid_syncs: bool = False, progress=None) -> PipelineRun:
        """Run one scripted episode of ``steps`` frames. Outputs: ``actions [steps, B, A, 7]``,
        ``reasons [steps]`` int64 (``GateReason`` codes), ``drift [steps]`` float64."""
        images, states = scripted_trajectory(steps, self.batch, self.seed, self.device)
        gate, log = self.gate(), []
        record = PipelineRun("GatedPolicy", "torch (eager)" if self.eager else self.backend, {})
        for t in range(steps):
            noise = randn((self.batch, self.policy.action_tokens, self.policy.action_dim), self.seed * 7919 + t,
                          self.device)
            frame = (gate, images[t], states[t], noise)
            timed_step(record, self.device, lambda frame=frame: log.append(self.step(*frame)), forbid=forbid_syncs)
            if progress is not None:
                progress()
        reasons = torch.tensor([int(r) for _, r, _ in log], dtype=torch.int64)
        record.outputs = {"actions": torch.stack([a for a, _, _ in log]),
                          "reasons": reasons,
                          "drift": torch.tensor([float(d) for _, _, d in log], dtype=torch.float64)}
        counts = Counter(REASON_NAMES[int(r)] for r in reasons)
        record.info = {"reuse_rate": counts["reuse"] / steps, "reasons": dict(counts)}
        return record


def reasons_table(run: PipelineRun) -> str:
    """Seed 002 Step 4: the trigger distribution of one run, as text."""
    total = len(run.outputs["reasons"])
    lines = [f"{'reason':14s} {'steps':>5s} {'share':>6s}"]
    for code, name in REASON_NAMES.items():
        n = run.info["reasons"].get(name, 0)
        lines.append(f"{name:14s} {n:5d} {n / total:6.1%}")
    return "\n".join(lines)

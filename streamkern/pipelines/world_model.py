"""``MemoryWorldModel`` (seed 004): a tiny Hybrid CDiT world model with an LRU memory buffer retrieved by pose.

Each step predicts the next latent frame (``frame_len`` tokens of ``heads × head_dim`` channels) from the previous
one (cross-attention context) and the camera's move (the conditioning vector), in ``steps`` denoising passes.
Blocks ``[0, depth/2)`` are standard CDiT blocks; the later ones (``memory_layers``) add a memory attention over the
frames of the buffer: the ``k`` (8) stored frames nearest the current camera pose,
``sim_i = exp(-‖pose_i[:3] − pose[:3]‖ / 10)`` (``pose_topk``), applied only when the activation score, the best
retrieved ``sim``, exceeds 0.3; otherwise the block adds nothing. After the step the predicted frame enters the
buffer (``buffer_size`` frames, 50): when full, the least recently used frame leaves, a frame being used when it is
inserted or when an activated memory attention reads it (the retrieved frames count as used in rank order, the best
first, so the least similar of them is the most recent).

* ``eager=True`` (``backend="torch"``): the seed's ``MemoryBuffer`` — frames kept on the CPU in Python lists,
  a Python loop over the poses, ``torch.topk`` of the list of similarities (``k`` capped at the frames held, as a
  filling buffer needs), the frames moved to the device when retrieved, ``if score > 0.3`` on the host, and every
  memory layer re-projecting the retrieved frames to K/V in every pass.
* ``eager=False``: the buffer is pages of one ``FramePool`` over the memory layers; each frame's K/V is projected
  once, at insert (``FramePool.write``); ``pose_topk``, the gate and the LRU victim are computed on the device and
  ``frame_attention(..., gate=)`` reads the retrieved pages in place: no host sync in the loop.

``run(num_steps)`` follows :func:`camera_trajectory` (``trajectory_period`` steps a cycle), a scripted path that walks, jumps to unseen places (gate
closed), comes back (retrieval switches to the old frames) and runs long enough for the buffer to evict.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.frame_attention import frame_attention
from ..ops.frame_write import FramePool
from ..ops.pose_topk import pose_topk
from ..ops.reference.pose_topk import seed_get_relevant_frames
from .runtime import PipelineRun, nbytes, part, timed_step
from .tiny import Block, randn, sdpa, seeded, sinusoid

THRESHOLD = 0.3     # seed 004: memory_activation_threshold


def camera_trajectory(steps: int, period: int = 64, device="cpu") -> torch.Tensor:
    """``[steps, 5]`` poses ``(x, y, z, pitch, yaw)``, in cycles of ``period`` steps (fractions of the period):
    a walk along x over the first 5/16 (area A), a jump far away and a walk there (B) to 35/64, a jump back into A
    walking the other way half a unit aside (A's frames retrieved) to 25/32, then a jump to area C; each cycle
    shifted 300 units on. Jumps close the gate; distances between stored poses never tie."""
    a, b, c = period * 5 // 16, period * 35 // 64, period * 25 // 32
    poses = []
    for t in range(steps):
        cycle, u = divmod(t, period)
        off = 300.0 * cycle
        if u < a:
            p = (off + u, 0.0, 0.0)
        elif u < b:
            p = (off + 100.0 + (u - a), 50.0, 1.0)
        elif u < c:
            p = (off + a - 0.7 - (u - b), 0.5, 0.0)
        else:
            p = (off - 80.0 - 0.9 * (u - c), -60.0, 2.0)
        poses.append((*p, 0.05 * t, 0.1 * (t % 7)))
    return torch.tensor(poses, dtype=torch.float32, device=device)


class MemoryAttention(nn.Module):
    """The memory attention of a later Hybrid CDiT block: queries from the tokens, K/V from stored frames."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        c = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.norm_x, self.norm_m = nn.LayerNorm(c), nn.LayerNorm(c)
        self.q, self.kv = nn.Linear(c, c), nn.Linear(c, 2 * c)
        self.proj = nn.Linear(c, c, bias=False)      # proj(0) == 0: a closed gate adds exactly nothing
        self.gate = nn.Parameter(torch.full((c,), 0.5))

    def query(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, D]`` queries of tokens ``x [B, T, C]``."""
        B, T, _ = x.shape
        return self.q(self.norm_x(x)).view(B, T, self.heads, self.head_dim)

    def project(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[N, F, H, D]`` of stored frames ``[N, F, C]``."""
        N, F, _ = frames.shape
        return self.kv(self.norm_m(frames)).view(N, F, 2, self.heads, self.head_dim).unbind(2)

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        """What the block adds: ``gate ⊙ proj(attended)``, ``attended [B, T, H, D]``."""
        B, T = attended.shape[:2]
        return self.gate * self.proj(attended.reshape(B, T, -1))


class TinyHybridCDiT(nn.Module):
    """Random-weight Hybrid CDiT: ``depth`` blocks (self-attention, cross-attention to the context frame, MLP), the
    blocks of ``memory_layers`` followed by a :class:`MemoryAttention`."""

    def __init__(self, depth: int, heads: int, head_dim: int, memory_layers, seed: int = 0):
        super().__init__()
        c = heads * head_dim
        self.memory_layers = tuple(memory_layers)
        with seeded(seed):
            self.embed, self.cond = nn.Linear(c, c), nn.Linear(5, c)
            self.blocks = nn.ModuleList(Block(heads, head_dim, text_dim=c) for _ in range(depth))
            self.out = nn.Linear(c, c)
            # built last, so that a model without memory layers has the same other weights
            self.memory = nn.ModuleList(MemoryAttention(heads, head_dim) for _ in self.memory_layers)

    def forward(self, x, context, move, step: int, memory):
        """``x [B, T, C]`` noisy frame, ``context [B, T, C]`` the previous frame, ``move [B, 5]`` the pose change;
        ``memory(j, module, h)`` returns what memory layer ``j`` adds to the tokens ``h`` (or ``None``)."""
        t = torch.full((x.shape[0],), step, device=x.device)
        h = self.embed(x) + (self.cond(move) + sinusoid(t, x.shape[-1]).to(x.dtype))[:, None]
        j = 0
        for layer, block in enumerate(self.blocks):
            h, _, _ = block(h, sdpa, block.text_kv(context))
            if layer in self.memory_layers:
                added = memory(j, self.memory[j], h)
                h = h if added is None else h + added
                j += 1
        return self.out(h)


class MemoryBuffer:
    """Seed 004's ``MemoryBuffer``, eager: frames on the CPU in a list ordered least recently used first."""

    def __init__(self, max_size: int = 50):
        self.max_size = max_size
        self.frames: list[torch.Tensor] = []
        self.poses: list[torch.Tensor] = []
        self.ids: list[int] = []

    def add(self, frame: torch.Tensor, pose: torch.Tensor, frame_id: int) -> None:
        if len(self.frames) >= self.max_size:
            self.frames.pop(0), self.poses.pop(0), self.ids.pop(0)
        self.frames.append(frame.detach().cpu())
        self.poses.append(pose)
        self.ids.append(frame_id)

    def get_relevant_frames(self, current_pose: torch.Tensor, k: int = 8):
        """``(positions, similarities)`` of the ``min(k, held)`` nearest frames, best first (the seed's loop)."""
        if not self.frames:
            return [], []
        k = min(k, len(self.frames))
        top = seed_get_relevant_frames(self.poses, current_pose, k).tolist()
        similarities = [torch.exp(-torch.norm(current_pose[:3] - self.poses[i][:3]) / 10.0) for i in top]
        return top, similarities

    def touch(self, positions: list[int]) -> None:
        """Mark frames used, in the given order (the last one becomes the most recent)."""
        entries = [(self.frames[i], self.poses[i], self.ids[i]) for i in positions]
        for i in sorted(positions, reverse=True):
            self.frames.pop(i), self.poses.pop(i), self.ids.pop(i)
        for f, p, i in entries:
            self.frames.append(f), self.poses.append(p), self.ids.append(i)


class _EagerMemory:
    """The seed's path: retrieval loop, host-side gate, frames moved over and re-projected in every pass."""

    def __init__(self, wm: "MemoryWorldModel"):
        self.wm, self.buffer = wm, MemoryBuffer(wm.buffer_size)
        self.frames, self.retrieved, self.gates = None, [], []

    def retrieve(self, t: int, pose) -> None:
        device = self.wm.device
        with part("retrieval", device) as moved:
            top, sims = self.buffer.get_relevant_frames(pose, self.wm.k)
            ids = [self.buffer.ids[i] for i in top]
            moved(nbytes(*self.buffer.poses))
        with part("gating", device):
            score = max(sims).item() if sims else 0.0
            active = score > THRESHOLD
        with part("retrieval", device) as moved:
            self.frames = (torch.stack([self.buffer.frames[i] for i in top]).to(device) if active else None)
            if active:
                self.buffer.touch(top)
                moved(2 * nbytes(self.frames))
        self.gates.append(active)
        self.retrieved.append(sorted(ids + [-1] * (self.wm.k - len(ids))))

    def attend(self, j: int, module: MemoryAttention, h):
        if self.frames is None:
            return None
        with part("memory attention", self.wm.device) as moved:
            k, v = module.project(self.frames)         # re-projected in every pass of every step
            N, F, H, D = k.shape
            q = module.query(h)
            out = sdpa(q, k.reshape(1, N * F, H, D), v.reshape(1, N * F, H, D))
            moved(nbytes(self.frames, module.kv.weight, q, out) + 2 * nbytes(k, v))
        return module.output(out)

    def insert(self, t: int, frame, pose) -> None:
        with part("cache", self.wm.device) as moved:
            self.buffer.add(frame[0], pose, t)
            moved(2 * nbytes(frame))

    def outputs(self) -> dict:
        return {"gates": torch.tensor(self.gates), "retrieved": torch.tensor(self.retrieved, dtype=torch.int64),
                "buffer": torch.tensor(sorted(self.buffer.ids), dtype=torch.int64)}


class _PagedMemory:
    """The accelerated path: buffer slots are pages of a ``FramePool`` over the memory layers; poses, validity,
    last use and frame ids are device tensors (slot ``N`` of ``last_used`` is a dump for padding entries)."""

    def __init__(self, wm: "MemoryWorldModel"):
        self.wm = wm
        N, dev = wm.buffer_size, wm.device
        self.pool = FramePool(len(wm.model.memory_layers), 1, N, wm.frame_len, wm.heads, wm.head_dim,
                              dtype=wm.dtype, device=dev, backend=wm.backend)
        self.poses = torch.zeros(N, 5, dtype=torch.float32, device=dev)
        self.valid = torch.zeros(N, dtype=torch.bool, device=dev)
        self.last_used = torch.full((N + 1,), -1, dtype=torch.int64, device=dev)
        self.frame_ids = torch.full((N,), -1, dtype=torch.int64, device=dev)
        self.rank = torch.arange(wm.k, device=dev)
        self.held, self.retrieved, self.gates = 0, [], []

    def _clock(self, t: int) -> int:
        """Use times are ``t·(k + 1) + rank``: retrieved frames at ranks ``0..k-1``, the inserted frame at ``k``."""
        return t * (self.wm.k + 1)

    def retrieve(self, t: int, pose) -> None:
        N, k, device = self.wm.buffer_size, self.wm.k, self.wm.device
        with part("retrieval", device) as moved:
            idx, sim = pose_topk(self.poses, self.valid, pose, k, 10.0, backend=self.wm.backend)
            moved(nbytes(self.poses, self.valid, idx, sim))
        with part("gating", device) as moved:
            self.gate = sim[0] > THRESHOLD
            moved(nbytes(sim[0], self.gate))
        with part("retrieval", device) as moved:
            slot = torch.where(idx >= 0, idx, N)
            used = torch.where(self.gate & (idx >= 0), self._clock(t) + self.rank, self.last_used[slot])
            self.last_used.scatter_(0, slot, used)
            ids = torch.where(idx >= 0, self.frame_ids[idx.clamp(min=0)], -1)
            self.table = idx[None]
            moved(4 * nbytes(idx))
        self.n_read = min(self.held, k)
        self.gates.append(self.gate)
        self.retrieved.append(ids.sort().values)

    def attend(self, j: int, module: MemoryAttention, h):
        with part("memory attention", self.wm.device) as moved:
            q = module.query(h)
            out = frame_attention(q, self.pool.k[j], self.pool.v[j], self.table, gate=self.gate,
                                 backend=self.wm.backend)
            moved(nbytes(q, out) + self.gate * 2 * self.n_read * nbytes(self.pool.k[j, 0, 0]))
        return module.output(out)

    def insert(self, t: int, frame, pose) -> None:
        with part("cache", self.wm.device) as moved:
            slot = torch.where(self.valid, self.last_used[:-1], -1).argmin()   # first free slot, else the LRU one
            ks, vs = zip(*(m.project(frame) for m in self.wm.model.memory))
            k, v = torch.stack(ks), torch.stack(vs)                           # [NLm, 1, F, H, D]: projected once
            self.pool.write(k, v, slot[None])
            at = slot[None]
            self.poses.index_copy_(0, at, pose[None])
            self.valid.index_fill_(0, at, True)
            self.last_used.index_fill_(0, at, self._clock(t) + self.wm.k)
            self.frame_ids.index_fill_(0, at, t)
            moved(nbytes(frame, *[m.kv.weight for m in self.wm.model.memory]) + 3 * nbytes(k, v))
        self.held = min(self.held + 1, self.wm.buffer_size)

    def outputs(self) -> dict:
        return {"gates": torch.stack(self.gates).cpu(), "retrieved": torch.stack(self.retrieved).cpu(),
                "buffer": self.frame_ids[self.valid].sort().values.cpu()}


class MemoryWorldModel(nn.Module):
    """Tiny Hybrid CDiT world model with a pose-retrieved LRU memory buffer; see the module docstring.
    ``run(num_steps)`` returns a :class:`PipelineRun` with outputs ``frames [N, 1, frame_len, C]``, ``gates [N]``
    (memory attention on), ``retrieved [N, k]`` (stream indices of the retrieved frames, sorted, -1 padded) and
    ``buffer`` (the frames held at the end, sorted)."""

    def __init__(self, *, backend: str = "torch", eager: bool | None = None, depth: int = 6, heads: int = 4,
                 head_dim: int = 16, frame_len: int = 16, memory_layers=None, buffer_size: int = 50, k: int = 8,
                 steps: int = 2, trajectory_period: int = 64, dtype: torch.dtype = torch.float32, device="cpu",
                 seed: int = 0):
        super().__init__()
        if buffer_size < k:
            raise ValueError(f"buffer_size: expected at least k={k} slots, got {buffer_size}")
        self.backend = backend
        self.eager = backend == "torch" if eager is None else eager
        self.heads, self.head_dim, self.frame_len, self.buffer_size, self.k = heads, head_dim, frame_len, buffer_size, k
        self.steps, self.period, self.dtype, self.device, self.seed = (steps, trajectory_period, dtype,
                                                                       torch.device(device), seed)
        layers = range(depth // 2, depth) if memory_layers is None else memory_layers
        self.model = TinyHybridCDiT(depth, heads, head_dim, layers, seed).to(device=self.device, dtype=dtype)

    def _step(self, t: int, memory, prev, move, pose, noise, frames: list):
        memory.retrieve(t, pose)
        x = noise
        for s in range(self.steps):
            pred = self.model(x, prev, move, s, memory.attend)
            keep = (s + 1) / (self.steps + 1)
            x = pred if s == self.steps - 1 else keep * pred + (1 - keep) * noise
        memory.insert(t, x, pose)
        frames.append(x)

    @torch.no_grad()
    def run(self, num_steps: int = 72, forbid_syncs: bool = False, progress=None) -> PipelineRun:
        """Predict ``num_steps`` frames along :func:`camera_trajectory`; ``forbid_syncs`` makes any host read in
        a step raise."""
        memory = _EagerMemory(self) if self.eager else _PagedMemory(self)
        poses = camera_trajectory(num_steps, self.period, self.device)
        moves = torch.diff(poses, dim=0, prepend=poses[:1]).to(self.dtype)
        C = self.heads * self.head_dim
        frames = [randn((1, self.frame_len, C), self.seed + 7, self.device, self.dtype)]
        record = PipelineRun("MemoryWorldModel", "torch (eager)" if self.eager else self.backend, {})
        for t in range(num_steps):
            noise = randn((1, self.frame_len, C), self.seed * 1000 + t, self.device, self.dtype)   # input, untimed
            timed_step(record, self.device, lambda: self._step(t, memory, frames[-1], moves[t:t + 1], poses[t],
                                                               noise, frames), forbid=forbid_syncs)
            if progress is not None:
                progress()
        record.outputs = {"frames": torch.stack(frames[1:]), **memory.outputs()}
        gates = record.outputs["gates"]
        record.info = {"memory_on": f"{int(gates.sum())}/{len(gates)}",
                       "buffer_count": len(record.outputs["buffer"])}
        return record

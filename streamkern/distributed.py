"""Head-parallel (Ulysses) streaming over ``torch.distributed``: every rank holds the streaming memory of its heads.

With ``world`` ranks and ``H`` attention heads, rank ``r`` keeps the caches of heads ``[r·H/world, (r+1)·H/world)``:
the same :class:`~streamkern.StreamingKV` (``FramePool``, ``KVRing``...) with ``H/world`` heads, the ops unchanged.
Everything outside attention (projections, MLP, cross-attention, positions) runs on this rank's contiguous slice of
the sequence, ``T/world`` tokens, with the weights replicated. Around each attention:

1. :meth:`HeadParallel.seq_to_heads`: one all-to-all turns the sequence-sharded ``q, k, v [B, T/world, H, D]`` of
   every rank into head-sharded ``[B, T, H/world, D]``: rank r sends the tokens of its slice for heads of rank s to
   rank s, which puts them at the slice's place in the sequence;
2. the cache write and the attention of this rank's heads over its own pages (no communication: a head's attention
   reads only that head's keys and values);
3. :meth:`HeadParallel.heads_to_seq`: the inverse all-to-all brings the output back to ``[B, T/world, H, D]``.

Decisions that read every head are reduced on the device: the consensus score that picks the frame the bank keeps
is a mean over heads, ``score[b, f] = Σ_l λ_l · mean_h(...)``; each rank's ``select_frame`` averages its own heads,
and :meth:`HeadParallel.reduce_scores` (``StreamingKV(reduce_scores=...)``) all-reduces those partial means before
the argmax, so every rank keeps the same frame, records the same score and evicts the same slot. MemFlow's sparse
activation (``frame_topk(per_head=True)``) ranks the bank per head: nothing to reduce. ``frame_topk(per_head=False)``
averages over heads, but nothing in the streaming memory calls it and the op returns ids, not the scores a reduction
needs (see docs/distributed.md). There is no host sync beyond the collectives themselves.

The process group: NCCL for CUDA tensors, gloo for CPU tensors (a combined ``"cpu:gloo,cuda:nccl"`` group serves
both); a group whose backend does not carry the device's tensors (gloo with CUDA tensors stages them through the host;
NCCL has no CPU path) is refused with ``ValueError`` when :class:`HeadParallel` is made. A collective that fails
because another rank raised and left, or that outlives the group's timeout (``init_process_group(timeout=...)``;
gloo enforces it per call, NCCL's watchdog aborts the communicator), raises :class:`CollectiveError` instead of
hanging. :func:`run_local` starts ``world`` local processes on a fresh group (tests, the benchmark's dry run).
"""
from __future__ import annotations

import datetime
import io
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from . import _checks as check
from .streaming_kv import StreamingKV

# the device type each backend carries collectives for without a host round trip
_CARRIES = {"gloo": "cpu", "nccl": "cuda"}


class CollectiveError(RuntimeError):
    """A collective of :class:`HeadParallel` failed: another rank raised and left, or the group's timeout passed."""


def _backends(group) -> dict[str, str]:
    """``{device type: backend}`` of a process group (``"cpu:gloo,cuda:nccl"`` names one per device type)."""
    name = str(dist.get_backend(group)).lower()
    if ":" in name:
        return dict(pair.split(":", 1) for pair in name.split(","))
    return {_CARRIES.get(name, "*"): name}


class HeadParallel:
    """Ulysses head parallelism on a ``torch.distributed`` process group.

    Args:
        group: the process group (``None``: the default group, which must be initialised).
        device: where this rank's tensors live (default: the current CUDA device for an NCCL group, else the CPU).

    Raises ``RuntimeError`` when no process group is initialised and ``ValueError`` when the group's backend does not
    carry ``device``'s tensors (gloo: CPU only, NCCL: CUDA only), before any collective runs.

    Attributes: ``group``, ``rank``, ``world``, ``device``, ``backend`` (the backend that carries ``device``'s
    tensors).
    """

    def __init__(self, group=None, *, device: torch.device | str | None = None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("group: no torch.distributed process group is initialised (call "
                               "torch.distributed.init_process_group first, or use streamkern.distributed.run_local)")
        self.group = dist.group.WORLD if group is None else group
        self.rank, self.world = dist.get_rank(self.group), dist.get_world_size(self.group)
        backends = _backends(self.group)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device()) if backends.get("cuda") == "nccl"
                      else torch.device("cpu"))
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        backend = backends.get(device.type, backends.get("*"))
        if backend is None or _CARRIES.get(backend, device.type) != device.type:
            have = ", ".join(f"{b} for {d} tensors" if d != "*" else b for d, b in backends.items())
            want = {"cuda": "an NCCL group (init_process_group('nccl'), or 'cpu:gloo,cuda:nccl')",
                    "cpu": "a gloo group (init_process_group('gloo'))"}.get(device.type, "a group for that device")
            staged = device.type == "cuda" and "gloo" in backends.values()
            raise ValueError(f"group: its backend ({have}) does not carry {device.type} tensors"
                             f"{' without staging them through the host' if staged else ''}; "
                             f"device {device} needs {want}")
        self.device, self.backend = device, backend

    def __repr__(self) -> str:
        return f"HeadParallel(rank={self.rank}, world={self.world}, backend={self.backend!r}, device={self.device})"

    # --- shapes --------------------------------------------------------------------------------------------------

    def local_heads(self, heads: int) -> int:
        """``heads / world``, the heads this rank holds; ``ValueError`` naming ``heads`` unless ``world`` divides
        it (call it before allocating anything per head)."""
        check.integer("heads", heads, low=1)
        if heads % self.world:
            raise ValueError(f"heads: expected a multiple of the world size {self.world} (each rank holds "
                             f"heads / world of them), got {heads}")
        return heads // self.world

    def heads_of(self, x: torch.Tensor, dim: int = -2) -> torch.Tensor:
        """This rank's heads of ``x`` along ``dim``: a view ``x.narrow(dim, rank·H/world, H/world)``."""
        h = self.local_heads(x.shape[dim])
        return x.narrow(dim, self.rank * h, h)

    def shard_seq(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's slice of a sequence every rank holds whole: a view ``x.narrow(dim, rank·T/world,
        T/world)``, no communication; ``ValueError`` naming ``x`` unless ``world`` divides ``T``."""
        T = x.shape[dim]
        if T % self.world:
            raise ValueError(f"x: expected a sequence length (dim {dim}) divisible by the world size {self.world}, "
                             f"got {T}")
        return x.narrow(dim, self.rank * (T // self.world), T // self.world)

    def streaming_kv(self, num_layers: int, batch: int, frame_len: int, heads: int, head_dim: int,
                     **kwargs) -> StreamingKV:
        """This rank's :class:`StreamingKV`: ``heads / world`` of the model's ``heads`` (checked before anything is
        allocated), on ``device``, its bank decisions reduced across ranks (``reduce_scores``); ``kwargs`` are
        StreamingKV's other arguments."""
        local = self.local_heads(heads)
        kwargs.setdefault("device", self.device)
        return StreamingKV(num_layers, batch, frame_len, local, head_dim, reduce_scores=self.reduce_scores, **kwargs)

    # --- collectives ---------------------------------------------------------------------------------------------

    def _on_device(self, name: str, x: torch.Tensor) -> None:
        check.tensor(name, x)
        if x.device != self.device:
            raise ValueError(f"{name}: expected a tensor on this rank's device {self.device} ({self.backend} "
                             f"group), got one on {x.device}")

    def _collective(self, what: str, run: Callable[[], Any]) -> Any:
        try:
            return run()
        except RuntimeError as e:   # gloo: a peer's closed connection or the group's timeout; NCCL: an aborted comm
            raise CollectiveError(f"{what} failed on rank {self.rank} of {self.world} ({self.backend}): another "
                                  f"rank raised and left, or the process group's timeout passed ({e})") from e

    def seq_to_heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sequence-sharded to head-sharded, one all-to-all for all of ``xs``: each ``[..., T/world, H, D]`` (this
        rank's tokens, every head) becomes ``[..., T, H/world, D]`` (every token, this rank's heads; token order:
        rank 0's slice first)."""
        if not xs:
            raise ValueError("xs: expected at least one tensor [..., T/world, H, D], got none")
        for i, x in enumerate(xs):
            self._on_device(f"xs[{i}]", x)
            check.shape(f"xs[{i}]", x, xs[0].shape)
        *lead, Ts, H, D = xs[0].shape
        w, h = self.world, self.local_heads(H)
        send = torch.empty(w, len(xs), *lead, Ts, h, D, dtype=xs[0].dtype, device=self.device)
        for i, x in enumerate(xs):
            send[:, i].copy_(x.unflatten(-2, (w, h)).movedim(-3, 0))    # [w (rank of the heads), ..., Ts, h, D]
        recv = torch.empty_like(send)
        self._collective("all_to_all (sequence to heads)", lambda: dist.all_to_all_single(recv, send, group=self.group))
        return tuple(recv.movedim(0, -4).flatten(-4, -3).unbind(0))     # n × [..., w·Ts, h, D]

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """Head-sharded to sequence-sharded, one all-to-all: ``[..., T, H/world, D]`` (every token, this rank's
        heads) becomes ``[..., T/world, H, D]`` (this rank's tokens, every head); ``ValueError`` naming ``x`` unless
        ``world`` divides ``T``."""
        self._on_device("x", x)
        *lead, T, h, D = x.shape
        w = self.world
        if T % w:
            raise ValueError(f"x: expected a sequence length (dim {x.dim() - 3}) divisible by the world size {w}, "
                             f"got {T}")
        send = x.unflatten(-3, (w, T // w)).movedim(-4, 0).contiguous()       # [w (rank of the tokens), ..., Ts, h, D]
        recv = torch.empty_like(send)
        self._collective("all_to_all (heads to sequence)", lambda: dist.all_to_all_single(recv, send, group=self.group))
        return recv.movedim(0, -3).flatten(-3, -2)                              # [..., Ts, w·h, D]

    def attention(self, attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Ulysses attention: ``attend(q, k, v)`` on this rank's heads of the whole sequence (``[B, T, H/world, D]``
        each, the cache write included), from and back to this rank's tokens ``[B, T/world, H, D]``."""
        return self.heads_to_seq(attend(*self.seq_to_heads(q, k, v)))

    def gather_seq(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence on every rank from each rank's slice along ``dim`` (one all-gather; the inverse of
        :meth:`shard_seq`)."""
        self._on_device("x", x)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._collective("all_gather (sequence)", lambda: dist.all_gather(parts, x, group=self.group))
        return torch.cat(parts, dim=dim)

    def reduce_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of per-rank scores, in place, on the device (one all-reduce): with ``H/world`` heads
        on every rank, the mean of the ranks' head means is the mean over all ``H`` heads, so the consensus scores
        ``StreamingKV`` hands over become those of the whole model, the same on every rank."""
        self._on_device("scores", scores)
        self._collective("all_reduce (bank scores)", lambda: dist.all_reduce(scores, group=self.group))
        return scores.div_(self.world)


# --- local launcher ------------------------------------------------------------------------------------------------

@dataclass
class RankOutcome:
    """What one rank of :func:`run_local` did: ``result`` (what ``fn`` returned) or ``error`` (the exception and its
    traceback, or why the process gave none), and ``seconds`` from the start of ``fn`` to its return or raise."""

    rank: int
    result: Any = None
    error: str | None = None
    seconds: float | None = None


# fork-safe (no parent thread pool or CUDA state is inherited) and cheap after the first launch
_START_METHOD = "forkserver" if "forkserver" in torch.multiprocessing.get_all_start_methods() else "spawn"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world, port, backend, group_timeout_s, threads, args, results) -> None:
    ok = False
    try:
        if threads:
            torch.set_num_threads(threads)
        device_id = None
        if backend == "nccl":
            device_id = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device_id)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=group_timeout_s), device_id=device_id)
        start = time.perf_counter()
        try:
            value = fn(rank, world, *args)
            buffer = io.BytesIO()
            torch.save(value, buffer)
            results.put((rank, buffer.getvalue(), None, time.perf_counter() - start))
            ok = True
        except BaseException as e:
            results.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}",
                         time.perf_counter() - start))
        if ok:
            dist.destroy_process_group()
    except BaseException as e:   # the group could not be set up
        results.put((rank, None, f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))
    finally:
        results.close()
        results.join_thread()
        os._exit(0 if ok else 1)   # a failed rank leaves without tearing down a group its peers may still hold


def run_local(fn: Callable[..., Any], world: int, args: Sequence[Any] = (), *, backend: str | None = None,
              timeout_s: float = 120.0, group_timeout_s: float = 30.0, threads: int | None = None,
              check_errors: bool = True) -> list[RankOutcome]:
    """Run ``fn(rank, world, *args)`` on ``world`` fresh local processes (spawned by ``torch.multiprocessing``)
    that share a new process group, and collect what each returned.

    Args:
        fn: a module-level function (it is pickled by reference); its return value is sent back with ``torch.save``
            (tensors arrive on the CPU).
        world: the number of ranks.
        backend: ``"gloo"`` or ``"nccl"`` (default: NCCL when CUDA has ``world`` devices, else gloo); with NCCL rank
            r runs on ``cuda:r % device_count``.
        timeout_s: how long to wait for every rank; ranks still running then are killed and reported.
        group_timeout_s: the process group's timeout (``init_process_group(timeout=...)``): how long a collective
            waits for a rank that never comes.
        threads: ``torch.set_num_threads`` in each rank (default: the CPU cores shared out, for gloo).
        check_errors: raise ``RuntimeError`` with every failed rank's error (else return them).

    Returns:
        one :class:`RankOutcome` per rank, in rank order.
    """
    check.integer("world", world, low=1)
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    if backend not in _CARRIES:
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ValueError(f"world: NCCL needs a CUDA device per rank, this machine has {torch.cuda.device_count()} "
                         f"for {world} ranks")
    if threads is None and backend == "gloo":
        threads = max(1, (os.cpu_count() or 1) // world)
    ctx = torch.multiprocessing.get_context(_START_METHOD)
    if _START_METHOD == "forkserver":   # one server imports torch once; every rank after is a fork of it
        ctx.set_forkserver_preload(["torch", "torch.distributed", __name__])
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, world, port, backend, group_timeout_s, threads, tuple(args),
                                                  results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < world and time.monotonic() < deadline:
        try:
            rank, blob, error, seconds = results.get(timeout=0.2)
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
            continue
        value = None if blob is None else torch.load(io.BytesIO(blob), map_location="cpu", weights_only=False)
        outcomes[rank] = RankOutcome(rank, value, error, seconds)
    for rank, p in enumerate(procs):
        p.join(timeout=1.0 if rank in outcomes else 0.0)
        killed = p.is_alive()
        if killed:
            p.kill()
            p.join()
        if rank not in outcomes:
            why = (f"did not finish within timeout_s={timeout_s:g} s (killed)" if killed else
                   f"exited with code {p.exitcode} without reporting")
            outcomes[rank] = RankOutcome(rank, error=why)
    ordered = [outcomes[r] for r in range(world)]
    failed = [o for o in ordered if o.error is not None]
    if failed and check_errors:
        raise RuntimeError(f"run_local: {len(failed)} of {world} ranks failed:\n" +
                           "\n".join(f"--- rank {o.rank}: {o.error}" for o in failed))
    return ordered

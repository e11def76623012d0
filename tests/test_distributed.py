"""streamkern.distributed: Ulysses head parallelism over torch.distributed, on local gloo ranks (CPU) here and an
NCCL rank on a GPU.

Each test starts its ranks with ``run_local`` (forked from one server that imported torch once, so a launch costs
well under a second after the first); every rank builds the same tiny generator from the same seed, and what the
ranks return is compared here with a single-device run. Allocations in the ranks are NaN-poisoned as in conftest."""
import time

import pytest
import torch
from torch.overrides import TorchFunctionMode

import streamkern
from conftest import backend_params, poison_
from streamkern.distributed import CollectiveError, HeadParallel, run_local
from streamkern.pipelines import StreamingGenerator, count_host_syncs
from streamkern.testing import assert_parity

# 4 heads (so world 2 and 4 divide them), 12-token blocks, 10 blocks: the window wraps, the bank fills and evicts
STREAM = dict(num_layers=3, heads=4, head_dim=8, frame_seq_len=4, window_frames=6, sink_frames=1, bank_size=3,
              text_len=8, text_dim=16, switch_every=3, steps=1)
BLOCKS = 10
BACKEND = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"


def _poison_allocations() -> None:
    """In a rank (a process of its own, never restored): every ``torch.empty*`` comes back NaN-poisoned."""
    for name in ("empty", "empty_like", "empty_strided"):
        real = getattr(torch, name)
        setattr(torch, name, lambda *a, __real=real, **k: poison_(__real(*a, **k)))


def _stream(gen: StreamingGenerator, blocks: int = BLOCKS):
    """``(frames [N, B, T, C], bank frame ids [B, M], bank k, bank v [NL, B, M, F, H_rank, D])`` of a stream, every
    block run with host reads forbidden."""
    stream, frames = gen.stream(), []
    with count_host_syncs(forbid=True):
        for i in range(blocks):
            stream.noise.copy_(stream.block_noise(i))
            frames.append(stream.step())
    kv = stream.cache.kv
    bank = slice(kv.S + kv.W, None)
    return torch.stack(frames).cpu(), kv.bank_frame_ids.cpu(), kv.pool.k[:, :, bank].cpu(), kv.pool.v[:, :, bank].cpu()


def _generator_rank(rank, world, sparse, device):
    _poison_allocations()
    gen = StreamingGenerator(backend=BACKEND if device == "cpu" else "auto", eager=False, device=device,
                             sparse_bank=sparse, parallel=HeadParallel(), **STREAM)
    return _stream(gen)


def _assert_matches_one_device(outs, ref):
    frames, ids, bank_k, bank_v = ref
    for rank, (f, i, _, _) in enumerate(outs):
        assert_parity(f, frames, torch.float32, f"frames of rank {rank}")
        assert torch.equal(i, ids), f"rank {rank} banked frames {i.tolist()}, one device {ids.tolist()}"
    heads = outs[0][2].shape[-2]
    assert all(o[2].shape[-2] == heads == STREAM["heads"] // len(outs) for o in outs)   # each holds its heads only
    assert_parity(torch.cat([o[2] for o in outs], dim=-2), bank_k, torch.float32, "bank keys (ranks' heads joined)")
    assert_parity(torch.cat([o[3] for o in outs], dim=-2), bank_v, torch.float32, "bank values (ranks' heads joined)")
    assert (ids >= 0).all() and ids.max() > STREAM["window_frames"]   # the bank filled and kept evicted frames


@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("world", [2, 4])
def test_streaming_generator_head_parallel_equals_one_device(world, sparse):
    """World 2 and 4 (gloo, CPU): every rank returns the single-device frames, banks the same frames (the consensus
    score reduced over the ranks' heads), and its heads of the bank are the single-device ones; no host sync."""
    ref = _stream(StreamingGenerator(backend=BACKEND, eager=False, sparse_bank=sparse, **STREAM))
    outs = [o.result for o in run_local(_generator_rank, world, (sparse, "cpu"), timeout_s=120)]
    _assert_matches_one_device(outs, ref)


def _unreduced_rank(rank, world):
    hp = HeadParallel()
    hp.reduce_scores = lambda scores: scores     # each rank decides on its own heads only
    gen = StreamingGenerator(backend=BACKEND, eager=False, parallel=hp, **STREAM)
    return _stream(gen)[1]


def test_without_the_score_reduction_ranks_bank_different_frames():
    """The reduction is what keeps the ranks' banks equal: each rank scoring its own heads diverges."""
    ids = [o.result for o in run_local(_unreduced_rank, 2, timeout_s=120)]
    assert not torch.equal(ids[0], ids[1])


def _collectives_rank(rank, world):
    _poison_allocations()
    hp = HeadParallel()
    g = torch.Generator().manual_seed(7)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        whole = [torch.randn(3, 2, 4 * world, 2 * world, 5, generator=g).to(dtype) for _ in range(3)]  # [NL,B,T,H,D]
        mine = [hp.shard_seq(t, dim=2) for t in whole]
        heads = hp.seq_to_heads(*mine)             # strided views (a narrowed sequence) go in as they are
        for t, h in zip(whole, heads):
            assert torch.equal(h, hp.heads_of(t)), "seq_to_heads: every token of this rank's heads, in order"
        assert torch.equal(hp.heads_to_seq(heads[1]), mine[1])
        assert torch.equal(hp.gather_seq(mine[2], dim=2), whole[2])
    scores = torch.tensor([[float(rank), 1.0, -2.0 * rank]])
    assert torch.equal(hp.reduce_scores(scores), torch.tensor([[(world - 1) / 2, 1.0, -(world - 1.0)]]))
    return True


@pytest.mark.parametrize("world", [2, 3])
def test_all_to_all_moves_sequence_shards_to_head_shards_and_back(world):
    assert all(o.result for o in run_local(_collectives_rank, world, timeout_s=60))


class _Allocations(TorchFunctionMode):
    """Records every tensor factory called inside it."""

    FACTORIES = {"zeros", "ones", "empty", "full", "randn", "rand", "arange", "tensor", "empty_like", "zeros_like"}

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.FACTORIES:
            self.made.append(func.__name__)
        return func(*args, **(kwargs or {}))


def _bad_arguments_rank(rank, world):
    hp = HeadParallel()
    checks = []
    with _Allocations() as seen:
        for kw, match in [(dict(heads=3), "heads: expected a multiple of the world size 2"),
                          (dict(frame_seq_len=3), "a block of 9 tokens .* multiple of the world size 2"),
                          (dict(device="meta"), "device: expected this rank's device cpu")]:
            with pytest.raises(ValueError, match=match):
                StreamingGenerator(backend=BACKEND, eager=False, parallel=hp, **{**STREAM, **kw})
            checks.append(match)
        with pytest.raises(ValueError, match="parallel: head parallelism runs on the accelerated path"):
            StreamingGenerator(parallel=hp, **STREAM)      # backend="torch": the eager path
        with pytest.raises(ValueError, match="heads: expected a multiple of the world size"):
            hp.streaming_kv(2, 1, 4, 5, 8, window_frames=3)
    assert seen.made == [], f"allocated before refusing: {seen.made}"
    with pytest.raises(ValueError, match="group: its backend \\(gloo for cpu tensors\\) does not carry cuda tensors "
                                         "without staging them through the host; device cuda:1 needs an NCCL group"):
        HeadParallel(device="cuda:1")
    with pytest.raises(ValueError, match="xs\\[1\\]: expected a tensor on this rank's device cpu"):
        hp.seq_to_heads(torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1, device="meta"))
    with pytest.raises(ValueError, match="x: expected a sequence length \\(dim 1\\) divisible by the world size 2"):
        hp.heads_to_seq(torch.zeros(1, 3, 1, 1))
    with pytest.raises(ValueError, match="heads: expected a multiple"):
        hp.seq_to_heads(torch.zeros(1, 2, 3, 1))
    return checks


def test_bad_heads_block_device_or_backend_are_refused_before_anything_is_allocated():
    outs = run_local(_bad_arguments_rank, 2, timeout_s=60)
    assert all(len(o.result) == 3 for o in outs)


def test_head_parallel_needs_an_initialised_group():
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="no torch.distributed process group is initialised"):
        HeadParallel()


def _faulty_rank(rank, world, bad, linger_s):
    """Rank ``bad`` raises in block 2; it leaves at once, or (``linger_s``) stays ``linger_s`` seconds first
    without taking part. The others report when their collective failed, instead of raising."""
    gen = StreamingGenerator(backend=BACKEND, eager=False, parallel=HeadParallel(), **STREAM)
    stream = gen.stream()
    for i in range(BLOCKS):
        if rank == bad and i == 2:
            raised = time.monotonic()
            if linger_s:
                time.sleep(linger_s)
            raise ValueError(f"rank {rank} failed in block {i} (raised at {raised})")
        stream.noise.copy_(stream.block_noise(i))
        try:
            stream.step()
        except CollectiveError as e:
            return {"block": i, "at": time.monotonic(), "error": str(e)}
    return {"block": None}


@pytest.mark.parametrize("linger_s", [0, 5], ids=["leaves", "lingers"])
def test_a_rank_that_raises_makes_the_others_fail_within_the_timeout(linger_s):
    """A rank that raises and exits: the others' next collective fails at once (connection closed); one that raises
    and stays: theirs fails when the group's 1.5 s timeout passes, before it leaves. Never a hang."""
    group_timeout = 1.5
    outs = run_local(_faulty_rank, 2, (1, linger_s), group_timeout_s=group_timeout, timeout_s=60, check_errors=False)
    bad = outs[1]
    assert bad.error.startswith("ValueError: rank 1 failed in block 2"), bad.error
    raised = float(bad.error.split("raised at ")[1].split(")")[0])
    for o in outs[:1]:
        assert o.error is None and o.result["block"] == 2, o
        assert "failed on rank" in o.result["error"] and "another rank raised and left, or the process group's " \
               "timeout passed" in o.result["error"]
        waited = o.result["at"] - raised
        if linger_s:
            assert group_timeout - 0.5 < waited < min(group_timeout + 2.5, linger_s), waited
        else:
            assert waited < group_timeout, waited   # did not need the timeout


# --- GPU: one NCCL rank --------------------------------------------------------------------------------------------

def _nccl_rank(rank, world, backend):
    hp = HeadParallel()
    with pytest.raises(ValueError, match="group: its backend \\(nccl for cuda tensors\\) does not carry cpu tensors"):
        HeadParallel(device="cpu")
    gen = StreamingGenerator(backend=backend, eager=False, device=hp.device, parallel=hp, **STREAM)
    return _stream(gen)


@pytest.mark.parametrize("backend_device", [p for p in backend_params(exclude=("torch", "cpu")) if "cuda" in p.id])
def test_nccl_rank_on_a_gpu_equals_one_device_without_host_syncs(backend_device):
    """World 1 on NCCL (one GPU is all a test machine is sure to have), dense stream: the all-to-alls, the score
    all-reduce and the gather run on the device, with CUDA's sync debug mode set to error; NCCL refuses CPU
    tensors."""
    backend = backend_device[0]
    ref = _stream(StreamingGenerator(backend=backend, eager=False, device="cuda", **STREAM))
    outs = [o.result for o in run_local(_nccl_rank, 1, (backend,), backend="nccl", timeout_s=120)]
    _assert_matches_one_device(outs, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="fewer than 2 CUDA devices on this machine")
@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
def test_nccl_two_gpus_equal_one_device(sparse):
    ref = _stream(StreamingGenerator(backend="auto", eager=False, device="cuda", sparse_bank=sparse, **STREAM))
    outs = [o.result for o in run_local(_generator_rank, 2, (sparse, "cuda"), backend="nccl", timeout_s=120)]
    _assert_matches_one_device(outs, ref)


def test_bench_distributed_dry_run(tmp_path):
    """bench/bench_distributed.py --dry-run: 2 CPU ranks on gloo at tiny shapes, every number reported, the ranks'
    banks equal and full."""
    from streamkern.bench import bench_distributed

    out = tmp_path / "distributed.json"
    results = bench_distributed.main(["--dry-run", "--blocks", "2", "--out", str(out)])
    assert out.exists() and len(results["runs"]) == 1
    ranks = results["runs"][0]
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world"] == 2 and r["heads_per_rank"] == 2 for r in ranks)
    for r in ranks:
        for name in ("block_ms", "a2a_ms", "attention_ms", "roll_ms", "append_a2a_ms", "append_write_ms"):
            assert len(r[name]["raw"]) == 2 and all(t > 0 for t in r[name]["raw"]), (name, r[name])
        assert r["block_ms"]["median"] >= r["a2a_ms"]["median"] + r["attention_ms"]["median"]
        assert r["finite"] and r["n_bank"] == bench_distributed.DRY["bank"] and r["peak_bytes"] > r["pool_bytes"] > 0
        assert r["a2a_bytes_sent_per_block"] > 0
    assert ranks[0]["bank_frames"] == ranks[1]["bank_frames"]
    assert "| 2 | 1 |" in bench_distributed.table(results)

"""Soak test (issue 11 item 8): a tiny ``StreamingGenerator`` streamed for 2,000 blocks on the "cpu" backend (and
a short stream on "triton" under the interpreter). After every block the accelerated path's cache positions and
contents, its bank's held frames and its block output must match the eager pipeline's (the source pipelines' own
shift-and-cat cache); after warm-up, process memory (RSS) must not grow by more than what the run keeps on purpose
plus a slack that a per-block leak of one block's KV crosses. Written against the public pipeline API
(``run(observe=...)`` and :class:`BlockState`), whichever cache the accelerated path uses."""
import ctypes
import ctypes.util
import gc
import os

import pytest
import torch
from conftest import backend_params

from streamkern.pipelines import StreamingGenerator
from streamkern.testing import assert_parity

# 3-frame blocks of 4-token frames, a 6-frame window (2 blocks) with 1 sink frame, a 3-frame bank: from block 2 on
# every block wraps the ring and evicts a chunk into the bank; prompts switch every 5 blocks.
TINY = dict(num_layers=3, heads=2, head_dim=16, frame_seq_len=4, frames_per_block=3, window_frames=6,
            sink_frames=1, bank_size=3, num_entities=4, text_len=4, text_dim=8, steps=1, switch_every=5)
SOAK_BLOCKS, WARMUP = 2000, 200
SLACK = 8 << 20     # bytes of RSS growth allowed beyond the block outputs that run() keeps


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops are far too small to share, and on a loaded 2-core machine
    two spinning threads make each block many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rss_bytes() -> int:
    """Resident set size of this process (psutil if installed, else /proc/self/statm), after a garbage collection
    and, with glibc, ``malloc_trim(0)``: freed heap pages go back to the OS, so memory a leak takes cannot hide in
    pages that earlier frees left resident."""
    gc.collect()
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        import psutil
    except ImportError:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return psutil.Process().memory_info().rss


def kept_bytes(blocks: int) -> int:
    """What ``run`` keeps on purpose per block: the block's output latent, plus 1 KiB for the tensor object."""
    fpb, fsl, c = TINY["frames_per_block"], TINY["frame_seq_len"], TINY["heads"] * TINY["head_dim"]
    return blocks * (fpb * fsl * c * 4 + 1024)


def eager_states(blocks: int) -> list:
    states = []
    StreamingGenerator(backend="torch", **TINY).run(blocks, observe=states.append)
    assert len(states) == blocks
    return states


class Comparer:
    """The ``observe`` hook of the accelerated run: checks each block against the eager state of that block and
    samples RSS after warm-up (the eager states are all kept until the end, so none is freed in between)."""

    def __init__(self, expected: list, warmup: int):
        self.expected, self.warmup, self.seen, self.rss = expected, warmup, 0, {}

    def __call__(self, got):
        exp = self.expected[got.block]
        where = f"block {got.block}"
        assert torch.equal(got.positions, exp.positions), f"{where}: cache positions"
        assert torch.equal(got.bank_frames, exp.bank_frames), f"{where}: bank frames"
        assert_parity(got.frame, exp.frame, torch.float32, f"{where}: output")
        assert_parity(got.cache_k, exp.cache_k, torch.float32, f"{where}: cached keys")
        assert_parity(got.cache_v, exp.cache_v, torch.float32, f"{where}: cached values")
        self.seen += 1
        if got.block + 1 in (self.warmup, len(self.expected)):
            self.rss[got.block + 1] = rss_bytes()


def check_stream(backend: str, blocks: int, warmup: int) -> Comparer:
    expected = eager_states(blocks)
    last = expected[-1]
    assert last.positions.numel() == (TINY["sink_frames"] + TINY["window_frames"]) * TINY["frame_seq_len"]
    assert last.bank_frames.shape == (1, TINY["bank_size"])
    comparer = Comparer(expected, warmup)
    run = StreamingGenerator(backend=backend, **TINY).run(blocks, observe=comparer)
    assert comparer.seen == blocks
    assert run.info["bank_count"] == TINY["bank_size"] and run.outputs["frames"].shape[0] == blocks
    return comparer


@pytest.mark.slow   # 54-116 s wall here (2 loaded cores); `make test` runs every test, slow ones included
@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "triton", "cuda")))
def test_soak_cpu_2000_blocks_match_eager_without_leaking(bd):
    comparer = check_stream("cpu", SOAK_BLOCKS, WARMUP)
    growth = comparer.rss[SOAK_BLOCKS] - comparer.rss[WARMUP]
    bound = kept_bytes(SOAK_BLOCKS - WARMUP) + SLACK
    assert growth < bound, f"RSS grew by {growth / 2**20:.1f} MiB after warm-up (bound {bound / 2**20:.1f} MiB)"


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu", "cuda")))
def test_soak_triton_short_stream_matches_eager(bd):
    check_stream("triton", 8, 8)


def test_leak_bound_is_crossed_by_a_per_block_kv_leak():
    """The RSS bound above can fail: keeping one block's KV (k and v of every layer) per block past warm-up, as a
    cache that never frees an appended chunk would, crosses it."""
    T = TINY["frames_per_block"] * TINY["frame_seq_len"]
    shape = (TINY["num_layers"], 1, T, TINY["heads"], TINY["head_dim"])
    before, leaked = rss_bytes(), []
    for _ in range(SOAK_BLOCKS - WARMUP):
        leaked.append((torch.ones(shape), torch.ones(shape)))
    assert rss_bytes() - before > kept_bytes(SOAK_BLOCKS - WARMUP) + SLACK

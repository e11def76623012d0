"""No recompilation in a stream (issue 20): a Triton kernel compiles in the block where a stream first launches it
and never again, although the window and the bank fill over many blocks; the integers that change meanwhile (page
count, chunk length, page-table strides and address, the number of frames evicted) are not specialisation keys.

Triton's JIT compiles a kernel once per distinct key ``str(specialisation) + str(options)`` of its launches: the
argument types, constexpr values, ints equal to 1, divisibility by 16 of ints and pointer addresses, except what a
kernel's ``do_not_specialize`` lists drop. Under the interpreter nothing compiles, so the CPU tests compute that
key for every launch with Triton's own binder (``streamkern.testing.triton_specialisation``) and count, per kernel,
the keys first seen after the block (or call) in which the kernel first ran: each would be a compilation on a GPU.
Negative controls: the same launches keyed as if the kernels had no ``do_not_specialize`` lists would compile
again. On CUDA the same streams count Triton's real compilations (``knobs.runtime.jit_post_compile_hook``).

The streams: ``StreamingGenerator`` with sparse memory activation (``frame_topk`` + ``frame_attention`` over
per-head page tables, ``frame_write``, and from the first eviction ``select_frame`` and ``bank_evict_select``),
through its public ``stream().step()``; ``frame_attention`` alone over a page table growing from 0 to 20 pages
with a chunk length changing every call, so the rule is tested whatever path the pipeline's attention takes; and
``KVRing`` appends at a host-int cursor (``ring_write``, the FastVideo integration's write).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

import streamkern
from conftest import backend_params
from streamkern.pipelines import StreamingGenerator
from streamkern.testing import triton_launches_wrapped, triton_specialisation

pytest.importorskip("triton", reason="triton is not installed")

# the CUDA tests' one parameter, so that their ids name "triton-cuda" as bench/gpu_session.sh selects GPU tests
TRITON_CUDA = [p for p in backend_params(exclude=("torch", "cpu", "cuda")) if p.id == "triton-cuda"]
BLOCKS = 10
# Small shapes whose window (8 frames) fills over blocks 0-4: the per-head page table grows 2 -> 9 pages (its batch
# stride H·K is 16 at block 3), the bank's candidate list starts at page-table column 0, 2, 4, 6, 7 (its address
# leaves 16-byte alignment at block 4), the first eviction (block 4) offers one frame to the bank and later ones
# two. H·D = 32: batch strides that scale with a token count stay multiples of 16, as at real sizes (H·D = 1536).
STREAM = dict(num_layers=2, heads=2, head_dim=16, frame_seq_len=4, frames_per_block=2, window_frames=8,
              sink_frames=1, bank_size=3, num_entities=4, text_len=8, text_dim=16, steps=1, switch_every=3,
              sparse_bank=2)
# Launched by the sparse path whatever else the pipeline uses (every kernel it launches is checked)
STREAM_KERNELS = {"_frame_attention_kernel", "_frame_topk_kernel"}


def _device(device: str) -> str:
    if "triton" not in streamkern.available_backends(device):
        pytest.skip(f"triton cannot run on {device} tensors here")
    return device


class KeyLog:
    """Per kernel, the step (block or call) in which each distinct specialisation key was first launched; as a
    launch wrapper it keys every launch twice, honouring the kernels' ``do_not_specialize`` lists and ignoring
    them, and launches only when ``run`` is set."""

    def __init__(self, run: bool = True):
        self.run, self.step = run, 0
        self.first = {True: {}, False: {}}

    def __call__(self, kernel, launch, args, kwargs):
        for honour in (True, False):
            spec, options = triton_specialisation(kernel, args, kwargs, honour_do_not_specialize=honour)
            self.first[honour].setdefault(kernel.fn.__name__, {}).setdefault(str(spec) + str(options), self.step)
        return launch(*args, **kwargs) if self.run else None

    def late(self, honour: bool = True) -> dict[str, list[int]]:
        """Per kernel, the steps of the keys first seen after the kernel's first step (GPU compilations there)."""
        late = {}
        for kernel, keys in self.first[honour].items():
            steps = sorted(keys.values())
            late[kernel] = [s for s in steps if s > steps[0]]
        return late


def _stream(gen: StreamingGenerator, on_step) -> None:
    stream = gen.stream()
    for i in range(BLOCKS):
        on_step(i)
        stream.noise.copy_(stream.block_noise(i))
        stream.step()


@pytest.fixture(scope="module")
def stream_keys() -> KeyLog:
    log = KeyLog()
    gen = StreamingGenerator(backend="triton", device=_device("cpu"), **STREAM)
    with triton_launches_wrapped(log):
        _stream(gen, lambda i: setattr(log, "step", i))
    return log


def test_streamed_generator_compiles_each_kernel_once(stream_keys):
    """Every kernel of the stream has one key from the block where it first ran to block 9 (today
    ``frame_attention``, ``frame_topk`` and ``frame_write`` from block 0, ``select_frame`` and
    ``bank_evict_select`` from the first eviction, block 4)."""
    assert STREAM_KERNELS <= stream_keys.first[True].keys(), sorted(stream_keys.first[True])
    late = {k: steps for k, steps in stream_keys.late().items() if steps}
    assert not late, f"kernels that would compile again in a later block (kernel: blocks): {late}"


def test_streamed_generator_without_do_not_specialize_recompiles(stream_keys):
    """Negative control: keyed as Triton would key them without the kernels' ``do_not_specialize`` lists, the same
    launches compile again while the window fills (the page table's stride, the candidate list's address, the
    evicted-frame count)."""
    late = {k: steps for k, steps in stream_keys.late(honour=False).items() if steps}
    assert sum(map(len, late.values())) > 0, stream_keys.first[False]


def _growing_table_calls(device: str, on_call, dtype=torch.float32) -> None:
    """``frame_attention`` over per-head and shared page tables of 0 to 20 pages, the chunk length changing every
    call (1 and multiples of 16 among them); fp32 runs the pointer kernel, bf16 the Hopper one (sm_90 and the
    interpreter)."""
    g = torch.Generator().manual_seed(0)
    B, Lq, H, D, P, F = 1, 8, 2, 16, 24, 4
    q = torch.randn(B, Lq, H, D, generator=g).to(device, dtype)
    kp, vp = (torch.randn(B, P, F, H, D, generator=g).to(device, dtype) for _ in range(2))
    lengths = [1, 2, 16, 5, 32, 3, 17, 8, 48, 1, 7, 16, 9, 11, 64, 2, 13, 4, 31, 6, 15]
    for per_head in (True, False):
        for K, Ln in enumerate(lengths):
            on_call(K)
            new_k, new_v = (torch.randn(B, Ln, H, D, generator=g).to(device, dtype) for _ in range(2))
            table = torch.randperm(P, generator=g)[:K].to(device)
            table = table.expand(B, H, K).contiguous() if per_head else table.expand(B, K).contiguous()
            streamkern.frame_attention(q, kp, vp, table, new_k=new_k, new_v=new_v, backend="triton")


@pytest.fixture(scope="module")
def growing_table_keys() -> KeyLog:
    log = KeyLog(run=False)              # keys only: the launches' results are the parity tests' business
    with triton_launches_wrapped(log):
        _growing_table_calls(_device("cpu"), lambda k: setattr(log, "step", k))
    return log


def test_frame_attention_growing_table_compiles_once(growing_table_keys):
    keys = growing_table_keys.first[True]
    assert set(keys) == {"_frame_attention_kernel"}
    assert len(keys["_frame_attention_kernel"]) == 1, sorted(keys["_frame_attention_kernel"].values())


def test_frame_attention_growing_table_without_do_not_specialize_recompiles(growing_table_keys):
    """Negative control: without the lists the page count, chunk length and table strides make many keys."""
    assert len(growing_table_keys.first[False]["_frame_attention_kernel"]) > 1


@pytest.fixture(scope="module")
def growing_table_keys_bf16() -> KeyLog:
    log = KeyLog(run=False)
    with triton_launches_wrapped(log):
        _growing_table_calls(_device("cpu"), lambda k: setattr(log, "step", k), torch.bfloat16)
    return log


def test_frame_attention_growing_table_compiles_the_hopper_kernel_once(growing_table_keys_bf16):
    """The same calls in bf16 launch the Hopper kernel: one key too, and many without its lists."""
    keys = growing_table_keys_bf16.first
    assert set(keys[True]) == {"_frame_attention_tma_kernel"}
    assert len(keys[True]["_frame_attention_tma_kernel"]) == 1, sorted(keys[True]["_frame_attention_tma_kernel"])
    assert len(keys[False]["_frame_attention_tma_kernel"]) > 1


def test_ring_appends_at_a_moving_host_cursor_compile_once():
    """``KVRing`` with its cursor on the host writes each append from a new first slot (1 and multiples of 16 among
    them) with a changing token count: one key; without the lists nearly one per append."""
    log = KeyLog(run=False)
    ring = streamkern.KVRing(2, 1, 2, 16, window=40, sink=1, dtype=torch.float32, device=_device("cpu"),
                             backend="triton")
    with triton_launches_wrapped(log):
        for i, T in enumerate([1, 15, 16, 3, 32, 7, 1, 9, 16, 5]):
            log.step = i
            ring.append(torch.zeros(2, 1, T, 2, 16), torch.zeros(2, 1, T, 2, 16))
    assert len(log.first[True]["_token_copy_kernel"]) == 1, log.first[True]
    assert len(log.first[False]["_token_copy_kernel"]) > 1


# --- on CUDA: Triton's real compilations -------------------------------------------------------------------------


@contextlib.contextmanager
def _compilations_recorded(compiled: dict[str, list[int]], step: list[int]):
    """Each compilation of a kernel launched meanwhile appends the current ``step[0]`` to ``compiled[kernel]``;
    every kernel's in-memory cache is emptied at its first launch here, so what earlier tests compiled counts again
    (a hit in Triton's disk cache still passes through the hook)."""
    from triton import knobs

    seen = set()

    def first_launch_uncached(kernel, launch, args, kwargs):
        if kernel not in seen:
            seen.add(kernel)
            kernel.device_caches.clear()
        return launch(*args, **kwargs)

    def hook(*, fn, **_):
        compiled.setdefault(fn.name, []).append(step[0])

    saved = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = hook
    try:
        with triton_launches_wrapped(first_launch_uncached):
            yield
    finally:
        knobs.runtime.jit_post_compile_hook = saved


def _late(compiled: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: [s for s in steps if s > min(steps)] for k, steps in compiled.items() if max(steps) > min(steps)}


@pytest.mark.parametrize("bd", TRITON_CUDA)
def test_streamed_generator_compiles_nothing_after_a_kernels_first_block_on_cuda(bd):
    compiled, step = {}, [0]
    gen = StreamingGenerator(backend=bd[0], device=bd[1], **STREAM)
    with _compilations_recorded(compiled, step):
        _stream(gen, lambda i: step.__setitem__(0, i))
    assert STREAM_KERNELS <= compiled.keys(), sorted(compiled)
    assert not _late(compiled), f"compilations after a kernel's first block (kernel: blocks): {_late(compiled)}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bd", TRITON_CUDA)
def test_frame_attention_growing_table_compiles_once_on_cuda(bd, dtype):
    compiled, step = {}, [0]
    with _compilations_recorded(compiled, step):
        _growing_table_calls(bd[1], lambda k: step.__setitem__(0, k), dtype)
    hopper = dtype == torch.bfloat16 and torch.cuda.get_device_capability(bd[1]) >= (9, 0)
    assert compiled == {"_frame_attention_tma_kernel" if hopper else "_frame_attention_kernel": [0]}, compiled

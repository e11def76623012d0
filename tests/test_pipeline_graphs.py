"""The pipelines' steps captured with :class:`~streamkern.step_graph.StepGraph` and replayed (issue 16 item 2):
two identical pipelines, both run eagerly to steady state; one block of the second is captured, then each replay
(inputs refilled in place) must equal the first pipeline's eager step, output and carried state alike. On CPU
(the recorder, backends "torch" ops, "cpu", interpreted "triton") here; on CUDA graphs where a GPU is present.
Negative controls show the comparison fails when a step breaks a replay rule."""
import pytest
import torch
from conftest import backend_params

from streamkern.pipelines import StreamingGenerator
from streamkern.step_graph import StepGraph
from streamkern.streaming_kv import StreamingKV
from streamkern.testing import assert_parity

@pytest.fixture
def one_thread():
    """One intra-op thread: these tiny models' ops are far too small to share, and on a loaded machine spinning
    threads make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- StreamingGenerator ------------------------------------------------------------------------------------------

# 3-frame blocks of 4-token frames, 1 sink frame, a 6-frame window (2 blocks), a bank of 3: blocks 2-4 fill the
# bank, so from block 5 on every block evicts 3 frames into a full bank (steady state: constant shapes). Prompts
# switch every 3 blocks and a block's α is 0, 0, then > 0 after a switch: the captured block 5 blends (α > 0), the
# replays (blocks 6-9) cross two switches.
TINY = dict(num_layers=2, heads=2, head_dim=8, frame_seq_len=4, frames_per_block=3, window_frames=6,
            sink_frames=1, bank_size=3, num_entities=5, text_len=8, text_dim=16, switch_every=3, steps=1)
WARM, REPLAYS = 5, 4


def _frame_ops():
    from streamkern.frame_attention import frame_attention_op
    from streamkern.frame_topk import frame_topk_op
    from streamkern.frame_write import frame_write_op

    return frame_attention_op, frame_topk_op, frame_write_op


def _carried(stream) -> dict:
    """The state a block carries to the next: the block counter, the ring cursor, the pool, the page lists and
    the bank's bookkeeping."""
    kv = stream.cache.kv
    names = ("cursor", "window_pages", "bank_pages", "bank_valid", "bank_scores", "bank_entities", "bank_frame_ids")
    return dict(block=stream.block, k=kv.pool.k, v=kv.pool.v, k_mean=kv.pool.k_mean,
                **{name: getattr(kv, name) for name in names})


def _equal(got, want, exact: bool) -> bool:
    """Bit-equal (``exact``: the replay ran the eager step's ops) or, float tensors on CUDA, within the parity
    bound of fp32 (a graph may pick other kernels than eager calls)."""
    if exact or not got.is_floating_point():
        return torch.equal(got, want)
    try:
        assert_parity(got, want, torch.float32, "replay")
    except AssertionError:
        return False
    return True


@torch.no_grad()     # inference, as ``run``: a replay records no autograd graph
def streaming_replays(backend: str, device: str, sparse_bank=None) -> list[dict]:
    """Blocks ``WARM + 1 ..`` of a captured ``BlockStream.step`` against eager steps of a twin: for the capture
    and each replay, ``{what: equal}`` over the block latent and every carried tensor."""
    gens = [StreamingGenerator(backend=backend, eager=False, device=device, sparse_bank=sparse_bank, **TINY)
            for _ in range(2)]
    eager, graphed = (g.stream() for g in gens)
    for i in range(WARM):
        for s in (eager, graphed):
            s.noise.copy_(s.block_noise(i))
            s.step()
    exact = torch.device(device).type == "cpu"
    results = []
    for i in range(WARM, WARM + 1 + REPLAYS):
        for s in (eager, graphed):
            s.noise.copy_(s.block_noise(i))
        if i == WARM:
            graph = StepGraph(graphed.step, device)
            got = graph.outputs
        else:
            got = graph.replay()
        want = eager.step()
        same = {"latent": _equal(got, want, exact)}
        same.update({name: _equal(t, _carried(eager)[name], exact) for name, t in _carried(graphed).items()})
        results.append(same)
    assert graph.replays == REPLAYS and graphed.blocks == WARM + 1 and int(graphed.block) == WARM + 1 + REPLAYS
    return results


def _ring_from_host_count(self, offset: int, n: int) -> torch.Tensor:
    """A rule broken on purpose: ring slots from the host count of evicted frames, frozen at capture."""
    return torch.arange(self.n_evicted + offset, self.n_evicted + offset + n, device=self.cursor.device) % self.W


def _block_from_host_count(real):
    """A rule broken on purpose: the block index a tensor made from the host count, frozen at capture."""
    def block(self, i, counter, *args):
        return real(self, i, torch.tensor(i, device=counter.device), *args)
    return block


CPU_PATHS = [pytest.param(("torch", "cpu"), id="ops-torch-cpu")] + backend_params(exclude=("torch", "cuda"),
                                                                                     ops=_frame_ops())
CUDA_PATHS = [p for p in backend_params(exclude=("torch", "cpu"), ops=_frame_ops())
              if p.values[0][1] == "cuda"] + [pytest.param(("auto", "cuda"), id="auto-cuda")]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("bd", CPU_PATHS)
def test_streaming_generator_block_replays_as_the_next_block(bd, sparse):
    results = streaming_replays(*bd, sparse_bank=sparse)
    assert all(all(same.values()) for same in results), results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("bd", CUDA_PATHS)
def test_streaming_generator_block_replays_as_the_next_block_on_cuda_graphs(bd, sparse):
    results = streaming_replays(*bd, sparse_bank=sparse)
    assert all(all(same.values()) for same in results), results


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("broken", ["ring-cursor", "block-index"])
def test_streaming_generator_replay_diverges_with_a_host_count(monkeypatch, broken):
    """The negative controls: ring slots built from the host count (what StreamingKV did before its device
    cursor), or the block index taken from the host count (positions, prompt blend and entities of the captured
    block): eager steps stay right, but every replay redoes the captured block and the stream diverges."""
    if broken == "ring-cursor":
        monkeypatch.setattr(StreamingKV, "_ring", _ring_from_host_count)
    else:
        monkeypatch.setattr(StreamingGenerator, "_block", _block_from_host_count(StreamingGenerator._block))
    results = streaming_replays("cpu", "cpu")
    assert all(results[0].values()), results[0]          # the capture itself ran the step eagerly
    assert not any(same["latent"] or same["k"] for same in results[1:]), results[1:]

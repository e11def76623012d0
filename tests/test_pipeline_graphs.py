"""The pipelines' steps captured with :class:`~streamkern.step_graph.StepGraph` and replayed (issue 16 item 2):
two identical pipelines, both run eagerly to steady state; one step of the second is captured (a StreamingGenerator
block, a GatedPolicy control step, a SpeculativeVAR round), then each replay (inputs refilled in place) must equal
the first pipeline's eager step, output and carried state alike: bit-exact on CPU (the same ops on the same
values), within the fp32 parity bound on CUDA. On CPU (the recorder, backends "torch" ops, "cpu", interpreted
"triton") here; on CUDA graphs where a GPU is present. Negative controls show the comparison fails when a step
breaks a replay rule."""
import pytest
import torch
from conftest import backend_params

from streamkern.ops import drift_gate
from streamkern.pipelines import GatedPolicy, RoundInputs, SpeculativeVAR, StreamingGenerator
from streamkern.pipelines.tiny import randn
from streamkern.pipelines.gated_policy import scripted_trajectory
from streamkern.step_graph import CaptureError, StepGraph, conditional_nodes_supported
from streamkern.streaming_kv import StreamingKV
from streamkern.testing import assert_parity


# the accelerated path on each backend this CPU runs (the torch references, "cpu", interpreted "triton"); the
# CUDA tests of each pipeline name their own backends
CPU_PATHS = backend_params(exclude=("cuda", ("torch", "cuda"), ("triton", "cuda")))
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


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


# --- StreamingGenerator ------------------------------------------------------------------------------------------

# 3-frame blocks of 4-token frames, 1 sink frame, a 6-frame window (2 blocks), a bank of 3: blocks 2-4 fill the
# bank, so from block 5 on every block evicts 3 frames into a full bank (steady state: constant shapes). Prompts
# switch every 3 blocks and a block's α is 0, 0, then > 0 after a switch: the captured block 5 blends (α > 0), the
# replays (blocks 6-9) cross two switches.
TINY = dict(num_layers=2, heads=2, head_dim=8, frame_seq_len=4, frames_per_block=3, window_frames=6,
            sink_frames=1, bank_size=3, num_entities=5, text_len=8, text_dim=16, switch_every=3, steps=1)
WARM, REPLAYS = 5, 4


def _frame_ops():
    from streamkern.ops.frame_attention import frame_attention_op
    from streamkern.ops.frame_topk import frame_topk_op
    from streamkern.ops.frame_write import frame_write_op

    return frame_attention_op, frame_topk_op, frame_write_op


def _carried(stream) -> dict:
    """The state a block carries to the next: the block counter, the ring cursor, the pool, the page lists and
    the bank's bookkeeping."""
    kv = stream.cache.kv
    names = ("cursor", "window_pages", "bank_pages", "bank_valid", "bank_scores", "bank_entities", "bank_frame_ids")
    return dict(block=stream.block, k=kv.pool.k, v=kv.pool.v, k_mean=kv.pool.k_mean,
                **{name: getattr(kv, name) for name in names})


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
    """A rule broken on purpose: the block index a tensor made from the host count (of each generator's blocks),
    frozen at capture."""
    counts: dict[int, int] = {}

    def block(self, counter, *args):
        i = counts[id(self)] = counts.get(id(self), -1) + 1
        return real(self, torch.tensor(i, device=counter.device), *args)
    return block


CUDA_PATHS = [p for p in backend_params(exclude=("torch", "cpu"), ops=_frame_ops())
              if p.values[0][1] == "cuda"] + [pytest.param(("auto", "cuda"), id="auto-cuda")]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("bd", CPU_PATHS)
def test_streaming_generator_block_replays_as_the_next_block(bd, sparse):
    results = streaming_replays(*bd, sparse_bank=sparse)
    assert all(all(same.values()) for same in results), results


@NO_CUDA
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


# --- shared by GatedPolicy and SpeculativeVAR --------------------------------------------------------------------

def _mismatches(pairs, exact):
    """``[(step, leaf)]`` where a replay's tensors differ from the eager step's (:func:`_equal`); ``pairs`` is
    ``[(replayed, eager)]``, each a list of tensors."""
    return [(step, i) for step, (got, want) in enumerate(pairs) for i, (g, w) in enumerate(zip(got, want))
            if not _equal(g, w, exact)]


# --- GatedPolicy -------------------------------------------------------------------------------------------------

SMALL_POLICY = dict(num_layers=18, heads=1, head_dim=16, text_tokens=2, action_tokens=6, denoise_steps=1)


@torch.no_grad()
def _policy_replays(backend, device, frames=(0, 1, 2, 4, 5, 10), warmup=2):
    """``(pairs, reasons of the replays)`` of one accelerated GatedPolicy step captured at frame ``frames[warmup]``
    of a 12-frame :func:`scripted_trajectory` (a reuse; the warm-up took both branches, as a CUDA capture needs)
    and replayed on the later ``frames`` (the state jump, a reuse, the hand entering: recompute, reuse, recompute),
    against an identical policy stepped eagerly; each pair holds the actions, reason, drift and what the gate
    carries (pooled frame, importance, state, KV)."""
    pipes = [GatedPolicy(backend=backend, eager=False, device=device, **SMALL_POLICY) for _ in range(2)]
    gates = [p.gate() for p in pipes]
    images, states = scripted_trajectory(12, 1, 0, device)
    A = SMALL_POLICY["action_tokens"]
    noises = [randn((1, A, 7), 1000 + t, device) for t in range(12)]
    inputs = [(images[0].clone(), states[0].clone(), noises[0].clone()) for _ in pipes]   # static buffers

    def refill(t):
        for buffers in inputs:
            for buf, value in zip(buffers, (images[t], states[t], noises[t])):
                buf.copy_(value)

    def carried(out, gate):
        return [x.clone() for x in (*out, gate.prev_small, gate.prev_importance, gate.prev_state, *gate.cached_kv())]

    def eager_step():
        return carried(pipes[0].step(gates[0], *inputs[0]), gates[0])

    for t in frames[:warmup]:
        refill(t)
        for pipe, gate, buffers in zip(pipes, gates, inputs):
            pipe.step(gate, *buffers)
    refill(frames[warmup])
    graph = StepGraph(lambda: pipes[1].step(gates[1], *inputs[1]), device)
    pairs = [(carried(graph.outputs, gates[1]), eager_step())]
    for t in frames[warmup + 1:]:
        refill(t)
        pairs.append((carried(graph.replay(), gates[1]), eager_step()))
    return pairs, [int(want[1]) for _, want in pairs[1:]]


def _check_policy_replays(backend, device):
    pairs, reasons = _policy_replays(backend, device)
    assert _mismatches(pairs, exact=device == "cpu") == []
    assert 0 in reasons and any(r != 0 for r in reasons), f"replays must reuse and recompute, got {reasons}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("bd", CPU_PATHS)
def test_gated_policy_step_replays_both_branches(bd):
    """The gate's decision picks the full pass + update or the reuse pass on the device at each replay; the gate
    carries its frame, importance, state and the prefix KV in place, so replays match eager steps."""
    _check_policy_replays(*bd)


@NO_CUDA
@pytest.mark.skipif(bool(conditional_nodes_supported()), reason=conditional_nodes_supported())
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gated_policy_step_replays_both_branches_on_cuda(backend):
    _check_policy_replays(backend, "cuda")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("rebound", ["frame-and-state", "kv"])
def test_gated_policy_replay_diverges_when_the_gate_rebinds(monkeypatch, rebound):
    """Negative controls: a gate that rebinds what it carries to fresh tensors at each update (as it did before).
    Its pooled frame, importance and state rebound: the captured gate keeps reading the buffers of the capture, so
    the replays after a recompute diverge. Its KV rebound: the reuse body, captured after the full body's Python
    ran (both bodies run at capture), reads the KV that body produced instead of the cached one."""
    real = drift_gate._carry

    def carry(old, new, allocate):
        return allocate(new) if isinstance(new, tuple) == (rebound == "kv") else real(old, new, allocate)

    monkeypatch.setattr(drift_gate, "_carry", carry)
    pairs, reasons = _policy_replays("cpu", "cpu")
    diverged = {step for step, _ in _mismatches(pairs, exact=True)}
    assert any(r != 0 for r in reasons), reasons
    if rebound == "kv":
        assert 0 in diverged, diverged
    else:
        assert diverged - {0}, diverged


# --- SpeculativeVAR ----------------------------------------------------------------------------------------------

SMALL_VAR = dict(patch_nums=(1, 2, 3, 4), vocab=16, depth=2, draft_depth=1, gamma=2, batch=2)


@torch.no_grad()
def _var_round_replays(backend, device, mode, pos=1, replays=2, warmup=1):
    """``(pairs, kept counts of the replays)`` of one speculative round at scale ``pos`` captured and replayed on
    fresh labels and prefixes (written into the static token and label buffers), against an identical decoder's
    eager rounds; each pair holds the kept count and the whole token buffer. The sample mode draws from a
    generator registered with the graph."""
    pipes = [SpeculativeVAR(backend=backend, eager=False, device=device, mode=mode, **SMALL_VAR) for _ in range(2)]
    gens = [torch.Generator(device).manual_seed(7) for _ in pipes]
    inputs = RoundInputs(pipes, pos)
    refill = inputs.refill
    stats = {"draft_calls": 0, "target_calls": 0}

    def round_of(i):
        return lambda: pipes[i].round(*inputs.pairs[i], gens[i], pos, stats)

    def carried(keep, i):
        return [keep.clone(), inputs.pairs[i][0].clone()]

    for _ in range(warmup):
        refill()
        for i in range(2):
            round_of(i)()
    refill()
    graph = StepGraph(round_of(1), device, generators=(gens[1],))
    pairs = [(carried(graph.outputs, 1), carried(round_of(0)(), 0))]
    for _ in range(replays):
        refill()
        pairs.append((carried(graph.replay(), 1), carried(round_of(0)(), 0)))
    return pairs, [int(want[0]) for _, want in pairs[1:]]


def _check_var_round_replays(backend, device, mode):
    pairs, keeps = _var_round_replays(backend, device, mode)
    assert _mismatches(pairs, exact=device == "cpu") == []
    assert set(keeps) == {1, 2}, f"the replays must keep one and both drafted scales, got {keeps}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("bd", CPU_PATHS)
def test_speculative_var_round_replays(bd, mode):
    """A round at a fixed scale (draft, one target pass, verify, masked write of the kept scales) replays on new
    labels and prefixes; the kept count changes between replays and the token buffer follows it on the device;
    the sample mode's draws advance the generator on every replay as eager rounds do."""
    _check_var_round_replays(*bd, mode)


@NO_CUDA
@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("backend", ["triton", "auto"])
def test_speculative_var_round_replays_on_cuda(backend, mode):
    _check_var_round_replays(backend, "cuda", mode)


def test_speculative_var_seed_round_cannot_be_captured():
    """Negative control: the seed's round reads each scale's verdict on the host (``.item()``), which a graph
    cannot hold: the capture refuses it."""
    sv = SpeculativeVAR(backend="torch", eager=True, **SMALL_VAR)
    tokens = torch.full((SMALL_VAR["batch"], sv.model.end[-1]), -1, dtype=torch.int64)
    tokens[:, 0] = 3
    labels = torch.zeros(SMALL_VAR["batch"], dtype=torch.int64)
    stats = {"draft_calls": 0, "target_calls": 0}
    with torch.no_grad(), pytest.raises(CaptureError, match="host"):
        StepGraph(lambda: sv.round(tokens, labels, None, 1, stats), "cpu")

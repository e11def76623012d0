"""Pipeline steps captured once and replayed (issue 16 item 2; the contract is ``streamkern.step_graph``).

Each test builds two identical pipelines, runs both eagerly to steady state, captures one step of the second in a
:class:`~streamkern.step_graph.StepGraph` (the CPU recorder here, a CUDA graph on a GPU), runs the same step of the
first eagerly, then refills both pipelines' inputs identically before each replay and compares the replay with the
eager step, carried state included: bit-exact on CPU (the same ops on the same values), within ``assert_parity``'s
float32 tolerance on CUDA."""
import pytest
import torch

from conftest import backend_params
from streamkern import drift_gate
from streamkern.pipelines import GatedPolicy, SpeculativeVAR
from streamkern.pipelines._tiny import randn
from streamkern.pipelines.gated_policy import scripted_trajectory
from streamkern.step_graph import CaptureError, StepGraph
from streamkern.testing import TOLERANCE, rel_error

CPU = backend_params(exclude=("cuda", ("torch", "cuda"), ("triton", "cuda")))
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _mismatches(pairs, exact):
    """``[(step, leaf)]`` where a replay's tensors differ from the eager step's; ``pairs`` is
    ``[(replayed, eager)]``, each a list of tensors. Exact equality, or for floats on a GPU a relative error within
    ``assert_parity``'s float32 tolerance."""
    bad = []
    for step, (got, want) in enumerate(pairs):
        for i, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                same = False
            elif exact or not g.is_floating_point():
                same = torch.equal(g, w)
            else:
                same = rel_error(g, w) < TOLERANCE[torch.float32]
            if not same:
                bad.append((step, i))
    return bad


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
    gates = [p._gate() for p in pipes]
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


@pytest.mark.parametrize("bd", CPU)
def test_gated_policy_step_replays_both_branches(bd):
    """The gate's decision picks the full pass + update or the reuse pass on the device at each replay; the gate
    carries its frame, importance, state and the prefix KV in place, so replays match eager steps."""
    _check_policy_replays(*bd)


@NO_CUDA
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gated_policy_step_replays_both_branches_on_cuda(backend):
    _check_policy_replays(backend, "cuda")


def test_gated_policy_replay_diverges_when_the_gate_rebinds_its_state(monkeypatch):
    """Negative control: a gate that rebinds its pooled frame, state and KV to fresh tensors at each update (as
    it did before) leaves the captured step reading the buffers of the capture, and the replays diverge."""
    monkeypatch.setattr(drift_gate, "_carry", lambda old, new, allocate: allocate(new))
    pairs, reasons = _policy_replays("cpu", "cpu")
    diverged = {step for step, _ in _mismatches(pairs, exact=True)}
    assert any(r != 0 for r in reasons) and diverged - {0}, f"replays {diverged} diverged, reasons {reasons}"


# --- SpeculativeVAR ----------------------------------------------------------------------------------------------

SMALL_VAR = dict(patch_nums=(1, 2, 3, 4), vocab=16, depth=2, draft_depth=1, gamma=2, batch=2)


@torch.no_grad()
def _var_round_replays(backend, device, mode, pos=1, replays=2, warmup=1):
    """``(pairs, kept counts of the replays)`` of one speculative round at scale ``pos`` captured and replayed on
    fresh labels and prefixes (written into the static token and label buffers), against an identical decoder's
    eager rounds; each pair holds the kept count and the whole token buffer. The sample mode draws from a
    generator registered with the graph."""
    pipes = [SpeculativeVAR(backend=backend, eager=False, device=device, mode=mode, **SMALL_VAR) for _ in range(2)]
    m = pipes[0].model
    gens = [torch.Generator(device).manual_seed(7) for _ in pipes]
    host = torch.Generator().manual_seed(2)
    B, L = SMALL_VAR["batch"], m.end[-1]
    inputs = [(torch.full((B, L), -1, dtype=torch.int64, device=device),
               torch.zeros(B, dtype=torch.int64, device=device)) for _ in pipes]
    stats = {"draft_calls": 0, "target_calls": 0}

    def refill():
        prefix = torch.randint(0, m.vocab, (B, m.begin[pos]), generator=host)
        labels = torch.randint(0, m.num_classes, (B,), generator=host)
        for tokens, lab in inputs:
            tokens.fill_(-1)
            tokens[:, :m.begin[pos]] = prefix
            lab.copy_(labels)

    def round_of(i):
        return lambda: pipes[i].round(*inputs[i], gens[i], pos, stats)

    def carried(keep, i):
        return [keep.clone(), inputs[i][0].clone()]

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


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("bd", CPU)
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

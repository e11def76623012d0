"""CUDA-only checks (issue 16), skipped on machines without a GPU: every op's call on CUDA against "torch", under
``torch.cuda.set_sync_debug_mode("error")``, its launches per call, captured in a CUDA graph and replayed, compiled with Inductor (launch
count); the ring's device cursor across replays; the drift gate's last-block hand-off under stress and on two
streams; Triton launches on a second GPU; grid limits. The cases are ``streamkern.bench.gpu_cases``; the CPU side of
these checks is tests/test_gpu_readiness.py. ``bench/gpu_session.sh`` runs this file on the GPU."""
import pytest
import torch

import streamkern as sk
from streamkern.bench import gpu_cases as gc
from streamkern.testing import assert_parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

PAIRS = [pytest.param(c, b, id=f"{c}-{b}-cuda") for c, b in gc.pairs()]


@pytest.fixture(autouse=True)
def _default_sync_mode():
    yield
    if torch.cuda.is_available():
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_on_cuda(name, backend):
    gc.check_eager(gc.CASES[name]("cuda", backend))


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_never_syncs_in_sync_debug_mode(name, backend):
    gc.check_no_sync(gc.CASES[name]("cuda", backend))


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_launches_as_designed(name, backend, monkeypatch):
    monkeypatch.undo()                                       # poisoned allocations would count as fills
    gc.check_launches(gc.CASES[name]("cuda", backend))


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_replays_as_a_cuda_graph(name, backend):
    gc.check_graph(gc.CASES[name]("cuda", backend), replays=4)


@pytest.mark.parametrize("name, backend", PAIRS)
def test_op_compiles_with_inductor(name, backend):
    gc.check_compiled(gc.CASES[name]("cuda", backend))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_ring_append_replays_with_the_device_cursor(backend):
    """An ``append`` captured once writes the next slots on every replay (the start slot is read from the ring's
    device cursor), equal to a host-cursor ring fed the same tokens eagerly; the cursor counts the replays."""
    args = (3, 2, 2, 16, 7)
    dev = sk.KVRing(*args, sink=2, dtype=torch.bfloat16, device="cuda", backend=backend, device_cursor=True)
    host = sk.KVRing(*args, sink=2, dtype=torch.bfloat16, device="cuda", backend=backend)
    g = torch.Generator(device="cuda").manual_seed(0)
    kn = torch.randn(3, 2, 3, 2, 16, generator=g, device="cuda").bfloat16()
    vn = torch.randn_like(kn)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        dev.append(kn, vn)   # warm-up (eager)
    torch.cuda.current_stream().wait_stream(side)
    host.append(kn, vn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dev.append(kn, vn)
    for r in range(11):   # wraps the 7-slot window several times
        kn.copy_(torch.randn(kn.shape, generator=g, device="cuda"))
        vn.copy_(torch.randn(vn.shape, generator=g, device="cuda"))
        graph.replay()
        host.append(kn, vn)
        assert torch.equal(dev.k, host.k) and torch.equal(dev.v, host.v), f"replay {r}"
        assert torch.equal(dev.positions, host.positions), f"replay {r}"
    assert dev.sync_count() == host.count == 12 * 3


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gate_hand_off_stress_two_streams(backend):
    """B = 256 cameras at 224², 500 steps, two gates on two streams at once, against the torch gate: the same
    decisions (drift within the parity metric), and each arrival counter back to 0 afterwards."""
    B, steps, layer_range = 256, 500, (0, 1)
    attn = torch.rand(1, B, 1, 256 + 50, 256 + 50, device="cuda").softmax(-1)
    g = torch.Generator(device="cuda").manual_seed(1)
    scenes = [torch.rand(B, 3, 224, 224, generator=g, device="cuda") for _ in range(2)]
    states = torch.rand(2, B, 7, generator=g, device="cuda")
    kw = dict(drift_threshold=0.02, state_threshold=0.5, layer_range=layer_range)
    gates = [sk.DriftGate(backend=backend, **kw) for _ in range(2)]
    refs = [sk.DriftGate(backend="torch", **kw) for _ in range(2)]
    streams = [torch.cuda.Stream() for _ in range(2)]
    got, want = [[], []], [[], []]
    for t in range(steps):
        images = [s * (1 + 0.05 * ((t * 7 + i) % 5 == 0)) for i, s in enumerate(scenes)]
        for i in range(2):
            streams[i].wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(streams[i]):
                got[i].append(gates[i].should_recompute(images[i], states[i]))
                gates[i].update(images[i], attn, states[i], None)
        for i in range(2):
            want[i].append(refs[i].should_recompute(images[i], states[i]))
            refs[i].update(images[i], attn, states[i], None)
        for i in range(2):
            torch.cuda.current_stream().wait_stream(streams[i])
    torch.cuda.synchronize()
    for i in range(2):
        run, reason, drift = (torch.stack(x) for x in zip(*got[i]))
        w_run, w_reason, w_drift = (torch.stack(x) for x in zip(*want[i]))
        assert_parity(drift, w_drift.double(), torch.float32, f"gate {i} drift")
        near = (w_drift - kw["drift_threshold"]).abs() < 1e-5
        assert torch.equal(reason[~near], w_reason[~near]) and torch.equal(run[~near], w_run[~near]), f"gate {i}"
        assert int(gates[i]._counter.item()) == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", [c for c, b in gc.pairs(("triton",))])
def test_triton_launches_on_the_tensors_device(name):
    """Tensors on cuda:1 while cuda:0 is current: the Triton launch runs on cuda:1 (else: illegal address)."""
    with torch.cuda.device(0):
        gc.check_eager(gc.CASES[name]("cuda:1", "triton"))


def test_attention_grid_limit_on_cuda():
    ids = torch.zeros(1, dtype=torch.int64, device="cuda")
    q = torch.randn(1, 65536, 1, 16, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="grid axis 1 \\(B\\*H\\) would be 65536"):
        sk.block_masked_attention(q, q, q, ids, ids, sk.scale_allow(1).cuda(), backend="triton")

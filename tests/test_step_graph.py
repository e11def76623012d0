"""streamkern.step_graph: capture a step, replay it (the CPU recorder here; tests/test_gpu.py runs the same on CUDA
graphs), and device_branch. The pipelines' replay tests are tests/test_pipeline_graphs.py."""
import pytest
import torch

import streamkern as sk
from streamkern.ops.ring_write import ring_write_at_op
from streamkern.capture import count_host_syncs
from streamkern import step_graph
from streamkern.step_graph import CaptureError, StepGraph, conditional_nodes_supported, device_branch

from conftest import backend_params

NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=NO_CUDA)]
# device_branch captured on CUDA: conditional nodes, which this torch may lack (then the reason is the skip's)
BRANCH_DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[
    NO_CUDA, pytest.mark.skipif(bool(conditional_nodes_supported()), reason=conditional_nodes_supported())])]

@pytest.mark.parametrize("device", DEVICES)
def test_replay_reruns_the_ops_on_the_captured_tensors(device):
    """Results of ops are written into the tensors the capture produced; an in-place counter advances; inputs
    refilled in place are read."""
    x, count = torch.randn(5, device=device), torch.zeros((), device=device)

    def step():
        count.add_(1)
        return x * count + 1, count

    graph = StepGraph(step, "cpu")
    out, c = graph.outputs
    assert torch.equal(out, x * 1 + 1) and c is count
    for r in range(2, 5):
        x.copy_(torch.randn(5, device=device))
        got = graph.replay()
        assert got[0] is out and torch.equal(out, x * r + 1) and count.item() == r
    assert graph.replays == 3


def test_replay_records_no_autograd():
    """A step captured under ``no_grad`` that writes a view in place replays with grad mode on (a CUDA graph
    replays kernels only; autograd would refuse the in-place write of a no-grad view)."""
    w = torch.randn(4, requires_grad=True)
    buf = torch.zeros(2, 4)
    with torch.no_grad():
        graph = StepGraph(lambda: buf[0].add_(w), "cpu")
    assert torch.is_grad_enabled()
    graph.replay()
    assert torch.equal(buf[0], 2 * w.detach()) and not buf.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_warmup_runs_the_step_eagerly_before_the_capture(device):
    count = torch.zeros((), device=device)
    graph = StepGraph(lambda: count.add_(1), device, warmup=2)
    assert count.item() == 3
    graph.replay()
    assert count.item() == 4


def _rings(backend, device, device_cursor):
    """Two equal rings: 3 layers, batch 2, 2 heads of 16, a 7-slot window after 2 sinks."""
    return [sk.KVRing(3, 2, 2, 16, 7, sink=2, dtype=torch.float32, device=device, backend=backend,
                      device_cursor=device_cursor) for _ in range(2)]


@pytest.mark.parametrize("bd", backend_params(ops=[ring_write_at_op]))
@pytest.mark.parametrize("device_cursor", [True, False], ids=["device-cursor", "host-cursor"])
def test_ring_append_replays_only_with_the_device_cursor(bd, device_cursor):
    """The negative control of the recorder: a ring whose start slot is a host int replays the captured slots
    forever and diverges from eager appends; with the device cursor every replay writes the next slots."""
    backend, device = bd
    eager, graphed = _rings(backend, device, device_cursor)
    g = torch.Generator(device=device).manual_seed(0)
    kn = torch.randn(3, 2, 3, 2, 16, generator=g, device=device)
    vn = torch.randn(kn.shape, generator=g, device=device)
    for ring in (eager, graphed):
        ring.append(kn, vn)
    graph = StepGraph(lambda: graphed.append(kn, vn), device)
    eager.append(kn, vn)
    same = []
    for _ in range(6):   # wraps the 7-slot window
        kn.copy_(torch.randn(kn.shape, generator=g, device=device))
        vn.copy_(torch.randn(vn.shape, generator=g, device=device))
        graph.replay()
        eager.append(kn, vn)
        same.append(torch.equal(eager.k, graphed.k) and torch.equal(eager.v, graphed.v))
    assert all(same) if device_cursor else not any(same[1:])


def _branchy(state: torch.Tensor, x: torch.Tensor):
    """A step whose branch is chosen by a device value: it adds ``x`` to ``state`` and returns ``2·state`` when
    ``sum(x) > 0``, else leaves ``state`` and returns ``state - 1``."""
    def step():
        pred = x.sum() > 0
        return device_branch(pred, lambda: (state.add_(x) * 2,), lambda: (state - 1,))
    return step


@pytest.mark.parametrize("device", BRANCH_DEVICES)
@pytest.mark.parametrize("first", [1.0, -1.0], ids=["captured-taking-true", "captured-taking-false"])
def test_device_branch_replays_both_bodies(first, device):
    """Captured while taking either body, the replay takes the body the device value chooses (on CUDA a
    conditional node); on CPU the writes of the body not taken at capture are undone."""
    x, state = torch.full((4,), first, device=device), torch.arange(4.0, device=device)
    ex, estate = x.clone(), state.clone()
    eager = _branchy(estate, ex)
    graph = StepGraph(_branchy(state, x), device)
    want = eager()
    assert torch.equal(state, estate) and torch.equal(graph.outputs[0], want[0])
    g = torch.Generator().manual_seed(1)
    taken = set()
    for _ in range(8):
        new = torch.randn(4, generator=g).to(device)
        x.copy_(new)
        ex.copy_(new)
        want = eager()
        got = graph.replay()
        taken.add(bool(new.sum() > 0))
        assert torch.equal(got[0], want[0]) and torch.equal(state, estate)
    assert taken == {True, False}


def test_conditional_nodes_need_the_graph_api_and_cuda_12_4(monkeypatch):
    """What device_branch needs under a CUDA capture: both CUDAGraph methods and CUDA >= 12.4. Where either is
    missing, the reason names the torch and CUDA installed, and the branch raises it as a RuntimeError before
    touching the graph (torch 2.11 lacks the lookup the first version called: an AttributeError mid-capture)."""
    for name in ("begin_capture_to_if_node", "end_capture_to_conditional_node"):
        monkeypatch.setattr(torch.cuda.CUDAGraph, name, lambda self, *args: None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    assert conditional_nodes_supported() == ""
    monkeypatch.setattr(torch.version, "cuda", "12.3")
    assert conditional_nodes_supported().endswith(f"needs CUDA 12.4 or newer (conditional nodes); installed: torch "
                                                  f"{torch.__version__}, CUDA 12.3")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.delattr(torch.cuda.CUDAGraph, "end_capture_to_conditional_node")
    why = conditional_nodes_supported()
    assert "(torch 2.13 has them)" in why and why.endswith(f"installed: torch {torch.__version__}, CUDA 13.0, whose "
                                                           f"CUDAGraph lacks end_capture_to_conditional_node")
    with pytest.raises(RuntimeError) as info:
        step_graph._cuda_branch(None, torch.tensor(True), lambda: None, lambda: None)
    assert str(info.value) == why


def test_device_branch_eagerly_is_one_declared_read():
    x, state = torch.ones(3), torch.zeros(3)
    with count_host_syncs(forbid=True) as count:
        out = _branchy(state, x)()
    assert count.by_kind == {"decision": 1} and torch.equal(out[0], torch.full((3,), 2.0))


@pytest.mark.parametrize("read, match", [
    pytest.param(lambda t: t.sum().item(), "Tensor.item", id="item"),
    pytest.param(lambda t: bool(t.sum() > 0), "Tensor.__bool__", id="bool"),
    pytest.param(lambda t: t.tolist(), "Tensor.tolist", id="tolist"),
    pytest.param(lambda t: t.numpy(), "Tensor.numpy", id="numpy"),
    pytest.param(lambda t: torch.equal(t, t), "aten.equal.* reads a tensor value on the host", id="equal"),
])
def test_host_read_inside_a_capture_raises(read, match):
    t = torch.ones(3)
    with pytest.raises(CaptureError, match=match):
        StepGraph(lambda: read(t), "cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_value_checks_may_read_at_capture(backend):
    """``ring_write`` with a device ``start`` checks its range on the host on "torch" and "cpu" (docs/contract.md §3):
    allowed at capture and not replayed; the replay writes the refilled tokens at the refilled start."""
    if backend not in sk.available_backends("cpu"):
        pytest.skip(f"{backend} is not built here")
    cache_k, cache_v = torch.zeros(1, 1, 6, 1, 4), torch.zeros(1, 1, 6, 1, 4)
    new, start = torch.randn(1, 1, 2, 1, 4), torch.tensor(1)
    graph = StepGraph(lambda: sk.ring_write(cache_k, cache_v, new, new, start, backend=backend), "cpu")
    new.copy_(torch.randn(1, 1, 2, 1, 4))
    start.fill_(3)
    graph.replay()
    assert torch.equal(cache_k[:, :, 3:5], new) and torch.equal(cache_v[:, :, 3:5], new)


def test_data_dependent_shape_raises_at_replay():
    x = torch.tensor([1.0, 0.0, 2.0])
    graph = StepGraph(lambda: x.nonzero(), "cpu")
    x.copy_(torch.tensor([1.0, 1.0, 1.0]))
    with pytest.raises(CaptureError, match="shape that depends on values"):
        graph.replay()


def test_first_gate_call_inside_a_capture_raises():
    """The drift gate's arrival counter is made by its first eager call: inside a capture it would live in the
    graph's memory (the same check guards CUDA captures)."""
    gate = sk.DriftGate(backend="torch")
    image, state = torch.rand(1, 3, 224, 224), torch.rand(7)
    with pytest.raises(RuntimeError, match="call it once eagerly before capturing"):
        StepGraph(lambda: gate.should_recompute(image, state), "cpu")


@pytest.mark.parametrize("bodies, match", [
    pytest.param((lambda: (torch.zeros(2),), lambda: (torch.zeros(3),)), "output 0 is", id="shape"),
    pytest.param((lambda: (torch.zeros(2),), lambda: (torch.zeros(2, dtype=torch.int64),)), "output 0 is",
                 id="dtype"),
    pytest.param((lambda: (torch.zeros(2),), lambda: (torch.zeros(2), torch.zeros(2))), "same structure",
                 id="structure"),
])
def test_branch_bodies_must_agree(bodies, match):
    pred = torch.tensor(True)
    with pytest.raises(ValueError, match=match):
        StepGraph(lambda: device_branch(pred, *bodies), "cpu")


@pytest.mark.parametrize("pred", [torch.tensor([True]), torch.tensor(1), True], ids=["1-d", "int", "python-bool"])
def test_pred_must_be_a_0d_bool_tensor(pred):
    with pytest.raises(ValueError, match="pred: expected a 0-d bool tensor"):
        device_branch(pred, lambda: None, lambda: None)


def test_bad_arguments():
    with pytest.raises(TypeError, match="step: expected a callable"):
        StepGraph(3, "cpu")
    with pytest.raises(ValueError, match="device: expected a cuda or cpu device"):
        StepGraph(lambda: None, "meta")
    with pytest.raises(ValueError, match="warmup: expected an int >= 0"):
        StepGraph(lambda: None, "cpu", warmup=-1)

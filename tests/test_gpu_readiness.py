"""GPU readiness checks that run without a GPU (issue 16): the verify threshold decided exactly for every scale size
n in 1..1024, device constants made outside CUDA-graph capture, launch-grid limits, the Triton device guard. The
CUDA-only counterparts (capture and replay, Inductor, sync debug mode, gate stress) are in tests/test_gpu.py."""
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import backend_params

import streamkern
from streamkern import _backend, capture

SIZES = range(1, 1025)


def _float32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _on_threshold(n: int, k: int, device):
    """Greedy verify inputs of one scale of n tokens: row 0 matches k of them, row 1 k - 1 (argmax is token 0)."""
    logits = torch.zeros(2, n, 2, device=device)
    logits[..., 0] = 1.0
    draft = torch.ones(2, n, dtype=torch.int64, device=device)
    draft[0, :k] = 0
    draft[1, :k - 1] = 0
    return logits, draft


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_threshold_on_the_ratio_is_accepted_for_every_n(backend):
    """k of n matches at threshold k/n pass and k - 1 fail, for every n in 1..1024 and two k per n (half, and
    7/10 rounded down: thresholds such as 0.7 that no float represents exactly); the ratio is hits/n rounded once."""
    if backend not in streamkern.available_backends("cpu"):
        pytest.skip(f"{backend} is not built here")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2048 tiny calls: thread start-up on a loaded machine would dominate
    try:
        _every_n(backend)
    finally:
        torch.set_num_threads(threads)


def _every_n(backend):
    for n in SIZES:
        for k in sorted({math.ceil(n / 2), max(1, 7 * n // 10)}):
            logits, draft = _on_threshold(n, k, "cpu")
            res = streamkern.verify_scales(logits, draft, SimpleNamespace(begin=(0,), end=(n,)), 0, 1,
                                           threshold=k / n, backend=backend)
            assert res.accepted.tolist() == [1, 0], (n, k)
            assert res.ratio[0, 0].item() == _float32(k / n), (n, k)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def test_triton_threshold_decision_for_every_n():
    """The Triton decision kernel (interpreter) on the same cases, one launch per n: the full op's per-row kernel
    is too slow under the interpreter for 1024 sizes, so the rows' match bits are given (the full op runs below)."""
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton is not installed")
    from streamkern.kernels.verify_scales import _scales

    for n in SIZES:
        k = math.ceil(n / 2) if n % 3 else max(1, 7 * n // 10)
        match = torch.zeros(2, n, dtype=torch.int8)
        match[0, :k] = 1
        match[1, :k - 1] = 1
        draft = torch.zeros(2, n, dtype=torch.int64)
        tokens = torch.full((2, n), -7, dtype=torch.int64)
        ratio = torch.empty(2, 1)
        accepted = torch.empty(2, dtype=torch.int64)
        offsets, scale_of = torch.tensor([0, n], dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
        _scales[(2,)](match, draft, tokens, offsets, scale_of, ratio, accepted, n, 1, *draft.stride(), k / n,
                      GREEDY=True, BLOCK_T=min(_next_pow2(n), 1024))
        assert accepted.tolist() == [1, 0], (n, k)
        assert ratio[0, 0].item() == _float32(k / n), (n, k)


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cpu")))
def test_threshold_on_the_ratio_full_op(bd):
    """The whole op on the GPU backends (and Triton under the interpreter) for sizes whose ratio k/n is not a
    dyadic number (on CUDA every n in 1..1024; under the interpreter a few)."""
    backend, device = bd
    sizes = SIZES if device == "cuda" else (1, 3, 7, 10, 49, 100)
    for n in sizes:
        for k in sorted({math.ceil(n / 2), max(1, 7 * n // 10)}):
            logits, draft = _on_threshold(n, k, device)
            res = streamkern.verify_scales(logits, draft, SimpleNamespace(begin=(0,), end=(n,)), 0, 1,
                                           threshold=k / n, backend=backend)
            assert res.accepted.tolist() == [1, 0], (n, k)
            assert res.ratio[0, 0].item() == _float32(k / n), (n, k)


# ---- device constants outside capture --------------------------------------------------------------------------

def _consensus_args():
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(3, 1, 4, 2, 4, generator=gen), torch.randn(3, 1, 5, 2, 4, generator=gen),
            torch.rand(5, generator=gen), 2)


def _verify_args():
    logits, draft = _on_threshold(4, 2, "cpu")
    return logits, draft, SimpleNamespace(begin=(0, 1), end=(1, 4)), 0, 2


CONSTANT_OPS = [
    pytest.param(lambda: streamkern.consensus_frame_scores(*_consensus_args(), layers=(0, 2),
                                                           layer_weights=(0.25, 0.75), backend="triton"),
                 "streamkern.kernels.consensus_frame_scores", "_LAYERS", id="consensus"),
    pytest.param(lambda: streamkern.verify_scales(*_verify_args(), threshold=0.375, cfg=None, backend="triton"),
                 "streamkern.kernels.verify_scales", "_WINDOWS", id="verify"),
]


@pytest.mark.parametrize("call, module, cache", CONSTANT_OPS)
def test_device_tables_are_made_outside_capture(call, module, cache, monkeypatch):
    """A launcher's device tables come from the eager warm-up call: inside a capture (simulated here: the check
    reports one in progress) a missing table raises instead of being made in the graph's pool, and after the
    warm-up the captured call builds nothing."""
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton is not installed")
    import importlib

    tables = getattr(importlib.import_module(module), cache).tables
    tables.clear()
    with monkeypatch.context() as m:
        m.setattr(capture, "capturing", lambda device: True)
        with pytest.raises(RuntimeError, match="during CUDA graph capture; run the op once eagerly"):
            call()
        assert not tables
    want = call()  # the warm-up
    built = dict(tables)
    assert len(built) == 1
    with monkeypatch.context() as m:
        m.setattr(capture, "capturing", lambda device: True)
        got = call()
    assert tables == built and all(tables[k] is built[k] for k in built)
    for a, b in zip(want if isinstance(want, tuple) else (want,), got if isinstance(got, tuple) else (got,)):
        assert torch.equal(a, b)


def test_drift_gate_counter_is_made_outside_capture(monkeypatch):
    """The gate's arrival counter comes from the first (eager) call; a first call inside a capture raises."""
    import streamkern.ops.drift_gate as gate_module

    image, state = torch.rand(1, 3, 16, 16), torch.zeros(1, 7)
    gate = streamkern.DriftGate(pool=8, grid=(2, 2), backend="torch")
    with monkeypatch.context() as m:
        m.setattr(gate_module, "capturing", lambda device: True)
        with pytest.raises(RuntimeError, match="once eagerly before capturing"):
            gate.should_recompute(image, state)
    gate.should_recompute(image, state)
    counter = gate._counter
    with monkeypatch.context() as m:
        m.setattr(gate_module, "capturing", lambda device: True)
        gate.should_recompute(image, state)
    assert gate._counter is counter


# ---- launch grids and devices ----------------------------------------------------------------------------------

def test_grid_limits():
    from streamkern.kernels._grid import grid

    assert grid("k", (2 ** 31 - 1, "rows"), (65535, "B*H"), (65535, "z")) == (2 ** 31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match="k: grid axis 1 \\(B\\*H\\) would be 65536 programs, over CUDA's limit "
                                         "of 65535"):
        grid("k", (1, "rows"), (65536, "B*H"))
    with pytest.raises(ValueError, match="axis 0"):
        grid("k", (2 ** 31, "rows"))


def test_attention_grid_over_the_limit_raises():
    """``B * heads`` programs on grid axis 1 of the attention kernel: 65536 raise before the launch, 65535 run."""
    if "triton" not in streamkern.available_backends("cpu"):
        pytest.skip("triton is not installed")
    allow = streamkern.scale_allow(1)
    ids = torch.zeros(1, dtype=torch.int64)
    q = torch.randn(1, 65536, 1, 4)
    with pytest.raises(ValueError, match="block_masked_attention: grid axis 1 \\(B\\*H\\) would be 65536"):
        streamkern.block_masked_attention(q, q, q, ids, ids, allow, backend="triton")


def test_triton_launches_run_on_the_tensors_device(monkeypatch):
    """The Triton backend of every op runs with its tensors' device current (``torch.cuda.device``); on CPU
    tensors nothing is entered."""
    guard = _backend.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    entered = []

    class Guard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_backend, "device_guard", Guard)
    table = _backend.OpBackends("probe", {"triton": lambda x, n: x + n, "cpu": lambda x, n: x - n})
    x = torch.ones(2)
    assert torch.equal(table("triton")(x, 1), x + 1) and entered == [x.device]
    assert torch.equal(table("cpu")(x, 1), x - 1) and entered == [x.device]


GPU_CASES = sorted(__import__("streamkern.bench.gpu_cases", fromlist=["CASES"]).CASES)


def _case_here(name: str):
    """The GPU case ``name`` on this CPU: on "cpu", else Triton's interpreter."""
    from streamkern.bench import gpu_cases as gc

    backend = next((b for b in ("cpu", "triton") if gc.has_backend(name, b) and b in
                    streamkern.available_backends("cpu")), None)
    if backend is None:
        pytest.skip(f"{name}: no cpu or interpreted triton backend here")
    return gc.CASES[name]("cpu", backend)


@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_cases_match_torch_here(name):
    """The cases that tests/test_gpu.py and the GPU smoke run replay on CUDA hold on this CPU: each against the
    torch reference, before and after a refill of its inputs."""
    from streamkern.bench import gpu_cases as gc

    case = _case_here(name)
    gc.check_eager(case)
    case.refill(3)
    gc.check_eager(case)


@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_cases_replay_here(name):
    """Each op captured once by ``StepGraph`` (its CPU recorder) and replayed on refilled inputs equals torch:
    the op keeps no host value that a CUDA graph would freeze (tests/test_gpu.py replays the same on CUDA)."""
    from streamkern.bench import gpu_cases as gc

    gc.check_graph(_case_here(name), replays=2)


@pytest.mark.parametrize("name", GPU_CASES)
def test_gpu_cases_launch_as_designed_here(name, monkeypatch):
    """The launch count tests/test_gpu.py checks on CUDA, here on Triton's interpreter (the operators and Triton
    launches of a steady-state call): a fill, copy or small tensor made per call by a launcher shows here too."""
    from streamkern.bench import gpu_cases as gc

    if not gc.has_backend(name, "triton") or "triton" not in streamkern.available_backends("cpu"):
        pytest.skip(f"{name}: no triton backend to interpret here")
    monkeypatch.undo()                                       # poisoned allocations would count as fills
    gc.check_launches(gc.CASES[name]("cpu", "triton"))


@pytest.mark.parametrize("name", ["bank_insert", "drift_gate"])
def test_inductor_adds_no_copies_of_mutated_arguments(name):
    """``torch.compile(fullgraph=True)`` with Inductor of an op that writes its arguments (the bank, the gate's
    counter) equals torch and launches no more than eager: Inductor re-inplaces the functionalised op (aot_eager
    would add copies). On CUDA tests/test_gpu.py checks every op this way."""
    from streamkern.bench import gpu_cases as gc

    if "cpu" not in streamkern.available_backends("cpu"):
        pytest.skip("the extension is not built")
    eager_n, compiled_n = gc.check_compiled(gc.CASES[name]("cpu", "cpu"), "inductor")
    assert compiled_n <= eager_n

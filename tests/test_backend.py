"""Backend registry and dispatch (docs/contract.md §2), exercised through consensus_frame_scores, OpBackends and
define_op."""
import pytest
import torch

import streamkern
from streamkern import _backend, capture
from streamkern.ops.consensus_frame_scores import consensus_frame_scores_op

CONSENSUS = consensus_frame_scores_op.backends

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean_default(monkeypatch):
    """Each test starts with no default set and no STREAMKERN_BACKEND."""
    monkeypatch.delenv("STREAMKERN_BACKEND", raising=False)
    streamkern.set_backend(None)
    yield
    streamkern.set_backend(None)


def _tiny():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 1, 4, 1, 8, generator=g), torch.randn(2, 1, 3, 1, 8, generator=g), torch.rand(3), 2,
            (1,), (1.0,))


def _fake_impls(monkeypatch):
    """Replace the consensus implementations with recorders, so a test sees which backend ran."""
    calls = []
    impls = {name: (lambda *a, _n=name: calls.append(_n) or torch.zeros(1, 2)) for name in CONSENSUS.impls}
    monkeypatch.setattr(consensus_frame_scores_op, "backends", _backend.OpBackends(CONSENSUS.op, impls))
    return calls


def test_available_backends():
    names = streamkern.available_backends()
    assert names[0] == "torch" and set(names) <= set(_backend.BACKENDS)
    assert ("cpu" in names) == (_backend._EXTENSION[0])
    assert ("cuda" in streamkern.available_backends("cpu")) is False
    if torch.cuda.is_available():
        assert "triton" in streamkern.available_backends("cuda")
    assert "triton" in streamkern.available_backends("cpu") or not _backend.triton_interpreting()


def test_default_is_auto_and_set_backend_round_trips():
    assert streamkern.current_backend() == "auto"
    streamkern.set_backend("torch")
    assert streamkern.current_backend() == "torch"
    streamkern.set_backend("auto")
    assert streamkern.current_backend() == "auto"
    streamkern.set_backend(None)
    assert streamkern.current_backend() == "auto"


def test_context_manager_nests_and_restores():
    streamkern.set_backend("torch")
    with streamkern.backend("cpu"):
        assert streamkern.current_backend() == "cpu"
        with streamkern.backend("triton"):
            assert streamkern.current_backend() == "triton"
        assert streamkern.current_backend() == "cpu"
    assert streamkern.current_backend() == "torch"
    with pytest.raises(KeyError):
        with streamkern.backend("torch"):
            raise KeyError("propagates")
    assert streamkern.current_backend() == "torch"


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("STREAMKERN_BACKEND", "torch")
    assert streamkern.current_backend() == "torch"
    with streamkern.backend("cpu"):  # an explicit default wins over the environment
        assert streamkern.current_backend() == "cpu"
    monkeypatch.setenv("STREAMKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="backend: expected one of .* got 'fast'"):
        streamkern.current_backend()


def test_dispatch_precedence(monkeypatch):
    """Explicit argument > backend()/set_backend > STREAMKERN_BACKEND > auto, seen by the op itself."""
    calls = _fake_impls(monkeypatch)
    args = _tiny()
    monkeypatch.setattr(_backend, "why_not", lambda name, device: "")  # every backend "runs" here
    streamkern.consensus_frame_scores(*args)
    monkeypatch.setenv("STREAMKERN_BACKEND", "triton")
    streamkern.consensus_frame_scores(*args)
    with streamkern.backend("cuda"):
        streamkern.consensus_frame_scores(*args)
        streamkern.consensus_frame_scores(*args, backend="torch")
    assert calls == ["cpu", "triton", "cuda", "torch"]


def test_auto_picks_cpu_extension_else_torch(monkeypatch):
    expected = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"
    assert CONSENSUS.resolve("auto", CPU) == expected
    assert CONSENSUS.resolve(None, CPU) == expected
    monkeypatch.setattr(_backend, "_EXTENSION", (False, False, "the C++ extension streamkern._C is not built (test)"))
    assert CONSENSUS.resolve("auto", CPU) == "torch"
    with pytest.raises(streamkern.BackendUnavailable) as info:
        CONSENSUS.resolve("cpu", CPU)
    assert "backend 'cpu' cannot run" in str(info.value)
    assert "\n  cpu     the C++ extension streamkern._C is not built (test)" in str(info.value)


def test_unavailable_backend_says_why(monkeypatch):
    with pytest.raises(streamkern.BackendUnavailable) as info:
        streamkern.consensus_frame_scores(*_tiny(), backend="cuda")
    msg = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "consensus_frame_scores: backend 'cuda' cannot run on cpu tensors" in msg
    assert "CUDA" in msg and "torch   ok" in msg
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _backend._TRITON_MISSING:
        with pytest.raises(streamkern.BackendUnavailable, match="TRITON_INTERPRET=1"):
            streamkern.consensus_frame_scores(*_tiny(), backend="triton")
    with streamkern.backend("cuda"), pytest.raises(streamkern.BackendUnavailable):
        streamkern.consensus_frame_scores(*_tiny())  # the default is honoured, never a silent fallback


def test_missing_implementation_is_reported():
    table = _backend.OpBackends("demo_op", {"torch": lambda: None}, missing={"cpu": "no CPU kernel yet (test)"})
    with pytest.raises(streamkern.BackendUnavailable, match="demo_op has no 'cpu' backend: no CPU kernel yet"):
        table.resolve("cpu", CPU)
    assert table.resolve("auto", CPU) == "torch"


@pytest.mark.parametrize("bad", ["fast", "CPU", "", "gpu"])
def test_invalid_backend_name(bad):
    with pytest.raises(ValueError, match=f"backend: expected one of .* got {bad!r}"):
        streamkern.set_backend(bad)
    with pytest.raises(ValueError, match="backend: expected one of"):
        with streamkern.backend(bad):
            pass
    with pytest.raises(ValueError, match="backend: expected one of"):
        streamkern.consensus_frame_scores(*_tiny(), backend=bad)
    assert streamkern.current_backend() == "auto"


def test_compiled_code_follows_the_default_backend():
    """torch.compile traces the default-backend lookup (no graph break) and recompiles when the default changes."""
    chunk_k, text_k, weights, fsl, layers, lams = _tiny()
    f = torch.compile(lambda a, b, c: streamkern.consensus_frame_scores(a, b, c, fsl, layers, lams), fullgraph=True,
                      backend="aot_eager")
    ref = streamkern.consensus_frame_scores(chunk_k, text_k, weights, fsl, layers, lams, backend="torch")
    torch.testing.assert_close(f(chunk_k, text_k, weights), ref)
    with streamkern.backend("torch"):
        torch.testing.assert_close(f(chunk_k, text_k, weights), ref)
    # Inside a fullgraph trace dynamo re-raises our BackendUnavailable wrapped in its own exception type.
    with streamkern.backend("cuda"), pytest.raises(Exception, match="backend 'cuda' cannot run on cpu tensors"):
        f(chunk_k, text_k, weights)


def test_run_skips_the_custom_op_wrapper_only_in_plain_eager():
    """OpBackends.run: the implementation directly in plain eager; the custom op under a dispatch mode, for inputs
    that require grad and while torch.compile traces (where the wrapper's fake kernel is needed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    table = _backend.OpBackends("probe", {"torch": lambda x: calls.append("impl") or x + 1})

    def custom_op(x, name):
        calls.append(f"op:{name}")
        return x + 1

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    assert torch.equal(table.run(custom_op, "torch", torch.zeros(2)), torch.ones(2)) and calls == ["impl"]
    calls.clear()
    table.run(custom_op, "torch", torch.zeros(2, requires_grad=True))
    with Passthrough():
        table.run(custom_op, "torch", torch.zeros(2))
    torch._dynamo.reset()
    torch.compile(lambda x: table.run(custom_op, "torch", x), backend="eager", fullgraph=True)(torch.zeros(2))
    assert calls == ["op:torch"] * 3


def test_define_op_declares_supports_values_and_outputs(monkeypatch):
    """One declaration: the check normalises, alloc serves out=True kernels (and the fake kernel), a backend's
    supports steers "auto" and is the reason a request by name gives, and the value check runs on "torch"/"cpu"
    (on GPU backends only with STREAMKERN_DEBUG=1, never during a CUDA capture), flagged as a value check while it
    runs."""
    seen = []

    def values(x, n):
        seen.append(capture.checking_values())

    op = _backend.define_op("test_define_op", "(Tensor x, int n) -> Tensor", {
        "torch": lambda x, n: x + n,
        "cpu": _backend.Kernel(lambda out, x, n: out.copy_(x + 2 * n), out=True,
                               supports=lambda x, n: "" if x.numel() <= 4 else f"at most 4 values, got {x.numel()}"),
    }, check=lambda x, n: (x.float(), int(n)), values=values, alloc=lambda x, n: torch.empty_like(x))
    monkeypatch.setattr(_backend, "why_not", lambda name, device: "")
    x = torch.zeros(3, dtype=torch.int64)
    assert op(x, 1, backend="cpu").tolist() == [2.0] * 3 and op(x, 1, backend="torch").tolist() == [1.0] * 3
    assert op(x, 1).tolist() == [2.0] * 3                       # auto: "cpu" takes 3 values
    assert op(torch.zeros(5), 1).tolist() == [1.0] * 5          # auto: "cpu" declines 5, "torch" runs
    with pytest.raises(streamkern.BackendUnavailable) as info:
        op(torch.zeros(5), 1, backend="cpu")
    assert "cpu     at most 4 values, got 5" in str(info.value) and "torch   ok" in str(info.value)
    assert "triton  test_define_op has no 'triton' backend" in str(info.value)
    assert seen == [True] * 4 and not capture.checking_values()
    with monkeypatch.context() as m:   # a CUDA capture of the tensors' device in progress: no value check runs
        m.setattr(capture, "cuda_capturing", lambda device: True)
        assert op(x, 1, backend="torch").tolist() == [1.0] * 3 and len(seen) == 4
    torch.library.opcheck(op.custom_op, (torch.zeros(3), 1, "cpu"))
    cuda, impls = torch.device("cuda"), {"torch": lambda x: x, "cuda": lambda x: x, "triton": lambda x: x}
    plain = _backend.define_op("test_define_op_default_order", "(Tensor x) -> Tensor", impls)
    ordered = _backend.define_op("test_define_op_auto_order", "(Tensor x) -> Tensor", impls,
                                 auto_order={"cuda": ("triton", "cuda", "torch")})
    assert plain.backends.resolve("auto", cuda) == "cuda"       # the default order: "cuda", "triton", "torch"
    assert ordered.backends.resolve("auto", cuda) == "triton"   # the op's own order on CUDA tensors
    assert ordered.backends.resolve("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend: expected one of"):
        _backend.define_op("test_define_op_bad_order", "(Tensor x) -> Tensor", {"torch": lambda x: x},
                           auto_order={"cuda": ("tpu",)})
    with pytest.raises(ValueError, match="out=True"):
        _backend.define_op("test_define_op_no_alloc", "(Tensor x) -> Tensor",
                           {"torch": _backend.Kernel(lambda out, x: None, out=True)})


def test_poison_fixture_fills_every_allocation_even_a_leaf_that_requires_grad():
    """The autouse fixture of conftest: ``torch.empty*`` come back NaN / sentinel, and a leaf made with
    ``requires_grad=True`` (as Inductor's pattern passes allocate) is poisoned without an autograd error."""
    leaf = torch.empty(4, 4, requires_grad=True)
    assert leaf.is_leaf and leaf.requires_grad and torch.isnan(leaf).all()
    assert torch.isnan(torch.empty_like(leaf)).all()
    assert (torch.empty(3, dtype=torch.int64) == -(2 ** 62) + 7).all()
    assert torch.empty(2, dtype=torch.bool).all()

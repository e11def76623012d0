"""Shared fixtures: Triton's interpreter on GPU-less machines, NaN-poisoned allocations, torch's default float32
matmul precision, the backend matrix."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of the Triton kernels

import streamkern  # noqa: E402
from streamkern._backend import why_not  # noqa: E402

_ALLOCATORS = ("empty", "empty_like", "empty_strided")
_POISON_INT = {torch.int64: -(2 ** 62) + 7, torch.int32: -(2 ** 30) + 7, torch.int16: -32000, torch.uint8: 0xAB,
               torch.int8: -77}


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floats), True (bool) or an unlikely sentinel (ints) so unwritten elements fail.
    The fill is not recorded by autograd (an ``empty(..., requires_grad=True)`` leaf, as Inductor's pattern
    passes make, is poisoned too)."""
    if t.numel() == 0:
        return t
    if t.is_floating_point() or t.is_complex():
        value = float("nan")
    elif t.dtype == torch.bool:
        value = True
    else:
        value = _POISON_INT.get(t.dtype, 7)
    with torch.no_grad():
        return t.fill_(value)


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every ``torch.empty*`` and ``Tensor.new_empty`` made during a test comes back poisoned."""
    for name in _ALLOCATORS:
        real = getattr(torch, name)

        def poisoned(*args, __real=real, **kwargs):
            return poison_(__real(*args, **kwargs))

        monkeypatch.setattr(torch, name, poisoned)
    real_new_empty = torch.Tensor.new_empty
    monkeypatch.setattr(torch.Tensor, "new_empty", lambda self, *a, **k: poison_(real_new_empty(self, *a, **k)))
    yield


@pytest.fixture(autouse=True)
def fp32_matmul_precision_highest():
    """Every test starts with torch's default float32 matmul precision, "highest" (fp32 attention dots on GPUs then
    use 3xTF32 and meet the fp32 bound), and a test that changes it gets it back afterwards."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


# Every (backend, device) pair an op's parity tests run on; unavailable pairs are skipped with the reason.
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]   # the storage dtypes every op takes
BACKEND_DEVICES = [("torch", "cpu"), ("cpu", "cpu"), ("triton", "cpu"),
                   ("torch", "cuda"), ("triton", "cuda"), ("cuda", "cuda")]


def backend_params(exclude=(), ops=()):
    """``pytest.param((backend, device), id="backend-device")`` for each pair, skipped where it cannot run (or where
    one of ``ops``, the ops declared by ``define_op`` that a test calls, has no such backend)."""
    params = []
    for b, d in BACKEND_DEVICES:
        if (b, d) in exclude or b in exclude:
            continue
        marks = []
        lacking = [op for op in ops if b not in op.backends.impls]
        if lacking:
            marks.append(pytest.mark.skip(reason=f"{lacking[0].name} has no {b!r} backend: "
                                                 f"{lacking[0].backends.missing.get(b, '')}"))
        elif d == "cuda" and not torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="no CUDA device on this machine"))
        else:
            why = why_not(b, torch.device(d))
            if why:
                marks.append(pytest.mark.skip(reason=f"{b} on {d}: {why}"))
        params.append(pytest.param((b, d), id=f"{b}-{d}", marks=marks))
    return params


def assert_raises_untouched(fn, args, exc, match):
    """``fn(*args)`` raises ``exc`` whose message matches ``match``, and every tensor argument is left as it was
    (meta tensors hold no values and are skipped)."""
    before = [a.clone() if isinstance(a, torch.Tensor) and a.device.type != "meta" else None for a in args]
    with pytest.raises(exc, match=match):
        fn(*args)
    for a, b in zip(args, before):
        if b is not None:
            assert torch.equal(a, b), "inputs must be left untouched"

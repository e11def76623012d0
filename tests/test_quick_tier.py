"""The quick tier (``pytest -m quick``), which ``make test-oldest-torch`` runs against the oldest torch the package
declares: the package imports from this tree with its CPU backends, the tier (tests/conftest.py QUICK_TIER) holds
every public op's parity on each CPU backend and dtype, and the versions declared are the ones ``make test`` tests."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import QUICK_TIER

import streamkern
from streamkern._backend import why_not

ROOT = Path(__file__).resolve().parents[1]
NOT_OPS = {"BackendUnavailable", "available_backends", "backend", "current_backend", "set_backend", "GateReason",
           "VerifyResult", "ScaleLayout"}   # the backend switch and the types ops return
CPU_BACKENDS = ("torch", "cpu", "triton")
DTYPE_IDS = ("fp32", "f32", "fp16", "f16", "bf16", "u8")   # as the tests name them


@pytest.mark.quick
def test_imports_from_this_tree_with_every_cpu_backend():
    """``streamkern``, its Triton kernels and its pipelines are this tree's (a copy built against another torch
    tests itself, not the checkout it came from), and the extension loaded against the torch that runs."""
    import streamkern.distributed
    import streamkern.kernels
    import streamkern.pipelines

    for module in (streamkern, streamkern.kernels, streamkern.pipelines, streamkern.distributed):
        assert Path(module.__file__).resolve().is_relative_to(ROOT), (module.__name__, module.__file__, ROOT)
    wanted = CPU_BACKENDS if os.environ.get("TRITON_INTERPRET") == "1" else CPU_BACKENDS[:2]
    assert {b: why_not(b, torch.device("cpu")) for b in wanted} == {b: "" for b in wanted}, torch.__version__


def _collect(*args):
    """``{"file::test": [its parametrisation ids split at "-"]}`` that pytest collects from the quick tier's tests."""
    tests = [f"tests/{test}" for test in QUICK_TIER]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args,
                           *tests], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ids = {}
    for line in proc.stdout.splitlines():
        test, _, params = line.removeprefix("tests/").partition("[")
        if "::" in test:
            ids.setdefault(test, []).append(params.rstrip("]").split("-"))
    return ids


def _on_cpu(params):
    """The (backend, dtype id) pairs on CPU among ``params`` (backend None where the test has no such parameter)."""
    pairs = set()
    for p in params:
        if "cuda" in p:
            continue
        backend = next((p[i] for i in range(len(p) - 1) if p[i] in CPU_BACKENDS and p[i + 1] == "cpu"), None)
        pairs.add((backend, next((t for t in p if t in DTYPE_IDS), None)))
    return pairs


def test_quick_tier_holds_every_public_op_on_each_cpu_backend_and_dtype():
    """Every public op has a test in the tier, and each of those tests is in it once per (CPU backend, dtype) it
    is parametrised with."""
    names = {name for _, _, ops in QUICK_TIER.values() for name in ops}
    assert names == set(streamkern.__all__) - NOT_OPS, "every public op needs its test in QUICK_TIER"
    quick, every = _collect("-m", "quick"), _collect()
    assert set(quick) == set(every) == set(QUICK_TIER), set(QUICK_TIER) ^ set(quick)
    for test, params in every.items():
        assert _on_cpu(quick[test]) == _on_cpu(params), test
        # each CPU backend, or none named (the test calls the op's default), or "cpu" and "triton" against the
        # "torch" backend that the test runs itself
        assert {b for b, _ in _on_cpu(params)} in ({None}, set(CPU_BACKENDS), {"cpu", "triton"}), test
    assert sum(map(len, quick.values())) <= 200   # quick: a few per op, not every parametrisation


def test_the_torch_and_triton_declared_are_the_ones_make_test_tests():
    """pyproject's torch range (the package's and the build's) starts at the torch of ``make test-oldest-torch`` and
    holds the one ``.venv`` gets; its triton floor is the triton installed beside that oldest torch."""
    pyproject, make = (ROOT / "pyproject.toml").read_text(), (ROOT / "Makefile").read_text()
    ranges = re.findall(r'"torch>=(\d+\.\d+),<(\d+\.\d+)"', pyproject)
    assert len(ranges) == 2 and ranges[0] == ranges[1], ranges   # [project] dependencies and [build-system]
    low, high = (tuple(map(int, v.split("."))) for v in ranges[0])
    oldest_torch, oldest_triton = re.search(r"\$\(OPY\) -m pip install -q torch==(\d+\.\d+)\.\d+ triton==(\d+\.\d+)",
                                            make).groups()
    newest = re.search(r'\$\(PY\) -m pip install -q "torch>=([\d.]+),<=(\d+\.\d+)', make).groups()
    assert tuple(map(int, oldest_torch.split("."))) == low == tuple(map(int, newest[0].split(".")))
    assert low <= tuple(map(int, newest[1].split("."))) < high
    assert set(re.findall(r'"triton>=([\d.]+)"', pyproject + make)) == {oldest_triton}

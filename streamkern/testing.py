"""The parity metric of DESIGN.md §3, shared by the tests, the benchmarks and the demo."""
from __future__ import annotations

import torch

# Largest relative error allowed for outputs computed from inputs of each dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.uint8: 1e-5,
             torch.float64: 1e-12}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖out − ref‖ / ‖ref‖`` in float64 on the CPU; NaN or Inf anywhere in ``out`` gives ``inf``.
    A zero reference compares the absolute norm instead."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"out: expected shape {tuple(ref.shape)}, got {tuple(out.shape)}")
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    num = torch.linalg.vector_norm(out - ref).item()
    den = torch.linalg.vector_norm(ref).item()
    return num / den if den > 0 else num


def assert_parity(out: torch.Tensor, ref: torch.Tensor, input_dtype: torch.dtype, what: str = "output") -> float:
    """Fail unless ``rel_error(out, ref)`` is under the tolerance for ``input_dtype``; returns the error."""
    err = rel_error(out, ref)
    tol = TOLERANCE[input_dtype]
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e} ({input_dtype})"
    return err

"""Launch-grid limits of the Triton launchers.

CUDA allows at most ``2^31 - 1`` programs along grid axis 0 and ``65535`` along axes 1 and 2; past that the launch
fails with an opaque driver error (or, in the CPU interpreter, runs where the GPU would not). Every launcher passes
its grid through :func:`grid`, which raises a ValueError naming the kernel, the axis and what it counts.
"""
from __future__ import annotations

MAX_GRID = (2 ** 31 - 1, 65535, 65535)


def grid(kernel: str, *dims: tuple[int, str]) -> tuple[int, ...]:
    """``grid("name", (n0, "what axis 0 counts"), ...)`` -> ``(n0, ...)``, checked against :data:`MAX_GRID`."""
    for axis, ((n, what), limit) in enumerate(zip(dims, MAX_GRID)):
        if n > limit:
            raise ValueError(f"{kernel}: grid axis {axis} ({what}) would be {n} programs, over CUDA's limit of "
                             f"{limit}; split the call (e.g. over the batch)")
    return tuple(n for n, _ in dims)

"""Small constant tables on the device (layer ids, window offsets) for the Triton launchers, CUDA-graph safe.

A table is built once per key and device, on first use outside a CUDA-graph capture (the eager warm-up call that
precedes any capture, or an explicit call of the launcher's table function), and kept for the life of the process:

* never inside a capture: a tensor made there lives in the graph's private pool and its host-to-device copy runs
  only when the graph replays, so an eager call after the capture would read it unwritten. A missing table during
  capture raises, naming the warm-up to do;
* never evicted: a captured graph holds the table's address, so freeing it would leave replays reading freed memory.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

from streamkern import capture


class DeviceConstants:
    """``get(key, device)``: ``build(key, device)`` made once per ``(key, device)``, outside any capture."""

    def __init__(self, what: str, build: Callable[[Hashable, torch.device], object]):
        self.what, self.build, self.tables = what, build, {}

    def get(self, key: Hashable, device: torch.device):
        full = (key, str(device))
        table = self.tables.get(full)
        if table is None:
            if capture.capturing(device):
                raise RuntimeError(f"streamkern: the {self.what} {key} for {device} would be created during CUDA "
                                   f"graph capture; run the op once eagerly with the same arguments before "
                                   f"capturing (the usual warm-up), so that the table exists outside the graph")
            table = self.tables[full] = self.build(key, device)
        return table


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``; on CUDA from pinned memory with a non-blocking copy, which
    never waits on the stream."""
    pinned = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)

"""Reference pipelines that call streamkern's ops (DESIGN.md §5).

Each takes ``backend=``: ``"torch"`` runs the source pipeline's own eager code (the baseline); any other backend
runs the same pipeline on streamkern's ops with that backend. ``eager=False`` with ``backend="torch"`` runs the
op-based path on the ops' eager references.
"""
from ._runtime import HostSyncError, PipelineRun, count_host_syncs
from .memory_bank import MemoryBank
from .streaming import StreamingGenerator

__all__ = ["MemoryBank", "StreamingGenerator", "PipelineRun", "HostSyncError", "count_host_syncs"]

"""Reference pipelines that call streamkern's ops (docs/contract.md §5).

Each takes ``backend=``: ``"torch"`` runs the source pipeline's own eager code (the baseline); any other backend
runs the same pipeline on streamkern's ops with that backend. ``eager=False`` with ``backend="torch"`` runs the
op-based path on the ops' eager references. ``run(...)`` returns a :class:`PipelineRun` (outputs, per-step
latency, host syncs per step).
"""
from ..capture import HostSyncError, count_host_syncs
from .runtime import PipelineRun
from .gated_policy import GatedPolicy
from .memory_bank import MemoryBank
from .speculative_var import RoundInputs, SpeculativeVAR
from .streaming import BlockState, BlockStream, StreamingGenerator
from .world_model import MemoryWorldModel

__all__ = ["MemoryBank", "StreamingGenerator", "BlockStream", "BlockState", "MemoryWorldModel", "GatedPolicy",
           "SpeculativeVAR", "RoundInputs", "PipelineRun", "HostSyncError", "count_host_syncs"]

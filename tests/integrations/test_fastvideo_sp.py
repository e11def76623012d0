"""FastVideo's own sequence parallelism with its causal models, on 2 gloo ranks (CPU): why ``accelerate(model)``
cannot be tested against it (docs/distributed.md, "FastVideo"). FastVideo 0.2.1's causal Wan and Matrix-Game 2.0
shard nothing under ``sp_size=2``: their causal self-attention is a ``LocalAttention`` (no all-to-all) and their
``_forward_inference`` never splits the tokens, yet builds the RoPE table for ``frames · sp_size`` frames. Causal Wan
therefore fails in ``CausalWanSelfAttention.forward`` (``_apply_rotary_emb``: 12 tokens against a 24-token table);
Matrix-Game 2.0 ropes with its own table and runs, every rank computing every token and head (no parallelism)."""
import pytest
import torch

import fastvideo_env as env
from streamkern.distributed import run_local

pytestmark = pytest.mark.skipif(not env.FASTVIDEO, reason=env.WHY_NOT)

BLOCKS = dict(blocks=[3, 3], steps=1, height=4, width=4, seed=0)   # 3 frames × 2·2 tokens = 12 tokens per block
ATTENTION = ("CausalWanSelfAttention", "CausalMatrixGame2SelfAttention")


def _stream(name: str):
    """``(outputs or the RuntimeError's message, the q shapes every causal self-attention call received)``."""
    model = getattr(env, name)(local_attn_size=6, sink_size=1)
    seen = []
    for m in model.modules():
        if type(m).__name__ in ATTENTION:
            m.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    try:
        return torch.stack(env.stream_blocks(model, **BLOCKS)), seen
    except RuntimeError as e:
        return str(e), seen


def _sp_rank(rank, world, name):
    env.setup(sp_size=world)
    from fastvideo.distributed.parallel_state import get_sp_world_size

    assert get_sp_world_size() == world
    return _stream(name)


def test_causal_wan_fails_under_fastvideo_sp():
    for error, seen in (o.result for o in run_local(_sp_rank, 2, ("wan",), timeout_s=300)):
        assert isinstance(error, str) and "size of tensor a (12) must match the size of tensor b (24)" in error
        assert seen == [(1, 12, 2, 12)]        # the first layer's q: every token, every head


def test_matrixgame2_under_fastvideo_sp_computes_everything_on_every_rank():
    env.setup()
    ref, ref_seen = _stream("matrixgame2")
    for out, seen in (o.result for o in run_local(_sp_rank, 2, ("matrixgame2",), timeout_s=300)):
        assert torch.equal(out, ref)
        assert seen == ref_seen and set(seen) == {(1, 12, 2, 12)}   # no rank holds a shard of tokens or heads

"""streamkern.integrations.fastvideo.accelerate on FastVideo's own causal Wan and Matrix-Game 2.0 (issue 15).

Tiny random-weight models, FastVideo's path vs the accelerated one on the same weights and inputs: float32 streams
called as the stages call the model (the window rolls every block, with and without sinks, on every backend), and
FastVideo's own denoising stages in bf16. Run in the FastVideo venv: ``make test-fastvideo``.
"""
import copy
import functools

import pytest
import torch
from conftest import backend_params

import fastvideo_env as env

if not env.FASTVIDEO:
    pytest.skip(env.WHY_NOT, allow_module_level=True)
env.setup()

from streamkern import BackendUnavailable  # noqa: E402
from streamkern.ops.frame_attention import frame_attention_op  # noqa: E402
from streamkern.integrations import fastvideo as skfv  # noqa: E402
from streamkern.capture import HostSyncError, count_host_syncs  # noqa: E402
from streamkern.testing import assert_parity, rel_error  # noqa: E402

MODELS = {"wan": env.wan, "matrixgame2": env.matrixgame2}
HEIGHT, WIDTH = 4, 6                 # 6 tokens per latent frame
BLOCKS = [1, 3, 3, 3, 3, 3, 3]       # a single-frame first block, then 3-frame blocks
LOCAL = 6                            # window of 6 frames (1 sink): from the third block on, every block rolls 2 frames


@functools.lru_cache(maxsize=None)
def model(name: str, sink: int, dtype=torch.float32):
    return MODELS[name](local_attn_size=LOCAL, sink_size=sink, frames_per_block=3, seed=7 + sink, dtype=dtype)


@functools.lru_cache(maxsize=None)
def fastvideo_stream(name: str, sink: int):
    return env.stream_blocks(model(name, sink), blocks=BLOCKS, steps=1, height=HEIGHT, width=WIDTH, seed=11)


def accelerated(name: str, sink: int, backend=None, dtype=torch.float32, attention="frame"):
    return skfv.accelerate(copy.deepcopy(model(name, sink, dtype)), backend=backend, attention=attention)


def skip_unless_runs(backend: str, device: str, attention: str) -> None:
    if device != "cpu":
        pytest.skip("FastVideo is installed for CPU here (its CUDA wheel pins a CUDA torch); tests run on CPU")
    if attention == "frame":
        try:
            frame_attention_op.backends.resolve(backend, torch.device(device))
        except BackendUnavailable as e:
            pytest.skip(str(e))


@pytest.mark.parametrize("attention", skfv.ATTENTION)
@pytest.mark.parametrize("sink", [0, 1], ids=["sink0", "sink1"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("bd", backend_params())
def test_stream_float32_matches_fastvideo(bd, name, sink, attention):
    backend, device = bd
    skip_unless_runs(backend, device, attention)
    ref = fastvideo_stream(name, sink)
    out = env.stream_blocks(accelerated(name, sink, backend, attention=attention), blocks=BLOCKS, steps=1,
                            height=HEIGHT, width=WIDTH, seed=11)
    assert len(out) == len(ref) == 2 * len(BLOCKS)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_parity(o, r, torch.float32, what=f"{name} sink={sink} call {i}")


def test_parity_is_sensitive_to_the_window():
    """The comparison can fail: dropping the sink frame from the attended window breaks parity."""
    wrong = accelerated("wan", 1, "torch")
    for block in wrong.blocks:
        block.attn1.sink_size = 0
    out = env.stream_blocks(wrong, blocks=BLOCKS, steps=1, height=HEIGHT, width=WIDTH, seed=11)
    errors = [rel_error(o, r) for o, r in zip(out, fastvideo_stream("wan", 1))]
    assert max(errors) > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_self_attention_makes_no_host_sync(name):
    """FastVideo's cached self-attention reads two index tensors per layer per call; the accelerated one none."""
    fast = accelerated(name, 1, "torch")
    for block in fast.blocks:
        inner = block.attn1.forward

        def forbidding(*args, __inner=inner, **kwargs):
            with count_host_syncs(forbid=True):
                return __inner(*args, **kwargs)
        block.attn1.forward = forbidding

    def syncs(m):
        counts = []

        def record(call, kv):
            with count_host_syncs() as count:
                out = call()
            counts.append(count.total)
            return out
        env.stream_blocks(m, blocks=BLOCKS[:3], steps=1, height=HEIGHT, width=WIDTH, seed=11, record=record)
        return counts

    slow, quick = syncs(model(name, 1)), syncs(fast)
    layers = len(fast.blocks)
    assert [s - q for s, q in zip(slow, quick)] == [2 * layers] * len(slow)
    with pytest.raises(HostSyncError):   # the forbidding wrapper would catch a read
        with count_host_syncs(forbid=True):
            torch.ones(1).item()


@pytest.mark.parametrize("name", list(MODELS))
def test_cache_traffic_is_only_the_new_tokens(name):
    """Bytes moved by cache handling per call: k and v of the new tokens, read once and written once."""
    fast = accelerated(name, 1, "torch")
    heads, head_dim = fast.num_attention_heads, fast.attention_head_dim
    frame_len = env.frame_seq_length(HEIGHT, WIDTH)
    seen = []

    def record(call, kv):
        with env.CacheTraffic(kv) as traffic:
            out = call()
        seen.append((traffic.bytes, dict(traffic.ops)))
        return out
    blocks = BLOCKS[:4]
    env.stream_blocks(fast, blocks=blocks, steps=1, height=HEIGHT, width=WIDTH, seed=11, record=record)
    expected = [2 * 2 * frames * frame_len * heads * head_dim * 4 * len(fast.blocks) for frames in blocks
                for _ in range(2)]
    assert [b for b, _ in seen] == expected
    assert all(set(ops) == {"streamkern::ring_write"} for _, ops in seen)


@pytest.mark.parametrize("name", list(MODELS))
def test_fastvideo_stage_bf16(name):
    """FastVideo's own denoising stage drives the model (bf16, its target dtype), two requests in a row: caches
    re-created per request, the window rolled three times per request."""
    slow = model(name, 1, torch.bfloat16)
    fast = accelerated(name, 1, dtype=torch.bfloat16)
    for seed in (5, 6):
        ref = env.run_stage(slow, num_frames=12, steps=2, height=HEIGHT, width=WIDTH, seed=seed)
        out = env.run_stage(fast, num_frames=12, steps=2, height=HEIGHT, width=WIDTH, seed=seed)
        assert torch.isfinite(ref).all()
        assert_parity(out.float(), ref.float(), torch.bfloat16, what=f"{name} stage latents, seed {seed}")


def test_wan_moe_stage_single_frame_first_block_bf16():
    """The Wan2.2-MoE path of CausalDMDDenosingStage: two models with two caches, a first block of one frame."""
    slow, slow_2 = model("wan", 0, torch.bfloat16), env.wan(local_attn_size=LOCAL, sink_size=0, seed=99,
                                                             dtype=torch.bfloat16)
    fast, fast_2 = (skfv.accelerate(copy.deepcopy(m)) for m in (slow, slow_2))
    ref = env.run_stage(slow, num_frames=12, steps=2, height=HEIGHT, width=WIDTH, seed=8, transformer_2=slow_2)
    out = env.run_stage(fast, num_frames=12, steps=2, height=HEIGHT, width=WIDTH, seed=8, transformer_2=fast_2)
    assert_parity(out.float(), ref.float(), torch.bfloat16, what="wan MoE stage latents")


def test_relativistic_rope_policy_is_refused():
    m = copy.deepcopy(model("wan", 1))
    m.blocks[1].attn1.rope_cache_policy = "relativistic"
    with pytest.raises(ValueError, match="relativistic"):
        skfv.accelerate(m)
    assert "forward" not in vars(m.blocks[0].attn1), "nothing is patched when accelerate raises"


def test_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        skfv.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        skfv.accelerate(copy.deepcopy(model("wan", 0)), backend="tpu")
    with pytest.raises(ValueError, match="attention"):
        skfv.accelerate(copy.deepcopy(model("wan", 0)), attention="flash")


def test_out_of_order_block_is_refused_and_writes_nothing():
    fast = accelerated("wan", 1, "torch")
    frame_len = env.frame_seq_length(HEIGHT, WIDTH)
    cond = env.conditioning(fast, 1, 0)
    kv, cross = env.caches(fast, 1, frame_len, torch.float32, cond.pop("text_len"))
    text = cond.pop("encoder_hidden_states")
    x = torch.randn(1, fast.in_channels, 1, HEIGHT, WIDTH)
    t = torch.zeros(1, 1, dtype=torch.long)
    from fastvideo.forward_context import set_forward_context
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        fast(x, text, t, kv_cache=kv, crossattn_cache=cross, current_start=0, start_frame=0)
        before = [c["k"].clone() for c in kv]
        with pytest.raises(ValueError, match="current_start"):   # skips frame 1
            fast(x, text, t, kv_cache=kv, crossattn_cache=cross, current_start=2 * frame_len, start_frame=2)
    assert all(torch.equal(c["k"], b) for c, b in zip(kv, before))


def _block_calls(model, kv, cross, text, cond, frames: int, start_frame: int, gen) -> list[torch.Tensor]:
    """One block as the stages stream it (one denoising call + the clean pass) on the given caches."""
    from fastvideo.forward_context import set_forward_context

    frame_len = env.frame_seq_length(HEIGHT, WIDTH)
    x = torch.randn(1, model.in_channels, frames, HEIGHT, WIDTH, generator=gen)
    outs = []
    with torch.no_grad(), set_forward_context(current_timestep=0, attn_metadata=None):
        for t in (500, 0):
            outs.append(model(x, text, torch.full((1, frames), t, dtype=torch.long), kv_cache=kv,
                              crossattn_cache=cross, current_start=start_frame * frame_len, start_frame=start_frame,
                              **cond))
    return outs


@pytest.mark.parametrize("name", list(MODELS))
def test_seek_positions_a_prefilled_cache(name):
    """``stream(attn, kv_cache[l], frame_seqlen).seek(start, end)`` on new caches holding a stream's keys and values
    (as bench_fastvideo prefills them): the next block's outputs equal those of the stream that ran; without the
    seek that block is refused. Each layer's stream is a KVRing over its cache, at the newest block."""
    frame_len = env.frame_seq_length(HEIGHT, WIDTH)
    blocks = [1, 3, 3, 3]   # the last block rolls the window
    ran = accelerated(name, 1, "torch")
    cond = env.conditioning(ran, 1, 0)
    text_len = cond.pop("text_len")
    text = cond.pop("encoder_hidden_states")
    kv, cross = env.caches(ran, 1, frame_len, torch.float32, text_len)
    gen = torch.Generator().manual_seed(3)
    start = 0
    for frames in blocks[:-1]:
        _block_calls(ran, kv, cross, text, cond, frames, start, gen)
        start += frames
    for block, c in zip(ran.blocks, kv):
        s = skfv.stream(block.attn1, c, frame_len)
        assert (s.start, s.end) == ((start - blocks[-2]) * frame_len, start * frame_len)
        assert s.ring.k.data_ptr() == c["k"].data_ptr() and s.ring.v.data_ptr() == c["v"].data_ptr()
    filled = [{key: t.clone() for key, t in c.items()} for c in kv]
    state = gen.get_state()
    want = _block_calls(ran, kv, cross, text, cond, blocks[-1], start, gen)

    fresh = accelerated(name, 1, "torch")
    _, cross_2 = env.caches(fresh, 1, frame_len, torch.float32, text_len)
    with pytest.raises(ValueError, match="current_start: .* on a fresh kv_cache"):
        _block_calls(fresh, filled, cross_2, text, cond, blocks[-1], start, gen)
    for block, c in zip(fresh.blocks, filled):
        skfv.stream(block.attn1, c, frame_len).seek((start - blocks[-2]) * frame_len, start * frame_len)
    gen.set_state(state)
    got = _block_calls(fresh, filled, cross_2, text, cond, blocks[-1], start, gen)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"{name} call {i}"


def test_streams_go_with_their_caches_and_follow_accelerate():
    """A layer holds its streams weakly by the cache tensors (dropping a request's caches frees them); calling
    ``accelerate`` again sets the new backend on the streams it holds; a stream asked for with another frame length
    or after ``kv_cache["v"]`` was replaced is remade at the same position; a deep copy of the model starts with no
    stream; ``stream`` refuses a layer that was not patched."""
    import gc
    import weakref

    frame_len = env.frame_seq_length(HEIGHT, WIDTH)
    fast = accelerated("wan", 1, "torch")
    cond = env.conditioning(fast, 1, 0)
    kv, cross = env.caches(fast, 1, frame_len, torch.float32, cond.pop("text_len"))
    text = cond.pop("encoder_hidden_states")
    _block_calls(fast, kv, cross, text, cond, 1, 0, torch.Generator().manual_seed(0))
    attn = fast.blocks[0].attn1
    s = skfv.stream(attn, kv[0], frame_len)
    assert skfv.stream(attn, kv[0], frame_len) is s and (s.start, s.end, s.ring.backend) == (0, frame_len, "torch")
    skfv.accelerate(fast, backend="cpu", attention="sdpa")
    assert s.ring.backend == "cpu"
    other = skfv.stream(attn, kv[0], 2 * frame_len)   # another frame length: a new ring, at the same position
    assert other is not s and (other.start, other.end, other.frame_seqlen) == (0, frame_len, 2 * frame_len)
    kv[0]["v"] = kv[0]["v"].clone()                  # another v tensor: a ring over it
    s = skfv.stream(attn, kv[0], frame_len)
    assert (s.start, s.end) == (0, frame_len) and s.ring.v.data_ptr() == kv[0]["v"].data_ptr()
    copied = copy.deepcopy(fast)
    assert skfv.stream(copied.blocks[0].attn1, kv[0], frame_len).end == 0
    copied.blocks[0].attn1.sink_size = 0     # the copy's patch reads the copy's layer, not the original's
    assert skfv.stream(copied.blocks[0].attn1, kv[0], frame_len).ring.sink == 0
    assert skfv.stream(attn, kv[0], frame_len) is s and s.ring.sink == frame_len
    gone = weakref.ref(s)
    del s, kv, cross
    gc.collect()
    assert gone() is None, "a stream outlived its cache"
    with pytest.raises(TypeError, match="attn: expected a causal self-attention layer patched by accelerate"):
        skfv.stream(model("wan", 1).blocks[0].attn1, {"k": torch.zeros(1, 6, 2, 2), "v": torch.zeros(1, 6, 2, 2)},
                    frame_len)
    with pytest.raises(TypeError, match="kv_cache: expected a dict with 'k' and 'v' tensors"):
        skfv.stream(attn, {"k": None, "v": None}, frame_len)

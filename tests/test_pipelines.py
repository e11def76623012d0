"""The reference pipelines: every accelerated backend reproduces the eager source pipeline over a streamed run,
without host syncs in its hot loop; SpeculativeVAR's sample mode is distributed as plain target sampling."""
import math

import pytest
import torch
from scipy.stats import chi2

import streamkern
from conftest import backend_params
from streamkern.pipelines import (GatedPolicy, HostSyncError, MemoryBank, MemoryWorldModel, SpeculativeVAR,
                                  StreamingGenerator, count_host_syncs)
from streamkern.capture import host_read
from streamkern.pipelines.runtime import measure_parts
from streamkern.pipelines.speculative_var import guided
from streamkern.pipelines.world_model import MemoryBuffer, camera_trajectory
from streamkern.testing import assert_parity, rel_error

# (backend, device, eager): the op path on the ops' "torch" references, then every accelerated backend.
PATHS = [pytest.param(("torch", "cpu"), id="ops-torch-cpu")] + backend_params(exclude=("torch",))
ACCEL = backend_params(exclude=("torch",))


def _var_params(params):
    """SpeculativeVAR's matrix: whole decodes are far too slow for Triton's CPU interpreter (its ops have their
    own parity tests there; triton-cuda runs these on a GPU); block_masked_attention has no "cuda" backend by design,
    so on a GPU the pipeline also runs with "auto" (each op's fastest GPU backend)."""
    from streamkern.ops.block_masked_attention import block_masked_attention_op

    ATTENTION = block_masked_attention_op.backends

    slow = "Triton interpreter too slow for whole SpeculativeVAR decodes; covered by triton-cuda on a GPU"
    out = []
    for p in params:
        backend = p.values[0][0]
        if p.id == "triton-cpu":
            p = pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason=slow)])
        elif backend not in ATTENTION.impls:
            why = f"block_masked_attention has no {backend!r} backend: {(ATTENTION.missing or {}).get(backend)}"
            p = pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason=why)])
        out.append(p)
    gpu = [] if torch.cuda.is_available() else [pytest.mark.skip(reason="no CUDA device on this machine")]
    return out + [pytest.param(("auto", "cuda"), id="auto-cuda", marks=gpu)]


VAR_PATHS, VAR_ACCEL = _var_params(PATHS), _var_params(ACCEL)


def _no_interpreter(params, what):
    """Drop the Triton CPU interpreter from a matrix (too slow for the file's time budget; the op has its own
    interpreter tests and triton-cuda runs this on a GPU)."""
    why = f"Triton interpreter too slow for {what} within the test budget; triton-cuda covers it on a GPU"
    return [pytest.param(*p.values, id=p.id, marks=[pytest.mark.skip(reason=why)]) if p.id == "triton-cpu" else p
            for p in params]


def _paths(*ops, reference=True):
    """The op path on the "torch" references (``reference``) and every accelerated backend, skipped where one of
    ``ops`` lacks it."""
    ref = [pytest.param(("torch", "cpu"), id="ops-torch-cpu")] if reference else []
    return ref + backend_params(exclude=("torch",), ops=ops)


def _frame_ops():
    from streamkern.ops.frame_attention import frame_attention_op
    from streamkern.ops.frame_topk import frame_topk_op
    from streamkern.ops.frame_write import frame_write_op

    return frame_attention_op, frame_topk_op, frame_write_op


def _pair(cls, backend_device, run_args, **kw):
    backend, device = backend_device
    eager = cls(backend="torch", device=device, **kw).run(*run_args)
    accel = cls(backend=backend, eager=False, device=device, **kw).run(*run_args)
    return eager, accel


# --- host-sync counter -------------------------------------------------------------------------------------------


def test_sync_counter_sees_every_host_read_and_forbid_raises():
    t = torch.ones(3)
    with count_host_syncs() as count:
        t.sum().item()
        bool(t[0])
        int(t[1])
        t.tolist()
        host_read(t[2] > 0)
    assert count.by_kind == {"item": 1, "__bool__": 1, "__int__": 1, "tolist": 1, "decision": 1}
    assert count.total == 5
    with pytest.raises(HostSyncError, match="item"):
        with count_host_syncs(forbid=True):
            t.sum().item()
    with count_host_syncs(forbid=True) as count:
        assert host_read(t[0] > 0) is True
    assert count.total == 1
    bank = torch.zeros(1, 1, 2, 1, 1)
    with count_host_syncs(forbid=True) as count:   # an op's value check reads, booked apart from the total
        streamkern.bank_insert(bank, bank.clone(), torch.ones(1, 1, 2, 1, 1), torch.ones(1, 1, 2, 1, 1),
                               torch.tensor(0), torch.tensor(1), 1, backend="torch")
    assert count.total == 0 and count.by_kind and all(k.startswith("check:") for k in count.by_kind)
    assert "item" not in torch.Tensor.__dict__ and "__bool__" not in torch.Tensor.__dict__


# --- MemoryBank --------------------------------------------------------------------------------------------------


def _bank_by_frame(bank):
    """``{frame id of row 0: (k, v) of that frame}`` for comparing banks whose slot orders differ."""
    k, v = bank.kv()
    if bank.eager:
        ids = [bank.frame_archive[f].frame_id[0] for f in bank.frame_active_memory]
    else:
        ids = bank.frame_ids[:bank.count, 0].tolist()
    fsl = bank.frame_seq_len
    return {int(i): (k[:, :, n * fsl:(n + 1) * fsl], v[:, :, n * fsl:(n + 1) * fsl]) for n, i in enumerate(ids)}


@pytest.mark.parametrize("backend_device", PATHS)
def test_memory_bank_fills_evicts_and_matches_the_seed(backend_device):
    backend, device = backend_device
    NL, B, H, D, fsl, M, E = 4, 2, 2, 8, 5, 3, 5
    banks = [MemoryBank(NL, B, H, D, fsl, M, E, device=device, backend="torch"),
             MemoryBank(NL, B, H, D, fsl, M, E, device=device, backend=backend, eager=False)]
    g = torch.Generator().manual_seed(0)
    for step in range(10):
        F = 2 + step % 2
        chunk_k, chunk_v = (torch.randn(NL, B, F * fsl, H, D, generator=g).to(device) for _ in range(2))
        text_k = torch.randn(NL, B, 7, H, D, generator=g).to(device)
        weights = torch.rand(7, generator=g).to(device)
        entities = [step % E] if step % 3 else []
        for bank in banks:
            bank.insert(chunk_k, chunk_v, text_k, weights, entities, first_frame_id=10 * step)
    eager, accel = (_bank_by_frame(b) for b in banks)
    assert banks[1].count == M and sorted(eager) == sorted(accel)
    assert torch.equal(banks[0].held_frames(), banks[1].held_frames())
    for fid in eager:
        assert torch.equal(eager[fid][0].cpu(), accel[fid][0].cpu()) and torch.equal(eager[fid][1].cpu(),
                                                                                       accel[fid][1].cpu())


# --- StreamingGenerator ------------------------------------------------------------------------------------------

# window of 6 frames = 2 blocks, 1 sink frame, bank of 3: 12 blocks wrap the ring 5 times and evict 8 bank frames.
SMALL_STREAM = dict(num_layers=3, heads=2, head_dim=8, frame_seq_len=4, window_frames=6, sink_frames=1,
                    bank_size=3, text_len=8, text_dim=16, switch_every=3, steps=1)


FRAME_PATHS, FRAME_ACCEL = _paths(*_frame_ops()), _paths(*_frame_ops(), reference=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("backend_device", FRAME_PATHS)
def test_streaming_generator_matches_eager_over_a_long_stream(backend_device, dtype):
    if backend_device == ("triton", "cpu") and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only here (the ops' own tests cover every dtype)")
    eager, accel = _pair(StreamingGenerator, backend_device, (12,), dtype=dtype, **SMALL_STREAM)
    assert accel.outputs["frames"].shape == (12, 1, 12, 16) and accel.outputs["frames"].dtype == dtype
    assert_parity(accel.outputs["frames"], eager.outputs["frames"], dtype, "frames")
    assert torch.equal(accel.outputs["bank_frames"], eager.outputs["bank_frames"])
    assert accel.info["bank_count"] == 3 and len(eager.info["windows"]) == 3
    assert eager.info["windows"][0] != eager.info["windows"][1]      # near and far prompts get different windows


@pytest.mark.parametrize("backend_device", _no_interpreter(FRAME_PATHS, "a batch-2 sparse stream"))
def test_streaming_generator_sparse_activation_matches_eager_and_changes_the_frames(backend_device):
    """Top-2 of a 3-frame bank per head (MemFlow's gather, eager; ``frame_topk`` + per-head page tables); batch 2,
    so each row's bank keeps its own frames (pages swapped per row)."""
    kw = dict(SMALL_STREAM, batch=2)
    eager, accel = _pair(StreamingGenerator, backend_device, (10,), sparse_bank=2, **kw)
    assert_parity(accel.outputs["frames"], eager.outputs["frames"], torch.float32, "frames")
    assert torch.equal(accel.outputs["bank_frames"], eager.outputs["bank_frames"])
    dense = StreamingGenerator(**kw).run(10)
    assert torch.equal(dense.outputs["bank_frames"], eager.outputs["bank_frames"])
    assert rel_error(eager.outputs["frames"], dense.outputs["frames"]) > 1e-4     # the top-k does select


@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("attention", ["sdpa", "frame_attention"])
def test_streaming_generator_attention_kernels_match_eager(attention, sparse):
    """Both kernels that read StreamingKV's contiguous range (SDPA over the view, with the sparse bank merged by lse;
    frame_attention) reproduce MemFlow's eager cache, batch 2, on the C++ ops (the reference ops without them)."""
    backend = "cpu" if "cpu" in streamkern.available_backends("cpu") else "torch"
    kw = dict(SMALL_STREAM, batch=2, sparse_bank=sparse)
    eager = StreamingGenerator(**kw).run(9)
    accel = StreamingGenerator(backend=backend, attention=attention, **kw).run(9)
    assert_parity(accel.outputs["frames"], eager.outputs["frames"], torch.float32, "frames")
    assert torch.equal(accel.outputs["bank_frames"], eager.outputs["bank_frames"])


@pytest.mark.parametrize("sparse", [None, 2], ids=["dense", "sparse"])
@pytest.mark.parametrize("backend_device", _no_interpreter(FRAME_ACCEL, "a second stream"))
def test_streaming_generator_accelerated_loop_never_syncs(backend_device, sparse):
    backend, device = backend_device
    run = StreamingGenerator(backend=backend, device=device, sparse_bank=sparse, **SMALL_STREAM).run(
        7, forbid_syncs=True)
    assert run.step_syncs == [0] * 7     # blocks 3..6 evict into the bank, the ring wraps twice


def test_streaming_generator_eager_baseline_syncs_are_counted():
    run = StreamingGenerator(**SMALL_STREAM).run(9)
    assert run.step_syncs[0] == 0 and sum(run.step_syncs) >= 6    # argmax().item() per evicted chunk, switches


def test_streaming_generator_rejects_a_bad_sparse_bank_or_steps():
    with pytest.raises(ValueError, match="sparse_bank"):
        StreamingGenerator(sparse_bank=0, **SMALL_STREAM)
    with pytest.raises(ValueError, match="steps: expected a positive int"):
        StreamingGenerator(**dict(SMALL_STREAM, steps=0))


def test_replaced_parts_are_timed_with_their_bytes_and_are_smaller_in_place():
    """The demo's measure: the paged cache moves fewer bytes than clone + cat per step; parts are only timed
    inside ``measure_parts``."""
    with measure_parts() as eager_parts:
        StreamingGenerator(**SMALL_STREAM).run(6)
    with measure_parts() as paged_parts:
        StreamingGenerator(backend="torch", eager=False, **SMALL_STREAM).run(6)
    for parts in (eager_parts, paged_parts):
        assert {"cache", "memory attention", "eviction"} <= set(parts.seconds)
        assert all(t > 0 for t in parts.seconds.values())
    assert paged_parts.bytes["memory attention"] < eager_parts.bytes["memory attention"]
    assert sum(paged_parts.bytes.values()) < sum(eager_parts.bytes.values())


# --- MemoryWorldModel --------------------------------------------------------------------------------------------

# buffer of 10 frames, k = 4, 16-step trajectory cycles: A walk 0-4, B 5-7, back to A 8-11, C 12-15, then again.
SMALL_WORLD = dict(depth=4, heads=2, head_dim=8, frame_len=4, buffer_size=10, k=4, steps=1, trajectory_period=16)
WORLD_STEPS = 24


def _pose_ops():
    from streamkern.ops.pose_topk import pose_topk_op

    return (*_frame_ops(), pose_topk_op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend_device", _no_interpreter(_paths(*_pose_ops()), "a 24-step world-model run"))
def test_memory_world_model_matches_the_seed_buffer(backend_device, dtype):
    if backend_device == ("triton", "cpu") and dtype != torch.float32:
        pytest.skip("Triton interpreter: fp32 only here (the ops' own tests cover every dtype)")
    eager, accel = _pair(MemoryWorldModel, backend_device, (WORLD_STEPS,), dtype=dtype, **SMALL_WORLD)
    assert accel.outputs["frames"].shape == (WORLD_STEPS, 1, 4, 16) and accel.outputs["frames"].dtype == dtype
    assert_parity(accel.outputs["frames"], eager.outputs["frames"], dtype, "frames")
    for name in ("gates", "retrieved", "buffer"):
        assert torch.equal(accel.outputs[name], eager.outputs[name]), name
    gates, retrieved = eager.outputs["gates"], eager.outputs["retrieved"]
    assert not gates[0] and not gates[5] and not gates[12] and not gates[16]      # empty buffer, then each jump
    assert gates[1:5].all() and gates[8:12].all()
    assert (retrieved[1] == -1).sum() == 3 and (retrieved[3] == -1).sum() == 1    # k = 4 of 1, then of 3 frames
    assert set(retrieved[8].tolist()) <= set(range(5))                            # back in A: A's frames
    assert len(eager.outputs["buffer"]) == 10 and 1 not in eager.outputs["buffer"].tolist()   # evicted


@pytest.mark.parametrize("backend_device", _no_interpreter(_paths(*_pose_ops(), reference=False),
                                                          "a second world-model run"))
def test_memory_world_model_accelerated_loop_never_syncs(backend_device):
    backend, device = backend_device
    run = MemoryWorldModel(backend=backend, device=device, **SMALL_WORLD).run(14, forbid_syncs=True)
    assert run.step_syncs == [0] * 14


def test_memory_world_model_eager_baseline_reads_the_gate_on_the_host():
    run = MemoryWorldModel(**SMALL_WORLD).run(6)
    assert all(n >= 1 for n in run.step_syncs)                  # frame.cpu() into the buffer
    assert all(n > run.step_syncs[0] for n in run.step_syncs[1:])  # + the host-side gate and the retrieval loop


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "ops-torch"])
def test_memory_world_model_closed_gate_adds_nothing(eager):
    """Step 0 (empty buffer, gate closed) predicts exactly what the same model without memory layers predicts."""
    plain = MemoryWorldModel(memory_layers=(), **{k: v for k, v in SMALL_WORLD.items()}).run(1)
    hybrid = MemoryWorldModel(backend="torch", eager=eager, **SMALL_WORLD).run(1)
    assert not hybrid.outputs["gates"][0]
    assert torch.equal(hybrid.outputs["frames"], plain.outputs["frames"])


def test_memory_buffer_evicts_the_least_recently_used_frame():
    buf = MemoryBuffer(max_size=3)
    pose = torch.zeros(5)
    for i in range(3):
        buf.add(torch.full((2, 4), float(i)), pose + i, i)
    buf.touch([1, 0])                      # frames 1 then 0 used: order 2, 1, 0 (least recent first)
    buf.add(torch.zeros(2, 4), pose + 9, 3)
    assert buf.ids == [1, 0, 3]
    buf.add(torch.zeros(2, 4), pose + 9, 4)
    assert buf.ids == [0, 3, 4] and all(f.device.type == "cpu" for f in buf.frames)
    top, sims = buf.get_relevant_frames(pose + 8.5, k=8)       # k capped at the frames held
    assert [buf.ids[i] for i in top] in ([3, 4, 0], [4, 3, 0])  # 3 and 4 tie at 0.5 units
    assert len(sims) == 3


def test_camera_trajectory_jumps_and_revisits():
    poses = camera_trajectory(32, period=16)
    step = (poses[1:, :3] - poses[:-1, :3]).norm(dim=1)
    assert (step > 20).sum() == 7          # into B, back to A, into C, on to the next cycle; then again
    assert (poses[8, :3] - poses[4, :3]).norm() < 1.0     # the return to A passes its stored places
    assert (poses[11, :3] - poses[1, :3]).norm() < 1.0


# --- MemoryBank as a streamed pipeline ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend_device", PATHS)
def test_memory_bank_run_matches_the_seed(backend_device):
    backend, device = backend_device
    kw = dict(num_layers=3, batch=2, heads=2, head_dim=8, frame_seq_len=4, bank_size=3, num_entities=5)
    eager = MemoryBank(backend="torch", device=device, **kw).run(8)
    accel = MemoryBank(backend=backend, eager=False, device=device, **kw).run(8, forbid_syncs=True)
    assert torch.equal(accel.outputs["bank_frames"], eager.outputs["bank_frames"])
    assert torch.equal(accel.outputs["bank_k"], eager.outputs["bank_k"])
    assert torch.equal(accel.outputs["bank_v"], eager.outputs["bank_v"])
    assert accel.step_syncs == [0] * 8 and sum(eager.step_syncs) >= 8


# --- GatedPolicy -------------------------------------------------------------------------------------------------

SMALL_POLICY = dict(num_layers=18, heads=1, head_dim=16, text_tokens=2, denoise_steps=1)


@pytest.mark.parametrize("backend_device", _no_interpreter(PATHS, "an 18-layer policy episode"))
def test_gated_policy_matches_the_seed_gate(backend_device):
    eager, accel = _pair(GatedPolicy, backend_device, (8,), **SMALL_POLICY)
    assert torch.equal(accel.outputs["reasons"], eager.outputs["reasons"])
    assert set(eager.outputs["reasons"].tolist()) == {0, 1, 2, 3}    # reuse, state, vision, first all happen
    assert_parity(accel.outputs["actions"], eager.outputs["actions"], torch.float32, "actions")
    assert_parity(accel.outputs["drift"], eager.outputs["drift"], torch.float32, "drift")
    assert 0 < accel.info["reuse_rate"] < 1


@pytest.mark.parametrize("backend_device", _no_interpreter(ACCEL, "an 18-layer policy episode"))
def test_gated_policy_reads_only_its_decision(backend_device):
    backend, device = backend_device
    run = GatedPolicy(backend=backend, device=device, **SMALL_POLICY).run(3, forbid_syncs=True)
    assert run.step_syncs == [1] * 3


# --- SpeculativeVAR ----------------------------------------------------------------------------------------------

SMALL_VAR = dict(patch_nums=(1, 2, 3, 4, 5), vocab=16, depth=3, draft_depth=1, gamma=2)


@pytest.mark.parametrize("mode", ["greedy", "sample"])
@pytest.mark.parametrize("backend_device", VAR_PATHS)
def test_speculative_var_matches_eager(backend_device, mode):
    eager, accel = _pair(SpeculativeVAR, backend_device, (3,), mode=mode, batch=2, **SMALL_VAR)
    assert torch.equal(accel.outputs["tokens"], eager.outputs["tokens"])
    assert (accel.outputs["tokens"] >= 0).all()
    assert accel.info == eager.info and accel.info["target_calls_per_image"] < 5


@pytest.mark.parametrize("backend_device", VAR_ACCEL)
def test_speculative_var_reads_one_count_per_round(backend_device):
    backend, device = backend_device
    run = SpeculativeVAR(backend=backend, device=device, mode="sample", **SMALL_VAR).run(2, forbid_syncs=True)
    assert sum(run.step_syncs) == 2 * run.info["target_calls_per_image"]


def _exact_joint(sv, label):
    """Target probability of every image of layout (1, 2): ``[V] x [V]^4`` flattened to ``[V^5]``."""
    m, V = sv.model, sv.model.vocab
    labels = torch.full((V,), label, device=sv.device)
    tokens = torch.full((V, m.end[-1]), -1, device=sv.device)
    tokens[:, 0] = torch.arange(V, device=sv.device)
    p0 = torch.softmax(guided(m(tokens[:1], labels[:1], 1, sv._attend()), 0, 1, sv.cfg_t[0]), -1)[0, 0]
    p1 = torch.softmax(guided(m(tokens, labels, 2, sv._attend()), 1, 5, sv.cfg_t[1]), -1)   # [V, 4, V]
    joint = p0.double()
    for i in range(4):
        joint = (joint.reshape(V, -1, 1) * p1[:, i].double().reshape(V, 1, V)).reshape(V, -1)
    return joint.reshape(-1).cpu()


def _chi2_pvalue(tokens, probs, V):
    codes = (tokens * V ** torch.arange(tokens.shape[1] - 1, -1, -1)).sum(-1)
    observed = torch.bincount(codes, minlength=V ** tokens.shape[1]).double()
    expected = probs * len(codes)
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = ((obs - exp) ** 2 / exp).sum().item()
    return chi2.sf(stat, len(obs) - 1)


@pytest.mark.parametrize("backend_device", VAR_PATHS)
def test_speculative_var_sample_mode_is_distributed_as_the_target(backend_device):
    backend, device = backend_device
    n, V = 6000, 3
    sv = SpeculativeVAR(backend=backend, eager=False, device=device, mode="sample", patch_nums=(1, 2), vocab=V,
                        depth=2, draft_depth=1, gamma=2, batch=n, seed=3)
    with torch.no_grad():
        probs = _exact_joint(sv, label=0)
        gen = torch.Generator(device).manual_seed(11)
        stats = {"draft_calls": 0, "target_calls": 0}
        spec = sv.generate(torch.zeros(n, dtype=torch.int64, device=device), gen, stats).cpu()
        plain = sv.plain(torch.zeros(n, dtype=torch.int64, device=device), gen).cpu()
        draft_only = sv.plain(torch.zeros(n, dtype=torch.int64, device=device), gen, depth=sv.draft_depth).cpu()
    assert stats["target_calls"] >= 1 and (spec >= 0).all()
    assert _chi2_pvalue(spec, probs, V) > 1e-3
    assert _chi2_pvalue(plain, probs, V) > 1e-3           # plain target sampling, the same test
    assert _chi2_pvalue(draft_only, probs, V) < 1e-6      # the test tells the draft's distribution apart
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("backend_device", VAR_PATHS)
def test_speculative_var_sample_mode_one_image_at_a_time_is_distributed_as_the_target(backend_device):
    """Batch 1, so rounds that keep both drafted scales happen (a big batch almost always stops at its first
    rejected row): the accepted-then-next-scale path is lossless too."""
    backend, device = backend_device
    n, V = 1000, 2
    sv = SpeculativeVAR(backend=backend, eager=False, device=device, mode="sample", patch_nums=(1, 2), vocab=V,
                        depth=2, draft_depth=1, gamma=2, batch=1, seed=3)
    with torch.no_grad():
        probs = _exact_joint(sv, label=0)
        gen = torch.Generator(device).manual_seed(5)
        stats = {"draft_calls": 0, "target_calls": 0}
        labels = torch.zeros(1, dtype=torch.int64, device=device)
        spec = torch.cat([sv.generate(labels, gen, stats) for _ in range(n)]).cpu()
        draft_only = sv.plain(torch.zeros(n, dtype=torch.int64, device=device), gen, depth=sv.draft_depth).cpu()
    assert n < stats["target_calls"] < 2 * n       # both one-round and two-round images occurred
    assert _chi2_pvalue(spec, probs, V) > 1e-3
    assert _chi2_pvalue(draft_only, probs, V) < 1e-6

"""StreamingKV (docs/contract.md §4.5) over a long stream — sinks, window rolls, bank keeps, sparse activation — against
a reference that keeps the frames as tensors and concatenates them (MemFlow's way): equal attention outputs at
every step, through both attention kernels (SDPA over the contiguous view, frame_attention), and the same frames in
the bank; a bank keep copies exactly the kept frame into the victim's page; dense attention reads a view of the pool;
no host sync per chunk."""
import importlib

import pytest
import torch
from conftest import backend_params

import streamkern
from streamkern.capture import count_host_syncs
from streamkern.testing import assert_parity

NL, B, F, H, D = 2, 2, 3, 2, 8
LAYERS, WEIGHTS = (0, 1), (0.4, 0.6)
OPS = [getattr(importlib.import_module(f"streamkern.ops.{m}"), f"{m}_op")
       for m in ("frame_write", "frame_attention", "frame_topk")]


ALL = backend_params(exclude=("cuda",), ops=OPS)   # frame_attention has no "cuda" backend


class CatMemory:
    """The reference: sink frames, window frames and bank frames kept as ``[NL, B, F, H, D]`` tensors (a bank frame
    is a copy, as ``bank_insert`` makes), concatenated for every attention; the bank decisions by the same ops on
    the frames' tokens (``select_frame`` over the evicted chunk, ``bank_evict_select``), run by ``"torch"``."""

    def __init__(self, sink, window, bank, entities):
        self.sink, self.window, self.M = sink, window, bank
        self.sinks, self.recent = [], []                # lists of (stream id, k, v)
        self.bank = [None] * bank                        # (ids [B], k, v) per slot
        self.scores, self.valid = torch.zeros(bank), torch.zeros(bank, dtype=torch.bool)
        self.entities = torch.zeros(bank, entities, dtype=torch.bool)
        self.count = 0

    def roll(self, frames, text_k, weights, entities):
        to_window = frames - min(frames, self.sink - len(self.sinks))
        evict = max(0, len(self.recent) + to_window - self.window)
        if not evict:
            return 0
        gone, self.recent = self.recent[:evict], self.recent[evict:]
        if self.M:
            chunk_k = torch.cat([k for _, k, _ in gone], dim=2)
            best, scores = streamkern.select_frame(chunk_k, text_k, weights, F, LAYERS, WEIGHTS, backend="torch")
            slot = int(streamkern.bank_evict_select(self.scores, self.entities, self.valid, backend="torch"))
            pick = [gone[int(best[b])] for b in range(B)]
            self.bank[slot] = (torch.tensor([p[0] for p in pick]),
                               torch.stack([p[1][:, b] for b, p in enumerate(pick)], dim=1),
                               torch.stack([p[2][:, b] for b, p in enumerate(pick)], dim=1))
            self.scores[slot] = scores.gather(1, best[:, None]).mean()
            self.entities[slot] = torch.zeros(self.entities.shape[1], dtype=torch.bool)
            self.entities[slot, list(entities)] = True
            self.valid[slot] = True
        return evict

    def append(self, k, v):
        for i in range(k.shape[2] // F):
            frame = (self.count, k[:, :, i * F:(i + 1) * F], v[:, :, i * F:(i + 1) * F])
            (self.sinks if len(self.sinks) < self.sink else self.recent).append(frame)
            self.count += 1

    def attend(self, layer, q, new_k, new_v, topk=None):
        """Per (b, h), in float64: cat(sinks, window, bank frames (or the top-k by mean query · mean key), new)."""
        out = torch.zeros(q.shape, dtype=torch.float64)
        held = [s for s in self.bank if s is not None]
        qbar = q.double().mean(dim=1)                                   # [B, H, D]
        for b in range(B):
            for h in range(H):
                frames = [k[layer, b, :, h] for _, k, _ in self.sinks + self.recent]
                values = [v[layer, b, :, h] for _, _, v in self.sinks + self.recent]
                bank = [(s[1][layer, b, :, h], s[2][layer, b, :, h]) for s in held]
                if topk is not None:
                    score = torch.tensor([float(qbar[b, h] @ k.double().mean(0)) for k, _ in bank])
                    bank = [bank[i] for i in score.sort(descending=True, stable=True).indices[:topk].tolist()]
                keys = torch.cat(frames + [k for k, _ in bank] + [new_k[b, :, h]]).double()
                vals = torch.cat(values + [v for _, v in bank] + [new_v[b, :, h]]).double()
                p = torch.softmax(q[b, :, h].double() @ keys.T * D ** -0.5, dim=-1)
                out[b, :, h] = p @ vals
        return out

    def bank_ids(self):
        held = [s[0] if s is not None else torch.full((B,), -1) for s in self.bank]
        return torch.stack(held, dim=1) if held else torch.zeros(B, 0, dtype=torch.int64)


def _stream(steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for i in range(steps):
        frames = 3 if i % 4 != 3 else 1                                # chunks of 3 frames, now and then 1
        yield dict(
            k=torch.randn(NL, B, frames * F, H, D, generator=gen),
            v=torch.randn(NL, B, frames * F, H, D, generator=gen),
            q=torch.randn(B, 4, H, D, generator=gen), text_k=torch.randn(NL, B, 7, H, D, generator=gen),
            weights=torch.rand(7, generator=gen), entities=(i % 5, (i * 3) % 5), frames=frames)


def _run(bd, sink, window, bank, topk, steps, attention="auto"):
    device = bd[1]
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=sink, window_frames=window, bank_frames=bank,
                                 num_entities=5, layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32,
                                 device=device, backend=bd[0], attention=attention)
    ref = CatMemory(sink, window, bank, 5)
    empty = torch.zeros(B, 0, H, D)
    for step in _stream(steps):
        on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        before = skv.pool.k.clone(), skv.pool.v.clone()
        kept = ref.bank_ids()
        evicted = skv.roll(step["frames"], text_k=on["text_k"], entity_weights=on["weights"],
                           entities=step["entities"])
        assert evicted == ref.roll(step["frames"], step["text_k"], step["weights"], step["entities"])
        assert torch.equal(skv.bank_frame_ids.cpu(), ref.bank_ids())
        _check_keep_copied(skv, before, kept, ref.bank_ids())
        for layer in range(NL):
            for k in (None, topk):
                out = skv.attend(layer, on["q"], topk=k)      # the held frames only (no chunk written yet)
                assert_parity(out, ref.attend(layer, step["q"], empty, empty, k), torch.float32,
                              f"held frames, layer {layer}, topk {k}")
                new_k, new_v = on["k"][layer], on["v"][layer]
                out = skv.attend(layer, on["q"], new_k, new_v, topk=k)
                assert_parity(out, ref.attend(layer, step["q"], step["k"][layer], step["v"][layer], k),
                              torch.float32, f"step output, layer {layer}, topk {k}")
        skv.append(on["k"], on["v"])
        ref.append(step["k"], step["v"])
    return skv, ref


def _check_keep_copied(skv, before, old_ids, new_ids):
    """A roll writes nothing but the kept frame, copied (k, v, mean key) into the bank slot whose frame changed."""
    S, W = skv.S, skv.W
    expect_k, expect_v = before[0].clone(), before[1].clone()
    for slot in range(skv.M):
        for b in range(B):
            if int(new_ids[b, slot]) != int(old_ids[b, slot]):
                # the kept frame's ring slot: window frames are held in slots (stream index - S) mod W
                src = S + (int(new_ids[b, slot]) - S) % W
                expect_k[:, b, S + W + slot], expect_v[:, b, S + W + slot] = before[0][:, b, src], before[1][:, b, src]
                assert torch.equal(skv.pool.k_mean[:, b, S + W + slot], skv.pool.k_mean[:, b, src])
    assert torch.equal(skv.pool.k, expect_k.to(skv.pool.k.device)) and torch.equal(skv.pool.v, expect_v.to(
        skv.pool.v.device))


@pytest.mark.parametrize("attention", ["sdpa", "frame_attention"])
@pytest.mark.parametrize("bd", ALL)
def test_long_stream_matches_cat_reference(bd, attention):
    """Evictions of 2, 1, 3, 3 (, 3, 3, 2) frames: the bank of 3 fills at step 4 and is replaced from step 5 on
    (the interpreter runs the first 6 steps only)."""
    skv, ref = _run(bd, sink=1, window=6, bank=3, topk=2, steps=6 if bd[0] == "triton" else 9, attention=attention)
    assert skv.n_evicted >= 9 and bool(skv.bank_valid.all())


@pytest.mark.parametrize("attention", ["sdpa", "frame_attention"])
def test_stream_without_sinks_or_bank_and_with_topk_over_a_larger_bank(attention):
    _run(("torch", "cpu"), sink=0, window=3, bank=0, topk=0, steps=5, attention=attention)
    _run(("torch", "cpu"), sink=4, window=3, bank=4, topk=3, steps=7, attention=attention)


@pytest.mark.parametrize("bd", backend_params(exclude=("torch", "cuda"), ops=OPS))
def test_no_host_sync_per_chunk(bd, monkeypatch):
    """The whole chunk (roll, attention with and without top-k, append) reads no device value; the "cpu" backend's
    value checks are the only reads, and they are told apart."""
    monkeypatch.delenv("STREAMKERN_DEBUG", raising=False)
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=1, window_frames=3, bank_frames=2, num_entities=5,
                                 layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32, device=bd[1],
                                 backend=bd[0])
    for step in _stream(4):
        on = {k: v.to(bd[1]) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        with count_host_syncs(forbid=True) as count:
            skv.roll(step["frames"], text_k=on["text_k"], entity_weights=on["weights"], entities=step["entities"])
            skv.attend(1, on["q"], on["k"][1], on["v"][1], topk=1)
            skv.attend(0, on["q"], on["k"][0], on["v"][0])
            skv.append(on["k"], on["v"])
        assert count.total == 0, count.by_kind
    assert skv.n_evicted > 0 and bool(skv.bank_valid.any())


@pytest.mark.parametrize("bd", ALL)
def test_device_cursor_drives_the_ring(bd):
    """Ring slots, bank frame ids and page tables come from the device ``cursor``, not from the host count: a twin
    whose host ``n_evicted``/``count`` are wrong (as after graph replays) and whose entities are a device tensor
    keeps every device list, the pool and the attention outputs equal; ``sync_count`` reads the cursor back."""
    kw = dict(sink_frames=1, window_frames=4, bank_frames=2, num_entities=5, layers=LAYERS, layer_weights=WEIGHTS,
              dtype=torch.float32, device=bd[1], backend=bd[0])
    a, b = streamkern.StreamingKV(NL, B, F, H, D, **kw), streamkern.StreamingKV(NL, B, F, H, D, **kw)
    for i, step in enumerate(_stream(5 if bd[0] == "triton" else 8)):
        on = {k: v.to(bd[1]) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        b.n_evicted, b.count = b.n_evicted + 7 * i, 0
        ents = torch.tensor(step["entities"], device=bd[1])
        for skv, e in ((a, step["entities"]), (b, ents)):
            skv.roll(step["frames"], text_k=on["text_k"], entity_weights=on["weights"], entities=e)
        outs = [skv.attend(1, on["q"], on["k"][1], on["v"][1], topk=1) for skv in (a, b)]
        assert torch.equal(outs[0], outs[1]), f"step {i}: attention"
        for skv in (a, b):
            skv.append(on["k"], on["v"])
        for name in ("cursor", "window_pages", "bank_pages", "bank_valid", "bank_scores", "bank_entities",
                     "bank_frame_ids"):
            assert torch.equal(getattr(a, name), getattr(b, name)), f"step {i}: {name}"
        assert torch.equal(a.pool.k, b.pool.k) and torch.equal(a.pool.v, b.pool.v), f"step {i}: pool"
        assert int(a.cursor) == a.n_evicted
    assert a.n_evicted >= 6 and bool(a.bank_valid.all())
    assert b.sync_count() == a.count and b.n_evicted == a.n_evicted


def test_device_entities_are_checked(monkeypatch):
    skv = streamkern.StreamingKV(NL, B, F, H, D, window_frames=1, bank_frames=1, num_entities=5, layers=LAYERS,
                                 layer_weights=WEIGHTS, dtype=torch.float32)
    skv.append(torch.zeros(NL, B, F, H, D), torch.zeros(NL, B, F, H, D))
    text = dict(text_k=torch.zeros(NL, B, 2, H, D), entity_weights=torch.ones(2))
    with pytest.raises(TypeError, match="entities: expected dtype int64, got int32"):
        skv.roll(1, entities=torch.tensor([1], dtype=torch.int32), **text)
    with pytest.raises(ValueError, match="entities: expected a 1-d tensor"):
        skv.roll(1, entities=torch.tensor(1), **text)
    monkeypatch.setenv("STREAMKERN_DEBUG", "1")
    with pytest.raises(ValueError, match="entities: expected values in \\[0, 5\\), got min 1, max 5"):
        skv.roll(1, entities=torch.tensor([1, 5]), **text)
    assert skv.n_window == 1 and int(skv.cursor) == 0 and not bool(skv.bank_valid.any())    # nothing written
    monkeypatch.delenv("STREAMKERN_DEBUG")
    with count_host_syncs(forbid=True):
        assert skv.roll(1, entities=torch.tensor([1, 4]), **text) == 1
    assert skv.bank_entities[0].tolist() == [False, True, False, False, True] and int(skv.cursor) == 1


def test_bad_arguments():
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=0, window_frames=3, bank_frames=1, dtype=torch.float32)
    with pytest.raises(ValueError, match="k_new: expected a positive multiple of frame_len=3"):
        skv.append(torch.zeros(NL, B, 4, H, D), torch.zeros(NL, B, 4, H, D))
    skv.append(torch.zeros(NL, B, 9, H, D), torch.zeros(NL, B, 9, H, D))
    with pytest.raises(ValueError, match="k_new: 1 frames do not fit the window .* call roll\\(1\\) first"):
        skv.append(torch.zeros(NL, B, 3, H, D), torch.zeros(NL, B, 3, H, D))
    with pytest.raises(ValueError, match="text_k, entity_weights: expected tensors"):
        skv.roll(1)
    with pytest.raises(ValueError, match="frames: expected at most window_frames=3"):
        skv.roll(4)
    with pytest.raises(ValueError, match="entities\\[0\\]: expected an int in \\[0, 7\\]"):
        skv.roll(1, text_k=torch.zeros(NL, B, 2, H, D), entity_weights=torch.ones(2), entities=(9,))
    with pytest.raises(ValueError, match="q, layer: expected the query"):
        skv.page_table(topk=1)
    with pytest.raises(ValueError, match="window_frames: expected an int in \\[1"):
        streamkern.StreamingKV(NL, B, F, H, D, window_frames=0)
    with pytest.raises(ValueError, match="layers\\[1\\]: expected an int in \\[0, 1\\]"):
        streamkern.StreamingKV(NL, B, F, H, D, window_frames=2, layers=(0, 2), layer_weights=(0.5, 0.5))


@pytest.mark.parametrize("topk", [None, 2], ids=["dense", "sparse"])
def test_dense_attention_reads_one_view_of_the_pool(topk, monkeypatch):
    """With ``attention="sdpa"`` the sinks, the window (the chunk written into its ring pages first) and the bank
    are one range of pages: SDPA gets views of the pool's own storage, no gathered or concatenated copy; with
    ``topk`` the view is sinks + window and the picked bank pages go through ``frame_attention``."""
    import streamkern.streaming_kv as skv_module

    seen = []

    def spy(q, k, v, **kw):
        seen.append((k.untyped_storage().data_ptr(), v.untyped_storage().data_ptr(), k.shape[1]))
        return skv_module.view_attention.__wrapped__(q, k, v, **kw)

    spy.__wrapped__ = skv_module.view_attention
    monkeypatch.setattr(skv_module, "view_attention", spy)
    skv, _ = _run(("torch", "cpu"), sink=1, window=6, bank=3, topk=topk, steps=7, attention="sdpa")
    pool = (skv.pool.k.untyped_storage().data_ptr(), skv.pool.v.untyped_storage().data_ptr())
    assert seen and all(s[:2] == pool for s in seen)
    full = (skv.S + skv.W + (skv.M if topk is None else 0)) * F     # steady state: the whole range, one view
    assert seen[-1][2] == full


@pytest.mark.parametrize("attention", ["sdpa", "frame_attention"])
def test_nothing_outside_the_attended_pages_reaches_the_output(attention):
    """Free sink pages, ring slots not yet written and bank slots not yet filled hold NaN and ±inf (a pool made
    with torch.empty holds any bits): the outputs stay equal to the reference; a closed gate gives zeros and lse
    -inf on both kernels."""
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=2, window_frames=6, bank_frames=3, num_entities=5,
                                 layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32, attention=attention)
    for t in (skv.pool.k, skv.pool.v):
        t[..., 0::3, :, :] = float("nan")
        t[..., 1::3, :, :] = float("inf")
        t[..., 2::3, :, :] = float("-inf")
    ref = CatMemory(2, 6, 3, 5)
    gate = torch.tensor([True, False])
    for i, step in enumerate(_stream(6)):
        skv.roll(step["frames"], text_k=step["text_k"], entity_weights=step["weights"], entities=step["entities"])
        ref.roll(step["frames"], step["text_k"], step["weights"], step["entities"])
        out, lse = skv.attend(1, step["q"], step["k"][1], step["v"][1], gate=gate, return_lse=True)
        expect = ref.attend(1, step["q"], step["k"][1], step["v"][1])
        assert_parity(out[:1], expect[:1], torch.float32, f"step {i}, open row")
        assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == float("-inf")).all())
        assert bool(torch.isfinite(lse[0]).all())
        skv.append(step["k"], step["v"])
        ref.append(step["k"], step["v"])
    assert skv.n_bank == 3


def test_attend_checks_the_chunk():
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=1, window_frames=3, bank_frames=1, dtype=torch.float32)
    q = torch.zeros(B, 4, H, D)
    with pytest.raises(ValueError, match="new_k: expected a positive multiple of frame_len=3 tokens"):
        skv.attend(0, q, torch.zeros(B, 4, H, D), torch.zeros(B, 4, H, D))
    with pytest.raises(ValueError, match="new_k, new_v: expected both or neither"):
        skv.attend(0, q, torch.zeros(B, 3, H, D))
    skv.append(torch.zeros(NL, B, 12, H, D), torch.zeros(NL, B, 12, H, D))    # 1 sink + 3 window: full
    before = skv.pool.k.clone()
    with pytest.raises(ValueError, match="new_k: 1 frames do not fit the window .* call roll\\(1\\) first"):
        skv.attend(0, q, torch.ones(B, 3, H, D), torch.ones(B, 3, H, D))
    assert torch.equal(skv.pool.k, before)                                    # nothing written
    with pytest.raises(ValueError, match="attention: expected one of"):
        streamkern.StreamingKV(NL, B, F, H, D, window_frames=2, attention="flash")


def test_reduce_scores_decides_what_the_bank_keeps():
    """``reduce_scores`` (head parallelism's all-reduce) receives the ``[B, e]`` consensus scores of the evicted
    frames; the bank keeps the argmax of what it returns and records that score. Here it negates them: the bank
    keeps each row's worst frame."""
    seen = []

    def negate(scores):
        seen.append(scores.clone())
        return -scores

    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=1, window_frames=3, bank_frames=2, num_entities=5,
                                 layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32, reduce_scores=negate)
    plain = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=1, window_frames=3, bank_frames=2, num_entities=5,
                                   layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(NL, B, 4 * F, H, D, generator=gen), torch.randn(NL, B, 4 * F, H, D, generator=gen)
    text_k, weights = torch.randn(NL, B, 5, H, D, generator=gen), torch.rand(5, generator=gen)
    for kv in (skv, plain):
        kv.append(k, v)                                                   # 1 sink + 3 window frames: full
        assert kv.roll(3, text_k=text_k, entity_weights=weights, entities=(1,)) == 3   # frames 1, 2, 3 leave
    (scores,) = seen
    assert scores.shape == (B, 3) and scores.dtype == torch.float32
    worst, best = scores.argmin(dim=1), scores.argmax(dim=1)
    assert not torch.equal(worst, best)
    assert torch.equal(skv.bank_frame_ids[:, 0], 1 + worst) and torch.equal(plain.bank_frame_ids[:, 0], 1 + best)
    assert torch.equal(skv.bank_scores[0], -scores.gather(1, worst[:, None]).mean())
    assert torch.equal(plain.bank_scores[0], scores.gather(1, best[:, None]).mean())   # the hook saw these scores
    with pytest.raises(TypeError, match="reduce_scores: expected None or a function"):
        streamkern.StreamingKV(NL, B, F, H, D, window_frames=2, reduce_scores=1.0)


@pytest.mark.parametrize("attention", ["sdpa", "frame_attention"])
def test_attend_checks_everything_before_the_chunk_is_written(attention):
    """A bad query, gate, top-k or scale raises naming it and leaves the pool as it was (the chunk is written only
    once every argument is checked)."""
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=1, window_frames=3, bank_frames=1, dtype=torch.float32,
                                 attention=attention)
    k, v = torch.randn(B, 3, H, D), torch.randn(B, 3, H, D)
    q = torch.randn(B, 4, H, D)
    bad = [(dict(q=torch.randn(B, 4, H + 1, D)), ValueError, "q: expected shape"),
           (dict(q=q.double()), TypeError, "q: expected"),
           (dict(q=q, gate=torch.ones(B, dtype=torch.int64)), TypeError, "gate: expected dtype bool"),
           (dict(q=q, gate=torch.ones(B + 1, dtype=torch.bool)), ValueError, "gate: expected shape"),
           (dict(q=q, topk=-1), ValueError, "topk"),
           (dict(q=q, sm_scale=float("nan")), ValueError, "sm_scale")]
    before = skv.pool.k.clone(), skv.pool.v.clone(), skv.pool.k_mean.clone()
    for kwargs, error, message in bad:
        q_arg = kwargs.pop("q")
        with pytest.raises(error, match=message):
            skv.attend(0, q_arg, k, v, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(before, (skv.pool.k, skv.pool.v, skv.pool.k_mean)))

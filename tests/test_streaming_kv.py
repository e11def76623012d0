"""StreamingKV (DESIGN.md §4.5) over a long stream — sinks, window rolls, bank keeps, sparse activation — against
a reference that keeps the frames as tensors and concatenates them (MemFlow's way): equal attention outputs at
every step and the same frames in the bank; a bank keep moves no KV byte; no host sync per chunk."""
import importlib

import pytest
import torch
from conftest import backend_params

import streamkern
from streamkern.host_sync import count_host_syncs
from streamkern.testing import assert_parity

NL, B, F, H, D = 2, 2, 3, 2, 8
LAYERS, WEIGHTS = (0, 1), (0.4, 0.6)
OPS = [getattr(importlib.import_module(f"streamkern.{m}"), f"{m}_op")
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
            q=torch.randn(B, 4, H, D, generator=gen), new_k=torch.randn(B, 5, H, D, generator=gen),
            new_v=torch.randn(B, 5, H, D, generator=gen), text_k=torch.randn(NL, B, 7, H, D, generator=gen),
            weights=torch.rand(7, generator=gen), entities=(i % 5, (i * 3) % 5), frames=frames)


def _run(bd, sink, window, bank, topk, steps):
    device = bd[1]
    skv = streamkern.StreamingKV(NL, B, F, H, D, sink_frames=sink, window_frames=window, bank_frames=bank,
                                 num_entities=5, layers=LAYERS, layer_weights=WEIGHTS, dtype=torch.float32,
                                 device=device, backend=bd[0])
    ref = CatMemory(sink, window, bank, 5)
    for step in _stream(steps):
        on = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in step.items()}
        before = skv.pool.k.clone(), skv.pool.v.clone()
        evicted = skv.roll(step["frames"], text_k=on["text_k"], entity_weights=on["weights"],
                           entities=step["entities"])
        assert evicted == ref.roll(step["frames"], step["text_k"], step["weights"], step["entities"])
        assert torch.equal(skv.pool.k, before[0]) and torch.equal(skv.pool.v, before[1])   # no KV byte moved
        assert torch.equal(skv.bank_frame_ids.cpu(), ref.bank_ids())
        for layer in range(NL):
            for k in (None, topk):
                out = skv.attend(layer, on["q"], on["new_k"], on["new_v"], topk=k)
                assert_parity(out, ref.attend(layer, step["q"], step["new_k"], step["new_v"], k), torch.float32,
                              f"step output, layer {layer}, topk {k}")
        skv.append(on["k"], on["v"])
        ref.append(step["k"], step["v"])
    return skv, ref


@pytest.mark.parametrize("bd", ALL)
def test_long_stream_matches_cat_reference(bd):
    """Evictions of 2, 1, 3, 3 (, 3, 3, 2) frames: the bank of 3 fills at step 4 and is replaced from step 5 on
    (the interpreter runs the first 6 steps only)."""
    skv, ref = _run(bd, sink=1, window=6, bank=3, topk=2, steps=6 if bd[0] == "triton" else 9)
    assert skv.n_evicted >= 9 and bool(skv.bank_valid.all())


def test_stream_without_sinks_or_bank_and_with_topk_over_a_larger_bank():
    _run(("torch", "cpu"), sink=0, window=3, bank=0, topk=0, steps=5)
    _run(("torch", "cpu"), sink=4, window=3, bank=4, topk=3, steps=7)


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
            skv.attend(1, on["q"], on["new_k"], on["new_v"], topk=1)
            skv.attend(0, on["q"], on["new_k"], on["new_v"])
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
        outs = [skv.attend(1, on["q"], on["new_k"], on["new_v"], topk=1) for skv in (a, b)]
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

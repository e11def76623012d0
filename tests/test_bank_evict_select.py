"""bank_evict_select (docs/contract.md §4.2, seed 000 §2.3): exhaustively against the seed's Python rule on small banks,
randomly against the float64 torch reference on large ones, NaN/±0 conventions, strides, bad input, no host
sync, opcheck and torch.compile."""
import itertools

import pytest
import torch

import streamkern
from streamkern.ops.bank_evict_select import MAX_ENTITIES, MAX_SLOTS, bank_evict_select_op
from streamkern.pipelines import count_host_syncs
from streamkern.ops.reference import bank_evict_select as ref

from conftest import assert_raises_untouched, backend_params

# Exhaustive sizes per backend: (max M, max E); the Triton interpreter is slow, so it sees the smaller product.
EXHAUSTIVE = {"torch": (4, 3), "cpu": (4, 3), "cuda": (4, 3), "triton": (3, 2)}


def _all_masks(M, E):
    """``[2**(M*E), M, E]`` bool: every entity mask of an M-slot, E-entity bank."""
    bits = torch.arange(2 ** (M * E)).unsqueeze(1) >> torch.arange(M * E)
    return (bits & 1).bool().reshape(2 ** (M * E), M, E)


def _expected_from_seed(scores, mask, valid):
    """The op's answer from the seed's rule: the evicted slot, or the first empty slot when the seed says 'not full'."""
    victim = ref.seed_select_frame_to_evict(scores, mask, valid)
    return valid.tolist().index(False) if victim is None else victim


def _cases(M, E, gen):
    """(mask, valid) pairs: every mask of a full bank (the seed's rule proper), and every validity pattern with a
    hole, each with every mask when M*E <= 8, else with 16 random masks (the answer cannot depend on the mask)."""
    masks = _all_masks(M, E)
    full = torch.ones(M, dtype=torch.bool)
    yield from ((mask, full) for mask in masks)
    for valid_bits in range(2 ** M - 1):
        valid = ((torch.tensor(valid_bits) >> torch.arange(M)) & 1).bool()
        some = masks if M * E <= 8 else masks[torch.randint(0, len(masks), (16,), generator=gen)]
        yield from ((mask, valid) for mask in some)


@pytest.mark.parametrize("bd", backend_params())
def test_exhaustive_against_seed(bd):
    """Banks with M <= 4 slots and E <= 3 entities (Triton: 3 and 2): every mask, every validity pattern,
    scores drawn from three values so that ties are common."""
    b, d = bd
    max_m, max_e = EXHAUSTIVE[b]
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for M, E in itertools.product(range(1, max_m + 1), range(0, max_e + 1)):
        for mask, valid in _cases(M, E, gen):
            scores = torch.randint(0, 3, (M,), generator=gen).float()     # few values: many ties
            want = _expected_from_seed(scores, mask, valid)
            got = streamkern.bank_evict_select(scores.to(d), mask.to(d), valid.to(d), backend=b)
            assert got.dtype == torch.int64 and got.shape == () and got.device.type == d
            assert int(got) == want, (M, E, scores.tolist(), mask.tolist(), valid.tolist(), int(got), want)
            checked += 1
    full = {(M, E): 2 ** (M * E) for M in range(1, max_m + 1) for E in range(max_e + 1)}
    holes = {(M, E): (2 ** M - 1) * (n if M * E <= 8 else 16) for (M, E), n in full.items()}
    assert checked == sum(full.values()) + sum(holes.values())


def _random_bank(M, E, gen, density):
    scores = torch.randint(-4, 5, (M,), generator=gen).float() * 0.25 + torch.rand(M, generator=gen) * (
        torch.rand(M, generator=gen) < 0.5)
    mask = torch.rand(M, E, generator=gen) < density
    valid = torch.ones(M, dtype=torch.bool)
    return scores, mask, valid


LARGE = [pytest.param(M, E, id=f"M{M}-E{E}") for M, E in [(1, 0), (2, 1), (7, 13), (37, 5), (64, 256), (64, 1),
                                                             (13, 255), (6, 16)]]


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("M,E", LARGE)
def test_random_against_reference(bd, dtype, M, E):
    """Random banks (sparse to dense masks, tied scores, full or with holes) vs the torch reference in float64."""
    b, d = bd
    gen = torch.Generator().manual_seed(M * 1000 + E)
    for trial in range(6):
        scores, mask, valid = _random_bank(M, E, gen, density=(0.02, 0.1, 0.3, 0.6, 0.9, 0.1)[trial])
        if trial == 5:
            valid = torch.rand(M, generator=gen) < 0.8
        scores = scores.to(dtype)
        want = ref.bank_evict_select(scores.double(), mask, valid)
        got = streamkern.bank_evict_select(scores.to(d), mask.to(d), valid.to(d), backend=b)
        assert got.item() == want.item(), (trial, got, want)


@pytest.mark.parametrize("bd", backend_params())
def test_non_contiguous(bd):
    """Strided scores/valid and a transposed mask give the same slot as their contiguous copies."""
    b, d = bd
    gen = torch.Generator().manual_seed(3)
    M, E = 23, 41
    for trial in range(4):
        scores = torch.randint(0, 4, (2 * M,), generator=gen).float().to(d)[::2]
        mask = (torch.rand(E, M, generator=gen) < 0.15).to(d).t()
        valid = torch.ones(2 * M, dtype=torch.bool, device=d)[1::2]
        if trial == 3:
            valid = valid.clone()
            valid[17] = False
            valid = torch.stack([valid, valid], 1)[:, 0]
        assert not (scores.is_contiguous() or mask.is_contiguous())
        want = ref.bank_evict_select(scores.double().contiguous(), mask.contiguous(), valid.contiguous())
        got = streamkern.bank_evict_select(scores, mask, valid, backend=b)
        assert got.item() == want.item()


NAN = float("nan")
INF = float("inf")
# (scores, mask rows, valid, expected slot, why)
SPECIAL = [
    ([NAN, 2.0, 1.0], [[1], [1], [1]], None, 2, "NaN is never the lowest score"),
    ([NAN, NAN, NAN], [[1], [1], [1]], None, 0, "all candidates NaN: the lowest index"),
    ([1.0, NAN, 0.5], [[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]], None, 1, "only redundant slot is NaN: chosen"),
    ([NAN, 3.0, NAN], [[], [], []], None, 1, "no entities: every slot redundant"),
    ([INF, NAN, INF], [[1], [1], [1]], None, 0, "+inf below NaN, tie to the lowest index"),
    ([0.0, -0.0, -INF], [[1], [0], [0]], None, 2, "redundant slots 1, 2; -inf lowest"),
    ([0.0, -0.0, 5.0], [[1], [1], [1]], None, 0, "-0.0 == +0.0: tie to the lowest index"),
    ([-0.0, 0.0, 5.0], [[1], [1], [1]], None, 0, "-0.0 == +0.0: tie to the lowest index"),
    ([5.0, 1.0, 2.0], [[1], [1], [1]], [True, False, False], 1, "first invalid slot"),
    ([NAN, NAN], [[1], [1]], [True, True], 0, "all NaN, all redundant"),
]


@pytest.mark.parametrize("bd", backend_params())
@pytest.mark.parametrize("case", SPECIAL, ids=[c[4] for c in SPECIAL])
def test_nan_inf_signed_zero(bd, case):
    b, d = bd
    scores, rows, valid, expected, _ = case
    M = len(scores)
    E = max(len(r) for r in rows)
    mask = torch.tensor([r + [0] * (E - len(r)) for r in rows], dtype=torch.bool).reshape(M, E)
    valid = torch.ones(M, dtype=torch.bool) if valid is None else torch.tensor(valid)
    scores = torch.tensor(scores)
    assert ref.bank_evict_select(scores.double(), mask, valid).item() == expected
    assert streamkern.bank_evict_select(scores.to(d), mask.to(d), valid.to(d), backend=b).item() == expected


@pytest.mark.parametrize("bd", backend_params(exclude=("torch",)))
def test_no_host_sync(bd):
    """The accelerated call never reads a tensor back: every host read raises inside it."""
    b, d = bd
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5], device=d)
    mask = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=torch.bool, device=d)
    valid = torch.ones(4, dtype=torch.bool, device=d)

    with count_host_syncs(forbid=True):
        got = streamkern.bank_evict_select(scores, mask, valid, backend=b)
    assert got.item() == 3


BAD = [
    (lambda s, m, v: (s.double(), m, v), TypeError, "scores"),
    (lambda s, m, v: (s.long(), m, v), TypeError, "scores"),
    (lambda s, m, v: (s[None], m, v), ValueError, "scores"),
    (lambda s, m, v: (s, m.float(), v), TypeError, "entity_mask"),
    (lambda s, m, v: (s, m[0], v), ValueError, "entity_mask"),
    (lambda s, m, v: (s, m[:-1], v), ValueError, "entity_mask"),
    (lambda s, m, v: (s, m, v.int()), TypeError, "valid"),
    (lambda s, m, v: (s, m, v[:-1]), ValueError, "valid"),
    (lambda s, m, v: (s[:0], m[:0], v[:0]), ValueError, "scores"),
    (lambda s, m, v: (torch.zeros(MAX_SLOTS + 1), torch.zeros(MAX_SLOTS + 1, 2, dtype=torch.bool),
                      torch.ones(MAX_SLOTS + 1, dtype=torch.bool)), ValueError, "scores"),
    (lambda s, m, v: (s, torch.zeros(3, MAX_ENTITIES + 1, dtype=torch.bool), v), ValueError, "entity_mask"),
    (lambda s, m, v: (s, m.to("meta"), v), ValueError, "entity_mask"),
    ("not a tensor", TypeError, "scores"),
]


@pytest.mark.parametrize("make,exc,name", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input(make, exc, name):
    s = torch.tensor([1.0, 2.0, 3.0])
    m = torch.tensor([[1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    v = torch.ones(3, dtype=torch.bool)
    args = (s.tolist(), m, v) if isinstance(make, str) else make(s, m, v)
    assert_raises_untouched(streamkern.bank_evict_select, args, exc, name)


def test_unavailable_backend_raises():
    args = (torch.ones(2), torch.ones(2, 1, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    with pytest.raises(streamkern.BackendUnavailable, match="cuda"):
        streamkern.bank_evict_select(*args, backend="cuda")


@pytest.mark.parametrize("bd", backend_params())
def test_opcheck(bd):
    b, d = bd
    args = (torch.tensor([0.3, 0.1, 0.2], device=d), torch.tensor([[1, 0], [1, 1], [0, 1]], dtype=torch.bool,
                                                                    device=d),
            torch.ones(3, dtype=torch.bool, device=d), b)
    torch.library.opcheck(bank_evict_select_op.custom_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("bd", backend_params(exclude=("triton",)))
def test_torch_compile_fullgraph(bd):
    """A pipeline step that picks the victim and zeroes its score compiles without graph breaks. (The backend is
    named: resolving ``backend=None`` reads a ContextVar, which dynamo cannot trace yet.)"""
    b, d = bd

    def step(scores, mask, valid):
        slot = streamkern.bank_evict_select(scores, mask, valid, backend=b)
        return slot, scores.index_fill(0, slot.reshape(1), 0.0)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    scores = torch.tensor([0.9, 0.2, 0.4, 0.1], device=d)
    mask = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 0]], dtype=torch.bool, device=d)
    valid = torch.ones(4, dtype=torch.bool, device=d)
    slot, new = compiled(scores, mask, valid)
    want_slot, want_new = step(scores, mask, valid)
    assert slot.item() == want_slot.item() == 3
    assert torch.equal(new, want_new)

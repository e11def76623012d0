"""One small case per op for the GPU checks (tests/test_gpu.py, bench/gpu_smoke.py): static inputs, the call on a
backend, its "torch" reference, and an in-place refill of the inputs for CUDA-graph replays.

``CASES[name](device, backend)`` returns an :class:`OpCase`. ``run()`` calls the op on the case's static inputs and
returns its outputs (mutated caches included), ``reference()`` computes the same with ``backend="torch"`` on copies
(call it before ``run`` when the op mutates its inputs), ``refill(seed)`` writes new values into the static inputs
in place (all but the names starting with ``_``), so that a graph captured over ``run`` sees them on its next
replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import streamkern as sk


@dataclass
class OpCase:
    name: str        # the op under test (``streamkern.<module>.<name>_op`` declares its backends)
    inputs: dict
    call: Callable[[dict, str], tuple]
    backend: str
    mutated: tuple = ()   # input names the op writes (references run on copies of them)
    exact: tuple = ()     # output positions compared exactly (indices, booleans)
    input_dtype: torch.dtype = torch.float32   # sets the parity tolerance
    launches: int = 1     # kernel launches of a steady-state call on the GPU backends, as the op is designed

    @property
    def device(self) -> torch.device:
        return next(v for v in self.inputs.values() if isinstance(v, torch.Tensor)).device

    def run(self) -> tuple:
        return self.call(self.inputs, self.backend)

    def reference(self) -> tuple:
        copies = {k: (v.clone() if k in self.mutated else v) for k, v in self.inputs.items()}
        return self.call(copies, "torch")

    def refill(self, seed: int) -> None:
        g = torch.Generator(device=self.device).manual_seed(seed)
        for name, t in self.inputs.items():
            if not isinstance(t, torch.Tensor) or name.startswith("_"):
                continue
            if t.dtype == torch.bool:
                t.copy_(torch.rand(t.shape, generator=g, device=t.device) < 0.7)
            elif t.dtype == torch.int64:
                t.copy_(torch.randint(0, int(self.inputs[f"_{name}_high"]), t.shape, generator=g, device=t.device))
            else:
                t.copy_(torch.rand(t.shape, generator=g, device=t.device, dtype=torch.float32).to(t.dtype))


def _rand(g, *shape, dtype=torch.float32, device="cuda"):
    return torch.rand(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def _gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


def consensus(device, backend):
    g = _gen(device)
    x = dict(chunk_k=_rand(g, 4, 2, 6 * 8, 2, 16, dtype=torch.bfloat16, device=device),
             text_k=_rand(g, 4, 2, 12, 2, 16, dtype=torch.bfloat16, device=device),
             w=_rand(g, 12, device=device))
    return OpCase("select_frame", x, lambda i, b: sk.select_frame(i["chunk_k"], i["text_k"], i["w"], 8,
                                                                  (0, 2, 3), (0.2, 0.3, 0.5), backend=b),
                  backend, exact=(0,), input_dtype=torch.bfloat16,
                  launches=3)   # zero fill of the scores (the kernel's splits add into them), kernel, argmax


def bank_evict(device, backend):
    g = _gen(device)
    x = dict(scores=_rand(g, 37, device=device), mask=_rand(g, 37, 11, device=device) < 0.3,
             valid=_rand(g, 37, device=device) < 0.9)
    return OpCase("bank_evict_select", x, lambda i, b: (sk.bank_evict_select(i["scores"], i["mask"], i["valid"],
                                                                             backend=b),), backend, exact=(0,))


def bank_insert(device, backend):
    g = _gen(device)
    x = dict(bank_k=_rand(g, 3, 2, 5 * 4, 2, 8, device=device), bank_v=_rand(g, 3, 2, 5 * 4, 2, 8, device=device),
             chunk_k=_rand(g, 3, 2, 3 * 4, 2, 8, device=device), chunk_v=_rand(g, 3, 2, 3 * 4, 2, 8, device=device),
             frame_idx=torch.tensor([2, 0], device=device), slot=torch.tensor([4, 1], device=device),
             _frame_idx_high=3, _slot_high=5)

    def call(i, b):
        sk.bank_insert(i["bank_k"], i["bank_v"], i["chunk_k"], i["chunk_v"], i["frame_idx"], i["slot"], 4, backend=b)
        return i["bank_k"], i["bank_v"]

    return OpCase("bank_insert", x, call, backend, mutated=("bank_k", "bank_v"))


def pose_topk(device, backend):
    g = _gen(device)
    x = dict(poses=_rand(g, 50, 6, device=device) * 20, valid=_rand(g, 50, device=device) < 0.8,
             current=_rand(g, 6, device=device) * 20)
    return OpCase("pose_topk", x, lambda i, b: sk.pose_topk(i["poses"], i["valid"], i["current"], 8, backend=b),
                  backend, exact=(0,))


def patch_importance(device, backend):
    g = _gen(device)
    x = dict(attn=_rand(g, 4, 2, 2, 30, 30, dtype=torch.bfloat16, device=device))
    return OpCase("patch_importance", x, lambda i, b: (sk.patch_importance(i["attn"], (1, 3), 16, 5, (4, 4),
                                                                           backend=b),), backend,
                  input_dtype=torch.bfloat16, launches=2)   # per-split partial sums, then their fixed-order sum


def weighted_drift(device, backend):
    g = _gen(device)
    x = dict(image=_rand(g, 2, 3, 64, 48, device=device), prev=_rand(g, 2, 3, 8, 6, device=device),
             importance=_rand(g, 2, 4, 4, device=device))
    return OpCase("attention_weighted_drift", x,
                  lambda i, b: sk.attention_weighted_drift(i["image"], i["prev"], i["importance"], 8, 5, backend=b),
                  backend)


def drift_gate(device, backend):
    """``should_recompute`` of a gate that has seen one frame (the gate and its torch twin share that frame)."""
    g = _gen(device)
    first, state = _rand(g, 3, 3, 64, 64, device=device), _rand(g, 3, 7, device=device)
    attn = _rand(g, 2, 3, 1, 16 + 5, 16 + 5, device=device).softmax(-1)
    gates = {}
    for b in {backend, "torch"}:
        gates[b] = sk.DriftGate(0.05, 0.5, 5, 8, (0, 2), 16, 5, (4, 4), backend=b)
        gates[b].should_recompute(first, state)
        gates[b].update(first, attn, state, None)
    x = dict(image=first.clone(), state=state.clone())
    return OpCase("DriftGate.should_recompute", x,
                  lambda i, b: gates[b].should_recompute(i["image"], i["state"]), backend, exact=(0, 1))


def attention(device, backend):
    g = _gen(device)
    layout = sk.scale_layout((1, 2, 3, 4))
    ids = layout.scale_of_token.to(device)
    x = dict(q=_rand(g, 2, 3, layout.total, 16, dtype=torch.float16, device=device),
             k=_rand(g, 2, 3, layout.total, 16, dtype=torch.float16, device=device),
             v=_rand(g, 2, 3, layout.total, 16, dtype=torch.float16, device=device))
    allow = sk.scale_allow(4).to(device)
    return OpCase("block_masked_attention", x,
                  lambda i, b: (sk.block_masked_attention(i["q"], i["k"], i["v"], ids, ids, allow, backend=b),),
                  backend, input_dtype=torch.float16, launches=2)   # the visit lists, then the attention


def frame_write(device, backend):
    g = _gen(device)
    x = dict(pool_k=_rand(g, 2, 2, 5, 3, 2, 8, device=device), pool_v=_rand(g, 2, 2, 5, 3, 2, 8, device=device),
             k_mean=_rand(g, 2, 2, 5, 2, 8, device=device), k_new=_rand(g, 2, 2, 2 * 3, 2, 8, device=device),
             v_new=_rand(g, 2, 2, 2 * 3, 2, 8, device=device),
             _pages=torch.tensor([[4, 1], [0, 3]], device=device))   # "_": kept by refill (ids distinct per row)

    def call(i, b):
        sk.frame_write(i["pool_k"], i["pool_v"], i["k_mean"], i["k_new"], i["v_new"], i["_pages"], backend=b)
        return i["pool_k"], i["pool_v"], i["k_mean"]

    return OpCase("frame_write", x, call, backend, mutated=("pool_k", "pool_v", "k_mean"))


def frame_attention(device, backend):
    g = _gen(device)
    x = dict(q=_rand(g, 2, 5, 2, 16, dtype=torch.float16, device=device),
             k_pages=_rand(g, 2, 6, 4, 2, 16, dtype=torch.float16, device=device),
             v_pages=_rand(g, 2, 6, 4, 2, 16, dtype=torch.float16, device=device),
             new_k=_rand(g, 2, 5, 2, 16, dtype=torch.float16, device=device),
             new_v=_rand(g, 2, 5, 2, 16, dtype=torch.float16, device=device))
    table = torch.tensor([[5, -1, 0], [2, 3, 1]], device=device)
    return OpCase("frame_attention", x, lambda i, b: sk.frame_attention(
        i["q"], i["k_pages"], i["v_pages"], table, new_k=i["new_k"], new_v=i["new_v"], return_lse=True, backend=b),
        backend, input_dtype=torch.float16)


def frame_topk(device, backend):
    g = _gen(device)
    x = dict(q=_rand(g, 2, 5, 2, 16, device=device), k_mean=_rand(g, 2, 9, 2, 16, device=device))
    candidates = torch.tensor([[8, 0, -1, 3, 5], [1, 2, 4, 6, 7]], device=device)
    return OpCase("frame_topk", x, lambda i, b: (sk.frame_topk(i["q"], i["k_mean"], candidates, 3, backend=b),),
                  backend, exact=(0,))


def verify(device, backend):
    g = _gen(device)
    layout = sk.scale_layout((1, 2, 3, 4))
    T, V = layout.total, 33
    x = dict(logits=_rand(g, 4, T, V, device=device) * 4, draft=torch.randint(0, V, (2, T), generator=g,
                                                                                   device=device), _draft_high=V)
    return OpCase("verify_scales", x, lambda i, b: tuple(sk.verify_scales(i["logits"], i["draft"], layout, 0, 4,
                                                                          cfg=[1.5, 1.0, 0.5, 0.25], backend=b)),
                  backend, exact=(0, 1, 3), launches=2)   # greedy: per-row matches, then the per-scale decisions


CASES: dict[str, Callable[[str, str], OpCase]] = {
    "select_frame": consensus, "bank_evict_select": bank_evict, "bank_insert": bank_insert, "pose_topk": pose_topk,
    "patch_importance": patch_importance, "attention_weighted_drift": weighted_drift, "drift_gate": drift_gate,
    "block_masked_attention": attention, "verify_scales": verify, "frame_write": frame_write,
    "frame_attention": frame_attention, "frame_topk": frame_topk,
}
# the declared op (streamkern.<module>.<op>_op) whose backends each case exercises
OPS = {"select_frame": "consensus_frame_scores.consensus_frame_scores",
       "bank_evict_select": "bank_evict_select.bank_evict_select",
       "bank_insert": "bank_insert.bank_insert", "pose_topk": "pose_topk.pose_topk",
       "patch_importance": "drift_gate.patch_importance",
       "attention_weighted_drift": "drift_gate.attention_weighted_drift", "drift_gate": "drift_gate.drift_gate_step", "block_masked_attention": "block_masked_attention.block_masked_attention",
       "verify_scales": "verify_scales.verify_scales", "frame_write": "frame_write.frame_write",
       "frame_attention": "frame_attention.frame_attention", "frame_topk": "frame_topk.frame_topk"}


def has_backend(case: str, backend: str) -> bool:
    import importlib

    module, op = OPS[case].split(".")
    return backend in getattr(importlib.import_module(f"streamkern.ops.{module}"), f"{op}_op").backends.impls


def pairs(backends=("triton", "cuda")) -> list[tuple[str, str]]:
    """``(case, backend)`` for every case and accelerated backend that its op implements."""
    return [(c, b) for c in CASES for b in backends if has_backend(c, b)]


def compare(case: OpCase, out: tuple, ref: tuple, what: str = "") -> None:
    """Outputs equal the reference: exactly at the case's ``exact`` positions, else within the parity metric."""
    from streamkern.testing import assert_parity

    what = f"{case.name} [{case.backend}]{' ' + what if what else ''}"
    assert len(out) == len(ref), what
    for i, (o, r) in enumerate(zip(out, ref)):
        if i in case.exact or not o.is_floating_point():
            assert torch.equal(o, r), f"{what}: output {i} differs from the torch reference"
        else:
            assert_parity(o, r.double(), case.input_dtype, f"{what}: output {i}")


def check_eager(case: OpCase) -> None:
    ref = case.reference()
    compare(case, case.run(), ref, "eager")


def check_launches(case: OpCase) -> None:
    """A steady-state call (after one that compiles and makes the device tables) launches ``case.launches``
    kernels: no fill, copy, conversion or small tensor made per call beside the op's own kernels. On CPU (Triton's
    interpreter) the count is of the operators and Triton launches that do work (``streamkern.testing``)."""
    from streamkern.testing import launch_names

    names = launch_names(case.run, device=case.device, warmup=True)
    assert len(names) == case.launches, (f"{case.name} [{case.backend}]: {len(names)} launches per call, designed "
                                         f"{case.launches}: {names}")


def check_no_sync(case: OpCase) -> None:
    """A warmed-up call under ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises."""
    case.run()
    torch.cuda.synchronize(case.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        case.run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_graph(case: OpCase, replays: int = 3) -> None:
    """Capture one call after a warm-up (a CUDA graph, or on CPU the recorded replay of ``StepGraph``), then
    replay it on refilled inputs against eager torch."""
    from streamkern.step_graph import StepGraph

    graph = StepGraph(case.run, case.device, warmup=1)
    for r in range(replays):
        case.refill(100 + r)
        ref = case.reference()
        compare(case, graph.replay(), ref, f"graph replay {r}")


def check_compiled(case: OpCase, compiler: str = "inductor") -> tuple[int, int]:
    """``torch.compile(fullgraph=True)`` (Inductor on CUDA) equals eager torch and launches no more kernels than
    the eager call (no functionalisation copies of mutated arguments). Returns ``(eager, compiled)`` launches."""
    from streamkern.testing import count_launches

    torch._dynamo.reset()
    compiled = torch.compile(lambda inputs: case.call(inputs, case.backend), fullgraph=True, backend=compiler)
    ref = case.reference()
    compare(case, compiled(case.inputs), ref, compiler)
    eager_n = count_launches(case.run, device=case.device, warmup=True)
    compiled_n = count_launches(compiled, case.inputs, device=case.device, warmup=True)
    assert compiled_n <= eager_n, f"{case.name} [{case.backend}]: {compiled_n} launches compiled vs {eager_n} eager"
    return eager_n, compiled_n

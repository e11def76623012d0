"""Smoke test of ``python -m streamkern.demo`` at tiny sizes: one table, JSON and PNG written, eager rows first."""
import json
from types import SimpleNamespace

import pytest
import torch

from streamkern import demo
from streamkern._backend import OpBackends
from streamkern.step_graph import StepGraph


def test_demo_tiny_writes_table_json_and_chart(tmp_path, capsys):
    rows = demo.main(["--tiny", "--reference-ops", "--repeats", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    pipelines = ["MemoryBank", "StreamingGenerator", "StreamingGenerator sparse", "MemoryWorldModel", "GatedPolicy",
                 "SpeculativeVAR greedy", "SpeculativeVAR sample"]
    eager = [r for r in rows if r.backend == "torch (eager)"]
    assert [r.pipeline for r in eager] == pipelines
    ops = [r for r in rows if r.backend == "torch-ops"]
    assert len(ops) == len(pipelines) and all(r.error is None and r.identical for r in ops)
    assert all(r.syncs_per_step < e.syncs_per_step for r, e in zip(ops, eager))
    for r in eager + ops:     # every pipeline times the parts streamkern replaces, with their bytes
        assert r.parts and r.parts_ms > 0 and r.parts_mb > 0
    assert all(r.parts_speedup == 1.0 for r in eager)
    assert out.count("pipeline ") == 1 and "ms/step" in out and "parts ms" in out
    accelerated = [r for r in rows if r.backend != "torch (eager)" and not r.error]
    assert out.count("end to end") == len(accelerated)    # the closing note: one line per accelerated row
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["tiny"] is True and saved["commit"] and saved["machine"]
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    table = demo.markdown(saved)
    assert table.count("\n") == len(rows) + 1 and f"{saved['rows'][0]['latency_ms']:.1f}" in table


def test_demo_compare_flags_a_changed_token_and_a_drifted_tensor():
    ref = {"tokens": torch.arange(6), "x": torch.ones(4)}
    assert demo.compare({"tokens": torch.arange(6), "x": torch.ones(4) * (1 + 1e-7)}, ref)[0]
    assert not demo.compare({"tokens": torch.arange(6).flip(0), "x": torch.ones(4)}, ref)[0]
    ok, err = demo.compare({"tokens": torch.arange(6), "x": torch.ones(4) * 1.01}, ref)
    assert not ok and abs(err - 0.01) < 1e-6


@pytest.mark.usefixtures("one_thread")
def test_pipeline_ops_are_recorded_from_a_tiny_run():
    """The ops a pipeline's accelerated path calls, from which the demo derives its backends: recorded, not listed
    (StreamingGenerator's memory attention is SDPA or frame_attention depending on the backend and device)."""
    names = {label: {op.name for op in demo.pipeline_ops(label)} for label in
             ("MemoryBank", "StreamingGenerator sparse", "SpeculativeVAR greedy")}
    assert names["MemoryBank"] == {"consensus_frame_scores", "bank_evict_select", "bank_insert"}
    assert {"frame_write", "frame_topk", "frame_attention"} <= names["StreamingGenerator sparse"]
    assert names["SpeculativeVAR greedy"] == {"block_masked_attention", "verify_scales"}
    assert set(demo.declared_ops()) >= set().union(*names.values())


def test_backends_for_lists_only_backends_that_implement_every_op():
    def op(*backends):
        return SimpleNamespace(backends=OpBackends("op", {b: None for b in ("torch",) + backends}))

    cpu = torch.device("cpu")
    assert demo.backends_for(cpu, True, False, [op("cpu", "triton")]) == [("cpu", "cpu"), ("triton", "triton")]
    assert demo.backends_for(cpu, True, False, [op("cpu", "triton"), op("triton")]) == [("triton", "triton")]
    assert demo.backends_for(cpu, False, True, [op("triton")]) == [("torch-ops", "torch")]


GRAPHS = demo.graph_configs(demo.with_dtypes(demo.TINY, ["fp32"]), demo.TINY, replays=2)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("graph", GRAPHS, ids=[g[0] for g in GRAPHS])
def test_graph_row_replays_equal_eager_steps(graph):
    """Each capturable step (StepGraph's recorded replay here, a CUDA graph on a GPU) replays equal to the same
    step of its twin run eagerly, both timed."""
    label, step, make, dtype = graph
    cpu = torch.device("cpu")
    row = demo.graph_row(label, step, lambda: make(cpu), cpu, dtype, 2)
    assert row.error is None and row.identical and row.replays == 2 and row.replay_ms > 0 and row.eager_ms > 0


@pytest.mark.usefixtures("one_thread")
def test_graph_row_catches_a_stale_replay(monkeypatch):
    """Negative control: a replay that does not run the step (it returns the capture's outputs) is reported NO."""
    (label, step, make, dtype), = [g for g in GRAPHS if g[0] == "SpeculativeVAR sample"]
    cpu = torch.device("cpu")
    monkeypatch.setattr(StepGraph, "replay", lambda self: self.outputs)
    stale = demo.graph_row(label, step, lambda: make(cpu), cpu, dtype, 2)
    assert stale.error is None and not stale.identical and " NO " in demo.format_graphs([stale])

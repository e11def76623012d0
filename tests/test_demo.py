"""Smoke test of ``python -m streamkern.demo`` at tiny sizes: one table, JSON and PNG written, eager rows first."""
import json

import torch

from streamkern import demo


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

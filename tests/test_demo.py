"""Smoke test of ``python -m streamkern.demo`` at tiny sizes: one table, JSON and PNG written, eager rows first."""
import json

import torch

from streamkern import demo


def test_demo_tiny_writes_table_json_and_chart(tmp_path, capsys):
    rows = demo.main(["--tiny", "--reference-ops", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    pipelines = ["StreamingGenerator", "GatedPolicy", "SpeculativeVAR greedy", "SpeculativeVAR sample"]
    assert [r.pipeline for r in rows if r.backend == "torch (eager)"] == pipelines
    ops = [r for r in rows if r.backend == "torch-ops"]
    assert len(ops) == 4 and all(r.error is None and r.identical for r in ops)
    assert all(r.syncs_per_step < e.syncs_per_step for r, e in zip(ops, (r for r in rows if r.backend ==
                                                                         "torch (eager)")))
    assert out.count("pipeline ") == 1 and "ms/step" in out
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert len(saved["rows"]) == len(rows) and saved["tiny"] is True
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_demo_compare_flags_a_changed_token_and_a_drifted_tensor():
    ref = {"tokens": torch.arange(6), "x": torch.ones(4)}
    assert demo.compare({"tokens": torch.arange(6), "x": torch.ones(4) * (1 + 1e-7)}, ref)[0]
    assert not demo.compare({"tokens": torch.arange(6).flip(0), "x": torch.ones(4)}, ref)[0]
    ok, err = demo.compare({"tokens": torch.arange(6), "x": torch.ones(4) * 1.01}, ref)
    assert not ok and abs(err - 0.01) < 1e-6

"""bench/tune_attention.py (issue 21): its dry run on this CPU (tiny shapes, the Triton kernels interpreted at every
config, what needs CUDA skipped and saying so), its JSON rows, its budget and FlexAttention's cap."""
import json
import time

import pytest
import torch

from streamkern.bench import tune_attention
from streamkern.kernels import frame_attention as kfa
from streamkern.kernels import block_masked_attention as ksa

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's; a GPU runs it for real")


def test_dry_run_times_every_kernel_and_config(tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"kind": "earlier"}\n')
    tuner = tune_attention.main(["--dry-run", "--jsonl", str(path), "--shapes", "memflow", "memflow-sparse",
                                 "var256-d16"])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"kind": "earlier"}                                       # appended, not overwritten
    assert lines[1]["source"] == "tune" and lines[1]["kind"] == "info" and lines[1]["dry_run"] is True
    rows = lines[2:]
    assert all(r["source"] == "tune" and r["kind"] == "row" for r in rows)
    assert [r["impl"] for r in rows] == [r.impl for r in tuner.rows]            # one line per row, as measured
    measured = {(r["shape"], r["impl"]): r for r in rows if r["ms"] is not None}
    for shape, configs in (("memflow", kfa.CONFIGS), ("memflow-sparse", kfa.CONFIGS), ("var256-d16", ksa.CONFIGS)):
        impls = ["torch-reference", "triton-pointer", *(f"triton-{c.name}" for c in configs)]
        assert all((shape, impl) in measured for impl in impls), (shape, sorted(measured))
        for impl in impls[1:]:
            r = measured[(shape, impl)]
            assert r["ms"] > 0 and r["tflops"] > 0 and r["base"] == "torch-reference" and r["ratio"] > 0
            assert r["rel_err"] < 1e-2, (shape, impl, r["rel_err"])      # bf16 against fp32 SDPA
    assert measured[("memflow-sparse", "triton-pointer")]["extra"]["per_head"] is True
    skipped = {(r["shape"], r["impl"]): r["note"] for r in rows if r["ms"] is None}
    assert "cuDNN needs CUDA" in skipped[("memflow", "cudnn-sdpa-precat")]
    assert "FlexAttention is compiled for CUDA" in skipped[("memflow", "flex")]
    assert "FlexAttention is compiled for CUDA" in skipped[("var256-d16", "flex")]
    out = capsys.readouterr().out
    assert "| shape | impl | ms | TFLOP/s | × base |" in out and "fastest Hopper config per shape" in out


def test_budget_leaves_rows_saying_so(tmp_path):
    tuner = tune_attention.main(["--dry-run", "--budget", "0", "--shapes", "cdit"])
    assert tuner.rows and all(r.ms is None for r in tuner.rows)
    assert any("over the run's --budget" in r.note for r in tuner.rows)


def test_flex_cap_interrupts_what_runs_past_it():
    tuner = tune_attention.Tuner(torch.device("cpu"), budget=60, flex_budget=0.3, jsonl=None, dry=True)
    start = time.monotonic()
    with pytest.raises(tune_attention.BudgetExceeded, match="interrupted after"):
        with tuner.flex_cap():
            time.sleep(5)
    assert time.monotonic() - start < 2 and tuner.flex_left <= 0
    with pytest.raises(tune_attention.BudgetExceeded, match="--flex-budget"):
        with tuner.flex_cap():
            pass


def test_interrupt_keeps_the_rows(monkeypatch, tmp_path):
    """SIGINT (a session's cap) in the middle: the rows measured so far stay in the file, the table is printed."""
    calls = []
    real = tune_attention._frame_shape

    def interrupted(tuner, name, *args):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tuner, name, *args)

    monkeypatch.setattr(tune_attention, "_frame_shape", interrupted)
    path = tmp_path / "rows.jsonl"
    tuner = tune_attention.main(["--dry-run", "--jsonl", str(path), "--shapes", "cdit", "memflow"])
    assert calls == ["memflow", "cdit"]
    rows = [json.loads(line) for line in path.read_text().splitlines()][1:]
    assert any(r["shape"] == "memflow" and r["ms"] for r in rows)
    assert "interrupted" in rows[-1]["note"] and tuner.rows[-1].note == rows[-1]["note"]

"""``bench/gpu_session.sh --dry-run``: every phase's logic on this CPU (what needs a GPU is skipped and says so),
so that the script that a GPU session runs keeps working. Checks that each phase ran, wrote its file under $OUT
and passed, that the caps fit the session's budget, and that the GPU test tier (``-m gpu_tier``, collected here and
skipped) holds every op on each GPU backend it has, in every dtype, and each pipeline's CUDA-graph replay."""
import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from streamkern import demo

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("env", "build", "smoke", "test", "sanitize", "demo", "bench", "fastvideo")   # tune: a call of its own
BUDGET_S = 420   # the session's share of one device call
# each op's parity test in the tier ("test module", "test", whether it is parametrised by dtype)
OP_TESTS = {
    "consensus_frame_scores": ("test_consensus_frame_scores", "test_parity_large_on_gpu", True),
    "ring_write": ("test_ring_write", "test_ring_write_parity", True),
    "ring_write_at": ("test_ring_write", "test_ring_write_device_start_equals_host_start", False),
    "bank_evict_select": ("test_bank_evict_select", "test_random_against_reference", True),
    "bank_insert": ("test_bank_insert", "test_parity", True),
    "pose_topk": ("test_pose_topk", "test_against_reference", True),
    "patch_importance": ("test_drift_gate", "test_patch_importance_parity", True),
    "attention_weighted_drift": ("test_drift_gate", "test_drift_parity", True),
    "drift_gate_step": ("test_drift_gate", "test_gate_step_parity", True),
    "block_masked_attention": ("test_block_masked_attention", "test_presets_parity", True),
    "verify_scales": ("test_verify_scales", "test_parity", True),
    "frame_write": ("test_frame_write", "test_parity", True),
    "frame_attention": ("test_frame_attention", "test_parity", True),
    "frame_topk": ("test_frame_topk", "test_parity", True),
}
PIPELINE_GRAPHS = ("test_streaming_generator_block_replays_as_the_next_block_on_cuda_graphs",
                   "test_gated_policy_step_replays_both_branches_on_cuda", "test_speculative_var_round_replays_on_cuda")
DTYPE_IDS = (("fp32", "f32"), ("fp16", "f16"), ("bf16",))


def test_caps_fit_the_budget():
    script = (ROOT / "bench" / "gpu_session.sh").read_text()
    line = next(line for line in script.splitlines() if line.startswith("CAP_RACECHECK="))
    caps = dict(re.findall(r"(CAP_\w+)=(\d+)", script.split("\nif [ $DRY = 1 ]")[0]))
    caps.pop("CAP_BUILD_FULL")   # the fallback build, only where no prebuilt extension was carried in
    assert int(caps.pop("CAP_TUNE")) <= 200   # tune_attention's 3 minutes, in a device call of its own
    assert sum(map(int, caps.values())) <= BUDGET_S, (caps, line)


@pytest.mark.skipif(sys.platform != "linux", reason="the session script is bash on Linux")
def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else proc.stdout
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text().split("== summary")[0].split("\n")   # the phase lines
    assert [line.split()[0] for line in summary if line] == list(PHASES)
    assert all(" rc=0 " in line for line in summary if line), summary
    assert "== summary" in proc.stdout.split("== done")[-1] and "tests: " in proc.stdout.split("== summary")[-1]
    assert "torch" in (tmp_path / "env.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    assert sorted((r["part"], r["failures"]) for r in rows if r.get("summary")) == [("0/2", 0), ("1/2", 0)]
    assert {r["case"] for r in rows if "case" in r} >= {"select_frame", "bank_insert", "drift_gate", "verify_scales",
                                                        "verify_threshold_every_n", "frame_attention", "frame_topk"}
    assert all(r["ok"] for r in rows if "case" in r)
    bench = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert {(r["source"], r.get("op")) for r in bench if r["kind"] == "row"} >= {
        ("bench", "frame_write"), ("bench", "bank_evict_select"), ("demo", None)}
    assert json.loads((tmp_path / "demo.json").read_text())["rows"]
    assert "skipped" in (tmp_path / "sanitize.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= 8   # what a device session can bring back

    # the GPU tier, collected and skipped here: every op on each GPU backend it has, in every dtype
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    assert suites.get("failures") == "0" and suites.get("errors") == "0"
    ids = {}
    for case in suites.iter("testcase"):
        name, _, params = case.get("name").partition("[")
        ids.setdefault((case.get("classname").split(".")[-1], name), []).append(params.rstrip("]"))
    ops = demo.declared_ops()
    assert set(ops) == set(OP_TESTS), "every declared op needs its test in the GPU tier (tests/conftest.py)"
    for name, (module, test, by_dtype) in OP_TESTS.items():
        params = [p.split("-") for p in ids.get((module, test), [])]
        for backend in ("triton", "cuda"):
            if backend not in ops[name].backends.impls:
                continue
            ours = [p for p in params if p[:2] == [backend, "cuda"] or p[-2:] == [backend, "cuda"]]
            assert ours, f"{name}: no {module}::{test} on {backend}-cuda in the tier"
            for dtype in DTYPE_IDS if by_dtype else ():
                assert any(set(dtype) & set(p) for p in ours), f"{name}: no {dtype[0]} on {backend}-cuda"
    for test in PIPELINE_GRAPHS:
        assert ids.get(("test_pipeline_graphs", test)), test
    assert len([c for c in suites.iter("testcase")]) <= 150   # one pass, not every CPU parametrisation


def test_junit_of_a_killed_chunk_is_read_from_its_log(tmp_path):
    """A chunk stopped by its cap before pytest wrote its junit: the tests its verbose log reports as finished
    (xdist's and plain pytest's line formats) are counted, a missing file without a log is listed as unreadable."""
    from streamkern.bench import gpu_pack

    (tmp_path / "junit-ops.log").write_text(
        "[gw0] [ 10%] PASSED tests/test_ring_write.py::test_ring_write_parity[triton-cuda-fp32-x]\n"
        "[gw3] [ 20%] FAILED tests/test_frame_topk.py::test_parity[cuda-cuda-bf16-holes-per-head]\n"
        "tests/test_gpu.py::test_attention_grid_limit_on_cuda SKIPPED (no CUDA device) [ 30%]\n"
        "tests/test_verify_scales.py::test_parity[triton-cuda-fp16-y] ERROR [ 40%]\n")
    gpu_pack.merge_junit(str(tmp_path / "junit.xml"), [str(tmp_path / "junit-ops.xml"),
                                                       str(tmp_path / "junit-graphs.xml")])
    root = ET.parse(tmp_path / "junit.xml").getroot()
    assert {k: root.get(k) for k in ("tests", "failures", "errors", "skipped")} == \
        {"tests": "5", "failures": "1", "errors": "2", "skipped": "1"}
    failed = [c.get("name") for c in root.iter("testcase") if c.find("failure") is not None]
    assert failed == ["test_parity[cuda-cuda-bf16-holes-per-head]"]

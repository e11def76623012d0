"""``bench/gpu_session.sh --dry-run``: every phase's logic on this CPU (what needs a GPU is skipped and says so),
so that the script that a GPU session runs keeps working. Checks that each phase ran, wrote its file under $OUT
and passed."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("env", "build", "smoke", "test", "sanitize", "bench")


@pytest.mark.skipif(sys.platform != "linux", reason="the session script is bash on Linux")
def test_gpu_session_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    log = (tmp_path / "session.log").read_text() if (tmp_path / "session.log").exists() else proc.stdout
    assert proc.returncode == 0, log[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "summary.txt").read_text().split("\n")
    assert [line.split()[0] for line in summary if line] == list(PHASES)
    assert all(" rc=0 " in line for line in summary if line), summary
    assert "torch" in (tmp_path / "env.txt").read_text()
    rows = [json.loads(line) for line in (tmp_path / "smoke.json").read_text().splitlines()]
    assert rows[-1] == {"summary": True, "failures": 0}
    assert {r["case"] for r in rows[:-1]} >= {"select_frame", "bank_insert", "drift_gate", "verify_scales"}
    suites = ET.parse(tmp_path / "junit.xml").getroot()
    assert int(suites.get("tests")) > 0 and suites.get("failures") == "0" and suites.get("errors") == "0"
    assert "bank_evict" in json.loads((tmp_path / "bench.json").read_text())
    assert "skipped" in (tmp_path / "sanitize.txt").read_text()
    assert len(list(tmp_path.iterdir())) <= 8   # what a device session can bring back

"""Packing helpers of ``bench/gpu_session.sh`` (few files come back from a device session):

``python -m streamkern.bench.gpu_pack junit OUT.xml IN.xml ...``  merge JUnit files. An input that is missing or
    broken (its pytest was killed before writing it) is rebuilt from the verbose log next to it (``IN.log``: the
    ``PASSED``/``FAILED``/``SKIPPED``/``ERROR`` line of each test that finished), else listed in a
    ``<testsuite name="unreadable">``, so a killed process shows up rather than vanishing;
``python -m streamkern.bench.gpu_pack summary OUT_DIR``  print the session's one-screen summary (and append it to
    ``OUT_DIR/summary.txt``): each phase's exit status and seconds, the test tier's counts and failing ids, the smoke
    checks, and the key ratios of the benchmark rows in ``bench.jsonl`` and ``demo.json``.
"""
from __future__ import annotations

import json
import os
import re
import sys
import xml.etree.ElementTree as ET

_OUTCOME = r"(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)"
_LOG_LINES = [re.compile(_OUTCOME + r"\s+(tests/\S+::\S+)"),            # xdist: "[gw0] [ 3%] PASSED tests/..."
              re.compile(r"^(tests/\S+::\S+)\s+" + _OUTCOME)]           # plain -v: "tests/...::t[x] PASSED [ 3%]"


def suite_from_log(path: str) -> ET.Element | None:
    """A ``<testsuite>`` of the tests a verbose pytest log reports as finished; None without such lines."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    results = {}
    for line in text.splitlines():
        for pattern in _LOG_LINES:
            m = pattern.search(line)
            if m:
                outcome, nodeid = m.groups() if pattern is _LOG_LINES[0] else m.groups()[::-1]
                results[nodeid] = outcome
                break
    if not results:
        return None
    suite = ET.Element("testsuite", name=f"from-log:{os.path.basename(path)}")
    for nodeid, outcome in results.items():
        file, _, name = nodeid.partition("::")
        case = ET.SubElement(suite, "testcase", classname=file[:-3].replace("/", "."), name=name)
        if outcome in ("FAILED", "XPASS"):
            ET.SubElement(case, "failure", message=f"{outcome} (from the log; the junit file was not written)")
        elif outcome == "ERROR":
            ET.SubElement(case, "error", message="ERROR (from the log; the junit file was not written)")
        elif outcome in ("SKIPPED", "XFAIL"):
            ET.SubElement(case, "skipped", message=outcome)
    cases = list(suite)
    suite.attrib.update(tests=str(len(cases)), failures=str(sum(c.find("failure") is not None for c in cases)),
                        errors=str(sum(c.find("error") is not None for c in cases)),
                        skipped=str(sum(c.find("skipped") is not None for c in cases)))
    return suite


def merge_junit(out: str, inputs: list[str]) -> None:
    merged = ET.Element("testsuites")
    unreadable = []
    for path in inputs:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            suite = suite_from_log(os.path.splitext(path)[0] + ".log")
            if suite is None:
                unreadable.append(f"{path}: {exc}")
            else:
                merged.append(suite)
            continue
        merged.extend([root] if root.tag == "testsuite" else list(root))
    if unreadable:
        suite = ET.SubElement(merged, "testsuite", name="unreadable", tests=str(len(unreadable)),
                              errors=str(len(unreadable)))
        for line in unreadable:
            ET.SubElement(ET.SubElement(suite, "testcase", name=os.path.basename(line.split(":")[0])), "error",
                          message=line)
    counts = {k: sum(int(s.get(k, 0)) for s in merged) for k in ("tests", "failures", "errors", "skipped")}
    merged.attrib.update({k: str(v) for k, v in counts.items()})
    ET.ElementTree(merged).write(out, encoding="unicode")
    print("junit:", " ".join(f"{k}={v}" for k, v in counts.items()), f"unreadable={len(unreadable)}")


# --- the summary -------------------------------------------------------------------------------------------------

def _jsonl(path: str) -> list[dict]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut by a kill
                    pass
    except OSError:
        pass
    return rows


def _tests(out_dir: str) -> list[str]:
    try:
        root = ET.parse(os.path.join(out_dir, "junit.xml")).getroot()
    except (OSError, ET.ParseError):
        return ["tests: no junit.xml"]
    cases = list(root.iter("testcase"))
    failed = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = sum(c.find("skipped") is not None for c in cases)
    lines = [f"tests: {len(cases) - len(failed) - skipped} passed, {len(failed)} failed, {skipped} skipped "
             f"(of {len(cases)})"]
    for c in failed[:8]:
        lines.append(f"  FAILED {c.get('classname', '')}::{c.get('name')}")
    if len(failed) > 8:
        lines.append(f"  ... and {len(failed) - 8} more (junit.xml)")
    return lines


def _smoke(out_dir: str) -> list[str]:
    lines = _jsonl(os.path.join(out_dir, "smoke.jsonl"))
    rows = [r for r in lines if "case" in r]
    if not rows:
        return ["smoke: no checks recorded"]
    bad = [r for r in rows if not r["ok"]]
    parts = {r.get("part", "0/1") for r in rows}
    ended = {r.get("part", "0/1") for r in lines if r.get("summary")} >= parts   # every part wrote its summary
    lines = [f"smoke: {len(rows) - len(bad)}/{len(rows)} checks passed" + ("" if ended else " (cut short)")]
    lines += [f"  FAILED {r['case']} [{r['backend']}] {r['check']}: {r.get('error', '')[:90]}" for r in bad[:4]]
    return lines


def _ms(row) -> float | None:
    return row.get("median_ms") if row and not row.get("error") else None


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def _key_ratios(out_dir: str) -> list[str]:
    rows = _jsonl(os.path.join(out_dir, "bench.jsonl"))
    bench = {(r["op"], r["case"], r["impl"]): r for r in rows if r.get("source") == "bench" and r.get("kind") == "row"}
    lines = []
    try:
        with open(os.path.join(out_dir, "demo.json")) as f:
            demo = json.load(f)["rows"]
    except (OSError, ValueError, KeyError):
        demo = [r for r in rows if r.get("source") == "demo" and r.get("kind") == "row"]
    for r in demo:
        if r["pipeline"].startswith("StreamingGenerator") and r["backend"] != "torch (eager)":
            eager = next((e for e in demo if e["pipeline"] == r["pipeline"] and e["backend"] == "torch (eager)"), {})
            if r.get("error"):
                lines.append(f"{r['pipeline']:26s} {r['backend']:6s} FAILED {r['error'][:60]}")
            else:
                lines.append(f"{r['pipeline']:26s} {r['backend']:6s} {r['latency_ms']:8.2f} ms/block vs eager "
                             f"{eager.get('latency_ms', float('nan')):8.2f} ({r['speedup']:.2f}x)"
                             + ("" if r["identical"] else " outputs DIFFER"))
    for g in (r for r in rows if r.get("source") == "demo" and r.get("kind") == "graph"):
        lines.append(f"graph {g['pipeline']:20s} " + (f"FAILED {g['error'][:60]}" if g.get("error") else
                     f"replay {g['replay_ms']:.2f} vs eager {g['eager_ms']:.2f} ms ({g['speedup']:.2f}x)"
                     + ("" if g["identical"] else " DIFFER")))
    op = "frame_attention_step"
    dense = sorted({c for o, c, _ in bench if o == op and "-dense-" in c})
    if dense:
        lines.append("memory attention, dense: speed-up (baseline ms / ms, > 1 faster) vs SDPA over pre-concatenated "
                     "keys (cuDNN) and MemFlow's eager step")
    for case in dense:
        cudnn, eager = bench.get((op, case, "sdpa-precat-cudnn")), bench.get((op, case, "eager-memflow"))
        sdpa = bench.get((op, case, "sdpa-precat"))
        for impl in ("view-sdpa", "triton", "cuda"):
            ours = bench.get((op, case, impl))
            if ours is None:
                continue
            if ours.get("error"):
                lines.append(f"  {case:20s} {impl:9s} FAILED {ours['error'][:60]}")
                continue
            tf = ours.get("tflop_per_s") or 0.0
            if case.endswith("fp32"):
                lines.append(f"  {case:20s} {impl:9s} {tf:6.1f} TF/s vs SDPA fp32 "
                             f"{(sdpa or {}).get('tflop_per_s') or 0:6.1f} TF/s, vs MemFlow eager "
                             f"{_ratio(_ms(eager), _ms(ours))}")
            else:
                lines.append(f"  {case:20s} {impl:9s} {_ms(ours):8.3f} ms ({tf:5.1f} TF/s): vs cuDNN "
                             f"{_ratio(_ms(cudnn), _ms(ours))}, vs MemFlow eager {_ratio(_ms(eager), _ms(ours))}")
    for o in ("frame_write", "ring_append"):
        for (op_, case, impl), r in sorted(bench.items()):
            if op_ == o and impl in ("triton", "cuda"):
                pct = r.get("pct_copy_bw")
                lines.append(f"{o:12s} {case:24s} {impl:6s} " + (f"{pct:5.1f} % of copy bandwidth" if pct is not None
                                                                   else f"FAILED {r.get('error', '')[:50]}"))
    by_source = {}
    for r in rows:
        by_source[r.get("source")] = by_source.get(r.get("source"), 0) + (r.get("kind") != "info")
    lines.insert(0, f"bench.jsonl: {sum(by_source.values())} rows (" +
                 ", ".join(f"{k} {v}" for k, v in sorted(by_source.items(), key=str)) + ")")
    fv = [r for r in rows if r.get("source") == "fastvideo"]
    for r in fv:
        if "median_block_ms" in r:
            lines.append(f"fastvideo {r['case']:16s} {r['impl']:16s} {r['median_block_ms']:8.1f} ms/block, "
                         f"{r.get('host_syncs_per_block')} syncs, peak {r.get('peak_mib', 0):.0f} MiB")
        elif r.get("error") or r.get("skipped"):
            lines.append(f"fastvideo {r.get('case', '')} {r.get('impl', '')}: {(r.get('error') or r['skipped'])[:70]}")
    tune = [r for r in rows if r.get("source") == "tune"]
    if tune:
        lines.append(f"tune: {len(tune)} rows")
    return lines


def summary(out_dir: str) -> str:
    try:
        with open(os.path.join(out_dir, "summary.txt")) as f:
            phases = [line.rstrip("\n") for line in f if re.fullmatch(r"\w+ rc=-?\d+ \d+s", line.rstrip("\n"))]
    except OSError:
        phases = []
    import textwrap

    text = "\n".join(["== summary"] + textwrap.wrap("phases: " + "; ".join(phases), 118, subsequent_indent="  ")
                     + _tests(out_dir) + _smoke(out_dir) + _key_ratios(out_dir))
    with open(os.path.join(out_dir, "summary.txt"), "a") as f:
        f.write(text + "\n")
    return text


if __name__ == "__main__":
    what, out, *rest = sys.argv[1:]
    if what == "junit":
        merge_junit(out, rest)
    elif what == "summary":
        print(summary(out))
    else:
        raise SystemExit(f"unknown command {what!r}: expected junit or summary")

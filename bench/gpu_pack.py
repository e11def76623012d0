"""Packing helpers of ``bench/gpu_session.sh`` (few files come back from a device session):

``python -m streamkern.bench.gpu_pack junit OUT.xml IN.xml ...``  merge JUnit files (missing or broken ones are
    listed in a ``<testsuite name="unreadable">``, so a killed process shows up rather than vanishing);
``python -m streamkern.bench.gpu_pack bench OUT.json DIR``  merge ``DIR/bench-<op>/*.json`` into one object by op.
"""
from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def merge_junit(out: str, inputs: list[str]) -> None:
    merged = ET.Element("testsuites")
    unreadable = []
    for path in inputs:
        try:
            root = ET.parse(path).getroot()
        except (OSError, ET.ParseError) as exc:
            unreadable.append(f"{path}: {exc}")
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


def merge_bench(out: str, folder: str) -> None:
    merged = {}
    for path in sorted(glob.glob(os.path.join(folder, "bench-*", "*.json"))):
        with open(path) as f:
            merged[os.path.basename(os.path.dirname(path))[len("bench-"):]] = json.load(f)
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
    print("bench: ops", " ".join(merged) or "none")


if __name__ == "__main__":
    what, out, *rest = sys.argv[1:]
    if what == "junit":
        merge_junit(out, rest)
    elif what == "bench":
        merge_bench(out, rest[0])
    else:
        raise SystemExit(f"unknown command {what!r}: expected junit or bench")

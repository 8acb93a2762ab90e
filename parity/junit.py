"""JUnit XML for ``parity gate``: what CI systems show as test results.

One ``<testsuite>`` per component and dtype (``parity.<component>.<dtype>``), one ``<testcase>``
per layer group -- the first ``/``-separated part of the layer name (``helios/q_rot`` ->
``helios``). A failing group's ``<failure message>`` names its first diverging layer (and the
component's); the body lists every failed check of the group. A component that crashed is one
``run`` testcase with an ``<error>``; one that compared nothing is a failing ``(none)`` testcase.
"""
from __future__ import annotations

import re
import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from parity.dumps import atomic_write
from parity.outcome import Finding, Outcome
from parity.vocab import fmt

_ILLEGAL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _clean(text: str) -> str:
    return _ILLEGAL.sub("?", text)


def group_of(layer: str) -> str:
    return layer.split("/", 1)[0] or layer


def _line(f: Finding) -> str:
    base = f" (baseline {fmt(f.baseline)})" if f.baseline is not None else ""
    return f"{f.layer}: {f.metric} {fmt(f.value)}, expected {f.threshold}{base} -- {f.message}"


def build(outcomes: Sequence[Outcome], name: str = "parity gate") -> ET.Element:
    root = ET.Element("testsuites", name=name)
    totals = {"tests": 0, "failures": 0, "errors": 0}
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    host = socket.gethostname()
    for outcome in outcomes:
        suite_name = f"parity.{outcome.component}.{outcome.dtype}"
        suite = ET.SubElement(root, "testsuite", name=suite_name, timestamp=stamp, hostname=host,
                              time=f"{outcome.seconds or 0:.3f}")
        props = ET.SubElement(suite, "properties")
        for key, value in (("component", outcome.component), ("dtype", outcome.dtype),
                           ("report_dir", outcome.report_dir), ("baseline", outcome.baseline_path or "none"),
                           ("first_divergence", outcome.first_divergence)):
            if value is not None:
                ET.SubElement(props, "property", name=key, value=_clean(str(value)))
        groups: dict[str, list[Finding]] = {}
        for layer in outcome.layers:
            groups.setdefault(group_of(layer), [])
        for finding in outcome.failures:
            groups.setdefault(group_of(finding.layer), []).append(finding)
        counts = {"tests": 0, "failures": 0, "errors": 0}
        for group, findings in groups.items():
            case = ET.SubElement(suite, "testcase", classname=suite_name, name=group, time="0")
            counts["tests"] += 1
            if not findings:
                continue
            first = findings[0]
            kind = "error" if first.kind == "error" else "failure"  # a crashed run; a crash in a forward is a failure
            counts["errors" if kind == "error" else "failures"] += 1
            where = "" if first.layer == outcome.first_divergence else \
                f" (component's first divergence: {outcome.first_divergence})"
            message = (f"{outcome.component} {outcome.dtype}: first diverging layer {first.layer}: "
                       f"{first.message}{where}")
            body = [_line(f) for f in findings]
            if outcome.report_dir:
                body.append(f"report: {outcome.report_dir}")
            element = ET.SubElement(case, kind, message=_clean(message), type=f"parity.{first.kind}")
            element.text = _clean("\n".join(body))
        if outcome.notes:
            ET.SubElement(suite, "system-out").text = _clean("\n".join(outcome.notes))
        for key, value in counts.items():
            suite.set(key, str(value))
            totals[key] += value
        suite.set("skipped", "0")
    if not outcomes:  # a gate that compared nothing is a failure, in JUnit too
        suite = ET.SubElement(root, "testsuite", name="parity", tests="1", failures="1", errors="0", skipped="0")
        case = ET.SubElement(suite, "testcase", classname="parity", name="(nothing compared)", time="0")
        ET.SubElement(case, "failure", message="the gate compared nothing", type="parity.structure")
        totals["tests"] += 1
        totals["failures"] += 1
    for key, value in totals.items():
        root.set(key, str(value))
    return root


def write(path: str | Path, outcomes: Sequence[Outcome]) -> None:
    tree = ET.ElementTree(build(outcomes))
    ET.indent(tree)
    atomic_write(path, lambda f: tree.write(f, encoding="utf-8", xml_declaration=True), mode="wb")

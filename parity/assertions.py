"""``assert_parity``: assert a parity run passed, with a failure message a person can act on.

Imported by the pytest plugin after ``pytest.register_assert_rewrite("parity.assertions")``, so
pytest rewrites the ``assert`` below; usable without pytest too (plain ``AssertionError``).
"""
from __future__ import annotations

from typing import Any

from parity.report import describe_layer


def explain(result: Any) -> str:
    """Why a run (``RunResult`` or ``report.json`` dict) is not PASS: first divergence, worst layer, crash."""
    report = result if isinstance(result, dict) else result.report
    rows = [r for r in report.get("layers") or [] if r.get("verdict") != "EXCLUDED"]
    failing = [r for r in rows if r.get("verdict") == "FAIL"]
    name = report.get("variant") or report.get("component")
    lines = [f"parity {report.get('verdict')}: {name} {report.get('dtype')}, {len(failing)}/{len(rows)} layers fail"]
    if not rows:
        lines.append("  nothing was compared: the component captured no layers")
    first = report.get("first_divergence")
    if first:
        row = next((r for r in rows if r.get("layer") == first), None)
        lines.append(f"  first diverging layer: {first}")
        if row is not None:
            if row.get("reasons"):
                lines.append(f"    {row['reasons']}")
            metrics = describe_layer(row)
            if metrics != row.get("reasons"):  # a row without metrics (missing, shape) is its reasons
                lines.append(f"    {metrics}  shape {row.get('shape_ref')} {row.get('dtype_mlx')}")
    if report.get("culprit"):
        lines.append(f"  culprit: {report['culprit']} (the first block whose own, teacher-forced error breaks its limit; "
                     "later blocks may only inherit its error)")
    worst = report.get("worst")
    if worst and worst.get("layer") != first:
        what = worst.get("reasons") if worst.get("verdict") == "FAIL" and "cosine" not in worst else describe_layer(worst)
        lines.append(f"  worst layer: {worst['layer']}  {what}")
    if len(failing) > 1:
        names = [r["layer"] for r in failing]
        lines.append(f"  failing layers: {', '.join(names[:8])}" + (f" ... (+{len(names) - 8})" if len(names) > 8 else ""))
    crash = report.get("crash")
    if crash:
        lines.append(f"  crash: the {crash.get('side')} forward raised after {crash.get('after') or 'no layer'}: "
                     f"{crash.get('error')}")
    for section in report.get("sections") or []:
        if section.get("passed") is False:
            lines.append(f"  {section.get('title')}: FAIL {section.get('note', '')}".rstrip())
    if report.get("report_dir"):
        lines.append(f"  report: {report['report_dir']}")
    return "\n".join(lines)


def assert_parity(result: Any) -> None:
    """Assert a parity run passed; the failure names the first diverging layer and the worst metrics."""
    __tracebackhide__ = True
    report = result if isinstance(result, dict) else result.report
    verdict = report.get("verdict")
    assert verdict == "PASS", explain(report)

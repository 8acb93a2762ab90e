"""``assert_parity``: assert a parity run passed, with a failure message a person can act on.

Imported by the pytest plugin after ``pytest.register_assert_rewrite("parity.assertions")``, so
pytest rewrites the ``assert`` below; usable without pytest too (plain ``AssertionError``).
"""
from __future__ import annotations

import math
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.6f}" if 0.01 <= abs(value) <= 1 else f"{value:.3g}"
    return str(value)


def _metrics(row: dict[str, Any]) -> str:
    parts = [f"{key} {_fmt(row.get(key))}" for key in ("cosine", "max_abs", "max_rel", "rmse") if key in row]
    if row.get("budget_ratio") is not None:
        parts.append(f"budget_ratio {_fmt(row['budget_ratio'])}")
    return "  ".join(parts) or "no metrics"


def explain(result: Any) -> str:
    """Why a run (``RunResult`` or ``report.json`` dict) is not PASS: first divergence, worst metrics."""
    report = result if isinstance(result, dict) else result.report
    rows = report.get("layers") or []
    failing = [r for r in rows if r.get("verdict") == "FAIL"]
    lines = [f"parity {report.get('verdict')}: {report.get('component')} {report.get('dtype')}, "
             f"{len(failing)}/{len(rows)} layers fail"]
    if not rows:
        lines.append("  nothing was compared: the component captured no layers")
    first = report.get("first_divergence")
    if first:
        row = next((r for r in rows if r.get("layer") == first), None)
        lines.append(f"  first diverging layer: {first}")
        if row is not None:
            if row.get("reasons"):
                lines.append(f"    {row['reasons']}")
            lines.append(f"    {_metrics(row)}  shape {row.get('shape_ref')} {row.get('dtype_mlx')}")
    worst = report.get("worst")
    if worst and worst.get("layer") != first:
        lines.append(f"  worst layer: {worst['layer']}  {_metrics(worst)}")
    if len(failing) > 1:
        names = [r["layer"] for r in failing]
        lines.append(f"  failing layers: {', '.join(names[:8])}" + (f" ... (+{len(names) - 8})" if len(names) > 8 else ""))
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

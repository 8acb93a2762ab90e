"""Per-run reports: ``report.json`` (the contract other tools read), ``report.csv``, a terminal summary."""
from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from parity.compare import Comparison
from parity.dumps import atomic_write, load_json, write_json

SCHEMA = 1
CSV_COLUMNS = ["layer", "verdict", "cosine", "max_abs", "max_rel", "mean_abs", "rmse", "snr_db",
               "budget_ratio", "err_vs_truth", "ref_err_vs_truth", "shape_ref", "shape_mlx",
               "dtype_ref", "dtype_mlx", "nan_ref", "inf_ref", "nan_mlx", "inf_mlx", "reasons", "mlx_layer"]


def build_report(comparison: Comparison, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of one component run: metadata, verdict, first divergence, rows, sections."""
    worst = comparison.worst
    return {
        "schema": SCHEMA,
        **meta,
        "component": comparison.component,
        "dtype": comparison.dtype,
        "verdict": comparison.verdict,
        "first_divergence": comparison.first_divergence,
        "worst": worst.row() if worst else None,
        "summary": summary_numbers(comparison),
        "layers": [layer.row() for layer in comparison.layers],
        "sections": [asdict(section) for section in comparison.sections],
    }


def summary_numbers(comparison: Comparison) -> dict[str, Any]:
    rows = [l.metrics for l in comparison.layers if "cosine" in l.metrics]
    return {
        "layers": len(comparison.layers),
        "failed": sum(l.verdict == "FAIL" for l in comparison.layers),
        "worst_cosine": min((r["cosine"] for r in rows), default=None),
        "max_abs": max((r["max_abs"] for r in rows), default=None),
        "max_budget_ratio": max((r["budget_ratio"] for r in rows if "budget_ratio" in r and not r.get("budget_excused")),
                                default=None),
    }


def write_reports(directory: Path, report: dict[str, Any]) -> None:
    """Write ``report.csv`` then ``report.json`` (the JSON last: its presence marks a finished run)."""
    frame = pd.DataFrame(report["layers"])
    frame = frame[[c for c in CSV_COLUMNS if c in frame.columns] + [c for c in frame.columns if c not in CSV_COLUMNS]]
    atomic_write(directory / "report.csv", lambda f: frame.to_csv(f, index=False))
    write_json(directory / "report.json", report)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or the folder holding it), checking it is one of ours."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = load_json(path, "report")
    missing = [k for k in ("schema", "component", "verdict", "layers") if k not in report]
    if missing:
        raise ValueError(f"report {path} lacks {missing}; not a parity report")
    return report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6f}" if 0.01 <= abs(value) <= 1 else f"{value:.3g}"
    return str(value)


def terminal_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: verdict, first divergence, worst layer, where the files are."""
    s = report["summary"]
    lines = [f"[{report['component']} {report['dtype']}] {report['verdict']}: "
             f"{s['layers'] - s['failed']}/{s['layers']} layers pass"]
    first = report["first_divergence"]
    if first:
        row = next((r for r in report["layers"] if r["layer"] == first), None)
        why = f" ({row['reasons']})" if row and row.get("reasons") else ""
        lines.append(f"  first divergence: {first}{why}")
    worst = report["worst"]
    if worst:
        lines.append(f"  worst layer: {worst['layer']}  cosine {_fmt(worst.get('cosine'))}  "
                     f"max abs {_fmt(worst.get('max_abs'))}  max rel {_fmt(worst.get('max_rel'))}")
    if s.get("max_budget_ratio") is not None:
        lines.append(f"  max precision-budget ratio: {_fmt(s['max_budget_ratio'])} "
                     "(layers that match the reference to float32 tolerance excepted)")
    for section in report["sections"]:
        if section["passed"] is not None:
            lines.append(f"  {section['title']}: {'PASS' if section['passed'] else 'FAIL'} {section.get('note', '')}".rstrip())
    if report.get("report_dir"):
        lines.append(f"  report: {report['report_dir']}")
    return "\n".join(lines)

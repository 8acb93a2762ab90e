"""Per-run reports: ``report.json`` (the contract other tools read), ``report.csv``, a terminal summary.

``report.json`` (schema 2) holds the run's metadata (variant, config, seed, weights, versions,
threads, git commit, the thresholds files applied, crashes), ``verdict``, ``first_divergence``,
``worst``, ``culprit`` (teacher forcing: the first block whose own error breaks its limit, or
null), ``explanation`` (advice, :mod:`parity.explain`: the known porting mistakes that would explain
the first divergence, or null), ``summary``, one row per layer in execution order and the ``sections``. Each row
carries its metrics, ``failures`` (kind, metric, value, limit, message: the verdict's reasons as
data) and the ``limits`` that were applied; ``reasons`` joins the failure messages. It is strict
JSON: a non-finite number is written as null and listed under ``nonfinite`` (``{"layers[3].snr_db":
"inf"}``). Schema 1 reports (no ``failures``/``limits``) are still read.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping

from parity.compare import EXCLUDED, FAIL, Comparison
from parity.dumps import atomic_write, write_dumps, write_json
from parity.vocab import InputError, fmt, load_json, restore_nonfinite

SCHEMA = 2
READABLE_SCHEMAS = (1, 2)
CSV_COLUMNS = ["layer", "verdict", "cosine", "max_abs", "max_rel", "mean_abs", "rmse", "snr_db",
               "budget_ratio", "err_vs_truth", "ref_err_vs_truth", "shape_ref", "shape_mlx",
               "dtype_ref", "dtype_mlx", "nan_ref", "inf_ref", "nan_mlx", "inf_mlx", "reasons", "mlx_layer"]
#: What runs in only one dtype leave unchecked (said by ``parity run`` and the pytest plugin).
UNCHECKED = {
    "float32": "bfloat16 not run: the precision budget (error against float64 vs the reference's own bf16 error) "
               "was not checked",
    "bfloat16": "float32 not run: formula differences inside bf16 noise (e.g. exact vs tanh GELU, an attention "
                "computed in bf16) are only seen in float32",
}


def unchecked(dtypes_run: set[str]) -> list[str]:
    """What running only ``dtypes_run`` leaves unchecked (nothing when both dtypes ran)."""
    return [UNCHECKED[d] for d in UNCHECKED if dtypes_run and d in dtypes_run and len(dtypes_run) == 1]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def build_report(comparison: Comparison, meta: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of one component run: metadata, verdict, first divergence, rows, sections."""
    worst = comparison.worst
    report = {
        "schema": SCHEMA,
        **meta,
        "component": comparison.component,
        "dtype": comparison.dtype,
        "verdict": comparison.verdict,
        "first_divergence": comparison.first_divergence,
        "culprit": comparison.culprit,
        "worst": worst.row() if worst else None,
        "summary": summary_numbers(comparison),
        "layers": [layer.row() for layer in comparison.layers],
        "sections": [asdict(section) for section in comparison.sections],
    }
    if comparison.crash:
        report["crash"] = vars(comparison.crash)
    return report


def summary_numbers(comparison: Comparison) -> dict[str, Any]:
    layers = [l for l in comparison.layers if l.verdict != EXCLUDED]
    rows = [l.metrics for l in layers]
    return {
        "layers": len(layers),
        "failed": sum(l.verdict == FAIL for l in layers),
        "excluded": len(comparison.layers) - len(layers),
        "nonfinite_layers": sum(1 for r in rows if any(r.get(k) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx"))),
        "worst_cosine": min((r["cosine"] for r in rows if _finite(r.get("cosine"))), default=None),
        "max_abs": max((r["max_abs"] for r in rows if _finite(r.get("max_abs"))), default=None),
        "max_budget_ratio": max((r["budget_ratio"] for r in rows
                                 if _finite(r.get("budget_ratio")) and not r.get("budget_excused")), default=None),
    }


def write_reports(directory: Path, report: dict[str, Any]) -> None:
    """Write ``report.csv`` then ``report.json`` (the JSON last: its presence marks a finished component run)."""
    rows = [{k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items() if k not in ("failures", "limits")}
            for row in report["layers"]]
    found = dict.fromkeys(k for row in rows for k in row)
    columns = [c for c in CSV_COLUMNS if c in found] + [c for c in found if c not in CSV_COLUMNS]

    def write(handle: Any) -> None:
        table = csv.DictWriter(handle, columns, lineterminator="\n")
        table.writeheader()
        table.writerows(rows)

    atomic_write(directory / "report.csv", write)
    write_json(directory / "report.json", report)


#: The report's fields its dump manifest repeats (what a folder of dumps is of).
DUMP_META = ("component", "variant", "dtype", "config", "seed", "weights", "versions", "git_commit", "run_id")


def write_report_dir(directory: Path, report: dict[str, Any], captures: Mapping[str, Any],
                     keep: Callable[[str, str], bool] | None = None) -> None:
    """A finished component run's folder: the captured tensors (``keep``: see ``write_dumps``) and their
    manifest, then the reports (``report.json`` last)."""
    write_dumps(directory, {k: report.get(k) for k in DUMP_META}, captures, keep)
    write_reports(directory, report)


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or the folder holding it), checking it is one of ours; schema 1 is upgraded."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    report = load_json(path, "report")
    if not isinstance(report, dict):
        raise InputError(f"report {path}: expected a JSON object")
    missing = [k for k in ("schema", "component", "verdict", "layers") if k not in report]
    if missing:
        raise InputError(f"report {path} lacks {missing}; not a parity report")
    if report["schema"] not in READABLE_SCHEMAS:
        raise InputError(f"report {path}: schema {report['schema']!r}; this harness reads {READABLE_SCHEMAS}")
    if not isinstance(report["layers"], list) or not all(isinstance(r, dict) and "layer" in r for r in report["layers"]):
        raise InputError(f"report {path}: 'layers' must be a list of objects with a 'layer' name")
    restore_nonfinite(report, report.get("nonfinite") or {})
    if report["schema"] == 1:
        for row in report["layers"]:
            row.setdefault("failures", [{"kind": "recorded", "metric": "verdict", "value": row.get("verdict"),
                                         "limit": "PASS", "message": reason}
                                        for reason in (row.get("reasons") or "").split("; ") if reason])
            row.setdefault("limits", {})
    return report


def describe_layer(row: dict[str, Any]) -> str:
    """A failing row in one line: its failures, or its key metrics (cosine with enough digits to differ from 1)."""
    parts = []
    for key, style in (("cosine", "cos"), ("max_abs", "g"), ("max_rel", "g"), ("rmse", "g"), ("budget_ratio", "g")):
        if key in row and row[key] is not None:
            parts.append(f"{key.replace('_', ' ')} {fmt(row[key], style)}")
    if any(row.get(k) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx")):
        parts.append(f"NaN/Inf ref {row.get('nan_ref', 0)}/{row.get('inf_ref', 0)}, "
                     f"MLX {row.get('nan_mlx', 0)}/{row.get('inf_mlx', 0)}")
    if not parts and row.get("verdict") == FAIL:
        return row.get("reasons") or "no metrics"
    return "  ".join(parts) or "no metrics"


def likely_mistake(report: dict[str, Any]) -> str | None:
    """One line for a person: the top known mistake explaining the first divergence (``parity explain``), or that
    none does; None without an explanation."""
    entries = (report.get("explanation") or {}).get("layers") or []
    return f"parity explain (advice): {entries[0]['summary']}" if entries and entries[0].get("summary") else None


def terminal_summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: verdict, first divergence, worst layer, what was not checked, where the files are."""
    s = report["summary"]
    name = report.get("variant") or report["component"]
    excluded = f", {s['excluded']} excluded" if s.get("excluded") else ""
    lines = [f"[{name} {report['dtype']}] {report['verdict']}: {s['layers'] - s['failed']}/{s['layers']} layers pass{excluded}"]
    first = report["first_divergence"]
    if first:
        row = next((r for r in report["layers"] if r["layer"] == first), None)
        why = f" ({row['reasons']})" if row and row.get("reasons") else ""
        lines.append(f"  first divergence: {first}{why}")
        if likely_mistake(report):
            lines.append(f"  {likely_mistake(report)}")
    if report.get("culprit"):
        lines.append(f"  culprit (first block whose own, teacher-forced error breaks its limit): {report['culprit']}")
    worst = report.get("worst")
    if worst and worst.get("layer") != first:
        lines.append(f"  worst layer: {worst['layer']}  {describe_layer(worst)}")
    if s.get("nonfinite_layers"):
        lines.append(f"  NaN/Inf in {s['nonfinite_layers']} layer(s)")
    if s.get("max_budget_ratio") is not None:
        lines.append(f"  max precision-budget ratio: {fmt(s['max_budget_ratio'])} "
                     "(layers that match the reference to float32 tolerance excepted)")
    for section in report["sections"]:
        if section["passed"] is not None:
            lines.append(f"  {section['title']}: {'PASS' if section['passed'] else 'FAIL'} {section.get('note', '')}".rstrip())
    if report.get("crash"):
        lines.append(f"  crash: {report['crash']['side']} after {report['crash']['after'] or 'no layer'}: "
                     f"{report['crash']['error']}")
    if report.get("report_dir"):
        lines.append(f"  report: {report['report_dir']}")
    return "\n".join(lines)

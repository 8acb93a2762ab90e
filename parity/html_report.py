"""Self-contained HTML reports a person reads: one ``report.html`` per component run, and an index.

``parity report PATH`` accepts a component report directory (holding ``report.json``), a run
directory (holding several), or a reports folder (every run in it; ``--latest`` for the newest
only), writes ``report.html`` next to each ``report.json`` and ``index.html`` in the reports
folder. Pages embed their plots as base64 PNGs and their CSS/JS inline, and forbid network
access with a Content-Security-Policy, so a page can be mailed or archived on its own.

Nothing here is specific to a component: sections are drawn by ``kind`` (curves -> line plot,
heatmap -> image, table -> HTML table), and tensor images come from the ``.npy`` dumps. A run
with attention maps (``<attention>/probs`` layers) gets an attention section from their per-head
metrics and dumps (:mod:`parity.attention_report`).
"""
from __future__ import annotations

import json
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from jinja2 import Environment, FileSystemLoader

from parity.dumps import incomplete_reason, layer_file, manifest_files, write_text
from parity.report import load_report
from parity.vocab import InputError, fmt, inside, load_json, load_npy, number

TEMPLATES = Path(__file__).resolve().parent / "templates"
INDEX_NAME = "index.html"
HTML_NAME = "report.html"
#: Dumps larger than this are memory-mapped instead of read.
MMAP_BYTES = 256 << 20
_RUN_TIME = re.compile(r"^(\d{8}-\d{6})")


# --- formatting ------------------------------------------------------------------------------

def sort_key(value: Any) -> str:
    """``data-sort`` value for the inline sorter: a number JS parses, or "" (missing; sorts last)."""
    x = number(value)
    if x is None:
        return ""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "Infinity" if x > 0 else "-Infinity"
    return repr(x)


def cell(text: Any = "", sort: str | None = None, cls: str = "", href: str = "", badge: str = "",
         title: str = "", detail: str = "") -> dict[str, Any]:
    """A table cell for ``macros.table``: text, ``data-sort`` key, classes, link or badge, and a detail line."""
    return {"text": "" if text is None else str(text), "sort": sort, "cls": cls, "href": href,
            "badge": badge, "title": title, "detail": detail, "meta": ""}


def num_cell(value: Any, style: str = "g", bad: bool = False, title: str = "") -> dict[str, Any]:
    return cell(fmt(value, style), sort_key(value), "num bad" if bad else "num", title=title)


def column(label: str, num: bool = False, title: str = "") -> dict[str, Any]:
    return {"label": label, "num": num, "title": title}


def _json(value: Any, limit: int = 20000) -> str:
    text = json.dumps(value, indent=2, default=str, allow_nan=True)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text) - limit} more characters)"


def _env() -> Environment:
    return Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                       trim_blocks=False, lstrip_blocks=False)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _rel(target: Path, start: Path) -> str:
    return Path(os.path.relpath(target, start)).as_posix()


# --- the per-layer table -----------------------------------------------------------------------

#: (row key, header, style, header tooltip); a cell is marked failing when a recorded failure names its metric.
METRIC_COLUMNS = [
    ("cosine", "cosine", "cos", "cosine similarity of MLX and reference (digits until it differs from 1)"),
    ("max_abs", "max abs", "g", "largest |MLX - reference|"),
    ("abs_limit", "abs limit", "g", "atol + rtol * max|reference| (float32 threshold)"),
    ("max_rel", "max rel", "g", "largest relative error"),
    ("mean_abs", "mean abs", "g", "mean |MLX - reference|"),
    ("rmse", "RMSE", "g", "root mean square of MLX - reference"),
    ("snr_db", "SNR dB", "db", "10 log10(|ref|^2 / |MLX - ref|^2)"),
    ("budget_ratio", "budget ratio", "g", "our error vs float64 truth / the reference's own bf16 error"),
    ("budget_limit", "calibrated limit", "g", "the budget ratio limit calibrated on this layer's noise (parity calibrate)"),
    ("err_vs_truth", "MLX vs truth", "g", "RMSE of MLX against the float64 reference"),
    ("ref_err_vs_truth", "ref vs truth", "g", "RMSE of the bf16 reference against its float64 run"),
]


def _value(row: dict[str, Any], key: str) -> Any:
    """A metric of a row; ``abs_limit`` lives among the applied limits (schema 2)."""
    limits = row.get("limits") or {}
    if key == "abs_limit":
        return limits.get("abs_limit", row.get("abs_limit"))
    if key == "budget_limit":
        return limits.get("budget_ratio") if "budget_ratio" in limits.get("calibrated", []) else None
    return row.get(key)


def _pair(a: Any, b: Any) -> str:
    if a == b:
        return fmt(a) if not isinstance(a, list) else str(a)
    return f"ref {a if a is not None else '–'} / MLX {b if b is not None else '–'}"


def layer_table(layers: list[dict[str, Any]], first: str | None) -> dict[str, Any]:
    """The per-layer table: metric columns present in any row; a failing row's reasons under its name."""
    present = [c for c in METRIC_COLUMNS if any(_value(row, c[0]) is not None for row in layers)]
    columns = [column("#", True), column("layer", title="reference name (→ MLX name), shape · dtype, and why a failing layer fails"),
               column("verdict")]
    columns += [column(label, True, tip) for _key, label, _style, tip in present]
    columns += [column("NaN/Inf", True, "non-finite values: ref NaN/Inf · MLX NaN/Inf")]
    rows = []
    for i, row in enumerate(layers):
        name = str(row.get("layer", "?"))
        verdict = str(row.get("verdict", "?"))
        reasons = row.get("reasons") or ""
        if isinstance(reasons, list):
            reasons = "; ".join(map(str, reasons))
        label = name if row.get("mlx_layer") in (None, name) else f"{name} → {row['mlx_layer']}"
        if row.get("adapter"):
            label += f" ({row['adapter']})"
        if row.get("excluded"):
            reasons = f"excluded: {row['excluded']}"
        layer_cell = cell(label, name, "layer", detail=reasons)
        layer_cell["meta"] = f"{_pair(row.get('shape_ref'), row.get('shape_mlx'))} · {_pair(row.get('dtype_ref'), row.get('dtype_mlx'))}"
        cells = [cell(i + 1, str(i + 1), "num"), layer_cell, cell(verdict, badge=verdict)]
        failed_metrics = {str(f.get("metric", "")).removeprefix("sample_") for f in row.get("failures") or []}
        for key, _label, style, _tip in present:
            value = _value(row, key)
            bad = verdict == "FAIL" and key in failed_metrics
            tip = ""
            if key == "budget_ratio" and row.get("budget_excused"):
                tip = "excused: agrees with the reference to float32 tolerance"
            calibrated = key == "abs_limit" and "abs_limit" in (row.get("limits") or {}).get("calibrated", [])
            c = num_cell(value, style, bad, tip or ("calibrated on this layer's noise" if calibrated else ""))
            if tip:
                c["text"] += " (excused)"
            elif calibrated:
                c["text"] += " (cal.)"
            cells.append(c)
        nonfinite = {k: int(row.get(k) or 0) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx")}
        total = sum(nonfinite.values())
        text = "0" if total == 0 else (f"{nonfinite['nan_ref']}/{nonfinite['inf_ref']} · "
                                       f"{nonfinite['nan_mlx']}/{nonfinite['inf_mlx']}")
        cells.append(cell(text, str(total), "num bad" if total else "num"))
        classes = [c for c, on in (("fail", verdict == "FAIL"), ("excluded", verdict == "EXCLUDED"),
                                    ("first", name == first)) if on]
        rows.append({"cls": " ".join(classes), "id": f"layer-{i + 1}", "cells": cells})
    return {"id": "layers", "columns": columns, "rows": rows}


# --- sections ----------------------------------------------------------------------------------

def render_section(section: dict[str, Any], number: int) -> dict[str, Any]:
    """A report section drawn by its ``kind``; a malformed one shows its data and the error, never aborts the page."""
    from parity import plots

    kind = section.get("kind")
    data = section.get("data") if isinstance(section.get("data"), dict) else {}
    passed = section.get("passed")
    title = str(section.get("title") or section.get("name") or f"section {number}")
    out = {"title": title, "anchor": f"{number}-{re.sub(r'[^A-Za-z0-9_-]', '_', str(section.get('name', '')))}",
           "status": "INFO" if passed is None else ("PASS" if passed else "FAIL"),
           "note": section.get("note") or "", "failing": section.get("failing") or "",
           "image": None, "table": None, "raw": None, "error": None}
    try:
        if kind == "curves":
            out["image"] = plots.curves_plot(data)
        elif kind == "heatmap":
            out["image"] = plots.heatmap_plot(data)
        elif kind == "table":
            out["table"] = section_table(data, section.get("failing"))
        else:
            out["error"] = f"unknown section kind {kind!r}"
        if out["image"] is None and out["table"] is None and not out["error"]:
            out["error"] = "no data"
    except Exception as err:  # noqa: BLE001 - a bad section must not take the whole report down
        out["error"] = f"{type(err).__name__}: {err}"
    if out["error"] or kind in ("curves", "heatmap"):
        raw = _json(section.get("data"))
        out["raw"] = raw if out["error"] or len(raw) <= 6000 else None
    return out


def section_table(data: dict[str, Any], failing: str | None = None) -> dict[str, Any]:
    columns = [str(c) for c in data.get("columns") or []]
    rows = data.get("rows") or []
    width = max([len(columns), *(len(r) for r in rows if isinstance(r, (list, tuple)))], default=0)
    columns += [""] * (width - len(columns))
    numeric = [any(number(r[i]) is not None for r in rows if isinstance(r, (list, tuple)) and i < len(r))
               for i in range(width)]
    body = []
    for row in rows:
        row = list(row) if isinstance(row, (list, tuple)) else [row]
        cells = []
        for i in range(width):
            value = row[i] if i < len(row) else None
            if number(value) is not None:
                cells.append(num_cell(value))
            else:
                cells.append(cell("–" if value is None else value, None if not numeric[i] else ""))
        hit = failing is not None and any(str(v) == str(failing) for v in row)
        verdicts = [str(v).upper() for v in row]
        body.append({"cls": "fail" if hit or "FAIL" in verdicts else "", "id": "", "cells": cells})
    return {"id": "", "columns": [column(c, numeric[i]) for i, c in enumerate(columns)], "rows": body}


# --- tensor images -----------------------------------------------------------------------------

def _load_dump(path: Path) -> np.ndarray:
    return load_npy(path, mmap=path.is_file() and path.stat().st_size > MMAP_BYTES)


def _dump_path(report_dir: Path, manifest: dict[str, Any], side: str, layer: str) -> Path:
    relative = manifest_files(manifest, side, f"report {report_dir}").get(layer) or f"{side}/{layer_file(layer)}"
    return inside(report_dir, relative, f"report {report_dir}: manifest entry of the {side} dump of {layer!r}")


def tensor_views(report_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """Images of the first diverging layer and of the worst layer (one if they are the same)."""
    from parity import plots

    rows = {str(r.get("layer")): r for r in report.get("layers") or []}
    wanted: list[tuple[str, str]] = []
    first = report.get("first_divergence")
    if first in rows:
        wanted.append(("First divergence", first))
    worst = (report.get("worst") or {}).get("layer")
    which = "lowest cosine among failing layers" if rows.get(worst, {}).get("verdict") == "FAIL" else "lowest cosine"
    if worst in rows and worst != first:
        wanted.append((f"Worst layer ({which})", worst))
    elif worst in rows:
        wanted[0] = (f"First divergence, also the worst layer ({which})", worst)
    try:
        manifest = load_json(report_dir / "manifest.json", "manifest")
    except InputError:
        manifest = {}
    views = []
    for heading, layer in wanted:
        row = rows[layer]
        view = {"heading": heading, "layer": layer, "note": "", "caption": "", "image": None, "truth_image": None}
        views.append(view)
        try:
            ref = _load_dump(_dump_path(report_dir, manifest, "ref", layer))
            ours = _load_dump(_dump_path(report_dir, manifest, "mlx", str(row.get("mlx_layer") or layer)))
        except InputError as err:
            view["note"] = f"No tensor image: {err}."
            continue
        if row.get("adapter"):
            from parity.alignment import apply_adapter

            try:
                ours = apply_adapter(row["adapter"], np.asarray(ours), tuple(ref.shape))
            except InputError as err:
                view["note"] = f"No tensor image: {err}."
                continue
        if ref.shape != ours.shape:
            view["note"] = f"No image: shapes differ (reference {list(ref.shape)}, MLX {list(ours.shape)})."
            continue
        truth = None
        try:
            truth_path = _dump_path(report_dir, manifest, "truth", layer)
            if truth_path.is_file():
                truth = _load_dump(truth_path)
        except InputError as err:
            view["note"] = f"Float64 truth not shown: {err}."
        try:
            view["image"], view["caption"], view["truth_image"] = plots.side_by_side(ref, ours, truth)
        except Exception as err:  # noqa: BLE001 - an odd tensor must not take the page down
            view["note"] = f"Could not draw this tensor: {type(err).__name__}: {err}."
    return views


# --- attention maps ------------------------------------------------------------------------------

def attention_view(report_dir: Path, report: dict[str, Any]) -> dict[str, Any] | None:
    """The attention section: per-head table, entropy and mass over depth, the worst heads' maps (None: no maps)."""
    from parity import attention_report, plots

    rows = attention_report.map_rows(report)
    if not rows:
        return None
    heads = attention_report.head_rows(rows)
    table_columns = [column("layer"), column("head", True), column("verdict")]
    table_columns += [column(header, True) for _key, header, _value in heads[0]["values"]]
    body = []
    for entry in heads:
        failing = entry["failing"]
        cells = [cell(entry["layer"], cls="layer", detail=", ".join(m.removeprefix("attn_") for m in failing)),
                 cell(entry["head"], str(entry["head"]), "num"), cell("FAIL" if failing else "PASS",
                                                                      badge="FAIL" if failing else "PASS")]
        cells += [num_cell(value, bad=key in failing)
                  for key, _header, value in entry["values"]]
        body.append({"cls": "fail" if failing else "", "id": "", "cells": cells})
    try:
        manifest = load_json(report_dir / "manifest.json", "manifest")
    except InputError:
        manifest = {}

    def load(side: str, layer: str) -> np.ndarray | None:
        path = _dump_path(report_dir, manifest, side, layer)
        return _load_dump(path) if path.is_file() else None
    return {"table": {"id": "attention-heads", "columns": table_columns, "rows": body},
            "curves": [image for image in map(plots.curves_plot, attention_report.depth_curves(rows)) if image],
            "grids": attention_report.grids(rows, load)}


# --- the run report ------------------------------------------------------------------------------

def _budget_limit(layers: list[dict[str, Any]]) -> float | None:
    """The budget limit the run applied (the most common one among its layers)."""
    limits = [number((r.get("limits") or {}).get("budget_ratio")) for r in layers]
    limits = [x for x in limits if x is not None]
    return max(set(limits), key=limits.count) if limits else None


def _calibration_text(calibration: dict[str, Any] | None) -> str:
    """Which per-layer limits the run used (``parity calibrate``), or why none."""
    if not calibration:
        return "none (global limits)"
    if calibration.get("note"):
        return f"not used: {calibration['note']}"
    return (f"{calibration.get('layers')} layers calibrated over {calibration.get('seeds')} seeds "
            f"({calibration.get('rule')}), {calibration.get('path')}")


def _crash_label(crash: dict[str, Any]) -> str:
    return f"{crash.get('side')} crashed after {crash.get('after') or 'no layer'}"


def render_report(report_dir: str | Path, index_link: str | None = None) -> str:
    """The HTML page of one component report directory."""
    from parity import plots

    report_dir = Path(report_dir)
    report = load_report(report_dir)
    layers = [r for r in report.get("layers") or [] if isinstance(r, dict)]
    first = report.get("first_divergence")
    names = [str(r.get("layer")) for r in layers]
    first_info = None
    if first:
        index = names.index(first) if first in names else None
        reasons = layers[index].get("reasons") if index is not None else ""
        anchor = f"layer-{index + 1}" if index is not None else ("crash" if report.get("crash") and
                                                                  first == _crash_label(report["crash"]) else "sections")
        first_info = {"layer": first, "index": index, "reasons": reasons, "anchor": anchor}
    summary = report.get("summary") or {}
    raw_sections = [s for s in report.get("sections") or [] if isinstance(s, dict)]
    sections = [render_section(s, i + 1) for i, s in enumerate(raw_sections)]
    if first_info and first_info["index"] is None:  # a section failed first: point at it
        for raw, shown in zip(raw_sections, sections):
            if raw.get("passed") is False and first in (raw.get("failing"), f"section:{raw.get('name')}"):
                first_info.update(anchor=f"section-{shown['anchor']}", reasons=f"{shown['title']}: {shown['note']}".rstrip(": "))
                break
    cosines = [(r["cosine"], str(r.get("layer"))) for r in layers
               if number(r.get("cosine")) is not None and math.isfinite(r["cosine"])]
    lowest = min(cosines, default=(summary.get("worst_cosine"), ""))
    compared = [r for r in layers if r.get("verdict") != "EXCLUDED"]
    failed = sum(r.get("verdict") == "FAIL" for r in compared)
    nonfinite = [str(r.get("layer")) for r in compared if any(r.get(k) for k in ("nan_ref", "inf_ref", "nan_mlx", "inf_mlx"))]
    cards = [
        {"label": "failing layers", "value": f"{failed} / {len(compared)}", "bad": failed > 0},
        {"label": "lowest cosine" + (f" ({lowest[1]})" if lowest[1] else ""), "value": fmt(lowest[0], "cos"),
         "bad": any(r.get("verdict") == "FAIL" and str(r.get("layer")) == lowest[1] for r in layers)},
        {"label": "max abs error", "value": fmt(summary.get("max_abs")), "bad": False},
    ]
    if nonfinite:
        cards.insert(1, {"label": f"NaN / Inf (first: {nonfinite[0]})", "value": f"NaN in {len(nonfinite)} layer(s)",
                         "bad": True})
    if len(compared) < len(layers):
        cards.append({"label": "excluded layers", "value": str(len(layers) - len(compared)), "bad": False})
    limit = _budget_limit(layers)
    if summary.get("max_budget_ratio") is not None:
        ratio = number(summary.get("max_budget_ratio"))
        over = any(f.get("metric") == "budget_ratio" for r in layers for f in r.get("failures") or [])
        cards.append({"label": "max budget ratio" + (f" (limit {limit:g})" if limit else ""),
                      "value": fmt(ratio), "bad": over})
    if sections:
        bad = sum(s["status"] == "FAIL" for s in sections)
        cards.append({"label": "failing sections", "value": f"{bad} / {len(sections)}", "bad": bad > 0})
    versions = report.get("versions") or {}
    commit = report.get("git_commit")
    meta = [("component", report.get("component")), ("dtype", report.get("dtype")),
            ("run", report.get("run_id") or report_dir.parent.name), ("seed", report.get("seed")),
            ("weights", report.get("weights", "–")), ("git commit", commit or "unknown"),
            ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if k != "platform") or "–"),
            ("platform", versions.get("platform", "–")),
            ("duration", f"{report['seconds']} s" if report.get("seconds") is not None else "–"),
            ("calibration", _calibration_text(report.get("calibration"))),
            ("report folder", report.get("report_dir") or str(report_dir))]
    files = [(name, name) for name in ("report.json", "report.csv", "manifest.json") if (report_dir / name).is_file()]
    html = _env().get_template("report.html.j2").render(
        r={"component": report.get("component", "?"), "dtype": report.get("dtype", "?"),
           "verdict": report.get("verdict", "UNKNOWN")},
        first=first_info, culprit=report.get("culprit"), passed_layers=len(compared) - failed, total_layers=len(compared), cards=cards,
        crash=report.get("crash"),
        meta=[(k, "–" if v is None else v) for k, v in meta],
        config_json=_json(report.get("config")), versions_json=_json(versions),
        depth_plot=plots.depth_plot(layers, first, limit) if layers else None,
        layer_table=layer_table(layers, first), sections=sections, slices=tensor_views(report_dir, report),
        attention=attention_view(report_dir, report),
        index_link=index_link, generated=_now(), source=str(report_dir), files=files)
    return html


def write_html_report(report_dir: str | Path, index_link: str | None = None) -> Path:
    """Write ``report.html`` into one component report directory; returns its path."""
    report_dir = Path(report_dir)
    if index_link is None and (report_dir.parent.parent / INDEX_NAME).is_file():
        index_link = f"../../{INDEX_NAME}"
    path = report_dir / HTML_NAME
    write_text(path, render_report(report_dir, index_link))
    return path


def find_report_dirs(path: str | Path) -> list[Path]:
    """Component report directories under ``path``: itself, its children (a run), or its grandchildren (a reports folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist")
    if (path / "report.json").is_file():
        return [path]
    found = sorted(p.parent for p in path.glob("*/report.json"))
    return found or sorted(p.parent for p in path.glob("*/*/report.json"))


def write_html_reports(run_dir_or_report_dir: str | Path, stale_only: bool = False,
                       index_link: bool | None = None) -> list[Path]:
    """Write ``report.html`` for every report under a report dir, a run dir or a reports folder.

    ``stale_only`` skips reports whose ``report.html`` is newer than their ``report.json``.
    ``index_link`` True links each page to ``../../index.html`` (the reports folder's index, e.g.
    when :func:`write_index` runs next); otherwise a page links to it only if it exists already.
    Returns the pages written.
    """
    dirs = find_report_dirs(run_dir_or_report_dir)
    if not dirs:
        raise InputError(f"no report.json under {run_dir_or_report_dir}")
    written = []
    for report_dir in dirs:
        html = report_dir / HTML_NAME
        if stale_only and html.is_file() and html.stat().st_mtime >= (report_dir / "report.json").stat().st_mtime:
            continue
        written.append(write_html_report(report_dir, f"../../{INDEX_NAME}" if index_link else None))
    return written


# --- the index of runs -------------------------------------------------------------------------

def _run_time(run_dir: Path) -> float:
    match = _RUN_TIME.match(run_dir.name)
    if match:
        try:
            return datetime.strptime(match.group(1), "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            pass
    return run_dir.stat().st_mtime


def run_dirs(reports_root: str | Path, finished: bool = False) -> list[Path]:
    """Run folders (holding ``<component>/report.json``, or marked incomplete) of a reports folder, newest first.

    ``finished``: only runs that ended (an interrupted run is never read as a finished one).
    """
    root = Path(reports_root)
    runs = [d for d in root.iterdir() if d.is_dir() and (any(d.glob("*/report.json")) or incomplete_reason(d))
            and not (finished and incomplete_reason(d))] if root.is_dir() else []
    return sorted(runs, key=lambda d: (_run_time(d), d.name), reverse=True)


def latest_run(reports_root: str | Path) -> Path:
    runs = run_dirs(reports_root, finished=True)
    if not runs:
        raise InputError(f"no finished runs (folders with <component>/report.json) in {reports_root}")
    return runs[0]


def _when(run_dir: Path) -> str:
    return datetime.fromtimestamp(_run_time(run_dir), timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def write_index(reports_root: str | Path) -> Path:
    """Write ``<reports_root>/index.html``: every run's component reports, newest first, and any bisections."""
    root = Path(reports_root)
    if not root.is_dir():
        raise InputError(f"reports folder {root} does not exist")
    runs = run_dirs(root)
    columns = [column("run"), column("time (UTC)"), column("component"), column("dtype"), column("verdict"),
               column("layers failing", True), column("first divergence"), column("worst cosine", True),
               column("max budget ratio", True), column("commit")]
    rows = []
    for run in runs:
        first_row = len(rows)
        reason = incomplete_reason(run)
        if reason:
            rows.append({"cls": "fail", "id": "", "cells": [
                cell(run.name, cls="mono nowrap"), cell(_when(run), cls="nowrap"), cell("(whole run)"), cell("–"),
                cell("INCOMPLETE", badge="FAIL"), cell("", ""), cell(reason), cell("", ""), cell("", ""), cell("–")]})
        for report_dir in sorted(p.parent for p in run.glob("*/report.json")):
            html = report_dir / HTML_NAME
            link = html if html.is_file() else report_dir / "report.json"
            try:
                report = load_report(report_dir)
            except InputError as err:
                rows.append({"cls": "fail", "id": "", "cells": [
                    cell(run.name, cls="mono nowrap"), cell(_when(run), cls="nowrap"),
                    cell(report_dir.name, href=_rel(link, root)), cell("–"),
                    cell("UNREADABLE", badge="FAIL"), cell("", ""), cell(str(err)), cell("", ""), cell("", ""),
                    cell("–")]})
                continue
            summary = report.get("summary") or {}
            layers = report.get("layers") or []
            failed = summary.get("failed", sum(r.get("verdict") == "FAIL" for r in layers))
            verdict = str(report.get("verdict", "UNKNOWN"))
            commit = str(report.get("git_commit") or "–")
            name = cell(report.get("variant") or report.get("component", report_dir.name), href=_rel(link, root))
            name["meta"] = "" if link is html else "no HTML yet: parity report"
            rows.append({"cls": "fail" if verdict != "PASS" else "", "id": "", "cells": [
                cell(run.name, cls="mono nowrap"), cell(_when(run), cls="nowrap"),
                name,
                cell(report.get("dtype", "–")), cell(verdict, badge=verdict),
                cell(f"{failed} / {summary.get('layers', len(layers))}", str(failed), "num"),
                cell(report.get("first_divergence") or "–", cls="mono"),
                num_cell(summary.get("worst_cosine"), "cos"), num_cell(summary.get("max_budget_ratio")),
                cell(commit[:12] + ("-dirty" if commit.endswith("-dirty") else ""), cls="mono nowrap", title=commit)]})
        if len(rows) > first_row:
            rows[first_row]["cls"] = (rows[first_row]["cls"] + " run-start").strip()
    bisect_rows = []
    for path in sorted(root.glob("*/bisect.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = load_json(path, "bisect")
        except InputError:
            continue
        html = path.parent / "bisect.html"
        first = data.get("first_changed") or data.get("first_bad") or {}
        bisect_rows.append({"cls": "", "id": "", "cells": [
            cell(path.parent.name, cls="mono"), cell(data.get("created", "–")),
            cell(", ".join(data.get("components") or ["all"])), cell(data.get("dtype", "–")),
            cell(str(data.get("good", ""))[:12], cls="mono"), cell(str(data.get("bad", ""))[:12], cls="mono"),
            cell(f"{str(first.get('commit', ''))[:12]} {first.get('subject', '')}".strip() or data.get("status", "–"),
                 cls="mono"),
            cell("HTML" if html.is_file() else "bisect.json", href=_rel(html if html.is_file() else path, root))]})
    html = _env().get_template("index.html.j2").render(
        root=str(root), run_count=len(runs), generated=_now(),
        runs_table={"id": "runs", "columns": columns, "rows": rows},
        bisect_table={"id": "bisections", "rows": bisect_rows, "columns": [
            column("bisection"), column("created"), column("components"), column("dtype"), column("good"),
            column("bad"), column("first bad commit"), column("report")]})
    path = root / INDEX_NAME
    write_text(path, html)
    return path
